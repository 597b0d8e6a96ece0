// Device-side helpers shared by the kernels: dtype and head-dim dispatch, the launch wrapper,
// fp32 math, reductions. Included by the .cu files only (compiled by nvcc, or by the host
// compiler for the CPU emulator with MVIT3_EMULATE).
#pragma once

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
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
// array type, float[4][32]), MVIT3_SHARED_ALIGNED(Type, name, bytes) with __align__(bytes);
// MVIT3_SHARED_DYNAMIC(name, bytes) the launch's dynamic shared memory, `extern __shared__
// unsigned char name[]` aligned to bytes (at most 16), which launch_with_dynamic_shared sizes.
// The emulator defines them its own way (emulator.h): it gives every block fresh storage full
// of NaN bytes, so a read of shared memory before a write fails the tests.
#ifndef MVIT3_EMULATE
namespace mvit3 {
template <class T>
using Identity = T;  // so that a declaration can name an array type
}  // namespace mvit3
#define MVIT3_SHARED_ALIGNED(Type, name, bytes) \
  __shared__ __align__(bytes) ::mvit3::Identity<Type> name
#define MVIT3_SHARED(Type, name) __shared__ ::mvit3::Identity<Type> name
#define MVIT3_SHARED_DYNAMIC(name, bytes) extern __shared__ __align__(bytes) unsigned char name[]
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

// SiLU with the fast intrinsics (ex2.approx, rcp.approx; emulator.h has their twins): within
// about 1e-6 relative for |v| < 20; for v < -87 the denominator overflows and it returns -0.
MVIT3_DEVICE float silu(float v) { return __fdividef(v, 1.0f + __expf(-v)); }

MVIT3_DEVICE float apply_act(float v, Act act) { return act == Act::silu ? silu(v) : v; }

// A load of what other blocks of the launch wrote (after a fence and an atomic that saw their
// count): at the L2, not from this SM's L1, which is not coherent with the other SMs' stores.
MVIT3_DEVICE float load_coherent(const float* p) {
#ifdef MVIT3_EMULATE
  return *p;
#else
  return __ldcg(p);
#endif
}

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

// 16 bytes of T from 16-byte aligned memory into registers.
template <class T>
MVIT3_DEVICE void load_chunk(T (&dst)[16 / sizeof(T)], const T* src) {
  const uint4 bits = *reinterpret_cast<const uint4*>(src);
  memcpy(&dst, &bits, 16);
}

// ---- GroupNorm(1) statistics of one sample ---------------------------------------------------

// How sample_moments reads the samples of a [B, C, H, W] map (the host's decision): 0 through
// its strides; otherwise each sample is one dense range of C*H*W elements (NCHW or NHWC packed;
// a sum does not care about the order) read by vectors of this many elements: 16 bytes where
// the data, the batch stride and the range are 16-byte aligned, else 1.
template <class T>
int sample_vector_width(const Map& m, int channels, int height, int width) {
  const int64_t pixels = int64_t(height) * width;
  const bool nchw = m.stride_w == 1 && m.stride_h == width && m.stride_c == pixels;
  const bool nhwc = m.stride_c == 1 && m.stride_w == channels && m.stride_h == int64_t(width) * channels;
  if (!nchw && !nhwc) return 0;
  constexpr int kVector = 16 / int(sizeof(T));
  const bool aligned = reinterpret_cast<uintptr_t>(m.data) % 16 == 0 && m.stride_b % kVector == 0 &&
                       (channels * pixels) % kVector == 0;
  return aligned ? kVector : 1;
}

