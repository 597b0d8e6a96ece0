"""The fast model's host side: derived weights kept without a per-call walk of the module
tree, torch.inference_mode(), and fp16 robustness of whole models in the interpreter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mvit3
import mvit3.fast as fast
from mvit3.fast.model import FastMobileViT

import model_utils
from conftest import INTERPRET
from test_fast import _within_twice_the_reference_error

FP16_MAX = torch.finfo(torch.float16).max


def _pair(name, seed=0, backend="torch"):
    ref = model_utils.randomize_(mvit3.create_model(name), seed).double().eval()
    return ref, fast.convert(ref, backend=backend).eval()


def _close(a, b) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-12)


# ----- derived weights without a per-call walk -------------------------------------------
def test_a_forward_does_not_walk_the_module_tree(monkeypatch):
    ref, model = _pair("mobilevitv3_xxs")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    walks = []

    def counted(name):
        original = getattr(FastMobileViT, name)

        def walk(self, *args, **kwargs):
            walks.append(name)
            return original(self, *args, **kwargs)
        return walk

    for name in ("parameters", "buffers", "named_parameters", "named_buffers", "modules",
                 "named_modules", "children"):
        monkeypatch.setattr(FastMobileViT, name, counted(name))
    with torch.no_grad():
        model(x)
        plan = model.plan()
        model(x)
        assert walks == [] and model.plan() is plan
        # an in-place edit is still seen, through the version counters alone
        for m in (ref, model):
            m.layer_3[1].global_rep[0].pre_norm_ffn[1].weight.mul_(1.5)
        assert _close(model(x), ref(x)) and model.plan() is not plan
        assert walks == []


def test_modules_registered_elsewhere_keep_the_plan():
    """Registrations anywhere make the model list its tensors again: the same tensors keep
    the derived weights (and a CUDA-graph wrapper's captures), replaced ones drop them."""
    _, model = _pair("mobilevitv3_xxs")
    plan = model.plan()
    torch.nn.Linear(2, 2)  # registers two parameters on another module
    assert model.plan() is plan
    norm = model.layer_1[0].block.exp_1x1.norm
    norm.running_mean = torch.zeros_like(norm.running_mean)  # a buffer replaced by assignment
    assert model.plan() is not plan


def test_in_place_edits_after_to_are_seen():
    """`.to()` replaces every buffer by a new tensor: the watched list follows (it kept the
    old buffers before, so later edits of running statistics were missed)."""
    ref, model = _pair("mobilevitv3_050")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    for m in (ref, model):
        m.float().double()
    with torch.no_grad():
        for m in (ref, model):
            m.layer_4[1].conv_proj.block.norm.running_var.mul_(2.0)
        assert _close(model(x), ref(x))


def test_refresh_after_editing_through_data():
    """`.data` edits move no version counter (the documented blind spot): refresh() makes
    the next forward see them."""
    ref, model = _pair("mobilevitv3_xxs")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        for m in (ref, model):
            m.conv_1.conv.weight.data.mul_(0.5)
        model.refresh()
        assert _close(model(x), ref(x))


def test_cuda_graph_wrapper_recaptures_only_when_the_weights_change(monkeypatch):
    """The wrapper's host path before copy and replay, on CPU with capture stubbed: one
    capture per signature, kept across calls and unrelated registrations, redone after an
    in-place edit of the weights."""
    _, model = _pair("mobilevitv3_xxs")
    wrapped = fast.cuda_graph(model)
    captures = []

    def capture(x):
        captures.append(x.shape)
        return (len(captures),)  # stands for (graph, static input, static output)

    monkeypatch.setattr(wrapped, "_capture", capture)
    small, large = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 96, 96)
    assert [wrapped._graph_for(x) for x in (small, large, small)] == [(1,), (2,), (1,)]
    torch.nn.Linear(2, 2)
    assert wrapped._graph_for(small) == (1,)
    with torch.no_grad():
        model.layer_5[0].block.red_1x1.norm.running_mean.add_(0.5)
    assert wrapped._graph_for(small) == (3,) and wrapped._graph_for(large) == (4,)


