"""Every op of the CUDA C++ library (csrc/) against the float64 reference.

The kernels run in two places:
- "emu": the CPU emulator of the CUDA execution model (csrc/emulator.h), which runs the very
  same kernel source (tiles, shared memory, barriers, warp shuffles, WMMA fragments) on CPU
  tensors as `torch.ops.mvit3_emulated.<op>`. CI has no GPU: this is where the kernels' logic
  is proven there. The emulator is slow, so it takes a rotation of the grid below: every real
  shape once and every dtype x layout x batch at least once, on small maps, with the threads
  of a block in forward order; a quarter of the shapes again in reverse and in random order.
- "cuda" (marked gpu): `torch.ops.mvit3.<op>` on the GPU over the full grid (every real shape
  x dtype x layout x batch 1 and 3, at the real map sizes), plus CUDA-graph capture and
  replay, torch.compile(fullgraph=True), and whole fast models with backend="cuda".

Inputs are NCHW, channels_last, or a channel slice of a wider channels_last map (neither
layout is dense); 1x1 weights come plain or in the fast models' K-major packing.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import struct
import zlib
from typing import NamedTuple

import pytest
import torch

import mvit3
from conftest import HAS_CUDA
from mvit3 import build
from mvit3.models import CONFIGS
from mvit3.ops import cuda_lib, reference
from shapes import mv2_blocks, stage_sizes, v1_attention, v2_attention

REQUIRE_LIB = os.environ.get("MVIT3_REQUIRE_CUDA_LIB") == "1"

# Max |kernel - reference| / max |reference|, the reference in float64 on float64 copies of the
# very inputs the kernel got, so only the kernel's own rounding counts.
# fp32: products summed in fp32 (IEEE FMA) in another order than float64: ~sqrt(K) * 2**-24 of
#   sum |a*w| for K <= 2880 (the v1-S fusion 3x3 conv), under 1e-5 of the output scale; an
#   indexing or masking bug is O(1). 1e-4 leaves room for exp/rsqrt and the intermediate maps.
# fp16 (eps 2**-11 = 4.9e-4) / bf16 (eps 2**-8 = 3.9e-3): the staged operand tiles, the
#   probabilities, the intermediate maps (qkv, hidden, heads) and the output are rounded to
#   the I/O dtype, each ~eps of the scale; accumulation and statistics stay fp32. 10 eps: a
#   few times the largest error seen.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last", "slice")
BATCHES = (1, 3)
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


# ---- where the kernels run --------------------------------------------------------------------

# "address": the emulator built with AddressSanitizer (test_emulated_ops_under_address_sanitizer
# runs a few tests of this file so, in a process that preloads the sanitizer's runtime).
SANITIZE = os.environ.get("MVIT3_EMULATOR_SANITIZE") or None


def build_emulator():
    if SANITIZE:  # the runtime is in: the compilers the build runs need not have it too
        os.environ.pop("LD_PRELOAD", None)
    return build.build_emulator(sanitize=SANITIZE)


@pytest.fixture(scope="session")
def emulated_ops():
    """torch.ops.mvit3_emulated, built once per sources hash (about a minute on 2 cores)."""
    try:
        build_emulator()
    except build.BuildError as err:
        pytest.fail(f"cannot build the CPU emulation of csrc/: {err}")
    return torch.ops.mvit3_emulated


@pytest.fixture(scope="session")
def cuda_ops():
    status = cuda_lib.status()
    if not status["loaded"]:
        message = f"the CUDA library is not loaded: {status['reason']}"
        if REQUIRE_LIB:
            pytest.fail(message)
        pytest.skip(f"{message}; build it with `python -m mvit3 build`")
    return torch.ops.mvit3


ORDERS = ("forward", "reverse", "random")  # csrc/emulator.h: Order


@pytest.fixture(scope="session")
def emulator_library(emulated_ops):
    """The emulator's library through ctypes (the handle torch loaded: the same globals)."""
    import ctypes

    handle = ctypes.CDLL(str(build_emulator()))
    handle.mvit3_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
    handle.mvit3_emu_set_schedule.restype = ctypes.c_int
    handle.mvit3_emu_recorded_count.restype = ctypes.c_int64
    handle.mvit3_emu_set_shared_optin.argtypes = [ctypes.c_int64]
    return handle


def recorded_launches(library, call) -> int:
    """How many launches call() makes, recorded (not run) by the emulator."""
    library.mvit3_emu_set_recording(1)
    try:
        call()
        return library.mvit3_emu_recorded_count()
    finally:
        library.mvit3_emu_set_recording(0)


@contextlib.contextmanager
def shared_optin(library, kb: int):
    """Within: the emulated device's shared-memory limit a block is kb KB (0: an sm_90's)."""
    assert library.mvit3_emu_set_shared_optin(kb * 1024) == 0
    try:
        yield
    finally:
        library.mvit3_emu_set_shared_optin(0)


@pytest.fixture
def kernels(request, case):
    """The op namespace for the case's device: emulated on CPU, or the library on the GPU. The
    emulator runs the threads of a block in the case's order; a random order's seed comes from
    the case's id (the same orders every run), or from $MVIT3_EMU_SEED to try others, and is
    printed (pytest shows it with a failure; an emulator error names it too)."""
    if case.device != "emu":
        yield request.getfixturevalue("cuda_ops")
        return
    library = request.getfixturevalue("emulator_library")
    seed = int(os.environ.get("MVIT3_EMU_SEED") or zlib.crc32(str(case).encode()))
    if case.order == "random":
        print(f"emulated threads in random order, seed {seed}")
    assert library.mvit3_emu_set_schedule(ORDERS.index(case.order), seed) == 0
    try:
        yield request.getfixturevalue("emulated_ops")
    finally:  # the other tests run in forward order
        library.mvit3_emu_set_schedule(0, 0)


class Case(NamedTuple):
    device: str  # "emu" or "cuda"
    shape: tuple  # op-specific
    dtype: torch.dtype
    layout: str
    batch: int
    size: tuple  # (H, W)
    order: str = "forward"  # the emulator's thread order (ORDERS)

    @property
    def tensor_device(self) -> str:
        return "cpu" if self.device == "emu" else "cuda"

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        order = f"-{self.order}" if self.order != "forward" else ""
        return (f"{self.device}{order}-{'x'.join(map(str, self.shape))}-{dtype}-{self.layout}-"
                f"b{self.batch}-{self.size[0]}x{self.size[1]}")


