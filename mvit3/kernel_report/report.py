"""The rows and totals of the kernels report: every launch of one forward of a fast model.

`collect(name, batch, dtype)` runs the fast model with the Triton backend in a dry run on the
CPU (`mvit3.kernels._common.launch_log(dry_run=True)`: every launch is recorded with its grid,
arguments and meta-parameters, nothing runs), tagging each launch with the fused op and the
model stage it serves, and records the ATen ops of the forward (the classifier's pooling and
linear layer, odd-map resizes) as rows of their own. `analyse` adds what the compiler made of
each launch (`compiled.compile_all`) and the roofline: least bytes, FLOPs, and the floor in
microseconds on a chosen GPU (`gpus.floor_us`).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mvit3.bench.launches import NO_KERNEL_OPS, _is_view

from .gpus import GPU, blocks_per_sm, floor_us

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TRITON_NAMESPACE = "mvit3_triton"


@dataclass
class Row:
    kernel: str  # the Triton kernel, or the ATen op ("aten::addmm")
    op: str  # the mvit3 op it serves (or the ATen op)
    stage: str  # "stem", "layer_3.1", "head", ...
    grid: tuple
    bytes: int
    dot_flops: int
    simt_flops: int
    dot_rate: str  # "tensor" | "tf32" | "fp32": the peak its tl.dot products are held to
    serial_steps: int = 0  # loop iterations one program walks in sequence (Work.serial_steps)
    record: object = None  # the LaunchRecord; None for ATen rows
    compiled: object = None  # compiled.Compiled, after analyse
    floor_us: float = 0.0
    blocks_per_sm: Optional[int] = None
    waves: Optional[float] = None

    @property
    def programs(self) -> int:
        return math.prod(self.grid) if self.grid else 0

    @property
    def flops(self) -> int:
        return self.dot_flops + self.simt_flops

    @property
    def meta(self) -> dict:
        if self.record is None:
            return {}
        return {k: v for k, v in self.record.constexprs
                if k not in ("DOT_TYPE", "DOT_PRECISION", "num_warps", "num_stages")}

    def as_dict(self) -> dict:
        c = self.compiled
        meta = dict(self.record.constexprs) if self.record is not None else {}
        return {
            "kernel": self.kernel, "op": self.op, "stage": self.stage, "grid": list(self.grid),
            "programs": self.programs, "blocks_per_sm": self.blocks_per_sm, "waves": self.waves,
            "serial_steps": self.serial_steps,
            "meta": {k: str(v) for k, v in self.meta.items()},
            "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
            "registers": c.registers if c else None, "spill_bytes": c.spill_bytes if c else None,
            "stack_bytes": c.stack_bytes if c else None, "shared_bytes": c.shared_bytes if c else None,
            "mma": c.mma if c else None, "load_bits": c.load_bits if c else None,
            "load_kind": c.load_kind if c else None, "load_mix": c.load_mix if c else None,
            "compile_error": (c.error or None) if c else None,
            "bytes": self.bytes, "flops": self.flops, "dot_flops": self.dot_flops,
            "simt_flops": self.simt_flops,
            "intensity": round(self.flops / self.bytes, 3) if self.bytes else None,
            "floor_us": round(self.floor_us, 4),
        }


# ---- collecting the launches of one forward ----------------------------------------------------

def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _aten_flops(name: str, args, out) -> int:
    """2 x the multiply-adds of the ATen matrix products a fast forward makes (the classifier)."""
    if name in ("addmm", "mm", "bmm", "matmul", "linear") and isinstance(out, torch.Tensor):
        weight = args[2] if name == "addmm" else args[1]
        inner = weight.shape[-2] if name != "linear" else weight.shape[-1]
        return 2 * out.numel() * inner
    return 0


class _ForwardRecorder(TorchDispatchMode):
    """Tags each Triton launch with the mvit3 op that made it, and keeps the ATen ops that
    launch work (views and allocations excluded, as in mvit3.bench.launches)."""

    def __init__(self, log, stage: list):
        super().__init__()
        self.log, self.stage = log, stage
        self.launch_ops: dict = {}  # index in log.records -> (op, stage)
        self.aten: list = []  # (position in log.records, Row)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        before = len(self.log.records)
        out = func(*args, **(kwargs or {}))
        if func.namespace == _TRITON_NAMESPACE:
            for index in range(before, len(self.log.records)):
                self.launch_ops[index] = (name, self.stage[0])
        elif func.namespace == "mvit3":
            raise RuntimeError("the kernels report of the triton backend saw a CUDA C++ op")
        else:
            row = aten_row(func, args, out, self.stage[0])
            if row is not None:
                self.aten.append((len(self.log.records), row))
        return out


def aten_row(func, args, out, stage: str) -> Optional[Row]:
    """The row of an ATen op of a forward (it launches work of its own), or None for views and
    ops that launch nothing (as in mvit3.bench.launches)."""
    name = func.overloadpacket.__name__
    if _is_view(func) or name in NO_KERNEL_OPS:
        return None
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    outputs = out if isinstance(out, (tuple, list)) else [out]
    nbytes = sum(map(_nbytes, inputs)) + sum(map(_nbytes, outputs))
    return Row(kernel=f"{func.namespace}::{name}", op=f"{func.namespace}::{name}", stage=stage,
               grid=(), bytes=nbytes, dot_flops=_aten_flops(name, args, out), simt_flops=0,
               dot_rate="tensor")


def _stage_labels(model) -> list:
    """'layer_<k>.<i>' of every block, in forward order."""
    return [f"layer_{k}.{i}" for k in range(1, 6) for i in range(len(getattr(model, f"layer_{k}")))]


@contextlib.contextmanager
def _stage_tracking(model, stage: list):
    """Sets stage[0] to the block the fast model is in: its block methods are wrapped on this
    instance only (a dense model's: on its encoder), for the duration of the report. Launches
    outside the blocks are "head" (the classifier, or a dense model's ASPP / SSD heads)."""
    model = getattr(model, "encoder", model)
    labels = iter(_stage_labels(model))
    wrapped = ("_mv2", "_block_v1_style", "_block_v2_style")

    def wrap(method):
        def tagged(*args, **kwargs):
            stage[0] = next(labels)
            result = method(*args, **kwargs)
            stage[0] = "head"
            return result
        return tagged

    for name in wrapped:
        setattr(model, name, wrap(getattr(model, name)))
    try:
        yield
    finally:
        for name in wrapped:
            delattr(model, name)


def dot_rate(record) -> str:
    """The peak a launch's tl.dot products are held to: "tensor" (16-bit tiles), "tf32" or "fp32"."""
    meta = dict(record.constexprs)
    dot_type = str(meta.get("DOT_TYPE", ""))
    if "16" in dot_type:  # tl.float16 / tl.bfloat16 tiles: tensor cores
        return "tensor"
    return "tf32" if meta.get("DOT_PRECISION") == "tf32" else "fp32"


def collect(name: str, batch: int, dtype: torch.dtype, img_size: int = 256, arch: int = 90) -> list:
    """The rows of one forward of `mvit3.fast.create_model(name, backend="triton")` on a
    [batch, 3, img_size, img_size] input, in launch order (dry run on the CPU), with the
    meta-parameters the launchers pick for a GPU of compute capability sm_<arch>."""
    import mvit3.fast as fast
    from mvit3.kernels._common import compile_target, launch_log

    model = fast.create_model(name, backend="triton").to(dtype).eval()
    x = torch.zeros(batch, model.in_chans, img_size, img_size, dtype=dtype)
    stage = ["stem"]
    with torch.no_grad(), compile_target(arch), launch_log(dry_run=True) as log:
        model(x)  # derives the inference weights: its ATen work is not part of a forward
        log.records.clear()
        recorder = _ForwardRecorder(log, stage)
        with _stage_tracking(model, stage), recorder:
            model(x)
    rows, aten = [], list(recorder.aten)
    for index, record in enumerate(log.records):
        while aten and aten[0][0] <= index:
            rows.append(aten.pop(0)[1])
        op, where = recorder.launch_ops.get(index, ("?", "?"))
        rows.append(Row(kernel=record.name, op=op, stage=where, grid=record.grid,
                        bytes=record.bytes, dot_flops=record.work.dot_flops,
                        simt_flops=record.work.simt_flops, dot_rate=dot_rate(record),
                        serial_steps=record.work.serial_steps, record=record))
    rows += [row for _, row in aten]
    return rows


def analyse(rows: list, gpu: GPU, arch: int, compile_kernels: bool = True,
            workers: Optional[int] = None) -> list:
    """Fill in each row's compiled kernel (for sm_<arch>), occupancy, waves and floor."""
    from .compiled import compile_all

    records = [row.record for row in rows if row.record is not None]
    compiled = compile_all(records, arch, workers=workers) if compile_kernels and records else {}
    for row in rows:
        row.floor_us = floor_us(gpu, row.bytes, row.dot_flops, row.simt_flops, row.dot_rate)
        if row.record is None:
            continue
        row.compiled = compiled.get(row.record.key)
        if row.compiled is not None and not row.compiled.error:
            warps = dict(row.record.constexprs)["num_warps"]
            row.blocks_per_sm = blocks_per_sm(gpu, row.compiled.registers, row.compiled.shared_bytes, warps)
            if row.blocks_per_sm:
                row.waves = round(row.programs / (gpu.sms * row.blocks_per_sm), 3)
    return rows


def forward_floor_us(name: str, batch: int, dtype: torch.dtype, gpu: GPU, img_size: int = 256) -> float:
    """The sum of the roofline floors of one fast forward (Triton backend) on `gpu`: the time
    no implementation of these fused ops beats there (bytes and FLOPs only: nothing compiled)."""
    rows = analyse(collect(name, batch, dtype, img_size, gpu.arch), gpu, gpu.arch, compile_kernels=False)
    return sum(row.floor_us for row in rows)


# A launch "waits on its loop" when it leaves most SMs idle (fewer programs than half of them)
# while each program walks more than this many loop iterations in sequence: at batch 1 its
# time is the chain's latency, which more, shorter programs (smaller tiles, split-K) cut.
LONG_SERIAL_LOOP = 8


def serial_bound(row: Row, sms: int) -> bool:
    return row.record is not None and 2 * row.programs < sms and row.serial_steps > LONG_SERIAL_LOOP


@dataclass
class Report:
    model: str
    batch: int
    dtype: str
    img_size: int
    gpu: GPU
    arch: int
    backend: str
    rows: list = field(default_factory=list)

    def totals(self) -> dict:
        by_op = defaultdict(float)
        floor = sum(row.floor_us for row in self.rows)
        for row in self.rows:
            by_op[row.op] += row.floor_us
        spills = [row for row in self.rows if row.compiled is not None and row.compiled.spill_bytes]
        errors = [row for row in self.rows if row.compiled is not None and row.compiled.error]
        return {
            "launches": len(self.rows),
            "bytes": sum(row.bytes for row in self.rows),
            "flops": sum(row.flops for row in self.rows),
            "floor_us": round(floor, 3),
            # a batch-1 forward is a chain of launches: its programs' loops, end to end
            "serial_steps": sum(row.serial_steps for row in self.rows),
            "serial_bound_launches": sum(serial_bound(row, self.gpu.sms) for row in self.rows),
            "floor_share_by_op": {op: round(t / floor, 4) if floor else 0.0
                                  for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "launches_with_spills": len(spills),
            "compile_errors": len(errors),
        }

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {"model": self.model, "batch": self.batch, "dtype": self.dtype,
                "img_size": self.img_size, "backend": self.backend, "arch": self.arch,
                "gpu": asdict(self.gpu), "rows": [row.as_dict() for row in self.rows],
                "totals": self.totals()}
