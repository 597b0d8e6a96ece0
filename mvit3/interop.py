"""MobileViT weights from timm and Hugging Face transformers, mapped onto mvit3's official keys.

A layout is a naming of the same tensors: timm (`mobilevit_xxs/xs/s`, `mobilevitv2_050/075/100`)
and transformers (`MobileViTForImageClassification`, `MobileViTV2ForImageClassification`) hold
exactly the official model's parameters under other names, except that transformers' v1
attention keeps query, key and value as three Linears where the official code has one
`qkv_proj` ([3d, d], rows [q | k | v], each head contiguous: the same row order as the
concatenation). A layout is recognised by a key only it has, and mapped per model
configuration, so a file that looks like a layout but does not fit the model is reported in the
file's own key names.

    model = mvit3.create_model("mobilevit_s", checkpoint_path="pytorch_model.bin")  # HF file
    reference = mvit3.interop.from_module(timm.create_model("mobilevitv2_050", pretrained=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .models import CONFIGS, MobileViT, MobileViTConfig

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# A BatchNorm's step counter: timm and transformers files may leave it out, and it has no effect
# on inference, so a peer file without it still loads.
OPTIONAL_SUFFIX = "num_batches_tracked"

# mvit3 key -> the peer keys whose tensors, concatenated along dim 0, give it.
KeyMap = dict


@dataclass(frozen=True)
class Layout:
    name: str  # as shown in errors: "timm", "transformers MobileViT", ...
    signature: str  # a key only this layout has
    versions: tuple  # the mvit3 config versions it maps ("v1", "v2")
    key_map: Callable[[MobileViTConfig], KeyMap]

    def maps(self, cfg: MobileViTConfig) -> bool:
        return cfg.version in self.versions


def _conv_bn(keys: KeyMap, ours: str, theirs: str, conv: str, norm: str) -> None:
    """A cvnets ConvLayer with BatchNorm (`ours.block.conv`, `ours.block.norm`)."""
    keys[f"{ours}.block.conv.weight"] = (f"{theirs}.{conv}.weight",)
    for suffix in BN_SUFFIXES:
        keys[f"{ours}.block.norm.{suffix}"] = (f"{theirs}.{norm}.{suffix}",)


def _affine(keys: KeyMap, ours: str, theirs: str) -> None:
    """A module with `weight` and `bias` under both names (Linear, LayerNorm, GroupNorm, conv)."""
    keys[f"{ours}.weight"] = (f"{theirs}.weight",)
    keys[f"{ours}.bias"] = (f"{theirs}.bias",)


def _mv2(keys: KeyMap, ours: str, theirs: str, names: tuple, conv: str, norm: str) -> None:
    """An MV2 block; `names` are the peer's names of expand, depthwise and reduce."""
    for own, their in zip(("exp_1x1", "conv_3x3", "red_1x1"), names):
        _conv_bn(keys, f"{ours}.block.{own}", f"{theirs}.{their}", conv, norm)


def _block(keys: KeyMap, cfg: MobileViTConfig, index: int, ours: str, theirs: str,
           names: dict, conv: str, norm: str) -> None:
    """The MobileViT block of layer_{index}; `names` holds the peer's module names."""
    v1 = cfg.style == "v1"
    local = ("local_rep.conv_3x3", "local_rep.conv_1x1") if v1 else ("local_rep.0", "local_rep.1")
    _conv_bn(keys, f"{ours}.{local[0]}", f"{theirs}.conv_kxk", conv, norm)
    keys[f"{ours}.{local[1]}.block.conv.weight"] = (names["conv_1x1"],)
    layers = cfg.stages[index - 3].num_layers
    for layer in range(layers):
        mine, their = f"{ours}.global_rep.{layer}", names["layer"].format(layer)
        if v1:
            _affine(keys, f"{mine}.pre_norm_mha.0", f"{their}.{names['norm1']}")
            for suffix in ("weight", "bias"):
                keys[f"{mine}.pre_norm_mha.1.qkv_proj.{suffix}"] = tuple(
                    f"{their}.{qkv}.{suffix}" for qkv in names["qkv"])
            _affine(keys, f"{mine}.pre_norm_mha.1.out_proj", f"{their}.{names['proj']}")
            _affine(keys, f"{mine}.pre_norm_ffn.0", f"{their}.{names['norm2']}")
            _affine(keys, f"{mine}.pre_norm_ffn.1", f"{their}.{names['fc1']}")
            _affine(keys, f"{mine}.pre_norm_ffn.4", f"{their}.{names['fc2']}")
        else:
            _affine(keys, f"{mine}.pre_norm_attn.0", f"{their}.{names['norm1']}")
            _affine(keys, f"{mine}.pre_norm_attn.1.qkv_proj.block.conv", f"{their}.{names['qkv'][0]}")
            _affine(keys, f"{mine}.pre_norm_attn.1.out_proj.block.conv", f"{their}.{names['proj']}")
            _affine(keys, f"{mine}.pre_norm_ffn.0", f"{their}.{names['norm2']}")
            _affine(keys, f"{mine}.pre_norm_ffn.1.block.conv", f"{their}.{names['fc1']}")
            _affine(keys, f"{mine}.pre_norm_ffn.3.block.conv", f"{their}.{names['fc2']}")
    _affine(keys, f"{ours}.global_rep.{layers}", f"{theirs}.{names['norm']}")
    _conv_bn(keys, f"{ours}.conv_proj", f"{theirs}.{names['conv_proj']}", conv, norm)
    if v1:
        _conv_bn(keys, f"{ours}.fusion", f"{theirs}.{names['fusion']}", conv, norm)


