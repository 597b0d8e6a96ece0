"""`python -m mvit3 gpu-report` without a GPU: the plan of a lease and its budgets, the steps
run in order on fake clocks and fake steps, the 8-file limit, resumption after a kill, the
summary of a partial run, the commands the steps run, the result parsers, the no-GPU exit."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench_synthetic import GPU_ENV, synthetic_result

from mvit3.__main__ import main
from mvit3.bench import cli as bench_cli
from mvit3.bench import gpu_report
from mvit3.bench.gpu_report import (DEFAULT_BUDGET_S, Budget, CommandResult, Report,
                                    auto_order_evidence, first_error_line, gpu_arch,
                                    micro_selection, output_files, parse_results_log, plan,
                                    plan_json, render_summary, run_command, sanitizer_summary)

HERE = Path(__file__).resolve().parent
FIRST_LEASE = ["install", "env", "build", "tests", "sanitizer", "ceilings", "table5_fp16",
               "table5_fp32", "micro", "summary"]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the plan --------------------------------------------------------------------------------

def test_plan_of_the_first_lease_is_the_issues_order_in_480_s(capsys):
    began = time.monotonic()
    assert main(["gpu-report", "--plan"]) == 0
    assert time.monotonic() - began < 5  # no GPU, no subprocess: it only prints
    shown = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in shown["steps"]] == FIRST_LEASE
    assert shown["total_s"] == DEFAULT_BUDGET_S == 480
    assert shown["steps"][-1]["planned_end_s"] == 480
    assert all(s["budget_s"] >= s["min_s"] for s in shown["steps"])
    steps = {s["step"]: s for s in shown["steps"]}
    assert steps["tests"]["k"] == "not max_autotune"  # max-autotune is a later lease's
    assert steps["table5_fp16"]["compile_mode"] == "default"
    assert steps["micro"]["dtypes"] == ["fp16"]
    assert shown["output_files"] == list(gpu_report.COMMON_FILES) + ["table5_fp16.json",
                                                                     "table5_fp32.json"]


@pytest.mark.parametrize("focus", gpu_report.FOCUSES)
@pytest.mark.parametrize("budget_s", [480, 300])
def test_every_focus_fits_its_budget(focus, budget_s):
    shown = plan_json(focus, budget_s)
    assert shown["total_s"] == pytest.approx(budget_s, abs=0.5)
    names = [s["step"] for s in shown["steps"]]
    assert names[0] == "install" and names[1:3] == ["env", "build"] and names[-1] == "summary"
    assert len(set(names)) == len(names)
    for step in plan(focus, budget_s):  # each step has a runner
        assert step.name in gpu_report.OUTSIDE_STEPS or hasattr(Report, f"step_{step.name}")
    assert shown["output_files"] == list(output_files(focus)) and len(output_files(focus)) <= 8
    with pytest.raises(ValueError, match="focus must be one of"):
        plan("everything")


def test_budget_slots_carry_saved_time_forward():
    clock = FakeClock()
    steps = plan("all")
    by_name = {s.name: s for s in steps}
    budget = Budget(steps, clock=clock, already_s=20)  # the install took 20 s of its 30
    assert budget.elapsed() == 20
    assert budget.timeout_for(by_name["env"]) == 25  # its 15 s and the 10 s the install saved
    clock.now += 30  # env and build took 30 s of their 90
    assert budget.timeout_for(by_name["tests"]) == 255 - 50  # its slot ends at 30+15+60+150
    clock.now += 400  # everything before micro ran to its slot's end and past it
    assert budget.slot_end("micro") == 460
    assert budget.timeout_for(by_name["micro"]) is None  # 10 s left, its minimum is 15


# ---- running a plan on fake steps --------------------------------------------------------------

# Files each fake step writes into --out, as the real step does.
STEP_FILES = {"tests": "tests.jsonl", "table5_fp16": "table5_fp16.json",
              "table5_fp32": "table5_fp32.json", "micro": "micro.jsonl"}


def fake_steps(monkeypatch, clock, durations, interrupt_at=None):
    """Each step takes durations[name] fake seconds (cut at its timeout) and writes its file."""
    seen = []

    def make(name):
        def step(self, step, timeout_s):
            seen.append((name, round(timeout_s)))
            if name == interrupt_at:
                raise gpu_report.Interrupted("signal 15")
            clock.now += min(durations[name], timeout_s)
            if name in STEP_FILES:
                (self.out / STEP_FILES[name]).write_text("{}\n")
            if durations[name] > timeout_s:
                return "timeout", {"first_error": f"{name} ran past {timeout_s:.0f} s"}
            return "ok", {}
        return step

    for step in plan("all"):
        if step.name not in gpu_report.OUTSIDE_STEPS:
            monkeypatch.setattr(Report, f"step_{step.name}", make(step.name))
    return seen


def run_report(out: Path, clock, already_s=0.0, skip=(), previous=None) -> tuple:
    out.mkdir(exist_ok=True)
    with open(out / "log.txt", "a") as log:
        rc = Report(out, Budget(plan("all"), clock=clock, already_s=already_s), "all", log,
                    skip=skip, previous=previous).run()
    return rc, json.loads((out / "report.json").read_text())


def test_steps_run_in_order_within_their_slots(tmp_path, monkeypatch):
    clock = FakeClock()
    durations = {"env": 5, "build": 40, "tests": 180, "sanitizer": 30, "ceilings": 4,
                 "table5_fp16": 60, "table5_fp32": 45, "micro": 30}
    seen = fake_steps(monkeypatch, clock, durations)
    rc, saved = run_report(tmp_path, clock, already_s=25, skip=("sanitizer",))
    # Slots end at 45 (env), 105 (build), 255 (tests), 315, 325, 385, 430, 460 s. env starts
    # at 25 s and gets 20; build at 30: 75; tests at 70: 185; sanitizer is skipped; ceilings
    # at 250: 75; table5_fp16 at 254: 131; table5_fp32 at 314: 116; micro at 359: 101, ending
    # at 389.
    assert seen == [("env", 20), ("build", 75), ("tests", 185), ("ceilings", 75),
                    ("table5_fp16", 131), ("table5_fp32", 116), ("micro", 101)]
    assert rc == 0
    assert [(s["step"], s["status"]) for s in saved["steps"]] == [
        ("env", "ok"), ("build", "ok"), ("tests", "ok"), ("sanitizer", "skipped"),
        ("ceilings", "ok"), ("table5_fp16", "ok"), ("table5_fp32", "ok"), ("micro", "ok")]
    assert saved["elapsed_s"] == pytest.approx(25 + sum(durations.values()) - 30)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert set(files) <= set(output_files("all")) and len(files) <= 8
    assert all(p.is_file() for p in tmp_path.iterdir())  # no folder: 0 levels deep


def test_a_slow_step_cuts_the_ones_after_it_and_the_summary_says_so(tmp_path, monkeypatch):
    clock = FakeClock()
    durations = {"env": 5, "build": 200, "tests": 1000, "sanitizer": 45, "ceilings": 4,
                 "table5_fp16": 1000, "table5_fp32": 1000, "micro": 30}
    fake_steps(monkeypatch, clock, durations)
    rc, saved = run_report(tmp_path, clock, already_s=30)
    status = {s["step"]: s["status"] for s in saved["steps"]}
    assert status == {"env": "ok", "build": "timeout", "tests": "timeout", "sanitizer": "ok",
                      "ceilings": "ok", "table5_fp16": "timeout", "table5_fp32": "timeout",
                      "micro": "ok"}
    assert rc == 1
    assert saved["elapsed_s"] <= 460  # the summary's 20 s are left
    summary = (tmp_path / "summary.md").read_text()
    assert "## What did not run, and why" in summary
    assert "- tests: cut short: tests ran past 150 s" in summary

    clock.now, out = 1000.0, tmp_path / "late"
    durations.update(build=30)
    rc, saved = run_report(out, clock, already_s=430)  # the install ate 430 s
    status = {s["step"]: s["status"] for s in saved["steps"]}
    # env's slot is long gone: it runs at its minimum (10 s, using 5), build at its 20 (and is
    # cut); of the 5 s left before the summary only ceilings' minimum fits.
    assert status == {"env": "ok", "build": "timeout", "tests": "skipped", "sanitizer": "skipped",
                      "ceilings": "ok", "table5_fp16": "skipped", "table5_fp32": "skipped",
                      "micro": "skipped"}
    micro = saved["steps"][-1]
    assert micro["reason"] == "budget"
    assert micro["note"] == "1 s left before the summary, it needs at least 15 s"
    assert "- micro: skipped: budget: 1 s left" in (out / "summary.md").read_text()


def test_resume_after_a_kill_redoes_setup_and_unfinished_steps_only(tmp_path, monkeypatch):
    clock = FakeClock()
    durations = {"env": 5, "build": 40, "tests": 100, "sanitizer": 30, "ceilings": 4,
                 "table5_fp16": 60, "table5_fp32": 45, "micro": 30}
    fake_steps(monkeypatch, clock, durations, interrupt_at="table5_fp16")
    rc, saved = run_report(tmp_path, clock, skip=("sanitizer",))
    assert rc == 1
    assert [(s["step"], s["status"]) for s in saved["steps"]][-2:] == [
        ("ceilings", "ok"), ("table5_fp16", "interrupted")]
    summary = (tmp_path / "summary.md").read_text()
    assert "- table5_fp16: cut: gpu-report was interrupted" in summary
    assert "- micro: not reached" in summary
    # A SIGKILL leaves the step in flight marked "running": the next run redoes it too.
    saved["steps"][-1]["status"] = "running"
    clock.now = 5000.0
    seen = fake_steps(monkeypatch, clock, durations)
    rc, resumed = run_report(tmp_path, clock, previous=saved)
    assert [name for name, _ in seen] == ["env", "build", "sanitizer", "table5_fp16", "table5_fp32",
                                          "micro"]  # sanitizer: no longer skipped by request
    assert rc == 0 and len(resumed["runs"]) == 2
    assert [s["step"] for s in resumed["steps"]] == FIRST_LEASE[1:-1]
    assert all(s["status"] == "ok" for s in resumed["steps"])


def test_resume_refuses_another_focus(tmp_path, capsys, monkeypatch):
    (tmp_path / "report.json").write_text(json.dumps({"schema": gpu_report.SCHEMA, "focus": "micro"}))
    with pytest.raises(ValueError, match="focus micro, this run is .*focus all"):
        gpu_report._load_previous(tmp_path, "all")


def test_sigterm_ends_the_step_in_flight_and_keeps_the_report(tmp_path):
    """gpu-report killed politely (SIGTERM) ends its step's whole process group and saves."""
    pid_file = tmp_path / "grandchild.pid"
    script = f"""
import sys, time
from pathlib import Path
from mvit3.bench import gpu_report
from mvit3.bench.gpu_report import Budget, Report, plan, run_command

def step_env(self, step, timeout_s):
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    run_command([sys.executable, '-c', code], 100, self.log)
    return "ok", {{}}

Report.step_env = step_env
out = Path({str(tmp_path)!r}) / "out"
out.mkdir()
with open(out / "log.txt", "a") as log:
    sys.exit(Report(out, Budget(plan("all")), "all", log).run())
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=HERE.parent)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), "the fake step never started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 1
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(s["step"], s["status"]) for s in saved["steps"]] == [("env", "interrupted")]
    assert _wait_gone(int(pid_file.read_text()))


# ---- what the steps run ---------------------------------------------------------------------------

class RecordingReport(Report):
    """Records each command instead of running it; returns the given exit code."""

    def __init__(self, out, returncode=0):
        self.calls, self.returncode = [], returncode
        self._log = open(out / "log.txt", "a")
        super().__init__(out, Budget(plan("all")), "all", self._log, tf32=False, commit="abc123")

    def command(self, cmd, timeout_s, env=None):
        self.calls.append(([str(c) for c in cmd], timeout_s, env or {}))
        return CommandResult(self.returncode, 1.0, "")


def test_the_tests_step_requires_the_cuda_library_and_counts_exit_5_as_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_report, "xdist_workers", lambda: 8)
    report = RecordingReport(tmp_path)
    step = {s.name: s for s in plan("all")}["tests"]
    assert report.step_tests(step, 100)[0] == "ok"
    cmd, timeout, env = report.calls[0]
    assert env == {"MVIT3_REQUIRE_CUDA_LIB": "1"}
    assert cmd[cmd.index("-m", 2) + 1] == "gpu" and cmd[cmd.index("-n") + 1] == "8"
    assert cmd[cmd.index("-k") + 1] == "not max_autotune" and "--gpu-priority" in cmd
    assert any(c.startswith("--results-log=") and c.endswith("tests.jsonl") for c in cmd)
    report.returncode = 5
    status, details = report.step_tests(step, 100)
    assert status == "failed" and "no test" in details["first_error"]


def test_the_children_run_without_mvit3_backend_and_with_the_commit(tmp_path, monkeypatch):
    captured = {}
    monkeypatch.setattr(gpu_report, "run_command",
                        lambda cmd, timeout, log, cwd=None, env=None: captured.update(env) or
                        CommandResult(0, 0.1, ""))
    with open(tmp_path / "log.txt", "a") as log:
        Report(tmp_path, Budget(plan("all")), "all", log, commit="abc123").command(["true"], 5)
    assert captured == {"MVIT3_BACKEND": None, "MVIT3_GIT_COMMIT": "abc123"}


def test_run_command_unsets_variables_given_as_none(tmp_path, monkeypatch):
    monkeypatch.setenv("MVIT3_BACKEND", "torch")
    with open(tmp_path / "log.txt", "a") as log:
        result = run_command([sys.executable, "-c", "import os; print(os.environ.get('MVIT3_BACKEND'))"],
                             30, log, env={"MVIT3_BACKEND": None})
    assert result.output.strip().endswith("None")


def test_sanitizer_runs_each_tool_per_backend_and_stops_where_the_machine_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_report, "compute_sanitizer", lambda: "/cuda/bin/compute-sanitizer")
    report = RecordingReport(tmp_path)
    report.report["env"] = GPU_ENV  # cuda unavailable there: its runs are skipped
    step = {s.name: s for s in plan("all")}["sanitizer"]
    status, details = report.step_sanitizer(step, 40)
    assert status == "ok" and details == {"runs": {"ok": 2, "skipped": 2}}
    assert [c[0][:3] + c[0][-2:] for c in report.calls] == [
        ["/cuda/bin/compute-sanitizer", "--tool", tool, "--backend", "triton"]
        for tool in ("memcheck", "racecheck")]
    assert all(c[2] == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} for c in report.calls)
    assert report.calls[0][1] == pytest.approx(20, abs=0.5)  # 40 s over the 2 runs that can run

    report.calls.clear()
    report.command = lambda cmd, timeout_s, env=None: (
        report.calls.append(cmd) or CommandResult(1, 2.0, "========= Error: Device not supported\n"))
    report.report["backends_after_build"] = [dict(b, available=True) for b in GPU_ENV["backends"]]
    status, details = report.step_sanitizer(step, 40)
    assert len(report.calls) == 1 and status == "skipped"
    assert "refused this machine" in details["reason"] == report.report["sanitizer"][3]["note"]


def bench_config_of(cmd: list):
    """The bench command's arguments as its parser takes them (on the CPU here: the device
    and the GPU-only ceilings swapped)."""
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(cmd[cmd.index("bench") + 1:])
    args.device, args.ceilings = "cpu", None
    return bench_cli.make_config(args)


def test_table5_steps_run_the_lease_protocol_with_compile_default(tmp_path):
    report = RecordingReport(tmp_path)
    step = {s.name: s for s in plan("all")}["table5_fp16"]
    status, _ = report.step_table5_fp16(step, 60)
    assert status == "failed"  # the recorded command wrote no JSON
    cmd = report.calls[0][0]
    assert cmd[cmd.index("--dtype") + 1] == "fp16" and "--lease" in cmd
    assert cmd[cmd.index("--task") + 1] == "cls"
    assert cmd[cmd.index("--compile-mode") + 1] == "default" and "--tf32" not in cmd
    assert cmd[cmd.index("--json") + 1] == str(tmp_path / "table5_fp16.json")
    assert cmd[cmd.index("--models") + 1].split(",") == list(gpu_report.TABLE5_MODELS)
    assert cmd[cmd.index("--ceilings") + 1] == "datasheet"  # the ceilings step has not run
    config = bench_config_of(cmd)
    assert config.protocol.name == "lease" and config.compile and config.compile_mode == "default"
    assert config.backends == ("triton", "cuda") and config.task == "cls"
    # Once the ceilings step measured them, the benchmarks read them from report.json.
    report.report["ceilings"] = {"copy": {"gbps": 4000.0}, "matmul_fp16": {"tflops": 600.0}}
    report.step_table5_fp16(step, 60)
    cmd = report.calls[1][0]
    assert cmd[cmd.index("--ceilings") + 1] == str(tmp_path / "report.json")


def test_the_dense_lease_runs_seg_and_det_benchmarks(tmp_path):
    steps = {s.name: s for s in plan("dense")}
    assert list(steps) == ["install", "env", "build", "ceilings", "seg_fp16", "det_fp16", "summary"]
    report = RecordingReport(tmp_path)
    for name, task, size in (("seg_fp16", "seg", 512), ("det_fp16", "det", 320)):
        status, _ = getattr(report, f"step_{name}")(steps[name], 100)
        assert status == "failed"  # the recorded command wrote no JSON
        cmd = report.calls[-1][0]
        assert cmd[cmd.index("--task") + 1] == task and "--lease" in cmd
        assert cmd[cmd.index("--json") + 1] == str(tmp_path / f"{name}.json")
        models = cmd[cmd.index("--models") + 1].split(",")
        assert models == list(steps[name].option("models")) and len(models) == 2
        config = bench_config_of(cmd)
        assert (config.task, config.img_size, config.throughput_batch) == (task, size, 16)
        assert config.compile and config.compile_mode == "default"
        assert bench_cli.resolve_models(",".join(models), task) == models


def test_micro_selection_picks_the_three_headline_ops_of_v3_xs():
    step = {s.name: s for s in plan("all")}["micro"]
    expression = micro_selection(step)
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "no:cacheprovider", "-k", expression,
                             str(HERE.parent / "bench" / "test_ops_bench.py")],
                            capture_output=True, text=True, timeout=120, cwd=HERE.parent,
                            env={**os.environ, "MVIT3_BENCH_DEVICE": "cpu"})
    ids = sorted(line.split("[")[1].rstrip("]") for line in result.stdout.splitlines() if "::" in line)
    expected = sorted(f"mobilevitv3_xs-{kind}-b{batch}-fp16-{impl}"
                      for kind in ("attention", "mlp", "fusion") for batch in (1, 100)
                      for impl in ("triton", "cuda", "torch") + (("module",) if kind == "fusion" else ()))
    assert ids == expected
    assert micro_selection({s.name: s for s in plan("micro")}["micro"]) is None  # the whole grid


def test_env_and_micro_steps_run_for_real_on_the_cpu(tmp_path, monkeypatch):
    """The real subprocesses of two steps, on the CPU: the environment record arrives in the
    report and its scratch file is gone; the micro-benchmark harness (MVIT3_BENCH_DEVICE=cpu,
    stock ops only) appends its rows to micro.jsonl."""
    monkeypatch.setenv("MVIT3_BENCH_DEVICE", "cpu")
    monkeypatch.setenv("MVIT3_BENCH_TARGET_S", "0.02")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the children time no Triton kernel on the CPU
    with open(tmp_path / "log.txt", "a") as log:
        report = Report(tmp_path, Budget(plan("all")), "all", log, commit="abc123")
        assert report.step_env(None, 120) == ("ok", {})
        step = gpu_report.Step("micro", "micro", 30, 15, (
            ("models", ("mobilevitv3_xxs",)), ("kinds", ("fusion",)), ("batches", (1,)),
            ("dtypes", ("fp32",))))
        status, details = report.step_micro(step, 120)
    assert report.report["env"]["git"]["commit"] in ("abc123", gpu_report_commit())
    assert not (tmp_path / "step.json").exists()
    assert status == "ok" and details["benchmarks"] == 2  # torch and module (no GPU backends)
    rows = read_micro(tmp_path)
    assert {(r["impl"], r["group"]) for r in rows} == {
        (impl, "mobilevitv3_xxs fusion batch 1 fp32") for impl in ("torch", "module")}
    assert all(r["tf32"] is False and r["gpu_ms_median"] > 0 for r in rows)
    assert all(r["floor_us"] is None and "on a CPU" in r["floor_reason"] for r in rows)
    log = (tmp_path / "log.txt").read_text()
    assert "device time against the roofline floor" in log and "no floors: no floors on a CPU" in log


def gpu_report_commit():
    """The checkout's own commit: git wins over --commit where there is a .git."""
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=HERE.parent).stdout.strip()


