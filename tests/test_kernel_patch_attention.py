"""mvit3.kernels.patch_attention against the float64 reference (mvit3.ops.reference).

Runs in the Triton interpreter on CPU tensors ("interp") and, where a GPU is present, on it
("cuda", marked gpu). Shapes are the real (d, heads) of the v1-style models (tests/shapes.py)
on even maps, square and not, N = 15 ... 1024 tokens per sequence.
"""

import re

import pytest
import torch

from conftest import KERNEL_DEVICES
from kernel_utils import (check_output, skip_bf16_before_sm80, with_stride_2)
from shapes import v1_attention

import mvit3.kernels.patch_attention as kernel
from mvit3.kernels._common import interpreter_tiles, launch_log
from mvit3.ops import patch_attention as patch_attention_op
from mvit3.ops import reference

# Largest |out - ref| allowed, relative to max |ref|:
# - fp32: fp32 rounding (2^-24) through dot products of up to 1024 terms, the exp2 of the
#   online softmax and its rescaling: measured <= 1e-6 in the interpreter; GPU exp2/division
#   are approximate to a few ulp. An indexing error (wrong token, head, or patch position)
#   gives O(1) differences.
# - fp16: the output is stored in fp16 (half-ulp 2^-11 = 4.9e-4) and q, the probabilities and
#   o are rounded to fp16 before their fp32-accumulated dots: measured <= 4e-4.
# - bf16: 3 fewer mantissa bits than fp16, so 8x the fp16 bound (the interpreter's
#   fp32 -> bf16 conversion truncates instead of rounding: measured <= 6.4e-3 there).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_args(batch, d, heads, h, w, *, dtype=torch.float32, device="cpu", channels_last=False,
              proj=True, proj_bias=True, residual=True, packed_weight=False, seed=0):
    """Arguments of patch_attention with O(1) values. packed_weight: proj_weight as the
    [d, d] view of a contiguous [d_in, d_out] buffer (the fast model's pre-packed layout)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3 * d, h, w, generator=gen)
    weight = torch.randn(d, d, generator=gen) * d ** -0.5
    bias = torch.randn(d, generator=gen)
    res = torch.randn(batch, d, h, w, generator=gen)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
        res = res.contiguous(memory_format=torch.channels_last)
    if packed_weight:
        weight = weight.t().contiguous().t()
    to = dict(dtype=dtype, device=device)
    return (qkv.to(**to), heads, (d // heads) ** -0.5, weight.to(**to) if proj else None,
            bias.to(**to) if proj and proj_bias else None, res.to(**to) if residual else None)


def check(out, args):
    b, c3, h, w = args[0].shape  # qkv
    check_output(out, args, (b, c3 // 3, h, w), reference.patch_attention, TOLERANCE)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("index, dims", list(enumerate(v1_attention())),
                         ids=[f"d{d}-h{h}" for d, h, _ in v1_attention()])
def test_real_dims(device, index, dims):
    """Every (d, heads) of the v1-style models (head dims 16 ... 60), with out_proj and
    residual fused, on an 8x8 map (N = 16); batch 1/3, NCHW/channels_last and
    contiguous/pre-packed weights alternate."""
    d, heads, _ = dims
    args = make_args(1 + 2 * (index % 2), d, heads, 8, 8, device=device,
                     channels_last=index % 2 == 0, packed_weight=index % 3 == 0, seed=index)
    check(kernel.patch_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("d, heads, h, w, batch, channels_last, options", [
    (80, 4, 6, 10, 3, False, dict()),  # N = 15 < BLOCK_N: masked keys and queries
    (120, 4, 14, 14, 1, True, dict(proj=False)),  # heads stored to their channels; 2 key blocks
    (144, 4, 18, 18, 1, True, dict(proj=False, residual=False)),  # N = 81: 2 blocks of 64 keys
    (144, 4, 10, 6, 1, False, dict(proj_bias=False, residual=False)),
    (240, 4, 14, 14, 1, False, dict(packed_weight=True)),  # two 128-channel out_proj slices
])
def test_maps_and_options(device, d, heads, h, w, batch, channels_last, options):
    args = make_args(batch, d, heads, h, w, device=device, channels_last=channels_last, **options)
    check(kernel.patch_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_n256(device):
    """32x32 map: 16 query tiles and 4 key blocks per sequence (online softmax)."""
    args = make_args(1, 64, 4, 32, 32, device=device, channels_last=True, packed_weight=True)
    check(kernel.patch_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_n1024(device):
    """64x64 map (512 px input, layer 3) at the smallest d. On the GPU tiles: 16 key blocks per
    query tile. In the interpreter with `interpreter_tiles` (4 blocks of 256 keys), which runs
    several times faster; the GPU tiles are covered at N = 256 by test_n256."""
    args = make_args(1, 64, 4, 64, 64, device=device)
    with interpreter_tiles():
        check(kernel.patch_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("d, proj", [(64, True), (240, True), (120, False)])
def test_fp16(device, d, proj):
    args = make_args(3, d, 4, 6, 10, dtype=torch.float16, device=device, channels_last=True, proj=proj)
    check(kernel.patch_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("d, proj", [(64, True), (240, True), (120, False)])
def test_bf16(device, d, proj):
    """In the interpreter, bf16 dot operands go through fp32 (`dot_operand_type`: its tl.dot
    misreads bf16 tiles, triton-lang/triton#11584), so the GPU's bf16 tensor-core path is
    checked on "cuda" only; the loads, stores and fp32 math are checked on both."""
    skip_bf16_before_sm80(device)
    args = make_args(3, d, 4, 6, 10, dtype=torch.bfloat16, device=device, proj=proj)
    check(kernel.patch_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("d, dtype, vec, head_pad", [
    (120, torch.float16, 8, 64),  # head dim 30: heads 1..3 start 6, 4, 2 channels past a vector
    (144, torch.float16, 8, 64),  # head dim 36: heads 1 and 3 start 4 channels past one
    (120, torch.float32, 4, 32),  # head dim 30: heads 1 and 3 start 2 channels past one
    (80, torch.float32, 4, 32),  # head dim 20: every head starts on a vector
])
def test_aligned_windows(device, d, dtype, vec, head_pad):
    """The fast model's layout (channels_last maps, pre-packed out_proj): the kernel reads
    each head through a VEC-aligned window of HEAD_PAD channels and zeroes the neighbouring
    heads' q channels in it; with out_proj and residual, and without (heads stored directly)."""
    for proj in (True, False):
        args = make_args(1, d, 4, 8, 8, dtype=dtype, device=device, channels_last=True,
                         packed_weight=True, proj=proj)
        with launch_log() as log:
            out = kernel.patch_attention(*args)
        meta = dict(log.records[0].constexprs)
        assert (meta["VEC"], meta["HEAD_PAD"]) == (vec, head_pad)
        check(out, args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # head 0 turns NaN, as in the reference
def test_windows_keep_heads_apart(device):
    """An inf in head 0's last q and v channels (in head 1's window in fp16) must not reach
    heads 1..3: their outputs stay finite and equal to the reference. (An inf k there would:
    see the kernel; the out_proj mixes the heads right after in every model.)"""
    qkv, heads, scale, *_ = make_args(1, 120, 4, 8, 8, dtype=torch.float16, device=device,
                                      channels_last=True, proj=False, residual=False)
    qkv[:, [29, 240 + 29], 2, 2] = float("inf")
    args = (qkv, heads, scale, None, None, None)
    out = kernel.patch_attention(*args)[:, 30:].cpu().double()
    ref = reference.patch_attention(qkv.cpu().double(), heads, scale)[:, 30:]
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= TOLERANCE[torch.float16] * ref.abs().max()


def test_vector_width():
    """VEC is the widest 16-byte-or-less vector that divides d and every map's batch and pixel
    strides and the out_proj weight's row stride; anything else reads scalars."""
    def vec(*args):
        with launch_log(dry_run=True) as log:
            kernel.patch_attention(*args)
        return dict(log.records[0].constexprs)["VEC"]

    fast_layout = dict(channels_last=True, packed_weight=True)
    assert vec(*make_args(2, 120, 4, 8, 8, dtype=torch.float16, **fast_layout)) == 8
    assert vec(*make_args(2, 120, 4, 8, 8, dtype=torch.bfloat16, **fast_layout)) == 8
    assert vec(*make_args(2, 120, 4, 8, 8, **fast_layout)) == 4
    assert vec(*make_args(2, 120, 4, 8, 8, dtype=torch.float16, channels_last=True)) == 1  # weight rows 1 apart
    assert vec(*make_args(2, 120, 4, 8, 8, dtype=torch.float16, packed_weight=True)) == 1  # NCHW qkv
    qkv, heads, scale, weight, bias, res = make_args(2, 120, 4, 8, 8, dtype=torch.float16, **fast_layout)
    # a residual sliced from a 122-channel map: its pixel stride is 4-byte aligned at most
    padded = torch.zeros(2, 122, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert vec(qkv, heads, scale, weight, bias, padded[:, :120]) == 2
    # d = 100 (4 heads of 25): the k third starts 200 bytes in, a multiple of 8 bytes only
    assert vec(*make_args(1, 100, 4, 8, 8, dtype=torch.float16, **fast_layout)) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("d", [64, 144, 240])
def test_large_batch_cuda(d):
    """Batch 100 at 32x32 takes the large-tile configurations (BLOCK_M 64 at d = 64)."""
    args = make_args(100, d, 4, 32, 32, device="cuda", channels_last=True, packed_weight=True)
    check(kernel.patch_attention(*args), args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_through_op_layer(device):
    """mvit3.ops.patch_attention(backend="triton") reaches this kernel through torch.library."""
    args = make_args(1, 64, 4, 8, 8, device=device)
    with launch_log() as log:
        out = patch_attention_op(*args, backend="triton")
    assert [r.name for r in log.records] == ["_patch_attention_kernel"]
    check(out, args)


@pytest.mark.parametrize("index, dims", list(enumerate(v1_attention())))
def test_real_shapes_supported(index, dims):
    d, heads, _ = dims
    for h in (64, 32, 16, 8):
        assert kernel.why_unsupported(*make_args(1, d, heads, h, h)) is None


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0][:, :, :7],) + a[1:], "H and W must be even"),
    (lambda a: (a[0][..., :7],) + a[1:], "H and W must be even"),
    (lambda a: (a[0][:, :190],) + a[1:], "must be 3 * num_heads"),
    (lambda a: (a[0], 5) + a[2:], "must be 3 * num_heads"),
    (lambda a: a[:3] + (a[3][:, :32],) + a[4:], "proj_weight must be [64, 64]"),
    (lambda a: a[:3] + (None,) + a[4:], "proj_bias needs proj_weight"),
    (lambda a: a[:5] + (a[5][:, :32],), "residual must be"),
    (lambda a: a[:4] + (a[4].double(),) + a[5:], "all tensors must share a dtype"),
    (lambda a: a[:4] + (with_stride_2(a[4]),) + a[5:], "proj_bias must have unit stride"),
])
def test_bad_input_raises(change, message):
    args = change(make_args(1, 64, 4, 8, 8))
    with pytest.raises(ValueError, match=re.escape(message)):
        kernel.patch_attention(*args)


