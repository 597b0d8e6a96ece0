"""The 15 dense-prediction models as data: DeepLabv3 (segmentation) and SSDLite (detection)
on MobileViTv3 backbones.

Every number comes from the official configurations as `dense-spec.md` reads them (cvnets
v0.1 + the MobileViTv3-v1 overlay for the XXS/XS/S models, cvnets v0.2 + the MobileViTv3-v2
overlay for the 0.5/0.75/1.0 models). Which code base a model follows is its backbone's
`style` ("v1" = cvnets v0.1, "v2" = cvnets v0.2); the heads differ between the two in key
names, upsampling and post-processing (dense-spec section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .configs import CONFIGS, MobileViTConfig

# Class counts are set by the dataset classes, never by the YAMLs (dense-spec section 0).
NUM_CLASSES = {"voc": 21, "ade20k": 150, "coco": 81}


class BackboneFacts:
    """What a dense config derives from its `backbone` and `dataset` fields."""

    @property
    def backbone_cfg(self) -> MobileViTConfig:
        return CONFIGS[self.backbone]

    @property
    def style(self) -> str:  # "v1": cvnets v0.1 code paths; "v2": cvnets v0.2
        return self.backbone_cfg.style

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]


@dataclass(frozen=True)
class SegmentationConfig(BackboneFacts):
    name: str
    backbone: str  # registered classification config whose layers form the encoder
    dataset: Literal["voc", "ade20k"]
    output_stride: Literal[8, 16]
    aspp_channels: int  # A: width of every ASPP branch and of the projection
    aspp_rates: tuple  # dilation = padding of ASPP branches 1..3
    aux_head: bool  # v2-style: an aux head on out_l4 (keys present, run only in training)
    eval_size: int = 512  # v1-style: resize to eval_size^2; v2-style: shorter side


@dataclass(frozen=True)
class PostprocessRule:
    """Eval post-processing of SSD detections (dense-spec section 3.4).

    v1-style (`SingleShotDetector.predict`): per class, prob > threshold, NMS, first
    `max_per_class`; detections concatenated in class order. v2-style
    (`postprocess_detections`): per class, prob > threshold, top `top_k_per_class`; then one
    class-aware batched NMS over all classes, first `max_per_image`, in score order.
    """

    conf_threshold: float
    nms_iou: float
    batched: bool  # False: NMS per class (v1-style); True: torchvision batched_nms (v2-style)
    top_k_per_class: Optional[int]  # candidates kept per class before NMS (v2-style)
    max_per_class: Optional[int]  # kept per class after NMS (v1-style)
    max_per_image: Optional[int]  # kept per image after NMS (v2-style)


POSTPROCESS_V01 = PostprocessRule(conf_threshold=0.05, nms_iou=0.5, batched=False,
                                  top_k_per_class=None, max_per_class=200, max_per_image=None)
POSTPROCESS_V02 = PostprocessRule(conf_threshold=0.01, nms_iou=0.5, batched=True,
                                  top_k_per_class=400, max_per_class=None, max_per_image=200)


@dataclass(frozen=True)
class DetectionConfig(BackboneFacts):
    name: str
    backbone: str
    dataset: Literal["coco"] = "coco"
    # One entry per prediction level: out_l4, out_l5, then the extra layers; -1 is the
    # global-pool level. Identical in all six official configs.
    output_strides: tuple = (16, 32, 64, 128, 256, -1)
    proj_channels: tuple = (512, 256, 256, 128, 128, 64)
    aspect_ratios: tuple = ((2, 3), (2, 3), (2, 3), (2, 3), (2, 3), (2,))
    min_scale: float = 0.1
    max_scale: float = 1.05
    center_variance: float = 0.1
    size_variance: float = 0.2
    eval_size: int = 320  # the eval pipeline resizes to eval_size^2

    @property
    def postprocess(self) -> PostprocessRule:
        return POSTPROCESS_V01 if self.style == "v1" else POSTPROCESS_V02


def _deeplabv3(size: str, dataset: str) -> SegmentationConfig:
    backbone = f"mobilevitv3_{size}"
    if CONFIGS[backbone].style == "v1":  # cvnets v0.1 VOC YAMLs
        return SegmentationConfig(f"deeplabv3_{backbone}_{dataset}", backbone, dataset, 16, 256,
                                  (6, 12, 18), aux_head=False)
    if dataset == "voc":  # cvnets v0.2 pascal_voc YAML
        return SegmentationConfig(f"deeplabv3_{backbone}_{dataset}", backbone, dataset, 16, 512,
                                  (6, 12, 18), aux_head=True)
    return SegmentationConfig(f"deeplabv3_{backbone}_{dataset}", backbone, dataset, 8, 512,
                              (12, 24, 36), aux_head=True)  # cvnets v0.2 ade20k YAML


DENSE_CONFIGS = {
    cfg.name: cfg
    for cfg in [
        *[_deeplabv3(size, "voc") for size in ("xxs", "xs", "s", "050", "075", "100")],
        *[_deeplabv3(size, "ade20k") for size in ("050", "075", "100")],
        *[DetectionConfig(f"ssdlite_mobilevitv3_{size}_coco", f"mobilevitv3_{size}")
          for size in ("xxs", "xs", "s", "050", "075", "100")],
    ]
}
