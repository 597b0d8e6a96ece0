"""The fast DeepLabv3 and SSDLite models (mvit3.fast.create_model on the dense names): the fused
forward equals the reference in float64 with the torch backend (folding and wiring), and in
fp32 through the Triton kernels in the interpreter; launches per forward; the reference
forward in training or with grad; checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch

import mvit3
import mvit3.fast
from mvit3.bench.launches import count_launches
from mvit3.fast import FastDeepLabV3, FastSSDLite
from mvit3.models import DENSE_CONFIGS

import model_utils
from conftest import INTERPRET

DENSE_NAMES = list(DENSE_CONFIGS)  # v1-style VOC (no dilated conv), v2-style VOC (OS 16) and ADE20K
# (OS 8: dilations 2 and 4, rates 12-36), SSDLite (0.5: no projection at OS 32)


def _pair(name, dtype=torch.float64, backend="torch", seed=0):
    """A reference model with random weights and BN statistics, and a fast model holding the
    same weights (state_dict in `dtype`), both in eval mode."""
    ref = model_utils.randomize_(mvit3.create_model(name), seed=seed).double().eval()
    fast = mvit3.fast.create_model(name, backend=backend)
    fast.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                          for k, v in ref.state_dict().items()})
    return ref, fast.to(dtype).eval()


def _relative_error(ours, official):
    if isinstance(official, tuple):
        return max(_relative_error(a, b) for a, b in zip(ours, official))
    return ((ours.double() - official).abs().max() / official.abs().max()).item()


def _input(size, batch=1, dtype=torch.float64):
    return torch.rand(batch, 3, *size, dtype=dtype, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_fused_forward_equals_the_reference_in_float64(name):
    """torch backend, all 15 models: the fused plan's folding and wiring (dilations, the ASPP
    projection split over the branches with the pooled branch as a residual, SSD separable
    convs) to 1e-12."""
    ref, fast = _pair(name)
    x = _input((64, 48), batch=2)
    with torch.no_grad():
        official, ours = ref(x), fast(x)
    assert _relative_error(ours, official) < 1e-12


def test_the_fused_path_runs_the_fused_ops_and_the_reference_path_in_training():
    ref, fast = _pair("deeplabv3_mobilevitv3_050_ade20k", dtype=torch.float32, backend="triton")
    x = _input((64, 64), dtype=torch.float32)
    with mvit3.kernels._common.launch_log(dry_run=True) as log, torch.no_grad():
        fast(x)
    kernels = {record.name for record in log.records}
    assert {"_conv3x3_kernel", "_dwconv_pointwise_kernel", "_pointwise_conv_kernel"} <= kernels
    dilations = {dict(record.args)["dilation"] for record in log.records
                 if record.name in ("_conv3x3_kernel", "_dwconv_pointwise_kernel")}
    assert dilations == {1, 2, 4, 12, 24, 36}  # stem/MV2, OS 8 backbone, ASPP rates
    fast.train()
    with mvit3.kernels._common.launch_log(dry_run=True) as log:
        out = fast(x.expand(2, -1, -1, -1))  # training: the reference forward (logits, aux logits)
    assert len(log.records) == 0 and isinstance(out, tuple)


def test_convert_and_head_weights_edited_in_place():
    """mvit3.fast.convert makes the fast twin of a reference dense model; an in-place edit of
    a head weight reaches its derived weights."""
    ref = model_utils.randomize_(mvit3.create_model("ssdlite_mobilevitv3_xs_coco")).double().eval()
    fast = mvit3.fast.convert(ref, backend="torch")
    assert isinstance(fast, FastSSDLite) and not fast.training
    x = _input((64, 64))
    with torch.no_grad():
        before = fast(x)[0]
        fast.ssd_heads[2].loc_cls_layer.pw_conv.block.conv.bias.add_(1.0)
        ref.ssd_heads[2].loc_cls_layer.pw_conv.block.conv.bias.add_(1.0)
        after, official = fast(x)[0], ref(x)[0]
    assert not torch.equal(before, after)
    assert _relative_error(after, official) < 1e-12


def test_create_model_loads_official_checkpoints_and_refuses_bad_input(tmp_path):
    ref = model_utils.randomize_(mvit3.create_model("deeplabv3_mobilevitv3_xxs_voc"))
    path = tmp_path / "checkpoint_ema_best.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    fast = mvit3.fast.create_model("deeplabv3_mobilevitv3_xxs_voc", backend="torch", checkpoint_path=path)
    assert isinstance(fast, FastDeepLabV3) and fast.num_classes == 21
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in fast.state_dict().items())
    assert list(fast.state_dict()) == list(ref.state_dict())
    det = mvit3.fast.create_model("ssdlite_mobilevitv3_xxs_coco", num_classes=5)
    assert isinstance(det, FastSSDLite) and det.ssd_heads[5].loc_cls_layer.block.conv.out_channels == 4 * 9
    fast.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="multiples of its output stride 16"):
        fast(torch.rand(1, 3, 100, 96))
    with torch.no_grad(), pytest.raises(TypeError, match="convert one of them"):
        fast(torch.rand(1, 3, 64, 64, dtype=torch.float64))


# The sizes, fp32 batch 1. Seconds in the interpreter (interpreter_tiles) on this
# project's loaded 2-core CPU: 48, 135, 15 and 22 (about 4 min with the references).
INTERPRETER_CASES = [("deeplabv3_mobilevitv3_xs_voc", 512), ("deeplabv3_mobilevitv3_050_ade20k", 512),
                     ("ssdlite_mobilevitv3_xs_coco", 320), ("ssdlite_mobilevitv3_100_coco", 320)]


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET is off (a GPU is present: the gpu tests cover it)")
@pytest.mark.parametrize("name, size", INTERPRETER_CASES)
def test_triton_fast_dense_model_in_the_interpreter(name, size):
    """Every Triton kernel of a whole forward, fp32, within 1e-4 of the float64 reference's
    scale (logits; SSD scores and regressions each): the dilated depthwise convs of the
    v2-style backbones, ASPP's dilated convs (rates 6-18, 12-36), the SSD heads' 1x1s and
    composed separable convs."""
    from mvit3.kernels._common import interpreter_tiles, launch_log

    ref, fast = _pair(name, dtype=torch.float32, backend="triton", seed=2)
    x = _input((size, size))
    with torch.no_grad(), interpreter_tiles(), launch_log() as log:
        ours = fast(x.float())
    with torch.no_grad():
        official = ref(x)
    assert len(log) == LAUNCHES[name, size][0]  # the fused path ran, every launch of the dry run
    assert _relative_error(ours, official) <= 1e-4


# (Triton launches, ATen ops) of one fp32 batch-1 forward, counted in a dry run: the README's
# table. ATen: DeepLabv3 mean, 2 addmm (the pooled branch), 6 relu_, the upsampling; SSDLite
# 2 depthwise convs (the os 16 and 32 predictors), mean, 5-6 relu_, 2 concatenations.
LAUNCHES = {("deeplabv3_mobilevitv3_xs_voc", 512): (49, 10),
            ("deeplabv3_mobilevitv3_050_ade20k", 512): (74, 10),
            ("ssdlite_mobilevitv3_xs_coco", 320): (54, 11),
            ("ssdlite_mobilevitv3_050_coco", 320): (78, 10),
            ("ssdlite_mobilevitv3_100_coco", 320): (79, 11)}


@pytest.mark.parametrize("name, size", LAUNCHES)
def test_launches_per_forward(name, size):
    fast = mvit3.fast.create_model(name, backend="triton").eval()
    count = count_launches(fast, torch.rand(1, 3, size, size), dry_run=True)
    assert (count.triton_launches, count.aten_ops) == LAUNCHES[name, size]
