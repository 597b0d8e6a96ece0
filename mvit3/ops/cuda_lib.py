"""Finding and loading the CUDA C++ op library (built from csrc/ by `python -m mvit3 build`).

The Python side imports cleanly whether or not the library exists: `load()` returns False and
`status()` says why (not built, built for another torch/CUDA or other sources, failed to load);
the "cuda" backend then reports itself unavailable with that reason and "auto" skips it.

A build is a directory holding libmvit3_ops.so and mvit3_build_info.json (torch and CUDA
versions, archs, sources hash). Before loading, the metadata must match the running torch and,
in a source checkout, the current sources; otherwise the library is not loaded and the reason
says what it was built for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..build import (INFO_NAME, LIB_NAME, SOURCE_ROOT, build_key, has_sources, install_root,
                     sources_hash, torch_key)

_NOT_LOOKED = "not looked for yet"
_state = {"loaded": False, "reason": _NOT_LOOKED, "path": None, "info": None}


def _current_hash() -> str | None:
    """The sources hash a build must carry: known in a checkout, unknown in an installed copy."""
    return sources_hash() if has_sources() else None


def search_dirs() -> list:
    """Where a built library is looked for, in order. MVIT3_LIB_DIR, when set, is the only place
    (an explicit choice never silently falls back to another build)."""
    if os.environ.get("MVIT3_LIB_DIR"):
        return [Path(os.environ["MVIT3_LIB_DIR"])]
    roots = [install_root(), Path.home() / ".cache" / "mvit3"]
    current = _current_hash()
    dirs = []
    for root in roots:
        if current is not None:
            dirs.append(root / build_key(current))
        else:  # installed without sources: the newest build for this torch
            dirs += sorted(root.glob(f"{torch_key()}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if has_sources():
        dirs.append(SOURCE_ROOT / "build")  # a plain `cmake -S . -B build` in the checkout
    return dirs


def mismatch(info: dict) -> str | None:
    """Why a build with this metadata must not be loaded here, or None."""
    running = {"torch": torch.__version__.split("+")[0], "cuda": torch.version.cuda or None}
    built = {"torch": str(info.get("torch_version", "?")).split("+")[0],
             "cuda": info.get("cuda_version") or None}
    if built != running:
        return (f"built for torch {built['torch']} / CUDA {built['cuda']}, but running torch "
                f"{running['torch']} / CUDA {running['cuda']}; rebuild with `python -m mvit3 build`")
    current = _current_hash()
    if current is not None and info.get("sources_hash") != current:
        return (f"built from other sources (hash {info.get('sources_hash')}, the checkout has "
                f"{current}); rebuild with `python -m mvit3 build`")
    return None


def _stale_builds() -> list:
    """Builds under the install roots that are not for this torch and these sources."""
    wanted = {p.name for p in search_dirs()}
    found = []
    for root in (install_root(), Path.home() / ".cache" / "mvit3"):
        found += [p for p in root.glob("torch*") if (p / LIB_NAME).is_file() and p.name not in wanted]
    return found


def load() -> bool:
    """Load the library once; True if its ops are registered in this process."""
    if _state["reason"] != _NOT_LOOKED:
        return _state["loaded"]
    if torch.version.cuda is None:
        _state["reason"] = "this torch build has no CUDA"
        return False
    reasons = []
    for directory in search_dirs():
        lib = directory / LIB_NAME
        if not lib.is_file():
            continue
        info_path = directory / INFO_NAME
        if not info_path.is_file():
            reasons.append(f"{lib}: no {INFO_NAME} beside it (build it with `python -m mvit3 build`)")
            continue
        info = json.loads(info_path.read_text())
        why = mismatch(info)
        if why:
            reasons.append(f"{lib}: {why}")
            continue
        try:
            torch.ops.load_library(str(lib))
        except Exception as err:  # a broken build must not break `import mvit3`
            reasons.append(f"{lib}: failed to load ({str(err).splitlines()[0]})")
            continue
        _state.update(loaded=True, reason="", path=str(lib), info=info)
        return True
    if not reasons and os.environ.get("MVIT3_LIB_DIR"):
        reasons.append(f"no {LIB_NAME} in MVIT3_LIB_DIR={os.environ['MVIT3_LIB_DIR']}")
    elif not reasons:
        stale = ", ".join(p.name for p in _stale_builds())
        reasons.append("not built (run `python -m mvit3 build`)" + (
            f"; only builds for other torch versions or sources exist: {stale}" if stale else ""))
    _state["reason"] = "; ".join(reasons)
    return False


def has_op(op: str) -> bool:
    """True when the loaded library registered a CUDA kernel for mvit3::<op>."""
    return _state["loaded"] and torch._C._dispatch_has_kernel_for_dispatch_key(f"mvit3::{op}", "CUDA")


def cuda_kernel_ops() -> list:
    """The ops with a CUDA kernel from the library."""
    from .library import OPS  # library imports this module

    return [op for op in OPS if has_op(op)]


def status() -> dict:
    """{'loaded', 'reason', 'path', 'info', 'ops'}: what was loaded from where (built for what),
    or why nothing was."""
    load()
    return dict(_state, ops=cuda_kernel_ops() if _state["loaded"] else [])


def arch_reason(capability: tuple, dtype: torch.dtype, archs=None) -> str | None:
    """Why the loaded library has no usable code for a GPU of this compute capability (and for
    this dtype), or None. `archs` defaults to the loaded build's ("75", "90", ...).

    A build holds machine code for each of its archs, which runs on GPUs of the same major
    version and an equal or newer minor one (sm_80 code runs on 8.6 and 8.9), and PTX of the
    newest, which the driver compiles for newer GPUs. Without this check a library built for
    75;90 (the CI build) would be picked on an sm_80 GPU and fail at its first launch. bf16
    kernels are compiled empty below sm_80, so a newer GPU reaching bf16 only through older
    PTX must not take them."""
    if archs is None:
        archs = (_state["info"] or {}).get("archs", ())
    archs = sorted(int(a) for a in archs)
    if not archs:
        return None  # no record of the archs (an old build): let the launch tell
    major, minor = capability
    device = 10 * major + minor
    machine_code = [a for a in archs if a // 10 == major and a % 10 <= minor]
    if machine_code:
        return None
    if device >= archs[-1] and not (dtype == torch.bfloat16 and archs[-1] < 80):
        return None
    built = ", ".join(f"sm_{a}" for a in archs)
    return (f"the library was built for {built} (PTX of sm_{archs[-1]}), which has no "
            f"{'bfloat16 ' if device >= archs[-1] else ''}code for this sm_{device} GPU; "
            f"rebuild with `python -m mvit3 build --archs {device}`")


def why_unsupported(op: str, args: tuple) -> str | None:
    """Why the CUDA library cannot take this call of `op`, or None if it can.

    The library answers itself: mvit3::<op>_why_not runs the very checks the op runs before it
    launches (csrc/ops.cpp), on tensors of any device, so meta tensors describe a call without
    data (mvit3.ops.backends passes them). Without a loaded library the reason is why it is not
    loaded. Meta tensors skip the library's device checks (real tensors get them): whether it
    has code for the GPU (arch_reason) and whether bfloat16 runs there are checked by
    mvit3.ops.backends."""
    if not load():
        return f"CUDA library unavailable: {_state['reason']}"
    return getattr(torch.ops.mvit3, f"{op}_why_not")(*args) or None
