// patch_attention: multi-head attention over the 2x2 patches of a map (v1-style MobileViT
// blocks), then optionally the MHSA out_proj and the residual. Semantics:
// mvit3.ops.reference.patch_attention.
//
// qkv [B, 3d, H, W] holds [q | k | v] channels, head h owning channels h*hd .. h*hd + hd - 1 of
// each third. Pixel (y, x) is token n = (y/2) * (W/2) + x/2 of sequence (b, p = 2*(y%2) + x%2),
// so Q, K and V are read straight from the map (through its strides) and the heads are written
// straight back to a map: there is no unfold or fold copy.
//
// One block = one (sequence, head, tile of 16 kWarps queries), kWarps warps of 16 query rows;
// kWarps = 1, 2 or 4 by the sequence length, so that a 16-token sequence (an 8x8 map) runs one
// warp rather than a 64-query block with 48 idle rows. The keys are walked once, in tiles
// (FlashAttention-2): per query row a running maximum m and sum l of exp2(s - m), the output
// accumulators rescaled by exp2(m_old - m_new) when m grows, divided by l once at the end.
// Scores use exp2 with log2(e) folded into the query scale. Statistics are fp32.
//   fp32:      SIMT FMAs (IEEE), 32-key tiles (one key per lane for Q K^T, V columns per lane).
//   fp16/bf16: mma.sync m16n8k16 (fp32 accumulators), 16 kWarps keys a tile; S = Q K^T stays in
//              registers, its probabilities are rounded to the I/O type and become P @ V's A
//              operand in registers (no shared memory round trip).
// The pixel of each staged token is computed once per tile into a table in shared memory (one
// division by W/2 per row, not per element). With proj_weight, the heads go to a workspace map
// and the projection (+ bias + residual) is the pointwise_conv GEMM.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

struct AttentionArgs {
  Map qkv, residual, out;
  int height, width, heads, head_dim;
  float q_scale;     // scale * log2(e)
  int first_sample;  // the sample of block x = 0 (a launch covers a chunk of the batch)
};

// The pixel of a token of the block's sequence; y = -1 past the sequence.
struct Pixel {
  int y, x;
};

// fp32: lane j of a warp computes the scores of key j for the warp's 16 rows (into the warp's
// score rows in shared memory); lanes 2r and 2r + 1 then take the softmax statistics of row r
// (keys of their parity) and write its probabilities back over the scores; for P @ V, lane c
// owns output columns c and c + 32 of the 16 rows.
template <int kHeadDim>
struct SimtAttention {
  using Operand = float;
  static constexpr int kKeys = 32;
  static constexpr int kLdQ = kHeadDim;      // read as warp broadcasts
  static constexpr int kLdK = kHeadDim + 1;  // lane j reads row j: conflict-free
  static constexpr int kLdV = kHeadDim;
  static constexpr int kLdS = kKeys + 1;
  static constexpr int kColumns = (kHeadDim + 31) / 32;  // output columns per lane

  struct Scratch {  // per warp
    float s[16][kLdS];  // scores, then probabilities
    float row[16];      // per row: the rescale factor of the tile, at the end 1 / l
  };
  struct State {
    float o[kColumns][16];
    float max, sum;  // of row lane / 2, kept by both lanes of the pair
  };

  static MVIT3_DEVICE void init(State& st, const float*) {
    for (int c = 0; c < kColumns; ++c)
      for (int r = 0; r < 16; ++r) st.o[c][r] = 0.0f;
    st.max = -INFINITY;
    st.sum = 0.0f;
  }

