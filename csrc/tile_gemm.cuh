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
// and optionally (HasChunks), for A staged 16 bytes of T at a time:
//   bool chunked                        whether a_chunk may be used for this call
//   void a_chunk(const Row&, int k, float (&v)[16 / sizeof(T)])
//                                       A[pixel, k + i] in fp32 from one 16-byte load
// and optionally (SegmentedWeight), for a weight whose K is segments (Matrix::col_segment):
//   using SegmentedWeightTag = void
#pragma once

#include "device.cuh"

namespace mvit3::gemm {

constexpr int kBlockM = 64, kBlockN = 64, kThreads = 256;

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

// Operand tiles, two stages of each (the copies of step k + 1 overlap the math of step k).
// fp32 stages fp32 operands and walks K in steps of 16 (SIMT); fp16/bf16 stage the I/O type and
// walk K in steps of 32 (two WMMA k-steps). Every row is padded by 16 bytes, which keeps rows
// 16-byte aligned (cp.async, vector loads, WMMA) and spreads them over the banks.
// A is [kBlockM][kLdA]; B is [kBlockN][kLdA] (k-fastest, for weights whose K is unit-stride) or
// [kBlockK][kLdBn] (n-fastest, for the fast models' K-major weights, Cout unit-stride).
template <class T>
struct Tiles {
  static constexpr bool kTensorCores = !std::is_same_v<T, float>;
  using Operand = T;
  static constexpr int kChunk = 16 / int(sizeof(T));  // elements in 16 bytes
  static constexpr int kBlockK = kTensorCores ? 32 : 16;
  static constexpr int kLdA = kBlockK + kChunk;
  static constexpr int kLdBn = kBlockN + kChunk;
  static constexpr int kLdC = kBlockN + 4;
  static constexpr int kAElems = kBlockM * kLdA;
  static constexpr int kBElems = std::max(kBlockN * kLdA, kBlockK * kLdBn);
  static constexpr int kStageElems = kAElems + kBElems;
  static constexpr int kStages = 2;
  static constexpr int kOperandBytes = kStages * kStageElems * int(sizeof(T));
  static constexpr int kResultBytes = kBlockM * kLdC * int(sizeof(float));
  static constexpr int kBytes = std::max(kOperandBytes, kResultBytes);
  static_assert((kAElems * int(sizeof(T))) % 32 == 0 && (kStageElems * int(sizeof(T))) % 32 == 0,
                "every A and B tile stays 32-byte aligned (WMMA)");
  static_assert(kBlockN * kBlockK == kThreads * kChunk, "one 16-byte chunk of B per thread");
};

// fp32: thread (ty, tx) of a 16x16 grid owns rows ty + 16i and columns tx + 16j, i, j < 4.
// A rows are read 4 k at a time (128-bit, a broadcast per half-warp); B likewise from a
// k-fastest tile (kLdA = 20: the 8 lanes of each 128-bit phase hit distinct banks), one k at a
// time from an n-fastest one (16 consecutive words). The FMAs run in k order, as before.
struct SimtMath {
  using Tile = Tiles<float>;
  float acc[4][4] = {};

  MVIT3_DEVICE void step(const float* a_tile, const float* b_tile, bool b_n_fastest) {
    if (b_n_fastest)
      step<true>(a_tile, b_tile);
    else
      step<false>(a_tile, b_tile);
  }

