"""The drop-in fast models: same weights and outputs as the reference, on every backend."""

from __future__ import annotations

import copy

import pytest
import torch

import mvit3
import mvit3.fast as fast
from mvit3.bench.launches import fused_op_calls
from mvit3.fast.model import FastMobileViT
from mvit3.ops import BackendUnavailable

import model_utils
from conftest import HAS_CUDA, INTERPRET

NAMES = mvit3.list_models()


def _pair(name, seed=0, dtype=torch.float64, backend="torch", **kwargs):
    ref = model_utils.randomize_(mvit3.create_model(name, **kwargs), seed).to(dtype).eval()
    return ref, fast.convert(ref, backend=backend).eval()


def test_fast_models_have_the_reference_parameters_and_keys():
    ref = mvit3.create_model("mobilevitv3_xs")
    model = fast.create_model("mobilevitv3_xs")
    assert isinstance(model, FastMobileViT) and isinstance(model, mvit3.models.MobileViT)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
           [(k, v.shape) for k, v in ref.state_dict().items()]
    assert mvit3.model_stats(model) == mvit3.model_stats(ref)
    mvit3.load_checkpoint(model, ref.state_dict())  # checkpoints load unchanged


def test_shortcuts_cover_the_v3_family():
    expected = {"xxs": "mobilevitv3_xxs", "xs": "mobilevitv3_xs", "s": "mobilevitv3_s",
                "xxs_l2": "mobilevitv3_xxs_l2", "xs_l2": "mobilevitv3_xs_l2",
                "s_l2": "mobilevitv3_s_l2", "w050": "mobilevitv3_050", "w075": "mobilevitv3_075",
                "w100": "mobilevitv3_100"}
    for short, name in expected.items():
        model = getattr(fast, short)(backend="torch", num_classes=3)
        assert model.cfg.name == name and model.num_classes == 3 and model.backend == "torch"
        assert getattr(fast, short).__name__ == short


@pytest.mark.parametrize("name", NAMES)
def test_fused_plan_equals_the_reference_in_float64(name):
    """backend="torch" runs the fused plan (folded BN, fused op boundaries, channels_last)
    with the torch math of each op: any folding or wiring mistake shows here, at float64
    precision. Odd sizes take each family's resize path."""
    ref, model = _pair(name)
    for size in (256, 97):
        x = torch.rand(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            expected, got = ref(x), model(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-12 * max(1.0, expected.abs().max().item())


def test_channels_last_input_and_batch_one():
    ref, model = _pair("mobilevitv3_xxs")
    x = torch.rand(1, 3, 128, 160, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), rtol=0, atol=1e-12)


def test_training_or_grad_runs_the_reference_math():
    ref, model = _pair("mobilevitv3_xxs")
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    assert torch.equal(model(x), ref(x))  # grad enabled: the reference forward, bit for bit
    model.train()
    out = model(x)
    out.sum().backward()
    assert model.conv_1.conv.weight.grad is not None


def test_derived_weights_follow_weight_changes():
    ref, model = _pair("mobilevitv3_050")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        for m in (ref, model):  # an in-place edit, as an optimizer step would do
            m.layer_4[1].conv_proj.block.norm.running_var.mul_(2.0)
        after = model(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, ref(x), rtol=0, atol=1e-12)
        new = model_utils.randomize_(mvit3.create_model("mobilevitv3_050"), seed=5).double()
        model.load_state_dict(new.state_dict())
        assert torch.allclose(model(x), new.eval()(x), rtol=0, atol=1e-12)
        # replacing a parameter or a whole module by attribute assignment is seen too
        norm = model.layer_4[1].conv_proj.block.norm
        norm.weight = torch.nn.Parameter(norm.weight * 3.0)
        new.layer_4[1].conv_proj.block.norm.weight.mul_(3.0)
        assert torch.allclose(model(x), new(x), rtol=0, atol=1e-12)
        other = model_utils.randomize_(mvit3.create_model("mobilevitv3_050"), seed=6).double().eval()
        model.layer_2 = copy.deepcopy(other.layer_2)
        new.layer_2 = other.layer_2
        assert torch.allclose(model(x), new(x), rtol=0, atol=1e-12)
        model.float()
        assert model(x.float()).dtype == torch.float32  # re-derived in the new dtype


def test_convert_keeps_device_dtype_and_mode():
    ref = mvit3.create_model("mobilevitv3_xxs").double().train()
    model = fast.convert(ref)
    assert model.training and model.conv_1.conv.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="MobileViT"):
        fast.convert(torch.nn.Linear(2, 2))


