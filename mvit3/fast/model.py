"""The drop-in fast model: a MobileViT whose inference forward runs the fused ops.

`FastMobileViT` IS a `MobileViT` (same modules, parameters and state_dict keys), so every
checkpoint and every tool that works on the reference works on it. In eval mode with grad
disabled it runs the fused plan below; in training mode or with grad enabled it runs the
reference forward unchanged, so fine-tuning keeps working.

Per forward of a v1-style v3 model (XXS/XS/S), with the maps kept channels_last throughout:
  stem                conv3x3(+BN+SiLU)                                   1 launch
  MV2 block           dwconv_pointwise(exp+SiLU, dw+SiLU, red, +res)          1
                      (Triton: 2 where its cost model keeps the expanded map, e.g. fp32 at
                      batch 100; CUDA library: 2, the expansion launched first)
  MobileViTv3 block   dwconv_pointwise (local), pointwise_conv (LN+qkv of layer 1), then
                      per transformer layer patch_attention (+out_proj+res),
                      transformer_mlp_project (LN+FFN+res, then on its output tile the
                      next layer's LN+qkv, or after the last layer LN+conv_proj+SiLU);
                      pointwise_conv (fusion on [local | global] + SiLU + x)  3 + 2L
                      (odd maps, resized to even for attention: the last layer's
                      transformer_mlp, then LN + resize back in torch and conv_proj)
  head                pointwise_conv(exp+SiLU), mean, linear                 3
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..models import MobileViT, check_input
from ..models.blocks import MobileViTBlock
from ..models.layers import InvertedResidual, TransformerEncoder
from ..models.patches import resize_to_even
from ..ops.reference import apply_norm
from . import folding as fold


# How many parameters, buffers and submodules have been registered on any module in this
# process (torch's global registration hooks; attribute assignment registers). A fast model
# walks its module tree again only when this moved.
_registrations = 0


def _count_registration(*_) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)

# Tensor -> its version counter (bumped by every in-place op on it or a view of it), in C:
# `sum(map(_version_of, tensors))` reads every counter without a Python-level loop
# (attrgetter: half the cost of calling the `_version` descriptor's __get__).
_version_of = operator.attrgetter("_version")


def _version_counter_groups(tensors: list) -> Optional[list]:
    """`tensors` grouped by the version counter object they share (views, `.detach()` and
    `nn.Parameter(t)` share their source's counter; `t.data = other` keeps t's), or None
    where this torch cannot say.

    Probed, not assumed: tensor i's counter is set to i, in order, so every counter ends at
    the index of the last tensor sharing it, which each of them then reads; the counters are
    set back to the values they had (tensors sharing a counter read the same value). Tensors
    without a version counter (inference tensors) must not be passed.
    """
    try:
        set_versions = torch._C._autograd._unsafe_set_version_counter
    except AttributeError:
        return None
    tensors = tuple(tensors)
    versions = tuple(map(_version_of, tensors))
    try:
        set_versions(tensors, range(len(tensors)))
        last = list(map(_version_of, tensors))
    except Exception:  # another signature in another torch: no grouping
        last = None
    finally:
        # also after a failure part-way: the counters it set go back, the rest are unchanged
        try:
            set_versions(tensors, versions)
        except Exception:
            pass
    if last is None:
        return None
    groups = {}
    for t, key in zip(tensors, last):
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def _shareable(t, cls) -> bool:
    return (type(t) is cls and t.is_floating_point() and not t.is_inference()
            and not t._is_view() and (cls is nn.Parameter or not t.requires_grad))


def _share_version_counters(module: nn.Module) -> None:
    """Let the floating-point parameters of `module` share one version counter, and its
    floating-point buffers another, each tensor keeping its own storage: an in-place edit of
    any of them then moves the one counter its group reads.

    The tensors that do not share the counter most of them share are replaced by new
    Parameter objects (buffers: tensors) holding the same data, made from an alias of a
    tensor of that group (`nn.Parameter(t.detach())` shares t's counter) and then given
    their own data through `.data =` (which keeps the new object's counter). Replacing
    Parameter objects is safe only while nobody can hold the old ones (an optimizer, a
    hook): the fast models call this at the end of their construction, and nowhere else.
    Exact nn.Parameter and torch.Tensor objects only (subclasses, views and inference
    tensors keep their own counters). Nothing here is needed for correctness: the check
    groups the tensors by probing (`_version_counter_groups`), so a tensor that stops
    sharing only costs it one read more.
    """
    replaced = False
    for kind, cls in (("_parameters", nn.Parameter), ("_buffers", torch.Tensor)):
        slots = [(getattr(owner, kind), name, t) for owner in module.modules()
                 for name, t in getattr(owner, kind).items() if _shareable(t, cls)]
        tensors = list({id(t): t for _, _, t in slots}.values())  # tied tensors once
        groups = _version_counter_groups(tensors)
        if groups is None:  # nothing could be read back from sharing here
            return
        if not groups:
            continue
        shared = max(groups, key=len)
        anchor, keep = shared[0], set(map(id, shared))
        new_tensors = {}
        for slots_dict, name, t in slots:
            if id(t) in keep or not torch._has_compatible_shallow_copy_type(anchor, t):
                continue
            new = new_tensors.get(id(t))
            if new is None:
                if cls is nn.Parameter:
                    new = nn.Parameter(anchor.detach(), t.requires_grad)
                    new.__dict__.update(t.__dict__)
                else:
                    new = anchor.detach()
                new.data = t.data
                new_tensors[id(t)] = new
            slots_dict[name] = new
        replaced = replaced or bool(new_tensors)
    if replaced:  # as an assignment would: fast models list their tensors again
        _count_registration()


@dataclass
class MV2Plan:
    expand: fold.Pointwise
    dw: fold.Conv3x3
    reduce: fold.Pointwise
    stride: int
    residual: bool
    dilation: int  # of the depthwise 3x3: > 1 in the dense models' layers past their output stride


@dataclass
class LayerPlan:
    """One transformer layer: MHSA (v1-style) or separable attention (v2-style), then FFN."""
    attn_norm: fold.Norm
    qkv: fold.Pointwise
    out: fold.Pointwise
    ffn_norm: fold.Norm
    fc1: fold.Pointwise
    fc2: fold.Pointwise
    num_heads: int = 0
    scale: float = 0.0


@dataclass
class BlockPlan:
    local_conv: fold.Conv3x3  # depthwise (v3, v2-style) or dense (v1) 3x3 + BN + SiLU
    local_proj: fold.Pointwise  # 1x1 C -> d, no bias
    layers: list
    final_norm: fold.Norm
    proj: fold.Pointwise  # conv_proj (+BN)
    fusion: Optional[object]  # v1-style: Pointwise (v3) or Conv3x3 (v1); v2-style: None
    local_dilation: int  # > 1 in the v2-style dense models' blocks past their output stride


@dataclass
class Plan:
    version: Optional[int]  # DerivedWeights._weights_version() it was built at; None: traced
    stem: fold.Conv3x3
    stages: list = field(default_factory=list)  # MV2Plan or BlockPlan, in order
    level_ends: list = field(default_factory=list)  # stages[:level_ends[k]] end at layer_{k+1}
    head: Optional[fold.Pointwise] = None  # conv_1x1_exp (v1-style) or None


def _mv2_plan(block: InvertedResidual, dtype) -> MV2Plan:
    b = block.block
    return MV2Plan(fold.pointwise(b.exp_1x1, dtype), fold.conv3x3(b.conv_3x3, dtype),
                   fold.pointwise(b.red_1x1, dtype), block.stride, block.use_residual,
                   b.conv_3x3.conv.dilation[0])


def _layer_plan(layer, dtype) -> LayerPlan:
    """A v1-style TransformerEncoder (nn.Linear projections; pre_norm_ffn = [LayerNorm, fc1,
    SiLU, Dropout, fc2, Dropout]) or a v2-style LinearAttnFFN (1x1 ConvLayer projections;
    pre_norm_ffn = [LayerNorm2D, fc1 + SiLU, Dropout, fc2, Dropout])."""
    if isinstance(layer, TransformerEncoder):
        attn_path, fc2_index, project = layer.pre_norm_mha, 4, fold.linear
        heads = dict(num_heads=attn_path[1].num_heads, scale=attn_path[1].scaling)
    else:
        attn_path, fc2_index, project = layer.pre_norm_attn, 3, fold.pointwise
        heads = {}
    attn, ffn = attn_path[1], layer.pre_norm_ffn
    return LayerPlan(fold.norm(attn_path[0], dtype), project(attn.qkv_proj, dtype),
                     project(attn.out_proj, dtype), fold.norm(ffn[0], dtype),
                     project(ffn[1], dtype), project(ffn[fc2_index], dtype), **heads)


def _block_plan(block, dtype) -> BlockPlan:
    if isinstance(block, MobileViTBlock):
        local_conv, local_proj = block.local_rep.conv_3x3, block.local_rep.conv_1x1
        if block.version == "v3":
            fusion = fold.pointwise(block.fusion, dtype)
        else:
            fusion = fold.conv3x3(block.fusion, dtype)
    else:
        local_conv, local_proj = block.local_rep[0], block.local_rep[1]
        fusion = None
    # a list, not global_rep[:-1]: slicing builds a Sequential, whose registrations would make
    # the model list its tensors again on the next forward
    layers = [_layer_plan(layer, dtype) for layer in list(block.global_rep)[:-1]]
    return BlockPlan(fold.conv3x3(local_conv, dtype), fold.pointwise(local_proj, dtype), layers,
                     fold.norm(block.global_rep[-1], dtype), fold.pointwise(block.conv_proj, dtype),
                     fusion, local_conv.conv.dilation[0])


class DerivedWeights:
    """Inference weights derived from a module's parameters (BN folded, 1x1 weights packed),
    kept as a plan and rebuilt whenever the parameters change. Mixed into an nn.Module before
    it in the bases; the module implements `_build_plan(version)`, whose result has a
    `version` field, and calls `_init_derived_weights()` at the end of its construction.
    """

    def _init_derived_weights(self) -> None:
        self._plan = None
        # The parameters and buffers whose version counters are watched (see _weights_version),
        # one of them per distinct version counter, and the registration count at which they
        # were listed.
        self._watched: Optional[list] = None
        self._counters: list = []
        self._watched_registrations = -1
        # Construction made every tensor here and nobody holds them yet: the one moment
        # their version counters can be made shared (two reads per call instead of ~300).
        _share_version_counters(self)

    def _weights_version(self) -> int:
        """A number that grows whenever a watched parameter or buffer is modified in place.

        A forward (and a CUDA-graph replayed call) reads it, so it must not walk the module
        tree (milliseconds) nor read every tensor's version counter (~300 of them, 15-30 us):
        the tensors are listed once and listed again only after a parameter, buffer or module
        was registered somewhere (any attribute assignment of one counts); if the list then
        differs, something was replaced and the plan is dropped. When listed, they are grouped
        by the version counter object they actually share (probed: `_version_counter_groups`)
        and the number is the sum of one counter per group: counters only grow, so it changes
        exactly when one of them moved. A fast model's construction makes its floating-point
        parameters share one counter and its buffers another (`_share_version_counters`), so
        this is two reads; a model whose tensors share no counter (deep-copied, unpickled,
        loaded with `assign=True`, or where this torch cannot probe counters) reads one
        counter per tensor, as slow as before but as exact. Integer buffers (BatchNorm's
        num_batches_tracked) feed no derived weight and are not watched.

        Caveat of the shared counters: autograd checks the version of each tensor saved for
        backward, so an in-place edit of one parameter between a forward and its backward is
        reported as a modification of every saved parameter ("modified by an inplace
        operation"), as with flat-parameter schemes (FSDP's parameters are views of one
        flat tensor and share its counter). Training that edits parameters only after
        backward (optimizer steps, EMA updates) never notices; BatchNorm's running statistics
        are buffers, on a counter of their own.

        Not watched (call `refresh()` after them): edits through `.data` (`p.data.copy_(w)`,
        `p.data = w`: neither moves a version counter), `.to()` or `.half()` of a submodule
        rather than of the model, `torch.utils.swap_tensors` on a parameter or buffer (it
        swaps version counters too), and in-place edits of inference tensors (parameters
        created or converted under torch.inference_mode() have no version counter); `.to()`
        of the model and `load_state_dict` drop the plan themselves.
        """
        if self._watched_registrations != _registrations:
            watched = [t for t in (*self.parameters(), *self.buffers())
                       if t.is_floating_point() and not t.is_inference()]
            if self._watched is None or list(map(id, watched)) != list(map(id, self._watched)):
                self._plan = None
            groups = _version_counter_groups(watched)
            counters = watched if groups is None else [group[0] for group in groups]
            if list(map(id, counters)) != list(map(id, self._counters)):
                # other groups: the plan's version was a sum over other counters
                self._plan = None
            self._counters = counters
            self._watched, self._watched_registrations = watched, _registrations
        return sum(map(_version_of, self._counters))

    def refresh(self) -> None:
        """Drop the derived inference weights (they are rebuilt on the next fused forward).
        Needed only after the edits `_weights_version` names as not watched."""
        self._plan = None
        self._watched_registrations = -1

    def __setstate__(self, state):
        # Unpickled or deep-copied: the tensors are new objects whose version counters are
        # no longer shared, so the groups must be probed again before the next check.
        super().__setstate__(state)
        self.__dict__.setdefault("_counters", [])
        self._watched_registrations = -1

    def _apply(self, fn, *args, **kwargs):
        # .to(), .half(), .cuda(): the derived weights follow. nn.Module keeps the Parameter
        # objects (their data is replaced, their version counters stay) but replaces each
        # buffer by a new tensor with a counter of its own; the buffer objects are kept here
        # too, so that their shared counter survives (and a reference to a buffer keeps
        # following the model, as one to a parameter does).
        self.refresh()
        buffers = [(m._buffers, name, b) for m in self.modules()
                   for name, b in m._buffers.items() if b is not None]
        module = super()._apply(fn, *args, **kwargs)
        for slots, name, old in buffers:
            new = slots.get(name)
            if (new is not old and type(new) is type(old) is Tensor and not old._is_view()
                    and new.is_inference() == old.is_inference()
                    and new.requires_grad == old.requires_grad
                    and torch._has_compatible_shallow_copy_type(old, new)):
                old.data = new
                slots[name] = old
        if not self.training:
            self.plan()
        return module

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # the copies move the version counters, except those of inference tensors
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.refresh()
        return result

    def train(self, mode: bool = True):
        """Switching to eval derives the inference weights at once, so that a forward traced
        by torch.compile finds them ready instead of tracing the folding into its graph.
        Switching from training to eval derives them anew: training forwards update
        BatchNorm's running statistics in place without moving their version counters."""
        if self.training and not mode:
            self._plan = None
        super().train(mode)
        if not mode:
            self.plan()
        return self

    def plan(self):
        """The folded/packed inference weights, rebuilt if the weights changed."""
        version = None if torch.compiler.is_compiling() else self._weights_version()
        if self._plan is not None and (version is None or version == self._plan.version):
            return self._plan
        with torch.no_grad():
            self._plan = self._build_plan(version)
        return self._plan


class FastMobileViT(DerivedWeights, MobileViT):
    """A MobileViT with a fused inference forward; see the module docstring. With
    `features_only` (the dense models' encoder) `forward_levels` is fused too."""

    def __init__(self, cfg, num_classes: int = 1000, in_chans: int = 3, backend: str = "auto",
                 output_stride: int = 32, features_only: bool = False):
        super().__init__(cfg, num_classes=num_classes, in_chans=in_chans,
                         output_stride=output_stride, features_only=features_only)
        self.backend = ops.requested_backend(backend)
        self._init_derived_weights()

    def _build_plan(self, version) -> Plan:
        dtype = self.conv_1.conv.weight.dtype
        plan = Plan(version=version, stem=fold.conv3x3(self.conv_1, dtype))
        for layer in (self.layer_1, self.layer_2, self.layer_3, self.layer_4, self.layer_5):
            for block in layer:
                plan.stages.append(_mv2_plan(block, dtype) if isinstance(block, InvertedResidual)
                                   else _block_plan(block, dtype))
            plan.level_ends.append(len(plan.stages))
        if not self.features_only and not isinstance(self.conv_1x1_exp, torch.nn.Identity):
            plan.head = fold.pointwise(self.conv_1x1_exp, dtype)
        return plan

    # ----- forward -----------------------------------------------------------------------
    def forward_levels(self, x: Tensor) -> list:
        if self.training or torch.is_grad_enabled():
            return super().forward_levels(x)
        self._check_fused_input(x)
        return self._fused_levels(x, self.plan())

    def forward_features(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled():
            return super().forward_features(x)
        self._check_fused_input(x)
        plan = self.plan()
        x = self._fused_levels(x, plan)[-1]
        if plan.head is not None:
            x = ops.pointwise_conv(x, plan.head.weight, plan.head.bias, act="silu", backend=self.backend)
        return x

    def _check_fused_input(self, x: Tensor) -> None:
        check_input(x, self.in_chans)
        weight = self.conv_1.conv.weight
        if x.dtype != weight.dtype or x.device != weight.device:
            raise TypeError(f"input is {x.dtype} on {x.device} but the model is {weight.dtype} on "
                            f"{weight.device}; convert one of them")

    def _fused_levels(self, x: Tensor, plan: Plan) -> list:
        """The outputs of layer_1 ... layer_5 (channels_last maps)."""
        be = self.backend
        x = ops.conv3x3(x, plan.stem.weight, plan.stem.bias, None, 2, "silu", backend=be)
        levels = []
        for index, stage in enumerate(plan.stages, start=1):
            if isinstance(stage, MV2Plan):
                x = self._mv2(x, stage)
            elif self.cfg.style == "v1":
                x = self._block_v1_style(x, stage)
            else:
                x = self._block_v2_style(x, stage)
            if index == plan.level_ends[len(levels)]:
                levels.append(x)
        return levels

    def _mv2(self, x: Tensor, p: MV2Plan) -> Tensor:
        # one op: expand + SiLU, dw 3x3 + SiLU, reduce, + x (the Triton kernel decides whether
        # to recompute the expansion per tap in one launch or to write the hidden map)
        return ops.dwconv_pointwise(x, p.dw.weight, p.dw.bias, p.reduce.weight, p.reduce.bias,
                                    p.stride, x if p.residual else None, p.dilation,
                                    p.expand.weight, p.expand.bias, backend=self.backend)

    def _local(self, x: Tensor, p: BlockPlan) -> Tensor:
        be = self.backend
        if p.local_conv.weight.shape[1] == 1:  # depthwise: fused with the 1x1 projection
            return ops.dwconv_pointwise(x, p.local_conv.weight, p.local_conv.bias,
                                        p.local_proj.weight, None, 1, None, p.local_dilation,
                                        backend=be)
        h = ops.conv3x3(x, p.local_conv.weight, p.local_conv.bias, None, 1, "silu", p.local_dilation,
                        backend=be)
        return ops.pointwise_conv(h, p.local_proj.weight, None, backend=be)

    def _block_v1_style(self, x: Tensor, p: BlockPlan) -> Tensor:
        be = self.backend
        local = self._local(x, p)  # [B, d, H, W]
        h, w = local.shape[-2:]
        # Odd maps: the official unfold resizes to even size (bilinear, align_corners=False)
        # and the fold resizes back; attention needs whole 2x2 patches.
        t = resize_to_even(local, align_corners=False).contiguous(memory_format=torch.channels_last)
        resized = t.shape[-2:] != (h, w)
        fn = p.final_norm
        # Only the first layer's LayerNorm + qkv is a launch of its own: each FFN also projects
        # its output for what follows, the next layer's LayerNorm + qkv and, after the last
        # layer, the final LayerNorm + conv_proj (+ BN + SiLU). A resized map is normalised
        # before it is resized back, so there the last FFN projects nothing.
        first = p.layers[0]
        projected = ops.pointwise_conv(t, first.qkv.weight, first.qkv.bias, None, None, "layer",
                                       first.attn_norm.weight, first.attn_norm.bias,
                                       first.attn_norm.eps, backend=be)
        projections = [(layer.attn_norm, layer.qkv, "none") for layer in p.layers[1:]]
        projections.append(None if resized else (fn, p.proj, "silu"))
        for layer, projection in zip(p.layers, projections):
            t, projected = self._mhsa_layer(t, projected, layer, projection)
        if resized:
            t = apply_norm(t, "layer", fn.weight, fn.bias, fn.eps)
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
            glob = ops.pointwise_conv(t, p.proj.weight, p.proj.bias, act="silu", backend=be)
        else:
            glob = projected
        if isinstance(p.fusion, fold.Pointwise):  # v3: 1x1 on [local | global] + SiLU + x
            return ops.pointwise_conv(local, p.fusion.weight, p.fusion.bias, glob, x, act="silu",
                                      backend=be)
        return ops.conv3x3(x, p.fusion.weight, p.fusion.bias, glob, 1, "silu", backend=be)

    def _mhsa_layer(self, t: Tensor, qkv: Tensor, p: LayerPlan, projection: Optional[tuple]) -> tuple:
        """One v1-style transformer layer on t given its qkv: (t', projection of t') where
        projection = (norm, 1x1 conv, act) is what follows the layer (None: nothing fused)."""
        be = self.backend
        n2 = p.ffn_norm
        t = ops.patch_attention(qkv, p.num_heads, p.scale, p.out.weight, p.out.bias, t, backend=be)
        ffn = (n2.weight, n2.bias, n2.eps, p.fc1.weight, p.fc1.bias, p.fc2.weight, p.fc2.bias)
        if projection is None:
            return ops.transformer_mlp(t, "layer", *ffn, backend=be), None
        norm, proj, act = projection
        return ops.transformer_mlp_project(t, *ffn, norm.weight, norm.bias, norm.eps, proj.weight,
                                           proj.bias, act, backend=be)

    def _block_v2_style(self, x: Tensor, p: BlockPlan) -> Tensor:
        be = self.backend
        # Odd maps: resize the block input (align_corners=True) and keep the larger size.
        x = resize_to_even(x, align_corners=True)
        local = self._local(x, p)
        t = local
        for layer in p.layers:
            n1, n2 = layer.attn_norm, layer.ffn_norm
            t = ops.separable_attention(t, n1.weight, n1.bias, n1.eps, layer.qkv.weight,
                                        layer.qkv.bias, layer.out.weight, layer.out.bias, backend=be)
            t = ops.transformer_mlp(t, "group", n2.weight, n2.bias, n2.eps, layer.fc1.weight,
                                    layer.fc1.bias, layer.fc2.weight, layer.fc2.bias, backend=be)
        fn = p.final_norm
        if self.cfg.version == "v3":  # conv_proj on [GroupNorm(global) | local] + x
            return ops.pointwise_conv(t, p.proj.weight, p.proj.bias, local, x, "group", fn.weight,
                                      fn.bias, fn.eps, backend=be)
        return ops.pointwise_conv(t, p.proj.weight, p.proj.bias, None, None, "group", fn.weight,
                                  fn.bias, fn.eps, backend=be)
