"""Turning benchmark rows into results: ratios, the markdown report, CSV.

Everything here works on the plain-data result (the JSON written by `python -m mvit3 bench`),
so a stored result can be re-rendered anywhere (`gpu-report --summarize` does).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from typing import Optional

from .env import format_env
from .floors import achieved
from .paper import DENSE_SOURCE, PAPER_LABEL, PAPER_SOURCE, RATIO_PAIRS

CSV_COLUMNS = (
    "model", "impl", "backend", "dtype", "device", "status", "reason",
    "latency_ms_median", "latency_ms_mean", "latency_ms_p10", "latency_ms_p90", "latency_n",
    "throughput_img_s", "throughput_batch", "throughput_n", "launches", "max_rel_err",
    "compile_s", "params", "params_eval", "macs", "macs_cvnets", "floor_ms_b1", "floor_ms_batch",
    "paper_latency_ms", "paper_throughput_img_s", "paper_params_m", "paper_flops_m", "paper_top1",
    "paper_metric", "paper_score",
)
MVIT3_IMPLS = ("fast", "cuda-graph")  # what "fastest mvit3" picks from


def impl_label(row: dict) -> str:
    if row["impl"] == "reference":
        return "reference"
    if row["impl"] == "compile":
        return f"compile ({row['backend']})"
    if row["impl"] == "timm":
        return "timm (random weights)"
    if row["impl"] == "timm-compile":
        return f"timm compile ({row['backend']}, random weights)"
    return f"{row['impl']}/{row['backend']}"


def _ok(rows) -> list:
    return [r for r in rows if r["status"] == "ok"]


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def latency_key(result: dict) -> str:
    """The latency statistic compared with the paper: its protocol's (mean or median)."""
    return f"latency_ms_{result['config']['protocol']['statistic']}"


def compute_ratios(result: dict) -> dict:
    """The paper's comparisons (v3 vs v1, 2 vs 4 layers) and the fast implementations' speedups.

    Latency ratios are first/second (below 1: the first model is faster); throughput ratios
    are first/second (above 1: the first is faster); speedups are "times faster".
    """
    key = latency_key(result)
    by_model = defaultdict(dict)
    for row in _ok(result["rows"]):
        by_model[row["model"]][impl_label(row)] = row

    def fastest(model) -> tuple:
        candidates = [r for r in by_model.get(model, {}).values() if r["impl"] in MVIT3_IMPLS]
        if not candidates:
            return None, None
        return (min(r[key] for r in candidates), max(r["throughput_img_s"] for r in candidates))

    facts = {r["model"]: r for r in result["rows"]}
    pairs = []
    for first, second, label in RATIO_PAIRS:
        if first not in facts or second not in facts:
            continue
        ref_a = by_model.get(first, {}).get("reference")
        ref_b = by_model.get(second, {}).get("reference")
        (fast_lat_a, fast_thr_a), (fast_lat_b, fast_thr_b) = fastest(first), fastest(second)
        pairs.append({
            "comparison": label, "first": first, "second": second,
            "paper_latency": _ratio(facts[first]["paper_latency_ms"], facts[second]["paper_latency_ms"]),
            "paper_throughput": _ratio(facts[first]["paper_throughput_img_s"],
                                       facts[second]["paper_throughput_img_s"]),
            "reference_latency": _ratio(ref_a and ref_a[key], ref_b and ref_b[key]),
            "reference_throughput": _ratio(ref_a and ref_a["throughput_img_s"],
                                           ref_b and ref_b["throughput_img_s"]),
            "fastest_latency": _ratio(fast_lat_a, fast_lat_b),
            "fastest_throughput": _ratio(fast_thr_a, fast_thr_b),
        })
    speedups = []
    for model, impls in by_model.items():
        reference = impls.get("reference")
        compiled = next((r for r in impls.values() if r["impl"] == "compile"), None)
        for row in impls.values():
            if row["impl"] not in MVIT3_IMPLS:
                continue
            speedups.append({
                "model": model, "impl": row["impl"], "backend": row["backend"],
                "latency_vs_reference": _ratio(reference and reference[key], row[key]),
                "throughput_vs_reference": _ratio(row["throughput_img_s"],
                                                  reference and reference["throughput_img_s"]),
                "latency_vs_compile": _ratio(compiled and compiled[key], row[key]),
                "throughput_vs_compile": _ratio(row["throughput_img_s"],
                                                compiled and compiled["throughput_img_s"]),
            })
    return {"latency_statistic": key, "pairs": pairs, "speedups": speedups}