def read_micro(folder: Path) -> list:
    return gpu_report.read_jsonl(folder / "micro.jsonl")


def test_ceilings_on_the_cpu_check_the_arithmetic():
    from mvit3.bench import ceilings

    measured = ceilings.measure(torch.device("cpu"), copy_mib=1, matmul_n=64)
    copy, mm = measured["copy"], measured["matmul_fp16"]
    assert copy["bytes"] == 2 * 2**20
    assert copy["gbps"] == pytest.approx(copy["bytes"] / (copy["ms_median"] / 1e3) / 1e9)
    assert mm["tflops"] == pytest.approx(2 * 64**3 / (mm["ms_median"] / 1e3) / 1e12)


# ---- parsing ------------------------------------------------------------------------------------

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
    assert _wait_gone(int(pid_file.read_text()))
    assert "killed at the timeout" in (tmp_path / "log.txt").read_text()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    return not _alive(pid)


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


def test_sanitizer_summary_line():
    memcheck = ("========= COMPUTE-SANITIZER\nmobilevitv3_xs triton 128px: 40 fused op calls\n"
                "========= ERROR SUMMARY: 0 errors\n")
    racecheck = "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    assert sanitizer_summary(memcheck) == "ERROR SUMMARY: 0 errors"
    assert sanitizer_summary(racecheck) == "RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)"
    assert sanitizer_summary("Traceback ...") is None


