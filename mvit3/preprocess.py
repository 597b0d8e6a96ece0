"""Turn an image into the input tensor the official weights expect (spec section 7).

Evaluation pipeline of both cvnets versions: resize the shorter side to 288 keeping the aspect
ratio (the longer side is int(288 * long / short); an image whose shorter side is already 288
is not resized), centre-crop 256x256 at ((H - 256) // 2, (W - 256) // 2), divide by 255 (no
mean/std). The two families differ in the library that read and resized the images:
- v1-style weights (cvnets v0.1): OpenCV. Files are read with cv2.imread (BGR), resized with
  cv2.resize INTER_LINEAR.
- v2-style weights (cvnets v0.2): PIL. Files are read with Image.open(...).convert("RGB"),
  resized with Image.resize BICUBIC (what torchvision's resize calls for a PIL image), whose
  two passes ran width first in the Pillow of that time (Pillow 13 may run height first).
The resize here calls that same library, in that pass order, so the uint8 crop is the
official one bit for bit.
When the library is missing (OpenCV is the optional extra `opencv-python-headless`, PIL is
`pillow`), torch resizes instead and a warning says so: bilinear without antialias, rounded
to uint8, for cv2.INTER_LINEAR; antialiased bicubic for PIL, width then height with rounding
to uint8 in between as PIL does (both axes at once is up to ~25 levels off at sharp edges,
where PIL's clipping between passes cuts the overshoot). Both are within one grey level of
the library's output on noise and ramp images (tests/test_preprocess.py).
"""

from __future__ import annotations

import os
import warnings
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .models import PreprocessConfig

# The library each family's official pipeline read and resized images with, and its package.
_LIBRARY = {"bilinear": ("OpenCV", "opencv-python-headless"), "bicubic": ("PIL", "pillow")}


def _cv2():
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _pil_image():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def _warn_approximate(interpolation: str) -> None:
    library, package = _LIBRARY[interpolation]
    warnings.warn(
        f"{library} is not installed, so mvit3.preprocess resizes with torch ({interpolation}) "
        f"instead of the official {library} resize: the input is within one grey level of the "
        f"official pipeline's, not bit for bit. `pip install {package}` makes it exact.",
        stacklevel=4)


def _to_uint8_hwc(image) -> np.ndarray:
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image, without importing PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an image file path, a PIL image or an HxWx3 uint8 array, "
                        f"got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 array (pixel values 0..255), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 array, got shape {image.shape}")
    return image


