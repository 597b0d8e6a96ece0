"""Parameter and MAC counts.

Two MAC conventions are reported (batch 1):
- `macs`: exact multiply-adds of convolutions and matrix products, counted by
  `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2). Norms, activations, bias adds,
  softmax and element-wise products are not counted.
- `macs_cvnets`: the convention of the official cvnets v0.1/v0.2 `profile_model`, which is
  what the MobileViT papers print. It differs in three ways: a Linear layer costs its number
  of parameters (bias included) per token; the two attention products of MHSA are each
  counted as N * d * d per sequence (instead of N * N * d); a conv costs
  k*k*Cin*Cout/groups * (H // stride) * (W // stride) plus one per output for a bias.

Both are computed on a copy of the network on the `meta` device, so no arithmetic runs and the
model passed in is not touched.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .models import MobileViT, create_model
from .models.dense_base import DenseModel
from .models.layers import MultiHeadAttention


def _meta_copy(model: nn.Module) -> nn.Module:
    # DeepLabV3 / SSDLite take (cfg, num_classes, in_chans) like MobileViT
    cls = type(model) if isinstance(model, DenseModel) else MobileViT
    with torch.device("meta"):
        return cls(model.cfg, num_classes=model.num_classes, in_chans=model.in_chans).eval()


def _cvnets_hooks(counter: list):
    def conv(module: nn.Conv2d, inputs, output):
        _, cin, h, w = inputs[0].shape
        kh, kw = module.kernel_size
        sh, sw = module.stride
        out_hw = (h // sh) * (w // sw)
        macs = kh * kw * cin * module.out_channels * out_hw / module.groups
        if module.bias is not None:
            macs += module.out_channels * out_hw
        counter[0] += macs

    def linear(module: nn.Linear, inputs, output):
        tokens = inputs[0].numel() // module.in_features
        counter[0] += tokens * sum(p.numel() for p in module.parameters())

    def attention(module: MultiHeadAttention, inputs, output):
        s, n, d = inputs[0].shape
        counter[0] += 2 * s * n * d * d  # QK^T and attn @ V as cvnets v0.1 counts them

    return {nn.Conv2d: conv, nn.Linear: linear, MultiHeadAttention: attention}


def model_stats(model_or_name: Union[str, nn.Module], img_size: Optional[int] = None) -> dict:
    """Return {'params', 'macs', 'macs_cvnets', 'img_size'} for a model or registered name.

    `params` counts parameters (not buffers) of the model as it is; the MAC counts are for one
    img_size x img_size image (default: 256 for classifiers, the eval size of a dense model,
    512 for DeepLabv3 and 320 for SSDLite). Dense models also report `params_eval`: without
    the aux head, which runs only in training (the count the paper's Tables 3 and 4 print).
    """
    model = create_model(model_or_name) if isinstance(model_or_name, str) else model_or_name
    reference = getattr(model, "reference_model", model)  # fast models keep their reference
    if not isinstance(reference, (MobileViT, DenseModel)):
        raise TypeError(f"expected an mvit3 model or a registered name, got {type(model).__name__}")
    dense = isinstance(reference, DenseModel)
    if img_size is None:
        img_size = reference.cfg.eval_size if dense else 256
    params = sum(p.numel() for p in model.parameters())

    meta = _meta_copy(reference)
    x = torch.empty(1, reference.in_chans, img_size, img_size, device="meta")
    counter = [0.0]
    hooks = _cvnets_hooks(counter)
    handles = [m.register_forward_hook(hooks[type(m)]) for m in meta.modules() if type(m) in hooks]
    flops = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), flops:
            meta(x)
    finally:
        for handle in handles:
            handle.remove()
    stats = {
        "params": params,
        "macs": flops.get_total_flops() // 2,
        "macs_cvnets": int(round(counter[0])),
        "img_size": img_size,
    }
    if dense:
        aux = getattr(getattr(reference, "seg_head", None), "aux_head", None)
        stats["params_eval"] = params - (0 if aux is None else sum(p.numel() for p in aux.parameters()))
    return stats
