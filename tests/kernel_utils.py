"""Helpers shared by the Triton kernel tests (tests/test_kernel_*.py): random inputs in the
layouts the kernels take, the comparison with the float64 reference, and the checks of
rejected arguments."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from mvit3.kernels import _common

LAYOUTS = ("nchw", "nhwc", "slice")
# Small maps. 7x7 and 5x9 are odd: pixel-row tiles straddle samples, and stride 2 gives
# ceil(H / 2).
SIZES = ((7, 7), (8, 8), (5, 9))


def other_layout(layout: str) -> str:
    """The next layout after `layout`: a call's second map (x2, residual) takes it, so that
    one call mixes layouts."""
    return LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]


def random_map(gen, b, c, h, w, layout, dtype, device):
    """A [B, C, H, W] map stored NCHW, channels_last, or as a channel slice of a wider
    channels_last map (pixel stride C + 6: neither layout is dense)."""
    if layout == "nchw":
        return torch.randn(b, c, h, w, generator=gen).to(device, dtype)
    if layout == "nhwc":
        return torch.randn(b, h, w, c, generator=gen).to(device, dtype).permute(0, 3, 1, 2)
    wide = torch.randn(b, h, w, c + 6, generator=gen).to(device, dtype)
    return wide.permute(0, 3, 1, 2)[:, 3:3 + c]


def random_weight(gen, cout, cin, packing, dtype, device, window=()):
    """[Cout, Cin, *window] with N(0, 1/fan_in) entries, fan_in = Cin * prod(window):
    contiguous ("plain"), or K-major as the fast model packs GEMM weights, a view of a
    contiguous [*window, Cin, Cout] buffer (Cout fastest): strides (1, Cout) for a 1x1 conv's
    [Cout, K], (1, Cout, 3 Cin Cout, Cin Cout) for a 3x3 conv's [Cout, Cin, 3, 3]."""
    fan_in = cin * math.prod(window)
    if packing == "plain":
        w = torch.randn(cout, cin, *window, generator=gen)
    else:
        taps = len(window)
        w = torch.randn(*window, cin, cout, generator=gen).permute(taps + 1, taps, *range(taps))
    return (w / fan_in ** 0.5).to(device, dtype)


def random_vector(gen, n, dtype, device, mean=0.0):
    """[n] values mean + 0.5 * N(0, 1): biases and norm affine parameters."""
    return (mean + 0.5 * torch.randn(n, generator=gen)).to(device, dtype)


def variant(i: int, heavy: bool = False) -> dict:
    """Batch, map size, layouts and weight packing rotated over the cases of one test.
    Heavy cases (many channels) take batch 1: the interpreter's time grows with the tiles."""
    return dict(b=1 if heavy else (1, 3)[i % 2], size=SIZES[(i // 2) % 3], layout=LAYOUTS[i % 3],
                packing=("kmajor", "plain")[(i // 3) % 2])


def skip_bf16_before_sm80(device, dtype=torch.bfloat16):
    """Skip a bfloat16 case on a GPU older than sm_80 (the interpreter runs it anywhere)."""
    if device == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 needs compute capability 8.0 or newer")


def float64_reference(reference_op, args):
    """The ground truth: reference_op (from mvit3.ops.reference) on CPU float64 copies of the
    tensors in args."""
    return reference_op(*[a.cpu().double() if isinstance(a, torch.Tensor) else a for a in args])


def check_op(op, reference_op, args, dtype, tolerance):
    """op(*args) gives a channels_last map of `dtype` whose max |op - reference| is within
    `tolerance` of max |reference|."""
    out = op(*args)
    ref = float64_reference(reference_op, args)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    scale = ref.abs().max().item()
    assert scale > 0.1  # random inputs: a degenerate (near-zero) reference would prove nothing
    err = (out.cpu().double() - ref).abs().max().item() / scale
    assert err <= tolerance, f"relative error {err:.3g} > {tolerance}"


def check_output(out, args, shape, reference_op, tolerances):
    """out is a channels_last map of `shape` on args[0]'s device and dtype, with max
    |out - reference| within tolerances[dtype] of max |reference|."""
    x = args[0]
    assert out.shape == shape and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = float64_reference(reference_op, args)
    err = (out.cpu().double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tolerances[x.dtype] * scale, f"max error {err:.3g} for max |ref| {scale:.3g}"


def with_stride_2(t):
    """t's values in a view of stride 2 (a column of an [n, 2] tensor): the kernels read 1-D
    parameter vectors as ptr + i and must refuse such a view rather than misread it."""
    return torch.stack([t, t], dim=1)[:, 0]


def replace_args(op, args, **changes):
    """op's positional args with the named ones replaced (names from op's signature)."""
    names = inspect.signature(op).parameters
    return tuple(changes.get(name, arg) for name, arg in zip(names, args))


def dry_run_launch(op, args, kernel_name, launches=1):
    """Record op(*args) without running it (launch_log(dry_run=True)); check that it makes
    `launches` launches, the last of kernel_name, and return that last launch's record,
    signature and constexprs (as dicts)."""
    with _common.launch_log(dry_run=True) as log:
        op(*args)
    assert len(log) == launches
    record = log.records[-1]
    assert record.name == kernel_name
    return record, dict(record.signature), dict(record.constexprs)


def check_rejected(op, why_unsupported, args, message):
    """op(*args) raises ValueError matching `message` (a regex); why_unsupported gives a reason."""
    with pytest.raises(ValueError, match=message):
        op(*args)
    assert why_unsupported(*args) is not None
