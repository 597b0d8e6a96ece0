"""Kernel micro-benchmarks: each fused op against the stock-op sequence it replaces.

Run with `pytest bench/ --benchmark-only [--benchmark-json=PATH]` on a CUDA machine; without
one every benchmark skips with the reason. Not part of the default `pytest` run.

For each v3 model (XXS/XS/S and 0.5/0.75/1.0), batch 1 and 100, fp32 and fp16, and each op of
`mvit3.bench.cases`, the implementations are:
  triton, cuda   the fused op on that backend (skipped with the reason where unavailable);
  torch          the stock-op sequence the op replaces (`mvit3.ops.reference`, torch eager);
  module         the reference model's modules (the three headline paths only).
pytest-benchmark's own statistics are the wall time of one call followed by a device
synchronisation (what eager code sees). `extra_info` adds CUDA-event device time per call with
calls queued back to back (`gpu_ms_*`), the GB/s and TFLOP/s derived from it, and the largest
relative difference from the stock sequence, and the roofline floor of the case (its Triton
launches' least bytes and FLOPs, as the kernels report counts them, recorded in a dry run) with
the achieved fraction of it (`floor_us`, `of_floor`, `ceilings`: `mvit3.bench.floors`).
MVIT3_CEILINGS picks the ceilings: a file (gpu-report passes its report.json), "measure" (the
default: a few seconds of probes once per session) or "datasheet".

TF32 is off on both sides unless MVIT3_BENCH_TF32=1 (bench/conftest.py); `extra_info.tf32`
records which. With MVIT3_MICRO_LOG=PATH each benchmark's row is also appended to that
JSON-lines file as soon as it is measured.

MVIT3_BENCH_DEVICE=cpu runs the harness on the CPU (perf_counter timings, torch and module
only): a check of the benchmarks themselves, not a measurement.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from mvit3.bench import ceilings as ceiling_probes
from mvit3.bench import floors
from mvit3.bench.cases import HEADLINE, MICRO_MODELS, build_cases, kinds
from mvit3.bench.timing import synchronize, tf32_requested, time_callable

DEVICE = torch.device(os.environ.get("MVIT3_BENCH_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="kernel micro-benchmarks time CUDA kernels: no CUDA device")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BATCHES = (1, 100)
IMPLS = ("triton", "cuda", "torch", "module")
# Seconds of timed work per benchmark and per measurement (wall and device time).
TARGET_S = float(os.environ.get("MVIT3_BENCH_TARGET_S", "0.2"))
# Device time per back-to-back sample: long enough to hide the launch gaps between calls.
SAMPLE_MS = 1.0


def _params():
    # Order: the tests of one (dtype, batch, model) follow each other and share its cases.
    for dtype in DTYPES:
        for batch in BATCHES:
            for model in MICRO_MODELS:
                for kind in kinds(model):
                    for impl in IMPLS:
                        if impl == "module" and kind not in HEADLINE:
                            continue
                        yield pytest.param(dtype, batch, model, kind, impl,
                                           id=f"{model}-{kind}-b{batch}-{dtype}-{impl}")


@functools.lru_cache(maxsize=1)
def _cases(model: str, batch: int, dtype: str) -> dict:
    return build_cases(model, batch, DTYPES[dtype], DEVICE)


@functools.lru_cache(maxsize=1)
def _stock_output(model: str, batch: int, dtype: str, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return _cases(model, batch, dtype)[kind].fused("torch").double()


@functools.lru_cache(maxsize=1)
def _ceilings() -> tuple:
    """(Ceilings or None, why none) of this session's floors."""
    if DEVICE.type != "cuda":
        return None, "no floors on a CPU (they are a GPU's)"
    return floors.resolve(os.environ.get("MVIT3_CEILINGS", floors.MEASURE),
                          torch.cuda.get_device_name(DEVICE),
                          measure=lambda: ceiling_probes.measure(DEVICE))


def floor_info(case, ceilings, no_floor_reason) -> dict:
    """extra_info's floor of a case: its Triton launches' roofline floor at the ceilings, or
    None and the reason."""
    if ceilings is None:
        return {"floor_us": None, "floor_reason": no_floor_reason}
    try:
        floor = floors.ops_floor_us(lambda: case.fused("triton"), ceilings.gpu)
    except Exception as err:  # the Triton backend refuses the case: no launch to take a floor of
        return {"floor_us": None, "floor_reason": f"{type(err).__name__}: {err}".splitlines()[0]}
    return {"floor_us": floor, "ceilings": ceilings.describe()}


@functools.lru_cache(maxsize=None)
def _floor(model: str, batch: int, dtype: str, kind: str) -> dict:
    return floor_info(_cases(model, batch, dtype)[kind], *_ceilings())


@pytest.mark.parametrize("dtype,batch,model,kind,impl", list(_params()))
def test_op(benchmark, measured_rows, dtype, batch, model, kind, impl):
    from mvit3.ops import BackendUnavailable

    case = _cases(model, batch, dtype)[kind]
    fn = case.module if impl == "module" else functools.partial(case.fused, impl)
    benchmark.group = f"{model} {kind} batch {batch} {dtype}"
    with torch.no_grad():
        try:
            out = fn()
        except BackendUnavailable as why:
            pytest.skip(str(why))
        expected = _stock_output(model, batch, dtype, kind)
        rel_err = float((out.double() - expected).abs().max() / expected.abs().max())
        one_call = time_callable(fn, DEVICE, warmup=2, iters=3)
        inner = max(1, min(100, int(SAMPLE_MS / max(one_call.median_ms, 1e-3))))
        queued = time_callable(fn, DEVICE, warmup=1, iters=200, min_iters=5,
                               max_s=TARGET_S, inner=inner)

        def call_and_sync():
            fn()
            synchronize(DEVICE)

        rounds = max(5, min(500, int(TARGET_S * 1e3 / max(one_call.median_ms, 1e-3))))
        benchmark.pedantic(call_and_sync, rounds=rounds, warmup_rounds=2)
    seconds = queued.median_ms / 1e3
    floor = _floor(model, batch, dtype, kind)
    floor_ms = None if floor["floor_us"] is None else floor["floor_us"] / 1e3
    benchmark.extra_info.update(
        **floor, of_floor=floors.achieved(floor_ms, queued.median_ms),
        model=model, kind=kind, op=case.ops, where=case.where, impl=impl,
        gpu_ms_median=queued.median_ms, gpu_ms_p10=queued.p10_ms, gpu_ms_p90=queued.p90_ms,
        gpu_calls_per_sample=inner, gpu_samples=queued.n,
        flops=case.flops, bytes=case.bytes,
        tflops=case.flops / seconds / 1e12, gbps=case.bytes / seconds / 1e9,
        max_rel_err_vs_stock=rel_err, tf32=tf32_requested(),
    )
    measured_rows.append({"name": benchmark.name, **benchmark.extra_info})
    log = os.environ.get("MVIT3_MICRO_LOG")
    if log:
        with open(log, "a") as rows:
            rows.write(json.dumps({"name": benchmark.name, "group": benchmark.group,
                                   "wall_ms_median": benchmark.stats.stats.median * 1e3,
                                   **benchmark.extra_info}) + "\n")
