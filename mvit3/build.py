"""`python -m mvit3 build`: build the CUDA C++ op library (csrc/) with CMake and install it.

The library is built against the running torch and installed with its build metadata into
`mvit3/_lib/<build key>/`, the first place `mvit3.ops.cuda_lib` looks. The key names the torch
version, its CUDA version and a hash of the sources (csrc/**, CMakeLists.txt and the op schemas
mvit3/ops/schemas.def), so a build of other sources or for another torch is never loaded by
mistake.

The build also checks the kernels' ptxas resource usage: every kernel of the library is on the
forward path of a model, so a register spill anywhere fails the build (--allow-spills to keep
going); the report is installed beside the library as ptxas_report.txt.

This module also builds the CPU emulation of the kernels (`build_emulator`), which the tests use
where there is no GPU. It imports no part of mvit3.ops, so a broken installed library can never
stop a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_ARCHS = "75;80;86;89;90"
LIB_NAME = "libmvit3_ops.so"
INFO_NAME = "mvit3_build_info.json"
PTXAS_REPORT_NAME = "ptxas_report.txt"
MIN_CMAKE = (3, 18)

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent  # a checkout: CMakeLists.txt and csrc/ beside the package


class BuildError(RuntimeError):
    """A build step failed; the message says what to do."""


# ---- what identifies a build (shared with mvit3.ops.cuda_lib) ------------------------------

def has_sources(root: Path = SOURCE_ROOT) -> bool:
    return (root / "CMakeLists.txt").is_file() and (root / "csrc").is_dir()


# The sources of the library besides csrc/**: csrc/ops.cpp includes the schema file, which
# ships in the package (mvit3/ops/library.py reads it). csrc/build_info.cmake lists the same.
HASHED_FILES = ("CMakeLists.txt", "mvit3/ops/schemas.def")


def sources_hash(root: Path = SOURCE_ROOT) -> str:
    """16 hex digits identifying csrc/** and HASHED_FILES (csrc/build_info.cmake computes the
    same: sha256 over the sorted lines "<sha256 of file>  <relative path>\\n")."""
    files = sorted([p.relative_to(root).as_posix() for p in (root / "csrc").rglob("*") if p.is_file()]
                   + list(HASHED_FILES))
    manifest = "".join(f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    return hashlib.sha256(manifest.encode()).hexdigest()[:16]


def torch_key() -> str:
    """The torch half of a build key: torch and CUDA versions."""
    return f"torch{torch.__version__.split('+')[0]}-cuda{torch.version.cuda or 'none'}"


def build_key(hash_: str | None = None) -> str:
    """Directory name of a build: torch{version}-cuda{version}-{sources hash}."""
    return f"{torch_key()}-{hash_ or sources_hash()}"


def install_root() -> Path:
    return PACKAGE_DIR / "_lib"


# ---- tools -----------------------------------------------------------------------------------

def find_cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError("CMake was not found on PATH; install CMake >= 3.18 "
                         "(`pip install cmake` or your package manager)")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    if match is None or tuple(map(int, match.groups())) < MIN_CMAKE:
        raise BuildError(f"CMake >= {MIN_CMAKE[0]}.{MIN_CMAKE[1]} is needed, found: "
                         f"{out.splitlines()[0] if out else 'unknown version'}")
    return cmake


def find_nvcc() -> str:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BuildError("nvcc (the CUDA compiler) was not found: install the CUDA toolkit and put "
                     "its bin/ on PATH, or set CUDA_HOME (or CUDACXX) to it")


# ---- ptxas resource usage --------------------------------------------------------------------

@dataclass
class KernelUsage:
    kernel: str  # demangled, without namespaces and parameters
    arch: str
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def short_kernel_name(demangled: str) -> str:
    """'tile_gemm_kernel<__half, PointwiseProducer<__half> >': a demangled kernel name without
    return type, namespaces and parameters."""
    name = demangled
    for noise in ("(anonymous namespace)::", "mvit3::", "gemm::"):
        name = name.replace(noise, "")
    name = name.removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first "(" outside <...>
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def _short_names(mangled: list) -> dict:
    """Mangled kernel name -> a readable one without namespaces and parameters (c++filt)."""
    names = {m: m for m in mangled}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not mangled:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(mangled), capture_output=True, text=True).stdout
    for m, name in zip(mangled, out.splitlines()):
        names[m] = short_kernel_name(name)
    return names


def parse_ptxas(lines) -> list:
    """KernelUsage of every entry function (and non-inlined device function) in ptxas -v output."""
    usages, by_name, current = [], {}, None
    properties_of = None
    for line in lines:
        if m := _ENTRY.search(line):
            current = KernelUsage(kernel=m.group(1), arch=m.group(2))
            usages.append(current)
            by_name[(m.group(1), m.group(2))] = current
        elif (m := _PROPERTIES.search(line)) and current is not None:
            key = (m.group(1), current.arch)
            if key not in by_name:  # a device function that was not inlined: its spills count too
                by_name[key] = KernelUsage(kernel=m.group(1), arch=current.arch)
                usages.append(by_name[key])
            properties_of = by_name[key]
        elif (m := _FRAME.search(line)) and properties_of is not None:
            usage = properties_of
            usage.stack_bytes, usage.spill_stores, usage.spill_loads = map(int, m.groups())
        elif (m := _USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.shared_bytes = int(s.group(1))
    names = _short_names(sorted({u.kernel for u in usages}))
    for u in usages:
        u.kernel = names[u.kernel]
    return usages


def format_usage(usages: list) -> str:
    rows = sorted(usages, key=lambda u: (u.kernel, u.arch))
    width = max([len(u.kernel) for u in rows] + [6])
    lines = [f"{'kernel':<{width}}  arch    regs   smem B  stack B  spill st/ld"]
    for u in rows:
        lines.append(f"{u.kernel:<{width}}  {u.arch:<6} {u.registers:>5} {u.shared_bytes:>8} "
                     f"{u.stack_bytes:>8}  {u.spill_stores:>5}/{u.spill_loads:<5}"
                     + ("  SPILLS" if u.spills else ""))
    return "\n".join(lines)


# ---- the build -------------------------------------------------------------------------------

_OBJECT = re.compile(r"^\[\d+/\d+\] Building CUDA object .*/csrc/([\w.]+\.cu)\.o$")


