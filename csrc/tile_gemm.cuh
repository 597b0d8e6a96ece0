// The tiled GEMM behind every per-pixel matrix product of the library (1x1 convs, the
// depthwise+1x1 and 3x3 convs as implicit GEMMs, the projections of both attentions).
//
//   out[pixel, o] = act(sum_k A[pixel, k] * W[o, k] + bias[o]) + residual[pixel, o]
//
// A is never materialised: a Producer computes A[pixel, k] on the fly while the tile is staged
// in shared memory (read a map through its strides, apply a norm, a depthwise conv, ...).
// W [Cout, K] is read through its strides and staged along its unit-stride dimension (K for a
// row-major weight, Cout for the fast models' K-major packing). Pixels are the B*Ho*Wo output
// pixels in (b, y, x) order; the output and residual are indexed through their strides.
//
// A block computes a kBlockM x kBlockN tile with kThreads threads, walking K in kBlockK steps:
// - fp32: each thread owns a 4x4 sub-tile and accumulates with FMAs (IEEE fp32).
// - fp16/bf16: each warp owns a 16x32 sub-tile on tensor cores (WMMA 16x16x16, fp32
//   accumulators). The A tile is rounded to the I/O dtype after the producer's fp32 math.
// The accumulators then go through shared memory to an epilogue that writes channel-fastest,
// which is coalesced for the channels_last outputs.
//
// A Producer provides:
//   bool channels_contiguous            A's k index walks unit-stride memory (stage k-fastest)
//   void init_row(Row&)                 per-pixel offsets, given row.b/y/x (row.b >= 0)
//   void prepare(Row* rows)             collective per-block setup (called by all threads)
//   float a(const Row&, int k)          A[pixel, k] in fp32
#pragma once

#include "device.cuh"

namespace mvit3::gemm {

constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 32, kThreads = 256;

// What a block knows about each of its output pixels (shared memory, so no initialisers).
struct Row {
  int64_t offset;   // producer-defined, e.g. the pixel's offset in the input map
  int64_t offset2;  // producer-defined, e.g. the pixel's offset in the second input
  int b;            // sample; -1 for rows past the last pixel
  int y, x;         // output coordinates
  float mean, rstd; // producer-defined per-pixel statistics (LayerNorm)
};

struct Epilogue {
  const void* bias = nullptr;  // [Cout] or null
  Map residual;                // [B, Cout, Ho, Wo] or absent
  Map out;                     // [B, Cout, Ho, Wo]
  Act act = Act::none;
};

struct Shape {
  int batch, out_height, out_width, cout, k;
};

// fp32 stages fp32 operands (SIMT); fp16/bf16 stage the I/O type for WMMA.
template <class T>
struct Tiles {
  static constexpr bool kTensorCores = !std::is_same_v<T, float>;
  using Operand = T;
  static constexpr int kLdA = kTensorCores ? kBlockK + 8 : kBlockK + 1;  // WMMA: 16-byte rows
  static constexpr int kLdB = kLdA;
  static constexpr int kLdC = kBlockN + 4;
  static constexpr int kOperandBytes = (kBlockM * kLdA + kBlockN * kLdB) * int(sizeof(T));
  static constexpr int kResultBytes = kBlockM * kLdC * int(sizeof(float));
  static constexpr int kBytes = kOperandBytes > kResultBytes ? kOperandBytes : kResultBytes;
  static_assert((kBlockM * kLdA * int(sizeof(T))) % 32 == 0, "B tile must stay 32-byte aligned");
};

// fp32: thread (ty, tx) of a 16x16 grid owns rows ty + 16i and columns tx + 16j, i, j < 4.
// Row reads are warp broadcasts; column reads hit 16 distinct banks thanks to kLdB = 33.
struct SimtMath {
  float acc[4][4] = {};

