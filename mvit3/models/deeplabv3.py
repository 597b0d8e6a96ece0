"""DeepLabv3 on a MobileViTv3 backbone, with the official module layout and key names
(dense-spec section 2): `encoder.*` is the classification network without conv_1x1_exp and
classifier, `seg_head.*` the ASPP head (and, v2-style, the aux head).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dense_base import DenseModel, classifier_conv, relu_conv
from .dense_configs import SegmentationConfig
from .mobilevit import check_input

# Dropout of the head (cvnets default 0.1; a no-op in eval).
HEAD_DROPOUT = 0.1


class ASPPPooling(nn.Module):
    """Image-pooling branch: global average -> 1x1 ConvLayer (BN on the 1x1 map, ReLU) ->
    bilinear back to the map size (a constant broadcast from [B, A, 1, 1])."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.aspp_pool = nn.Sequential(OrderedDict(
            global_pool=nn.AdaptiveAvgPool2d(1),
            conv_1x1=relu_conv(in_channels, out_channels, 1),
        ))

    def forward(self, x):
        return F.interpolate(self.aspp_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Branches 1x1, three dilated 3x3 (dense convs), image pooling; concat [B, 5A, h, w] in
    that order -> 1x1 projection to A -> dropout."""

    def __init__(self, in_channels, channels, rates, dropout: nn.Module):
        super().__init__()
        self.convs = nn.ModuleList([
            relu_conv(in_channels, channels, 1),
            *[relu_conv(in_channels, channels, 3, dilation=rate) for rate in rates],
            ASPPPooling(in_channels, channels),
        ])
        self.project = relu_conv(len(self.convs) * channels, channels, 1)
        self.dropout = dropout

    def forward(self, x):
        return self.dropout(self.project(torch.cat([conv(x) for conv in self.convs], dim=1)))


class DeepLabV3Head(nn.Module):
    """`seg_head`: ASPP on out_l5 -> 1x1 classifier -> bilinear upsampling to the input size.

    v1-style (cvnets v0.1): ASPP dropout is nn.Dropout; the classifier is a Sequential of
    Dropout2d and the conv (key `classifier.classifier.block.conv`); upsampling with
    align_corners=False. v2-style (cvnets v0.2): an aux head on out_l4 registered FIRST (its
    keys precede the ASPP's), Dropout2d in the ASPP, the bare conv as `classifier`, upsampling
    with align_corners=True.
    """

    def __init__(self, cfg: SegmentationConfig, l4_channels: int, l5_channels: int, num_classes: int):
        super().__init__()
        self.style = cfg.style
        self.output_stride = cfg.output_stride
        a = cfg.aspp_channels
        if cfg.aux_head:
            hidden = max(l4_channels // 4, 128)
            self.aux_head = nn.Sequential(
                relu_conv(l4_channels, hidden, 3),
                nn.Dropout2d(HEAD_DROPOUT),
                classifier_conv(hidden, num_classes),
            )
        else:
            self.aux_head = None
        dropout = nn.Dropout(HEAD_DROPOUT) if cfg.style == "v1" else nn.Dropout2d(HEAD_DROPOUT)
        self.aspp = nn.Sequential(OrderedDict(aspp_layer=ASPP(l5_channels, a, cfg.aspp_rates, dropout)))
        if cfg.style == "v1":
            self.classifier = nn.Sequential(OrderedDict(
                classifier_dropout=nn.Dropout2d(HEAD_DROPOUT),
                classifier=classifier_conv(a, num_classes),
            ))
        else:
            self.classifier = classifier_conv(a, num_classes)

    def forward(self, out_l4, out_l5, out_size: Optional[tuple] = None):
        logits = self.classifier(self.aspp(out_l5))  # [B, classes, H/OS, W/OS]
        align = self.style == "v2"
        if out_size is None:
            logits = F.interpolate(logits, scale_factor=self.output_stride, mode="bilinear",
                                   align_corners=align)
        else:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=align)
        if self.training and self.aux_head is not None:
            return logits, self.aux_head(out_l4)  # aux logits at 1/OS, for the training loss
        return logits


class DeepLabV3(DenseModel):
    """DeepLabv3 segmentation model. `model(x)` -> logits [B, num_classes, H, W] in eval
    (training with an aux head: (logits, aux_logits [B, num_classes, H/OS, W/OS]))."""

    def __init__(self, cfg: SegmentationConfig, num_classes: Optional[int] = None, in_chans: int = 3):
        super().__init__(cfg, num_classes, in_chans, min_classes=1, output_stride=cfg.output_stride)
        self.output_stride = cfg.output_stride
        stages = cfg.backbone_cfg.stages
        self.seg_head = DeepLabV3Head(cfg, stages[1].channels, stages[2].channels, self.num_classes)

    def check_input(self, x) -> None:
        check_input(x, self.in_chans)
        h, w = x.shape[-2:]
        if h % self.output_stride or w % self.output_stride:
            raise ValueError(
                f"input {h}x{w}: {self.cfg.name} needs H and W that are multiples of its output "
                f"stride {self.output_stride} (e.g. {h - h % self.output_stride or self.output_stride}"
                f"x{w - w % self.output_stride or self.output_stride}); mvit3.segment resizes images "
                f"for it")

    def forward(self, x: torch.Tensor, out_size: Optional[tuple] = None):
        """x [B, in_chans, H, W], H and W multiples of the output stride -> logits at (H, W),
        or at `out_size` (the v2-style eval pipeline upsamples straight to the image size)."""
        self.check_input(x)
        levels = self.encoder.forward_levels(x)
        return self.seg_head(levels[3], levels[4], out_size)
