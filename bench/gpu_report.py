"""`python -m mvit3 gpu-report`: the evidence of one GPU lease, on a budget, into one folder.

A lease is short (minutes, machine start included), so the plan is fixed in advance, in
order of evidence per minute, with a time budget per step (`--plan` prints it as JSON, on any
machine). The first lease (`--focus all`, 480 s including the install before it):
  install     `pip install` by the command that starts the report (`--started-at` counts it)
  env         GPU identity (NVML), versions, commit (`--commit`), kernel backends and why not
  build       `python -m mvit3 build --archs <this GPU's arch only>` when nvcc and CMake exist
  tests       correctness sweep: `pytest -m gpu -n <workers> --gpu-priority` (op grids on both
              backends and all dtypes, every model's whole forward, CUDA-graph replay; the
              fused path asserted to run), MVIT3_REQUIRE_CUDA_LIB=1 so a missing CUDA library
              fails instead of skipping, "no tests collected" (exit 5) a failure;
              max-autotune is left to `--focus compile`
  sanitizer   compute-sanitizer memcheck and racecheck, one small forward of v3-XS and v3-0.5
              per backend (`mvit3.bench.sanitize`)
  ceilings    copy bandwidth and the fp16 matmul rate (`mvit3.bench.ceilings`), the yardstick
              of every later figure
  table5_fp16, table5_fp32
              Table 5 (v1/v3 XXS/XS/S and the L2 variants): reference eager, timm (v1), fast
              per backend, CUDA-graph replay, torch.compile in its default mode
  micro       the three headline ops at v3-XS shapes (patch attention, transformer MLP,
              fusion 1x1), batch 1 and 100, fp16, against the stock ops (TF32 off unless --tf32)
  summary     kept back for summary.md
Later leases: `--focus compile` (torch.compile rows in the default mode, of the reference and
of timm, and the max-autotune tests), `--focus micro` (the whole micro-benchmark grid),
`--focus table5` (every model, both dtypes, longer rows, no compile), `--focus dense`
(`bench --task seg` and `--task det` in fp16 for the models the fast dense tests check:
DeepLabv3 XS-VOC and 0.5-ADE20K at 512 px, SSDLite XS and 1.0 at 320 px).

Every time of a benchmark step is shown beside its roofline floor at the ceilings the
`ceilings` step measured (the steps pass report.json on: `bench --ceilings`, MVIT3_CEILINGS),
or at the datasheet's when that step did not finish.

Budgets: a step may run until the planned end of its slot (the sum of the budgets up to and
including it, from the start of the lease), so time an earlier step saved flows to the later
ones; a step whose slot was eaten by the steps before still gets its minimum while the plan
has room before the summary's slot, and is skipped, saying so, once it has not. A step past
its timeout is killed with its whole process group.

Output (`--out`): at most 8 files, no folder (`output_files`). Every step writes into `--out`
as it goes (pytest appends each test's outcome to tests.jsonl, the Table 5 runs rewrite their
JSON after every row, the micro-benchmarks append each row to micro.jsonl), and report.json
and summary.md are rewritten when a step starts and ends, so a kill at any moment keeps every
finished result. `--resume` continues a report cut short: finished result steps are kept,
the environment and the build (the state of a fresh machine) are redone.

Nothing here changes GPU settings (clocks, power, persistence, MIG): NVML is only read.
`--summarize report.json` re-renders the summary of a stored report, on any machine.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .env import format_env, scrub_paths
from .paper import TABLE5_MODELS
from .report import render_markdown

SCHEMA = "mvit3.gpu_report/2"
DEFAULT_BUDGET_S = 480.0
# What every report may write into --out, besides one JSON per benchmark step
# (`output_files`): the device tool brings back at most 8 files.
COMMON_FILES = ("summary.md", "report.json", "log.txt", "tests.jsonl", "micro.jsonl", "step.json")
STEP_SCRATCH = "step.json"  # a subprocess's JSON result, merged into report.json, then removed
FOCUSES = ("all", "compile", "micro", "table5", "dense")
ALL_MODELS = TABLE5_MODELS + ("mobilevitv3_050", "mobilevitv3_075", "mobilevitv3_100")
# The dense lease's models: those the fast dense models are tested on (issue 15), v1-style and
# v2-style each; the other dense models cost a lease the same and show nothing new.
DENSE_SEG_MODELS = ("deeplabv3_mobilevitv3_xs_voc", "deeplabv3_mobilevitv3_050_ade20k")
DENSE_DET_MODELS = ("ssdlite_mobilevitv3_xs_coco", "ssdlite_mobilevitv3_100_coco")
SANITIZER_TOOLS = ("memcheck", "racecheck")
SANITIZER_ERROR_EXIT = 86  # compute-sanitizer's exit code when it found errors (--error-exitcode)
SANITIZER_REFUSED = "Device not supported"  # its message where the runtime hides the GPU's debug interface
KERNEL_BACKENDS = ("triton", "cuda")  # fast/torch is a CPU path: not worth GPU minutes
# The first lease's micro-benchmarks: the three headline ops of the v3 block at v3-XS shapes.
MICRO_FIRST_MODEL = "mobilevitv3_xs"
MICRO_FIRST_KINDS = ("attention", "mlp", "fusion")
# The single library op each micro-benchmark kind times (attention_path is two ops).
KIND_OPS = {"stem": "conv3x3", "mv2": "dwconv_pointwise", "attention": "patch_attention",
            "mlp": "transformer_mlp", "fusion": "pointwise_conv",
            "separable_attention": "separable_attention"}
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    budget_s: float  # the planned slot
    min_s: float  # not started when less than this is left of its slot
    options: tuple = ()  # (key, value) pairs for the step's runner

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


# The two slots that run no subprocess of the report: the install before it, the summary after.
OUTSIDE_STEPS = ("install", "summary")
# Steps that set up the machine: redone on --resume (a fresh machine has neither).
SETUP_STEPS = ("env", "build")


INSTALL = Step("install", "pip install (before the report starts)", 30, 0)
ENV = Step("env", "environment and backends", 15, 10)
BUILD = Step("build", "build the CUDA C++ library for this GPU's arch", 60, 20)
CEILINGS = Step("ceilings", "copy bandwidth and fp16 matmul probes", 10, 5)
SUMMARY = Step("summary", "summary.md and report.json", 20, 0)


def _lease(*steps: Step) -> list:
    """A lease's plan: the install and the machine's set-up, `steps`, the summary."""
    return [INSTALL, ENV, BUILD, *steps, SUMMARY]


def _bench(task: str, dtype: str, title: str, budget_s: float, min_s: float, models: tuple,
           **options) -> Step:
    """A `python -m mvit3 bench --task <task>` step; it writes <name>.json."""
    name = f"{'table5' if task == 'cls' else task}_{dtype}"
    return Step(name, title, budget_s, min_s,
                (("task", task), ("dtype", dtype), ("models", models), *options.items()))


def _first_lease() -> list:
    return _lease(
        Step("tests", "correctness sweep: pytest -m gpu, parallel", 150, 30,
             (("k", "not max_autotune"),)),
        # Four sanitized processes (two tools, two backends), each a Python start-up, CUDA
        # initialisation and two forwards slowed tens of times.
        Step("sanitizer", "compute-sanitizer memcheck and racecheck", 60, 15),
        CEILINGS,
        _bench("cls", "fp16", "Table 5, fp16", 60, 20, TABLE5_MODELS, compile_mode="default"),
        _bench("cls", "fp32", "Table 5, fp32", 45, 20, TABLE5_MODELS, compile_mode="default"),
        Step("micro", "headline ops at v3-XS shapes, fp16", 30, 15,
             (("models", (MICRO_FIRST_MODEL,)), ("kinds", MICRO_FIRST_KINDS),
              ("dtypes", ("fp16",)))))


def _compile_lease() -> list:
    compiled = ("reference", "cuda-graph", "compile", "timm-compile")
    return _lease(
        CEILINGS,
        _bench("cls", "fp16", "torch.compile (default mode) rows, fp16", 165, 30, TABLE5_MODELS,
               compile_mode="default", impls=compiled),
        Step("tests", "torch.compile max-autotune tests", 100, 30, (("k", "max_autotune"),)),
        _bench("cls", "fp32", "torch.compile (default mode) rows, fp32", 80, 30, TABLE5_MODELS,
               compile_mode="default", impls=compiled))


def _micro_lease() -> list:
    return _lease(CEILINGS,
                  Step("micro", "every op of six v3 models, batch 1 and 100, fp16 and fp32", 345, 30))


def _table5_lease() -> list:
    no_compile = ("reference", "timm", "fast", "cuda-graph")
    return _lease(
        CEILINGS,
        _bench("cls", "fp16", "Table 5 and v3 0.5/0.75/1.0, fp16", 175, 30, ALL_MODELS,
               impls=no_compile),
        _bench("cls", "fp32", "Table 5 and v3 0.5/0.75/1.0, fp32", 170, 30, ALL_MODELS,
               impls=no_compile))


def _dense_lease() -> list:
    # Reference, fast per backend and CUDA-graph rows first, model by model; the compile rows
    # (default mode) after them, while the step's budget lasts.
    return _lease(
        CEILINGS,
        _bench("seg", "fp16", "DeepLabv3 at 512 px, fp16", 190, 30, DENSE_SEG_MODELS,
               compile_mode="default"),
        _bench("det", "fp16", "SSDLite at 320 px, fp16", 155, 30, DENSE_DET_MODELS,
               compile_mode="default"))


_PLANS = {"all": _first_lease, "compile": _compile_lease, "micro": _micro_lease,
          "table5": _table5_lease, "dense": _dense_lease}


def output_files(focus: str) -> tuple:
    """Every file a report of this focus may write into --out."""
    return COMMON_FILES + tuple(f"{s.name}.json" for s in plan(focus) if s.option("task"))


def plan(focus: str = "all", budget_s: float = DEFAULT_BUDGET_S) -> list:
    """The steps of a lease with their slots, scaled so that they add up to `budget_s`."""
    if focus not in _PLANS:
        raise ValueError(f"focus must be one of {FOCUSES}, got {focus!r}")
    steps = _PLANS[focus]()
    scale = budget_s / sum(s.budget_s for s in steps)
    return [Step(s.name, s.title, round(s.budget_s * scale, 1), s.min_s, s.options) for s in steps]


def plan_json(focus: str, budget_s: float) -> dict:
    steps, start = [], 0.0
    for step in plan(focus, budget_s):
        steps.append({"step": step.name, "title": step.title, "budget_s": step.budget_s,
                      "min_s": step.min_s, "planned_start_s": round(start, 1),
                      "planned_end_s": round(start + step.budget_s, 1),
                      **{k: list(v) if isinstance(v, tuple) else v for k, v in step.options}})
        start += step.budget_s
    return {"schema": SCHEMA, "focus": focus, "budget_s": budget_s, "total_s": round(start, 1),
            "output_files": list(output_files(focus)), "steps": steps}


class Budget:
    """The lease's wall clock: `already_s` had passed when the report started (the install);
    `clock` is injectable for tests."""

    def __init__(self, steps: list, clock: Callable[[], float] = time.monotonic,
                 already_s: float = 0.0):
        self.steps, self.clock = steps, clock
        self.start = clock() - already_s

    def elapsed(self) -> float:
        return self.clock() - self.start

    def slot_end(self, name: str) -> float:
        """Seconds from the lease's start by which step `name` must have ended."""
        end = 0.0
        for step in self.steps:
            end += step.budget_s
            if step.name == name:
                return end
        raise KeyError(name)

    def room(self) -> float:
        """Seconds left for steps: up to the summary's slot."""
        last = [s.name for s in self.steps if s.name not in OUTSIDE_STEPS][-1]
        return self.slot_end(last) - self.elapsed()

    def timeout_for(self, step: Step) -> Optional[float]:
        """What is left of the step's slot, but at least its minimum (a slot the steps before
        overran still runs at its minimum) and at most what is left before the summary; None
        when that is below its minimum: the step is skipped."""
        timeout = min(max(step.min_s, self.slot_end(step.name) - self.elapsed()), self.room())
        return timeout if timeout >= step.min_s else None


