// Device-side helpers shared by the kernels: dtype and head-dim dispatch, the launch wrapper,
// fp32 math, reductions. Included by the .cu files only (compiled by nvcc, or by the host
// compiler for the CPU emulator with MVIT3_EMULATE).
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "mvit3.h"

#ifndef MVIT3_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#ifdef MVIT3_EMULATE
#define MVIT3_UNROLL
#else
#define MVIT3_UNROLL _Pragma("unroll")
#endif

#define MVIT3_DEVICE __device__ __forceinline__

// Shared memory: MVIT3_SHARED(Type, name) declares `__shared__ Type name;` (Type may be an
// array type, float[4][32]), MVIT3_SHARED_ALIGNED(Type, name, bytes) with __align__(bytes).
// The emulator defines them its own way (emulator.h): it gives every block fresh storage full
// of NaN bytes, so a read of shared memory before a write fails the tests.
#ifndef MVIT3_EMULATE
namespace mvit3 {
template <class T>
using Identity = T;  // so that a declaration can name an array type
}  // namespace mvit3
#define MVIT3_SHARED_ALIGNED(Type, name, bytes) __shared__ __align__(bytes) ::mvit3::Identity<Type> name
#define MVIT3_SHARED(Type, name) __shared__ ::mvit3::Identity<Type> name
#endif

namespace mvit3 {

// ---- element types --------------------------------------------------------------------------

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the storage type of `dtype`.
template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(TypeTag<float>{}); return;
    case DType::f16: f(TypeTag<__half>{}); return;
    case DType::bf16: f(TypeTag<__nv_bfloat16>{}); return;
  }
  throw std::runtime_error("mvit3: unknown dtype");
}

// The head dim padded to the next multiple of 16 the attention kernel is compiled for.
template <class F>
void dispatch_head_dim(int head_dim, F&& f) {
  if (head_dim <= 16) return f(std::integral_constant<int, 16>{});
  if (head_dim <= 32) return f(std::integral_constant<int, 32>{});
  if (head_dim <= 48) return f(std::integral_constant<int, 48>{});
  if (head_dim <= kMaxHeadDim) return f(std::integral_constant<int, 64>{});
  throw std::runtime_error("mvit3: head dim " + std::to_string(head_dim) + " > " +
                           std::to_string(kMaxHeadDim));
}

// Whether the kernels of dtype T exist in this compilation pass: bf16 tensor cores (WMMA) need
// sm_80. ops.cpp refuses bf16 on older GPUs, so the bf16 kernels of sm_75 have empty bodies.
template <class T>
__host__ __device__ constexpr bool arch_supports() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return !std::is_same_v<T, __nv_bfloat16>;
#else
  return true;
#endif
}

MVIT3_DEVICE float to_float(float v) { return v; }
MVIT3_DEVICE float to_float(__half v) { return __half2float(v); }
MVIT3_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
MVIT3_DEVICE T from_float(float v);
template <>
MVIT3_DEVICE float from_float<float>(float v) { return v; }
template <>
MVIT3_DEVICE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
MVIT3_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- fp32 math ------------------------------------------------------------------------------

MVIT3_DEVICE float silu(float v) { return v / (1.0f + expf(-v)); }

MVIT3_DEVICE float apply_act(float v, Act act) { return act == Act::silu ? silu(v) : v; }

MVIT3_DEVICE int64_t map_offset(const Map& m, int b, int c, int y, int x) {
  return b * m.stride_b + c * m.stride_c + y * m.stride_h + x * m.stride_w;
}

struct Sum {
  MVIT3_DEVICE float operator()(float a, float b) const { return a + b; }
};
struct Max {
  MVIT3_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class Op>
MVIT3_DEVICE float warp_allreduce(float v, Op op) {
  MVIT3_UNROLL
  for (int mask = 16; mask > 0; mask >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, mask));
  return v;
}

// Every thread of a 1-D block of kThreads gets op over all threads' v. scratch: 32 floats of
// shared memory, free to reuse once this returns.
template <int kThreads, class Op>
MVIT3_DEVICE float block_allreduce(float v, float* scratch, Op op) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  constexpr int kWarps = kThreads / 32;
  v = warp_allreduce(v, op);
  __syncthreads();  // a previous call may still be reading scratch
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kWarps; ++w) v = op(v, scratch[w]);
  return v;
}

// ---- launching ------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A launch grid of x by y blocks, checked against the grid limits (mvit3.h): a launcher that
// let an axis pass its limit would otherwise fail at launch with "invalid configuration".
inline dim3 grid_of(int64_t x, int64_t y = 1) {
  if (x < 1 || x > kMaxGridX || y < 1 || y > kMaxGridYZ)
    throw std::runtime_error("mvit3: grid " + std::to_string(x) + " x " + std::to_string(y) +
                             " is outside the grid limits (x <= " + std::to_string(kMaxGridX) +
                             ", y <= " + std::to_string(kMaxGridYZ) + ")");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

// Grid axis x over `units` (samples, or the pixel tiles of a GEMM) of blocks_per_unit blocks
// each, in as few launches as its limit allows: launch_chunk(first_unit, unit_count) for
// consecutive chunks of at most kMaxGridX blocks (on a GPU, one launch for any batch below
// about 8 million 256 px samples: the largest maps, 128 x 128, take 256 GEMM tiles a sample).
template <class LaunchChunk>
void launch_chunks(int64_t units, int64_t blocks_per_unit, LaunchChunk&& launch_chunk) {
  const int64_t units_per_launch = kMaxGridX / blocks_per_unit;
  if (units_per_launch == 0)
    throw std::runtime_error("mvit3: one sample needs " + std::to_string(blocks_per_unit) +
                             " blocks, more than grid axis x takes (" +
                             std::to_string(kMaxGridX) + ")");
  for (int64_t first = 0; first < units; first += units_per_launch)
    launch_chunk(first, std::min(units_per_launch, units - first));
}

// kernel<<<grid, block, 0, stream>>>(args...) with the launch error turned into an exception;
// under MVIT3_EMULATE the emulator runs it on the host (or records it, in its record mode).
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream stream, const Args&... args) {
  constexpr size_t kDynamicSharedBytes = 0;  // every kernel's shared memory is static
#ifdef MVIT3_EMULATE
  (void)stream;
  emu::launch(grid, block, [&] { kernel(args...); }, reinterpret_cast<emu::KernelId>(kernel),
              kDynamicSharedBytes);
#else
  kernel<<<grid, block, kDynamicSharedBytes, stream>>>(args...);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("mvit3 kernel launch failed: ") + cudaGetErrorString(error));
#endif
}

}  // namespace mvit3