  // One key tile of which the first `keys` are in the sequence (at least one).
  static MVIT3_DEVICE void step(State& st, const float* q_warp, const float* k_tile,
                                const float* v_tile, int keys, Scratch& scratch) {
    const int lane = threadIdx.x % 32;
    {
      float s[16] = {};
      for (int c = 0; c < kHeadDim; ++c) {
        const float k = k_tile[lane * kLdK + c];
        MVIT3_UNROLL
        for (int r = 0; r < 16; ++r) s[r] = fmaf(q_warp[r * kLdQ + c], k, s[r]);
      }
      MVIT3_UNROLL
      for (int r = 0; r < 16; ++r) scratch.s[r][lane] = s[r];
    }
    __syncwarp();
    const int row = lane / 2, first = lane % 2;
    float p[kKeys / 2];
    float tile_max = -INFINITY;
    MVIT3_UNROLL
    for (int i = 0; i < kKeys / 2; ++i) {
      const int j = first + 2 * i;
      p[i] = j < keys ? scratch.s[row][j] : -INFINITY;
      tile_max = fmaxf(tile_max, p[i]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float new_max = fmaxf(st.max, tile_max);  // finite: key 0 of the tile is valid
    const float rescale = exp2f(st.max - new_max);  // 0 on the first tile
    float tile_sum = 0.0f;
    MVIT3_UNROLL
    for (int i = 0; i < kKeys / 2; ++i) {
      p[i] = exp2f(p[i] - new_max);
      tile_sum += p[i];
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    st.sum = st.sum * rescale + tile_sum;
    st.max = new_max;
    __syncwarp();  // all scores are read before probabilities overwrite them
    MVIT3_UNROLL
    for (int i = 0; i < kKeys / 2; ++i) scratch.s[row][first + 2 * i] = p[i];
    if (first == 0) scratch.row[row] = rescale;
    __syncwarp();
    for (int r = 0; r < 16; ++r) {
      const float f = scratch.row[r];
      MVIT3_UNROLL
      for (int cc = 0; cc < kColumns; ++cc) st.o[cc][r] *= f;
    }
    for (int j = 0; j < kKeys; ++j) {
      MVIT3_UNROLL
      for (int cc = 0; cc < kColumns; ++cc) {
        const int c = lane + 32 * cc;
        if (c >= kHeadDim) continue;
        const float v = v_tile[j * kLdV + c];
        MVIT3_UNROLL
        for (int r = 0; r < 16; ++r) st.o[cc][r] = fmaf(scratch.s[r][j], v, st.o[cc][r]);
      }
    }
  }

  // emit(r, c, o) for the warp's 16 rows and its columns.
  template <class Emit>
  static MVIT3_DEVICE void finish(const State& st, Scratch& scratch, Emit&& emit) {
    const int lane = threadIdx.x % 32;
    __syncwarp();  // the last tile's factors are read
    if (lane % 2 == 0) scratch.row[lane / 2] = 1.0f / st.sum;
    __syncwarp();
    MVIT3_UNROLL
    for (int cc = 0; cc < kColumns; ++cc) {
      const int c = lane + 32 * cc;
      if (c >= kHeadDim) continue;
      for (int r = 0; r < 16; ++r) emit(r, c, st.o[cc][r] * scratch.row[r]);
    }
  }
};

// fp16/bf16 on mma.sync m16n8k16 (device.cuh has the fragment layouts; g = lane / 4,
// t = lane % 4). The warp's 16 query rows are A fragments for the whole loop, one per 16 head
// dims. Per key tile:
//   S = Q K^T: B = K^T, i.e. K rows (keys) as B's columns: ldmatrix without .trans of the
//     row-major K tile gives b (b[0] = K[key g][dims 2t, 2t+1]). S is kKeys / 8 n8 fragments:
//     s[n][i] is row g + 8 (i / 2), key 8 n + 2 t + i % 2.
//   P = exp2(S - m) in place, rounded to T: the C fragments of key tiles 2 k and 2 k + 1 are
//     exactly the A fragment of keys 16 k .. 16 k + 15 (a[0], a[1] from tile 2 k's c[0..1],
//     c[2..3]; a[2], a[3] from tile 2 k + 1's).
//   O += P V: B = V rows (keys) x dims, ldmatrix .trans of the row-major V tile.
// Each lane keeps m and its partial l of rows g and g + 8; the 4 lanes of a row (a quad) agree
// on m through two shuffles per tile and sum their l once at the end.
template <class T, int kHeadDim, int kWarps>
struct MmaAttention {
  using Operand = T;
  static constexpr int kKeys = 16 * kWarps;  // one 16-row slice of K and V staged a warp
  // Rows padded by 16 bytes: 16-byte aligned for ldmatrix, and the 8 rows of an ldmatrix phase
  // fall on distinct 16-byte bank groups for every head dim.
  static constexpr int kLdQ = kHeadDim + 8;
  static constexpr int kLdK = kHeadDim + 8;
  static constexpr int kLdV = kHeadDim + 8;
  static constexpr int kDimSlices = kHeadDim / 16;  // k16 slices of Q K^T, n16 pairs of P V
  static constexpr int kKeySlices = kKeys / 16;

  struct Scratch {};  // everything stays in registers
  struct State {
    uint32_t q[kDimSlices][4];
    float o[2 * kDimSlices][4];  // n8 fragments of head dims 8 d ..
    float max[2], sum[2];        // rows g and g + 8; sum: this lane's keys only
  };

  static MVIT3_DEVICE void init(State& st, const T* q_warp) {
    const int lane = threadIdx.x % 32;
    MVIT3_UNROLL
    for (int d = 0; d < kDimSlices; ++d)
      ldmatrix<4>(st.q[d], q_warp + (lane % 16) * kLdQ + 16 * d + 8 * (lane / 16));
    MVIT3_UNROLL
    for (int d = 0; d < 2 * kDimSlices; ++d)
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i) st.o[d][i] = 0.0f;
    MVIT3_UNROLL
    for (int h = 0; h < 2; ++h) st.max[h] = -INFINITY, st.sum[h] = 0.0f;
  }

  static MVIT3_DEVICE void step(State& st, const T*, const T* k_tile, const T* v_tile, int keys,
                                Scratch&) {
    const int lane = threadIdx.x % 32, t = lane % 4;
    float s[2 * kKeySlices][4];
    MVIT3_UNROLL
    for (int n = 0; n < 2 * kKeySlices; ++n)
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i) s[n][i] = 0.0f;
    // ldmatrix x4 of 16 keys x 16 dims: matrices (keys +0, dims +0), (+0, +8), (+8, +0),
    // (+8, +8) = b of key tile 2 k (regs 0, 1) and 2 k + 1 (regs 2, 3).
    MVIT3_UNROLL
    for (int k = 0; k < kKeySlices; ++k)
      MVIT3_UNROLL
      for (int d = 0; d < kDimSlices; ++d) {
        uint32_t b[4];
        ldmatrix<4>(b, k_tile + (16 * k + lane % 8 + 8 * (lane / 16)) * kLdK + 16 * d +
                           8 * (lane / 8 % 2));
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_m16n8k16<T>(s[2 * k], st.q[d], b0, s[2 * k]);
        mma_m16n8k16<T>(s[2 * k + 1], st.q[d], b1, s[2 * k + 1]);
      }

    float tile_max[2] = {-INFINITY, -INFINITY};
    MVIT3_UNROLL
    for (int n = 0; n < 2 * kKeySlices; ++n)
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i) {
        if (8 * n + 2 * t + i % 2 >= keys) s[n][i] = -INFINITY;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], s[n][i]);
      }
    float rescale[2];
    MVIT3_UNROLL
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float new_max = fmaxf(st.max[h], tile_max[h]);  // finite: key 0 is valid
      rescale[h] = exp2f(st.max[h] - new_max);               // 0 on the first tile
      st.max[h] = new_max;
      st.sum[h] *= rescale[h];
    }
    MVIT3_UNROLL
    for (int n = 0; n < 2 * kKeySlices; ++n)
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i) {
        s[n][i] = exp2f(s[n][i] - st.max[i / 2]);
        st.sum[i / 2] += s[n][i];
      }
    MVIT3_UNROLL
    for (int d = 0; d < 2 * kDimSlices; ++d)
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i) st.o[d][i] *= rescale[i / 2];

    // ldmatrix x4 .trans of 16 keys x 16 dims: matrices (keys +0, dims +0), (+8, +0), (+0, +8),
    // (+8, +8) = b of dim tile 2 d (regs 0, 1) and 2 d + 1 (regs 2, 3).
    MVIT3_UNROLL
    for (int k = 0; k < kKeySlices; ++k) {
      const uint32_t p[4] = {pack_pair<T>(s[2 * k][0], s[2 * k][1]),
                             pack_pair<T>(s[2 * k][2], s[2 * k][3]),
                             pack_pair<T>(s[2 * k + 1][0], s[2 * k + 1][1]),
                             pack_pair<T>(s[2 * k + 1][2], s[2 * k + 1][3])};
      MVIT3_UNROLL
      for (int d = 0; d < kDimSlices; ++d) {
        uint32_t b[4];
        ldmatrix<4, true>(b, v_tile + (16 * k + lane % 16) * kLdV + 16 * d + 8 * (lane / 16));
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_m16n8k16<T>(st.o[2 * d], p, b0, st.o[2 * d]);
        mma_m16n8k16<T>(st.o[2 * d + 1], p, b1, st.o[2 * d + 1]);
      }
    }
  }

  template <class Emit>
  static MVIT3_DEVICE void finish(const State& st, Scratch&, Emit&& emit) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float scale[2];
    MVIT3_UNROLL
    for (int h = 0; h < 2; ++h) {
      float sum = st.sum[h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      scale[h] = 1.0f / sum;
    }
    MVIT3_UNROLL
    for (int d = 0; d < 2 * kDimSlices; ++d)
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i)
        emit(g + 8 * (i / 2), 8 * d + 2 * t + i % 2, st.o[d][i] * scale[i / 2]);
  }
};