  template <bool kBNFastest>
  MVIT3_DEVICE void step(const float* a_tile, const float* b_tile) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    MVIT3_UNROLL
    for (int k = 0; k < Tile::kBlockK; k += 4) {
      float4 a[4], b[4];
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i)
        a[i] = *reinterpret_cast<const float4*>(a_tile + (ty + 16 * i) * Tile::kLdA + k);
      MVIT3_UNROLL
      for (int j = 0; j < 4; ++j) {
        if constexpr (kBNFastest) {
          const float* column = b_tile + k * Tile::kLdBn + tx + 16 * j;
          b[j] = float4{column[0], column[Tile::kLdBn], column[2 * Tile::kLdBn],
                        column[3 * Tile::kLdBn]};
        } else {
          b[j] = *reinterpret_cast<const float4*>(b_tile + (tx + 16 * j) * Tile::kLdA + k);
        }
      }
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i)
        MVIT3_UNROLL
        for (int j = 0; j < 4; ++j) {
          acc[i][j] = fmaf(a[i].x, b[j].x, acc[i][j]);
          acc[i][j] = fmaf(a[i].y, b[j].y, acc[i][j]);
          acc[i][j] = fmaf(a[i].z, b[j].z, acc[i][j]);
          acc[i][j] = fmaf(a[i].w, b[j].w, acc[i][j]);
        }
    }
  }

  MVIT3_DEVICE void store(float* c_tile) const {
    constexpr int kLd = Tile::kLdC;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    MVIT3_UNROLL
    for (int i = 0; i < 4; ++i)
      MVIT3_UNROLL
      for (int j = 0; j < 4; ++j) c_tile[(ty + 16 * i) * kLd + tx + 16 * j] = acc[i][j];
  }
};

// fp16/bf16: warp w owns rows 16 * (w % 4) and columns 32 * (w / 4) (+0, +16). The A tile is
// [M][K] row-major; a k-fastest B tile [N][K] is W^T column-major, an n-fastest one [K][N] is
// W^T row-major.
template <class T>
struct WmmaMath {
  using Tile = Tiles<T>;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragBk = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using FragBn = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static_assert(kThreads == 256 && kBlockM == 64 && kBlockN == 64, "8 warps of 16x32");
  FragC acc[2];

  MVIT3_DEVICE WmmaMath() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }

  MVIT3_DEVICE void step(const T* a_tile, const T* b_tile, bool b_n_fastest) {
    const int warp = threadIdx.x / 32;
    const int row0 = 16 * (warp % 4), col0 = 32 * (warp / 4);
    MVIT3_UNROLL
    for (int k = 0; k < Tile::kBlockK; k += 16) {
      FragA a;
      nvcuda::wmma::load_matrix_sync(a, a_tile + row0 * Tile::kLdA + k, Tile::kLdA);
      MVIT3_UNROLL
      for (int j = 0; j < 2; ++j) {
        const int col = col0 + 16 * j;
        if (b_n_fastest) {
          FragBn b;
          nvcuda::wmma::load_matrix_sync(b, b_tile + k * Tile::kLdBn + col, Tile::kLdBn);
          nvcuda::wmma::mma_sync(acc[j], a, b, acc[j]);
        } else {
          FragBk b;
          nvcuda::wmma::load_matrix_sync(b, b_tile + col * Tile::kLdA + k, Tile::kLdA);
          nvcuda::wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
    }
  }

  MVIT3_DEVICE void store(float* c_tile) const {
    constexpr int kLd = Tile::kLdC;
    const int warp = threadIdx.x / 32;
    const int row0 = 16 * (warp % 4), col0 = 32 * (warp / 4);
    MVIT3_UNROLL
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(c_tile + row0 * kLd + col0 + 16 * j, acc[j], kLd,
                                      nvcuda::wmma::mem_row_major);
  }
};

// One 16-byte chunk global -> shared, in two halves around the math of the current stage:
// fetch issues it, land makes it the thread's (a __syncthreads then makes it the block's).
// sm_80+ (and the emulator, which models it): cp.async, the bytes past src_bytes zero-filled.
// sm_75: a 16-byte load into registers, stored to shared memory by land.
#if defined(MVIT3_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
struct ChunkCopy {
  MVIT3_DEVICE void fetch(void* shared_dst, const void* global_src, int src_bytes) {
    cp_async<16>(shared_dst, global_src, src_bytes);
    cp_async_commit();
  }
  MVIT3_DEVICE void land() { cp_async_wait<0>(); }
};
#else
struct ChunkCopy {
  uint4 data;
  uint4* dst;

  MVIT3_DEVICE void fetch(void* shared_dst, const void* global_src, int src_bytes) {
    dst = static_cast<uint4*>(shared_dst);
    if (src_bytes == 16) {
      data = *static_cast<const uint4*>(global_src);
      return;
    }
    // A chunk cut by the end of a row: 16-bit reads of the src_bytes (a multiple of 2), zeros after.
    const unsigned short* half = static_cast<const unsigned short*>(global_src);
    uint32_t words[4];
    MVIT3_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t low = 4 * i < src_bytes ? half[2 * i] : 0u;
      const uint32_t high = 4 * i + 2 < src_bytes ? half[2 * i + 1] : 0u;
      words[i] = low | high << 16;
    }
    data = uint4{words[0], words[1], words[2], words[3]};
  }
  MVIT3_DEVICE void land() const { *dst = data; }
};
#endif

