"""Image -> input tensor, with each model family's channel order and resize rule."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import mvit3
from mvit3.models.configs import PREPROCESS_CVNETS_V01, PREPROCESS_CVNETS_V02


def _image(h=300, w=400):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    image[..., 0] = 255  # a pure red channel makes the channel order visible
    image[..., 2] = 0
    return image


@pytest.mark.parametrize("cfg, red_index", [(PREPROCESS_CVNETS_V01, 2), (PREPROCESS_CVNETS_V02, 0)])
def test_channel_order_scale_and_crop(cfg, red_index):
    x = mvit3.preprocess(_image(), cfg)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert torch.all(x[0, red_index] == 1.0)  # RGB red lands in the last channel for BGR models
    assert torch.all(x[0, 2 - red_index] == 0.0)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_bgr_arrays_and_models():
    image = _image()
    from_rgb = mvit3.preprocess(image, mvit3.create_model("mobilevitv3_xxs"))
    from_bgr = mvit3.preprocess(np.ascontiguousarray(image[:, :, ::-1]),
                                mvit3.create_model("mobilevitv3_xxs"), input_order="BGR")
    assert torch.equal(from_rgb, from_bgr)


def test_shorter_side_resize_then_centre_crop():
    # A tall image: the width becomes 288 and the crop is centred vertically.
    image = np.zeros((600, 300, 3), dtype=np.uint8)
    image[:, :, 1] = np.linspace(0, 255, 600, dtype=np.uint8)[:, None]  # vertical ramp
    x = mvit3.preprocess(image, PREPROCESS_CVNETS_V02)
    resized_h = int(288 * 600 / 300)
    top = (resized_h - 256) // 2
    expected_first_row = round(255 * (top + 0.5) / resized_h) / 255
    assert x[0, 1, 0, 0].item() == pytest.approx(expected_first_row, abs=2 / 255)


def test_pil_images_are_rgb():
    pil = pytest.importorskip("PIL.Image")
    image = _image()
    x = mvit3.preprocess(pil.fromarray(image), PREPROCESS_CVNETS_V01, input_order="BGR")
    assert torch.equal(x, mvit3.preprocess(image, PREPROCESS_CVNETS_V01))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((10, 10, 3), dtype=np.float32), "uint8"),
    (np.zeros((10, 10), dtype=np.uint8), "HxWx3"),
    (3.5, "file path, a PIL image or an HxWx3 uint8 array"),
])
def test_bad_images(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        mvit3.preprocess(bad, PREPROCESS_CVNETS_V01)


def test_bad_input_order():
    with pytest.raises(ValueError, match="input_order"):
        mvit3.preprocess(_image(), PREPROCESS_CVNETS_V01, input_order="GRB")


# --- the official pipelines, written out from cvnets' transforms, against files on disk ---

def _official_crop(array, short_side=288, crop=256, resize=None):
    """cvnets' Resize (shorter side, int() of the longer, untouched when already at the size)
    then CenterCrop (floored offsets); `resize(array, (width, height))` is the library's."""
    h, w = array.shape[:2]
    if not ((w <= h and w == short_side) or (h <= w and h == short_side)):
        if w < h:
            size_w, size_h = short_side, int(short_side * h / w)
        else:
            size_w, size_h = int(short_side * w / h), short_side
        array = resize(array, (size_w, size_h))
    h, w = array.shape[:2]
    i, j = (h - crop) // 2, (w - crop) // 2
    return array[i:i + crop, j:j + crop]


def _cvnets_v01(path):
    cv2 = pytest.importorskip("cv2")
    bgr = cv2.imread(str(path))
    return _official_crop(
        bgr, resize=lambda a, wh: cv2.resize(a, wh, interpolation=cv2.INTER_LINEAR))


def _cvnets_v02(path):
    # cvnets v0.2 resizes the PIL image with torchvision's resize, which calls PIL's. Its Pillow
    # ran the width pass, then the height pass; Pillow 13 may run the height first in one call,
    # so the reference makes one call per axis in the old order.
    from PIL import Image
    tv = pytest.importorskip("torchvision.transforms.functional")
    bicubic = pytest.importorskip("torchvision.transforms").InterpolationMode.BICUBIC

    def resize(array, wh):
        image = Image.fromarray(array)
        for size_hw in ([array.shape[0], wh[0]], [wh[1], wh[0]]):
            image = tv.resize(image, size_hw, interpolation=bicubic)
        return np.asarray(image)

    return _official_crop(np.asarray(Image.open(path).convert("RGB")), resize=resize)


def _to_uint8(x):
    """Model input [1, 3, c, c] in [0, 1] -> the c x c x 3 uint8 crop it was divided from."""
    u = (x[0] * 255).round()
    assert torch.equal(u / 255, x[0])  # exactly pixel / 255, as cvnets' ToTensor divides
    return u.to(torch.uint8).permute(1, 2, 0).numpy()


