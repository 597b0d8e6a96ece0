"""mvit3.kernels.transformer_mlp against the float64 reference (mvit3.ops.reference).

Runs in the Triton interpreter on CPU tensors ("interp") and, where a GPU is present, on it
("cuda", marked gpu). Shapes are the real (d, F) of both families (tests/shapes.py): v1-style
layers use norm="layer", v2-style ones norm="group".
"""

import re

import pytest
import torch

from conftest import KERNEL_DEVICES
from kernel_utils import (check_output, skip_bf16_before_sm80, with_stride_2)
from shapes import v1_attention, v2_attention

import mvit3.kernels.transformer_mlp as kernel
from mvit3.kernels._common import launch_log
from mvit3.ops import reference
from mvit3.ops import transformer_mlp as transformer_mlp_op

# Largest |out - ref| allowed, relative to max |ref|:
# - fp32: fp32 rounding (2^-24) through two dot products of up to 512 terms and the fp32
#   norm statistics: measured <= 2e-7 in the interpreter. A wrong index or a dropped term
#   (bias, residual, norm affine) gives O(1e-2 ... 1) differences.
# - fp16: the output is stored in fp16 (half-ulp 2^-11 = 4.9e-4) and the normalised input and
#   hidden activations are rounded to fp16 before their fp32-accumulated dots: measured <= 4e-4.
# - bf16: 3 fewer mantissa bits than fp16, so 8x the fp16 bound (the interpreter's
#   fp32 -> bf16 conversion truncates instead of rounding: measured <= 6.4e-3 there).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

LAYER_DIMS = [(d, f) for d, _, f in v1_attention()]
GROUP_DIMS = v2_attention()


