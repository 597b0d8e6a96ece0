"""Backend choice, in one place.

backend="torch"  the reference math (`mvit3.ops.reference`): any device and dtype.
backend="triton" `mvit3_triton::<op>`: CUDA tensors (CPU tensors under TRITON_INTERPRET=1).
backend="cuda"   `mvit3::<op>` from the CUDA C++ library, when it is built and loaded.
backend="auto"   on CUDA tensors, the first of the op's kernel backends in `auto_order` that
                 takes the input (measured order per compute capability, Triton first where
                 nothing is recorded), else torch; auto never picks the Triton interpreter
                 (CPU tensors go to torch).

The environment variable MVIT3_BACKEND, when set, overrides the backend asked for.
Each backend states why it cannot take an input; an explicitly requested backend that cannot
raises `BackendUnavailable` with that reason instead of silently running something else.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Optional

import torch

from . import cuda_lib, reference
from .library import CUDA_NAMESPACE, OPS, TRITON_NAMESPACE

BACKENDS = ("auto", "torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The order `auto` tries the kernel backends in, per GPU compute capability ("major.minor")
# and op: {capability: {op: ((first, second), evidence)}}, evidence naming the recorded GPU
# run (bench/results/<folder>) whose micro-benchmarks decided it. `gpu-report` prints these
# rows in its "auto order evidence" section: an op enters only where one backend was the
# faster in every case measured. Empty until a GPU run is recorded.
MEASURED_AUTO_ORDER: dict = {}
# Where nothing is recorded: Triton first. Its kernels are the ones the CPU tests run (in the
# interpreter) and autotune on the GPU at hand; the CUDA C++ library stays the fallback for
# inputs Triton refuses, until a measurement says otherwise.
DEFAULT_AUTO_ORDER = ("triton", "cuda")


def auto_order(capability: Optional[tuple], op: str) -> tuple:
    """((first, second), why): the kernel backends `auto` tries for `op` on a GPU of compute
    capability (major, minor), and the reason for that order."""
    key = None if capability is None else f"{capability[0]}.{capability[1]}"
    recorded = MEASURED_AUTO_ORDER.get(key, {}).get(op)
    if recorded is not None:
        order, evidence = recorded
        return tuple(order), f"measured on compute capability {key}: {evidence}"
    if key is None:
        return DEFAULT_AUTO_ORDER, "no GPU here: the default order, Triton first"
    return DEFAULT_AUTO_ORDER, f"nothing recorded for compute capability {key}: Triton first by default"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on this input; the message says why."""


def requested_backend(backend: str) -> str:
    """The backend to use: MVIT3_BACKEND if set, else the argument; validated."""
    chosen = os.environ.get("MVIT3_BACKEND") or backend
    if chosen not in BACKENDS:
        source = "MVIT3_BACKEND" if os.environ.get("MVIT3_BACKEND") else "backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {chosen!r}")
    return chosen


@functools.lru_cache(maxsize=None)
def _triton_module(op: str):
    try:
        return importlib.import_module(f"mvit3.kernels.{op}"), None
    except Exception as err:  # ImportError without triton, or a broken install
        return None, f"Triton is not usable here ({type(err).__name__}: {str(err).splitlines()[0]})"


def _kernels_common():
    """mvit3.kernels._common (interpreter and dry-run state), or None without Triton."""
    return _triton_module("_common")[0]


# A call's signature: for each argument, ("tensor", dtype, device, shape, strides) or the
# value itself. Whether a backend takes a call depends on nothing else, so the choice is made
# once per signature (cached, cheap on the eager path) and, under torch.compile, at trace
# time as a constant: the compiled graph holds just the chosen op, with no graph break.
# Built on every op call, so it is kept cheap (a few microseconds for an op's arguments).
_TENSOR = "tensor"


def _tensor_spec(t: torch.Tensor, compiling: bool) -> tuple:
    if compiling:  # plain ints: the traced graph is specialised on these sizes
        return (_TENSOR, t.dtype, t.device, tuple(int(n) for n in t.shape),
                tuple(int(n) for n in t.stride()))
    return (_TENSOR, t.dtype, t.device, tuple(t.shape), t.stride())


def signature(args: tuple) -> tuple:
    compiling = torch.compiler.is_compiling()
    return tuple(_tensor_spec(a, compiling) if isinstance(a, torch.Tensor) else a for a in args)


def _is_tensor(spec) -> bool:
    return isinstance(spec, tuple) and len(spec) == 5 and spec[0] == _TENSOR


def _meta_args(sig: tuple) -> tuple:
    """Shape/stride/dtype stand-ins (meta tensors) for the kernels' own checks."""
    return tuple(torch.empty_strided(spec[3], spec[4], dtype=spec[1], device="meta")
                 if _is_tensor(spec) else spec for spec in sig)


