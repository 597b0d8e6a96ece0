"""Building blocks shared by the MobileViT family, with the official state_dict key names.

Module attribute names are chosen so that `state_dict()` keys equal those of the official
cvnets models (e.g. `block.conv.weight`, `pre_norm_mha.1.qkv_proj.weight`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import make_divisible


class ConvLayer(nn.Module):
    """cvnets ConvLayer: Conv2d, then optional BatchNorm2d and activation, under `block.*`.

    Convs carry a bias only where the official code asks for one; padding
    (dilation * (k - 1) / 2) keeps "same" size for stride 1 and gives ceil(H / 2) for stride 2.
    The backbones use SiLU; the DeepLabv3 and SSDLite heads pass `activation=nn.ReLU`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1,
                 bias=False, norm=True, act=True, dilation=1, activation=nn.SiLU):
        super().__init__()
        layers = OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                           padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
                           groups=groups, bias=bias))
        if norm:
            layers["norm"] = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
        if act:
            layers["act"] = activation()
        self.block = nn.Sequential(layers)

    @property
    def conv(self) -> nn.Conv2d:
        return self.block.conv

    @property
    def norm(self):
        return getattr(self.block, "norm", None)

    @property
    def has_act(self) -> bool:
        return hasattr(self.block, "act")

    def forward(self, x):
        return self.block(x)


class InvertedResidual(nn.Module):
    """MV2 block: 1x1 expand (BN, SiLU) -> depthwise 3x3 (BN, SiLU) -> 1x1 reduce (BN).

    `dilation` dilates the depthwise 3x3 (dense models that trade a stride for dilation).
    """

    def __init__(self, in_channels, out_channels, stride, expand_ratio, dilation=1):
        super().__init__()
        hidden = make_divisible(int(round(in_channels * expand_ratio)), 8)
        self.block = nn.Sequential(OrderedDict(
            exp_1x1=ConvLayer(in_channels, hidden, 1),
            conv_3x3=ConvLayer(hidden, hidden, 3, stride=stride, groups=hidden, dilation=dilation),
            red_1x1=ConvLayer(hidden, out_channels, 1, act=False),
        ))
        self.stride = stride
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_residual else y


class GlobalPool(nn.Module):
    """Mean over H and W: [B, C, H, W] -> [B, C]."""

    def forward(self, x):
        return x.mean(dim=(-2, -1))


class MultiHeadAttention(nn.Module):
    """cvnets v0.1 MHSA on tokens [S, N, d]; q is scaled before QK^T, heads are contiguous."""

    def __init__(self, dim, num_heads, attn_dropout=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by {num_heads} heads")
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim ** -0.5

    def forward(self, x):
        s, n, d = x.shape
        # [S, N, 3d] -> [3, S, heads, N, hd]: qkv columns are [q | k | v], head-contiguous.
        qkv = self.qkv_proj(x).reshape(s, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.matmul(q * self.scaling, k.transpose(-2, -1)).softmax(dim=-1)
        out = torch.matmul(self.attn_dropout(attn), v)  # [S, heads, N, hd]
        return self.out_proj(out.transpose(1, 2).reshape(s, n, d))


class TransformerEncoder(nn.Module):
    """Pre-norm transformer layer of v1 / v1-style v3 (SiLU FFN)."""

    def __init__(self, dim, ffn_dim, num_heads, dropout, attn_dropout, ffn_dropout):
        super().__init__()
        self.pre_norm_mha = nn.Sequential(
            nn.LayerNorm(dim, eps=1e-5),
            MultiHeadAttention(dim, num_heads, attn_dropout),
            nn.Dropout(dropout),
        )
        self.pre_norm_ffn = nn.Sequential(
            nn.LayerNorm(dim, eps=1e-5),
            nn.Linear(dim, ffn_dim),
            nn.SiLU(),
            nn.Dropout(ffn_dropout),
            nn.Linear(ffn_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        x = x + self.pre_norm_mha(x)
        return x + self.pre_norm_ffn(x)


class LayerNorm2D(nn.GroupNorm):
    """cvnets `layer_norm_2d`: GroupNorm with ONE group, i.e. statistics over all of C*P*N."""

    def __init__(self, num_channels, eps=1e-5):
        super().__init__(num_groups=1, num_channels=num_channels, eps=eps, affine=True)


class LinearSelfAttention(nn.Module):
    """cvnets v0.2 separable self-attention on [B, d, P, N]; softmax over N, no scaling."""

    def __init__(self, dim, attn_dropout=0.0):
        super().__init__()
        self.qkv_proj = ConvLayer(dim, 1 + 2 * dim, 1, bias=True, norm=False, act=False)
        self.out_proj = ConvLayer(dim, dim, 1, bias=True, norm=False, act=False)
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.dim = dim

    def forward(self, x):
        q, k, v = self.qkv_proj(x).split([1, self.dim, self.dim], dim=1)
        scores = self.attn_dropout(q.softmax(dim=-1))  # [B, 1, P, N]
        context = (k * scores).sum(dim=-1, keepdim=True)  # [B, d, P, 1]
        return self.out_proj(F.relu(v) * context)


class LinearAttnFFN(nn.Module):
    """Pre-norm layer of v2 / v2-style v3: separable attention and a 1x1-conv FFN."""

    def __init__(self, dim, ffn_dim, dropout, attn_dropout, ffn_dropout):
        super().__init__()
        self.pre_norm_attn = nn.Sequential(
            LayerNorm2D(dim),
            LinearSelfAttention(dim, attn_dropout),
            nn.Dropout(dropout),
        )
        self.pre_norm_ffn = nn.Sequential(
            LayerNorm2D(dim),
            ConvLayer(dim, ffn_dim, 1, bias=True, norm=False, act=True),
            nn.Dropout(ffn_dropout),
            ConvLayer(ffn_dim, dim, 1, bias=True, norm=False, act=False),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        x = x + self.pre_norm_attn(x)
        return x + self.pre_norm_ffn(x)
