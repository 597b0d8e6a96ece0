"""The rows of the kernels report for the CUDA C++ library (`--backend cuda`).

Which launches: the fast model runs with its ops routed to the CPU emulator of csrc/
(`mvit3.build.build_emulator`, the build the CPU tests use) in the emulator's record mode
(csrc/emulator.h): each launch the launchers issue is recorded with its kernel, grid and block,
and nothing runs, so a forward at batch 100 takes a fraction of a second. The emulator takes the
GPU's grid limits in that mode, so the launches are the GPU's (no test-sized chunks). A kernel is
known by its address in the emulator's library, named through its symbol table (`nm -C`).

What the compiler made: the built library for the chosen arch (`python -m mvit3 build`), read
with `cuobjdump`: registers, stack and shared memory per function (`--dump-resource-usage`),
the matmul instructions and global loads from the SASS (`-sass`), and spill stores from the
build's ptxas report. Functions are matched to the recorded kernels by their demangled names
(nvcc's and g++'s manglings differ only in how they name anonymous namespaces, which both
demangle to "(anonymous namespace)"). Cached per library file and arch.

Bytes and FLOPs: an op call's least traffic and FLOPs are those of the Triton rows for the same
call (same op, same tensors: the Triton backend's dry run of that call), so both backends are
held to the same floor; they are given to the call's first CUDA kernel, the op's other kernels
carry none.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mvit3.build import PTXAS_REPORT_NAME, short_kernel_name

from .compiled import Compiled, cache_dir
from .gpus import GPU, blocks_per_sm, floor_us
from .report import Row, _stage_tracking, aten_row

ANALYSIS_VERSION = 1  # bump when what is read from the library changes: old cache entries go
_EMULATED_NAMESPACE = "mvit3_emulated"
_TRITON_NAMESPACE = "mvit3_triton"
_RECORD_FIELDS = 8  # per launch: kernel address, grid x y z, block x y z, dynamic shared bytes


class CudaReportError(RuntimeError):
    """The CUDA rows cannot be made here; the message says what is missing and the fix."""


@dataclass(frozen=True)
class CudaLaunch:
    """One launch of a CUDA C++ kernel, as the emulator recorded it."""
    symbol: str  # the kernel, demangled: "void mvit3::gemm::tile_gemm_kernel<__half, ...>(...)"
    grid: tuple
    block: tuple
    dynamic_shared_bytes: int

    @property
    def threads(self) -> int:
        return math.prod(self.block)


@dataclass
class CudaRow(Row):
    """A report row of a CUDA C++ launch (`launch` set) or of an ATen op (`launch` None)."""
    launch: Optional[CudaLaunch] = None

    @property
    def meta(self) -> dict:
        return {"threads": self.launch.threads} if self.launch else {}

    def as_dict(self) -> dict:
        d = super().as_dict()
        if self.launch is not None:
            d.update(num_warps=self.launch.threads // 32, symbol=self.launch.symbol,
                     block=list(self.launch.block),
                     dynamic_shared_bytes=self.launch.dynamic_shared_bytes)
        return d


# ---- the launches of one forward, from the emulator's record mode ------------------------------

@functools.lru_cache(maxsize=None)
def _emulator() -> tuple:
    """(ctypes handle, {address: demangled symbol}) of the emulator's library, built if needed
    (about a minute the first time for these sources) and loaded as torch.ops.mvit3_emulated."""
    from mvit3 import build

    try:
        path = build.build_emulator()
    except Exception as err:
        raise CudaReportError(f"cannot build the CPU emulator of csrc/ (`python -m mvit3 build "
                              f"--emulator`): {err}") from err
    handle = ctypes.CDLL(str(path))
    handle.mvit3_emu_recorded_count.restype = ctypes.c_int64
    handle.mvit3_emu_recorded_launch.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    return handle, _symbols_by_address(path)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise CudaReportError(f"{name} (binutils) is not on PATH: it names the emulated kernels")
    return found


def _symbols_by_address(library: Path) -> dict:
    """{address: demangled name} of the functions defined in a host library (`nm -C`)."""
    out = subprocess.run([_tool("nm"), "-C", "--defined-only", str(library)],
                         capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        address, kind, name = (line.split(" ", 2) + ["", ""])[:3]
        if kind.lower() in ("t", "w") and name:
            symbols[int(address, 16)] = name
    return symbols


@contextlib.contextmanager
def _recording(handle, shared_per_block: int = 0):
    """Record mode, on a device whose blocks may take `shared_per_block` bytes of shared memory
    (0: the emulator's default, an sm_90's): what the launchers decide by (fp32 FFN tiles)."""
    handle.mvit3_emu_set_shared_optin.argtypes = [ctypes.c_int64]
    if handle.mvit3_emu_set_shared_optin(shared_per_block) != 0:
        raise CudaReportError(f"the emulator refuses {shared_per_block} bytes of shared memory "
                              "a block")
    handle.mvit3_emu_set_recording(1)
    try:
        yield
    finally:
        handle.mvit3_emu_set_recording(0)
        handle.mvit3_emu_set_shared_optin(0)


def _recorded(handle, symbols: dict, first: int) -> list:
    """The launches recorded since launch number `first`."""
    out = (ctypes.c_int64 * _RECORD_FIELDS)()
    launches = []
    for index in range(first, handle.mvit3_emu_recorded_count()):
        handle.mvit3_emu_recorded_launch(index, out)
        address, gx, gy, gz, bx, by, bz, dynamic = out
        symbol = symbols.get(address)
        if symbol is None:
            raise CudaReportError(f"an emulated launch of a kernel at {address:#x} has no symbol "
                                  f"in the emulator's library")
        launches.append(CudaLaunch(symbol, (gx, gy, gz), (bx, by, bz), dynamic))
    return launches


@dataclass
class _OpCall:
    op: str
    stage: str
    launches: list
    bytes: int
    dot_flops: int
    simt_flops: int


def _triton_accounting(op: str, args: tuple) -> tuple:
    """(bytes, dot FLOPs, SIMT FLOPs) of an op call: the sum over the launches the Triton
    backend makes for it (its dry run: recorded, nothing runs)."""
    from mvit3.kernels._common import launch_log

    with launch_log(dry_run=True) as log:
        getattr(getattr(torch.ops, _TRITON_NAMESPACE), op)(*args)
    return (sum(r.bytes for r in log.records), sum(r.work.dot_flops for r in log.records),
            sum(r.work.simt_flops for r in log.records))


@contextlib.contextmanager
def _ops_on_the_emulator(handle, symbols: dict, stage: list, calls: list):
    """Routes the torch backend's ops (mvit3.ops.reference) to the emulated library for the
    duration; each call is appended to `calls` with its launches and its Triton accounting."""
    from mvit3.ops import library, reference

    emulated = getattr(torch.ops, _EMULATED_NAMESPACE)

    def routed(op):
        def call(*args):
            first = handle.mvit3_emu_recorded_count()
            out = getattr(emulated, op)(*args)
            launches = _recorded(handle, symbols, first)
            calls.append(_OpCall(op, stage[0], launches, *_triton_accounting(op, args)))
            return out
        return call

    saved = {op: getattr(reference, op) for op in library.OPS}
    try:
        for op in library.OPS:
            setattr(reference, op, routed(op))
        yield
    finally:
        for op, function in saved.items():
            setattr(reference, op, function)


class _AtenRecorder(TorchDispatchMode):
    """The ATen ops of the forward that launch work, each with the number of op calls made
    before it (their place in the forward)."""

    def __init__(self, calls: list, stage: list):
        super().__init__()
        self.calls, self.stage, self.rows = calls, stage, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace not in (_EMULATED_NAMESPACE, _TRITON_NAMESPACE):
            row = aten_row(func, args, out, self.stage[0])
            if row is not None:
                self.rows.append((len(self.calls), row))
        return out


def collect_cuda(name: str, batch: int, dtype: torch.dtype, img_size: int = 256,
                 shared_per_block: int = 0) -> list:
    """The rows of one forward of the fast model with backend="cuda" on a
    [batch, 3, img_size, img_size] input, in launch order: one per launch of the CUDA C++
    library's launchers (recorded by the emulator, nothing runs) and one per ATen op. The
    launchers decide as on a GPU whose blocks may take `shared_per_block` bytes of shared
    memory (GPU.shared_per_block; 0: an sm_90's, the emulator's default)."""
    import mvit3.fast as fast

    handle, symbols = _emulator()
    # backend="torch" calls mvit3.ops.reference.<op>, which _ops_on_the_emulator routes to
    # the emulated library: the same op calls, arguments and launchers as backend="cuda".
    model = fast.create_model(name, backend="torch").to(dtype).eval()
    x = torch.zeros(batch, model.in_chans, img_size, img_size, dtype=dtype)
    stage, calls = ["stem"], []
    dot_rate = "fp32" if dtype == torch.float32 else "tensor"  # the library never uses TF32
    with torch.no_grad(), _recording(handle, shared_per_block), \
            _ops_on_the_emulator(handle, symbols, stage, calls):
        model(x)  # derives the inference weights: its ATen work is not part of a forward
        calls.clear()
        recorder = _AtenRecorder(calls, stage)
        with _stage_tracking(model, stage), recorder:
            model(x)
    rows, aten = [], list(recorder.rows)
    for index, call in enumerate(calls):
        while aten and aten[0][0] <= index:
            rows.append(aten.pop(0)[1])
        for position, launch in enumerate(call.launches):
            first = position == 0
            rows.append(CudaRow(
                kernel=short_kernel_name(launch.symbol), op=call.op, stage=call.stage,
                grid=launch.grid, bytes=call.bytes if first else 0,
                dot_flops=call.dot_flops if first else 0,
                simt_flops=call.simt_flops if first else 0, dot_rate=dot_rate, launch=launch))
    rows += [row for _, row in aten]
    return rows


# ---- what the compiler made, from the built library ---------------------------------------------

def built_library(arch: int) -> Path:
    """The built CUDA library of the current sources that holds machine code for sm_<arch>."""
    from mvit3.ops import cuda_lib

    status = cuda_lib.status()
    if not status["loaded"]:
        raise CudaReportError(f"the CUDA C++ library is not available: {status['reason']}")
    archs = [str(a) for a in (status["info"] or {}).get("archs", [])]
    if str(arch) not in archs:
        wanted = ";".join(sorted(set(archs) | {str(arch)}, key=int))
        raise CudaReportError(
            f"the built CUDA library ({status['path']}) has machine code for "
            f"sm_{', sm_'.join(archs)} only, not sm_{arch}: rebuild with "
            f"`python -m mvit3 build --archs \"{wanted}\"`")
    return Path(status["path"])


def _cuobjdump() -> str:
    """cuobjdump of the CUDA toolkit, or the copy Triton's package ships."""
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    with contextlib.suppress(ImportError):
        import triton.backends.nvidia as nvidia

        candidates.append(str(Path(nvidia.__file__).parent / "bin" / "cuobjdump"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CudaReportError("cuobjdump was not found: install the CUDA toolkit (its bin/ on PATH or "
                          "CUDA_HOME set) or Triton, whose package ships one")


def _run(*command) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise CudaReportError(f"{' '.join(map(str, command))} failed: {done.stderr.strip()[:400]}")
    return done.stdout


def _demangle(mangled: list) -> dict:
    out = _run(_tool("c++filt"), *mangled) if mangled else ""
    return dict(zip(mangled, out.splitlines()))


_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ELF_ARCH = re.compile(r"^arch = sm_(\d+)", re.M)


def parse_resource_usage(text: str, arch: int) -> dict:
    """{mangled name: (registers, stack bytes, shared bytes, local bytes)} of the functions of
    sm_<arch> in `cuobjdump --dump-resource-usage` output (the first copy of a function that
    several translation units hold)."""
    usage = {}
    # the text is a sequence of sections, each opened by "arch = sm_XY" and its functions
    sections = _ELF_ARCH.split(text)
    for section_arch, body in zip(sections[1::2], sections[2::2]):
        if int(section_arch) != arch:
            continue
        for name, *numbers in _RESOURCES.findall(body):
            usage.setdefault(name, tuple(map(int, numbers)))
    return usage


_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
# "/*0090*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;" -> "LDG.E.128"
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_LOAD_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def sass_functions(library: Path, arch: int) -> dict:
    """{mangled function name: its SASS} of the library's sm_<arch> machine code (the first copy
    of a function that several translation units hold)."""
    sass = _run(_cuobjdump(), "-sass", "-arch", f"sm_{arch}", str(library))
    bodies, marks = {}, list(_SASS_FUNCTION.finditer(sass))
    for mark, following in zip(marks, marks[1:] + [None]):
        bodies.setdefault(mark.group(1), sass[mark.end():following.start() if following else None])
    return bodies


def sass_opcodes(sass: str) -> Counter:
    """How often each opcode (with its modifiers: "LDG.E.128") occurs in SASS text."""
    return Counter(_SASS_OPCODE.findall(sass))


def classify_sass(sass: str) -> dict:
    """The matmul class and the global loads of one function's SASS.

    mma: "wgmma" (HGMMA, Hopper warpgroup MMA), "mma" (HMMA: mma.sync and the WMMA API), "fma"
    (no tensor-core instruction, FFMA present: an fp32 product, or a kernel whose arithmetic is
    a reduction or an elementwise epilogue), "none" (neither). Global loads: LDG (width from its
    suffix: .128, .64, .U16/.S16, .U8/.S8, else 32 bits), LDGSTS (cp.async) and UTMALDG (TMA);
    loads through generic pointers (LD) can be shared or global and are not counted."""
    opcodes = sass_opcodes(sass)
    if any(op.startswith("HGMMA") for op in opcodes):
        mma = "wgmma"
    elif any(op.startswith("HMMA") for op in opcodes):
        mma = "mma"
    elif any(op.split(".")[0] == "FFMA" for op in opcodes):
        mma = "fma"
    else:
        mma = "none"
    widths, kinds = Counter(), {}
    for op, count in opcodes.items():
        parts = op.split(".")
        if parts[0] not in ("LDG", "LDGSTS", "UTMALDG"):
            continue
        width = next((_LOAD_WIDTH[p] for p in parts[1:] if p in _LOAD_WIDTH), 32)
        widths[width] += count
        kind = {"LDG": "ld", "LDGSTS": "cp.async", "UTMALDG": "tma"}[parts[0]]
        if kinds.get(width, "ld") == "ld":
            kinds[width] = kind
    widest = max(widths, default=0)
    mix = " ".join(f"{width}:{count}" for width, count in sorted(widths.items(), reverse=True))
    return dict(mma=mma, load_bits=widest, load_kind=kinds.get(widest, ""), load_mix=mix)


_PTXAS_ROW = re.compile(r"(.+?)\s+(sm_\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/")


def ptxas_usage(library: Path) -> dict:
    """{(short kernel name, "sm_XY"): (shared bytes, spill store bytes)} from the ptxas report
    the build installs beside the library (columns: kernel, arch, regs, smem, stack,
    spill stores/loads)."""
    report = library.parent / PTXAS_REPORT_NAME
    if not report.is_file():
        raise CudaReportError(f"{report} is missing: rebuild with `python -m mvit3 build`")
    usage = {}
    for line in report.read_text().splitlines()[1:]:
        if match := _PTXAS_ROW.match(line):
            kernel, arch, _registers, shared, _stack, spill_stores = match.groups()
            usage[(kernel, arch)] = (int(shared), int(spill_stores))
    return usage


def _library_id(library: Path, arch: int) -> str:
    digest = hashlib.sha256(library.read_bytes()).hexdigest()[:24]
    return f"cuda-{digest}-sm_{arch}-v{ANALYSIS_VERSION}"


def analyse_library(library: Path, arch: int) -> dict:
    """{demangled kernel: Compiled} for every function of the library's sm_<arch> code,
    cached by the library file's hash."""
    path = cache_dir() / f"{_library_id(library, arch)}.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        return {name: Compiled(**fields) for name, fields in json.loads(path.read_text()).items()}
    tool = _cuobjdump()
    usage = parse_resource_usage(_run(tool, "--dump-resource-usage", str(library)), arch)
    if not usage:
        raise CudaReportError(f"{library} holds no sm_{arch} machine code")
    bodies = sass_functions(library, arch)
    names = _demangle(sorted(usage))
    reported = ptxas_usage(library)
    analysis = {}
    for mangled, (registers, stack, _shared, _local) in usage.items():
        name = names[mangled]
        key = (short_kernel_name(name), f"sm_{arch}")
        if key not in reported:
            analysis[name] = Compiled(error=f"{key[0]} ({key[1]}) is not in {PTXAS_REPORT_NAME}")
            continue
        # the kernel's own shared memory, as ptxas reports it: cuobjdump's SHARED of an sm_90
        # function also holds the 1 KB the runtime reserves per block, which blocks_per_sm adds
        shared, spill_stores = reported[key]
        analysis[name] = Compiled(registers=registers, stack_bytes=stack, shared_bytes=shared,
                                  spill_bytes=spill_stores,
                                  **classify_sass(bodies.get(mangled, "")))
    if not any(c.error for c in analysis.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({name: asdict(c) for name, c in analysis.items()}))
    return analysis


def analyse_cuda(rows: list, gpu: GPU, arch: int, compile_kernels: bool = True) -> list:
    """Fill in each CUDA row's compiled kernel (sm_<arch> of the built library), occupancy,
    waves and floor; ATen rows get their floor only."""
    analysis = analyse_library(built_library(arch), arch) if compile_kernels else {}
    for row in rows:
        row.floor_us = floor_us(gpu, row.bytes, row.dot_flops, row.simt_flops, row.dot_rate)
        if not isinstance(row, CudaRow) or not compile_kernels:
            continue
        row.compiled = analysis.get(row.launch.symbol) or Compiled(
            error=f"no function {row.launch.symbol} in the sm_{arch} code of the built library")
        if not row.compiled.error:
            shared = row.compiled.shared_bytes + row.launch.dynamic_shared_bytes
            row.blocks_per_sm = blocks_per_sm(gpu, row.compiled.registers, shared,
                                              row.launch.threads // 32)
            if row.blocks_per_sm:
                row.waves = round(row.programs / (gpu.sms * row.blocks_per_sm), 3)
    return rows