def _common_reason(sig: tuple) -> Optional[str]:
    _, dtype, device, _, _ = sig[0]
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} (kernels take float32, float16 and bfloat16)"
    for spec in sig[1:]:
        if _is_tensor(spec) and (spec[1], spec[2]) != (dtype, device):
            return (f"mixed dtypes/devices ({spec[1]} on {spec[2]} beside {dtype} on {device}); "
                    f"every tensor of a call must match the input")
    if (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] < 8):
        return "bfloat16 needs compute capability 8.0 or newer"
    return None


def _why_not(backend: str, op: str, sig: tuple) -> Optional[str]:
    if backend == "torch":
        return None
    device = sig[0][2]
    if backend == "triton":
        module, reason = _triton_module(op)
        if module is None:
            return reason
        if device.type != "cuda" and not _kernels_common().cpu_allowed():
            return f"input is on {device}; Triton runs CUDA tensors (CPU only under TRITON_INTERPRET=1)"
        return _common_reason(sig) or module.why_unsupported(*_meta_args(sig))
    if backend == "cuda":
        if not cuda_lib.load():
            return f"CUDA library unavailable: {cuda_lib.status()['reason']}"
        if not cuda_lib.has_op(op):
            return f"the loaded CUDA library has no kernel for mvit3::{op}"
        if device.type != "cuda":
            return f"input is on {device}; the CUDA library runs CUDA tensors"
        return (_common_reason(sig)
                or cuda_lib.arch_reason(torch.cuda.get_device_capability(device), sig[0][1])
                or cuda_lib.why_unsupported(op, _meta_args(sig)))
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def why_not(backend: str, op: str, args: tuple) -> Optional[str]:
    """None if `backend` can run `op` on `args`, else the reason it cannot."""
    return _why_not(backend, op, signature(args))


def _select(op: str, backend: str, sig: tuple) -> str:
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; ops: {OPS}")
    backend = requested_backend(backend)
    if backend == "auto":
        device = sig[0][2]
        if device.type == "cuda":
            order, _ = auto_order(torch.cuda.get_device_capability(device), op)
            for candidate in order:
                if _why_not(candidate, op, sig) is None:
                    return candidate
        return "torch"
    reason = _why_not(backend, op, sig)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run {op}: {reason}")
    return backend


_chosen: dict = {}


@torch.compiler.assume_constant_result
def select_for_signature(op: str, backend: str, sig: tuple) -> str:
    """`select` by signature, memoised; the memo key also holds what can change the answer
    at run time (MVIT3_BACKEND, and whether Triton may take CPU tensors right now)."""
    kernels_common = _kernels_common()
    key = (op, backend, sig, os.environ.get("MVIT3_BACKEND"),
           kernels_common.cpu_allowed() if kernels_common else False)
    chosen = _chosen.get(key)
    if chosen is None:
        chosen = _chosen[key] = _select(op, backend, sig)
    return chosen


def select(op: str, backend: str, args: tuple) -> str:
    """The concrete backend ("torch", "triton" or "cuda") that will run `op` on `args`."""
    return select_for_signature(op, backend, signature(args))


def implementation(backend: str) -> Callable:
    """The callable of a concrete backend: returns a function (op, *args) -> Tensor."""
    if backend == "torch":
        return lambda op, *args: getattr(reference, op)(*args)
    namespace = CUDA_NAMESPACE if backend == "cuda" else TRITON_NAMESPACE
    ops = getattr(torch.ops, namespace)
    return lambda op, *args: getattr(ops, op)(*args)


def dispatch(op: str, backend: str, *args):
    """Run `op` on the backend chosen for `args`."""
    return implementation(select(op, backend, args))(op, *args)


def availability() -> list:
    """Rows (backend, available, reason) describing this machine, for `python -m mvit3 info`."""
    rows = [("torch", True, "reference math, any device and dtype")]
    module, reason = _triton_module("patch_attention")
    if module is None:
        rows.append(("triton", False, reason))
    elif torch.cuda.is_available():
        rows.append(("triton", True, f"CUDA device {torch.cuda.get_device_name()}"))
    elif _kernels_common().INTERPRET:
        rows.append(("triton", True, "TRITON_INTERPRET=1: kernels run on CPU tensors (slowly)"))
    else:
        rows.append(("triton", False, "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"))
    status = cuda_lib.status()
    if not status["loaded"]:
        rows.append(("cuda", False, status["reason"]))
    elif not torch.cuda.is_available():
        rows.append(("cuda", False, f"library loaded from {status['path']}, but no CUDA device"))
    else:
        rows.append(("cuda", True, f"library {status['path']}"))
    return rows
