"""A v1-style FFN sub-layer and the LayerNorm + 1x1 projection after it, in one kernel.

Twin of `mvit3.ops.reference.transformer_mlp_project`: t = x + FFN(LayerNorm(x)) as
`transformer_mlp` computes it, and act(LayerNorm'(t) @ proj_weight^T + proj_bias), the next
transformer layer's LayerNorm + qkv or the block's final LayerNorm + conv_proj (+ BN, SiLU).
Both are returned: t is still the next attention's residual.

One program owns BLOCK_M whole pixels, so the second LayerNorm needs no other program:
- `ffn_hidden_sum` + `ffn_residual` (kernels/transformer_mlp.py) give t as an fp32 [BLOCK_M,
  d] tile in registers; it is stored (channels_last);
- the tile is normalised in registers (two-pass mean and variance, as the FFN's prologue) and
  cast to the dot type;
- a loop over BLOCK_N-wide chunks of the projection's Cout: [BLOCK_M, d] @ [d, BLOCK_N] + bias,
  act, stored channels_last.
Against `transformer_mlp` + `pointwise_conv`, t is not read back, the LayerNorm statistics
are not taken again, and one launch (with its serial chain) goes.

Small grids with a long chain (batch 1 in fp32: v3-XS runs 16 programs of 8 hidden and 6
projection chunks) split it (`_splits`): SPLIT_F programs share a tile's hidden units and
add their fp32 sums as split-K does (`merge_split_k`), and proj_groups such sets per tile
each project onto their own share of Cout, so each set computes the FFN sum again (the same
bits: same partials, same order) for a shorter chain: 14 -> 6 steps on 128 programs
(sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mvit3.ops.reference import ACTS

from ._common import (LONG_LOOP, MAX_SPLIT_K, TARGET_PROGRAMS, WGMMA_ARCH, Work, batch_chunks,
                      batch_part, cdiv, channels_last_empty, check_device, dot_operand_type,
                      dot_precision, int32_offset_limit, launch, load_weight_tile, merge_split_k,
                      next_pow2, pixel_coords, pixel_tile_epilogue, row_layer_norm, split_counters,
                      split_k_steps, target_arch, vector_stride_error)
from .transformer_mlp import (ffn_args, ffn_hidden_sum, ffn_residual, ffn_vector, ffn_vector_sizes,
                              ffn_work, mlp_meta)
from .transformer_mlp import why_unsupported as ffn_why_unsupported


@triton.jit
def _transformer_mlp_project_kernel(
    # pointers (stats is always None: LayerNorm; proj_b may be None; partials and counters:
    # the split's workspace, None unless SPLIT_F > 1)
    x_ptr, norm_w_ptr, norm_b_ptr, stats_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    proj_norm_w_ptr, proj_norm_b_ptr, proj_w_ptr, proj_b_ptr, proj_out_ptr,
    partials_ptr, counters_ptr,
    # sizes; split (SPLIT_F > 1): each of a tile's SPLIT_F programs takes f_per_split hidden
    # units (a multiple of BLOCK_F), each of its proj_groups groups n_per_group projection
    # channels (a multiple of BLOCK_N)
    num_pixels, HW, W, D, F, N, eps, proj_eps, f_per_split, proj_groups, n_per_group,
    # strides of x [B, d, H, W] and the weights; both outputs are dense channels_last maps
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_w1_f, stride_w1_d, stride_w2_d, stride_w2_f, stride_pn, stride_pk,
    # meta-parameters
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_F: tl.constexpr, VEC: tl.constexpr,
):
    if VEC > 1:
        D, F, stride_xb, stride_xh, stride_xw, stride_w1_d, stride_w2_f = ffn_vector_sizes(
            D, F, stride_xb, stride_xh, stride_xw, stride_w1_d, stride_w2_f, VEC)
        N = N // VEC * VEC  # (and the projection's: `ffn_vector` checked these too)
        stride_pk = stride_pk // VEC * VEC
    if SPLIT_F > 1:  # grid (tiles * proj_groups, SPLIT_F): axis 0 is merge_split_k's tile
        tile = tl.program_id(0) // proj_groups
        group = tl.program_id(0) % proj_groups
    else:
        tile = tl.program_id(0)
        group = 0
    pixel = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pixel_valid = pixel < num_pixels
    sample, y, x = pixel_coords(pixel, HW, W)
    channels = tl.arange(0, D_PAD)
    channel_valid = channels < D
    mask = pixel_valid[:, None] & channel_valid[None, :]
    x_rows = x_ptr + sample * stride_xb + y * stride_xh + x * stride_xw  # [BLOCK_M] pointers
    x_ptrs = x_rows[:, None] + channels[None, :] * stride_xc
    if SPLIT_F > 1:
        # this program's share of the hidden units; the tile's last program to finish gets
        # the sum of all SPLIT_F shares (in split order) and does the rest
        f_start = tl.program_id(1) * f_per_split
        acc = ffn_hidden_sum(x_ptrs, mask, norm_w_ptr, norm_b_ptr, stats_ptr, w1_ptr, b1_ptr,
                             w2_ptr, sample, pixel_valid, channels, channel_valid, D, f_start,
                             tl.minimum(f_start + f_per_split, F), eps,
                             stride_w1_f, stride_w1_d, stride_w2_d, stride_w2_f,
                             BLOCK_M, D_PAD, BLOCK_F, DOT_TYPE, DOT_PRECISION)
        acc, is_last = merge_split_k(acc, partials_ptr, counters_ptr, BLOCK_M, D_PAD, SPLIT_F)
        n_start = group * n_per_group
        n_stop = tl.minimum(n_start + n_per_group, N)
    else:  # (the whole loops with constant starts: runtime bounds cost registers)
        acc = ffn_hidden_sum(x_ptrs, mask, norm_w_ptr, norm_b_ptr, stats_ptr, w1_ptr, b1_ptr,
                             w2_ptr, sample, pixel_valid, channels, channel_valid, D, 0, F, eps,
                             stride_w1_f, stride_w1_d, stride_w2_d, stride_w2_f,
                             BLOCK_M, D_PAD, BLOCK_F, DOT_TYPE, DOT_PRECISION)
        is_last = True
        n_start = 0
        n_stop = N
    if is_last:
        t = ffn_residual(acc, x_ptrs, mask, b2_ptr, channels, channel_valid)  # [BLOCK_M, D_PAD]
        t = t.to(out_ptr.dtype.element_ty)
        # every projection group computed the same t (same partials, same order): one stores it
        tl.store(out_ptr + pixel[:, None] * D + channels[None, :], t, mask=mask & (group == 0))

        # LayerNorm of the stored values (rounded to the I/O dtype, as a separate
        # pointwise_conv would read them); padded channels hold 0, masked out of the variance
        _, rstd, centred = row_layer_norm(t.to(tl.float32), mask, D, proj_eps)
        gamma = tl.load(proj_norm_w_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
        beta = tl.load(proj_norm_b_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
        # padded channels: gamma = beta = 0 keeps them 0, and their weight rows load as 0
        normed = (centred * rstd[:, None] * gamma[None, :] + beta[None, :]).to(DOT_TYPE)

        for chunk_start in range(n_start, n_stop, BLOCK_N):
            offs_n = chunk_start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_stop
            # proj_weight^T [D_PAD, BLOCK_N]: contiguous along Cout for the K-major packed weight
            w_tile = load_weight_tile(proj_w_ptr, channels * stride_pk, channel_valid, offs_n,
                                      n_mask, stride_pn)
            proj = tl.dot(normed, w_tile.to(DOT_TYPE), input_precision=DOT_PRECISION)
            pixel_tile_epilogue(proj, pixel, offs_n, pixel_valid, n_mask, N, sample, y, x,
                                proj_b_ptr, None, 0, 0, 0, 0, proj_out_ptr, ACT)


def _projection_error(x, proj_norm_weight, proj_norm_bias, proj_weight, proj_bias, act) -> str | None:
    d = x.shape[1]
    if proj_weight.dim() != 2 or proj_weight.shape[1] != d:
        return f"proj_weight must be [Cout, {d}], got {list(proj_weight.shape)}"
    cout = proj_weight.shape[0]
    expected = {"proj_norm_weight": (proj_norm_weight, (d,)), "proj_norm_bias": (proj_norm_bias, (d,)),
                "proj_bias": (proj_bias, (cout,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            return f"{name} must be {list(shape)}, got {list(t.shape)}"
        if t is not None and t.dtype != x.dtype:
            return f"{name} is {t.dtype}, x is {x.dtype}: all tensors must share a dtype"
    if proj_weight.dtype != x.dtype:
        return f"proj_weight is {proj_weight.dtype}, x is {x.dtype}: all tensors must share a dtype"
    if act not in ACTS:
        return f"act must be one of {ACTS}, got {act!r}"
    return vector_stride_error(proj_norm_weight=proj_norm_weight, proj_norm_bias=proj_norm_bias,
                               proj_bias=proj_bias)


def why_unsupported(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, proj_norm_weight,
                    proj_norm_bias, proj_eps, proj_weight, proj_bias, act) -> str | None:
    """None if the kernel takes these arguments, else why not."""
    reason = ffn_why_unsupported(x, "layer", norm_weight, norm_bias, eps, w1, b1, w2, b2)
    if reason is not None:
        return reason
    reason = _projection_error(x, proj_norm_weight, proj_norm_bias, proj_weight, proj_bias, act)
    if reason is not None:
        return reason
    b, _, h, w = x.shape
    return int32_offset_limit((b, proj_weight.shape[0], h, w), (x,), dict(proj_weight=proj_weight))


def _projection_block_n(d_pad: int, dtype: torch.dtype, arch: int) -> int:
    """Output channels per projection chunk. 16-bit on sm_80 and newer, where cp.async stages
    the weight chunk [d, BLOCK_N] in shared memory: within 8K values, 64 at most (the
    [BLOCK_M, BLOCK_N] fp32 result stays within the FFN's 4K-value accumulator); XS's qkv
    (3d = 288 ... 432) then takes 5 to 14 chunks where a separate pointwise_conv walked 12 to
    18 K steps. fp32 (FMA dots, operands in registers) and sm_75 (no cp.async: the chunk passes
    through registers, and 8K-value chunks spill kilobytes there): the FFN's own chunk shape,
    within 2K values. 16-bit on sm_80 at d = 64 (64-row tiles, mma.sync): 32, as 64 spills 12
    bytes there on 8 warps (32: 100-190 registers, none)."""
    if dtype != torch.float32 and 80 <= arch < WGMMA_ARCH and d_pad == 64:
        return 32
    budget = 8192 if dtype != torch.float32 and arch >= 80 else 2048
    return min(64, max(16, budget // d_pad))


def _splits(tiles: int, f_blocks: int, n_chunks: int) -> tuple:
    """(SPLIT_F, proj_groups): 1, 1 unless the grid has at most TARGET_PROGRAMS / 2 tiles and
    a program's chain (f_blocks hidden chunks, then n_chunks projection chunks) is longer than
    LONG_LOOP. Then the pair, within TARGET_PROGRAMS programs, that gives the shortest chain
    (`_split_steps`), the fewest programs for it, no program without hidden units or
    projection channels."""
    if 2 * tiles > TARGET_PROGRAMS or f_blocks + n_chunks <= LONG_LOOP:
        return 1, 1
    pairs = [(s, g) for s in range(2, min(f_blocks, MAX_SPLIT_K) + 1)
             for g in range(1, n_chunks + 1) if tiles * s * g <= TARGET_PROGRAMS]
    if not pairs:
        return 1, 1
    split_f, groups = min(pairs, key=lambda p: (_split_steps(f_blocks, n_chunks, *p), p[0] * p[1]))
    if _split_steps(f_blocks, n_chunks, split_f, groups) >= f_blocks + n_chunks:
        return 1, 1
    return cdiv(f_blocks, cdiv(f_blocks, split_f)), cdiv(n_chunks, cdiv(n_chunks, groups))


def _split_steps(f_blocks: int, n_chunks: int, split_f: int, groups: int) -> int:
    """One program's chain: its share of the hidden chunks and the merge (`split_k_steps`),
    then its group's projection chunks."""
    return split_k_steps(f_blocks, 1, split_f) + cdiv(n_chunks, groups)


# fp32 launches by arch and mlp_meta's (BLOCK_M, D_PAD) where the FFN's own choice spills 4 to
# 28 bytes a thread once the projection's tiles are live too (ptxas -v through
# tests/aot_compile.py), and what spills on neither: sm_80 [32, 128] 4 bytes (8 warps and one
# stage: 126-184 registers), [64, 64] and sm_90 [16, 128] (one stage); sm_90 [64, 64] spills
# 16-24 bytes on 8 warps with one or two stages, so it takes 32-row tiles (63-80 registers).
# sm_75 keeps the FFN's choice, which does not spill there in fp32.
_FP32_TILES = {80: {(16, 128): dict(num_warps=4, num_stages=1),
                    (32, 128): dict(num_warps=8, num_stages=1),
                    (64, 64): dict(num_warps=8, num_stages=1)},
               90: {(16, 128): dict(num_warps=4, num_stages=1),
                    (32, 128): dict(num_warps=4, num_stages=2),
                    (64, 64): dict(BLOCK_M=32, num_warps=8, num_stages=2)}}


def transformer_mlp_project(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                            eps: float, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                            b2: torch.Tensor, proj_norm_weight: torch.Tensor,
                            proj_norm_bias: torch.Tensor, proj_eps: float, proj_weight: torch.Tensor,
                            proj_bias: torch.Tensor | None, act: str) -> tuple:
    """x [B, d, H, W] -> (t, projection), channels_last [B, d, H, W] and [B, Cout, H, W]; see
    `mvit3.ops.reference.transformer_mlp_project`."""
    reason = why_unsupported(x, norm_weight, norm_bias, eps, w1, b1, w2, b2, proj_norm_weight,
                             proj_norm_bias, proj_eps, proj_weight, proj_bias, act)
    if reason is not None:
        raise ValueError(f"transformer_mlp_project: {reason}")
    check_device(x, norm_weight, norm_bias, w1, b1, w2, b2, proj_norm_weight, proj_norm_bias,
                 proj_weight, proj_bias)
    b, d, h, w = x.shape
    cout = proj_weight.shape[0]
    out = channels_last_empty(b, d, h, w, x)
    proj_out = channels_last_empty(b, cout, h, w, x)
    d_pad = next_pow2(d)
    arch = target_arch(x)
    # small grids (batch 1): mlp_meta's wide hidden chunks, and projection chunks as wide
    meta, small = mlp_meta(b * h * w, d_pad, x.dtype, arch)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    vec = ffn_vector(x, w1, w2, cout, proj_weight.stride(1))
    block_n = small["BLOCK_N"] if small is not None else _projection_block_n(d_pad, x.dtype, arch)
    if small is None and x.dtype == torch.float32 and arch >= 80:
        tiles = dict(_FP32_TILES[90 if arch >= 90 else 80].get((meta["BLOCK_M"], d_pad), {}))
        num_warps, num_stages = tiles.pop("num_warps", num_warps), tiles.pop("num_stages", num_stages)
        meta.update(tiles)
    elif small is not None and vec > 1 and x.dtype == torch.float32 and arch < WGMMA_ARCH:
        # sm_80's three fp32 stages spill 8 bytes once split where only VEC tells the vectors
        # (d = 120); two do not (80-98 registers)
        num_stages = 2
    elif small is None and arch >= 80 and (meta["BLOCK_M"], d_pad) == (16, 256):
        # 16-row tiles at d = 256 on larger grids (sm_80 keeps 16 rows there whatever the
        # grid), where the serial chain still counts: 32 hidden units a chunk halve it (F = 288:
        # 18 -> 9). ptxas: 128 registers, no spill on sm_80/90 (at d = 128 the same reaches 255)
        meta["BLOCK_F"] = 32
    f = w1.shape[0]
    f_blocks, n_chunks = cdiv(f, meta["BLOCK_F"]), cdiv(cout, block_n)
    for start, stop in batch_chunks(b, out.shape, (x, proj_out)):
        args = ffn_args(x, norm_weight, norm_bias, None, w1, b1, w2, b2, out, eps, start, stop)
        pixels = args["num_pixels"]
        tiles = cdiv(pixels, meta["BLOCK_M"])
        # (small grids only: the wider tiles of larger grids, 64 rows of d = 256 at batch 1 of
        # the dense models, spill 56-72 bytes on sm_90 once split)
        split_f, groups = _splits(tiles, f_blocks, n_chunks) if small is not None else (1, 1)
        partials = counters = None
        if split_f > 1:  # [tiles * groups, SPLIT_F, BLOCK_M, D_PAD] fp32 sums (merge_split_k)
            partials = torch.empty((tiles * groups, split_f, meta["BLOCK_M"], d_pad),
                                   dtype=torch.float32, device=x.device)
            counters = split_counters(x.device, tiles * groups)
        ffn = ffn_work(pixels, d, f, meta["BLOCK_F"])
        launch(_transformer_mlp_project_kernel,
               (tiles * groups, split_f) if split_f > 1 else (tiles,),
               dict(**args, proj_norm_w_ptr=proj_norm_weight, proj_norm_b_ptr=proj_norm_bias,
                    proj_w_ptr=proj_weight, proj_b_ptr=proj_bias, proj_out_ptr=batch_part(proj_out, start, stop),
                    partials_ptr=partials, counters_ptr=counters,
                    N=cout, proj_eps=float(proj_eps),
                    f_per_split=cdiv(f_blocks, split_f) * meta["BLOCK_F"], proj_groups=groups,
                    n_per_group=cdiv(n_chunks, groups) * block_n,
                    stride_pn=proj_weight.stride(0), stride_pk=proj_weight.stride(1)),
               dict(**meta, ACT=act, BLOCK_N=block_n, DOT_TYPE=dot_operand_type(x.dtype),
                    DOT_PRECISION=dot_precision(x.dtype), SPLIT_F=split_f,
                    VEC=vec),
               num_warps=num_warps, num_stages=num_stages,
               # each projection group computes the FFN sum again
               work=Work(dot_flops=groups * ffn.dot_flops + 2 * pixels * d * cout,
                         serial_steps=_split_steps(f_blocks, n_chunks, split_f, groups)),
               # scratch, not the op's traffic: the partial sums (<= ~1 MB a launch at batch
               # 1) are written and read back at once, from L2
               scratch=("partials_ptr", "counters_ptr"))
    return out, proj_out