# ---- subprocesses --------------------------------------------------------------------------

@dataclass
class CommandResult:
    returncode: Optional[int]  # None when it was killed at its timeout
    elapsed_s: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


class Interrupted(Exception):
    """gpu-report itself got SIGTERM or SIGINT; the step in flight was ended."""


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: list, timeout_s: float, log, cwd=None, env: Optional[dict] = None) -> CommandResult:
    """Run `cmd` in its own process group, output appended to `log`; killed at the timeout.

    `env` entries override the environment; a None value removes the variable. The whole
    group is ended (SIGTERM, then SIGKILL), so no grandchild outlives the step; so it is when
    this process is interrupted (the exception is re-raised).
    """
    log.write(f"\n$ {' '.join(map(str, cmd))}   (timeout {timeout_s:.0f} s)\n")
    log.flush()
    began = time.monotonic()
    start = os.path.getsize(log.name)  # the child appends from here
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = str(value)
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
                            env=child_env)
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
        _end_group(proc)
    except BaseException:
        _end_group(proc)
        raise
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

def read_jsonl(path) -> list:
    """The records of a JSON-lines file appended to as results came; a torn last line (the
    writer was killed mid-line) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_table(path: Path) -> Optional[dict]:
    """A Table 5 JSON (`python -m mvit3 bench --json`), or None when it is missing or was cut
    mid-write (the bench run rewrites it after every row; a kill can land in a write)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def parse_results_log(path) -> dict:
    """Counts and per-test outcomes of pytest's `--results-log` file (tests/conftest.py)."""
    tests = read_jsonl(path)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "total": len(tests), "tests": tests}


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