// Every thread of a 1-D block of kThreads gets (mean, variance) of sample b's C*H*W values:
// fp32, two passes (the mean, then centred squares), so the variance never suffers the
// cancellation of E[x^2] - E[x]^2. vector_width: sample_vector_width's answer. scratch: 32
// floats of shared memory (block_allreduce).
template <int kThreads, class T>
MVIT3_DEVICE float2 sample_moments(const Map& m, int vector_width, int b, int channels, int height,
                                   int width, float* scratch) {
  constexpr int kVector = 16 / int(sizeof(T));
  const T* x = static_cast<const T*>(m.data);
  const int pixels = height * width;
  const int64_t count = int64_t(channels) * pixels;
  // f(value) for each of this thread's values.
  auto for_each_value = [&](auto&& f) {
    if (vector_width == kVector) {  // 16-byte loads
      const T* sample = x + b * m.stride_b;
      for (int64_t e = int64_t(threadIdx.x) * kVector; e < count; e += kThreads * kVector) {
        T values[kVector];
        load_chunk(values, sample + e);
        MVIT3_UNROLL
        for (int i = 0; i < kVector; ++i) f(to_float(values[i]));
      }
    } else if (vector_width == 1) {
      const T* sample = x + b * m.stride_b;
      for (int64_t e = threadIdx.x; e < count; e += kThreads) f(to_float(sample[e]));
    } else {  // through the strides, the unit-stride dimension fastest
      const bool channels_fastest = m.stride_c == 1;
      for (int64_t e = threadIdx.x; e < count; e += kThreads) {
        const int c = channels_fastest ? int(e % channels) : int(e / pixels);
        const int p = channels_fastest ? int(e / channels) : int(e % pixels);
        f(to_float(x[map_offset(m, b, c, p / width, p % width)]));
      }
    }
  };
  float sum = 0.0f;
  for_each_value([&](float v) { sum += v; });
  const float mean = block_allreduce<kThreads>(sum, scratch, Sum()) / float(count);
  float squares = 0.0f;
  for_each_value([&](float v) { squares += (v - mean) * (v - mean); });
  return make_float2(mean, block_allreduce<kThreads>(squares, scratch, Sum()) / float(count));
}

// ---- asynchronous copies and warp-level matrix instructions ---------------------------------
// Inline PTX on the GPU, the emulator's twins (emulator.h, with the same fragment layouts) under
// MVIT3_EMULATE. cp.async and bf16 mma need sm_80, ldmatrix and f16 mma sm_75 (there
// mma_m16n8k16 is two m16n8k8): ptxas refuses them in a kernel compiled for an older arch.

// Copy kBytes (4, 8 or 16) from global to shared memory asynchronously, the first src_bytes of
// them read and the rest of the destination zero-filled (src_bytes 0: a masked-off element).
// The copy is queued with the thread's uncommitted copies; it is visible to the thread after a
// cp_async_wait that covers its group, to the block after that and a __syncthreads().
template <int kBytes>
MVIT3_DEVICE void cp_async(void* shared_dst, const void* global_src, int src_bytes = kBytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef MVIT3_EMULATE
  emu::cp_async(shared_dst, global_src, kBytes, src_bytes);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  if constexpr (kBytes == 16)  // .cg (L2 only) exists for 16 bytes alone
    asm volatile("cp.async.cg.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(global_src),
                 "n"(kBytes), "r"(src_bytes) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(global_src),
                 "n"(kBytes), "r"(src_bytes) : "memory");
#endif
}

// Close the thread's group of cp_async copies (an empty group is allowed).
MVIT3_DEVICE void cp_async_commit() {
#ifdef MVIT3_EMULATE
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most kPending of the thread's committed groups (the most recent) are in flight.
template <int kPending>
MVIT3_DEVICE void cp_async_wait() {
#ifdef MVIT3_EMULATE
  emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.x{kCount}[.trans].shared.b16 (warp-wide): lanes 8i..8i+7 pass the
// 16-byte aligned shared addresses of rows 0..7 of matrix i; regs[i] of lane l gets elements
// (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i, the first in the low half, or with
// kTrans those of the transposed matrix.
template <int kCount, bool kTrans = false>
MVIT3_DEVICE void ldmatrix(uint32_t (&regs)[kCount], const void* shared_row) {
  static_assert(kCount == 1 || kCount == 2 || kCount == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef MVIT3_EMULATE
  emu::ldmatrix(regs, kCount, kTrans, shared_row);
#else
  const unsigned row = static_cast<unsigned>(__cvta_generic_to_shared(shared_row));
  if constexpr (kCount == 1 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(regs[0]) : "r"(row));
  else if constexpr (kCount == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(regs[0]) : "r"(row));
  else if constexpr (kCount == 2 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(regs[0]), "=r"(regs[1]) : "r"(row));
  else if constexpr (kCount == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(regs[0]), "=r"(regs[1]) : "r"(row));
  else if constexpr (!kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3]) : "r"(row));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3]) : "r"(row));
#endif
}

