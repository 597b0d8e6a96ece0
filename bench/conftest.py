"""pytest set-up of the kernel micro-benchmarks (`pytest bench/ --benchmark-only`).

- The GPU identity and software versions go into the benchmark JSON's machine_info
  (`mvit3_env`, from `mvit3.bench.env.collect_env`).
- MVIT3_BENCH_BUDGET_S (seconds, set by `gpu-report`): once this much time has passed since
  the session began, the remaining benchmarks skip with that reason, so the run ends on time
  and still writes its JSON.
"""

from __future__ import annotations

import os
import time

import pytest

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
