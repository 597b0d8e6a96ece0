"""The kernels report (`python -m mvit3 kernels`): its instruction classes on kernels whose
compiled form is known, its FLOP and byte totals against independent counts from the models'
shapes, its GPU arithmetic, and the command itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mvit3
from mvit3.kernel_report.gpus import GPUS, blocks_per_sm, floor_us
from mvit3.kernel_report.report import collect
from mvit3.kernels.dwconv_pointwise import fuse_expand

HERE = Path(__file__).resolve().parent


def _uninterpreted(args: list, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a Python command line without TRITON_INTERPRET (which the suite sets on CPU
    machines and under which kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                            timeout=timeout, cwd=HERE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def probes():
    return json.loads(_uninterpreted([str(HERE / "report_probes.py")]).stdout.strip().splitlines()[-1])


def test_instruction_classes_of_known_kernels(probes):
    assert probes["dot_fp16_sm90"]["mma"] == "wgmma"  # an fp16 64x64x64 tl.dot on Hopper
    assert probes["dot_fp16_sm80"]["mma"] == "mma"  # the same on Ampere: mma.sync
    assert probes["dot_fp32_ieee_sm90"]["mma"] == "fma"  # IEEE fp32: no tensor cores
    assert probes["copy_fp16_aligned"]["mma"] == "none"


def test_load_widths_of_known_kernels(probes):
    # contiguous fp16 with 16-byte aligned pointers and n divisible by 16: 128-bit loads;
    # the same copy one element off alignment falls back to 16-bit loads
    assert probes["copy_fp16_aligned"]["load_bits"] == 128
    assert probes["copy_fp16_misaligned"]["load_bits"] == 16


def test_ptxas_report_is_read(probes):
    # a [64, 64] fp32 FMA dot in 4 warps needs more than 255 registers a thread: it spills
    assert probes["dot_fp32_ieee_sm90"]["registers"] == 255
    assert probes["dot_fp32_ieee_sm90"]["spill_bytes"] > 0
    assert probes["dot_fp16_sm90"]["spill_bytes"] == 0
    assert 0 < probes["dot_fp16_sm90"]["registers"] < 255
    assert probes["dot_fp16_sm90"]["shared_bytes"] > 0


@pytest.mark.parametrize("name", ["mobilevitv3_xs", "mobilevit_xs", "mobilevitv3_s_l2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_flops_of_v1_style_models_equal_twice_their_macs(name, batch):
    """The fused ops of v1-style models do exactly the matrix products of the reference
    (model_stats counts them from the reference model, independently of the kernels)."""
    rows = collect(name, batch, torch.float32)
    expected = (2 * batch * mvit3.model_stats(name)["macs"] + _recomputed_expansion_flops(rows)
                + _recomputed_ffn_flops(rows))
    assert sum(row.flops for row in rows) == expected


def _recomputed_expansion_flops(rows) -> int:
    """What the MV2 launches that fuse the expansion add: they compute it at the 9 taps of each
    output pixel rather than once per input pixel (kernels/dwconv_pointwise.py)."""
    extra = 0
    for row in rows:
        if row.kernel == "_dwconv_pointwise_kernel" and dict(row.record.signature)["ew_ptr"] != "constexpr":
            a = dict(row.record.args)
            pixels_in = a["M"] // a["HW_out"] * a["H"] * a["W"]
            extra += 2 * a["Cin"] * a["Ch"] * (9 * a["M"] - pixels_in)
    return extra


def _recomputed_ffn_flops(rows) -> int:
    """What the split transformer_mlp_project launches of small grids add: each of their
    proj_groups groups of programs computes the FFN's hidden sum (kernels/transformer_mlp_project.py)."""
    extra = 0
    for row in rows:
        if row.kernel == "_transformer_mlp_project_kernel":
            a = dict(row.record.args)
            extra += (a["proj_groups"] - 1) * 4 * a["num_pixels"] * a["D"] * a["F"]
    return extra


@pytest.mark.parametrize("name", ["mobilevitv3_050", "mobilevitv2_075"])
def test_flops_of_v2_style_models(name):
    """Separable attention never forms the per-pixel k projection: context = Wk (sum_n
    score_n a_n) + bk. Per layer on M pixels of d channels, with S (sequence, split) partial
    states, the reference's 2 M d (1 + 2d) (qkv) becomes 2 M d (q) + 2 M d (the weighted
    sum) + 2 S d^2 (Wk per partial state) + 2 M d^2 (v); everything else is the same."""
    rows = collect(name, 1, torch.float32)
    expected = 2 * mvit3.model_stats(name)["macs"] + _recomputed_expansion_flops(rows)
    partial = [row for row in rows if row.kernel == "_context_partial_kernel"]
    assert partial
    for row in partial:
        args = dict(row.record.args)
        d, m = args["D"], args["N"] * row.grid[1]  # grid (splits, B * 4 sequences of N tokens)
        states = row.grid[0] * row.grid[1]
        expected += -2 * m * d * (1 + 2 * d) + 2 * m * d + 2 * m * d + 2 * states * d * d + 2 * m * d * d
    assert sum(row.flops for row in rows) == expected


