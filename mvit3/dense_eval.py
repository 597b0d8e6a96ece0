"""`mvit3.segment` and `mvit3.detect`: the official evaluation pipelines of DeepLabv3 and
SSDLite for each weights' family (dense-spec section 1.3), from an image to its label map or
its detections.

Segmentation. v1-style (cvnets v0.1, OpenCV): BGR, resize to exactly eval_size x eval_size
(cv2 bilinear), /255, logits at that size, label map nearest-resized back to the image size.
v2-style (cvnets v0.2, PIL): RGB, shorter side to eval_size keeping the aspect ratio
(bicubic), /255, H and W floored to multiples of the output stride (bilinear,
align_corners=True), logits upsampled by the model straight to the image size.
Detection: resize to eval_size x eval_size (v1-style cv2 bilinear, BGR; v2-style bicubic,
RGB), /255; the normalised boxes are scaled to the image size and clipped to it.
The resizes are torch's, rounded to uint8 as the originals are (see `mvit3.preprocess`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .models import DeepLabV3, SSDLite
from .preprocess import _to_uint8_hwc


def _read(image):
    """A path is read as an RGB array; PIL images and HxWx3 uint8 arrays pass through."""
    if not isinstance(image, (str, os.PathLike)):
        return image
    if not os.path.isfile(image):
        raise FileNotFoundError(f"image file not found: {os.fspath(image)!r}")
    from .command_utils import read_image  # here: it imports the op layer, `import mvit3` need not

    try:
        return read_image(image)
    except OSError as err:  # PIL.UnidentifiedImageError and truncated files
        raise ValueError(f"cannot read image {os.fspath(image)!r}: {err}") from None


def _resize_uint8(x: torch.Tensor, size: tuple, interpolation: str) -> torch.Tensor:
    """[1, 3, H, W] pixel values -> resized and rounded to integers like cv2 / PIL do."""
    if interpolation == "bilinear":  # cv2.INTER_LINEAR: no antialiasing
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    else:  # PIL bicubic
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.round().clamp(0, 255)


def _pixels(image, model, input_order: str, kind: type, factory: str) -> torch.Tensor:
    """Check the call; image -> float64 [1, 3, H, W] pixel values (0..255) in the channel order
    of the model's weights, on the model's device."""
    if not isinstance(model, kind):
        raise TypeError(f"expected an mvit3 {kind.__name__} (mvit3.create_model('{factory}_...')), "
                        f"got {type(model).__name__}")
    if model.training:
        raise ValueError("this runs the evaluation pipeline: call model.eval() first")
    if input_order not in ("RGB", "BGR"):
        raise ValueError(f"input_order must be 'RGB' or 'BGR', got {input_order!r}")
    image = _read(image)
    if hasattr(image, "convert"):
        input_order = "RGB"
    array = _to_uint8_hwc(image)
    if input_order != model.preprocess.channel_order:
        array = array[:, :, ::-1]
    device = next(model.parameters()).device
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].to(device, torch.float64)


@torch.no_grad()
def segment(image, model: DeepLabV3, input_order: str = "RGB"):
    """Segment one image (file path, PIL image or HxWx3 uint8 array; `input_order` "BGR" for
    arrays from cv2.imread) with a DeepLabv3 model in eval mode.

    Returns (labels [H, W] int64 at the image size, logits [1, num_classes, h, w]): v1-style
    logits are at the network input size (eval_size^2), v2-style at the image size.
    """
    x = _pixels(image, model, input_order, DeepLabV3, "deeplabv3")
    weight = next(model.parameters())
    height, width = x.shape[-2:]
    size, stride = model.cfg.eval_size, model.output_stride

    if model.cfg.style == "v1":
        # eval_size (512) is a multiple of every v1-style output stride (16), so the official
        # floor-to-a-multiple resize is a no-op here
        x = _resize_uint8(x, (size, size), "bilinear") / 255.0
        logits = model(x.to(weight.dtype))
        labels = logits.argmax(dim=1, keepdim=True).to(torch.float32)
        labels = F.interpolate(labels, size=(height, width), mode="nearest")[0, 0].long()
        return labels, logits

    # cvnets v0.2 Resize: the shorter side to `size`, the longer to int(size * long / short)
    resized = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    x = _resize_uint8(x, resized, "bicubic") / 255.0
    floored = tuple(n // stride * stride for n in resized)
    if floored != resized:
        x = F.interpolate(x, size=floored, mode="bilinear", align_corners=True)
    logits = model(x.to(weight.dtype), out_size=(height, width))
    return logits.argmax(dim=1)[0], logits


@torch.no_grad()
def detect(image, model: SSDLite, input_order: str = "RGB", conf_threshold=None, nms_iou=None) -> dict:
    """Detect objects in one image (as `segment` takes it) with an SSDLite model in eval mode.

    Returns {"boxes" [n, 4] (x0, y0, x1, y1) in pixels of the image, clipped to it, "scores"
    [n], "labels" [n] (1..80; 0 is background)} by the post-processing of the weights' family
    (`SSDLite.detect`; `conf_threshold` / `nms_iou` replace its values).
    """
    x = _pixels(image, model, input_order, SSDLite, "ssdlite")
    height, width = x.shape[-2:]
    size = model.cfg.eval_size
    x = _resize_uint8(x, (size, size), "bilinear" if model.cfg.style == "v1" else "bicubic") / 255.0
    found = model.detect(x.to(next(model.parameters()).dtype), conf_threshold, nms_iou)[0]
    scale = found["boxes"].new_tensor([width, height, width, height])
    found["boxes"] = torch.minimum(found["boxes"].clamp(min=0) * scale, scale)
    return found