def _read_file(path, interpolation: str):
    """Read an image file as the family's official pipeline did: (HxWx3 uint8 array, its
    channel order). cv2.imread for the OpenCV family (BGR), PIL otherwise (RGB); the other
    library, with a warning, when that one is not installed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    cv2, image_module = _cv2(), _pil_image()
    if cv2 is None and image_module is None:
        raise ImportError(f"reading {path!r} needs OpenCV (opencv-python-headless) or PIL "
                          f"(pillow); neither is installed")
    use_cv2 = cv2 is not None and (interpolation == "bilinear" or image_module is None)
    if use_cv2 != (interpolation == "bilinear"):
        official, used = ("OpenCV", "PIL") if interpolation == "bilinear" else ("PIL", "OpenCV")
        warnings.warn(f"{official} is not installed, so {path!r} is decoded by {used} instead of "
                      f"the official pipeline's {official}: JPEG decoders can differ. "
                      f"`pip install {_LIBRARY[interpolation][1]}` makes it exact.", stacklevel=3)
    if use_cv2:
        array = cv2.imread(path, cv2.IMREAD_COLOR)
        if array is None:
            raise ValueError(f"cannot read image {path!r}: OpenCV could not decode it")
        return array, "BGR"
    try:
        with image_module.open(path) as image:
            return np.array(image.convert("RGB")), "RGB"
    except OSError as err:  # PIL.UnidentifiedImageError and truncated files
        raise ValueError(f"cannot read image {path!r}: {err}") from None


def resize_uint8(array: np.ndarray, size_hw: tuple, interpolation: str) -> np.ndarray:
    """HxWx3 uint8 -> size_hw[0] x size_hw[1] x 3 uint8 through the family's library (the
    channel order does not matter: every channel is resized on its own)."""
    height, width = size_hw
    cv2 = _cv2() if interpolation == "bilinear" else None
    if cv2 is not None:
        return cv2.resize(np.ascontiguousarray(array), (width, height),
                          interpolation=cv2.INTER_LINEAR)
    # PIL's bicubic resizes the width, then the height, rounding to uint8 in between. Pillow 13
    # takes the height first in one call when it shrinks more (python-pillow/Pillow#9549), which
    # the Pillow of cvnets v0.2 never did, so each pass is a call of its own here. cv2's
    # bilinear rounds once.
    passes = [(array.shape[0], width), size_hw] if interpolation == "bicubic" else [size_hw]
    image_module = _pil_image() if interpolation == "bicubic" else None
    if image_module is not None:
        image = image_module.fromarray(np.ascontiguousarray(array))  # HxWx3 uint8: RGB mode
        for pass_height, pass_width in passes:
            image = image.resize((pass_width, pass_height), image_module.Resampling.BICUBIC)
        return np.array(image)  # writable, unlike np.asarray of a PIL image
    _warn_approximate(interpolation)
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()  # [1,3,H,W]
    antialias = interpolation == "bicubic"  # torch's PIL-compatible mode; cv2 has no antialias
    for step in passes:
        x = F.interpolate(x, size=step, mode=interpolation, align_corners=False,
                          antialias=antialias).round().clamp(0, 255)
    return x.to(torch.uint8)[0].permute(1, 2, 0).numpy()  # [H,W,3]


def shorter_side_to(height: int, width: int, size: int) -> tuple:
    """(H, W) after cvnets' aspect-preserving Resize: the shorter side becomes `size`, the
    longer int(size * long / short) (truncated, as both cvnets versions compute it)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def image_array(image, cfg: PreprocessConfig, input_order: str = "RGB") -> np.ndarray:
    """Image (file path, PIL image or HxWx3 uint8 array) -> HxWx3 uint8 array in the channel
    order of the weights (`cfg.channel_order`).

    A file path is read by the family's own library (cv2.imread or PIL), as the official
    evaluation did; this matters for JPEGs, whose decoders can differ. `input_order` is the
    channel order of an array argument ("RGB", or "BGR" for arrays read by cv2.imread); PIL
    images and paths ignore it.
    """
    if input_order not in ("RGB", "BGR"):
        raise ValueError(f"input_order must be 'RGB' or 'BGR', got {input_order!r}")
    if isinstance(image, (str, os.PathLike)):
        array, input_order = _read_file(image, cfg.interpolation)
    else:
        array = _to_uint8_hwc(image)
        if hasattr(image, "convert"):
            input_order = "RGB"
    return array[:, :, ::-1] if input_order != cfg.channel_order else array


def to_unit_tensor(array: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """HxWx3 uint8 -> float32 [1, 3, H, W] scaled as the official ToTensor does."""
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()  # [1,3,H,W]
    # The official ToTensor divides by 255; multiplying by float32(1/255) is an ulp off for
    # some pixel values.
    return x / round(1.0 / cfg.scale)


def preprocess(image, model_or_cfg: Union[torch.nn.Module, PreprocessConfig],
               input_order: str = "RGB") -> torch.Tensor:
    """Image (file path, PIL image or HxWx3 uint8 array, as `image_array` takes it) -> float32
    tensor [1, 3, crop, crop] for the model, in the model's channel order."""
    cfg = model_or_cfg if isinstance(model_or_cfg, PreprocessConfig) else model_or_cfg.preprocess
    array = image_array(image, cfg, input_order)

    h, w = array.shape[:2]
    if min(h, w) != cfg.resize:  # cvnets leaves an image already at the size untouched
        array = resize_uint8(array, shorter_side_to(h, w, cfg.resize), cfg.interpolation)

    h, w = array.shape[:2]
    if h < cfg.crop or w < cfg.crop:
        raise ValueError(f"resized image {h}x{w} is smaller than the {cfg.crop} crop")
    top, left = (h - cfg.crop) // 2, (w - cfg.crop) // 2  # cvnets' CenterCrop floors
    array = array[top:top + cfg.crop, left:left + cfg.crop]
    x = to_unit_tensor(array, cfg)  # [1, 3, crop, crop]
    if cfg.mean is not None:
        x = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    return x.contiguous()
