"""The Triton pointwise_conv (1x1 conv GEMM + norm prologue + bias/act/residual epilogue)
against the float64 reference, at every distinct channel configuration of the 15 models."""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICES
from kernel_utils import (check_op, check_rejected, dry_run_launch, other_layout, random_map,
                          random_vector, random_weight, replace_args, skip_bf16_before_sm80,
                          variant, with_stride_2)
from mvit3.kernels.pointwise_conv import pointwise_conv, why_unsupported
from mvit3.models import CONFIGS
from mvit3.ops import reference
from shapes import mv2_blocks, v1_attention

# Max |kernel - reference| / max |reference|, the reference in float64 on float64 copies.
# fp32: the kernel sums K <= 1024 products in fp32 in another order than float64; rounding
#   grows like sqrt(K) * 2**-24 of sum |a*w|, under 1e-5 of the output scale here, while
#   an indexing or masking bug is O(1). 1e-4 leaves headroom for the silu/norm arithmetic.
# fp16, bf16 (unit roundoff u = 2**-11 = 4.9e-4, 2**-8 = 3.9e-3): the output, and on a
#   GPU the normalised A tile, are rounded to the I/O dtype, each <= u of the scale;
#   products and sums stay fp32. The interpreter converts fp32 to bf16 by truncation (up
#   to 2u); GPUs round to nearest. 5u: 3-6x the largest error seen over these tests.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}


def make_args(device, dtype, b, size, layout, packing, c1, cout, c2=0, bias=True,
              residual=False, norm="none", affine=True, act="none", seed=0):
    """Positional arguments of pointwise_conv; x2 and residual use other layouts than x."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    other = other_layout(layout)
    x = random_map(gen, b, c1, h, w, layout, dtype, device)
    x2 = random_map(gen, b, c2, h, w, other, dtype, device) if c2 else None
    weight = random_weight(gen, cout, c1 + c2, packing, dtype, device)
    bias_t = random_vector(gen, cout, dtype, device) if bias else None
    res = random_map(gen, b, cout, h, w, other, dtype, device) if residual else None
    with_affine = norm != "none" and affine
    norm_w = random_vector(gen, c1, dtype, device, mean=1.0) if with_affine else None
    norm_b = random_vector(gen, c1, dtype, device) if with_affine else None
    return (x, weight, bias_t, x2, res, norm, norm_w, norm_b, 1e-5, act)


def check(args, dtype=torch.float32):
    check_op(pointwise_conv, reference.pointwise_conv, args, dtype, TOLERANCE[dtype])


def _v1_style_stages():
    """Distinct (d, C, version) of the v1-style MobileViT blocks."""
    return sorted({(s.attn_dim, s.channels, c.version) for c in CONFIGS.values() if c.style == "v1"
                   for s in c.stages})


def _v2_style_stages():
    """Distinct (d, C, version) of the v2-style blocks."""
    return sorted({(s.attn_dim, s.channels, c.version) for c in CONFIGS.values() if c.style == "v2"
                   for s in c.stages})


MV2_EXPAND = sorted({(cin, hidden) for cin, hidden, _, _ in mv2_blocks()})
LN_PROJECTIONS = ([("qkv", d, 3 * d, "none") for d, _, _ in v1_attention()]
                  + [("conv_proj", d, c, "silu") for d, c, _ in _v1_style_stages()])
V3_FUSIONS = sorted({(d, c) for d, c, version in _v1_style_stages() if version == "v3"})
HEADS = sorted({(c.stages[-1].channels, c.exp_channels) for c in CONFIGS.values() if c.exp_channels})


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, cin, hidden", [(i, *ch) for i, ch in enumerate(MV2_EXPAND)],
                         ids=[f"{cin}to{h}" for cin, h in MV2_EXPAND])
def test_mv2_expand(device, i, cin, hidden):
    """MV2 expand 1x1 with folded BN and SiLU."""
    check(make_args(device, torch.float32, c1=cin, cout=hidden, act="silu", seed=i,
                    **variant(i, heavy=hidden > 256)))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, use, d, cout, act", [(i, *p) for i, p in enumerate(LN_PROJECTIONS)],
                         ids=[f"{u}-{d}to{c}" for u, d, c, _ in LN_PROJECTIONS])
def test_layer_norm_projection(device, i, use, d, cout, act):
    """LayerNorm over each pixel's channels + qkv projection (3d) or + conv_proj (SiLU)."""
    check(make_args(device, torch.float32, c1=d, cout=cout, norm="layer", act=act, seed=i,
                    **variant(i, heavy=cout > 256)))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, d, c", [(i, *p) for i, p in enumerate(V3_FUSIONS)],
                         ids=[f"d{d}-C{c}" for d, c in V3_FUSIONS])
