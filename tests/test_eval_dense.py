"""`python -m mvit3 eval --task seg|det` on tiny datasets written here in the official layouts
(VOC 2012, ADE20K, COCO 2017), the smallest models, and checkpoints whose biases fix the
answer where the metric is checked against a hand-computed value."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mvit3
from mvit3 import metrics
from mvit3.evaluate import COCODetectionSet, SegmentationSet

from test_commands import mvit3_command  # noqa: F401 (a fixture)

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("cv2")

SEG_MODEL = "deeplabv3_mobilevitv3_xxs_voc"  # v1-style: OpenCV, BGR, 512x512
ADE_MODEL = "deeplabv3_mobilevitv3_050_ade20k"  # v2-style: PIL, shorter side 512
DET_MODEL = "ssdlite_mobilevitv3_xxs_coco"
# COCO's 80 category ids: 1..90 without these
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def _pixels(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save_mask(labels: np.ndarray, path, mode="P"):
    mask = PIL.fromarray(labels, mode="L")
    if mode == "P":  # VOC's masks are palette PNGs: the pixel values are the class indices
        mask = mask.convert("P")
        mask.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    mask.save(path)


# VOC image 40x56: the top 20 rows are class 0, the rest class 1, the outer ring 255 (ignored)
VOC_LABELS = np.where(np.arange(40)[:, None] < 20, 0, 1).repeat(56, axis=1).astype(np.uint8)
VOC_LABELS[[0, -1], :] = VOC_LABELS[:, [0, -1]] = 255


@pytest.fixture
def voc(tmp_path):
    """A VOC2012 tree with one image and a checkpoint whose classifier predicts class 0 at every
    pixel (weights 0, bias 10 for class 0): the mIoU is known from the mask alone."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(tmp_path / folder)
    PIL.fromarray(_pixels(40, 56, 0)).save(tmp_path / "JPEGImages" / "2007_000001.jpg")
    _save_mask(VOC_LABELS, tmp_path / "SegmentationClass" / "2007_000001.png")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n")
    model = mvit3.create_model(SEG_MODEL)
    with torch.no_grad():
        classifier = model.seg_head.classifier.classifier.block.conv
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.bias[0] = 10.0
    torch.save(model.state_dict(), tmp_path / "seg.pt")
    return tmp_path


def test_seg_on_voc_gives_the_known_miou(voc, mvit3_command):
    """Everything predicted 0: IoU_0 = n0 / (n0 + n1), IoU_1 = 0; the fast model (torch
    backend) predicts the same, so the pixels agree everywhere."""
    status, out, err = mvit3_command("eval", "--task", "seg", "--data", ".", "--model", SEG_MODEL,
                                     "--checkpoint", "seg.pt", "--backend", "torch",
                                     "--compare-reference", "--workers", "0", "--device", "cpu",
                                     "--json", "seg.json", cwd=voc)
    assert status == 0, err
    result = json.loads((voc / "seg.json").read_text())
    n0, n1 = (VOC_LABELS == 0).sum(), (VOC_LABELS == 1).sum()
    assert result["images"] == 1 and result["task"] == "seg"
    assert result["miou"] == pytest.approx(n0 / (n0 + n1) / 2)
    assert result["iou"][:2] == pytest.approx([n0 / (n0 + n1), 0.0])
    assert set(result["iou"][2:]) == {None}
    assert result["pixel_accuracy"] == pytest.approx(n0 / (n0 + n1))
    assert result["pixel_agreement_with_reference"] == 1.0 and result["images_per_second"] > 0
    assert result["paper"]["table"] == "Table 3a"
    assert result["paper"]["value"] == pytest.approx(0.7404)
    assert "paper (Table 3a): mIoU 74.04%" in out and "eval deeplabv3_mobilevitv3_xxs_voc" in err


def test_voc_image_without_its_mask_is_named(voc):
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n")
    PIL.fromarray(_pixels(30, 30, 1)).save(voc / "JPEGImages" / "2007_000002.jpg")
    model = mvit3.create_model(SEG_MODEL).eval()
    with pytest.raises(FileNotFoundError,
                       match=r"label mask of .*2007_000002.jpg.* not found: .*2007_000002.png"):
        SegmentationSet(str(voc), model)
    os.remove(voc / "ImageSets/Segmentation/val.txt")
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/val.txt\) not found"):
        SegmentationSet(str(voc), model)


