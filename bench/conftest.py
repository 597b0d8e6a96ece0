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
- At the end, a section lists each benchmark's device time beside its roofline floor and the
  achieved fraction, with the ceilings used (pytest-benchmark's own table has no room for them).
"""

from __future__ import annotations

import os
import time

import pytest

from mvit3.bench.timing import numerics, tf32_requested

_SESSION_START = time.monotonic()
_MEASURED = []  # each benchmark's extra_info and name, in the order measured


@pytest.fixture
def measured_rows() -> list:
    """Where test_ops_bench puts each benchmark's figures, for the closing section."""
    return _MEASURED


def floors_section(rows: list) -> list:
    """The lines of the closing section: device time, floor and achieved fraction per benchmark."""
    ceilings = next((r["ceilings"] for r in rows if r.get("ceilings")), None)
    why = next((r["floor_reason"] for r in rows if r.get("floor_reason")), None)
    lines = [f"ceilings: {ceilings}" if ceilings else f"no floors: {why}",
             f"{'benchmark':<64} {'device ms':>10} {'floor us':>9} {'of floor':>8}"]
    for r in rows:
        floor = "–" if r.get("floor_us") is None else f"{r['floor_us']:.2f}"
        share = "–" if r.get("of_floor") is None else f"{100 * r['of_floor']:.1f}%"
        lines.append(f"{r['name']:<64} {r['gpu_ms_median']:>10.4f} {floor:>9} {share:>8}")
    return lines


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("device time against the roofline floor")
        for line in floors_section(_MEASURED):
            terminalreporter.write_line(line)


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
