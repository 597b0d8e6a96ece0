"""The MobileViT network (all 15 variants), built from a `MobileViTConfig`."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from .blocks import MobileViTBlock, MobileViTv2Block
from .configs import MobileViTConfig
from .layers import ConvLayer, GlobalPool, InvertedResidual

# The network downsamples by 32; below that layer_5 has less than one pixel.
MIN_INPUT_SIZE = 32


def check_input(x, in_chans: int, min_size: int = MIN_INPUT_SIZE) -> None:
    """Raise a clear error for inputs the network cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of shape [B, {in_chans}, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [B, {in_chans}, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels in [B, {in_chans}, H, W], "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input (float32/float16/bfloat16/float64), "
                        f"got {x.dtype}; scale uint8 images to [0, 1] first (mvit3.preprocess)")
    h, w = x.shape[-2:]
    if h < min_size or w < min_size:
        raise ValueError(f"input {h}x{w} is too small: MobileViT downsamples by 32, so H and W "
                         f"must be at least {min_size}")
    if x.shape[0] == 0:
        raise ValueError("expected a batch of at least one image, got batch size 0")


class MobileViT(nn.Module):
    """MobileViT v1 / v2 / v3 classifier with the official module layout and key names."""

    def __init__(self, cfg: MobileViTConfig, num_classes: int = 1000, in_chans: int = 3,
                 output_stride: int = 32, features_only: bool = False):
        """`output_stride` 16 or 8 trades the stride of layer_5 (and layer_4) for dilation, as
        the official DeepLabv3 models do (dense-spec section 1.2). `features_only` builds the
        backbone of the dense models: no conv_1x1_exp and no classifier (the official dense
        models delete both, so their keys do not exist); `forward` then returns the levels.
        """
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.cfg = cfg
        self.preprocess = cfg.preprocess
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = cfg.stages[-1].channels if features_only else cfg.num_features
        expand = cfg.mv2_expand

        self.conv_1 = ConvLayer(in_chans, cfg.stem_channels, 3, stride=2)
        self.layer_1 = nn.Sequential(
            InvertedResidual(cfg.stem_channels, cfg.layer1_channels, 1, expand))
        self.layer_2 = nn.Sequential(*[
            InvertedResidual(cfg.layer1_channels if i == 0 else cfg.layer2_channels,
                             cfg.layer2_channels, 2 if i == 0 else 1, expand)
            for i in range(cfg.layer2_blocks)
        ])
        self.output_stride = output_stride
        self.features_only = features_only
        in_ch = cfg.layer2_channels
        # cvnets dilation rule: a layer past the output stride keeps stride 1 in its MV2 block,
        # whose depthwise 3x3 takes the dilation reached BEFORE the layer; the running
        # dilation then doubles and the MobileViT block gets it (v2-style only).
        dilation = 1
        for index, stage in enumerate(cfg.stages, start=3):
            mv2_dilation, stride = dilation, 2
            if 2 ** index > output_stride:  # layer_3/4/5 end at stride 8/16/32
                stride, dilation = 1, 2 * dilation
            mv2 = InvertedResidual(in_ch, stage.channels, stride, expand, dilation=mv2_dilation)
            kwargs = dict(dropout=cfg.dropout, attn_dropout=cfg.attn_dropout, ffn_dropout=cfg.ffn_dropout)
            if cfg.style == "v1":
                block = MobileViTBlock(stage.channels, stage, cfg.version, **kwargs)
            else:
                block = MobileViTv2Block(stage.channels, stage, cfg.version, dilation=dilation, **kwargs)
            setattr(self, f"layer_{index}", nn.Sequential(mv2, block))
            in_ch = stage.channels
        if features_only:
            return
        if cfg.exp_channels is not None:
            self.conv_1x1_exp = ConvLayer(in_ch, cfg.exp_channels, 1)
        else:
            self.conv_1x1_exp = nn.Identity()
        self.classifier = self._make_classifier(num_classes)

    def _make_classifier(self, num_classes: int) -> nn.Sequential:
        fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.cfg.style == "v1":
            # keys classifier.fc.* ; dropout p = 0.1 from the official YAMLs
            return nn.Sequential(OrderedDict(
                global_pool=GlobalPool(),
                dropout=nn.Dropout(self.cfg.classifier_dropout),
                fc=fc,
            ))
        return nn.Sequential(GlobalPool(), fc)  # keys classifier.1.*, no dropout

    @property
    def head(self) -> nn.Module:
        """The final Linear (or Identity when num_classes == 0)."""
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final Linear by a fresh one with `num_classes` outputs (0: no Linear)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        device = self.conv_1.conv.weight.device
        dtype = self.conv_1.conv.weight.dtype
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes).to(device=device, dtype=dtype)

    def forward_levels(self, x: torch.Tensor) -> list:
        """[B, in_chans, H, W] -> [out_l1, ..., out_l5], the outputs of layer_1 ... layer_5
        (cvnets `extract_end_points_all`); out_lk is at stride 2**k, capped at output_stride."""
        check_input(x, self.in_chans)
        x = self.conv_1(x)
        levels = []
        for layer in (self.layer_1, self.layer_2, self.layer_3, self.layer_4, self.layer_5):
            x = layer(x)
            levels.append(x)
        return levels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, H, W] -> feature map [B, num_features, H/32, W/32] before pooling."""
        x = self.forward_levels(x)[-1]
        return x if self.features_only else self.conv_1x1_exp(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits [B, num_classes] (or pooled features if `pre_logits`)."""
        if pre_logits:
            return self.classifier[:-1](x)
        return self.classifier(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_levels(x)
        return self.forward_head(self.forward_features(x))
