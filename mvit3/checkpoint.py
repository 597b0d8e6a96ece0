"""Loading checkpoints into mvit3 models: the official cvnets / MobileViTv3 layout, and the
timm and Hugging Face transformers layouts (`mvit3.interop`).

mvit3 models use the official key names, so loading is: read the file safely
(`weights_only=True`, or safetensors: a checkpoint never runs code), find the state_dict inside
it, strip wrapper prefixes, rename a peer layout into the official keys, and check every key
and shape before copying anything.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Mapping, Union

import torch
import torch.nn as nn

from .interop import detect_layout, fitting_models, translate
from .models.dense import load_dense_checkpoint
from .models.dense_base import DenseModel

# Where training scripts nest the weights, in the order they are tried.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "ema_state_dict", "state_dict_ema",
               "model_ema", "ema", "net", "module")
# Prefixes added by DataParallel/DDP (`module.`) and cvnets detection/segmentation wrappers
# (`encoder.`, ml-cvnets issue #21).
WRAPPER_PREFIXES = ("module.", "encoder.")


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model. The message names the offending keys (the first
    `SHOWN_KEYS` of each kind); `missing`, `unexpected` and `mismatched` hold all of them."""

    def __init__(self, message: str, result: "LoadResult | None" = None):
        super().__init__(message)
        self.missing = result.missing if result else []
        self.unexpected = result.unexpected if result else []
        self.mismatched = result.mismatched if result else []


SHOWN_KEYS = 20


@dataclass
class LoadResult:
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape, model shape)
    skipped_head: list = field(default_factory=list)
    layout: str = "official"  # the layout the checkpoint was read as


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _read_safetensors(path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{os.fspath(path)!r} is a .safetensors file: reading it needs the "
                              f"safetensors package (pip install safetensors)") from None
    return load_file(os.fspath(path), device="cpu")


def _read_pickle(path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{os.fspath(path)!r} cannot be loaded with weights_only=True: it "
            f"holds Python objects other than tensors and containers, and mvit3 never runs "
            f"code from a checkpoint ({str(err).splitlines()[0]})") from None


