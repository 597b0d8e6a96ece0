"""SSDLite on a MobileViTv3 backbone, with the official module layout and key names
(dense-spec section 3): `encoder.*` (the classification network without conv_1x1_exp and
classifier, no dilation), `extra_layers.os_{64,128,256,-1}.*`, `ssd_heads.{0..5}.*`; the
anchors, the box decoding and both post-processing rules of the official code.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .dense_base import DenseModel, classifier_conv, relu_conv
from .dense_configs import DetectionConfig, PostprocessRule
from .layers import ConvLayer
from .mobilevit import check_input

BOX_COORDS = 4  # (dx, dy, dw, dh) regressions per anchor


def anchors_per_location(aspect_ratios) -> int:
    """Two square anchors (s_min, s_max) and a (wide, tall) pair per aspect ratio."""
    return 2 + 2 * len(aspect_ratios)


class SeparableConv(nn.Module):
    """Depthwise 3x3 (BN, no activation) -> the given 1x1 `pw_conv`."""

    def __init__(self, channels: int, pw_conv: ConvLayer, stride: int = 1):
        super().__init__()
        self.dw_conv = ConvLayer(channels, channels, 3, stride=stride, groups=channels, act=False)
        self.pw_conv = pw_conv

    def forward(self, x):
        return self.pw_conv(self.dw_conv(x))


def split_predictions(x: torch.Tensor, num_classes: int) -> tuple:
    """A predictor's output [B, anchors * (4 + K), h, w] -> (class logits [B, h * w * anchors, K],
    box regressions [B, h * w * anchors, 4]). Channels are anchor-major (anchor a: 4 box values,
    then K class logits), so NHWC flattens in (row, column, anchor) order."""
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, BOX_COORDS + num_classes)
    return x[..., BOX_COORDS:], x[..., :BOX_COORDS]


class SSDHead(nn.Module):
    """One prediction level: optional 1x1 projection (BN, ReLU) when the input width differs
    from the level's projection width, then ONE conv predicting box and class together
    (separable 3x3 for the spatial levels, plain 1x1 for the global-pool level)."""

    def __init__(self, in_channels: int, proj_channels: int, num_anchors: int, num_classes: int,
                 spatial: bool):
        super().__init__()
        self.num_classes = num_classes
        if spatial and in_channels != proj_channels:
            self.proj_layer = relu_conv(in_channels, proj_channels, 1)
            in_channels = proj_channels
        else:
            self.proj_layer = None
        out_channels = num_anchors * (BOX_COORDS + num_classes)
        if spatial:
            self.loc_cls_layer = SeparableConv(in_channels, classifier_conv(in_channels, out_channels))
        else:
            self.loc_cls_layer = classifier_conv(in_channels, out_channels)

    def forward(self, x):
        if self.proj_layer is not None:
            x = self.proj_layer(x)
        return split_predictions(self.loc_cls_layer(x), self.num_classes)


def level_scales(cfg: DetectionConfig) -> list:
    """(s_min, s_max) per level: s_min = scale[i], s_max = sqrt(scale[i] * scale[i + 1]) with
    the scales a float64 linspace (a float32 one moves some anchors by one float32 ulp)."""
    scales = np.linspace(cfg.min_scale, cfg.max_scale, len(cfg.output_strides) + 1)
    return [(float(scales[i]), math.sqrt(float(scales[i]) * float(scales[i + 1])))
            for i in range(len(cfg.output_strides))]


def ssd_anchors(cfg: DetectionConfig, map_sizes: list) -> torch.Tensor:
    """Anchors [A, 4] (cx, cy, w, h), normalised, clamped to [0, 1], float32 like the official
    ones: per level, rows then columns, then the anchors of a position (s_min square, s_max
    square, then (s_min * sqrt(r), s_min / sqrt(r)) and its transpose for each ratio r).
    Arithmetic in float64, as the official Python floats; v1-style and v2-style code write the
    centre and sqrt(r) differently and each family's form is kept."""
    levels = []
    for (h, w), (s_min, s_max), ratios in zip(map_sizes, level_scales(cfg), cfg.aspect_ratios):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        if cfg.style == "v1":
            cx, cy = (xs + 0.5) * (1.0 / w), (ys + 0.5) * (1.0 / h)
            roots = [math.sqrt(r) for r in ratios]
        else:
            cx, cy = (xs + 0.5) / w, (ys + 0.5) / h
            roots = [r ** 0.5 for r in ratios]
        shapes = [(s_min, s_min), (s_max, s_max)]
        for root in roots:
            shapes += [(s_min * root, s_min / root), (s_min / root, s_min * root)]
        wh = torch.tensor(shapes, dtype=torch.float64)  # [n, 2]
        centres = torch.stack((cx, cy), dim=-1)[:, :, None, :].expand(h, w, len(shapes), 2)
        level = torch.cat((centres, wh.expand(h, w, -1, -1)), dim=-1)  # [h, w, n, 4]
        levels.append(level.reshape(-1, 4))
    return torch.cat(levels).clamp(0.0, 1.0).to(torch.float32)


