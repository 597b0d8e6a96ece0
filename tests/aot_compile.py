"""Enumerate every Triton launch configuration of the 30 models (15 classifiers, 15 dense) as
each of sm_75, sm_80 and sm_90 gets it (the meta-parameters depend on the arch:
`mvit3.kernels._common.compile_target`) and compile each one ahead of time for its arch, exactly as Triton's JIT compiles it at run time (the runtime
arguments specialised by Triton's rule: `LaunchRecord.specialization`), through the kernels
report's own path (`mvit3.kernel_report.compiled.compile_all`). Run as a script with
TRITON_INTERPRET unset (the test suite turns the interpreter on, and interpreted kernels cannot
be compiled); prints a JSON summary with every failure: a compile error, more shared memory
than a block can have, or (sm_80, sm_90) a register spill. Spills on sm_75 are listed apart
(`ungated_spills`), not failures: see SPILL_GATED_ARCHS.

The configurations are not listed by hand: the fast models run with the Triton backend under
`launch_log(dry_run=True)`, which records each launch (kernel, arguments, constexprs,
num_warps, num_stages) without running it, over every model and dtype and the input and
batch sizes whose shapes drive the kernels' meta-parameter heuristics. There is no
triton.autotune in the code, so these are all the configurations it can launch.
"""

from __future__ import annotations

import json
import os
import sys

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (batch, size): the paper's 256, odd maps (224: 7x7 layer_5), N = 1024 (512), batch 100.
INPUTS = ((1, 256), (1, 224), (1, 512), (100, 256))
# the dense models at their papers' sizes (DeepLabv3 512 px, SSDLite 320 px), batch 1 and the
# benchmarks' batch 16 (`python -m mvit3 bench --task seg|det`)
DENSE_INPUTS = {"deeplabv3_*": ((1, 512), (16, 512)), "ssdlite_*": ((1, 320), (16, 320))}


def model_inputs() -> list:
    """[(model name, ((batch, size), ...)), ...] for the 15 classifiers and 15 dense models."""
    import mvit3

    pairs = [(name, INPUTS) for name in mvit3.list_models()]
    for pattern, inputs in DENSE_INPUTS.items():
        pairs += [(name, inputs) for name in mvit3.list_models(pattern)]
    return pairs
ARCHS = (75, 80, 90)
# Spills fail on sm_90 (H100/H200, the GPU the kernels are tuned for) and sm_80 (A100, and the
# code the RTX 30/40 series run), whose meta-parameters differ where mma.sync needs other
# tiles. sm_75 is checked for errors and shared memory; its spills are listed in the summary.
SPILL_GATED_ARCHS = (80, 90)
# The most shared memory one block may use (with opt-in), by the arch compiled for. sm_80 code
# also runs on sm_86 and sm_89 (RTX 30 and 40 series), which have less than the A100, so it is
# held to their limit. A config over the limit compiles but fails at launch on such a GPU.
SHARED_MEMORY_LIMIT = {75: 64 * 1024, 80: 99 * 1024, 90: 227 * 1024}


def enumerate_launches(arch: int) -> list:
    """The distinct launches (by `LaunchRecord.key`) of the 30 models as a GPU of compute
    capability sm_<arch> gets them: the meta-parameters depend on the arch."""
    import mvit3.fast as fast
    from mvit3.kernels._common import compile_target, launch_log

    records = {}
    for tf32 in (False, True):  # TF32 changes the dot precision constexpr of fp32 kernels
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for name, inputs in model_inputs():
            for dtype in DTYPES:
                if tf32 and dtype != torch.float32:
                    continue
                model = fast.create_model(name, backend="triton").to(dtype).eval()
                for batch, size in inputs:
                    x = torch.zeros(batch, 3, size, size, dtype=dtype)
                    with torch.no_grad(), compile_target(arch), launch_log(dry_run=True) as log:
                        model(x)
                    for record in log.records:
                        records.setdefault(record.key, record)
    return list(records.values())


# Issue 11 items 1 and 2: at batch 100 every 16-bit dot of the v3 models runs on warpgroup MMA on
# sm_90, except where the shape leaves no 64-row tile, and every launch loads 128-bit vectors,
# except where the channel counts or tiles leave none (tests/test_triton_aot.py holds the
# exceptions)
V3_MODELS = "mobilevitv3*"
V3_INPUT = (100, 256)