def compute_sanitizer() -> Optional[str]:
    """The compute-sanitizer executable, or None."""
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    for candidate in (shutil.which("compute-sanitizer"), cuda_home / "bin" / "compute-sanitizer",
                      cuda_home / "compute-sanitizer" / "compute-sanitizer"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


_SANITIZER_SUMMARY = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY):.*")


def sanitizer_summary(output: str) -> Optional[str]:
    """compute-sanitizer's closing line ("ERROR SUMMARY: 0 errors", "RACECHECK SUMMARY: ...")."""
    found = list(_SANITIZER_SUMMARY.finditer(output))
    return found[-1].group(0).strip() if found else None


def xdist_workers() -> Optional[int]:
    """pytest-xdist workers for the tests step (Triton compiles are the cost: one per core,
    at most 8), or None without pytest-xdist."""
    if importlib.util.find_spec("xdist") is None:
        return None
    return max(1, min(8, os.cpu_count() or 1))


def auto_order_evidence(micro: list) -> dict:
    """From micro-benchmark rows: per library op, the backend that was faster in every case
    measured ({op: {"order": [faster, slower], "cases": n}}), or "mixed" where neither was."""
    pairs = defaultdict(dict)
    for row in micro:
        op = KIND_OPS.get(row.get("kind"))
        if op and row.get("impl") in KERNEL_BACKENDS and row.get("gpu_ms_median") is not None:
            pairs[(op, row["group"])][row["impl"]] = row["gpu_ms_median"]
    wins = defaultdict(list)
    for (op, _), ms in pairs.items():
        if len(ms) == 2:
            wins[op].append(min(ms, key=ms.get))
    evidence = {}
    for op, winners in wins.items():
        if len(set(winners)) == 1:
            faster = winners[0]
            slower = next(b for b in KERNEL_BACKENDS if b != faster)
            evidence[op] = {"order": [faster, slower], "cases": len(winners)}
        else:
            evidence[op] = {"order": "mixed", "cases": len(winners),
                            "triton_faster": winners.count("triton")}
    return evidence


# ---- the steps -----------------------------------------------------------------------------

# Statuses of a step that ran to an end of its own; "running" (killed from outside) and
# "interrupted" (gpu-report got SIGTERM) are not among them: --resume runs those again.
FINAL = ("ok", "failed", "timeout", "cut", "skipped")


