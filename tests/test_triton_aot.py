"""Every Triton kernel, at every configuration the code launches for the 15 models, compiles
ahead of time for sm_75 (RTX 2080 Ti), sm_80 and sm_90, with no GPU present.

The configurations are not listed by hand: the fast models run with the Triton backend under
`launch_log(dry_run=True)`, which records each launch (kernel, argument types, constexprs,
num_warps, num_stages) without running it, over every model, dtype and the input sizes and
batch sizes whose shapes drive the kernels' meta-parameter heuristics. There is no
triton.autotune in the code, so these are all the configurations it can launch.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import mvit3
import mvit3.kernels
import mvit3.fast as fast
from mvit3.kernels._common import launch_log

from conftest import HAS_CUDA

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (batch, size): the paper's 256, odd maps (224: 7x7 layer_5), N = 1024 (512), batch 100.
INPUTS = ((1, 256), (1, 224), (1, 512), (100, 256))
ARCHS = (75, 80, 90)


@functools.lru_cache(maxsize=None)
def launch_records() -> tuple:
    records = {}
    for name in mvit3.list_models():
        for dtype in DTYPES:
            model = fast.create_model(name, backend="triton").to(dtype).eval()
            for batch, size in INPUTS:
                x = torch.zeros(batch, 3, size, size, dtype=dtype)
                with torch.no_grad(), launch_log(dry_run=True) as log:
                    model(x)
                for record in log.records:
                    records.setdefault(record.key, record)
    return tuple(records.values())


def _compile(index: int, arch: int) -> str:
    """Compile record `index` for sm_<arch>; returns an error text or ''."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    record = launch_records()[index]
    meta = dict(record.constexprs)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    signature = dict(record.signature)
    constexprs = {name: None for name, kind in record.signature if kind == "constexpr"}
    for name, value in meta.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    try:
        source = ASTSource(record.kernel, signature=signature, constexprs=constexprs)
        triton_compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # reported with the configuration below
        return f"{record.name} sm_{arch} {meta} {options}: {type(err).__name__}: {str(err)[:400]}"
    return ""


def _jobs() -> list:
    jobs = []
    for index, record in enumerate(launch_records()):
        bf16 = any(kind.endswith("bf16") for _, kind in record.signature)
        for arch in ARCHS:
            if bf16 and arch < 80:
                continue  # the backends never launch bf16 below sm_80 (see backends.py)
            jobs.append((index, arch))
    return jobs


def test_launch_enumeration_covers_every_kernel():
    names = {r.name for r in launch_records()}
    kernel_files = {f[:-3] for f in os.listdir(os.path.dirname(mvit3.kernels.__file__))
                    if f.endswith(".py") and not f.startswith("_")}
    # every kernel module contributes at least one launched kernel
    for module in kernel_files:
        assert any(module in name for name in names), f"no launch recorded from kernels/{module}.py"


@pytest.mark.skipif(HAS_CUDA, reason="ahead-of-time compilation is the no-GPU proof; a GPU runs the kernels")
def test_every_configuration_compiles_for_sm75_sm80_sm90():
    jobs = _jobs()
    launch_records()  # enumerate before forking so the workers inherit the records
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1,
                             mp_context=torch.multiprocessing.get_context("fork")) as pool:
        errors = [e for e in pool.map(_compile, *zip(*jobs)) if e]
    assert not errors, f"{len(errors)} of {len(jobs)} compilations failed:\n" + "\n".join(errors[:20])