def _v3_xs_least_bytes(batch: int, dtype: torch.dtype, size: int = 256) -> int:
    """The least traffic of a fused forward of mobilevitv3_xs, counted from the reference
    model's modules: every fused op reads its input maps, weights and biases (BatchNorm
    folded) and writes its output once (transformer_mlp_project both of its outputs); an MV2
    block is one op or, where the cost model of
    kernels/dwconv_pointwise.py keeps the hidden map (`fuse_expand`, sm_90), two. fp32 attention with d > 128
    passes its heads through its own output (kernels/patch_attention.py: `_heads_through_out`):
    that round trip stays within a program's pixels, in L2, and is not counted."""
    model = mvit3.create_model("mobilevitv3_xs")
    item = torch.empty((), dtype=dtype).element_size()
    total = 0

    def op(*sizes):  # numels of the tensors one launch reads or writes
        nonlocal total
        total += item * sum(sizes)

    def conv(layer):
        c = layer.conv
        return c.weight.numel(), c.out_channels

    hw = (size // 2) ** 2
    weight, bias = conv(model.conv_1)
    op(batch * 3 * size * size, weight, bias, batch * 16 * hw)
    channels = 16
    for block in [b for k in range(1, 6) for b in getattr(model, f"layer_{k}")]:
        if hasattr(block, "block"):  # MV2: expand, then depthwise + reduce (+ residual)
            mv2 = block.block
            hidden = mv2.exp_1x1.conv.out_channels
            out_channels = mv2.red_1x1.conv.out_channels
            hw_out = hw // block.stride ** 2
            side, side_out = math.isqrt(hw), math.isqrt(hw_out)
            if fuse_expand(batch, (side, side), (side_out, side_out), channels, hidden, out_channels,
                           block.use_residual, dtype, 90):
                # one launch: x (also its residual, one tensor), the three convs, the output
                op(batch * channels * hw, *conv(mv2.exp_1x1), *conv(mv2.conv_3x3), *conv(mv2.red_1x1),
                   batch * out_channels * hw_out)
            else:
                op(batch * channels * hw, *conv(mv2.exp_1x1), batch * hidden * hw)
                op(batch * hidden * hw, *conv(mv2.conv_3x3), *conv(mv2.red_1x1),
                   batch * out_channels * hw_out, batch * channels * hw if block.use_residual else 0)
            channels, hw = out_channels, hw_out
            continue
        d = block.local_rep.conv_1x1.conv.out_channels
        dw_weight, dw_bias = conv(block.local_rep.conv_3x3)
        op(batch * channels * hw, dw_weight, dw_bias, block.local_rep.conv_1x1.conv.weight.numel(),
           batch * d * hw)
        layers = list(block.global_rep)[:-1]
        first_qkv = layers[0].pre_norm_mha[1].qkv_proj
        op(batch * d * hw, 2 * d, first_qkv.weight.numel(), 3 * d, batch * 3 * d * hw)  # LN + qkv
        for index, layer in enumerate(layers):
            attention = layer.pre_norm_mha[1]
            fc1, fc2 = layer.pre_norm_ffn[1], layer.pre_norm_ffn[4]
            op(batch * 3 * d * hw, d * d, d, batch * d * hw, batch * d * hw)  # + out_proj + residual
            # the FFN, then the LN + 1x1 after it: the next layer's qkv, or the final conv_proj
            if index + 1 < len(layers):
                projection = (layers[index + 1].pre_norm_mha[1].qkv_proj.weight.numel(), 3 * d)
            else:
                projection = conv(block.conv_proj)
            op(batch * d * hw, 2 * d, fc1.weight.numel(), fc1.out_features, fc2.weight.numel(), d,
               batch * d * hw, 2 * d, *projection, batch * projection[1] * hw)
        op(batch * d * hw, *conv(block.fusion), batch * channels * hw, batch * channels * hw,
           batch * channels * hw)  # [local | global] + residual -> out
    features = model.conv_1x1_exp.conv.out_channels
    op(batch * channels * hw, *conv(model.conv_1x1_exp), batch * features * hw)
    op(batch * features * hw, batch * features)  # global pool
    fc = model.classifier.fc
    op(fc.out_features, batch * features, fc.weight.numel(), batch * fc.out_features)
    return total


@pytest.mark.parametrize("batch,dtype", [(1, torch.float16), (2, torch.float32)])
def test_bytes_of_v3_xs_equal_an_independent_count(batch, dtype):
    """Least traffic is the ops' inputs and outputs: the split-K launches of these small grids
    also take fp32 partial tiles and counters (scratch, written and read back from L2), which
    are not counted."""
    rows = collect("mobilevitv3_xs", batch, dtype)
    assert any(dict(row.record.constexprs).get("SPLIT_K", 1) > 1 for row in rows if row.record)
    assert sum(row.bytes for row in rows) == _v3_xs_least_bytes(batch, dtype)


def test_rows_follow_the_forward():
    rows = collect("mobilevitv3_xs", 1, torch.float16)
    # 36 Triton launches (an MV2 block is one; each FFN also projects for what follows) + the
    # classifier's mean and addmm
    assert len(rows) == 38
    assert rows[0].stage == "stem" and rows[0].op == "conv3x3"
    assert [row.kernel for row in rows[-2:]] == ["aten::mean", "aten::addmm"]
    assert {row.stage for row in rows if row.op == "patch_attention"} == {"layer_3.1", "layer_4.1", "layer_5.1"}
    assert sum(row.op == "patch_attention" for row in rows) == 2 + 4 + 3  # transformer layers


def test_rows_of_a_dense_model():
    """The backbone's launches are tagged with the encoder's blocks, the rest is the head; the
    dilated depthwise convs of output stride 16 are the launches of layer_5 (dilation 2)."""
    rows = collect("deeplabv3_mobilevitv3_xs_voc", 1, torch.float16, img_size=512)
    stages = [row.stage for row in rows]
    assert stages[0] == "stem" and stages[-1] == "head"
    assert {s.split(".")[0] for s in stages if s.startswith("layer_")} == {f"layer_{k}" for k in range(1, 6)}
    dilated = {row.stage for row in rows if row.record is not None
               and dict(row.record.args).get("dilation", 1) > 1}
    assert dilated and all(stage in ("layer_5.0", "layer_5.1", "head") for stage in dilated)
    assert sum(row.op == "conv3x3" and row.stage == "head" for row in rows) == 3  # ASPP rates 6, 12, 18


def test_gpu_arithmetic():
    h200 = GPUS["h200"]
    # 4.8 MB at 4.8 TB/s is 1 us; 989.4 GFLOP of fp16 tensor work is 1 ms
    assert floor_us(h200, 4_800_000, 0, 0, "tensor") == pytest.approx(1.0)
    assert floor_us(h200, 0, int(989.4e9), 0, "tensor") == pytest.approx(1000.0)
    assert floor_us(h200, 0, int(66.9e9), 0, "fp32") == pytest.approx(1000.0)
    # occupancy: 64 registers x 256 threads -> 4 blocks by registers; 128 threads and 200 KB of
    # shared memory -> 1 block; sm_75 has no 1 KB reservation
    assert blocks_per_sm(h200, 64, 0, 8) == 4
    assert blocks_per_sm(h200, 32, 200 * 1024, 4) == 1
    assert blocks_per_sm(GPUS["rtx2080ti"], 32, 32 * 1024, 4) == 2


def test_command_json_and_markdown(tmp_path):
    """The command end to end, compiling for sm_90: every row compiled, without error."""
    out = tmp_path / "report.json"
    result = _uninterpreted(["-m", "mvit3", "kernels", "--model", "mobilevitv3_xxs", "--batch", "1",
                             "--dtype", "fp16", "--gpu", "h200", "--json", str(out)])
    assert "sum of floors" in result.stdout
    (report,) = json.loads(out.read_text())
    assert report["arch"] == 90 and report["gpu"]["name"] == "NVIDIA H200 SXM"
    for key in ("launches", "bytes", "flops", "floor_us"):
        assert report["totals"][key] > 0
    triton_rows = [row for row in report["rows"] if not row["kernel"].startswith("aten::")]
    assert len(triton_rows) == report["totals"]["launches"] - 2
    for row in triton_rows:
        assert row["compile_error"] is None
        assert row["mma"] in ("wgmma", "mma", "fma", "none")
        for key in ("kernel", "op", "programs", "registers", "spill_bytes", "shared_bytes",
                    "load_bits", "bytes", "flops", "floor_us"):
            assert row[key] is not None, key
        assert row["registers"] > 0 and row["programs"] > 0


def test_command_refuses_bad_input(capsys):
    from mvit3.__main__ import main

    assert main(["kernels", "--model", "nope", "--no-compile"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["kernels", "--dtype", "fp64", "--no-compile"]) == 2
    assert main(["kernels", "--batch", "0", "--no-compile"]) == 2


def test_forward_floor_for_the_benchmarks():
    """bench puts each measured time beside the floor of the fused forward on the GPU at hand."""
    from mvit3.bench.report import _floor_cells
    from mvit3.kernel_report.gpus import gpu_for_device_name
    from mvit3.kernel_report.report import analyse, forward_floor_us

    assert gpu_for_device_name("NVIDIA H200").name == "NVIDIA H200 SXM"
    assert gpu_for_device_name("NVIDIA GeForce RTX 2080 Ti").arch == 75
    assert gpu_for_device_name("NVIDIA L4") is None
    h200 = GPUS["h200"]
    rows = analyse(collect("mobilevitv3_xs", 2, torch.float16), h200, 90, compile_kernels=False)
    floor = forward_floor_us("mobilevitv3_xs", 2, torch.float16, h200)
    assert floor == pytest.approx(sum(row.floor_us for row in rows)) and floor > 0
    row = {"floor_ms_b1": 0.01, "floor_ms_batch": 0.8, "latency_ms_median": 0.5,
           "throughput_batch": 100, "throughput_img_s": 50_000.0}
    # floor / measured: 0.01 / 0.5 ms at batch 1; 0.8 ms / (100 images in 2 ms) at batch 100
    assert _floor_cells(row) == ["0.01 / 0.8", "2.0% / 40.0%"]
    assert _floor_cells({**row, "floor_ms_b1": None}) == ["–", "–"]


def _jit_module(path: Path, name: str, text: str):
    """Import `text` as module `name` from a file (Triton reads a jit function's source from
    its file) with its functions wrapped as Triton JITFunctions, whatever TRITON_INTERPRET."""
    import importlib.util

    from triton.runtime.jit import JITFunction

    file = path / f"{name}.py"
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attr in ("helper", "kernel"):  # the helper first: the kernel's globals must see it wrapped
        setattr(module, attr, JITFunction(getattr(module, attr)))
    return module


def test_report_cache_key_ignores_lines_and_follows_helpers(tmp_path):
    """The compile cache's key of a kernel (`source_key`) holds its source and its helpers'
    (recursively) and constant globals, not their line numbers: moving lines recompiles
    nothing, editing a helper or a constant recompiles the kernels that use it."""
    from mvit3.kernel_report.compiled import source_key

    source = ("import triton.language as tl\nSCALE = 2\n\n"
              "def helper(x):\n    return x * SCALE\n\n"
              "def kernel(ptr):\n    tl.store(ptr, helper(tl.load(ptr)))\n")
    keys = {}
    for name, text in {"base": source,
                       "moved": "\n\n\n# lines above everything moved\n" + source,
                       "helper_edited": source.replace("x * SCALE", "x * SCALE + 1"),
                       "constant_edited": source.replace("SCALE = 2", "SCALE = 3")}.items():
        module = _jit_module(tmp_path, f"report_key_{name}", text)
        keys[name] = source_key(module.kernel)
    assert keys["moved"] == keys["base"]
    assert keys["helper_edited"] != keys["base"]
    assert keys["constant_edited"] != keys["base"]


def test_specialization_follows_the_kernel_parameters(tmp_path):
    """Launchers pass their arguments by name in any order; Triton's JIT specialises them by
    parameter, and so must the report's compile: the record's specialisation comes in the
    kernel's parameter order and each attribute lands on its own parameter's position."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from mvit3.kernel_report.compiled import compile_options
    from mvit3.kernels._common import LaunchRecord, TensorArg

    module = _jit_module(tmp_path, "report_argument_order",
                         "import triton.language as tl\n\ndef helper(x):\n    return x\n\n"
                         "def kernel(ptr, n, m):\n    tl.store(ptr + n + m, helper(1.0))\n")
    tensor = TensorArg(torch.float16, 1024, 64)  # a 16-byte aligned address: marked "D"
    record = LaunchRecord(module.kernel, (1,), (("m", 7), ("n", 32), ("ptr", tensor)),
                          (("num_stages", 1), ("num_warps", 4)))
    assert [name for name, _ in record.specialization] == ["ptr", "n", "m"]
    _, _, attrs, _ = compile_options(record, make_backend(GPUTarget("cuda", 90, 32)))
    assert sorted(attrs) == [(0,), (1,)]  # ptr and n (divisible by 16), not m = 7
