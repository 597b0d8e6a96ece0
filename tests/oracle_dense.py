"""An independent, functional forward of the official DeepLabv3 and SSDLite models, with the
official anchors, box decoding and post-processing, for exactness tests.

It reads a state_dict in the official layout (dense-spec sections 2.2 and 3.5) and follows the
official computation step by step as dense-spec describes it: cvnets' `_make_mobilevit_layer`
dilation bookkeeping, the ASPP, the SSD extra layers and heads, `SSDAnchorGenerator` as
per-position Python loops, `convert_locations_to_boxes`, and the v0.1 `predict` and v0.2
`postprocess_detections` loops. Head hyper-parameters come from the caller (the tests copy
them from the spec), never from mvit3. It shares no code with `mvit3.models`; the backbone
blocks are those of `oracle.py`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import oracle

ENC = "encoder."
SSD_RATIOS = [[2, 3], [2, 3], [2, 3], [2, 3], [2, 3], [2]]


def _relu_conv(sd, prefix, x, stride=1, dilation=1):
    return F.relu(oracle._conv(sd, prefix, x, stride=stride, act=False, dilation=dilation))


def encoder_levels(sd, cfg, x, output_stride):
    """[out_l1, ..., out_l5] of the encoder (keys `encoder.*`) of backbone config `cfg`."""
    x = oracle._conv(sd, f"{ENC}conv_1", x, stride=2)
    x = oracle._mv2(sd, f"{ENC}layer_1.0", x, 1)
    levels = [x]
    for i in range(cfg.layer2_blocks):
        x = oracle._mv2(sd, f"{ENC}layer_2.{i}", x, 2 if i == 0 else 1)
    levels.append(x)
    # cvnets: layer_5 is built with dilate=True at OS 16, layer_4 and layer_5 at OS 8
    dilated = {32: (), 16: (5,), 8: (4, 5)}[output_stride]
    dilation = 1
    for index, stage in enumerate(cfg.stages, start=3):
        prev_dilation, stride = dilation, 2
        if index in dilated:
            dilation *= 2
            stride = 1
        x = oracle._mv2(sd, f"{ENC}layer_{index}.0", x, stride, dilation=prev_dilation)
        if cfg.style == "v1":  # cvnets v0.1 never passes the dilation to the block
            x = oracle._block_v1_style(sd, f"{ENC}layer_{index}.1", x, stage, cfg.version)
        else:
            x = oracle._block_v2_style(sd, f"{ENC}layer_{index}.1", x, stage, cfg.version,
                                       dilation=dilation)
        levels.append(x)
    return levels


def deeplabv3(sd, cfg, x, *, output_stride, rates, v01, orig_size=None):
    """Eval logits of DeepLabv3 (v01: cvnets v0.1 head; else v0.2) at the input size or, v0.2,
    at `orig_size`."""
    f = encoder_levels(sd, cfg, x, output_stride)[4]
    p = "seg_head.aspp.aspp_layer"
    branches = [_relu_conv(sd, f"{p}.convs.0", f)]
    for i, rate in enumerate(rates, start=1):
        branches.append(_relu_conv(sd, f"{p}.convs.{i}", f, dilation=rate))
    pooled = _relu_conv(sd, f"{p}.convs.4.aspp_pool.conv_1x1", F.adaptive_avg_pool2d(f, 1))
    branches.append(F.interpolate(pooled, size=f.shape[-2:], mode="bilinear", align_corners=False))
    y = _relu_conv(sd, f"{p}.project", torch.cat(branches, dim=1))
    c = "seg_head.classifier.classifier" if v01 else "seg_head.classifier"
    y = F.conv2d(y, sd[f"{c}.block.conv.weight"], sd[f"{c}.block.conv.bias"])
    if v01:
        return torch.nn.Upsample(scale_factor=output_stride, mode="bilinear", align_corners=False)(y)
    if orig_size is None:
        return F.interpolate(y, scale_factor=output_stride, mode="bilinear", align_corners=True)
    return F.interpolate(y, size=orig_size, mode="bilinear", align_corners=True)


def ssdlite(sd, cfg, x):
    """Raw (scores [B, A, K], locations [B, A, 4]) of SSDLite; K read from the head weights."""
    levels = encoder_levels(sd, cfg, x, 32)
    maps = [levels[3], levels[4]]
    y = levels[4]
    for s in (64, 128, 256):
        y = oracle._conv(sd, f"extra_layers.os_{s}.dw_conv", y, stride=2, act=False)
        y = _relu_conv(sd, f"extra_layers.os_{s}.pw_conv", y)
        maps.append(y)
    maps.append(F.relu(F.conv2d(F.adaptive_avg_pool2d(y, 1), sd["extra_layers.os_-1.1.block.conv.weight"])))
    locations, scores = [], []
    for i, fm in enumerate(maps):
        p = f"ssd_heads.{i}"
        if f"{p}.proj_layer.block.conv.weight" in sd:
            fm = _relu_conv(sd, f"{p}.proj_layer", fm)
        if i < 5:
            fm = oracle._conv(sd, f"{p}.loc_cls_layer.dw_conv", fm, act=False)
            c = f"{p}.loc_cls_layer.pw_conv"
        else:
            c = f"{p}.loc_cls_layer"
        out = F.conv2d(fm, sd[f"{c}.block.conv.weight"], sd[f"{c}.block.conv.bias"])
        n_anchors = 2 + 2 * len(SSD_RATIOS[i])
        n_classes = out.shape[1] // n_anchors - 4
        out = out.permute(0, 2, 3, 1).contiguous().view(out.shape[0], -1, 4 + n_classes)
        loc, cls = torch.split(out, [4, n_classes], dim=-1)
        locations.append(loc)
        scores.append(cls)
    return torch.cat(scores, dim=1), torch.cat(locations, dim=1)


def anchors(map_sizes, v01):
    """SSDAnchorGenerator: per level, per position (rows, then columns), the anchors in order."""
    scales = np.linspace(0.1, 1.05, len(map_sizes) + 1)
    out = []
    for k, ((h, w), ratios) in enumerate(zip(map_sizes, SSD_RATIOS)):
        s_min, s_max = scales[k], (scales[k] * scales[k + 1]) ** 0.5
        for y in range(h):
            for x in range(w):
                if v01:
                    cx, cy = (x + 0.5) * (1 / w), (y + 0.5) * (1 / h)
                else:
                    cx, cy = (x + 0.5) / w, (y + 0.5) / h
                boxes = [[cx, cy, s_min, s_min], [cx, cy, s_max, s_max]]
                for r in ratios:
                    root = math.sqrt(r) if v01 else r ** 0.5
                    boxes += [[cx, cy, s_min * root, s_min / root], [cx, cy, s_min / root, s_min * root]]
                out += [[min(max(float(v), 0.0), 1.0) for v in box] for box in boxes]
    return torch.tensor(out, dtype=torch.float32)


def decode(locations, priors):
    """convert_locations_to_boxes (variances 0.1 / 0.2), then centre form -> corner form."""
    size = torch.exp(locations[..., 2:] * 0.2) * priors[..., 2:]
    center = locations[..., :2] * 0.1 * priors[..., 2:] + priors[..., :2]
    return torch.cat((center - size / 2, center + size / 2), dim=-1)


def predict_v01(scores, boxes, conf=0.05, iou=0.5, per_class=200):
    """cvnets v0.1 `predict` for one image: (labels, scores, boxes) in class order."""
    probs = torch.softmax(scores, dim=-1)
    labels, kept_scores, kept_boxes = [], [], []
    for c in range(1, probs.shape[1]):
        p = probs[:, c]
        mask = p > conf
        p, b = p[mask], boxes[mask, :]
        if p.size(0) == 0:
            continue
        keep = torchvision.ops.nms(b, p, iou)[:per_class]
        labels += [c] * keep.numel()
        kept_scores.append(p[keep])
        kept_boxes.append(b[keep])
    if not labels:
        return torch.zeros(0, dtype=torch.int64), probs.new_zeros(0), boxes.new_zeros(0, 4)
    return torch.tensor(labels), torch.cat(kept_scores), torch.cat(kept_boxes)


def postprocess_v02(scores, boxes, conf=0.01, iou=0.5, top_k=400, per_image=200):
    """cvnets v0.2 `postprocess_detections` for one image: (labels, scores, boxes)."""
    probs = torch.softmax(scores, dim=-1)
    all_boxes, all_scores, all_labels = [], [], []
    for c in range(1, probs.shape[1]):
        p = probs[:, c]
        keep = p > conf
        p, b = p[keep], boxes[keep]
        p, idx = p.topk(min(top_k, p.size(0)))
        all_boxes.append(b[idx])
        all_scores.append(p)
        all_labels.append(torch.full_like(p, c, dtype=torch.int64))
    all_boxes, all_scores, all_labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    keep = torchvision.ops.batched_nms(all_boxes, all_scores, all_labels, iou)[:per_image]
    return all_labels[keep], all_scores[keep], all_boxes[keep]