def read_state_dict(path_or_state_dict: Union[str, os.PathLike, Mapping]) -> dict:
    """Return the bare, prefix-free state_dict of a checkpoint file (.pt/.pth/.bin read with
    weights_only=True, .safetensors) or dict."""
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        if not os.path.isfile(obj):
            raise FileNotFoundError(f"checkpoint file not found: {os.fspath(obj)!r}")
        obj = _read_safetensors(obj) if os.fspath(obj).endswith(".safetensors") else _read_pickle(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a checkpoint must hold a dict, got {type(obj).__name__}")
    if not _is_state_dict(obj):
        for key in NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
        else:
            raise CheckpointError(
                "no state_dict found in the checkpoint: it is neither a dict of tensors nor "
                f"holds one under any of {list(NESTED_KEYS)} (top-level keys: {list(obj)[:10]})")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def head_keys(model: nn.Module) -> list:
    """State-dict keys of the final classifier Linear."""
    prefix = next(name for name, module in model.named_modules() if module is model.head)
    return [k for k in model.state_dict() if k.startswith(prefix + ".")]


def head_matches(model: nn.Module, state_dict: Mapping) -> bool:
    """True when the checkpoint's classifier has the model's shape."""
    own = model.state_dict()
    keys = head_keys(model)
    return bool(keys) and all(k in state_dict and state_dict[k].shape == own[k].shape for k in keys)


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True,
                    ignore_head: Union[bool, str] = False, backbone_only: bool = False) -> LoadResult:
    """Load a checkpoint (file path or dict) into an mvit3 model.

    Accepts the official layout as a bare state_dict or one nested under `state_dict`, `model`,
    `model_state_dict`, ... with or without `module.` / `encoder.` prefixes, and the timm and
    transformers layouts of the v1/v2 models (`mvit3.interop`), recognised by their keys.

    strict:        raise `CheckpointError` naming every missing, unexpected and mis-shaped key
                   (in the checkpoint's own key names). With strict=False the keys that fit are
                   loaded and the rest reported.
    ignore_head:   classifiers only: True loads everything but the classifier (e.g. for another
                   num_classes); "if_mismatched" does so only when the checkpoint's head has
                   another shape.
    backbone_only: dense models (DeepLabv3 / SSDLite) only: load a classification checkpoint of
                   the backbone into `model.encoder`. Without it a dense model takes a whole
                   official dense checkpoint (`mvit3.models.load_dense_checkpoint`).
    """
    if isinstance(model, DenseModel):
        if ignore_head is not False:
            raise ValueError(f"ignore_head is for classifiers; {model.cfg.name} is a dense model "
                             f"(backbone_only=True loads a classification checkpoint into its encoder)")
        return load_dense_checkpoint(model, path_or_state_dict, backbone_only=backbone_only, strict=strict)
    if backbone_only:
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        raise ValueError(f"backbone_only is for dense models (DeepLabv3 / SSDLite), not {name}")
    state_dict = read_state_dict(path_or_state_dict)
    own = model.state_dict()
    result = LoadResult()
    name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
    # mvit3 key -> the checkpoint's name for it, and keys no mapping uses (peer layouts only)
    names, foreign = {}, []
    layout = detect_layout(state_dict)
    if layout is not None:
        cfg = getattr(model, "cfg", None)
        if cfg is None or not layout.maps(cfg):
            raise CheckpointError(
                f"checkpoint has the {layout.name} layout (key {layout.signature!r}), which maps "
                f"only {'/'.join(layout.versions)} models, not {name}; it fits "
                f"{', '.join(fitting_models(state_dict, layout)) or 'none of the mvit3 models'}")
        original, translation = state_dict, translate(state_dict, layout, cfg)
        state_dict, names, foreign = translation.state_dict, translation.sources, translation.unexpected
        own = {k: v for k, v in own.items() if k in names}
        result.layout = layout.name
    if ignore_head == "if_mismatched":
        ignore_head = not head_matches(model, state_dict)
    elif ignore_head not in (True, False):
        raise ValueError(f"ignore_head must be True, False or 'if_mismatched', got {ignore_head!r}")
    if ignore_head:
        skip = set(head_keys(model))
        result.skipped_head = sorted(skip)
        state_dict = {k: v for k, v in state_dict.items() if k not in skip}
        own = {k: v for k, v in own.items() if k not in skip}

    result.missing = [names.get(k, k) for k in own if k not in state_dict]
    result.unexpected = foreign + [names.get(k, k) for k in state_dict if k not in own]
    result.mismatched = [(names.get(k, k), tuple(v.shape), tuple(own[k].shape))
                         for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    problems = []
    for kind, keys in (("missing", result.missing), ("unexpected", result.unexpected),
                       ("mis-shaped", [f"{k} (checkpoint {list(a)}, model {list(b)})"
                                       for k, a, b in result.mismatched])):
        if keys:
            more = f" (and {len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
            problems.append(f"{kind} keys ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}{more}")
    prefix = os.path.commonprefix(result.unexpected) if len(result.unexpected) > 1 else ""
    if result.missing and "." in prefix:
        prefix = prefix[:prefix.rindex(".") + 1]
        problems.append(f"every unexpected key starts with {prefix!r}: a wrapper prefix this loader "
                        f"does not strip? (it strips {', '.join(WRAPPER_PREFIXES)})")
    if problems and strict:
        if layout is None:
            raise CheckpointError(f"checkpoint does not fit {name}:\n  " + "\n  ".join(problems), result)
        fits = fitting_models(original, layout)
        raise CheckpointError(
            f"checkpoint looks like the {layout.name} layout (key {layout.signature!r}) but does not "
            f"fit {name} in it (it fits {', '.join(fits) or 'none of the mvit3 models'}):\n  "
            + "\n  ".join(problems), result)

    bad = {k for k, _, _ in result.mismatched}
    loadable = {k: v for k, v in state_dict.items() if k in own and names.get(k, k) not in bad}
    model.load_state_dict(loadable, strict=False)
    return result
