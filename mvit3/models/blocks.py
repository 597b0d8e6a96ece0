"""MobileViT blocks: the v1-style block (v1 and v3 XXS/XS/S) and the v2-style block (v2 and
v3 0.5/0.75/1.0). `version` selects the original block or its MobileViTv3 form."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import AttentionStage
from .layers import ConvLayer, LayerNorm2D, LinearAttnFFN, TransformerEncoder
from .patches import from_patches, from_tokens, resize_to_even, to_patches, to_tokens


class MobileViTBlock(nn.Module):
    """v1-style block.

    v1: local = conv1x1(conv3x3(x)) (full 3x3); out = fusion3x3(cat(x, conv_proj(global))).
    v3: local = conv1x1(dwconv3x3(x));           out = fusion1x1(cat(local, conv_proj(global))) + x.
    Odd maps are resized (bilinear, align_corners=False) to even size for the transformer and
    back to the original size after the fold.
    """

    def __init__(self, channels: int, stage: AttentionStage, version: str, *,
                 dropout: float, attn_dropout: float, ffn_dropout: float):
        super().__init__()
        if version not in ("v1", "v3"):
            raise ValueError(f"v1-style block version must be 'v1' or 'v3', got {version!r}")
        c, d = channels, stage.attn_dim
        self.version = version
        self.local_rep = nn.Sequential(OrderedDict(
            conv_3x3=ConvLayer(c, c, 3, groups=c if version == "v3" else 1),
            conv_1x1=ConvLayer(c, d, 1, norm=False, act=False),
        ))
        self.global_rep = nn.Sequential(
            *[TransformerEncoder(d, stage.ffn_dim, stage.num_heads, dropout, attn_dropout,
                                 ffn_dropout) for _ in range(stage.num_layers)],
            nn.LayerNorm(d, eps=1e-5),
        )
        self.conv_proj = ConvLayer(d, c, 1)
        if version == "v3":
            self.fusion = ConvLayer(d + c, c, 1)
        else:
            self.fusion = ConvLayer(2 * c, c, 3)

    def forward(self, x):
        local = self.local_rep(x)  # [B, d, H, W]
        h, w = local.shape[-2:]
        padded = resize_to_even(local, align_corners=False)
        tokens = self.global_rep(to_tokens(padded))  # [B*P, N, d]
        glob = from_tokens(tokens, *padded.shape[-2:])
        if glob.shape[-2:] != (h, w):
            glob = F.interpolate(glob, size=(h, w), mode="bilinear", align_corners=False)
        glob = self.conv_proj(glob)  # [B, C, H, W]
        if self.version == "v3":
            return self.fusion(torch.cat((local, glob), dim=1)) + x
        return self.fusion(torch.cat((x, glob), dim=1))


class MobileViTv2Block(nn.Module):
    """v2-style block.

    v2: out = conv_proj(global).
    v3: out = conv_proj(cat(global, local)) + x.
    Odd inputs are resized (bilinear, align_corners=True) to even size BEFORE the block and
    never back: the block output, and everything after it, keeps the larger size.
    `dilation` dilates the local depthwise 3x3 (cvnets v0.2 does so in the dense models'
    dilated layers; the v1-style block above never is).
    """

    def __init__(self, channels: int, stage: AttentionStage, version: str, *,
                 dropout: float, attn_dropout: float, ffn_dropout: float, dilation: int = 1):
        super().__init__()
        if version not in ("v2", "v3"):
            raise ValueError(f"v2-style block version must be 'v2' or 'v3', got {version!r}")
        c, d = channels, stage.attn_dim
        self.version = version
        self.local_rep = nn.Sequential(
            ConvLayer(c, c, 3, groups=c, dilation=dilation),
            ConvLayer(c, d, 1, norm=False, act=False),
        )
        self.global_rep = nn.Sequential(
            *[LinearAttnFFN(d, stage.ffn_dim, dropout, attn_dropout, ffn_dropout)
              for _ in range(stage.num_layers)],
            LayerNorm2D(d),
        )
        self.conv_proj = ConvLayer(2 * d if version == "v3" else d, c, 1, act=False)

    def forward(self, x):
        x = resize_to_even(x, align_corners=True)
        local = self.local_rep(x)  # [B, d, H, W]
        h, w = local.shape[-2:]
        glob = from_patches(self.global_rep(to_patches(local)), h, w)
        if self.version == "v3":
            return self.conv_proj(torch.cat((glob, local), dim=1)) + x
        return self.conv_proj(glob)
