"""Dense 3x3 conv (padding = dilation) over cat(x, x2) as an implicit GEMM, with a bias/act
epilogue.

Twin of `mvit3.ops.reference.conv3x3`:
    y = act(conv3x3(cat(x, x2), weight, stride, dilation, padding = dilation) + bias).

GEMM view: M = B*Hout*Wout output pixels, N = Cout, K = 9 * (C1 + C2). K is walked per
input map (x, then x2 through a second pointer: no concatenation in memory), each as one
flat index k = tap * C + channel, channel fastest. A K chunk therefore reads contiguous
channels of a channels_last map, and a small Cin is not padded per tap: the stem's
K = 9 * 3 = 27 takes two 16-wide chunks, not nine (one per tap).

The dilation is a runtime int: Triton specialises the value 1 to a constant (the stem's and
v1's convs compile as before) and every other dilation (ASPP's 6 ... 36) shares one binary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mvit3.ops.reference import ACTS

from ._common import (WGMMA_ARCH, Work, batch_chunks, batch_part, cat_maps_error, cdiv, check_device,
                      conv3x3_output, conv3x3_output_size, dot_operand_type, dot_precision,
                      gemm_tile, int32_offset_limit, interpreter_meta, launch_gemm_tiles,
                      load_weight_tile, map_stride_args, next_pow2, pixel_coords,
                      pixel_tile_epilogue, target_arch, vector_stride_error)


@triton.jit
def _accumulate_map(acc, src_ptr, C, channel_offset, b, y0, x0, dilation, row_mask, H, W,
                    stride_b, stride_c, stride_h, stride_w,
                    w_ptr, offs_n, n_mask, stride_wn, stride_wc, stride_wy, stride_wx,
                    DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += the implicit-GEMM product of one input map [B, C, H, W] with its weight
    channels channel_offset ... channel_offset + C - 1, over K = 9 * C (tap-major)."""
    offs_k = tl.arange(0, BLOCK_K)
    window_origin = b * stride_b + y0 * stride_h + x0 * stride_w  # [BLOCK_M] offsets
    for k0 in range(0, 9 * C, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < 9 * C
        tap = k // C
        channel = k % C
        dy = tap // 3
        dx = tap % 3
        # [BLOCK_M, BLOCK_K] input coordinates of the taps, `dilation` apart; outside the map =
        # zero padding
        y_in = y0[:, None] + (dy * dilation)[None, :]
        x_in = x0[:, None] + (dx * dilation)[None, :]
        in_map = (y_in >= 0) & (y_in < H) & (x_in >= 0) & (x_in < W)
        a = tl.load(src_ptr + window_origin[:, None]
                    + (channel * stride_c + (dy * stride_h + dx * stride_w) * dilation)[None, :],
                    mask=row_mask[:, None] & k_mask[None, :] & in_map, other=0.0)
        w_k = (channel_offset + channel) * stride_wc + dy * stride_wy + dx * stride_wx
        w_tile = load_weight_tile(w_ptr, w_k, k_mask, offs_n, n_mask, stride_wn)
        acc = tl.dot(a.to(DOT_TYPE), w_tile.to(DOT_TYPE), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _conv3x3_kernel(
    # pointers (x2 and bias may be None)
    x_ptr, x2_ptr, w_ptr, bias_ptr, out_ptr,
    # sizes: input map H x W, output map Hout x Wout, N = Cout
    M, H, W, HW_out, W_out, C1, C2, N, conv_stride, dilation,
    # strides: x, x2 [B, C, H, W]; weight [N, C1 + C2, 3, 3]
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_x2b, stride_x2c, stride_x2h, stride_x2w,
    stride_wn, stride_wc, stride_wy, stride_wx,
    # meta-parameters
    ACT: tl.constexpr, DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m, offs_n, row_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N)
    # output pixel m = (b, y, x); its 3x3 window starts at input
    # (y*stride - dilation, x*stride - dilation): padding = dilation
    b, y, x = pixel_coords(offs_m, HW_out, W_out)
    y0 = y * conv_stride - dilation
    x0 = x * conv_stride - dilation

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate_map(acc, x_ptr, C1, 0, b, y0, x0, dilation, row_mask, H, W,
                          stride_xb, stride_xc, stride_xh, stride_xw,
                          w_ptr, offs_n, n_mask, stride_wn, stride_wc, stride_wy, stride_wx,
                          DOT_TYPE, DOT_PRECISION, BLOCK_K)
    if x2_ptr is not None:
        acc = _accumulate_map(acc, x2_ptr, C2, C1, b, y0, x0, dilation, row_mask, H, W,
                              stride_x2b, stride_x2c, stride_x2h, stride_x2w,
                              w_ptr, offs_n, n_mask, stride_wn, stride_wc, stride_wy, stride_wx,
                              DOT_TYPE, DOT_PRECISION, BLOCK_K)

    pixel_tile_epilogue(acc, offs_m, offs_n, row_mask, n_mask, N, b, y, x, bias_ptr, None,
                        0, 0, 0, 0, out_ptr, ACT)


def _meta(n: int, dtype: torch.dtype, arch: int) -> dict:
    """Tile sizes from (N, dtype): three tile shapes (BLOCK_N 16, 32, 64).

    Cout is 16 ... 32 for the stem and up to 160 for v1's local and fusion convs; 64-wide
    tiles split 160 into 3 tiles (192 computed) where 128 would compute 256. Narrow tiles
    get taller (the stem: 128 pixels x 16 or 32 channels). BLOCK_K = 16: fp32 runs on FMA
    units whose K-chunk operand fragments sit in registers (32 spills at 64 x 64), and so
    do sm_75's fp16 mma fragments. Shared memory <= 16 KB (20 KB for TF32 on sm_90).
    16-bit on mma.sync GPUs: 8 warps (with 4, ptxas holds sm_80's two-input 64 x 64 tile to
    80 registers and spills); sm_90 keeps one warpgroup per 64-row wgmma. fp32 64-wide tiles
    take 32 rows (64 x 64 spills on sm_90 in the SSD heads' convs without activation).
    """
    block_n = min(next_pow2(n), 64)
    sixteen_bit_mma_sync = dtype != torch.float32 and arch < WGMMA_ARCH
    block_m = 128 if block_n <= 32 else 32 if dtype == torch.float32 else 64
    return interpreter_meta(
        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16,
             num_warps=8 if sixteen_bit_mma_sync else 4, num_stages=2 if dtype == torch.float32 else 3),
        BLOCK_M=256, BLOCK_K=64)


def _shape_error(x, weight, bias, x2, stride, act, dilation) -> str | None:
    error = cat_maps_error(x, x2)
    if error is not None:
        return error
    c1 = x.shape[1]
    c2 = x2.shape[1] if x2 is not None else 0
    if weight.dim() != 4 or weight.shape[1] != c1 + c2 or weight.shape[2:] != (3, 3):
        return (f"weight must be [Cout, C1 + C2, 3, 3] = [Cout, {c1 + c2}, 3, 3] for x with "
                f"C1={c1} and x2 with C2={c2} channels, got shape {tuple(weight.shape)}")
    cout = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (cout,):
        return f"bias must be [Cout] = [{cout}], got shape {tuple(bias.shape)}"
    if not isinstance(stride, int) or stride < 1:
        return f"stride must be a positive int, got {stride!r}"
    if not isinstance(dilation, int) or dilation < 1:
        return f"dilation must be a positive int, got {dilation!r}"
    if act not in ACTS:
        return f"act must be one of {ACTS}, got {act!r}"
    return vector_stride_error(bias=bias)


def why_unsupported(x, weight, bias=None, x2=None, stride=1, act="none", dilation=1) -> str | None:
    """None if the Triton kernel takes these arguments, else why not."""
    error = _shape_error(x, weight, bias, x2, stride, act, dilation)
    if error is not None:
        return error
    b, _, h, w = x.shape
    out_shape = (b, weight.shape[0], conv3x3_output_size(h, stride), conv3x3_output_size(w, stride))
    return int32_offset_limit(out_shape, (x, x2), dict(weight=weight))


def conv3x3(x, weight, bias=None, x2=None, stride=1, act="none", dilation=1):
    """act(conv3x3(cat(x, x2), weight, stride, dilation, padding = dilation) + bias)
    -> channels_last [B, Cout, Hout, Wout]."""
    error = why_unsupported(x, weight, bias, x2, stride, act, dilation)
    if error is not None:
        raise ValueError(f"conv3x3: {error}")
    check_device(x, weight, bias, x2)
    c1, c2 = x.shape[1], x2.shape[1] if x2 is not None else 0
    cout = weight.shape[0]
    out, geometry = conv3x3_output(x, cout, stride)
    if geometry["M"] == 0 or cout == 0:
        return out
    meta = _meta(cout, x.dtype, target_arch(x))
    b = x.shape[0]
    for start, stop in batch_chunks(b, out.shape, (x, x2)):
        m = (stop - start) * geometry["HW_out"]
        launch_gemm_tiles(
            _conv3x3_kernel, m, cout,
            dict(x_ptr=batch_part(x, start, stop), x2_ptr=batch_part(x2, start, stop), w_ptr=weight,
                 bias_ptr=bias, out_ptr=batch_part(out, start, stop),
                 **dict(geometry, M=m), C1=c1, C2=c2, N=cout, dilation=dilation,
                 **map_stride_args("x", x), **map_stride_args("x2", x2),
                 **dict(zip(("stride_wn", "stride_wc", "stride_wy", "stride_wx"), weight.stride()))),
            dict(ACT=act, DOT_TYPE=dot_operand_type(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
                 **meta),
            Work(dot_flops=2 * m * cout * 9 * (c1 + c2),
                 serial_steps=cdiv(9 * c1, meta["BLOCK_K"]) + cdiv(9 * c2, meta["BLOCK_K"])))
    return out
