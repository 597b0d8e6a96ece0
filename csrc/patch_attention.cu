// patch_attention: multi-head attention over the 2x2 patches of a map (v1-style MobileViT
// blocks), then optionally the MHSA out_proj and the residual. Semantics:
// mvit3.ops.reference.patch_attention.
//
// qkv [B, 3d, H, W] holds [q | k | v] channels, head h owning channels h*hd .. h*hd + hd - 1 of
// each third. Pixel (y, x) is token n = (y/2) * (W/2) + x/2 of sequence (b, p = 2*(y%2) + x%2),
// so Q, K and V are read straight from the map (through its strides) and the heads are written
// straight back to a map: there is no unfold or fold copy.
//
// One block = one (sequence, head, tile of 64 queries), 4 warps of 16 query rows. The keys are
// walked in tiles twice: pass 0 takes the row maxima and softmax denominators (online), pass 1
// accumulates exp(s - max) @ V; the output is divided by the denominator once at the end. Two
// passes cost one extra Q K^T (N <= 1024 keeps it small) but let the fp16/bf16 path keep its
// output accumulators in WMMA fragments, whose element layout is opaque, without rescaling.
// Scores use exp2 with log2(e) folded into the query scale. Statistics are fp32.
//   fp32:      SIMT FMAs, 32-key tiles (one key per lane for Q K^T, V columns per lane).
//   fp16/bf16: WMMA 16x16x16, 64-key tiles; probabilities are rounded to the I/O type.
// With proj_weight, the heads go to a workspace map and the projection (+ bias + residual) is
// the pointwise_conv GEMM.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

constexpr int kQueries = 64;  // per block
constexpr int kWarps = 4;     // of 16 query rows each
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;

struct AttentionArgs {
  Map qkv, residual, out;
  int height, width, heads, head_dim;
  float q_scale;     // scale * log2(e)
  int first_sample;  // the sample of block x = 0 (a launch covers a chunk of the batch)
};

// fp32: lane j of a warp computes the scores of key j for the warp's 16 rows; for P @ V, lane
// c owns output columns c and c + 32 of the 16 rows.
template <int kHeadDim>
struct SimtAttention {
  using Operand = float;
  static constexpr int kKeys = 32;
  static constexpr int kLdQ = kHeadDim;      // read as warp broadcasts
  static constexpr int kLdK = kHeadDim + 1;  // lane j reads row j: conflict-free
  static constexpr int kLdV = kHeadDim;
  static constexpr int kLdS = kKeys + 1;
  static constexpr int kColumns = (kHeadDim + 31) / 32;  // output columns per lane

  struct Query {};  // read from shared memory directly
  struct Acc {
    float o[kColumns][16];
  };

  static MVIT3_DEVICE void load_query(Query&, const float*) {}

  static MVIT3_DEVICE void zero(Acc& acc) {
    for (int c = 0; c < kColumns; ++c)
      for (int r = 0; r < 16; ++r) acc.o[c][r] = 0.0f;
  }

  static MVIT3_DEVICE void scores(const Query&, const float* q_warp, const float* k_tile,
                                  float* s_warp) {
    const int j = threadIdx.x % 32;
    float s[16] = {};
    for (int c = 0; c < kHeadDim; ++c) {
      const float k = k_tile[j * kLdK + c];
      MVIT3_UNROLL
      for (int r = 0; r < 16; ++r) s[r] = fmaf(q_warp[r * kLdQ + c], k, s[r]);
    }
    MVIT3_UNROLL
    for (int r = 0; r < 16; ++r) s_warp[r * kLdS + j] = s[r];
  }

  static MVIT3_DEVICE void store_p(float* s_warp, int r, int j, float p) { s_warp[r * kLdS + j] = p; }

  static MVIT3_DEVICE void accumulate(const float* p_warp, const float* v_tile, Acc& acc) {
    const int lane = threadIdx.x % 32;
    for (int j = 0; j < kKeys; ++j) {
      MVIT3_UNROLL
      for (int cc = 0; cc < kColumns; ++cc) {
        const int c = lane + 32 * cc;
        if (c >= kHeadDim) continue;
        const float v = v_tile[j * kLdV + c];
        MVIT3_UNROLL
        for (int r = 0; r < 16; ++r) acc.o[cc][r] = fmaf(p_warp[r * kLdS + j], v, acc.o[cc][r]);
      }
    }
  }