class Report:
    """Runs a plan's steps into `out`; `report` is the JSON with everything."""

    def __init__(self, out: Path, budget: Budget, focus: str, log, skip: tuple = (),
                 tf32: bool = False, commit: Optional[str] = None,
                 previous: Optional[dict] = None):
        self.out, self.budget, self.focus, self.log = out, budget, focus, log
        self.skip, self.tf32, self.commit = skip, tf32, commit
        self.python = sys.executable
        from .env import project_root

        self.root = project_root()
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.report = previous or {
            "schema": SCHEMA, "started_utc": now, "focus": focus,
            "budget_s": sum(s.budget_s for s in budget.steps), "argv": sys.argv[1:],
            "plan": plan_json(focus, sum(s.budget_s for s in budget.steps))["steps"],
            "steps": [], "env": None, "backends_after_build": None, "tests": None,
            "sanitizer": None, "ceilings": None, "bench": {}, "micro": None,
            "auto_order_evidence": None, "runs": [],
        }
        self.report["runs"].append({"started_utc": now, "argv": sys.argv[1:],
                                    "already_s": round(budget.elapsed(), 1)})

    def say(self, text: str) -> None:
        line = f"[{self.budget.elapsed():5.0f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def command(self, cmd: list, timeout_s: float, env: Optional[dict] = None) -> CommandResult:
        # An explicit backend in a test or a benchmark row must stay that backend.
        child_env = {"MVIT3_BACKEND": None, **(env or {})}
        if self.commit:
            child_env["MVIT3_GIT_COMMIT"] = self.commit
        return run_command(cmd, timeout_s, self.log, cwd=self.root, env=child_env)

    def _json_of(self, module: str, timeout_s: float) -> tuple:
        """(record, result): run `python -m <module> --json step.json`; the record it wrote
        (then removed: report.json keeps it), or None when it failed."""
        path = self.out / STEP_SCRATCH
        path.unlink(missing_ok=True)
        result = self.command([self.python, "-m", module, "--json", path], timeout_s)
        if result.returncode != 0 or not path.is_file():
            return None, result
        record = json.loads(path.read_text())
        path.unlink()
        return record, result

    # Each step returns (status, details); raising marks the step failed with the message.
    def step_env(self, step: Step, timeout_s: float):
        env, result = self._json_of("mvit3.bench.env", timeout_s)
        if env is None:
            return _failed(result)
        self.report["env"] = env
        return "ok", {}

    def step_build(self, step: Step, timeout_s: float):
        missing = nvcc_and_cmake()
        if missing:
            return "skipped", {"reason": missing}
        arch = gpu_arch(self.report["env"])
        if arch is None:
            return "skipped", {"reason": "the env step recorded no GPU compute capability"}
        began = time.monotonic()
        result = self.command([self.python, "-m", "mvit3", "build", "--archs", arch], timeout_s)
        if result.returncode != 0:
            return _failed(result)
        left = max(5.0, timeout_s - (time.monotonic() - began))
        env, _ = self._json_of("mvit3.bench.env", left)
        if env is not None:
            self.report["backends_after_build"] = env.get("backends")
        return "ok", {"arch": arch, "build_s": round(result.elapsed_s, 1)}

    def step_tests(self, step: Step, timeout_s: float):
        if not (self.root / "tests").is_dir():
            return "skipped", {"reason": f"no tests/ directory beside the package ({self.root}): "
                                         "run from a checkout"}
        results = self.out / "tests.jsonl"
        results.unlink(missing_ok=True)  # a resumed run starts the sweep again
        workers = xdist_workers()
        cmd = [self.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "--gpu-priority", f"--results-log={results}", "-k", step.option("k")]
        cmd += ["-n", str(workers)] if workers else []
        result = self.command(cmd + ["tests"], timeout_s, env={"MVIT3_REQUIRE_CUDA_LIB": "1"})
        self.report["tests"] = parse_results_log(results) if results.is_file() else None
        counts = (self.report["tests"] or {}).get("counts")
        details = {"counts": counts, "workers": workers or "1 (pytest-xdist not installed)"}
        if result.timed_out:
            return "timeout", {**details, "reason": "killed at its timeout; the outcomes of the "
                                                    "tests that finished are kept"}
        if result.returncode == 5:
            return "failed", {**details, "first_error": "pytest collected no test (exit 5)"}
        if result.returncode != 0:
            return "failed", {**details, "first_error": first_error_line(result.output),
                              "returncode": result.returncode}
        return "ok", details

    def step_sanitizer(self, step: Step, timeout_s: float):
        sanitizer = compute_sanitizer()
        if sanitizer is None:
            return "skipped", {"reason": "compute-sanitizer not found (PATH, CUDA_HOME)"}
        available = {b["backend"]: b for b in (self.report["backends_after_build"]
                                                or (self.report["env"] or {}).get("backends") or [])}
        self.report["sanitizer"] = entries = [
            {"tool": tool, "backend": backend} for backend in KERNEL_BACKENDS for tool in SANITIZER_TOOLS]
        for entry in entries:
            backend = available.get(entry["backend"], {})
            if not backend.get("available"):
                entry.update(status="skipped", note=f"backend {entry['backend']} unavailable: "
                                                    f"{backend.get('reason', 'not recorded')}")
        to_run = [entry for entry in entries if "status" not in entry]
        for entry in to_run:
            entry["status"] = "pending"  # until it runs: a report saved meanwhile says so
        refused = None  # set once the sanitizer refuses this machine: the other runs would too
        began = time.monotonic()
        for i, entry in enumerate(to_run):
            tool, backend = entry["tool"], entry["backend"]
            if refused:
                entry.update(status="skipped", note=refused)
                continue
            left = timeout_s - (time.monotonic() - began)
            share = left / (len(to_run) - i)  # what is left, split over the runs still to come
            if share < 5:
                entry.update(status="cut", note=f"{left:.0f} s left of the step")
                continue
            result = self.command([sanitizer, "--tool", tool, "--print-limit", "20",
                                   "--error-exitcode", str(SANITIZER_ERROR_EXIT), self.python,
                                   "-m", "mvit3.bench.sanitize", "--backend", backend], share,
                                  env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
            fused = [line for line in result.output.splitlines() if "fused op calls" in line]
            entry.update(elapsed_s=round(result.elapsed_s, 1), fused=fused,
                         summary=sanitizer_summary(result.output))
            if SANITIZER_REFUSED in result.output:
                refused = (f"compute-sanitizer refused this machine ('{SANITIZER_REFUSED}'; "
                           "seen on gVisor machines, which have no memory checker)")
                entry.update(status="skipped", note=refused)
            elif result.timed_out:
                entry.update(status="timeout", note=f"killed after {share:.0f} s")
            elif result.returncode == SANITIZER_ERROR_EXIT:
                entry.update(status="failed", note=entry["summary"])
            elif result.returncode != 0:
                entry.update(status="failed", note=first_error_line(result.output))
            else:
                entry.update(status="ok", note=entry["summary"])
            self.save()
        statuses = [e["status"] for e in entries]
        if set(statuses) == {"skipped"}:
            return "skipped", {"reason": refused or entries[0]["note"]}
        status = ("failed" if "failed" in statuses else "timeout" if "timeout" in statuses
                  else "cut" if "cut" in statuses else "ok")
        return status, {"runs": {s: statuses.count(s) for s in dict.fromkeys(statuses)}}

    def step_ceilings(self, step: Step, timeout_s: float):
        ceilings, result = self._json_of("mvit3.bench.ceilings", timeout_s)
        if ceilings is None:
            return _failed(result)
        self.report["ceilings"] = ceilings
        return "ok", {"gbps": round(ceilings["copy"]["gbps"]),
                      "fp16_tflops": round(ceilings["matmul_fp16"]["tflops"], 1)}

    def ceilings_spec(self) -> str:
        """What the benchmark steps take as their floors' ceilings: this report's file once its
        ceilings step measured them, else the datasheet (measuring again would cost the lease
        the time the failed step did)."""
        return str(self.out / "report.json") if self.report["ceilings"] else "datasheet"

    def _bench_table(self, step: Step, timeout_s: float):
        path = self.out / f"{step.name}.json"
        path.unlink(missing_ok=True)
        # Stop starting rows early enough for the row in flight to finish before the timeout.
        inner_budget = max(10.0, timeout_s - max(15.0, 0.15 * timeout_s))
        cmd = [self.python, "-m", "mvit3", "bench", "--task", step.option("task"), "--device",
               "cuda", "--dtype", step.option("dtype"), "--models", ",".join(step.option("models")),
               "--backends", ",".join(KERNEL_BACKENDS), "--lease", "--json", path,
               "--budget-s", f"{inner_budget:.0f}", "--ceilings", self.ceilings_spec(),
               "--no-progress"]
        if step.option("impls"):
            cmd += ["--impls", ",".join(step.option("impls"))]
        if step.option("compile_mode"):
            cmd += ["--compile", "--compile-mode", step.option("compile_mode")]
        else:
            cmd += ["--no-compile"]
        result = self.command(cmd + (["--tf32"] if self.tf32 else []), timeout_s)
        bench = read_table(path)  # partial when the step was killed: still evidence
        if bench is None:
            return _failed(result)
        self.report["bench"][step.name] = {"file": path.name, "rows": len(bench["rows"])}
        rows = bench["rows"]
        details = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
        if result.timed_out:
            return "timeout", {**details, "reason": "killed at its timeout; rows so far kept"}
        return ("ok" if result.returncode == 0 else "failed"), details

    step_table5_fp16 = step_table5_fp32 = step_seg_fp16 = step_det_fp16 = _bench_table

    def step_micro(self, step: Step, timeout_s: float):
        from mvit3 import bench

        path = self.out / "micro.jsonl"
        path.unlink(missing_ok=True)
        budget = max(10.0, timeout_s - max(10.0, 0.1 * timeout_s))
        cmd = [self.python, "-m", "pytest", Path(bench.__file__).parent / "test_ops_bench.py",
               "--benchmark-only", "-q", "-p", "no:cacheprovider"]
        selection = micro_selection(step)
        if selection:
            cmd += ["-k", selection]
        result = self.command(cmd, timeout_s, env={
            "MVIT3_BENCH_BUDGET_S": f"{budget:.0f}", "MVIT3_MICRO_LOG": path,
            "MVIT3_BENCH_TF32": "1" if self.tf32 else "0", "MVIT3_CEILINGS": self.ceilings_spec()})
        if not path.is_file():
            return _failed(result)
        self.report["micro"] = read_jsonl(path)
        capability = ((self.report["env"] or {}).get("gpu") or {}).get("compute_capability")
        self.report["auto_order_evidence"] = {"compute_capability": capability,
                                              "ops": auto_order_evidence(self.report["micro"])}
        details = {"benchmarks": len(self.report["micro"])}
        if result.timed_out:
            return "timeout", {**details, "reason": "killed at its timeout; rows so far kept"}
        if result.returncode != 0:
            return "failed", {**details, "first_error": first_error_line(result.output)}
        return "ok", details

    # -- driving --
    def _done(self, name: str) -> bool:
        """A result step that a run before this one (--resume) finished: kept, not rerun."""
        return name not in SETUP_STEPS and any(
            s["step"] == name and s["status"] in FINAL and s.get("reason") not in ("budget", "--skip")
            for s in self.report["steps"])

    def _record(self, entry: dict) -> None:
        """Enter (or replace) a step's entry, the entries in plan order; save."""
        order = [s.name for s in self.budget.steps]
        steps = [s for s in self.report["steps"] if s["step"] != entry["step"]] + [entry]
        self.report["steps"] = sorted(steps, key=lambda s: order.index(s["step"]))
        self.save()

    def run_step(self, step: Step) -> None:
        if self._done(step.name):
            self.say(f"{step.name}: kept from the run before (--resume)")
            return
        entry = {"step": step.name, "title": step.title, "status": "running", "elapsed_s": 0.0,
                 "budget_s": step.budget_s, "timeout_s": None}
        timeout = self.budget.timeout_for(step)
        if step.name in self.skip:
            entry.update(status="skipped", reason="--skip")
        elif timeout is None:
            entry.update(status="skipped", reason="budget",
                         note=f"{max(0.0, self.budget.room()):.0f} s left before the summary, "
                              f"it needs at least {step.min_s:.0f} s")
        else:
            self.say(f"{step.name}: {step.title} (timeout {timeout:.0f} s)")
            entry["timeout_s"] = round(timeout, 1)
            self._record(entry)  # "running": a kill from outside leaves that mark
            began = time.monotonic()
            try:
                status, details = getattr(self, f"step_{step.name}")(step, timeout)
            except (Interrupted, KeyboardInterrupt):
                entry.update(status="interrupted", elapsed_s=round(time.monotonic() - began, 1),
                             reason="gpu-report was interrupted (SIGTERM/SIGINT) during this step")
                self._record(entry)
                raise
            except Exception as err:  # a bug in a parser must not cost the other steps
                status, details = "failed", {"first_error": f"{type(err).__name__}: {err}"}
            entry.update(status=status, elapsed_s=round(time.monotonic() - began, 1), **details)
        why = entry.get("reason") or entry.get("first_error")
        self.say(f"{step.name}: {entry['status']}" + (f" ({why})" if why else ""))
        self._record(entry)

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.budget.elapsed(), 1)
        text = json.dumps(self.report, indent=1, default=str)
        (self.out / "report.json").write_text(scrub_paths(text))
        (self.out / "summary.md").write_text(scrub_paths(render_summary(self.report, self.out)))

    def run(self) -> int:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupted)
        interrupted = False
        try:
            for step in self.budget.steps:
                if step.name not in OUTSIDE_STEPS:
                    self.run_step(step)
        except (Interrupted, KeyboardInterrupt):
            interrupted = True
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.save()
        files = sorted(p.name for p in self.out.iterdir())
        self.say(f"{'interrupted' if interrupted else 'done'}: {', '.join(files)} in {self.out}")
        self.log.flush()
        log_path = Path(self.log.name)  # subprocesses wrote into it: scrubbed once, at the end
        log_path.write_text(scrub_paths(log_path.read_text(encoding="utf-8", errors="replace")))
        failed = [s["step"] for s in self.report["steps"]
                  if s["status"] in ("failed", "timeout", "cut", "interrupted")]
        return 1 if failed or interrupted else 0


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def micro_selection(step: Step) -> Optional[str]:
    """The pytest -k expression of a micro step's subset (ids: model-kind-bB-dtype-impl), or
    None for the whole grid."""
    models, kinds = step.option("models"), step.option("kinds")
    batches, dtypes = step.option("batches"), step.option("dtypes")
    if not (models or kinds or batches or dtypes):
        return None
    parts = [" or ".join(f"{m}-{k}-" for m in models for k in kinds)]
    if batches:
        parts.append(" or ".join(f"-b{b}-" for b in batches))
    if dtypes:
        parts.append(" or ".join(f"-{d}-" for d in dtypes))
    return " and ".join(f"({p})" for p in parts)


