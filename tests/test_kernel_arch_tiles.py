"""The meta-parameters a kernel picks for another GPU generation than sm_90 (or, on sm_90, tiles
the other kernel tests' shapes never reach) compute the same op: each case runs in the
interpreter under `compile_target(arch)`, checks the launch took the tiles that arch gets
(the configurations tests/aot_compile.py compiles for it), and compares with float64 at the
tolerance of the op's own kernel tests.
"""

from __future__ import annotations

import pytest
import torch

import test_kernel_conv3x3 as conv3x3_tests
import test_kernel_dwconv_pointwise as dwconv_tests
import test_kernel_patch_attention as attention_tests
import test_kernel_pointwise_conv as pointwise_tests
import test_kernel_separable_attention as separable_tests
import test_kernel_transformer_mlp as mlp_tests
from conftest import INTERPRET
from kernel_utils import check_output, variant
from mvit3.kernels._common import compile_target, launch_log, target_arch
from mvit3.kernels.conv3x3 import conv3x3
from mvit3.kernels.dwconv_pointwise import dwconv_pointwise
from mvit3.kernels.patch_attention import patch_attention
from mvit3.kernels.pointwise_conv import pointwise_conv
from mvit3.kernels.separable_attention import separable_attention
from mvit3.kernels.transformer_mlp import transformer_mlp
from mvit3.kernels.transformer_mlp_project import transformer_mlp_project
from mvit3.ops import reference

pytestmark = pytest.mark.skipif(not INTERPRET, reason="compile_target sets the tiles of CPU tensors "
                                                      "(the interpreter); a GPU uses its own arch")
FP16 = torch.float16


def _dwconv():
    # an MV2 reduce with its residual: mma.sync GPUs take 32-row 16-bit tiles (64 spill on sm_80)
    args = dwconv_tests.make_args("cpu", FP16, hidden=128, cout=64, residual=True, **variant(1))
    return dwconv_pointwise, reference.dwconv_pointwise, args, dwconv_tests.TOLERANCE


def _dwconv_expand():
    # a whole MV2 block with 128 input channels on a small grid (15x15): 16-row tiles, whose
    # 16-bit x tiles take 64 channels on sm_90 (128 spill there)
    args = dwconv_tests.make_args("cpu", FP16, 1, (15, 15), "nhwc", "kmajor", hidden=256,
                                  cout=128, cin=128)
    return dwconv_pointwise, reference.dwconv_pointwise, args, dwconv_tests.TOLERANCE


def _layer_norm_qkv():
    # LayerNorm + qkv at d = 144 (v3-XS layer_5): sm_80+ feed whole 16-bit rows to one dot
    # (BLOCK_K = ROW_K); sm_75 (64 KB of shared memory) takes the statistics from whole rows,
    # then 16-channel K steps
    args = pointwise_tests.make_args("cpu", FP16, c1=144, cout=432, norm="layer", **variant(3))
    return pointwise_conv, reference.pointwise_conv, args, pointwise_tests.TOLERANCE


def _conv3x3():
    # v1's fusion conv over cat(local, global): 16-bit on mma.sync GPUs runs 8 warps
    args = conv3x3_tests.make_args("cpu", FP16, c1=48, c2=48, cout=64, **variant(2))
    return conv3x3, reference.conv3x3, args, conv3x3_tests.TOLERANCE


def _separable():
    # d = 128 at N = 1024 (v2-style 1.0 layer_3 at 512 px): 32-row tiles on sm_80
    args = separable_tests.make_args(1, 128, 64, 64, dtype=FP16, channels_last=True)
    return separable_attention, reference.separable_attention, args, separable_tests.TOLERANCE


def _mlp():
    # d = 256 (F = 512) over 4096 pixels: sm_90 takes 64-row wgmma tiles (80 KB shared memory)
    args = mlp_tests.make_args(1, 256, 512, 64, 64, "group", dtype=FP16, channels_last=True)
    return transformer_mlp, reference.transformer_mlp, args, mlp_tests.TOLERANCE


def _mlp_small_grid():
    # v2-style FFN at d = 256 (F = 512) on an 8x8 map, batch 1: 4 programs, sm_80 takes 64
    # hidden units a chunk on 8 warps (`small_grid_tiles`)
    args = mlp_tests.make_args(1, 256, 512, 8, 8, "group", dtype=FP16, channels_last=True)
    return transformer_mlp, reference.transformer_mlp, args, mlp_tests.TOLERANCE


def _attention(dtype):
    # v3-XS layer_3.1 at batch 1 (d = 96, 4 heads of 24, N = 256, out_proj fused): 64 programs,
    # a small grid that takes one block of 256 keys in 16-bit, 128 in fp32
    def make():
        args = attention_tests.make_args(1, 96, 4, 32, 32, dtype=dtype, channels_last=True,
                                         packed_weight=True)
        return patch_attention, reference.patch_attention, args, attention_tests.TOLERANCE
    return make