def _run_build(cmake: str, build_dir: Path, jobs: int, verbose: bool) -> dict:
    """Run the build, streaming progress; returns {source: its ptxas lines} of the CUDA objects
    compiled now. Ninja prints each command's output right after its [n/N] line."""
    process = subprocess.Popen([cmake, "--build", str(build_dir), "-j", str(jobs)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ptxas, current, log = {}, None, []
    for line in process.stdout:
        line = line.rstrip("\n")
        log.append(line)
        if line.startswith("["):
            m = _OBJECT.match(line)
            current = m.group(1) if m else None
            if current:
                ptxas[current] = []
            print(f"  {line}", flush=True)
        elif line.startswith("ptxas info") or _FRAME.search(line):
            if current is not None:
                ptxas[current].append(line)
            if verbose:
                print(f"    {line}")
        elif line.strip():
            print(f"    {line}", flush=True)  # warnings and errors are never hidden
    if process.wait() != 0:
        raise BuildError(f"the build failed (exit code {process.returncode}); see the messages above")
    return ptxas


def _ptxas_lines(build_dir: Path, fresh: dict) -> list:
    """ptxas output of every CUDA source: fresh output, else the one kept from its last compile."""
    kept = build_dir / "mvit3_ptxas"
    kept.mkdir(exist_ok=True)
    for source, lines in fresh.items():
        (kept / f"{source}.txt").write_text("\n".join(lines) + "\n")
    lines = []
    for source in sorted(p.name for p in (SOURCE_ROOT / "csrc").glob("*.cu")):
        path = kept / f"{source}.txt"
        if path.is_file():
            lines += path.read_text().splitlines()
    return lines


def _forget_objects_without_report(build_dir: Path) -> None:
    """Objects compiled without a kept ptxas report (a plain CMake build in the same directory)
    are deleted so that they compile again and report."""
    for source in (SOURCE_ROOT / "csrc").glob("*.cu"):
        if not (build_dir / "mvit3_ptxas" / f"{source.name}.txt").is_file():
            for obj in build_dir.glob(f"CMakeFiles/mvit3_ops.dir/csrc/{source.name}.o"):
                obj.unlink()


def build(archs: str, jobs: int, build_dir: Path | None, dest: Path | None, build_type: str,
          werror: bool, allow_spills: bool, verbose: bool) -> Path:
    """Configure, build, check and install the library; returns the install directory."""
    if not has_sources():
        raise BuildError(f"no CMakeLists.txt and csrc/ in {SOURCE_ROOT}: building needs a source "
                         "checkout of mvit3 (an installed wheel has no sources)")
    if torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} has no CUDA; install a CUDA build of torch")
    cmake, nvcc = find_cmake(), find_nvcc()
    hash_ = sources_hash()
    key = build_key(hash_)
    build_dir = (build_dir or SOURCE_ROOT / "build" / f"cmake-{torch_key()}").resolve()
    dest = (dest or install_root() / key).resolve()
    arch_list = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    print(f"mvit3 build: torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc {nvcc}, "
          f"archs {';'.join(arch_list)}, sources {hash_}")
    print(f"  build dir: {build_dir}")

    configure = [cmake, "-S", str(SOURCE_ROOT), "-B", str(build_dir),
                 f"-DCMAKE_BUILD_TYPE={build_type}", f"-DMVIT3_CUDA_ARCHS={';'.join(arch_list)}",
                 f"-DPython3_EXECUTABLE={sys.executable}", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 f"-DMVIT3_WERROR={'ON' if werror else 'OFF'}", "-DMVIT3_PTXAS_VERBOSE=ON"]
    if not (build_dir / "CMakeCache.txt").is_file():
        if shutil.which("ninja") is None:
            raise BuildError("ninja was not found on PATH (`pip install ninja`): the build reads "
                             "each kernel's ptxas report from ninja's per-command output")
        configure += ["-G", "Ninja"]
    print("[configure] cmake (finding torch and CUDA) ...", flush=True)
    started = time.time()
    result = subprocess.run(configure, capture_output=True, text=True)
    if verbose or result.returncode != 0:
        print(result.stdout + result.stderr)
    if result.returncode != 0:
        raise BuildError("CMake configure failed; see the messages above")

    print(f"[build] {jobs} jobs", flush=True)
    _forget_objects_without_report(build_dir)
    fresh = _run_build(cmake, build_dir, jobs, verbose)
    usages = parse_ptxas(_ptxas_lines(build_dir, fresh))
    report = format_usage(usages)
    print(f"[ptxas] resource usage of {len(usages)} kernels:\n{report}")
    spilling = sorted({f"{u.kernel} ({u.arch})" for u in usages if u.spills})
    if spilling and not allow_spills:
        raise BuildError("register spills in hot kernels: " + ", ".join(spilling))

    info = json.loads((build_dir / INFO_NAME).read_text())
    if info.get("sources_hash") != hash_:
        raise BuildError("the sources changed during the build; run it again")
    info["built_by"] = "python -m mvit3 build"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    (dest / PTXAS_REPORT_NAME).write_text(report + "\n")
    staged = dest / (LIB_NAME + ".tmp")
    shutil.copy2(build_dir / LIB_NAME, staged)
    os.replace(staged, dest / LIB_NAME)  # a process that has the old one loaded keeps its copy
    print(f"[install] {dest / LIB_NAME} ({time.time() - started:.0f} s)")
    return dest


def _check_load(dest: Path) -> None:
    """Load the installed library in a fresh interpreter and list what it registered."""
    code = ("import mvit3.ops, mvit3.ops.cuda_lib as c; s = c.status(); "
            "print(s['loaded'], s['path'] or s['reason'], ' '.join(c.cuda_kernel_ops()))")
    env = dict(os.environ, MVIT3_LIB_DIR=str(dest))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    fields = result.stdout.strip().split(" ", 2) if result.returncode == 0 else []
    if len(fields) < 2 or fields[0] != "True":
        raise BuildError("the installed library does not load: "
                         + (fields[1] if len(fields) > 1 else result.stderr.strip()[-2000:]))
    print(f"[check] loads; CUDA kernels: {fields[2] if len(fields) > 2 else '(none)'}")


def add_arguments(parser) -> None:
    parser.add_argument("--archs", default=os.environ.get("MVIT3_CUDA_ARCHS", DEFAULT_ARCHS),
                        help="compute capabilities, e.g. '75;90' (default: $MVIT3_CUDA_ARCHS or "
                             f"'{DEFAULT_ARCHS}')")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                        help="parallel compile jobs (default: the number of CPUs)")
    parser.add_argument("--build-dir", type=Path, default=None,
                        help="CMake build directory (default: build/cmake-<torch key> in the checkout)")
    parser.add_argument("--dest", type=Path, default=None,
                        help="install directory (default: mvit3/_lib/<build key>, searched first)")
    parser.add_argument("--build-type", default="Release", help="CMake build type (default: Release)")
    parser.add_argument("--werror", action="store_true", help="compiler warnings are errors")
    parser.add_argument("--allow-spills", action="store_true",
                        help="install even if ptxas reports register spills")
    parser.add_argument("--verbose", "-v", action="store_true", help="show all compiler output")
    parser.add_argument("--emulator", action="store_true",
                        help="build the CPU emulation of the kernels for the tests instead "
                             "(no GPU or nvcc needed; the tests build it on demand too)")


