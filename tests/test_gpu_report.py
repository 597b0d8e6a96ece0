"""`python -m mvit3 gpu-report` without a GPU: the budget logic, the step runner (timeouts kill
whole process groups), result parsing, the summary from a stored report, the no-GPU exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench_synthetic import GPU_ENV, synthetic_result

from mvit3.__main__ import main
from mvit3.bench import gpu_report
from mvit3.bench.gpu_report import (STEPS, Budget, Report, Step, first_error_line, gpu_arch,
                                    parse_results_log, render_summary, run_command)


HERE = Path(__file__).resolve().parent


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the budget ----------------------------------------------------------------------------

def test_budget_gives_each_step_its_share_within_its_bounds():
    clock = FakeClock()
    budget = Budget(540, clock=clock, reserve_s=15)
    step = Step("x", "x", min_s=30, max_s=240, share=0.4)
    assert budget.left() == 525
    assert budget.timeout_for(step) == pytest.approx(0.4 * 525)  # the share
    assert budget.timeout_for(Step("y", "y", 5, 60, 1.0)) == 60  # the cap
    clock.now += 450  # 75 s left: the share (30) is below the minimum
    assert budget.timeout_for(step) == 30
    clock.now += 50  # 25 s left: less than the minimum, the step is not started
    assert budget.timeout_for(step) is None
    assert budget.elapsed() == 500


def test_report_runs_steps_in_priority_order_and_skips_what_no_longer_fits(tmp_path, monkeypatch):
    """Steps take fake time; once the budget runs short the later ones are skipped, with why."""
    clock = FakeClock()
    durations = {"env": 5, "build": 100, "tests": 150, "bench_fp32": 200, "bench_fp16": 60,
                 "micro": 60}
    seen = []

    def fake_step(name):
        def step(self, timeout_s):
            seen.append((name, round(timeout_s)))
            clock.now += min(durations[name], timeout_s)
            if durations[name] > timeout_s:
                return "timeout", {"first_error": f"{name} ran past {timeout_s:.0f} s"}
            return "ok", {}
        return step

    for step in STEPS:
        monkeypatch.setattr(Report, f"step_{step.name}", fake_step(step.name))
    with open(tmp_path / "log.txt", "a") as log:
        report = Report(tmp_path, Budget(540, clock=clock), ("mobilevitv3_xxs",), ("tests",), log)
        rc = report.run()
    # env 5 s; build gets 0.4 * 520 = 208 s and uses 100; tests skipped by request; bench_fp32
    # gets min(600, 0.6 * 420) = 252 and uses 200; bench_fp16 gets 0.6 * 220 = 132, uses 60;
    # micro gets all of the last 160 s.
    assert seen == [("env", 60), ("build", 208), ("bench_fp32", 252), ("bench_fp16", 132),
                    ("micro", 160)]
    assert rc == 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [(s["step"], s["status"]) for s in saved["steps"]] == [
        ("env", "ok"), ("build", "ok"), ("tests", "skipped"), ("bench_fp32", "ok"),
        ("bench_fp16", "ok"), ("micro", "ok")]
    assert saved["steps"][2]["reason"] == "--skip"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "report.json", "summary.md"]
    assert len(gpu_report.OUTPUT_FILES) <= 8  # the limit on the files of a report

    clock.now = 1000.0
    durations.update(bench_fp32=1000)  # the Table 5 run eats everything it is given
    out = tmp_path / "second"
    out.mkdir()
    with open(out / "log.txt", "a") as log:
        rc = Report(out, Budget(300, clock=clock), ("mobilevitv3_xxs",), (), log).run()
    saved = json.loads((out / "report.json").read_text())
    status = {s["step"]: s["status"] for s in saved["steps"]}
    # 285 s for the steps: env 5, build 100 of 112, tests 72 of 72, bench_fp32 64.8 of 64.8,
    # bench_fp16 its minimum of 30; 13.2 s are left, below micro's minimum of 20.
    assert status == {"env": "ok", "build": "ok", "tests": "timeout", "bench_fp32": "timeout",
                      "bench_fp16": "timeout", "micro": "skipped"}
    assert rc == 1
    assert saved["elapsed_s"] == pytest.approx(271.8)
    summary = (out / "summary.md").read_text()
    assert "bench_fp32 ran past" in summary and "the step needs at least" in summary


# ---- subprocesses --------------------------------------------------------------------------

def test_run_command_kills_the_whole_process_group_at_the_timeout(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
              "time.sleep(120)")
    with open(tmp_path / "log.txt", "a") as log:
        began = time.monotonic()
        result = run_command([sys.executable, "-c", script], 3, log)
    assert result.timed_out and result.returncode is None
    assert time.monotonic() - began < 30
    assert "started" in result.output
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild)
    assert "killed at the timeout" in (tmp_path / "log.txt").read_text()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_run_command_returns_output_and_exit_code(tmp_path):
    with open(tmp_path / "log.txt", "a") as log:
        result = run_command([sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"], 30, log)
    assert result.returncode == 3 and not result.timed_out and "hello" in result.output


def test_first_error_line():
    traceback = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                 "    import mvit3.build\nModuleNotFoundError: No module named 'mvit3.build'\n")
    assert first_error_line("building...\n" + traceback) == "ModuleNotFoundError: No module named 'mvit3.build'"
    assert first_error_line("step 1\nerror: nvcc not found\nmore") == "error: nvcc not found"
    assert first_error_line("a\nFAILED tests/test_x.py::test_y - assert 1 == 2\n") == \
        "FAILED tests/test_x.py::test_y - assert 1 == 2"
    assert first_error_line("just\nthe last line\n") == "the last line"
    assert first_error_line("") is None


def test_results_log_survives_a_killed_run(tmp_path):
    """pytest --results-log (tests/conftest.py) writes each outcome when it is known, so a run
    killed mid-way leaves what finished; the report reads it back."""
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(HERE / "conftest.py", suite / "conftest.py")
    (suite / "test_x.py").write_text(
        "import time, pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='needs sm_90')\n"
        "def test_skip(): pass\n"
        "@pytest.fixture\n"
        "def boom(): raise RuntimeError('fixture boom')\n"
        "def test_err(boom): pass\n"
        "def test_hangs(): time.sleep(600)\n"
        "def test_never_reached(): pass\n")
    path = tmp_path / "tests.jsonl"
    with open(tmp_path / "log.txt", "a") as log:
        result = run_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              f"--results-log={path}", str(suite)], 15, log, cwd=suite)
    assert result.timed_out
    with open(path, "a") as torn:
        torn.write('{"test": "test_x.py::test_hal')  # a line cut short by the kill
    parsed = parse_results_log(path)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    messages = {t["test"].split("::")[-1]: t["message"] for t in parsed["tests"]}
    assert messages == {"test_ok": None, "test_bad": "AssertionError: one is not two",
                        "test_skip": "Skipped: needs sm_90", "test_err": "RuntimeError: fixture boom"}


def test_gpu_priority_puts_whole_models_first():
    """--gpu-priority: the fp32 whole-model checks of the four models the issue names lead,
    CUDA graphs next, torch.compile max-autotune last."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                             "--gpu-priority", "-p", "no:cacheprovider", str(HERE)],
                            capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(ids) > 100
    first = ids[:8]
    assert all("test_gpu_fast_models_match_the_reference[256-torch.float32-" in i for i in first)
    assert {i.rsplit("-", 1)[1].rstrip("]") for i in first} == {
        "mobilevitv3_xs", "mobilevitv3_050", "mobilevit_xs", "mobilevitv2_050"}
    assert all("cuda_graph" in i for i in ids[8:10])
    assert all("max_autotune" in i for i in ids[-2:])


