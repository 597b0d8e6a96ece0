"""mvit3.kernels.separable_attention against the float64 reference (mvit3.ops.reference).

Runs in the Triton interpreter on CPU tensors ("interp") and, where a GPU is present, on it
("cuda", marked gpu). Shapes are the real d of the v2-style models (tests/shapes.py) on even
maps, square and not, N = 15 ... 1024 patches per sequence.
"""

import re

import pytest
import torch

from conftest import KERNEL_DEVICES
from kernel_utils import (check_output, skip_bf16_before_sm80, with_stride_2)
from shapes import v2_attention

import mvit3.kernels.separable_attention as kernel
from mvit3.kernels._common import launch_log
from mvit3.ops import reference
from mvit3.ops import separable_attention as separable_attention_op

# Largest |out - ref| allowed, relative to max |ref|:
# - fp32: fp32 rounding (2^-24) through the GroupNorm, the q dot products, the softmax over up
#   to 1024 patches merged across splits, and two d-term GEMMs: measured <= 3e-7 in the
#   interpreter. A wrong index, split merge or dropped term gives O(1e-2 ... 1) differences.
# - fp16: the output is stored in fp16 (half-ulp 2^-11 = 4.9e-4) and the normalised input and
#   relu(v) * context are rounded to fp16 before their fp32-accumulated dots: measured <= 4e-4.
# - bf16: 3 fewer mantissa bits than fp16, so 8x the fp16 bound (the interpreter's
#   fp32 -> bf16 conversion truncates instead of rounding: measured <= 6.4e-3 there).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

DIMS = [d for d, _ in v2_attention()]


