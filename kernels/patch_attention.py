"""Multi-head attention over the 2x2 patches of a map, read and written in the map layout.

Twin of `mvit3.ops.reference.patch_attention` (v1-style MobileViT blocks: v1 and v3 XXS/XS/S).

qkv [B, 3d, H, W] (any strides) holds [q | k | v], each third head-contiguous. Pixel (y, x)
is token n = (y//2)*(W/2) + x//2 of sequence p = (y%2)*2 + x%2, so sequence (b, p) is the
set of pixels at one offset inside every 2x2 patch. The kernel addresses those pixels
directly (`patch_pixel_offset`): no unfold/fold copy exists.

One program owns BLOCK_M query tokens of one sequence for all heads. Per head it runs a
flash-style online softmax over BLOCK_N key blocks (so any N works; stats in fp32, exp2 with
log2(e) folded into the q scale), then either stores o_h into its channels of the output or,
with proj_weight, accumulates out += o_h @ proj_weight[:, head]^T into a [BLOCK_M, d] fp32
tile whose epilogue adds proj_bias and the residual: the MHSA out_proj and the transformer
residual cost no extra pass over memory. Head dims 16..60 are padded to 16/32/64 with masks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (MAX_GRID_Y, WGMMA_ARCH, Work, batch_chunks, batch_part, cdiv,
                      channels_last_empty, check_device, dot_operand_type, dot_precision, int32_offset_limit,
                      interpreter_meta, launch, map_stride_args, next_pow2, patch_pixel_offset,
                      rows_per_program, target_arch, vector_stride_error)
from .pointwise_conv import pointwise_conv

MAX_HEAD_DIM = 64
MAX_DIM = 256  # the fused out_proj keeps a [BLOCK_M, d] fp32 accumulator in registers


@triton.jit
def _project_head(o, proj_w_ptr, in_channels, in_valid, out_channels, D, stride_pw_out, stride_pw_in,
                  DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """o [BLOCK_M, HEAD_PAD] @ proj_weight[out_channels, in_channels]^T -> [BLOCK_M, OUT_CHUNK] fp32.

    The [HEAD_PAD, OUT_CHUNK] weight tile is contiguous along the output channels when the
    weight is a [d, d] view of a pre-packed [d_in, d_out] buffer.
    """
    w_t = tl.load(proj_w_ptr + out_channels[None, :] * stride_pw_out + in_channels[:, None] * stride_pw_in,
                  mask=in_valid[:, None] & (out_channels < D)[None, :], other=0.0)
    return tl.dot(o, w_t.to(DOT_TYPE), input_precision=DOT_PRECISION)


@triton.jit
def _store_tile(acc, channels, channel_valid, bias_ptr, res_ptr, out_ptr, b, query, query_valid, p,
                patches_per_row, stride_rb, stride_rc, stride_rh, stride_rw,
                stride_outb, stride_outc, stride_outh, stride_outw):
    """out[b, channels, pixels of (query, p)] = acc + bias + residual (bias/res may be None)."""
    mask = query_valid[:, None] & channel_valid[None, :]
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)[None, :]
    if res_ptr is not None:
        res_offset = patch_pixel_offset(query, p, patches_per_row, stride_rh, stride_rw)
        acc += tl.load(res_ptr + b * stride_rb + res_offset[:, None] + channels[None, :] * stride_rc,
                       mask=mask, other=0.0).to(tl.float32)
    out_offset = patch_pixel_offset(query, p, patches_per_row, stride_outh, stride_outw)
    tl.store(out_ptr + b * stride_outb + out_offset[:, None] + channels[None, :] * stride_outc,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_attention_kernel(
    # pointers (proj_w/proj_b/res may be None: specialised away)
    qkv_ptr, proj_w_ptr, proj_b_ptr, res_ptr, out_ptr,
    # sizes
    N, patches_per_row, D, head_dim, num_heads, qk_scale,
    # strides
    stride_qkvb, stride_qkvc, stride_qkvh, stride_qkvw,
    stride_pw_out, stride_pw_in,
    stride_rb, stride_rc, stride_rh, stride_rw,
    stride_outb, stride_outc, stride_outh, stride_outw,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_PAD: tl.constexpr, OUT_CHUNK: tl.constexpr,
    TWO_OUT_CHUNKS: tl.constexpr, DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(1)  # b * 4 + p
    b = seq // 4
    p = seq % 4
    query = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    query_valid = query < N
    q_offset = patch_pixel_offset(query, p, patches_per_row, stride_qkvh, stride_qkvw)
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < head_dim
    keys_in_block = tl.arange(0, BLOCK_N)
    qkv_base = qkv_ptr + b * stride_qkvb

    if proj_w_ptr is not None:
        # The [BLOCK_M, d] fp32 out_proj accumulator, as one or two OUT_CHUNK <= 128 column
        # slices: a [64, 256] fp32 weight tile would need 64 KB of shared memory by itself.
        out_channels_lo = tl.arange(0, OUT_CHUNK)
        out_channels_hi = OUT_CHUNK + out_channels_lo
        projected_lo = tl.zeros((BLOCK_M, OUT_CHUNK), dtype=tl.float32)
        projected_hi = tl.zeros((BLOCK_M, OUT_CHUNK), dtype=tl.float32)

    for h in range(num_heads):
        head_channels = h * head_dim + dims  # within each of the q, k, v thirds
        q = tl.load(qkv_base + q_offset[:, None] + head_channels[None, :] * stride_qkvc,
                    mask=query_valid[:, None] & dim_valid[None, :], other=0.0)
        # scale (with log2(e), for exp2) applied once per query tile, in fp32
        q = (q.to(tl.float32) * qk_scale).to(DOT_TYPE)
        k_t_base = qkv_base + ((D + head_channels) * stride_qkvc)[:, None]  # [HEAD_PAD, 1]
        v_base = qkv_base + ((2 * D + head_channels) * stride_qkvc)[None, :]  # [1, HEAD_PAD]

        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        o = tl.zeros((BLOCK_M, HEAD_PAD), dtype=tl.float32)
        for key_start in range(0, N, BLOCK_N):
            key = key_start + keys_in_block
            key_valid = key < N
            kv_offset = patch_pixel_offset(key, p, patches_per_row, stride_qkvh, stride_qkvw)
            k_t = tl.load(k_t_base + kv_offset[None, :],
                          mask=dim_valid[:, None] & key_valid[None, :], other=0.0)  # [HEAD_PAD, BLOCK_N]
            v = tl.load(v_base + kv_offset[:, None],
                        mask=key_valid[:, None] & dim_valid[None, :], other=0.0)  # [BLOCK_N, HEAD_PAD]
            logits = tl.dot(q, k_t.to(DOT_TYPE), input_precision=DOT_PRECISION)  # log2 domain, fp32
            logits = tl.where(key_valid[None, :], logits, float("-inf"))
            # every key block holds a valid key, so new_max is finite and no NaN appears
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            rescale = tl.exp2(row_max - new_max)
            probs = tl.exp2(logits - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(probs, axis=1)
            o = o * rescale[:, None] + tl.dot(probs.to(DOT_TYPE), v.to(DOT_TYPE), input_precision=DOT_PRECISION)
            row_max = new_max
        o = o / row_sum[:, None]

        if proj_w_ptr is not None:
            # out += o_h @ proj_weight[:, h*hd:(h+1)*hd]^T
            o = o.to(DOT_TYPE)
            projected_lo += _project_head(o, proj_w_ptr, head_channels, dim_valid, out_channels_lo, D,
                                          stride_pw_out, stride_pw_in, DOT_TYPE, DOT_PRECISION)
            if TWO_OUT_CHUNKS:
                projected_hi += _project_head(o, proj_w_ptr, head_channels, dim_valid, out_channels_hi, D,
                                              stride_pw_out, stride_pw_in, DOT_TYPE, DOT_PRECISION)
        else:
            # no projection: head h's output goes straight to channels h*hd ... (h+1)*hd - 1
            _store_tile(o, head_channels, dim_valid, None, res_ptr, out_ptr, b, query, query_valid, p,
                        patches_per_row, stride_rb, stride_rc, stride_rh, stride_rw,
                        stride_outb, stride_outc, stride_outh, stride_outw)

    if proj_w_ptr is not None:
        _store_tile(projected_lo, out_channels_lo, out_channels_lo < D, proj_b_ptr, res_ptr, out_ptr, b,
                    query, query_valid, p, patches_per_row, stride_rb, stride_rc, stride_rh, stride_rw,
                    stride_outb, stride_outc, stride_outh, stride_outw)
        if TWO_OUT_CHUNKS:
            _store_tile(projected_hi, out_channels_hi, out_channels_hi < D, proj_b_ptr, res_ptr, out_ptr, b,
                        query, query_valid, p, patches_per_row, stride_rb, stride_rc, stride_rh, stride_rw,
                        stride_outb, stride_outc, stride_outh, stride_outw)


def _shape_error(qkv, num_heads, proj_weight, proj_bias, residual) -> str | None:
    if qkv.dim() != 4:
        return f"qkv must be [B, 3d, H, W], got shape {list(qkv.shape)}"
    b, c3, h, w = qkv.shape
    if h % 2 or w % 2:
        return f"H and W must be even (2x2 patches), got {h}x{w}"
    if num_heads < 1 or c3 % (3 * num_heads):
        return f"qkv channels ({c3}) must be 3 * num_heads ({num_heads}) * head_dim"
    d = c3 // 3
    if proj_weight is None and proj_bias is not None:
        return "proj_bias needs proj_weight"
    if proj_weight is not None and tuple(proj_weight.shape) != (d, d):
        return f"proj_weight must be [{d}, {d}], got {list(proj_weight.shape)}"
    if proj_bias is not None and tuple(proj_bias.shape) != (d,):
        return f"proj_bias must be [{d}], got {list(proj_bias.shape)}"
    if residual is not None and tuple(residual.shape) != (b, d, h, w):
        return f"residual must be [{b}, {d}, {h}, {w}], got {list(residual.shape)}"
    for name, t in (("proj_weight", proj_weight), ("proj_bias", proj_bias), ("residual", residual)):
        if t is not None and t.dtype != qkv.dtype:
            return f"{name} is {t.dtype}, qkv is {qkv.dtype}: all tensors must share a dtype"
    return vector_stride_error(proj_bias=proj_bias)


def why_unsupported(qkv, num_heads, scale, proj_weight=None, proj_bias=None, residual=None) -> str | None:
    """None if the kernel takes these arguments, else why not."""
    reason = _shape_error(qkv, num_heads, proj_weight, proj_bias, residual)
    if reason is not None:
        return reason
    d = qkv.shape[1] // 3
    if d // num_heads > MAX_HEAD_DIM:
        return f"head dim {d // num_heads} > {MAX_HEAD_DIM}"
    if proj_weight is not None and d > MAX_DIM:
        return f"d = {d} > {MAX_DIM} with the fused out_proj"
    b, c3, h, w = qkv.shape
    return int32_offset_limit((b, c3 // 3, h, w), (qkv, residual),
                              dict(proj_weight=proj_weight))


def _fused_projection_fits(dtype: torch.dtype, d_pad: int) -> bool:
    """Whether the out_proj can be fused. fp32 dots run on FMA units, which hold a thread's
    whole K slice of the [HEAD_PAD, OUT_CHUNK] weight tile in registers: for d > 128 (head dims
    36..60, padded to 64, two 128-wide output chunks) ptxas spills 0.5-3.4 KB a thread on sm_90
    whatever the tiles. Those launches leave the projection to a second launch
    (`pointwise_conv`, out_proj + bias + residual in its epilogue): one more map round trip."""
    return dtype != torch.float32 or d_pad <= 128


def _meta(batch: int, n: int, head_pad: int, d_pad: int, dtype: torch.dtype, arch: int) -> dict:
    """Deterministic meta-parameters.

    BLOCK_M: query tokens per program, the [BLOCK_M, d] fp32 out_proj accumulator within 4K
    values (`rows_per_program`), 8 warps for 4K-value tiles. OUT_CHUNK: the out_proj
    accumulator is one or two column slices of at most 128 channels, since one [64, 256] fp32
    weight tile alone would fill the 64 KB of shared memory of an sm_75 GPU. BLOCK_N: the fp32
    dots run on FMA units with their operand tiles in registers; ptxas -v (sm_75/80/90) shows
    these choices spilling at most about 0.7 KB per thread, where e.g. 32-key blocks at head
    dim 64 or 32-query tiles at d > 128 spill up to 4 KB; with the runtime specialisation
    (`python -m mvit3 kernels`) more of them spill: `_keys_per_block` and
    `_fused_projection_fits` keep every configuration the models launch spill-free.
    """
    # query tiles no taller than the sequence: N = 16 (7x7 or 8x8 maps) keeps 16-row mma.sync tiles
    block_m = rows_per_program(lambda bm: batch * 4 * cdiv(n, bm), d_pad, dtype, arch,
                               max_rows=next_pow2(n))
    out_chunk = min(d_pad, 128)
    return interpreter_meta(
        dict(BLOCK_M=block_m,
             BLOCK_N=min(next_pow2(n), _keys_per_block(dtype, block_m, head_pad, d_pad, arch)),
             HEAD_PAD=head_pad, OUT_CHUNK=out_chunk, TWO_OUT_CHUNKS=d_pad > out_chunk,
             num_warps=8 if block_m * d_pad >= 4096 else 4,
             # mma.sync GPUs: no software pipelining of the key blocks (with 2 stages sm_80's
             # 16-bit and TF32 16-row tiles spill 8 bytes a thread)
             num_stages=2 if arch >= WGMMA_ARCH else 1),
        BLOCK_M=min(next_pow2(n), 128), BLOCK_N=min(next_pow2(n), 256))


def _keys_per_block(dtype: torch.dtype, block_m: int, head_pad: int, d_pad: int, arch: int) -> int:
    """BLOCK_N: keys per block of the online softmax, the largest that ptxas compiles without
    spills on sm_80/90 for the tile around it (checked by tests/test_triton_aot.py)."""
    if dtype == torch.float32:  # FMA dots (or TF32): operand fragments in registers
        return 16 if block_m >= 32 or head_pad == 32 else 32
    if head_pad == 32:  # 16-bit 32-key blocks of head dim <= 32 spill on mma.sync GPUs
        return 32 if arch >= WGMMA_ARCH else 16
    return 32 if d_pad > 128 else 64


def patch_attention(qkv: torch.Tensor, num_heads: int, scale: float,
                    proj_weight: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, 3d, H, W] -> channels_last [B, d, H, W]; see `mvit3.ops.reference.patch_attention`."""
    reason = why_unsupported(qkv, num_heads, scale, proj_weight, proj_bias, residual)
    if reason is not None:
        raise ValueError(f"patch_attention: {reason}")
    check_device(qkv, proj_weight, proj_bias, residual)
    b, c3, h, w = qkv.shape
    d = c3 // 3
    n = (h // 2) * (w // 2)
    head_dim = d // num_heads
    if proj_weight is not None and not _fused_projection_fits(qkv.dtype, next_pow2(d)):
        heads = patch_attention(qkv, num_heads, scale)
        return pointwise_conv(heads, proj_weight, proj_bias, residual=residual)
    out = channels_last_empty(b, d, h, w, qkv)
    d_pad = next_pow2(d) if proj_weight is not None else 16  # only sizes the out_proj tile
    meta = _meta(b, n, next_pow2(head_dim), d_pad, qkv.dtype, target_arch(qkv))
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    pw_strides = proj_weight.stride() if proj_weight is not None else (0, 0)
    # grid axis 1 holds the 4 sequences of each sample: at most MAX_GRID_Y // 4 samples a launch
    for start, stop in batch_chunks(b, out.shape, (qkv, residual), max_samples=MAX_GRID_Y // 4):
        bc = stop - start
        launch(_patch_attention_kernel, (cdiv(n, meta["BLOCK_M"]), bc * 4),
               dict(qkv_ptr=batch_part(qkv, start, stop), proj_w_ptr=proj_weight, proj_b_ptr=proj_bias,
                    res_ptr=batch_part(residual, start, stop), out_ptr=batch_part(out, start, stop),
                    N=n, patches_per_row=w // 2, D=d, head_dim=head_dim, num_heads=num_heads,
                    qk_scale=float(scale) * math.log2(math.e),
                    **map_stride_args("qkv", qkv), stride_pw_out=pw_strides[0], stride_pw_in=pw_strides[1],
                    **map_stride_args("r", residual), **map_stride_args("out", out)),
               dict(**meta, DOT_TYPE=dot_operand_type(qkv.dtype), DOT_PRECISION=dot_precision(qkv.dtype)),
               num_warps=num_warps, num_stages=num_stages,
               # per sequence q @ k^T and p @ v over all heads (2 n^2 d multiply-adds), then out_proj
               work=Work(dot_flops=bc * 4 * 4 * n * n * d + (2 * bc * h * w * d * d if proj_weight is not None else 0),
                         serial_steps=num_heads * cdiv(n, meta["BLOCK_N"])))
    return out