// Whether a Producer provides chunked and a_chunk.
template <class Producer, class = void>
struct HasChunks : std::false_type {};
template <class Producer>
struct HasChunks<Producer, std::void_t<decltype(std::declval<const Producer&>().chunked)>>
    : std::true_type {};

// Whether a Producer's weight may have K in segments (Matrix::col_segment; only then does the
// weight staging carry the segment arithmetic).
template <class Producer, class = void>
struct SegmentedWeight : std::false_type {};
template <class Producer>
struct SegmentedWeight<Producer, std::void_t<typename Producer::SegmentedWeightTag>>
    : std::true_type {};

// Whether a map's pixels are rows of unit-stride channels whose 16-byte chunks are aligned.
template <class T>
__host__ __device__ inline bool chunked_rows(const Map& m) {
  constexpr int64_t kBytes = sizeof(T);
  return m.stride_c == 1 && reinterpret_cast<uintptr_t>(m.data) % 16 == 0 &&
         (m.stride_b * kBytes) % 16 == 0 && (m.stride_h * kBytes) % 16 == 0 &&
         (m.stride_w * kBytes) % 16 == 0;
}

// 16 bytes of T (16-byte aligned) to or from registers: load_chunk (device.cuh) and store_chunk.
using ::mvit3::load_chunk;
// N fp32 values from 16-byte aligned (shared) memory, 4 a load.
template <int N>
MVIT3_DEVICE void load_floats(float (&v)[N], const float* src) {
  static_assert(N % 4 == 0, "whole float4s");
  MVIT3_UNROLL
  for (int i = 0; i < N; i += 4) {
    const float4 s = *reinterpret_cast<const float4*>(src + i);
    v[i] = s.x, v[i + 1] = s.y, v[i + 2] = s.z, v[i + 3] = s.w;
  }
}
template <class T>
MVIT3_DEVICE void store_chunk(T* dst, const float (&v)[16 / sizeof(T)]) {
  T values[16 / sizeof(T)];
  MVIT3_UNROLL
  for (int i = 0; i < int(16 / sizeof(T)); ++i) values[i] = from_float<T>(v[i]);
  uint4 bits;
  memcpy(&bits, &values, 16);
  *reinterpret_cast<uint4*>(dst) = bits;
}

// The B operand of a block's channel tile n0: W [Cout, K] read through its strides, staged per K
// step along its unit-stride dimension: k-fastest b[n * kLdA + k] unless only Cout is
// unit-stride (n-fastest b[k * kLdBn + n]). One 16-byte chunk a thread (ChunkCopy: `fetch`
// before the math of the current stage, `land` after it) where that dimension, the base pointer
// and the other stride allow (`chunked`), else element by element (`stage_elements`), which
// with kSegmented reads a weight whose K is segments (Matrix::col_segment > 0).
template <class T, bool kSegmented = false>
struct WeightStager {
  using Tile = Tiles<T>;
  const T* weight;
  int64_t stride_row, stride_col, line_stride, col_segment, segment_stride;
  int n0, cout, k;
  bool n_fastest, chunked;
  int line, first, chunk_offset;  // this thread's chunk: `first` ... of line `line` of the tile
  ChunkCopy copy;

