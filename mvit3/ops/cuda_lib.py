"""Finding and loading the CUDA C++ op library (built from csrc/ by `python -m mvit3 build`).

The Python side imports cleanly whether or not the library exists: `load()` returns False and
`status()` says why (not built, built for another torch/CUDA, failed to load).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

LIB_NAME = "libmvit3_ops.so"
INFO_NAME = "mvit3_build_info.json"

_state = {"loaded": False, "reason": "not looked for yet", "path": None, "info": None}


def build_key() -> str:
    """Directory name of a build for the running torch: torch and CUDA versions."""
    return f"torch{torch.__version__.split('+')[0]}-cuda{torch.version.cuda or 'none'}"


def search_dirs() -> list:
    """Where a built library is looked for, in order."""
    dirs = []
    if os.environ.get("MVIT3_LIB_DIR"):
        dirs.append(Path(os.environ["MVIT3_LIB_DIR"]))
    package_dir = Path(__file__).resolve().parent.parent
    dirs.append(package_dir / "_lib" / build_key())
    dirs.append(Path.home() / ".cache" / "mvit3" / build_key())
    dirs.append(package_dir.parent / "build")  # a plain `cmake -S . -B build` in a checkout
    return dirs


def _mismatch(info: dict) -> str | None:
    running = {"torch": torch.__version__.split("+")[0], "cuda": torch.version.cuda}
    built = {"torch": str(info.get("torch_version", "?")).split("+")[0],
             "cuda": info.get("cuda_version")}
    if built["torch"] != running["torch"] or (built["cuda"] or None) != (running["cuda"] or None):
        return (f"built for torch {built['torch']} / CUDA {built['cuda']}, but running torch "
                f"{running['torch']} / CUDA {running['cuda']}; rebuild with `python -m mvit3 build`")
    return None


def load() -> bool:
    """Load the library once; True if its ops are registered in this process."""
    if _state["loaded"] or _state["reason"] != "not looked for yet":
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
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        mismatch = _mismatch(info)
        if mismatch:
            reasons.append(f"{lib}: {mismatch}")
            continue
        try:
            torch.ops.load_library(str(lib))
        except Exception as err:  # a broken build must not break `import mvit3`
            reasons.append(f"{lib}: failed to load ({str(err).splitlines()[0]})")
            continue
        _state.update(loaded=True, reason="", path=str(lib), info=info)
        return True
    _state["reason"] = "; ".join(reasons) or "not built (run `python -m mvit3 build`)"
    return False


def has_op(op: str) -> bool:
    """True when the loaded library registered a CUDA kernel for mvit3::<op>."""
    return _state["loaded"] and torch._C._dispatch_has_kernel_for_dispatch_key(f"mvit3::{op}", "CUDA")


def status() -> dict:
    """{'loaded', 'reason', 'path', 'info'} of the CUDA library."""
    load()
    return dict(_state)


def why_unsupported(op: str, args: tuple) -> str | None:
    """Shape limits of the CUDA kernels (mirrors the TORCH_CHECKs in csrc/)."""
    if op == "patch_attention":
        head_dim = args[0].shape[1] // 3 // args[1]
        if head_dim > 64:
            return f"head dim {head_dim} > 64"
    return None
