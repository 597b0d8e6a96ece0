"""The benchmark runs: every (model, implementation) row, measured, counted and checked.

Three tasks (`TASKS`): `cls`, the paper's Table 5 (classifiers at 256 px, throughput at batch
100); `seg` and `det`, the paper's DeepLabv3 (512 px) and SSDLite (320 px) models (Tables 3
and 4), throughput at batch 16.

Implementations of one model, side by side:
- `reference`  the eager reference model (`mvit3.create_model`), as the paper timed it;
- `fast`       `mvit3.fast` with one kernel backend per row (torch, triton, cuda); a dense
               model through `mvit3.fast.create_model(name)`, a row skipped with the reason
               while that refuses the name;
- `cuda-graph` the fast model (backend auto) replayed from a CUDA graph (CUDA only);
- `compile`    torch.compile of the reference (mode max-autotune on GPU);
- `timm`, `timm-compile`  timm's own model of the same name (v1 and v2 models: the baseline
               users pick today), eager and torch.compile'd. Its weights are timm's random
               initialisation, not the reference's: these rows are timings only, their output
               is not compared (`weights` says so in every such row).

Rows run in priority order: reference, timm, fast and cuda-graph rows model by model, then
the compile rows (minutes each with max-autotune), so a time budget cuts the least important
first. `RunConfig.impls` selects implementations. A row that cannot run (no GPU, mvit3.fast
missing, a backend unavailable, timm not installed) is kept with status "skipped" and the
reason; a row that raises is kept with status "failed" and its first error line: one row never
stops the run.
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import mvit3
from mvit3.ops import BackendUnavailable, availability

from .floors import Ceilings, forward_floors_ms
from .launches import count_launches, dry_run_host_ms
from .paper import dense_paper_row, paper_row
from .timing import QUICK_CPU_THROUGHPUT_BATCH, Protocol, synchronize, time_callable

IMG_SIZE = 256  # Table 5's


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # the report's heading
    pattern: str  # `mvit3.list_models` pattern of its models
    img_size: int
    throughput_batch: Optional[int]  # None: the protocol's (Table 5: 100)
    quick_cpu_batch: int  # the throughput batch of --quick on a CPU


TASKS = {
    "cls": Task("cls", "MobileViT Table 5", "mobilevit*", IMG_SIZE, None, QUICK_CPU_THROUGHPUT_BATCH),
    # A CPU takes seconds per 512 px forward: its quick throughput batch is 2.
    "seg": Task("seg", "DeepLabv3 segmentation", "deeplabv3*", 512, 16, 2),
    "det": Task("det", "SSDLite detection", "ssdlite*", 320, 16, 2),
}
IMPL_ORDER = ("reference", "timm", "fast", "cuda-graph", "compile", "timm-compile")
# Models timm has under the same name and architecture.
TIMM_MODELS = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s",
               "mobilevitv2_050", "mobilevitv2_075", "mobilevitv2_100")
TIMM_WEIGHTS = "timm's random initialisation: timing only, output not compared"
COMPILED_IMPLS = ("compile", "timm-compile")
BACKEND_ORDER = ("eager", "torch", "triton", "cuda", "auto")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class RowSpec:
    model: str
    impl: str
    backend: str  # reference, timm: "eager"; compile, timm-compile: its mode; cuda-graph: "auto"


@dataclass
class RunConfig:
    device: torch.device
    dtype: str
    protocol: Protocol
    throughput_batch: int
    backends: tuple  # fast-model backends to run, e.g. ("torch", "triton", "cuda")
    compile: bool
    compile_mode: str
    deadline: Optional[float] = None  # time.monotonic() after which rows are skipped
    impls: tuple = IMPL_ORDER  # the implementations to run (a subset of IMPL_ORDER)
    task: str = "cls"  # a key of TASKS
    img_size: int = IMG_SIZE
    ceilings: Optional[Ceilings] = None  # of the roofline floors; None: no floors
    no_floors_reason: Optional[str] = None  # why ceilings is None on a CUDA device


class Skip(Exception):
    """This row cannot run here; the message says why."""


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def plan_rows(models, config: RunConfig) -> list:
    """Every row to run, in priority order (see the module docstring)."""
    rows = []
    for model in models:
        rows.append(RowSpec(model, "reference", "eager"))
        if model in TIMM_MODELS:
            rows.append(RowSpec(model, "timm", "eager"))
        rows += [RowSpec(model, "fast", backend) for backend in config.backends]
        if config.device.type == "cuda":
            rows.append(RowSpec(model, "cuda-graph", "auto"))
    if config.compile:
        for model in models:
            rows.append(RowSpec(model, "compile", config.compile_mode))
            if model in TIMM_MODELS:
                rows.append(RowSpec(model, "timm-compile", config.compile_mode))
    return [row for row in rows if row.impl in config.impls]


def sort_key(row: dict) -> tuple:
    """Display order: models as given, then implementation, then backend."""
    impl = IMPL_ORDER.index(row["impl"]) if row["impl"] in IMPL_ORDER else len(IMPL_ORDER)
    backend = (BACKEND_ORDER.index(row["backend"]) if row["backend"] in BACKEND_ORDER
               else len(BACKEND_ORDER))
    return impl, backend


def model_facts(name: str, img_size: int = IMG_SIZE) -> dict:
    """Params, MACs (exact and the paper's convention) at img_size and the paper's figures:
    Table 5's for a classifier; Table 3's or 4's parameters and accuracy for a dense model,
    whose `params_eval` (without the aux head, run only in training) is the paper's count."""
    stats = mvit3.model_stats(name, img_size)
    paper, dense = paper_row(name), dense_paper_row(name)
    return {
        "params": stats["params"],
        "params_eval": stats.get("params_eval"),
        "macs": stats["macs"],
        "macs_cvnets": stats["macs_cvnets"],
        "paper_latency_ms": paper.latency_ms if paper else None,
        "paper_throughput_img_s": paper.throughput_img_s if paper else None,
        "paper_params_m": paper.params_m if paper else dense.params_m if dense else None,
        "paper_flops_m": paper.flops_m if paper else None,
        "paper_top1": paper.top1 if paper else None,
        "paper_metric": dense.metric if dense else None,
        "paper_score": dense.score if dense else None,
    }


def floor_facts(name: str, config: RunConfig) -> dict:
    """The roofline floor of the fused forward (`mvit3.kernel_report`'s bytes and FLOPs at
    `config.ceilings`) at batch 1 and at the throughput batch, in ms; None without ceilings or
    where the kernels report cannot take the model (`floor_reason` says why)."""
    floors = {"floor_ms_b1": None, "floor_ms_batch": None, "floor_reason": config.no_floors_reason}
    if config.ceilings is None:
        return floors
    try:
        floors["floor_ms_b1"], floors["floor_ms_batch"] = forward_floors_ms(
            name, DTYPES[config.dtype], (1, config.throughput_batch), config.ceilings.gpu,
            config.img_size)
    except Exception as err:  # e.g. a dense model mvit3.fast does not build yet
        floors["floor_reason"] = f"the kernels report cannot take {name}: {_first_line(err)}"
    return floors


def empty_row(spec: RowSpec, config: RunConfig, facts: dict) -> dict:
    """A row with every key present; measurements None until made."""
    return {
        "model": spec.model, "impl": spec.impl, "backend": spec.backend, "dtype": config.dtype,
        "device": str(config.device), "status": "ok", "reason": None,
        "latency_ms_mean": None, "latency_ms_median": None, "latency_ms_p10": None,
        "latency_ms_p90": None, "latency_n": None,
        "throughput_img_s": None, "throughput_batch": config.throughput_batch,
        "throughput_ms_median": None, "throughput_n": None,
        "launches": None, "launch_counts": None, "max_rel_err": None, "compile_s": None,
        "weights": TIMM_WEIGHTS if spec.impl.startswith("timm") else "the reference model's",
        **facts,
    }


def _fast_module():
    """mvit3.fast, or Skip with the reason it is not usable."""
    try:
        from mvit3 import fast
    except ImportError as err:
        raise Skip(f"mvit3.fast is not importable ({err})") from None
    for name in ("convert", "cuda_graph"):
        if not hasattr(fast, name):
            raise Skip(f"mvit3.fast has no {name}() yet")
    return fast


def _backend_reason(backend: str) -> Optional[str]:
    """Why a fast-model backend is unavailable on this machine, or None."""
    for name, ok, reason in availability():
        if name == backend:
            return None if ok else reason
    return f"unknown backend {backend!r}"


def _timm_model(name: str) -> torch.nn.Module:
    """timm's model of this name, randomly initialised (nothing is downloaded), checked to
    have the reference's parameter count (the same architecture, not just the same name)."""
    try:
        import timm
    except ImportError:
        raise Skip("timm is not installed (pip install timm)") from None
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    params, expected = sum(p.numel() for p in model.parameters()), mvit3.model_stats(name)["params"]
    if params != expected:
        raise RuntimeError(f"timm's {name} has {params:,} parameters, the reference {expected:,}: "
                           "not the same architecture")
    return model


def _input(batch: int, config: RunConfig) -> torch.Tensor:
    return torch.rand(batch, 3, config.img_size, config.img_size, device=config.device,
                      dtype=DTYPES[config.dtype])


def flat_output(out) -> torch.Tensor:
    """A model's output as one float64 vector: a classifier's or segmenter's logits, or a
    detector's (scores, locations)."""
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return torch.cat([part.double().flatten() for part in parts])


class ModelRunner:
    """Measures the rows of one model; holds its reference model and reference output."""

    def __init__(self, name: str, config: RunConfig):
        self.name = name
        self.config = config
        torch.manual_seed(0)
        reference = mvit3.create_model(name).eval()
        self.x1 = _input(1, config)
        with torch.no_grad():  # fp32 reference output: the yardstick of every row's error
            self.expected = flat_output(reference.to(config.device)(self.x1.float()))
        self.reference = reference.to(dtype=DTYPES[config.dtype])

    def build(self, spec: RowSpec) -> Callable:
        """The module to time for `spec` (raises Skip when it cannot run here)."""
        if spec.impl == "reference":
            return self.reference
        if spec.impl.startswith("timm"):
            model = _timm_model(self.name).to(device=self.config.device,
                                              dtype=DTYPES[self.config.dtype])
            return model if spec.impl == "timm" else self._compiled(model, spec.backend)
        if spec.impl == "compile":
            return self._compiled(copy.deepcopy(self.reference), spec.backend)
        if spec.impl == "cuda-graph":
            if self.config.device.type != "cuda":
                raise Skip("CUDA graphs need a CUDA device")
            return _fast_module().cuda_graph(self.fast_model("auto"))
        reason = _backend_reason(spec.backend)
        if reason is not None:
            raise Skip(f"backend {spec.backend} unavailable: {reason}")
        return self.fast_model(spec.backend)

    def fast_model(self, backend: str) -> torch.nn.Module:
        """The fast model with the reference's weights, in eval mode: `mvit3.fast.convert` of a
        classifier; `mvit3.fast.create_model(name)` of a dense model (Skip while it refuses
        the name: the fast dense models are recent)."""
        fast = _fast_module()
        if self.config.task == "cls":
            return fast.convert(self.reference, backend=backend).eval()
        try:
            model = fast.create_model(self.name, backend=backend)
        except (KeyError, ValueError, TypeError, NotImplementedError) as err:
            raise Skip(f"mvit3.fast.create_model does not take {self.name}: {_first_line(err)}") from None
        model.load_state_dict(self.reference.state_dict())
        return model.to(device=self.config.device, dtype=DTYPES[self.config.dtype]).eval()

    @staticmethod
    def _compiled(model: torch.nn.Module, mode: str) -> Callable:
        torch._dynamo.reset()  # one compiled model at a time: no recompile-limit fallbacks
        return torch.compile(model, mode=mode, dynamic=False)

    def dry_run_launches(self, spec: RowSpec) -> Optional[dict]:
        """Triton launches of a fast row that cannot run here, counted without running it."""
        if spec.impl != "fast" or spec.backend != "triton" or self.config.device.type != "cpu":
            return None
        try:
            model = self.fast_model("triton")
            return {**count_launches(model, self.x1, dry_run=True).as_dict(),
                    "host_ms_dry_run": dry_run_host_ms(model, self.x1)}
        except Exception:  # a missing kernel module: nothing to count
            return None

    def measure(self, spec: RowSpec, row: dict) -> None:
        cfg, protocol = self.config, self.config.protocol
        model = self.build(spec)
        xb = _input(cfg.throughput_batch, cfg)
        with torch.no_grad():
            if spec.impl in COMPILED_IMPLS:
                began = time.perf_counter()
                model(self.x1)
                model(xb)
                synchronize(cfg.device)
                row["compile_s"] = round(time.perf_counter() - began, 2)
            out = model(self.x1)
            if not spec.impl.startswith("timm"):  # timm's weights are its own: no comparison
                row["max_rel_err"] = float((flat_output(out) - self.expected).abs().max()
                                           / self.expected.abs().max())
            latency = time_callable(lambda: model(self.x1), cfg.device, warmup=protocol.warmup,
                                    iters=protocol.latency_iters, min_iters=protocol.min_iters,
                                    max_s=protocol.max_s)
            # One untimed call at the new batch size: compiled and graph-replayed models
            # compile or capture per input shape on their first call.
            throughput = time_callable(lambda: model(xb), cfg.device, warmup=1,
                                       iters=protocol.throughput_iters,
                                       min_iters=protocol.min_iters, max_s=protocol.max_s)
        row.update(latency_ms_mean=latency.mean_ms, latency_ms_median=latency.median_ms,
                   latency_ms_p10=latency.p10_ms, latency_ms_p90=latency.p90_ms,
                   latency_n=latency.n, throughput_ms_median=throughput.median_ms,
                   throughput_n=throughput.n,
                   throughput_img_s=cfg.throughput_batch / (throughput.mean_ms / 1e3))
        # A compiled model must not run under a dispatch mode, and a graph replay hides its
        # kernels from one: those two rows are counted by the profiler only.
        counts = count_launches(model, self.x1,
                                dispatch=spec.impl not in COMPILED_IMPLS + ("cuda-graph",))
        row["launch_counts"] = counts.as_dict()
        row["launches"] = counts.launches

    def run(self, spec: RowSpec, facts: dict) -> dict:
        row = empty_row(spec, self.config, facts)
        try:
            self.measure(spec, row)
        except Skip as why:
            row.update(status="skipped", reason=str(why))
        except BackendUnavailable as why:  # the fast model's first forward: an input it refuses
            row.update(status="skipped", reason=str(why).splitlines()[0])
        except Exception as err:
            row.update(status="failed", reason=_first_line(err),
                       traceback=traceback.format_exc(limit=-8))
        if row["status"] != "ok":
            dry = self.dry_run_launches(spec)
            if dry is not None:
                row.update(launch_counts=dry, launches=dry["launches"],
                           reason=row["reason"] + "; launches counted in a dry run")
        if self.config.device.type == "cuda":
            torch.cuda.empty_cache()
        return row


def run_rows(specs, config: RunConfig, on_row: Optional[Callable] = None,
             on_start: Optional[Callable] = None) -> list:
    """Run `specs` in order; `on_start(spec)` before and `on_row(row)` after each row."""
    facts, runners, rows = {}, {}, []
    for spec in specs:
        if on_start:
            on_start(spec)
        if spec.model not in facts:
            facts[spec.model] = {**model_facts(spec.model, config.img_size),
                                 **floor_facts(spec.model, config)}
        if config.deadline is not None and time.monotonic() > config.deadline:
            row = empty_row(spec, config, facts[spec.model])
            row.update(status="skipped", reason="time budget exhausted (--budget-s)")
        else:
            if spec.model not in runners:
                runners.clear()  # one model's tensors on the device at a time
                runners[spec.model] = ModelRunner(spec.model, config)
            row = runners[spec.model].run(spec, facts[spec.model])
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
