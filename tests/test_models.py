"""The reference zoo: registry, parameter and MAC counts, state_dict layout, exactness, shapes,
training, bad input."""

from __future__ import annotations

import pytest
import torch

import mvit3
from mvit3.models import MobileViT, get_config

import model_utils
import oracle

# name: (official parameter count, cvnets-profiler MACs (M), torch-counted MACs (M)) at 256 px,
# from the reference spec, sections 5 and 6 (read off the official code).
OFFICIAL = {
    "mobilevitv3_xxs": (1_249_448, 289.0, 332.2),
    "mobilevitv3_xs": (2_490_360, 927.0, 966.6),
    "mobilevitv3_s": (5_763_912, 1841.4, 1832.7),
    "mobilevitv3_xxs_l2": (1_145_288, 256.0, 300.7),
    "mobilevitv3_xs_l2": (2_257_320, 852.8, 899.8),
    "mobilevitv3_s_l2": (5_169_864, 1652.0, 1669.1),
    "mobilevitv3_050": (1_429_985, 481.3, 479.8),
    "mobilevitv3_075": (2_999_641, 1064.5, 1062.2),
    "mobilevitv3_100": (5_139_409, 1876.0, 1872.9),
    "mobilevit_xxs": (1_272_024, 364.2, 407.4),
    "mobilevit_xs": (2_317_848, 986.3, 1025.9),
    "mobilevit_s": (5_578_632, 2009.5, 2000.8),
    "mobilevitv2_050": (1_370_593, 466.1, 464.6),
    "mobilevitv2_075": (2_866_009, 1030.3, 1028.0),
    "mobilevitv2_100": (4_901_841, 1815.1, 1812.1),
}
NAMES = list(OFFICIAL)


def test_registry_lists_exactly_the_15_models():
    assert mvit3.list_models() == NAMES
    assert mvit3.list_models("mobilevitv3_*_l2") == ["mobilevitv3_xxs_l2", "mobilevitv3_xs_l2",
                                                     "mobilevitv3_s_l2"]


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'mobilevitv3_m'.*Registered"):
        mvit3.create_model("mobilevitv3_m")


@pytest.mark.parametrize("name", NAMES)
def test_params_and_macs_match_the_official_counts(name):
    params, macs_paper, macs_torch = OFFICIAL[name]
    stats = mvit3.model_stats(name, img_size=256)
    assert stats["params"] == params
    # The spec prints MACs rounded to 0.1 M; 0.5% is the bound, we hold 0.05 M.
    assert abs(stats["macs_cvnets"] / 1e6 - macs_paper) <= 0.05 + 1e-9
    assert abs(stats["macs"] / 1e6 - macs_torch) <= 0.05 + 1e-9


def test_paper_flop_reductions_of_the_l2_variants():
    # Table 5: 30%, 13.5% and 17.82% fewer FLOPs for the 2-block variants than v1 / v3.
    v1 = mvit3.model_stats("mobilevit_xxs")["macs_cvnets"]
    l2 = mvit3.model_stats("mobilevitv3_xxs_l2")["macs_cvnets"]
    assert round(100 * (1 - l2 / v1)) == 30


def test_model_stats_leaves_the_model_untouched_and_counts_its_head():
    model = mvit3.create_model("mobilevitv3_xxs", num_classes=10).train()
    stats = mvit3.model_stats(model)
    assert model.training and next(model.parameters()).device.type == "cpu"
    assert stats["params"] == OFFICIAL["mobilevitv3_xxs"][0] - 1000 * 513 + 10 * 513


