"""The Triton GroupNorm(1) statistics (a split reduction with a last-program merge) against the
float64 reference, on the v2-style maps' shapes: one sample split over many programs (batch 1),
several samples, odd maps and each storage layout."""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICES
from kernel_utils import random_map
from mvit3.kernels import group_norm_stats as module
from mvit3.kernels._common import launch_log, split_counters
from mvit3.ops import reference

# |kernel - float64| relative to |reference|: fp32 sums of up to 1024 * 512 values in tiles,
# merged pairwise (Chan): rounding ~ log2(n) * 2**-24 of the mean's scale, and the inputs of
# the offset case are ~100 with unit spread, so the mean's error is ~1e-7 * 100 relative to
# rstd ~ 1: 1e-5 leaves room; a wrong mask or a lost partial is O(1e-2) or worse.
TOLERANCE = 1e-5

# (batch, C, H, W): v2/v3-0.5 layer_3 at 256 px (1024 pixels: 16 splits at batch 1), layer_4
# odd (7x7 pixel tiles straddling rows), layer_5, a batch of 130 (a 4x4 map: one tile, one split)
CASES = [(1, 64, 32, 32), (1, 192, 15, 13), (3, 128, 16, 16), (2, 256, 8, 8), (130, 24, 4, 4)]


def _check(x, eps=1e-5):
    stats = module.group_norm_stats(x, eps)
    expected = reference.group_norm_stats(x.double(), eps)
    assert stats.dtype == torch.float32 and stats.shape == (x.shape[0], 2)
    error = (stats.double() - expected).abs() / expected.abs().clamp_min(1.0)
    assert error.max().item() < TOLERANCE, error.max().item()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("b, c, h, w", CASES, ids=[f"b{b}-c{c}-{h}x{w}" for b, c, h, w in CASES])
@pytest.mark.parametrize("layout", ("nchw", "nhwc", "slice"))
def test_matches_float64(device, b, c, h, w, layout):
    gen = torch.Generator().manual_seed(c + h)
    _check(random_map(gen, b, c, h, w, layout, torch.float32, device))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
def test_low_precision_input(device, dtype):
    """16-bit maps: their values are exact in fp32, so the statistics keep fp32's accuracy."""
    gen = torch.Generator().manual_seed(1)
    _check(random_map(gen, 2, 96, 17, 17, "nhwc", dtype, device))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_offset_values_are_stable(device):
    """Values around 100 with unit spread: E[x^2] - E[x]^2 would lose the variance."""
    gen = torch.Generator().manual_seed(2)
    _check(random_map(gen, 1, 64, 32, 32, "nhwc", torch.float32, device) + 100.0)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_counters_return_to_zero(device):
    """Each sample's last program resets its counter, so the next launch (and a CUDA-graph
    replay) starts from zero; a second call on other values is right too."""
    gen = torch.Generator().manual_seed(3)
    for offset in (0.0, 5.0):
        _check(random_map(gen, 3, 64, 32, 32, "nhwc", torch.float32, device) + offset)
        counters = split_counters(torch.device(device), 3)
        assert counters.count_nonzero().item() == 0


def test_small_batches_are_split():
    """Batch 1 spreads one sample over several programs: v2-0.5's layer_3 map (32x32x64 at
    256 px) is 16 splits of one 64-pixel tile each, plus the merge; larger batches fewer."""
    x = torch.zeros(1, 64, 32, 32)
    with launch_log(dry_run=True) as log:
        module.group_norm_stats(x, 1e-5)
    (record,) = log.records
    assert record.grid == (1, 16)
    assert record.work.serial_steps == 2
    # batch 100: about GRID_PROGRAMS programs, 4 splits of one 256-pixel tile (8 channels)
    with launch_log(dry_run=True) as log:
        module.group_norm_stats(torch.zeros(100, 8, 32, 32), 1e-5)
    assert log.records[0].grid == (100, 4)
    with launch_log(dry_run=True) as log:
        module.group_norm_stats(torch.zeros(module.GRID_PROGRAMS, 8, 32, 32), 1e-5)
    assert log.records[0].grid == (module.GRID_PROGRAMS, 1)
