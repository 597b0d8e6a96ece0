"""`--plot PATH.png`: latency and throughput per model and implementation (matplotlib).

matplotlib is optional (the `bench` extra); it is imported only here, and its absence is
reported before any benchmark runs.
"""

from __future__ import annotations

from .paper import PAPER_LABEL
from .report import impl_label, latency_key

MISSING = ("--plot needs matplotlib, which is not installed here: pip install matplotlib "
           "(or pip install 'mvit3[bench]')")


def matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def plot_result(result: dict, path: str) -> None:
    """Two panels: batch-1 latency (with p10-p90 bars) and throughput, grouped by model."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(MISSING) from None
    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    key = latency_key(result)
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    labels = list(dict.fromkeys(impl_label(r) for r in rows))
    on_gpu = result["env"]["device_type"] == "cuda"
    width = 0.8 / max(1, len(labels) + on_gpu)  # one slot per implementation (and the paper's)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.3 * len(models)), 8.5))
    for ax, metric, title in ((axes[0], key, "batch-1 latency (ms, lower is better)"),
                              (axes[1], "throughput_img_s",
                               f"throughput at batch {result['config']['throughput_batch']} "
                               "(images/s, higher is better)")):
        for i, label in enumerate(labels):
            xs, ys, lo, hi = [], [], [], []
            for r in rows:
                if impl_label(r) != label:
                    continue
                xs.append(models.index(r["model"]) + i * width)
                ys.append(r[metric])
                if metric == key:
                    lo.append(r[metric] - r["latency_ms_p10"])
                    hi.append(r["latency_ms_p90"] - r[metric])
            ax.bar(xs, ys, width, label=label, yerr=(lo, hi) if lo else None, capsize=2)
        paper_metric = "paper_latency_ms" if metric == key else "paper_throughput_img_s"
        paper = [(models.index(r["model"]) + len(labels) * width, r[paper_metric])
                 for r in result["rows"] if r[paper_metric] is not None and r["impl"] == "reference"]
        if paper and on_gpu:  # beside CPU timings the paper's GPU figures would mislead
            ax.bar([p[0] for p in paper], [p[1] for p in paper], width, color="0.6", hatch="//",
                   label=PAPER_LABEL)
        values = [r[metric] for r in rows] + [p[1] for p in paper if on_gpu]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")  # CPU vs GPU, XXS vs S: a linear axis would hide the small bars
        ax.set_title(title)
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(models))])
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    env, cfg = result["env"], result["config"]
    fig.suptitle(f"MobileViT on {env['device']} ({cfg['dtype']}, {cfg['img_size']}px, "
                 f"protocol {cfg['protocol']['name']}, commit {(env['git'].get('commit') or '?')[:10]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