  // emit(r, c, o) for the warp's 16 rows and its columns.
  template <class Emit>
  static MVIT3_DEVICE void finish(const Acc& acc, float*, Emit&& emit) {
    const int lane = threadIdx.x % 32;
    MVIT3_UNROLL
    for (int cc = 0; cc < kColumns; ++cc) {
      const int c = lane + 32 * cc;
      if (c >= kHeadDim) continue;
      for (int r = 0; r < 16; ++r) emit(r, c, acc.o[cc][r]);
    }
  }
};

// fp16/bf16: S = Q K^T and O += P V on WMMA tiles. The probabilities P are written over the
// warp's fp32 score rows as T values (row r of P starts where row r of S starts, so P's leading
// dimension is 2 * kLdS).
template <class T, int kHeadDim>
struct WmmaAttention {
  using Operand = T;
  static constexpr int kKeys = 64;
  static constexpr int kLdQ = kHeadDim + 8;  // rows of 16-byte multiples, skewed banks
  static constexpr int kLdK = kHeadDim + 8;
  static constexpr int kLdV = kHeadDim + 8;
  static constexpr int kLdS = kKeys + 4;
  static constexpr int kDimTiles = kHeadDim / 16;
  static_assert(kLdS >= kHeadDim, "finish() stages the output in the score rows");
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragKt = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using FragV = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

  struct Query {
    FragA q[kDimTiles];
  };
  struct Acc {
    FragC o[kDimTiles];
  };

  static MVIT3_DEVICE void load_query(Query& query, const T* q_warp) {
    MVIT3_UNROLL
    for (int t = 0; t < kDimTiles; ++t)
      nvcuda::wmma::load_matrix_sync(query.q[t], q_warp + 16 * t, kLdQ);
  }

  static MVIT3_DEVICE void zero(Acc& acc) {
    MVIT3_UNROLL
    for (int t = 0; t < kDimTiles; ++t) nvcuda::wmma::fill_fragment(acc.o[t], 0.0f);
  }

  static MVIT3_DEVICE void scores(const Query& query, const T*, const T* k_tile, float* s_warp) {
    MVIT3_UNROLL
    for (int n = 0; n < kKeys / 16; ++n) {
      FragC s;
      nvcuda::wmma::fill_fragment(s, 0.0f);
      MVIT3_UNROLL
      for (int t = 0; t < kDimTiles; ++t) {
        FragKt kt;  // K^T: element (c, j) = k_tile[j * kLdK + c]
        nvcuda::wmma::load_matrix_sync(kt, k_tile + 16 * n * kLdK + 16 * t, kLdK);
        nvcuda::wmma::mma_sync(s, query.q[t], kt, s);
      }
      nvcuda::wmma::store_matrix_sync(s_warp + 16 * n, s, kLdS, nvcuda::wmma::mem_row_major);
    }
  }

  static MVIT3_DEVICE void store_p(float* s_warp, int r, int j, float p) {
    reinterpret_cast<T*>(s_warp)[r * 2 * kLdS + j] = from_float<T>(p);
  }

  static MVIT3_DEVICE void accumulate(const float* p_warp, const T* v_tile, Acc& acc) {
    const T* p = reinterpret_cast<const T*>(p_warp);
    MVIT3_UNROLL
    for (int j = 0; j < kKeys / 16; ++j) {
      FragA pa;
      nvcuda::wmma::load_matrix_sync(pa, p + 16 * j, 2 * kLdS);
      MVIT3_UNROLL
      for (int t = 0; t < kDimTiles; ++t) {
        FragV v;
        nvcuda::wmma::load_matrix_sync(v, v_tile + 16 * j * kLdV + 16 * t, kLdV);
        nvcuda::wmma::mma_sync(acc.o[t], pa, v, acc.o[t]);
      }
    }
  }

  template <class Emit>
  static MVIT3_DEVICE void finish(const Acc& acc, float* s_warp, Emit&& emit) {
    __syncwarp();  // the last P tile has been consumed
    MVIT3_UNROLL
    for (int t = 0; t < kDimTiles; ++t)
      nvcuda::wmma::store_matrix_sync(s_warp + 16 * t, acc.o[t], kLdS, nvcuda::wmma::mem_row_major);
    __syncwarp();
    for (int e = threadIdx.x % 32; e < 16 * kHeadDim; e += 32) {
      const int r = e / kHeadDim, c = e % kHeadDim;
      emit(r, c, s_warp[r * kLdS + c]);
    }
  }
};