  MVIT3_DEVICE WeightStager(const Matrix& w, int n0_, int cout_, int k_)
      : weight(static_cast<const T*>(w.data)), stride_row(w.stride_row), stride_col(w.stride_col),
        col_segment(w.col_segment), segment_stride(w.segment_stride), n0(n0_), cout(cout_), k(k_) {
    n_fastest = stride_row == 1 && stride_col != 1;
    line_stride = n_fastest ? stride_col : stride_row;
    chunked = (!kSegmented || col_segment == 0) && (n_fastest || stride_col == 1) &&
              reinterpret_cast<uintptr_t>(weight) % 16 == 0 &&
              (line_stride * int64_t(sizeof(T))) % 16 == 0;
    const int chunks_per_line = (n_fastest ? kBlockN : Tile::kBlockK) / Tile::kChunk;
    line = int(threadIdx.x) / chunks_per_line;
    first = int(threadIdx.x) % chunks_per_line * Tile::kChunk;
    chunk_offset = n_fastest ? line * Tile::kLdBn + first : line * Tile::kLdA + first;
  }

  MVIT3_DEVICE void fetch(int k0, T* tile) {
    const int line_index = (n_fastest ? k0 : n0) + line;
    const int first_index = (n_fastest ? n0 : k0) + first;
    const int lines = n_fastest ? k : cout;
    const int line_length = n_fastest ? cout : k;
    const int left = line_index < lines ? line_length - first_index : 0;
    const int elements = left < 0 ? 0 : left < Tile::kChunk ? left : Tile::kChunk;
    const T* src = elements > 0 ? weight + line_index * line_stride + first_index : weight;
    copy.fetch(tile + chunk_offset, src, elements * int(sizeof(T)));
  }

  MVIT3_DEVICE void land() { copy.land(); }

  MVIT3_DEVICE void stage_elements(int k0, T* tile) const {
    constexpr int kBlockK = Tile::kBlockK;
    const bool k_contiguous = stride_col == 1;
    for (int e = threadIdx.x; e < kBlockN * kBlockK; e += kThreads) {
      const int n = k_contiguous ? e / kBlockK : e % kBlockN;
      const int kk = k_contiguous ? e % kBlockK : e / kBlockN;
      const int o = n0 + n, kg = k0 + kk;
      const int64_t k_offset = kSegmented && col_segment > 0
                                   ? kg % col_segment * stride_col + kg / col_segment * segment_stride
                                   : kg * stride_col;
      tile[n_fastest ? kk * Tile::kLdBn + n : n * Tile::kLdA + kk] =
          (o < cout && kg < k) ? weight[o * stride_row + k_offset] : from_float<T>(0.0f);
    }
  }
};