def _failed(result: CommandResult):
    if result.timed_out:
        return "timeout", {"first_error": f"killed at its timeout after {result.elapsed_s:.0f} s; "
                                          f"last output: {first_error_line(result.output)}"}
    return "failed", {"first_error": first_error_line(result.output),
                      "returncode": result.returncode}


# ---- the summary ----------------------------------------------------------------------------

def _pct(value: Optional[float], ceiling: Optional[float]) -> str:
    return "" if value is None or not ceiling else f" ({100 * value / ceiling:.0f}%)"


# Columns of the micro-benchmark table after the case and op: (header, cell(impls, ceilings)),
# `impls` the rows of one case by implementation. A new column is one more entry here.
def _micro_ms(impl: str):
    def cell(impls: dict, ceilings: dict) -> str:
        row, stock = impls.get(impl), impls.get("torch", {}).get("gpu_ms_median")
        if not row or row.get("gpu_ms_median") is None:
            return "–"
        ms = row["gpu_ms_median"]
        return f"{ms:.4f}" + (f" ({stock / ms:.2f}x)" if stock and impl in KERNEL_BACKENDS else "")
    return cell


def _best(impls: dict) -> Optional[dict]:
    fused = [impls[i] for i in KERNEL_BACKENDS if i in impls and impls[i].get("gpu_ms_median")]
    return min(fused, key=lambda r: r["gpu_ms_median"]) if fused else None


