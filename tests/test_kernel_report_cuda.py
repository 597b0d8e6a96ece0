"""`python -m mvit3 kernels --backend cuda`: the CUDA C++ library's launches of a forward, read
from the emulator's record mode, and what nvcc made of each kernel, read from the built library.

Needs the library built for sm_90 (`python -m mvit3 build --archs "75;90"`, as CI does) and a
host C++ compiler for the emulator; without the library these tests skip, or fail under
MVIT3_REQUIRE_CUDA_LIB=1 (CI).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess

import pytest
import torch

from mvit3.kernel_report import cuda_rows
from mvit3.kernel_report.gpus import GPUS

REQUIRE_LIB = os.environ.get("MVIT3_REQUIRE_CUDA_LIB") == "1"
ARCH = 90


@pytest.fixture(scope="module")
def library():
    try:
        return cuda_rows.built_library(ARCH)
    except cuda_rows.CudaReportError as err:
        if REQUIRE_LIB:
            pytest.fail(f"{err} (MVIT3_REQUIRE_CUDA_LIB=1)")
        pytest.skip(f"{err}; CI builds it first (python -m mvit3 build --archs \"75;90\")")


@pytest.fixture(scope="module")
def xs_rows(library):
    """The rows of mobilevitv3_xs, batch 1, fp16, for sm_90 on the H200."""
    rows = cuda_rows.collect_cuda("mobilevitv3_xs", 1, torch.float16)
    return cuda_rows.analyse_cuda(rows, GPUS["h200"], ARCH)


def _launches_of_a_plain_forward(monkeypatch, name, batch, dtype) -> list:
    """(kernel, grid, block) of every launch of one forward whose ops run on the emulated
    library in record mode, routed as tests/test_cuda_ops.py routes them (not through the
    report's own routing)."""
    import mvit3.fast as fast
    from mvit3.ops import library as op_library
    from mvit3.ops import reference

    handle, symbols = cuda_rows._emulator()
    for op in op_library.OPS:
        monkeypatch.setattr(reference, op, getattr(torch.ops.mvit3_emulated, op))
    model = fast.create_model(name, backend="torch").to(dtype).eval()
    x = torch.zeros(batch, 3, 256, 256, dtype=dtype)
    with torch.no_grad(), cuda_rows._recording(handle):
        model(x)  # the inference weights are derived on the first call
        first = handle.mvit3_emu_recorded_count()
        model(x)
        return [(launch.symbol, launch.grid, launch.block)
                for launch in cuda_rows._recorded(handle, symbols, first)]


def test_rows_are_the_launches_of_the_forward(xs_rows, monkeypatch):
    """One row per launch the launchers issue, in order, with the recorded grid and block."""
    recorded = _launches_of_a_plain_forward(monkeypatch, "mobilevitv3_xs", 1, torch.float16)
    launch_rows = [row for row in xs_rows if isinstance(row, cuda_rows.CudaRow)]
    assert [(row.launch.symbol, row.grid, row.launch.block) for row in launch_rows] == recorded
    assert [row.kernel for row in xs_rows if not isinstance(row, cuda_rows.CudaRow)] == [
        "aten::mean", "aten::addmm"]
    # the stem: a 3x3 conv, stride 2, to 16 channels: 128 x 128 pixels in tiles of 64, one
    # tile of 64 output channels, 256 threads
    stem = launch_rows[0]
    assert (stem.op, stem.stage, stem.kernel) == (
        "conv3x3", "stem", "tile_gemm_kernel<__half, Conv3x3Producer<__half> >")
    assert stem.grid == (128 * 128 // 64, 1, 1) and stem.launch.block == (256, 1, 1)
    # every patch_attention call with its projection (d <= 256) is one launch: the fused
    # kernel (template argument kDim > 0), whose blocks take every head and the out_proj
    attention = [row for row in launch_rows if row.op == "patch_attention"]
    assert len(attention) == 9
    for row in attention:
        assert re.fullmatch(r"patch_attention_kernel<__half, \d+, \d, (128|256)>", row.kernel)
        assert row.grid[1:] == (1, 1)
    # every FFN with the next LayerNorm + projection (d <= 256, F <= 512 in fp16) is one launch
    # of 16-pixel blocks (the projection the fused kernel's third GEMM)
    ffn = [row for row in launch_rows if row.op == "transformer_mlp_project"]
    assert [row.kernel for row in ffn] == ["fused_mlp_kernel<__half, true>"] * 9
    for row in ffn:
        assert row.launch.block == (128, 1, 1) and row.grid[1:] == (1, 1)


def test_separable_attention_is_two_launches(library):
    """v2-style: each separable_attention call is the context kernel (its sample's GroupNorm
    statistics taken by each program, the splits merged by the last) and the fused FFN kernel
    with relu(v) * context as its activation; no group_norm_stats launch of its own. At batch
    1 the context grid is the splits of the one sample (mvit3.h: separable_attention_splits,
    H / 2 at most 16 here: 16, 8, 4 for the 32, 16, 8 px maps of 256 px inputs)."""
    rows = cuda_rows.analyse_cuda(cuda_rows.collect_cuda("mobilevitv3_050", 1, torch.float16),
                                  GPUS["h200"], ARCH)
    separable = [row for row in rows if getattr(row, "op", None) == "separable_attention"]
    assert [row.kernel for row in separable] == [
        "context_kernel<__half>", "fused_mlp_kernel<__half, false>"] * 9
    assert [row.grid[0] for row in separable[::2]] == [16] * 2 + [8] * 4 + [4] * 3
    for row in separable:
        assert row.compiled is not None and row.compiled.spill_bytes == 0


def test_batch_100_takes_the_gpu_grid(library):
    """In record mode the launchers split nothing: the stem's 100 x 256 pixel tiles are one
    launch (the emulator's test limit of 8 blocks on grid axis x is lifted)."""
    rows = cuda_rows.collect_cuda("mobilevitv3_xs", 100, torch.float16)
    stem = rows[0]
    assert stem.grid == (100 * 256, 1, 1)
    assert len(rows) == len(cuda_rows.collect_cuda("mobilevitv3_xs", 1, torch.float16))


def test_known_kernels_get_their_class(xs_rows):
    """fp16 GEMM and attention kernels use WMMA and mma.sync: HMMA instructions, class "mma"
    (neither is wgmma, even on sm_90); every kernel is found in the library, compiled without
    spills."""
    classes = {row.kernel: row.compiled.mma for row in xs_rows if row.compiled is not None}
    assert classes["tile_gemm_kernel<__half, PointwiseProducer<__half> >"] == "mma"
    assert classes["tile_gemm_kernel<__half, DwconvProducer<__half> >"] == "mma"
    assert classes["patch_attention_kernel<__half, 32, 4, 128>"] == "mma"
    for row in xs_rows:
        if row.compiled is not None:
            assert not row.compiled.error, row.compiled.error
            assert row.compiled.spill_bytes == 0 and row.compiled.registers > 0
            assert row.blocks_per_sm >= 1 and row.waves > 0


def test_fp32_kernels_are_fma(library):
    rows = cuda_rows.analyse_cuda(cuda_rows.collect_cuda("mobilevitv3_xxs", 1, torch.float32),
                                  GPUS["h200"], ARCH)
    gemm = next(row for row in rows
                if row.kernel == "tile_gemm_kernel<float, PointwiseProducer<float> >")
    assert gemm.compiled.mma == "fma"


def test_registers_and_shared_memory_match_cuobjdump(library, xs_rows):
    """One kernel's registers and stack as cuobjdump prints them, its shared memory as ptxas
    reported it (cuobjdump's SHARED of sm_90 code adds the 1 KB reserved per block)."""
    row = next(r for r in xs_rows
               if r.kernel == "tile_gemm_kernel<__half, PointwiseProducer<__half> >")
    text = subprocess.run([cuda_rows._cuobjdump(), "--dump-resource-usage", str(library)],
                          capture_output=True, text=True, check=True).stdout
    # the sections of the sm_90 cubins (one per translation unit, between sm_75 ones)
    parts = re.split(r"arch = sm_(\d+)", text)
    section = "".join(body for arch, body in zip(parts[1::2], parts[2::2]) if arch == "90")
    mangled = next(m for m in re.findall(r"Function (\S+):", section)
                   if cuda_rows._demangle([m])[m] == row.launch.symbol)
    registers, stack, shared = map(int, re.search(
        re.escape(mangled) + r":\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", section).groups())
    assert (row.compiled.registers, row.compiled.stack_bytes) == (registers, stack)
    assert row.compiled.shared_bytes + 1024 == shared


def test_sass_classification():
    sass = """
        /*0010*/                   HGMMA.64x64x16.F32 gdesc[UR4], RZ, !UPT ;
        /*0020*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.U16 R5, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E.U16 R6, desc[UR4][R2.64+0x2] ;"""
    assert cuda_rows.classify_sass(sass) == dict(mma="wgmma", load_bits=128, load_kind="ld",
                                                 load_mix="128:1 16:2")
    assert cuda_rows.classify_sass("/*0010*/ HMMA.16816.F32 R4, R8, R12, R4 ;")["mma"] == "mma"
    copy = cuda_rows.classify_sass("/*0010*/ FFMA R1, R2, R3, R4 ;\n"
                                   "/*0020*/ LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;")
    assert (copy["mma"], copy["load_bits"], copy["load_kind"]) == ("fma", 128, "cp.async")
    assert cuda_rows.classify_sass("/*0010*/ LDG.E R1, desc[UR4][R2.64] ;")["mma"] == "none"


def test_an_arch_not_built_names_the_fix(library):
    with pytest.raises(cuda_rows.CudaReportError, match=r"python -m mvit3 build --archs"):
        cuda_rows.built_library(86)


def test_command_json(library, tmp_path, capsys):
    from mvit3.__main__ import main

    out = tmp_path / "report.json"
    assert main(["kernels", "--backend", "cuda", "--model", "mobilevitv3_xs", "--batch", "1",
                 "--dtype", "fp16", "--json", str(out)]) == 0
    assert "cuda kernels for sm_90" in capsys.readouterr().out
    (report,) = json.loads(out.read_text())
    assert report["backend"] == "cuda" and report["arch"] == ARCH
    rows = [row for row in report["rows"] if not row["kernel"].startswith("aten::")]
    assert len(rows) == report["totals"]["launches"] - 2
    for row in rows:
        assert row["mma"] in ("wgmma", "mma", "fma", "none") and row["compile_error"] is None
        assert row["num_warps"] * 32 == int(row["meta"]["threads"]) == math.prod(row["block"])
    assert report["totals"]["floor_us"] > 0


def test_ops_are_held_to_the_triton_rows_accounting(xs_rows):
    """Each op call carries the bytes and FLOPs of the Triton rows of the same call, on its
    first kernel: per op, and in total, the two backends' sums agree."""
    from mvit3.kernel_report.report import collect

    def by_op(rows):
        sums = {}
        for row in rows:
            bytes_, flops = sums.get(row.op, (0, 0))
            sums[row.op] = (bytes_ + row.bytes, flops + row.flops)
        return sums

    assert by_op(xs_rows) == by_op(collect("mobilevitv3_xs", 1, torch.float16))
    launch_rows = [row for row in xs_rows if isinstance(row, cuda_rows.CudaRow)]
    assert all(row.flops > 0 for row in launch_rows if row.bytes)
    # every op of v3-XS is one kernel, in fp32 too: its FFNs with their projection (d 96 / 120 /
    # 144, F = 2d) keep their fp32 tiles in dynamic shared memory sized from d and F
    assert all(row.bytes for row in launch_rows)
    fp32_rows = cuda_rows.analyse_cuda(cuda_rows.collect_cuda("mobilevitv3_xs", 1, torch.float32),
                                       GPUS["h200"], ARCH)
    assert by_op(fp32_rows) == by_op(collect("mobilevitv3_xs", 1, torch.float32))
    fp32_launches = [row for row in fp32_rows if isinstance(row, cuda_rows.CudaRow)]
    assert all(row.bytes for row in fp32_launches)
    ffn = [row for row in fp32_launches if row.op == "transformer_mlp_project"]
    assert [row.kernel for row in ffn] == ["fused_mlp_kernel<float, true>"] * 9
    assert sorted({row.launch.dynamic_shared_bytes for row in ffn}) == [42624, 46720, 49024]


def test_fp32_ffn_launches_follow_the_gpus_shared_memory():
    """fp32 FFN tiles take dynamic shared memory sized from d and F (csrc/transformer_mlp.cu):
    recorded for an H200 (the default) every v3-S FFN with its projection is one launch, d 240
    with 65.9 KB; for an RTX 2080 Ti (sm_75, 64 KB a block) its three d 240 ones keep the two
    FFN launches and the projection's. Record mode alone: no library needed."""
    float32 = torch.float32
    h200 = cuda_rows.collect_cuda("mobilevitv3_s", 1, float32)
    sm75 = cuda_rows.collect_cuda("mobilevitv3_s", 1, float32, 256,
                                  GPUS["rtx2080ti"].shared_per_block)
    assert len(h200) == len(cuda_rows.collect_cuda("mobilevitv3_s", 1, torch.float16)) == 39
    assert len(sm75) == 39 + 2 * 3
    ffn = [row for row in h200 if isinstance(row, cuda_rows.CudaRow)
           and row.op == "transformer_mlp_project"]
    assert {row.kernel for row in ffn} == {"fused_mlp_kernel<float, true>"}
    assert sorted({row.launch.dynamic_shared_bytes for row in ffn}) == [49024, 58240, 67456]


def test_bf16_below_sm_80_is_refused(capsys):
    from mvit3.__main__ import main

    assert main(["kernels", "--backend", "cuda", "--arch", "75", "--dtype", "fp16,bf16"]) == 2
    assert "bf16 needs sm_80" in capsys.readouterr().err
