"""Loading official checkpoints: every supported layout and every error path."""

from __future__ import annotations

import collections
import re

import pytest
import torch

import mvit3
from mvit3.checkpoint import CheckpointError, read_state_dict

import model_utils


@pytest.fixture(scope="module")
def official():
    """A v3-XXS with random weights and its state_dict in the official layout."""
    model = model_utils.randomize_(mvit3.create_model("mobilevitv3_xxs"), seed=3)
    return model, model.state_dict()


def _assert_loaded(model, state_dict):
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state_dict.items())


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "model_state_dict", "module.",
                                    "encoder.", "state_dict+module.encoder."])
def test_every_layout_loads_from_a_file(official, tmp_path, layout):
    _, sd = official
    if layout == "state_dict+module.encoder.":
        payload = {"state_dict": {"module.encoder." + k: v for k, v in sd.items()}, "epoch": 300}
    elif layout.endswith("."):
        payload = {layout + k: v for k, v in sd.items()}
    elif layout == "bare":
        payload = sd
    else:
        payload = {layout: sd, "best_metric": 70.98, "optim_state_dict": {"lr": torch.tensor(0.1)}}
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    model = mvit3.create_model("mobilevitv3_xxs")
    result = mvit3.load_checkpoint(model, path)
    assert not (result.missing or result.unexpected or result.mismatched)
    _assert_loaded(model, sd)


def test_load_from_a_dict_and_through_create_model(official, tmp_path):
    _, sd = official
    model = mvit3.create_model("mobilevitv3_xxs")
    mvit3.load_checkpoint(model, collections.OrderedDict(sd))
    _assert_loaded(model, sd)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    _assert_loaded(mvit3.create_model("mobilevitv3_xxs", checkpoint_path=str(path)), sd)


def test_missing_unexpected_and_misshaped_keys_are_named_in_one_error(official):
    _, sd = official
    bad = dict(sd)
    del bad["layer_3.1.fusion.block.conv.weight"]
    bad["layer_9.weight"] = torch.zeros(3)
    bad["conv_1.block.norm.bias"] = torch.zeros(17)
    model = mvit3.create_model("mobilevitv3_xxs")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        mvit3.load_checkpoint(model, bad)
    message = str(err.value)
    assert "missing keys (1): layer_3.1.fusion.block.conv.weight" in message
    assert "unexpected keys (1): layer_9.weight" in message
    assert re.search(r"conv_1\.block\.norm\.bias \(checkpoint \[17\], model \[16\]\)", message)
    # strict loading is all or nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_strict_loads_what_fits_and_reports_the_rest(official):
    _, sd = official
    bad = dict(sd)
    bad["conv_1.block.norm.bias"] = torch.zeros(17)
    del bad["classifier.fc.bias"]
    model = mvit3.create_model("mobilevitv3_xxs")
    result = mvit3.load_checkpoint(model, bad, strict=False)
    assert result.missing == ["classifier.fc.bias"]
    assert result.mismatched == [("conv_1.block.norm.bias", (17,), (16,))]
    assert torch.equal(model.state_dict()["layer_5.1.fusion.block.conv.weight"],
                       sd["layer_5.1.fusion.block.conv.weight"])


def test_long_key_lists_are_capped_and_a_foreign_prefix_is_pointed_out(official):
    _, sd = official
    with pytest.raises(CheckpointError) as err:
        mvit3.load_checkpoint(mvit3.create_model("mobilevitv3_xxs"), {"backbone." + k: v for k, v in sd.items()})
    message = str(err.value)
    assert "missing keys (311): conv_1.block.conv.weight" in message and "(and 291 more)" in message
    assert "every unexpected key starts with 'backbone.'" in message
    assert len(err.value.missing) == 311 and len(err.value.unexpected) == 311  # all names kept


def test_a_wrong_family_is_refused(official):
    _, sd = official
    with pytest.raises(CheckpointError, match="does not fit mobilevitv3_xs"):
        mvit3.load_checkpoint(mvit3.create_model("mobilevitv3_xs"), sd)


def test_other_num_classes_loads_everything_but_the_head_when_asked(official, tmp_path):
    _, sd = official
    model = mvit3.create_model("mobilevitv3_xxs", num_classes=10)
    with pytest.raises(CheckpointError, match=r"classifier\.fc\.weight \(checkpoint \[1000, 512\], model \[10, 512\]\)"):
        mvit3.load_checkpoint(model, sd)
    result = mvit3.load_checkpoint(model, sd, ignore_head=True)
    assert result.skipped_head == ["classifier.fc.bias", "classifier.fc.weight"]
    assert model.state_dict()["classifier.fc.weight"].shape == (10, 512)
    _assert_loaded(model, {k: v for k, v in sd.items() if not k.startswith("classifier")})
    # create_model does it by itself when the requested num_classes differs
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    model = mvit3.create_model("mobilevitv3_xxs", num_classes=10, checkpoint_path=str(path))
    assert torch.equal(model.state_dict()["conv_1.block.conv.weight"], sd["conv_1.block.conv.weight"])


class Payload:
    """Not a tensor container: unpickling it would mean running this module's code."""

    def __reduce__(self):
        return (print, ("a checkpoint must never run code",))


def test_a_checkpoint_never_runs_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(path)
    assert "must never run code" not in capsys.readouterr().out


def test_file_and_content_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="must hold a dict"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="no state_dict found"):
        read_state_dict({"epoch": 3, "config": {"lr": 0.1}})
    with pytest.raises(ValueError, match="ignore_head"):
        mvit3.load_checkpoint(mvit3.create_model("mobilevitv3_xxs"), {"a": torch.zeros(1)}, ignore_head="yes")


def test_fp32_checkpoint_into_a_float64_model(official):
    _, sd = official
    model = mvit3.create_model("mobilevitv3_xxs").double()
    mvit3.load_checkpoint(model, sd)
    assert model.state_dict()["conv_1.block.conv.weight"].dtype == torch.float64
    assert torch.equal(model.state_dict()["conv_1.block.conv.weight"].float(), sd["conv_1.block.conv.weight"])
