"""timm and Hugging Face transformers weights in mvit3, proven against the real libraries.

Every mapped model: random weights in the peer's own model (BatchNorm statistics and the
zero-initialised heads randomised too), mapped into mvit3, give the peer's fp32 logits within
1e-5 relative at 256 px and at 224 px (odd 7x7 maps in layer_5).

Where a peer differs from the official code, mvit3 follows the official code and the test names
the difference: transformers' MobileViTV2 does not resize odd maps (its F.unfold drops the last
row and column of a 7x7 map and F.fold leaves them zero), where the official v2 block resizes
them bilinearly (align_corners=True) to 8x8 before the block. At 224 px the transformers V2
forward is therefore compared with that one rule patched to the official one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mvit3
import mvit3.fast
from mvit3.checkpoint import CheckpointError
from mvit3.interop import from_module

import model_utils

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5  # relative: max |difference| / max |logit|

# transformers configurations of the official models (those of the apple/* hub checkpoints)
HF_V1 = {
    "mobilevit_xxs": dict(neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], hidden_sizes=[64, 80, 96],
                          expand_ratio=2.0),
    "mobilevit_xs": dict(neck_hidden_sizes=[16, 32, 48, 64, 80, 96, 384], hidden_sizes=[96, 120, 144]),
    "mobilevit_s": dict(neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640], hidden_sizes=[144, 192, 240]),
}
HF_V2 = {"mobilevitv2_050": 0.5, "mobilevitv2_075": 0.75, "mobilevitv2_100": 1.0}
TIMM = ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s", "mobilevitv2_050", "mobilevitv2_075",
        "mobilevitv2_100"]


def peer_model(peer: str, name: str, seed: int = 0) -> torch.nn.Module:
    """The peer library's model of mvit3's `name`, with random weights, in eval mode.

    Built on the meta device and materialised uninitialised (the libraries' own initialisation
    is most of the build time): `randomize_` then writes every parameter and BN statistic.
    """
    with torch.device("meta"):
        if peer == "timm":
            model = timm.create_model(name, pretrained=False)
        elif name in HF_V1:
            model = transformers.MobileViTForImageClassification(
                transformers.MobileViTConfig(num_labels=1000, **HF_V1[name]))
        else:
            model = transformers.MobileViTV2ForImageClassification(
                transformers.MobileViTV2Config(num_labels=1000, width_multiplier=HF_V2[name]))
    model = model.to_empty(device="cpu")
    for buffer_name, buffer in model.named_buffers():
        if buffer_name.endswith("num_batches_tracked"):  # the only other buffers; unused in eval
            buffer.zero_()
    return model_utils.randomize_(model, seed=seed).eval()


def peer_logits(model, x) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out  # transformers returns an output object


def relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def official_odd_resize(hf_v2_model):
    """Forward pre-hooks giving transformers' MobileViTV2 layers the official odd-map rule: the
    block input [B, C, H, W] resized to even H and W (bilinear, align_corners=True) before its
    local convolutions, the larger size kept. Returns the hook handles."""

    def to_even(_module, args):
        x = args[0]
        h, w = x.shape[-2:]
        if h % 2 == 0 and w % 2 == 0:
            return None
        return (F.interpolate(x, size=(h + h % 2, w + w % 2), mode="bilinear", align_corners=True),)

    layers = hf_v2_model.mobilevitv2.encoder.layer
    return [layer.conv_kxk.register_forward_pre_hook(to_even) for layer in layers
            if hasattr(layer, "conv_kxk")]


CASES = [("timm", name) for name in TIMM] + [("transformers", name) for name in [*HF_V1, *HF_V2]]


@pytest.mark.parametrize("peer,name", CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_mapped_weights_give_the_peers_logits(peer, name):
    model = peer_model(peer, name)
    ours = from_module(model)
    assert ours.cfg.name == name and not ours.training
    hooks = official_odd_resize(model) if peer == "transformers" and name in HF_V2 else []
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for size in (256, 224):
            x = torch.rand(1, 3, size, size, generator=gen)
            err = relative_error(ours(x), peer_logits(model, x))
            assert err < TOLERANCE, f"{peer} {name} at {size} px: relative error {err:.2e}"
    for hook in hooks:
        hook.remove()


def test_transformers_v2_odd_maps_differ_from_the_official_rule():
    """Without the patch, transformers' V2 at 224 px (7x7 in layer_5) is not the official
    model: its unfold drops row and column 7 instead of resizing to 8x8."""
    model = peer_model("transformers", "mobilevitv2_050")
    ours = from_module(model)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(ours(x), peer_logits(model, x)) > 1e-2


@pytest.fixture(scope="module")
def timm_v2():
    model = peer_model("timm", "mobilevitv2_050", seed=5)
    return model, from_module(model)


@pytest.fixture(scope="module")
def hf_v1():
    model = peer_model("transformers", "mobilevit_xxs", seed=6)
    return model, from_module(model)


def assert_same_weights(model, reference):
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_peer_files_load_through_create_model(timm_v2, hf_v1, tmp_path, suffix):
    from safetensors.torch import save_file

    for peer, reference in (timm_v2, hf_v1):
        path = tmp_path / f"weights{suffix}"
        if suffix == ".safetensors" and peer is hf_v1[0]:
            peer.save_pretrained(tmp_path / "hf")  # the file a hub download holds
            path = tmp_path / "hf" / "model.safetensors"
        elif suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, path)
        else:
            torch.save(peer.state_dict(), path)
        model = mvit3.create_model(reference.cfg.name, checkpoint_path=str(path))
        assert_same_weights(model, reference)


def test_load_result_names_the_layout_and_num_batches_tracked_is_optional(hf_v1):
    peer, reference = hf_v1
    state_dict = {k: v for k, v in peer.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = mvit3.create_model("mobilevit_xxs")
    result = mvit3.load_checkpoint(model, state_dict)
    assert result.layout == "transformers MobileViT"
    assert not (result.missing or result.unexpected or result.mismatched)
    assert_same_weights(model, reference)


def test_a_peer_file_of_another_model_names_the_layout_and_the_model_it_fits(timm_v2):
    peer, _ = timm_v2
    with pytest.raises(CheckpointError) as err:
        mvit3.load_checkpoint(mvit3.create_model("mobilevit_xs"), peer.state_dict())
    message = str(err.value)
    assert "looks like the timm layout" in message and "does not fit mobilevit_xs" in message
    assert "it fits mobilevitv2_050" in message
    assert "stages.2.1.transformer.0.attn.qkv_proj.weight" in err.value.unexpected


def test_missing_and_unexpected_peer_keys_are_named_in_the_files_names(hf_v1):
    peer, _ = hf_v1
    state_dict = dict(peer.state_dict())
    del state_dict["mobilevit.encoder.layer.2.transformer.layer.0.attention.attention.key.bias"]
    state_dict["mobilevit.encoder.layer.9.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        mvit3.load_checkpoint(mvit3.create_model("mobilevit_xxs"), state_dict)
    message = str(err.value)
    assert "transformers MobileViT layout" in message
    # the concatenated qkv is named by its three sources
    assert ("missing keys (1): mobilevit.encoder.layer.2.transformer.layer.0.attention.attention."
            "query.bias+mobilevit.encoder.layer.2.transformer.layer.0.attention.attention.key.bias+") in message
    assert "unexpected keys (1): mobilevit.encoder.layer.9.extra.weight" in message


def test_a_peer_layout_without_a_mapping_for_the_model_is_refused(hf_v1):
    peer, _ = hf_v1
    with pytest.raises(CheckpointError, match="maps only v1 models, not mobilevitv3_xs; it fits mobilevit_xxs"):
        mvit3.load_checkpoint(mvit3.create_model("mobilevitv3_xs"), peer.state_dict())


def test_other_num_classes_and_the_head(timm_v2):
    peer, reference = timm_v2
    model = mvit3.create_model("mobilevitv2_050", num_classes=10)
    with pytest.raises(CheckpointError, match=r"head\.fc\.weight \(checkpoint \[1000, 256\], model \[10, 256\]\)"):
        mvit3.load_checkpoint(model, peer.state_dict())
    result = mvit3.load_checkpoint(model, peer.state_dict(), ignore_head=True)
    assert result.skipped_head == ["classifier.1.bias", "classifier.1.weight"]
    assert torch.equal(model.conv_1.conv.weight, reference.conv_1.conv.weight)


def test_fast_convert_takes_a_peer_module(hf_v1):
    peer, _ = hf_v1
    fast = mvit3.fast.convert(peer, backend="torch")
    assert isinstance(fast, mvit3.fast.FastMobileViT) and fast.cfg.name == "mobilevit_xxs"
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(fast(x), peer_logits(peer, x)) < TOLERANCE
    with pytest.raises(TypeError, match="timm / transformers MobileViT"):
        mvit3.fast.convert(torch.nn.Linear(2, 2))
