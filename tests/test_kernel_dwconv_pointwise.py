"""The Triton dwconv_pointwise (depthwise 3x3 + SiLU made on chip, fed into a 1x1 GEMM)
against the float64 reference, at every distinct channel configuration of the 15 models, and
dilated as in the v2-style dense backbones; with the MV2 expansion recomputed per tap (the
whole block in one launch), its cost model's decisions, and the unfused fallback."""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICES
from kernel_utils import (check_op, check_rejected, dry_run_launch, other_layout, random_map,
                          random_vector, random_weight, replace_args, skip_bf16_before_sm80,
                          variant, with_stride_2)
import mvit3.ops
from mvit3.kernels import _common
from mvit3.kernels.dwconv_pointwise import dwconv_pointwise, fuse_expand, why_unsupported
from mvit3.models import CONFIGS, make_divisible
from mvit3.ops import reference
from shapes import mv2_blocks

# Max |kernel - reference| / max |reference|, the reference in float64 on float64 copies.
# fp32: nine depthwise taps, then K <= 1024 products, summed in fp32 in another order than
#   float64: rounding ~ sqrt(K) * 2**-24 of the scale, under 1e-5 here, while a wrong tap,
#   border or stride is O(1e-1) or worse. 1e-4 leaves headroom for SiLU's exp.
# fp16, bf16 (unit roundoff u = 2**-11 = 4.9e-4, 2**-8 = 3.9e-3): the output, and on a
#   GPU the hidden tile, are rounded to the I/O dtype, each <= u of the scale; products
#   and sums stay fp32. The interpreter converts fp32 to bf16 by truncation (up to 2u);
#   GPUs round to nearest. 5u: 3-6x the largest error seen over these tests.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}


