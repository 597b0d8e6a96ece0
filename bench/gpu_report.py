"""`python -m mvit3 gpu-report`: every GPU check and benchmark into one folder, on a budget.

Steps, in priority order, each in a subprocess with a timeout taken from what is left of
`--budget-s` (a step that would get less than its minimum is skipped, and says so):
  1. env         GPU identity (NVML), versions, commit, kernel backends and why not
  2. build       `python -m mvit3 build --archs <this GPU's arch>` when nvcc and CMake exist
  3. tests       `pytest -m gpu --gpu-priority`, each outcome logged as it happens (a run killed at
                 its timeout keeps what it proved), whole models first (tests/conftest.py)
  4. bench_fp32  Table 5 (9 models + v3 0.5/0.75/1.0), default protocol: reference, fast per
                 backend, CUDA-graph replay, torch.compile
  5. bench_fp16  the same in fp16
  6. micro       the kernel micro-benchmarks (`pytest bench/ --benchmark-only`)
then a plot and a markdown summary. Output (`--out`, at most 8 files): summary.md, report.json
(everything), plot.png, log.txt (every subprocess's output): `OUTPUT_FILES`. report.json and summary.md are
rewritten after every step, so an interrupted run still leaves its evidence.

Nothing here changes GPU settings (clocks, power, persistence, MIG): NVML is only read.
`--summarize report.json` re-renders the summary of a stored report, on any machine.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .env import format_env, scrub_paths
from .paper import TABLE5_MODELS
from .report import render_markdown

DEFAULT_BUDGET_S = 540.0
SUMMARY_RESERVE_S = 15.0  # kept back for the plot and the summary
# Everything a report writes into --out (a handful: at most 8 is the rule).
OUTPUT_FILES = ("summary.md", "report.json", "plot.png", "log.txt")
REPORT_MODELS = TABLE5_MODELS + ("mobilevitv3_050", "mobilevitv3_075", "mobilevitv3_100")
REPORT_BACKENDS = "triton,cuda"  # fast/torch is a CPU path: not worth GPU minutes here


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    min_s: float  # skipped when less than this is left
    max_s: float  # never given more than this
    share: float  # never given more than this fraction of what is left


STEPS = (
    Step("env", "environment and backends", 5, 60, 1.0),
    Step("build", "build the CUDA C++ library", 30, 240, 0.4),
    Step("tests", "pytest -m gpu", 20, 180, 0.4),
    Step("bench_fp32", "Table 5, fp32", 40, 600, 0.6),
    Step("bench_fp16", "Table 5, fp16", 30, 600, 0.6),
    Step("micro", "kernel micro-benchmarks", 20, 600, 1.0),
)
STEP_NAMES = tuple(step.name for step in STEPS)


class Budget:
    """Wall-clock budget of the whole report; `clock` is injectable for tests."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic,
                 reserve_s: float = SUMMARY_RESERVE_S):
        self.total_s, self.clock, self.reserve_s = total_s, clock, reserve_s
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds the steps may still use (the summary's reserve excluded)."""
        return self.total_s - self.reserve_s - self.elapsed()

    def timeout_for(self, step: Step) -> Optional[float]:
        """The step's timeout, or None when too little is left to start it."""
        left = self.left()
        if left < step.min_s:
            return None
        return min(step.max_s, max(step.min_s, step.share * left))


# ---- subprocesses --------------------------------------------------------------------------

@dataclass
class CommandResult:
    returncode: Optional[int]  # None when it was killed at its timeout
    elapsed_s: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_command(cmd: list, timeout_s: float, log, cwd=None, env: Optional[dict] = None) -> CommandResult:
    """Run `cmd` in its own process group, output appended to `log`; killed at the timeout.

    The whole group is ended (SIGTERM, then SIGKILL), so no grandchild outlives the step.
    """
    log.write(f"\n$ {' '.join(map(str, cmd))}   (timeout {timeout_s:.0f} s)\n")
    log.flush()
    began = time.monotonic()
    start = os.path.getsize(log.name)  # the child appends from here
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    elapsed = time.monotonic() - began
    log.flush()
    with open(log.name, "rb") as reread:
        reread.seek(start)
        output = reread.read().decode("utf-8", errors="replace")
    log.write(f"[{'killed at the timeout' if returncode is None else f'exit {returncode}'} "
              f"after {elapsed:.1f} s]\n")
    log.flush()
    return CommandResult(returncode, elapsed, output)


_EXCEPTION_LINE = re.compile(r"^\s*[\w.]+(Error|Exception|Unavailable|Interrupt|Exit)\b")


def first_error_line(output: str) -> Optional[str]:
    """The line that names the failure: the exception line closing a traceback, else the
    first line that mentions an error or a failed test, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return None
    if any(line.startswith("Traceback") for line in lines):
        for line in reversed(lines):
            if _EXCEPTION_LINE.match(line):
                return line
    for line in lines:
        if "error" in line.lower() or line.startswith("FAILED"):
            return line
    return lines[-1]


# ---- parsing the steps' results --------------------------------------------------------------

def parse_results_log(path) -> dict:
    """Counts and per-test outcomes of the JSON-lines file that pytest's `--results-log`
    (tests/conftest.py) appends to, one line per test; a torn last line (the run was killed
    while writing it) is ignored."""
    tests = []
    for line in Path(path).read_text().splitlines():
        try:
            tests.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "total": len(tests), "tests": tests}


def parse_micro(path) -> list:
    """The micro-benchmark JSON of pytest-benchmark, one compact dict per benchmark."""
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        rows.append({"name": bench["name"], "group": bench.get("group"),
                     "wall_ms_median": bench["stats"]["median"] * 1e3, **info})
    return rows


def gpu_arch(env: dict) -> Optional[str]:
    """"90" for compute capability 9.0 (the --archs form of `python -m mvit3 build`)."""
    capability = ((env or {}).get("gpu") or {}).get("compute_capability")
    return capability.replace(".", "") if capability else None


def nvcc_and_cmake() -> Optional[str]:
    """None if both tools are there, else what is missing."""
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    found = {"nvcc": shutil.which("nvcc") or (cuda_home / "bin" / "nvcc").is_file(),
             "cmake": shutil.which("cmake")}
    missing = [name for name, there in found.items() if not there]
    return f"{' and '.join(missing)} not found" if missing else None


# ---- the steps -----------------------------------------------------------------------------

class Report:
    """Runs the steps into `out`; `report` is the JSON with everything."""

    def __init__(self, out: Path, budget: Budget, models: tuple, skip: tuple, log):
        self.out, self.budget, self.models, self.skip, self.log = out, budget, models, skip, log
        self.tmp = Path(tempfile.mkdtemp(prefix="mvit3-gpu-report-"))
        self.python = sys.executable
        from .env import project_root

        self.root = project_root()
        self.report = {
            "schema": "mvit3.gpu_report/1",
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget.total_s, "argv": sys.argv[1:], "models": list(models),
            "steps": [], "env": None, "backends_after_build": None, "tests": None,
            "bench": {}, "micro": None, "plot": None,
        }

    def say(self, text: str) -> None:
        line = f"[{self.budget.elapsed():5.0f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def command(self, cmd: list, timeout_s: float, **kwargs) -> CommandResult:
        return run_command(cmd, timeout_s, self.log, cwd=kwargs.pop("cwd", self.root), **kwargs)

    # Each step returns (status, details); raising marks the step failed with the message.
    def step_env(self, timeout_s: float):
        path = self.tmp / "env.json"
        result = self.command([self.python, "-m", "mvit3.bench.env", "--json", path], timeout_s)
        if result.returncode != 0 or not path.is_file():
            return _failed(result)
        self.report["env"] = json.loads(path.read_text())
        return "ok", {}

    def step_build(self, timeout_s: float):
        missing = nvcc_and_cmake()
        if missing:
            return "skipped", {"reason": missing}
        arch = gpu_arch(self.report["env"])
        if arch is None:
            return "skipped", {"reason": "the env step recorded no GPU compute capability"}
        result = self.command([self.python, "-m", "mvit3", "build", "--archs", arch], timeout_s)
        if result.returncode != 0:
            return _failed(result)
        path = self.tmp / "env_after_build.json"
        after = self.command([self.python, "-m", "mvit3.bench.env", "--json", path],
                             max(5.0, min(60.0, self.budget.left())))
        if after.returncode == 0 and path.is_file():
            self.report["backends_after_build"] = json.loads(path.read_text()).get("backends")
        return "ok", {"arch": arch, "build_s": round(result.elapsed_s, 1)}

    def step_tests(self, timeout_s: float):
        if not (self.root / "tests").is_dir():
            return "skipped", {"reason": f"no tests/ directory beside the package ({self.root}): "
                                         "run from a checkout"}
        results = self.tmp / "tests.jsonl"
        result = self.command([self.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                               "--gpu-priority", f"--results-log={results}", "tests"], timeout_s)
        if not results.is_file():
            return _failed(result)
        self.report["tests"] = parse_results_log(results)
        counts = self.report["tests"]["counts"]
        if result.timed_out:
            return "timeout", {"counts": counts, "reason": "killed at its timeout; the outcomes "
                                                          "of the tests that finished are kept"}
        status = "ok" if result.returncode in (0, 5) else "failed"  # 5: no test collected
        return status, {"counts": counts, "first_error": None if status == "ok"
                        else first_error_line(result.output)}

    def _bench(self, dtype: str, timeout_s: float):
        path = self.tmp / f"bench_{dtype}.json"
        # Stop starting rows early enough for the row in flight to finish before the timeout.
        inner_budget = max(10.0, timeout_s - max(20.0, 0.15 * timeout_s))
        result = self.command([self.python, "-m", "mvit3", "bench", "--device", "cuda",
                               "--dtype", dtype, "--models", ",".join(self.models),
                               "--backends", REPORT_BACKENDS, "--json", path,
                               "--budget-s", f"{inner_budget:.0f}", "--no-progress"], timeout_s)
        if not path.is_file():
            return _failed(result)
        bench = json.loads(path.read_text())  # partial when the step was killed: still evidence
        self.report["bench"][dtype] = bench
        rows = bench["rows"]
        details = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
        if result.timed_out:
            return "timeout", {**details, "reason": "killed at its timeout; rows so far kept"}
        return ("ok" if result.returncode == 0 else "failed"), details

    def step_bench_fp32(self, timeout_s: float):
        return self._bench("fp32", timeout_s)

    def step_bench_fp16(self, timeout_s: float):
        return self._bench("fp16", timeout_s)

    def step_micro(self, timeout_s: float):
        from mvit3 import bench

        path = self.tmp / "micro.json"
        budget = max(10.0, timeout_s - max(20.0, 0.1 * timeout_s))
        result = self.command([self.python, "-m", "pytest", Path(bench.__file__).parent,
                               "--benchmark-only", f"--benchmark-json={path}", "-q",
                               "--benchmark-columns=median,iqr,rounds", "-p", "no:cacheprovider"],
                              timeout_s,
                              env={"MVIT3_BENCH_BUDGET_S": f"{budget:.0f}"})
        if not path.is_file():
            return _failed(result)
        self.report["micro"] = parse_micro(path)
        status = "ok" if result.returncode == 0 else "failed"
        return status, {"benchmarks": len(self.report["micro"]),
                        "first_error": None if status == "ok" else first_error_line(result.output)}

    # -- driving --
    def run_step(self, step: Step) -> None:
        entry = {"step": step.name, "title": step.title, "status": None, "elapsed_s": 0.0,
                 "timeout_s": None}
        timeout = self.budget.timeout_for(step)
        if step.name in self.skip:
            entry.update(status="skipped", reason="--skip")
        elif timeout is None:
            entry.update(status="skipped", reason=f"budget: {max(0.0, self.budget.left()):.0f} s "
                                                  f"left, the step needs at least {step.min_s:.0f} s")
        else:
            self.say(f"{step.name}: {step.title} (timeout {timeout:.0f} s)")
            began = time.monotonic()
            try:
                status, details = getattr(self, f"step_{step.name}")(timeout)
            except Exception as err:  # a bug in a parser must not cost the other steps
                status, details = "failed", {"first_error": f"{type(err).__name__}: {err}"}
            entry.update(status=status, timeout_s=round(timeout, 1),
                         elapsed_s=round(time.monotonic() - began, 1), **details)
        self.say(f"{step.name}: {entry['status']}"
                 + (f" ({entry.get('reason') or entry.get('first_error')})"
                    if entry.get("reason") or entry.get("first_error") else ""))
        self.report["steps"].append(entry)
        self.save()

    def plot(self) -> None:
        from .plot import matplotlib_missing, plot_result

        bench = self.report["bench"].get("fp32")
        if not bench or not any(r["status"] == "ok" for r in bench["rows"]):
            self.report["plot"] = "not drawn: no fp32 Table 5 row was measured"
        elif matplotlib_missing():
            self.report["plot"] = "not drawn: matplotlib is not installed"
        else:
            try:
                plot_result(bench, str(self.out / "plot.png"))
                self.report["plot"] = "plot.png"
            except Exception as err:
                self.report["plot"] = f"not drawn: {type(err).__name__}: {err}"

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.budget.elapsed(), 1)
        text = json.dumps(self.report, indent=1, default=str)
        (self.out / "report.json").write_text(scrub_paths(text))
        (self.out / "summary.md").write_text(scrub_paths(render_summary(self.report)))

    def run(self) -> int:
        try:
            for step in STEPS:
                self.run_step(step)
            self.plot()
            self.save()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        files = [name for name in OUTPUT_FILES if (self.out / name).is_file()]
        self.say(f"done: {', '.join(files)} in {self.out}")
        self.log.flush()
        log_path = Path(self.log.name)  # subprocesses wrote into it: scrubbed once, at the end
        log_path.write_text(scrub_paths(log_path.read_text(encoding="utf-8", errors="replace")))
        failed = [s["step"] for s in self.report["steps"] if s["status"] in ("failed", "timeout")]
        return 1 if failed else 0


def _failed(result: CommandResult):
    if result.timed_out:
        return "timeout", {"first_error": f"killed at its timeout after {result.elapsed_s:.0f} s; "
                                          f"last output: {first_error_line(result.output)}"}
    return "failed", {"first_error": first_error_line(result.output),
                      "returncode": result.returncode}


# ---- the summary ----------------------------------------------------------------------------

def _micro_table(micro: list) -> list:
    """One line per (model, op, batch, dtype): device time of the stock sequence and of each
    fused implementation, with its speedup."""
    groups = {}
    for row in micro:
        groups.setdefault(row["group"], {})[row.get("impl")] = row
    lines = ["| case | op | stock torch ms | triton ms | cuda ms | reference modules ms | "
             "best GB/s | best TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for group, impls in groups.items():
        stock = impls.get("torch", {}).get("gpu_ms_median")

        def cell(impl):
            row = impls.get(impl)
            if not row or row.get("gpu_ms_median") is None:
                return "–"
            ms = row["gpu_ms_median"]
            return f"{ms:.4f}" + (f" ({stock / ms:.2f}x)" if stock and impl != "module" else "")

        fused = [impls[i] for i in ("triton", "cuda") if i in impls]
        best = min(fused, key=lambda r: r["gpu_ms_median"]) if fused else None
        op = next(iter(impls.values())).get("op", "?")
        stock_cell = "–" if stock is None else f"{stock:.4f}"
        gbps = "–" if best is None else f"{best['gbps']:.0f}"
        tflops = "–" if best is None else f"{best['tflops']:.2f}"
        lines.append(f"| {group} | {op} | {stock_cell} | {cell('triton')} | {cell('cuda')} | "
                     f"{cell('module')} | {gbps} | {tflops} |")
    return lines


def render_summary(report: dict) -> str:
    env = report.get("env") or {}
    device = env.get("device", "unknown device")
    git = env.get("git") or {}
    lines = [f"# mvit3 GPU report: {device}, {report['started_utc']}", "",
             f"Commit {git.get('commit') or 'unknown'}"
             + (" (with uncommitted changes)" if git.get("dirty") else "")
             + f"; budget {report['budget_s']:.0f} s, used {report.get('elapsed_s', 0):.0f} s. "
             "Produced by `python -m mvit3 gpu-report`.", "", "## Steps", "",
             "| step | status | time (s) | timeout (s) | note |", "|---|---|---|---|---|"]
    failures = []
    for s in report["steps"]:
        note = s.get("reason") or s.get("first_error") or ", ".join(
            f"{k} {v}" for k, v in s.items()
            if k in ("ok", "skipped", "failed", "arch", "build_s", "benchmarks"))
        if s["step"] == "tests" and s.get("counts"):
            why = s.get("first_error") or s.get("reason")
            note = ", ".join(f"{v} {k}" for k, v in s["counts"].items()) + (f"; {why}" if why else "")
        lines.append(f"| {s['step']} ({s['title']}) | {s['status']} | {s['elapsed_s']} | "
                     f"{s.get('timeout_s') or '–'} | {note} |")
        if s["status"] in ("failed", "timeout"):
            failures.append(f"- step {s['step']}: {s.get('first_error') or s.get('reason')}")
    if env:
        lines += ["", "## Environment", ""] + format_env(env)
    if report.get("backends_after_build"):
        lines += [f"- after the build, backend {b['backend']}: "
                  f"{'available' if b['available'] else 'unavailable'} ({b['reason']})"
                  for b in report["backends_after_build"]]
    tests = report.get("tests")
    if tests:
        c = tests["counts"]
        lines += ["", "## Tests (`pytest -m gpu`)", "",
                  f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                  f"{c['skipped']} skipped ({tests['total']} run; a step cut short at its "
                  "timeout lists the tests that finished, in `--gpu-priority` order)."]
        for t in tests["tests"]:
            if t["outcome"] in ("failed", "error"):
                lines.append(f"- {t['outcome'].upper()} {t['test']}: {t['message']}")
                failures.append(f"- test {t['test']}: {t['message']}")
    for dtype, bench in report.get("bench", {}).items():
        lines += ["", render_markdown(bench, heading="##", environment=False).rstrip()]
        failures += [f"- Table 5 {dtype} {r['model']} {r['impl']}/{r['backend']}: {r['reason']}"
                     for r in bench["rows"] if r["status"] == "failed"]
    if report.get("micro"):
        lines += ["", "## Kernel micro-benchmarks", "",
                  "Device time per call (CUDA events, calls queued back to back), median; "
                  "speedup over the stock torch sequence in brackets.", ""]
        lines += _micro_table(report["micro"])
    if report.get("plot"):
        lines += ["", f"Plot: {report['plot']}"]
    lines += ["", "## Failures", ""] + (failures or ["none"])
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: gpu-report-<device>-<date> here)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"wall-clock budget of the whole report (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--skip", default="", help=f"steps to leave out, comma-separated: {STEP_NAMES}")
    parser.add_argument("--models", default=",".join(REPORT_MODELS),
                        help="Table 5 models (default: the nine of Table 5 and v3 0.5/0.75/1.0)")
    parser.add_argument("--summarize", type=Path, metavar="REPORT_JSON",
                        help="only re-render summary.md of a stored report.json (no GPU needed)")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run(args) -> int:
    if args.summarize:
        report = json.loads(args.summarize.read_text())
        out = args.out or args.summarize.parent
        out.mkdir(parents=True, exist_ok=True)
        text = render_summary(report)
        (out / "summary.md").write_text(text)
        print(text)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-report: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
              "nothing was run. Without a GPU use `python -m mvit3 bench --device cpu`.",
              file=sys.stderr)
        return 2
    skip = tuple(filter(None, (s.strip() for s in args.skip.split(","))))
    unknown = [s for s in skip if s not in STEP_NAMES]
    if unknown:
        print(f"error: --skip: unknown steps {unknown}; steps: {STEP_NAMES}", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    out = args.out or Path(f"gpu-report-{_slug(torch.cuda.get_device_name(0))}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    models = tuple(filter(None, (m.strip() for m in args.models.split(","))))
    with open(out / "log.txt", "a", encoding="utf-8") as log:
        return Report(out, budget, models, skip, log).run()
