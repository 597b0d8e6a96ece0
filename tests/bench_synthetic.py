"""A benchmark result with known numbers, as `python -m mvit3 bench --json` writes it on a GPU,
for testing the reporting code without a GPU (tests/test_bench.py, tests/test_gpu_report.py)."""

from __future__ import annotations

import functools

import torch

from mvit3.bench.cli import build_result
from mvit3.bench.runner import RowSpec, RunConfig, empty_row, model_facts
from mvit3.bench.timing import PROTOCOLS

GPU_ENV = {
    "time_utc": "2026-01-01T00:00:00+00:00", "device_type": "cuda",
    "device": "NVIDIA H100 80GB HBM3", "cpu": "test CPU", "cpu_count": 16, "loadavg": [0.5, 0.5, 0.5],
    "python": "3.12.0", "platform": "Linux", "torch": "2.11.0", "triton": "3.6.0",
    "cuda_runtime": "12.8", "cudnn": 90800, "tf32": {"matmul": False, "cudnn": False},
    "git": {"commit": "0123456789abcdef", "dirty": False, "source": "git"}, "mvit3": "0.1.0",
    "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "multiprocessors": 132,
            "memory_total_gib": 79.2},
    "nvml": {"available": True, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1234",
             "driver": "570.00", "compute_capability": "9.0", "memory_total_gib": 79.6,
             "max_sm_clock_mhz": 1980, "max_mem_clock_mhz": 2619,
             "state": {"sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "temperature_c": 40,
                       "power_w": 120.0, "power_limit_w": 700.0, "throttle_reasons": []}},
    "backends": [{"backend": "torch", "available": True, "reason": "reference math"},
                 {"backend": "triton", "available": True, "reason": "CUDA device"},
                 {"backend": "cuda", "available": False, "reason": "not built"}],
}

# model -> {(impl, backend): batch-1 latency median in ms}; throughput = 100 / latency * 20.
LATENCIES = {
    "mobilevit_xxs": {("reference", "eager"): 8.0, ("fast", "triton"): 2.0,
                      ("compile", "max-autotune"): 4.0},
    "mobilevitv3_xxs": {("reference", "eager"): 6.0, ("fast", "triton"): 1.5,
                        ("cuda-graph", "auto"): 0.5, ("compile", "max-autotune"): 3.0},
    "mobilevitv3_xxs_l2": {("reference", "eager"): 5.0, ("fast", "triton"): 1.25},
}


@functools.lru_cache(maxsize=None)
def _facts(model: str) -> dict:
    return model_facts(model)


def synthetic_result() -> dict:
    config = RunConfig(device=torch.device("cuda"), dtype="fp32", protocol=PROTOCOLS["default"],
                       throughput_batch=100, backends=("triton", "cuda"), compile=True,
                       compile_mode="max-autotune")
    rows = []
    for model, latencies in LATENCIES.items():
        facts = _facts(model)
        for (impl, backend), ms in latencies.items():
            row = empty_row(RowSpec(model, impl, backend), config, facts)
            row.update(latency_ms_median=ms, latency_ms_mean=ms * 1.1, latency_ms_p10=ms * 0.9,
                       latency_ms_p90=ms * 1.2, latency_n=500, throughput_img_s=2000.0 / ms,
                       throughput_n=50, launches=50 if impl == "fast" else 260, max_rel_err=1e-6)
            rows.append(row)
        skipped = empty_row(RowSpec(model, "fast", "cuda"), config, facts)
        skipped.update(status="skipped", reason="backend cuda unavailable: not built")
        rows.append(skipped)
    failed = empty_row(RowSpec("mobilevitv3_xxs_l2", "cuda-graph", "auto"), config,
                       _facts("mobilevitv3_xxs_l2"))
    failed.update(status="failed", reason="RuntimeError: capture failed on purpose")
    rows.append(failed)
    return build_result(GPU_ENV, config, list(LATENCIES), rows, True)