def v3_batch_100(arch: int = 90) -> tuple:
    """(launches, compiled): every launch of the v3 models at batch 100 in fp16 / bf16 on
    sm_<arch> (not one per configuration: launches of other shapes may share one) and their
    compiles by `LaunchRecord.key`."""
    import mvit3
    import mvit3.fast as fast
    from mvit3.kernel_report.compiled import compile_all
    from mvit3.kernels._common import compile_target, launch_log

    launches = []
    for name in mvit3.list_models(V3_MODELS):
        for dtype in (torch.float16, torch.bfloat16):
            model = fast.create_model(name, backend="triton").to(dtype).eval()
            x = torch.zeros(V3_INPUT[0], 3, V3_INPUT[1], V3_INPUT[1], dtype=dtype)
            with torch.no_grad(), compile_target(arch), launch_log(dry_run=True) as log:
                model(x)
            launches += log.records
    return launches, compile_all(launches, arch)


# the launch arguments that say which shape a launch serves
SHAPE_ARGS = ("N", "D", "C1", "Cin", "Ch")


def _distinct(launches: list, compiled: dict, keep, **fields) -> list:
    """[{kernel, constexprs, args (SHAPE_ARGS), **fields(result)}] of the distinct launches whose
    compile `keep(result)` selects."""
    found = []
    for record in launches:
        result = compiled[record.key]
        if keep(result):
            args = dict(record.args)
            launch = dict(kernel=record.name, constexprs={k: repr(v) for k, v in record.constexprs},
                          args={k: args[k] for k in SHAPE_ARGS if k in args},
                          **{name: get(result) for name, get in fields.items()})
            if launch not in found:
                found.append(launch)
    return found


def not_on_wgmma(launches: list, compiled: dict) -> list:
    """The distinct launches (`v3_batch_100`) whose dots do not compile to wgmma."""
    return _distinct(launches, compiled, lambda r: r.mma not in ("wgmma", "none"),
                     mma=lambda r: r.mma)


def narrow_loads(launches: list, compiled: dict) -> list:
    """The distinct launches (`v3_batch_100`) with no 128-bit global load (issue 11 item 2)."""
    return _distinct(launches, compiled, lambda r: r.load_bits < 128,
                     load_bits=lambda r: r.load_bits, load_mix=lambda r: r.load_mix)


def problems(records: list, arch: int, spills: list) -> list:
    """Every compile error, shared-memory overflow and (gated archs) spill on sm_<arch>; the
    spills of other archs are appended to `spills`."""
    from mvit3.kernel_report.compiled import compile_all

    compiled = compile_all(records, arch)
    found = []
    for record in records:
        result = compiled[record.key]
        where = f"{record.name} sm_{arch} {dict(record.constexprs)}"
        if result.error:
            found.append(f"{where}: {result.error}")
        elif result.shared_bytes > SHARED_MEMORY_LIMIT[arch]:
            found.append(f"{where}: needs {result.shared_bytes} bytes of shared memory, more than "
                         f"the {SHARED_MEMORY_LIMIT[arch]} a block can have")
        elif result.spill_bytes:
            spill = f"{where}: spills {result.spill_bytes} bytes a thread ({result.registers} registers)"
            (found if arch in SPILL_GATED_ARCHS else spills).append(spill)
    return found


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET unset: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    errors, spills, compilations, configurations = [], [], 0, {}
    for arch in ARCHS:
        records = enumerate_launches(arch)
        # the backends never launch bf16 below sm_80 (mvit3/ops/backends.py)
        targets = [r for r in records
                   if arch >= 80 or not any(kind.endswith("bf16") for _, kind in r.signature)]
        compilations += len(targets)
        errors += problems(targets, arch, spills)
        configurations.update((r.key, r) for r in targets)
    kernels = {}
    for record in configurations.values():
        kernels[record.name] = kernels.get(record.name, 0) + 1
    v3_launches, v3_compiled = v3_batch_100()
    print(json.dumps({"configurations": len(configurations), "compilations": compilations,
                      "per_kernel": kernels, "errors": errors, "ungated_spills": spills,
                      "not_on_wgmma": not_on_wgmma(v3_launches, v3_compiled),
                      "narrow_loads": narrow_loads(v3_launches, v3_compiled)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
