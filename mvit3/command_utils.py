"""What the predict, eval and export commands share: the model arguments, the model they build
and the ImageNet-1k class names."""

from __future__ import annotations

import sys
from functools import lru_cache
from importlib import resources

import torch

from .checkpoint import load_checkpoint
from .models import DenseModel, create_model, list_models, load_dense_checkpoint
from .ops.backends import BACKENDS

# "reference": the plain PyTorch model; the others build mvit3.fast with that kernel backend.
MODEL_BACKENDS = ("reference",) + BACKENDS


def add_model_arguments(parser, checkpoint_required: bool = False, runs_model: bool = True,
                        models: tuple = ()) -> None:
    """--model (one of the classifiers, or of `models` too), --checkpoint and, for commands that
    run the model here, --backend and --device."""
    names = list_models() + list(models)
    parser.add_argument("--model", required=True, choices=names, metavar="NAME",
                        help=f"one of: {', '.join(names)}")
    parser.add_argument("--checkpoint", required=checkpoint_required, metavar="P",
                        help="weights: official, timm or transformers layout (.pt/.pth/.bin/.safetensors)")
    if runs_model:
        parser.add_argument("--backend", default="reference", choices=MODEL_BACKENDS,
                            help="'reference' (plain PyTorch, default) or a fast-model kernel backend")
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                            help="torch device (default: cuda when available, else cpu)")


def build_model(name: str, checkpoint, backend: str = "reference", device="cpu") -> torch.nn.Module:
    """The eval-mode model for the command line. Without a checkpoint the weights are random,
    which is said on stderr: its predictions mean nothing."""
    model = create_model(name)
    if checkpoint is not None and isinstance(model, DenseModel):
        load_dense_checkpoint(model, checkpoint)  # strict, official dense keys
    elif checkpoint is not None:
        load_checkpoint(model, checkpoint)  # strict: a head of another size is an error here
    else:
        print(f"warning: no --checkpoint given: {name} has random weights", file=sys.stderr)
    if backend != "reference":
        from . import fast  # imported only here: the reference path needs no kernel package

        model = fast.convert(model, backend=backend)
    return model.to(device).eval()


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple:
    """The 1000 ImageNet-1k class names in class-index order (mvit3/data, from torchvision)."""
    text = resources.files("mvit3").joinpath("data/imagenet1k_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line and not line.startswith("#"))
    if len(names) != 1000:
        raise RuntimeError(f"mvit3/data/imagenet1k_classes.txt holds {len(names)} names, expected 1000")
    return names

