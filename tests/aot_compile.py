"""Enumerate every Triton launch configuration of the 15 models and compile each one ahead of
time for sm_75, sm_80 and sm_90. Run as a script with TRITON_INTERPRET unset (the test suite
turns the interpreter on, and interpreted kernels cannot be compiled); prints a JSON summary.

The configurations are not listed by hand: the fast models run with the Triton backend under
`launch_log(dry_run=True)`, which records each launch (kernel, argument types, constexprs,
num_warps, num_stages) without running it, over every model and dtype and the input and
batch sizes whose shapes drive the kernels' meta-parameter heuristics. There is no
triton.autotune in the code, so these are all the configurations it can launch.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (batch, size): the paper's 256, odd maps (224: 7x7 layer_5), N = 1024 (512), batch 100.
INPUTS = ((1, 256), (1, 224), (1, 512), (100, 256))
ARCHS = (75, 80, 90)
# The most shared memory one block may use (with opt-in), by the arch compiled for. sm_80 code
# also runs on sm_86 and sm_89 (RTX 30 and 40 series), which have less than the A100, so it is
# held to their limit. A config over the limit compiles but fails at launch on such a GPU.
SHARED_MEMORY_LIMIT = {75: 64 * 1024, 80: 99 * 1024, 90: 227 * 1024}
RECORDS = []


def enumerate_launches() -> list:
    import mvit3
    import mvit3.fast as fast
    from mvit3.kernels._common import launch_log

    records = {}
    for tf32 in (False, True):  # TF32 changes the dot precision constexpr of fp32 kernels
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for name in mvit3.list_models():
            for dtype in DTYPES:
                model = fast.create_model(name, backend="triton").to(dtype).eval()
                for batch, size in INPUTS:
                    x = torch.zeros(batch, 3, size, size, dtype=dtype)
                    with torch.no_grad(), launch_log(dry_run=True) as log:
                        model(x)
                    for record in log.records:
                        records.setdefault(record.key, record)
    return list(records.values())


def compile_one(index: int, arch: int) -> str:
    """Compile RECORDS[index] for sm_<arch>; an error text, or '' on success."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    record = RECORDS[index]
    meta = dict(record.constexprs)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    signature = dict(record.signature)
    constexprs = {name: None for name, kind in record.signature if kind == "constexpr"}
    for name, value in meta.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    try:
        source = ASTSource(record.kernel, signature=signature, constexprs=constexprs)
        compiled = triton_compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:
        return f"{record.name} sm_{arch} {meta} {options}: {type(err).__name__}: {str(err)[:300]}"
    if compiled.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
        return (f"{record.name} sm_{arch} {meta} {options}: needs {compiled.metadata.shared} bytes "
                f"of shared memory, more than the {SHARED_MEMORY_LIMIT[arch]} a block can have")
    return ""


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET unset: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    RECORDS.extend(enumerate_launches())
    jobs = []
    for index, record in enumerate(RECORDS):
        bf16 = any(kind.endswith("bf16") for _, kind in record.signature)
        # the backends never launch bf16 below sm_80 (mvit3/ops/backends.py)
        jobs += [(index, arch) for arch in ARCHS if not (bf16 and arch < 80)]
    context = torch.multiprocessing.get_context("fork")  # workers inherit RECORDS
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        errors = [e for e in pool.map(compile_one, *zip(*jobs), chunksize=4) if e]
    kernels = {}
    for record in RECORDS:
        kernels[record.name] = kernels.get(record.name, 0) + 1
    print(json.dumps({"configurations": len(RECORDS), "compilations": len(jobs),
                      "per_kernel": kernels, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