  MVIT3_DEVICE void step(const float* a_tile, const float* b_tile) {
    constexpr int kLd = Tiles<float>::kLdA;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    MVIT3_UNROLL
    for (int k = 0; k < kBlockK; ++k) {
      float a[4], b[4];
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i) a[i] = a_tile[(ty + 16 * i) * kLd + k];
      MVIT3_UNROLL
      for (int j = 0; j < 4; ++j) b[j] = b_tile[(tx + 16 * j) * kLd + k];
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i)
        MVIT3_UNROLL
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  MVIT3_DEVICE void store(float* c_tile) const {
    constexpr int kLd = Tiles<float>::kLdC;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    MVIT3_UNROLL
    for (int i = 0; i < 4; ++i)
      MVIT3_UNROLL
      for (int j = 0; j < 4; ++j) c_tile[(ty + 16 * i) * kLd + tx + 16 * j] = acc[i][j];
  }
};

// fp16/bf16: warp w owns rows 16 * (w % 4) and columns 32 * (w / 4) (+0, +16). The A tile is
// [M][K] row-major; the B tile is stored [N][K], i.e. W^T column-major.
template <class T>
struct WmmaMath {
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static_assert(kThreads == 256 && kBlockM == 64 && kBlockN == 64, "8 warps of 16x32");
  FragC acc[2];

  MVIT3_DEVICE WmmaMath() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }

