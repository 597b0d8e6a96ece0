"""`python -m mvit3 <command>`.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
they are imported only when their command runs, so `info` works without triton or a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("mvit3.info", "list the models (params, MACs) and the kernel backends"),
    "bench": ("mvit3.bench.cli", "reproduce the paper's Table 5 (latency, throughput) here; --task seg|det its dense models"),
    "build": ("mvit3.build", "build the CUDA C++ op library (csrc/) with CMake"),
    "gpu-report": ("mvit3.bench.gpu_report", "one GPU lease: build, correctness, sanitizer, ceilings, benchmarks into one folder"),
    "predict": ("mvit3.predict", "top-5 ImageNet-1k classes of images"),
    "eval": ("mvit3.evaluate", "the accuracy tables: --task cls top-1/5, seg mIoU, det COCO mAP (torchrun: sharded)"),
    "export": ("mvit3.export", "the reference model as ONNX at a fixed input size"),
    "kernels": ("mvit3.kernel_report.cli", "what the compiler made of each launch, and its roofline (no GPU needed)"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvit3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, add_help=False)
        command.set_defaults(_module=module_name)
        # arguments are added lazily below, once we know which command runs
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(args._module)
    command_parser = argparse.ArgumentParser(prog=f"python -m mvit3 {args.command}",
                                             description=COMMANDS[args.command][1])
    module.add_arguments(command_parser)
    return int(module.run(command_parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