def test_v3_fusion(device, i, d, c):
    """MobileViTv3 fusion: cat(local [d], global [C]) -> C, SiLU, + block input."""
    check(make_args(device, torch.float32, c1=d, c2=c, cout=c, residual=True, act="silu",
                    seed=i, **variant(i, heavy=c > 128)))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, d, c, version", [(i, *p) for i, p in enumerate(_v2_style_stages())],
                         ids=[f"{v}-d{d}-C{c}" for d, c, v in _v2_style_stages()])
def test_group_norm_projection(device, i, d, c, version):
    """conv_proj after the final GroupNorm(1): v3 = cat(norm(global), local) + block input,
    v2 = global only. Batch 3 on odd maps puts sample boundaries inside pixel tiles."""
    v3 = version == "v3"
    check(make_args(device, torch.float32, c1=d, c2=d if v3 else 0, cout=c, residual=v3,
                    norm="group", seed=i, **{**variant(i), "b": 3 if c <= 256 else 1}))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, c5, exp", [(i, *p) for i, p in enumerate(HEADS)],
                         ids=[f"{c5}to{e}" for c5, e in HEADS])
def test_head(device, i, c5, exp):
    """conv_1x1_exp of the v1-style heads (up to 960 outputs), SiLU."""
    check(make_args(device, torch.float32, c1=c5, cout=exp, act="silu", seed=i,
                    **variant(i, heavy=True)))