template <class T, int kHeadDim, int kWarps>
MVIT3_DEVICE void attention_body(const AttentionArgs& args) {
  using Math = std::conditional_t<std::is_same_v<T, float>, SimtAttention<kHeadDim>,
                                  MmaAttention<T, kHeadDim, kWarps>>;
  using Operand = typename Math::Operand;
  constexpr int kQueries = 16 * kWarps, kThreads = 32 * kWarps;
  constexpr int kKeys = Math::kKeys, kLdQ = Math::kLdQ, kLdK = Math::kLdK, kLdV = Math::kLdV;
  static_assert(kQueries <= kThreads && kKeys <= kThreads, "one thread per pixel table entry");
  MVIT3_SHARED_ALIGNED(Operand[kQueries * kLdQ], q_tile, 16);  // scaled queries
  MVIT3_SHARED_ALIGNED(Operand[kKeys * kLdK], k_tile, 16);
  MVIT3_SHARED_ALIGNED(Operand[kKeys * kLdV], v_tile, 16);
  MVIT3_SHARED(typename Math::Scratch[kWarps], scratch);
  MVIT3_SHARED(Pixel[kQueries], q_pixels);
  MVIT3_SHARED(Pixel[2][kKeys], kv_pixels);  // of this key tile and the next

  const T* qkv = static_cast<const T*>(args.qkv.data);
  const int tid = threadIdx.x, warp = tid / 32;
  const int half_width = args.width / 2;
  const int tokens = (args.height / 2) * half_width;
  const int query_tiles = (tokens + kQueries - 1) / kQueries;
  const int sequence = blockIdx.x / query_tiles;
  const int q0 = (blockIdx.x % query_tiles) * kQueries;
  const int b = args.first_sample + sequence / 4, pos = sequence % 4;
  const int head = blockIdx.y;
  const int dim = args.heads * args.head_dim;

  // Token n of this sequence is pixel (y, x): the patch grid cell times 2 plus the position.
  auto pixel_of = [&](int n) {
    return n < tokens ? Pixel{(n / half_width) * 2 + pos / 2, (n % half_width) * 2 + pos % 2}
                      : Pixel{-1, 0};
  };
  // rows x kHeadDim values of one third of qkv (0: q, 1: k, 2: v) for the tokens of `pixels`,
  // zero padded past the sequence and the head dim.
  const Map& m = args.qkv;
  auto stage = [&](Operand* tile, int ld, int rows, const Pixel* pixels, int third, float scale) {
    const T* head_base = qkv + b * m.stride_b + (third * dim + head * args.head_dim) * m.stride_c;
    for (int e = tid; e < rows * kHeadDim; e += kThreads) {
      const int r = e / kHeadDim, c = e % kHeadDim;
      const Pixel p = pixels[r];
      float v = 0.0f;
      if (p.y >= 0 && c < args.head_dim)
        v = to_float(head_base[p.y * m.stride_h + p.x * m.stride_w + c * m.stride_c]) * scale;
      tile[r * ld + c] = from_float<Operand>(v);
    }
  };

  if (tid < kQueries) q_pixels[tid] = pixel_of(q0 + tid);
  if (tid < kKeys) kv_pixels[0][tid] = pixel_of(tid);
  __syncthreads();
  stage(q_tile, kLdQ, kQueries, q_pixels, 0, args.q_scale);
  __syncthreads();
  const Operand* q_warp = q_tile + 16 * warp * kLdQ;
  typename Math::State state;
  Math::init(state, q_warp);

  for (int kv0 = 0, i = 0; kv0 < tokens; kv0 += kKeys, i ^= 1) {
    __syncthreads();  // every warp is done with the previous K/V tile and its pixels
    stage(k_tile, kLdK, kKeys, kv_pixels[i], 1, 1.0f);
    stage(v_tile, kLdV, kKeys, kv_pixels[i], 2, 1.0f);
    if (tid < kKeys) kv_pixels[i ^ 1][tid] = pixel_of(kv0 + kKeys + tid);
    __syncthreads();
    const int keys = tokens - kv0 < kKeys ? tokens - kv0 : kKeys;
    Math::step(state, q_warp, k_tile, v_tile, keys, scratch[warp]);
  }

  const T* residual = static_cast<const T*>(args.residual.data);
  T* out = static_cast<T*>(args.out.data);
  Math::finish(state, scratch[warp], [&](int r, int c, float o) {
    const Pixel p = q_pixels[16 * warp + r];
    if (p.y < 0 || c >= args.head_dim) return;
    const int channel = head * args.head_dim + c;
    if (residual) o += to_float(residual[map_offset(args.residual, b, channel, p.y, p.x)]);
    out[map_offset(args.out, b, channel, p.y, p.x)] = from_float<T>(o);
  });
}