def _picture(hw):
    """Colour ramps plus noise, HxWx3 uint8: JPEG keeps detail and resizes round both ways."""
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
    base = np.stack([xx * 255 / hw[1], yy * 255 / hw[0], (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def _write(tmp_path, hw, suffix):
    from PIL import Image
    image = _picture(hw)
    path = tmp_path / f"image_{hw[0]}x{hw[1]}{suffix}"
    Image.fromarray(image).save(path, quality=90)  # PNG ignores the JPEG quality
    return path


# (400, 405): resized to 288x291, where a rounded centre offset (18) differs from cvnets' floor
# (17); (288, 301): already at the size, not resized; (611, 300): Pillow 13 would take the
# height first in one call; the rest: odd sizes both ways.
SIZES = [(400, 405), (333, 517), (517, 333), (288, 301), (301, 289), (611, 300)]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("cfg, official", [(PREPROCESS_CVNETS_V01, _cvnets_v01),
                                           (PREPROCESS_CVNETS_V02, _cvnets_v02)])
def test_files_match_the_official_pipeline_bit_for_bit(tmp_path, cfg, official, hw, suffix):
    path = _write(tmp_path, hw, suffix)
    expected = official(path)
    assert np.array_equal(_to_uint8(mvit3.preprocess(path, cfg)), expected)
    assert np.array_equal(_to_uint8(mvit3.preprocess(str(path), cfg)), expected)


@pytest.mark.parametrize("hw", SIZES)
def test_decoded_arrays_match_the_official_pipeline(tmp_path, hw):
    cv2 = pytest.importorskip("cv2")
    from PIL import Image
    path = _write(tmp_path, hw, ".png")
    bgr = cv2.imread(str(path))
    from_bgr = mvit3.preprocess(bgr, PREPROCESS_CVNETS_V01, input_order="BGR")
    assert np.array_equal(_to_uint8(from_bgr), _cvnets_v01(path))
    with Image.open(path) as pil:
        from_pil = mvit3.preprocess(pil, PREPROCESS_CVNETS_V02)
        from_rgb = mvit3.preprocess(np.asarray(pil), PREPROCESS_CVNETS_V02)
    assert np.array_equal(_to_uint8(from_pil), _cvnets_v02(path))
    assert np.array_equal(_to_uint8(from_rgb), _cvnets_v02(path))


def _module():
    return importlib.import_module("mvit3.preprocess")  # `mvit3.preprocess` is the function


@pytest.mark.parametrize("cfg, missing, library", [(PREPROCESS_CVNETS_V01, "_cv2", "OpenCV"),
                                                   (PREPROCESS_CVNETS_V02, "_pil_image", "PIL")])
def test_without_the_library_torch_resizes_and_says_it_is_approximate(monkeypatch, cfg, missing,
                                                                      library):
    if cfg.interpolation == "bilinear":
        pytest.importorskip("cv2")
    image = _picture((333, 517))  # its sharp 255 -> 0 steps make PIL clip between passes
    exact = _to_uint8(mvit3.preprocess(image, cfg)).astype(int)
    monkeypatch.setattr(_module(), missing, lambda: None)
    with pytest.warns(UserWarning, match=f"{library} is not installed.*within one grey level.*"
                                         f"not bit for bit.*pip install"):
        approximate = _to_uint8(mvit3.preprocess(image, cfg)).astype(int)
    difference = np.abs(approximate - exact)
    assert difference.max() == 1  # another resize, within the one grey level the warning gives


@pytest.mark.parametrize("cfg, missing, official, used", [
    (PREPROCESS_CVNETS_V01, "_cv2", "OpenCV", "PIL"),
    (PREPROCESS_CVNETS_V02, "_pil_image", "PIL", "OpenCV"),
])
def test_files_without_the_library_are_decoded_by_the_other_with_a_warning(
        tmp_path, monkeypatch, cfg, missing, official, used):
    pytest.importorskip("cv2")
    path = _write(tmp_path, (301, 289), ".png")
    monkeypatch.setattr(_module(), missing, lambda: None)
    with pytest.warns(UserWarning) as caught:
        x = mvit3.preprocess(path, cfg)
    messages = [str(w.message) for w in caught]
    assert any(f"{official} is not installed, so '{path}' is decoded by {used}" in m
               for m in messages), messages
    assert any("resizes with torch" in m for m in messages), messages
    assert x.shape == (1, 3, 256, 256)


def test_files_need_opencv_or_pil(tmp_path, monkeypatch):
    path = _write(tmp_path, (301, 289), ".png")
    monkeypatch.setattr(_module(), "_cv2", lambda: None)
    monkeypatch.setattr(_module(), "_pil_image", lambda: None)
    with pytest.raises(ImportError, match="needs OpenCV .* or PIL .*neither is installed"):
        mvit3.preprocess(path, PREPROCESS_CVNETS_V02)


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cat.jpg"):
        mvit3.preprocess(tmp_path / "cat.jpg", PREPROCESS_CVNETS_V02)
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"plain text")
    for cfg in (PREPROCESS_CVNETS_V01, PREPROCESS_CVNETS_V02):
        with pytest.raises(ValueError, match="cannot read image .*not_an_image.png"):
            mvit3.preprocess(bad, cfg)
