"""The kernel micro-benchmark cases: each fused op at the real shapes of the v3 models.

A case is one op call of a real model at 256x256 (layer_3 for the transformer ops, where the
maps are largest), with the weights folded exactly as the fast model folds them
(`mvit3.fast.folding`). It offers three things to time:
- `fused(backend)`: the op through `mvit3.ops` on "triton" or "cuda"; with backend "torch" it
  is the stock-op sequence the op replaces (`mvit3.ops.reference.<op>`, torch eager);
- `module()`: the reference model's own modules for the same computation (unfold + MHSA +
  fold, LinearSelfAttention on patches, cat + conv + BN + SiLU + residual, ...);
  timed for the three headline paths (`HEADLINE`), used everywhere to check the case;
- `flops` and `bytes`: the arithmetic and the minimum memory traffic (inputs, weights and
  output touched once), for TFLOP/s and GB/s.

Norm and BatchNorm parameters are randomised so that folding mistakes cannot hide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

import mvit3
from mvit3 import ops
from mvit3.fast import folding as fold
from mvit3.models.patches import from_patches, from_tokens, to_patches, to_tokens

IMG_SIZE = 256
MICRO_MODELS = ("mobilevitv3_xxs", "mobilevitv3_xs", "mobilevitv3_s",
                "mobilevitv3_050", "mobilevitv3_075", "mobilevitv3_100")
V1_KINDS = ("stem", "mv2", "attention", "attention_path", "mlp", "fusion")
V2_KINDS = ("stem", "mv2", "separable_attention", "mlp", "fusion")
# The three hot paths of the MobileViTv3 block, also timed as the reference modules.
HEADLINE = ("attention_path", "separable_attention", "fusion")


@dataclass
class OpCase:
    model: str
    kind: str
    ops: str  # the fused op(s) the case calls
    where: str  # the model location and shapes, for reports
    fused: Callable[[str], Tensor]  # backend -> output
    module: Optional[Callable[[], Tensor]]  # the reference modules, or None
    flops: int
    bytes: int


def kinds(model: str) -> tuple:
    return V1_KINDS if mvit3.models.get_config(model).style == "v1" else V2_KINDS


def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and norm affine parameters (defaults are 0 and 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)


def _nbytes(*tensors) -> int:
    """Bytes of distinct tensors (by storage) among `tensors`; None entries ignored."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _out_bytes(b: int, c: int, h: int, w: int, dtype: torch.dtype) -> int:
    return b * c * h * w * torch.empty((), dtype=dtype).element_size()


class _Builder:
    """Random activations of the right shapes and folded weights of one model."""

    def __init__(self, model: str, batch: int, dtype: torch.dtype, device):
        self.batch, self.dtype, self.device = batch, dtype, torch.device(device)
        self.generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        reference = mvit3.create_model(model).eval()
        randomize_norms(reference, self.generator)
        self.ref = reference.to(device=self.device, dtype=dtype)
        self.cfg = reference.cfg

    def map(self, channels: int, size: int) -> Tensor:
        """A channels_last activation map, as the fast model hands it from op to op."""
        x = torch.randn(self.batch, channels, size, size, generator=self.generator)
        return x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)


def _stem(b: _Builder, model: str) -> OpCase:
    img = b.map(3, IMG_SIZE).contiguous()  # images arrive NCHW
    stem = fold.conv3x3(b.ref.conv_1, b.dtype)
    cout, out = stem.weight.shape[0], (IMG_SIZE + 1) // 2
    return OpCase(
        model, "stem", "conv3x3", f"conv_1: [{b.batch},3,{IMG_SIZE},{IMG_SIZE}] -> {cout} ch, stride 2",
        fused=lambda be: ops.conv3x3(img, stem.weight, stem.bias, None, 2, "silu", backend=be),
        module=lambda: b.ref.conv_1(img),
        flops=2 * b.batch * out * out * 27 * cout,
        bytes=_nbytes(img, stem.weight, stem.bias) + _out_bytes(b.batch, cout, out, out, b.dtype))