def _head(keys: KeyMap, cfg: MobileViTConfig, theirs: str) -> None:
    _affine(keys, "classifier.fc" if cfg.style == "v1" else "classifier.1", theirs)


def timm_keys(cfg: MobileViTConfig) -> KeyMap:
    """timm's byobnet MobileViT: stem, stages.0..4 (stage i = layer_{i+1}), final_conv, head.fc."""
    keys: KeyMap = {}
    mv2 = ("conv1_1x1", "conv2_kxk", "conv3_1x1")
    _conv_bn(keys, "conv_1", "stem", "conv", "bn")
    _mv2(keys, "layer_1.0", "stages.0.0", mv2, "conv", "bn")
    for j in range(cfg.layer2_blocks):
        _mv2(keys, f"layer_2.{j}", f"stages.1.{j}", mv2, "conv", "bn")
    for index in (3, 4, 5):
        stage = f"stages.{index - 1}"
        _mv2(keys, f"layer_{index}.0", f"{stage}.0", mv2, "conv", "bn")
        v1 = cfg.style == "v1"
        names = dict(conv_1x1=f"{stage}.1.conv_1x1.weight", layer=f"{stage}.1.transformer.{{}}",
                     norm1="norm1", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2", norm="norm",
                     qkv=("attn.qkv",) if v1 else ("attn.qkv_proj",),
                     proj="attn.proj" if v1 else "attn.out_proj",
                     conv_proj="conv_proj", fusion="conv_fusion")
        _block(keys, cfg, index, f"layer_{index}.1", f"{stage}.1", names, "conv", "bn")
    if cfg.exp_channels is not None:
        _conv_bn(keys, "conv_1x1_exp", "final_conv", "conv", "bn")
    _head(keys, cfg, "head.fc")
    return keys


def _transformers_keys(cfg: MobileViTConfig, root: str) -> KeyMap:
    """transformers' MobileViT(V2)ForImageClassification: `root`.conv_stem, `root`.encoder.layer.0..4
    (layer i = layer_{i+1}; the stride-2 MV2 of layers 3-5 is their `downsampling_layer`),
    `root`.conv_1x1_exp (v1), classifier."""
    keys: KeyMap = {}
    conv, norm = "convolution", "normalization"
    mv2 = ("expand_1x1", "conv_3x3", "reduce_1x1")
    encoder = f"{root}.encoder.layer"
    _conv_bn(keys, "conv_1", f"{root}.conv_stem", conv, norm)
    _mv2(keys, "layer_1.0", f"{encoder}.0.layer.0", mv2, conv, norm)
    for j in range(cfg.layer2_blocks):
        _mv2(keys, f"layer_2.{j}", f"{encoder}.1.layer.{j}", mv2, conv, norm)
    for index in (3, 4, 5):
        layer = f"{encoder}.{index - 1}"
        _mv2(keys, f"layer_{index}.0", f"{layer}.downsampling_layer", mv2, conv, norm)
        if cfg.style == "v1":
            names = dict(norm1="layernorm_before", norm2="layernorm_after",
                         qkv=tuple(f"attention.attention.{n}" for n in ("query", "key", "value")),
                         proj="attention.output.dense", fc1="intermediate.dense", fc2="output.dense")
        else:
            names = dict(norm1="layernorm_before", norm2="layernorm_after",
                         qkv=("attention.qkv_proj.convolution",),
                         proj="attention.out_proj.convolution", fc1="ffn.conv1.convolution",
                         fc2="ffn.conv2.convolution")
        names.update(conv_1x1=f"{layer}.conv_1x1.convolution.weight",
                     layer=f"{layer}.transformer.layer.{{}}", norm="layernorm",
                     conv_proj="conv_projection", fusion="fusion")
        _block(keys, cfg, index, f"layer_{index}.1", layer, names, conv, norm)
    if cfg.exp_channels is not None:
        _conv_bn(keys, "conv_1x1_exp", f"{root}.conv_1x1_exp", conv, norm)
    _head(keys, cfg, "classifier")
    return keys


