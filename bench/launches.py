"""Kernel launches per forward.

Three counts, each from where it can be seen:
- ATen ops that launch work, from a TorchDispatchMode: views (ops whose schema returns an alias
  of an input) and pure allocations launch nothing and are not counted; the mvit3 custom ops
  are counted apart (`mvit3_ops`), and the ATen ops inside their implementations are not seen.
- Triton launches, from `mvit3.kernels._common.launch_log` (every mvit3 Triton launch goes
  through `launch()`). With dry_run the Triton backend takes CPU tensors and launches nothing,
  so the fast model's launches are counted on a CPU.
- On CUDA, the kernels the GPU actually ran, from torch.profiler (CUPTI): the ground truth.

`LaunchCount.launches` is the profiler count when there is one, else the estimate
ATen ops + Triton launches + calls into the CUDA C++ library (one kernel at least each).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that return fresh storage but launch nothing: allocations and metadata-only reshapes.
NO_KERNEL_OPS = frozenset({"empty", "empty_strided", "empty_like", "new_empty",
                           "new_empty_strided", "_unsafe_view", "lift_fresh"})
CUDA_LIB_NAMESPACE = "mvit3"
TRITON_NAMESPACE = "mvit3_triton"


@dataclass
class LaunchCount:
    aten_ops: int
    mvit3_ops: int  # calls of the mvit3 custom ops (Triton or CUDA C++ backend)
    cuda_lib_ops: int  # of which into the CUDA C++ library (namespace mvit3::)
    triton_launches: int
    cuda_kernels: Optional[int] = None  # from the profiler, CUDA only
    dispatch_counted: bool = True  # False for compiled models: the first four counts are empty
    by_op: dict = field(default_factory=dict)  # ATen / custom op name -> calls
    by_triton_kernel: dict = field(default_factory=dict)
    note: Optional[str] = None

    @property
    def estimate(self) -> int:
        return self.aten_ops + self.triton_launches + self.cuda_lib_ops

    @property
    def launches(self) -> Optional[int]:
        if self.cuda_kernels is not None:
            return self.cuda_kernels
        return self.estimate if self.dispatch_counted else None

    def as_dict(self) -> dict:
        return {**asdict(self), "estimate": self.estimate, "launches": self.launches}


def _is_view(func) -> bool:
    """The schema returns an alias of an input (view, t, permute, expand, unbind, detach...)."""
    return any(ret.alias_info is not None and not ret.alias_info.is_write
               for ret in func._schema.returns)


class OpCounter(TorchDispatchMode):
    """Counts the ops that launch work; custom mvit3 ops are counted as one call each."""

    def __init__(self):
        super().__init__()
        self.aten = Counter()
        self.custom = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace = func.namespace
        name = func.overloadpacket.__name__
        if namespace in (CUDA_LIB_NAMESPACE, TRITON_NAMESPACE):
            self.custom[f"{namespace}::{name}"] += 1
        elif not (_is_view(func) or name in NO_KERNEL_OPS):
            self.aten[f"{namespace}::{name}"] += 1
        return func(*args, **(kwargs or {}))


def fused_op_calls(model, x: torch.Tensor, backend: str) -> dict:
    """{op: calls} of the mvit3 custom ops of `backend` ("triton" or "cuda") that one
    `model(x)` made under no_grad: empty when the forward ran no fused op of that backend."""
    namespace = {"triton": TRITON_NAMESPACE, "cuda": CUDA_LIB_NAMESPACE}[backend]
    counter = OpCounter()
    with torch.no_grad(), counter:
        model(x)
    return {op: n for op, n in counter.custom.items() if op.startswith(namespace + "::")}


def _launch_log(dry_run: bool):
    """mvit3's Triton launch log, or a stand-in recording nothing where Triton is missing."""
    try:
        from mvit3.kernels._common import launch_log
    except Exception:  # no triton: no Triton launches can happen
        return contextlib.nullcontext([])
    return launch_log(dry_run=dry_run)


def profiled_cuda_kernels(fn) -> int:
    """Kernels the GPU ran during `fn()`, from torch.profiler; memcpy/memset not counted."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: first calls may compile or capture
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for e in device_events if not e.name.startswith(("Memcpy", "Memset")))


def count_launches(model, x: torch.Tensor, *, dry_run: bool = False, dispatch: bool = True,
                   profile: Optional[bool] = None) -> LaunchCount:
    """Launches of one `model(x)` under no_grad.

    dry_run: record Triton launches without running them (CPU counting of the Triton backend;
    outputs are garbage). dispatch=False skips the ATen/Triton counting (a torch.compile'd
    model must not run under a dispatch mode). profile (default: on for CUDA inputs) adds the
    profiler's kernel count.
    """
    counter = OpCounter()
    triton_kernels = Counter()
    if dispatch:
        with torch.no_grad(), _launch_log(dry_run):
            model(x)  # a first call may build derived weights: one-time work, not counted
        with torch.no_grad(), _launch_log(dry_run) as log, counter:
            model(x)
        triton_kernels.update(record.name for record in getattr(log, "records", log))
    count = LaunchCount(
        aten_ops=sum(counter.aten.values()),
        mvit3_ops=sum(counter.custom.values()),
        cuda_lib_ops=sum(n for op, n in counter.custom.items()
                         if op.startswith(CUDA_LIB_NAMESPACE + "::")),
        triton_launches=sum(triton_kernels.values()),
        by_op=dict(counter.aten + counter.custom),
        by_triton_kernel=dict(triton_kernels),
        dispatch_counted=dispatch,
    )
    if profile is None:
        profile = x.is_cuda and not dry_run
    if profile:
        try:
            with torch.no_grad():
                count.cuda_kernels = profiled_cuda_kernels(lambda: model(x))
        except Exception as err:  # CUPTI unavailable: keep the estimate
            count.note = f"profiler failed ({type(err).__name__}: {str(err).splitlines()[0]})"
    return count


def dry_run_host_ms(model, x: torch.Tensor, repeats: int = 10) -> float:
    """Host time of one `model(x)` of a fast model with the Triton backend in a dry run (the
    best of `repeats`, in ms): the Python and dispatch work of a forward without the kernels,
    which a batch-1 GPU forward cannot go below unless replayed from a CUDA graph. It includes
    the launch log's recording and leaves out Triton's own launcher."""
    best = float("inf")
    with torch.no_grad(), _launch_log(dry_run=True):
        model(x)  # a first call may build derived weights
        for _ in range(repeats):
            began = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - began)
    return best * 1e3