def _suite(tmp_path) -> Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(HERE / "conftest.py", suite / "conftest.py")
    return suite


def test_results_log_survives_a_killed_run(tmp_path):
    """pytest --results-log (tests/conftest.py) writes each outcome when it is known, so a run
    killed mid-way leaves what finished; the report reads it back."""
    suite = _suite(tmp_path)
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


def test_results_log_under_xdist_has_each_test_once(tmp_path):
    pytest.importorskip("xdist")
    suite = _suite(tmp_path)
    (suite / "test_y.py").write_text("import pytest\n"
                                     "@pytest.mark.parametrize('i', range(6))\n"
                                     "def test_i(i): assert i != 4\n")
    path = tmp_path / "tests.jsonl"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1",
                             f"--results-log={path}", str(suite)], capture_output=True, text=True,
                            timeout=120, cwd=suite)
    assert result.returncode == 1, result.stdout[-2000:]
    parsed = parse_results_log(path)
    assert parsed["total"] == 6 and parsed["counts"]["passed"] == 5 and parsed["counts"]["failed"] == 1


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
    assert gpu_report.compute_sanitizer() is None


def micro_row(kind, impl, ms, batch=1):
    return {"group": f"mobilevitv3_xs {kind} batch {batch} fp16", "kind": kind, "impl": impl,
            "op": kind, "gpu_ms_median": ms, "gbps": 100.0 / ms, "tflops": 1.0 / ms, "tf32": False}


