"""Image -> input tensor, with each model family's channel order and resize rule."""

from __future__ import annotations

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
    top = round((resized_h - 256) / 2)
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
    ("cat.jpg", "PIL image or an HxWx3 uint8 array"),
])
def test_bad_images(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        mvit3.preprocess(bad, PREPROCESS_CVNETS_V01)


def test_bad_input_order():
    with pytest.raises(ValueError, match="input_order"):
        mvit3.preprocess(_image(), PREPROCESS_CVNETS_V01, input_order="GRB")
