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


MAX_HEAD_DIM = 64  # csrc/mvit3.h: kMaxHeadDim
INT32_MAX = 2 ** 31 - 1
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes y and z (csrc/mvit3.h: kMaxGridYZ)
MAX_CHANNELS = MAX_GRID_YZ * 64  # csrc/mvit3.h: kMaxChannels
_NORMS = ("none", "layer", "group")
_ACTS = ("none", "silu")
# Position of the 3x3 ops' `dilation` in their schema; a call may leave it out (default 1).
_DILATION_ARG = {"dwconv_pointwise": 7, "conv3x3": 6}


def _channel_counts(op: str, args: tuple) -> dict:
    """name -> channel count of every map, weight output and workspace of a call whose count
    csrc/ops.cpp checks against MAX_CHANNELS (the input's is checked with its other sizes).
    An absent (None) tensor counts 0: other checks name it."""
    def size(t, dim: int) -> int:
        return t.shape[dim] if t is not None else 0

    if op in ("pointwise_conv", "conv3x3"):
        return {"weight (Cout)": size(args[1], 0), "x2": size(args[3], 1)}
    if op == "dwconv_pointwise":  # with expand_weight (args[8]): its hidden map, a workspace
        expand_weight = args[8] if len(args) > 8 else None
        return {"weight (Cout)": size(args[3], 0), "the hidden workspace (Ch)": size(expand_weight, 0)}
    if op == "transformer_mlp":
        return {"w1 (F)": size(args[5], 0)}
    if op == "transformer_mlp_project":
        return {"w1 (F)": size(args[4], 0), "proj_weight (Cout)": size(args[11], 0)}
    if op == "separable_attention":
        return {"the qkv workspace (1 + 2d)": 1 + 2 * args[0].shape[1]}
    return {}


def _size_reason(op: str, args: tuple) -> str | None:
    """The size limits of csrc/mvit3.h in the words of csrc/ops.cpp. There is no limit on numel:
    offsets are int64 and the launchers split a grid that would pass CUDA's limits; what stays
    int32 is each size, and each channel count is a number of 64-channel blocks on grid axis y."""
    name = "qkv" if op == "patch_attention" else "x"  # the input's name in csrc/ops.cpp
    sizes = tuple(args[0].shape)
    if max(sizes) > INT32_MAX:
        return (f"{name} [B, C, H, W] = {list(sizes)} has a size over 2^31 - 1 (the kernels "
                f"index samples, channels, rows and columns with int32)")
    pixels = sizes[2] * sizes[3]
    if pixels > INT32_MAX:
        return (f"{name} has H * W = {pixels} pixels, over 2^31 - 1 (the kernels index the "
                f"pixels of a sample with int32)")
    for name, channels in {name: sizes[1], **_channel_counts(op, args)}.items():
        if channels > MAX_CHANNELS:
            return (f"{name} has {channels} channels, over {MAX_CHANNELS} (the kernels put 64 "
                    f"channels per block on grid axis y, at most {MAX_GRID_YZ} blocks)")
    if op == "patch_attention" and args[1] > MAX_GRID_YZ:
        return f"num_heads {args[1]} is over {MAX_GRID_YZ} (one head per block on grid axis y)"
    return None


def why_unsupported(op: str, args: tuple) -> str | None:
    """Limits of the CUDA kernels (mirrors the TORCH_CHECKs of csrc/ops.cpp); None if the
    kernels take these arguments. dtype, device and compute capability are checked by
    mvit3.ops.backends for every backend."""
    x = args[0]
    if x.dim() != 4:
        return f"input must be a [B, C, H, W] map, got shape {tuple(x.shape)}"
    size_reason = _size_reason(op, args)
    if size_reason:
        return size_reason
    if op == "pointwise_conv":
        norm, act = args[5], args[9]
        if norm not in _NORMS or act not in _ACTS:
            return f"norm {norm!r} / act {act!r} (kernels take norm {_NORMS}, act {_ACTS})"
    elif op in ("dwconv_pointwise", "conv3x3"):
        stride = args[5] if op == "dwconv_pointwise" else args[4]
        if stride not in (1, 2):
            return f"stride {stride} (kernels take 1 and 2)"
        dilation = args[_DILATION_ARG[op]] if len(args) > _DILATION_ARG[op] else 1
        if dilation < 1:
            return f"dilation must be a positive int, got {dilation}"
        if max(x.shape[2], x.shape[3]) + dilation > 2 ** 31:
            return (f"H + dilation and W + dilation must be <= 2^31 (the kernels index tap rows and "
                    f"columns with int32), got {x.shape[2]}x{x.shape[3]} with dilation {dilation}")
        if op == "conv3x3" and args[5] not in _ACTS:
            return f"act {args[5]!r} (kernels take {_ACTS})"
    elif op == "patch_attention":
        num_heads, proj_weight = args[1], args[3]
        channels, h, w = x.shape[1], x.shape[2], x.shape[3]
        if channels % 3 or num_heads <= 0 or (channels // 3) % num_heads:
            return f"qkv channels {channels} are not 3 * heads ({num_heads}) * head dim"
        head_dim = channels // 3 // num_heads
        if head_dim > MAX_HEAD_DIM:
            return f"head dim {head_dim} > {MAX_HEAD_DIM}"
        if h % 2 or w % 2:
            return f"odd map size {h}x{w} (2x2 patches need even H and W)"
        if proj_weight is not None and tuple(proj_weight.shape) != (channels // 3, channels // 3):
            return f"proj_weight {tuple(proj_weight.shape)} is not [d, d]"
    elif op == "transformer_mlp":
        if args[1] not in _NORMS:
            return f"norm {args[1]!r} (kernels take {_NORMS})"
    elif op == "transformer_mlp_project":
        if args[13] not in _ACTS:
            return f"act {args[13]!r} (kernels take {_ACTS})"
    elif op == "separable_attention":
        h, w = x.shape[2], x.shape[3]
        if h % 2 or w % 2:
            return f"odd map size {h}x{w} (2x2 patches need even H and W)"
    return None
