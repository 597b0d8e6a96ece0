"""Roofline floors beside measured times: the ceilings they are computed with, and the floors
of one forward or of one op call.

A floor is the kernels report's model (`mvit3.kernel_report`, docs/kernels-report.md): each
Triton launch's least bytes and FLOPs at the GPU's peak bandwidth and rates. The ceilings come
from, in order of preference:
- a measurement on the GPU at hand (`mvit3.bench.ceilings`: copy bandwidth and the fp16 matmul
  rate), read from a file (its own JSON, or gpu-report's report.json, whose `ceilings` step
  measured them) or measured on the spot;
- else the datasheet record of the GPU (`mvit3/kernel_report/gpus.py`).
The probes measure only the memory bandwidth and the fp16 tensor-core rate: the bf16 rate is
taken equal to the fp16 one (as on every GPU in gpus.py), and the TF32 and fp32 FMA rates stay
the datasheet's. Either way a floor needs the GPU's datasheet record (its fp32 rates): a GPU
without one gets no floor, and the reason says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mvit3.kernel_report.gpus import GPU, floor_us, gpu_for_device_name

# --ceilings / MVIT3_CEILINGS values besides a file path.
MEASURE, DATASHEET = "measure", "datasheet"


@dataclass(frozen=True)
class Ceilings:
    """The GPU record floors are computed with, and where its figures came from."""

    gpu: GPU  # the datasheet record, with measured bandwidth and tensor rate where measured
    source: str  # "datasheet", "measured here" or "measured (<file>)"
    datasheet: GPU  # the record as gpus.py has it
    note: str = ""  # why the datasheet's were used where a measurement was asked for

    @property
    def measured(self) -> bool:
        return self.source != DATASHEET

    def describe(self) -> str:
        gpu, sheet = self.gpu, self.datasheet
        if not self.measured:
            return (f"datasheet of the {sheet.name}: {sheet.memory_gb_s:,.0f} GB/s, fp16/bf16 "
                    f"tensor {sheet.tensor_tflops:g}, TF32 {sheet.tf32_tflops:g}, fp32 "
                    f"{sheet.fp32_tflops:g} TFLOP/s" + (f" ({self.note})" if self.note else ""))
        return (f"{self.source}: copy {gpu.memory_gb_s:,.0f} GB/s "
                f"({_share(gpu.memory_gb_s, sheet.memory_gb_s)} of the datasheet's), fp16 matmul "
                f"{gpu.tensor_tflops:,.1f} TFLOP/s ({_share(gpu.tensor_tflops, sheet.tensor_tflops)}); "
                f"TF32 {sheet.tf32_tflops:g} and fp32 {sheet.fp32_tflops:g} TFLOP/s from the "
                f"datasheet of the {sheet.name}")

    def as_dict(self) -> dict:
        return {"source": self.source, "gpu": self.gpu.name, "memory_gb_s": self.gpu.memory_gb_s,
                "tensor_tflops": self.gpu.tensor_tflops, "tf32_tflops": self.gpu.tf32_tflops,
                "fp32_tflops": self.gpu.fp32_tflops, "text": self.describe()}


def _share(value: float, of: float) -> str:
    return f"{100 * value / of:.0f}%"


def read_measured(path) -> dict:
    """{"copy_gb_s", "matmul_fp16_tflops", "device_name"} from a ceilings file:
    `python -m mvit3.bench.ceilings --json` or gpu-report's report.json."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"ceilings file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"ceilings file {path} is not JSON ({err})") from None
    device_name = ((record.get("env") or {}).get("device") if "ceilings" in record
                   else record.get("device_name"))
    figures = record.get("ceilings", record)
    try:
        measured = {"copy_gb_s": float(figures["copy"]["gbps"]),
                    "matmul_fp16_tflops": float(figures["matmul_fp16"]["tflops"])}
    except (KeyError, TypeError):
        raise ValueError(f"ceilings file {path}: expected copy.gbps and matmul_fp16.tflops (the "
                         "JSON of `python -m mvit3.bench.ceilings`) or a gpu-report report.json "
                         "whose ceilings step ran") from None
    return {**measured, "device_name": device_name}


def with_measured(sheet: GPU, copy_gb_s: float, matmul_fp16_tflops: float) -> GPU:
    return dataclasses.replace(sheet, memory_gb_s=copy_gb_s, tensor_tflops=matmul_fp16_tflops)


def resolve(spec: str, device_name: str,
            measure: Optional[Callable[[], dict]] = None) -> tuple:
    """(Ceilings or None, why none) for a CUDA device of this name.

    spec: "datasheet"; "measure" (calls `measure()`, which returns `ceilings.measure`'s record;
    a probe that fails leaves the datasheet's, saying so); or the path of a ceilings file. A
    file measured on another GPU is refused (ValueError).
    """
    sheet, note = gpu_for_device_name(device_name), ""
    if spec not in (MEASURE, DATASHEET):
        measured = read_measured(spec)
        if measured["device_name"] and measured["device_name"] != device_name:
            raise ValueError(f"ceilings file {spec} was measured on the {measured['device_name']}, "
                             f"this device is the {device_name}")
        source = f"measured ({Path(spec).name})"
    elif spec == MEASURE and sheet is not None:
        try:
            record = measure()
            measured = {"copy_gb_s": record["copy"]["gbps"],
                        "matmul_fp16_tflops": record["matmul_fp16"]["tflops"]}
            source = "measured here"
        except RuntimeError as err:  # out of memory, a CUDA error: the floors still have a yardstick
            measured, source = None, DATASHEET
            note = f"the probes failed: {str(err).strip().splitlines()[0]}"
    else:
        measured, source = None, DATASHEET
    if sheet is None:
        return None, (f"no datasheet record for the {device_name} in mvit3/kernel_report/gpus.py "
                      "(its fp32 rates are needed)")
    gpu = sheet if measured is None else with_measured(sheet, measured["copy_gb_s"],
                                                       measured["matmul_fp16_tflops"])
    return Ceilings(gpu, source, sheet, note), None


def ops_floor_us(fn: Callable[[], object], gpu: GPU) -> float:
    """The sum of the roofline floors of the Triton launches `fn()` makes, recorded in a dry
    run (nothing runs; CPU or CUDA tensors): each launch's least bytes and FLOPs as the kernels
    report counts them."""
    from mvit3.kernel_report.report import dot_rate
    from mvit3.kernels._common import launch_log

    with torch.no_grad(), launch_log(dry_run=True) as log:
        fn()
    if not log.records:
        raise ValueError("the call made no Triton launch: nothing to take a floor of")
    return sum(floor_us(gpu, r.bytes, r.work.dot_flops, r.work.simt_flops, dot_rate(r))
               for r in log.records)


def forward_floors_ms(name: str, dtype: torch.dtype, batches: tuple, gpu: GPU,
                      img_size: int) -> tuple:
    """The floors of one fast forward of `name` (Triton backend) at each batch size, in ms."""
    from mvit3.kernel_report.report import forward_floor_us

    return tuple(forward_floor_us(name, batch, dtype, gpu, img_size) / 1e3 for batch in batches)


def achieved(floor_ms: Optional[float], measured_ms: Optional[float]) -> Optional[float]:
    """The achieved fraction of the floor: floor / measured time (1 would be at the roofline)."""
    if floor_ms is None or not measured_ms:
        return None
    return floor_ms / measured_ms