def test_voc_mask_must_hold_class_indices_of_the_image_size(voc):
    model = mvit3.create_model(SEG_MODEL).eval()
    mask = voc / "SegmentationClass" / "2007_000001.png"
    PIL.fromarray(_pixels(40, 56, 2)).save(mask)  # an RGB colour picture, not indices
    with pytest.raises(ValueError,
                       match=r"2007_000001.png' is a RGB image: expected class indices"):
        SegmentationSet(str(voc), model)[0]
    _save_mask(VOC_LABELS[:30], mask)
    with pytest.raises(ValueError, match=r"2007_000001.png' is 30x56, its image 40x56"):
        SegmentationSet(str(voc), model)[0]


def test_ade20k_layout_shifts_the_labels_and_names_a_missing_annotation(tmp_path):
    images = tmp_path / "images" / "validation"
    annotations = tmp_path / "annotations" / "validation"
    os.makedirs(images)
    os.makedirs(annotations)
    labels = np.array([[0, 1, 150], [2, 0, 75]], dtype=np.uint8)
    labels = labels.repeat(10, axis=0).repeat(12, axis=1)  # 20x36
    PIL.fromarray(_pixels(20, 36, 3)).save(images / "ADE_val_00000001.jpg")
    _save_mask(labels, annotations / "ADE_val_00000001.png", mode="L")
    model = mvit3.create_model(ADE_MODEL).eval()
    dataset = SegmentationSet(str(tmp_path), model)
    x, size, target = dataset[0]
    assert size == (20, 36) and x.shape == (1, 3, 512, 920)  # 20x36 -> 512x921, floored to 8
    assert torch.equal(target, torch.from_numpy(metrics.ade20k_labels(labels).astype(np.int64)))
    assert target.unique().tolist() == [0, 1, 74, 149, 255]
    PIL.fromarray(_pixels(20, 20, 4)).save(images / "ADE_val_00000002.jpg")
    with pytest.raises(FileNotFoundError,
                       match=r"label mask of .*ADE_val_00000002.jpg.* not found"):
        SegmentationSet(str(tmp_path), model)


# COCO: three images of odd sizes (two shards of 2 and 1 under torchrun), a few objects
COCO_IMAGES = {11: (50, 70), 4: (64, 48), 9: (33, 41)}  # id: (height, width)
COCO_OBJECTS = [(11, 1, [5.0, 5.0, 40.0, 30.0]), (4, 1, [0.0, 10.0, 40.0, 50.0]),
                (9, 90, [3.0, 3.0, 20.0, 20.0])]


def _coco_file(root, image_id):
    return root / "val2017" / f"{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO 2017 tree and an SSDLite checkpoint biased towards class 1 (category id 1), so
    that it finds objects above the 0.05 threshold of its post-processing."""
    pytest.importorskip("pycocotools")
    root = tmp_path_factory.mktemp("coco")
    os.makedirs(root / "val2017")
    os.makedirs(root / "annotations")
    for image_id, (height, width) in COCO_IMAGES.items():
        PIL.fromarray(_pixels(height, width, image_id)).save(_coco_file(root, image_id))
    data = {"info": {}, "licenses": [],
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w}
                       for i, (h, w) in COCO_IMAGES.items()],
            "categories": [{"id": i, "name": f"c{i}"} for i in COCO_CATEGORY_IDS],
            "annotations": [{"id": n + 1, "image_id": i, "category_id": c, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0}
                            for n, (i, c, box) in enumerate(COCO_OBJECTS)]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    torch.manual_seed(0)
    model = mvit3.create_model(DET_MODEL)
    with torch.no_grad():
        for head in model.ssd_heads:
            layer = head.loc_cls_layer  # separable (pw_conv) or, at the 1x1 level, one conv
            predictor = layer.pw_conv if hasattr(layer, "pw_conv") else layer
            bias = predictor.block.conv.bias.view(-1, 85)  # per anchor: 4 box, 81 class logits
            bias[:, 4 + 1] += 6.0
    torch.save(model.state_dict(), root / "det.pt")
    return root


@pytest.fixture(scope="module")
def expected_coco(coco) -> tuple:
    """(detections, COCO stats) the eval should give: mvit3.detect on each file, mapped to
    COCO's ids and xywh boxes, scored by pycocotools."""
    model = mvit3.create_model(DET_MODEL, checkpoint_path=str(coco / "det.pt")).eval()
    detections = [d for image_id in COCO_IMAGES
                  for d in metrics.coco_detections(
                      image_id, mvit3.detect(_coco_file(coco, image_id), model), COCO_CATEGORY_IDS)]
    annotations = metrics.load_coco(str(coco / "annotations" / "instances_val2017.json"))
    return detections, metrics.coco_map(annotations, detections, sorted(COCO_IMAGES))[0]


