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
residual cost no extra pass over memory.

Loads are 16-byte vectors where the layout allows: the host finds VEC, the elements of one
aligned vector that d and every pixel stride are multiples of (8 in fp16 for the fast
model's channels_last maps), and the kernel tells the compiler (`tl.multiple_of`). A head is
read as a window of HEAD_PAD (16/32/64) channels from its first channel rounded down to a
multiple of VEC, the neighbouring heads' q channels zeroed in registers: head dims 30 and 36
(v3/v1 XS and S stage 4) start heads off a vector boundary and still load whole vectors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (MAX_GRID_Y, TARGET_PROGRAMS, WGMMA_ARCH, Work, batch_chunks, batch_part,
                      cdiv, channel_vector, channels_last_empty, check_device, dot_operand_type,
                      dot_precision, int32_offset_limit, interpreter_meta, launch, map_stride_args,
                      next_pow2, patch_pixel_offset, rows_per_program, target_arch,
                      vector_stride_error)

MAX_HEAD_DIM = 64
MAX_DIM = 256  # the fused out_proj keeps a [BLOCK_M, d] fp32 accumulator in registers


@triton.jit
def _project_head(o, proj_w_ptr, in_channels, in_valid, out_channels, D, stride_pw_out, stride_pw_in,
                  VEC: tl.constexpr, DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """o [BLOCK_M, K] @ proj_weight[out_channels, in_channels]^T -> [BLOCK_M, OUT_CHUNK] fp32: K is
    a head window (HEAD_PAD) or a PROJ_K slice of all heads.

    The [K, OUT_CHUNK] weight tile is contiguous along the output channels when the
    weight is a [d, d] view of a pre-packed [d_in, d_out] buffer; its rows then start at
    multiples of VEC (the host checked stride_pw_in).
    """
    rows = tl.multiple_of(in_channels * stride_pw_in, VEC)
    w_t = tl.load(proj_w_ptr + out_channels[None, :] * stride_pw_out + rows[:, None],
                  mask=in_valid[:, None] & (out_channels < D)[None, :], other=0.0)
    return tl.dot(o, w_t.to(DOT_TYPE), input_precision=DOT_PRECISION)


@triton.jit
def _pixel_offsets(b, token, p, patches_per_row, stride_b, stride_h, stride_w, VEC: tl.constexpr):
    """[tokens] offsets of the pixels of (b, token, p) in a map whose batch and pixel strides
    the host checked to be multiples of VEC: said to the compiler, so that the channel vectors
    read from there are VEC-element loads."""
    return tl.multiple_of(b * stride_b + patch_pixel_offset(token, p, patches_per_row, stride_h, stride_w), VEC)


@triton.jit
def _store_tile(acc, channels, channel_valid, bias_ptr, res_ptr, out_ptr, b, query, query_valid, p,
                patches_per_row, stride_rb, stride_rc, stride_rh, stride_rw,
                stride_outb, stride_outc, stride_outh, stride_outw, VEC: tl.constexpr):
    """out[b, channels, pixels of (query, p)] = acc + bias + residual (bias/res may be None)."""
    mask = query_valid[:, None] & channel_valid[None, :]
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)[None, :]
    if res_ptr is not None:
        res_offset = _pixel_offsets(b, query, p, patches_per_row, stride_rb, stride_rh, stride_rw, VEC)
        acc += tl.load(res_ptr + res_offset[:, None] + channels[None, :] * stride_rc,
                       mask=mask, other=0.0).to(tl.float32)
    out_offset = _pixel_offsets(b, query, p, patches_per_row, stride_outb, stride_outh, stride_outw, VEC)
    tl.store(out_ptr + out_offset[:, None] + channels[None, :] * stride_outc,
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
    TWO_OUT_CHUNKS: tl.constexpr, HEADS_THROUGH_OUT: tl.constexpr, PROJ_K: tl.constexpr,
    VEC: tl.constexpr, DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(1)  # b * 4 + p
    b = seq // 4
    p = seq % 4
    # D is a multiple of VEC (the host checked): written so, the compiler knows that the k and
    # v thirds and the masks at D are VEC-aligned (tl.multiple_of takes tensors only)
    D = D // VEC * VEC
    query = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    query_valid = query < N
    q_offset = _pixel_offsets(b, query, p, patches_per_row, stride_qkvb, stride_qkvh, stride_qkvw, VEC)
    window = tl.arange(0, HEAD_PAD)
    keys_in_block = tl.arange(0, BLOCK_N)

    if proj_w_ptr is not None:
        # The [BLOCK_M, d] fp32 out_proj accumulator, as one or two OUT_CHUNK <= 128 column
        # slices: a [64, 256] fp32 weight tile would need 64 KB of shared memory by itself.
        out_channels_lo = tl.arange(0, OUT_CHUNK)
        out_channels_hi = OUT_CHUNK + out_channels_lo
        projected_lo = tl.zeros((BLOCK_M, OUT_CHUNK), dtype=tl.float32)
        projected_hi = tl.zeros((BLOCK_M, OUT_CHUNK), dtype=tl.float32)

    heads_res_ptr = res_ptr  # the heads' own store adds the residual unless they are projected after
    if HEADS_THROUGH_OUT:
        heads_res_ptr = None
    for h in range(num_heads):
        # Head h is channels [h*hd, (h+1)*hd) of each third. Its q, k, v tiles are read as the
        # HEAD_PAD channels from h*hd rounded down to a multiple of VEC, so every load is a
        # whole aligned vector even where hd is not a multiple of VEC (30, 36 in fp16); q's
        # channels of the neighbouring heads in that window are zeroed in registers.
        head_start = h * head_dim
        channels = (head_start // VEC) * VEC + window  # within each of the q, k, v thirds
        in_head = (channels >= head_start) & (channels < head_start + head_dim)
        in_third = channels < D
        q = tl.load(qkv_ptr + q_offset[:, None] + channels[None, :] * stride_qkvc,
                    mask=query_valid[:, None] & in_third[None, :], other=0.0)
        # scale (with log2(e), for exp2) applied once per query tile, in fp32
        q = (tl.where(in_head[None, :], q, 0.0).to(tl.float32) * qk_scale).to(DOT_TYPE)
        k_t_base = qkv_ptr + ((D + channels) * stride_qkvc)[:, None]  # [HEAD_PAD, 1]
        v_base = qkv_ptr + ((2 * D + channels) * stride_qkvc)[None, :]  # [1, HEAD_PAD]

        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        o = tl.zeros((BLOCK_M, HEAD_PAD), dtype=tl.float32)
        for key_start in range(0, N, BLOCK_N):
            key = key_start + keys_in_block
            key_valid = key < N
            kv_offset = _pixel_offsets(b, key, p, patches_per_row, stride_qkvb, stride_qkvh, stride_qkvw, VEC)
            # other heads' k in the window meet the zeroed q. Not zeroed themselves (a tl.where
            # here costs the fp32 FMA tiles of head dims 36..60 up to 0.7 KB of spills a thread):
            # an inf there would turn this head's logits NaN, where any use of the heads (the
            # out_proj) turns the output non-finite anyway.
            k_t = tl.load(k_t_base + kv_offset[None, :],
                          mask=in_third[:, None] & key_valid[None, :], other=0.0)  # [HEAD_PAD, BLOCK_N]
            v = tl.load(v_base + kv_offset[:, None],
                        mask=key_valid[:, None] & in_third[None, :], other=0.0)  # [BLOCK_N, HEAD_PAD]
            logits = tl.dot(q, k_t.to(DOT_TYPE), input_precision=DOT_PRECISION)  # log2 domain, fp32
            logits = tl.where(key_valid[None, :], logits, float("-inf"))
            # every key block holds a valid key, so new_max is finite and no NaN appears
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            rescale = tl.exp2(row_max - new_max)
            probs = tl.exp2(logits - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(probs, axis=1)
            o = o * rescale[:, None] + tl.dot(probs.to(DOT_TYPE), v.to(DOT_TYPE), input_precision=DOT_PRECISION)
            row_max = new_max
        # the window's columns of other heads hold their p @ v: the store mask and the out_proj
        # weight rows (0 outside the head) drop them
        o = o / row_sum[:, None]

        if proj_w_ptr is not None and not HEADS_THROUGH_OUT:
            # out += o_h @ proj_weight[:, h*hd:(h+1)*hd]^T
            o = o.to(DOT_TYPE)
            projected_lo += _project_head(o, proj_w_ptr, channels, in_head, out_channels_lo, D, stride_pw_out,
                                          stride_pw_in, VEC, DOT_TYPE, DOT_PRECISION)
            if TWO_OUT_CHUNKS:
                projected_hi += _project_head(o, proj_w_ptr, channels, in_head, out_channels_hi, D, stride_pw_out,
                                              stride_pw_in, VEC, DOT_TYPE, DOT_PRECISION)
        else:
            # no projection, or HEADS_THROUGH_OUT: head h's output goes to channels h*hd ...
            # (h+1)*hd - 1 of out
            _store_tile(o, channels, in_head, None, heads_res_ptr, out_ptr, b, query, query_valid, p,
                        patches_per_row, stride_rb, stride_rc, stride_rh, stride_rw,
                        stride_outb, stride_outc, stride_outh, stride_outw, VEC)

    if HEADS_THROUGH_OUT:
        # fp32 at d > 128: the program's [BLOCK_M, d] heads, just stored by all its threads into
        # its own pixels of out, are read back PROJ_K channels at a time (from L2: .cg) for the
        # projection, whose FMA dot then holds a [PROJ_K, OUT_CHUNK] weight slice, not a whole
        # head's. Barriers: the heads are visible before the reads, and every read is done
        # before the projected tile overwrites them.
        tl.debug_barrier()
        out_offset = _pixel_offsets(b, query, p, patches_per_row, stride_outb, stride_outh, stride_outw, VEC)
        for k_start in range(0, D, PROJ_K):
            head_channels = k_start + tl.arange(0, PROJ_K)
            heads = tl.load(out_ptr + out_offset[:, None] + head_channels[None, :] * stride_outc,
                            mask=query_valid[:, None] & (head_channels < D)[None, :], other=0.0,
                            cache_modifier=".cg").to(DOT_TYPE)
            projected_lo += _project_head(heads, proj_w_ptr, head_channels, head_channels < D, out_channels_lo,
                                          D, stride_pw_out, stride_pw_in, VEC, DOT_TYPE, DOT_PRECISION)
            if TWO_OUT_CHUNKS:
                projected_hi += _project_head(heads, proj_w_ptr, head_channels, head_channels < D,
                                              out_channels_hi, D, stride_pw_out, stride_pw_in, VEC, DOT_TYPE,
                                              DOT_PRECISION)
        tl.debug_barrier()
    if proj_w_ptr is not None:
        _store_tile(projected_lo, out_channels_lo, out_channels_lo < D, proj_b_ptr, res_ptr, out_ptr, b,
                    query, query_valid, p, patches_per_row, stride_rb, stride_rc, stride_rh, stride_rw,
                    stride_outb, stride_outc, stride_outh, stride_outw, VEC)
        if TWO_OUT_CHUNKS:
            _store_tile(projected_hi, out_channels_hi, out_channels_hi < D, proj_b_ptr, res_ptr, out_ptr, b,
                        query, query_valid, p, patches_per_row, stride_rb, stride_rc, stride_rh, stride_rw,
                        stride_outb, stride_outc, stride_outh, stride_outw, VEC)


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


def _vector_elements(qkv, residual, out, proj_weight) -> int:
    """VEC: the elements of one aligned 16-byte vector (8 in fp16/bf16, 4 in fp32), or fewer,
    down to 1: the most that divides d (the offset of the k and v thirds) and every batch and
    pixel stride of qkv, residual and out, and the out_proj weight's row stride. The kernel
    promises the compiler that alignment (`tl.multiple_of`), so it must hold. The fast model's
    maps (channels_last, d a multiple of 8) and pre-packed weights get the full 16 bytes; a
    weight not pre-packed (row stride 1) or NCHW maps (channel stride != 1: no contiguous
    channel vectors) get VEC = 1, i.e. scalar loads."""
    values = [qkv.shape[1] // 3] + ([proj_weight.stride(1)] if proj_weight is not None else [])
    return channel_vector(qkv.element_size(), qkv, residual, out, values=values)


def _head_window(head_dim: int, num_heads: int, vec: int) -> int:
    """HEAD_PAD: channels the kernel reads per head, from the head's first channel rounded down
    to a multiple of VEC, as a power of two >= 16. Head dim 30 in fp16 (VEC 8) starts heads 2..4
    at 6, 4, 2 channels past an aligned one: 64 where the head alone would take 32 (twice the
    attention dot work of those heads, for 128-bit loads); the other head dims of the models
    fit the power of two they need anyway."""
    lead = max(h * head_dim % vec for h in range(num_heads))
    return next_pow2(lead + head_dim)


def _heads_through_out(dtype: torch.dtype, d_pad: int) -> bool:
    """Whether the projected kernel stores the heads into out and reads them back for the
    out_proj (HEADS_THROUGH_OUT) instead of projecting each head as it is done. fp32 dots run
    on FMA units, which hold a thread's whole K slice of the weight tile in registers: projecting
    a 64-wide head window into two 128-wide output chunks (d > 128: head dims 36..60) spills
    0.5-7 KB a thread on sm_90 at every tile tried, where PROJ_K = 16 channels at a time do not.
    The heads' round trip stays within the program's own pixels (L2), not a second launch. Its
    barriers (`tl.debug_barrier`, bar.sync) order memory within one CTA: the launch must keep
    Triton's default of one CTA a program (no `num_ctas` > 1 clusters)."""
    return dtype == torch.float32 and d_pad > 128


def _meta(batch: int, n: int, head_pad: int, d_pad: int, dtype: torch.dtype, arch: int) -> dict:
    """Deterministic meta-parameters.

    BLOCK_M: query tokens per program, the [BLOCK_M, d] fp32 out_proj accumulator within 4K
    values (`rows_per_program`), 8 warps for 4K-value tiles of 32 rows or more (the out_proj
    accumulator or, without it, o [BLOCK_M, HEAD_PAD]: 4 warps of fp32 [64, 64] FMA tiles spill
    4 bytes a thread on sm_80 at head dim 48). 16-row tiles
    (N = 16, d > 128) keep 4 warps in 16-bit: their [16 keys, 64] k and v tiles give 8 warps 4
    values a thread, too few for one 16-byte vector of fp16 (fp32 HEADS_THROUGH_OUT tiles take
    8). PROJ_K: the head channels per HEADS_THROUGH_OUT projection step. OUT_CHUNK: the out_proj
    accumulator is one or two column slices of at most 128 channels, since one [64, 256] fp32
    weight tile alone would fill the 64 KB of shared memory of an sm_75 GPU. BLOCK_N: the fp32
    dots run on FMA units with their operand tiles in registers; ptxas -v (sm_75/80/90) shows
    these choices spilling at most about 0.7 KB per thread, where e.g. 32-key blocks at head
    dim 64 or 32-query tiles at d > 128 spill up to 4 KB; with the runtime specialisation
    (`python -m mvit3 kernels`) more of them spill: `_keys_per_block` and
    `_heads_through_out` keep every configuration the models launch spill-free.
    """
    # query tiles no taller than the sequence: N = 16 (7x7 or 8x8 maps) keeps 16-row mma.sync tiles
    block_m = rows_per_program(lambda bm: batch * 4 * cdiv(n, bm), d_pad, dtype, arch,
                               max_rows=next_pow2(n))
    # sm_80+ and head windows of 32 or 64 only: see `_keys_per_block`
    small_grid = (block_m == 16 and batch * 4 * cdiv(n, block_m) < TARGET_PROGRAMS
                  and head_pad >= 32 and arch >= 80)
    block_n = min(next_pow2(n), _keys_per_block(dtype, block_m, head_pad, d_pad, arch, small_grid))
    out_chunk = min(d_pad, 128)
    heads_through_out = _heads_through_out(dtype, d_pad)
    return interpreter_meta(
        dict(BLOCK_M=block_m, BLOCK_N=block_n,
             HEAD_PAD=head_pad, OUT_CHUNK=out_chunk, TWO_OUT_CHUNKS=d_pad > out_chunk,
             HEADS_THROUGH_OUT=heads_through_out, PROJ_K=16,
             # HEADS_THROUGH_OUT's 16-row tiles: 8 warps (4 fp32 values of the [16 keys, 64]
             # k and v tiles a thread, still one 16-byte vector): 64-158 registers on sm_80/90
             # where 4 warps spill 4 bytes on sm_90 (batch 100, 16-key blocks, two stages)
             num_warps=8 if (block_m * max(d_pad, head_pad) >= 4096 and block_m > 16) or heads_through_out else 4,
             # mma.sync GPUs: no software pipelining of the key blocks (with 2 stages sm_80's
             # 16-bit and TF32 16-row tiles spill 8 bytes a thread); nor sm_90's fp32 128-key
             # blocks of small grids (two stages spill 72 bytes a thread at head dim 24)
             num_stages=1 if arch < WGMMA_ARCH or (small_grid and dtype == torch.float32) else 2),
        BLOCK_M=min(next_pow2(n), 128), BLOCK_N=min(next_pow2(n), 256))


def _keys_per_block(dtype: torch.dtype, block_m: int, head_pad: int, d_pad: int, arch: int,
                    small_grid: bool = False) -> int:
    """BLOCK_N: keys per block of the online softmax, the largest that ptxas compiles without
    spills on sm_80/90 for the tile around it (checked by tests/test_triton_aot.py).

    A small grid (16-row query tiles and still under TARGET_PROGRAMS programs: batch 1 at
    N <= 256, e.g. v3-XS layer_3 with 64 programs) leaves most SMs idle, so its latency is one
    program's chain of heads x key blocks: there, on sm_80/sm_90 at head windows of 32 and 64,
    the key blocks grow (one block for N <= 256 at head window 32 in 16-bit: v3-XS layer_3.1
    32 -> 4 steps in fp16, 64 -> 8 in fp32). ptxas -v at 4 warps, 16 query rows: 16-bit
    256-key blocks take 124-154 registers at head window 32, 210-242 at 64 (two out_proj
    slices), where 128 keys take 166-168; fp32 (one stage: two spill 72 bytes on sm_90)
    128-key blocks take 128-164 at head window 32 (IEEE and TF32), while at 64 IEEE spills 16
    bytes on sm_80: 64 keys there (96-108 registers). Head window 16 (v3-XXS layer_3) keeps the
    general blocks: 128 keys in 16-bit and 64 in fp32 spill 4-16 bytes on sm_90 for some
    shapes; so does sm_75 (there these blocks added 16 spilling configurations)."""
    if small_grid:  # 16-row query tiles (see `_meta`)
        if dtype == torch.float32:
            return 128 if head_pad == 32 else 64
        return 256 if head_pad == 32 else 128
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
    out = channels_last_empty(b, d, h, w, qkv)
    d_pad = next_pow2(d) if proj_weight is not None else 16  # only sizes the out_proj tile
    vec = _vector_elements(qkv, residual, out, proj_weight)
    meta = _meta(b, n, _head_window(head_dim, num_heads, vec), d_pad, qkv.dtype, target_arch(qkv))
    meta["VEC"] = vec
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
