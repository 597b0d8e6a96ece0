"""A v1-style FFN sub-layer and the LayerNorm + 1x1 projection after it, in one kernel.

Twin of `mvit3.ops.reference.transformer_mlp_project`: t = x + FFN(LayerNorm(x)) as
`transformer_mlp` computes it, and act(LayerNorm'(t) @ proj_weight^T + proj_bias), the next
transformer layer's LayerNorm + qkv or the block's final LayerNorm + conv_proj (+ BN, SiLU).
Both are returned: t is still the next attention's residual.

One program owns BLOCK_M whole pixels, so the second LayerNorm needs no other program:
- `ffn_residual_tile` (kernels/transformer_mlp.py) gives t as an fp32 [BLOCK_M, d] tile in
  registers; it is stored (channels_last);
- the tile is normalised in registers (two-pass mean and variance, as the FFN's prologue) and
  cast to the dot type;
- a loop over BLOCK_N-wide chunks of the projection's Cout: [BLOCK_M, d] @ [d, BLOCK_N] + bias,
  act, stored channels_last.
Against `transformer_mlp` + `pointwise_conv`, t is not read back, the LayerNorm statistics
are not taken again, and one launch (with its serial chain) goes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mvit3.ops.reference import ACTS

from ._common import (Work, batch_chunks, batch_part, cdiv, channels_last_empty, check_device,
                      dot_operand_type, dot_precision, int32_offset_limit, launch,
                      load_weight_tile, next_pow2, pixel_coords, pixel_tile_epilogue, target_arch,
                      vector_stride_error)
from .transformer_mlp import ffn_args, ffn_residual_tile, ffn_work, mlp_meta
from .transformer_mlp import why_unsupported as ffn_why_unsupported


@triton.jit
def _transformer_mlp_project_kernel(
    # pointers (stats is always None: LayerNorm; proj_b may be None)
    x_ptr, norm_w_ptr, norm_b_ptr, stats_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    proj_norm_w_ptr, proj_norm_b_ptr, proj_w_ptr, proj_b_ptr, proj_out_ptr,
    # sizes
    num_pixels, HW, W, D, F, N, eps, proj_eps,
    # strides of x [B, d, H, W] and the weights; both outputs are dense channels_last maps
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_w1_f, stride_w1_d, stride_w2_d, stride_w2_f, stride_pn, stride_pk,
    # meta-parameters
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pixel = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pixel_valid = pixel < num_pixels
    sample, y, x = pixel_coords(pixel, HW, W)
    channels = tl.arange(0, D_PAD)
    channel_valid = channels < D
    mask = pixel_valid[:, None] & channel_valid[None, :]
    t = ffn_residual_tile(x_ptr + sample * stride_xb + y * stride_xh + x * stride_xw,
                          norm_w_ptr, norm_b_ptr, stats_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                          sample, pixel_valid, channels, channel_valid, D, F, eps, stride_xc,
                          stride_w1_f, stride_w1_d, stride_w2_d, stride_w2_f,
                          BLOCK_M, D_PAD, BLOCK_F, DOT_TYPE, DOT_PRECISION)  # [BLOCK_M, D_PAD]
    t = t.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + pixel[:, None] * D + channels[None, :], t, mask=mask)

    # LayerNorm of the stored values (rounded to the I/O dtype, as a separate pointwise_conv
    # would read them); padded channels hold 0 and are masked out of the variance
    t = t.to(tl.float32)
    mean = tl.sum(t, axis=1) / D
    centred = tl.where(mask, t - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + proj_eps)
    gamma = tl.load(proj_norm_w_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    beta = tl.load(proj_norm_b_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)
    # padded channels: gamma = beta = 0 keeps them 0, and their weight rows load as 0
    normed = (centred * rstd[:, None] * gamma[None, :] + beta[None, :]).to(DOT_TYPE)

    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # proj_weight^T [D_PAD, BLOCK_N]: contiguous along Cout for the K-major packed weight
        w_tile = load_weight_tile(proj_w_ptr, channels * stride_pk, channel_valid, offs_n, n_mask,
                                  stride_pn)
        acc = tl.dot(normed, w_tile.to(DOT_TYPE), input_precision=DOT_PRECISION)
        pixel_tile_epilogue(acc, pixel, offs_n, pixel_valid, n_mask, N, sample, y, x, proj_b_ptr,
                            None, 0, 0, 0, 0, proj_out_ptr, ACT)


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
    within 2K values."""
    budget = 8192 if dtype != torch.float32 and arch >= 80 else 2048
    return min(64, max(16, budget // d_pad))


# (num_warps, num_stages) of fp32 launches by arch and (BLOCK_M, D_PAD) where the FFN's own
# choice (`mlp_meta`) spills 4 to 28 bytes a thread once the projection's tiles are live too
# (ptxas -v through tests/aot_compile.py: sm_80 at [32, 128] and [64, 64], sm_90 at [16, 128];
# on sm_90 [64, 64] keeps mlp_meta's 2 stages, as one stage spills there with SiLU); these spill
# on neither. sm_75 keeps the FFN's choice, which does not spill there in fp32.
_FP32_WARPS_STAGES = {80: {(16, 128): (4, 1), (32, 128): (4, 2), (64, 64): (8, 1)},
                      90: {(16, 128): (4, 1), (32, 128): (4, 2)}}


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
    block_n = small["BLOCK_N"] if small is not None else _projection_block_n(d_pad, x.dtype, arch)
    if small is None and x.dtype == torch.float32 and arch >= 80:
        num_warps, num_stages = _FP32_WARPS_STAGES[90 if arch >= 90 else 80].get(
            (meta["BLOCK_M"], d_pad), (num_warps, num_stages))
    elif small is None and arch >= 80 and (meta["BLOCK_M"], d_pad) == (16, 256):
        # 16-row tiles at d = 256 on larger grids (sm_80 keeps 16 rows there whatever the
        # grid), where the serial chain still counts: 32 hidden units a chunk halve it (F = 288:
        # 18 -> 9). ptxas: 128 registers, no spill on sm_80/90 (at d = 128 the same reaches 255)
        meta["BLOCK_F"] = 32
    for start, stop in batch_chunks(b, out.shape, (x, proj_out)):
        args = ffn_args(x, norm_weight, norm_bias, None, w1, b1, w2, b2, out, eps, start, stop)
        pixels = args["num_pixels"]
        ffn = ffn_work(pixels, d, w1.shape[0], meta["BLOCK_F"])
        launch(_transformer_mlp_project_kernel, (cdiv(pixels, meta["BLOCK_M"]),),
               dict(**args, proj_norm_w_ptr=proj_norm_weight, proj_norm_b_ptr=proj_norm_bias,
                    proj_w_ptr=proj_weight, proj_b_ptr=proj_bias, proj_out_ptr=batch_part(proj_out, start, stop),
                    N=cout, proj_eps=float(proj_eps),
                    stride_pn=proj_weight.stride(0), stride_pk=proj_weight.stride(1)),
               dict(**meta, ACT=act, BLOCK_N=block_n, DOT_TYPE=dot_operand_type(x.dtype),
                    DOT_PRECISION=dot_precision(x.dtype)),
               num_warps=num_warps, num_stages=num_stages,
               work=Work(dot_flops=ffn.dot_flops + 2 * pixels * d * cout,
                         serial_steps=ffn.serial_steps + cdiv(cout, block_n)))
    return out, proj_out
