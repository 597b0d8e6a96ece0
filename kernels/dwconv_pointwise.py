"""Depthwise 3x3 + SiLU feeding a 1x1 conv, with the hidden map never leaving the chip;
optionally the MV2 expansion before it: a whole MV2 block in one launch.

Twin of `mvit3.ops.reference.dwconv_pointwise`:
    y = silu(depthwise3x3(h, stride, dilation, padding = dilation) + dw_bias) @ weight^T
        + bias + residual,
h = x, or with expand_weight h = silu(x @ expand_weight^T + expand_bias).

GEMM view: M = B*Hout*Wout output pixels, N = Cout, K = Ch hidden channels. The A tile
[BLOCK_M pixels, BLOCK_K hidden channels] is made in registers: nine shifted [BLOCK_M,
BLOCK_K] tiles of h (one per tap, masked at the borders = zero padding) times the tap
weights, + dw_bias, SiLU, fp32 throughout, then straight into tl.dot. Each N tile repeats
that work for its rows; at 9 FMAs per hidden value against BLOCK_N (up to 128) in the
GEMM, recomputing beats a tile wide enough to hold every Cout.

With the expansion, a tap's [BLOCK_M, BLOCK_K] tile of h is computed from x at that tap's
pixels: [BLOCK_M, Cin] (in BLOCK_C chunks) @ expand_weight[chunk]^T on tl.dot, + bias, SiLU,
then zeroed where the tap pixel is outside the map (the depthwise padding is on h). Every
hidden value is so computed 9 times per output pixel (9/4 per input pixel at stride 2)
instead of being written to memory and read back. Whether that pays is a cost question
decided per launch (`fuse_expand`, a roofline model of the recomputed FLOPs against the
hidden map's traffic and a launch); when it does not, the op runs the expansion as a
`pointwise_conv` launch and this kernel on its output, as before.

Small grids (batch 1's late stages: XS's layer_5.0 is 8 tiles) leave most SMs idle while one
program walks every hidden block (with the expansion, 9 taps x Cin chunks each: 360 steps
there). There SPLIT_K programs share a tile's hidden channels (`k_splits` in _common.py picks
the count that gives the shortest chain), and the tile's last program to finish adds up their
fp32 partial sums in split order and runs the epilogue (`merge_split_k`): layer_5.0 runs as 80
programs of 36 steps + the merge.

The dilation (the v2-style dense backbones' 2 and 4) is a runtime int: Triton specialises the
value 1 to a constant, so the classification models' launches compile as before, and the
dilated ones share one binary per tile shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mvit3.kernel_report.gpus import GPUS, floor_us

from ._common import (WGMMA_ARCH, WGMMA_ROWS, TARGET_PROGRAMS, Work, batch_chunks, batch_part,
                      cdiv, check_device, conv3x3_output, conv3x3_output_size, divisibility_hint,
                      dot_operand_type, dot_precision, gemm_tile, int32_offset_limit,
                      interpreter_meta, k_splits, launch_gemm_tiles, load_weight_tile,
                      map_stride_args, merge_split_k, next_pow2, pixel_coords,
                      pixel_tile_epilogue, silu, split_counters, split_k_steps, target_arch,
                      vector_stride_error)
from .pointwise_conv import pointwise_conv


@triton.jit
def _expanded_tap(pixel_ptrs, pixel_ok, k, k_mask, Cin, stride_xc, ew_ptr, eb_ptr, stride_en,
                  stride_ec, DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """One tap's [BLOCK_M, BLOCK_K] tile of the hidden map h = silu(x @ expand_weight^T +
    expand_bias) at the pixels `pixel_ptrs` ([BLOCK_M] pointers into x), hidden channels k;
    fp32, 0 where pixel_ok is False (outside the map: the depthwise conv pads h with zeros)."""
    offs_c = tl.arange(0, BLOCK_C)
    tap = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, Cin, BLOCK_C):
        c = c0 + offs_c
        c_mask = c < Cin
        a = tl.load(pixel_ptrs[:, None] + c[None, :] * stride_xc,
                    mask=pixel_ok[:, None] & c_mask[None, :], other=0.0)
        # [BLOCK_C, BLOCK_K] tile of expand_weight^T; padded rows load as 0
        ew_tile = load_weight_tile(ew_ptr, c * stride_ec, c_mask, k, k_mask, stride_en)
        tap = tl.dot(a.to(DOT_TYPE), ew_tile.to(DOT_TYPE), tap, input_precision=DOT_PRECISION)
    if eb_ptr is not None:
        tap += tl.load(eb_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(pixel_ok[:, None], silu(tap), 0.0)


@triton.jit
def _dwconv_pointwise_kernel(
    # pointers (dw_bias, bias, residual, expand weight and bias may be None; partials and
    # counters: split-K's workspace, None unless SPLIT_K > 1)
    x_ptr, dw_w_ptr, dw_b_ptr, w_ptr, bias_ptr, res_ptr, ew_ptr, eb_ptr, out_ptr,
    partials_ptr, counters_ptr,
    # sizes: input map H x W, output map Hout x Wout, Ch hidden channels, N = Cout, Cin = x's
    # channels when expanding (else x holds the Ch hidden channels); each of the SPLIT_K
    # programs of a tile takes k_per_split hidden channels (a multiple of BLOCK_K)
    M, H, W, HW_out, W_out, Ch, N, Cin, conv_stride, dilation, k_per_split,
    # strides: x [B, Cin or Ch, H, W]; dw_weight [Ch, 1, 3, 3]; weight [N, Ch];
    # residual [B, N, Hout, Wout]; expand_weight [Ch, Cin]
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_dwc, stride_dwy, stride_dwx,
    stride_wn, stride_wk,
    stride_rb, stride_rc, stride_rh, stride_rw,
    stride_en, stride_ec,
    # meta-parameters
    DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT_K: tl.constexpr, VEC: tl.constexpr,
):
    if VEC > 1:
        # x's channel count, N, x's batch and pixel strides and the weight's K stride are
        # multiples of VEC (`divisibility_hint`, the host checked): written so, the taps and
        # the weight's rows load as VEC-channel vectors (with the channel masks constant over
        # each) and the output is stored so, where Triton's own specialisation cannot tell (24
        # or 120 channels)
        if ew_ptr is None:  # x holds the Ch hidden channels
            Ch = Ch // VEC * VEC
        Cin = Cin // VEC * VEC
        N = N // VEC * VEC
        stride_wk = stride_wk // VEC * VEC
        stride_xb = stride_xb // VEC * VEC
        stride_xh = stride_xh // VEC * VEC
        stride_xw = stride_xw // VEC * VEC
    offs_m, offs_n, row_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # output pixel m = (b, y, x); its 3x3 window starts at input
    # (y*stride - dilation, x*stride - dilation) and its taps are `dilation` apart
    b, y, x = pixel_coords(offs_m, HW_out, W_out)
    y0 = y * conv_stride - dilation
    x0 = x * conv_stride - dilation
    window_origin = x_ptr + b * stride_xb + y0 * stride_xh + x0 * stride_xw  # [BLOCK_M] pointers
    # With padding = dilation only the window's outer rows / columns can leave the map: its
    # middle row y*stride and column x*stride are always inside.
    top_ok = row_mask & (y0 >= 0)
    bottom_ok = row_mask & (y0 + 2 * dilation < H)
    left_ok = x0 >= 0
    right_ok = x0 + 2 * dilation < W
    row_step = dilation * stride_xh
    column_step = dilation * stride_xw

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SPLIT_K > 1:  # this program's share of the hidden channels
        k_start = tl.program_id(1) * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, Ch)
    else:  # (a loop from 0 to Ch: with the runtime bounds above ptxas spills some 16-bit tiles)
        k_start = 0
        k_stop = Ch
    for k0 in range(k_start, k_stop, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < Ch
        channel_mask = k_mask[None, :]
        dw_w_ptrs = dw_w_ptr + k * stride_dwc
        hidden = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        if ew_ptr is not None:
            # a runtime loop over the taps: one tap's x tile and expansion in registers at a
            # time (unrolled, the nine taps' products spill on sm_90)
            for tap_index in range(9):
                dy = tap_index // 3
                dx = tap_index % 3
                tap_y = y0 + dy * dilation
                tap_x = x0 + dx * dilation
                pixel_ok = row_mask & (tap_y >= 0) & (tap_y < H) & (tap_x >= 0) & (tap_x < W)
                tap = _expanded_tap(window_origin + dy * row_step + dx * column_step, pixel_ok, k,
                                    k_mask, Cin, stride_xc, ew_ptr, eb_ptr, stride_en, stride_ec,
                                    DOT_TYPE, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_C)
                tap_w = tl.load(dw_w_ptrs + dy * stride_dwy + dx * stride_dwx, mask=k_mask, other=0.0)
                hidden += tap * tap_w.to(tl.float32)[None, :]
        else:
            window_ptrs = window_origin[:, None] + k[None, :] * stride_xc  # [BLOCK_M, BLOCK_K]
            for dy in tl.static_range(3):
                if dy == 0:
                    row_ok = top_ok
                elif dy == 1:
                    row_ok = row_mask
                else:
                    row_ok = bottom_ok
                for dx in tl.static_range(3):
                    if dx == 0:
                        pixel_ok = row_ok & left_ok
                    elif dx == 1:
                        pixel_ok = row_ok
                    else:
                        pixel_ok = row_ok & right_ok
                    tap = tl.load(window_ptrs + dy * row_step + dx * column_step,
                                  mask=pixel_ok[:, None] & channel_mask, other=0.0)
                    tap_w = tl.load(dw_w_ptrs + dy * stride_dwy + dx * stride_dwx, mask=k_mask,
                                    other=0.0)
                    hidden += tap.to(tl.float32) * tap_w.to(tl.float32)[None, :]
        if dw_b_ptr is not None:
            hidden += tl.load(dw_b_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        # padded K columns are silu(0) = 0, and their weight rows load as 0 anyway
        hidden = silu(hidden)
        w_tile = load_weight_tile(w_ptr, k * stride_wk, k_mask, offs_n, n_mask, stride_wn)
        acc = tl.dot(hidden.to(DOT_TYPE), w_tile.to(DOT_TYPE), acc, input_precision=DOT_PRECISION)

    if SPLIT_K > 1:  # only the tile's last program to finish has the sum, and stores it
        acc, is_last = merge_split_k(acc, partials_ptr, counters_ptr, BLOCK_M, BLOCK_N, SPLIT_K)
        row_mask = row_mask & is_last
    pixel_tile_epilogue(acc, offs_m, offs_n, row_mask, n_mask, N, b, y, x, bias_ptr, res_ptr,
                        stride_rb, stride_rc, stride_rh, stride_rw, out_ptr, "none")


# ---- whether to fuse the expansion: a roofline cost model ------------------------------------

# The datasheet record (mvit3/kernel_report/gpus.py) whose ceilings decide for a GPU of compute
# capability sm_<arch>: the GPU of the highest arch listed here that is <= it (the kernels
# report's default GPU for sm_90). A decision per arch, not per device name, so that a dry run
# for an arch (the AOT compile, the kernels report) records what that arch's GPUs launch.
_COST_GPU = {75: "rtx2080ti", 80: "a100", 89: "rtx4090", 90: "h200"}
# What a second launch costs beyond its own roofline: the GPU-side gap between two dependent
# kernels, "a few microseconds" (docs/kernels-report.md). An assumption, not a measurement here
# (no GPU); eager host launch costs are larger, CUDA-graph replay's smaller.
LAUNCH_OVERHEAD_US = 2.0


def cost_gpu(arch: int):
    """The gpus.GPUS record whose ceilings `fuse_expand` uses for sm_<arch>."""
    key = max((a for a in _COST_GPU if a <= arch), default=min(_COST_GPU))
    return GPUS[_COST_GPU[key]]


def fuse_expand(batch: int, size: tuple, out_size: tuple, cin: int, hidden: int, cout: int,
                residual: bool, dtype: torch.dtype, arch: int) -> bool:
    """Whether an MV2 block on a [batch, cin, *size] input (hidden channels, a [batch, cout,
    *out_size] output, + the input as residual or not: a residual is taken to be the block
    input, as in an MV2 block) runs as one launch that recomputes the
    expansion per depthwise tap, rather than as a pointwise_conv launch writing the [batch,
    hidden, *size] map and this kernel reading it.

    The kernels report's roofline (`floor_us`) at the ceilings of sm_<arch>'s GPU (`cost_gpu`):
    fuse when the fused launch's floor is below the two launches' floors plus one launch
    (`LAUNCH_OVERHEAD_US`). The fused launch saves the hidden map's write and read (and the
    residual's second read) but does 9 expansion products per output pixel instead of one per
    input pixel (9/4 at stride 2), at the dot rate of the dtype: tensor cores for fp16/bf16,
    FMA units (or TF32 where allowed) for fp32; the depthwise taps run on the FMA units either
    way. Maps only: the weights are read once by either plan. The peaks flatter the
    recomputation (small-K dots rarely reach them), so close calls lean to fusing.

    For v3-XS at 256 px on sm_90 (the H200's ceilings; tests/test_kernel_dwconv_pointwise.py):
    at batch 1, fp16/bf16 fuse all seven MV2 blocks; at batch 100 five (not the stride-1
    layer_2.1/2.2, 48 -> 192 -> 48 channels on 64 x 64 maps). fp32 never fuses (it spills; the
    model alone would fuse the four stride-2 blocks at batch 1 and none at batch 100).
    """
    if dtype == torch.float32:
        # fp32 keeps the hidden map: the fused FMA form would pay off only for small batch-1
        # grids, and of the configurations the model below would launch for the classifiers
        # 10 of 84 spill 4-20 bytes on sm_90 and 5 of 64 4-28 on sm_80 (IEEE and TF32; one
        # stage instead of two moves the spills to other shapes)
        return False
    gpu = cost_gpu(arch)
    item = torch.empty((), dtype=dtype).element_size()
    pixels_in, pixels_out = batch * size[0] * size[1], batch * out_size[0] * out_size[1]
    rate = ("tf32" if dot_precision(dtype) == "tf32" else "fp32") if dtype == torch.float32 else "tensor"
    x_bytes, hidden_bytes = pixels_in * cin * item, pixels_in * hidden * item
    out_bytes = pixels_out * cout * item
    residual_bytes = out_bytes if residual else 0
    depthwise_flops = 2 * 9 * pixels_out * hidden
    reduce_flops = 2 * pixels_out * hidden * cout
    expand_flops = 2 * pixels_in * cin * hidden
    two_launches = (floor_us(gpu, x_bytes + hidden_bytes, expand_flops, 0, rate)
                    + floor_us(gpu, hidden_bytes + out_bytes + residual_bytes, reduce_flops,
                               depthwise_flops, rate)
                    + LAUNCH_OVERHEAD_US)
    recomputed_expand_flops = 2 * 9 * pixels_out * cin * hidden
    fused = floor_us(gpu, x_bytes + out_bytes, reduce_flops + recomputed_expand_flops,
                     depthwise_flops, rate)
    return fused < two_launches


# ---- launcher -------------------------------------------------------------------------------

def _meta(m: int, n: int, cin: int, expand: bool, dtype: torch.dtype, arch: int, vec: int) -> dict:
    """Tile sizes from (M, N, dtype, arch, the launch's VEC): BLOCK_N 16 ... 128, BLOCK_M 64 ... 16.

    One N tile up to Cout = 128 (the depthwise work is done once per pixel). The nine tap
    loads in flight take many registers: in fp32 8 warps share a 64 x 16 hidden tile (with 4
    warps, or BLOCK_K = 32, ptxas spills). The plain kernel in fp16/bf16 uses 4 warps, one warpgroup for the
    64-row wgmma on sm_90 (168-215 registers, two blocks per SM): with 8 warps ptxas holds
    sm_80's mma.sync version to 128 registers and spills 16-40 bytes a thread. mma.sync GPUs
    gain nothing from 64 rows: there 16-bit tiles take 32 (4 warps at 64 rows spill 4-16
    bytes on sm_80; 32 rows need 128-145 registers). Two stages let sm_80/90 prefetch the
    next chunk's taps (cp.async: 42-54 KB shared in fp32); sm_75 has no cp.async and needs at
    most 16 KB.

    Small grids of the expanding kernel (batch 1's late stages: XS's layer_5.0 had 2
    programs x 40 K steps) halve BLOCK_M, down to 16, while the grid stays under
    TARGET_PROGRAMS, and widen BLOCK_K while its hidden tile stays within 512 values, so that
    more programs walk fewer K steps; in fp32 it starts at 32 x 16. Its BLOCK_C of x's
    channels per tl.dot step is Cin padded to a power of two (at least 64 above 16), at most
    512 values per x tile in fp32, 1024 on sm_75, 2048 in 16-bit. Measured (ptxas, sm_90;
    the 8-warp fp32 kernels get about 128 registers): fp32 16 x 64 hidden tiles with 64-channel
    x tiles spill 36-88 bytes, 32 x 32 ones 20-28; 16-bit 32 x 32 hidden with 32 x 64 x tiles
    8 bytes; sm_75 16-bit 16 x 128 x tiles 700. The plain kernel keeps its tiles: its nine
    unrolled tap loads spill on sm_90 when a small grid widens BLOCK_K (16-bit 16 x 64: 44-52
    bytes; 4 warps, and a 16- or 32-row tl.dot operand is held by every warp).
    """
    block_n = min(next_pow2(n), 128)
    block_m = 64 if dtype == torch.float32 or arch >= WGMMA_ARCH else 32
    if expand and dtype == torch.float32:
        block_m = 32
    block_k = 16

    def programs(rows: int) -> int:
        return cdiv(m, rows) * cdiv(n, block_n)

    # sm_90 16-bit keeps its 64-row warpgroup MMA tiles where they give more than half of
    # TARGET_PROGRAMS programs (XXS's layer_5.0 at batch 100: 100; at exactly half, batch 1's
    # 64 x 64 maps, 32-row tiles give 128 programs)
    keep_wgmma = (dtype != torch.float32 and arch >= WGMMA_ARCH
                  and programs(WGMMA_ROWS) > TARGET_PROGRAMS // 2)
    while expand and block_m > 16 and programs(block_m) < TARGET_PROGRAMS and not keep_wgmma:
        block_m //= 2
        if block_m * block_k * 2 <= 512:
            block_k *= 2
    max_x_tile = 512 if dtype == torch.float32 else 1024 if arch < 80 else 2048
    # 17 ... 63 input channels take a 64-channel x tile: 32-channel ones spill on sm_80 (16-bit
    # 32 x 32: 4 bytes at 96 registers, where 32 x 64 takes 128 without). On sm_90 16-bit x
    # tiles stop at 64 channels: 16 x 128 ones beside a 16 x 32 hidden tile spill 8-16 bytes
    # (16 x 64: 96-100 registers, none)
    max_channels = 64 if dtype != torch.float32 and arch >= WGMMA_ARCH else 512
    block_c = min(next_pow2(cin) if cin <= 16 else max(next_pow2(cin), 64), max_x_tile // block_m,
                  max_channels)
    # TF32 on sm_80 (mma.sync): the plain kernel's 64-row tiles on 8 warps spill 8-12 bytes
    # with two stages; on 4 warps they do not (96-232 registers)
    tf32_mma = dtype == torch.float32 and dot_precision(dtype) == "tf32" and 80 <= arch < WGMMA_ARCH
    return interpreter_meta(
        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_C=block_c if expand else 16,
             # The expanding 16-bit kernel on sm_90: 8 warps, as 4 spill 8-64 bytes at 16 x 64
             # and 32 x 64 x tiles; but 64 x 16 x tiles take 4 warps, whose threads hold 8 of
             # its values (128-bit loads; 8 warps: 4 values, 64-bit), 79-91 registers, no spill
             num_warps=(4 if tf32_mma and not expand else
                        8 if dtype == torch.float32 or (
                            expand and arch >= WGMMA_ARCH and (block_m, block_c) != (64, 16)) else 4),
             # The expanding 16-bit kernel: one stage, as two spill 8 bytes on sm_80 at 32 x 16
             # hidden tiles and 20-28 bytes on sm_90 (8 warps, 64- and 128-channel x tiles);
             # but on sm_80 with vectors only VEC tells (24 output channels) 32 x 16 hidden
             # tiles take two, as one spills 4 bytes there (at 16 x 32 two spill 8 bytes)
             num_stages=1 if expand and dtype != torch.float32 and (
                 arch >= WGMMA_ARCH or vec == 1 or block_m == 16) else 2,
             VEC=vec),
        BLOCK_M=256, BLOCK_K=64)


def _shape_error(x, dw_weight, dw_bias, weight, bias, stride, residual, dilation, expand_weight,
                 expand_bias) -> str | None:
    if x.dim() != 4:
        return f"x must be [B, C, H, W], got shape {tuple(x.shape)}"
    b, ch, h, w = x.shape
    if expand_weight is not None:
        if expand_weight.dim() != 2 or expand_weight.shape[1] != ch:
            return (f"expand_weight must be [Ch, Cin] = [Ch, {ch}] for x with Cin={ch} channels, "
                    f"got shape {tuple(expand_weight.shape)}")
        ch = expand_weight.shape[0]
        if expand_bias is not None and tuple(expand_bias.shape) != (ch,):
            return f"expand_bias must be [Ch] = [{ch}], got shape {tuple(expand_bias.shape)}"
    elif expand_bias is not None:
        return "expand_bias needs expand_weight (the expansion's [Ch, Cin] weight)"
    if tuple(dw_weight.shape) != (ch, 1, 3, 3):
        return f"dw_weight must be [Ch, 1, 3, 3] = [{ch}, 1, 3, 3], got shape {tuple(dw_weight.shape)}"
    if dw_bias is not None and tuple(dw_bias.shape) != (ch,):
        return f"dw_bias must be [Ch] = [{ch}], got shape {tuple(dw_bias.shape)}"
    if weight.dim() != 2 or weight.shape[1] != ch:
        return f"weight must be [Cout, Ch] = [Cout, {ch}], got shape {tuple(weight.shape)}"
    cout = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (cout,):
        return f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}"
    if not isinstance(stride, int) or stride < 1:
        return f"stride must be a positive int, got {stride!r}"
    if not isinstance(dilation, int) or dilation < 1:
        return f"dilation must be a positive int, got {dilation!r}"
    out_shape = (b, cout, conv3x3_output_size(h, stride), conv3x3_output_size(w, stride))
    if residual is not None and tuple(residual.shape) != out_shape:
        return f"residual must be [B, Cout, Hout, Wout] = {list(out_shape)}, got shape {tuple(residual.shape)}"
    return vector_stride_error(dw_bias=dw_bias, bias=bias, expand_bias=expand_bias)


def why_unsupported(x, dw_weight, dw_bias, weight, bias=None, stride=1, residual=None,
                    dilation=1, expand_weight=None, expand_bias=None) -> str | None:
    """None if the Triton kernel takes these arguments, else why not."""
    error = _shape_error(x, dw_weight, dw_bias, weight, bias, stride, residual, dilation,
                         expand_weight, expand_bias)
    if error is not None:
        return error
    b, _, h, w = x.shape
    out_shape = (b, weight.shape[0], conv3x3_output_size(h, stride), conv3x3_output_size(w, stride))
    error = int32_offset_limit(out_shape, (x, residual), dict(weight=weight, expand_weight=expand_weight))
    if error is None and expand_weight is not None:  # the unfused path's hidden map [B, Ch, H, W]
        error = int32_offset_limit((b, dw_weight.shape[0], h, w), ())
    return error


def dwconv_pointwise(x, dw_weight, dw_bias, weight, bias=None, stride=1, residual=None, dilation=1,
                     expand_weight=None, expand_bias=None):
    """silu(depthwise3x3(h, stride, dilation, padding = dilation) + dw_bias) @ weight^T + bias
    + residual -> channels_last [B, Cout, Hout, Wout]; h = x, or with expand_weight
    silu(x @ expand_weight^T + expand_bias) (one launch, or two where `fuse_expand` says so)."""
    error = why_unsupported(x, dw_weight, dw_bias, weight, bias, stride, residual, dilation,
                            expand_weight, expand_bias)
    if error is not None:
        raise ValueError(f"dwconv_pointwise: {error}")
    check_device(x, dw_weight, dw_bias, weight, bias, residual, expand_weight, expand_bias)
    cout = weight.shape[0]
    out, geometry = conv3x3_output(x, cout, stride)
    if geometry["M"] == 0 or cout == 0:
        return out
    b, _, h, w = x.shape
    ch = dw_weight.shape[0]
    arch = target_arch(x)
    if expand_weight is not None and not fuse_expand(b, (h, w), out.shape[2:], x.shape[1], ch, cout,
                                                     residual is not None, x.dtype, arch):
        x = pointwise_conv(x, expand_weight, expand_bias, act="silu")  # the hidden map [B, Ch, H, W]
        expand_weight = expand_bias = None
    expand = expand_weight is not None
    cin = x.shape[1]  # Ch unless expanding
    meta = _meta(geometry["M"], cout, cin, expand, x.dtype, arch,
                 divisibility_hint(x.element_size(), x, values=(cin, cout, weight.stride(1))))
    # serial steps of one hidden block: with the expansion it walks the nine taps, each Cin in
    # BLOCK_C steps
    block_steps = 9 * cdiv(cin, meta["BLOCK_C"]) if expand else 1
    k_blocks = cdiv(ch, meta["BLOCK_K"])
    for start, stop in batch_chunks(b, out.shape, (x, residual)):
        m = (stop - start) * geometry["HW_out"]
        tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(cout, meta["BLOCK_N"])
        splits = k_splits(tiles, k_blocks, block_steps)
        k_per_split = cdiv(k_blocks, splits) * meta["BLOCK_K"]
        partials = counters = None
        if splits > 1:  # [tiles, SPLIT_K, BLOCK_M, BLOCK_N] fp32 partial sums (merge_split_k)
            partials = torch.empty((tiles, splits, meta["BLOCK_M"], meta["BLOCK_N"]),
                                   dtype=torch.float32, device=x.device)
            counters = split_counters(x.device, tiles)
        launch_gemm_tiles(
            _dwconv_pointwise_kernel, m, cout,
            dict(x_ptr=batch_part(x, start, stop), dw_w_ptr=dw_weight, dw_b_ptr=dw_bias, w_ptr=weight,
                 bias_ptr=bias, res_ptr=batch_part(residual, start, stop), ew_ptr=expand_weight,
                 eb_ptr=expand_bias, out_ptr=batch_part(out, start, stop),
                 partials_ptr=partials, counters_ptr=counters,
                 **dict(geometry, M=m), Ch=ch, N=cout, Cin=cin, dilation=dilation,
                 k_per_split=k_per_split,
                 **map_stride_args("x", x),
                 stride_dwc=dw_weight.stride(0), stride_dwy=dw_weight.stride(2),
                 stride_dwx=dw_weight.stride(3),
                 stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                 **map_stride_args("r", residual),
                 stride_en=expand_weight.stride(0) if expand else 0,
                 stride_ec=expand_weight.stride(1) if expand else 0),
            dict(DOT_TYPE=dot_operand_type(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
                 SPLIT_K=splits, **meta),
            Work(dot_flops=2 * m * ch * cout + (2 * m * 9 * cin * ch if expand else 0),
                 simt_flops=2 * m * ch * 9,
                 serial_steps=split_k_steps(k_blocks, block_steps, splits)),
            # scratch, not the op's traffic: the partial tiles (<= ~1 MB a launch at batch 1)
            # are written and read back at once, from L2
            scratch=("partials_ptr", "counters_ptr"))
    return out
