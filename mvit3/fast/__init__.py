"""Drop-in fast MobileViT models: same constructors, parameters and state_dict as
`mvit3.create_model`, with a fused inference forward (see `mvit3.fast.model`).

    model = mvit3.fast.xs(checkpoint_path="checkpoint_ema_best.pt").cuda().eval()
    with torch.inference_mode():
        logits = model(x)
    latency_model = mvit3.fast.cuda_graph(model)  # batch-1 latency: one replay per call
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..checkpoint import load_checkpoint
from ..interop import detect_layout, from_module
from ..models import DENSE_CONFIGS, DenseModel, MobileViT, SegmentationConfig, get_config, list_models
from . import graph
from .dense import FastDeepLabV3, FastSSDLite
from .graph import CudaGraphModel, cuda_graph
from .model import FastMobileViT

__all__ = ["CudaGraphModel", "FastDeepLabV3", "FastMobileViT", "FastSSDLite", "convert",
           "create_model", "cuda_graph", "list_models", "s", "s_l2", "w050", "w075", "w100", "xs",
           "xs_l2", "xxs", "xxs_l2"]


def create_model(name: str, backend: str = "auto", num_classes: Optional[int] = None,
                 in_chans: int = 3, checkpoint_path: Optional[str] = None,
                 cuda_graph: bool = False) -> nn.Module:
    """A fast model for a registered name: any of `mvit3.list_models("*")`, the classifiers
    (num_classes default 1000) and the DeepLabv3 / SSDLite models (default: the dataset's;
    their official checkpoints load strictly, as with `mvit3.create_model`).

    backend: "auto" | "torch" | "triton" | "cuda" (MVIT3_BACKEND overrides); cuda_graph=True
    returns the model wrapped by `mvit3.fast.cuda_graph` (move and .eval() it first: the
    wrapper's `.model` is the fast model).
    """
    if name in DENSE_CONFIGS:
        cfg = DENSE_CONFIGS[name]
        cls = FastDeepLabV3 if isinstance(cfg, SegmentationConfig) else FastSSDLite
        model = cls(cfg, num_classes=num_classes, in_chans=in_chans, backend=backend)
        if checkpoint_path is not None:
            load_checkpoint(model, checkpoint_path, strict=True)
    else:
        model = FastMobileViT(get_config(name), num_classes=1000 if num_classes is None else num_classes,
                              in_chans=in_chans, backend=backend)
        if checkpoint_path is not None:
            load_checkpoint(model, checkpoint_path, strict=True, ignore_head="if_mismatched")
    return graph.cuda_graph(model) if cuda_graph else model


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """A fast copy of a reference model: same weights, device, dtype and train/eval mode.

    `model` is an mvit3 MobileViT or dense model (DeepLabv3 / SSDLite), or a timm /
    transformers MobileViT v1/v2 classifier, whose weights are mapped onto the matching mvit3
    model first (`mvit3.interop.from_module`).
    """
    if isinstance(model, DenseModel):
        weight = model.encoder.conv_1.conv.weight
        fast = create_model(model.cfg.name, backend=backend, num_classes=model.num_classes,
                            in_chans=model.in_chans)
    else:
        if not isinstance(model, MobileViT):
            if not isinstance(model, nn.Module) or detect_layout(model.state_dict()) is None:
                raise TypeError(f"expected an mvit3 MobileViT or dense model, or a timm / "
                                f"transformers MobileViT classifier, got {type(model).__name__}")
            model = from_module(model)
        weight = model.conv_1.conv.weight
        fast = FastMobileViT(model.cfg, num_classes=model.num_classes, in_chans=model.in_chans,
                             backend=backend)
    fast = fast.to(device=weight.device, dtype=weight.dtype)
    fast.load_state_dict(model.state_dict())
    return fast.train(model.training)


def _shortcut(short: str, name: str):
    def build(backend: str = "auto", **kwargs) -> nn.Module:
        return create_model(name, backend=backend, **kwargs)

    build.__name__ = build.__qualname__ = short
    build.__doc__ = f"Fast {name}; keyword arguments as mvit3.fast.create_model."
    return build


xxs = _shortcut("xxs", "mobilevitv3_xxs")
xs = _shortcut("xs", "mobilevitv3_xs")
s = _shortcut("s", "mobilevitv3_s")
xxs_l2 = _shortcut("xxs_l2", "mobilevitv3_xxs_l2")
xs_l2 = _shortcut("xs_l2", "mobilevitv3_xs_l2")
s_l2 = _shortcut("s_l2", "mobilevitv3_s_l2")
w050 = _shortcut("w050", "mobilevitv3_050")
w075 = _shortcut("w075", "mobilevitv3_075")
w100 = _shortcut("w100", "mobilevitv3_100")
