"""1x1 conv as a pixel-row GEMM with a norm prologue and a bias/act/residual epilogue.

Twin of `mvit3.ops.reference.pointwise_conv`:
    y = act(cat(norm(x), x2) @ weight^T + bias) + residual, per pixel.

GEMM view: M = B*H*W pixels (rows), N = Cout, K = C1 (+ C2). One program owns a
[BLOCK_M pixels, BLOCK_N out-channels] tile; its K loop runs over x's C1 channels, then over
x2's C2 channels through a second pointer, so the concatenation never exists in memory.

The norm touches x only and happens in the prologue, on each A tile before tl.dot:
- "layer": LayerNorm over the C1 channels of each pixel. With C1 <= 256 (every LayerNorm of
  the models: d = 64 ... 240) one load of the whole [BLOCK_M, C1] row block (ROW_K: C1
  padded to a power of two) gives each row's mean and variance in fp32 registers. 16-bit
  tiles on sm_80+ then feed that normalised block to one tl.dot (BLOCK_K == ROW_K): the input
  is read once per tile and the K loop is one step. fp32 (whose FMA dots hold a thread's whole
  K slice of both operands in registers) and sm_75 (64 KB of shared memory) run the GEMM in
  K chunks, normalising each on the fly; wider inputs also take the statistics in chunks.
- "group": GroupNorm(1), statistics over a whole sample, taken beforehand by
  `group_norm_stats`; each row reads its own sample's (mean, rstd), because a tile of
  pixels may straddle two samples.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mvit3.ops.reference import ACTS, NORMS

from ._common import (LONG_LOOP, TARGET_PROGRAMS, WGMMA_ARCH, Work, batch_chunks, batch_part,
                      cat_maps_error, cdiv, channels_last_empty, check_device, divisibility_hint,
                      dot_operand_type, dot_precision, gemm_tile, int32_offset_limit,
                      interpreter_meta, launch_gemm_tiles, load_weight_tile, map_stride_args,
                      next_pow2, pixel_coords, pixel_tile_epilogue, row_layer_norm, target_arch,
                      vector_stride_error)
from .group_norm_stats import group_norm_stats


@triton.jit
def _pixel_layer_norm_stats(x_rows, row_mask, C, stride_c, eps,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 mean and 1/sqrt(var + eps) over the C channels of each pixel row: [BLOCK_M] each.

    One pass in BLOCK_K chunks; each chunk's (mean, M2) is merged into the running totals
    with Chan's formula, so the variance has no E[x^2] - E[x]^2 cancellation. Every chunk
    but the last is full, so k0 values precede chunk k0.
    """
    offs_k = tl.arange(0, BLOCK_K)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + offs_k
        mask = row_mask[:, None] & (k < C)[None, :]
        a = tl.load(x_rows[:, None] + k[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
        n_chunk = tl.minimum(C - k0, BLOCK_K).to(tl.float32)
        chunk_mean = tl.sum(a, axis=1) / n_chunk
        centred = tl.where(mask, a - chunk_mean[:, None], 0.0)
        n_before = k0 * 1.0  # as fp32
        n_total = n_before + n_chunk
        delta = chunk_mean - mean
        mean += delta * (n_chunk / n_total)
        m2 += tl.sum(centred * centred, axis=1) + delta * delta * (n_before * n_chunk / n_total)
    return mean, 1.0 / tl.sqrt(m2 / C + eps)


@triton.jit
def _whole_row_layer_norm(x_rows, row_mask, k, k_mask, C, stride_c, eps):
    """(mean, rstd, centred) of each pixel row from one load of its C channels k (k: the
    padded range, k_mask: k < C), as `row_layer_norm` gives them."""
    mask = row_mask[:, None] & k_mask[None, :]
    rows = tl.load(x_rows[:, None] + k[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    return row_layer_norm(rows, mask, C, eps)


@triton.jit
def _norm_affine(normed, norm_w_ptr, norm_b_ptr, k, k_mask):
    """normed * gamma[k] + beta[k] on an fp32 [BLOCK_M, K] tile (either may be None)."""
    if norm_w_ptr is not None:
        normed = normed * tl.load(norm_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    if norm_b_ptr is not None:
        normed = normed + tl.load(norm_b_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    return normed


@triton.jit
def _pointwise_conv_kernel(
    # pointers (x2, bias, residual, norm affine and group stats may be None)
    x_ptr, x2_ptr, w_ptr, bias_ptr, res_ptr, norm_w_ptr, norm_b_ptr, stats_ptr, out_ptr,
    # sizes
    M, HW, W, C1, C2, N, eps,
    # strides: x, x2 [B, C, H, W]; weight [N, C1 + C2]; residual [B, N, H, W]
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_x2b, stride_x2c, stride_x2h, stride_x2w,
    stride_wn, stride_wk,
    stride_rb, stride_rc, stride_rh, stride_rw,
    # meta-parameters
    NORM: tl.constexpr, ACT: tl.constexpr,
    DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_K: tl.constexpr,
    VEC: tl.constexpr,
):
    if VEC > 1:
        # C1, C2, N, the maps' batch and pixel strides and the weight's K stride are multiples
        # of VEC (`divisibility_hint`, the host checked): written so, x's rows and the weight's
        # rows load as VEC-channel vectors (with the channel masks constant over each) and the
        # output is stored so, where Triton's own specialisation cannot tell (v3-XS's layer_4:
        # C1 = 120, N = 360)
        C1 = C1 // VEC * VEC
        C2 = C2 // VEC * VEC
        N = N // VEC * VEC
        stride_wk = stride_wk // VEC * VEC
        stride_xb = stride_xb // VEC * VEC
        stride_xh = stride_xh // VEC * VEC
        stride_xw = stride_xw // VEC * VEC
        stride_x2b = stride_x2b // VEC * VEC
        stride_x2h = stride_x2h // VEC * VEC
        stride_x2w = stride_x2w // VEC * VEC
    offs_m, offs_n, row_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b, y, x = pixel_coords(offs_m, HW, W)
    x_rows = x_ptr + b * stride_xb + y * stride_xh + x * stride_xw  # [BLOCK_M] pointers

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if BLOCK_K == ROW_K:  # LayerNorm, whole rows as the one K step: x read once
        k = tl.arange(0, ROW_K)
        k_mask = k < C1
        mean, rstd, centred = _whole_row_layer_norm(x_rows, row_mask, k, k_mask, C1, stride_xc, eps)
        a = _norm_affine(centred * rstd[:, None], norm_w_ptr, norm_b_ptr, k, k_mask)
        w_tile = load_weight_tile(w_ptr, k * stride_wk, k_mask, offs_n, n_mask, stride_wn)
        acc = tl.dot(a.to(DOT_TYPE), w_tile.to(DOT_TYPE), acc, input_precision=DOT_PRECISION)
    else:
        if NORM == "layer":
            if ROW_K > 0:  # statistics from one load of whole rows, then the K loop
                channels = tl.arange(0, ROW_K)  # not `k`: the loop below reassigns that
                mean, rstd, _ = _whole_row_layer_norm(x_rows, row_mask, channels, channels < C1, C1,
                                                      stride_xc, eps)
            else:
                mean, rstd = _pixel_layer_norm_stats(x_rows, row_mask, C1, stride_xc, eps, BLOCK_M, BLOCK_K)
        elif NORM == "group":
            mean = tl.load(stats_ptr + b * 2, mask=row_mask, other=0.0)
            rstd = tl.load(stats_ptr + b * 2 + 1, mask=row_mask, other=0.0)
        # K over x's channels. Padded K columns may hold nonzero normalised values, but the
        # matching weight rows load as 0, so they add nothing.
        for k0 in range(0, C1, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < C1
            a = tl.load(x_rows[:, None] + k[None, :] * stride_xc,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if NORM != "none":
                a = _norm_affine((a.to(tl.float32) - mean[:, None]) * rstd[:, None],
                                 norm_w_ptr, norm_b_ptr, k, k_mask)
            w_tile = load_weight_tile(w_ptr, k * stride_wk, k_mask, offs_n, n_mask, stride_wn)
            acc = tl.dot(a.to(DOT_TYPE), w_tile.to(DOT_TYPE), acc, input_precision=DOT_PRECISION)

    # then K over x2's channels: weight columns C1 ... C1 + C2 - 1
    if x2_ptr is not None:
        x2_rows = x2_ptr + b * stride_x2b + y * stride_x2h + x * stride_x2w
        for k0 in range(0, C2, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < C2
            a = tl.load(x2_rows[:, None] + k[None, :] * stride_x2c,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = load_weight_tile(w_ptr, (C1 + k) * stride_wk, k_mask, offs_n, n_mask, stride_wn)
            acc = tl.dot(a.to(DOT_TYPE), w_tile.to(DOT_TYPE), acc, input_precision=DOT_PRECISION)

    pixel_tile_epilogue(acc, offs_m, offs_n, row_mask, n_mask, N, b, y, x, bias_ptr, res_ptr,
                        stride_rb, stride_rc, stride_rh, stride_rw, out_ptr, ACT)


MAX_ROW_K = 256  # widest LayerNorm input read as whole rows (a [64, 256] fp16 A tile: 32 KB)


def _meta(pixels: int, n: int, c1: int, c2: int, norm: str, dtype: torch.dtype, arch: int,
          precision: str, vec: int) -> dict:
    """Tile sizes from the GEMM [pixels, c1 + c2] x [c1 + c2, n], the dtype and sm_<arch>.

    BLOCK_N covers Cout up to 128 in one tile (the A tile and LayerNorm stats are then made
    once); wider outputs take 128-column tiles. BLOCK_M: 64 rows, fewer while the grid would
    leave SMs idle (under TARGET_PROGRAMS programs: batch 1 past layer_3), down to 16; 16-bit
    tiles on sm_90 keep 64 rows (warpgroup MMA) while that gives half of TARGET_PROGRAMS.
    BLOCK_K: 16-bit on sm_80+ takes 64 channels a step (up to the widest input), so the small
    grids of batch 1 walk short K loops (640 -> 160: 10 steps, not 40); fp32 runs on FMA units
    (IEEE) whose K-chunk operand fragments sit in registers, and sm_75's fp16 mma fragments
    likewise: 16 (with 32, ptxas spills on sm_80 (fp32) and sm_75 (fp16)), except fp32 16-row
    tiles: 32 (at most 213 registers, sm_75; 64 spill KBs on sm_80; TF32's mma fragments spill
    8 bytes on sm_90 with 32). ROW_K: LayerNorm
    statistics from whole rows (C1 <= MAX_ROW_K; 0: in chunks), and on 16-bit sm_80+ the one
    K step (BLOCK_K = ROW_K); see the module docstring.
    Warps keep at most 32 fp32 accumulators a thread. Shared memory: at most 72 KB (sm_80/90,
    three stages of 64-channel chunks), 16 KB (sm_75).
    """
    block_n = min(next_pow2(n), 128)
    sixteen_bit = dtype != torch.float32
    wide_k = sixteen_bit and arch >= 80

    def programs(block_m: int) -> int:
        return cdiv(pixels, block_m) * cdiv(n, block_n)

    row_k = next_pow2(c1) if norm == "layer" and c1 <= MAX_ROW_K else 0
    # mma.sync GPUs gain nothing from 64 rows; whole 16-bit rows of 64 pixels spill there
    block_m = 32 if row_k and wide_k and arch < WGMMA_ARCH else 64
    while block_m > 16 and programs(block_m) < TARGET_PROGRAMS and not (
            sixteen_bit and arch >= WGMMA_ARCH and programs(block_m) >= TARGET_PROGRAMS // 2):
        block_m //= 2
    if wide_k:
        block_k = row_k or min(64, next_pow2(max(c1, c2)))
    elif block_m == 16 and dtype == torch.float32 and precision == "ieee":
        # IEEE fp32 (FMA) dots of 16-row tiles hold 32-channel fragments without spilling.
        # A small grid whose K loop is long (batch 1: v3-XS's fusions of layer_4/5, 32 and 8
        # programs of 9-10 steps) takes [64, 64] weight chunks instead of [32, 128]: as many
        # values in registers, twice the programs and half the steps
        block_k = 32
        if programs(16) < TARGET_PROGRAMS and cdiv(c1, 32) + cdiv(c2, 32) > LONG_LOOP:
            block_n, block_k = min(block_n, 64), 64
    else:
        block_k = 16
    return interpreter_meta(
        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ROW_K=row_k,
             # fp32 dots, and mma.sync's 64-channel K steps, hold more per thread: 4 warps at
             # [32, 128] spill on sm_90 (fp32) and sm_80 (16-bit)
             num_warps=8 if block_m * block_n >= (8192 if sixteen_bit and arch >= WGMMA_ARCH else 4096) else 4,
             # 16-bit 16-row tiles on sm_90 whose vectors only VEC tells (v3-XS's 120 and 360
             # channels) spill 8 bytes with three stages (64 registers); two: 68-78, none
             num_stages=2 if dtype == torch.float32 or (
                 vec > 1 and block_m == 16 and arch >= WGMMA_ARCH) else 3,
             VEC=vec),
        BLOCK_M=256, BLOCK_K=64)


def _serial_steps(c1: int, c2: int, norm: str, meta: dict) -> int:
    """K-loop iterations of one program: the GEMM's K chunks, and for LayerNorm the statistics
    (none apart when the whole row is the one K chunk, one step from whole rows, else a pass
    over x's channels)."""
    stats_steps = 0
    if norm == "layer" and meta["ROW_K"] != meta["BLOCK_K"]:
        stats_steps = 1 if meta["ROW_K"] else cdiv(c1, meta["BLOCK_K"])
    return stats_steps + cdiv(c1, meta["BLOCK_K"]) + cdiv(c2, meta["BLOCK_K"])


def _shape_error(x, weight, bias, x2, residual, norm, norm_weight, norm_bias, act) -> str | None:
    error = cat_maps_error(x, x2)
    if error is not None:
        return error
    b, c1, h, w = x.shape
    c2 = x2.shape[1] if x2 is not None else 0
    if weight.dim() != 2 or weight.shape[1] != c1 + c2:
        return (f"weight must be [Cout, C1 + C2] = [Cout, {c1 + c2}] for x with C1={c1} and "
                f"x2 with C2={c2} channels, got shape {tuple(weight.shape)}")
    cout = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (cout,):
        return f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}"
    if residual is not None and tuple(residual.shape) != (b, cout, h, w):
        return f"residual must be [B, Cout, H, W] = {[b, cout, h, w]}, got shape {tuple(residual.shape)}"
    if norm not in NORMS:
        return f"norm must be one of {NORMS}, got {norm!r}"
    if act not in ACTS:
        return f"act must be one of {ACTS}, got {act!r}"
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if norm != "none" and t is not None and tuple(t.shape) != (c1,):
            return f"{name} must be [C1] = [{c1}] (the norm applies to x only), got shape {tuple(t.shape)}"
    return vector_stride_error(bias=bias, norm_weight=norm_weight, norm_bias=norm_bias)


def why_unsupported(x, weight, bias=None, x2=None, residual=None, norm="none", norm_weight=None,
                    norm_bias=None, eps=1e-5, act="none") -> str | None:
    """None if the Triton kernel takes these arguments, else why not."""
    error = _shape_error(x, weight, bias, x2, residual, norm, norm_weight, norm_bias, act)
    if error is not None:
        return error
    b, _, h, w = x.shape
    return int32_offset_limit((b, weight.shape[0], h, w), (x, x2, residual),
                              dict(weight=weight))


def pointwise_conv(x, weight, bias=None, x2=None, residual=None, norm="none", norm_weight=None,
                   norm_bias=None, eps=1e-5, act="none"):
    """y = act(cat(norm(x), x2) @ weight^T + bias) + residual -> channels_last [B, Cout, H, W]."""
    error = why_unsupported(x, weight, bias, x2, residual, norm, norm_weight, norm_bias, eps, act)
    if error is not None:
        raise ValueError(f"pointwise_conv: {error}")
    check_device(x, weight, bias, x2, residual, norm_weight, norm_bias)
    b, c1, h, w = x.shape
    c2 = x2.shape[1] if x2 is not None else 0
    cout = weight.shape[0]
    out = channels_last_empty(b, cout, h, w, like=x)
    if b * h * w == 0 or cout == 0:
        return out
    if norm == "none":
        norm_weight = norm_bias = None
    stats = group_norm_stats(x, eps) if norm == "group" else None
    precision = dot_precision(x.dtype)
    vec = divisibility_hint(x.element_size(), x, x2, values=(c1, c2, cout, weight.stride(1)))
    meta = _meta(b * h * w, cout, c1, c2, norm, x.dtype, target_arch(x), precision, vec)
    for start, stop in batch_chunks(b, out.shape, (x, x2, residual)):
        part = dict(x=batch_part(x, start, stop), x2=batch_part(x2, start, stop),
                    r=batch_part(residual, start, stop))
        m = (stop - start) * h * w
        launch_gemm_tiles(
            _pointwise_conv_kernel, m, cout,
            dict(x_ptr=part["x"], x2_ptr=part["x2"], w_ptr=weight, bias_ptr=bias, res_ptr=part["r"],
                 norm_w_ptr=norm_weight, norm_b_ptr=norm_bias, stats_ptr=batch_part(stats, start, stop),
                 out_ptr=batch_part(out, start, stop),
                 M=m, HW=h * w, W=w, C1=c1, C2=c2, N=cout, eps=float(eps),
                 **map_stride_args("x", x), **map_stride_args("x2", x2),
                 stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                 **map_stride_args("r", residual)),
            dict(NORM=norm, ACT=act, DOT_TYPE=dot_operand_type(x.dtype), DOT_PRECISION=precision,
                 **meta),
            Work(dot_flops=2 * m * cout * (c1 + c2), serial_steps=_serial_steps(c1, c2, norm, meta)))
    return out
