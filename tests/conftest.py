"""Test set-up shared by every test module.

Without a CUDA device the Triton kernels are tested in the interpreter on CPU tensors:
TRITON_INTERPRET=1 must be set before triton is first imported, which is why it happens here.
On a GPU machine the interpreter stays off and the same checks run on the GPU (marked `gpu`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

# The devices kernel tests run on: the interpreter on CPU tensors (CI), or the GPU.
KERNEL_DEVICES = [
    pytest.param("cpu", id="interp", marks=pytest.mark.skipif(
        not INTERPRET, reason="TRITON_INTERPRET is off (a GPU is present: the gpu tests cover it)")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA device")]),
]


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """MVIT3_BACKEND would turn every test's explicit backend into another one, silently:
    the tests run without it (a test of the override sets it itself)."""
    monkeypatch.delenv("MVIT3_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 means IEEE fp32 in the tests: TF32 off, whatever the machine's default."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# ---- options for a GPU run on a time budget (`python -m mvit3 gpu-report`) --------------------
# The first GPU minutes should prove the most: whole models on both backends before the op grids.
GPU_PRIORITY_MODELS = ("mobilevitv3_xs", "mobilevitv3_050", "mobilevit_xs", "mobilevitv2_050")
_results_log_path = None  # --results-log


def pytest_addoption(parser):
    parser.addoption("--gpu-priority", action="store_true",
                     help="run the tests in order of evidence per minute: the fp32 whole-model "
                          "checks of v3-XS, v3-0.5, v1-XS and v2-0.5 first, torch.compile last")
    parser.addoption("--results-log", metavar="PATH",
                     help="append each test's outcome to this JSON-lines file as soon as it is "
                          "known, so that a run killed at its timeout leaves its results")


def _gpu_priority(item) -> int:
    name = item.name.split("[")[0]
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if name == "test_gpu_fast_models_match_the_reference":
        named = params["name"] in GPU_PRIORITY_MODELS and params["size"] == 256
        return (0 if params["dtype"] == torch.float32 else 2) if named else 6
    if name == "test_gpu_cuda_graph_capture_and_replay":
        return 1
    if name == "test_gpu_compile_max_autotune_fullgraph":
        return 7  # minutes of autotuning
    module = item.module.__name__
    if module.startswith("test_kernel_") or module == "test_ops_library":
        return 3
    return 4 if module == "test_cuda_ops" else 5


def pytest_configure(config):
    global _results_log_path
    # Under pytest-xdist every report reaches the controller too: only it writes the log.
    is_xdist_worker = hasattr(config, "workerinput")
    _results_log_path = None if is_xdist_worker else config.getoption("--results-log")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu-priority"):
        items.sort(key=_gpu_priority)  # stable: each group keeps its file order


def pytest_runtest_logreport(report):
    """With --results-log: one line per test, {"test", "outcome", "time_s", "message"}, written
    when its outcome is known (a failed or skipped setup, the call, or a failed teardown)."""
    import json

    path = _results_log_path
    if path is None or (report.when != "call" and report.passed):
        return
    outcome = report.outcome if report.when == "call" else ("skipped" if report.skipped else "error")
    with open(path, "a") as log:
        log.write(json.dumps({"test": report.nodeid, "outcome": outcome,
                              "time_s": round(report.duration, 3),
                              "message": None if report.passed else _first_line(report)}) + "\n")


def _first_line(report):
    """The skip reason, or the exception line of a failure ("AssertionError: ...")."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        text = longrepr[2]
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else report.longreprtext
    lines = str(text).strip().splitlines()
    return lines[0] if lines else None
