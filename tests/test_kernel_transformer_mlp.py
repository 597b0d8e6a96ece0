"""mvit3.kernels.transformer_mlp and mvit3.kernels.transformer_mlp_project (the same FFN, then
the next LayerNorm + 1x1 projection on its output tile) against the float64 reference
(mvit3.ops.reference).

Runs in the Triton interpreter on CPU tensors ("interp") and, where a GPU is present, on it
("cuda", marked gpu). Shapes are the real (d, F) of both families (tests/shapes.py): v1-style
layers use norm="layer", v2-style ones norm="group"; the projections those of the v1-style
models (qkv, conv_proj).
"""

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import KERNEL_DEVICES
from kernel_utils import check_output, float64_reference, skip_bf16_before_sm80, with_stride_2
from shapes import v1_attention, v2_attention

import mvit3.kernels.transformer_mlp as kernel
import mvit3.kernels.transformer_mlp_project as project_kernel
from mvit3.kernels._common import launch_log
from mvit3.models import CONFIGS
from mvit3.ops import reference
from mvit3.ops import transformer_mlp as transformer_mlp_op
from mvit3.ops import transformer_mlp_project as transformer_mlp_project_op

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


# ---- transformer_mlp_project: the FFN, then the next LayerNorm + 1x1 projection on its tile ----

# (d, F, Cout, act) of the v1-style models: every FFN makes the next layer's LayerNorm + qkv
# (Cout = 3d, no act), the last of a block the final LayerNorm + conv_proj + BN + SiLU.
PROJECTIONS = sorted({(s.attn_dim, s.ffn_dim, 3 * s.attn_dim, "none")
                      for c in CONFIGS.values() if c.style == "v1" for s in c.stages}
                     | {(s.attn_dim, s.ffn_dim, s.channels, "silu")
                        for c in CONFIGS.values() if c.style == "v1" for s in c.stages})
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# odd maps (pixel tiles straddle rows and samples at batch 2) and even ones
PROJECT_SIZES = ((5, 7), (8, 8), (3, 5), (6, 4))


