"""Per-sample GroupNorm(1) statistics: mean and 1/sqrt(var + eps) over all C*H*W values.

The v2-style ops (norm="group") launch this before their fused kernel; it is a helper of
those ops, not a public op. Twin of `mvit3.ops.reference.group_norm_stats`.

One program per sample walks the map in [BLOCK_P pixels, BLOCK_C channels] tiles and merges
each tile's (count, mean, M2) into a running total with Chan's parallel formula, so the
variance never suffers the cancellation of E[x^2] - E[x]^2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Work, batch_chunks, batch_part, cdiv, check_device, launch, next_pow2


@triton.jit
def _group_norm_stats_kernel(
    x_ptr, stats_ptr,
    C, HW, W, eps,
    stride_b, stride_c, stride_h, stride_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for p0 in range(0, HW, BLOCK_P):
        pix = p0 + offs_p
        pix_off = (pix // W) * stride_h + (pix % W) * stride_w
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + offs_c
            mask = (pix[:, None] < HW) & (ch[None, :] < C)
            ptrs = x_ptr + b * stride_b + pix_off[:, None] + ch[None, :] * stride_c
            tile = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            n_tile = tl.sum(mask.to(tl.float32))
            tile_mean = tl.sum(tile) / n_tile
            centred = tl.where(mask, tile - tile_mean, 0.0)
            tile_m2 = tl.sum(centred * centred)
            total = count + n_tile
            delta = tile_mean - mean
            mean = mean + delta * (n_tile / total)
            m2 = m2 + tile_m2 + delta * delta * (count * n_tile / total)
            count = total
    var = m2 / count
    tl.store(stats_ptr + b * 2, mean)
    tl.store(stats_ptr + b * 2 + 1, 1.0 / tl.sqrt(var + eps))


def group_norm_stats(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, C, H, W] (any strides) -> float32 [B, 2] = (mean, rstd) per sample."""
    check_device(x)
    b, c, h, w = x.shape
    stats = torch.empty((b, 2), dtype=torch.float32, device=x.device)
    block_c = min(next_pow2(c), 64)
    block_p = max(16, 4096 // block_c)
    for start, stop in batch_chunks(b, stats.shape, (x,)):
        launch(_group_norm_stats_kernel, (stop - start,),
               dict(x_ptr=batch_part(x, start, stop), stats_ptr=batch_part(stats, start, stop),
                    C=c, HW=h * w, W=w, eps=float(eps),
                    stride_b=x.stride(0), stride_c=x.stride(1), stride_h=x.stride(2),
                    stride_w=x.stride(3)),
               dict(BLOCK_P=block_p, BLOCK_C=block_c), num_warps=4,
               work=Work(serial_steps=cdiv(h * w, block_p) * cdiv(c, block_c)))
    return stats
