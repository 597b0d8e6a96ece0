"""`mvit3.segment` and `mvit3.detect`: the official evaluation pipelines of DeepLabv3 and
SSDLite for each weights' family (dense-spec section 1.3), from an image to its label map or
its detections.

Segmentation. v1-style (cvnets v0.1, OpenCV): BGR, resize to exactly eval_size x eval_size
(cv2.resize INTER_LINEAR), /255, logits at that size, label map nearest-resized back to the
image size. v2-style (cvnets v0.2, PIL): RGB, shorter side to eval_size keeping the aspect
ratio (PIL bicubic), /255, H and W floored to multiples of the output stride (bilinear,
align_corners=True), logits upsampled by the model straight to the image size.
Detection: resize to eval_size x eval_size (v1-style cv2 INTER_LINEAR, BGR; v2-style PIL
bicubic, RGB), /255; the normalised boxes are scaled to the image size and clipped to it.
Files are read and resized by the family's library as in `mvit3.preprocess`, so the input is
the official one bit for bit when that library is installed.

Each pipeline is split in two: `*_input` (image -> network input, on the CPU: what the eval
command's data-loading workers run) and `*_output` (network input -> prediction at the image
size, on the model's device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import DeepLabV3, SSDLite
from .preprocess import image_array, resize_uint8, shorter_side_to, to_unit_tensor


def _array(image, model, input_order: str, kind: type, factory: str):
    """Check the call; image -> HxWx3 uint8 array in the channel order of the model's weights."""
    if not isinstance(model, kind):
        raise TypeError(f"expected an mvit3 {kind.__name__} (mvit3.create_model('{factory}_...')), "
                        f"got {type(model).__name__}")
    if model.training:
        raise ValueError("this runs the evaluation pipeline: call model.eval() first")
    return image_array(image, model.preprocess, input_order)


def segmentation_input(image, model: DeepLabV3, input_order: str = "RGB"):
    """Image -> (network input float32 [1, 3, h, w] on the CPU, the image's (H, W))."""
    array = _array(image, model, input_order, DeepLabV3, "deeplabv3")
    height, width = array.shape[:2]
    size, stride = model.cfg.eval_size, model.output_stride
    if model.cfg.style == "v1":
        # eval_size (512) is a multiple of every v1-style output stride (16), so the official
        # floor-to-a-multiple resize is a no-op here
        x = to_unit_tensor(resize_uint8(array, (size, size), "bilinear"), model.preprocess)
        return x, (height, width)
    resized = shorter_side_to(height, width, size)
    x = to_unit_tensor(resize_uint8(array, resized, "bicubic"), model.preprocess)
    floored = tuple(n // stride * stride for n in resized)
    if floored != resized:
        x = F.interpolate(x, size=floored, mode="bilinear", align_corners=True)
    return x, (height, width)


@torch.no_grad()
def segmentation_output(model: DeepLabV3, x: torch.Tensor, image_size: tuple):
    """`segmentation_input`'s x -> (labels [H, W] int64 at the image size, logits): v1-style
    logits [1, classes, h, w] at the network input size, v2-style at the image size."""
    weight = next(model.parameters())
    x = x.to(weight.device, weight.dtype)
    if model.cfg.style == "v1":
        logits = model(x)
        labels = logits.argmax(dim=1, keepdim=True).to(torch.float32)
        labels = F.interpolate(labels, size=tuple(image_size), mode="nearest")[0, 0].long()
        return labels, logits
    logits = model(x, out_size=tuple(image_size))
    return logits.argmax(dim=1)[0], logits


@torch.no_grad()
def segment(image, model: DeepLabV3, input_order: str = "RGB"):
    """Segment one image (file path, PIL image or HxWx3 uint8 array; `input_order` "BGR" for
    arrays from cv2.imread) with a DeepLabv3 model in eval mode.

    Returns (labels [H, W] int64 at the image size, logits [1, num_classes, h, w]): v1-style
    logits are at the network input size (eval_size^2), v2-style at the image size.
    """
    x, image_size = segmentation_input(image, model, input_order)
    return segmentation_output(model, x, image_size)


@torch.no_grad()
def detect(image, model: SSDLite, input_order: str = "RGB", conf_threshold=None, nms_iou=None) -> dict:
    """Detect objects in one image (as `segment` takes it) with an SSDLite model in eval mode.

    Returns {"boxes" [n, 4] (x0, y0, x1, y1) in pixels of the image, clipped to it, "scores"
    [n], "labels" [n] (1..80; 0 is background)} by the post-processing of the weights' family
    (`SSDLite.detect`; `conf_threshold` / `nms_iou` replace its values).
    """
    x, image_size = detection_input(image, model, input_order)
    return detection_output(model, x, image_size, conf_threshold, nms_iou)


def detection_input(image, model: SSDLite, input_order: str = "RGB"):
    """Image -> (network input float32 [1, 3, eval_size, eval_size] on the CPU, the image's (H, W))."""
    array = _array(image, model, input_order, SSDLite, "ssdlite")
    size = model.cfg.eval_size
    resized = resize_uint8(array, (size, size), model.preprocess.interpolation)
    return to_unit_tensor(resized, model.preprocess), array.shape[:2]


@torch.no_grad()
def detection_output(model: SSDLite, x: torch.Tensor, image_size: tuple, conf_threshold=None,
                     nms_iou=None) -> dict:
    """`detection_input`'s x [1, 3, h, w] of an image of `image_size` (H, W) -> `detect`'s result."""
    weight = next(model.parameters())
    found = model.detect(x.to(weight.device, weight.dtype), conf_threshold, nms_iou)[0]
    height, width = image_size
    scale = found["boxes"].new_tensor([width, height, width, height])
    found["boxes"] = torch.minimum(found["boxes"].clamp(min=0) * scale, scale)
    return found
