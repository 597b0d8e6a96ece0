"""The Triton conv3x3 (implicit GEMM over cat(x, x2), bias/act epilogue) against the float64
reference: the stems of all 15 models, MobileViTv1's local 3x3 and fusion convs, and the
dilated 3x3 convs of DeepLabv3's ASPP."""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICES
from kernel_utils import (check_op, check_rejected, dry_run_launch, other_layout, random_map,
                          random_vector, random_weight, replace_args, skip_bf16_before_sm80,
                          variant, with_stride_2)
from mvit3.kernels.conv3x3 import conv3x3, why_unsupported
from mvit3.models import CONFIGS
from mvit3.ops import reference

# Max |kernel - reference| / max |reference|, the reference in float64 on float64 copies.
# fp32: K = 9 * Cin <= 2880 products summed in fp32 in another order than float64:
#   rounding ~ sqrt(K) * 2**-24 of the scale, under 1e-5 here, while a wrong tap, border,
#   channel or stride is O(1e-1) or worse. 1e-4 leaves headroom for SiLU's exp.
# fp16, bf16 (unit roundoff u = 2**-11 = 4.9e-4, 2**-8 = 3.9e-3): inputs and weights are
#   exact in the I/O dtype and products and sums stay fp32, so only the output rounding
#   (<= u of the scale) adds. The interpreter converts fp32 to bf16 by truncation (up to
#   2u); GPUs round to nearest. 5u: 3-6x the largest error seen over these tests.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}


def make_args(device, dtype, b, size, layout, packing, c1, cout, c2=0, bias=True, stride=1,
              act="silu", seed=0, dilation=1):
    """Positional arguments of conv3x3; x2 uses another layout than x."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    x = random_map(gen, b, c1, h, w, layout, dtype, device)
    x2 = random_map(gen, b, c2, h, w, other_layout(layout), dtype, device) if c2 else None
    weight = random_weight(gen, cout, c1 + c2, packing, dtype, device, window=(3, 3))
    bias_t = random_vector(gen, cout, dtype, device) if bias else None
    return (x, weight, bias_t, x2, stride, act, dilation)


def check(args, dtype=torch.float32):
    check_op(conv3x3, reference.conv3x3, args, dtype, TOLERANCE[dtype])


STEM_CHANNELS = sorted({c.stem_channels for c in CONFIGS.values()})
STEM_CASES = [(cout, dtype, layout) for cout in STEM_CHANNELS
              for dtype in (torch.float32, torch.float16, torch.bfloat16) for layout in ("nchw", "nhwc")]
V1_CHANNELS = sorted({s.channels for c in CONFIGS.values() if c.version == "v1" for s in c.stages})


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, cout, dtype, layout", [(i, *p) for i, p in enumerate(STEM_CASES)],
                         ids=[f"3to{c}-{str(d)[6:]}-{lay}" for c, d, lay in STEM_CASES])
def test_stem(device, i, cout, dtype, layout):
    """conv_1: 3 -> 16/24/32, stride 2, folded BN, SiLU, on an NCHW or channels_last image."""
    skip_bf16_before_sm80(device, dtype)
    size = ((17, 17), (16, 20), (9, 13))[i % 3]
    check(make_args(device, dtype, b=(1, 3)[i % 2], size=size, layout=layout,
                    packing=("kmajor", "plain")[(i // 2) % 2], c1=3, cout=cout, stride=2, seed=i),
          dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, c", list(enumerate(V1_CHANNELS)), ids=[f"C{c}" for c in V1_CHANNELS])
def test_v1_local_conv(device, i, c):
    """MobileViTv1 local_rep.conv_3x3: full 3x3 C -> C, folded BN, SiLU."""
    check(make_args(device, torch.float32, c1=c, cout=c, seed=i, **variant(i, heavy=c > 64)))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, c", list(enumerate(V1_CHANNELS)), ids=[f"C{c}" for c in V1_CHANNELS])
def test_v1_fusion(device, i, c):
    """MobileViTv1 fusion: 3x3 over cat(block input, conv_proj output) 2C -> C, SiLU."""
    check(make_args(device, torch.float32, c1=c, c2=c, cout=c, seed=i, **variant(i, heavy=c > 64)))


REAL_SIZE_CASES = {
    "stem-3to16-256x256": dict(c1=3, cout=16, stride=2, size=(256, 256), layout="nchw"),
    "local-C48-32x32": dict(c1=48, cout=48, size=(32, 32)),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", REAL_SIZE_CASES)
def test_real_size(device, case):
    """256 px: the stem on the full NCHW image (128 row tiles); v1-XXS's layer_3 local conv."""
    kw = {**dict(b=1, layout="nhwc", packing="kmajor"), **REAL_SIZE_CASES[case]}
    check(make_args(device, torch.float32, **kw))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("stride", (1, 2, 3))
