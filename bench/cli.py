"""`python -m mvit3 bench`: the paper's Table 5 reproduced on the device at hand, and the same
measurements for its segmentation and detection models (`--task seg|det`).

Batch-1 latency (mean, median, p10, p90) and batch-100 throughput at 256x256 for the
reference model, the fast model per kernel backend, its CUDA-graph replay, torch.compile
of the reference and, for the v1 and v2 models, timm's model (eager and compiled; its own
random weights, so timings only), with params, MACs, kernel launches per forward and the
paper's RTX 2080 Ti figures beside. `--task seg` / `--task det`: the DeepLabv3 models at 512 px
and the SSDLite models at 320 px, throughput at batch 16, the paper's parameter counts and
accuracy beside (it times none of them). On a GPU each time is shown beside the roofline floor
of the fused forward and the achieved fraction of it (`--ceilings`, `mvit3.bench.floors`).
Output: a markdown table on stdout; --json, --csv, --plot files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from mvit3.models import list_models

from . import ceilings as ceiling_probes
from . import floors
from .env import collect_env, nvml_state, scrub_paths
from .paper import DENSE_SOURCE, PAPER_PROTOCOL, PAPER_SOURCE, TABLE5_MODELS
from .plot import MISSING, matplotlib_missing, plot_result
from .report import compute_ratios, render_csv, render_markdown
from .runner import DTYPES, IMPL_ORDER, TASKS, RowSpec, RunConfig, plan_rows, run_rows
from .timing import PROTOCOLS, numerics

FAST_BACKENDS = ("torch", "triton", "cuda")


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=tuple(TASKS), default="cls",
                        help="cls: Table 5's classifiers at 256 px (default); seg: the DeepLabv3 "
                             "models at 512 px; det: the SSDLite models at 320 px (throughput at "
                             "batch 16 for both)")
    parser.add_argument("--models", default=None,
                        help="'table5' (the paper's nine rows, the default of --task cls), 'all' "
                             "(the default of seg and det: the task's registered models), or a "
                             "comma-separated list of model names or shell patterns (e.g. "
                             "'mobilevitv3_*')")
    parser.add_argument("--img-size", type=int, default=None,
                        help="--task seg|det only: the input side (default 512 / 320, the eval "
                             "sizes; a segmentation input is a multiple of the output stride)")
    parser.add_argument("--ceilings", default=None, metavar="FILE|measure|datasheet",
                        help="the ceilings of the roofline floors shown beside GPU times: a file "
                             "(`python -m mvit3.bench.ceilings --json`, or a gpu-report "
                             "report.json), 'measure' (a few seconds' copy and matmul probes; the "
                             "default on a GPU) or 'datasheet' (mvit3/kernel_report/gpus.py)")
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="fp32 (the paper's), fp16 or bf16")
    parser.add_argument("--backends", default=",".join(FAST_BACKENDS),
                        help="fast-model backends to time, comma-separated (default: all; an "
                             "unavailable one becomes a skipped row with its reason)")
    protocol = parser.add_mutually_exclusive_group()
    protocol.add_argument("--paper-protocol", action="store_true",
                          help="exactly the paper's: fp32, 10 warm-ups, 10,000 batch-1 and 1,000 "
                               "batch-100 runs, means (long)")
    protocol.add_argument("--lease", action="store_true",
                          help="the protocol of a GPU lease (gpu-report): up to 200 batch-1 and "
                               "10 batch-100 runs, at most 0.4 s each, medians")
    protocol.add_argument("--quick", action="store_true",
                          help="a smoke run: few runs per row; on a CPU the throughput batch is "
                               f"{TASKS['cls'].quick_cpu_batch} (seg, det: "
                               f"{TASKS['seg'].quick_cpu_batch}) unless --throughput-batch is given")
    parser.add_argument("--impls", default=",".join(IMPL_ORDER),
                        help="implementations to time, comma-separated (default: all of "
                             f"{', '.join(IMPL_ORDER)}; timm rows only for the models timm has)")
    parser.add_argument("--throughput-batch", type=int, default=None,
                        help="batch size of the throughput runs (default 100, the paper's; seg "
                             "and det: 16)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="time torch.compile of the reference (default: on a GPU, except "
                             "with --quick: max-autotune takes minutes per model)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: max-autotune on a GPU, default on a CPU)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 in fp32 matmuls and convolutions (off by default: the "
                             "paper's fp32 is IEEE fp32)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting rows after this many seconds; the rest are listed "
                             "as skipped")
    parser.add_argument("--json", metavar="PATH", help="write the full result as JSON (updated "
                                                       "after every row)")
    parser.add_argument("--csv", metavar="PATH", help="write one CSV line per row")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown report here")
    parser.add_argument("--plot", metavar="PATH.png", help="latency and throughput chart (matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


class UsageError(Exception):
    pass


def resolve_models(spec, task: str = "cls") -> list:
    """The models of `--models` for a task; each must be one of the task's."""
    task_models = list_models(TASKS[task].pattern)
    if spec is None:
        spec = "table5" if task == "cls" else "all"
    if spec == "table5":
        if task != "cls":
            raise UsageError(f"--models table5 is the classification table; --task {task} "
                             f"takes: {', '.join(task_models)}")
        return list(TABLE5_MODELS)
    if spec == "all":
        return task_models
    names = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        matched = list_models(part)
        if not matched:
            raise UsageError(f"no model matches {part!r}; registered for --task {task}: "
                             f"{', '.join(task_models)}")
        others = [m for m in matched if m not in task_models]
        if others:
            raise UsageError(f"--task {task} does not take {', '.join(others)}; its models: "
                             f"{', '.join(task_models)}")
        names += [m for m in matched if m not in names]
    if not names:
        raise UsageError("--models selects no model")
    return names


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {spec!r}")
    return device