template <class T, int kHeadDim>
MVIT3_DEVICE void attention_body(const AttentionArgs& args) {
  using Math = std::conditional_t<std::is_same_v<T, float>, SimtAttention<kHeadDim>,
                                  WmmaAttention<T, kHeadDim>>;
  using Operand = typename Math::Operand;
  constexpr int kKeys = Math::kKeys, kLdQ = Math::kLdQ, kLdK = Math::kLdK, kLdV = Math::kLdV,
                kLdS = Math::kLdS;
  constexpr int kOperandBytes = (kQueries * kLdQ + kKeys * (kLdK + kLdV)) * int(sizeof(Operand));
  static_assert(kOperandBytes % 32 == 0, "score rows must stay 32-byte aligned");
  constexpr int kBytes = kOperandBytes + (kQueries * kLdS + kQueries) * int(sizeof(float));
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
  MVIT3_SHARED_ALIGNED(unsigned char[kBytes], smem, 32);
  Operand* q_tile = reinterpret_cast<Operand*>(smem);  // [kQueries][kLdQ], scaled queries
  Operand* k_tile = q_tile + kQueries * kLdQ;          // [kKeys][kLdK]
  Operand* v_tile = k_tile + kKeys * kLdK;             // [kKeys][kLdV]
  float* s_tile = reinterpret_cast<float*>(smem + kOperandBytes);  // [kQueries][kLdS]
  float* row_scale = s_tile + kQueries * kLdS;                     // [kQueries]: 1 / denominator

  const T* qkv = static_cast<const T*>(args.qkv.data);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int half_width = args.width / 2;
  const int tokens = (args.height / 2) * half_width;
  const int query_tiles = (tokens + kQueries - 1) / kQueries;
  const int sequence = blockIdx.x / query_tiles;
  const int q0 = (blockIdx.x % query_tiles) * kQueries;
  const int b = args.first_sample + sequence / 4, pos = sequence % 4;
  const int head = blockIdx.y;
  const int dim = args.heads * args.head_dim;

  // Token n of this sequence is pixel (y, x): the patch grid cell times 2 plus the position.
  auto pixel_y = [&](int n) { return (n / half_width) * 2 + pos / 2; };
  auto pixel_x = [&](int n) { return (n % half_width) * 2 + pos % 2; };
  // rows x kHeadDim values of one third of qkv (0: q, 1: k, 2: v) for tokens first.., zero
  // padded past the sequence and the head dim.
  auto stage = [&](Operand* tile, int ld, int rows, int first, int third, float scale) {
    for (int e = tid; e < rows * kHeadDim; e += kThreads) {
      const int r = e / kHeadDim, c = e % kHeadDim, n = first + r;
      float v = 0.0f;
      if (n < tokens && c < args.head_dim)
        v = to_float(qkv[map_offset(args.qkv, b, third * dim + head * args.head_dim + c,
                                    pixel_y(n), pixel_x(n))]) * scale;
      tile[r * ld + c] = from_float<Operand>(v);
    }
  };

  stage(q_tile, kLdQ, kQueries, q0, 0, args.q_scale);
  __syncthreads();
  const Operand* q_warp = q_tile + 16 * warp * kLdQ;
  float* s_warp = s_tile + 16 * warp * kLdS;
  typename Math::Query query;
  Math::load_query(query, q_warp);
  typename Math::Acc acc;
  Math::zero(acc);

  // Softmax statistics of row lane / 2, kept by both lanes of the pair, which split the
  // row's keys: lane % 2 takes keys lane % 2, lane % 2 + 2, ...
  const int my_row = lane / 2, my_first = lane % 2;
  float row_max = -INFINITY, row_sum = 0.0f;
  for (int pass = 0; pass < 2; ++pass) {
    for (int kv0 = 0; kv0 < tokens; kv0 += kKeys) {
      __syncthreads();  // every warp is done with the previous K/V tile
      stage(k_tile, kLdK, kKeys, kv0, 1, 1.0f);
      if (pass == 1) stage(v_tile, kLdV, kKeys, kv0, 2, 1.0f);
      __syncthreads();
      Math::scores(query, q_warp, k_tile, s_warp);
      __syncwarp();
      float s[kKeys / 2];
      MVIT3_UNROLL
      for (int i = 0; i < kKeys / 2; ++i) {
        const int j = my_first + 2 * i;
        s[i] = kv0 + j < tokens ? s_warp[my_row * kLdS + j] : -INFINITY;
      }
      if (pass == 0) {
        float tile_max = -INFINITY;
        MVIT3_UNROLL
        for (int i = 0; i < kKeys / 2; ++i) tile_max = fmaxf(tile_max, s[i]);
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float new_max = fmaxf(row_max, tile_max);  // finite: key kv0 is valid
        float tile_sum = 0.0f;
        MVIT3_UNROLL
        for (int i = 0; i < kKeys / 2; ++i) tile_sum += exp2f(s[i] - new_max);
        tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
        row_sum = row_sum * exp2f(row_max - new_max) + tile_sum;
        row_max = new_max;
      } else {
        __syncwarp();  // all scores are read before probabilities overwrite them
        MVIT3_UNROLL
        for (int i = 0; i < kKeys / 2; ++i)
          Math::store_p(s_warp, my_row, my_first + 2 * i, exp2f(s[i] - row_max));
        __syncwarp();
        Math::accumulate(s_warp, v_tile, acc);
      }
    }
  }

  if (my_first == 0) row_scale[16 * warp + my_row] = 1.0f / row_sum;
  __syncwarp();
  const T* residual = static_cast<const T*>(args.residual.data);
  T* out = static_cast<T*>(args.out.data);
  Math::finish(acc, s_warp, [&](int r, int c, float o) {
    const int n = q0 + 16 * warp + r;
    if (n >= tokens || c >= args.head_dim) return;
    const int y = pixel_y(n), x = pixel_x(n), channel = head * args.head_dim + c;
    float v = o * row_scale[16 * warp + r];
    if (residual) v += to_float(residual[map_offset(args.residual, b, channel, y, x)]);
    out[map_offset(args.out, b, channel, y, x)] = from_float<T>(v);
  });
}

