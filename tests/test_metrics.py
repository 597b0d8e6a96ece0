"""mvit3.metrics against hand-computed values: mIoU from a confusion matrix (ignore label 255,
classes absent from truth and prediction), the ADE20K label shift, COCO mAP through
pycocotools on a json written here (perfect detections, a known miss, category ids)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mvit3 import metrics


def test_perfect_segmentation_has_miou_1():
    target = torch.tensor([[0, 1, 2], [255, 2, 1]])
    confusion = metrics.confusion_matrix(target.clone(), target, 3)
    assert confusion.tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 2]]  # the 255 pixel is left out
    result = metrics.mean_iou(confusion)
    assert result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0


def test_a_known_confusion_gives_a_known_miou():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]], dtype=torch.uint8)
    predicted = torch.tensor([[0, 1, 1], [1, 2, 0]])  # one 0 taken for a 1; the 255 pixel ignored
    confusion = metrics.confusion_matrix(predicted, target, 4)
    result = metrics.mean_iou(confusion)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: 1; class 3: nowhere
    assert result["iou"][:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and result["iou"][3] is None
    assert result["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 5)


def test_confusion_matrix_refuses_bad_labels():
    with pytest.raises(ValueError, match="target label 7 outside 0..3"):
        metrics.confusion_matrix(torch.zeros(2, 2), torch.tensor([[0, 7], [1, 255]]), 4)
    with pytest.raises(ValueError, match="prediction label 4 outside 0..3"):
        metrics.confusion_matrix(torch.tensor([[4]]), torch.tensor([[0]]), 4)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="every target pixel is the ignore label"):
        metrics.mean_iou(metrics.confusion_matrix(torch.zeros(2, 2), torch.full((2, 2), 255), 4))


def test_ade20k_labels_shift_by_one_and_other_becomes_ignore():
    mask = np.array([[0, 1, 2], [149, 150, 0]], dtype=np.uint8)
    assert metrics.ade20k_labels(mask).tolist() == [[255, 0, 1], [148, 149, 255]]
    with pytest.raises(TypeError, match="uint8"):
        metrics.ade20k_labels(mask.astype(np.int32))


# COCO: sparse category ids as COCO's (label k <-> k-th smallest id); boxes (x, y, w, h)
CATEGORIES = [1, 3, 90]
OBJECTS = [  # (image id, category id, box x, y, w, h)
    (7, 3, (10.0, 5.0, 30.0, 20.0)),
    (7, 90, (40.0, 30.0, 15.0, 25.0)),
    (2, 3, (0.0, 0.0, 50.0, 40.0)),
]


@pytest.fixture
def coco(tmp_path):
    pytest.importorskip("pycocotools")
    data = {  # without COCO's "info" and "licenses" entries, as a hand-made subset may be
        "images": [{"id": 7, "file_name": "7.jpg", "width": 64, "height": 60},
                   {"id": 2, "file_name": "2.jpg", "width": 80, "height": 48}],
        "categories": [{"id": i, "name": f"c{i}"} for i in CATEGORIES],
        "annotations": [{"id": n + 1, "image_id": image, "category_id": category, "bbox": list(box),
                         "area": box[2] * box[3], "iscrowd": 0}
                        for n, (image, category, box) in enumerate(OBJECTS)],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return metrics.load_coco(str(path))


def _found(objects, score=0.9):
    """mvit3.detect's output for these objects: corner boxes in pixels, labels 1..3."""
    labels = [CATEGORIES.index(category) + 1 for _, category, _ in objects]
    boxes = [(x, y, x + w, y + h) for _, _, (x, y, w, h) in objects]
    return {"boxes": torch.tensor(boxes).reshape(-1, 4),
            "scores": torch.full((len(objects),), score),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _detections(objects):
    return [d for image in (7, 2)
            for d in metrics.coco_detections(image, _found([o for o in objects if o[0] == image]),
                                             CATEGORIES)]


def test_labels_and_boxes_go_back_to_coco_ids_and_xywh(coco):
    assert metrics.coco_category_ids(coco) == CATEGORIES
    rows = metrics.coco_detections(7, _found(OBJECTS[:2]), CATEGORIES)
    assert [(r["category_id"], r["bbox"], r["score"]) for r in rows] == [
        (3, [10.0, 5.0, 30.0, 20.0], pytest.approx(0.9)),
        (90, [40.0, 30.0, 15.0, 25.0], pytest.approx(0.9))]
    with pytest.raises(ValueError, match=r"labels must be 1..3"):
        metrics.coco_detections(7, {"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                    "labels": torch.tensor([0])}, CATEGORIES)


def test_perfect_detections_have_ap_1(coco):
    stats, summary = metrics.coco_map(coco, _detections(OBJECTS), [2, 7])
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in summary


def test_a_missed_object_gives_the_known_ap(coco):
    """Category 3 has two objects, one found: precision 1 up to recall 0.5, i.e. 51 of the 101
    recall points; category 90 is perfect: mAP = (51/101 + 1) / 2 at every IoU threshold."""
    stats, _ = metrics.coco_map(coco, _detections(OBJECTS[:2]), [2, 7])
    assert stats["AP"] == pytest.approx((51 / 101 + 1) / 2)
    assert stats["AR100"] == pytest.approx((0.5 + 1) / 2)


def test_no_detections_give_ap_0(coco):
    stats, summary = metrics.coco_map(coco, [], [2, 7])
    assert stats["AP"] == 0.0 and "no detections" in summary


def test_without_pycocotools_the_message_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("pycocotools"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        metrics.load_coco("instances.json")