def check_img_size(models: list, config: RunConfig) -> None:
    """A segmentation model takes sides that are multiples of its output stride."""
    if config.task != "seg":
        return
    from mvit3.models import DENSE_CONFIGS

    for name in models:
        stride = DENSE_CONFIGS[name].output_stride
        if config.img_size % stride:
            raise UsageError(f"--img-size {config.img_size}: {name} takes multiples of its output "
                             f"stride {stride} (e.g. {config.img_size // stride * stride or stride})")


def resolve_ceilings(spec, device: torch.device) -> tuple:
    """(Ceilings or None, why none) of the floors: none on a CPU (the floors are a GPU's)."""
    if device.type != "cuda":
        if spec is not None:
            raise UsageError("--ceilings: the floors are a GPU's; this run is on the CPU")
        return None, None
    try:
        return floors.resolve(spec or floors.MEASURE, torch.cuda.get_device_name(device),
                              measure=lambda: ceiling_probes.measure(device))
    except ValueError as err:
        raise UsageError(f"--ceilings: {err}") from None


def make_config(args) -> RunConfig:
    device = resolve_device(args.device)
    task = TASKS[args.task]
    name = ("paper" if args.paper_protocol else "quick" if args.quick
            else "lease" if args.lease else "default")
    protocol = PROTOCOLS[name]
    if args.paper_protocol and task.name != "cls":
        raise UsageError(f"--paper-protocol is Table 5's; the paper times no {task.title} model")
    if args.paper_protocol and (args.dtype != PAPER_PROTOCOL["dtype"] or args.throughput_batch
                                not in (None, PAPER_PROTOCOL["throughput_batch"])):
        raise UsageError("--paper-protocol is the paper's exactly: fp32 and throughput batch 100")
    if args.img_size is not None and task.name == "cls":
        raise UsageError("--img-size applies to --task seg|det; Table 5 is at 256 px, the paper's")
    img_size = task.img_size if args.img_size is None else args.img_size
    if img_size < 32:
        raise UsageError(f"--img-size must be at least 32 (the deepest map's stride), got {img_size}")
    batch = args.throughput_batch
    if batch is None:
        batch = (task.quick_cpu_batch if name == "quick" and device.type == "cpu"
                 else task.throughput_batch or protocol.throughput_batch)
    if batch < 1:
        raise UsageError("--throughput-batch must be at least 1")
    backends = tuple(filter(None, (b.strip() for b in args.backends.split(","))))
    unknown = [b for b in backends if b not in FAST_BACKENDS]
    if unknown:
        raise UsageError(f"--backends: unknown {unknown}; choose from {FAST_BACKENDS}")
    impls = tuple(filter(None, (i.strip() for i in args.impls.split(","))))
    unknown = [i for i in impls if i not in IMPL_ORDER]
    if unknown:
        raise UsageError(f"--impls: unknown {unknown}; choose from {IMPL_ORDER}")
    if not impls:
        raise UsageError(f"--impls selects no implementation; choose from {IMPL_ORDER}")
    compile_ = device.type == "cuda" and name != "quick" if args.compile is None else args.compile
    mode = args.compile_mode or ("max-autotune" if device.type == "cuda" else "default")
    ceilings, no_floors_reason = resolve_ceilings(args.ceilings, device)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    return RunConfig(device=device, dtype=args.dtype, protocol=protocol, throughput_batch=batch,
                     backends=backends, compile=compile_, compile_mode=mode, deadline=deadline,
                     impls=impls, task=task.name, img_size=img_size, ceilings=ceilings,
                     no_floors_reason=no_floors_reason)