def test_auto_order_evidence_names_a_winner_only_where_it_won_every_case():
    rows = [micro_row("attention", "triton", 0.02), micro_row("attention", "cuda", 0.03),
            micro_row("attention", "triton", 0.5, 100), micro_row("attention", "cuda", 0.6, 100),
            micro_row("fusion", "triton", 0.02), micro_row("fusion", "cuda", 0.01),
            micro_row("fusion", "triton", 0.2, 100), micro_row("fusion", "cuda", 0.3, 100),
            micro_row("mlp", "cuda", 0.01), micro_row("mlp", "torch", 0.05),
            micro_row("attention_path", "triton", 0.02), micro_row("attention_path", "cuda", 0.03)]
    assert auto_order_evidence(rows) == {
        "patch_attention": {"order": ["triton", "cuda"], "cases": 2},
        "pointwise_conv": {"order": "mixed", "cases": 2, "triton_faster": 1}}


def test_auto_order_is_the_recorded_table_or_triton_first(monkeypatch, capsys):
    from mvit3.ops import backends

    assert backends.auto_order((9, 0), "pointwise_conv") == (
        ("triton", "cuda"), "nothing recorded for compute capability 9.0: Triton first by default")
    # A row as gpu-report's evidence section gives it, entered for sm_90.
    evidence = auto_order_evidence([micro_row("fusion", "triton", 0.03), micro_row("fusion", "cuda", 0.02)])
    monkeypatch.setitem(backends.MEASURED_AUTO_ORDER, "9.0", {
        "pointwise_conv": (evidence["pointwise_conv"]["order"], "bench/results/h200-2026-12-01")})
    assert backends.auto_order((9, 0), "pointwise_conv") == (
        ("cuda", "triton"), "measured on compute capability 9.0: bench/results/h200-2026-12-01")
    assert backends.auto_order((8, 0), "pointwise_conv")[0] == ("triton", "cuda")
    assert backends.auto_order((9, 0), "conv3x3")[0] == ("triton", "cuda")
    assert main(["info", "--models", "mobilevitv3_xxs"]) == 0
    out = capsys.readouterr().out
    assert "backend='auto' on " in out
    if not torch.cuda.is_available():
        assert "  patch_attention      triton > cuda  (no GPU here: the default order, Triton first)" in out


