"""`python -m mvit3 export --format onnx --model NAME [--checkpoint P] --out F`: the reference
model as an ONNX graph at a fixed input size.

The size is fixed so that every odd feature map (7x7 in layer_5 at 224 px) is resolved when
the graph is made: its Resize gets constant output sizes instead of sizes computed from the
input's shape at run time, the data-dependent Resize that breaks MobileViT in TensorRT (timm
issue 1373). The written file is checked for that, and with onnxruntime installed its output is
compared with torch's.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from .command_utils import add_model_arguments, build_model

FAST_REFUSAL = ("--fast cannot be exported to ONNX: the fast model's fused ops are custom "
                "torch.library ops (mvit3::*, mvit3_triton::*) that no ONNX runtime implements. "
                "Export the reference model (the default); ONNX Runtime and TensorRT fuse its "
                "graph themselves")


def add_arguments(parser) -> None:
    parser.add_argument("--format", required=True, choices=["onnx"])
    add_model_arguments(parser, runs_model=False)  # exported on the CPU, always the reference
    parser.add_argument("--size", type=int, default=256, help="input height and width (default 256)")
    parser.add_argument("--batch", default="1", help="a fixed batch size, or 'dynamic'")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or later (default 18)")
    parser.add_argument("--out", required=True, metavar="F", help="the .onnx file to write")
    parser.add_argument("--fast", action="store_true", help="refused: see the message")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the onnxruntime comparison with the torch output")


def resize_problems(onnx_model) -> list:
    """The Resize nodes whose scales or sizes are not constants of the graph."""
    return resize_problems_of(onnx_model, onnx_model.graph.node)


def resize_problems_of(onnx_model, nodes) -> list:
    constants = {init.name for init in onnx_model.graph.initializer}
    constants.update(out for node in onnx_model.graph.node if node.op_type == "Constant"
                     for out in node.output)
    constants.add("")  # an omitted optional input
    return [f"{node.name or 'Resize'} (inputs {list(node.input[1:])})" for node in nodes
            if node.op_type == "Resize" and not all(name in constants for name in node.input[1:])]


def fix_resize_sizes(onnx_model) -> None:
    """Give every Resize whose `sizes` are computed at run time constant H and W instead.

    With a dynamic batch, torch's exporter computes the 4-D `sizes` [B, C, H', W'] of an odd
    map's Resize from the input's shape, although H' and W' are fixed by the export size.
    Opset 18 Resize takes `sizes` for chosen `axes`: the node gets axes (2, 3) and constant
    (H', W') from ONNX shape inference, and the shape arithmetic that fed it is removed.
    """
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(onnx_model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                       for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    graph = onnx_model.graph
    for node in graph.node:
        if node.op_type != "Resize" or len(node.input) < 4 or not resize_problems_of(onnx_model, [node]):
            continue
        out = shapes.get(node.output[0])
        if out is None or len(out) != 4 or None in out[2:]:
            raise ValueError(f"Resize {node.name}: its output height and width are not known at export "
                             f"time (inferred shape {out})")
        name = f"{node.name}_sizes_hw"
        graph.initializer.append(numpy_helper.from_array(np.array(out[2:], dtype=np.int64), name))
        node.input[3] = name
        node.attribute.append(helper.make_attribute("axes", [2, 3]))
    # drop the nodes and constants nothing reads any more (the shape arithmetic of the old sizes)
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(out in read for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)


def export_onnx(model, size: int, batch, path: str, opset: int = 18) -> None:
    """Write `model` (eval mode, CPU) for [batch, C, size, size] inputs; batch None = dynamic."""
    example = torch.rand(batch or 2, model.in_chans, size, size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if batch is None else None
    torch.onnx.export(model, (example,), path, dynamo=True, external_data=False,
                      dynamic_shapes=dynamic_shapes, input_names=["image"],
                      output_names=["logits"], opset_version=opset, verbose=False)


def check_with_onnxruntime(model, path: str, size: int, batch) -> float:
    """Max |onnxruntime - torch| relative to max |torch logit|, on a random input."""
    import onnxruntime

    x = torch.rand(batch or 3, model.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


def run(args) -> int:
    if args.fast:
        print(f"error: {FAST_REFUSAL}", file=sys.stderr)
        return 2
    if args.batch != "dynamic" and not (args.batch.isdigit() and int(args.batch) >= 1):
        print(f"error: --batch must be a positive integer or 'dynamic', got {args.batch!r}", file=sys.stderr)
        return 2
    if args.size < 32:
        print(f"error: --size must be at least 32 (MobileViT downsamples by 32), got {args.size}",
              file=sys.stderr)
        return 2
    if args.opset < 18:
        print(f"error: --opset must be at least 18 (constant Resize sizes over chosen axes need "
              f"opset 18's Resize), got {args.opset}", file=sys.stderr)
        return 2
    batch = None if args.batch == "dynamic" else int(args.batch)
    import onnx

    model = build_model(args.model, args.checkpoint, "reference", "cpu")
    export_onnx(model, args.size, batch, args.out, args.opset)
    graph = onnx.load(args.out)
    fix_resize_sizes(graph)
    onnx.save(graph, args.out)
    problems = resize_problems(graph)
    if problems:
        print(f"error: {args.out} has Resize nodes with sizes computed at run time: "
              f"{', '.join(problems)}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {args.model}, input 'image' [{args.batch}, {model.in_chans}, "
          f"{args.size}, {args.size}], output 'logits'")
    if not args.no_check:
        try:
            error = check_with_onnxruntime(model, args.out, args.size, batch)
        except ImportError:
            print("onnxruntime is not installed: the file was not run (pip install onnxruntime)")
        else:
            print(f"onnxruntime (CPU) vs torch: max relative difference {error:.2e}")
    return 0
