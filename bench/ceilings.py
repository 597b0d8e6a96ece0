"""What this GPU measured, as the yardstick of every later figure: copy bandwidth and the fp16
matmul rate, a few seconds in all (`gpu-report` step `ceilings`).

- copy: `dst.copy_(src)` of `copy_mib` MiB, device to device; GB/s counts the bytes read and
  written (2 x size), the traffic a memory-bound kernel's GB/s is compared with.
- matmul: an n x n x n fp16 matmul (cuBLAS, tensor cores); TFLOP/s = 2 n^3 / time.
Each is the median of `time_callable` samples (CUDA events; perf_counter on a CPU, where the
figures only check the code). `mvit3.bench.floors` turns them into the ceilings of the roofline
floors that `bench` and the micro-benchmarks show beside their times.

`python -m mvit3.bench.ceilings [--json PATH] [--device cuda]`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .timing import time_callable

COPY_MIB = 1024  # several times any GPU's L2 cache: the copy streams from memory
MATMUL_N = 8192  # large enough to keep every tensor core busy


def copy_bandwidth(device: torch.device, copy_mib: int) -> dict:
    src = torch.empty(copy_mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device, warmup=3, iters=20, min_iters=5,
                           max_s=1.0)
    return {"bytes": 2 * src.numel(), "ms_median": timing.median_ms, "samples": timing.n,
            "gbps": 2 * src.numel() / (timing.median_ms / 1e3) / 1e9}


def matmul_rate(device: torch.device, n: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.float16, generator=generator)
    timing = time_callable(lambda: a @ b, device, warmup=3, iters=20, min_iters=5, max_s=1.5)
    return {"n": n, "dtype": "fp16", "ms_median": timing.median_ms, "samples": timing.n,
            "tflops": 2 * n**3 / (timing.median_ms / 1e3) / 1e12}


def measure(device: torch.device, copy_mib: int = COPY_MIB, matmul_n: int = MATMUL_N) -> dict:
    """Both probes; `device_name` (the CUDA device's name, None on a CPU) lets a reader of the
    file refuse figures measured on another GPU (`mvit3.bench.floors`)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "device_name": name, "copy": copy_bandwidth(device, copy_mib),
            "matmul_fp16": matmul_rate(device, matmul_n)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit3.bench.ceilings", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--copy-mib", type=int, default=COPY_MIB)
    parser.add_argument("--matmul-n", type=int, default=MATMUL_N)
    parser.add_argument("--json", type=Path, help="write the figures here (default: stdout)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is available here", file=sys.stderr)
        return 2
    text = json.dumps(measure(device, args.copy_mib, args.matmul_n), indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