def _num(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def _ms(value) -> str:
    return _num(value, 3 if value is not None and value < 10 else 2)


def _rate(value) -> str:
    """Images per second: whole numbers where large, two decimals where a CPU is slow."""
    return _num(value, 0 if value is not None and value >= 100 else 2)


def _err(value) -> str:
    if value is None:
        return "–"
    return "0" if value == 0 else f"{value:.1e}"


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _shown(row: dict) -> bool:
    """Measured rows, and rows that could not run here but whose launches were counted."""
    return row["status"] == "ok" or (row["status"] == "skipped" and row["launches"] is not None)


def _task(result: dict) -> str:
    return result["config"].get("task", "cls")  # results stored before --task were Table 5's


def measured_table(result: dict) -> list:
    from .runner import sort_key

    order = list(dict.fromkeys(r["model"] for r in result["rows"]))
    rows = sorted(filter(_shown, result["rows"]), key=lambda r: (order.index(r["model"]), sort_key(r)))
    table5 = _task(result) == "cls"  # the paper times only Table 5's models
    floors = any(r.get("floor_ms_b1") is not None for r in rows)
    body = []
    for r in rows:
        label = impl_label(r)
        if r["status"] != "ok":
            host_ms = (r.get("launch_counts") or {}).get("host_ms_dry_run")
            label += (" (not run: launches from a dry run" +
                      ("" if host_ms is None else f"; host time {host_ms:.2f} ms a forward") + ")")
        latency = [_ms(r["latency_ms_median"]), _ms(r["latency_ms_mean"]),
                   "–" if r["latency_ms_p10"] is None
                   else f"{_ms(r['latency_ms_p10'])}–{_ms(r['latency_ms_p90'])}"]
        throughput = [_rate(r["throughput_img_s"])]
        if table5:
            latency.append(_ms(r["paper_latency_ms"]))
            throughput.append(_rate(r["paper_throughput_img_s"]))
        body.append([r["model"], label, r["dtype"], *latency, *throughput, _num(r["launches"]),
                     _err(r["max_rel_err"])] + (_floor_cells(r) if floors else []))
    batch = result["config"]["throughput_batch"]
    header = (["model", "implementation", "dtype", "latency ms (median)", "mean", "p10–p90"]
              + (["paper ms"] if table5 else []) + [f"img/s (batch {batch})"]
              + (["paper img/s"] if table5 else []) + ["launches / forward", "max rel. err"]
              + (["floor ms (b1 / batch)", "of floor (b1 / batch)"] if floors else []))
    return _table(header, body)


def _batch_ms(row: dict) -> Optional[float]:
    """The time of one throughput batch (ms), from the throughput."""
    if not row["throughput_img_s"]:
        return None
    return row["throughput_batch"] / row["throughput_img_s"] * 1e3


def _floor_cells(row: dict) -> list:
    """The roofline floor of the fused forward at batch 1 and at the throughput batch, and the
    achieved fraction of each (floor / measured time: 100% is the roofline)."""
    b1, batch = row.get("floor_ms_b1"), row.get("floor_ms_batch")
    if b1 is None:
        return ["–", "–"]
    shares = [achieved(b1, row["latency_ms_median"]), achieved(batch, _batch_ms(row))]
    return [f"{b1:.3g} / {batch:.3g}",
            " / ".join("–" if share is None else f"{100 * share:.1f}%" for share in shares)]


def floors_note(result: dict) -> list:
    """Which ceilings the floors were computed with, or why there are none."""
    cfg = result["config"]
    if result["env"]["device_type"] != "cuda":
        return []
    if cfg.get("ceilings") is None:
        why = cfg.get("no_floors_reason") or "no ceilings were given"
        return [f"No roofline floors: {why}."]
    lines = [f"Floors: the roofline of the fused forward (least bytes and FLOPs of each launch, "
             f"as `python -m mvit3 kernels` counts them) at these ceilings: "
             f"{cfg['ceilings']['text']}. 'of floor' is floor / measured time (median batch-1 "
             f"latency; one batch-{cfg['throughput_batch']} forward at the measured throughput)."]
    reasons = sorted({r["floor_reason"] for r in result["rows"]
                      if r.get("floor_ms_b1") is None and r.get("floor_reason")})
    lines += [f"No floor: {reason}." for reason in reasons]
    return lines


def facts_table(result: dict) -> list:
    first = {}
    for row in result["rows"]:
        first.setdefault(row["model"], row)
    if _task(result) != "cls":
        size = result["config"]["img_size"]
        body = [[m, _num(r["params"]), _num(r["params_eval"]), _num(r["paper_params_m"]),
                 _num(r["macs_cvnets"] / 1e6, 1), _num(r["macs"] / 1e6, 1),
                 "–" if r["paper_metric"] is None else f"{r['paper_score']} ({r['paper_metric']})"]
                for m, r in first.items()]
        return _table(["model", "params", "params without the aux head (the paper's count)",
                       "paper params (M)", f"MACs at {size} px, paper's convention (M)",
                       f"MACs at {size} px, exact (M)", "paper accuracy"], body)
    body = [[m, _num(r["params"]), _num(r["paper_params_m"]), _num(r["macs_cvnets"] / 1e6, 1),
             _num(r["paper_flops_m"], 0), _num(r["macs"] / 1e6, 1), _num(r["paper_top1"])]
            for m, r in first.items()]
    return _table(["model", "params", "paper params (M)", "MACs, paper's convention (M)",
                   "paper FLOPs (M)", "MACs, exact (M)", "paper top-1 (%)"], body)


def ratios_tables(ratios: dict) -> list:
    lines = []
    if ratios["pairs"]:
        lines += ["", "Ratios the paper draws (latency: first / second, below 1 = the first is "
                      "faster; throughput: first / second, above 1 = the first is faster). "
                      "'fastest mvit3' is the best fast or CUDA-graph row of each model.", ""]
        lines += _table(["comparison", "paper latency", "reference latency", "fastest mvit3 latency",
                         "paper throughput", "reference throughput", "fastest mvit3 throughput"],
                        [[p["comparison"], _num(p["paper_latency"], 3), _num(p["reference_latency"], 3),
                          _num(p["fastest_latency"], 3), _num(p["paper_throughput"], 3),
                          _num(p["reference_throughput"], 3), _num(p["fastest_throughput"], 3)]
                         for p in ratios["pairs"]])
    if ratios["speedups"]:
        lines += ["", "Speedups (times faster; latency and throughput):", ""]
        lines += _table(["model", "implementation", "latency vs reference",
                         "throughput vs reference", "latency vs compile", "throughput vs compile"],
                        [[s["model"], f"{s['impl']}/{s['backend']}",
                          _num(s["latency_vs_reference"], 2, "x"),
                          _num(s["throughput_vs_reference"], 2, "x"),
                          _num(s["latency_vs_compile"], 2, "x"),
                          _num(s["throughput_vs_compile"], 2, "x")] for s in ratios["speedups"]])
    return lines


def not_run_lines(result: dict) -> list:
    """Skipped rows grouped by (implementation, reason); failed rows one by one."""
    skipped = defaultdict(list)
    lines = []
    for row in result["rows"]:
        if row["status"] == "skipped":
            skipped[(impl_label(row), row["reason"])].append(row["model"])
        elif row["status"] == "failed":
            lines.append(f"- FAILED {row['model']} {impl_label(row)}: {row['reason']}")
    for (label, reason), models in skipped.items():
        which = models[0] if len(models) == 1 else f"{len(models)} models"
        lines.append(f"- skipped {label} ({which}): {reason}")
    return lines


def render_markdown(result: dict, heading: str = "##", environment: bool = True) -> str:
    from .runner import TASKS

    cfg, env = result["config"], result["env"]
    protocol = cfg["protocol"]
    cap = "no time cap" if protocol["max_s"] is None else f"at most {protocol['max_s']} s each"
    paper = (f"Paper columns: {PAPER_LABEL} ({PAPER_SOURCE}), fp32, means; they were not measured "
             "here." if _task(result) == "cls" else
             f"The paper ({DENSE_SOURCE}) gives these models' parameters and accuracy only: no "
             "timings, no FLOPs.")
    lines = [
        f"{heading} {TASKS[_task(result)].title} on {env['device']} ({cfg['dtype']}, "
        f"{cfg['img_size']}x{cfg['img_size']})",
        "",
        f"Protocol '{protocol['name']}': {protocol['warmup']} warm-ups, up to "
        f"{protocol['latency_iters']:,} batch-1 runs and {protocol['throughput_iters']:,} runs at "
        f"batch {cfg['throughput_batch']} ({cap}); "
        f"{'CUDA events' if env['device_type'] == 'cuda' else 'perf_counter'} around each run. "
        f"TF32 {'on' if cfg['tf32'] else 'off'}. {paper}",
    ]
    if env["device_type"] != "cuda":
        lines += ["", "**No GPU was used: these are CPU timings**, not comparable with the paper's "
                      "GPU figures; the ratios are the informative part."]
    if not any(map(_shown, result["rows"])):
        lines += ["", "No row was measured."]
    else:
        lines += [""] + measured_table(result)
        note = floors_note(result)
        if note:
            lines += [""] + note
        if any(r["impl"].startswith("timm") and _shown(r) for r in result["rows"]):
            from .runner import TIMM_WEIGHTS

            lines += ["", f"timm rows: timm's own model of the same name, weights: {TIMM_WEIGHTS}."]
    lines += ["", f"{heading}# Models", ""] + facts_table(result)
    ratio_lines = ratios_tables(result.get("ratios") or compute_ratios(result))
    if ratio_lines:
        lines += ["", f"{heading}# Ratios"] + ratio_lines
    not_run = not_run_lines(result)
    if not_run:
        lines += ["", f"{heading}# Not run", ""] + not_run
    if not result.get("complete", True):
        lines += ["", "**This run did not finish: the rows above are those completed.**"]
    after = result.get("gpu_state_after")
    if after:
        lines += ["", f"GPU state after the run: SM {after.get('sm_clock_mhz')} MHz, "
                      f"{after.get('temperature_c')} C, {after.get('power_w')} W, throttle reasons: "
                      f"{', '.join(after.get('throttle_reasons') or []) or 'none'}."]
    if environment:
        lines += ["", f"{heading}# Environment", ""] + format_env(env)
    return "\n".join(lines) + "\n"


def render_csv(result: dict) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({k: row.get(k) for k in CSV_COLUMNS})
    return out.getvalue()