def run(args) -> int:
    try:
        if args.emulator:
            print(f"mvit3 build: CPU emulation of csrc/ -> {build_emulator(args.verbose)}")
            return 0
        dest = build(args.archs, args.jobs, args.build_dir, args.dest, args.build_type, args.werror,
                     args.allow_spills, args.verbose)
        _check_load(dest)
    except BuildError as err:
        print(f"mvit3 build: error: {err}", file=sys.stderr)
        return 1
    return 0


# ---- the CPU emulation of the kernels (tests) -------------------------------------------------

def cuda_header_dir() -> Path:
    """A directory with cuda_fp16.h and cuda_bf16.h, which the emulator needs (host code only):
    the CUDA toolkit's, or the one the nvidia-* wheels of a pip torch install."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(v)]
    try:
        nvcc = find_nvcc()
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    except BuildError:
        pass
    candidates.append(Path("/usr/local/cuda/include"))
    try:
        import nvidia  # namespace package of the nvidia-* wheels
        for root in nvidia.__path__:
            candidates += sorted(Path(root).glob("*/include"))
    except ImportError:
        pass
    for candidate in candidates:
        if (candidate / "cuda_fp16.h").is_file() and (candidate / "cuda_bf16.h").is_file():
            return candidate
    raise BuildError("cuda_fp16.h was not found (looked in $CUDA_HOME, next to nvcc, "
                     "/usr/local/cuda and the nvidia wheels)")


SANITIZERS = ("address",)


def asan_preload() -> str:
    """LD_PRELOAD for a process that loads an emulator built with sanitize="address" (python
    itself is not instrumented): the host compiler's AddressSanitizer runtime, which must come
    first, then its libstdc++, without which the runtime cannot find the real __cxa_throw when
    it starts (python does not link libstdc++) and aborts on the first C++ exception."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise BuildError("no host C++ compiler")
    libraries = []
    for name in ("libasan.so", "libstdc++.so.6"):
        found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                               text=True).stdout.strip()
        if not found or not Path(found).is_absolute() or not Path(found).exists():
            raise BuildError(f"{compiler} has no {name} (AddressSanitizer)")
        libraries.append(str(Path(found).resolve()))
    return " ".join(libraries)


