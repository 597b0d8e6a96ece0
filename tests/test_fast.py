"""The drop-in fast models: same weights and outputs as the reference, on every backend."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import mvit3
import mvit3.fast as fast
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
