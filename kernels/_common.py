"""Shared pieces of the Triton kernels: the launch wrapper, the launch log, small helpers.

Every kernel launch goes through `launch()`. That gives one place to
- count launches per forward (`launch_log()`), and
- enumerate every configuration the code launches (`launch_log(dry_run=True)` records the
  kernel, its argument types and constexprs without running it), which
  `tests/test_triton_aot.py` compiles ahead of time for sm_75, sm_80 and sm_90.

Kernels pick their meta-parameters with deterministic heuristics (no `triton.autotune`) from
the shapes, the dtype and the GPU's compute capability (`target_arch`; `compile_target` for
dry runs), so that a launch is CUDA-graph capturable on its first call and the set of
configurations of each arch is known ahead of time.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}


class TensorArg:
    """A tensor argument as a launch record keeps it: its dtype and address (Triton's 16-byte
    alignment) and bytes, and whether it is scratch (a workspace of the launch's own, not the
    op's input or output). Not a tuple: Triton would take a tuple for a tuple argument."""
    __slots__ = ("dtype", "address", "nbytes", "scratch")

    def __init__(self, dtype: torch.dtype, address: int, nbytes: int, scratch: bool = False):
        self.dtype, self.address, self.nbytes, self.scratch = dtype, address, nbytes, scratch

    def data_ptr(self) -> int:  # what Triton's specialisation reads of a tensor
        return self.address

    def __repr__(self) -> str:
        return f"TensorArg({self.dtype}, address={self.address:#x}, nbytes={self.nbytes})"


class Work(NamedTuple):
    """The arithmetic of one launch, for the kernels report (`python -m mvit3 kernels`): 2 x the
    multiply-adds of its matrix products on tl.dot (tensor cores for fp16/bf16, FMA units for
    IEEE fp32) and of its other products (depthwise taps, weighted sums: FMA units).
    Elementwise work (norms, softmax, activations) is not counted. serial_steps: the loop
    iterations one program walks in sequence (K chunks, key blocks x heads, ...): a long chain
    on a grid that leaves SMs idle is a batch-1 latency problem the FLOPs do not show."""
    dot_flops: int = 0
    simt_flops: int = 0
    serial_steps: int = 0


@dataclass(frozen=True)
class LaunchRecord:
    kernel: object  # the @triton.jit function
    grid: tuple
    args: tuple  # ((name, value), ...) of the runtime arguments; tensors as TensorArg
    constexprs: tuple  # ((name, value), ...) including num_warps / num_stages
    work: Work = Work()

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    @property
    def signature(self) -> tuple:
        """((arg name, triton type), ...) of the runtime arguments ("constexpr" for None)."""
        return tuple((name, _arg_type(value)) for name, value in self.args)

    @property
    def specialization(self) -> tuple:
        """((arg name, (triton type, attribute)), ...) in the kernel's parameter order: how
        Triton's JIT specialises this launch, by its own rule (`runtime_specialization`): an
        integer equal to 1 becomes the constant 1, integers divisible by 16 and 16-byte aligned
        pointers are marked so ("D"). (Launchers pass their arguments by name, in any order.)"""
        position = {name: index for index, name in enumerate(getattr(self.kernel, "arg_names", ()))}
        args = sorted(self.args, key=lambda item: position.get(item[0], len(position)))
        return tuple((name, runtime_specialization(value)) for name, value in args)

    @property
    def key(self):
        """What makes a compiled kernel distinct: two records with one key share a binary."""
        return (self.name, self.specialization, self.constexprs)

    @property
    def bytes(self) -> int:
        """Least traffic: each tensor given but scratch, read or written once (twice: once)."""
        seen = {(v.address, v.nbytes): v.nbytes for _, v in self.args
                if isinstance(v, TensorArg) and not v.scratch}
        return sum(seen.values())


def runtime_specialization(value) -> tuple:
    """(triton type, attribute) that Triton's JIT gives a runtime argument of this value:
    ("constexpr", 1) for the integer 1, ("i32", "D") for an integer divisible by 16, ("*fp16",
    "D") for a 16-byte aligned fp16 pointer, ("constexpr", None) for None, ...; a kernel is
    compiled, and cached, once per distinct tuple of these."""
    if _native_specialize is not None:
        backend, specialize = _native_specialize
        kind, attr = specialize(backend, value, False, True, True)[:2]
        return kind, attr or None
    # Triton versions without the native helper follow the same rule in Python
    if value is None:
        return "constexpr", None
    if isinstance(value, bool) or isinstance(value, float):
        return _arg_type(value), None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return _arg_type(value), "D" if value % 16 == 0 else None
    return _arg_type(value), "D" if value.data_ptr() % 16 == 0 else None


def _find_native_specialize():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        return None
    return CUDABackend, native_specialize_impl


_native_specialize = _find_native_specialize()


@dataclass
class LaunchLog:
    dry_run: bool
    records: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


_ACTIVE_LOG: LaunchLog | None = None


@contextlib.contextmanager
def launch_log(dry_run: bool = False):
    """Record every Triton launch made inside the block.

    With dry_run, nothing is launched and the Triton backend accepts CPU tensors: op outputs
    are uninitialised, but every launch (kernel, argument types, constexprs, grid) is recorded.
    That is how launches per forward are counted and every configuration is enumerated
    without a GPU.
    """
    global _ACTIVE_LOG
    previous, _ACTIVE_LOG = _ACTIVE_LOG, LaunchLog(dry_run)
    try:
        yield _ACTIVE_LOG
    finally:
        _ACTIVE_LOG = previous


def _dry_run() -> bool:
    return _ACTIVE_LOG is not None and _ACTIVE_LOG.dry_run


def cpu_allowed() -> bool:
    """Kernels may take CPU tensors: in the interpreter, or while only recording (dry run)."""
    return INTERPRET or _dry_run()


DEFAULT_TARGET_ARCH = 90  # H100/H200: the GPU the meta-parameters are tuned for first
_TARGET_ARCH = DEFAULT_TARGET_ARCH


@contextlib.contextmanager
def compile_target(arch: int):
    """Inside this block, launches of CPU (or meta) tensors, i.e. dry runs and the interpreter,
    pick the meta-parameters a GPU of compute capability sm_<arch> would get: how the kernels
    report and the AOT test see the configurations of sm_75, sm_80 and sm_90 without a GPU."""
    global _TARGET_ARCH
    previous, _TARGET_ARCH = _TARGET_ARCH, int(arch)
    try:
        yield
    finally:
        _TARGET_ARCH = previous


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def target_arch(t: torch.Tensor) -> int:
    """The compute capability (e.g. 90) the kernels for `t` are compiled for: its GPU's, or
    for CPU tensors the `compile_target` in effect (DEFAULT_TARGET_ARCH outside one).
    Meta-parameters depend on it: Hopper's warpgroup MMA wants 64-row tiles that mma.sync
    GPUs (sm_75/80/86/89) hold in fewer registers and less shared memory."""
    if t.is_cuda:
        return _cuda_arch(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return _TARGET_ARCH


_INTERPRETER_TILES = False


@contextlib.contextmanager
def interpreter_tiles():
    """For tests of whole models in the interpreter: inside this block, under
    TRITON_INTERPRET=1, kernels launch with the larger tiles they name in `interpreter_meta`.

    The interpreter's cost is per program and per tl operation, hardly per value, so large
    tiles run a whole forward several times faster. The math is the same on other tile sizes
    (masks cover the partial tiles either way). GPU launches, dry runs (the recorded and
    AOT-compiled configurations) and the kernel tests keep the GPU meta-parameters.
    """
    global _INTERPRETER_TILES
    previous, _INTERPRETER_TILES = _INTERPRETER_TILES, True
    try:
        yield
    finally:
        _INTERPRETER_TILES = previous


def interpreter_meta(meta: dict, **larger) -> dict:
    """`meta` with the `larger` tile sizes when `interpreter_tiles()` is active, else `meta`."""
    if _INTERPRETER_TILES and INTERPRET and not _dry_run():
        return {**meta, **larger}
    return meta


_POINTER_TYPES = {dtype: "*" + name for dtype, name in _TL_TYPES.items()}


def _arg_type(value) -> str:
    # Called for every argument of every recorded launch: the common cases come first.
    if value is None:
        return "constexpr"
    if isinstance(value, (torch.Tensor, TensorArg)):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument type {type(value).__name__}")


def launch(kernel, grid, args: dict, constexprs: dict, num_warps: int = 4,
           num_stages: int = 2, work: Work = Work(), scratch: tuple = ()) -> None:
    """Launch `kernel[grid](**args, **constexprs)`; args are the runtime arguments by name.

    A None argument (an absent optional tensor) is passed as a constexpr None, so the kernel
    specialises it away (`if ptr is not None` in Triton code). `work`: its arithmetic, for the
    kernels report; `scratch`: the names of its workspaces (`LaunchRecord.bytes` skips them).
    """
    if _ACTIVE_LOG is not None:
        recorded = tuple((k, _recorded_arg(v, k in scratch)) for k, v in args.items())
        meta = tuple(sorted(constexprs.items())) + (("num_stages", num_stages), ("num_warps", num_warps))
        _ACTIVE_LOG.records.append(LaunchRecord(kernel, tuple(grid), recorded, meta, work))
        if _ACTIVE_LOG.dry_run:
            return
    # Triton launches on the *current* device and its current stream: a model on cuda:1 while
    # cuda:0 is current must switch first, or the kernel runs on the wrong GPU.
    device = next((v.device for v in args.values() if isinstance(v, torch.Tensor)), None)
    switch = (device is not None and device.type == "cuda"
              and device.index != torch.cuda.current_device())
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        kernel[tuple(grid)](**args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def _recorded_arg(value, scratch: bool = False):
    if isinstance(value, torch.Tensor):
        return TensorArg(value.dtype, value.data_ptr(), value.numel() * value.element_size(), scratch)
    return value


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): tile sizes, tl.dot needs K and N >= 16."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grid sizes. Host code uses this rather than triton.cdiv, a
    constexpr_function whose host calls cost microseconds each: a batch-1 forward makes
    about two hundred of these calls."""
    return -(-a // b)


def tf32_allowed() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls in torch, by either API: the
    `fp32_precision` setting ("tf32" / "ieee"; "none" defers to the legacy flag) or the legacy
    `allow_tf32`, which raises when read after `fp32_precision` was set to "tf32"."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 products unless the user enabled TF32 in torch (fp16/bf16 ignore this)."""
    if dtype == torch.float32 and not INTERPRET and tf32_allowed():
        return "tf32"
    return "ieee"


def check_device(*tensors: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t is not None and not (t.is_cuda or cpu_allowed()):
            raise ValueError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def channels_last_empty(b: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """Output maps of every op are channels_last (NHWC storage)."""
    return torch.empty((b, c, h, w), dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def conv3x3_output_size(size: int, stride: int) -> int:
    """Output rows (or columns) of a 3x3 conv with padding 1 over `size` rows."""
    return (size - 1) // stride + 1


def conv3x3_output(x: torch.Tensor, cout: int, stride: int) -> tuple:
    """(out, geometry) of a 3x3 conv (padding 1) on x: the channels_last output
    [B, Cout, Hout, Wout], and the kernels' geometry arguments M (output pixels), H, W,
    HW_out, W_out and conv_stride."""
    b, _, h, w = x.shape
    h_out, w_out = conv3x3_output_size(h, stride), conv3x3_output_size(w, stride)
    out = channels_last_empty(b, cout, h_out, w_out, like=x)
    return out, dict(M=b * h_out * w_out, H=h, W=w, HW_out=h_out * w_out, W_out=w_out,
                     conv_stride=stride)


@triton.jit
def silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def patch_pixel_offset(token, position, patches_per_row, stride_h, stride_w):
    """Memory offset of token `token` of patch sequence `position` in a [.., H, W] map.

    The 2x2 patch layout of `mvit3.models.patches`: token n, position p is pixel
    y = (n // (W/2)) * 2 + p // 2, x = (n % (W/2)) * 2 + p % 2. Attention kernels read and
    write the map through this, so no unfold/fold copy ever exists.
    """
    y = (token // patches_per_row) * 2 + position // 2
    x = (token % patches_per_row) * 2 + position % 2
    return y * stride_h + x * stride_w


def dot_operand_type(dtype: torch.dtype):
    """The Triton type that GEMM tiles are cast to before tl.dot: the I/O dtype, so that
    fp16/bf16 run on tensor cores (fp32 accumulation either way).

    Exception: bf16 under TRITON_INTERPRET=1 gives fp32, because the interpreter's tl.dot
    multiplies bf16 tiles as their raw uint16 storage (Triton 3.x, `create_dot`). Every bf16
    value is exact in fp32, so loaded tiles give the same products; only tiles computed in
    the kernel (norm or depthwise prologues) skip their rounding to bf16 there. A dry run
    records what a GPU launches (bf16 tiles), since nothing runs in the interpreter then.
    """
    if dtype == torch.bfloat16 and INTERPRET and not _dry_run():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


INT32_MAX = 2 ** 31 - 1
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2


def _samples_within_int32(shape: tuple, strides: tuple) -> int:
    """The most leading-axis entries (samples) of a tensor whose elements an int32 offset from
    the first sample's base still reaches; 0 if not even one."""
    rest = sum((size - 1) * abs(stride) for size, stride in zip(shape[1:], strides[1:]))
    if rest + 1 > INT32_MAX:
        return 0
    return shape[0] if strides[0] == 0 else 1 + (INT32_MAX - 1 - rest) // abs(strides[0])


def _dense_strides(shape: tuple) -> tuple:
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def samples_per_launch(out_shape: tuple, maps: tuple) -> int:
    """How many samples one launch may cover so that int32 offsets reach every element of
    its dense output map (out_shape, [B, ...]) and of its input maps (`maps`, [B, ...] of any
    strides; None: absent). Kernels index with int32 arithmetic (Triton's type for i32 sizes
    and strides) from a base pointer per tensor, so a larger batch is launched in chunks of
    this many samples; 0 if not even one sample fits."""
    limits = [_samples_within_int32(out_shape, _dense_strides(out_shape))]
    limits += [_samples_within_int32(tuple(t.shape), t.stride()) for t in maps
               if t is not None and t.numel() > 0]
    return min(limits)


def int32_offset_limit(out_shape: tuple, maps: tuple, weights: dict | None = None) -> str | None:
    """Why int32 offsets cannot address these tensors even one sample per launch (see
    `samples_per_launch`), or a weight whole; None if they can."""
    if samples_per_launch(out_shape, maps) < 1:
        return (f"one sample of the output {list(out_shape)} or of an input map spans more than "
                f"2**31 - 1 elements (the kernels use int32 offsets)")
    for name, t in (weights or {}).items():
        if t is not None and t.numel() > 0 and _samples_within_int32((1,) + tuple(t.shape), (0,) + t.stride()) < 1:
            return f"{name} spans more than 2**31 - 1 elements (the kernels use int32 offsets)"
    return None


def _span_4d(t: torch.Tensor) -> int:
    """Elements from the first to the last of a 4-D tensor (written out: called per launch)."""
    (b, c, h, w), (sb, sc, sh, sw) = t.shape, t.stride()
    return 1 + (b - 1) * abs(sb) + (c - 1) * abs(sc) + (h - 1) * abs(sh) + (w - 1) * abs(sw)


def batch_chunks(batch: int, out_shape: tuple, maps: tuple, max_samples: int = INT32_MAX) -> list:
    """[(start, stop), ...]: the batch in launches of at most `samples_per_launch` samples (and
    max_samples, for a grid axis that grows with the batch). One chunk, (0, batch), unless
    the batch is huge: v3-XS at 256 px needs several from batch 1024 on. maps: the [B, ...]
    input maps (None: absent)."""
    if (batch <= max_samples and math.prod(out_shape) <= INT32_MAX
            and all(t is None or t.numel() == 0 or _span_4d(t) <= INT32_MAX for t in maps)):
        return [(0, batch)]
    per_launch = min(samples_per_launch(out_shape, maps), max_samples)
    return [(start, min(start + per_launch, batch)) for start in range(0, batch, per_launch)]


def batch_part(t: torch.Tensor | None, start: int, stop: int):
    """Samples start..stop-1 of a [B, ...] tensor (itself for the whole batch; None stays None)."""
    if t is None or (start == 0 and stop == t.shape[0]):
        return t
    return t[start:stop]


@triton.jit
def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M rows, BLOCK_N columns] tile of an [M, N] GEMM output:
    (offs_m, offs_n, row_mask, n_mask).

    1-D grid, N tiles fastest: the programs sharing a row block run together, so its A rows
    are re-read from L2, and no grid axis limit (65535) applies to M.
    """
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n_tiles
    pid_n = tl.program_id(0) % num_n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


def launch_gemm_tiles(kernel, m: int, n: int, args: dict, constexprs: dict, work: Work,
                      scratch: tuple = ()) -> None:
    """Launch a kernel that takes its output tile from `gemm_tile`: a program per [BLOCK_M,
    BLOCK_N] tile of the [m, n] output on grid axis 0, SPLIT_K (a constexpr) on axis 1
    (`merge_split_k`); constexprs: BLOCK_M, BLOCK_N, num_warps / num_stages and the rest."""
    meta = dict(constexprs)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])
    grid = (tiles, meta["SPLIT_K"]) if meta.get("SPLIT_K", 1) > 1 else (tiles,)
    launch(kernel, grid, args, meta, num_warps, num_stages, work, scratch)


# ---- split-K: several programs share one output tile's K loop ---------------------------------

# Programs that wait on a count of their peers (split reductions: `merge_split_k`,
# group_norm_stats) count on these. {(device, stream): int32 [n] counters, all 0 between
# launches}: each launch's last programs set theirs back to 0. Per stream, so that launches on
# concurrent streams never share one (launches on one stream run one after the other); a
# stream being captured into a CUDA graph gets its own, allocated (and zeroed) in the capture.
_split_counters: dict = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 counters, all 0, for launches on `device`'s current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _split_counters.get(key)
    if counters is None or counters.numel() < n:
        counters = _split_counters[key] = torch.zeros(max(n, TARGET_PROGRAMS), dtype=torch.int32,
                                                      device=device)
    return counters


LONG_LOOP = 8  # K steps past which a program on a small grid is worth splitting (the kernels
#                report's LONG_SERIAL_LOOP)
MAX_SPLIT_K = 16  # the merge's loads are unrolled: at most this many partial tiles
MERGE_LOADS_PER_STEP = 4  # the merge counts one serial step per this many partial tiles: their
#                           loads are independent and overlap (an estimate, not a measurement)


def k_splits(tiles: int, k_blocks: int, steps_per_block: int = 1) -> int:
    """SPLIT_K, the programs that share each output tile's K loop of k_blocks blocks (each
    `steps_per_block` serial steps): 1 unless the grid has at most TARGET_PROGRAMS / 2 tiles
    (batch 1's late stages: most SMs idle) and a program would loop more than LONG_LOOP steps.
    Then the count, at most MAX_SPLIT_K and TARGET_PROGRAMS / tiles, that gives the shortest
    chain (`split_k_steps`), the fewest programs for that length, none left without K blocks."""
    if 2 * tiles > TARGET_PROGRAMS or k_blocks * steps_per_block <= LONG_LOOP:
        return 1
    best = min(range(1, min(k_blocks, MAX_SPLIT_K, TARGET_PROGRAMS // tiles) + 1),
               key=lambda s: split_k_steps(k_blocks, steps_per_block, s))
    return cdiv(k_blocks, cdiv(k_blocks, best))


def split_k_steps(k_blocks: int, steps_per_block: int, splits: int) -> int:
    """The serial steps of one program of a split K loop: its share of the K blocks, then
    (split) the last program's merge of the partial tiles."""
    merge = cdiv(splits, MERGE_LOADS_PER_STEP) if splits > 1 else 0
    return cdiv(k_blocks, splits) * steps_per_block + merge


@triton.jit
def merge_split_k(acc, partials_ptr, counters_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    """Add up the SPLIT_K programs' fp32 [BLOCK_M, BLOCK_N] partial sums of one output tile
    (grid axis 0: the tile, axis 1: the program's share of K): (the sum, is_last).

    Each program writes its partial to partials [tiles, SPLIT_K, BLOCK_M, BLOCK_N] and counts
    itself done on the tile's counter (an acq_rel atomic after a barrier: the release publishes
    every thread's stores). The last to finish gets is_last True and the sum of all SPLIT_K
    partials in split order, whatever order the programs finished in (deterministic), and sets
    the counter back to 0; the others get is_last False (and zeros) and store nothing.
    """
    tile = tl.program_id(0)
    tile_values: tl.constexpr = BLOCK_M * BLOCK_N
    offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tile_partials = partials_ptr + tile * (SPLIT_K * tile_values)
    tl.store(tile_partials + tl.program_id(1) * tile_values + offsets, acc)
    tl.debug_barrier()
    finished_before = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
    is_last = finished_before == SPLIT_K - 1
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if is_last:
        # unrolled: the SPLIT_K loads are independent and go out together; .cg reads L2, where
        # the other SMs' stores are, never a stale L1 line
        for split in tl.static_range(SPLIT_K):
            total += tl.load(tile_partials + split * tile_values + offsets, cache_modifier=".cg")
        tl.atomic_xchg(counters_ptr + tile, 0)
    return total, is_last


@triton.jit
def row_layer_norm(rows, mask, C, eps):
    """LayerNorm statistics of each row of an fp32 [BLOCK_M, K] tile whose C valid channels
    are where mask is set (0 elsewhere): (mean, rstd) [BLOCK_M] and the centred tile, 0
    outside the mask. Two passes over registers (the mean, then the centred squares): no
    E[x^2] - E[x]^2 cancellation."""
    mean = tl.sum(rows, axis=1) / C
    centred = tl.where(mask, rows - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    return mean, rstd, centred


@triton.jit
def pixel_coords(offs_m, HW, W):
    """(b, y, x) of pixels m = (b * H + y) * W + x of a [B, *, H, W] map."""
    return offs_m // HW, (offs_m % HW) // W, offs_m % W


@triton.jit
def load_weight_tile(w_ptr, k_offsets, k_mask, offs_n, n_mask, stride_wn):
    """The [BLOCK_K, BLOCK_N] B tile of a pixel-row GEMM from its [N, K] weight, i.e. a tile
    of weight^T: row k at element offset k_offsets[k], column n at offs_n[n] * stride_wn.
    Masked entries load as 0, so padded K rows add nothing to the product."""
    return tl.load(w_ptr + k_offsets[:, None] + offs_n[None, :] * stride_wn,
                   mask=k_mask[:, None] & n_mask[None, :], other=0.0)


@triton.jit
def pixel_tile_epilogue(acc, offs_m, offs_n, row_mask, n_mask, N,
                        b, y, x, bias_ptr, res_ptr,
                        stride_rb, stride_rc, stride_rh, stride_rw,
                        out_ptr, ACT: tl.constexpr):
    """Finish an fp32 [BLOCK_M pixels, BLOCK_N channels] tile of a pixel-row GEMM and store it.

    out = act(acc + bias) + residual. (b, y, x) are the pixels' coordinates, for the residual
    map of any strides; the output is a dense channels_last map, so pixel m, channel n is
    element m * N + n. bias_ptr / res_ptr may be None (specialised away).
    """
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACT == "silu":
        acc = silu(acc)
    mask = row_mask[:, None] & n_mask[None, :]
    if res_ptr is not None:
        res_pixel = b * stride_rb + y * stride_rh + x * stride_rw
        res = tl.load(res_ptr + res_pixel[:, None] + offs_n[None, :] * stride_rc, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def vector_stride_error(**vectors) -> str | None:
    """Why one of these 1-D parameter vectors (biases, norm affine; None: absent) cannot be read
    as ptr + i, or None: the kernels index them without a stride."""
    for name, t in vectors.items():
        if t is not None and t.dim() == 1 and t.stride(0) != 1:
            return f"{name} must have unit stride, got stride {t.stride(0)} (pass {name}.contiguous())"
    return None


def cat_maps_error(x: torch.Tensor, x2: torch.Tensor | None) -> str | None:
    """Why x [B, C1, H, W] and x2 [B, C2, H, W] (None: absent) are not the two parts of a
    channel concatenation cat(x, x2), or None."""
    if x.dim() != 4:
        return f"x must be [B, C1, H, W], got shape {tuple(x.shape)}"
    b, _, h, w = x.shape
    if x2 is not None and (x2.dim() != 4 or x2.shape[0] != b or x2.shape[2:] != x.shape[2:]):
        return f"x2 must be [B, C2, H, W] = [{b}, C2, {h}, {w}], got shape {tuple(x2.shape)}"
    return None


def map_stride_args(name: str, t: torch.Tensor | None) -> dict:
    """{"stride_<name>b": .., "stride_<name>c": .., "stride_<name>h": .., "stride_<name>w": ..}
    of a [B, C, H, W] map, all 0 for an absent (None) map."""
    strides = t.stride() if t is not None else (0, 0, 0, 0)
    return {f"stride_{name}{axis}": s for axis, s in zip("bchw", strides)}


def channel_vector(element_size: int, *maps: torch.Tensor | None, values=()) -> int:
    """VEC: the elements of one aligned 16-byte vector (8 in fp16/bf16, 4 in fp32), or fewer,
    down to 1: the most that divides every batch and pixel stride of the maps (None: absent)
    and every one of `values` (channel counts, offsets). 1 where a map's channels are not
    contiguous (NCHW: no channel vectors). A kernel told VEC (`tl.multiple_of` on its pixel
    offsets, channel counts written as C // VEC * VEC) loads VEC-channel vectors where
    Triton's own specialisation cannot see them: channel counts that are multiples of 8 but
    not of 16 (v3-XS's d = 120: 240-byte pixels)."""
    present = [t for t in maps if t is not None]
    if any(t.stride(1) != 1 for t in present):
        return 1
    strides = [t.stride(axis) for t in present for axis in (0, 2, 3)]
    vec = 16 // element_size
    while any(v % vec for v in [*values, *strides]):
        vec //= 2
    return vec


def divisibility_hint(element_size: int, *maps: torch.Tensor | None, values=()) -> int:
    """`channel_vector` for kernels that use VEC only to rewrite their sizes and strides as
    multiples of it (`if VEC > 1:` ... `C // VEC * VEC`): 1 where Triton's own specialisation
    already marks every one of them divisible by 16, so that those launches compile exactly as
    without the hint (the rewrite would replace the known 16 by VEC)."""
    present = [t for t in maps if t is not None]
    strides = [t.stride(axis) for t in present for axis in (0, 2, 3)]
    if all(v % 16 == 0 for v in [*values, *strides]):
        return 1
    return channel_vector(element_size, *maps, values=values)


TARGET_PROGRAMS = 128  # about one wave on an H100 (132 SMs), two on an RTX 2080 Ti (68 SMs)


WGMMA_ROWS = 64  # the M of one Hopper warpgroup MMA: tl.dot tiles with fewer rows use mma.sync
WGMMA_ARCH = 90  # the first compute capability with warpgroup MMA


def rows_per_program(programs, row_values: int, dtype: torch.dtype, arch: int, max_rows: int = 64) -> int:
    """BLOCK_M of a kernel whose programs each own BLOCK_M rows of `row_values` values (the
    widest [BLOCK_M, row_values] tile it keeps in registers), at most max_rows, for sm_<arch>.

    fp16/bf16 on sm_90: WGMMA_ROWS whenever that still gives half of TARGET_PROGRAMS programs
    (`programs(block_m)` counts them; v3-XS's layer_5 at batch 100 has 100), so that the dots
    run on Hopper's warpgroup MMA and weight tiles are reused over 64 rows. Otherwise (fp32,
    mma.sync GPUs, where 64-row 16-bit tiles at d = 128 spill, and 16-bit launches too small
    for that: at batch 1 programs matter more than the tensor-core shape): the largest of 64
    and 32 whose tile stays within 4K values, for the FMA dots keep their operand fragments
    in registers, that still gives TARGET_PROGRAMS programs; else 16 (the smallest tl.dot tile).
    """
    if (dtype != torch.float32 and arch >= WGMMA_ARCH and max_rows >= WGMMA_ROWS
            and programs(WGMMA_ROWS) >= TARGET_PROGRAMS // 2):
        return WGMMA_ROWS
    for block_m in (64, 32):
        if block_m <= max_rows and block_m * row_values <= 4096 and programs(block_m) >= TARGET_PROGRAMS:
            return block_m
    return 16