def _mv2(b: _Builder, model: str) -> OpCase:
    block = b.ref.layer_2[1]  # stride 1, in == out: the residual case
    size = IMG_SIZE // 4
    inner = block.block
    dw, red = fold.conv3x3(inner.conv_3x3, b.dtype), fold.pointwise(inner.red_1x1, b.dtype)
    hidden, cout = dw.weight.shape[0], red.weight.shape[0]
    x, h = b.map(cout, size), b.map(hidden, size)
    return OpCase(
        model, "mv2", "dwconv_pointwise",
        f"layer_2.1 dw3x3 + 1x1 + residual: [{b.batch},{hidden},{size},{size}] -> {cout} ch",
        fused=lambda be: ops.dwconv_pointwise(h, dw.weight, dw.bias, red.weight, red.bias, 1, x,
                                              backend=be),
        module=lambda: x + inner.red_1x1(inner.conv_3x3(h)),
        flops=2 * b.batch * size * size * hidden * (9 + cout),
        bytes=_nbytes(h, x, dw.weight, dw.bias, red.weight, red.bias)
        + _out_bytes(b.batch, cout, size, size, b.dtype))


def _mlp_case(b: _Builder, model: str, t: Tensor, norm: str, norm_params: fold.Norm,
              fc1: fold.Pointwise, fc2: fold.Pointwise, module: Callable[[], Tensor]) -> OpCase:
    """transformer_mlp: norm ("layer" or "group") + FFN d -> F -> d + residual on the
    [B, d, size, size] layer_3 map t."""
    _, d, size, _ = t.shape
    f = fc1.weight.shape[0]
    norm_name = {"layer": "LN", "group": "GroupNorm"}[norm]
    return OpCase(
        model, "mlp", "transformer_mlp",
        f"layer_3 {norm_name} + FFN {d}->{f}->{d} + residual on [{b.batch},{d},{size},{size}]",
        fused=lambda be: ops.transformer_mlp(t, norm, norm_params.weight, norm_params.bias,
                                             norm_params.eps, fc1.weight, fc1.bias, fc2.weight,
                                             fc2.bias, backend=be),
        module=module, flops=4 * b.batch * size * size * d * f,
        bytes=_nbytes(t, norm_params.weight, norm_params.bias, fc1.weight, fc1.bias, fc2.weight,
                      fc2.bias) + _out_bytes(*t.shape, b.dtype))


def _v1_block_cases(b: _Builder, model: str) -> list:
    block, stage = b.ref.layer_3[1], b.cfg.stages[0]
    c, d, heads = stage.channels, stage.attn_dim, stage.num_heads
    size = IMG_SIZE // 8
    m, n = b.batch * size * size, size * size // 4  # pixels; tokens per sequence
    enc = block.global_rep[0]
    mha, ffn = enc.pre_norm_mha[1], enc.pre_norm_ffn
    n1, n2 = fold.norm(enc.pre_norm_mha[0], b.dtype), fold.norm(ffn[0], b.dtype)
    qkv_w, out_w = fold.linear(mha.qkv_proj, b.dtype), fold.linear(mha.out_proj, b.dtype)
    fc1, fc2 = fold.linear(ffn[1], b.dtype), fold.linear(ffn[4], b.dtype)
    fusion = fold.pointwise(block.fusion, b.dtype)
    t, qkv = b.map(d, size), b.map(3 * d, size)
    local, glob, x = b.map(d, size), b.map(c, size), b.map(c, size)
    out_bytes = _out_bytes(b.batch, d, size, size, b.dtype)
    attention_flops = 4 * b.batch * 4 * n * n * d + 2 * m * d * d
    shape = f"[{b.batch},{d},{size},{size}]"

    def attention_path(be):
        q = ops.pointwise_conv(t, qkv_w.weight, qkv_w.bias, None, None, "layer", n1.weight,
                               n1.bias, n1.eps, "none", backend=be)
        return ops.patch_attention(q, heads, mha.scaling, out_w.weight, out_w.bias, t, backend=be)

    def tokens_residual(sublayer):
        tokens = to_tokens(t)
        return from_tokens(tokens + sublayer(tokens), size, size)

    return [
        OpCase(model, "attention", "patch_attention",
               f"layer_3 MHSA ({heads} heads) + out_proj + residual on {shape} (qkv given)",
               fused=lambda be: ops.patch_attention(qkv, heads, mha.scaling, out_w.weight,
                                                    out_w.bias, t, backend=be),
               module=None, flops=attention_flops,
               bytes=_nbytes(qkv, t, out_w.weight, out_w.bias) + out_bytes),
        OpCase(model, "attention_path", "pointwise_conv(LN+qkv) + patch_attention",
               f"layer_3 LN + MHSA + residual on {shape}; module: unfold, pre_norm_mha, fold",
               fused=attention_path, module=lambda: tokens_residual(enc.pre_norm_mha),
               flops=attention_flops + 2 * m * d * 3 * d,
               bytes=_nbytes(t, n1.weight, n1.bias, qkv_w.weight, qkv_w.bias, out_w.weight,
                             out_w.bias) + out_bytes),
        _mlp_case(b, model, t, "layer", n2, fc1, fc2, module=lambda: tokens_residual(ffn)),
        OpCase(model, "fusion", "pointwise_conv(x2, residual, silu)",
               f"layer_3 fusion 1x1 on [local {d} | global {c}] -> {c} + SiLU + x, {size}x{size}",
               fused=lambda be: ops.pointwise_conv(local, fusion.weight, fusion.bias, glob, x,
                                                   act="silu", backend=be),
               module=lambda: block.fusion(torch.cat((local, glob), dim=1)) + x,
               flops=2 * m * (d + c) * c,
               bytes=_nbytes(local, glob, x, fusion.weight, fusion.bias)
               + _out_bytes(b.batch, c, size, size, b.dtype)),
    ]