def _official_keys(name: str) -> list:
    cfg = get_config(name)
    path = __import__("pathlib").Path(__file__).parent / "data" / "keys" / f"{cfg.official_name}.txt"
    return [tuple(line.split("\t")) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_shapes_and_dtypes_equal_the_official_ones(name):
    model = mvit3.create_model(name)
    ours = [(k, str(tuple(v.shape)), str(v.dtype)) for k, v in model.state_dict().items()]
    assert ours == _official_keys(name)


@pytest.mark.parametrize("name", NAMES)
def test_float64_logits_equal_the_official_forward(name, tmp_path):
    """Through an official-layout checkpoint file, at 224, 256 and 320 px (and an odd size)."""
    source = model_utils.randomize_(mvit3.create_model(name)).double()
    path = tmp_path / "checkpoint_ema_best.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = mvit3.create_model(name).double().eval()
    mvit3.load_checkpoint(model, path)
    sd = source.state_dict()
    for size in (224, 256, 320, 97):
        x = torch.rand(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            ours, official = model(x), oracle.forward(sd, model.cfg, x)
        assert ours.shape == (2, 1000)
        assert torch.allclose(ours, official, rtol=0, atol=1e-9 * max(1.0, official.abs().max().item()))


@pytest.mark.parametrize("name", ["mobilevitv3_xs", "mobilevitv3_050"])
def test_the_exactness_check_can_fail(name):
    """A small change deep in the network (one channel of the last transformer FFN bias) moves
    the logits by far more than the 1e-9 the exactness test allows: that test is sensitive.
    (A shift of every channel would not do: the final LayerNorm/GroupNorm removes it.)"""
    model = model_utils.randomize_(mvit3.create_model(name)).double().eval()
    sd = dict(model.state_dict())
    key = [k for k in sd if k.startswith("layer_5.1.global_rep.2.pre_norm_ffn") and k.endswith("bias")][-1]
    sd[key] = sd[key].clone()
    sd[key][0] += 1e-3
    x = torch.rand(1, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        assert (model(x) - oracle.forward(sd, model.cfg, x)).abs().max() > 1e-7


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [160, 192, 224, 256, 288, 320])
def test_output_shapes(name, size):
    model = mvit3.create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, 7)


@pytest.mark.parametrize("name", ["mobilevitv3_xs", "mobilevitv3_050", "mobilevit_xxs", "mobilevitv2_050"])
@pytest.mark.parametrize("size", [(32, 32), (33, 47), (97, 97), (200, 200), (255, 129)])
def test_odd_sizes_follow_each_familys_resize_rule(name, size):
    model = mvit3.create_model(name).eval()
    with torch.no_grad():
        features = model.forward_features(torch.rand(2, 3, *size))
    h, w = size
    for _ in range(5):
        h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 convs give ceil(H / 2)
    if model.cfg.style == "v2":
        # v2-style blocks round odd maps up to even (align_corners=True) and keep them;
        # only layer_5's block sees the final size, so the output is even-sized
        h, w = h + h % 2, w + w % 2
    assert features.shape == (2, model.num_features, h, w)


def test_224_layer5_map_is_7x7_for_v1_style_and_8x8_for_v2_style():
    with torch.no_grad():
        v1 = mvit3.create_model("mobilevitv3_xs").eval().forward_features(torch.rand(1, 3, 224, 224))
        v2 = mvit3.create_model("mobilevitv3_050").eval().forward_features(torch.rand(1, 3, 224, 224))
    assert v1.shape[-2:] == (7, 7) and v2.shape[-2:] == (8, 8)


def test_forward_features_head_and_reset_classifier():
    model = mvit3.create_model("mobilevitv3_xxs").eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 512, 4, 4)
        assert torch.equal(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, 512)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    assert "classifier.fc.weight" in model.state_dict()
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    v2 = mvit3.create_model("mobilevitv2_050")
    v2.reset_classifier(3)
    assert v2.state_dict()["classifier.1.weight"].shape == (3, 256)


def test_in_chans():
    model = mvit3.create_model("mobilevitv3_xxs", in_chans=1).eval()
    assert model.state_dict()["conv_1.block.conv.weight"].shape == (16, 1, 3, 3)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["mobilevitv3_xxs", "mobilevitv3_050", "mobilevit_xxs", "mobilevitv2_050"])
def test_train_mode_forward_and_backward(name):
    model = mvit3.create_model(name, num_classes=10).train()
    x = torch.rand(2, 3, 96, 96, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0
    # BN running statistics moved: the model really trained
    assert model.state_dict()["conv_1.block.norm.num_batches_tracked"] == 1


def test_dropout_rates_of_the_official_yamls():
    xxs, xs, v2 = (mvit3.create_model(n) for n in ("mobilevitv3_xxs", "mobilevitv3_xs", "mobilevitv2_050"))
    assert xxs.classifier.dropout.p == 0.1
    assert xxs.layer_3[1].global_rep[0].pre_norm_mha[2].p == 0.05
    assert xs.layer_3[1].global_rep[0].pre_norm_mha[2].p == 0.1
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in v2.modules())


@pytest.mark.parametrize("bad, error, message", [
    (torch.rand(3, 224, 224), ValueError, r"4-D input \[B, 3, H, W\], got shape \(3, 224, 224\)"),
    (torch.rand(1, 4, 224, 224), ValueError, r"expected 3 input channels"),
    (torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8), TypeError, r"floating-point input.*torch.uint8"),
    (torch.rand(1, 3, 31, 224), ValueError, r"input 31x224 is too small.*at least 32"),
    (torch.rand(0, 3, 64, 64), ValueError, r"batch size 0"),
    ([[0.0]], TypeError, r"expected a torch.Tensor"),
])
def test_bad_input_is_a_clear_error(bad, error, message):
    model = mvit3.create_model("mobilevitv3_xxs").eval()
    with pytest.raises(error, match=message):
        model(bad)


def test_preprocessing_facts_travel_with_the_model():
    v1_style = mvit3.create_model("mobilevitv3_xs").preprocess
    v2_style = mvit3.create_model("mobilevitv3_050").preprocess
    assert (v1_style.channel_order, v1_style.interpolation) == ("BGR", "bilinear")
    assert (v2_style.channel_order, v2_style.interpolation) == ("RGB", "bicubic")
    for cfg in (v1_style, v2_style):
        assert (cfg.resize, cfg.crop, cfg.scale, cfg.mean, cfg.std) == (288, 256, 1 / 255, None, None)


def test_models_are_plain_modules():
    assert isinstance(mvit3.create_model("mobilevitv3_s"), MobileViT)