@pytest.mark.parametrize("c2", (0, 8), ids=("x", "x+x2"))
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("act", ("none", "silu"))
def test_option_matrix(device, stride, c2, bias, act):
    """Every combination of the optional parts; any stride >= 1 works (why_unsupported names
    no stride limit), and Cin = 12 + 8 puts x / x2 and tap boundaries inside K chunks."""
    i = stride + 3 * bool(c2) + 6 * bias
    kw = {**variant(i), "b": 3, "size": (7, 10)}
    check(make_args(device, torch.float32, c1=12, c2=c2, cout=24, bias=bias, stride=stride,
                    act=act, seed=i, **kw))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dilation", (1, 2, 4))
@pytest.mark.parametrize("stride", (1, 2))
def test_dilation(device, dilation, stride):
    """Padding = dilation on odd maps, some smaller than the dilated window (taps fall off two
    borders at once), with x2 so that both maps take the dilated taps."""
    i = dilation + stride
    kw = {**variant(i), "b": 2, "size": ((7, 5), (9, 11), (5, 13))[i % 3]}
    check(make_args(device, torch.float32, c1=12, c2=4, cout=20, stride=stride, dilation=dilation,
                    seed=i, **kw))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("rate", (6, 12))
def test_aspp_branch(device, rate):
    """DeepLabv3's ASPP 3x3 branch (v1-style XS: 160 -> 256 on the 32x32 map of a 512 px
    input), channel-reduced for the interpreter and on an odd 33x31 map: rate 12 leaves most
    taps of the border pixels outside the map."""
    check(make_args(device, torch.float32, b=1, size=(33, 31), layout="nhwc", packing="kmajor",
                    c1=40, cout=64, act="none", dilation=rate, seed=rate))


LOW_PRECISION_CASES = {
    "local-C96": dict(c1=96, cout=96),
    "fusion-C64": dict(c1=64, c2=64, cout=64),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_low_precision(device, dtype, case):
    skip_bf16_before_sm80(device, dtype)
    i = list(LOW_PRECISION_CASES).index(case)
    check(make_args(device, dtype, seed=i, **variant(i, heavy=True), **LOW_PRECISION_CASES[case]),
          dtype)


def _base_args():
    return make_args("cpu", torch.float32, b=2, size=(5, 6), layout="nhwc", packing="plain",
                     c1=4, c2=4, cout=8, stride=2)


BAD_INPUTS = {
    "x-3d": (dict(x=torch.zeros(2, 4, 5)), "x must be"),
    "x2-size": (dict(x2=torch.zeros(2, 4, 5, 5)), "x2 must be"),
    "x2-batch": (dict(x2=torch.zeros(3, 4, 5, 6)), "x2 must be"),
    "weight-cin": (dict(weight=torch.zeros(8, 4, 3, 3)), r"weight must be \[Cout, C1 \+ C2, 3, 3\]"),
    "weight-5x5": (dict(weight=torch.zeros(8, 8, 5, 5)), "weight must be"),
    "weight-2d": (dict(weight=torch.zeros(8, 72)), "weight must be"),
    "bias": (dict(bias=torch.zeros(4)), "bias must be"),
    "bias-strided": (dict(bias=with_stride_2(torch.zeros(8))), "bias must have unit stride"),
    "stride-0": (dict(stride=0), "stride must be"),
    "act-name": (dict(act="gelu"), "act must be one of"),
    "dilation-0": (dict(dilation=0), "dilation must be a positive int"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise(case):
    changes, message = BAD_INPUTS[case]
    check_rejected(conv3x3, why_unsupported, replace_args(conv3x3, _base_args(), **changes), message)


def test_why_unsupported():
    assert why_unsupported(*_base_args()) is None
    # int32 offsets (meta tensors: shapes only, no memory): 3 input samples of 2**30 elements
    # (3 * 2**30 in all) are launched in chunks; an output sample of 2**32 cannot be
    x = torch.empty(3, 1, 2 ** 15, 2 ** 15, device="meta")
    assert why_unsupported(x, torch.empty(4, 1, 3, 3, device="meta"), None, None, 2) is None
    reason = why_unsupported(x, torch.empty(16, 1, 3, 3, device="meta"), None, None, 2)
    assert reason is not None and "2**31" in reason


def test_launch_records():
    """A dry run records the launch (the AOT compile test enumerates configurations from
    these); absent tensors are constexpr None, so the kernel specialises them away."""
    args = make_args("cpu", torch.bfloat16, b=2, size=(32, 32), layout="nchw", packing="plain",
                     c1=3, cout=16, bias=False, stride=2)
    record, signature, meta = dry_run_launch(conv3x3, args, "_conv3x3_kernel")
    assert signature["x2_ptr"] == signature["bias_ptr"] == "constexpr"
    assert signature["x_ptr"] == signature["out_ptr"] == "*bf16"
    assert meta["ACT"] == "silu" and meta["BLOCK_M"] == 128 and meta["BLOCK_N"] == 16
    assert record.grid == (4,)  # 2 * 16 * 16 output pixels = 4 row tiles of 128