def decode_boxes(locations: torch.Tensor, anchors: torch.Tensor, center_variance: float,
                 size_variance: float) -> torch.Tensor:
    """Regressions [..., A, 4] + centre-form anchors [A, 4] -> corner boxes [..., A, 4]
    (x0, y0, x1, y1), normalised. Float32 anchors promote to the regressions' dtype."""
    size = torch.exp(locations[..., 2:] * size_variance) * anchors[..., 2:]
    centre = locations[..., :2] * center_variance * anchors[..., 2:] + anchors[..., :2]
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)


def _nms_ops():
    try:
        from torchvision.ops import batched_nms, nms
    except ImportError as err:
        raise ImportError(
            "SSDLite post-processing uses torchvision's NMS, and torchvision is not installed: "
            "pip install 'mvit3[dense]' (or the torchvision release that pairs with your torch)"
        ) from err
    return nms, batched_nms


def postprocess(probs: torch.Tensor, boxes: torch.Tensor, rule: PostprocessRule) -> dict:
    """One image: class probabilities [A, K] (class 0 = background) and corner boxes [A, 4]
    -> {"boxes" [n, 4], "scores" [n], "labels" [n] int64} by `rule` (see PostprocessRule)."""
    nms, batched_nms = _nms_ops()
    kept_boxes, kept_scores, kept_labels = [], [], []
    for label in range(1, probs.shape[1]):
        scores = probs[:, label]
        mask = scores > rule.conf_threshold
        scores, candidates = scores[mask], boxes[mask]
        if scores.numel() == 0:
            continue
        if rule.top_k_per_class is not None:
            scores, order = scores.topk(min(rule.top_k_per_class, scores.numel()))
            candidates = candidates[order]
        if not rule.batched:
            keep = nms(candidates, scores, rule.nms_iou)[:rule.max_per_class]
            scores, candidates = scores[keep], candidates[keep]
        kept_boxes.append(candidates)
        kept_scores.append(scores)
        kept_labels.append(torch.full((scores.numel(),), label, dtype=torch.int64, device=scores.device))
    if not kept_scores:
        return {"boxes": boxes.new_zeros((0, 4)), "scores": probs.new_zeros((0,)),
                "labels": torch.zeros((0,), dtype=torch.int64, device=probs.device)}
    result = {"boxes": torch.cat(kept_boxes), "scores": torch.cat(kept_scores),
              "labels": torch.cat(kept_labels)}
    if rule.batched:
        keep = batched_nms(result["boxes"], result["scores"], result["labels"], rule.nms_iou)
        result = {k: v[keep[:rule.max_per_image]] for k, v in result.items()}
    return result


