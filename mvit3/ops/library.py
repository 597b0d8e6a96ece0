"""torch.library registration of the fused ops, for both kernel backends.

Two namespaces carry the same op names and schemas:
- `mvit3::<op>`: the CUDA C++ library (csrc/ops.cpp defines the ops from schemas.def, the
  file `SCHEMAS` below is read from). When the library is not built or does not load, the
  schemas are defined here instead, so `torch.ops.mvit3.<op>` always exists; it then has no
  CUDA kernel and the "cuda" backend says so.
- `mvit3_triton::<op>`: the Triton kernels (`mvit3.kernels.<op>`).

Each op gets a fake (meta) implementation, so `torch.compile(fullgraph=True)` traces it
without a graph break, and a CPU implementation that is the reference math. Under
TRITON_INTERPRET=1 the CPU implementation of `mvit3_triton::<op>` runs the Triton kernels in
the interpreter instead, which is how the kernels are tested without a GPU.
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path

import torch

from . import cuda_lib, reference

# The schemas, written once in schemas.def (beside this file, shipped with the package), which
# csrc/ops.cpp includes too: one line per op, MVIT3_OP(name, "(arguments)", "returns").
SCHEMA_FILE = Path(__file__).with_name("schemas.def")
_SCHEMA_LINE = re.compile(r'MVIT3_OP\((\w+), "([^"]*)", "([^"]*)"\)')


def read_schemas(path: Path = SCHEMA_FILE) -> dict:
    """op name -> schema "(arguments) -> returns", in the file's order."""
    schemas = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        match = _SCHEMA_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f'{path}:{number}: expected MVIT3_OP(name, "(arguments)", '
                             f'"returns"), got: {line}')
        schemas[match[1]] = f"{match[2]} -> {match[3]}"
    return schemas


SCHEMAS = read_schemas()
OPS = tuple(SCHEMAS)

CUDA_NAMESPACE = "mvit3"
TRITON_NAMESPACE = "mvit3_triton"

_libraries = []  # keep torch.library.Library objects alive


def output_shapes(op: str, args: tuple) -> tuple:
    """([B, Cout, Hout, Wout], ...): the shape of each output of an op call, in schema order."""
    if op == "transformer_mlp_project":  # (the FFN output t, its projection)
        x, proj_weight = args[0], args[11]
        return tuple(x.shape), (x.shape[0], proj_weight.shape[0], *x.shape[2:])
    return (output_shape(op, args),)


def output_shape(op: str, args: tuple) -> tuple:
    """[B, Cout, Hout, Wout] of a call of a one-output op."""
    x = args[0]
    b, _, h, w = x.shape
    if op == "pointwise_conv":
        return (b, args[1].shape[0], h, w)
    if op == "dwconv_pointwise":
        stride = args[5]
        return (b, args[3].shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1)
    if op == "conv3x3":
        stride = args[4]
        return (b, args[1].shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1)
    if op == "patch_attention":
        return (b, x.shape[1] // 3, h, w)
    if op in ("transformer_mlp", "separable_attention"):
        return tuple(x.shape)
    raise KeyError(op)


def empty_outputs(op: str, args: tuple):
    """Uninitialised outputs of an op call, channels_last like the kernels': a tensor, or a
    tuple of them for an op with several outputs. The ops' fake (meta) implementation."""
    outputs = tuple(torch.empty(shape, dtype=args[0].dtype, device=args[0].device,
                                memory_format=torch.channels_last)
                    for shape in output_shapes(op, args))
    return outputs[0] if len(outputs) == 1 else outputs


def _fake(op: str):
    return lambda *args: empty_outputs(op, args)


def _triton_impl(op: str):
    """The Triton launcher, or the reference on CPU tensors outside the interpreter."""
    ref = getattr(reference, op)

    @functools.cache
    def launcher():  # imported on first use; looked up once (a batch-1 forward makes ~50 calls)
        return getattr(importlib.import_module(f"mvit3.kernels.{op}"), op)

    def impl(*args):
        if args[0].is_cuda or importlib.import_module("mvit3.kernels._common").cpu_allowed():
            return launcher()(*args)
        return ref(*args)

    return impl


def _triton_available() -> bool:
    try:
        importlib.import_module("mvit3.kernels._common")
        return True
    except Exception:  # triton missing or broken: the backend reports why
        return False


def _register() -> None:
    cuda_loaded = cuda_lib.load()  # defines the mvit3:: schemas when the library is built
    cuda_lib_ns = torch.library.Library(CUDA_NAMESPACE, "FRAGMENT")
    _libraries.append(cuda_lib_ns)
    for op, schema in SCHEMAS.items():
        if not (cuda_loaded and cuda_lib.has_op(op)):
            cuda_lib_ns.define(op + schema)
        cuda_lib_ns.impl(op, getattr(reference, op), "CPU")
        torch.library.register_fake(f"{CUDA_NAMESPACE}::{op}", _fake(op), lib=cuda_lib_ns)

    triton_ns = torch.library.Library(TRITON_NAMESPACE, "DEF")
    _libraries.append(triton_ns)
    have_triton = _triton_available()
    for op, schema in SCHEMAS.items():
        triton_ns.define(op + schema)
        if have_triton:
            impl = _triton_impl(op)
            triton_ns.impl(op, impl, "CUDA")
            triton_ns.impl(op, impl, "CPU")
        else:
            triton_ns.impl(op, getattr(reference, op), "CPU")
        torch.library.register_fake(f"{TRITON_NAMESPACE}::{op}", _fake(op), lib=triton_ns)


_register()