LAYOUTS = (
    Layout("timm", "stem.conv.weight", ("v1", "v2"), timm_keys),
    Layout("transformers MobileViT", "mobilevit.conv_stem.convolution.weight", ("v1",),
           lambda cfg: _transformers_keys(cfg, "mobilevit")),
    Layout("transformers MobileViTV2", "mobilevitv2.conv_stem.convolution.weight", ("v2",),
           lambda cfg: _transformers_keys(cfg, "mobilevitv2")),
)


def detect_layout(state_dict: Mapping) -> Optional[Layout]:
    """The peer layout whose signature key the state_dict has; None for the official layout."""
    return next((layout for layout in LAYOUTS if layout.signature in state_dict), None)


@dataclass
class Translation:
    state_dict: dict  # in mvit3 keys: what the file has of the mapped tensors
    sources: dict  # mvit3 key -> peer key(s) as one display name, for every mapped key
    unexpected: list  # peer keys the mapping does not use


def translate(state_dict: Mapping, layout: Layout, cfg: MobileViTConfig) -> Translation:
    """Rename (and concatenate) a peer state_dict into mvit3 keys for `cfg`, without judging:
    what is missing, unexpected or mis-shaped is for the caller to report."""
    if not layout.maps(cfg):
        raise ValueError(f"the {layout.name} layout has no mapping for {cfg.name} "
                         f"(it maps {'/'.join(layout.versions)} models)")
    key_map = layout.key_map(cfg)
    out = {}
    for ours, theirs in key_map.items():
        if all(k in state_dict for k in theirs):
            tensors = [state_dict[k] for k in theirs]
            out[ours] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    sources = {ours: "+".join(theirs) for ours, theirs in key_map.items()
               if ours in out or not ours.endswith(OPTIONAL_SUFFIX)}
    used = {k for theirs in key_map.values() for k in theirs}
    unexpected = [k for k in state_dict if k not in used]
    return Translation(out, sources, unexpected)


def fitting_models(state_dict: Mapping, layout: Layout) -> list:
    """The mvit3 model names whose mapping this peer state_dict fills exactly (names and shapes)."""
    fits = []
    for cfg in CONFIGS.values():
        if not layout.maps(cfg):
            continue
        tr = translate(state_dict, layout, cfg)
        if tr.unexpected or set(tr.sources) - set(tr.state_dict):
            continue
        # Shapes from a model on the meta device: built without memory or initialisation.
        with torch.device("meta"):
            own = MobileViT(cfg, num_classes=tr.state_dict[_head_weight(cfg)].shape[0]).state_dict()
        if all(own[k].shape == v.shape for k, v in tr.state_dict.items()):
            fits.append(cfg.name)
    return fits


def _head_weight(cfg: MobileViTConfig) -> str:
    return "classifier.fc.weight" if cfg.style == "v1" else "classifier.1.weight"


def from_module(module: nn.Module) -> MobileViT:
    """An mvit3 reference model with the weights, device, dtype and train/eval mode of a timm or
    transformers MobileViT classifier (the mvit3 model is found from the tensors' names and
    shapes, so it works for any of the mapped variants and any number of classes)."""
    from .checkpoint import CheckpointError, load_checkpoint

    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a timm or transformers MobileViT nn.Module, got {type(module).__name__}")
    state_dict = module.state_dict()
    layout = detect_layout(state_dict)
    if layout is None:
        raise CheckpointError(
            f"{type(module).__name__} is neither a timm MobileViT (key {LAYOUTS[0].signature!r}) nor a "
            f"transformers MobileViT(V2)ForImageClassification; for an mvit3 model use it directly")
    names = fitting_models(state_dict, layout)
    if not names:
        raise CheckpointError(
            f"{type(module).__name__} has the {layout.name} layout but matches none of the mapped mvit3 "
            f"models ({', '.join(n for n, c in CONFIGS.items() if layout.maps(c))}): only those "
            f"widths have an official counterpart, and only with their classifier head")
    cfg = CONFIGS[names[0]]
    model = MobileViT(cfg, num_classes=state_dict[layout.key_map(cfg)[_head_weight(cfg)][0]].shape[0])
    weight = state_dict[layout.signature]
    model.to(device=weight.device, dtype=weight.dtype)
    load_checkpoint(model, state_dict)
    return model.train(module.training)