// The epilogue of a block's [kBlockM, kBlockN] fp32 result c_tile (rows kLdC apart) for channel
// tile n0: act(+ bias_tile) + residual, written channel-fastest, which is coalesced for the
// channels_last outputs. With Cout a multiple of kChunk and channel-fastest 16-byte aligned rows
// (the outputs ops.cpp allocates, a channels_last residual), each thread takes kChunk channels of
// a pixel: one offset, 16-byte loads and stores; element by element otherwise.
// pixel_of(r, b, y, x) gives row r's output pixel, or false for a row past the map.
template <class T, class PixelOf>
MVIT3_DEVICE void store_tile(const float* c_tile, const float* bias_tile, const Epilogue& ep,
                             int n0, int cout, PixelOf pixel_of) {
  constexpr int kChunk = Tiles<T>::kChunk, kLdC = Tiles<T>::kLdC;
  const int tid = threadIdx.x;
  const T* residual = static_cast<const T*>(ep.residual.data);
  T* out = static_cast<T*>(ep.out.data);
  if (cout % kChunk == 0 && chunked_rows<T>(ep.out) && (!residual || chunked_rows<T>(ep.residual))) {
    constexpr int kChunksPerRow = kBlockN / kChunk;
    for (int e = tid; e < kBlockM * kChunksPerRow; e += kThreads) {
      const int r = e / kChunksPerRow, n = e % kChunksPerRow * kChunk;
      const int o = n0 + n;
      int b, y, x;
      if (!pixel_of(r, b, y, x) || o >= cout) continue;
      float v[kChunk];
      load_floats(v, c_tile + r * kLdC + n);
      MVIT3_UNROLL
      for (int i = 0; i < kChunk; ++i) v[i] = apply_act(v[i] + bias_tile[n + i], ep.act);
      if (residual) {
        T res[kChunk];
        load_chunk(res, residual + map_offset(ep.residual, b, o, y, x));
        MVIT3_UNROLL
        for (int i = 0; i < kChunk; ++i) v[i] += to_float(res[i]);
      }
      store_chunk(out + map_offset(ep.out, b, o, y, x), v);
    }
    return;
  }
  for (int e = tid; e < kBlockM * kBlockN; e += kThreads) {
    const int r = e / kBlockN, n = e % kBlockN;
    const int o = n0 + n;
    int b, y, x;
    if (!pixel_of(r, b, y, x) || o >= cout) continue;
    float v = apply_act(c_tile[r * kLdC + n] + bias_tile[n], ep.act);
    if (residual) v += to_float(residual[map_offset(ep.residual, b, o, y, x)]);
    out[map_offset(ep.out, b, o, y, x)] = from_float<T>(v);
  }
}

