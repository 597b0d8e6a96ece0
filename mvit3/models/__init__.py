"""The reference zoo: MobileViT v1, v2 and v3 in plain PyTorch, equal to the official models,
and the paper's DeepLabv3 / SSDLite models on MobileViTv3 backbones.

Models never import kernels; the fast versions live in `mvit3.fast`.
"""

from __future__ import annotations

import fnmatch
from typing import Optional

from .configs import CONFIGS, MobileViTConfig, PreprocessConfig, make_divisible
from .deeplabv3 import DeepLabV3
from .dense import create_dense_model, load_dense_checkpoint
from .dense_base import DenseModel
from .dense_configs import DENSE_CONFIGS, DetectionConfig, SegmentationConfig
from .mobilevit import MIN_INPUT_SIZE, MobileViT, check_input
from .ssdlite import SSDLite

__all__ = [
    "CLASSIFICATION_PATTERN", "CONFIGS", "DENSE_CONFIGS", "DeepLabV3", "DenseModel",
    "DetectionConfig", "MIN_INPUT_SIZE", "MobileViT", "MobileViTConfig", "PreprocessConfig",
    "SSDLite", "SegmentationConfig", "check_input", "create_model", "get_config", "list_models",
    "load_dense_checkpoint", "make_divisible"
]

# The default pattern lists the classification zoo, which is what the fast models, the
# benchmarks and the kernels' shape lists iterate over; dense models are listed by a pattern
# that names them ("deeplabv3*", "ssdlite*", or "*" for all 30).
CLASSIFICATION_PATTERN = "mobilevit*"


def list_models(pattern: str = CLASSIFICATION_PATTERN) -> list[str]:
    """Registered model names, in registration order, filtered by a shell-style pattern:
    by default the 15 classifiers; "deeplabv3*" / "ssdlite*" the dense models, "*" all."""
    return [name for name in (*CONFIGS, *DENSE_CONFIGS) if fnmatch.fnmatch(name, pattern)]


def get_config(name: str) -> MobileViTConfig:
    """The config of a registered classifier (dense models: `DENSE_CONFIGS[name]`)."""
    try:
        return CONFIGS[name]
    except KeyError:
        if name in DENSE_CONFIGS:
            raise ValueError(f"{name!r} is a dense model, not a classifier: its config is "
                             f"mvit3.models.DENSE_CONFIGS[{name!r}]") from None
        close = [n for n in (*CONFIGS, *DENSE_CONFIGS) if name.lower().replace("-", "_") in n]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Registered: "
                         f"{', '.join((*CONFIGS, *DENSE_CONFIGS))}") from None


def create_model(name: str, num_classes: Optional[int] = None, in_chans: int = 3,
                 checkpoint_path: Optional[str] = None):
    """Build a registered reference model; optionally load an official checkpoint into it.

    Classifiers (num_classes default 1000): a checkpoint whose classifier has another number
    of classes than `num_classes` loads everything but the head (the head keeps its fresh
    initialisation). DeepLabv3 / SSDLite models (num_classes default: the dataset's, 21 VOC,
    150 ADE20K, 81 COCO) load their official checkpoint strictly (`load_dense_checkpoint`).
    """
    if name in DENSE_CONFIGS:
        return create_dense_model(name, num_classes=num_classes, in_chans=in_chans,
                                  checkpoint_path=checkpoint_path)
    num_classes = 1000 if num_classes is None else num_classes
    model = MobileViT(get_config(name), num_classes=num_classes, in_chans=in_chans)
    if checkpoint_path is not None:
        from ..checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path, strict=True, ignore_head="if_mismatched")
    return model