def cases(shapes, emu_sizes, gpu_sizes) -> list:
    """The emulator's rotation (each shape once, then each dtype x layout once) and the GPU's
    full grid (each shape x dtype x layout x batch, the map sizes rotated over the shapes)."""
    emu = [Case("emu", s, DTYPES[i % 3], LAYOUTS[(i // 3) % 3], BATCHES[i % 2],
                emu_sizes[i % len(emu_sizes)]) for i, s in enumerate(shapes)]
    emu += [Case("emu", shapes[j % len(shapes)], dtype, layout, BATCHES[(j + 1) % 2],
                 emu_sizes[(j + 1) % len(emu_sizes)])
            for j, (dtype, layout) in enumerate(itertools.product(DTYPES, LAYOUTS))]
    # The rotation runs the block's threads in forward order; a quarter of its real shapes run
    # again in reverse order (i % 4 == 1: batch 3, every dtype and layout over the shapes) and
    # a quarter in a random order (i % 4 == 2: batch 1), so every op meets both orders with
    # real shapes (the smallest op list has 3) for about 50% more emulated time, not the 3x of
    # the whole rotation in each order: a kernel's barriers and shared-memory traffic are the
    # same code at every shape, so a race that an order exposes shows at most of them.
    emu += [c._replace(order=ORDERS[i % 4]) for i, c in enumerate(emu[:len(shapes)])
            if i % 4 in (1, 2)]
    gpu = [Case("cuda", s, dtype, layout, batch, gpu_sizes[i % len(gpu_sizes)])
           for i, s in enumerate(shapes)
           for dtype, layout, batch in itertools.product(DTYPES, LAYOUTS, BATCHES)]
    return ([pytest.param(c, id=str(c)) for c in emu]
            + [pytest.param(c, id=str(c), marks=GPU_MARKS) for c in gpu])


# ---- inputs -----------------------------------------------------------------------------------

class Inputs:
    """Random inputs of one case, each on the case's device in its dtype and layout."""

    def __init__(self, case: Case, seed: int = 0):
        self.case = case
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.case.tensor_device, self.case.dtype)

    def map(self, channels, size=None, scale=1.0, layout=None) -> torch.Tensor:
        """[B, C, H, W]; successive maps of a call take successive layouts."""
        h, w = size or self.case.size
        layout = layout or LAYOUTS[(LAYOUTS.index(self.case.layout) + self.count) % 3]
        self.count += 1
        b = self.case.batch
        if layout == "nchw":
            return self._to(scale * torch.randn(b, channels, h, w, generator=self.gen))
        if layout == "channels_last":
            nhwc = scale * torch.randn(b, h, w, channels, generator=self.gen)
            return self._to(nhwc).permute(0, 3, 1, 2)
        wide = self._to(scale * torch.randn(b, h, w, channels + 6, generator=self.gen))
        return wide.permute(0, 3, 1, 2)[:, 3:3 + channels]

    def weight(self, cout, k) -> torch.Tensor:
        """[Cout, K], N(0, 1/K): contiguous, or a K-major view (the fast models' packing)."""
        if (self.count + LAYOUTS.index(self.case.layout)) % 2:
            w = torch.randn(k, cout, generator=self.gen).t()
        else:
            w = torch.randn(cout, k, generator=self.gen)
        self.count += 1
        return self._to(w / k ** 0.5)

    def vector(self, n, mean=0.0) -> torch.Tensor:
        return self._to(mean + 0.5 * torch.randn(n, generator=self.gen))

    def filter(self, cout, cin, depthwise=False) -> torch.Tensor:
        fan_in = 9 if depthwise else 9 * cin
        w = torch.randn(cout, 1 if depthwise else cin, 3, 3, generator=self.gen)
        return self._to(w / fan_in ** 0.5)


def check(kernels, op: str, args: tuple, dtype: torch.dtype) -> None:
    outputs = getattr(kernels, op)(*args)
    device = args[0].device
    expected = getattr(reference, op)(*[a.to(device, torch.float64) if isinstance(a, torch.Tensor)
                                        else a for a in args])
    if isinstance(expected, torch.Tensor):  # one output (transformer_mlp_project has two)
        outputs, expected = (outputs,), (expected,)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert out.dtype == dtype and out.shape == ref.shape and out.device == device
        assert out.is_contiguous(memory_format=torch.channels_last)
        scale = ref.abs().max().item()
        assert scale > 0.1  # random inputs: a near-zero reference would prove nothing
        err = (out.double() - ref).abs().max().item() / scale
        assert err <= TOLERANCE[dtype], f"relative error {err:.3g} > {TOLERANCE[dtype]}"


# ---- the real shapes --------------------------------------------------------------------------

V1_STYLE = [c for c in CONFIGS.values() if c.style == "v1"]
V2_STYLE = [c for c in CONFIGS.values() if c.style == "v2"]
GPU_SIZES = tuple((s, s) for s in stage_sizes(256)) + tuple((s, s) for s in stage_sizes(224))
GPU_EVEN_SIZES = tuple((s, s) for s in stage_sizes(256)) + ((14, 14), (28, 28))
EMU_SIZES = ((5, 7), (4, 4), (7, 6))  # odd and even; batch 3 puts samples inside pixel tiles
EMU_EVEN_SIZES = ((4, 6), (2, 2), (6, 4))


def pointwise_shapes() -> list:
    """(C1, C2, Cout, norm, act, residual) of the per-pixel GEMMs of the models."""
    shapes = set()
    for c in V1_STYLE:
        for s in c.stages:
            d, ch = s.attn_dim, s.channels
            shapes.add((d, 0, 3 * d, "layer", "none", False))  # LayerNorm + qkv
            shapes.add((d, 0, ch, "layer", "silu", False))  # final LayerNorm + conv_proj
            if c.version == "v3":
                shapes.add((d, ch, ch, "none", "silu", True))  # fusion of cat(local, global) + x
    for c in V2_STYLE:
        for s in c.stages:
            d, ch = s.attn_dim, s.channels
            v3 = c.version == "v3"  # final GroupNorm + conv_proj (v3: of cat(global, local), + x)
            shapes.add((d, d if v3 else 0, ch, "group", "none", v3))
    shapes |= {(cin, 0, hidden, "none", "silu", False)
               for cin, hidden, _, _ in mv2_blocks()}  # MV2 expansion
    shapes |= {(c.stages[-1].channels, 0, c.exp_channels, "none", "silu", False)
               for c in CONFIGS.values() if c.exp_channels}  # conv_1x1_exp of the v1-style heads
    return sorted(shapes)


POINTWISE = pointwise_shapes()
DWCONV = sorted({(hidden, out, stride, stride == 1 and cin == out)
                 for cin, hidden, out, stride in mv2_blocks()})
CONV3X3 = sorted({(3, 0, c.stem_channels, 2) for c in CONFIGS.values()}  # stems
                 | {(s.channels, 0, s.channels, 1) for c in V1_STYLE if c.version == "v1"
                    for s in c.stages}  # v1 local conv
                 | {(s.channels, s.channels, s.channels, 1) for c in V1_STYLE if c.version == "v1"
                    for s in c.stages})  # v1 fusion of cat(x, global)
ATTENTION = [(d, heads) for d, heads, _ in v1_attention()]
MLP = sorted({(d, ffn, "layer") for d, _, ffn in v1_attention()}
             | {(d, ffn, "group") for d, ffn in v2_attention()})
SEPARABLE = [(d,) for d, _ in v2_attention()]
# (d, F, Cout, act): each v1-style FFN with the next layer's LayerNorm + qkv, the last one of a
# block with the final LayerNorm + conv_proj + SiLU
MLP_PROJECT = sorted({(s.attn_dim, s.ffn_dim, 3 * s.attn_dim, "none") for c in V1_STYLE for s in c.stages}
                     | {(s.attn_dim, s.ffn_dim, s.channels, "silu") for c in V1_STYLE for s in c.stages})


@pytest.mark.parametrize("case", cases(POINTWISE, EMU_SIZES, GPU_SIZES))
def test_pointwise_conv(kernels, case):
    c1, c2, cout, norm, act, residual = case.shape
    t = Inputs(case)
    args = (t.map(c1), t.weight(cout, c1 + c2), t.vector(cout), t.map(c2) if c2 else None,
            t.map(cout) if residual else None, norm,
            t.vector(c1, mean=1.0) if norm != "none" else None,
            t.vector(c1) if norm != "none" else None, 1e-5, act)
    check(kernels, "pointwise_conv", args, case.dtype)


OPTIONS = list(itertools.product(("none", "layer", "group"), ("none", "silu"), (0, 40),
                                 (False, True), (False, True), (False, True)))


@pytest.mark.parametrize("device", [pytest.param("emu", id="emu"),
                                    pytest.param("cuda", id="cuda", marks=GPU_MARKS)])
@pytest.mark.parametrize("i, norm, act, c2, bias, residual, affine",
                         [(i, *o) for i, o in enumerate(OPTIONS)],
                         ids=["-".join(map(str, o)) for o in OPTIONS])
def test_pointwise_conv_options(request, device, i, norm, act, c2, bias, residual, affine):
    """Every combination of the optional parts (dtype and layout rotated) on one odd-sized
    batch-3 problem."""
    case = Case(device, (), DTYPES[i % 3], LAYOUTS[(i // 3) % 3], 3, (5, 9))
    kernels = request.getfixturevalue("emulated_ops" if device == "emu" else "cuda_ops")
    t = Inputs(case, seed=i)
    with_affine = norm != "none" and affine
    args = (t.map(24), t.weight(48, 24 + c2), t.vector(48) if bias else None,
            t.map(c2) if c2 else None, t.map(48) if residual else None, norm,
            t.vector(24, mean=1.0) if with_affine else None, t.vector(24) if with_affine else None,
            1e-5, act)
    check(kernels, "pointwise_conv", args, case.dtype)


# [Cout = 74, K = 42] weights as views of a stored buffer full of NaN: both are no multiple of 8
# (fp16/bf16) or 4 (fp32) elements, so padded rows end in a cut 16-byte chunk, whose bytes past
# the row must not be read.
WEIGHT_VIEWS = {
    "contiguous": lambda buf: buf[:74, :42].contiguous(),  # rows of 84 / 168 bytes: unaligned
    "padded_rows": lambda buf: buf[:74, :42],  # rows of 48 elements: aligned, K unit-stride
    "k_major": lambda buf: buf[:42, :74].contiguous().t(),  # Cout unit-stride, rows unaligned
    "padded_k_major": lambda buf: buf[:42, :74].t(),  # Cout unit-stride, rows of 80: aligned
    "offset_base": lambda buf: buf[:74, 1:43],  # aligned rows, the base 1 element off
    "no_unit_stride": lambda buf: buf[:74, ::2][:, :42],
}


@pytest.mark.parametrize("device", [pytest.param("emu", id="emu"),
                                    pytest.param("cuda", id="cuda", marks=GPU_MARKS)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", list(WEIGHT_VIEWS))
def test_pointwise_conv_weight_layouts(request, device, dtype, view):
    """The GEMM's weight staging: 16-byte chunks (cp.async) along K or along Cout where that
    dimension is unit-stride and the base and rows are 16-byte aligned, chunks cut by a row's
    end zero-filled, element by element otherwise; K = 42 takes 2 (fp16/bf16) or 3 (fp32) K
    steps through both stages, Cout = 74 two channel tiles."""
    case = Case(device, (), dtype, "channels_last", 3, (5, 9))
    kernels = request.getfixturevalue("emulated_ops" if device == "emu" else "cuda_ops")
    t = Inputs(case, seed=len(view))
    buf = t._to(torch.full((80, 96), math.nan))  # a read outside the view makes NaNs
    weight = WEIGHT_VIEWS[view](buf)
    assert weight.shape == (74, 42)
    weight.copy_(torch.randn(74, 42, generator=t.gen) / 42 ** 0.5)
    args = (t.map(42), weight, t.vector(74), None, None, "none", None, None, 1e-5, "none")
    check(kernels, "pointwise_conv", args, dtype)


@pytest.mark.parametrize("case", cases(DWCONV, EMU_SIZES, GPU_SIZES))
def test_dwconv_pointwise(kernels, case):
    hidden, out, stride, residual = case.shape
    t = Inputs(case)
    h, w = case.size
    out_size = ((h - 1) // stride + 1, (w - 1) // stride + 1)
    args = (t.map(hidden), t.filter(hidden, 1, depthwise=True), t.vector(hidden),
            t.weight(out, hidden), t.vector(out), stride,
            t.map(out, size=out_size) if residual else None)
    check(kernels, "dwconv_pointwise", args, case.dtype)


# Whole MV2 blocks (expand_weight given), (in, hidden, out, stride, residual): XS's layer_1.0,
# layer_2.0 and layer_2.1, one kernel each (mv2_block_kernel; its edges and the two-launch
# fallback in test_mv2_block_one_kernel_edges below)
MV2_BLOCKS = [(16, 64, 32, 1, False), (32, 128, 48, 2, False), (48, 192, 48, 1, True)]


@pytest.mark.parametrize("case", cases(MV2_BLOCKS, EMU_SIZES, GPU_SIZES))
def test_dwconv_pointwise_expand(kernels, case):
    """The expansion (+ SiLU) feeding the depthwise conv: the hidden map is zero-padded, so a
    border tap adds 0, not silu(expand_bias)."""
    cin, hidden, out, stride, residual = case.shape
    t = Inputs(case)
    h, w = case.size
    out_size = ((h - 1) // stride + 1, (w - 1) // stride + 1)
    args = (t.map(cin), t.filter(hidden, 1, depthwise=True), t.vector(hidden),
            t.weight(out, hidden), t.vector(out), stride,
            t.map(out, size=out_size) if residual else None, 1, t.weight(hidden, cin),
            t.vector(hidden, mean=1.0))
    check(kernels, "dwconv_pointwise", args, case.dtype)


# The one-kernel MV2 block's edges, (Cin, hidden, Cout, stride, residual, expand_bias, dilation):
# 8x8 output tiles over maps of several tiles with partial ones (odd sizes, stride 2 of odd
# sizes), batch 1 and 3, every layout and dtype, Cin no multiple of 8 (the element-wise
# expansion), hidden no multiple of the 32 (fp16/bf16) or 16 (fp32) hidden channels of a chunk,
# Cout over one 64-channel tile and no multiple of 8 (the element-wise epilogue), no expansion
# bias, the widest fused input (kMv2MaxInChannels = 192, the most shared memory); then the
# two-launch fallbacks, a wider input and a dilated depthwise conv. Each in its thread order.
MV2_EDGES = [
    # (shape, dtype, layout, batch, size, order)
    ((12, 40, 24, 1, True, True, 1), torch.float32, "nchw", 3, (9, 11), "forward"),
    ((12, 40, 24, 2, False, False, 1), torch.float16, "channels_last", 1, (13, 9), "reverse"),
    ((20, 48, 70, 2, False, True, 1), torch.bfloat16, "slice", 3, (9, 17), "random"),
    ((16, 64, 16, 1, True, True, 1), torch.float16, "nchw", 1, (17, 10), "random"),
    ((24, 96, 24, 1, True, True, 1), torch.float32, "channels_last", 3, (6, 5), "reverse"),
    ((32, 72, 136, 1, False, True, 1), torch.bfloat16, "channels_last", 1, (3, 12), "forward"),
    ((192, 384, 64, 2, True, True, 1), torch.float16, "channels_last", 1, (5, 7), "forward"),
    ((192, 96, 40, 2, False, True, 1), torch.float32, "slice", 1, (7, 3), "reverse"),
    ((200, 64, 40, 2, False, True, 1), torch.float16, "channels_last", 3, (5, 6), "forward"),
    ((24, 48, 24, 1, True, True, 2), torch.float32, "nchw", 1, (7, 9), "forward"),
]


@pytest.mark.parametrize("case", [
    pytest.param(Case("emu", shape, dtype, layout, batch, size, order),
                 id=str(Case("emu", shape, dtype, layout, batch, size, order)))
    for shape, dtype, layout, batch, size, order in MV2_EDGES])
def test_mv2_block_one_kernel_edges(kernels, emulator_library, case):
    """dwconv_pointwise with expand_weight: one launch where the fused kernel takes the call (Cin
    <= 192, dilation 1), two (the expansion apart) otherwise; the reference either way."""

    cin, hidden, out, stride, residual, expand_bias, dilation = case.shape
    t = Inputs(case, seed=cin + hidden)
    h, w = case.size
    out_size = ((h - 1) // stride + 1, (w - 1) // stride + 1)
    args = (t.map(cin), t.filter(hidden, 1, depthwise=True), t.vector(hidden),
            t.weight(out, hidden), t.vector(out), stride,
            t.map(out, size=out_size) if residual else None, dilation, t.weight(hidden, cin),
            t.vector(hidden, mean=1.0) if expand_bias else None)
    check(kernels, "dwconv_pointwise", args, case.dtype)
    launches = recorded_launches(emulator_library, lambda: kernels.dwconv_pointwise(*args))
    assert launches == (1 if cin <= 192 and dilation == 1 else 2)


@pytest.mark.parametrize("case", cases(CONV3X3, EMU_SIZES, GPU_SIZES))
def test_conv3x3(kernels, case):
    c1, c2, cout, stride = case.shape
    t = Inputs(case)
    args = (t.map(c1), t.filter(cout, c1 + c2), t.vector(cout), t.map(c2) if c2 else None, stride,
            "silu")
    check(kernels, "conv3x3", args, case.dtype)


# conv3x3 in tap-major K order (csrc/conv3x3.cu): where x and x2 are channels_last with aligned
# pixels and C1 and C1 + C2 are whole 16-byte chunks, each A chunk is one 16-byte load of a
# pixel's channels at one tap (zeros in the padding) and the contiguous weight is read in
# segments of C1 + C2; elsewhere (an NCHW x2, C not whole chunks) the channel-major order.
# ((C1, C2, Cout, stride, dilation), layout of x2, dtype, batch, size, order)
TAP_MAJOR = [
    ((16, 24, 40, 1, 1), "channels_last", torch.float16, 3, (5, 7), "forward"),
    ((12, 20, 24, 2, 1), "channels_last", torch.float32, 1, (9, 6), "reverse"),
    ((32, 0, 48, 1, 2), None, torch.bfloat16, 2, (7, 7), "random"),
    ((64, 0, 16, 2, 1), None, torch.float16, 1, (8, 8), "reverse"),
    ((16, 8, 16, 1, 1), "nchw", torch.float16, 3, (4, 6), "forward"),
    ((20, 0, 16, 1, 1), None, torch.float16, 1, (5, 5), "random"),
]


@pytest.mark.parametrize("case", [Case("emu", *c[:1], *c[2:3], "channels_last", *c[3:])
                                  for c in TAP_MAJOR], ids=str)
def test_conv3x3_tap_major(kernels, case):
    c1, c2, cout, stride, dilation = case.shape
    x2_layout = next(c[1] for c in TAP_MAJOR if c[0] == case.shape)
    t = Inputs(case, seed=c1 + c2)
    args = (t.map(c1, layout="channels_last"), t.filter(cout, c1 + c2), t.vector(cout),
            t.map(c2, layout=x2_layout) if c2 else None, stride, "silu", dilation)
    check(kernels, "conv3x3", args, case.dtype)


# Dilated 3x3 ops of the dense models, (dilation, stride): v2-style backbones' depthwise convs
# (2 and 4) and ASPP's dense convs (6 ... 36), on odd maps the taps partly or wholly leave.
DILATED = [(2, 1), (4, 1), (2, 2), (6, 1)]


@pytest.mark.parametrize("device", ["emu", pytest.param("cuda", marks=GPU_MARKS)])
@pytest.mark.parametrize("dilation, stride", DILATED)
def test_dilated_3x3_ops(request, device, dilation, stride):
    kernels = request.getfixturevalue("emulated_ops" if device == "emu" else "cuda_ops")
    i = DILATED.index((dilation, stride))
    case = Case(device, (), DTYPES[i % 3], LAYOUTS[i % 3], 2, ((9, 7), (5, 11))[i % 2])
    t = Inputs(case, seed=i)
    h, w = case.size
    out_size = ((h - 1) // stride + 1, (w - 1) // stride + 1)
    check(kernels, "dwconv_pointwise", (t.map(24), t.filter(24, 1, depthwise=True), t.vector(24),
                                        t.weight(16, 24), t.vector(16), stride,
                                        t.map(16, size=out_size), dilation), case.dtype)
    check(kernels, "conv3x3", (t.map(12), t.filter(20, 16), t.vector(20), t.map(4), stride, "none",
                               dilation), case.dtype)


# "block": out_proj + residual, as in the models; "heads": the bare heads; "residual": heads + x.
ATTENTION_USES = ([a + ("block",) for a in ATTENTION]
                  + [a + (use,) for a, use in zip(ATTENTION, itertools.cycle(("heads", "residual")))])


@pytest.mark.parametrize("case", cases(ATTENTION_USES, EMU_EVEN_SIZES, GPU_EVEN_SIZES))
def test_patch_attention(kernels, case):
    d, heads, use = case.shape
    t = Inputs(case)
    project = use == "block"
    args = (t.map(3 * d), heads, (d // heads) ** -0.5, t.weight(d, d) if project else None,
            t.vector(d) if project else None, t.map(d) if use != "heads" else None)
    check(kernels, "patch_attention", args, case.dtype)


LONG_SEQUENCES = [(d, heads) for d, heads in ATTENTION if d // heads in (16, 60)]


LONG_SEQUENCE_CASES = ([Case("emu", s, dtype, "channels_last", 1, (18, 16))
                        for s in LONG_SEQUENCES for dtype in DTYPES]
                       + [Case("emu", s, dtype, "slice", 3, (10, 12))
                          for s in LONG_SEQUENCES for dtype in DTYPES]
                       + [Case("cuda", s, dtype, layout, 2, (64, 64))
                          for s in LONG_SEQUENCES for dtype in DTYPES for layout in LAYOUTS])


@pytest.mark.parametrize("case", [pytest.param(c, id=str(c),
                                               marks=GPU_MARKS if c.device == "cuda" else ())
                                  for c in LONG_SEQUENCE_CASES])
def test_patch_attention_long_sequences(kernels, case):
    """Several key tiles and a partial last one: N = 72 patches (emu: 4-warp blocks, two query
    tiles), N = 30 (emu: the 2-warp blocks of 17 to 32 tokens), N = 1024 (GPU, a 512 px input's
    layer_3), with the smallest and largest head dims of the models. The short maps of the
    other attention tests (N <= 16) run the 1-warp blocks."""
    d, heads = case.shape
    t = Inputs(case)
    args = (t.map(3 * d, scale=2.0), heads, (d // heads) ** -0.5, t.weight(d, d), t.vector(d), t.map(d))
    check(kernels, "patch_attention", args, case.dtype)


# Heads that do not start on a 16-byte chunk (csrc/patch_attention.cu, "Staging": the rows are
# windows from the head's first channel rounded down to a chunk): the models' head dims 20, 30,
# 36 and 60 with 4 heads, every dtype, in a channels_last qkv map and in a channel slice of a
# wider map at an aligned offset (both staged by 16-byte chunks), over 72 tokens (several key
# tiles: both cp.async stages, and the fp32 64-dim kernel's single one).
HEAD_WINDOW_CASES = [Case("emu", (4 * hd, 4), dtype, layout, 1, (18, 16), order)
                     for i, (hd, dtype) in enumerate(itertools.product((20, 30, 36, 60), DTYPES))
                     for layout, order in [(("channels_last", "slice")[i % 2], ORDERS[i % 3])]]


@pytest.mark.parametrize("case", [pytest.param(c, id=str(c)) for c in HEAD_WINDOW_CASES])
def test_patch_attention_head_windows(kernels, case):
    """Head h > 0 reads the last channels of head h - 1 as its window's lead: an infinite key
    channel of head 0 must not reach the other heads (their window's lead columns are 0 in Q
    and in K, whichever way the key tile was staged)."""
    d, heads = case.shape
    hd = d // heads
    t = Inputs(case)
    h, w = case.size
    offset = 8 if case.layout == "slice" else 0  # 16 bytes of fp16/bf16, 32 of fp32
    nhwc = torch.randn(case.batch, h, w, 3 * d + 2 * offset, generator=t.gen)
    nhwc[..., offset + d + hd - 1] = float("inf")  # head 0's last key channel
    qkv = t._to(nhwc).permute(0, 3, 1, 2)[:, offset:offset + 3 * d]
    out = kernels.patch_attention(qkv, heads, hd ** -0.5, None, None, None)
    ref = reference.patch_attention(qkv.double(), heads, hd ** -0.5)
    out, ref = out[:, hd:].double(), ref[:, hd:]  # heads 1.. (head 0 is NaN in both)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    err = (out - ref).abs().max().item() / ref.abs().max().item()
    assert err <= TOLERANCE[case.dtype], f"relative error {err:.3g} > {TOLERANCE[case.dtype]}"


# The out_proj fused into the attention launch (csrc/patch_attention.cu, project_heads) off the
# models' shapes: d not a multiple of 8 (no 16-byte chunk of qkv, W or the output: element
# paths), d over 128 (the 256-wide heads tile; fp32 runs one warp a block) and at the limit of
# 256, d over 256 (the two-launch path), N = 16 (one 16-query warp) and N = 289 (34 x 34: five
# 64-query tiles, 19 key tiles; fp32 and fp16, bf16 runs the same code), batch 1 and 3, no bias or no residual. The weight is a view
# of a buffer full of NaN (padded rows, K-major with padded columns, or every other column:
# no unit stride), so a W tile that reads past d shows.
# (d, heads, weight, bias, residual)
FUSED_PROJECTION = [(36, 4, "rows", True, True), (200, 4, "kmajor", True, True),
                    (256, 4, "rows", False, True), (264, 6, "kmajor", True, True),
                    (120, 4, "strided", True, False), (68, 2, "kmajor", False, False)]
FUSED_PROJECTION_CASES = [
    Case("emu", shape, dtype, layout, batch, size, order)
    for i, (shape, dtype) in enumerate(itertools.product(FUSED_PROJECTION, DTYPES))
    for layout, batch, size, order in [(LAYOUTS[i % 3], (1, 3)[i % 2], ((8, 8), (10, 12))[i % 2],
                                        ORDERS[i % 3])]]
FUSED_PROJECTION_CASES += [Case("emu", (256, 4, "kmajor", True, True), dtype, "channels_last", 1,
                                (34, 34)) for dtype in (torch.float32, torch.float16)]


def _nan_view(w: torch.Tensor, kind: str) -> torch.Tensor:
    """A view with the values of w [rows, cols] into a buffer full of NaN."""
    rows, cols = w.shape
    if kind == "rows":
        buf = torch.full((rows, cols + 8), float("nan"), dtype=w.dtype, device=w.device)
        buf[:, :cols] = w
        return buf[:, :cols]
    if kind == "kmajor":
        buf = torch.full((cols, rows + 8), float("nan"), dtype=w.dtype, device=w.device)
        buf[:, :rows] = w.t()
        return buf[:, :rows].t()
    buf = torch.full((rows, 2 * cols), float("nan"), dtype=w.dtype, device=w.device)
    buf[:, ::2] = w
    return buf[:, ::2]


@pytest.mark.parametrize("case", [pytest.param(c, id=str(c)) for c in FUSED_PROJECTION_CASES])
def test_patch_attention_fused_projection(kernels, case):
    d, heads, kind, bias, residual = case.shape
    t = Inputs(case)
    args = (t.map(3 * d), heads, (d // heads) ** -0.5, _nan_view(t.weight(d, d), kind),
            t.vector(d) if bias else None, t.map(d) if residual else None)
    check(kernels, "patch_attention", args, case.dtype)


@pytest.mark.parametrize("case", cases(MLP, EMU_SIZES[:1] + EMU_EVEN_SIZES, GPU_SIZES))
def test_transformer_mlp(kernels, case):
    d, ffn, norm = case.shape
    t = Inputs(case)
    args = (t.map(d), norm, t.vector(d, mean=1.0), t.vector(d), 1e-5, t.weight(ffn, d),
            t.vector(ffn), t.weight(d, ffn), t.vector(d))
    check(kernels, "transformer_mlp", args, case.dtype)


# The one-launch FFN (csrc/transformer_mlp.cu, fused_mlp_kernel) off the models' shapes: d not a
# multiple of 8 (no 16-byte chunk of x, the output or w1's rows: element paths; w2's rows of
# F = 72 are chunks cut at the row's end), F odd (the hidden pairs' last column) with warps that
# own no chunk of F or d, the v3-XS 120/240 shape with GroupNorm, fp32's dynamic shared memory
# within 48 KB (d 128 / F 256: 45.6 KB; the v1-style d 144 / F 288: 47.9 KB) and past it with the
# opt-in (d 240 / F 480: 65.9 KB), the largest fused tiles (d 256 / F 512: fp32 68.9 KB) and past
# them (d 264: the two launches through the hidden workspace), norms layer/group/none, batch 1 and
# 3 on odd and even maps (9 x 9 x 3 = 243 pixels: 16 blocks, launched in chunks by the emulator's
# 8-block grid), NCHW, channels_last and slices. Weights are views of buffers full of NaN (padded
# rows, K-major with padded columns, every other column: no unit stride), so a W tile read past F
# or d shows. (d, F, norm, w1 view, w2 view)
FUSED_MLP = [(36, 72, "layer", "rows", "strided"), (20, 37, "none", "strided", "kmajor"),
             (120, 240, "group", "kmajor", "kmajor"), (128, 256, "layer", "kmajor", "rows"),
             (256, 512, "group", "rows", "kmajor"), (144, 288, "layer", "rows", "kmajor"),
             (264, 528, "layer", "kmajor", "rows"), (240, 480, "layer", "kmajor", "kmajor")]
FUSED_MLP_CASES = [
    Case("emu", shape, dtype, layout, batch, size, order)
    for i, (shape, dtype) in enumerate(itertools.product(FUSED_MLP, DTYPES))
    for layout, batch, size, order in [(LAYOUTS[i % 3], (1, 3)[i % 2],
                                        ((5, 7), (9, 9), (4, 6))[i % 3], ORDERS[i % 3])]]
FUSED_MLP_CASES += [Case("emu", (256, 512, "layer", "kmajor", "kmajor"), dtype, "channels_last",
                         3, (3, 3), "reverse") for dtype in DTYPES]


@pytest.mark.parametrize("case", [pytest.param(c, id=str(c)) for c in FUSED_MLP_CASES])
def test_transformer_mlp_fused(kernels, case):
    d, ffn, norm, w1_kind, w2_kind = case.shape
    t = Inputs(case)
    args = (t.map(d, layout=case.layout), norm, t.vector(d, mean=1.0), t.vector(d), 1e-5,
            _nan_view(t.weight(ffn, d), w1_kind), t.vector(ffn),
            _nan_view(t.weight(d, ffn), w2_kind), t.vector(d))
    check(kernels, "transformer_mlp", args, case.dtype)


@pytest.mark.parametrize("case", cases(MLP_PROJECT, EMU_SIZES[:1] + EMU_EVEN_SIZES, GPU_SIZES))
def test_transformer_mlp_project(kernels, case):
    d, ffn, cout, act = case.shape
    t = Inputs(case)
    args = (t.map(d), t.vector(d, mean=1.0), t.vector(d), 1e-5, t.weight(ffn, d), t.vector(ffn),
            t.weight(d, ffn), t.vector(d), t.vector(d, mean=1.0), t.vector(d), 1e-5,
            t.weight(cout, d), t.vector(cout), act)
    check(kernels, "transformer_mlp_project", args, case.dtype)


# transformer_mlp_project in one launch (csrc/transformer_mlp.cu, fused_mlp_kernel<T, true>: the
# FFN's out rows stay in shared memory, their LayerNorm and the projection as a third GEMM) where
# the FFN is one launch (mvit3.h: transformer_mlp_project_fused): v3-XS's d 96 / 120 / 144 with
# the next qkv (3d) and the block's conv_proj, fp32 d 96 / 120 too; the element paths (d 36,
# Cout 20 / 130: no 16-byte chunk of t or z; F 37 odd with warps owning no chunk of F or d), no
# projection bias, weights as views of NaN buffers (a W tile read past N or K shows), Cout past
# one block chunk of 128 (432, 360), fp32 d 144 (since fp32 FFNs up to d 256 are one launch); the
# fallback: d 264 (the FFN in two launches, then the projection: 3). Batch 1 and 3 on odd and even
# maps (9 x 9 x 3: 16 blocks, launched in chunks by the emulator's 8-block grid), NCHW,
# channels_last and slices, the three thread orders. (d, F, Cout, act, projection bias, w1 view,
# w2 view, projection weight view)
PROJECT_EDGES = [
    ((96, 192, 288, "none", True, "kmajor", "kmajor", "kmajor"), torch.float16, "channels_last",
     1, (5, 7), "forward"),
    ((96, 192, 64, "silu", True, "rows", "kmajor", "rows"), torch.float32, "nchw", 3, (9, 9),
     "reverse"),
    ((120, 240, 360, "none", True, "kmajor", "rows", "kmajor"), torch.bfloat16, "nchw", 3,
     (5, 7), "random"),
    ((120, 240, 80, "silu", True, "kmajor", "kmajor", "kmajor"), torch.float32,
     "channels_last", 1, (4, 6), "forward"),
    ((144, 288, 432, "none", True, "kmajor", "kmajor", "kmajor"), torch.float16, "nchw", 1,
     (9, 9), "reverse"),
    ((144, 288, 96, "silu", True, "kmajor", "kmajor", "rows"), torch.bfloat16, "channels_last",
     3, (4, 6), "random"),
    ((36, 72, 20, "silu", False, "rows", "strided", "strided"), torch.bfloat16, "slice", 3,
     (5, 7), "reverse"),
    ((20, 37, 130, "none", True, "strided", "kmajor", "rows"), torch.float32, "channels_last",
     1, (5, 7), "random"),
    ((144, 288, 96, "silu", True, "kmajor", "kmajor", "kmajor"), torch.float32, "channels_last",
     3, (5, 7), "forward"),
    ((264, 528, 100, "none", True, "rows", "kmajor", "rows"), torch.float16, "nchw", 1, (4, 6),
     "forward"),
]


@pytest.mark.parametrize("case", [
    pytest.param(Case("emu", shape, dtype, layout, batch, size, order),
                 id=str(Case("emu", shape, dtype, layout, batch, size, order)))
    for shape, dtype, layout, batch, size, order in PROJECT_EDGES])
def test_transformer_mlp_project_one_launch(kernels, emulator_library, case):
    """One launch where transformer_mlp_project_fused (the FFN is one: d <= 256 and F <= 512,
    fp32's tiles within the emulator's sm_90 limit), three otherwise; the reference either
    way."""

    d, ffn, cout, act, proj_bias, w1_kind, w2_kind, proj_kind = case.shape
    t = Inputs(case, seed=d + cout)
    args = (t.map(d), t.vector(d, mean=1.0), t.vector(d), 1e-5,
            _nan_view(t.weight(ffn, d), w1_kind), t.vector(ffn),
            _nan_view(t.weight(d, ffn), w2_kind), t.vector(d), t.vector(d, mean=1.0), t.vector(d),
            1e-5, _nan_view(t.weight(cout, d), proj_kind), t.vector(cout) if proj_bias else None,
            act)
    check(kernels, "transformer_mlp_project", args, case.dtype)
    launches = recorded_launches(emulator_library, lambda: kernels.transformer_mlp_project(*args))
    assert launches == (1 if d <= 256 and ffn <= 512 else 3)


# fp32 FFNs are one launch where the device's shared memory takes their tiles (mvit3.h:
# transformer_mlp_fused): on an sm_90 (the emulator's default limit, 227 KB) every d <= 256, the
# v1-style d 240 / F 480 with 65.9 KB of dynamic shared memory (the opt-in); on an sm_75 (64 KB,
# mvit3_emu_set_shared_optin) d 224 / F 448 (62.9 KB) and d 192 / F 384 still, d 240 through the
# hidden workspace (transformer_mlp: two launches; transformer_mlp_project: three). The
# reference either way. (d, F, op, the device's limit in KB (0: the default), launches)
SHARED_LIMIT_EDGES = [
    ((240, 480, "transformer_mlp", 0, 1), "channels_last", 3, (5, 7), "reverse"),
    ((240, 480, "transformer_mlp", 64, 2), "nchw", 1, (4, 6), "forward"),
    ((224, 448, "transformer_mlp", 64, 1), "slice", 1, (5, 7), "random"),
    ((240, 480, "transformer_mlp_project", 0, 1), "nchw", 1, (5, 7), "random"),
    ((240, 480, "transformer_mlp_project", 64, 3), "channels_last", 3, (4, 6), "forward"),
    ((192, 384, "transformer_mlp_project", 64, 1), "channels_last", 1, (5, 7), "reverse"),
]


@pytest.mark.parametrize("case", [
    pytest.param(Case("emu", shape, torch.float32, layout, batch, size, order),
                 id=str(Case("emu", shape, torch.float32, layout, batch, size, order)))
    for shape, layout, batch, size, order in SHARED_LIMIT_EDGES])
def test_fp32_ffn_in_one_launch_within_the_devices_shared_memory(kernels, emulator_library,
                                                                 case):

    d, ffn, op, optin_kb, expected = case.shape
    t = Inputs(case, seed=d)
    args = (t.map(d), t.vector(d, mean=1.0), t.vector(d), 1e-5, t.weight(ffn, d), t.vector(ffn),
            t.weight(d, ffn), t.vector(d))
    if op == "transformer_mlp":
        args = args[:1] + ("layer",) + args[1:]
    else:
        args += (t.vector(d, mean=1.0), t.vector(d), 1e-5, t.weight(3 * d, d), t.vector(3 * d),
                 "none")
    with shared_optin(emulator_library, optin_kb):
        check(kernels, op, args, case.dtype)
        launches = recorded_launches(emulator_library, lambda: getattr(kernels, op)(*args))
    assert launches == expected


@pytest.mark.parametrize("case", cases(SEPARABLE, EMU_EVEN_SIZES, GPU_EVEN_SIZES))
def test_separable_attention(kernels, case):
    (d,) = case.shape
    t = Inputs(case)
    args = (t.map(d), t.vector(d, mean=1.0), t.vector(d), 1e-5, t.weight(1 + 2 * d, d),
            t.vector(1 + 2 * d), t.weight(d, d), t.vector(d))
    check(kernels, "separable_attention", args, case.dtype)


# separable_attention in two launches (csrc/separable_attention.cu: the context kernel, whose
# programs take their sample's GroupNorm statistics themselves and whose last program merges
# the splits, then the fused FFN kernel with relu(v) * context as its hidden activation) where
# separable_attention_fused (the fused FFN kernel takes F = d: always at the emulator's default
# sm_90 limit), three otherwise: fp32 d 256 (54 KB of tiles) on a device without the
# shared-memory opt-in (48 KB, mvit3_emu_set_shared_optin). The maps give 5 to 8 splits of
# uneven bands (emulator: at most 8, its grid limit); x has a mean of 3 (the statistics'
# centring); the weights are NaN-padded views, K-major as the fast models pack them or row-major
# or strided (d 36: the element paths).
# ((d, qkv weight, out weight, opt-in KB or 0 for the default, launches), dtype, layout, batch,
# size, order)
SEPARABLE_EDGES = [
    ((64, "kmajor", "kmajor", 0, 2), torch.float16, "channels_last", 3, (20, 6), "forward"),
    ((96, "rows", "kmajor", 0, 2), torch.bfloat16, "nchw", 1, (10, 4), "reverse"),
    ((128, "kmajor", "rows", 0, 2), torch.float32, "slice", 3, (12, 10), "random"),
    ((144, "kmajor", "kmajor", 0, 2), torch.float32, "channels_last", 1, (6, 8), "reverse"),
    ((256, "kmajor", "strided", 0, 2), torch.float16, "slice", 1, (4, 4), "forward"),
    ((256, "rows", "kmajor", 0, 2), torch.float32, "nchw", 3, (4, 6), "random"),
    ((256, "kmajor", "kmajor", 48, 3), torch.float32, "channels_last", 1, (6, 4), "reverse"),
    ((36, "strided", "rows", 0, 2), torch.float16, "channels_last", 3, (4, 6), "random"),
    ((64, "rows", "rows", 0, 2), torch.float32, "nchw", 2, (2, 2), "forward"),
]


@pytest.mark.parametrize("case", [Case("emu", *c) for c in SEPARABLE_EDGES], ids=str)
def test_separable_attention_two_launches(kernels, emulator_library, case):

    d, qkv_kind, out_kind, optin_kb, expected = case.shape
    t = Inputs(case, seed=d)
    x = t.map(d, layout=case.layout)
    x.add_(3.0)
    args = (x, t.vector(d, mean=1.0), t.vector(d), 1e-5,
            _nan_view(t.weight(1 + 2 * d, d), qkv_kind), t.vector(1 + 2 * d),
            _nan_view(t.weight(d, d), out_kind), t.vector(d))
    with shared_optin(emulator_library, optin_kb):
        check(kernels, "separable_attention", args, case.dtype)
        # the last programs left their counters at 0: a second call computes the same
        assert torch.equal(kernels.separable_attention(*args), kernels.separable_attention(*args))
        launches = recorded_launches(emulator_library,
                                     lambda: kernels.separable_attention(*args))
    assert launches == expected


def test_invalid_arguments_are_refused_with_a_reason(emulated_ops):
    kernels = emulated_ops
    x = torch.randn(1, 3 * 68, 4, 4)
    with pytest.raises(RuntimeError, match="head dim 68 > 64"):
        kernels.patch_attention(x, 1, 0.1, None, None, None)
    with pytest.raises(RuntimeError, match="H and W must be even"):
        kernels.patch_attention(torch.randn(1, 48, 5, 4), 4, 0.1, None, None, None)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        kernels.conv3x3(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, None, 3, "none")
    with pytest.raises(RuntimeError, match="dilation must be a positive int"):
        kernels.conv3x3(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, None, 1, "none", 0)
    with pytest.raises(RuntimeError, match="norm must be"):
        kernels.pointwise_conv(torch.randn(1, 8, 4, 4), torch.randn(4, 8), None, None, None,
                               "batch", None, None, 1e-5, "none")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        kernels.pointwise_conv(torch.randn(1, 8, 4, 4), torch.randn(4, 9), None, None, None,
                               "none", None, None, 1e-5, "none")
    with pytest.raises(RuntimeError, match="shares its dtype"):
        kernels.pointwise_conv(torch.randn(1, 8, 4, 4), torch.randn(4, 8).double(), None, None,
                               None, "none", None, None, 1e-5, "none")


@pytest.fixture(params=["emulated", "library"])
def why_not(request):
    """The library's own checks of a call, <op>_why_not (the reason, or None): of the emulated
    build, and of the loaded CUDA library through cuda_lib.why_unsupported, which
    backend="auto" asks with meta tensors before it dispatches there."""
    if request.param == "emulated":
        kernels = request.getfixturevalue("emulated_ops")
        return lambda op, args: getattr(kernels, f"{op}_why_not")(*args) or None
    request.getfixturevalue("cuda_ops")
    return cuda_lib.why_unsupported


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def test_the_library_states_why_it_refuses_a_call(why_not):
    """Calls described by meta tensors: each refusal in the words of the op's TORCH_CHECK."""
    m = _meta
    assert why_not("patch_attention", (m(1, 204, 4, 4), 1, 0.1, None, None, None)) == \
        "head dim 68 > 64 is not supported by the CUDA kernels"
    assert why_not("patch_attention", (m(2, 720, 32, 32), 4, 0.1, None, None, None)) is None
    assert why_not("patch_attention", (m(1, 48, 4, 4), 4, 0.1, m(16, 8), None, None)) == \
        "proj_weight must have shape [16, 16], got [16, 8]"
    assert why_not("separable_attention",
                   (m(1, 8, 5, 4), m(8), m(8), 1e-5, m(17, 8), m(17), m(8, 8), m(8))) == \
        "separable_attention sees the map as 2x2 patches: H and W must be even, got 5x4"
    conv = (m(1, 3, 8, 8), m(4, 3, 3, 3), None, None)
    assert why_not("conv3x3", conv + (3, "none")) == "stride must be 1 or 2, got 3"
    assert why_not("conv3x3", conv + (1, "none", 0)) == "dilation must be a positive int, got 0"
    assert why_not("conv3x3", conv + (1, "gelu")) == "act must be 'none' or 'silu', got 'gelu'"
    assert why_not("conv3x3", (m(1, 3, 8, 8, dtype=torch.float64),) + conv[1:] + (1, "none")) == \
        "dtype Double is not supported (float32, float16, bfloat16)"
    assert why_not("dwconv_pointwise", (m(1, 8, 8, 8), m(8, 1, 3, 3), m(8), m(4, 8), None, 1, None,
                                        36)) is None
    # a whole MV2 block: the depthwise 3x3 and the projection see the hidden channels
    block = (m(1, 8, 8, 8), m(32, 1, 3, 3), m(32), m(4, 32), None, 2, None, 1, m(32, 8), m(32))
    assert why_not("dwconv_pointwise", block) is None
    assert why_not("dwconv_pointwise", block[:8] + (m(32, 9), m(32))) == \
        "expand_weight must have shape [32, 8], got [32, 9]"
    assert why_not("dwconv_pointwise", block[:8] + (None, m(32))) == \
        "expand_bias given without expand_weight"
    pointwise = (m(1, 8, 4, 4), m(4, 8), None, None, None, "none", None, None, 1e-5, "none")
    assert why_not("pointwise_conv", pointwise) is None
    assert why_not("pointwise_conv", pointwise[:5] + ("batch",) + pointwise[6:]) == \
        "norm must be 'none', 'layer' or 'group', got 'batch'"
    assert why_not("pointwise_conv", (pointwise[0], m(4, 8, dtype=torch.float16)) + pointwise[2:]) \
        == "weight is Half but the input is Float (every tensor of a call shares its dtype)"
    mlp = (m(1, 16, 4, 4), m(16), m(16), 1e-5, m(32, 16), m(32), m(16, 32), m(16))
    assert why_not("transformer_mlp", (mlp[0], "group") + mlp[1:]) is None
    assert why_not("transformer_mlp", (mlp[0], "group") + mlp[1:7] + (m(32, 16),)) == \
        "b2 must have shape [16], got [32, 16]"
    project = mlp + (m(16), m(16), 1e-5, m(48, 16), m(48))
    assert why_not("transformer_mlp_project", project + ("silu",)) is None
    assert why_not("transformer_mlp_project", project + ("relu",)) == \
        "act must be 'none' or 'silu', got 'relu'"


def _expanded(*shape) -> torch.Tensor:
    """A CPU tensor of any size holding one element (stride 0 everywhere): sizes for the checks,
    which refuse it before anything is allocated or read."""
    return torch.zeros((1,) * len(shape)).expand(*shape)


_ONE = torch.zeros(1)  # stands for a tensor argument the check never reaches

# (op, args, part of the reason): each call is over exactly one size limit of csrc/mvit3.h.
SIZE_LIMITS = [
    ("pointwise_conv", (_expanded(2 ** 31, 8, 1, 1), torch.zeros(4, 8), None, None, None, "none",
                        None, None, 1e-5, "none"), "has a size over 2^31 - 1"),
    ("pointwise_conv", (_expanded(1, 8, 65536, 32769), torch.zeros(4, 8), None, None, None, "none",
                        None, None, 1e-5, "none"), "H * W = 2147549184 pixels, over 2^31 - 1"),
    ("pointwise_conv", (torch.zeros(1, 8, 2, 2), _expanded(4194241, 10), None,
                        torch.zeros(1, 2, 2, 2), None, "none", None, None, 1e-5, "none"),
     "weight (Cout) has 4194241 channels, over 4194240"),
    ("conv3x3", (torch.zeros(1, 3, 4, 4), _expanded(4194241, 3, 3, 3), None, None, 1, "none"),
     "weight (Cout) has 4194241 channels"),
    ("conv3x3", (torch.zeros(1, 3, 4, 4), _expanded(8, 4194244, 3, 3), None,
                 _expanded(1, 4194241, 4, 4), 1, "none"), "x2 has 4194241 channels"),
    ("dwconv_pointwise", (_expanded(1, 4194241, 2, 2), _ONE, _ONE, _expanded(4, 4194241), None, 1,
                          None), "x has 4194241 channels"),
    ("dwconv_pointwise", (_expanded(1, 1, 2 ** 30, 1), _expanded(1, 1, 3, 3), torch.zeros(1),
                          torch.zeros(1, 1), None, 1, None, 2 ** 30 + 1), "H + dilation and W + dilation"),
    ("patch_attention", (_expanded(1, 3 * 65536, 2, 2), 65536, 1.0, None, None, None),
     "num_heads 65536 is over 65535"),
    ("transformer_mlp", (torch.zeros(1, 8, 2, 2), "layer", _ONE, _ONE, 1e-5,
                         _expanded(4194241, 8), _ONE, _ONE, _ONE), "w1 (F) has 4194241 channels"),
    ("separable_attention", (_expanded(1, 257, 2, 2), _ONE, _ONE, 1e-5, _ONE, _ONE, _ONE, _ONE),
     "separable_attention takes d <= 256"),
]


@pytest.mark.parametrize("op, args, expected", SIZE_LIMITS,
                         ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(SIZE_LIMITS)])
def test_size_limits_are_stated_alike_by_both_sides(emulated_ops, op, args, expected):
    """The limits left (by dimension and grid, none by numel): the op's checks, asked as
    <op>_why_not, name each with its reason, and the op refuses the call in the very words."""
    reason = getattr(emulated_ops, f"{op}_why_not")(*args)
    assert expected in reason
    with pytest.raises(RuntimeError) as refused:
        getattr(emulated_ops, op)(*args)
    assert f"mvit3: {reason}" in str(refused.value)


@pytest.mark.parametrize("op, args, expected", SIZE_LIMITS,
                         ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(SIZE_LIMITS)])
def test_size_limits_of_calls_described_by_meta_tensors(why_not, op, args, expected):
    meta = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                 if isinstance(a, torch.Tensor) else a for a in args)
    reason = why_not(op, meta)
    assert reason is not None and expected in reason


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launches_split_at_the_grid_limit(emulated_ops, dtype):
    """The emulator takes at most 8 blocks on grid axis x (csrc/mvit3.h: kMaxGridX), so at
    batch 9 of 8x8 maps every launcher splits its grid: GroupNorm statistics (9 samples), the
    GEMMs (9 tiles of 64 pixels), attention and the context (4 blocks a sample). The chunks
    must cover the batch exactly, each sample at its own offsets."""
    case = Case("emu", (), dtype, LAYOUTS[DTYPES.index(dtype)], 9, (8, 8))
    t = Inputs(case)
    check(emulated_ops, "pointwise_conv",
          (t.map(24), t.weight(40, 24), t.vector(40), None, t.map(40), "group",
           t.vector(24, mean=1.0), t.vector(24), 1e-5, "silu"), dtype)
    check(emulated_ops, "patch_attention",
          (t.map(3 * 24), 2, 12 ** -0.5, t.weight(24, 24), t.vector(24), t.map(24)), dtype)
    d = 16
    check(emulated_ops, "separable_attention",
          (t.map(d), t.vector(d, mean=1.0), t.vector(d), 1e-5, t.weight(1 + 2 * d, d),
           t.vector(1 + 2 * d), t.weight(d, d), t.vector(d)), dtype)


# ---- whole models -----------------------------------------------------------------------------

# Whole models: relative error of the logits against a float64 copy of the same (rounded)
# weights on the same (rounded) input, so only the kernels' rounding counts. Measured on the
# emulator at 64 px: fp32 1.4e-6, fp16 2.9e-3, bf16 3.7e-2 at most (v2-style models, whose
# GroupNorm statistics span whole maps, are the least precise). About 5x headroom:
MODEL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1.5e-2, torch.bfloat16: 2e-1}


def _model_pair(name: str, dtype, device, backend: str):
    """(float64 reference model, fast model in dtype) with the same weights."""
    import copy

    import model_utils
    import mvit3.fast

    low = model_utils.randomize_(mvit3.create_model(name), 0).to(device=device, dtype=dtype).eval()
    return copy.deepcopy(low).double(), mvit3.fast.convert(low, backend=backend).eval()


def _model_error(ref, model, x) -> float:
    with torch.no_grad():
        expected, got = ref(x.double()), model(x).double()
    assert got.shape == expected.shape
    return (got - expected).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize("name, dtype", [("mobilevitv3_xxs", torch.float32),
                                         ("mobilevitv3_050", torch.float16),
                                         ("mobilevit_xxs", torch.bfloat16)], ids=str)
def test_fast_model_on_the_emulated_kernels(emulated_ops, monkeypatch, name, dtype):
    """A fast model whose every op runs the emulated CUDA kernels (routed through the torch
    backend's op table) against the reference model: the library computes whole models, with
    their K-major weights, channel slices and layouts. 64 px: maps 32x32 down to 2x2."""
    from mvit3.ops import library

    for op in library.OPS:
        monkeypatch.setattr(reference, op, getattr(emulated_ops, op))
    ref, model = _model_pair(name, dtype, "cpu", backend="torch")
    err = _model_error(ref, model, torch.rand(1, 3, 64, 64).to(dtype))
    assert err <= MODEL_TOLERANCE[dtype], f"relative error {err:.3g}"


# ---- GPU only ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", mvit3.list_models())
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fast_models_with_the_cuda_backend(cuda_ops, name, dtype):
    """All 15 fast models with backend="cuda" at 256 px, batch 2."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 needs compute capability 8.0")
    ref, model = _model_pair(name, dtype, "cuda", backend="cuda")
    err = _model_error(ref, model, torch.rand(2, 3, 256, 256, device="cuda").to(dtype))
    assert err <= MODEL_TOLERANCE[dtype], f"relative error {err:.3g}"


def _graph_args(seed: int = 0):
    t = Inputs(Case("cuda", (), torch.float16, "channels_last", 2, (16, 16)), seed)
    return (t.map(3 * 96), 4, 24 ** -0.5, t.weight(96, 96), t.vector(96), t.map(96))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay(cuda_ops):
    """Launches on the current stream, no host sync, outputs and workspaces from the caching
    allocator: two captured ops replay on new input data and match eager, bit for bit."""
    static = _graph_args()

    def block():
        t = cuda_ops.patch_attention(*static)
        return cuda_ops.transformer_mlp(t, "layer", static[4], static[4], 1e-5, static[3],
                                        static[4], static[3], static[4])

    first_expected = block()  # also the warm-up before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = block()
    graph.replay()
    first = captured.clone()
    static[0].copy_(_graph_args(seed=1)[0])
    graph.replay()
    second_expected = block()
    torch.cuda.synchronize()
    assert torch.equal(first, first_expected)
    assert torch.equal(captured, second_expected) and not torch.equal(captured, first)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_compile_fullgraph(cuda_ops):
    """mvit3.ops with backend="cuda" traces into one graph (fake kernels in Python)."""
    import mvit3.ops as ops

    args = _graph_args()

    def block(qkv, heads, scale, w, b, x):
        t = ops.patch_attention(qkv, heads, scale, w, b, x, backend="cuda")
        return ops.pointwise_conv(t, w, b, None, x, "layer", b, b, 1e-5, "silu", backend="cuda")

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(*args), block(*args), rtol=0, atol=0)


# ---- the emulator itself ----------------------------------------------------------------------

_EMULATOR_PROBES = r"""
#include <cstring>
#include <string>
#include "emulator.h"

namespace {

void mirror(int* out) {  // a barrier between shared-memory writes and reads of other threads
  MVIT3_SHARED(int[64], values);
  values[threadIdx.x] = 10 * threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = values[63 - threadIdx.x];
}

void unsynchronised_mirror(int* out) {  // the same race without the barrier
  MVIT3_SHARED(int[64], values);
  values[threadIdx.x] = 10 * threadIdx.x;
  out[threadIdx.x] = values[63 - threadIdx.x];
}

void neighbour(int* out) {  // reads a value thread i - 1 wrote, without a barrier
  MVIT3_SHARED(int[64], values);
  values[threadIdx.x] = 10 * threadIdx.x;
  out[threadIdx.x] = threadIdx.x ? values[threadIdx.x - 1] : -10;
}

void read_before_write(int* out) {  // block 1 reads what only block 0 wrote
  MVIT3_SHARED(float[64], values);
  if (blockIdx.x == 0) values[threadIdx.x] = 1.0f;
  __syncthreads();
  if (blockIdx.x == 1) std::memcpy(&out[threadIdx.x], &values[threadIdx.x], sizeof(float));
}

void two_barriers(int*) {  // warp 0 at one __syncthreads, warp 1 at another
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

void shuffle(int* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 5); }

void split_warp(int*) {  // half a warp at __syncwarp, the other half at __syncthreads
  if (threadIdx.x % 2) __syncwarp(); else __syncthreads();
}

void misaligned_wmma(int*) {
  MVIT3_SHARED_ALIGNED(__half[16 * 16 + 16], tile, 32);
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile + 1, 16);
}

}  // namespace

extern "C" const char* probe(const char* name, int order, int blocks, int* out) {
  static std::string error;
  error.clear();
  void (*kernel)(int*) = nullptr;
  const std::string which = name;
  if (which == "mirror") kernel = mirror;
  if (which == "unsynchronised_mirror") kernel = unsynchronised_mirror;
  if (which == "neighbour") kernel = neighbour;
  if (which == "read_before_write") kernel = read_before_write;
  if (which == "two_barriers") kernel = two_barriers;
  if (which == "shuffle") kernel = shuffle;
  if (which == "split_warp") kernel = split_warp;
  if (which == "misaligned_wmma") kernel = misaligned_wmma;
  mvit3_emu_set_schedule(order, 12345);
  try {
    mvit3::emu::launch(dim3(blocks), dim3(64), [&] { kernel(out); });
  } catch (const std::exception& e) {
    error = e.what();
  }
  return error.c_str();
}
"""


def _compiled_probe(tmp_path_factory, name: str, source: str, *flags: str):
    """The `probe` function of `source` compiled with the host compiler against csrc/ (no
    torch) into a shared library; skips without a host C++ compiler."""
    import ctypes

    probe = ctypes.CDLL(str(_probe_library(tmp_path_factory, name, source, *flags))).probe
    probe.restype = ctypes.c_char_p
    return probe


def _probe_library(tmp_path_factory, name: str, source: str, *flags: str):
    """`source` compiled with the host compiler against csrc/ (no torch) into a shared library,
    its path; skips without a host C++ compiler."""
    import shutil
    import subprocess

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (the emulated op tests above need one too)")
    directory = tmp_path_factory.mktemp(name)
    (directory / "probe.cpp").write_text(source)
    lib = directory / "probe.so"
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", *flags, "-o", str(lib),
                    str(directory / "probe.cpp"), f"-I{build.SOURCE_ROOT / 'csrc'}",
                    f"-I{build.cuda_header_dir()}"], check=True)
    return lib


@pytest.fixture(scope="module")
def emulator_probe(tmp_path_factory):
    """Small kernels compiled with csrc/emulator.h alone (host compiler, no torch)."""
    import ctypes

    probe = _compiled_probe(tmp_path_factory, "emulator_probe", _EMULATOR_PROBES)

    def run(name: str, order: str = "forward", blocks: int = 1):
        out = (ctypes.c_int * 64)()
        error = probe(name.encode(), ORDERS.index(order), blocks, out).decode()
        return list(out), error

    return run


def test_emulator_barriers_shuffles_and_api_checks(emulator_probe):
    for order in ORDERS:
        out, error = emulator_probe("mirror", order)
        assert not error and out == [10 * (63 - i) for i in range(64)]
    # A race that the forward order hides (thread i - 1 has run up to its end before thread i
    # reads) and the reverse and random orders show.
    expected = [10 * (i - 1) for i in range(64)]
    assert emulator_probe("neighbour", "forward") == (expected, "")
    for order in ("reverse", "random"):
        out, error = emulator_probe("neighbour", order)
        assert not error and out != expected
    # Every block starts with shared memory full of NaN bytes: the second block reads NaN, not
    # the first block's 1.0.
    out, error = emulator_probe("read_before_write", blocks=2)
    assert not error and all(math.isnan(v) for v in struct.unpack("64f", struct.pack("64i", *out)))
    # Threads run in order and shared memory starts full of NaN bytes, so the race shows.
    out, error = emulator_probe("unsynchronised_mirror")
    assert not error and out != [10 * (63 - i) for i in range(64)]
    out, error = emulator_probe("shuffle")
    assert not error and out == [i ^ 5 for i in range(64)]
    assert "deadlock" in emulator_probe("split_warp")[1]
    error = emulator_probe("two_barriers")[1]
    assert "__syncthreads() at different call sites: thread (0,0,0) at probe.cpp:" in error
    assert ", thread (32,0,0) at probe.cpp:" in error
    assert "not 256-bit aligned" in emulator_probe("misaligned_wmma")[1]


# ---- dynamic shared memory (device.cuh: MVIT3_SHARED_DYNAMIC, allow_dynamic_shared,
# launch_with_dynamic_shared; emulator.h: the buffer, the opt-in and the device's limit)

_DYNAMIC_SHARED_PROBES = r"""
#include <cstring>
#include <string>
#include "device.cuh"

namespace {

int64_t launch_bytes = 0;  // the launch's dynamic shared memory

// A barrier between its writes and other threads' reads. Each opt-in scenario has its own
// instance: an opt-in is per kernel, for the process's lifetime.
template <int kInstance>
__global__ void mirror(int* out) {
  MVIT3_SHARED_DYNAMIC(bytes, 16);
  int* values = reinterpret_cast<int*>(bytes);
  values[threadIdx.x] = 10 * threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = values[63 - threadIdx.x];
}

__global__ void read_before_write(int* out) {  // block 1 reads what only block 0 wrote
  MVIT3_SHARED_DYNAMIC(bytes, 16);
  float* values = reinterpret_cast<float*>(bytes);
  if (blockIdx.x == 0) values[threadIdx.x] = 1.0f;
  __syncthreads();
  if (blockIdx.x == 1) std::memcpy(&out[threadIdx.x], &values[threadIdx.x], sizeof(float));
}

__global__ void past_the_end(int* out) {  // the byte after the launch's dynamic shared memory
  MVIT3_SHARED_DYNAMIC(bytes, 16);
  if (threadIdx.x == 0) out[0] = bytes[launch_bytes];
}

__global__ void with_static(int* out) {  // 40 KB of static shared memory beside the dynamic
  MVIT3_SHARED(int[10 * 1024], values);
  MVIT3_SHARED_DYNAMIC(bytes, 16);
  values[threadIdx.x] = int(threadIdx.x);
  bytes[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = values[threadIdx.x] + bytes[threadIdx.x];
}

}  // namespace

// Launch kernel `name` with `bytes` of dynamic shared memory, after allowing it `allow` bytes
// (0: no opt-in) on a device whose opt-in limit is `optin` (0: the default, an sm_90's);
// returns the error, "" if none.
extern "C" const char* probe(const char* name, int64_t bytes, int64_t allow, int64_t optin,
                             int blocks, int* out) {
  static std::string error;
  error.clear();
  void (*kernel)(int*) = nullptr;
  const std::string which = name;
  void (*const mirrors[])(int*) = {mirror<0>, mirror<1>, mirror<2>, mirror<3>, mirror<4>};
  for (int i = 0; i < 5; ++i)
    if (which == "mirror" + std::to_string(i)) kernel = mirrors[i];
  if (which == "read_before_write") kernel = read_before_write;
  if (which == "past_the_end") kernel = past_the_end;
  if (which == "with_static") kernel = with_static;
  launch_bytes = bytes;
  mvit3_emu_set_shared_optin(optin);
  try {
    if (allow) mvit3::allow_dynamic_shared(kernel, size_t(allow));
    mvit3::launch_with_dynamic_shared(kernel, dim3(blocks), dim3(64), size_t(bytes),
                                      mvit3::Stream{}, out);
  } catch (const std::exception& e) {
    error = e.what();
  }
  mvit3_emu_set_shared_optin(0);
  return error.c_str();
}
"""


def _dynamic_shared_runner(probe):
    import ctypes

    probe.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    probe.restype = ctypes.c_char_p

    def run(name: str, bytes_: int, allow: int = 0, optin: int = 0, blocks: int = 1):
        out = (ctypes.c_int * 64)()
        error = probe(name.encode(), bytes_, allow, optin, blocks, out).decode()
        return list(out), error

    return run


@pytest.fixture(scope="module")
def dynamic_shared_probe(tmp_path_factory):
    """Kernels with dynamic shared memory on the emulator (host compiler, no torch)."""
    return _dynamic_shared_runner(_compiled_probe(tmp_path_factory, "dynamic_shared_probe",
                                                  _DYNAMIC_SHARED_PROBES, "-DMVIT3_EMULATE"))


def test_emulated_dynamic_shared_memory(dynamic_shared_probe):
    run = dynamic_shared_probe
    for bytes_ in (256, 100 * 1024):  # without and with the opt-in
        out, error = run("mirror0", bytes_, allow=bytes_ if bytes_ > 48 * 1024 else 0)
        assert not error and out == [10 * (63 - i) for i in range(64)]
    # every block starts with it full of NaN bytes, as static shared memory
    out, error = run("read_before_write", 256, blocks=2)
    assert not error and all(math.isnan(v) for v in struct.unpack("64f", struct.pack("64i", *out)))
    # past 48 KB a kernel must opt in; up to the device's limit (static and dynamic together)
    assert "over the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (49152)" in \
        run("mirror1", 48 * 1024 + 16)[1]
    assert run("mirror1", 48 * 1024)[1] == ""
    assert "cannot allow a kernel 65552 bytes of dynamic shared memory on device 0" in \
        run("mirror2", 64 * 1024, allow=64 * 1024 + 16, optin=64 * 1024)[1]
    assert run("mirror2", 64 * 1024, allow=64 * 1024, optin=64 * 1024)[1] == ""
    assert "over the kernel's" in run("mirror2", 96 * 1024)[1]
    assert run("mirror3", 256, allow=100 * 1024)[1] == ""  # allowed on an sm_90 ...
    assert "or the device's opt-in limit (65536)" in \
        run("mirror3", 64 * 1024 + 16, optin=64 * 1024)[1]  # ... is not on an sm_75
    assert run("with_static", 24 * 1024, optin=64 * 1024)[1] == ""
    assert "static and dynamic shared memory over the device's 65536 bytes" in \
        run("with_static", 24 * 1024 + 16, optin=64 * 1024)[1]
    assert "dynamic shared memory declared by a launch without any" in run("mirror4", 0)[1]


@pytest.mark.skipif(SANITIZE is not None, reason="runs its own sanitized process")
def test_dynamic_shared_memory_overrun_fails_under_address_sanitizer(tmp_path_factory):
    """The emulator's dynamic shared memory is a heap block of exactly the launch's bytes: a read
    of the byte after it is an AddressSanitizer error (a subprocess that preloads its runtime)."""
    import subprocess
    import sys

    try:
        preload = build.asan_preload()
    except build.BuildError as err:
        pytest.skip(str(err))
    # loaded in the subprocess alone: an instrumented library needs the runtime preloaded
    library = _probe_library(tmp_path_factory, "dynamic_shared_asan", _DYNAMIC_SHARED_PROBES,
                             "-DMVIT3_EMULATE", "-fsanitize=address")
    script = (
        "import ctypes, sys; sys.path.insert(0, %r); import test_cuda_ops as t; "
        "run = t._dynamic_shared_runner(ctypes.CDLL(%r).probe); "
        "assert run('mirror0', 256) == ([10 * (63 - i) for i in range(64)], ''); "
        "print('in bounds: ok', flush=True); run('past_the_end', 256)"
        % (os.path.dirname(os.path.abspath(__file__)), str(library)))
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True)
    output = result.stdout + result.stderr
    assert "in bounds: ok" in output, output[-4000:]
    assert result.returncode != 0 and "heap-buffer-overflow" in output, output[-4000:]


# One reverse-order case of each op (batch 3: samples end inside pixel tiles) and the long
# sequences' partial key tile: the masking at the ends of the tiles is where an access past an
# array would be.
ASAN_CASES = [f"{test}[{next(p.id for p in params if '-reverse-' in p.id)}]"
              for test, params in (
                  ("test_pointwise_conv", cases(POINTWISE, EMU_SIZES, GPU_SIZES)),
                  ("test_dwconv_pointwise", cases(DWCONV, EMU_SIZES, GPU_SIZES)),
                  ("test_dwconv_pointwise_expand", cases(MV2_BLOCKS, EMU_SIZES, GPU_SIZES)),
                  ("test_conv3x3", cases(CONV3X3, EMU_SIZES, GPU_SIZES)),
                  ("test_patch_attention",
                   cases(ATTENTION_USES, EMU_EVEN_SIZES, GPU_EVEN_SIZES)),
                  ("test_transformer_mlp",
                   cases(MLP, EMU_SIZES[:1] + EMU_EVEN_SIZES, GPU_SIZES)),
                  ("test_transformer_mlp_project",
                   cases(MLP_PROJECT, EMU_SIZES[:1] + EMU_EVEN_SIZES, GPU_SIZES)),
                  ("test_separable_attention",
                   cases(SEPARABLE, EMU_EVEN_SIZES, GPU_EVEN_SIZES)))]
ASAN_CASES.append(f"test_patch_attention_long_sequences[{LONG_SEQUENCE_CASES[1]}]")
# the fused out_proj's element paths (d = 36), and its widest heads tile and W tiles (d = 256)
ASAN_CASES += [f"test_patch_attention_fused_projection[{c}]" for c in FUSED_PROJECTION_CASES
               if c.order == "reverse" and c.shape[0] in (36, 256)]
# the one-kernel MV2 block at Cin = 192: its widest expansion weights' step in shared memory
ASAN_CASES.append("test_mv2_block_one_kernel_edges[" + str(Case("emu", *MV2_EDGES[6])) + "]")
# the one-launch FFN's element paths (d = 36) and its largest tiles (d = 256, F = 512: fp16's
# static, fp32's dynamic shared memory)
ASAN_CASES += [f"test_transformer_mlp_fused[{c}]" for c in FUSED_MLP_CASES
               if c.order == "reverse" and (c.shape[0] == 36 or c.size == (3, 3)
                                            and c.dtype in (torch.float16, torch.float32))]
# the one-launch transformer_mlp_project's element paths (d = 36) and Cout past one chunk (432)
ASAN_CASES += [f"test_transformer_mlp_project_one_launch[{Case('emu', *PROJECT_EDGES[i])}]"
               for i in (4, 6)]
# fp32's dynamic shared memory at d 224 / F 448 where the device's limit is an sm_75's
ASAN_CASES.append("test_fp32_ffn_in_one_launch_within_the_devices_shared_memory["
                  + str(Case("emu", SHARED_LIMIT_EDGES[2][0], torch.float32,
                             *SHARED_LIMIT_EDGES[2][1:])) + "]")
# separable attention's context kernel over 8 uneven splits (partials, counters) with the fused
# out of d 64, and fp32 d 256 through the three-launch path (the v workspace)
ASAN_CASES += [f"test_separable_attention_two_launches[{Case('emu', *SEPARABLE_EDGES[i])}]"
               for i in (0, 6)]
# conv3x3's tap-major chunks of two inputs, and at stride 2 with the padding's zero chunks
ASAN_CASES += [f"test_conv3x3_tap_major[{Case('emu', c[0], c[2], 'channels_last', *c[3:])}]"
               for c in TAP_MAJOR[:2]]


@pytest.mark.skipif(SANITIZE is not None, reason="this is the test that runs the others so")
def test_emulated_ops_under_address_sanitizer():
    """A few op tests again on the emulator built with AddressSanitizer: an access past a
    global, shared (each variable is its own heap block), local or fiber-stack array fails the
    run. In a subprocess that preloads the sanitizer's runtime, which must come first in a
    process that loads an instrumented library."""
    import subprocess
    import sys

    try:
        preload = build.asan_preload()
    except build.BuildError as err:
        pytest.skip(str(err))
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, LD_PRELOAD=preload, MVIT3_EMULATOR_SANITIZE="address",
               # Python and torch keep allocations to their exit: leaks are not the question.
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1")
    # -s: no capture, so that a sanitizer report (written to fd 2 just before the process
    # exits) comes back instead of dying in pytest's capture file.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-x",
         *[f"{os.path.join(here, 'test_cuda_ops.py')}::{case}" for case in ASAN_CASES]],
        env=env, cwd=os.path.dirname(here), capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"{len(ASAN_CASES)} passed" in output, output[-6000:]


# ---- cp.async, ldmatrix and mma.sync twins (device.cuh) ---------------------------------------

_WARP_MATRIX_PROBES = r"""
#include <cstring>
#include <string>
#include "device.cuh"

namespace {

using mvit3::cp_async;
using mvit3::cp_async_commit;
using mvit3::cp_async_wait;
using mvit3::ldmatrix;

// A (16 x 16, row-major) and B (16 x 8, row-major [k][n]) of 16-bit elements, staged in shared
// memory by plain copies; in: A then B, 384 elements.
struct Staged {
  uint16_t* a;
  uint16_t* b;
};

template <class Shared>
Staged stage(Shared& tile, const uint16_t* in) {
  for (int e = threadIdx.x; e < 384; e += 32) tile[e] = in[e];
  __syncthreads();
  return {tile, tile + 256};
}

// Per lane: ldmatrix x4 of A (lane l at row l % 16, column 8 (l / 16)), x2.trans of B (lane l
// at row l % 16), x4.trans of A (same addresses), x1 of A (lane l at row l % 8), x2 of A
// (lane l at row l % 16): 13 registers.
void fragments(const void* in, void* out) {
  MVIT3_SHARED_ALIGNED(uint16_t[384], tile, 16);
  const Staged s = stage(tile, static_cast<const uint16_t*>(in));
  const int l = threadIdx.x;
  uint32_t regs[13];
  uint32_t a[4], b[2], t[4], x1[1], x2[2];
  ldmatrix<4>(a, s.a + (l % 16) * 16 + 8 * (l / 16));
  ldmatrix<2, true>(b, s.b + (l % 16) * 8);
  ldmatrix<4, true>(t, s.a + (l % 16) * 16 + 8 * (l / 16));
  ldmatrix<1>(x1, s.a + (l % 8) * 16);
  ldmatrix<2>(x2, s.a + (l % 16) * 16);
  std::memcpy(regs, a, 16);
  std::memcpy(regs + 4, b, 8);
  std::memcpy(regs + 6, t, 16);
  std::memcpy(regs + 10, x1, 4);
  std::memcpy(regs + 11, x2, 8);
  std::memcpy(static_cast<uint32_t*>(out) + 13 * l, regs, sizeof(regs));
}

// D = A B + C (C: 128 floats after A and B in `in`), D written row-major [16][8] through the
// documented accumulator layout. wrong: "rows" swaps a[1] and a[2] (rows g + 8 and columns
// 2t + 8 mixed up), "b" loads B without .trans: lane mappings a kernel could get wrong.
template <class T>
void mma(const void* in, void* out, const std::string& wrong) {
  MVIT3_SHARED_ALIGNED(uint16_t[384], tile, 16);
  const Staged s = stage(tile, static_cast<const uint16_t*>(in));
  const float* c_in = reinterpret_cast<const float*>(static_cast<const uint16_t*>(in) + 384);
  const int l = threadIdx.x, g = l / 4, t = l % 4;
  uint32_t a[4], b[2];
  ldmatrix<4>(a, s.a + (l % 16) * 16 + 8 * (l / 16));
  if (wrong == "b")
    ldmatrix<2>(b, s.b + (l % 16) * 8);
  else
    ldmatrix<2, true>(b, s.b + (l % 16) * 8);
  if (wrong == "rows") std::swap(a[1], a[2]);
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = c_in[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  mvit3::mma_m16n8k16<T>(d, a, b, c);
  float* d_out = static_cast<float*>(out);
  for (int i = 0; i < 4; ++i) d_out[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// Two groups of cp.async (16 bytes a lane; the second reads 8 and zero-fills 8), with what the
// lane sees of its destinations before any wait, after wait_group 1 and after wait_group 0:
// 7 words a lane.
void async_copies(const void* in, void* out) {
  MVIT3_SHARED_ALIGNED(uint32_t[256], dst, 16);
  const uint32_t* src = static_cast<const uint32_t*>(in);
  uint32_t* o = static_cast<uint32_t*>(out) + 7 * threadIdx.x;
  const int l = threadIdx.x;
  cp_async<16>(&dst[4 * l], &src[4 * l]);
  cp_async_commit();
  cp_async<16>(&dst[128 + 4 * l], &src[128 + 4 * l], 8);
  cp_async_commit();
  o[0] = dst[4 * l];
  cp_async_wait<1>();
  o[1] = dst[4 * l];
  o[2] = dst[128 + 4 * l];
  cp_async_wait<0>();
  std::memcpy(&o[3], &dst[128 + 4 * l], 16);
}

void misaligned_cp_async(const void* in, void*) {
  MVIT3_SHARED_ALIGNED(uint32_t[256], dst, 16);
  cp_async<16>(&dst[4 * threadIdx.x + 1], static_cast<const uint32_t*>(in));
}

void cp_async_to_global(const void* in, void* out) {
  cp_async<4>(static_cast<uint32_t*>(out) + threadIdx.x, static_cast<const uint32_t*>(in));
}

void misaligned_ldmatrix(const void* in, void*) {
  MVIT3_SHARED_ALIGNED(uint16_t[384], tile, 16);
  const Staged s = stage(tile, static_cast<const uint16_t*>(in));
  uint32_t a[4];
  ldmatrix<4>(a, s.a + (threadIdx.x % 16) * 16 + 4);
}

}  // namespace

extern "C" const char* probe(const char* name, const void* in, void* out) {
  static std::string error;
  error.clear();
  const std::string which = name;
  try {
    mvit3::emu::launch(dim3(1), dim3(32), [&] {
      if (which == "fragments") fragments(in, out);
      if (which == "mma_f16") mma<__half>(in, out, "");
      if (which == "mma_bf16") mma<__nv_bfloat16>(in, out, "");
      if (which == "mma_wrong_rows") mma<__half>(in, out, "rows");
      if (which == "mma_wrong_b") mma<__half>(in, out, "b");
      if (which == "async_copies") async_copies(in, out);
      if (which == "misaligned_cp_async") misaligned_cp_async(in, out);
      if (which == "cp_async_to_global") cp_async_to_global(in, out);
      if (which == "misaligned_ldmatrix") misaligned_ldmatrix(in, out);
    });
  } catch (const std::exception& e) {
    error = e.what();
  }
  return error.c_str();
}
"""


@pytest.fixture(scope="module")
def warp_matrix_probe(tmp_path_factory):
    """Small kernels of device.cuh's cp_async, ldmatrix and mma_m16n8k16 on the emulator (host
    compiler, no torch)."""
    import ctypes

    probe = _compiled_probe(tmp_path_factory, "warp_matrix_probe", _WARP_MATRIX_PROBES,
                            "-DMVIT3_EMULATE")

    def run(name: str, data: torch.Tensor, out: torch.Tensor) -> str:
        data, out = data.contiguous(), out.contiguous()
        return probe(name.encode(), ctypes.c_void_p(data.data_ptr()),
                     ctypes.c_void_p(out.data_ptr())).decode()

    return run


def _operands(dtype):
    """A [16, 16], B [16, 8] (dtype) and C [16, 8] (fp32), and `in` for the probes: their bits
    one after another."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    c = torch.randn(16, 8, generator=gen)
    data = torch.cat([a.flatten().view(torch.int16), b.flatten().view(torch.int16),
                      c.flatten().view(torch.int16)])
    return a, b, c, data


def _pair(m, row0, col0, row1, col1) -> int:
    """A 32-bit register of two 16-bit elements, m[row0, col0] in the low half."""
    bits = m.view(torch.int16).to(torch.int64) & 0xFFFF
    return int(bits[row0, col0]) | int(bits[row1, col1]) << 16


def test_ldmatrix_fragments_have_the_ptx_layouts(warp_matrix_probe):
    """Each lane's registers are the elements the PTX ISA's ldmatrix figure gives it: matrix i
    from the rows lanes 8i..8i+7 address, lane l holding row l / 4, columns 2 (l % 4) and
    2 (l % 4) + 1 (transposed with .trans)."""
    a, b, _, data = _operands(torch.float16)
    out = torch.zeros(32 * 13, dtype=torch.int32)
    assert warp_matrix_probe("fragments", data, out) == ""
    regs = out.view(32, 13).to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        g, t = lane // 4, 2 * (lane % 4)
        # x4 at rows l % 16, columns 8 (l / 16): matrices (rows 0-7 | 8-15) x (columns 0-7 | 8-15)
        quads = [(0, 0), (8, 0), (0, 8), (8, 8)]
        expected = [_pair(a, r + g, c + t, r + g, c + t + 1) for r, c in quads]
        expected += [_pair(b, t, g, t + 1, g), _pair(b, 8 + t, g, 8 + t + 1, g)]  # x2.trans of B
        expected += [_pair(a, r + t, c + g, r + t + 1, c + g) for r, c in quads]  # x4.trans of A
        expected += [_pair(a, g, t, g, t + 1)]  # x1: rows 0-7
        expected += [_pair(a, g, t, g, t + 1), _pair(a, 8 + g, t, 8 + g, t + 1)]  # x2
        assert regs[lane].tolist() == expected, f"lane {lane}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_m16n8k16_with_the_ptx_fragments(warp_matrix_probe, dtype):
    """D = A B + C through ldmatrix fragments and the documented accumulator layout, summed in
    fp32 (the products of 16-bit values are exact: only 16 fp32 additions round); a lane mapping
    that a kernel could get wrong gives a wrong D."""
    a, b, c, data = _operands(dtype)
    ref = a.double() @ b.double() + c.double()
    name = "mma_f16" if dtype == torch.float16 else "mma_bf16"
    out = torch.full((16, 8), float("nan"))
    assert warp_matrix_probe(name, data, out) == ""
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    if dtype == torch.float16:
        for wrong in ("mma_wrong_rows", "mma_wrong_b"):
            out = torch.full((16, 8), float("nan"))
            assert warp_matrix_probe(wrong, data, out) == ""
            assert (out.double() - ref).abs().max().item() > 0.1 * ref.abs().max().item(), wrong


def test_cp_async_becomes_visible_at_its_wait(warp_matrix_probe):
    """A copy's destination keeps the block's NaN fill until a wait_group covers its group; the
    zero-filling form reads src_bytes and zeroes the rest."""
    src = torch.arange(1, 257, dtype=torch.int32)
    out = torch.zeros(32 * 7, dtype=torch.int32)
    assert warp_matrix_probe("async_copies", src, out) == ""
    fill = -1  # 0xFFFFFFFF
    for lane, words in enumerate(out.view(32, 7).tolist()):
        first, second = 4 * lane + 1, 128 + 4 * lane + 1  # src[i] = i + 1
        assert words[0] == fill  # before any wait
        assert words[1] == first and words[2] == fill  # group 1 done, group 2 still in flight
        assert words[3:] == [second, second + 1, 0, 0]  # 8 bytes read, 8 zero-filled
    out = torch.zeros(32, dtype=torch.int32)
    assert "aligned to the copy size" in warp_matrix_probe("misaligned_cp_async", src, out)
    assert "not in shared memory" in warp_matrix_probe("cp_async_to_global", src, out)
    a, b, c, data = _operands(torch.float16)
    assert "not 16-byte aligned" in warp_matrix_probe("misaligned_ldmatrix", data, out)


_WARP_MATRIX_KERNEL = r"""
#include "device.cuh"
template <class T>
__global__ void warp_ops(const T* in, float* out) {
  MVIT3_SHARED_ALIGNED(T[16 * 16 + 16 * 8], tile, 16);
  const int lane = threadIdx.x;
  mvit3::cp_async<16>(&tile[lane * 8], in + lane * 8);
  mvit3::cp_async<8>(&tile[256 + lane * 4], in + 256 + lane * 4, 4);
  mvit3::cp_async<4>(&tile[256 + lane * 4 + 2], in + 256 + lane * 4 + 2, 0);
  mvit3::cp_async_commit();
  mvit3::cp_async_wait<0>();
  __syncthreads();
  uint32_t a[4], b[2], a1[1], a2[2], b4[4], b1[1];
  mvit3::ldmatrix<4>(a, &tile[(lane % 16) * 16 + 8 * (lane / 16)]);
  mvit3::ldmatrix<2, true>(b, &tile[256 + (lane % 16) * 8]);
  mvit3::ldmatrix<1>(a1, &tile[(lane % 8) * 16]);
  mvit3::ldmatrix<2>(a2, &tile[(lane % 16) * 16]);
  mvit3::ldmatrix<4, true>(b4, &tile[(lane % 16) * 16 + 8 * (lane / 16)]);
  mvit3::ldmatrix<1, true>(b1, &tile[(lane % 8) * 16]);
  float c[4] = {0, 0, 0, float(a1[0] + a2[1] + b4[3] + b1[0])}, d[4];
  mvit3::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = d[i];
}
template __global__ void warp_ops<__half>(const __half*, float*);
template __global__ void warp_ops<__nv_bfloat16>(const __nv_bfloat16*, float*);
"""

# What sm_75 has of them: ldmatrix and the f16 mma (two m16n8k8 there).
_SM75_MATRIX_KERNEL = r"""
#include "device.cuh"
__global__ void f16_mma(const __half* in, float* out) {
  MVIT3_SHARED_ALIGNED(__half[16 * 16 + 16 * 8], tile, 16);
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16 + 16 * 8; i += 32) tile[i] = in[i];
  __syncthreads();
  uint32_t a[4], b[2];
  mvit3::ldmatrix<4>(a, &tile[(lane % 16) * 16 + 8 * (lane / 16)]);
  mvit3::ldmatrix<2, true>(b, &tile[256 + (lane % 16) * 8]);
  float c[4] = {}, d[4];
  mvit3::mma_m16n8k16<__half>(d, a, b, c);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = d[i];
}
"""


def test_warp_matrix_wrappers_assemble_for_sm80_and_newer(tmp_path):
    """device.cuh's inline PTX for cp.async, ldmatrix and mma.m16n8k16 passes ptxas for sm_80
    and sm_90 (what the emulator tests above cannot see: the PTX strings and constraints), and
    ptxas refuses cp.async in an sm_75 kernel instead of it compiling to something else, while
    ldmatrix and the f16 mma (patch_attention's) assemble for sm_75."""
    import subprocess

    try:
        nvcc = build.find_nvcc()
    except build.BuildError as err:
        pytest.skip(str(err))
    (tmp_path / "warp_ops.cu").write_text(_WARP_MATRIX_KERNEL)
    (tmp_path / "f16_mma.cu").write_text(_SM75_MATRIX_KERNEL)

    def compile_for(arch: str, source: str = "warp_ops"):
        return subprocess.run([nvcc, "-std=c++17", "-cubin", f"-arch={arch}", "-Werror",
                               "all-warnings", f"-I{build.SOURCE_ROOT / 'csrc'}", "-o",
                               str(tmp_path / f"{source}-{arch}.cubin"),
                               str(tmp_path / f"{source}.cu")],
                              capture_output=True, text=True)

    for arch in ("sm_80", "sm_90"):
        result = compile_for(arch)
        assert result.returncode == 0, result.stderr
    result = compile_for("sm_75")
    assert result.returncode != 0 and "cp.async" in result.stderr
    result = compile_for("sm_75", "f16_mma")
    assert result.returncode == 0, result.stderr
