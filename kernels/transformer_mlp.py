"""The pre-norm FFN sub-layer of a transformer layer with its residual, in one kernel.

Twin of `mvit3.ops.reference.transformer_mlp`: x + silu(norm(x) @ w1^T + b1) @ w2^T + b2 per
pixel, x [B, d, H, W] (any strides), w1 [F, d], w2 [d, F]. The tokens of both MobileViT
families are pixels, so the FFN is a per-pixel GEMM pair on the map itself.

One program owns BLOCK_M pixels (flattened over B*H*W, so a tile may straddle two samples):
- prologue: load the [BLOCK_M, d] tile, normalise it in fp32: "layer" takes each pixel's
  mean/variance over d in-kernel; "group" (GroupNorm with one group, v2-style) reads the
  per-sample (mean, rstd) that `group_norm_stats` computed before the launch;
- main loop over BLOCK_F-wide chunks of the hidden layer: h = silu(a @ w1[chunk]^T + b1),
  out += h @ w2[:, chunk]^T. The [BLOCK_M, F] hidden activation never touches memory;
- epilogue: + b2 + x, stored channels_last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (TARGET_PROGRAMS, WGMMA_ARCH, Work, batch_chunks, batch_part, cdiv,
                      channels_last_empty, check_device, divisibility_hint, dot_operand_type,
                      dot_precision, int32_offset_limit, interpreter_meta, launch,
                      map_stride_args, next_pow2, pixel_coords, row_layer_norm, rows_per_program,
                      silu, target_arch, vector_stride_error)
from .group_norm_stats import group_norm_stats

MAX_DIM = 256  # the [BLOCK_M, d] normalised tile and fp32 accumulator stay in registers
NORMS = ("layer", "group")


@triton.jit
def ffn_vector_sizes(D, F, stride_xb, stride_xh, stride_xw, stride_w1_d, stride_w2_f,
                     VEC: tl.constexpr):
    """The FFN's sizes and non-unit strides rewritten as multiples of VEC > 1 (`ffn_vector`: the
    host checked that they are): so written, the compiler loads x's rows and the weights' rows as
    VEC-channel vectors (with the channel masks constant over each) and stores the output so,
    where Triton's own specialisation cannot tell (d = 120, F = 240)."""
    return (D // VEC * VEC, F // VEC * VEC, stride_xb // VEC * VEC, stride_xh // VEC * VEC,
            stride_xw // VEC * VEC, stride_w1_d // VEC * VEC, stride_w2_f // VEC * VEC)


@triton.jit
def ffn_hidden_sum(x_ptrs, mask, norm_w_ptr, norm_b_ptr, stats_ptr, w1_ptr, b1_ptr, w2_ptr,
                   sample, pixel_valid, channels, channel_valid, D, f_start, f_stop, eps,
                   stride_w1_f, stride_w1_d, stride_w2_d, stride_w2_f,
                   BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
                   DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """silu(norm(x) @ w1[f]^T + b1[f]) @ w2[:, f]^T summed over hidden units f_start..f_stop-1
    of BLOCK_M pixels: an fp32 [BLOCK_M, D_PAD] tile, padded channels 0. x_ptrs: [BLOCK_M,
    D_PAD] pointers to x; sample: each pixel's sample (the "group" statistics are per
    sample); stats_ptr None: LayerNorm. Without b2 and the residual, so that programs
    sharing the hidden units of one tile can add their sums (transformer_mlp_project)."""
    tile = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, D_PAD]

    if stats_ptr is not None:  # norm="group"
        mean = tl.load(stats_ptr + sample * 2, mask=pixel_valid, other=0.0)
        rstd = tl.load(stats_ptr + sample * 2 + 1, mask=pixel_valid, other=0.0)
        centred = tile - mean[:, None]
    else:
        mean, rstd, centred = row_layer_norm(tile, mask, D, eps)
    gamma = tl.load(norm_w_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    beta = tl.load(norm_b_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    # padded channels get gamma = beta = 0, so they stay 0 and add nothing to the GEMM
    normed = (centred * rstd[:, None] * gamma[None, :] + beta[None, :]).to(DOT_TYPE)

    hidden_in_chunk = tl.arange(0, BLOCK_F)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for chunk_start in range(f_start, f_stop, BLOCK_F):
        hidden = chunk_start + hidden_in_chunk
        hidden_valid = hidden < f_stop
        # w1[chunk]^T [D_PAD, BLOCK_F] and w2[:, chunk]^T [BLOCK_F, D_PAD]: contiguous along
        # their last axis for weights pre-packed as [d, F] and [F, d] buffers
        w1_t = tl.load(w1_ptr + hidden[None, :] * stride_w1_f + channels[:, None] * stride_w1_d,
                       mask=channel_valid[:, None] & hidden_valid[None, :], other=0.0)
        b1 = tl.load(b1_ptr + hidden, mask=hidden_valid, other=0.0).to(tl.float32)
        h = silu(tl.dot(normed, w1_t.to(DOT_TYPE), input_precision=DOT_PRECISION) + b1[None, :])
        w2_t = tl.load(w2_ptr + channels[None, :] * stride_w2_d + hidden[:, None] * stride_w2_f,
                       mask=hidden_valid[:, None] & channel_valid[None, :], other=0.0)
        # padded hidden units: w1 = b1 = 0 gives silu(0) = 0, and their w2 rows are 0 anyway
        acc += tl.dot(h.to(DOT_TYPE), w2_t.to(DOT_TYPE), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def ffn_residual(acc, x_ptrs, mask, b2_ptr, channels, channel_valid):
    """acc + b2 + x: the FFN sub-layer's output from its hidden sum (fp32 [BLOCK_M, D_PAD])."""
    b2 = tl.load(b2_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    # the residual is re-read (an L1/L2 hit) rather than kept live in registers across the loop
    return acc + b2[None, :] + tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _transformer_mlp_kernel(
    # pointers (stats is None for norm="layer")
    x_ptr, norm_w_ptr, norm_b_ptr, stats_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    # sizes
    num_pixels, HW, W, D, F, eps,
    # strides of x [B, d, H, W] and the weights; out is a dense channels_last [B, d, H, W]
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_w1_f, stride_w1_d, stride_w2_d, stride_w2_f,
    # meta-parameters
    BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
    DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, VEC: tl.constexpr,
):
    if VEC > 1:
        D, F, stride_xb, stride_xh, stride_xw, stride_w1_d, stride_w2_f = ffn_vector_sizes(
            D, F, stride_xb, stride_xh, stride_xw, stride_w1_d, stride_w2_f, VEC)
    pixel = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pixel_valid = pixel < num_pixels
    sample, y, x = pixel_coords(pixel, HW, W)
    channels = tl.arange(0, D_PAD)
    channel_valid = channels < D
    mask = pixel_valid[:, None] & channel_valid[None, :]
    x_rows = x_ptr + sample * stride_xb + y * stride_xh + x * stride_xw  # [BLOCK_M] pointers
    x_ptrs = x_rows[:, None] + channels[None, :] * stride_xc
    acc = ffn_hidden_sum(x_ptrs, mask, norm_w_ptr, norm_b_ptr, stats_ptr, w1_ptr, b1_ptr, w2_ptr,
                         sample, pixel_valid, channels, channel_valid, D, 0, F, eps,
                         stride_w1_f, stride_w1_d, stride_w2_d, stride_w2_f,
                         BLOCK_M, D_PAD, BLOCK_F, DOT_TYPE, DOT_PRECISION)
    out = ffn_residual(acc, x_ptrs, mask, b2_ptr, channels, channel_valid)
    tl.store(out_ptr + pixel[:, None] * D + channels[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)


def _shape_error(x, norm, norm_weight, norm_bias, w1, b1, w2, b2) -> str | None:
    if x.dim() != 4:
        return f"x must be [B, d, H, W], got shape {list(x.shape)}"
    if norm not in NORMS:
        return f"norm must be one of {NORMS}, got {norm!r}"
    d = x.shape[1]
    if w1.dim() != 2 or w1.shape[1] != d:
        return f"w1 must be [F, {d}], got {list(w1.shape)}"
    f = w1.shape[0]
    expected = {"norm_weight": (norm_weight, (d,)), "norm_bias": (norm_bias, (d,)),
                "b1": (b1, (f,)), "w2": (w2, (d, f)), "b2": (b2, (d,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            return f"{name} must be {list(shape)}, got {list(t.shape)}"
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("w1", w1), ("b1", b1),
                    ("w2", w2), ("b2", b2)):
        if t.dtype != x.dtype:
            return f"{name} is {t.dtype}, x is {x.dtype}: all tensors must share a dtype"
    return vector_stride_error(norm_weight=norm_weight, norm_bias=norm_bias, b1=b1, b2=b2)


def why_unsupported(x, norm, norm_weight, norm_bias, eps, w1, b1, w2, b2) -> str | None:
    """None if the kernel takes these arguments, else why not."""
    reason = _shape_error(x, norm, norm_weight, norm_bias, w1, b1, w2, b2)
    if reason is not None:
        return reason
    if x.shape[1] > MAX_DIM:
        return f"d = {x.shape[1]} > {MAX_DIM}"
    return int32_offset_limit(tuple(x.shape), (x,))


def mlp_meta(num_pixels: int, d_pad: int, dtype: torch.dtype, arch: int) -> tuple:
    """(meta, small): `small_grid_tiles`'s answer (None unless a small grid) and the meta.
    BLOCK_M: pixels per program, the normalised tile and the accumulator ([BLOCK_M, d] fp32
    each) within 4K values (`rows_per_program`); BLOCK_F: hidden units per chunk, each weight
    chunk within 2K values (tl.dot needs K >= 16). The fp32 dots run on FMA units with their
    operands in registers: with these sizes, and 8 warps for 4K-value tiles, ptxas -v reports
    no or small (< 0.5 KB) spills for sm_75/80/90, where larger tiles spill kilobytes."""
    # 16-bit [64, 256] tiles need 80 KB of shared memory: an sm_90 block has 227 KB, an sm_75
    # one 64 KB; they only pay on sm_90 (warpgroup MMA), so elsewhere d > 128 keeps 16 rows
    block_m = rows_per_program(lambda bm: cdiv(num_pixels, bm), d_pad, dtype, arch,
                               max_rows=64 if d_pad <= 128 or arch >= WGMMA_ARCH else 16)
    small = small_grid_tiles(num_pixels, block_m, d_pad, dtype, arch)
    if small is not None:
        return interpreter_meta(dict(BLOCK_M=block_m, D_PAD=d_pad, BLOCK_F=small["BLOCK_F"],
                                     num_warps=small["num_warps"], num_stages=small["num_stages"]),
                                BLOCK_M=256, BLOCK_F=128), small
    return interpreter_meta(
        dict(BLOCK_M=block_m, D_PAD=d_pad, BLOCK_F=min(32, max(16, 2048 // d_pad)),
             # fp32 FMA dots hold more per thread: 8 warps from 2K-value tiles (4 spill at d = 128)
             num_warps=8 if block_m * d_pad >= (2048 if dtype == torch.float32 else 4096) else 4,
             # and no software pipelining for fp32 [16, 128] tiles: two stages spill 4 bytes on
             # sm_90 there (one stage spills at d = 256)
             num_stages=1 if dtype == torch.float32 and (block_m, d_pad) == (16, 128) else 2),
        BLOCK_M=256, BLOCK_F=128), None


def small_grid_tiles(num_pixels: int, block_m: int, d_pad: int, dtype: torch.dtype, arch: int) -> dict | None:
    """BLOCK_F, the projection's BLOCK_N (`transformer_mlp_project`), num_warps and num_stages
    of a small grid on sm_80+, else None. A grid of 16-row tiles under TARGET_PROGRAMS programs
    (batch 1: v3-XS's transformers run 64, 16 and 4 programs) leaves most SMs idle, so its
    latency is one program's chain of hidden chunks (+ projection chunks): wider chunks, on 8
    warps with two stages (the weight chunks then pass through shared memory, not registers),
    shorten it: v3-XS on sm_90, fp16 17/21/23 -> 5/5/7 steps, fp32 30/38/45 -> 11/14/12
    (then split over programs: 9/6/5, `transformer_mlp_project._splits`).
    ptxas -v of transformer_mlp_project at v3-XXS/XS/S shapes, no spill on sm_80/sm_90:
    - 16-bit, d <= 128: 128 hidden units and 128 projection channels a chunk, 105-175
      registers, 74 KB of shared memory (64 hidden units with 128 channels reach 255
      registers, on 4 warps they spill 0.4-1 KB);
    - 16-bit, d = 256: sm_90 the same, 216 registers and 140 KB; sm_80 (99 KB a block on
      sm_86/89) 64 and 64, 128 registers and 74 KB (64 hidden units with 128 channels spill
      0.7 KB for some shapes);
    - fp32 (FMA or TF32 mma), d <= 128: 32 hidden units and 64 channels, 64-181 registers (64
      hidden units spill 8-28 bytes; with one stage every wider chunk spills 0.3-10 KB); on
      sm_80 three stages (78 KB), as two spill 4 bytes once split in three;
    - fp32, d = 256 (the projection then splits at batch 1): 32 and 32 on sm_90, 106-126
      registers (64 and 32 spill 8 bytes in TF32 once split, 32 and 16 24 bytes); sm_80 32
      and 16, 128 registers (32 and 32 spill 8-12 bytes once split, 64 and 32 spill 304).
    sm_75 (64 KB of shared memory, no cp.async) keeps the general tiles."""
    if arch < 80 or block_m != 16 or cdiv(num_pixels, block_m) >= TARGET_PROGRAMS:
        return None
    stages = 2
    if dtype == torch.float32:
        block_f, block_n = (32, 64) if d_pad <= 128 else (32, 32) if arch >= WGMMA_ARCH else (32, 16)
        stages = 3 if d_pad <= 128 and arch < WGMMA_ARCH else 2
    elif d_pad > 128 and arch < WGMMA_ARCH:
        block_f, block_n = 64, 64
    else:
        block_f, block_n = 128, 128
    return dict(BLOCK_F=block_f, BLOCK_N=block_n, num_warps=8, num_stages=stages)


def ffn_args(x, norm_weight, norm_bias, stats, w1, b1, w2, b2, out, eps, start: int, stop: int) -> dict:
    """The runtime arguments of `ffn_hidden_sum`'s kernels for samples start..stop-1, with
    num_pixels, the map geometry and out (a dense channels_last [B, d, H, W] map)."""
    _, d, h, w = x.shape
    return dict(x_ptr=batch_part(x, start, stop), norm_w_ptr=norm_weight, norm_b_ptr=norm_bias,
                stats_ptr=batch_part(stats, start, stop),
                w1_ptr=w1, b1_ptr=b1, w2_ptr=w2, b2_ptr=b2, out_ptr=batch_part(out, start, stop),
                num_pixels=(stop - start) * h * w, HW=h * w, W=w, D=d, F=w1.shape[0], eps=float(eps),
                **map_stride_args("x", x),
                stride_w1_f=w1.stride(0), stride_w1_d=w1.stride(1),
                stride_w2_d=w2.stride(0), stride_w2_f=w2.stride(1))


def ffn_vector(x, w1, w2, *values) -> int:
    """VEC of the FFN kernels (`divisibility_hint`): it divides d, F, x's batch and pixel
    strides, the weights' non-unit strides (those of the fast model's pre-packed [d, F] and
    [F, d] buffers; weights not pre-packed have unit ones and get VEC = 1) and `values`."""
    return divisibility_hint(x.element_size(), x,
                             values=(x.shape[1], w1.shape[0], w1.stride(1), w2.stride(1), *values))


def ffn_work(pixels: int, d: int, f: int, block_f: int) -> Work:
    """The two GEMMs of the FFN over `pixels` and their chain of hidden chunks."""
    return Work(dot_flops=4 * pixels * d * f, serial_steps=cdiv(f, block_f))


def transformer_mlp(x: torch.Tensor, norm: str, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                    eps: float, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor) -> torch.Tensor:
    """x [B, d, H, W] -> channels_last [B, d, H, W]; see `mvit3.ops.reference.transformer_mlp`."""
    reason = why_unsupported(x, norm, norm_weight, norm_bias, eps, w1, b1, w2, b2)
    if reason is not None:
        raise ValueError(f"transformer_mlp: {reason}")
    check_device(x, norm_weight, norm_bias, w1, b1, w2, b2)
    b, d, h, w = x.shape
    stats = group_norm_stats(x, eps) if norm == "group" else None
    out = channels_last_empty(b, d, h, w, x)
    meta, small = mlp_meta(b * h * w, next_pow2(d), x.dtype, target_arch(x))
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    tile = (meta["BLOCK_M"], meta["D_PAD"])
    if small is None and x.dtype == torch.float32 and tile in ((64, 64), (16, 256)):
        # the shared FFN body (ffn_hidden_sum) with two stages spills 4 bytes a thread there
        # on sm_80/90 (IEEE and TF32); one stage does not (transformer_mlp_project, whose
        # projection tiles are live too, keeps its own table); small grids keep the 8 warps and
        # stages of `small_grid_tiles`
        num_stages = 1
    for start, stop in batch_chunks(b, out.shape, (x,)):
        args = ffn_args(x, norm_weight, norm_bias, stats, w1, b1, w2, b2, out, eps, start, stop)
        launch(_transformer_mlp_kernel, (cdiv(args["num_pixels"], meta["BLOCK_M"]),), args,
               dict(**meta, DOT_TYPE=dot_operand_type(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
                    VEC=ffn_vector(x, w1, w2)),
               num_warps=num_warps, num_stages=num_stages,
               work=ffn_work(args["num_pixels"], d, w1.shape[0], meta["BLOCK_F"]))
    return out
