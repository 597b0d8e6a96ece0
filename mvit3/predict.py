"""`python -m mvit3 predict IMAGE... --model NAME [--checkpoint P]`: the top-5 ImageNet-1k
classes of each image, through the model's own preprocessing: the file is read and resized by
the library of the weights' official pipeline (OpenCV for v1-style weights, PIL for v2-style).

A missing or unreadable file is reported by name on stderr and the others are still
classified; the exit status is 1 when any file failed.
"""

from __future__ import annotations

import json
import sys

import torch

from .command_utils import add_model_arguments, build_model, imagenet_classes
from .preprocess import preprocess


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything OpenCV / PIL reads)")
    add_model_arguments(parser)
    parser.add_argument("--top", type=int, default=5, help="how many classes per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")


def classify(model, image, top: int) -> list:
    """[{"index", "label", "probability"}] of the `top` most probable classes of one image (a
    file path, read as the official pipeline of the model's family reads it, or an array)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(preprocess(image, model).to(device))  # [1, num_classes]
    probabilities = logits.float().softmax(dim=-1)[0]
    values, indices = probabilities.topk(min(top, probabilities.numel()))
    names = imagenet_classes() if probabilities.numel() == 1000 else None
    return [{"index": int(i), "label": names[i] if names else str(int(i)), "probability": float(p)}
            for p, i in zip(values.tolist(), indices.tolist())]


def run(args) -> int:
    if args.top < 1:
        print(f"error: --top must be at least 1, got {args.top}", file=sys.stderr)
        return 2
    model = build_model(args.model, args.checkpoint, args.backend, args.device)
    results, failed = [], 0
    for path in args.images:
        try:
            top = classify(model, path, args.top)
        except (OSError, ValueError) as err:  # missing file; a file the library cannot decode
            failed += 1
            print(f"error: {err}", file=sys.stderr)
            results.append({"image": path, "error": str(err)})
            continue
        results.append({"image": path, "top": top})
        if not args.json:
            print(path)
            for row in results[-1]["top"]:
                print(f"  {row['probability']:7.2%}  {row['label']} ({row['index']})")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0
