"""`python -m mvit3 info`: the registered models and the kernel backends of this machine."""

from __future__ import annotations

from .models import CLASSIFICATION_PATTERN, get_config, list_models
from .stats import model_stats


def add_arguments(parser) -> None:
    parser.add_argument("--models", default=CLASSIFICATION_PATTERN,
                        help="shell-style pattern of classifier names (default: all 15)")
    parser.add_argument("--img-size", type=int, default=256, help="input size for the MAC counts")


def model_rows(pattern: str = CLASSIFICATION_PATTERN, img_size: int = 256) -> list:
    rows = []
    for name in list_models(pattern):
        cfg = get_config(name)
        stats = model_stats(name, img_size)
        rows.append({
            "model": name, "version": cfg.version, "style": f"{cfg.style}-style",
            "params": stats["params"], "macs_cvnets": stats["macs_cvnets"], "macs": stats["macs"],
            "layers": "/".join(str(s.num_layers) for s in cfg.stages),
            "input": f"{cfg.preprocess.channel_order} [0,1]",
        })
    return rows


def run(args) -> int:
    rows = model_rows(args.models, args.img_size)
    if not rows:
        print(f"no model matches {args.models!r}; registered: {', '.join(list_models())}")
        return 1
    print(f"Models ({args.img_size}x{args.img_size}, batch 1; MACs in millions: 'paper' is the "
          f"cvnets profiler convention, 'exact' counts conv and matmul multiply-adds)")
    print(f"| {'model':<20} | ver | style    | params    | MACs paper | MACs exact | layers | input     |")
    print(f"|{'-' * 22}|-----|----------|-----------|------------|------------|--------|-----------|")
    for r in rows:
        print(f"| {r['model']:<20} | {r['version']:<3} | {r['style']:<8} | {r['params']:>9,} | "
              f"{r['macs_cvnets'] / 1e6:>10.1f} | {r['macs'] / 1e6:>10.1f} | {r['layers']:<6} | "
              f"{r['input']:<9} |")
    from .ops import availability  # imported here: the model table needs no op registration

    print("\nKernel backends (MVIT3_BACKEND overrides the backend asked for):")
    for backend, ok, reason in availability():
        print(f"  {backend:<7} {'available' if ok else 'unavailable':<11}  {reason}")
    print("\n" + "\n".join(auto_order_lines()))
    return 0


def auto_order_lines() -> list:
    """backend='auto' per op on this machine's GPU (or, without one, the default order)."""
    import torch

    from .ops.backends import auto_order
    from .ops.library import OPS

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    where = (f"this GPU (compute capability {capability[0]}.{capability[1]})" if capability
             else "a GPU (none here: on CPU tensors auto runs torch)")
    lines = [f"backend='auto' on {where}: the first kernel backend that takes the input, "
             "else torch:"]
    for op in OPS:
        order, why = auto_order(capability, op)
        lines.append(f"  {op:<20} {' > '.join(order)}  ({why})")
    return lines
