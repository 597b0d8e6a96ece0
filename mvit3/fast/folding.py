"""Inference weights derived from a reference model: BatchNorm folded, 1x1 weights packed.

Everything here is derived data, rebuilt from the module parameters whenever they change;
nothing of it is in the state_dict. Folding runs in float64 (float32 when the model is
not on a float64-capable device dtype) and the result is cast to the model dtype once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..models.layers import ConvLayer


def _fold_dtype(t: Tensor) -> torch.dtype:
    # float64 where available for an exact fold; MPS and friends have no float64.
    return torch.float64 if t.device.type in ("cpu", "cuda") else torch.float32


def fold_conv_bn(layer: ConvLayer, dtype: torch.dtype) -> tuple:
    """(weight, bias) of conv followed by its eval-mode BatchNorm: w * s, beta - mean * s (+ b * s)."""
    conv, norm = layer.conv, layer.norm
    work = _fold_dtype(conv.weight)
    w = conv.weight.detach().to(work)
    b = conv.bias.detach().to(work) if conv.bias is not None else torch.zeros(w.shape[0], dtype=work, device=w.device)
    if norm is not None:
        scale = norm.weight.detach().to(work) / torch.sqrt(norm.running_var.to(work) + norm.eps)
        w = w * scale.view(-1, 1, 1, 1)
        b = (b - norm.running_mean.to(work)) * scale + norm.bias.detach().to(work)
    return w.to(dtype), b.to(dtype)


def pack_pointwise(weight: Tensor) -> Tensor:
    """[Cout, Cin(, 1, 1)] -> a [Cout, Cin] view of a contiguous [Cin, Cout] (K-major) buffer,
    so the kernels load weight tiles coalesced along Cout."""
    w2d = weight.reshape(weight.shape[0], -1)
    return w2d.t().contiguous().t()


@dataclass
class Pointwise:
    """A 1x1 conv (+ folded BN): weight [Cout, K] packed K-major, bias [Cout] or None."""
    weight: Tensor
    bias: Optional[Tensor]


def pointwise(layer: ConvLayer, dtype: torch.dtype) -> Pointwise:
    if layer.norm is None and layer.conv.bias is None:
        return Pointwise(pack_pointwise(layer.conv.weight.detach().to(dtype)), None)
    w, b = fold_conv_bn(layer, dtype)
    return Pointwise(pack_pointwise(w), b)


def linear(module: torch.nn.Linear, dtype: torch.dtype) -> Pointwise:
    bias = module.bias.detach().to(dtype) if module.bias is not None else None
    return Pointwise(pack_pointwise(module.weight.detach().to(dtype)), bias)


@dataclass
class Conv3x3:
    weight: Tensor  # [Cout, Cin, 3, 3] (dense) or [C, 1, 3, 3] (depthwise), BN folded
    bias: Tensor


def conv3x3(layer: ConvLayer, dtype: torch.dtype) -> Conv3x3:
    w, b = fold_conv_bn(layer, dtype)
    return Conv3x3(w.contiguous(), b)


def compose_separable(dw: ConvLayer, pw: ConvLayer, dtype: torch.dtype) -> Conv3x3:
    """A depthwise 3x3 (+BN) followed, with no activation between, by a 1x1 (+BN or bias) as
    one dense 3x3: weight[o, c] = P[o, c] * D[c] ([Cout, C, 3, 3]), bias = P @ d + p, where
    (D [C, 1, 3, 3], d) and (P [Cout, C], p) are the two folded convs."""
    work = _fold_dtype(dw.conv.weight)
    dw_w, dw_b = fold_conv_bn(dw, work)
    pw_w, pw_b = fold_conv_bn(pw, work)
    pw_w = pw_w.reshape(pw_w.shape[0], -1)
    weight = pw_w[:, :, None, None] * dw_w[None, :, 0]
    return Conv3x3(weight.to(dtype).contiguous(), (pw_w @ dw_b + pw_b).to(dtype))


@dataclass
class Norm:
    weight: Tensor
    bias: Tensor
    eps: float


def norm(module, dtype: torch.dtype) -> Norm:
    return Norm(module.weight.detach().to(dtype), module.bias.detach().to(dtype), float(module.eps))
