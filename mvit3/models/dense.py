"""Building the dense models by name and loading official checkpoints into them."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .deeplabv3 import DeepLabV3
from .dense_base import DenseModel
from .dense_configs import DENSE_CONFIGS, SegmentationConfig
from .ssdlite import SSDLite

# Parts of the classification network that the official dense models delete.
CLASSIFICATION_ONLY = ("conv_1x1_exp.", "classifier.")
# Wrapper prefix of the official dense encoders; mvit3.load_checkpoint strips it from every key.
ENCODER = "encoder."


def create_dense_model(name: str, num_classes: Optional[int] = None, in_chans: int = 3,
                       checkpoint_path=None) -> DenseModel:
    """A registered DeepLabv3 / SSDLite model; `num_classes` defaults to its dataset's."""
    cfg = DENSE_CONFIGS[name]
    cls = DeepLabV3 if isinstance(cfg, SegmentationConfig) else SSDLite
    model = cls(cfg, num_classes=num_classes, in_chans=in_chans)
    if checkpoint_path is not None:
        load_dense_checkpoint(model, checkpoint_path)
    return model


def _strip_encoder(state_dict: dict) -> dict:
    return {k[len(ENCODER):] if k.startswith(ENCODER) else k: v for k, v in state_dict.items()}


def _without_encoder_prefix(model: DenseModel) -> nn.Module:
    """A view of `model` whose state_dict keys are the official ones minus `encoder.`: the
    encoder's layers and the heads as children of one module, sharing their tensors."""
    view = nn.Module()
    for name, child in model.encoder.named_children():
        view.add_module(name, child)
    for name, child in model.named_children():
        if name != "encoder":
            view.add_module(name, child)
    view.cfg = model.cfg  # names the model in load errors
    return view


def load_dense_checkpoint(model: DenseModel, path_or_state_dict, backbone_only: bool = False,
                          strict: bool = True):
    """Load an official dense checkpoint (e.g. a released `checkpoint_ema_best.pt`), or with
    `backbone_only` a classification checkpoint of the backbone into `model.encoder`.

    Strict by default: a checkpoint of the other kind raises `mvit3.checkpoint.CheckpointError`
    naming the missing and unexpected keys. v2-style segmentation checkpoints carry the aux
    head, which the model has too. Returns the `LoadResult` of `mvit3.load_checkpoint`.
    """
    from ..checkpoint import load_checkpoint, read_state_dict

    # read_state_dict unwraps the nesting and strips `module.` and `encoder.` (a wrapper prefix
    # of classification checkpoints, but the official dense keys' own); stripping `encoder.` here
    # as well keeps this independent of that.
    state_dict = _strip_encoder(read_state_dict(path_or_state_dict))
    if backbone_only:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFICATION_ONLY)}
        return load_checkpoint(model.encoder, state_dict, strict=strict)
    return load_checkpoint(_without_encoder_prefix(model), state_dict, strict=strict)