# ---- the summary and the command ---------------------------------------------------------------

def stored_report(folder: Path) -> dict:
    (folder / "table5_fp32.json").write_text(json.dumps(synthetic_result()))
    return {
        "schema": gpu_report.SCHEMA, "started_utc": "2026-01-01T00:00:00+00:00", "focus": "all",
        "budget_s": 480.0, "elapsed_s": 452.3, "argv": [], "plan": plan_json("all", 480)["steps"],
        "env": GPU_ENV, "backends_after_build": None, "runs": [],
        "steps": [
            {"step": "env", "title": "environment and backends", "status": "ok", "elapsed_s": 4.1,
             "budget_s": 15, "timeout_s": 45},
            {"step": "build", "title": "build", "status": "failed", "elapsed_s": 50.2, "budget_s": 75,
             "timeout_s": 86, "first_error": "error: identifier \"foo\" is undefined"},
            {"step": "tests", "title": "correctness sweep", "status": "failed", "elapsed_s": 50.0,
             "budget_s": 150, "timeout_s": 170, "counts": {"passed": 40, "failed": 1, "error": 0,
                                                            "skipped": 3},
             "first_error": "FAILED tests/test_k.py::test_attention[fp16] - assert"},
            {"step": "sanitizer", "title": "compute-sanitizer", "status": "ok", "elapsed_s": 40.0,
             "budget_s": 45, "timeout_s": 45, "runs": {"ok": 2, "skipped": 2}},
            {"step": "ceilings", "title": "ceilings", "status": "ok", "elapsed_s": 4.0,
             "budget_s": 10, "timeout_s": 10, "gbps": 4000, "fp16_tflops": 600.0},
            {"step": "table5_fp16", "title": "Table 5, fp16", "status": "skipped", "elapsed_s": 0.0,
             "budget_s": 60, "timeout_s": None, "reason": "--skip"},
            {"step": "table5_fp32", "title": "Table 5, fp32", "status": "failed", "elapsed_s": 40.0,
             "budget_s": 45, "timeout_s": 45, "ok": 9, "skipped": 3, "failed": 1},
            {"step": "micro", "title": "micro", "status": "running", "elapsed_s": 0.0,
             "budget_s": 30, "timeout_s": 30},
        ],
        "tests": {"counts": {"passed": 40, "failed": 1, "error": 0, "skipped": 3}, "total": 44,
                  "tests": [{"test": "tests.test_k::test_attention[fp16]", "outcome": "failed",
                             "time_s": 0.2, "message": "AssertionError: max error 0.5 > 0.01"}]},
        "sanitizer": [
            {"tool": "memcheck", "backend": "triton", "status": "ok", "note": "ERROR SUMMARY: 0 errors"},
            {"tool": "racecheck", "backend": "triton", "status": "failed",
             "note": "RACECHECK SUMMARY: 1 hazards displayed (1 errors, 0 warnings)"}],
        "ceilings": {"device": "cuda", "copy": {"bytes": 2**31, "ms_median": 0.5, "samples": 20,
                                                "gbps": 4000.0},
                     "matmul_fp16": {"n": 8192, "dtype": "fp16", "ms_median": 1.8, "samples": 20,
                                     "tflops": 600.0}},
        "bench": {"table5_fp32": {"file": "table5_fp32.json", "rows": 13}},
        "micro": [
            {"name": "a", "group": "mobilevitv3_xs fusion batch 1 fp16", "impl": "torch", "kind": "fusion",
             "op": "pointwise_conv", "gpu_ms_median": 0.06, "gbps": 50.0, "tflops": 0.5, "tf32": False},
            {"name": "b", "group": "mobilevitv3_xs fusion batch 1 fp16", "impl": "triton", "kind": "fusion",
             "op": "pointwise_conv", "gpu_ms_median": 0.02, "gbps": 2000.0, "tflops": 1.5, "tf32": False,
             "floor_us": 5.0, "ceilings": "measured (report.json): copy 4,000 GB/s"},
            {"name": "c", "group": "mobilevitv3_xs fusion batch 1 fp16", "impl": "module", "kind": "fusion",
             "op": "pointwise_conv", "gpu_ms_median": 0.08, "gbps": 40.0, "tflops": 0.4, "tf32": False},
        ],
        "auto_order_evidence": {"compute_capability": "9.0", "ops": {
            "pointwise_conv": {"order": ["triton", "cuda"], "cases": 2}}},
    }