def _best_gbps(impls: dict, ceilings: dict) -> str:
    best = _best(impls)
    gbps = (ceilings.get("copy") or {}).get("gbps")
    return "–" if best is None else f"{best['gbps']:.0f}{_pct(best['gbps'], gbps)}"


def _best_tflops(impls: dict, ceilings: dict) -> str:
    best = _best(impls)
    peak = (ceilings.get("matmul_fp16") or {}).get("tflops")
    return "–" if best is None else f"{best['tflops']:.2f}{_pct(best['tflops'], peak)}"


def _floor_of_best(impls: dict, ceilings: dict) -> str:
    """The case's roofline floor (the same for every implementation) and the share of it the
    fastest fused implementation achieved."""
    floor_us = next((r["floor_us"] for r in impls.values() if r.get("floor_us") is not None), None)
    if floor_us is None:
        return "–"
    best = _best(impls)
    share = "" if best is None else f" ({100 * floor_us / 1e3 / best['gpu_ms_median']:.0f}%)"
    return f"{floor_us:.2f}{share}"


def micro_floors_note(micro: list) -> str:
    """Which ceilings the micro-benchmarks' floors were computed with, or why there are none."""
    used = next((r["ceilings"] for r in micro if r.get("ceilings")), None)
    if used is None:
        why = next((r["floor_reason"] for r in micro if r.get("floor_reason")), "not recorded")
        return f"No floors: {why}."
    return ("Floor: the roofline of the case's Triton launches (least bytes and FLOPs as "
            f"`python -m mvit3 kernels` counts them) at these ceilings: {used}; in brackets the "
            "share of it the fastest fused implementation achieved (floor / its time).")


