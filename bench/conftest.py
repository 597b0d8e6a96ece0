"""pytest set-up of the kernel micro-benchmarks (`pytest bench/ --benchmark-only`).

- The GPU identity and software versions go into the benchmark JSON's machine_info
  (`mvit3_env`, from `mvit3.bench.env.collect_env`).
- MVIT3_BENCH_BUDGET_S (seconds, set by `gpu-report`): once this much time has passed since
  the session began, the remaining benchmarks skip with that reason, so the run ends on time
  and still writes its JSON.
- TF32 is off for fp32 matmuls and cuDNN convolutions, on both sides of every comparison (the
  fused kernels compute IEEE fp32; cuDNN's default TF32 would time the stock ops at a lower
  precision and take its result as the yardstick of the error); MVIT3_BENCH_TF32=1 (`gpu-report
  --tf32`) turns it on for both.
- MVIT3_MICRO_LOG=PATH (set by `gpu-report`): each benchmark's figures are appended to this
  JSON-lines file as soon as it is measured, so a run killed mid-way keeps them
  (`test_ops_bench.py`).
"""

from __future__ import annotations

import os
import time

import pytest

from mvit3.bench.timing import numerics, tf32_requested

_SESSION_START = time.monotonic()


@pytest.hookimpl(optionalhook=True)  # a pytest-benchmark hook: absent plugin, no error
def pytest_benchmark_update_machine_info(config, machine_info):
    from mvit3.bench.env import collect_env

    machine_info["mvit3_env"] = collect_env()


@pytest.fixture(autouse=True)
def _time_budget():
    budget = os.environ.get("MVIT3_BENCH_BUDGET_S")
    if budget and time.monotonic() - _SESSION_START > float(budget):
        pytest.skip(f"time budget exhausted (MVIT3_BENCH_BUDGET_S={budget})")


@pytest.fixture(autouse=True, scope="session")
def _tf32_as_requested():
    with numerics(tf32_requested()):
        yield