def make_project_args(batch, d, f, cout, h, w, act, *, dtype=torch.float32, device="cpu",
                      channels_last=False, packed_weights=False, seed=0):
    """Arguments of transformer_mlp_project: those of transformer_mlp (norm "layer") and the
    projection's LayerNorm affine, eps and [Cout, d] weight (K-major packed like the fast
    model's, or contiguous) and bias."""
    x, _, norm_weight, norm_bias, eps, w1, b1, w2, b2 = make_args(
        batch, d, f, h, w, "layer", dtype=dtype, device=device, channels_last=channels_last,
        packed_weights=packed_weights, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(cout, d, generator=gen) * d ** -0.5
    if packed_weights:
        weight = weight.t().contiguous().t()
    proj = [1 + 0.2 * torch.randn(d, generator=gen), 0.2 * torch.randn(d, generator=gen), 1e-6,
            weight, torch.randn(cout, generator=gen)]
    proj = [p.to(dtype=dtype, device=device) if isinstance(p, torch.Tensor) else p for p in proj]
    return (x, norm_weight, norm_bias, eps, w1, b1, w2, b2, *proj, act)


def check_project(outputs, args):
    """Both outputs: channels_last maps of args[0]'s device and dtype, within TOLERANCE of the
    float64 reference (the projection's error includes t's rounding to the I/O dtype)."""
    x = args[0]
    expected = float64_reference(reference.transformer_mlp_project, args)
    assert len(outputs) == 2
    for out, ref in zip(outputs, expected):
        assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
        assert out.is_contiguous(memory_format=torch.channels_last)
        err = (out.cpu().double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert scale > 0.1 and err <= TOLERANCE[x.dtype] * scale, f"max error {err:.3g} for max |ref| {scale:.3g}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("index, d, f, cout, act", [(i, *p) for i, p in enumerate(PROJECTIONS)],
                         ids=[f"d{d}-f{f}-cout{c}-{a}" for d, f, c, a in PROJECTIONS])
def test_project_real_shapes(device, index, d, f, cout, act):
    """Every (d, F, Cout, act) of the v1-style models; dtype, batch 1/2, odd/even map, NCHW or
    channels_last input and plain or packed weights rotate over the cases."""
    dtype = DTYPES[index % 3]
    skip_bf16_before_sm80(device, dtype)
    h, w = PROJECT_SIZES[index % 4]
    args = make_project_args(1 + index % 2, d, f, cout, h, w, act, dtype=dtype, device=device,
                             channels_last=(index // 2) % 2 == 0, packed_weights=(index // 3) % 2 == 0,
                             seed=index)
    check_project(project_kernel.transformer_mlp_project(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["none", "silu"])
def test_project_dtypes_and_acts(device, dtype, act):
    """Each dtype with each act on one odd-sized batch-2 problem of NCHW input: d = 120 pads to
    128, Cout = 360 is no multiple of the projection's chunk."""
    skip_bf16_before_sm80(device, dtype)
    args = make_project_args(2, 120, 240, 360, 5, 7, act, dtype=dtype, device=device)
    check_project(project_kernel.transformer_mlp_project(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_project_without_bias_through_the_op_layer_is_one_launch(device):
    """mvit3.ops.transformer_mlp_project(backend="triton") reaches the fused kernel through
    torch.library: one launch for both outputs (a proj_bias of None is allowed)."""
    args = make_project_args(2, 64, 128, 192, 6, 4, "none", device=device, channels_last=True)
    args = args[:12] + (None, "none")
    with launch_log() as log:
        outputs = transformer_mlp_project_op(*args, backend="triton")
    assert [r.name for r in log.records] == ["_transformer_mlp_project_kernel"]
    check_project(outputs, args)


# (batch, d, F, Cout, act, h, w, SPLIT_F, proj_groups) at batch 1 in fp32 on sm_90 (the
# interpreter's target): v3-XS's layer_4 qkv (16 tiles: 8 hidden chunks in 4 shares of 2, 6
# projection chunks in 2 groups) and conv_proj (3 chunks in uneven groups of 2 and 1), its
# layer_5 qkv (5 hidden chunks in uneven shares 2, 2, 1; 7 groups of one chunk); a grid of 73
# tiles, over TARGET_PROGRAMS / 2: not split
SPLIT_CASES = {
    "xs-layer4-qkv": (1, 120, 240, 360, "none", 16, 16, 4, 2),
    "xs-layer4-proj": (1, 120, 240, 160, "silu", 16, 16, 4, 2),
    "xs-layer5-qkv": (1, 144, 288, 432, "none", 8, 8, 3, 7),
    "73-tiles": (1, 64, 128, 192, "none", 33, 35, 1, 1),
}


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_project_split(device, case):
    """Small grids with a long chain: programs share a tile's hidden units (merged as split-K)
    and groups of them its projection channels. Both outputs against float64, the launch as
    `_splits` chooses it, every counter back at 0 afterwards."""
    from mvit3.kernels import _common

    b, d, f, cout, act, h, w, split_f, groups = SPLIT_CASES[case]
    args = make_project_args(b, d, f, cout, h, w, act, device=device, packed_weights=True,
                             channels_last=True, seed=5)
    with launch_log() as log:
        outputs = project_kernel.transformer_mlp_project(*args)
    check_project(outputs, args)
    record = log.records[-1]
    constexprs, runtime = dict(record.constexprs), dict(record.args)
    tiles = -(-b * h * w // constexprs["BLOCK_M"])
    assert constexprs["SPLIT_F"] == split_f and runtime["proj_groups"] == groups
    assert record.grid == ((tiles * groups, split_f) if split_f > 1 else (tiles,))
    assert _common.split_counters(args[0].device, 1).count_nonzero().item() == 0


def test_project_split_choice():
    """_splits: none on a grid of more than TARGET_PROGRAMS / 2 tiles or a chain within
    LONG_LOOP; else the shortest chain within TARGET_PROGRAMS programs, the fewest programs
    for it, no empty share or group."""
    from mvit3.kernels._common import TARGET_PROGRAMS

    splits = project_kernel._splits
    assert splits(TARGET_PROGRAMS // 2 + 1, 30, 30) == (1, 1) and splits(4, 5, 3) == (1, 1)
    assert splits(64, 6, 5) == (2, 1)  # XS layer_3 qkv: 11 -> 3 + 1 merge + 5 = 9 steps
    assert splits(16, 8, 6) == (4, 2)  # XS layer_4 qkv: 14 -> 2 + 1 + 3 = 6 on 128 programs
    assert splits(4, 5, 7) == (3, 7)  # XS layer_5 qkv: 12 -> 2 + 1 + 1 = 4 on 84 programs
    assert splits(16, 8, 3) == (4, 2)  # XS layer_4 conv_proj: 11 -> 2 + 1 + 2 = 5
    assert project_kernel._split_steps(5, 7, 3, 7) == 4


def test_project_reference_is_the_layer_math():
    """The reference twin against the transformer layer written on tokens with F.layer_norm
    and F.linear (float64): t = x + fc2(silu(fc1(LN(x)))), proj = act(Linear(LN'(t)))."""
    x, nw, nb, eps, w1, b1, w2, b2, pnw, pnb, peps, pw, pb, _ = args = [
        a.double() if isinstance(a, torch.Tensor) else a
        for a in make_project_args(2, 24, 48, 40, 4, 6, "silu", seed=3)]
    t, proj = reference.transformer_mlp_project(*args)
    tokens = x.permute(0, 2, 3, 1)  # [B, H, W, d]
    t_tokens = tokens + F.linear(F.silu(F.linear(F.layer_norm(tokens, (24,), nw, nb, eps), w1, b1)), w2, b2)
    proj_tokens = F.silu(F.linear(F.layer_norm(t_tokens, (24,), pnw, pnb, peps), pw, pb))
    torch.testing.assert_close(t, t_tokens.permute(0, 3, 1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(proj, proj_tokens.permute(0, 3, 1, 2), rtol=1e-12, atol=1e-12)
    assert t.is_contiguous(memory_format=torch.channels_last)
    assert proj.is_contiguous(memory_format=torch.channels_last)


def test_project_real_shapes_supported():
    for d, f, cout, act in PROJECTIONS:
        assert project_kernel.why_unsupported(*make_project_args(1, d, f, cout, 8, 8, act)) is None


@pytest.mark.parametrize("change, message", [
    (lambda a: a[:11] + (a[11][:, :60],) + a[12:], "proj_weight must be [Cout, 64]"),
    (lambda a: a[:12] + (a[12][:10],) + a[13:], "proj_bias must be [96]"),
    (lambda a: a[:8] + (a[8][:32],) + a[9:], "proj_norm_weight must be [64]"),
    (lambda a: a[:12] + (a[12].half(),) + a[13:], "proj_bias is torch.float16, x is torch.float32"),
    (lambda a: a[:11] + (a[11].half(),) + a[12:], "proj_weight is torch.float16"),
    (lambda a: a[:9] + (with_stride_2(a[9]),) + a[10:], "proj_norm_bias must have unit stride"),
    (lambda a: a[:13] + ("relu",), "act must be one of ('none', 'silu')"),
    (lambda a: a[:4] + (a[4][:, :60],) + a[5:], "w1 must be [F, 64]"),
])
def test_project_bad_input_raises(change, message):
    args = change(make_project_args(1, 64, 128, 96, 4, 4, "none"))
    with pytest.raises(ValueError, match=re.escape(message)):
        project_kernel.transformer_mlp_project(*args)
    assert project_kernel.why_unsupported(*args) is not None
