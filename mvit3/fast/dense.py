"""Fast DeepLabv3 and SSDLite: the reference dense models (same modules, parameters and
state_dict keys) whose inference forward (eval mode, grad disabled) runs the fused backbone
(`FastMobileViT.forward_levels`, dilated depthwise convs included) and fused head convs.

The heads' ReLUs run as in-place torch ops after the fused convs: the kernels' epilogues
take SiLU or nothing. SSDLite's separable convs have no activation between the depthwise 3x3
and the 1x1, where `dwconv_pointwise` applies SiLU. On the small maps (the extra layers and
the predictors from output stride 64 on: 5x5 and smaller at 320 px) the two convs are composed
into one dense 3x3 (`folding.compose_separable`): one `conv3x3` launch in place of two, at 9x
the FLOPs of the pair, which such maps do not notice. The predictors at output stride 16 and 32
(20x20 and 10x10 maps, 512 and 256 channels: the dense form would cost 9x) run the depthwise
3x3 in torch and the 1x1 through `pointwise_conv`.

Launches besides the backbone's, per forward:
  DeepLabv3  ASPP: 1x1 branch pointwise_conv, 3 dilated conv3x3, a ReLU each;
             image pooling in torch (mean, linear, ReLU, linear into the projection's
             per-sample bias); projection over the 5 branches as two pointwise_convs of two
             branches each (x and x2 pointers, the pooled branch as a broadcast residual, no
             concatenation), ReLU; classifier pointwise_conv; bilinear upsampling.
  SSDLite    extra layers: composed conv3x3 (stride 2), ReLU (x3); mean, pointwise_conv, ReLU;
             heads: [pointwise_conv, ReLU] projection where the level has one; predictors:
             torch depthwise 3x3 + pointwise_conv (os 16, 32), composed conv3x3 (os 64, 128,
             256), pointwise_conv (the 1x1 level); two concatenations. Decoding and NMS stay
             in torch (`detect`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..models.deeplabv3 import DeepLabV3
from ..models.ssdlite import SeparableConv, SSDLite, split_predictions
from . import folding as fold
from .model import DerivedWeights, FastMobileViT


@dataclass
class ASPPPlan:
    version: Optional[int]
    branch_1x1: fold.Pointwise
    branches_3x3: list  # fold.Conv3x3 per rate, dense [A, C, 3, 3]
    rates: tuple
    pool: fold.Pointwise  # the pooling branch's 1x1 (+BN), [A, C]
    # The projection [A, 5A] (+BN) split by input branch: branches 0-1 and 2-3 as two
    # K-major [A, 2A] GEMM weights, the pooling branch's [A, A] block dense for torch.
    project_01: fold.Pointwise
    project_23: fold.Pointwise
    project_pool: Tensor
    project_bias: Tensor
    classifier: fold.Pointwise


def _aspp_plan(model: DeepLabV3, version) -> ASPPPlan:
    aspp = model.seg_head.aspp.aspp_layer
    dtype = aspp.project.conv.weight.dtype
    width = model.cfg.aspp_channels
    project_w, project_b = fold.fold_conv_bn(aspp.project, dtype)
    project_w = project_w.reshape(width, 5 * width)
    classifier = model.seg_head.classifier
    classifier = classifier.classifier if model.cfg.style == "v1" else classifier
    return ASPPPlan(
        version=version,
        branch_1x1=fold.pointwise(aspp.convs[0], dtype),
        branches_3x3=[fold.conv3x3(conv, dtype) for conv in aspp.convs[1:4]],
        rates=tuple(model.cfg.aspp_rates),
        pool=fold.pointwise(aspp.convs[4].aspp_pool.conv_1x1, dtype),
        project_01=fold.Pointwise(fold.pack_pointwise(project_w[:, :2 * width]), None),
        project_23=fold.Pointwise(fold.pack_pointwise(project_w[:, 2 * width:4 * width]), None),
        project_pool=project_w[:, 4 * width:].contiguous(),
        project_bias=project_b,
        classifier=fold.pointwise(classifier, dtype),
    )


class _FastDense(DerivedWeights):
    """What the fast dense models share: a fused encoder on the model's backend, derived weights.
    Listed before the reference class, so its __init__ wraps the reference model's."""

    encoder_class = FastMobileViT

    def __init__(self, cfg, num_classes: Optional[int] = None, in_chans: int = 3, backend: str = "auto"):
        super().__init__(cfg, num_classes=num_classes, in_chans=in_chans)
        self.backend = self.encoder.backend = ops.requested_backend(backend)
        self._init_derived_weights()