def make_args(batch, d, f, h, w, norm, *, dtype=torch.float32, device="cpu", channels_last=False,
              packed_weights=False, seed=0):
    """Arguments of transformer_mlp with O(1) outputs; x has a non-zero mean and a non-unit
    scale so the norm matters. packed_weights: w1 and w2 as views of contiguous [d, F] and
    [F, d] buffers (the fast model's pre-packed layout)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, h, w, generator=gen) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(f, d, generator=gen) * d ** -0.5
    w2 = torch.randn(d, f, generator=gen) * f ** -0.5
    if packed_weights:
        w1, w2 = w1.t().contiguous().t(), w2.t().contiguous().t()
    params = dict(norm_weight=1 + 0.2 * torch.randn(d, generator=gen),
                  norm_bias=0.2 * torch.randn(d, generator=gen),
                  w1=w1, b1=torch.randn(f, generator=gen), w2=w2, b2=torch.randn(d, generator=gen))
    p = {k: v.to(dtype=dtype, device=device) for k, v in params.items()}
    return (x.to(dtype=dtype, device=device), norm, p["norm_weight"], p["norm_bias"], 1e-5,
            p["w1"], p["b1"], p["w2"], p["b2"])


def check(out, args):
    check_output(out, args, args[0].shape, reference.transformer_mlp, TOLERANCE)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("index, norm, d, f",
                         [(i, "layer", d, f) for i, (d, f) in enumerate(LAYER_DIMS)]
                         + [(i, "group", d, f) for i, (d, f) in enumerate(GROUP_DIMS)])
def test_real_dims(device, index, norm, d, f):
    """Every (d, F) of both families on an 8x8 map; batch 1/3 (a pixel tile then straddles
    two samples), NCHW/channels_last and contiguous/pre-packed weights alternate."""
    args = make_args(1 + 2 * (index % 2), d, f, 8, 8, norm, device=device,
                     channels_last=index % 2 == 0, packed_weights=index % 3 == 0, seed=index)
    check(kernel.transformer_mlp(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("norm, d, f, h, w, batch, channels_last", [
    ("layer", 240, 480, 6, 10, 3, True),  # d padded to 256, F = 480 not a chunk multiple
    ("group", 144, 288, 6, 10, 3, False),
    ("layer", 80, 160, 14, 14, 1, False),
    ("group", 256, 512, 14, 14, 1, True),
    ("layer", 64, 128, 32, 32, 3, True),  # 3072 pixels: the 64-pixel tiles
    ("group", 96, 192, 32, 32, 1, False),
])
def test_maps(device, norm, d, f, h, w, batch, channels_last):
    args = make_args(batch, d, f, h, w, norm, device=device, channels_last=channels_last)
    check(kernel.transformer_mlp(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_n1024(device, norm):
    """64x64 map (512 px input, layer 3) at the smallest d."""
    args = make_args(1, 64, 128, 64, 64, norm, device=device, packed_weights=True)
    check(kernel.transformer_mlp(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("norm, d, f", [("layer", 64, 128), ("layer", 240, 480), ("group", 256, 512)])
def test_fp16(device, norm, d, f):
    args = make_args(3, d, f, 6, 10, norm, dtype=torch.float16, device=device, channels_last=True)
    check(kernel.transformer_mlp(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("norm, d, f", [("layer", 64, 128), ("layer", 240, 480), ("group", 256, 512)])
def test_bf16(device, norm, d, f):
    """In the interpreter, bf16 dot operands go through fp32 (`dot_operand_type`: its tl.dot
    misreads bf16 tiles, triton-lang/triton#11584), so the GPU's bf16 tensor-core path is
    checked on "cuda" only; the loads, stores and fp32 math are checked on both."""
    skip_bf16_before_sm80(device)
    args = make_args(3, d, f, 6, 10, norm, dtype=torch.bfloat16, device=device)
    check(kernel.transformer_mlp(*args), args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("norm, d, f", [("layer", 240, 480), ("group", 128, 256)])
def test_large_batch_cuda(norm, d, f):
    args = make_args(100, d, f, 32, 32, norm, device="cuda", channels_last=True, packed_weights=True)
    check(kernel.transformer_mlp(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("norm, kernels", [("layer", ["_transformer_mlp_kernel"]),
                                           ("group", ["_group_norm_stats_kernel", "_transformer_mlp_kernel"])])
def test_through_op_layer(device, norm, kernels):
    """mvit3.ops.transformer_mlp(backend="triton") reaches this kernel through torch.library."""
    args = make_args(1, 64, 128, 8, 8, norm, device=device)
    with launch_log() as log:
        out = transformer_mlp_op(*args, backend="triton")
    assert [r.name for r in log.records] == kernels
    check(out, args)


def test_real_shapes_supported():
    for norm, dims in (("layer", LAYER_DIMS), ("group", GROUP_DIMS)):
        for d, f in dims:
            assert kernel.why_unsupported(*make_args(1, d, f, 8, 8, norm)) is None


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0],) + ("batch",) + a[2:], "norm must be one of ('layer', 'group')"),
    (lambda a: (a[0][:, :60],) + a[1:], "w1 must be [F, 60]"),
    (lambda a: a[:5] + (a[5][:100],) + a[6:], "b1 must be [100]"),
    (lambda a: a[:7] + (a[7][:, :100],) + a[8:], "w2 must be [64, 128]"),
    (lambda a: a[:2] + (a[2][:32],) + a[3:], "norm_weight must be [64]"),
    (lambda a: a[:8] + (a[8].half(),), "all tensors must share a dtype"),
    (lambda a: a[:6] + (with_stride_2(a[6]),) + a[7:], "b1 must have unit stride"),
    (lambda a: (a[0][0],) + a[1:], "x must be [B, d, H, W]"),
])
def test_bad_input_raises(change, message):
    args = change(make_args(1, 64, 128, 8, 8, "layer"))
    with pytest.raises(ValueError, match=re.escape(message)):
        kernel.transformer_mlp(*args)


def test_limits():
    assert "d = 320 > 256" in kernel.why_unsupported(*make_args(1, 320, 640, 2, 2, "layer"))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_odd_maps_allowed(device):
    """The FFN is per pixel: odd maps (no 2x2 patches needed) are fine."""
    args = make_args(1, 64, 128, 7, 5, "group", device=device)
    check(kernel.transformer_mlp(*args), args)