def build_emulator(verbose: bool = False, sanitize: str | None = None) -> Path:
    """Build and load the CPU emulation of csrc/ (ops `torch.ops.mvit3_emulated.<op>` on CPU
    tensors); returns the library path. Cached per sources hash under build/.

    sanitize="address": built with AddressSanitizer (-O1, cached apart under
    build/emulator-address-<key>/); the process must run with LD_PRELOAD=asan_preload() and
    must not load the plain emulator as well (both register the mvit3_emulated ops)."""
    from torch.utils import cpp_extension

    if not has_sources():
        raise BuildError(f"no csrc/ in {SOURCE_ROOT}")
    if sanitize is not None and sanitize not in SANITIZERS:
        raise BuildError(f"unknown sanitizer {sanitize!r} (known: {', '.join(SANITIZERS)})")
    csrc = SOURCE_ROOT / "csrc"
    flavour = f"emulator-{sanitize}" if sanitize else "emulator"
    build_dir = SOURCE_ROOT / "build" / f"{flavour}-{build_key()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # One host translation unit per source, as in the real build (each .cu is its own TU).
    sources = []
    for source in sorted(csrc.glob("*.cu")) + [csrc / "ops.cpp"]:
        wrapper = build_dir / f"emulated_{source.stem}.cpp"
        text = f'// generated by mvit3.build.build_emulator\n#include "{source}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    flags = ["-DMVIT3_EMULATE", "-fno-strict-aliasing", "-Wall", "-Wextra"]
    # ASan: -O1 (the sanitizer's advice: a fast build, reports that match the source) and
    # line tables for the reports' stack traces.
    flags = (["-O1", "-g1", "-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize
             else ["-O3"]) + flags
    name = f"mvit3_emulated_ops_{sanitize}" if sanitize else "mvit3_emulated_ops"
    cpp_extension.load(
        name=name, sources=sources, build_directory=str(build_dir), extra_cflags=flags,
        extra_ldflags=["-fsanitize=address"] if sanitize else None,
        extra_include_paths=[str(csrc), str(cuda_header_dir())], with_cuda=False,
        is_python_module=False, verbose=verbose)
    # Caches of other sources (of this flavour: emulator-torch*, emulator-address-torch*).
    for stale in build_dir.parent.glob(f"{flavour}-torch*"):
        if stale != build_dir:
            shutil.rmtree(stale, ignore_errors=True)
    return build_dir / f"{name}.so"
