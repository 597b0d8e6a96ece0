"""The reference zoo: MobileViT v1, v2 and v3 in plain PyTorch, equal to the official models.

Models never import kernels; the fast versions live in `mvit3.fast`.
"""

from __future__ import annotations

import fnmatch
from typing import Optional

from .configs import CONFIGS, MobileViTConfig, PreprocessConfig, make_divisible
from .mobilevit import MIN_INPUT_SIZE, MobileViT, check_input

__all__ = [
    "CONFIGS", "MIN_INPUT_SIZE", "MobileViT", "MobileViTConfig", "PreprocessConfig",
    "check_input", "create_model", "get_config", "list_models", "make_divisible",
]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names, in registration order, filtered by a shell-style pattern."""
    return [name for name in CONFIGS if fnmatch.fnmatch(name, pattern)]


def get_config(name: str) -> MobileViTConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        close = [n for n in CONFIGS if name.lower().replace("-", "_") in n]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Registered: {', '.join(CONFIGS)}") from None


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3,
                 checkpoint_path: Optional[str] = None) -> MobileViT:
    """Build a registered reference model; optionally load an official checkpoint into it.

    A checkpoint whose classifier has another number of classes than `num_classes` loads
    everything but the head (the head keeps its fresh initialisation).
    """
    model = MobileViT(get_config(name), num_classes=num_classes, in_chans=in_chans)
    if checkpoint_path is not None:
        from ..checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path, strict=True, ignore_head="if_mismatched")
    return model