// The minimum of 2 resident blocks lifts ptxas' default register cap, under which the bf16
// kernel for sm_90 spilled; shared memory bounds the residency to a few blocks anyway.
template <class T, int kHeadDim, int kWarps>
__global__ void __launch_bounds__(32 * kWarps, 2) patch_attention_kernel(AttentionArgs args) {
  if constexpr (arch_supports<T>()) attention_body<T, kHeadDim, kWarps>(args);
}

// Calls f(std::integral_constant<int, kWarps>) with the warps a block takes for `tokens`
// queries: the fewest 16-row warps, up to 4, that cover them.
template <class F>
void dispatch_warps(int tokens, F&& f) {
  if (tokens <= 16) return f(std::integral_constant<int, 1>{});
  if (tokens <= 32) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 4>{});
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
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(args.head_dim, [&](auto head_dim) {
      dispatch_warps(tokens, [&](auto warps) {
        constexpr int kWarps = decltype(warps)::value;
        const int64_t blocks_per_sample = 4 * ceil_div(tokens, 16 * kWarps);
        launch_chunks(args.batch, blocks_per_sample, [&](int64_t first, int64_t samples) {
          attention.first_sample = int(first);
          launch(&patch_attention_kernel<T, decltype(head_dim)::value, kWarps>,
                 grid_of(samples * blocks_per_sample, args.heads), dim3(32 * kWarps), stream,
                 attention);
        });
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
