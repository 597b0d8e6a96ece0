"""What the compiler makes of one Triton launch configuration, with no GPU present.

A launch record (`mvit3.kernels._common.LaunchRecord`) is compiled exactly as Triton's JIT would
compile it on the GPU: its constexprs, and its runtime arguments specialised by Triton's own
rule (an integer equal to 1 becomes a constant, integers divisible by 16 and 16-byte aligned
pointers carry that promise: `LaunchRecord.specialization`). The result is read from
- ptxas's own report (`-v`, which Triton runs and we capture): registers, spill stores,
  stack frame;
- the compiled metadata: shared memory;
- the PTX: the matmul instruction class and the global loads' widths.
Results are cached on disk by configuration, arch and Triton version, so a second report is
instant; `compile_all` compiles what is missing in parallel processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

MMA_CLASSES = ("wgmma", "mma", "fma", "none")
ANALYSIS_VERSION = 1  # bump when what is read from a compiled kernel changes: old cache entries go


@dataclass(frozen=True)
class Compiled:
    """One configuration compiled for one arch. `error` is set (and the rest zero) when the
    compilation failed."""
    registers: int = 0
    spill_bytes: int = 0  # ptxas "bytes spill stores" per thread
    stack_bytes: int = 0
    shared_bytes: int = 0
    mma: str = "none"  # "wgmma" | "mma" (mma.sync) | "fma" (tl.dot on FMA units) | "none" (no tl.dot)
    load_bits: int = 0  # the widest global load, in bits per thread
    load_kind: str = ""  # "ld", "cp.async" or "tma": how that widest load is made
    load_mix: str = ""  # global loads by width, e.g. "128:6 16:12" (PTX instructions)
    error: str = ""


def compile_options(record, backend) -> tuple:
    """(signature, constexprs, attrs, options) for triton.compile, from the record's runtime
    specialisation and constexprs; `backend` parses the attributes (Triton's compiler backend
    for the target)."""
    meta = dict(record.constexprs)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    signature, constexprs, attrs = {}, {}, {}
    for name, (kind, attr) in record.specialization:
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = attr
        elif attr:  # keyed by the parameter's position in the kernel, not in the launch's call
            attrs[(record.kernel.arg_names.index(name),)] = backend.parse_attr(attr)
    for name, value in meta.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    return signature, constexprs, attrs, options


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_LOAD = re.compile(r"\bld\.global(?:\.[a-z]+\d*)*?(?:\.v(\d))?\.[bsuf](\d+)\b")
# cp.async.ca.shared.global [dst], [src], 0x10, src_size;  (the copy size in bytes, often hex)
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-zL0-9:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def classify_ptx(ptx: str, has_dot: bool) -> dict:
    """The matmul class and the global loads of a kernel's PTX."""
    if not has_dot:
        mma = "none"
    elif "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif re.search(r"\bmma\.sync\b", ptx):
        mma = "mma"
    else:
        mma = "fma"
    widths = Counter()
    kinds = {}
    for vector, bits in _LOAD.findall(ptx):
        width = int(bits) * int(vector or 1)
        widths[width] += 1
        kinds.setdefault(width, "ld")
    for size in _CP_ASYNC.findall(ptx):
        width = 8 * int(size, 0)
        widths[width] += 1
        kinds[width] = "cp.async"
    if "cp.async.bulk.tensor" in ptx:
        kinds[max(widths, default=0)] = "tma"
    widest = max(widths, default=0)
    mix = " ".join(f"{width}:{count}" for width, count in sorted(widths.items(), reverse=True))
    return dict(mma=mma, load_bits=widest, load_kind=kinds.get(widest, ""), load_mix=mix)