# ----- torch.inference_mode() -------------------------------------------------------------
def test_create_convert_and_run_inside_inference_mode():
    ref = model_utils.randomize_(mvit3.create_model("mobilevitv3_xxs"), 1).double().eval()
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
    with torch.inference_mode():
        created = fast.create_model("mobilevitv3_xxs", backend="torch")
        created.load_state_dict(ref.state_dict())
        created.double().eval()
        assert _close(created(x), expected)
        converted = fast.convert(ref, backend="torch").eval()
        assert _close(converted(x), expected)
        converted.half()
        assert converted(x.half()).dtype == torch.float16
        converted.to(torch.float64)
        assert converted(x).dtype == torch.float64
        # inference tensors have no version counter: load_state_dict drops the plan itself
        other = model_utils.randomize_(mvit3.create_model("mobilevitv3_xxs"), 2).double().eval()
        created.load_state_dict(other.state_dict())
        assert _close(created(x), other(x))
    # a model made outside, edited in place inside: its tensors still count versions
    model = fast.convert(ref, backend="torch").eval()
    with torch.inference_mode():
        model(x)
        model.conv_1.norm.running_mean.add_(0.5)
    with torch.no_grad():
        ref.conv_1.norm.running_mean.add_(0.5)
        assert _close(model(x), ref(x))


def test_triton_backend_inside_inference_mode_dry_run():
    """The custom ops of the Triton backend under inference_mode (a dry run on CPU tensors:
    every launch is recorded, nothing runs)."""
    from mvit3.kernels._common import launch_log

    with torch.inference_mode():
        model = fast.create_model("mobilevitv3_050", backend="triton").half().eval()
        with launch_log(dry_run=True) as log:
            out = model(torch.rand(1, 3, 64, 64, dtype=torch.float16))
    assert out.shape == (1, 1000) and len(log) >= 40


# ----- fp16 robustness ----------------------------------------------------------------------
class _PeakRecorder(TorchDispatchMode):
    """The largest magnitude of every floating-point tensor an op produces: the reference's
    intermediates inside modules too (relu(v) * context of the separable attention...)."""

    def __init__(self):
        super().__init__()
        self.peak = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                self.peak = max(self.peak, t.abs().max().item())
        return out


@pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET is off (a GPU is present: the gpu tests cover it)")
@pytest.mark.parametrize("name", ["mobilevitv3_xs", "mobilevitv3_050"])
def test_fp16_large_inputs_give_finite_logits_in_the_interpreter(name):
    """Inputs x100 (and x10000: the fp32 reference then peaks near half the fp16 range, at the
    stem) through the fp16 Triton model: finite logits within the GPU tests' fp16 tolerance
    rule, wherever every intermediate of the fp32 reference stays inside the fp16 range."""
    from mvit3.kernels._common import interpreter_tiles

    ref = model_utils.randomize_(mvit3.create_model(name), seed=2).eval()
    model = fast.convert(ref, backend="triton").half().eval()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([100 * image, 10000 * image])
    peaks = []
    with torch.no_grad():
        for sample in x:
            with _PeakRecorder() as recorder:
                ref(sample[None])
            peaks.append(recorder.peak)
        ref16 = copy.deepcopy(ref).half()(x.half())
        expected = ref.double()(x.double())
    # the premise: fp16 holds every value of the fp32 reference, and x10000 comes close
    assert max(peaks) < FP16_MAX / 2 and peaks[1] > FP16_MAX / 4, peaks
    with torch.no_grad(), interpreter_tiles():
        out = model(x.half())
    assert torch.isfinite(out).all()
    for i in range(len(x)):
        holds, error, allowed = _within_twice_the_reference_error(out[i], ref16[i], expected[i],
                                                                  torch.float16)
        assert holds, f"sample {i}: fp16 error {error} > allowed {allowed}"