// The minimum of 2 resident blocks lifts ptxas' default register cap, under which the bf16
// kernel for sm_90 spilled; shared memory bounds the residency to a few blocks anyway.
template <class T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2) patch_attention_kernel(AttentionArgs args) {
  if constexpr (arch_supports<T>()) attention_body<T, kHeadDim>(args);
}

}  // namespace

void patch_attention(const PatchAttentionArgs& args, DType dtype, Stream stream) {
  const int tokens = (args.height / 2) * (args.width / 2);
  if (args.batch == 0 || tokens == 0) return;
  const bool project = args.proj_weight.data != nullptr;
  AttentionArgs attention;
  attention.qkv = args.qkv;
  attention.residual = project ? Map{} : args.residual;  // the projection adds it instead
  attention.out = project ? args.heads_out : args.out;
  attention.height = args.height;
  attention.width = args.width;
  attention.heads = args.heads;
  attention.head_dim = args.head_dim;
  attention.q_scale = args.scale * kLog2e;
  // Grid: x = (sample, position, query tile) of the chunk's samples, y = head (<= 65535: ops.cpp).
  const int64_t blocks_per_sample = 4 * ceil_div(tokens, kQueries);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(args.head_dim, [&](auto head_dim) {
      launch_chunks(args.batch, blocks_per_sample, [&](int64_t first, int64_t samples) {
        attention.first_sample = int(first);
        launch(&patch_attention_kernel<T, decltype(head_dim)::value>,
               grid_of(samples * blocks_per_sample, args.heads), dim3(kThreads), stream, attention);
      });
    });
  });
  if (!project) return;
  const int dim = args.heads * args.head_dim;
  PointwiseConvArgs proj;
  proj.x = args.heads_out;
  proj.residual = args.residual;
  proj.out = args.out;
  proj.batch = args.batch;
  proj.height = args.height;
  proj.width = args.width;
  proj.c1 = dim;
  proj.cout = dim;
  proj.weight = args.proj_weight;
  proj.bias = args.proj_bias;
  pointwise_conv(proj, dtype, stream);
}

}  // namespace mvit3