def _compile(record, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = compile_options(record, make_backend(target))
    knobs = getattr(triton, "knobs", None)
    log = io.StringIO()
    try:
        source = ASTSource(record.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        # ptxas's -v report is printed only when Triton really runs ptxas and is told to show it
        with _ptxas_report(knobs), contextlib.redirect_stdout(log):
            compiled = triton_compile(source, target=target, options=options)
    except Exception as err:
        return Compiled(error=f"{type(err).__name__}: {str(err).strip()[:400]}")
    report = log.getvalue() or _run_ptxas(compiled.asm["ptx"], arch)
    registers = _PTXAS_REGISTERS.search(report)
    frame = _PTXAS_FRAME.search(report)
    return Compiled(
        registers=int(registers.group(1)) if registers else 0,
        stack_bytes=int(frame.group(1)) if frame else 0,
        spill_bytes=int(frame.group(2)) if frame else 0,
        shared_bytes=int(compiled.metadata.shared),
        **classify_ptx(compiled.asm["ptx"], "tt.dot" in compiled.asm["ttir"]))


@contextlib.contextmanager
def _ptxas_report(knobs):
    if knobs is None:
        yield
        return
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    try:
        yield
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved


def _run_ptxas(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX, for Triton versions that cannot show their own ptxas report."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if "arch" in get_ptxas.__code__.co_varnames else get_ptxas().path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", str(source),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    return done.stderr


# ---- cache and parallel compilation ------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("MVIT3_CACHE_DIR", Path.home() / ".cache" / "mvit3")) / "kernels-report"


_SOURCE_KEYS: dict = {}  # {jit function: source_key}; sources do not change while running


def source_key(fn) -> str:
    """A hash of a @triton.jit function's source, of the jit functions it calls (recursively)
    and of the constant globals it reads. Triton's own `cache_key` also holds each function's
    starting line number (its PTX carries line info), so an edit that only moves lines above a
    kernel, or above a shared helper in kernels/_common.py, would recompile every dependent
    configuration of the report and of tests/aot_compile.py cold (about 45 minutes on two
    cores); registers, spills, shared memory and instruction classes do not depend on lines."""
    import ast
    import inspect

    from triton.runtime.jit import JITFunction

    if fn in _SOURCE_KEYS:
        return _SOURCE_KEYS[fn]
    _SOURCE_KEYS[fn] = f"recursion:{fn.__name__}"  # a placeholder, should a helper recurse
    scope = dict(fn.__globals__)
    scope.update(inspect.getclosurevars(fn.fn).nonlocals)
    parts = [fn.src]
    for name in sorted({node.id for node in ast.walk(ast.parse(fn.src)) if isinstance(node, ast.Name)}):
        value = scope.get(name)
        if isinstance(value, JITFunction):
            parts.append(f"{name}:{source_key(value)}")
        elif isinstance(value, (bool, int, float, str)) or type(value).__name__ == "constexpr":
            parts.append(f"{name}={value!r}")
    _SOURCE_KEYS[fn] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return _SOURCE_KEYS[fn]


def config_id(record, arch: int) -> str:
    """A stable name of (kernel source, specialisation, constexprs, arch, Triton version)."""
    import triton

    kernel_source = source_key(record.kernel) if hasattr(record.kernel, "src") else record.name
    text = repr((record.name, kernel_source, record.specialization, record.constexprs, arch,
                 triton.__version__, ANALYSIS_VERSION))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cached(path: Path):
    try:
        return Compiled(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


_JOBS: list = []  # (record, arch) of the pending compilations; inherited by forked workers


def _compile_job(index: int) -> Compiled:
    return _compile(*_JOBS[index])


def compile_all(records, arch: int, workers: int | None = None, cache: bool = True) -> dict:
    """{record.key: Compiled} for these records on sm_<arch>, compiling each distinct
    configuration once (cached on disk), in parallel forked processes."""
    import multiprocessing

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; "
                           "unset it for the kernels report")
    distinct = {}
    for record in records:
        distinct.setdefault(record.key, record)
    results, missing = {}, []
    directory = cache_dir()
    for key, record in distinct.items():
        path = directory / f"{config_id(record, arch)}.json"
        hit = _cached(path) if cache else None
        if hit is not None:
            results[key] = hit
        else:
            missing.append((key, record, path))
    if missing:
        _JOBS[:] = [(record, arch) for _, record, _ in missing]
        directory.mkdir(parents=True, exist_ok=True)
        workers = min(workers or os.cpu_count() or 1, len(missing))
        with contextlib.ExitStack() as stack:
            if workers > 1:
                context = multiprocessing.get_context("fork")
                pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
                compiled = pool.map(_compile_job, range(len(missing)))
            else:
                compiled = map(_compile_job, range(len(missing)))
            # each result is kept as it arrives: an interrupted run keeps what it compiled
            for (key, _, path), result in zip(missing, compiled):
                results[key] = result
                if cache and not result.error:
                    path.write_text(json.dumps(asdict(result)))
        _JOBS.clear()
    return results
