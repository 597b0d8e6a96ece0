"""Torch reference math of every fused op: the ground truth, the CPU path and the autograd path.

Each function here has two fused twins with the same name and signature:
`mvit3/kernels/<op>.py` (Triton) and `csrc/<op>.cu` (CUDA C++).

Conventions shared by all ops:
- Feature maps are [B, C, H, W] with any strides (NCHW or channels_last). Outputs are
  channels_last (NHWC storage), the layout the fused kernels read and write fastest.
- A 1x1 conv weight is 2-D [Cout, Cin]; BatchNorm is already folded into weight and bias.
- `norm` is "none", "layer" (LayerNorm over the channels of each pixel: the transformer
  tokens of v1-style blocks are the pixels) or "group" (GroupNorm with one group: statistics
  over all C*H*W values of a sample, per-channel affine; v2-style blocks). eps is given.
- `act` is "none" or "silu".
- Attention ops see the map as 2x2 patches: pixel (y, x) is token n = (y//2)*(W/2) + x//2 of
  the sequence p = (y%2)*2 + x%2 (see `mvit3.models.patches`); H and W must be even.
- All tensors of one call share the dtype of `x`; the kernels accumulate in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.patches import from_patches, from_tokens, to_patches, to_tokens

NORMS = ("none", "layer", "group")
ACTS = ("none", "silu")


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def apply_norm(x: Tensor, norm: str, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float) -> Tensor:
    """The pre-norms of the two families on a [B, C, H, W] map."""
    if norm == "none":
        return x
    if norm == "layer":
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, eps).permute(0, 3, 1, 2)
    if norm == "group":
        return F.group_norm(x, 1, weight, bias, eps)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def apply_act(x: Tensor, act: str) -> Tensor:
    if act == "none":
        return x
    if act == "silu":
        return F.silu(x)
    raise ValueError(f"act must be one of {ACTS}, got {act!r}")


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                   x2: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                   norm: str = "none", norm_weight: Optional[Tensor] = None,
                   norm_bias: Optional[Tensor] = None, eps: float = 1e-5,
                   act: str = "none") -> Tensor:
    """y = act(cat(norm(x), x2) @ weight^T + bias) + residual, per pixel.

    x [B, C1, H, W], x2 [B, C2, H, W] (optional), weight [Cout, C1 + C2], bias [Cout],
    residual [B, Cout, H, W]. The norm applies to x only. This is the 1x1-conv GEMM of the
    fast path; with two inputs and a residual it is the MobileViTv3 "fusion + residual".
    """
    a = apply_norm(x, norm, norm_weight, norm_bias, eps)
    if x2 is not None:
        a = torch.cat((a, x2), dim=1)
    y = apply_act(F.conv2d(a, weight[:, :, None, None], bias), act)
    if residual is not None:
        y = y + residual
    return _channels_last(y)


def dwconv_pointwise(x: Tensor, dw_weight: Tensor, dw_bias: Tensor, weight: Tensor,
                     bias: Optional[Tensor] = None, stride: int = 1,
                     residual: Optional[Tensor] = None, dilation: int = 1,
                     expand_weight: Optional[Tensor] = None,
                     expand_bias: Optional[Tensor] = None) -> Tensor:
    """y = silu(depthwise3x3(h, stride, dilation) + dw_bias) @ weight^T + bias + residual.

    Without expand_weight, h = x [B, Ch, H, W]: the second half of an MV2 block (dw 3x3 +
    reduce 1x1) and the local representation of a MobileViT block (dilated in the v2-style
    dense backbones). With expand_weight [Ch, Cin] (BN folded) and expand_bias [Ch], x is the
    block input [B, Cin, H, W] and h = silu(x @ expand_weight^T + expand_bias), the MV2
    expansion: the whole MV2 block in one op. The depthwise conv's zero padding applies to h
    (taps outside the map are 0, not silu(expand_bias)).
    dw_weight [Ch, 1, 3, 3] (padding = dilation, so the output is
    [B, Cout, (H - 1) // stride + 1, (W - 1) // stride + 1] at any dilation), weight [Cout, Ch].
    """
    h = x
    if expand_weight is not None:
        h = F.silu(F.conv2d(x, expand_weight[:, :, None, None], expand_bias))
    h = F.silu(F.conv2d(h, dw_weight, dw_bias, stride=stride, padding=dilation, dilation=dilation,
                        groups=h.shape[1]))
    y = F.conv2d(h, weight[:, :, None, None], bias)
    if residual is not None:
        y = y + residual
    return _channels_last(y)


def conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
            x2: Optional[Tensor] = None, stride: int = 1, act: str = "none",
            dilation: int = 1) -> Tensor:
    """y = act(conv3x3(cat(x, x2), weight, stride, dilation, padding = dilation) + bias): the
    dense 3x3 convs (the stem, MobileViTv1's local conv and fusion, ASPP's dilated branches).
    weight [Cout, C1 + C2, 3, 3]; the output size depends on the stride only."""
    a = x if x2 is None else torch.cat((x, x2), dim=1)
    return _channels_last(apply_act(F.conv2d(a, weight, bias, stride=stride, padding=dilation,
                                             dilation=dilation), act))


def patch_attention(qkv: Tensor, num_heads: int, scale: float,
                    proj_weight: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None,
                    residual: Optional[Tensor] = None) -> Tensor:
    """Multi-head attention over the 2x2 patches of a map (v1-style MobileViT blocks).

    qkv [B, 3d, H, W] holds [q | k | v] channels, each head-contiguous (head h owns channels
    h*hd ... (h+1)*hd - 1 of each third). For every sequence (b, p) the N = H*W/4 tokens
    attend to each other: o = softmax((q * scale) k^T) v, heads concatenated -> [B, d, H, W].
    Then, if given: o @ proj_weight^T + proj_bias + residual (the MHSA out_proj and the
    transformer residual).
    """
    b, c3, h, w = qkv.shape
    d = c3 // 3
    tokens = to_tokens(qkv)  # [B*P, N, 3d]
    s, n, _ = tokens.shape
    q, k, v = tokens.reshape(s, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = torch.matmul(q * scale, k.transpose(-2, -1)).softmax(dim=-1)  # [S, heads, N, N]
    o = torch.matmul(attn, v).transpose(1, 2).reshape(s, n, d)
    o = from_tokens(o, h, w)  # [B, d, H, W]
    if proj_weight is not None:
        o = F.conv2d(o, proj_weight[:, :, None, None], proj_bias)
    if residual is not None:
        o = o + residual
    return _channels_last(o)


def transformer_mlp(x: Tensor, norm: str, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The pre-norm FFN sub-layer with its residual: x + (silu(norm(x) @ w1^T + b1) @ w2^T + b2).

    x [B, d, H, W], w1 [F, d], w2 [d, F]; norm "layer" (v1-style) or "group" (v2-style).
    """
    a = apply_norm(x, norm, norm_weight, norm_bias, eps)
    hidden = F.silu(F.conv2d(a, w1[:, :, None, None], b1))
    return _channels_last(x + F.conv2d(hidden, w2[:, :, None, None], b2))


def transformer_mlp_project(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                            w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                            proj_norm_weight: Tensor, proj_norm_bias: Tensor, proj_eps: float,
                            proj_weight: Tensor, proj_bias: Optional[Tensor],
                            act: str) -> tuple:
    """A v1-style FFN sub-layer and the LayerNorm + 1x1 projection that follows it:
    (t, act(LayerNorm(t) @ proj_weight^T + proj_bias)) with t = transformer_mlp(x, "layer", ...).

    t [B, d, H, W] is the residual stream the next sub-layer adds to; the projection
    [B, Cout, H, W] (proj_weight [Cout, d]) is the next layer's LayerNorm + qkv, or the block's
    final LayerNorm + conv_proj (+ BN, act "silu"). LayerNorm only: it normalises each pixel,
    so a kernel that owns whole pixels computes it on its FFN output tile.
    """
    t = transformer_mlp(x, "layer", norm_weight, norm_bias, eps, w1, b1, w2, b2)
    return t, pointwise_conv(t, proj_weight, proj_bias, None, None, "layer", proj_norm_weight,
                             proj_norm_bias, proj_eps, act)


def separable_attention(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                        qkv_weight: Tensor, qkv_bias: Tensor, out_weight: Tensor,
                        out_bias: Tensor) -> Tensor:
    """The v2-style attention sub-layer with its residual (cvnets LinearSelfAttention).

    a = GroupNorm1(x); [q | k | v] = a @ qkv_weight^T + qkv_bias with 1, d, d channels;
    for each sequence (b, p): score = softmax over its N patches of q;
    context[b, :, p] = sum_n score_n * k_n; out = relu(v) * context (broadcast over n);
    returns x + out @ out_weight^T + out_bias. x [B, d, H, W], qkv_weight [1 + 2d, d].
    """
    b, d, h, w = x.shape
    a = to_patches(apply_norm(x, "group", norm_weight, norm_bias, eps))  # [B, d, P, N]
    q, k, v = F.conv2d(a, qkv_weight[:, :, None, None], qkv_bias).split([1, d, d], dim=1)
    context = (k * q.softmax(dim=-1)).sum(dim=-1, keepdim=True)  # [B, d, P, 1]
    out = F.conv2d(F.relu(v) * context, out_weight[:, :, None, None], out_bias)
    return _channels_last(x + from_patches(out, h, w))


def group_norm_stats(x: Tensor, eps: float) -> Tensor:
    """Per-sample mean and 1/sqrt(var + eps) over C*H*W (GroupNorm with one group): [B, 2] fp32.

    Not a public op: the fused kernels of the v2-style ops call it for their norm="group".
    """
    flat = x.reshape(x.shape[0], -1)
    flat = flat if flat.dtype == torch.float64 else flat.float()
    var, mean = torch.var_mean(flat, dim=1, unbiased=False)
    return torch.stack((mean, torch.rsqrt(var + eps)), dim=1)
