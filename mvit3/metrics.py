"""The accuracy metrics of the paper's tables: mIoU of a segmentation (Tables 3a, 3b) and COCO
mAP of detections (Tables 4a, 4b).

mIoU as cvnets' evaluation computes it (its ConfusionMatrix, both versions): a confusion
matrix summed over all pixels of all images at their original size (rows: true class,
columns: predicted class; pixels labelled 255 are left out), IoU_k = TP_k / (TP_k + FP_k +
FN_k) per class, mIoU = their mean. cvnets averages over all classes, so a class absent from
both truth and prediction makes its mean NaN; here such a class is left out of the mean (on
the VOC and ADE20K val sets every class occurs, so the two agree).

COCO mAP: pycocotools' COCOeval (the optional extra `pycocotools`), on detections whose boxes
are in pixels of the original image and whose labels 1..80 are mapped back to COCO's category
ids (the official dataset classes number the sorted category ids 1..80, 0 is background).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

IGNORE_LABEL = 255  # VOC's object borders; ADE20K's "other" after the label shift
# COCOeval.stats in its order: AP over IoU .50:.95, at .50, at .75, by object size; AR by
# detections per image and by object size.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> torch.Tensor:
    """Label maps of one shape (any integer dtype) -> int64 [num_classes, num_classes] counts,
    entry [t, p] = pixels of true class t predicted as p; pixels whose target is `ignore_label`
    are not counted. Targets or predictions outside 0..num_classes-1 are an error."""
    if predicted.shape != target.shape:
        raise ValueError(f"prediction {tuple(predicted.shape)} and target {tuple(target.shape)} "
                         f"label maps differ in shape")
    target = target.to(predicted.device).long().flatten()
    predicted = predicted.long().flatten()
    keep = target != ignore_label
    target, predicted = target[keep], predicted[keep]
    for what, labels in (("target", target), ("prediction", predicted)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ValueError(f"{what} label {bad} outside 0..{num_classes - 1} (and not the "
                             f"ignore label {ignore_label})")
    counts = torch.bincount(target * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> dict:
    """Confusion matrix ([true, predicted] counts) -> {"miou", "iou": per class (None where the
    class is in neither truth nor prediction), "pixel_accuracy"}, as fractions."""
    confusion = confusion.double()
    true_positives = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positives
    present = union > 0
    if not present.any():
        raise ValueError("no labelled pixel was counted: every target pixel is the ignore label")
    iou = true_positives / union.clamp(min=1)
    return {"miou": iou[present].mean().item(),
            "iou": [value if counted else None
                    for value, counted in zip(iou.tolist(), present.tolist())],
            "pixel_accuracy": (true_positives.sum() / confusion.sum()).item()}


def ade20k_labels(mask: np.ndarray) -> np.ndarray:
    """An ADE20K annotation (0 = other, 1..150 = classes) -> labels 0..149, "other" 255. The
    official dataset class subtracts 1 in int64, so "other" becomes -1, which its confusion
    matrix skips as out of range; here it becomes the ignore label (uint8 wrap-around)."""
    if mask.dtype != np.uint8:
        raise TypeError(f"expected a uint8 ADE20K annotation, got dtype {mask.dtype}")
    return mask - np.uint8(1)


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("COCO mAP is computed by pycocotools, which is not installed: "
                          "pip install pycocotools (or mvit3's 'coco' extra)") from None
    return COCO, COCOeval


def load_coco(annotation_file: str):
    """pycocotools' COCO object of an instances json (its loading messages kept off stdout)."""
    coco_class, _ = _pycocotools()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_class(annotation_file)
    # pycocotools 2.0.10's loadRes copies the "info" entry, which COCO's own files have and a
    # hand-made subset may lack
    coco.dataset.setdefault("info", {})
    return coco


def coco_category_ids(coco) -> list:
    """COCO category ids in label order: label k (1..80) is category_ids[k - 1]."""
    return sorted(coco.getCatIds())


def coco_detections(image_id: int, found: dict, category_ids: list) -> list:
    """One image's detections ({"boxes" [n, 4] (x0, y0, x1, y1) in pixels of the original
    image, "scores" [n], "labels" [n] in 1..len(category_ids)}) -> COCO result dicts
    (bbox as x, y, width, height; category_id COCO's own)."""
    labels = found["labels"].tolist()
    if labels and (min(labels) < 1 or max(labels) > len(category_ids)):
        raise ValueError(f"detection labels must be 1..{len(category_ids)} (0 is background), "
                         f"got {min(labels)}..{max(labels)}")
    boxes, scores = found["boxes"].tolist(), found["scores"].tolist()
    return [{"image_id": image_id, "category_id": category_ids[label - 1],
             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels)]


def coco_map(coco, detections: list, image_ids: list) -> tuple:
    """COCOeval of `detections` (coco_detections' dicts) on `image_ids` -> ({name: value} of
    the 12 COCO_STAT_NAMES as fractions, COCOeval's printed summary). No detection at all
    gives AP and AR 0 (pycocotools cannot load an empty result list)."""
    _, coco_eval_class = _pycocotools()
    if not detections:
        return dict.fromkeys(COCO_STAT_NAMES, 0.0), "no detections: AP and AR are 0"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluation = coco_eval_class(coco, coco.loadRes(detections), "bbox")
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    lines = [line for line in summary.getvalue().splitlines()
             if line.lstrip().startswith("Average")]
    return dict(zip(COCO_STAT_NAMES, map(float, evaluation.stats))), "\n".join(lines)
