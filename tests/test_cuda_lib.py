"""The CUDA C++ library (csrc/) as `python -m mvit3 build` installs it; no GPU needed.

It loads, registers a CUDA kernel and its checks for every op under the schemas of
mvit3/ops/schemas.def, its metadata matches this torch and these sources, ptxas reported no
register spills; a build for another torch or other sources is refused with a message and the
backends fall back.

CI builds the library before pytest and sets MVIT3_REQUIRE_CUDA_LIB=1: a missing or broken
library then fails these tests. Elsewhere they skip, saying how to build it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvit3 import build
from mvit3.ops import cuda_lib, library  # importing mvit3.ops registers the ops, loads the library

REQUIRE_LIB = os.environ.get("MVIT3_REQUIRE_CUDA_LIB") == "1"


@pytest.fixture(scope="module")
def lib() -> dict:
    status = cuda_lib.status()
    if not status["loaded"]:
        message = f"the CUDA library is not loaded: {status['reason']}"
        if REQUIRE_LIB:
            pytest.fail(f"{message} (MVIT3_REQUIRE_CUDA_LIB=1)")
        pytest.skip(f"{message}; CI builds it first (python -m mvit3 build) and fails here")
    return status


def test_every_op_has_a_cuda_kernel(lib):
    for op in library.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mvit3::{op}", "CUDA"), op
    assert lib["ops"] == list(library.OPS)


def test_cpp_schemas_are_the_python_schemas(lib):
    """Both come from mvit3/ops/schemas.def; each op comes with its checks, <op>_why_not."""
    for op, schema in library.SCHEMAS.items():
        assert str(getattr(torch.ops.mvit3, op).default._schema) == f"mvit3::{op}{schema}"
        arguments = schema.rsplit(" -> ", 1)[0]
        why_not = str(getattr(torch.ops.mvit3, f"{op}_why_not").default._schema)
        assert why_not == f"mvit3::{op}_why_not{arguments} -> str"
        # defined by the C++ op table, not by the Python fallback definitions
        defined_at = torch._C._dispatch_dump(f"mvit3::{op}").split("debug:")[1].splitlines()[0]
        assert "csrc/ops.cpp" in defined_at


def test_the_schema_file_ships_with_the_package():
    """library.py reads mvit3/ops/schemas.def at import, so an installed copy needs it."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((build.SOURCE_ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert "mvit3.ops" in setuptools["packages"]
    patterns = setuptools["package-data"].get("mvit3.ops", [])
    assert any(fnmatch.fnmatch(library.SCHEMA_FILE.name, p) for p in patterns), patterns
    assert library.SCHEMA_FILE.parent == Path(library.__file__).parent


def test_the_library_checks_the_device_of_real_tensors(lib):
    """Meta tensors describe a call; real ones are checked where they are, as the op would."""
    x, w = torch.zeros(1, 8, 4, 4), torch.zeros(4, 8)
    args = (x, w, None, None, None, "none", None, None, 1e-5, "none")
    assert cuda_lib.why_unsupported("pointwise_conv", args) == "x must be a CUDA tensor, got cpu"
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    assert cuda_lib.why_unsupported("pointwise_conv", meta) is None


def test_metadata_matches_this_torch_and_these_sources(lib):
    info = lib["info"]
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cuda_version"] == torch.version.cuda
    assert info["sources_hash"] == build.sources_hash()
    assert info["archs"] and all(a.isdigit() for a in info["archs"])
    assert cuda_lib.mismatch(info) is None
    assert Path(lib["path"]).parent.name in (build.build_key(), "build")


def test_ptxas_reports_no_register_spills(lib):
    report_path = Path(lib["path"]).parent / build.PTXAS_REPORT_NAME
    if not report_path.is_file():
        pytest.fail(f"no {report_path.name} beside {lib['path']}: install the library with "
                    "`python -m mvit3 build`, which checks ptxas resource usage")
    report = report_path.read_text()
    print(report)  # the resource usage of every kernel, shown with pytest -s or on failure
    assert "SPILLS" not in report, report
    for arch in lib["info"]["archs"]:
        for kernel in ("tile_gemm_kernel", "mv2_block_kernel", "patch_attention_kernel",
                       "fused_mlp_kernel", "context_kernel", "group_norm_stats_kernel"):
            assert any(kernel in line and f"sm_{arch}" in line for line in report.splitlines()), \
                f"{kernel} for sm_{arch} is missing from the ptxas report"


