"""What DeepLabv3 and SSDLite share: the encoder and the heads' conv layers."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .layers import ConvLayer
from .mobilevit import MobileViT


def relu_conv(in_channels, out_channels, kernel_size, dilation=1) -> ConvLayer:
    """The heads' ConvLayer: conv (no bias), BN, ReLU."""
    return ConvLayer(in_channels, out_channels, kernel_size, dilation=dilation, activation=nn.ReLU)


def classifier_conv(in_channels, out_channels) -> ConvLayer:
    """A predictor: 1x1 conv with bias, no BN, no activation (key `...block.conv.{weight,bias}`)."""
    return ConvLayer(in_channels, out_channels, 1, bias=True, norm=False, act=False)


class DenseModel(nn.Module):
    """A dense model on a MobileViTv3 backbone: `encoder` is the classification network
    without conv_1x1_exp and classifier (the official dense models delete both, so their keys
    do not exist), registered first like the official one; subclasses add the heads.
    `encoder_class` builds it (the fast dense models put their fused backbone there)."""

    encoder_class = MobileViT

    def __init__(self, cfg, num_classes: Optional[int], in_chans: int, min_classes: int,
                 output_stride: int = 32):
        super().__init__()
        num_classes = cfg.num_classes if num_classes is None else num_classes
        if num_classes < min_classes:
            raise ValueError(f"num_classes must be >= {min_classes} for {cfg.name}, got {num_classes}")
        self.cfg = cfg
        self.preprocess = cfg.backbone_cfg.preprocess  # channel order of the weights' family
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.encoder = self.encoder_class(cfg.backbone_cfg, in_chans=in_chans,
                                          output_stride=output_stride, features_only=True)