def test_input_errors_match_the_reference():
    model = fast.create_model("mobilevitv3_xxs", backend="torch").eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="expected 3 input channels"):
            model(torch.rand(1, 2, 64, 64))
        with pytest.raises(TypeError, match="model is torch.float32"):
            model(torch.rand(1, 3, 64, 64, dtype=torch.float64))


def test_backend_choice_errors_name_the_reason(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        fast.create_model("mobilevitv3_xxs", backend="cudnn")
    model = fast.create_model("mobilevitv3_xxs", backend="cuda").eval()
    with torch.no_grad(), pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run conv3x3: "):
        model(torch.rand(1, 3, 64, 64))
    monkeypatch.setenv("MVIT3_BACKEND", "torch")
    assert fast.create_model("mobilevitv3_xxs", backend="cuda").backend == "torch"
    monkeypatch.setenv("MVIT3_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MVIT3_BACKEND must be one of"):
        fast.create_model("mobilevitv3_xxs")


def test_auto_on_cpu_float64_falls_back_to_torch():
    ref, model = _pair("mobilevitv2_050", backend="auto")
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), rtol=0, atol=1e-12)


def test_cuda_graph_wrapper_refuses_cpu_and_training():
    wrapped = fast.cuda_graph(fast.create_model("mobilevitv3_xxs", backend="torch"))
    with pytest.raises(ValueError, match="CUDA input"):
        wrapped(torch.rand(1, 3, 64, 64))


# ----- Triton kernels in the interpreter ---------------------------------------------------
@pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET is off (a GPU is present: the gpu tests cover it)")
@pytest.mark.parametrize("name", ["mobilevitv3_xs", "mobilevitv3_050", "mobilevit_xs", "mobilevitv2_050"])
@pytest.mark.parametrize("size", [256, 224])
def test_triton_fast_model_in_the_interpreter(name, size):
    """Every Triton kernel of a whole forward, fp32, against the float64 reference: 1e-4 of
    the logit scale (fp32 rounding through ~60 fused layers stays near 1e-6; a wrong index or
    a dropped term is of order 1e-2 and more). `interpreter_tiles` runs the same kernels on
    larger tiles, which the interpreter executes several times faster."""
    from mvit3.kernels._common import interpreter_tiles, launch_log

    ref = model_utils.randomize_(mvit3.create_model(name), seed=2).eval()
    model = fast.convert(ref, backend="triton").eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad(), interpreter_tiles(), launch_log() as log:
        out = model(x)
    with torch.no_grad():
        expected = ref.double()(x.double())
    assert len(log) >= 40  # the fused path ran: every layer through a Triton launch
    assert (out.double() - expected).abs().max() <= 1e-4 * expected.abs().max()