class FastDeepLabV3(_FastDense, DeepLabV3):
    """A DeepLabV3 with a fused inference forward (see the module docstring)."""

    def _build_plan(self, version) -> ASPPPlan:
        return _aspp_plan(self, version)

    def forward(self, x: Tensor, out_size: Optional[tuple] = None):
        if self.training or torch.is_grad_enabled():
            return super().forward(x, out_size)
        self.check_input(x)
        logits = self._aspp_logits(self.encoder.forward_levels(x)[4], self.plan())
        align = self.cfg.style == "v2"
        if out_size is None:
            return F.interpolate(logits, scale_factor=self.output_stride, mode="bilinear",
                                 align_corners=align)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=align)

    def _aspp_logits(self, x: Tensor, p: ASPPPlan) -> Tensor:
        """out_l5 [B, C, h, w] -> logits [B, classes, h, w]."""
        be = self.backend
        b, _, h, w = x.shape
        branches = [torch.relu_(ops.pointwise_conv(x, p.branch_1x1.weight, p.branch_1x1.bias,
                                                   backend=be))]
        for conv, rate in zip(p.branches_3x3, p.rates):
            branches.append(torch.relu_(ops.conv3x3(x, conv.weight, conv.bias, None, 1, "none", rate,
                                                    backend=be)))
        # The pooling branch is constant over the map: its share of the projection is a
        # per-sample bias [B, A], broadcast over the pixels as the first GEMM's residual.
        pooled = torch.relu_(F.linear(x.mean(dim=(2, 3)), p.pool.weight, p.pool.bias))
        pool_share = F.linear(pooled, p.project_pool, p.project_bias)
        pool_share = pool_share[:, :, None, None].expand(b, -1, h, w)
        y = ops.pointwise_conv(branches[0], p.project_01.weight, None, branches[1], pool_share,
                               backend=be)
        y = torch.relu_(ops.pointwise_conv(branches[2], p.project_23.weight, None, branches[3], y,
                                           backend=be))
        return ops.pointwise_conv(y, p.classifier.weight, p.classifier.bias, backend=be)


# Predictors of the levels before this one (output strides 16 and 32) keep the separable form.
FIRST_COMPOSED_LEVEL = 2


@dataclass
class SeparablePlan:
    """Depthwise 3x3 (+BN, no activation) then a 1x1 with bias, stride 1."""
    dw: fold.Conv3x3
    pw: fold.Pointwise


@dataclass
class SSDPlan:
    version: Optional[int]
    extra: list  # composed fold.Conv3x3 (stride 2, ReLU after) per separable extra layer
    global_conv: fold.Pointwise  # os_-1: 1x1 after the global pool, no BN, ReLU after
    projections: list  # per head: fold.Pointwise (+ReLU) or None
    predictors: list  # per head: SeparablePlan, composed fold.Conv3x3, or fold.Pointwise (1x1)


def _predictor_plan(level: int, layer, dtype):
    if not isinstance(layer, SeparableConv):
        return fold.pointwise(layer, dtype)
    if level >= FIRST_COMPOSED_LEVEL:
        return fold.compose_separable(layer.dw_conv, layer.pw_conv, dtype)
    return SeparablePlan(fold.conv3x3(layer.dw_conv, dtype), fold.pointwise(layer.pw_conv, dtype))


def _ssd_plan(model: SSDLite, version) -> SSDPlan:
    dtype = model.ssd_heads[0].loc_cls_layer.pw_conv.conv.weight.dtype
    layers = list(model.extra_layers.values())
    return SSDPlan(
        version=version,
        extra=[fold.compose_separable(layer.dw_conv, layer.pw_conv, dtype) for layer in layers[:-1]],
        global_conv=fold.pointwise(layers[-1][1], dtype),
        projections=[fold.pointwise(head.proj_layer, dtype) if head.proj_layer is not None else None
                     for head in model.ssd_heads],
        predictors=[_predictor_plan(level, head.loc_cls_layer, dtype)
                    for level, head in enumerate(model.ssd_heads)],
    )


class FastSSDLite(_FastDense, SSDLite):
    """An SSDLite with a fused inference forward (see the module docstring)."""

    def _build_plan(self, version) -> SSDPlan:
        return _ssd_plan(self, version)

    def forward(self, x: Tensor):
        if self.training or torch.is_grad_enabled():
            return super().forward(x)
        be = self.backend
        p = self.plan()
        levels = self.encoder.forward_levels(x)
        maps = [levels[3], levels[4]]
        for conv in p.extra:
            maps.append(torch.relu_(ops.conv3x3(maps[-1], conv.weight, conv.bias, None, 2, "none",
                                                backend=be)))
        pooled = maps[-1].mean(dim=(2, 3), keepdim=True)
        maps.append(torch.relu_(ops.pointwise_conv(pooled, p.global_conv.weight, None, backend=be)))
        scores, locations = [], []
        for fm, projection, predictor in zip(maps, p.projections, p.predictors):
            if projection is not None:
                fm = torch.relu_(ops.pointwise_conv(fm, projection.weight, projection.bias, backend=be))
            if isinstance(predictor, SeparablePlan):
                dw = predictor.dw
                fm = F.conv2d(fm, dw.weight, dw.bias, padding=1, groups=fm.shape[1])
                predictor = predictor.pw
            if isinstance(predictor, fold.Conv3x3):
                out = ops.conv3x3(fm, predictor.weight, predictor.bias, None, 1, "none", backend=be)
            else:
                out = ops.pointwise_conv(fm, predictor.weight, predictor.bias, backend=be)
            level_scores, level_locations = split_predictions(out, self.num_classes)
            scores.append(level_scores)
            locations.append(level_locations)
        return torch.cat(scores, dim=1), torch.cat(locations, dim=1)