def test_limits():
    assert "head dim 80 > 64" in kernel.why_unsupported(*make_args(1, 320, 4, 8, 8, proj=False))
    assert "d = 288 > 256" in kernel.why_unsupported(*make_args(1, 288, 8, 8, 8))
    assert kernel.why_unsupported(*make_args(1, 288, 8, 8, 8, proj=False)) is None


def test_launch_configurations():
    """Dry run: one launch per call; batch 1 gets small query tiles (more programs), batch 100
    large ones (64 rows in fp16: wgmma), and d > 128 two out_proj slices in fp16 on 4 warps
    (with 8, its [16, 64] k and v tiles are too few values a thread for 16-byte loads); in
    fp32 the heads go through out and are projected PROJ_K channels at a time, on 8 warps (a
    head at a time, its FMA form spills)."""
    with launch_log(dry_run=True) as log:
        kernel.patch_attention(*make_args(1, 64, 4, 16, 16))
        kernel.patch_attention(*make_args(100, 64, 4, 32, 32, dtype=torch.float16))
        kernel.patch_attention(*make_args(1, 240, 4, 8, 8, dtype=torch.float16))
        kernel.patch_attention(*make_args(1, 240, 4, 8, 8))
    batch1, batch100, wide, wide_fp32 = (dict(r.constexprs) for r in log.records)
    assert [r.grid for r in log.records] == [(4, 4), (4, 400), (1, 4), (1, 4)]
    assert batch1["BLOCK_M"] == 16 and batch100["BLOCK_M"] == 64 and batch100["num_warps"] == 8
    assert not batch1["TWO_OUT_CHUNKS"] and wide["TWO_OUT_CHUNKS"] and wide["OUT_CHUNK"] == 128
    assert wide["BLOCK_M"] == 16 and wide["num_warps"] == 4
    assert not any(r["HEADS_THROUGH_OUT"] for r in (batch1, batch100, wide))
    assert wide_fp32["HEADS_THROUGH_OUT"] and wide_fp32["TWO_OUT_CHUNKS"] and wide_fp32["num_warps"] == 8