  MVIT3_DEVICE void step(const T* a_tile, const T* b_tile) {
    constexpr int kLd = Tiles<T>::kLdA;
    const int warp = threadIdx.x / 32;
    const int row0 = 16 * (warp % 4), col0 = 32 * (warp / 4);
    MVIT3_UNROLL
    for (int k = 0; k < kBlockK; k += 16) {
      FragA a;
      nvcuda::wmma::load_matrix_sync(a, a_tile + row0 * kLd + k, kLd);
      MVIT3_UNROLL
      for (int j = 0; j < 2; ++j) {
        FragB b;
        nvcuda::wmma::load_matrix_sync(b, b_tile + (col0 + 16 * j) * kLd + k, kLd);
        nvcuda::wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
  }

  MVIT3_DEVICE void store(float* c_tile) const {
    constexpr int kLd = Tiles<T>::kLdC;
    const int warp = threadIdx.x / 32;
    const int row0 = 16 * (warp % 4), col0 = 32 * (warp / 4);
    MVIT3_UNROLL
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(c_tile + row0 * kLd + col0 + 16 * j, acc[j], kLd,
                                      nvcuda::wmma::mem_row_major);
  }
};

// The grid: block x = tile * channel_tiles_x + i and block y = j compute pixel tile
// first_tile + tile and channel tile j * channel_tiles_x + i (none past the last: that block
// writes nothing). The channel tiles of a pixel tile are neighbours on axis x, so they run
// together and share its A operand (producer inputs, LayerNorm statistics) in L1/L2.
template <class T, class Producer>
MVIT3_DEVICE void tile_gemm_body(const Producer& producer, const Matrix& weight_matrix,
                                 const Epilogue& ep, const Shape& shape, int64_t first_tile,
                                 int channel_tiles_x) {
  using Math = std::conditional_t<Tiles<T>::kTensorCores, WmmaMath<T>, SimtMath>;
  using Operand = typename Tiles<T>::Operand;
  constexpr int kLdA = Tiles<T>::kLdA, kLdB = Tiles<T>::kLdB, kLdC = Tiles<T>::kLdC;
  MVIT3_SHARED_ALIGNED(unsigned char[Tiles<T>::kBytes], tiles, 32);
  MVIT3_SHARED(Row[kBlockM], rows);
  Operand* a_tile = reinterpret_cast<Operand*>(tiles);  // [kBlockM][kLdA]
  Operand* b_tile = a_tile + kBlockM * kLdA;             // [kBlockN][kLdB]
  float* c_tile = reinterpret_cast<float*>(tiles);       // [kBlockM][kLdC], after the K loop

  const T* weight = static_cast<const T*>(weight_matrix.data);
  const bool k_contiguous = weight_matrix.stride_col == 1;
  const int tid = threadIdx.x;
  const int pixels_per_sample = shape.out_height * shape.out_width;
  const int64_t m0 = (first_tile + blockIdx.x / channel_tiles_x) * kBlockM;
  const int n0 = int(blockIdx.y * channel_tiles_x + blockIdx.x % channel_tiles_x) * kBlockN;
  if (n0 >= shape.cout) return;  // a channel tile past the last of a group on axis y
  const int64_t pixels = int64_t(shape.batch) * pixels_per_sample;

  if (tid < kBlockM) {
    Row row{};
    row.b = -1;
    const int64_t m = m0 + tid;
    if (m < pixels) {
      row.b = int(m / pixels_per_sample);
      const int rest = int(m % pixels_per_sample);
      row.y = rest / shape.out_width;
      row.x = rest % shape.out_width;
      producer.init_row(row);
    }
    rows[tid] = row;
  }
  __syncthreads();
  producer.prepare(rows);

  Math math;
  for (int k0 = 0; k0 < shape.k; k0 += kBlockK) {
    for (int e = tid; e < kBlockM * kBlockK; e += kThreads) {
      const int r = producer.channels_contiguous ? e / kBlockK : e % kBlockM;
      const int kk = producer.channels_contiguous ? e % kBlockK : e / kBlockM;
      const Row& row = rows[r];
      const int k = k0 + kk;
      const float v = (row.b >= 0 && k < shape.k) ? producer.a(row, k) : 0.0f;
      a_tile[r * kLdA + kk] = from_float<Operand>(v);
    }
    for (int e = tid; e < kBlockN * kBlockK; e += kThreads) {
      const int n = k_contiguous ? e / kBlockK : e % kBlockN;
      const int kk = k_contiguous ? e % kBlockK : e / kBlockN;
      const int o = n0 + n, k = k0 + kk;
      b_tile[n * kLdB + kk] = (o < shape.cout && k < shape.k)
                                  ? weight[o * weight_matrix.stride_row + k * weight_matrix.stride_col]
                                  : from_float<Operand>(0.0f);
    }
    __syncthreads();
    math.step(a_tile, b_tile);
    __syncthreads();  // the next stage (or c_tile, which aliases) overwrites the tiles
  }
  math.store(c_tile);
  __syncthreads();

  const T* bias = static_cast<const T*>(ep.bias);
  const T* residual = static_cast<const T*>(ep.residual.data);
  T* out = static_cast<T*>(ep.out.data);
  for (int e = tid; e < kBlockM * kBlockN; e += kThreads) {
    const int r = e / kBlockN, n = e % kBlockN;
    const Row& row = rows[r];
    const int o = n0 + n;
    if (row.b < 0 || o >= shape.cout) continue;
    float v = c_tile[r * kLdC + n];
    if (bias) v += to_float(bias[o]);
    v = apply_act(v, ep.act);
    if (residual) v += to_float(residual[map_offset(ep.residual, row.b, o, row.y, row.x)]);
    out[map_offset(ep.out, row.b, o, row.y, row.x)] = from_float<T>(v);
  }
}

// minBlocksPerSM 2: with the thread count alone, ptxas for sm_80 squeezes the fp16
// pointwise and conv3x3 instances into 48 registers and spills; this hint lets them take
// the registers they need (at most 128 each, two 20 KB blocks per SM on every arch).
template <class T, class Producer>
__global__ void __launch_bounds__(kThreads, 2)
    tile_gemm_kernel(Producer producer, Matrix weight, Epilogue ep, Shape shape, int64_t first_tile,
                     int channel_tiles_x) {
  if constexpr (arch_supports<T>())
    tile_gemm_body<T>(producer, weight, ep, shape, first_tile, channel_tiles_x);
}

// Launch the GEMM of `producer` for the output pixels and channels of `shape`.
template <class T, class Producer>
void run(const Producer& producer, const Matrix& weight, const Epilogue& ep, const Shape& shape,
         Stream stream) {
  const int64_t pixels = int64_t(shape.batch) * shape.out_height * shape.out_width;
  if (pixels == 0 || shape.cout == 0) return;
  // All channel tiles of a pixel tile side by side on axis x (on a GPU always: kMaxChannels
  // gives at most 65535 of them); only where axis x takes fewer (the emulator's test limit)
  // they are split into groups on axis y.
  static_assert(kMaxChannels <= kMaxGridYZ * kBlockN, "Cout / kBlockN tiles fit grid axis y");
  const int64_t channel_tiles = ceil_div(shape.cout, kBlockN);
  const int64_t groups = ceil_div(channel_tiles, kMaxGridX);
  const int64_t channel_tiles_x = ceil_div(channel_tiles, groups);
  launch_chunks(ceil_div(pixels, kBlockM), channel_tiles_x, [&](int64_t first_tile, int64_t tiles) {
    launch(&tile_gemm_kernel<T, Producer>, grid_of(tiles * channel_tiles_x, groups),
           dim3(kThreads), stream, producer, weight, ep, shape, first_tile, int(channel_tiles_x));
  });
}

// The plain producer: A = cat(norm(x), x2) channels of one pixel (pointwise_conv and the
// 1x1 layers of the other ops). norm: LayerNorm over the C1 channels of the pixel (statistics
// computed in prepare), or GroupNorm(1) with per-sample statistics from group_norm_stats.
template <class T>
struct PointwiseProducer {
  Map x, x2;
  int c1 = 0;
  Norm norm = Norm::none;
  const T* norm_weight = nullptr;
  const T* norm_bias = nullptr;
  float eps = 1e-5f;
  const float* group_stats = nullptr;
  bool channels_contiguous = false;

  MVIT3_DEVICE void init_row(Row& row) const {
    row.offset = map_offset(x, row.b, 0, row.y, row.x);
    if (x2.data) row.offset2 = map_offset(x2, row.b, 0, row.y, row.x);
  }

  // LayerNorm statistics of each pixel: 4 neighbouring lanes per pixel, two passes (mean,
  // then centred squares) so the variance does not cancel.
  MVIT3_DEVICE void prepare(Row* rows) const {
    if (norm != Norm::layer) return;
    static_assert(kThreads == 4 * kBlockM, "4 threads per pixel");
    const T* src = static_cast<const T*>(x.data);
    Row& row = rows[threadIdx.x / 4];
    const int part = threadIdx.x % 4;
    const bool valid = row.b >= 0;
    float sum = 0.0f;
    if (valid)
      for (int c = part; c < c1; c += 4) sum += to_float(src[row.offset + c * x.stride_c]);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float mean = sum / float(c1);
    float squares = 0.0f;
    if (valid)
      for (int c = part; c < c1; c += 4) {
        const float d = to_float(src[row.offset + c * x.stride_c]) - mean;
        squares += d * d;
      }
    squares += __shfl_xor_sync(0xffffffffu, squares, 1);
    squares += __shfl_xor_sync(0xffffffffu, squares, 2);
    if (part == 0) {
      row.mean = mean;
      row.rstd = rsqrtf(squares / float(c1) + eps);
    }
    __syncthreads();
  }

  MVIT3_DEVICE float a(const Row& row, int k) const {
    if (k >= c1) return to_float(static_cast<const T*>(x2.data)[row.offset2 + (k - c1) * x2.stride_c]);
    float v = to_float(static_cast<const T*>(x.data)[row.offset + k * x.stride_c]);
    if (norm == Norm::none) return v;
    if (norm == Norm::layer) {
      v = (v - row.mean) * row.rstd;
    } else {
      const float* stats = group_stats + 2 * int64_t(row.b);  // [B, 2]
      v = (v - stats[0]) * stats[1];
    }
    if (norm_weight) v *= to_float(norm_weight[k]);
    if (norm_bias) v += to_float(norm_bias[k]);
    return v;
  }
};

// Host helper: the PointwiseProducer of a map (stats must already be computed for "group").
template <class T>
PointwiseProducer<T> pointwise_producer(const Map& x, int c1, const Map& x2, Norm norm,
                                        const void* norm_weight, const void* norm_bias, float eps,
                                        const float* group_stats) {
  PointwiseProducer<T> p;
  p.x = x;
  p.x2 = x2;
  p.c1 = c1;
  p.norm = norm;
  p.norm_weight = static_cast<const T*>(norm_weight);
  p.norm_bias = static_cast<const T*>(norm_bias);
  p.eps = eps;
  p.group_stats = group_stats;
  p.channels_contiguous = x.stride_c == 1;
  return p;
}

}  // namespace mvit3::gemm