MICRO_COLUMNS = (
    ("stock torch ms", _micro_ms("torch")),
    ("triton ms", _micro_ms("triton")),
    ("cuda ms", _micro_ms("cuda")),
    ("reference modules ms", _micro_ms("module")),
    ("best GB/s (of measured copy)", _best_gbps),
    ("best TFLOP/s (of measured fp16 matmul)", _best_tflops),
    ("floor us (best: achieved)", _floor_of_best),
)


def _micro_table(micro: list, ceilings: Optional[dict]) -> list:
    """One line per (model, op, batch, dtype): device time of the stock sequence and of each
    fused implementation, with its speedup, and the best one's rates."""
    groups = {}
    for row in micro:
        groups.setdefault(row["group"], {})[row.get("impl")] = row
    header = ["case", "op"] + [name for name, _ in MICRO_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, impls in groups.items():
        op = next(iter(impls.values())).get("op", "?")
        cells = [cell(impls, ceilings or {}) for _, cell in MICRO_COLUMNS]
        lines.append(f"| {group} | {op} | " + " | ".join(cells) + " |")
    return lines


def _step_note(s: dict) -> str:
    if s["step"] == "tests" and s.get("counts"):
        why = s.get("first_error") or s.get("reason")
        return ", ".join(f"{v} {k}" for k, v in s["counts"].items()) + (f"; {why}" if why else "")
    if s.get("reason") == "budget":
        return f"budget: {s.get('note')}"
    return s.get("reason") or s.get("first_error") or ", ".join(
        f"{k} {v}" for k, v in s.items()
        if k in ("ok", "skipped", "failed", "arch", "build_s", "benchmarks", "gbps", "fp16_tflops",
                 "runs"))


def _not_run_lines(report: dict) -> list:
    """Every planned step that did not run to its end, with why."""
    entries = {s["step"]: s for s in report["steps"]}
    lines = []
    for planned in report.get("plan") or []:
        name = planned["step"]
        if name in OUTSIDE_STEPS:
            continue
        s = entries.get(name)
        if s is None:
            lines.append(f"- {name}: not reached (the report was stopped before it)")
        elif s["status"] == "running":
            lines.append(f"- {name}: cut: the report was killed from outside while it ran")
        elif s["status"] == "interrupted":
            lines.append(f"- {name}: cut: {s['reason']}")
        elif s["status"] in ("timeout", "cut"):
            lines.append(f"- {name}: cut short: {s.get('reason') or s.get('first_error')}")
        elif s["status"] == "skipped":
            lines.append(f"- {name}: skipped: {_step_note(s)}")
    return lines


def render_summary(report: dict, folder: Optional[Path] = None) -> str:
    """summary.md of a report; `folder` holds the Table 5 JSON files it names."""
    env = report.get("env") or {}
    device = env.get("device", "unknown device")
    git = env.get("git") or {}
    lines = [f"# mvit3 GPU report: {device}, {report['started_utc']}", "",
             f"Commit {git.get('commit') or 'unknown'}"
             + (" (with uncommitted changes)" if git.get("dirty") else "")
             + f"; focus {report.get('focus', 'all')}; budget {report['budget_s']:.0f} s, used "
             f"{report.get('elapsed_s', 0):.0f} s. Produced by `python -m mvit3 gpu-report`.",
             "", "## Steps", "",
             "| step | status | time (s) | slot (s) | timeout (s) | note |",
             "|---|---|---|---|---|---|"]
    failures = []
    for s in report["steps"]:
        lines.append(f"| {s['step']} ({s['title']}) | {s['status']} | {s['elapsed_s']} | "
                     f"{s.get('budget_s', '–')} | {s.get('timeout_s') or '–'} | {_step_note(s)} |")
        if s["status"] in ("failed", "timeout"):
            failures.append(f"- step {s['step']}: {s.get('first_error') or s.get('reason')}")
    not_run = _not_run_lines(report)
    lines += ["", "## What did not run, and why", ""] + (not_run or ["every planned step ran to its end"])
    if env:
        lines += ["", "## Environment", ""] + format_env(env)
    if report.get("backends_after_build"):
        lines += [f"- after the build, backend {b['backend']}: "
                  f"{'available' if b['available'] else 'unavailable'} ({b['reason']})"
                  for b in report["backends_after_build"]]
    tests = report.get("tests")
    if tests:
        c = tests["counts"]
        lines += ["", "## Correctness sweep (`pytest -m gpu`)", "",
                  f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                  f"{c['skipped']} skipped ({tests['total']} run; a step cut short at its "
                  "timeout lists the tests that finished)."]
        for t in tests["tests"]:
            if t["outcome"] in ("failed", "error"):
                lines.append(f"- {t['outcome'].upper()} {t['test']}: {t['message']}")
                failures.append(f"- test {t['test']}: {t['message']}")
    if report.get("sanitizer"):
        lines += ["", "## compute-sanitizer", "", "| tool | backend | status | result |",
                  "|---|---|---|---|"]
        for e in report["sanitizer"]:
            lines.append(f"| {e['tool']} | {e['backend']} | {e['status']} | {e.get('note') or '–'} |")
            if e["status"] in ("failed", "timeout"):
                failures.append(f"- {e['tool']} {e['backend']}: {e.get('note')}")
    ceilings = report.get("ceilings")
    if ceilings:
        copy, mm = ceilings["copy"], ceilings["matmul_fp16"]
        lines += ["", "## Ceilings measured here", "",
                  f"- copy: {copy['gbps']:.0f} GB/s ({copy['bytes'] / 2**30:.1f} GiB read + written "
                  f"in {copy['ms_median']:.3f} ms, median of {copy['samples']})",
                  f"- fp16 matmul {mm['n']}^3: {mm['tflops']:.1f} TFLOP/s ({mm['ms_median']:.3f} ms, "
                  f"median of {mm['samples']})"]
    # Keyed by step name ("table5_fp16", "seg_fp16"); reports before --focus dense by dtype.
    for step_name, entry in report.get("bench", {}).items():
        bench = read_table((folder or Path(".")) / entry["file"])
        if bench is None:
            lines += ["", f"## Benchmark {step_name}", "",
                      f"({entry['file']} is not beside this summary, or was cut mid-write)"]
            continue
        lines += ["", render_markdown(bench, heading="##", environment=False).rstrip()]
        failures += [f"- {step_name} {r['model']} {r['impl']}/{r['backend']}: {r['reason']}"
                     for r in bench["rows"] if r["status"] == "failed"]
    if report.get("micro"):
        tf32 = any(r.get("tf32") for r in report["micro"])
        lines += ["", "## Kernel micro-benchmarks", "",
                  "Device time per call (CUDA events, calls queued back to back), median; "
                  f"speedup over the stock torch sequence in brackets; TF32 {'on' if tf32 else 'off'}"
                  " on both sides; rates in brackets as a share of the ceilings measured above."]
        lines += [micro_floors_note(report["micro"]), ""]
        lines += _micro_table(report["micro"], ceilings)
    evidence = report.get("auto_order_evidence")
    if evidence and evidence["ops"]:
        lines += ["", f"## `auto` order evidence (compute capability {evidence['compute_capability']})",
                  "", "The backend faster in every case measured, per op: the rows of "
                  "`MEASURED_AUTO_ORDER` in mvit3/ops/backends.py (copy them there, naming this "
                  "folder). 'mixed': neither won every case; nothing to record.", ""]
        for op, e in evidence["ops"].items():
            order = e["order"] if e["order"] == "mixed" else " > ".join(e["order"])
            lines.append(f"- {op}: {order} ({e['cases']} case{'s' if e['cases'] != 1 else ''})")
    lines += ["", "## Failures", ""] + (failures or ["none"])
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: gpu-report-<device>-<date> here)")
    parser.add_argument("--focus", choices=FOCUSES, default="all",
                        help="all: the first lease; compile, micro, table5: a later lease around "
                             "what the first left out; dense: the segmentation and detection "
                             "benchmarks (issue 15)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget of the lease, install included (default "
                             f"{DEFAULT_BUDGET_S:.0f}); the plan's slots are scaled to it")
    parser.add_argument("--started-at", type=float, default=None, metavar="UNIX_SECONDS",
                        help="when the lease's command started (`date +%%s` before the install), "
                             "so that the install counts against the budget")
    parser.add_argument("--plan", action="store_true",
                        help="print the plan (steps, slots, minimums) as JSON and exit; any machine")
    parser.add_argument("--resume", action="store_true",
                        help="continue the report in --out: its finished result steps are kept")
    parser.add_argument("--commit", default=None, metavar="HASH",
                        help="the commit to record where the tree has no .git (MVIT3_GIT_COMMIT)")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 on in fp32 matmuls and convolutions, for both sides of every "
                             "comparison (off by default: IEEE fp32)")
    parser.add_argument("--skip", default="", help="steps to leave out, comma-separated")
    parser.add_argument("--summarize", type=Path, metavar="REPORT_JSON",
                        help="only re-render summary.md of a stored report.json (no GPU needed)")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _load_previous(out: Path, focus: str) -> dict:
    path = out / "report.json"
    if not path.is_file():
        raise ValueError(f"--resume: {path} does not exist")
    previous = json.loads(path.read_text())
    if previous.get("schema") != SCHEMA or previous.get("focus") != focus:
        raise ValueError(f"--resume: {path} is a report of schema {previous.get('schema')} and "
                         f"focus {previous.get('focus')}, this run is {SCHEMA}, focus {focus}")
    return previous


