"""Kernels whose compiled form is known, compiled through the kernels report's own path (a
dry-run launch record -> `mvit3.kernel_report.compiled.compile_all`). Run as a script with
TRITON_INTERPRET unset (tests/test_kernel_report.py does); prints one JSON object:
{probe name: the Compiled fields}.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import torch
import triton
import triton.language as tl


@triton.jit
def square_dot_kernel(a_ptr, b_ptr, c_ptr, SIZE: tl.constexpr, PRECISION: tl.constexpr):
    """c = a @ b for one [SIZE, SIZE] tile of row-major matrices."""
    rows = tl.arange(0, SIZE)
    offsets = rows[:, None] * SIZE + rows[None, :]
    c = tl.dot(tl.load(a_ptr + offsets), tl.load(b_ptr + offsets), input_precision=PRECISION)
    tl.store(c_ptr + offsets, c)


@triton.jit
def copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


def probes() -> dict:
    from mvit3.kernel_report.compiled import compile_all
    from mvit3.kernels._common import launch, launch_log

    half = torch.zeros(64 * 64, dtype=torch.float16)
    single = torch.zeros(64 * 64, dtype=torch.float32)
    with launch_log(dry_run=True) as log:
        launch(square_dot_kernel, (1,), dict(a_ptr=half, b_ptr=half, c_ptr=single),
               dict(SIZE=64, PRECISION="ieee"))
        launch(square_dot_kernel, (1,), dict(a_ptr=single, b_ptr=single, c_ptr=single),
               dict(SIZE=64, PRECISION="ieee"))
        launch(copy_kernel, (4,), dict(src_ptr=half, dst_ptr=half, n=half.numel()), dict(BLOCK=1024))
        launch(copy_kernel, (4,), dict(src_ptr=half[1:], dst_ptr=half[1:], n=half.numel() - 1),
               dict(BLOCK=1024))
    names = ("dot_fp16_sm90", "dot_fp32_ieee_sm90", "copy_fp16_aligned", "copy_fp16_misaligned")
    compiled = compile_all(log.records, 90, workers=1, cache=False)
    result = {name: asdict(compiled[record.key]) for name, record in zip(names, log.records)}
    result["dot_fp16_sm80"] = asdict(compile_all(log.records[:1], 80, workers=1, cache=False)[log.records[0].key])
    return result


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run with TRITON_INTERPRET unset")
    print(json.dumps(probes()))