// d = a b + c, mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 (warp-wide; T __half or
// __nv_bfloat16), fragments per lane l (g = l / 4, t = l % 4; two elements a register, the
// lower index in the low half):
//   a[0]: A[g][2t..2t+1]  a[1]: A[g+8][2t..2t+1]  a[2]: A[g][2t+8..2t+9]  a[3]: A[g+8][2t+8..2t+9]
//   b[0]: B[2t..2t+1][g]  b[1]: B[2t+8..2t+9][g]
//   c[0..1], d[0..1]: C[g][2t..2t+1]  c[2..3], d[2..3]: C[g+8][2t..2t+1]
// ldmatrix<4> with lane l at row l % 16, column 8 (l / 16) of a row-major A gives a; ldmatrix<2,
// true> with lane l at row l % 16 of a row-major [k][n] B gives b. sm_75 has no m16n8k16 for
// f16: there it is two m16n8k8, whose fragments are a[0..1], b[0] and a[2..3], b[1] of these
// (the fp32 sum then rounds once more, after k = 8).
template <class T>
MVIT3_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                               const float (&c)[4]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16");
#ifdef MVIT3_EMULATE
  emu::mma_m16n8k16<T>(d, a, b, c);
#else
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  constexpr bool kHasK16 = false;
#else
  constexpr bool kHasK16 = true;
#endif
  if constexpr (std::is_same_v<T, __half> && !kHasK16) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%7, %8, %9, %10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[2]), "r"(a[3]), "r"(b[1]));
  } else if constexpr (std::is_same_v<T, __half>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
#endif
}

// Two values rounded to T in one register of an mma fragment, the first in the low half.
template <class T>
MVIT3_DEVICE uint32_t pack_pair(float low, float high) {
  const T values[2] = {from_float<T>(low), from_float<T>(high)};
  uint32_t bits;
  memcpy(&bits, &values, 4);
  return bits;
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

// kernel<<<grid, block, dynamic_shared_bytes, stream>>>(args...) with the launch error turned
// into an exception; under MVIT3_EMULATE the emulator runs it on the host (or records it, in
// its record mode). Past kSharedBytesWithoutOptIn of dynamic shared memory the kernel must have
// been allowed them on the device (allow_dynamic_shared).
template <class... Params, class... Args>
void launch_with_dynamic_shared(void (*kernel)(Params...), dim3 grid, dim3 block,
                                size_t dynamic_shared_bytes, Stream stream, const Args&... args) {
#ifdef MVIT3_EMULATE
  (void)stream;
  emu::launch(grid, block, [&] { kernel(args...); }, reinterpret_cast<emu::KernelId>(kernel),
              dynamic_shared_bytes);
#else
  kernel<<<grid, block, dynamic_shared_bytes, stream>>>(args...);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("mvit3 kernel launch failed: ") + cudaGetErrorString(error));
#endif
}

// The same with static shared memory alone (most kernels).
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream stream, const Args&... args) {
  launch_with_dynamic_shared(kernel, grid, block, 0, stream, args...);
}

// Let `kernel` launch with up to `bytes` of dynamic shared memory on the current device: the
// opt-in past kSharedBytesWithoutOptIn (cudaFuncSetAttribute with
// cudaFuncAttributeMaxDynamicSharedMemorySize), up to the device's
// cudaDevAttrMaxSharedMemoryPerBlockOptin less the kernel's static shared memory. Once per kernel
// and device (again only for more bytes), under a lock: launchers may run on several host
// threads. Throws std::runtime_error where the device refuses.
inline void allow_dynamic_shared_bytes(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;  // (kernel, device) -> bytes
  int device = 0;
#ifndef MVIT3_EMULATE
  if (const cudaError_t error = cudaGetDevice(&device); error != cudaSuccess)
    throw std::runtime_error(std::string("mvit3: cudaGetDevice failed: ") +
                             cudaGetErrorString(error));
#endif
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& done = allowed[{kernel, device}];
  if (bytes <= done) return;
#ifdef MVIT3_EMULATE
  const bool ok = emu::func_set_max_dynamic_shared_bytes(
      reinterpret_cast<emu::KernelId>(const_cast<void*>(kernel)), bytes);
  const char* reason = "invalid argument (over the device's opt-in limit)";
#else
  const cudaError_t error = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  const bool ok = error == cudaSuccess;
  const char* reason = ok ? "" : cudaGetErrorString(error);
  if (!ok) cudaGetLastError();  // clear the error, or the next launch check would report it
#endif
  if (!ok)
    throw std::runtime_error("mvit3: cannot allow a kernel " + std::to_string(bytes) +
                             " bytes of dynamic shared memory on device " +
                             std::to_string(device) +
                             " (cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)"
                             " failed: " + reason + ")");
  done = bytes;
}

template <class... Params>
void allow_dynamic_shared(void (*kernel)(Params...), size_t bytes) {
  allow_dynamic_shared_bytes(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace mvit3
