"""`python -m mvit3 kernels`: what the compiler made of every launch of a forward, and its
roofline, without a GPU. See docs/bench.md ("Reading the kernels report")."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .gpus import GPUS


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="mobilevitv3_xs", help="a name of mvit3.list_models('*') (classifiers and dense models)")
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated (e.g. 1,100)")
    parser.add_argument("--dtype", default="fp16", help="fp32, fp16, bf16, comma-separated")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--gpu", default="h200", choices=sorted(GPUS),
                        help="whose datasheet ceilings and occupancy limits to use (default h200)")
    parser.add_argument("--arch", type=int, default=None,
                        help="compile for sm_<arch> (default: the --gpu's, e.g. 90)")
    parser.add_argument("--backend", default="triton", choices=("triton", "cuda"),
                        help="whose kernels: the Triton ones (default) or the CUDA C++ library's "
                             "(needs it built for --arch: `python -m mvit3 build`)")
    parser.add_argument("--no-compile", action="store_true",
                        help="launches, bytes, FLOPs and floors only (no compilation)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--json", metavar="PATH", help="write the reports as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown to a file")


def _list(text: str, kind=str) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def run(args) -> int:
    import mvit3

    from .cuda_rows import CudaReportError, analyse_cuda, collect_cuda
    from .render import render_markdown
    from .report import DTYPES, Report, analyse, collect

    if args.model not in mvit3.list_models("*"):
        print(f"python -m mvit3 kernels: unknown model {args.model!r}; one of "
              f"{', '.join(mvit3.list_models('*'))}", file=sys.stderr)
        return 2
    dtypes = _list(args.dtype)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        print(f"python -m mvit3 kernels: --dtype {','.join(unknown)}: one of {', '.join(DTYPES)}",
              file=sys.stderr)
        return 2
    try:
        batches = _list(args.batch, int)
    except ValueError:
        print(f"python -m mvit3 kernels: --batch must be integers, got {args.batch!r}", file=sys.stderr)
        return 2
    if not batches or min(batches) < 1:
        print("python -m mvit3 kernels: --batch needs sizes >= 1", file=sys.stderr)
        return 2
    if (args.backend == "triton" and not args.no_compile
            and os.environ.get("TRITON_INTERPRET", "0") == "1"):
        print("python -m mvit3 kernels: unset TRITON_INTERPRET (interpreted kernels cannot be "
              "compiled), or pass --no-compile", file=sys.stderr)
        return 2
    gpu = GPUS[args.gpu]
    arch = args.arch or gpu.arch
    if args.backend == "cuda" and "bf16" in dtypes and arch < 80:
        print(f"python -m mvit3 kernels --backend cuda: --dtype bf16 needs sm_80 or newer (the "
              f"library's bf16 kernels for sm_{arch} are empty: ops.cpp refuses bf16 there)",
              file=sys.stderr)
        return 2
    reports = []
    for dtype in dtypes:
        for batch in batches:
            began = time.perf_counter()
            if args.backend == "cuda":
                try:
                    rows = collect_cuda(args.model, batch, DTYPES[dtype], args.img_size,
                                        gpu.shared_per_block)
                    analyse_cuda(rows, gpu, arch, compile_kernels=not args.no_compile)
                except CudaReportError as err:
                    print(f"python -m mvit3 kernels --backend cuda: {err}", file=sys.stderr)
                    return 2
            else:
                rows = collect(args.model, batch, DTYPES[dtype], args.img_size, arch)
                analyse(rows, gpu, arch, compile_kernels=not args.no_compile, workers=args.workers)
            reports.append(Report(args.model, batch, dtype, args.img_size, gpu, arch, args.backend,
                                  rows))
            print(f"[{args.model} batch {batch} {dtype}: {len(rows)} launches analysed in "
                  f"{time.perf_counter() - began:.1f} s]", file=sys.stderr)
    text = "\n\n".join(render_markdown(report) for report in reports)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([report.as_dict() for report in reports], indent=1))
    return 0
