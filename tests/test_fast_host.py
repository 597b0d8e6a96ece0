"""The fast model's host side: derived weights kept without a per-call walk of the module
tree, torch.inference_mode(), and fp16 robustness of whole models in the interpreter."""

from __future__ import annotations

import copy
import io
import operator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mvit3
import mvit3.fast as fast
from mvit3.fast import model as fast_model
from mvit3.fast.model import FastMobileViT, _version_counter_groups

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


def test_running_statistics_updated_in_training_mode_are_seen():
    """BatchNorm's training forwards update its running statistics without moving their
    version counters (a BN recalibration: training mode, no gradients, no optimizer step):
    switching back to eval derives the weights anew."""
    ref, model = _pair("mobilevitv3_xxs")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    batch = torch.rand(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        for m in (ref, model):
            m.train()
            torch.manual_seed(0)  # the same dropout masks
            m(batch)
            m.eval()
        assert not _close(model(x), before) and _close(model(x), ref(x))


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


# ----- the per-call check: one read per shared version counter ----------------------------
def _counted_reads(monkeypatch) -> list:
    """Patches the version-counter read of the per-call check; the list grows per read."""
    reads = []

    def read(t, _read=operator.attrgetter("_version")):
        reads.append(1)
        return _read(t)
    monkeypatch.setattr(fast_model, "_version_of", read)
    return reads


def test_the_per_call_check_reads_two_counters(monkeypatch):
    """A fast model's parameters share one version counter and its buffers another: the check
    of a forward or a CUDA-graph replayed call reads two counters, not one per tensor."""
    ref, converted = _pair("mobilevitv3_xxs")
    created = fast.create_model("mobilevitv3_xxs", backend="torch").eval()
    dense = fast.create_model("deeplabv3_mobilevitv3_xxs_voc", backend="torch").eval()
    reads = _counted_reads(monkeypatch)
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    for model in (converted, created, dense, dense.encoder):
        plan = model.plan()
        reads.clear()
        assert model.plan() is plan and len(reads) == 2
        assert len(model._watched) > 250
    with torch.no_grad():
        converted(x)
        reads.clear()
        converted(x)
    assert len(reads) == 2
    wrapped = fast.cuda_graph(converted)
    monkeypatch.setattr(wrapped, "_capture", lambda x: (x.shape,))
    wrapped._graph_for(x)
    reads.clear()
    wrapped._graph_for(x)
    assert len(reads) == 2


def test_version_counter_groups_are_probed_exactly():
    a, b, c = torch.zeros(4), torch.zeros(3), torch.zeros(2)
    with torch.no_grad():
        b.add_(1)
    pc = torch.nn.Parameter(c)  # shares c's counter, not its identity
    tensors = [a, b, a[1:], c, b.detach(), pc, torch.zeros(1)]
    versions = [t._version for t in tensors]
    groups = _version_counter_groups(tensors)
    index = [id(t) for t in tensors].index
    assert sorted(sorted(index(id(t)) for t in group) for group in groups) == [[0, 2], [1, 4], [3, 5], [6]]
    assert [t._version for t in tensors] == versions  # put back as they were


def _edit_and_compare(model, ref, x, edit_ref=True):
    """An in-place edit of a parameter, then of a BatchNorm running_mean, made in both models
    (in `model` only where it aliases the reference's tensors): each is seen."""
    with torch.no_grad():
        before = model(x)
        edited = (model, ref) if edit_ref else (model,)
        for m in edited:
            m.layer_3[1].global_rep[0].pre_norm_ffn[1].weight.mul_(1.5)
        after = model(x)
        assert not _close(after, before) and _close(after, ref(x))
        for m in edited:
            m.layer_4[0].block.conv_3x3.norm.running_mean.add_(0.5)
        assert not _close(model(x), after) and _close(model(x), ref(x))


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["converted", "half_then_float64", "deepcopy", "pickled",
                                 "assigned"])
def test_in_place_edits_are_seen_however_the_counters_are_shared(how):
    """Sharing version counters is a speed-up only: `.to()`, deep copies, unpickling and
    `load_state_dict(assign=True)` keep it or break it, and every in-place edit is seen."""
    ref, model = _pair("mobilevitv3_xxs")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    _edit_and_compare(model, ref, x)
    edit_ref = True
    if how == "half_then_float64":
        for m in (ref, model):
            m.half()
        running_mean = model.conv_1.norm.running_mean
        model.to(torch.float64)
        ref.to(torch.float64)
        # the buffer objects stay (their shared counter with them), holding the new data
        assert model.conv_1.norm.running_mean is running_mean and running_mean.dtype == torch.float64
    elif how in ("deepcopy", "pickled"):
        model = copy.deepcopy(model) if how == "deepcopy" else _pickled(model)
        model.plan()
        assert len(model._counters) > 2  # no longer shared: slower, not blind
    elif how == "assigned":
        model = fast.create_model("mobilevitv3_xxs", backend="torch").eval()
        model.load_state_dict(ref.state_dict(), assign=True)
        edit_ref = False  # the model now holds the reference's tensors
    _edit_and_compare(model, ref, x, edit_ref)
    if how in ("converted", "half_then_float64"):
        assert len(model._counters) == 2


def test_state_dict_tensors_share_no_memory():
    """Parameters made to share a version counter keep their own storage: a state_dict
    saves with safetensors (which refuses tensors that share memory)."""
    _, converted = _pair("mobilevitv3_xxs")
    for model in (converted, fast.create_model("ssdlite_mobilevitv3_xxs_coco", backend="torch")):
        state = model.state_dict()
        storages = {t.untyped_storage().data_ptr() for t in state.values()}
        assert len(storages) == len(state)
        try:
            from safetensors.torch import save
        except ImportError:
            continue
        assert save(state)


@pytest.mark.parametrize("failure", ["missing", "raises"])
def test_without_the_counter_probe_edits_are_still_seen(monkeypatch, failure):
    """Where this torch cannot set version counters, nothing is shared and every tensor's
    counter is read, as before."""
    if failure == "missing":
        monkeypatch.delattr(torch._C._autograd, "_unsafe_set_version_counter")
    else:
        def refuse(*_):
            raise TypeError("another signature")
        monkeypatch.setattr(torch._C._autograd, "_unsafe_set_version_counter", refuse)
    ref, model = _pair("mobilevitv3_xxs")
    model.plan()
    assert len(model._counters) == len(model._watched) > 250
    _edit_and_compare(model, ref, torch.rand(1, 3, 64, 64, dtype=torch.float64))


def test_training_with_shared_version_counters():
    """Fine-tuning (the reference forward, backward, optimizer steps) runs and trains as the
    reference does, then eval mode runs the fused forward on the trained weights."""
    ref, model = _pair("mobilevitv3_xxs")
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    for m in (ref, model):
        m.train()
        torch.manual_seed(0)  # the same dropout masks
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            m(x).square().mean().backward()
            optimizer.step()
        m.eval()
    with torch.no_grad():
        assert _close(model(x), ref(x))


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
