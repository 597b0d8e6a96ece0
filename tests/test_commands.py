"""`python -m mvit3 predict | eval | export` on CPU: tiny generated images, random weights whose
classifier bias fixes the ranking of the classes, so the expected answers are known."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import mvit3
from mvit3.__main__ import main
from mvit3.command_utils import imagenet_classes
from mvit3.evaluate import ImageFolder, shard
from mvit3.preprocess import preprocess

PIL = pytest.importorskip("PIL.Image")

MODEL = "mobilevitv2_050"  # the cheapest model
# classifier bias: class 1 first, class 0 second, class 2 last; the image terms of the logits
# are O(1), so the ranking of these three is the bias's whatever the image
BIAS = {1: 100.0, 0: 90.0, 2: -100.0}
# (class folder, width, height): 5 images, an odd count so that 2 shards are uneven
IMAGES = [("a", 300, 260), ("a", 260, 300), ("b", 320, 320), ("c", 290, 270), ("c", 400, 288)]
# with BIAS: top-1 is always class 1 ("b"); top-5 holds classes 1 and 0 but never 2 ("c")
EXPECTED_TOP1, EXPECTED_TOP5 = 1 / 5, 3 / 5


@pytest.fixture
def mvit3_command(capsys, monkeypatch):
    """Run `python -m mvit3 ARGS` in this process (no interpreter start-up per call) in `cwd`;
    returns (exit status, stdout, stderr)."""

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An ImageFolder of random images and a checkpoint with the ranking bias."""
    root = tmp_path_factory.mktemp("commands")
    rng = np.random.default_rng(0)
    for index, (folder, width, height) in enumerate(IMAGES):
        os.makedirs(root / "data" / folder, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        PIL.fromarray(pixels).save(root / "data" / folder / f"{index}.png")
    model = mvit3.create_model(MODEL)
    with torch.no_grad():
        for index, value in BIAS.items():
            model.head.bias[index] = value
    torch.save(model.state_dict(), root / "weights.pt")
    return root


def test_class_names_are_the_1000_imagenet_classes():
    names = imagenet_classes()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"


def test_predict_gives_the_top5_and_names_the_files_it_cannot_read(workspace, mvit3_command):
    (workspace / "broken.jpg").write_text("not an image")
    good = str(workspace / "data" / "b" / "2.png")
    status, out, err = mvit3_command("predict", good, "broken.jpg", "missing.png", "--model", MODEL,
                                     "--checkpoint", "weights.pt", "--json", cwd=workspace)
    assert status == 1  # some files failed, the others were classified
    assert "cannot read image 'broken.jpg'" in err and "image file not found: 'missing.png'" in err
    rows = json.loads(out)
    assert [row["image"] for row in rows] == [good, "broken.jpg", "missing.png"]
    top = rows[0]["top"]
    assert [(t["index"], t["label"]) for t in top[:2]] == [(1, "goldfish"), (0, "tench")]
    assert len(top) == 5 and "error" in rows[1] and "error" in rows[2]
    # the probabilities are the model's own softmax on the model's own preprocessing
    model = mvit3.create_model(MODEL, checkpoint_path=str(workspace / "weights.pt")).eval()
    with torch.no_grad():
        probabilities = model(preprocess(np.array(PIL.open(good).convert("RGB")), model)).softmax(-1)[0]
    assert [t["probability"] for t in top] == pytest.approx(probabilities.topk(5).values.tolist(), rel=1e-5)


def test_predict_text_output(workspace, mvit3_command):
    status, out, err = mvit3_command("predict", "data/a/0.png", "--model", MODEL, "--checkpoint",
                                     "weights.pt", cwd=workspace)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "data/a/0.png" and len(lines) == 6
    # probabilities right-aligned in 7 columns after a 2-space indent; the bias puts goldfish
    # ~e^10 times above tench, give or take the O(1) image terms of a randomly initialised model
    assert re.fullmatch(r"(   99\.9\d|  100\.00)%  goldfish \(1\)", lines[1])
    assert re.fullmatch(r"    0\.0\d%  tench \(0\)", lines[2])


@pytest.mark.parametrize("count,world", [(5, 2), (7, 3), (1, 2), (8, 4), (6, 1)])
def test_shards_cover_every_image_once(count, world):
    dataset = list(range(count))
    shards = [shard(dataset, rank, world) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == dataset


def test_eval_single_process_with_the_reference_comparison(workspace, mvit3_command):
    status, printed, err = mvit3_command("eval", "--data", "data", "--model", MODEL, "--checkpoint", "weights.pt",
                                       "--backend", "torch", "--compare-reference", "--batch-size", "8",
                                       "--workers", "0", "--device", "cpu", "--json", "one.json", cwd=workspace)
    assert status == 0, err
    assert "eval mobilevitv2_050" in err  # the tqdm bar
    assert "top-1 20.00%" in printed and "paper (Table 2): top-1 70.18%" in printed
    out = json.loads((workspace / "one.json").read_text())
    assert out["images"] == 5 and out["classes"] == 3 and out["processes"] == 1
    assert out["top1"] == pytest.approx(EXPECTED_TOP1) and out["top5"] == pytest.approx(EXPECTED_TOP5)
    assert out["top1_agreement_with_reference"] == 1.0 and out["images_per_second"] > 0
    assert out["paper"] == {"table": "Table 2", "value": pytest.approx(0.7018), "note": "",
                            "measured_minus_paper": pytest.approx(EXPECTED_TOP1 - 0.7018)}


def test_eval_under_torchrun_counts_each_image_once(workspace):
    """2 gloo processes on 5 images: DistributedSampler would give each 3 (image 0 twice)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "mvit3", "eval",
               "--data", "data", "--model", MODEL, "--checkpoint", "weights.pt", "--batch-size", "8",
               "--workers", "0", "--device", "cpu", "--json", "two.json"]
    # gloo on the loopback interface: no dependence on how this machine's hostname resolves
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(command, capture_output=True, text=True, cwd=workspace, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((workspace / "two.json").read_text())
    assert out["images"] == 5 and out["processes"] == 2
    assert out["top1"] == pytest.approx(EXPECTED_TOP1) and out["top5"] == pytest.approx(EXPECTED_TOP5)


def test_eval_input_of_a_v1_style_model_is_opencvs(tmp_path):
    """A JPEG through the eval dataset equals cvnets v0.1's input: cv2.imread (BGR), cv2.resize
    of the shorter side to 288, floored centre crop, /255. (The path is passed on, so the file
    is decoded by OpenCV; this machine's OpenCV and Pillow decode JPEGs alike, so the test
    checks the pipeline, not which decoder ran.)"""
    cv2 = pytest.importorskip("cv2")
    os.makedirs(tmp_path / "cls")
    pixels = np.random.default_rng(3).integers(0, 256, (301, 333, 3), dtype=np.uint8)
    PIL.fromarray(pixels).save(tmp_path / "cls" / "x.jpg", quality=80)
    x, label = ImageFolder(str(tmp_path), mvit3.create_model("mobilevit_xxs"))[0]
    official = cv2.resize(cv2.imread(str(tmp_path / "cls" / "x.jpg")), (int(288 * 333 / 301), 288),
                          interpolation=cv2.INTER_LINEAR)
    top, left = (288 - 256) // 2, (official.shape[1] - 256) // 2
    official = official[top:top + 256, left:left + 256]
    assert label == 0 and torch.equal(x, torch.from_numpy(official).permute(2, 0, 1).float() / 255)


def test_eval_refuses_bad_input(workspace, tmp_path, mvit3_command):
    status, _, err = mvit3_command("eval", "--data", "data", "--model", MODEL, "--checkpoint", "weights.pt",
                                   "--compare-reference", cwd=workspace)
    assert status == 2 and "give a fast --backend" in err
    with pytest.raises(FileNotFoundError, match="holds no class folder with images"):
        ImageFolder(str(tmp_path), mvit3.create_model(MODEL))


ONNX_CASES = [("mobilevit_xxs", "1"), ("mobilevitv2_050", "dynamic"), ("mobilevitv3_xxs", "1")]


@pytest.mark.parametrize("name,batch", ONNX_CASES, ids=[n for n, _ in ONNX_CASES])
def test_export_onnx_runs_in_onnxruntime(tmp_path, name, batch, mvit3_command):
    """One model per family at 224 px, where layer_5's 7x7 map needs a Resize: its sizes must
    be constants of the graph, also with a dynamic batch."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from mvit3.export import resize_problems

    model = mvit3.create_model(name).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for buffer in model.buffers():  # BN statistics away from (0, 1)
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "m.onnx"
    status, _, err = mvit3_command("export", "--format", "onnx", "--model", name, "--checkpoint", "w.pt",
                                   "--size", "224", "--batch", batch, "--out", "m.onnx", "--no-check",
                                   cwd=tmp_path)
    assert status == 0, err[-3000:]
    onnx_model = onnx.load(out)
    assert not resize_problems(onnx_model)
    assert any(node.op_type == "Resize" for node in onnx_model.graph.node)  # the odd map was there
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(2 if batch == "dynamic" else 1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ours = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


def test_export_refuses_the_fast_model_and_bad_arguments_with_a_reason(tmp_path, mvit3_command):
    status, _, err = mvit3_command("export", "--format", "onnx", "--model", MODEL, "--fast", "--out",
                                   "x.onnx", cwd=tmp_path)
    assert status == 2 and "custom torch.library ops" in err
    for flag, value, reason in (("--batch", "0", "positive integer or 'dynamic'"), ("--size", "16", "at least 32"),
                                ("--opset", "17", "at least 18")):
        status, _, err = mvit3_command("export", "--format", "onnx", "--model", MODEL, flag, value,
                                       "--out", "x.onnx", cwd=tmp_path)
        assert status == 2 and reason in err
    assert not (tmp_path / "x.onnx").exists()