def test_gpu_arch_and_build_tools(monkeypatch):
    assert gpu_arch(GPU_ENV) == "90" and gpu_arch({"gpu": None}) is None
    monkeypatch.setattr(gpu_report.shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    assert gpu_report.nvcc_and_cmake() == "nvcc and cmake not found"


# ---- the summary and the command ---------------------------------------------------------------

def stored_report() -> dict:
    return {
        "schema": "mvit3.gpu_report/1", "started_utc": "2026-01-01T00:00:00+00:00",
        "budget_s": 540.0, "elapsed_s": 512.3, "argv": [], "models": ["mobilevitv3_xxs"],
        "env": GPU_ENV, "backends_after_build": None, "plot": "plot.png",
        "steps": [
            {"step": "env", "title": "environment and backends", "status": "ok", "elapsed_s": 4.1,
             "timeout_s": 60},
            {"step": "build", "title": "build the CUDA C++ library", "status": "failed",
             "elapsed_s": 80.2, "timeout_s": 208, "first_error": "error: identifier \"foo\" is undefined"},
            {"step": "tests", "title": "pytest -m gpu", "status": "failed", "elapsed_s": 50.0,
             "timeout_s": 170, "counts": {"passed": 40, "failed": 1, "error": 0, "skipped": 3},
             "first_error": "FAILED tests/test_k.py::test_attention[fp16] - assert"},
            {"step": "bench_fp32", "title": "Table 5, fp32", "status": "failed", "elapsed_s": 200.0,
             "timeout_s": 250, "ok": 9, "skipped": 3, "failed": 1},
        ],
        "tests": {"counts": {"passed": 40, "failed": 1, "error": 0, "skipped": 3}, "total": 44,
                  "tests": [{"test": "tests.test_k::test_attention[fp16]", "outcome": "failed",
                             "time_s": 0.2, "message": "AssertionError: max error 0.5 > 0.01"}]},
        "bench": {"fp32": synthetic_result()},
        "micro": [
            {"name": "a", "group": "mobilevitv3_xxs fusion batch 1 fp32", "impl": "torch",
             "op": "pointwise_conv", "gpu_ms_median": 0.06, "gbps": 50.0, "tflops": 0.5},
            {"name": "b", "group": "mobilevitv3_xxs fusion batch 1 fp32", "impl": "triton",
             "op": "pointwise_conv", "gpu_ms_median": 0.02, "gbps": 150.0, "tflops": 1.5},
            {"name": "c", "group": "mobilevitv3_xxs fusion batch 1 fp32", "impl": "module",
             "op": "pointwise_conv", "gpu_ms_median": 0.08, "gbps": 40.0, "tflops": 0.4},
        ],
    }


def test_summary_from_a_stored_report(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(stored_report()))
    assert main(["gpu-report", "--summarize", str(path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary == capsys.readouterr().out.rstrip("\n") + "\n"
    assert summary.startswith("# mvit3 GPU report: NVIDIA H100 80GB HBM3")
    assert "| tests (pytest -m gpu) | failed | 50.0 | 170 | 40 passed, 1 failed, 0 error, 3 skipped" in summary
    assert "40 passed, 1 failed, 0 errors, 3 skipped (44 run;" in summary
    assert "| mobilevitv3_xxs | cuda-graph/auto | fp32 | 0.500 |" in summary  # Table 5 row
    assert "| 7.120 |" in summary  # the paper's figure beside it
    assert "12.00x" in summary  # speedup vs reference
    assert "| mobilevitv3_xxs fusion batch 1 fp32 | pointwise_conv | 0.0600 | 0.0200 (3.00x) | – | 0.0800 | 150 | 1.50 |" in summary
    failures = summary.split("## Failures")[1]
    for expected in ("step build: error: identifier \"foo\" is undefined",
                     "test tests.test_k::test_attention[fp16]: AssertionError: max error 0.5 > 0.01",
                     "Table 5 fp32 mobilevitv3_xxs_l2 cuda-graph/auto: RuntimeError: capture failed"):
        assert expected in failures


def test_render_summary_of_a_report_cut_short():
    """An interrupted report (no env, no results yet) still renders."""
    report = {"started_utc": "2026-01-01T00:00:00+00:00", "budget_s": 540.0, "steps": [],
              "bench": {}}
    text = render_summary(report)
    assert "unknown device" in text and "## Failures\n\nnone" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit on a machine without a GPU")
def test_no_gpu_exits_at_once_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    began = time.monotonic()
    assert main(["gpu-report"]) == 2
    assert time.monotonic() - began < 5
    assert "no CUDA GPU" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