def make_args(device, dtype, b, size, layout, packing, hidden, cout, stride=1, dw_bias=True,
              bias=True, residual=False, seed=0, dilation=1, cin=None):
    """Positional arguments of dwconv_pointwise; the residual uses another layout than x.
    With cin, x is a block input [B, cin, H, W] and the expansion cin -> hidden is given."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    x = random_map(gen, b, cin or hidden, h, w, layout, dtype, device)
    # expand bias around 1: silu(bias) is far from 0, so a tap outside the map that took it
    # instead of the zero padding would be seen
    expand = ((random_weight(gen, hidden, cin, packing, dtype, device),
               random_vector(gen, hidden, dtype, device, mean=1.0)) if cin else (None, None))
    # depthwise taps N(0, 1/9): the hidden values stay O(1) before SiLU
    dw_weight = (torch.randn(hidden, 1, 3, 3, generator=gen) / 3).to(device, dtype)
    dw_bias_t = random_vector(gen, hidden, dtype, device) if dw_bias else None
    weight = random_weight(gen, cout, hidden, packing, dtype, device)
    bias_t = random_vector(gen, cout, dtype, device) if bias else None
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    other = other_layout(layout)
    res = random_map(gen, b, cout, h_out, w_out, other, dtype, device) if residual else None
    return (x, dw_weight, dw_bias_t, weight, bias_t, stride, res, dilation, *expand)


def check(args, dtype=torch.float32):
    check_op(dwconv_pointwise, reference.dwconv_pointwise, args, dtype, TOLERANCE[dtype])


# MV2 dw 3x3 + reduce 1x1: (hidden, out, stride, residual when stride 1 and in == out)
MV2_REDUCE = sorted({(hidden, out, stride, stride == 1 and cin == out)
                     for cin, hidden, out, stride in mv2_blocks()})
# local representation of v3 (v1-style) and v2-style blocks: dw 3x3 on C + 1x1 C -> d, no bias
LOCAL_REPS = sorted({(s.channels, s.attn_dim) for c in CONFIGS.values()
                     if c.version == "v3" or c.style == "v2" for s in c.stages})


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, hidden, cout, stride, residual",
                         [(i, *p) for i, p in enumerate(MV2_REDUCE)],
                         ids=[f"{h}to{o}-s{s}{'-res' if r else ''}" for h, o, s, r in MV2_REDUCE])
def test_mv2_dw_reduce(device, i, hidden, cout, stride, residual):
    """MV2 second half: dw 3x3 (+BN, SiLU) + reduce 1x1 (+BN) [+ block input]."""
    check(make_args(device, torch.float32, hidden=hidden, cout=cout, stride=stride,
                    residual=residual, seed=i, **variant(i, heavy=hidden >= 256)))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("i, c, d", [(i, *p) for i, p in enumerate(LOCAL_REPS)],
                         ids=[f"C{c}-d{d}" for c, d in LOCAL_REPS])
def test_local_representation(device, i, c, d):
    """MobileViT v2/v3 local_rep: dw 3x3 (+BN, SiLU) + 1x1 C -> d without bias."""
    check(make_args(device, torch.float32, hidden=c, cout=d, bias=False, seed=i,
                    **variant(i, heavy=c >= 256)))


REAL_SIZE_CASES = {
    "mv2-48to64-s2-64x64": dict(hidden=48, cout=64, stride=2, size=(64, 64)),
    "mv2-48to24-s1-res-32x32": dict(hidden=48, cout=24, residual=True, size=(32, 32)),
    "local-C64-d64-32x32": dict(hidden=64, cout=64, bias=False, size=(32, 32)),
    "mv2-32to24-s2-63x63": dict(hidden=32, cout=24, stride=2, size=(63, 63)),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", REAL_SIZE_CASES)
def test_real_size(device, case):
    """Maps of layer_2/layer_3 at 256 px (32x32 out: 16 row tiles); 63 -> 32 has odd borders."""
    check(make_args(device, torch.float32, b=1, layout="nhwc", packing="kmajor",
                    **REAL_SIZE_CASES[case]))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("dw_bias", (False, True), ids=("no-dw-bias", "dw-bias"))
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("residual", (False, True), ids=("nores", "res"))
def test_option_matrix(device, stride, dw_bias, bias, residual):
    """Every combination of the optional parts and both strides on a small batch-3 problem."""
    i = stride + 2 * dw_bias + 4 * bias + 8 * residual
    kw = {**variant(i), "b": 3, "size": (5, 9)}
    check(make_args(device, torch.float32, hidden=40, cout=24, stride=stride, dw_bias=dw_bias,
                    bias=bias, residual=residual, seed=i, **kw))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("stride", (3, 4))
def test_other_strides(device, stride):
    """Stride is a runtime argument: any stride >= 1 is computed exactly (why_unsupported
    names no stride limit)."""
    check(make_args(device, torch.float32, b=2, size=(11, 9), layout="nhwc", packing="kmajor",
                    hidden=24, cout=16, stride=stride))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dilation", (1, 2, 4))
@pytest.mark.parametrize("stride", (1, 2))
def test_dilation(device, dilation, stride):
    """Padding = dilation on odd maps, some smaller than the dilated window (a tap can fall off
    both borders), with the residual at stride 1 as in a dilated MV2 block of layer_5 (OS 8)."""
    i = dilation + stride
    kw = {**variant(i), "b": 2, "size": ((7, 5), (9, 11), (5, 13))[i % 3]}
    check(make_args(device, torch.float32, hidden=40, cout=24, stride=stride, residual=stride == 1,
                    dilation=dilation, seed=i, **kw))


LOW_PRECISION_CASES = {
    "mv2-128to64-s1-res": dict(hidden=128, cout=64, residual=True),
    "mv2-384to160-s2": dict(hidden=384, cout=160, stride=2),
    "local-C160-d144": dict(hidden=160, cout=144, bias=False),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_low_precision(device, dtype, case):
    skip_bf16_before_sm80(device, dtype)
    i = list(LOW_PRECISION_CASES).index(case)
    check(make_args(device, dtype, seed=i, **variant(i), **LOW_PRECISION_CASES[case]), dtype)


def _base_args():
    return make_args("cpu", torch.float32, b=2, size=(5, 6), layout="nhwc", packing="plain",
                     hidden=8, cout=16, stride=2, residual=True)


BAD_INPUTS = {
    "x-3d": (dict(x=torch.zeros(2, 8, 5)), "x must be"),
    "dw-weight-channels": (dict(dw_weight=torch.zeros(7, 1, 3, 3)), "dw_weight must be"),
    "dw-weight-5x5": (dict(dw_weight=torch.zeros(8, 1, 5, 5)), "dw_weight must be"),
    "dw-bias": (dict(dw_bias=torch.zeros(9)), "dw_bias must be"),
    "weight-k": (dict(weight=torch.zeros(16, 9)), r"weight must be \[Cout, Ch\]"),
    "bias": (dict(bias=torch.zeros(8)), "bias must be"),
    "dw-bias-strided": (dict(dw_bias=with_stride_2(torch.zeros(8))), "dw_bias must have unit stride"),
    "stride-0": (dict(stride=0), "stride must be"),
    "dilation-0": (dict(dilation=0), "dilation must be a positive int"),
    "residual-size": (dict(residual=torch.zeros(2, 16, 5, 6)), "residual must be"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise(case):
    changes, message = BAD_INPUTS[case]
    check_rejected(dwconv_pointwise, why_unsupported,
                   replace_args(dwconv_pointwise, _base_args(), **changes), message)


def test_why_unsupported():
    assert why_unsupported(*_base_args()) is None
    # int32 offsets: a map of 2**31 elements (meta tensors: shapes only, no memory)
    x = torch.empty(1, 8, 2 ** 14, 2 ** 14, device="meta")
    reason = why_unsupported(x, torch.empty(8, 1, 3, 3, device="meta"), None,
                             torch.empty(4, 8, device="meta"), None, 2)
    assert reason is not None and "2**31" in reason


def test_launch_records():
    """A dry run records the launch (the AOT compile test enumerates configurations from
    these); absent tensors are constexpr None, so the kernel specialises them away."""
    args = make_args("cpu", torch.float32, b=2, size=(16, 16), layout="nhwc", packing="kmajor",
                     hidden=256, cout=160, stride=2, bias=False)
    record, signature, meta = dry_run_launch(dwconv_pointwise, args, "_dwconv_pointwise_kernel")
    assert signature["bias_ptr"] == signature["res_ptr"] == "constexpr"
    assert signature["x_ptr"] == signature["dw_b_ptr"] == signature["out_ptr"] == "*fp32"
    assert meta["BLOCK_N"] == 128 and meta["BLOCK_K"] == 16
    # 2 * 8 * 8 pixels = 2 row tiles, 160 channels = 2 column tiles: 4 tiles, each split over 8
    # programs that take 2 of the 16 hidden blocks, then one merge step for the 8 partials
    assert record.grid == (4, 8) and meta["SPLIT_K"] == 8
    assert signature["partials_ptr"] == "*fp32" and record.work.serial_steps == 2 + 2
    # with the expansion (32 -> 256, fp16): a small grid takes 16-row tiles (16 of them) with 32
    # hidden channels a K step; each step walks the 9 taps, Cin in one step (padded to 64); 8
    # programs a tile take one step each
    expanded = make_args("cpu", torch.float16, b=2, size=(16, 16), layout="nhwc",
                         packing="kmajor", hidden=256, cout=160, stride=2, bias=False, cin=32)
    record, signature, meta = dry_run_launch(dwconv_pointwise, expanded, "_dwconv_pointwise_kernel")
    assert signature["ew_ptr"] == signature["eb_ptr"] == "*fp16"
    assert (meta["BLOCK_M"], meta["BLOCK_K"], meta["BLOCK_C"]) == (16, 32, 64)
    assert record.grid == (16, 8) and record.work.serial_steps == 9 + 2
    # a grid of TARGET_PROGRAMS keeps the 64 x 16 tiles (fp16: fused at batch 64 too), unsplit
    large = make_args("cpu", torch.float16, b=64, size=(16, 16), layout="nhwc", packing="kmajor",
                      hidden=256, cout=160, stride=2, bias=False, cin=32)
    record, signature, meta = dry_run_launch(dwconv_pointwise, large, "_dwconv_pointwise_kernel")
    assert (meta["BLOCK_M"], meta["BLOCK_K"]) == (64, 16) and record.grid == (128,)
    assert meta["SPLIT_K"] == 1 and signature["partials_ptr"] == signature["counters_ptr"] == "constexpr"
    # v3-XXS's layer_5.0 at batch 100 (64 -> 256 -> 80, stride 2 to 8 x 8): 100 programs of 64
    # rows, more than half of TARGET_PROGRAMS, so sm_90 keeps its wgmma tiles
    xxs = make_args("cpu", torch.float16, b=100, size=(16, 16), layout="nhwc", packing="kmajor",
                    hidden=256, cout=80, stride=2, bias=True, cin=64)
    assert fuse_expand(100, (16, 16), (8, 8), 64, 256, 80, False, torch.float16, 90)
    record, _, meta = dry_run_launch(dwconv_pointwise, xxs, "_dwconv_pointwise_kernel")
    assert meta["BLOCK_M"] == _common.WGMMA_ROWS and record.grid == (100,)


# (batch, size, hidden, cout, cin, dtype, splits): small grids whose K loop is split: even and
# uneven shares (170 hidden channels = 11 blocks of 16, the last partly masked, in 4 shares of
# 3, 3, 3, 2), the fused expansion, and XS's layer_5.0 at batch 1 (10 shares)
SPLIT_CASES = {
    "256-even-fp32": (2, (16, 16), 256, 160, None, torch.float32, 8),
    "170-uneven-fp32": (1, (9, 7), 170, 48, None, torch.float32, 4),
    "expand-fp16": (1, (11, 10), 256, 80, 32, torch.float16, 8),
    "xs-layer5.0-fp16": (1, (16, 16), 640, 160, 160, torch.float16, 10),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_k(device, case):
    """Programs sharing a tile's K loop (a small grid at batch 1): the merged sum against
    float64, the launch split as `k_splits` says, and every counter back at 0 afterwards (the
    next launch, or a CUDA-graph replay, starts from zero)."""
    b, size, hidden, cout, cin, dtype, splits = SPLIT_CASES[case]
    args = make_args(device, dtype, b, size, "nhwc", "kmajor", hidden, cout, stride=2,
                     residual=True, seed=7, cin=cin)
    with _common.launch_log() as log:
        check(args, dtype)
    record = log.records[-1]
    assert record.grid[1:] == (splits,) and dict(record.constexprs)["SPLIT_K"] == splits
    assert _common.split_counters(args[0].device, 1).count_nonzero().item() == 0


def test_split_k_choice():
    """k_splits: no split on a grid of more than TARGET_PROGRAMS / 2 tiles or a short loop;
    else the shortest chain (share + merge), the fewest programs for it, no empty share."""
    from mvit3.kernel_report.report import LONG_SERIAL_LOOP
    assert _common.LONG_LOOP == LONG_SERIAL_LOOP  # splits what the report calls serial-bound
    half = _common.TARGET_PROGRAMS // 2
    assert _common.k_splits(half + 1, 100) == 1 and _common.k_splits(4, 8) == 1
    assert _common.k_splits(half, 12) == 2  # 6 steps + 1 merge, on 128 programs
    assert _common.k_splits(8, 20, 18) == 10  # XS layer_5.0 fused: 2 x 18 + 3 (not 16 x 20)
    assert _common.split_k_steps(20, 18, 10) == 39
    assert _common.k_splits(2, 40) == 8  # 5 + 2; 16 shares would be 3 + 4
    assert _common.k_splits(1, 11) == 4  # shares of 3, 3, 3, 2 (+1): 4 steps


# ---- the whole MV2 block: the expansion recomputed per depthwise tap ---------------------------

# (cin, hidden, cout, stride, residual, dtype, batch, size, layout): XS's blocks and a v2-style
# one with Cin = 80 (two 64-channel BLOCK_C steps, the second partly masked); odd sizes, both
# strides, batch 1 and 2, NCHW / channels_last / channel slices, fp16 and bf16 (fp32 never
# fuses: test_cost_model_decisions_xs).
EXPAND_CASES = {
    "16to64to32-s1-fp16": (16, 64, 32, 1, False, torch.float16, 2, (7, 9), "nchw"),
    "32to128to48-s2-bf16": (32, 128, 48, 2, False, torch.bfloat16, 1, (9, 8), "nhwc"),
    "48to192to48-s1-res-fp16": (48, 192, 48, 1, True, torch.float16, 2, (5, 7), "nhwc"),
    "64to256to80-s2-fp16": (64, 256, 80, 2, False, torch.float16, 1, (7, 7), "slice"),
    "24to48to24-s1-res-bf16": (24, 48, 24, 1, True, torch.bfloat16, 1, (6, 5), "nchw"),
    "80to160to128-s2-bf16": (80, 160, 128, 2, False, torch.bfloat16, 2, (5, 9), "nhwc"),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", EXPAND_CASES)
def test_expand_fused(device, case):
    """expand 1x1 + SiLU, dw 3x3 + SiLU, reduce 1x1 [+ x] in one launch against float64: the
    hidden map's zero padding (the expand bias is ~1, silu(1) = 0.73 where a border tap would
    wrongly take it), strides, odd borders, row tiles straddling samples."""
    cin, hidden, cout, stride, residual, dtype, b, size, layout = EXPAND_CASES[case]
    skip_bf16_before_sm80(device, dtype)
    i = list(EXPAND_CASES).index(case)
    args = make_args(device, dtype, b, size, layout, ("kmajor", "plain")[i % 2], hidden, cout,
                     stride=stride, residual=residual, seed=i, cin=cin)
    assert fuse_expand(b, size, ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1), cin,
                       hidden, cout, residual, dtype, _common.target_arch(args[0]))
    with _common.launch_log() as log:
        check(args, dtype)
    assert [record.name for record in log.records] == ["_dwconv_pointwise_kernel"]
    assert dict(log.records[0].signature)["ew_ptr"] != "constexpr"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_expand_dilated(device):
    """A dilated MV2 block (the dense backbones' layers past their output stride), fused."""
    check(make_args(device, torch.float16, b=2, size=(7, 5), layout="nhwc", packing="kmajor",
                    hidden=64, cout=32, residual=False, dilation=2, cin=32), torch.float16)


def test_expand_unfused_fallback():
    """Where the cost model keeps the hidden map (fp32 stride 1 at 64 x 64: the expansion
    recomputed 9 times on the FMA units), the op is pointwise_conv's launch then this
    kernel's, and computes the same."""
    args = make_args("cpu", torch.float32, b=1, size=(64, 64), layout="nhwc", packing="kmajor",
                     hidden=192, cout=48, residual=True, cin=48)
    assert not fuse_expand(1, (64, 64), (64, 64), 48, 192, 48, True, torch.float32, 90)
    with _common.launch_log(dry_run=True) as log:
        dwconv_pointwise(*args)
    assert [r.name for r in log.records] == ["_pointwise_conv_kernel", "_dwconv_pointwise_kernel"]
    assert dict(log.records[1].signature)["ew_ptr"] == "constexpr"
    small = make_args("cpu", torch.float32, b=1, size=(16, 17), layout="nhwc", packing="kmajor",
                      hidden=192, cout=48, residual=True, cin=48)
    with _common.compile_target(75):  # the RTX 2080 Ti's 13.4 fp32 TFLOP/s: kept at 16 x 17
        assert not fuse_expand(1, (16, 17), (16, 17), 48, 192, 48, True, torch.float32, 75)
        with _common.launch_log() as log:
            check(small)
    assert [r.name for r in log.records] == ["_pointwise_conv_kernel", "_dwconv_pointwise_kernel"]


def _xs_mv2_blocks(img: int = 256) -> list:
    """(name, cin, hidden, cout, stride, input size) of mobilevitv3_xs's MV2 blocks."""
    c = CONFIGS["mobilevitv3_xs"]
    plan = [("layer_1.0", c.stem_channels, c.layer1_channels, 1)]
    plan += [(f"layer_2.{i}", c.layer1_channels if i == 0 else c.layer2_channels, c.layer2_channels,
              2 if i == 0 else 1) for i in range(c.layer2_blocks)]
    prev = c.layer2_channels
    for index, s in enumerate(c.stages, start=3):
        plan.append((f"layer_{index}.0", prev, s.channels, 2))
        prev = s.channels
    size, blocks = img // 2, []
    for name, cin, cout, stride in plan:
        blocks.append((name, cin, make_divisible(int(round(cin * c.mv2_expand)), 8), cout, stride,
                       size))
        size = (size - 1) // stride + 1
    return blocks


# The blocks of mobilevitv3_xs at 256 px that fuse, per (arch, batch, dtype), at the ceilings of
# the H200 (sm_90: 4.8 TB/s, 989 TFLOP/s fp16 tensor, 66.9 fp32) and the A100 (sm_80: 2.0 TB/s,
# 312, 19.5). At batch 1 a launch (2 us) outweighs every 16-bit block's recomputation on tensor
# cores. At batch 100 the stride-1 blocks of 192 hidden channels (layer_2.1/2.2) no longer pay.
# fp32 never fuses (its FMA form spills on sm_80/sm_90).
ALL_XS = {"layer_1.0", "layer_2.0", "layer_2.1", "layer_2.2", "layer_3.0", "layer_4.0", "layer_5.0"}
FUSED_XS = {
    (90, 1, torch.float16): ALL_XS,
    (90, 100, torch.float16): ALL_XS - {"layer_2.1", "layer_2.2"},
    (90, 1, torch.float32): set(),
    (90, 100, torch.float32): set(),
    (80, 1, torch.float16): ALL_XS,
    (80, 100, torch.float16): ALL_XS - {"layer_2.1", "layer_2.2", "layer_5.0"},
    (80, 1, torch.float32): set(),
}


def _fused_xs_blocks(arch: int, batch: int, dtype: torch.dtype) -> set:
    return {name for name, cin, hidden, cout, stride, size in _xs_mv2_blocks()
            if fuse_expand(batch, (size, size), ((size - 1) // stride + 1,) * 2, cin, hidden, cout,
                           stride == 1 and cin == cout, dtype, arch)}


@pytest.mark.parametrize("arch, batch, dtype", FUSED_XS,
                         ids=[f"sm{a}-b{b}-{str(d)[6:]}" for a, b, d in FUSED_XS])
def test_cost_model_decisions_xs(arch, batch, dtype):
    assert {name for name, *_ in _xs_mv2_blocks()} == ALL_XS
    assert _fused_xs_blocks(arch, batch, dtype) == FUSED_XS[arch, batch, dtype]


def test_fast_model_launches_follow_the_cost_model():
    """mobilevitv3_xs at batch 1 (dry run, sm_90): each MV2 block's depthwise launch takes the
    expand weights where the cost model fuses (fp16: all seven; fp32: the stride-2 ones), and
    is otherwise preceded by the expansion's pointwise_conv launch writing its input."""
    import mvit3.fast

    for dtype in (torch.float16, torch.float32):
        model = mvit3.fast.create_model("mobilevitv3_xs", backend="triton").to(dtype).eval()
        x = torch.zeros(1, 3, 256, 256, dtype=dtype)
        with torch.no_grad(), _common.compile_target(90), _common.launch_log(dry_run=True) as log:
            model(x)
        mv2_shapes = {(hidden, cout) for _, _, hidden, cout, _, _ in _xs_mv2_blocks()}
        records, blocks, fused = log.records, 0, 0
        for i, record in enumerate(records):
            args = dict(record.args)
            if record.name != "_dwconv_pointwise_kernel" or (args["Ch"], args["N"]) not in mv2_shapes:
                continue  # a local representation
            blocks += 1
            previous = dict(records[i - 1].args)  # the expansion: writes x, Ch channels
            expanded_first = (records[i - 1].name == "_pointwise_conv_kernel"
                              and previous["out_ptr"].address == args["x_ptr"].address
                              and previous["N"] == args["Ch"])
            is_fused = args["ew_ptr"] is not None
            assert expanded_first != is_fused
            fused += is_fused
        assert blocks == 7 and fused == len(_fused_xs_blocks(90, 1, dtype))


def test_cost_model_bf16_as_fp16_and_fp32_never():
    """bf16 decides as fp16 (same tensor rate, same bytes); fp32 keeps the hidden map even
    with TF32 allowed (the expanding kernel's fp32 form spills)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        for name, cin, hidden, cout, stride, size in _xs_mv2_blocks():
            out = ((size - 1) // stride + 1,) * 2
            assert (fuse_expand(100, (size, size), out, cin, hidden, cout, False, torch.bfloat16, 90)
                    == fuse_expand(100, (size, size), out, cin, hidden, cout, False, torch.float16, 90))
            assert not fuse_expand(1, (size, size), out, cin, hidden, cout, False, torch.float32, 90)
    finally:
        matmul.allow_tf32 = previous


def test_reference_expand_is_the_two_op_composition():
    """The torch backend of the expanded op equals pointwise_conv (+ SiLU) then the plain
    dwconv_pointwise (float64, to its rounding: the two run their convs on other memory
    layouts): the zero padding is the hidden map's."""
    args = make_args("cpu", torch.float64, b=2, size=(7, 6), layout="nchw", packing="kmajor",
                     hidden=48, cout=24, residual=True, cin=16)
    x, dw_weight, dw_bias, weight, bias, stride, residual, dilation, expand_weight, expand_bias = args
    hidden = reference.pointwise_conv(x, expand_weight, expand_bias, act="silu")
    composed = reference.dwconv_pointwise(hidden, dw_weight, dw_bias, weight, bias, stride, residual,
                                          dilation)
    fused = mvit3.ops.dwconv_pointwise(*args, backend="torch")
    torch.testing.assert_close(fused, composed, rtol=1e-12, atol=1e-12)


EXPAND_BAD_INPUTS = {
    "expand-weight-cin": (dict(expand_weight=torch.zeros(8, 5)), r"expand_weight must be \[Ch, Cin\]"),
    "expand-bias": (dict(expand_weight=torch.zeros(8, 8), expand_bias=torch.zeros(7)),
                    "expand_bias must be"),
    "expand-bias-alone": (dict(expand_bias=torch.zeros(8)), "expand_bias needs expand_weight"),
    "dw-weight-hidden": (dict(expand_weight=torch.zeros(16, 8)), r"dw_weight must be \[Ch, 1, 3, 3\] = \[16"),
}


@pytest.mark.parametrize("case", EXPAND_BAD_INPUTS)
def test_expand_bad_inputs_raise(case):
    changes, message = EXPAND_BAD_INPUTS[case]
    check_rejected(dwconv_pointwise, why_unsupported,
                   replace_args(dwconv_pointwise, _base_args(), **changes), message)