def test_summary_of_a_stored_partial_report(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(stored_report(tmp_path)))
    assert main(["gpu-report", "--summarize", str(path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary == capsys.readouterr().out.rstrip("\n") + "\n"
    assert summary.startswith("# mvit3 GPU report: NVIDIA H100 80GB HBM3")
    assert ("| tests (correctness sweep) | failed | 50.0 | 150 | 170 | "
            "40 passed, 1 failed, 0 error, 3 skipped") in summary
    assert "40 passed, 1 failed, 0 errors, 3 skipped (44 run;" in summary
    not_run = summary.split("## What did not run, and why")[1].split("##")[0]
    assert "- table5_fp16: skipped: --skip" in not_run
    assert "- micro: cut: the report was killed from outside while it ran" in not_run
    assert "| racecheck | triton | failed | RACECHECK SUMMARY: 1 hazards" in summary
    assert "- copy: 4000 GB/s (2.0 GiB read + written in 0.500 ms, median of 20)" in summary
    assert "| mobilevitv3_xxs | cuda-graph/auto | fp32 | 0.500 |" in summary  # Table 5 row
    assert "| 7.120 |" in summary  # the paper's figure beside it
    assert ("| mobilevitv3_xs fusion batch 1 fp16 | pointwise_conv | 0.0600 | 0.0200 (3.00x) | – "
            "| 0.0800 | 2000 (50%) | 1.50 (0%) | 5.00 (25%) |") in summary  # 5 us of 0.02 ms
    assert "at these ceilings: measured (report.json): copy 4,000 GB/s; in brackets" in summary
    assert "TF32 off on both sides" in summary
    assert "- pointwise_conv: triton > cuda (2 cases)" in summary
    failures = summary.split("## Failures")[1]
    for expected in ("step build: error: identifier \"foo\" is undefined",
                     "test tests.test_k::test_attention[fp16]: AssertionError: max error 0.5 > 0.01",
                     "racecheck triton: RACECHECK SUMMARY",
                     "table5_fp32 mobilevitv3_xxs_l2 cuda-graph/auto: RuntimeError: capture failed"):
        assert expected in failures


def test_a_table_cut_mid_write_is_reported_not_fatal(tmp_path):
    report = stored_report(tmp_path)
    text = (tmp_path / "table5_fp32.json").read_text()
    (tmp_path / "table5_fp32.json").write_text(text[: len(text) // 2])  # the kill's torn write
    summary = render_summary(report, tmp_path)
    assert "(table5_fp32.json is not beside this summary, or was cut mid-write)" in summary
    assert gpu_report.read_table(tmp_path / "table5_fp32.json") is None


def test_render_summary_of_a_report_cut_before_any_step():
    report = {"started_utc": "2026-01-01T00:00:00+00:00", "budget_s": 480.0, "steps": [],
              "bench": {}, "plan": plan_json("all", 480)["steps"]}
    text = render_summary(report)
    assert "unknown device" in text and "## Failures\n\nnone" in text
    assert "- env: not reached" in text and "- micro: not reached" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit on a machine without a GPU")
def test_no_gpu_exits_at_once_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    began = time.monotonic()
    assert main(["gpu-report", "--commit", "abc", "--started-at", str(time.time())]) == 2
    assert time.monotonic() - began < 5
    assert "no CUDA GPU" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert main(["gpu-report", "--skip", "bench_fp32"]) == 2  # a step of no plan
    assert "unknown steps ['bench_fp32']" in capsys.readouterr().err