def _v2_block_cases(b: _Builder, model: str) -> list:
    block, stage = b.ref.layer_3[1], b.cfg.stages[0]
    c, d = stage.channels, stage.attn_dim
    size = IMG_SIZE // 8
    m = b.batch * size * size
    layer = block.global_rep[0]
    attn, ffn = layer.pre_norm_attn[1], layer.pre_norm_ffn
    n1, n2 = fold.norm(layer.pre_norm_attn[0], b.dtype), fold.norm(ffn[0], b.dtype)
    qkv_w, out_w = fold.pointwise(attn.qkv_proj, b.dtype), fold.pointwise(attn.out_proj, b.dtype)
    fc1, fc2 = fold.pointwise(ffn[1], b.dtype), fold.pointwise(ffn[3], b.dtype)
    final, proj = fold.norm(block.global_rep[-1], b.dtype), fold.pointwise(block.conv_proj, b.dtype)
    t, local, x = b.map(d, size), b.map(d, size), b.map(c, size)
    out_bytes = _out_bytes(b.batch, d, size, size, b.dtype)
    shape = f"[{b.batch},{d},{size},{size}]"

    def patches_residual(sublayer):
        p = to_patches(t)
        return from_patches(p + sublayer(p), size, size)

    def conv_proj_module():
        glob = from_patches(block.global_rep[-1](to_patches(t)), size, size)
        return block.conv_proj(torch.cat((glob, local), dim=1)) + x

    return [
        OpCase(model, "separable_attention", "separable_attention",
               f"layer_3 GroupNorm + separable attention + residual on {shape}; module: unfold, "
               "pre_norm_attn, fold",
               fused=lambda be: ops.separable_attention(t, n1.weight, n1.bias, n1.eps, qkv_w.weight,
                                                        qkv_w.bias, out_w.weight, out_w.bias,
                                                        backend=be),
               module=lambda: patches_residual(layer.pre_norm_attn),
               flops=2 * m * d * (1 + 2 * d) + 2 * m * d * d,
               bytes=_nbytes(t, n1.weight, n1.bias, qkv_w.weight, qkv_w.bias, out_w.weight,
                             out_w.bias) + out_bytes),
        _mlp_case(b, model, t, "group", n2, fc1, fc2, module=lambda: patches_residual(ffn)),
        OpCase(model, "fusion", "pointwise_conv(group norm, x2, residual)",
               f"layer_3 conv_proj 1x1 on [GroupNorm(global) {d} | local {d}] -> {c} + x, "
               f"{size}x{size}; module: final norm, fold, cat, conv_proj, add",
               fused=lambda be: ops.pointwise_conv(t, proj.weight, proj.bias, local, x, "group",
                                                   final.weight, final.bias, final.eps, "none",
                                                   backend=be),
               module=conv_proj_module, flops=2 * m * 2 * d * c,
               bytes=_nbytes(t, local, x, final.weight, final.bias, proj.weight, proj.bias)
               + _out_bytes(b.batch, c, size, size, b.dtype)),
    ]


def build_cases(model: str, batch: int, dtype: torch.dtype, device) -> dict:
    """{kind: OpCase} for one model, batch size, dtype and device."""
    b = _Builder(model, batch, dtype, device)
    block_cases = _v1_block_cases if b.cfg.style == "v1" else _v2_block_cases
    cases = [_stem(b, model), _mv2(b, model)] + block_cases(b, model)
    return {case.kind: case for case in cases}