def test_det_on_coco_is_the_map_of_the_pipeline_detections(coco, expected_coco, mvit3_command):
    status, out, err = mvit3_command("eval", "--task", "det", "--data", ".", "--model", DET_MODEL,
                                     "--checkpoint", "det.pt", "--backend", "torch",
                                     "--compare-reference", "--workers", "0", "--device", "cpu",
                                     "--json", "det.json", cwd=coco)
    assert status == 0, err
    result = json.loads((coco / "det.json").read_text())
    detections, expected = expected_coco
    assert {d["category_id"] for d in detections} >= {1}  # the biased class was found
    assert result["images"] == 3 and result["coco"] == pytest.approx(expected)
    assert result["map"] == pytest.approx(expected["AP"])
    assert result["map_minus_reference_map"] == 0.0
    assert result["paper"]["table"] == "Table 4a" and "paper (Table 4a): mAP@[.5:.95] 19.30%" in out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in out


def test_det_under_torchrun_counts_each_image_once(coco, expected_coco):
    """2 gloo processes on 3 images: the gathered detections give the single-process mAP."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "mvit3", "eval", "--task", "det", "--data", ".",
               "--model", DET_MODEL, "--checkpoint", "det.pt", "--workers", "0", "--device", "cpu",
               "--json", "two.json"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(command, capture_output=True, text=True, cwd=coco, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((coco / "two.json").read_text())
    assert out["images"] == 3 and out["processes"] == 2
    assert out["coco"] == pytest.approx(expected_coco[1])


def test_coco_without_its_annotation_file_or_an_image_is_named(coco, tmp_path):
    model = mvit3.create_model(DET_MODEL).eval()
    with pytest.raises(FileNotFoundError, match=r"annotations/instances_val2017.json\) not found"):
        COCODetectionSet(str(tmp_path), model)
    os.makedirs(tmp_path / "annotations")
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        (coco / "annotations" / "instances_val2017.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"image not found: .*val2017/000000000004.jpg"):
        COCODetectionSet(str(tmp_path), model)


def test_task_and_model_must_match_and_a_missing_layout_is_named(coco, mvit3_command, tmp_path):
    status, _, err = mvit3_command("eval", "--task", "seg", "--data", ".", "--model", DET_MODEL,
                                   "--checkpoint", "x.pt", cwd=tmp_path)
    assert status == 2 and "--task seg evaluates deeplabv3_mobilevitv3_xxs_voc" in err
    status, _, err = mvit3_command("eval", "--task", "det", "--data", ".", "--model", DET_MODEL,
                                   "--checkpoint", str(coco / "det.pt"), "--device", "cpu",
                                   cwd=tmp_path)
    assert status == 2 and "error: COCO annotation file" in err


def _official_v1(path, size_hw):
    """cvnets v0.1: cv2.imread (BGR), cv2.resize INTER_LINEAR, ToTensor /255."""
    import cv2

    array = cv2.resize(cv2.imread(str(path)), size_hw[::-1], interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def _official_v2(path, size_hw):
    """cvnets v0.2: PIL RGB, bicubic resize (width pass, then height pass as the Pillow of its
    time), ToTensor /255."""
    with PIL.open(path) as image:
        image = image.convert("RGB")
        image = image.resize((size_hw[1], image.height), PIL.Resampling.BICUBIC)
        image = image.resize((size_hw[1], size_hw[0]), PIL.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_dense_inputs_are_the_official_libraries_output_bit_for_bit(tmp_path, suffix):
    """Segmentation (v1 512x512, v2 shorter side 512) and detection (320x320, both families)
    network inputs equal OpenCV's / PIL's on the same file; v2 seg then floors to a multiple
    of the output stride with a bilinear align_corners=True resize."""
    from mvit3.dense_eval import detection_input, segmentation_input

    path = tmp_path / f"image{suffix}"
    PIL.fromarray(_pixels(75, 101, 5)).save(path)
    seg_v1 = mvit3.create_model(SEG_MODEL).eval()
    seg_v2 = mvit3.create_model("deeplabv3_mobilevitv3_050_voc").eval()
    x, size = segmentation_input(path, seg_v1)
    assert size == (75, 101) and torch.equal(x, _official_v1(path, (512, 512)))
    x, _ = segmentation_input(path, seg_v2)  # 75x101 -> 512x689 -> 512x688
    expected = torch.nn.functional.interpolate(_official_v2(path, (512, 689)), size=(512, 688),
                                               mode="bilinear", align_corners=True)
    assert torch.equal(x, expected)
    for name, official in (("ssdlite_mobilevitv3_xxs_coco", _official_v1),
                           ("ssdlite_mobilevitv3_050_coco", _official_v2)):
        x, size = detection_input(path, mvit3.create_model(name).eval())
        assert size == (75, 101) and torch.equal(x, official(path, (320, 320)))