# (case, arch, kernel name, constexprs its launch must have)
CASES = {
    "dwconv_pointwise-sm80": (_dwconv, 80, "_dwconv_pointwise_kernel", dict(BLOCK_M=32, num_warps=4)),
    "dwconv_pointwise-sm90": (_dwconv, 90, "_dwconv_pointwise_kernel", dict(BLOCK_M=64, num_warps=4)),
    "dwconv_pointwise-expand-sm90": (_dwconv_expand, 90, "_dwconv_pointwise_kernel",
                                     dict(BLOCK_M=16, BLOCK_C=64, num_warps=8, num_stages=1)),
    "pointwise_conv-sm75": (_layer_norm_qkv, 75, "_pointwise_conv_kernel", dict(ROW_K=256, BLOCK_K=16)),
    "pointwise_conv-sm80": (_layer_norm_qkv, 80, "_pointwise_conv_kernel", dict(ROW_K=256, BLOCK_K=256)),
    "conv3x3-sm80": (_conv3x3, 80, "_conv3x3_kernel", dict(num_warps=8)),
    "separable_attention-sm80": (_separable, 80, "_separable_attention_kernel", dict(BLOCK_M=32)),
    "transformer_mlp-sm90": (_mlp, 90, "_transformer_mlp_kernel", dict(BLOCK_M=64, D_PAD=256)),
    "transformer_mlp-small-grid-sm80": (_mlp_small_grid, 80, "_transformer_mlp_kernel",
                                        dict(BLOCK_M=16, BLOCK_F=64, num_warps=8, num_stages=2)),
    "patch_attention-fp16-sm80": (_attention(FP16), 80, "_patch_attention_kernel",
                                  dict(BLOCK_M=16, BLOCK_N=256, HEAD_PAD=32, num_stages=1)),
    "patch_attention-fp32-sm90": (_attention(torch.float32), 90, "_patch_attention_kernel",
                                  dict(BLOCK_M=16, BLOCK_N=128, HEAD_PAD=32, num_stages=1)),
}


@pytest.mark.parametrize("case", CASES)
def test_tiles_of_the_target_arch(case):
    make, arch, kernel, expected = CASES[case]
    op, reference_op, args, tolerances = make()
    with compile_target(arch), launch_log() as log:
        assert target_arch(args[0]) == arch
        out = op(*args)
    launches = [dict(r.constexprs) for r in log.records if r.name == kernel]
    assert launches, f"{kernel} was not launched"
    for meta in launches:
        assert {k: meta[k] for k in expected} == expected
    check_output(out, args, out.shape, reference_op, tolerances)


# transformer_mlp_project at v3-XS's batch-1 shapes (d, F, Cout = qkv 3d, map): small grids take
# wide hidden and projection chunks on 8 warps (`small_grid_tiles`), by arch and dtype; fp32's
# chains stay long enough to split (SPLIT_F: the hidden units, `_splits`). At d = 64 (v3-XXS's
# layer_3 at 384 px: over 132 64-row tiles), tiles that spill on one arch (`_FP32_TILES`, `_projection_block_n`)
PROJECT_CASES = {
    "d64-fp16-sm80": (80, FP16, (64, 128, 192, 96, 90), dict(BLOCK_M=64, BLOCK_N=32, num_warps=8)),
    "d64-fp32-sm90": (90, torch.float32, (64, 128, 192, 96, 90), dict(BLOCK_M=32, num_stages=2)),
    "layer_4-fp16-sm80": (80, FP16, (120, 240, 360, 16, 16), dict(BLOCK_F=128, BLOCK_N=128, num_warps=8)),
    "layer_5-fp16-sm80": (80, FP16, (144, 288, 432, 8, 8), dict(BLOCK_F=64, BLOCK_N=64, num_warps=8)),
    "layer_5-fp16-sm90": (90, FP16, (144, 288, 432, 8, 8),
                          dict(BLOCK_F=128, BLOCK_N=128, num_warps=8, SPLIT_F=1)),
    "layer_4-fp32-sm80": (80, torch.float32, (120, 240, 360, 16, 16),
                          dict(BLOCK_F=32, BLOCK_N=64, num_warps=8, num_stages=2, SPLIT_F=4, VEC=4)),
    "layer_5-fp32-sm90": (90, torch.float32, (144, 288, 432, 8, 8),
                          dict(BLOCK_F=32, BLOCK_N=32, num_warps=8, num_stages=2, SPLIT_F=3)),
    "layer_5-fp32-sm80": (80, torch.float32, (144, 288, 432, 8, 8),
                          dict(BLOCK_F=32, BLOCK_N=16, num_warps=8, num_stages=2, SPLIT_F=3)),
    # sm_75 keeps the general tiles (64 KB of shared memory)
    "layer_4-fp16-sm75": (75, FP16, (120, 240, 360, 16, 16), dict(BLOCK_F=16, BLOCK_N=16, num_warps=4)),
}


@pytest.mark.parametrize("case", PROJECT_CASES)
def test_project_tiles_of_the_target_arch(case):
    arch, dtype, (d, f, cout, h, w), expected = PROJECT_CASES[case]
    args = mlp_tests.make_project_args(1, d, f, cout, h, w, "none", dtype=dtype, channels_last=True,
                                       packed_weights=True)
    with compile_target(arch), launch_log() as log:
        outputs = transformer_mlp_project(*args)
    (launch,) = [dict(r.constexprs) for r in log.records]
    assert {k: launch[k] for k in expected} == expected
    mlp_tests.check_project(outputs, args)


def test_compile_target_is_scoped():
    x = torch.zeros(1)
    before = target_arch(x)
    with compile_target(75):
        assert target_arch(x) == 75
        with compile_target(80):
            assert target_arch(x) == 80
        assert target_arch(x) == 75
    assert target_arch(x) == before == 90