class SSDLite(DenseModel):
    """SSDLite detector. `model(x)` -> raw (scores [B, A, K], locations [B, A, 4]) in the
    official anchor order; `anchors(h, w)`; `detect(x)` -> detections per image."""

    def __init__(self, cfg: DetectionConfig, num_classes: Optional[int] = None, in_chans: int = 3):
        super().__init__(cfg, num_classes, in_chans, min_classes=2)  # class 0 is background
        stages = cfg.backbone_cfg.stages
        # Levels: out_l4, out_l5, then the extra layers built from out_l5, each halving the map
        # (stride-2 separable conv, padding 1), and a global-pool level.
        extra, in_channels = OrderedDict(), stages[2].channels
        for stride, channels in zip(cfg.output_strides[2:], cfg.proj_channels[2:]):
            if stride == -1:
                extra["os_-1"] = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                               ConvLayer(in_channels, channels, 1, norm=False,
                                                         activation=nn.ReLU))
            else:
                extra[f"os_{stride}"] = SeparableConv(in_channels, relu_conv(in_channels, channels, 1),
                                                      stride=2)
            in_channels = channels
        self.extra_layers = nn.ModuleDict(extra)
        level_channels = [stages[1].channels, stages[2].channels, *cfg.proj_channels[2:]]
        self.ssd_heads = nn.ModuleList([
            SSDHead(c, proj, anchors_per_location(ratios), self.num_classes, spatial=stride != -1)
            for c, proj, ratios, stride in zip(level_channels, cfg.proj_channels, cfg.aspect_ratios,
                                               cfg.output_strides)
        ])

    def forward(self, x: torch.Tensor):
        check_input(x, self.in_chans)
        levels = self.encoder.forward_levels(x)
        maps = [levels[3], levels[4]]
        for layer in self.extra_layers.values():
            maps.append(layer(maps[-1]))
        scores, locations = zip(*[head(fm) for head, fm in zip(self.ssd_heads, maps)])
        return torch.cat(scores, dim=1), torch.cat(locations, dim=1)

    def feature_map_sizes(self, height: int, width: int) -> list:
        """(h, w) of the six prediction maps for an input of height x width, without running
        the network: stride-2 convs give ceil(n / 2); v2-style blocks round odd maps up to even."""
        def level(n):
            n = -(-n // 4)  # conv_1 and layer_2
            sizes = []
            for _ in range(3):  # layer_3, layer_4, layer_5
                n = -(-n // 2)
                if self.cfg.style == "v2":
                    n += n % 2
                sizes.append(n)
            sizes = sizes[1:]  # out_l4, out_l5
            for _ in self.cfg.output_strides[2:-1]:
                sizes.append(-(-sizes[-1] // 2))
            return sizes + [1]

        return list(zip(level(height), level(width)))

    def anchors(self, height: int, width: int) -> torch.Tensor:
        """Anchors [A, 4] (cx, cy, w, h), normalised, float32, in the order of `forward`."""
        return ssd_anchors(self.cfg, self.feature_map_sizes(height, width))

    @torch.no_grad()
    def detect(self, x: torch.Tensor, conf_threshold: Optional[float] = None,
               nms_iou: Optional[float] = None) -> list:
        """x [B, 3, H, W] -> one {"boxes" [n, 4] normalised corners (x0, y0, x1, y1),
        "scores" [n], "labels" [n]} per image, by the post-processing rule of the weights'
        family (v1-style: threshold 0.05, NMS per class, 200 per class, class order;
        v2-style: 0.01, top 400 per class, batched NMS, 200 per image, score order).
        The v1-style official code takes batch 1; here each image is processed alone."""
        scores, locations = self(x)
        return self.detections(scores, locations, x.shape[-2:], conf_threshold, nms_iou)

    @torch.no_grad()
    def detections(self, scores: torch.Tensor, locations: torch.Tensor, image_size: tuple,
                   conf_threshold: Optional[float] = None, nms_iou: Optional[float] = None) -> list:
        """`detect` from raw outputs (scores [B, A, K], locations [B, A, 4]) of an input of
        `image_size` (H, W), e.g. those of a fast model."""
        overrides = {"conf_threshold": conf_threshold, "nms_iou": nms_iou}
        rule = dataclasses.replace(self.cfg.postprocess,
                                   **{k: v for k, v in overrides.items() if v is not None})
        anchors = self.anchors(*image_size).to(locations.device)
        if anchors.shape[0] != locations.shape[1]:
            raise ValueError(f"{locations.shape[1]} box regressions per image, but an input of "
                             f"{image_size[0]}x{image_size[1]} has {anchors.shape[0]} anchors: "
                             f"image_size must be the size of the input that gave them")
        boxes = decode_boxes(locations, anchors, self.cfg.center_variance, self.cfg.size_variance)
        return [postprocess(p, b, rule) for p, b in zip(scores.softmax(dim=-1), boxes)]