# ----- on a GPU ---------------------------------------------------------------------------
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
KERNEL_BACKENDS = ("triton", "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Fused ops per whole forward: every model makes dozens (the stem, each MV2 block, each
# transformer layer, the head); fewer means layers fell back to stock torch ops.
MIN_FUSED_CALLS = 20


def _within_twice_the_reference_error(out, ref_out, expected64, dtype) -> tuple:
    """The tolerance rule of the GPU model tests (flash-attention's): the fast model's largest
    error against the float64 reference is at most twice that of the reference model run in
    the same dtype, plus one rounding of the largest logit in that dtype (so that a reference
    error of zero does not demand bit-exactness). Returns (holds, fast error, allowed)."""
    scale = expected64.abs().max()
    ref_error = (ref_out.double() - expected64).abs().max()
    allowed = 2 * ref_error + torch.finfo(dtype).eps * scale
    error = (out.double() - expected64).abs().max()
    return bool(error <= allowed), float(error), float(allowed)


def test_the_tolerance_rule_passes_rounding_and_fails_a_wrong_result():
    """The rule on made-up logits: 4 x 1000 float64 "truth", an fp16 "reference" (rounded
    once) and candidate outputs."""
    expected64 = torch.randn(4, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref_out = expected64.half()
    assert _within_twice_the_reference_error(ref_out, ref_out, expected64, torch.float16)[0]
    # Another rounding path: a relative perturbation of a quarter of fp16's epsilon first.
    eps = torch.finfo(torch.float16).eps
    noisy = (expected64 * (1 + 0.25 * eps * (2 * torch.rand(4, 1000, dtype=torch.float64) - 1))).half()
    assert _within_twice_the_reference_error(noisy, ref_out, expected64, torch.float16)[0]
    wrong = ref_out.clone()
    wrong[2, 17] += 0.05 * expected64.abs().max()  # one logit off by 5% of the scale
    holds, error, allowed = _within_twice_the_reference_error(wrong, ref_out, expected64, torch.float16)
    assert not holds and error > allowed


def _skip_unavailable(backend: str, dtype=torch.float32):
    reason = dict((b, r) for b, ok, r in mvit3.ops.availability() if not ok).get(backend)
    if reason:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 needs compute capability 8.0")


def _gpu_pair(name, backend, dtype=torch.float32):
    _skip_unavailable(backend, dtype)
    ref = model_utils.randomize_(mvit3.create_model(name), seed=1).cuda().eval()
    return ref, fast.convert(ref, backend=backend).to(dtype).eval()


def _assert_fused_path_ran(model, x, backend):
    calls = fused_op_calls(model, x, backend)
    assert sum(calls.values()) >= MIN_FUSED_CALLS, f"{backend} ops of one forward: {calls}"


def _agree_top1(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Top-1 agrees wherever the reference's top-2 margin exceeds twice the largest error;
    closer pairs are within rounding noise and have no defined order."""
    top2 = expected.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * (out - expected).abs().max()
    return bool((out.argmax(1) == expected.argmax(1))[decided].all())


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", [256, 224])
def test_gpu_fast_models_match_the_reference(name, backend, dtype, size):
    """The fused path runs (its ops counted), and its error against the float64 reference is
    at most twice the reference model's own in the same dtype (TF32 off), with top-1 agreement.
    256 px NCHW input, 224 px channels_last."""
    ref, model = _gpu_pair(name, backend, dtype)
    x = torch.rand(4, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(size))
    if size == 224:
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_fused_path_ran(model, x.to(dtype), backend)
    with torch.no_grad():
        out = model(x.to(dtype))
        ref_out = copy.deepcopy(ref).to(dtype)(x.to(dtype))
        expected64 = ref.double()(x.double())
    holds, error, allowed = _within_twice_the_reference_error(out, ref_out, expected64, dtype)
    assert holds, f"{backend} {dtype}: error {error:.3g} > allowed {allowed:.3g}"
    assert _agree_top1(out.double(), expected64)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_cuda_graph_capture_and_replay(backend):
    ref, model = _gpu_pair("mobilevitv3_xs", backend)
    _assert_fused_path_ran(model, torch.rand(1, 3, 256, 256, device="cuda"), backend)
    graphed = fast.cuda_graph(model)
    with torch.no_grad():
        for size in (256, 224, 256):  # one graph per shape, replayed on the second 256
            x = torch.rand(1, 3, size, size, device="cuda")
            assert torch.allclose(graphed(x), model(x), rtol=0, atol=1e-5)
        assert len(graphed._graphs) == 2
        model.layer_5[1].conv_proj.block.norm.running_mean.add_(0.5)  # weights change: recapture
        x = torch.rand(1, 3, 256, 256, device="cuda")
        assert torch.allclose(graphed(x), model(x), rtol=0, atol=1e-5)
        assert len(graphed._graphs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_model_on_a_device_that_is_not_the_current_one(backend):
    """Kernels run on their tensors' GPU (cuda:1) while cuda:0 is the current device."""
    _skip_unavailable(backend, torch.float32)
    ref = model_utils.randomize_(mvit3.create_model("mobilevitv3_xs"), seed=1).to("cuda:1").eval()
    model = fast.convert(ref, backend=backend).eval()
    x = torch.rand(2, 3, 256, 256, device="cuda:1")
    with torch.no_grad(), torch.cuda.device(0):
        out = model(x)
        torch.cuda.synchronize(1)
        assert out.device == x.device
        assert (out - ref(x)).abs().max() <= 1e-4 * ref(x).abs().max()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_compile_max_autotune_fullgraph(backend):
    ref, model = _gpu_pair("mobilevitv3_xs", backend)
    compiled = torch.compile(model, mode="max-autotune", fullgraph=True)
    x = torch.rand(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=0, atol=1e-4)


def test_compile_fullgraph_on_cpu_with_custom_ops():
    """torch.compile traces the fused forward as ONE graph of mvit3 custom ops (fullgraph=True
    fails on any graph break) and runs it (Triton in the interpreter on CPU, or the GPU)."""
    backend = "triton" if (INTERPRET or HAS_CUDA) else "torch"
    device = "cuda" if HAS_CUDA else "cpu"
    model = fast.create_model("mobilevitv3_xxs", backend=backend).to(device).eval()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, fullgraph=True)
    x = torch.rand(1, 3, 64, 64, device=device)
    with torch.no_grad():
        out = compiled(x)
        expected = model(x)
    assert len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert f"mvit3_{backend}.patch_attention" in targets or backend == "torch"
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