def make_args(batch, d, h, w, *, dtype=torch.float32, device="cpu", channels_last=False,
              packed_weights=False, seed=0):
    """Arguments of separable_attention with O(1) outputs; x has a non-zero mean and a
    non-unit scale so the norm matters, and q is spread enough that the softmax is far from
    uniform. packed_weights: qkv_weight and out_weight as views of contiguous [d, 1 + 2d] and
    [d, d] buffers (the fast model's pre-packed layout)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, h, w, generator=gen) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    qkv_weight = torch.randn(1 + 2 * d, d, generator=gen) * d ** -0.5
    qkv_weight[0] *= 3  # sharper scores
    out_weight = torch.randn(d, d, generator=gen) * d ** -0.5
    if packed_weights:
        qkv_weight, out_weight = qkv_weight.t().contiguous().t(), out_weight.t().contiguous().t()
    params = dict(norm_weight=1 + 0.2 * torch.randn(d, generator=gen),
                  norm_bias=0.2 * torch.randn(d, generator=gen),
                  qkv_weight=qkv_weight, qkv_bias=torch.randn(1 + 2 * d, generator=gen),
                  out_weight=out_weight, out_bias=torch.randn(d, generator=gen))
    p = {k: v.to(dtype=dtype, device=device) for k, v in params.items()}
    return (x.to(dtype=dtype, device=device), p["norm_weight"], p["norm_bias"], 1e-5,
            p["qkv_weight"], p["qkv_bias"], p["out_weight"], p["out_bias"])


def check(out, args):
    check_output(out, args, args[0].shape, reference.separable_attention, TOLERANCE)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("index, d", list(enumerate(DIMS)), ids=[f"d{d}" for d in DIMS])
def test_real_dims(device, index, d):
    """Every d of the v2-style models on an 8x8 map (N = 16); batch 1/3, NCHW/channels_last
    and contiguous/pre-packed weights alternate."""
    args = make_args(1 + 2 * (index % 2), d, 8, 8, device=device, channels_last=index % 2 == 0,
                     packed_weights=index % 3 == 0, seed=index)
    check(kernel.separable_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("d, h, w, batch, channels_last", [
    (96, 6, 10, 3, True),  # N = 15: one masked block per sequence
    (256, 10, 6, 1, False),
    (144, 14, 14, 1, True),  # N = 49: 4 splits at batch 1
    (96, 14, 14, 3, False),  # 2 splits for each of 12 sequences
    (64, 32, 32, 1, False),  # N = 256: 4 splits of a block of 64
    (128, 32, 32, 1, True),
])
def test_maps(device, d, h, w, batch, channels_last):
    args = make_args(batch, d, h, w, device=device, channels_last=channels_last, packed_weights=d == 128)
    check(kernel.separable_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_n1024(device):
    """64x64 map (512 px input, layer 3) at the smallest d: 16 splits of 64 patches merged."""
    args = make_args(1, 64, 64, 64, device=device, channels_last=True)
    with launch_log(dry_run=True) as log:
        kernel.separable_attention(*args)
    assert log.records[1].grid == (16, 4)
    check(kernel.separable_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("d, h, w", [(64, 6, 10), (256, 10, 6)])
def test_fp16(device, d, h, w):
    args = make_args(3, d, h, w, dtype=torch.float16, device=device, channels_last=True)
    check(kernel.separable_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("d", [64, 256])
def test_bf16(device, d):
    """In the interpreter, bf16 dot operands go through fp32 (`dot_operand_type`: its tl.dot
    misreads bf16 tiles, triton-lang/triton#11584), so the GPU's bf16 tensor-core path is
    checked on "cuda" only; the loads, stores and fp32 math are checked on both."""
    skip_bf16_before_sm80(device)
    args = make_args(3, d, 6, 10, dtype=torch.bfloat16, device=device)
    check(kernel.separable_attention(*args), args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("d", [128, 256])
def test_large_batch_cuda(d):
    args = make_args(100, d, 32, 32, device="cuda", channels_last=True, packed_weights=True)
    check(kernel.separable_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_through_op_layer(device):
    """mvit3.ops.separable_attention(backend="triton") reaches these kernels through torch.library."""
    args = make_args(1, 64, 8, 8, device=device)
    with launch_log() as log:
        out = separable_attention_op(*args, backend="triton")
    assert [r.name for r in log.records] == ["_group_norm_stats_kernel", "_context_partial_kernel",
                                             "_separable_attention_kernel"]
    check(out, args)


def test_real_shapes_supported():
    for d in DIMS:
        assert kernel.why_unsupported(*make_args(1, d, 8, 8)) is None


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0][:, :, :7],) + a[1:], "H and W must be even"),
    (lambda a: (a[0][..., :7],) + a[1:], "H and W must be even"),
    (lambda a: (a[0][:, :60],) + a[1:], "norm_weight must be [60]"),
    (lambda a: a[:4] + (a[4][:64],) + a[5:], "qkv_weight must be [129, 64]"),
    (lambda a: a[:5] + (a[5][:64],) + a[6:], "qkv_bias must be [129]"),
    (lambda a: a[:6] + (a[6][:, :32],) + a[7:], "out_weight must be [64, 64]"),
    (lambda a: a[:7] + (a[7].half(),), "all tensors must share a dtype"),
    (lambda a: a[:5] + (with_stride_2(a[5]),) + a[6:], "qkv_bias must have unit stride"),
])
def test_bad_input_raises(change, message):
    args = change(make_args(1, 64, 8, 8))
    with pytest.raises(ValueError, match=re.escape(message)):
        kernel.separable_attention(*args)


def test_limits():
    assert "d = 320 > 256" in kernel.why_unsupported(*make_args(1, 320, 2, 2))


def test_splits():
    """Dry run: the context reduction is split over N at batch 1 (4 sequences only) and not at
    batch 32 (128 sequences already fill the GPU)."""
    with launch_log(dry_run=True) as log:
        kernel.separable_attention(*make_args(1, 128, 32, 32))
        kernel.separable_attention(*make_args(32, 128, 32, 32))
    context = [r for r in log.records if r.name == "_context_partial_kernel"]
    assert [r.grid for r in context] == [(8, 4), (1, 128)]