def run(args) -> int:
    if args.summarize:
        report = json.loads(args.summarize.read_text())
        out = args.out or args.summarize.parent
        out.mkdir(parents=True, exist_ok=True)
        text = render_summary(report, args.summarize.parent)
        (out / "summary.md").write_text(text)
        print(text)
        return 0
    if args.plan:
        print(json.dumps(plan_json(args.focus, args.budget_s), indent=1))
        return 0
    steps = plan(args.focus, args.budget_s)
    skip = tuple(filter(None, (s.strip() for s in args.skip.split(","))))
    runnable = [s.name for s in steps if s.name not in OUTSIDE_STEPS]
    unknown = [s for s in skip if s not in runnable]
    if unknown:
        print(f"error: --skip: unknown steps {unknown}; steps of this plan: {runnable}",
              file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu-report: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
              "nothing was run. `--plan` shows the plan on any machine; without a GPU use "
              "`python -m mvit3 bench --device cpu`.", file=sys.stderr)
        return 2
    already = 0.0 if args.started_at is None else max(0.0, time.time() - args.started_at)
    budget = Budget(steps, already_s=already)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    out = (args.out or Path(f"gpu-report-{_slug(torch.cuda.get_device_name(0))}-{stamp}")).resolve()
    out.mkdir(parents=True, exist_ok=True)  # absolute: the steps run in the checkout
    try:
        previous = _load_previous(out, args.focus) if args.resume else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(out / "log.txt", "a", encoding="utf-8") as log:
        return Report(out, budget, args.focus, log, skip=skip, tf32=args.tf32, commit=args.commit,
                      previous=previous).run()