class Progress:
    """One line per row on stderr; redrawn in place on a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()
        self.began = time.monotonic()

    def start(self, spec: RowSpec) -> None:
        if not self.enabled:
            return
        width = 24
        filled = width * self.done // max(self.total, 1)
        text = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{time.monotonic() - self.began:5.0f}s  {spec.model} {spec.impl}/{spec.backend}")
        if self.tty:
            sys.stderr.write("\r" + text.ljust(100))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self, row: dict) -> None:
        self.done += 1
        if self.enabled and not self.tty and row["status"] != "ok":
            sys.stderr.write(f"    {row['status']}: {row['reason']}\n")

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * 100 + "\r")


def build_result(env: dict, config: RunConfig, models: list, rows: list, complete: bool) -> dict:
    return {
        "schema": "mvit3.bench/1",
        "env": env,
        "config": {
            "task": config.task, "models": models, "device": str(config.device),
            "dtype": config.dtype, "img_size": config.img_size, "protocol": config.protocol.as_dict(),
            "throughput_batch": config.throughput_batch, "backends": list(config.backends),
            "compile": config.compile, "compile_mode": config.compile_mode,
            "impls": list(config.impls),
            "ceilings": config.ceilings.as_dict() if config.ceilings else None,
            "no_floors_reason": config.no_floors_reason,
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "mvit3_backend_env": os.environ.get("MVIT3_BACKEND"),
            "argv": sys.argv[1:],
        },
        "paper": ({"source": PAPER_SOURCE, "protocol": PAPER_PROTOCOL} if config.task == "cls"
                  else {"source": DENSE_SOURCE, "protocol": None}),
        "rows": rows,
        "complete": complete,
    }


def _write(path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(scrub_paths(text))


def run(args) -> int:
    try:
        models = resolve_models(args.models, args.task)
        config = make_config(args)
        check_img_size(models, config)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plot and matplotlib_missing():
        print(f"error: {MISSING}", file=sys.stderr)
        return 2
    if os.environ.get("MVIT3_BACKEND"):
        print(f"warning: MVIT3_BACKEND={os.environ['MVIT3_BACKEND']} overrides every fast row's "
              "backend", file=sys.stderr)
    specs = plan_rows(models, config)
    progress = Progress(len(specs), enabled=not args.no_progress)
    with numerics(args.tf32, args.paper_protocol):
        env = collect_env(str(config.device))
        rows = []

        def on_row(row: dict) -> None:
            rows.append(row)
            progress.finish(row)
            if args.json:  # partial results survive an interrupted run
                _write(args.json, json.dumps(build_result(env, config, models, rows, False),
                                             indent=1, default=str))

        run_rows(specs, config, on_row=on_row, on_start=progress.start)
        progress.close()
        result = build_result(env, config, models, rows, True)
    result["ratios"] = compute_ratios(result)
    if config.device.type == "cuda":
        result["gpu_state_after"] = nvml_state(config.device.index or 0)
    markdown = render_markdown(result)
    print(scrub_paths(markdown), end="")  # the same text as the --markdown file
    if args.json:
        _write(args.json, json.dumps(result, indent=1, default=str))
    if args.csv:
        _write(args.csv, render_csv(result))
    if args.markdown:
        _write(args.markdown, markdown)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_result(result, args.plot)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} row(s) failed (see 'Not run' above)", file=sys.stderr)
    return 1 if failed else 0