REAL_SIZE_CASES = {
    "mv2-expand-64to256": dict(c1=64, cout=256, act="silu"),
    "ln-qkv-64": dict(c1=64, cout=192, norm="layer"),
    "v3-fusion-d64-C64": dict(c1=64, c2=64, cout=64, residual=True, act="silu"),
    "v3-group-proj-d64-C128-b2": dict(c1=64, c2=64, cout=128, residual=True, norm="group", b=2),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", REAL_SIZE_CASES)
def test_real_size(device, case):
    """32x32: the layer_3 map size at 256 px (16 row tiles per sample)."""
    kw = {**dict(b=1, size=(32, 32), layout="nhwc", packing="kmajor"), **REAL_SIZE_CASES[case]}
    check(make_args(device, torch.float32, **kw))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("norm", ("none", "layer", "group"))
@pytest.mark.parametrize("act", ("none", "silu"))
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("c2", (0, 40), ids=("x", "x+x2"))
@pytest.mark.parametrize("residual", (False, True), ids=("nores", "res"))
def test_option_matrix(device, norm, act, bias, c2, residual):
    """Every combination of the optional parts on one small odd-sized batch-3 problem."""
    i = ("none", "layer", "group").index(norm) + 3 * bool(c2) + 6 * residual
    kw = {**variant(i), "b": 3, "size": (5, 9)}
    check(make_args(device, torch.float32, c1=24, c2=c2, cout=48, bias=bias, residual=residual,
                    norm=norm, act=act, seed=i, **kw))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("norm", ("layer", "group"))
def test_norm_without_affine(device, norm):
    check(make_args(device, torch.float32, b=3, size=(7, 7), layout="nhwc", packing="plain",
                    c1=40, cout=24, norm=norm, affine=False))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
def test_layer_norm_statistics_are_stable(device, dtype):
    """With channel values around 100 and unit spread, E[x^2] - E[x]^2 in fp32 would lose the
    variance to cancellation (~1e4 * 2**-24 relative). fp32: Chan's merge of per-chunk
    statistics (two-pass path); fp16 on sm_90: mean, then the centred sum of squares, over the
    whole rows in registers (ROW_K path)."""
    args = make_args(device, dtype, b=1, size=(5, 9), layout="nhwc", packing="kmajor",
                     c1=96, cout=32, norm="layer")
    check(((args[0].float() + 100.0).to(dtype),) + args[1:], dtype)


LOW_PRECISION_CASES = {
    "ln-qkv-144": dict(c1=144, cout=432, norm="layer"),
    "mv2-expand-64to256": dict(c1=64, cout=256, act="silu"),
    "v3-fusion-d120-C160": dict(c1=120, c2=160, cout=160, residual=True, act="silu"),
    "v3-group-proj-d96-C192": dict(c1=96, c2=96, cout=192, residual=True, norm="group"),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_low_precision(device, dtype, case):
    skip_bf16_before_sm80(device, dtype)
    i = list(LOW_PRECISION_CASES).index(case)
    check(make_args(device, dtype, seed=i, **variant(i), **LOW_PRECISION_CASES[case]), dtype)


def _base_args():
    return make_args("cpu", torch.float32, b=2, size=(4, 6), layout="nhwc", packing="plain",
                     c1=8, c2=4, cout=16, residual=True, norm="layer")


BAD_INPUTS = {
    "x-3d": (dict(x=torch.zeros(2, 8, 4)), "x must be"),
    "x2-size": (dict(x2=torch.zeros(2, 4, 4, 5)), "x2 must be"),
    "x2-batch": (dict(x2=torch.zeros(1, 4, 4, 6)), "x2 must be"),
    "weight-k": (dict(weight=torch.zeros(16, 8)), r"weight must be \[Cout, C1 \+ C2\]"),
    "weight-3d": (dict(weight=torch.zeros(16, 12, 1)), "weight must be"),
    "bias": (dict(bias=torch.zeros(15)), "bias must be"),
    "residual": (dict(residual=torch.zeros(2, 16, 4, 5)), "residual must be"),
    "norm-weight": (dict(norm_weight=torch.zeros(12)), "norm_weight must be"),
    "norm-weight-strided": (dict(norm_weight=with_stride_2(torch.zeros(8))),
                            "norm_weight must have unit stride"),
    "norm-name": (dict(norm="batch"), "norm must be one of"),
    "act-name": (dict(act="relu"), "act must be one of"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise(case):
    changes, message = BAD_INPUTS[case]
    check_rejected(pointwise_conv, why_unsupported,
                   replace_args(pointwise_conv, _base_args(), **changes), message)


def test_why_unsupported():
    assert why_unsupported(*_base_args()) is None
    # int32 offsets: a map of 2**31 elements (meta tensors: shapes only, no memory)
    x = torch.empty(1, 8, 2 ** 14, 2 ** 14, device="meta")
    reason = why_unsupported(x, torch.empty(8, 8, device="meta"))
    assert reason is not None and "2**31" in reason


# (dtype, x's layout, weight packing, C1, C2, Cout, VEC): x2 takes the next layout (a channel
# slice of a map with 6 channels more: pixel stride C2 + 6)
CHANNEL_VECTORS = [
    (torch.float16, "nhwc", "kmajor", 96, 0, 288, 1),   # all multiples of 16: Triton sees them
    (torch.float16, "nhwc", "kmajor", 120, 0, 360, 8),  # v3-XS layer_4's LayerNorm + qkv
    (torch.float32, "nhwc", "kmajor", 120, 0, 360, 4),
    (torch.float16, "nhwc", "kmajor", 120, 0, 36, 4),   # 36 output channels
    (torch.float16, "nhwc", "kmajor", 120, 10, 48, 2),  # x2's 10 channels in 16-channel pixels
    (torch.float16, "slice", "kmajor", 120, 0, 48, 2),  # 126-channel pixels
    (torch.float16, "nchw", "kmajor", 120, 0, 48, 1),   # no channel vectors
    (torch.float16, "nhwc", "plain", 120, 0, 48, 1),    # weight rows of K stride 1
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype, layout, packing, c1, c2, cout, vec", CHANNEL_VECTORS)
def test_channel_vectors(device, dtype, layout, packing, c1, c2, cout, vec):
    """VEC, the channel vector the kernel is promised (`divisibility_hint`), is the most that
    divides C1, C2, Cout, the maps' strides and the weight's K stride (a wrong promise would load
    across pixels or rows on a GPU), or 1 where Triton's specialisation sees 16 itself, and the
    result is the op's with it."""
    args = make_args(device, dtype, b=2, size=(5, 9), layout=layout, packing=packing, c1=c1,
                     c2=c2, cout=cout, norm="layer")
    _, _, meta = dry_run_launch(pointwise_conv, args, "_pointwise_conv_kernel")
    assert meta["VEC"] == vec
    check(args, dtype)


@pytest.mark.parametrize("norm, launches", [("none", 1), ("layer", 1), ("group", 2)])
def test_launch_records(norm, launches):
    """A dry run records every launch (the AOT compile test enumerates configurations from
    these); absent tensors are constexpr None, so the kernel specialises them away."""
    args = make_args("cpu", torch.float16, b=1, size=(8, 8), layout="nhwc", packing="kmajor",
                     c1=96, cout=288, norm=norm)
    record, signature, meta = dry_run_launch(pointwise_conv, args, "_pointwise_conv_kernel", launches)
    assert signature["x2_ptr"] == signature["res_ptr"] == "constexpr"
    assert signature["x_ptr"] == signature["out_ptr"] == "*fp16"
    assert signature["stats_ptr"] == ("*fp32" if norm == "group" else "constexpr")
    assert meta["NORM"] == norm and meta["BLOCK_N"] == 128 and meta["num_warps"] == 4
    # a grid this small takes the shortest row tiles: 64 pixels = 4 tiles of 16 rows,
    # 288 channels = 3 column tiles; 16-bit LayerNorm on sm_90 reads whole rows (96 -> 128)
    assert meta["BLOCK_M"] == 16 and record.grid == (12,)
    assert meta["ROW_K"] == (128 if norm == "layer" else 0)
    assert record.work.serial_steps == (1 if norm == "layer" else 2)  # 96 channels, 64 a step
