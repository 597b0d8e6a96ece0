"""Markdown of a kernels report (see docs/bench.md for how to read it)."""

from __future__ import annotations

from .report import LONG_SERIAL_LOOP

# tile sizes and paddings, short: "M64 N128 K16", "hd32" (head dim padded to 32)
_ABBREVIATIONS = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_F": "F", "BLOCK_C": "C",
                  "BLOCK_O": "O", "BLOCK_P": "P", "HEAD_PAD": "hd", "D_PAD": "d", "OUT_CHUNK": "oc",
                  "TWO_OUT_CHUNKS": "2oc", "SPLITS_PAD": "sp", "ROW_K": "row", "SPLIT_K": "split",
                  "SPLIT_F": "splitF"}
# meta-parameters left out at their default value: an unsplit K loop says nothing
_DEFAULTS = {"SPLIT_K": 1, "SPLIT_F": 1}


def _meta_text(meta: dict) -> str:
    return " ".join(f"{_ABBREVIATIONS[key]}{value}" if key in _ABBREVIATIONS else f"{key}={value}"
                    for key, value in meta.items()
                    if value is not None and (key not in _DEFAULTS or value != _DEFAULTS[key]))


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _flops(flops: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f}"


def render_markdown(report) -> str:
    totals = report.totals()
    gpu = report.gpu
    lines = [
        f"## {report.model}, batch {report.batch}, {report.dtype}, {report.img_size} px: "
        f"{report.backend} kernels for sm_{report.arch}, roofline of the {gpu.name}",
        "",
        f"Ceilings (datasheet: {gpu.source}): {gpu.memory_gb_s:.0f} GB/s, {gpu.tensor_tflops} "
        f"TFLOP/s fp16/bf16 tensor, {gpu.tf32_tflops or '-'} TF32, {gpu.fp32_tflops} fp32; "
        f"{gpu.sms} SMs.",
        "",
        f"**{totals['launches']} launches, {_size(totals['bytes'])} least traffic, "
        f"{_flops(totals['flops'])}FLOP, sum of floors {totals['floor_us']:.1f} us"
        # the CUDA rows do not know their kernels' loops
        + (f", {totals['serial_steps']} serial loop steps ({totals['serial_bound_launches']} launches "
           f"on under half the SMs loop > {LONG_SERIAL_LOOP} steps)" if report.backend == "triton" else "")
        + "** "
        f"({totals['launches_with_spills']} launches spill, {totals['compile_errors']} failed to compile).",
        "",
        "Share of the sum of floors by op: " + ", ".join(
            f"{op} {share:.0%}" for op, share in totals["floor_share_by_op"].items()) + ".",
        "",
        "| # | stage | op | kernel | grid | progs | waves | steps | meta | w/s | regs | spill | smem | "
        "blk/SM | mma | load | bytes | FLOP | FLOP/B | floor us |",
        "|---:|---|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for index, row in enumerate(report.rows):
        d = row.as_dict()
        compiled = row.compiled
        if compiled is not None and compiled.error:
            compiled_cells = ["**error**"] + [""] * 5
        elif compiled is not None:
            load = f"{d['load_bits']}" + (f" {d['load_kind']}" if d["load_kind"] not in ("ld", "") else "")
            # a CUDA launch's dynamic shared memory adds to the kernel's static
            shared = (d["shared_bytes"] or 0) + d.get("dynamic_shared_bytes", 0)
            compiled_cells = [str(d["registers"]), str(d["spill_bytes"] or ""),
                              _size(shared) if shared else "0",
                              str(d["blocks_per_sm"]), d["mma"], load]
        else:
            compiled_cells = [""] * 6
        warps = "/".join(str(n) for n in (d["num_warps"], d["num_stages"]) if n is not None)
        grid = "x".join(map(str, row.grid)) if row.grid else ""
        intensity = f"{d['intensity']:.1f}" if d["intensity"] is not None else ""
        lines.append("| " + " | ".join([
            str(index), row.stage, row.op, f"`{row.kernel}`", grid,
            str(row.programs) if row.grid else "", f"{row.waves:.2f}" if row.waves is not None else "",
            str(row.serial_steps or ""),
            _meta_text(row.meta), warps, *compiled_cells, _size(row.bytes),
            _flops(row.flops) if row.flops else "0", intensity, f"{row.floor_us:.2f}"]) + " |")
    return "\n".join(lines)
