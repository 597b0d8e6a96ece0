"""Per-sample GroupNorm(1) statistics: mean and 1/sqrt(var + eps) over all C*H*W values.

The v2-style ops (norm="group") launch this before their fused kernel; it is a helper of
those ops, not a public op. Twin of `mvit3.ops.reference.group_norm_stats`.

A split reduction, so that batch 1 does not walk a whole map on one SM: the grid is (B,
splits). Program (b, s) walks its share of sample b's pixels in [BLOCK_P pixels, BLOCK_C channels]
tiles and merges each tile's (count, mean, M2) into a running total with Chan's parallel
formula (no E[x^2] - E[x]^2 cancellation), then writes that partial to a workspace and counts
itself done on the sample's counter (an acq_rel atomic). The sample's last program merges the
`splits` partials, in split order whatever order the programs finished in (so the result is
deterministic), writes (mean, rstd) and resets the counter to 0 for the next launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (TARGET_PROGRAMS, Work, batch_chunks, batch_part, cdiv, check_device, launch,
                      next_pow2, split_counters)

MAX_SPLITS = TARGET_PROGRAMS  # a power of two: the last program loads MAX_SPLITS partials, masked


@triton.jit
def _group_norm_stats_kernel(
    x_ptr, stats_ptr, partials_ptr, counters_ptr,
    C, HW, W, eps, pixels_per_split, splits,
    stride_b, stride_c, stride_h, stride_w,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    first_pixel = split * pixels_per_split
    last_pixel = tl.minimum(first_pixel + pixels_per_split, HW)
    for p0 in range(first_pixel, last_pixel, BLOCK_P):
        pix = p0 + offs_p
        pix_off = (pix // W) * stride_h + (pix % W) * stride_w
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + offs_c
            mask = (pix[:, None] < last_pixel) & (ch[None, :] < C)
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

    # partials [B, splits, 3] = (count, mean, M2); the release half of the atomic publishes
    # them, its acquire half lets the last program read everyone's
    partial = partials_ptr + (b * splits + split) * 3
    tl.store(partial, count)
    tl.store(partial + 1, mean)
    tl.store(partial + 2, m2)
    finished_before = tl.atomic_add(counters_ptr + b, 1, sem="acq_rel")
    if finished_before == splits - 1:
        rows = tl.arange(0, SPLITS_PAD)
        valid = rows < splits
        # .cg: read from L2, where the other SMs' stores are, never a stale L1 line
        sample = partials_ptr + (b * splits + rows) * 3
        counts = tl.load(sample, mask=valid, other=0.0, cache_modifier=".cg")
        means = tl.load(sample + 1, mask=valid, other=0.0, cache_modifier=".cg")
        m2s = tl.load(sample + 2, mask=valid, other=0.0, cache_modifier=".cg")
        total = tl.sum(counts)
        total_mean = tl.sum(counts * means) / total
        deviation = tl.where(valid, means - total_mean, 0.0)
        total_m2 = tl.sum(m2s) + tl.sum(counts * deviation * deviation)
        tl.store(stats_ptr + b * 2, total_mean)
        tl.store(stats_ptr + b * 2 + 1, 1.0 / tl.sqrt(total_m2 / total + eps))
        tl.atomic_xchg(counters_ptr + b, 0)


# Programs a launch aims for in all: one 4-warp program streaming its split keeps few loads in
# flight, a fraction of what an SM can take, so several a SM (about four waves on an H100):
# batch 100 of a 32 x 32 x 64 map runs 4 programs a sample (5 steps each), not 1 (17 steps).
GRID_PROGRAMS = 4 * TARGET_PROGRAMS


def _splits(batch: int, hw: int, block_p: int) -> int:
    """Programs per sample: enough for about GRID_PROGRAMS programs in all (at most MAX_SPLITS;
    a batch of GRID_PROGRAMS or more keeps one per sample), each walking whole BLOCK_P pixel
    tiles."""
    return max(1, min(cdiv(hw, block_p), MAX_SPLITS, GRID_PROGRAMS // batch))


def group_norm_stats(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, C, H, W] (any strides) -> float32 [B, 2] = (mean, rstd) per sample."""
    check_device(x)
    b, c, h, w = x.shape
    stats = torch.empty((b, 2), dtype=torch.float32, device=x.device)
    block_c = min(next_pow2(c), 64)
    block_p = max(16, 4096 // block_c)
    splits = _splits(b, h * w, block_p)
    pixels_per_split = cdiv(cdiv(h * w, splits), block_p) * block_p
    splits = cdiv(h * w, pixels_per_split)  # none left without pixels
    partials = torch.empty((b, splits, 3), dtype=torch.float32, device=x.device)
    counters = split_counters(x.device, b)
    for start, stop in batch_chunks(b, stats.shape, (x,)):
        launch(_group_norm_stats_kernel, (stop - start, splits),
               dict(x_ptr=batch_part(x, start, stop), stats_ptr=batch_part(stats, start, stop),
                    partials_ptr=batch_part(partials, start, stop), counters_ptr=counters,
                    C=c, HW=h * w, W=w, eps=float(eps), pixels_per_split=pixels_per_split,
                    splits=splits, stride_b=x.stride(0), stride_c=x.stride(1),
                    stride_h=x.stride(2), stride_w=x.stride(3)),
               dict(BLOCK_P=block_p, BLOCK_C=block_c, SPLITS_PAD=MAX_SPLITS),
               num_warps=4,
               # the walk over one split, then the last program's merge
               work=Work(serial_steps=cdiv(pixels_per_split, block_p) * cdiv(c, block_c) + 1),
               scratch=("partials_ptr", "counters_ptr"))
    return stats
