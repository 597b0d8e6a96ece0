"""Timing: CUDA events on a GPU, perf_counter on the CPU; mean, median, p10, p90.

One sample is `inner` back-to-back calls of `fn` between two timestamps, divided by `inner`;
the device is synchronised after each sample, so samples never overlap. With inner=1 that is
the paper's protocol (an event pair around each forward, then `torch.cuda.synchronize()`):
the latency one call sees, host launch overhead included. A larger `inner` lets the host queue
calls ahead of the GPU, which measures device time per call (the kernel micro-benchmarks).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class Protocol:
    """How many runs make one measurement.

    A measurement stops after `latency_iters` (`throughput_iters`) samples or once `max_s`
    seconds have been spent on it, whichever comes first, but never before `min_iters` samples.
    `max_s=None` means no time cap (the paper's protocol).
    """

    name: str
    warmup: int
    latency_iters: int
    throughput_iters: int
    throughput_batch: int
    min_iters: int
    max_s: Optional[float]
    statistic: str  # the statistic the paper's columns compare against: "mean" or "median"

    def as_dict(self) -> dict:
        return asdict(self)


PROTOCOLS = {
    # The paper's: 10 warm-ups, 10,000 batch-1 runs, 1,000 batch-100 runs, means (section 4.4).
    # No time cap: every run is made.
    "paper": Protocol("paper", warmup=10, latency_iters=10_000, throughput_iters=1_000,
                      throughput_batch=100, min_iters=1, max_s=None, statistic="mean"),
    # Quicker but sound: enough samples for a stable median and 10/90 percentiles.
    # On an H100 that is a few hundred batch-1 runs per row; rows take seconds, not minutes.
    "default": Protocol("default", warmup=10, latency_iters=500, throughput_iters=50,
                        throughput_batch=100, min_iters=10, max_s=1.5, statistic="median"),
    # One GPU lease (`gpu-report`): every Table 5 row of a first lease in about a second of
    # timing each; enough batch-1 runs for a median and p10/p90, a few batch-100 runs.
    "lease": Protocol("lease", warmup=5, latency_iters=200, throughput_iters=10,
                      throughput_batch=100, min_iters=5, max_s=0.4, statistic="median"),
    # A smoke run (CI, a first look): few samples, a short cap.
    "quick": Protocol("quick", warmup=2, latency_iters=20, throughput_iters=3,
                      throughput_batch=100, min_iters=2, max_s=1.0, statistic="median"),
}
# Batch 100 at 256 px takes seconds per forward on a CPU: a quick CPU run uses a smaller batch.
QUICK_CPU_THROUGHPUT_BATCH = 8


@dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds."""

    mean_ms: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    inner: int = 1


def summarize(samples_ms, inner: int = 1) -> Timing:
    """Statistics of per-call times (each sample already divided by `inner`)."""
    if len(samples_ms) == 0:
        raise ValueError("no timing samples")
    a = np.asarray(samples_ms, dtype=np.float64)
    p10, median, p90 = np.percentile(a, [10, 50, 90])
    return Timing(mean_ms=float(a.mean()), median_ms=float(median), p10_ms=float(p10),
                  p90_ms=float(p90), n=int(a.size), inner=inner)


class _Clock:
    """Timestamps around one sample: a CUDA event pair, or perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.start_event.record()
        else:
            self.t0 = time.perf_counter()

    def stop_ms(self) -> float:
        if self.cuda:
            self.end_event.record()
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event)
        return (time.perf_counter() - self.t0) * 1e3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device, *, warmup: int, iters: int,
                  min_iters: int = 1, max_s: Optional[float] = None, inner: int = 1) -> Timing:
    """Time `fn()` on `device`: `warmup` untimed calls, then up to `iters` samples.

    Sampling stops early once `max_s` seconds of wall time have been spent on samples and at
    least `min_iters` were taken.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    clock = _Clock(device)
    samples = []
    began = time.perf_counter()
    while len(samples) < iters:
        clock.start()
        for _ in range(inner):
            fn()
        samples.append(clock.stop_ms() / inner)
        if (max_s is not None and len(samples) >= min_iters
                and time.perf_counter() - began >= max_s):
            break
    return summarize(samples, inner)


@contextlib.contextmanager
def numerics(tf32: bool, paper: bool = False):
    """TF32 for fp32 matmuls and cuDNN convolutions as asked (both sides of a comparison run
    under the same setting); with the paper's protocol also its cuDNN settings. Restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if paper:  # cvnets v0.1 device_setup: deterministic cuDNN, no benchmark mode
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def tf32_requested() -> bool:
    """The kernel micro-benchmarks' TF32 setting: MVIT3_BENCH_TF32=1 (`gpu-report --tf32`)."""
    return os.environ.get("MVIT3_BENCH_TF32") == "1"
