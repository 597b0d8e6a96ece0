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

from .models import DeepLabV3, DetectionConfig, SegmentationConfig, SSDLite
from .preprocess import image_array, resize_uint8, shorter_side_to, to_unit_tensor


def _array(image, model, input_order: str, config: type, kind: str, factory: str):
    """Check the call; image -> (HxWx3 uint8 array in the channel order of the model's weights,
    the model's config). Any model carrying the dense config (`model.cfg`) is taken, so a fast
    model's input is made alike."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, config):
        raise TypeError(f"expected an mvit3 {kind} (mvit3.create_model('{factory}_...')), "
                        f"got {type(model).__name__}")
    if model.training:
        raise ValueError("this runs the evaluation pipeline: call model.eval() first")
    return image_array(image, cfg.backbone_cfg.preprocess, input_order), cfg


def segmentation_input(image, model: DeepLabV3, input_order: str = "RGB"):
    """Image -> (network input float32 [1, 3, h, w] on the CPU, the image's (H, W))."""
    array, cfg = _array(image, model, input_order, SegmentationConfig, "DeepLabV3", "deeplabv3")
    height, width = array.shape[:2]
    size, stride, scaling = cfg.eval_size, cfg.output_stride, cfg.backbone_cfg.preprocess
    if cfg.style == "v1":
        # eval_size (512) is a multiple of every v1-style output stride (16), so the official
        # floor-to-a-multiple resize is a no-op here
        x = to_unit_tensor(resize_uint8(array, (size, size), "bilinear"), scaling)
        return x, (height, width)
    resized = shorter_side_to(height, width, size)
    x = to_unit_tensor(resize_uint8(array, resized, "bicubic"), scaling)
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
def detect(image, model: SSDLite, input_order: str = "RGB", conf_threshold=None,
           nms_iou=None) -> dict:
    """Detect objects in one image (as `segment` takes it) with an SSDLite model in eval mode.

    Returns {"boxes" [n, 4] (x0, y0, x1, y1) in pixels of the image, clipped to it, "scores"
    [n], "labels" [n] (1..80; 0 is background)} by the post-processing of the weights' family
    (`SSDLite.detect`; `conf_threshold` / `nms_iou` replace its values).
    """
    x, image_size = detection_input(image, model, input_order)
    return detection_output(model, x, image_size, conf_threshold, nms_iou)


def detection_input(image, model: SSDLite, input_order: str = "RGB"):
    """Image -> (network input float32 [1, 3, eval_size, eval_size] on the CPU, the image's
    (H, W))."""
    array, cfg = _array(image, model, input_order, DetectionConfig, "SSDLite", "ssdlite")
    preprocess = cfg.backbone_cfg.preprocess
    resized = resize_uint8(array, (cfg.eval_size, cfg.eval_size), preprocess.interpolation)
    return to_unit_tensor(resized, preprocess), array.shape[:2]


@torch.no_grad()
def detection_output(model: SSDLite, x: torch.Tensor, image_size: tuple, conf_threshold=None,
                     nms_iou=None) -> dict:
    """`detection_input`'s x [1, 3, h, w] of an image of `image_size` (H, W) -> `detect`'s
    result."""
    weight = next(model.parameters())
    found = model.detect(x.to(weight.device, weight.dtype), conf_threshold, nms_iou)[0]
    height, width = image_size
    scale = found["boxes"].new_tensor([width, height, width, height])
    found["boxes"] = torch.minimum(found["boxes"].clamp(min=0) * scale, scale)
    return found
