"""An independent, functional forward of the official MobileViT models, for exactness tests.

It reads a state_dict in the official layout and follows the official code step by step
(cvnets v0.1 for v1-style models: the reshape/transpose unfolding of `MobileViTBlock`;
cvnets v0.2 for v2-style models: `F.unfold`/`F.fold`), as described in the reference spec.
It shares no code with `mvit3.models`, so a mistake in either shows up as a mismatch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _conv(sd, prefix, x, stride=1, norm=True, act=True, dilation=1):
    w = sd[f"{prefix}.block.conv.weight"]
    b = sd.get(f"{prefix}.block.conv.bias")
    groups = x.shape[1] // w.shape[1]
    y = F.conv2d(x, w, b, stride=stride, padding=dilation * (w.shape[-1] - 1) // 2,
                 dilation=dilation, groups=groups)
    if norm:
        n = f"{prefix}.block.norm"
        y = F.batch_norm(y, sd[f"{n}.running_mean"], sd[f"{n}.running_var"], sd[f"{n}.weight"],
                         sd[f"{n}.bias"], False, 0.1, 1e-5)
    return F.silu(y) if act else y


def _mv2(sd, prefix, x, stride, dilation=1):
    y = _conv(sd, f"{prefix}.block.exp_1x1", x)
    y = _conv(sd, f"{prefix}.block.conv_3x3", y, stride=stride, dilation=dilation)
    y = _conv(sd, f"{prefix}.block.red_1x1", y, act=False)
    return x + y if stride == 1 and x.shape[1] == y.shape[1] else y


def _unfold_v01(fm):
    b, c, orig_h, orig_w = fm.shape
    new_h, new_w = math.ceil(orig_h / 2) * 2, math.ceil(orig_w / 2) * 2
    interpolate = (new_h, new_w) != (orig_h, orig_w)
    if interpolate:
        fm = F.interpolate(fm, size=(new_h, new_w), mode="bilinear", align_corners=False)
    nh, nw = new_h // 2, new_w // 2
    x = fm.reshape(b * c * nh, 2, nw, 2).transpose(1, 2)
    x = x.reshape(b, c, nh * nw, 4).transpose(1, 3)
    info = dict(b=b, c=c, nh=nh, nw=nw, orig=(orig_h, orig_w), interpolate=interpolate)
    return x.reshape(b * 4, nh * nw, -1), info


def _fold_v01(patches, info):
    x = patches.contiguous().view(info["b"], 4, info["nh"] * info["nw"], -1)
    c = x.shape[-1]
    x = x.transpose(1, 3).reshape(info["b"] * c * info["nh"], info["nw"], 2, 2)
    x = x.transpose(1, 2).reshape(info["b"], c, info["nh"] * 2, info["nw"] * 2)
    if info["interpolate"]:
        x = F.interpolate(x, size=info["orig"], mode="bilinear", align_corners=False)
    return x


def _mhsa(sd, prefix, x, heads):
    b, n, c = x.shape
    qkv = F.linear(x, sd[f"{prefix}.qkv_proj.weight"], sd[f"{prefix}.qkv_proj.bias"])
    qkv = qkv.reshape(b, n, 3, heads, -1).transpose(1, 3)  # [b, heads, 3, n, hd]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (c // heads) ** -0.5
    attn = torch.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-1)
    out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1)
    return F.linear(out, sd[f"{prefix}.out_proj.weight"], sd[f"{prefix}.out_proj.bias"])


def _layer_norm(sd, prefix, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-5)


def _block_v1_style(sd, prefix, x, stage, version):
    local = _conv(sd, f"{prefix}.local_rep.conv_3x3", x)
    local = _conv(sd, f"{prefix}.local_rep.conv_1x1", local, norm=False, act=False)
    tokens, info = _unfold_v01(local)
    for i in range(stage.num_layers):
        p = f"{prefix}.global_rep.{i}"
        tokens = tokens + _mhsa(sd, f"{p}.pre_norm_mha.1",
                                _layer_norm(sd, f"{p}.pre_norm_mha.0", tokens), stage.num_heads)
        h = _layer_norm(sd, f"{p}.pre_norm_ffn.0", tokens)
        h = F.silu(F.linear(h, sd[f"{p}.pre_norm_ffn.1.weight"], sd[f"{p}.pre_norm_ffn.1.bias"]))
        tokens = tokens + F.linear(h, sd[f"{p}.pre_norm_ffn.4.weight"], sd[f"{p}.pre_norm_ffn.4.bias"])
    tokens = _layer_norm(sd, f"{prefix}.global_rep.{stage.num_layers}", tokens)
    glob = _conv(sd, f"{prefix}.conv_proj", _fold_v01(tokens, info))
    if version == "v3":
        return _conv(sd, f"{prefix}.fusion", torch.cat((local, glob), 1)) + x
    return _conv(sd, f"{prefix}.fusion", torch.cat((x, glob), 1))


def _group_norm(sd, prefix, x):
    return F.group_norm(x, 1, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-5)


def _pconv(sd, prefix, x):
    return F.conv2d(x, sd[f"{prefix}.block.conv.weight"], sd[f"{prefix}.block.conv.bias"])


def _block_v2_style(sd, prefix, x, stage, version, dilation=1):
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.interpolate(x, size=(math.ceil(h / 2) * 2, math.ceil(w / 2) * 2), mode="bilinear",
                          align_corners=True)
    local = _conv(sd, f"{prefix}.local_rep.0", x, dilation=dilation)
    local = _conv(sd, f"{prefix}.local_rep.1", local, norm=False, act=False)
    b, d, h, w = local.shape
    patches = F.unfold(local, kernel_size=2, stride=2).reshape(b, d, 4, -1)
    for i in range(stage.num_layers):
        p = f"{prefix}.global_rep.{i}"
        a = _group_norm(sd, f"{p}.pre_norm_attn.0", patches)
        qkv = _pconv(sd, f"{p}.pre_norm_attn.1.qkv_proj", a)
        q, k, v = torch.split(qkv, [1, d, d], dim=1)
        context = torch.sum(k * F.softmax(q, dim=-1), dim=-1, keepdim=True)
        patches = patches + _pconv(sd, f"{p}.pre_norm_attn.1.out_proj", F.relu(v) * context.expand_as(v))
        f = _group_norm(sd, f"{p}.pre_norm_ffn.0", patches)
        f = F.silu(_pconv(sd, f"{p}.pre_norm_ffn.1", f))
        patches = patches + _pconv(sd, f"{p}.pre_norm_ffn.3", f)
    patches = _group_norm(sd, f"{prefix}.global_rep.{stage.num_layers}", patches)
    glob = F.fold(patches.reshape(b, d * 4, -1), output_size=(h, w), kernel_size=2, stride=2)
    if version == "v3":
        return _conv(sd, f"{prefix}.conv_proj", torch.cat((glob, local), 1), act=False) + x
    return _conv(sd, f"{prefix}.conv_proj", glob, act=False)


def forward(sd: dict, cfg, x: torch.Tensor) -> torch.Tensor:
    """Logits of the official model `cfg` with weights `sd` (official keys) on input x."""
    x = _conv(sd, "conv_1", x, stride=2)
    x = _mv2(sd, "layer_1.0", x, 1)
    for i in range(cfg.layer2_blocks):
        x = _mv2(sd, f"layer_2.{i}", x, 2 if i == 0 else 1)
    block = _block_v1_style if cfg.style == "v1" else _block_v2_style
    for index, stage in enumerate(cfg.stages, start=3):
        x = _mv2(sd, f"layer_{index}.0", x, 2)
        x = block(sd, f"layer_{index}.1", x, stage, cfg.version)
    if cfg.style == "v1":
        x = _conv(sd, "conv_1x1_exp", x)
        return F.linear(x.mean(dim=(-2, -1)), sd["classifier.fc.weight"], sd["classifier.fc.bias"])
    return F.linear(x.mean(dim=(-2, -1)), sd["classifier.1.weight"], sd["classifier.1.bias"])
