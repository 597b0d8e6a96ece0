"""Depthwise 3x3 + SiLU feeding a 1x1 conv, with the hidden map never leaving the chip.

Twin of `mvit3.ops.reference.dwconv_pointwise`:
    y = silu(depthwise3x3(x, stride, dilation, padding = dilation) + dw_bias) @ weight^T
        + bias + residual.

GEMM view: M = B*Hout*Wout output pixels, N = Cout, K = Ch hidden channels. The A tile
[BLOCK_M pixels, BLOCK_K hidden channels] is made in registers: nine shifted [BLOCK_M,
BLOCK_K] loads of x (one per tap, masked at the borders = zero padding) times the tap
weights, + dw_bias, SiLU, fp32 throughout, then straight into tl.dot. Each N tile repeats
that work for its rows; at 9 FMAs per hidden value against BLOCK_N (up to 128) in the
GEMM, recomputing beats a tile wide enough to hold every Cout.

The dilation (the v2-style dense backbones' 2 and 4) is a runtime int: Triton specialises the
value 1 to a constant, so the classification models' launches compile as before, and the
dilated ones share one binary per tile shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (WGMMA_ARCH, Work, batch_chunks, batch_part, cdiv, check_device,
                      conv3x3_output, conv3x3_output_size, dot_operand_type, dot_precision,
                      gemm_tile, int32_offset_limit, interpreter_meta, launch_gemm_tiles,
                      load_weight_tile, map_stride_args, next_pow2, pixel_coords,
                      pixel_tile_epilogue, silu, target_arch, vector_stride_error)


@triton.jit
def _dwconv_pointwise_kernel(
    # pointers (dw_bias, bias and residual may be None)
    x_ptr, dw_w_ptr, dw_b_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    # sizes: input map H x W, output map Hout x Wout, Ch hidden channels, N = Cout
    M, H, W, HW_out, W_out, Ch, N, conv_stride, dilation,
    # strides: x [B, Ch, H, W]; dw_weight [Ch, 1, 3, 3]; weight [N, Ch]; residual [B, N, Hout, Wout]
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_dwc, stride_dwy, stride_dwx,
    stride_wn, stride_wk,
    stride_rb, stride_rc, stride_rh, stride_rw,
    # meta-parameters
    DOT_TYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
    for k0 in range(0, Ch, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < Ch
        channel_mask = k_mask[None, :]
        window_ptrs = window_origin[:, None] + k[None, :] * stride_xc  # [BLOCK_M, BLOCK_K]
        dw_w_ptrs = dw_w_ptr + k * stride_dwc
        hidden = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for dy in tl.static_range(3):
            if dy == 0:
                row_ok = top_ok
            elif dy == 1:
                row_ok = row_mask
            else:
                row_ok = bottom_ok
            tap_x_ptrs = window_ptrs + dy * row_step
            tap_w_ptrs = dw_w_ptrs + dy * stride_dwy
            for dx in tl.static_range(3):
                if dx == 0:
                    pixel_ok = row_ok & left_ok
                elif dx == 1:
                    pixel_ok = row_ok
                else:
                    pixel_ok = row_ok & right_ok
                tap_x = tl.load(tap_x_ptrs, mask=pixel_ok[:, None] & channel_mask, other=0.0)
                tap_w = tl.load(tap_w_ptrs, mask=k_mask, other=0.0)
                hidden += tap_x.to(tl.float32) * tap_w.to(tl.float32)[None, :]
                tap_x_ptrs += column_step
                tap_w_ptrs += stride_dwx
        if dw_b_ptr is not None:
            hidden += tl.load(dw_b_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        # padded K columns are silu(0) = 0, and their weight rows load as 0 anyway
        hidden = silu(hidden)
        w_tile = load_weight_tile(w_ptr, k * stride_wk, k_mask, offs_n, n_mask, stride_wn)
        acc = tl.dot(hidden.to(DOT_TYPE), w_tile.to(DOT_TYPE), acc, input_precision=DOT_PRECISION)

    pixel_tile_epilogue(acc, offs_m, offs_n, row_mask, n_mask, N, b, y, x, bias_ptr, res_ptr,
                        stride_rb, stride_rc, stride_rh, stride_rw, out_ptr, "none")


def _meta(n: int, dtype: torch.dtype, arch: int) -> dict:
    """Tile sizes from N: four tile shapes (BLOCK_N 16 ... 128).

    One N tile up to Cout = 128 (the depthwise work is done once per pixel). The nine tap
    loads in flight take many registers: in fp32 8 warps share a 64 x 16 hidden tile (with 4
    warps, or BLOCK_K = 32, ptxas spills). fp16/bf16 use 4 warps, one warpgroup for the
    64-row wgmma on sm_90 (168-215 registers, two blocks per SM): with 8 warps ptxas holds
    sm_80's mma.sync version to 128 registers and spills 16-40 bytes a thread. mma.sync GPUs
    gain nothing from 64 rows: there 16-bit tiles take 32 (4 warps at 64 rows spill 4-16
    bytes on sm_80; 32 rows need 128-145 registers). Two stages let sm_80/90 prefetch the
    next chunk's taps (cp.async: 42-54 KB shared in fp32); sm_75 has no cp.async and needs at
    most 16 KB.
    """
    return interpreter_meta(
        dict(BLOCK_M=64 if dtype == torch.float32 or arch >= WGMMA_ARCH else 32,
             BLOCK_N=min(next_pow2(n), 128), BLOCK_K=16,
             num_warps=8 if dtype == torch.float32 else 4, num_stages=2),
        BLOCK_M=256, BLOCK_K=64)


def _shape_error(x, dw_weight, dw_bias, weight, bias, stride, residual, dilation) -> str | None:
    if x.dim() != 4:
        return f"x must be [B, Ch, H, W], got shape {tuple(x.shape)}"
    b, ch, h, w = x.shape
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
    return vector_stride_error(dw_bias=dw_bias, bias=bias)


def why_unsupported(x, dw_weight, dw_bias, weight, bias=None, stride=1, residual=None,
                    dilation=1) -> str | None:
    """None if the Triton kernel takes these arguments, else why not."""
    error = _shape_error(x, dw_weight, dw_bias, weight, bias, stride, residual, dilation)
    if error is not None:
        return error
    b, _, h, w = x.shape
    out_shape = (b, weight.shape[0], conv3x3_output_size(h, stride), conv3x3_output_size(w, stride))
    return int32_offset_limit(out_shape, (x, residual), dict(weight=weight))


def dwconv_pointwise(x, dw_weight, dw_bias, weight, bias=None, stride=1, residual=None, dilation=1):
    """silu(depthwise3x3(x, stride, dilation, padding = dilation) + dw_bias) @ weight^T + bias
    + residual -> channels_last [B, Cout, Hout, Wout]."""
    error = why_unsupported(x, dw_weight, dw_bias, weight, bias, stride, residual, dilation)
    if error is not None:
        raise ValueError(f"dwconv_pointwise: {error}")
    check_device(x, dw_weight, dw_bias, weight, bias, residual)
    cout = weight.shape[0]
    out, geometry = conv3x3_output(x, cout, stride)
    if geometry["M"] == 0 or cout == 0:
        return out
    meta = _meta(cout, x.dtype, target_arch(x))
    b, ch = x.shape[:2]
    for start, stop in batch_chunks(b, out.shape, (x, residual)):
        m = (stop - start) * geometry["HW_out"]
        launch_gemm_tiles(
            _dwconv_pointwise_kernel, m, cout,
            dict(x_ptr=batch_part(x, start, stop), dw_w_ptr=dw_weight, dw_b_ptr=dw_bias, w_ptr=weight,
                 bias_ptr=bias, res_ptr=batch_part(residual, start, stop),
                 out_ptr=batch_part(out, start, stop), **dict(geometry, M=m), Ch=ch, N=cout,
                 dilation=dilation,
                 **map_stride_args("x", x),
                 stride_dwc=dw_weight.stride(0), stride_dwy=dw_weight.stride(2),
                 stride_dwx=dw_weight.stride(3),
                 stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                 **map_stride_args("r", residual)),
            dict(DOT_TYPE=dot_operand_type(x.dtype), DOT_PRECISION=dot_precision(x.dtype), **meta),
            Work(dot_flops=2 * m * ch * cout, simt_flops=2 * m * ch * 9,
                 serial_steps=cdiv(ch, meta["BLOCK_K"])))
    return out
