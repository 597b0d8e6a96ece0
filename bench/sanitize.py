"""The program `gpu-report` runs under compute-sanitizer (memcheck, racecheck): one small
forward of each model on one kernel backend, checking that the fused kernels ran.

The Triton interpreter and the CUDA C++ emulator of the CPU tests see neither shared-memory
races nor out-of-bounds global reads; this forward on a real GPU, under the sanitizer, does.
Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation and
a read past its end is not hidden inside a cached block.

`python -m mvit3.bench.sanitize --backend triton --models mobilevitv3_xs,mobilevitv3_050`
Exit 0 when every forward ran its fused ops, 1 when a model fell back to torch ops, 2 on bad
arguments or no GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .launches import fused_op_calls

SANITIZED_MODELS = ("mobilevitv3_xs", "mobilevitv3_050")
# Small enough for the sanitizer's slowdown (tens of times), large enough that every stage
# keeps a map of several tiles (128 px: 16x16 at layer_3, 4x4 at layer_5).
SANITIZED_SIZE = 128


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit3.bench.sanitize", description=__doc__)
    parser.add_argument("--backend", required=True, choices=("triton", "cuda"))
    parser.add_argument("--models", default=",".join(SANITIZED_MODELS))
    parser.add_argument("--size", type=int, default=SANITIZED_SIZE)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device is available here", file=sys.stderr)
        return 2
    import mvit3
    import mvit3.fast as fast

    failed = []
    for name in filter(None, args.models.split(",")):
        torch.manual_seed(0)
        model = fast.convert(mvit3.create_model(name).cuda().eval(), backend=args.backend).eval()
        x = torch.rand(1, 3, args.size, args.size, device="cuda")
        calls = fused_op_calls(model, x, args.backend)
        torch.cuda.synchronize()
        print(f"{name} {args.backend} {args.size}px: {sum(calls.values())} fused op calls "
              f"({', '.join(f'{op} x{n}' for op, n in sorted(calls.items())) or 'none'})", flush=True)
        if not calls:
            failed.append(name)
    if failed:
        print(f"error: no fused op ran in {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
