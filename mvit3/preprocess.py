"""Turn an image into the input tensor the official weights expect (spec section 7).

Evaluation pipeline of both cvnets versions: resize the shorter side to 288 keeping the aspect
ratio, centre-crop 256x256, scale to [0, 1] (no mean/std). v1-style weights (cvnets v0.1,
OpenCV) expect BGR channels and a cv2 bilinear resize; v2-style weights (cvnets v0.2, PIL)
expect RGB and a PIL bicubic resize. The resize here is torch's: bilinear without antialias
(what cv2.INTER_LINEAR does) and bicubic with antialias (torch's PIL-compatible mode), rounded
to uint8 like the originals; results agree with OpenCV/PIL to about one grey level.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .models import PreprocessConfig


def _to_uint8_hwc(image) -> np.ndarray:
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image, without importing PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 array (pixel values 0..255), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 array, got shape {image.shape}")
    return image


def preprocess(image, model_or_cfg: Union[torch.nn.Module, PreprocessConfig],
               input_order: str = "RGB") -> torch.Tensor:
    """Image (PIL or HxWx3 uint8 array) -> float32 tensor [1, 3, crop, crop] for the model.

    `input_order` is the channel order of an array argument ("RGB", or "BGR" for arrays read
    by cv2.imread); PIL images are always RGB. The output is in the model's channel order.
    """
    cfg = model_or_cfg if isinstance(model_or_cfg, PreprocessConfig) else model_or_cfg.preprocess
    if input_order not in ("RGB", "BGR"):
        raise ValueError(f"input_order must be 'RGB' or 'BGR', got {input_order!r}")
    array = _to_uint8_hwc(image)
    if hasattr(image, "convert"):
        input_order = "RGB"
    if input_order != cfg.channel_order:
        array = array[:, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()  # [1,3,H,W]

    h, w = x.shape[-2:]
    short, long_ = (h, w) if h <= w else (w, h)
    new_long = int(cfg.resize * long_ / short)
    size = (cfg.resize, new_long) if h <= w else (new_long, cfg.resize)
    if cfg.interpolation == "bilinear":
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    else:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255)

    h, w = x.shape[-2:]
    if h < cfg.crop or w < cfg.crop:
        raise ValueError(f"resized image {h}x{w} is smaller than the {cfg.crop} crop")
    top = int(round((h - cfg.crop) / 2.0))
    left = int(round((w - cfg.crop) / 2.0))
    x = x[:, :, top:top + cfg.crop, left:left + cfg.crop]
    x = x * cfg.scale
    if cfg.mean is not None:
        x = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    return x.contiguous()
