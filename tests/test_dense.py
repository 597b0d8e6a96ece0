"""The reference DeepLabv3 and SSDLite models: registry, official keys and parameter counts,
float64 equivalence with an independent functional forward (tests/oracle_dense.py) including
anchors, decoding and both post-processing rules, checkpoints, segment(), bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mvit3
from mvit3.checkpoint import CheckpointError
from mvit3.models import DeepLabV3, SSDLite, load_dense_checkpoint
from mvit3.models.dense_configs import POSTPROCESS_V01, POSTPROCESS_V02
from mvit3.models.ssdlite import decode_boxes, postprocess

import model_utils
import oracle_dense

SEG = [f"deeplabv3_mobilevitv3_{s}_voc" for s in ("xxs", "xs", "s", "050", "075", "100")] + \
      [f"deeplabv3_mobilevitv3_{s}_ade20k" for s in ("050", "075", "100")]
DET = [f"ssdlite_mobilevitv3_{s}_coco" for s in ("xxs", "xs", "s", "050", "075", "100")]

# dense-spec section 1.1: (backbone, out_l4 channels, out_l5 channels)
BACKBONE = {"xxs": ("mobilevitv3_xxs", 80, 128), "xs": ("mobilevitv3_xs", 160, 160),
            "s": ("mobilevitv3_s", 256, 320), "050": ("mobilevitv3_0.5", 192, 256),
            "075": ("mobilevitv3_0.75", 288, 384), "100": ("mobilevitv3_1.0", 384, 512)}
# dense-spec section 6: (total parameters, encoder, aux head, paper's Table 3/4 value in M)
PARAMS = {
    "deeplabv3_mobilevitv3_xxs_voc": (1_956_309, 669_888, 0, "1.96"),
    "deeplabv3_mobilevitv3_xs_voc": (3_269_669, 1_745_680, 0, "3.3"),
    "deeplabv3_mobilevitv3_s_voc": (7_205_621, 4_493_792, 0, "7.2"),
    "deeplabv3_mobilevitv3_050_voc": (6_525_859, 1_172_985, 224_149, "6.3"),
    "deeplabv3_mobilevitv3_075_voc": (9_978_651, 2_614_641, 334_741, None),
    "deeplabv3_mobilevitv3_100_voc": (14_001_555, 4_626_409, 445_333, "13.56"),
    "deeplabv3_mobilevitv3_050_ade20k": (6_608_677, 1_172_985, 240_790, "6.37"),
    "deeplabv3_mobilevitv3_075_ade20k": (10_061_469, 2_614_641, 351_382, "9.71"),
    "deeplabv3_mobilevitv3_100_ade20k": (14_084_373, 4_626_409, 461_974, "13.62"),
    "ssdlite_mobilevitv3_xxs_coco": (1_533_450, 669_888, 0, "1.53"),
    "ssdlite_mobilevitv3_xs_coco": (2_666_938, 1_745_680, 0, "2.7"),
    "ssdlite_mobilevitv3_s_coco": (5_547_882, 4_493_792, 0, "5.5"),
    "ssdlite_mobilevitv3_050_coco": (2_094_787, 1_172_985, 0, "2"),
    "ssdlite_mobilevitv3_075_coco": (3_718_587, 2_614_641, 0, "3.7"),
    "ssdlite_mobilevitv3_100_coco": (5_846_451, 4_626_409, 0, "5.8"),
}
SSD_320_MAPS = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]  # dense-spec section 3.1


def _size(name):
    return name.split("_")[2]


def _conv_keys(prefix, weight, bn=True, bias=False):
    """(key, shape) of a cvnets ConvLayer in state_dict order."""
    keys = [(f"{prefix}.block.conv.weight", weight)]
    if bias:
        keys.append((f"{prefix}.block.conv.bias", weight[:1]))
    if bn:
        c = weight[:1]
        keys += [(f"{prefix}.block.norm.{n}", c) for n in ("weight", "bias", "running_mean", "running_var")]
        keys.append((f"{prefix}.block.norm.num_batches_tracked", ()))
    return keys


def _encoder_keys(official_name):
    path = Path(__file__).parent / "data" / "keys" / f"{official_name}.txt"
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [(f"encoder.{k}", eval(shape)) for k, shape, _ in rows
            if not k.startswith(("conv_1x1_exp.", "classifier."))]


def _expected_keys(name):
    """The official dense keys, from dense-spec sections 2.2 and 3.5, for any width."""
    official, c4, c5 = BACKBONE[_size(name)]
    keys = _encoder_keys(official)
    if name.startswith("deeplabv3"):
        v01 = _size(name) in ("xxs", "xs", "s")
        k = 21 if name.endswith("_voc") else 150
        a = 256 if v01 else 512
        head = []
        if not v01:
            head += _conv_keys("aux_head.0", (128, c4, 3, 3))
            head += _conv_keys("aux_head.2", (k, 128, 1, 1), bn=False, bias=True)
        p = "aspp.aspp_layer"
        head += _conv_keys(f"{p}.convs.0", (a, c5, 1, 1))
        for i in (1, 2, 3):
            head += _conv_keys(f"{p}.convs.{i}", (a, c5, 3, 3))
        head += _conv_keys(f"{p}.convs.4.aspp_pool.conv_1x1", (a, c5, 1, 1))
        head += _conv_keys(f"{p}.project", (a, 5 * a, 1, 1))
        head += _conv_keys("classifier.classifier" if v01 else "classifier", (k, a, 1, 1), bn=False, bias=True)
        return keys + [(f"seg_head.{key}", shape) for key, shape in head]
    keys += _conv_keys("extra_layers.os_64.dw_conv", (c5, 1, 3, 3))
    keys += _conv_keys("extra_layers.os_64.pw_conv", (256, c5, 1, 1))
    keys += _conv_keys("extra_layers.os_128.dw_conv", (256, 1, 3, 3))
    keys += _conv_keys("extra_layers.os_128.pw_conv", (128, 256, 1, 1))
    keys += _conv_keys("extra_layers.os_256.dw_conv", (128, 1, 3, 3))
    keys += _conv_keys("extra_layers.os_256.pw_conv", (128, 128, 1, 1))
    keys += _conv_keys("extra_layers.os_-1.1", (64, 128, 1, 1), bn=False)
    for i, (cin, proj) in enumerate([(c4, 512), (c5, 256), (256, 256), (128, 128), (128, 128)]):
        if cin != proj:
            keys += _conv_keys(f"ssd_heads.{i}.proj_layer", (proj, cin, 1, 1))
        keys += _conv_keys(f"ssd_heads.{i}.loc_cls_layer.dw_conv", (proj, 1, 3, 3))
        keys += _conv_keys(f"ssd_heads.{i}.loc_cls_layer.pw_conv", (6 * 85, proj, 1, 1), bn=False, bias=True)
    keys += _conv_keys("ssd_heads.5.loc_cls_layer", (4 * 85, 64, 1, 1), bn=False, bias=True)
    return keys


def test_registry_lists_the_15_dense_models_apart_from_the_classifiers():
    assert mvit3.list_models("deeplabv3*") == SEG
    assert mvit3.list_models("ssdlite*") == DET
    assert len(mvit3.list_models()) == 15 and not any("_voc" in n for n in mvit3.list_models())
    assert mvit3.list_models("*") == mvit3.list_models() + SEG + DET
    assert isinstance(mvit3.create_model(SEG[0]), DeepLabV3)
    assert isinstance(mvit3.create_model(DET[0]), SSDLite)
    with pytest.raises(ValueError, match="is a dense model.*DENSE_CONFIGS"):
        mvit3.models.get_config(SEG[0])


@pytest.mark.parametrize("name", SEG + DET)
def test_state_dict_keys_shapes_and_parameter_counts_are_the_official_ones(name):
    model = mvit3.create_model(name)
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == _expected_keys(name)
    assert all(v.dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
               for k, v in sd.items())
    total, encoder, aux, paper = PARAMS[name]
    stats = mvit3.model_stats(model)
    assert stats["params"] == total
    assert sum(p.numel() for p in model.encoder.parameters()) == encoder
    assert stats["params_eval"] == total - aux
    assert stats["img_size"] == (512 if name in SEG else 320) and stats["macs"] > 0
    if paper is not None:  # the paper's count is the whole model without the aux head
        decimals = len(paper.partition(".")[2])
        assert round(stats["params_eval"] / 1e6, decimals) == float(paper)


def test_key_totals_of_the_spec():
    counts = {n: len(mvit3.create_model(n).state_dict()) for n in
              ("deeplabv3_mobilevitv3_xs_voc", "deeplabv3_mobilevitv3_100_voc", "ssdlite_mobilevitv3_xs_coco",
               "ssdlite_mobilevitv3_100_coco", "ssdlite_mobilevitv3_050_coco")}
    assert list(counts.values()) == [341, 313, 394, 358, 352]


def _official_checkpoint(name, tmp_path, head_gain=1.0):
    """Random float64 weights saved as an official checkpoint file (nested, official keys);
    `head_gain` scales the SSD predictors so that softmax scores pass the thresholds."""
    source = model_utils.randomize_(mvit3.create_model(name)).double()
    sd = dict(source.state_dict())
    for key in [k for k in sd if k.startswith("ssd_heads.") and ".norm." not in k and "proj" not in k
                and "dw_conv" not in k]:
        sd[key] = sd[key] * head_gain
    path = tmp_path / "checkpoint_ema_best.pt"
    torch.save({"state_dict": sd}, path)
    return path, sd


def _close(ours, official):
    return torch.allclose(ours, official, rtol=0, atol=1e-9 * max(1.0, official.abs().max().item()))


# (name, output stride, ASPP rates, cvnets v0.1) from dense-spec section 2.1
SEG_CASES = [("deeplabv3_mobilevitv3_xxs_voc", 16, (6, 12, 18), True),
             ("deeplabv3_mobilevitv3_050_voc", 16, (6, 12, 18), False),
             ("deeplabv3_mobilevitv3_050_ade20k", 8, (12, 24, 36), False)]


@pytest.mark.parametrize("name, output_stride, rates, v01", SEG_CASES)
def test_segmentation_float64_logits_equal_the_official_forward(name, output_stride, rates, v01, tmp_path):
    """At the input size, or (v2-style, as its eval pipeline does) straight at an image size."""
    path, sd = _official_checkpoint(name, tmp_path)
    model = mvit3.create_model(name).double().eval()
    result = mvit3.load_checkpoint(model, path)
    assert not (result.missing or result.unexpected or result.mismatched)
    size = (128, 192) if v01 else (128, 128)
    x = torch.rand(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out_size = (101, 150) if name.endswith("ade20k") else None
    with torch.no_grad():
        ours = model(x, out_size=out_size)
        official = oracle_dense.deeplabv3(sd, model.cfg.backbone_cfg, x, output_stride=output_stride,
                                          rates=rates, v01=v01, orig_size=out_size)
    assert ours.shape == (1, model.num_classes, *(out_size or size))
    assert _close(ours, official)


def test_the_segmentation_exactness_check_can_fail(tmp_path):
    """Other ASPP rates move the logits far beyond the tolerance: the equivalence test above
    would see such a mistake."""
    name = "deeplabv3_mobilevitv3_xxs_voc"
    path, sd = _official_checkpoint(name, tmp_path)
    model = mvit3.create_model(name).double().eval()
    load_dense_checkpoint(model, path)
    x = torch.rand(1, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        wrong_rates = oracle_dense.deeplabv3(sd, model.cfg.backbone_cfg, x, output_stride=16,
                                             rates=(12, 24, 36), v01=True)
        assert (model(x) - wrong_rates).abs().max() > 1e-6


def test_dilation_follows_each_code_base():
    """v1-style (cvnets v0.1): only layer_5's MV2 loses its stride, nothing is dilated.
    v2-style at OS 8: layer_4 MV2 stride 1 dil 1, block dil 2; layer_5 MV2 dil 2, block dil 4."""
    def dw(module):
        return module.stride[0], module.dilation[0]

    v1 = mvit3.create_model("deeplabv3_mobilevitv3_xs_voc").encoder
    assert dw(v1.layer_4[0].block.conv_3x3.block.conv) == (2, 1)
    assert dw(v1.layer_5[0].block.conv_3x3.block.conv) == (1, 1)
    assert all(m.dilation == (1, 1) for m in v1.modules() if isinstance(m, torch.nn.Conv2d))
    ade = mvit3.create_model("deeplabv3_mobilevitv3_050_ade20k").encoder
    assert dw(ade.layer_3[0].block.conv_3x3.block.conv) == (2, 1)
    assert dw(ade.layer_4[0].block.conv_3x3.block.conv) == (1, 1)
    assert dw(ade.layer_4[1].local_rep[0].block.conv) == (1, 2)
    assert dw(ade.layer_5[0].block.conv_3x3.block.conv) == (1, 2)
    assert dw(ade.layer_5[1].local_rep[0].block.conv) == (1, 4)
    voc = mvit3.create_model("deeplabv3_mobilevitv3_050_voc").encoder
    assert dw(voc.layer_5[0].block.conv_3x3.block.conv) == (1, 1)
    assert dw(voc.layer_5[1].local_rep[0].block.conv) == (1, 2)


# (name, cvnets v0.1, post-processing of the family) from dense-spec section 3.4
DET_CASES = [("ssdlite_mobilevitv3_xxs_coco", True), ("ssdlite_mobilevitv3_050_coco", False)]


def _same_detections(ours, labels, scores, boxes):
    assert torch.equal(ours["labels"], labels)
    assert _close(ours["scores"], scores) and _close(ours["boxes"], boxes)


@pytest.mark.parametrize("name, v01", DET_CASES)
def test_detection_float64_outputs_anchors_boxes_and_detections_equal_the_official_ones(name, v01, tmp_path):
    path, sd = _official_checkpoint(name, tmp_path, head_gain=4.0)
    model = mvit3.create_model(name).double().eval()
    load_dense_checkpoint(model, path)
    x = torch.rand(1, 3, 320, 320, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scores, locations = model(x)
        official_scores, official_locations = oracle_dense.ssdlite(sd, model.cfg.backbone_cfg, x)
    assert scores.shape == (1, 3232, 81) and locations.shape == (1, 3232, 4)
    assert _close(scores, official_scores) and _close(locations, official_locations)

    anchors = model.anchors(320, 320)
    official_anchors = oracle_dense.anchors(SSD_320_MAPS, v01)
    assert anchors.dtype == torch.float32 and torch.equal(anchors, official_anchors)
    boxes = decode_boxes(locations, anchors, 0.1, 0.2)
    official_boxes = oracle_dense.decode(official_locations, official_anchors)
    assert boxes.dtype == torch.float64 and _close(boxes, official_boxes)

    rule = oracle_dense.predict_v01 if v01 else oracle_dense.postprocess_v02
    ours = model.detect(x)[0]
    labels, kept_scores, kept_boxes = rule(official_scores[0], official_boxes[0])
    assert labels.numel() > 0
    _same_detections(ours, labels, kept_scores, kept_boxes)
    if v01:  # class order
        assert torch.equal(ours["labels"], ours["labels"].sort().values)
    else:  # score order
        assert torch.equal(ours["scores"], ours["scores"].sort(descending=True).values)
    # the user's threshold and IoU replace the family's
    ours = model.detections(scores, locations, (320, 320), conf_threshold=0.2, nms_iou=0.3)[0]
    _same_detections(ours, *rule(official_scores[0], official_boxes[0], conf=0.2, iou=0.3))
    with pytest.raises(ValueError, match="image_size must be the size of the input"):
        model.detections(scores, locations, (256, 256))


def test_anchor_facts_of_the_spec():
    model = mvit3.create_model("ssdlite_mobilevitv3_xs_coco")
    anchors = model.anchors(320, 320)
    assert anchors.shape == (3232, 4)
    first = anchors[:6].tolist()  # position (0, 0) of the 20x20 level, cell 1/20 wide
    assert first[0] == pytest.approx([0.025, 0.025, 0.1, 0.1])
    assert first[1] == pytest.approx([0.025, 0.025, 0.160728, 0.160728], abs=1e-6)
    r2, r3 = 2 ** 0.5, 3 ** 0.5
    assert first[2:] == [pytest.approx([0.025, 0.025, 0.1 * r, 0.1 / r]) for r in (r2, r2 ** -1)] + \
        [pytest.approx([0.025, 0.025, 0.1 * r, 0.1 / r]) for r in (r3, r3 ** -1)]
    last = anchors[-4:].tolist()  # the global level: 4 anchors, clamped to 1
    assert last[0] == pytest.approx([0.5, 0.5, 0.891667, 0.891667], abs=1e-6)
    assert last[2][2] == 1.0 and last[3][3] == 1.0


@pytest.mark.parametrize("name", ["ssdlite_mobilevitv3_xxs_coco", "ssdlite_mobilevitv3_050_coco"])
@pytest.mark.parametrize("size", [(200, 97), (33, 47)])
def test_anchors_match_the_prediction_maps_at_any_size(name, size):
    model = mvit3.create_model(name).eval()
    with torch.no_grad():
        scores, _ = model(torch.rand(1, 3, *size))
    anchors = model.anchors(*size)
    assert anchors.shape[0] == scores.shape[1]
    official = oracle_dense.anchors(model.feature_map_sizes(*size), name.endswith("xxs_coco"))
    assert torch.equal(anchors, official)


def _grid_boxes(n):
    """n x n disjoint corner boxes (no two overlap, so NMS removes none)."""
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    x0, y0 = xs.flatten().double() / n, ys.flatten().double() / n
    return torch.stack((x0, y0, x0 + 0.5 / n, y0 + 0.5 / n), dim=1)


def test_postprocessing_caps_of_both_rules():
    """900 disjoint boxes, all confident for classes 1 and 2: v1-style keeps 200 per class
    (400 in class order); v2-style 200 per image, in score order."""
    boxes = _grid_boxes(30)
    logits = torch.full((900, 81), -10.0, dtype=torch.float64)
    logits[:, 1] = torch.linspace(5, 6, 900, dtype=torch.float64)
    logits[:, 2] = torch.linspace(5.5, 4.5, 900, dtype=torch.float64)
    probs = logits.softmax(dim=-1)
    v1 = postprocess(probs, boxes, POSTPROCESS_V01)
    assert v1["labels"].tolist() == [1] * 200 + [2] * 200
    _same_detections(v1, *oracle_dense.predict_v01(logits, boxes))
    v2 = postprocess(probs, boxes, POSTPROCESS_V02)
    assert v2["labels"].numel() == 200
    assert torch.equal(v2["scores"], v2["scores"].sort(descending=True).values)
    _same_detections(v2, *oracle_dense.postprocess_v02(logits, boxes))
    # overlapping boxes: NMS at IoU 0.5 keeps the best of each pile
    piled = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.6, 0.6, 0.9, 0.9]], dtype=torch.float64)
    few = torch.full((3, 81), -10.0, dtype=torch.float64)
    few[:, 1] = torch.tensor([3.0, 4.0, 2.0], dtype=torch.float64)
    for rule in (POSTPROCESS_V01, POSTPROCESS_V02):
        kept = postprocess(few.softmax(-1), piled, rule)
        assert kept["boxes"].tolist() == piled[[1, 2]].tolist()
    nothing = postprocess(torch.full((3, 81), 1 / 81, dtype=torch.float64), piled, POSTPROCESS_V01)
    assert nothing["boxes"].shape == (0, 4) and nothing["labels"].dtype == torch.int64


def test_detection_without_torchvision_is_a_clear_error(monkeypatch):
    model = mvit3.create_model("ssdlite_mobilevitv3_xxs_coco").eval()
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)
    with pytest.raises(ImportError, match="torchvision's NMS.*pip install"):
        model.detect(torch.rand(1, 3, 64, 64))


def test_training_mode_returns_the_aux_logits_of_v2_style_models():
    v2 = mvit3.create_model("deeplabv3_mobilevitv3_050_voc").train()
    out, aux = v2(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 21, 64, 64) and aux.shape == (2, 21, 4, 4)
    (out.mean() + aux.mean()).backward()
    assert v2.seg_head.aux_head[0].block.conv.weight.grad is not None
    v1 = mvit3.create_model("deeplabv3_mobilevitv3_xxs_voc").train()
    assert v1(torch.rand(2, 3, 64, 64)).shape == (2, 21, 64, 64)


def _checkpoint_of(name, tmp_path, filename):
    path = tmp_path / filename
    torch.save({"model": mvit3.create_model(name).state_dict()}, path)
    return path


def test_a_classification_checkpoint_loads_into_the_encoder(tmp_path):
    classifier = model_utils.randomize_(mvit3.create_model("mobilevitv3_xs"))
    path = tmp_path / "mobilevitv3_xs.pt"
    torch.save({"state_dict": classifier.state_dict()}, path)
    for name, load in (("deeplabv3_mobilevitv3_xs_voc", mvit3.load_checkpoint),
                       ("ssdlite_mobilevitv3_xs_coco", load_dense_checkpoint)):
        model = mvit3.create_model(name)
        heads_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
        load(model, path, backbone_only=True)
        own = model.encoder.state_dict()
        assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in own.items())
        assert all(torch.equal(model.state_dict()[k], v) for k, v in heads_before.items())


@pytest.mark.parametrize("name, missing", [("deeplabv3_mobilevitv3_xs_voc", "seg_head.aspp.aspp_layer.convs.0"),
                                           ("ssdlite_mobilevitv3_050_coco", "extra_layers.os_64.dw_conv")])
def test_a_classification_checkpoint_given_as_a_dense_one_names_the_keys(name, missing, tmp_path):
    path = _checkpoint_of(f"mobilevitv3_{_size(name)}", tmp_path, "classifier.pt")
    with pytest.raises(CheckpointError, match=rf"(?s)missing keys \(\d+\): {missing}.*unexpected keys"):
        mvit3.create_model(name, checkpoint_path=path)
    with pytest.raises(CheckpointError, match=rf"(?s)missing keys \(\d+\): {missing}.*unexpected keys "
                                              rf"\(\d+\): (conv_1x1_exp|classifier)\."):
        mvit3.load_checkpoint(mvit3.create_model(name), path)


def test_a_dense_checkpoint_given_as_a_classification_one_names_the_keys(tmp_path):
    path = _checkpoint_of("deeplabv3_mobilevitv3_xs_voc", tmp_path, "deeplab.pt")
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(\d+\): conv_1x1_exp.*"
                                              r"unexpected keys \(\d+\): seg_head\.aspp"):
        mvit3.load_checkpoint(mvit3.create_model("mobilevitv3_xs"), path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): seg_head.aspp"):
        load_dense_checkpoint(mvit3.create_model("ssdlite_mobilevitv3_xs_coco"), path, backbone_only=True)


def test_checkpoint_options_of_the_other_kind_of_model_are_refused(tmp_path):
    path = _checkpoint_of("mobilevitv3_xxs", tmp_path, "classifier.pt")
    with pytest.raises(ValueError, match="backbone_only is for dense models"):
        mvit3.load_checkpoint(mvit3.create_model("mobilevitv3_xxs"), path, backbone_only=True)
    with pytest.raises(ValueError, match="ignore_head is for classifiers"):
        mvit3.load_checkpoint(mvit3.create_model("deeplabv3_mobilevitv3_xxs_voc"), path, ignore_head=True)


@pytest.mark.parametrize("name, multiple", [("deeplabv3_mobilevitv3_xs_voc", 16),
                                            ("deeplabv3_mobilevitv3_050_ade20k", 8)])
def test_a_size_that_is_not_a_multiple_of_the_output_stride_is_a_clear_error(name, multiple):
    model = mvit3.create_model(name).eval()
    with pytest.raises(ValueError, match=rf"input 100x132: .* multiples of its output stride {multiple}"):
        model(torch.rand(1, 3, 100, 132))


def _uint8_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _official_resize(image: np.ndarray, height: int, width: int, interpolation: str) -> torch.Tensor:
    """[1, 3, height, width] float64 of the uint8 HxWx3 image resized as the official pipelines
    do, through their own libraries: cv2 INTER_LINEAR (v1 family), or PIL bicubic one axis per
    call, width first (as the Pillow of cvnets v0.2 did)."""
    if interpolation == "bilinear":
        import cv2

        resized = cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=cv2.INTER_LINEAR)
    else:
        from PIL import Image

        pil = Image.fromarray(image).resize((width, image.shape[0]), Image.BICUBIC)
        resized = np.asarray(pil.resize((width, height), Image.BICUBIC))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].double()


def test_segment_runs_the_v1_style_pipeline():
    """BGR, exactly 512x512 (bilinear, rounded), /255; label map nearest-resized back."""
    model = mvit3.create_model("deeplabv3_mobilevitv3_xxs_voc").eval()
    image = _uint8_image(150, 200)
    labels, logits = mvit3.segment(image, model)
    x = _official_resize(image[:, :, ::-1], 512, 512, "bilinear") / 255
    with torch.no_grad():
        expected = model(x.float())
    assert logits.shape == (1, 21, 512, 512) and torch.allclose(logits, expected, atol=1e-5)
    rows = (torch.arange(150) * 512 / 150).long()  # nearest: floor(dst * in / out)
    cols = (torch.arange(200) * 512 / 200).long()
    assert labels.shape == (150, 200) and labels.dtype == torch.int64
    assert torch.equal(labels, expected.argmax(1)[0][rows][:, cols])


def test_segment_runs_the_v2_style_pipeline(tmp_path):
    """RGB, shorter side 512 (bicubic), floor to multiples of 16 (align_corners=True), logits
    straight to the image size."""
    from PIL import Image

    model = mvit3.create_model("deeplabv3_mobilevitv3_050_voc").eval()
    image = _uint8_image(201, 300)
    Image.fromarray(image).save(tmp_path / "image.png")
    labels, logits = mvit3.segment(tmp_path / "image.png", model)
    x = _official_resize(image, 512, 764, "bicubic")  # 201x300 -> 512x764 -> 512x752
    x = F.interpolate(x / 255, size=(512, 752), mode="bilinear", align_corners=True)
    with torch.no_grad():
        expected = model(x.float(), out_size=(201, 300))
    assert logits.shape == (1, 21, 201, 300) and torch.allclose(logits, expected, atol=1e-5)
    assert torch.equal(labels, logits.argmax(1)[0])


def test_segment_bad_input_is_a_clear_error(tmp_path):
    model = mvit3.create_model("deeplabv3_mobilevitv3_xxs_voc").eval()
    with pytest.raises(FileNotFoundError, match="image file not found"):
        mvit3.segment(tmp_path / "missing.png", model)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        mvit3.segment(tmp_path / "broken.png", model)
    with pytest.raises(TypeError, match="uint8"):
        mvit3.segment(np.zeros((8, 8, 3), dtype=np.float32), model)
    with pytest.raises(TypeError, match=r"expected an mvit3 DeepLabV3 .*got MobileViT"):
        mvit3.segment(_uint8_image(8, 8), mvit3.create_model("mobilevitv3_xxs"))
    with pytest.raises(ValueError, match="model.eval"):
        mvit3.segment(_uint8_image(8, 8), model.train())


def test_detect_runs_the_pipeline_and_gives_pixel_boxes():
    """v2-style: RGB, 320x320 bicubic (rounded), /255; boxes scaled to the image, clipped."""
    model = mvit3.create_model("ssdlite_mobilevitv3_050_coco").eval()
    image = _uint8_image(150, 200)
    found = mvit3.detect(image, model)
    expected = model.detect((_official_resize(image, 320, 320, "bicubic") / 255).float())[0]
    assert found["labels"].numel() > 0 and torch.equal(found["labels"], expected["labels"])
    scale = torch.tensor([200, 150, 200, 150])
    assert torch.allclose(found["boxes"], torch.minimum(expected["boxes"].clamp(min=0) * scale, scale))
    assert found["boxes"].min() >= 0 and (found["boxes"] <= scale).all()
    with pytest.raises(TypeError, match=r"expected an mvit3 SSDLite .*got DeepLabV3"):
        mvit3.detect(image, mvit3.create_model("deeplabv3_mobilevitv3_xxs_voc").eval())
