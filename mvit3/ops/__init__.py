"""The op layer: one public function per fused op.

Each op has three implementations found by name: `mvit3.ops.reference.<op>` (torch math),
`mvit3.kernels.<op>` (Triton) and `csrc/<op>.cu` (CUDA C++). `backend` picks one (see
`mvit3.ops.backends`); the semantics are documented in `mvit3.ops.reference`.

The MobileViTv3 hot paths map onto them as:
- unfold/fold multi-head attention      -> `patch_attention` (out_proj and residual fused)
- separable linear attention            -> `separable_attention` (norm, residual fused)
- 1x1 fusion + residual                 -> `pointwise_conv(local, w, b, x2=global, residual=x)`
and the further fusions: `pointwise_conv` with a LayerNorm/GroupNorm prologue (norm + qkv,
norm + conv_proj), `transformer_mlp` (norm + FFN + residual), `transformer_mlp_project` (that,
then the next LayerNorm + 1x1 projection on its output tile), `dwconv_pointwise` (depthwise
3x3 + 1x1, MV2 blocks and local representations), `conv3x3` (stem, v1 convs).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import library  # noqa: F401  (registers the ops)
from .backends import BACKENDS, BackendUnavailable, availability, dispatch, requested_backend, select
from .library import OPS

__all__ = [
    "BACKENDS", "OPS", "BackendUnavailable", "availability", "conv3x3", "dwconv_pointwise",
    "patch_attention", "pointwise_conv", "requested_backend", "select", "separable_attention",
    "transformer_mlp", "transformer_mlp_project",
]


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                   x2: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                   norm: str = "none", norm_weight: Optional[Tensor] = None,
                   norm_bias: Optional[Tensor] = None, eps: float = 1e-5, act: str = "none",
                   *, backend: str = "auto") -> Tensor:
    """act(cat(norm(x), x2) @ weight^T + bias) + residual per pixel (1x1 conv GEMM)."""
    return dispatch("pointwise_conv", backend, x, weight, bias, x2, residual, norm,
                    norm_weight, norm_bias, float(eps), act)


def dwconv_pointwise(x: Tensor, dw_weight: Tensor, dw_bias: Tensor, weight: Tensor,
                     bias: Optional[Tensor] = None, stride: int = 1,
                     residual: Optional[Tensor] = None, dilation: int = 1,
                     expand_weight: Optional[Tensor] = None, expand_bias: Optional[Tensor] = None,
                     *, backend: str = "auto") -> Tensor:
    """silu(depthwise3x3(h) + dw_bias) @ weight^T + bias + residual, padding = dilation; h = x,
    or with expand_weight the MV2 expansion silu(x @ expand_weight^T + expand_bias)."""
    return dispatch("dwconv_pointwise", backend, x, dw_weight, dw_bias, weight, bias,
                    int(stride), residual, int(dilation), expand_weight, expand_bias)


def conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
            x2: Optional[Tensor] = None, stride: int = 1, act: str = "none",
            dilation: int = 1, *, backend: str = "auto") -> Tensor:
    """act(conv3x3(cat(x, x2)) + bias), padding = dilation."""
    return dispatch("conv3x3", backend, x, weight, bias, x2, int(stride), act, int(dilation))


def patch_attention(qkv: Tensor, num_heads: int, scale: float,
                    proj_weight: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None,
                    residual: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Multi-head attention over 2x2 patches, read from and written to the map layout."""
    return dispatch("patch_attention", backend, qkv, int(num_heads), float(scale),
                    proj_weight, proj_bias, residual)


def transformer_mlp(x: Tensor, norm: str, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                    *, backend: str = "auto") -> Tensor:
    """x + silu(norm(x) @ w1^T + b1) @ w2^T + b2."""
    return dispatch("transformer_mlp", backend, x, norm, norm_weight, norm_bias, float(eps),
                    w1, b1, w2, b2)


def transformer_mlp_project(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                            w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                            proj_norm_weight: Tensor, proj_norm_bias: Tensor, proj_eps: float,
                            proj_weight: Tensor, proj_bias: Optional[Tensor] = None,
                            act: str = "none", *, backend: str = "auto") -> tuple:
    """(t, act(LayerNorm(t) @ proj_weight^T + proj_bias)), t = transformer_mlp(x, "layer", ...):
    a v1-style FFN and the next layer's LayerNorm + qkv (or the block's final norm + conv_proj)."""
    return dispatch("transformer_mlp_project", backend, x, norm_weight, norm_bias, float(eps),
                    w1, b1, w2, b2, proj_norm_weight, proj_norm_bias, float(proj_eps),
                    proj_weight, proj_bias, act)


def separable_attention(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
                        qkv_weight: Tensor, qkv_bias: Tensor, out_weight: Tensor,
                        out_bias: Tensor, *, backend: str = "auto") -> Tensor:
    """x + out_proj(relu(v) * context) of cvnets LinearSelfAttention on GroupNorm1(x)."""
    return dispatch("separable_attention", backend, x, norm_weight, norm_bias, float(eps),
                    qkv_weight, qkv_bias, out_weight, out_bias)
