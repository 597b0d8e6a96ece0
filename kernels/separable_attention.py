"""The separable (linear) self-attention sub-layer of v2-style blocks, with its norm and residual.

Twin of `mvit3.ops.reference.separable_attention` (cvnets LinearSelfAttention: MobileViT v2
and v3 0.5/0.75/1.0): a = GroupNorm1(x); per sequence (b, p) of N patches:
score = softmax_n(q_n), context = sum_n score_n k_n; y = x + (relu(v) * context) @ Wo^T + bo.
x [B, d, H, W] (any strides); qkv_weight [1 + 2d, d] = rows [q | k | v].

Since the scores sum to 1, context = Wk (sum_n score_n a_n) + bk: the k projection is one
matrix-vector product per sequence, never a per-pixel GEMM, and q_n is one dot product per
pixel. Three launches:
1. `group_norm_stats`: per-sample (mean, rstd) of the GroupNorm.
2. `_context_partial_kernel`, grid (splits, B*4): each program reduces a contiguous range of
   one sequence's tokens to an online-softmax state in fp32: the running max m, the sum
   l = sum exp(q - m) and Wk (sum exp(q - m) a) (projected here, once per program, so the
   consumer never reads Wk). Splitting N keeps batch 1 from running on 4 programs.
3. `_separable_attention_kernel`, grid (query blocks, B*4): each program owns BLOCK_M tokens
   of one sequence, so its context is one vector: it merges the split states, then runs
   v = a @ Wv^T + bv in BLOCK_C-wide chunks of the d channels, h = relu(v) * context[chunk],
   out += h @ Wo[:, chunk]^T, and stores x + out + bo channels_last.
Pixels are addressed in the map through `patch_pixel_offset`: no unfold/fold copy exists.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (MAX_GRID_Y, TARGET_PROGRAMS, Work, batch_chunks, batch_part, cdiv,
                      channels_last_empty, check_device, dot_operand_type, dot_precision,
                      int32_offset_limit, interpreter_meta, launch, map_stride_args, next_pow2,
                      patch_pixel_offset, rows_per_program, target_arch, vector_stride_error)
from .group_norm_stats import group_norm_stats

MAX_DIM = 256  # the [BLOCK_M, d] normalised tile and fp32 accumulator stay in registers
MAX_SPLITS = 16  # the consumer merges up to this many partial states per sequence
LOG2E = tl.constexpr(math.log2(math.e))  # softmax through exp2: q is scaled by log2(e)


@triton.jit
def _group_norm_params(stats_ptr, b, norm_w_ptr, norm_b_ptr, channels, D):
    """(mean, rstd * gamma, beta) of sample b: GroupNorm(1) of a [tokens, D_PAD] tile is then
    (tile - mean) * scale + beta; padded channels (gamma = beta = 0) come out 0."""
    mean = tl.load(stats_ptr + b * 2)
    rstd = tl.load(stats_ptr + b * 2 + 1)
    gamma = tl.load(norm_w_ptr + channels, mask=channels < D, other=0.0).to(tl.float32)
    beta = tl.load(norm_b_ptr + channels, mask=channels < D, other=0.0).to(tl.float32)
    return mean, rstd * gamma, beta


@triton.jit
def _context_partial_kernel(
    # pointers
    x_ptr, stats_ptr, norm_w_ptr, norm_b_ptr, qkv_w_ptr, qkv_b_ptr, partial_max_ptr, partial_sum_ptr,
    partial_ctx_ptr,
    # sizes
    N, patches_per_row, D, tokens_per_split, num_splits,
    # strides
    stride_xb, stride_xc, stride_xh, stride_xw, stride_qkv_w_out, stride_qkv_w_in,
    # meta-parameters
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, BLOCK_O: tl.constexpr,
):
    split = tl.program_id(0)
    seq = tl.program_id(1)  # b * 4 + p
    b = seq // 4
    p = seq % 4
    channels = tl.arange(0, D_PAD)
    channel_valid = channels < D
    mean, scale, beta = _group_norm_params(stats_ptr, b, norm_w_ptr, norm_b_ptr, channels, D)
    # the q projection (row 0 of qkv_weight) with log2(e) folded in, for exp2
    w_q = tl.load(qkv_w_ptr + channels * stride_qkv_w_in, mask=channel_valid, other=0.0).to(tl.float32) * LOG2E
    b_q = tl.load(qkv_b_ptr).to(tl.float32) * LOG2E
    x_base = x_ptr + b * stride_xb
    x_channel_offset = channels * stride_xc

    run_max = float("-inf")
    run_sum = 0.0
    weighted = tl.zeros((D_PAD,), dtype=tl.float32)  # sum_n exp2(q_n - run_max) a_n
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for token_start in range(start, end, BLOCK_N):
        token = token_start + tl.arange(0, BLOCK_N)
        token_valid = token < end
        offset = patch_pixel_offset(token, p, patches_per_row, stride_xh, stride_xw)
        tile = tl.load(x_base + offset[:, None] + x_channel_offset[None, :],
                       mask=token_valid[:, None] & channel_valid[None, :], other=0.0).to(tl.float32)
        a = (tile - mean) * scale[None, :] + beta[None, :]
        q = tl.sum(a * w_q[None, :], axis=1) + b_q  # log2-domain scores [BLOCK_N]
        q = tl.where(token_valid, q, float("-inf"))
        # each block holds a valid token, so new_max is finite and no NaN appears
        new_max = tl.maximum(run_max, tl.max(q, axis=0))
        rescale = tl.exp2(run_max - new_max)
        probs = tl.exp2(q - new_max)
        run_sum = run_sum * rescale + tl.sum(probs, axis=0)
        weighted = weighted * rescale + tl.sum(probs[:, None] * a, axis=0)
        run_max = new_max

    state = seq * num_splits + split
    tl.store(partial_max_ptr + state, run_max)
    tl.store(partial_sum_ptr + state, run_sum)
    # Wk @ weighted, BLOCK_O output channels at a time: Wk^T tiles [D_PAD, BLOCK_O] are
    # contiguous along the outputs for a weight pre-packed as a [d, 1 + 2d] buffer
    for o_start in range(0, D, BLOCK_O):
        out_channels = o_start + tl.arange(0, BLOCK_O)
        w_k_t = tl.load(qkv_w_ptr + (1 + out_channels)[None, :] * stride_qkv_w_out
                        + channels[:, None] * stride_qkv_w_in,
                        mask=channel_valid[:, None] & (out_channels < D)[None, :], other=0.0)
        projected = tl.sum(w_k_t.to(tl.float32) * weighted[:, None], axis=0)
        tl.store(partial_ctx_ptr + state * D_PAD + out_channels, projected, mask=out_channels < D)


@triton.jit
def _separable_attention_kernel(
    # pointers
    x_ptr, stats_ptr, norm_w_ptr, norm_b_ptr, qkv_w_ptr, qkv_b_ptr, out_w_ptr, out_b_ptr,
    partial_max_ptr, partial_sum_ptr, partial_ctx_ptr, out_ptr,
    # sizes
    N, patches_per_row, D, num_splits,
    # strides
    stride_xb, stride_xc, stride_xh, stride_xw, stride_qkv_w_out, stride_qkv_w_in,
    stride_out_w_out, stride_out_w_in,
    stride_outb, stride_outc, stride_outh, stride_outw,
    # meta-parameters
    BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS_PAD: tl.constexpr,
    DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(1)  # b * 4 + p
    b = seq // 4
    p = seq % 4

    # merge the split states of this sequence: weight_s = exp2(m_s - m) / sum_s exp2(m_s - m) l_s
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < num_splits
    state = seq * num_splits + splits
    split_max = tl.load(partial_max_ptr + state, mask=split_valid, other=float("-inf"))
    split_scale = tl.exp2(split_max - tl.max(split_max, axis=0))  # 0 for padded splits
    split_sum = tl.load(partial_sum_ptr + state, mask=split_valid, other=0.0)
    split_weight = split_scale / tl.sum(split_scale * split_sum, axis=0)

    token = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    token_valid = token < N
    channels = tl.arange(0, D_PAD)
    channel_valid = channels < D
    mask = token_valid[:, None] & channel_valid[None, :]
    x_ptrs = (x_ptr + b * stride_xb + patch_pixel_offset(token, p, patches_per_row, stride_xh, stride_xw)[:, None]
              + channels[None, :] * stride_xc)
    mean, scale, beta = _group_norm_params(stats_ptr, b, norm_w_ptr, norm_b_ptr, channels, D)
    tile = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    normed = ((tile - mean) * scale[None, :] + beta[None, :]).to(DOT_TYPE)

    chunk = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for c_start in range(0, D, BLOCK_C):
        inner = c_start + chunk
        inner_valid = inner < D
        # context[chunk] = sum_s weight_s Wk (weighted a)_s + bk
        split_ctx = tl.load(partial_ctx_ptr + state[:, None] * D_PAD + inner[None, :],
                            mask=split_valid[:, None] & inner_valid[None, :], other=0.0)
        context = (tl.sum(split_weight[:, None] * split_ctx, axis=0)
                   + tl.load(qkv_b_ptr + 1 + inner, mask=inner_valid, other=0.0).to(tl.float32))
        # v[chunk] = a @ Wv[chunk]^T + bv: Wv^T tile [D_PAD, BLOCK_C], rows 1 + d + chunk of qkv_weight
        w_v_t = tl.load(qkv_w_ptr + (1 + D + inner)[None, :] * stride_qkv_w_out
                        + channels[:, None] * stride_qkv_w_in,
                        mask=channel_valid[:, None] & inner_valid[None, :], other=0.0)
        v = (tl.dot(normed, w_v_t.to(DOT_TYPE), input_precision=DOT_PRECISION)
             + tl.load(qkv_b_ptr + 1 + D + inner, mask=inner_valid, other=0.0).to(tl.float32)[None, :])
        # padded chunk channels: context = 0, so h = 0 there
        h = tl.maximum(v, 0.0) * context[None, :]
        w_o_t = tl.load(out_w_ptr + channels[None, :] * stride_out_w_out + inner[:, None] * stride_out_w_in,
                        mask=inner_valid[:, None] & channel_valid[None, :], other=0.0)  # [BLOCK_C, D_PAD]
        acc += tl.dot(h.to(DOT_TYPE), w_o_t.to(DOT_TYPE), input_precision=DOT_PRECISION)

    acc += tl.load(out_b_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)[None, :]
    # the residual is re-read (an L1/L2 hit) rather than kept live in registers across the loop
    acc += tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = (out_ptr + b * stride_outb
                + patch_pixel_offset(token, p, patches_per_row, stride_outh, stride_outw)[:, None]
                + channels[None, :] * stride_outc)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _shape_error(x, norm_weight, norm_bias, qkv_weight, qkv_bias, out_weight, out_bias) -> str | None:
    if x.dim() != 4:
        return f"x must be [B, d, H, W], got shape {list(x.shape)}"
    d, h, w = x.shape[1:]
    if h % 2 or w % 2:
        return f"H and W must be even (2x2 patches), got {h}x{w}"
    expected = {"norm_weight": (norm_weight, (d,)), "norm_bias": (norm_bias, (d,)),
                "qkv_weight": (qkv_weight, (1 + 2 * d, d)), "qkv_bias": (qkv_bias, (1 + 2 * d,)),
                "out_weight": (out_weight, (d, d)), "out_bias": (out_bias, (d,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            return f"{name} must be {list(shape)}, got {list(t.shape)}"
        if t.dtype != x.dtype:
            return f"{name} is {t.dtype}, x is {x.dtype}: all tensors must share a dtype"
    return vector_stride_error(norm_weight=norm_weight, norm_bias=norm_bias, qkv_bias=qkv_bias,
                               out_bias=out_bias)


def why_unsupported(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, out_weight, out_bias) -> str | None:
    """None if the kernels take these arguments, else why not."""
    reason = _shape_error(x, norm_weight, norm_bias, qkv_weight, qkv_bias, out_weight, out_bias)
    if reason is not None:
        return reason
    if x.shape[1] > MAX_DIM:
        return f"d = {x.shape[1]} > {MAX_DIM}"
    return int32_offset_limit(tuple(x.shape), (x,), dict(qkv_weight=qkv_weight))


def _meta(batch: int, n: int, d_pad: int, dtype: torch.dtype, arch: int) -> tuple[dict, dict, int]:
    """(context meta, consumer meta, tokens per split).

    Context programs walk [BLOCK_N, d] tiles of 4K values; splits: enough for
    TARGET_PROGRAMS context programs (at most MAX_SPLITS per sequence, each at least one
    BLOCK_N block). Consumer tiles as in transformer_mlp (the same two-GEMM loop): [BLOCK_M, d]
    tiles within 4K values, weight chunks within 2K values, 8 warps for 4K-value tiles; the
    fp32 dots run on FMA units with their operands in registers.
    """
    block_n = min(4096 // d_pad, next_pow2(n))
    splits = max(1, min(MAX_SPLITS, cdiv(TARGET_PROGRAMS, batch * 4), cdiv(n, block_n)))
    tokens_per_split = cdiv(cdiv(n, splits), block_n) * block_n
    # 16-bit [64, 256] tiles spill (the normalised tile, v and the accumulator are all live):
    # d > 128 keeps 16-row mma.sync tiles; so does fp32 from d = 128 (TF32 32-row tiles spill).
    # A program's rows are one sequence's tokens: layer_5's 16-token sequences (8 x 8 maps at
    # 256 px) hold no 64-row wgmma tile, and run 16-row mma.sync tiles whatever the batch
    max_rows = next_pow2(n) if d_pad < (128 if dtype == torch.float32 else 256) else 16
    block_m = rows_per_program(lambda bm: batch * 4 * cdiv(n, bm), d_pad, dtype, arch, max_rows=max_rows)
    context_meta = dict(BLOCK_N=block_n, D_PAD=d_pad, BLOCK_O=min(d_pad, 4096 // d_pad))
    consumer_meta = interpreter_meta(
        # fp32: 16-wide chunks (32 spills at d = 64: the FMA dots keep their operands in registers)
        dict(BLOCK_M=block_m, D_PAD=d_pad,
             BLOCK_C=16 if dtype == torch.float32 else min(32, max(16, 2048 // d_pad)),
             SPLITS_PAD=MAX_SPLITS, num_warps=8 if block_m * d_pad >= 4096 else 4),
        BLOCK_M=min(next_pow2(n), 256), BLOCK_C=128)
    return context_meta, consumer_meta, tokens_per_split


def separable_attention(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                        qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, out_weight: torch.Tensor,
                        out_bias: torch.Tensor) -> torch.Tensor:
    """x [B, d, H, W] -> channels_last [B, d, H, W]; see `mvit3.ops.reference.separable_attention`."""
    reason = why_unsupported(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias, out_weight, out_bias)
    if reason is not None:
        raise ValueError(f"separable_attention: {reason}")
    check_device(x, norm_weight, norm_bias, qkv_weight, qkv_bias, out_weight, out_bias)
    b, d, h, w = x.shape
    n = (h // 2) * (w // 2)
    d_pad = next_pow2(d)
    context_meta, consumer_meta, tokens_per_split = _meta(b, n, d_pad, x.dtype, target_arch(x))
    num_splits = cdiv(n, tokens_per_split)
    stats = group_norm_stats(x, eps)
    # fp32 online-softmax state of every (sequence, split): max, sum, Wk-projected weighted sum
    partial_max = torch.empty((b * 4, num_splits), dtype=torch.float32, device=x.device)
    partial_sum = torch.empty_like(partial_max)
    partial_ctx = torch.empty((b * 4, num_splits, d_pad), dtype=torch.float32, device=x.device)
    out = channels_last_empty(b, d, h, w, x)
    x_strides = dict(**map_stride_args("x", x),
                     stride_qkv_w_out=qkv_weight.stride(0), stride_qkv_w_in=qkv_weight.stride(1))
    num_warps = consumer_meta.pop("num_warps")
    # grid axis 1 holds the 4 sequences of each sample: at most MAX_GRID_Y // 4 samples a launch
    for start, stop in batch_chunks(b, out.shape, (x,), max_samples=MAX_GRID_Y // 4):
        bc = stop - start
        x_part, stats_part = batch_part(x, start, stop), batch_part(stats, start, stop)
        partials = dict(partial_max_ptr=batch_part(partial_max, 4 * start, 4 * stop),
                        partial_sum_ptr=batch_part(partial_sum, 4 * start, 4 * stop),
                        partial_ctx_ptr=batch_part(partial_ctx, 4 * start, 4 * stop))
        launch(_context_partial_kernel, (num_splits, bc * 4),
               dict(x_ptr=x_part, stats_ptr=stats_part, norm_w_ptr=norm_weight, norm_b_ptr=norm_bias,
                    qkv_w_ptr=qkv_weight, qkv_b_ptr=qkv_bias, **partials,
                    N=n, patches_per_row=w // 2, D=d, tokens_per_split=tokens_per_split,
                    num_splits=num_splits, **x_strides),
               context_meta, num_warps=4,
               # q_n = a_n . wq and the score-weighted sum of a_n per token, Wk @ (that sum) per split
               work=Work(simt_flops=4 * bc * h * w * d + 2 * bc * 4 * num_splits * d * d,
                         serial_steps=cdiv(tokens_per_split, context_meta["BLOCK_N"])
                         + cdiv(d, context_meta["BLOCK_O"])))
        launch(_separable_attention_kernel, (cdiv(n, consumer_meta["BLOCK_M"]), bc * 4),
               dict(x_ptr=x_part, stats_ptr=stats_part, norm_w_ptr=norm_weight, norm_b_ptr=norm_bias,
                    qkv_w_ptr=qkv_weight, qkv_b_ptr=qkv_bias, out_w_ptr=out_weight, out_b_ptr=out_bias,
                    **partials, out_ptr=batch_part(out, start, stop),
                    N=n, patches_per_row=w // 2, D=d, num_splits=num_splits, **x_strides,
                    stride_out_w_out=out_weight.stride(0), stride_out_w_in=out_weight.stride(1),
                    **map_stride_args("out", out)),
               dict(**consumer_meta, DOT_TYPE=dot_operand_type(x.dtype), DOT_PRECISION=dot_precision(x.dtype)),
               num_warps=num_warps,
               work=Work(dot_flops=4 * bc * h * w * d * d, serial_steps=cdiv(d, consumer_meta["BLOCK_C"])))
    return out