// The grid: block x = tile * channel_tiles_x + i and block y = j compute pixel tile
// first_tile + tile and channel tile j * channel_tiles_x + i (none past the last: that block
// writes nothing). The channel tiles of a pixel tile are neighbours on axis x, so they run
// together and share its A operand (producer inputs, LayerNorm statistics) in L1/L2.
//
// Staging, per K step into the stage the math does not read: A by the producer (fp32 math,
// rounded to the operand type), element by element along its unit-stride dimension; B by
// WeightStager (16-byte chunks where W's layout allows). The epilogue is store_tile.
template <class T, class Producer>
MVIT3_DEVICE void tile_gemm_body(const Producer& producer, const Matrix& weight_matrix,
                                 const Epilogue& ep, const Shape& shape, int64_t first_tile,
                                 int channel_tiles_x) {
  using Tile = Tiles<T>;
  using Math = std::conditional_t<Tile::kTensorCores, WmmaMath<T>, SimtMath>;
  using Operand = typename Tile::Operand;
  constexpr int kBlockK = Tile::kBlockK, kLdA = Tile::kLdA, kChunk = Tile::kChunk;
  MVIT3_SHARED_ALIGNED(unsigned char[Tile::kBytes], tiles, 32);
  MVIT3_SHARED(Row[kBlockM], rows);
  MVIT3_SHARED(float[kBlockN], bias_tile);  // the block's bias values (0 without a bias)
  Operand* const stages = reinterpret_cast<Operand*>(tiles);  // per stage: A tile, then B tile
  float* c_tile = reinterpret_cast<float*>(tiles);             // [kBlockM][kLdC], after the K loop

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
  const T* bias = static_cast<const T*>(ep.bias);
  if (tid < kBlockN) bias_tile[tid] = bias && n0 + tid < shape.cout ? to_float(bias[n0 + tid]) : 0.0f;
  __syncthreads();
  producer.prepare(rows);

  // A: by the producer, 16 bytes of T a thread (one chunk of a pixel's channels: the chunks
  // never straddle K) or element by element along A's unit-stride dimension.
  bool a_chunked = false;
  if constexpr (HasChunks<Producer>::value) a_chunked = producer.chunked && shape.k % kChunk == 0;
  auto stage_a = [&](int k0, Operand* a_tile) {
    if constexpr (HasChunks<Producer>::value) {
      if (a_chunked) {
        constexpr int kChunksPerRow = kBlockK / kChunk;
        static_assert(kBlockM * kChunksPerRow == kThreads, "one chunk of A per thread");
        const int r = tid / kChunksPerRow, kk = tid % kChunksPerRow * kChunk;
        const Row& row = rows[r];
        const int k = k0 + kk;
        float v[kChunk];
        if (row.b >= 0 && k < shape.k) {
          producer.a_chunk(row, k, v);
        } else {
          MVIT3_UNROLL
          for (int i = 0; i < kChunk; ++i) v[i] = 0.0f;
        }
        store_chunk(a_tile + r * kLdA + kk, v);
        return;
      }
    }
    for (int e = tid; e < kBlockM * kBlockK; e += kThreads) {
      const int r = producer.channels_contiguous ? e / kBlockK : e % kBlockM;
      const int kk = producer.channels_contiguous ? e % kBlockK : e / kBlockM;
      const Row& row = rows[r];
      const int k = k0 + kk;
      const float v = (row.b >= 0 && k < shape.k) ? producer.a(row, k) : 0.0f;
      a_tile[r * kLdA + kk] = from_float<Operand>(v);
    }
  };

  WeightStager<T, SegmentedWeight<Producer>::value> weights(weight_matrix, n0, shape.cout, shape.k);
  auto a_tile_of = [&](int stage) { return stages + stage * Tile::kStageElems; };
  auto b_tile_of = [&](int stage) { return stages + stage * Tile::kStageElems + Tile::kAElems; };

  Math math;
  if (weights.chunked)
    weights.fetch(0, b_tile_of(0));
  else
    weights.stage_elements(0, b_tile_of(0));
  stage_a(0, a_tile_of(0));
  if (weights.chunked) weights.land();
  __syncthreads();
  for (int k0 = 0, stage = 0; k0 < shape.k; k0 += kBlockK, stage ^= 1) {
    const int next = k0 + kBlockK;
    const bool more = next < shape.k;
    if (more && weights.chunked) weights.fetch(next, b_tile_of(stage ^ 1));
    math.step(a_tile_of(stage), b_tile_of(stage), weights.n_fastest);
    if (more) {
      if (!weights.chunked) weights.stage_elements(next, b_tile_of(stage ^ 1));
      stage_a(next, a_tile_of(stage ^ 1));
      if (weights.chunked) weights.land();
    }
    __syncthreads();  // stage ^ 1 is complete; `stage` (or c_tile, which aliases) may be rewritten
  }
  math.store(c_tile);
  __syncthreads();

  store_tile<T>(c_tile, bias_tile, ep, n0, shape.cout, [&](int r, int& b, int& y, int& x) {
    const Row& row = rows[r];
    b = row.b, y = row.y, x = row.x;
    return row.b >= 0;
  });
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
  bool chunked = false;  // x (and x2) channels_last with aligned pixels, C1 whole chunks

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
    return normalise(row, k, to_float(static_cast<const T*>(x.data)[row.offset + k * x.stride_c]));
  }

  // Channels k .. k + 16 / sizeof(T) - 1, all of x or all of x2 (C1 is whole chunks).
  MVIT3_DEVICE void a_chunk(const Row& row, int k, float (&v)[16 / sizeof(T)]) const {
    constexpr int kChunk = 16 / sizeof(T);
    T raw[kChunk];
    if (k >= c1) {
      load_chunk(raw, static_cast<const T*>(x2.data) + row.offset2 + (k - c1));
      MVIT3_UNROLL
      for (int i = 0; i < kChunk; ++i) v[i] = to_float(raw[i]);
      return;
    }
    load_chunk(raw, static_cast<const T*>(x.data) + row.offset + k);
    MVIT3_UNROLL
    for (int i = 0; i < kChunk; ++i) v[i] = normalise(row, k + i, to_float(raw[i]));
  }

  // norm(x)[pixel, k] of v = x[pixel, k].
  MVIT3_DEVICE float normalise(const Row& row, int k, float v) const {
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
  p.chunked = chunked_rows<T>(x) && c1 % int(16 / sizeof(T)) == 0 && (!x2.data || chunked_rows<T>(x2));
  return p;
}

}  // namespace mvit3::gemm