def test_ptxas_parser_reads_registers_and_spills():
    lines = [
        "ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'",
        "ptxas info    : Function properties for _Z6kernelPf",
        "    16 bytes stack frame, 12 bytes spill stores, 24 bytes spill loads",
        "ptxas info    : Used 96 registers, used 1 barriers, 33024 bytes smem",
        "ptxas info    : Compiling entry function '_Z5otherv' for 'sm_75'",
        "ptxas info    : Function properties for _Z5otherv",
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 424 bytes cmem[0]",
    ]
    spilled, clean = build.parse_ptxas(lines)
    assert (spilled.arch, spilled.registers, spilled.shared_bytes) == ("sm_90", 96, 33024)
    assert (spilled.spill_stores, spilled.spill_loads, spilled.spills) == (12, 24, True)
    assert (clean.arch, clean.registers, clean.spills) == ("sm_75", 40, False)
    if shutil.which("c++filt"):
        assert spilled.kernel == "kernel" and clean.kernel == "other"
    assert "SPILLS" in build.format_usage([spilled, clean])


def _cmake_info(source_dir: Path, out: Path) -> dict:
    """The metadata csrc/build_info.cmake writes for the sources under source_dir."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed here (CI has it)")
    subprocess.run([cmake, f"-DSOURCE_DIR={source_dir}", f"-DOUTPUT={out}", "-DTORCH_VERSION=x",
                    "-DCUDA_VERSION=y", "-DNVCC_VERSION=z", "-DARCHS=75,90", "-DBUILD_TYPE=Release",
                    "-P", str(build.SOURCE_ROOT / "csrc" / "build_info.cmake")], check=True)
    return json.loads(out.read_text())


def test_sources_hash_agrees_with_the_cmake_script(tmp_path):
    """CMake writes the metadata of a plain build; the loader recomputes the hash in Python."""
    info = _cmake_info(build.SOURCE_ROOT, tmp_path / "info.json")
    assert info["sources_hash"] == build.sources_hash()
    assert info["archs"] == ["75", "90"]


@pytest.mark.parametrize("changed", ["csrc/ops.cpp", *build.HASHED_FILES])
def test_both_sources_hashes_cover_every_source(tmp_path, changed):
    """A change to csrc/**, CMakeLists.txt or the schema file csrc/ops.cpp includes changes
    the hash, alike on both sides (a copy of the sources, one file edited)."""
    root = tmp_path / "src"
    shutil.copytree(build.SOURCE_ROOT / "csrc", root / "csrc")
    for name in build.HASHED_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build.SOURCE_ROOT / name, root / name)
    assert build.sources_hash(root) == build.sources_hash()
    with open(root / changed, "a") as f:
        f.write("\n")
    edited = build.sources_hash(root)
    assert edited != build.sources_hash()
    assert _cmake_info(root, tmp_path / "info.json")["sources_hash"] == edited


@pytest.mark.parametrize("field, value, says", [
    ("torch_version", "0.0.1", "built for torch 0.0.1"),
    ("cuda_version", "9.9", "CUDA 9.9"),
    ("sources_hash", "0123456789abcdef", "built from other sources"),
])
def test_a_mismatch_names_what_the_build_was_for(field, value, says):
    info = {"torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "sources_hash": build.sources_hash()}
    assert cuda_lib.mismatch(info) is None
    info[field] = value
    reason = cuda_lib.mismatch(info)
    assert reason is not None and says in reason and "python -m mvit3 build" in reason


_FALLBACK_PROBE = """
import json, torch
import mvit3.ops as ops
from mvit3.ops import backends, cuda_lib
x = torch.randn(1, 8, 4, 4)
w = torch.randn(4, 8)
args = (x, w, None, None, None, "none", None, None, 1e-5, "none")
status = cuda_lib.status()
print(json.dumps({
    "loaded": status["loaded"], "reason": status["reason"],
    "why_not_cuda": backends.why_not("cuda", "pointwise_conv", args),
    "has_cuda_kernel": torch._C._dispatch_has_kernel_for_dispatch_key("mvit3::pointwise_conv", "CUDA"),
    "schema": str(torch.ops.mvit3.pointwise_conv.default._schema),
    "auto": backends.select("pointwise_conv", "auto", args),
    "matches_reference": bool(torch.allclose(ops.pointwise_conv(*args),
                                             torch.ops.mvit3.pointwise_conv(*args))),
}))
"""


def test_a_library_built_for_another_torch_is_refused_and_everything_falls_back(lib, tmp_path):
    shutil.copy2(lib["path"], tmp_path / build.LIB_NAME)
    info = dict(lib["info"], torch_version="0.0.1")
    (tmp_path / build.INFO_NAME).write_text(json.dumps(info))
    env = dict(os.environ, MVIT3_LIB_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _FALLBACK_PROBE], capture_output=True, text=True,
                         env=env, check=True).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["loaded"] is False
    assert "built for torch 0.0.1" in probe["reason"] and str(tmp_path) in probe["reason"]
    assert "CUDA library unavailable" in probe["why_not_cuda"] and "0.0.1" in probe["why_not_cuda"]
    assert probe["has_cuda_kernel"] is False  # the Python side defined the op instead
    assert probe["schema"] == f"mvit3::pointwise_conv{library.SCHEMAS['pointwise_conv']}"
    assert probe["auto"] == "torch" and probe["matches_reference"]


def test_build_names_a_missing_cmake_or_nvcc(monkeypatch, capsys):
    parser = __import__("argparse").ArgumentParser()
    build.add_arguments(parser)
    args = parser.parse_args([])
    real_which = shutil.which
    monkeypatch.setattr(build.shutil, "which",
                        lambda name: None if name == "cmake" else real_which(name))
    assert build.run(args) == 1
    assert "CMake was not found" in capsys.readouterr().err
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(build.os, "access", lambda *a: False)
    with pytest.raises(build.BuildError, match="nvcc .* was not found"):
        build.find_nvcc()


@pytest.mark.parametrize("archs, capability, dtype, usable", [
    (("75", "90"), (7, 5), torch.float16, True),
    (("75", "90"), (9, 0), torch.bfloat16, True),
    (("75", "90"), (8, 0), torch.float32, False),  # the CI build on an A100: no sm_8x code
    (("75", "90"), (8, 9), torch.float16, False),
    (("75", "80", "90"), (8, 6), torch.bfloat16, True),  # sm_80 code runs on 8.6
    (("75", "90"), (10, 0), torch.float32, True),  # newer GPUs JIT-compile the sm_90 PTX
    (("75",), (8, 6), torch.float16, True),  # sm_75 PTX, JIT-compiled...
    (("75",), (8, 6), torch.bfloat16, False),  # ...but its bf16 kernels are empty
    (("80",), (7, 5), torch.float32, False),
])
def test_arch_coverage_decides_whether_the_library_takes_a_gpu(archs, capability, dtype, usable):
    reason = cuda_lib.arch_reason(capability, dtype, archs)
    assert (reason is None) == usable
    if not usable:
        assert "rebuild with `python -m mvit3 build --archs" in reason


# ---- size limits: by dimension and grid, not by numel ---------------------------------------

@pytest.mark.parametrize("batch", [1024, 20000])
@pytest.mark.parametrize("name", ["mobilevitv3_xs", "mobilevitv3_050", "mobilevit_xs",
                                  "mobilevitv2_050"])
def test_why_unsupported_takes_every_op_at_huge_batches(lib, monkeypatch, name, batch):
    """A dry run of the model at 256 px on meta tensors (batch 20000 would be tens of GB): every
    op call is put to cuda_lib.why_unsupported (the library's own checks), which must take it.
    At batch 1024 the maps
    reach 2^31 elements (v3-XS's layer_2 input is exactly 2^31), which the former numel limit
    refused; the launchers split such grids instead (csrc/device.cuh: launch_chunks)."""
    import mvit3.fast as fast
    from mvit3.ops import reference

    calls = []

    def checked(op):
        def call(*args):
            numel = args[0].numel()
            if op == "dwconv_pointwise" and args[8] is not None:
                # a whole MV2 block: the library materialises the expanded [B, Ch, H, W] map
                numel = max(numel, numel // args[0].shape[1] * args[8].shape[0])
            calls.append((op, numel))
            reason = cuda_lib.why_unsupported(op, args)
            assert reason is None, f"{op} on {tuple(args[0].shape)}: {reason}"
            return library.empty_outputs(op, args)  # args[0] is a meta tensor
        return call

    for op in library.OPS:
        monkeypatch.setattr(reference, op, checked(op))
    model = fast.create_model(name, backend="torch").eval().to("meta")
    with torch.no_grad():
        logits = model(torch.empty(batch, 3, 256, 256, device="meta"))
    assert logits.shape == (batch, 1000)
    v1_style = name in ("mobilevitv3_xs", "mobilevit_xs")
    # v1-style at 256 px: every map is even, so every FFN is fused with the projection after it
    unused = ({"separable_attention", "transformer_mlp"} if v1_style
              else {"patch_attention", "transformer_mlp_project"})
    assert {op for op, _ in calls} == set(library.OPS) - unused
    if batch == 20000 or name == "mobilevitv3_xs":
        assert max(numel for _, numel in calls) >= 2 ** 31


# ---- SASS gates: what nvcc made of the kernels ------------------------------------------------

SASS_ARCH = 90  # the gates on tensor cores and loads are for the sm_90 build (CI builds 75;90)


@pytest.fixture(scope="module")
def sass(lib) -> dict:
    """{arch: {kernel: Counter of its SASS opcodes}} of every arch of the build, read with
    cuobjdump (the toolkit's, or the copy Triton ships). Without cuobjdump the gates skip, but
    fail where CI requires the library."""
    from mvit3.kernel_report import cuda_rows

    try:
        cuda_rows._cuobjdump()
    except cuda_rows.CudaReportError as err:
        if REQUIRE_LIB:
            pytest.fail(f"{err} (MVIT3_REQUIRE_CUDA_LIB=1: the SASS gates must run)")
        pytest.skip(str(err))
    if str(SASS_ARCH) not in lib["info"]["archs"]:
        message = (f"the library has no sm_{SASS_ARCH} code (archs {lib['info']['archs']}); "
                   f"CI builds --archs \"75;90\"")
        if REQUIRE_LIB:
            pytest.fail(message)
        pytest.skip(message)
    kernels = {}
    for arch in lib["info"]["archs"]:
        bodies = cuda_rows.sass_functions(Path(lib["path"]), int(arch))
        names = cuda_rows._demangle(sorted(bodies))
        kernels[int(arch)] = {build.short_kernel_name(names[mangled]): cuda_rows.sass_opcodes(body)
                              for mangled, body in bodies.items()}
    return kernels


def _family(kernels: dict, family: str, dtype: str) -> dict:
    """The kernels of one template (tile_gemm_kernel, ...) for one element type (__half, ...)."""
    found = {name: ops for name, ops in kernels.items()
             if name.startswith(f"{family}<{dtype},") or name == f"{family}<{dtype}>"}
    assert found, f"no {family}<{dtype}, ...> in the sm_{SASS_ARCH} code: {sorted(kernels)}"
    return found


def _has(opcodes, *prefixes) -> bool:
    return any(op.split(".")[0] in prefixes for op in opcodes)


@pytest.mark.parametrize("family", ["tile_gemm_kernel", "mv2_block_kernel", "patch_attention_kernel",
                                    "fused_mlp_kernel"])
@pytest.mark.parametrize("dtype", ["__half", "__nv_bfloat16"])
def test_fp16_and_bf16_gemms_and_attention_run_on_tensor_cores(sass, family, dtype):
    """sm_90: every producer of the tile GEMM, both strides of the one-kernel MV2 block, every
    head dim of the attention kernel and the one-launch FFN issue HMMA (WMMA or mma.sync;
    HGMMA, Hopper's warpgroup MMA, would do too)."""
    kernels = _family(sass[SASS_ARCH], family, dtype)
    scalar = sorted(name for name, ops in kernels.items() if not _has(ops, "HMMA", "HGMMA"))
    assert not scalar, f"no tensor-core instruction in {scalar}"


def test_no_kernel_uses_local_memory(sass, lib):
    """No LDL / STL in any kernel of any built arch (spills, dynamically indexed arrays and
    stack frames all live in local memory), and ptxas reported no stack frame either."""
    for arch, kernels in sass.items():
        local = sorted(f"{name} ({', '.join(op for op in ops if _has([op], 'LDL', 'STL'))})"
                       for name, ops in kernels.items() if _has(ops, "LDL", "STL"))
        assert not local, f"sm_{arch}: local memory in {local}"
    report = (Path(lib["path"]).parent / build.PTXAS_REPORT_NAME).read_text().splitlines()
    stacks = [re.search(r"\s(sm_\d+)\s+\d+\s+\d+\s+(\d+)\s", line) for line in report[1:]]
    assert len(report) > 1 and all(stacks), report[:3]
    assert [line for line, m in zip(report[1:], stacks) if m.group(2) != "0"] == []


@pytest.mark.parametrize("family", ["tile_gemm_kernel", "mv2_block_kernel"])
@pytest.mark.parametrize("dtype", ["__half", "__nv_bfloat16", "float"])
def test_gemm_kernels_load_with_ldgsts_or_128_bit_ldg(sass, family, dtype):
    """sm_90: every producer of the tile GEMM (and the one-kernel MV2 block, whose reduce GEMM
    stages its weights the same way) moves its operands global -> shared with LDGSTS (cp.async)
    or 128-bit LDG: the weight tile goes in 16-byte chunks (issue 12 item 1)."""
    kernels = _family(sass[SASS_ARCH], family, dtype)
    narrow = sorted(name for name, ops in kernels.items()
                    if not any(op.startswith("LDGSTS") or (op.startswith("LDG.") and ".128" in op)
                               for op in ops))
    assert not narrow, f"neither LDGSTS nor LDG.128 in {narrow}"


@pytest.mark.parametrize("dtype", ["__half", "__nv_bfloat16", "float"])
def test_fused_mlp_kernels_load_with_ldgsts_and_128_bit_ldg(sass, dtype):
    """sm_90: the one-launch FFN stages its weight tiles with LDGSTS (cp.async) and reads its x
    rows (the A tile and the residual) with 128-bit LDG."""
    kernels = _family(sass[SASS_ARCH], "fused_mlp_kernel", dtype)
    narrow = sorted(name for name, ops in kernels.items()
                    if not (_has(ops, "LDGSTS")
                            and any(op.startswith("LDG.") and ".128" in op for op in ops)))
    assert not narrow, f"no LDGSTS or no LDG.128 in {narrow}"


@pytest.mark.parametrize("dtype", ["__half", "__nv_bfloat16", "float"])
def test_attention_kernels_stage_keys_with_ldgsts(sass, dtype):
    """sm_90: every head dim and warp count of the attention kernel copies its K/V tiles with
    LDGSTS (cp.async, 16-byte chunks of head windows) and loads Q with 128-bit LDG."""
    kernels = _family(sass[SASS_ARCH], "patch_attention_kernel", dtype)
    narrow = sorted(name for name, ops in kernels.items()
                    if not (_has(ops, "LDGSTS")
                            and any(op.startswith("LDG.") and ".128" in op for op in ops)))
    assert not narrow, f"no LDGSTS or no LDG.128 in {narrow}"
