"""Datasheet ceilings of the GPUs the kernels report can judge a launch against.

Peak rates are dense (no 2:4 sparsity), at the boost clock, fp16/bf16 tensor rates with fp32
accumulation (what every mvit3 kernel uses). Memory bandwidth is the HBM/GDDR peak; a copy
reaches about 80-90% of it, which is why a GPU run measures its own ceilings too.
The occupancy limits are those of the CUDA occupancy calculator for the arch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int  # compute capability x 10: the target the kernels are compiled for
    sms: int
    memory_gb_s: float  # peak DRAM bandwidth, GB/s (1e9 bytes)
    tensor_tflops: float  # dense fp16/bf16 tensor-core rate, fp32 accumulate
    tf32_tflops: float  # dense TF32 tensor-core rate (0: no TF32, fp32 products run on FMA units)
    fp32_tflops: float  # FMA units, fp32
    shared_per_sm: int  # bytes of shared memory an SM can give its blocks
    shared_per_block: int  # bytes a block may take with the opt-in (...PerBlockOptin)
    threads_per_sm: int
    blocks_per_sm: int
    registers_per_sm: int = 65536
    source: str = ""


GPUS = {
    "h200": GPU("NVIDIA H200 SXM", 90, 132, 4800, 989.4, 494.7, 66.9, 228 * 1024, 227 * 1024,
                2048, 32,
                source="NVIDIA H200 Tensor Core GPU datasheet (SXM); the SM is the H100's"),
    "h100": GPU("NVIDIA H100 SXM5", 90, 132, 3350, 989.4, 494.7, 66.9, 228 * 1024, 227 * 1024,
                2048, 32,
                source="NVIDIA H100 Tensor Core GPU datasheet (SXM5) and Hopper tuning guide"),
    "a100": GPU("NVIDIA A100 SXM4 80GB", 80, 108, 2039, 312.0, 156.0, 19.5, 164 * 1024, 163 * 1024,
                2048, 32,
                source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"),
    "rtx4090": GPU("NVIDIA GeForce RTX 4090", 89, 128, 1008, 165.2, 82.6, 82.6, 100 * 1024, 99 * 1024,
                   1536, 24,
                   source="NVIDIA Ada Lovelace architecture whitepaper, appendix table (RTX 4090)"),
    "rtx2080ti": GPU("NVIDIA GeForce RTX 2080 Ti", 75, 68, 616, 53.8, 0.0, 13.4, 64 * 1024, 64 * 1024,
                     1024, 16,
                     source="NVIDIA Turing architecture whitepaper, appendix table (RTX 2080 Ti, "
                            "reference boost clock 1545 MHz)"),
}


def blocks_per_sm(gpu: GPU, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident blocks per SM of a kernel (the occupancy calculator's rule): limited by the
    register file (allocated per warp in units of 256 registers), shared memory (plus the 1 KB
    the runtime reserves per block on sm_80 and newer), threads and the block limit."""
    threads = 32 * num_warps
    by_threads = gpu.threads_per_sm // threads
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (gpu.registers_per_sm // registers_per_warp) // num_warps
    reserved = 1024 if gpu.arch >= 80 else 0
    by_shared = gpu.shared_per_sm // (shared_bytes + reserved) if shared_bytes else gpu.blocks_per_sm
    return max(0, min(gpu.blocks_per_sm, by_threads, by_registers, by_shared))


def floor_us(gpu: GPU, nbytes: int, dot_flops: int, simt_flops: int, dot_rate: str) -> float:
    """The roofline floor of a launch in microseconds: its least traffic at peak bandwidth, or
    its arithmetic at peak rate (tl.dot products at the rate of their instruction class,
    `dot_rate` "tensor", "tf32" or "fp32"; other products on the FMA units), whichever is longer."""
    rate = {"tensor": gpu.tensor_tflops, "tf32": gpu.tf32_tflops or gpu.fp32_tflops,
            "fp32": gpu.fp32_tflops}[dot_rate]
    memory_us = nbytes / (gpu.memory_gb_s * 1e3)
    compute_us = dot_flops / (rate * 1e6) + simt_flops / (gpu.fp32_tflops * 1e6)
    return max(memory_us, compute_us)


_NAME_KEYS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("4090", "rtx4090"),
              ("2080 Ti", "rtx2080ti"))


def gpu_for_device_name(name: str):
    """The GPU record whose ceilings apply to a CUDA device of this name
    (torch.cuda.get_device_name), or None for a GPU without one here."""
    return next((GPUS[key] for part, key in _NAME_KEYS if part in name), None)
