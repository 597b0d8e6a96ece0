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
//
// Staging. When the qkv map is channels_last with 16-byte aligned base and pixel strides and d
// is a whole number of 16-byte chunks (AttentionArgs::chunked, decided on the host), Q/K/V rows
// are moved 16 bytes at a time. A head need not start on a chunk (head dims 20, 30, 36, 60 of the
// models), so a staged row is a window: it starts at the head's first channel rounded down to a
// chunk, `shift` = (head * head_dim) % chunk channels early (the same for q, k and v, as d is
// whole chunks), and the head is window columns shift .. shift + head_dim - 1. The kernel is
// compiled for the widest window of the call's heads (max shift + head_dim, padded to 16):
// 30-dim fp16 heads start 0, 6, 4, 2 channels past a chunk, so they take the 48-column kernel
// where the head alone would take 32 (1.5x the MMA work for 128-bit loads; 24, 36 and 60 keep
// their width, 20 fits in 32). Window columns outside the head are zero in Q (masked in
// registers, where Q is scaled anyway) and in K (the tail zero-filled by the copy, the lead
// cleared after it lands), so they add exactly 0 to Q K^T even next to non-finite channels;
// V's outside columns give output columns that are not written. K and V are copied with
// cp.async on sm_80+ (and the emulator) into two stages, the next key tile's copies in flight
// while the current one is computed (one stage where two do not fit 48 KB of static shared
// memory: fp32 64-dim 4-warp blocks); sm_75 loads 16 bytes into registers and stores them.
// Other layouts (NCHW, slices whose base or strides are not aligned) stage element by element
// through the strides, window = head (shift 0), with the same stages.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// Whether K/V staging uses cp.async (sm_80+, and the emulator, which models it).
#if defined(MVIT3_EMULATE) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
constexpr bool kAsyncCopy = true;
#else
constexpr bool kAsyncCopy = false;
#endif
constexpr int kStaticSharedBytes = 48 * 1024;  // a block's static shared memory, every arch

struct AttentionArgs {
  Map qkv, residual, out;
  int height, width, heads, head_dim;
  float q_scale;     // scale * log2(e)
  int first_sample;  // the sample of block x = 0 (a launch covers a chunk of the batch)
  bool chunked;      // Q/K/V rows staged as 16-byte chunks of head windows (top of file)
};

// The pixel of a token of the block's sequence; y = -1 past the sequence.
struct Pixel {
  int y, x;
};

// fp32: lane j of a warp computes the scores of key j for the warp's 16 rows (into the warp's
// score rows in shared memory), reading its K row 4 dims at a time (128-bit loads); lanes 2r
// and 2r + 1 then take the softmax statistics of row r (keys of their parity) and write its
// probabilities back over the scores; for P @ V, lane c owns output columns c and c + 32 of the
// 16 rows.
template <int kHeadDim>
struct SimtAttention {
  using Operand = float;
  static constexpr int kKeys = 32;
  static constexpr int kLdQ = kHeadDim;  // read as warp broadcasts
  // Lane j reads 16 bytes of row j: each 8-lane phase of a 128-bit load hits 16-byte bank
  // groups j * (kHeadDim / 4 + 1) mod 8, distinct as kHeadDim / 4 + 1 is odd (kHeadDim 16..64).
  // Every row stays 16-byte aligned for the chunked staging.
  static constexpr int kLdK = kHeadDim + 4;
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
      for (int c = 0; c < kHeadDim; c += 4) {
        const float4 k = *reinterpret_cast<const float4*>(k_tile + lane * kLdK + c);
        MVIT3_UNROLL
        for (int r = 0; r < 16; ++r) {
          const float* q = q_warp + r * kLdQ + c;
          s[r] = fmaf(q[0], k.x, s[r]);
          s[r] = fmaf(q[1], k.y, s[r]);
          s[r] = fmaf(q[2], k.z, s[r]);
          s[r] = fmaf(q[3], k.w, s[r]);
        }
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
  static_assert(std::is_same_v<Operand, T>, "tiles hold the I/O type: chunks are copied as is");
  constexpr int kQueries = 16 * kWarps, kThreads = 32 * kWarps;
  constexpr int kKeys = Math::kKeys, kLdQ = Math::kLdQ, kLdK = Math::kLdK, kLdV = Math::kLdV;
  constexpr int kChunk = 16 / int(sizeof(T));
  static_assert(kQueries <= kThreads && kKeys <= kThreads, "one thread per pixel table entry");
  static_assert(kHeadDim % kChunk == 0 && kLdQ % kChunk == 0 && kLdK % kChunk == 0 &&
                    kLdV % kChunk == 0 && (kKeys * kLdK) % kChunk == 0,
                "staged rows and the V tile start 16-byte aligned");
  // A stage: the K tile [kKeys][kLdK], then the V tile [kKeys][kLdV].
  constexpr int kStageElems = kKeys * (kLdK + kLdV);
  constexpr int kFixedBytes = kQueries * kLdQ * int(sizeof(T)) +
                              kWarps * int(sizeof(typename Math::Scratch)) +
                              (kQueries + 2 * kKeys) * int(sizeof(Pixel));
  constexpr int kStages =
      kAsyncCopy && kFixedBytes + 2 * kStageElems * int(sizeof(T)) <= kStaticSharedBytes ? 2 : 1;
  MVIT3_SHARED_ALIGNED(Operand[kQueries * kLdQ], q_tile, 16);  // scaled queries
  MVIT3_SHARED_ALIGNED(Operand[kStages * kStageElems], kv_tiles, 16);
  MVIT3_SHARED(typename Math::Scratch[kWarps], scratch);
  MVIT3_SHARED(Pixel[kQueries], q_pixels);
  MVIT3_SHARED(Pixel[2][kKeys], kv_pixels);  // key tile t's in slot t % 2

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
  const int shift = args.chunked ? head * args.head_dim % kChunk : 0;  // head's first column

  // Token n of this sequence is pixel (y, x): the patch grid cell times 2 plus the position.
  auto pixel_of = [&](int n) {
    return n < tokens ? Pixel{(n / half_width) * 2 + pos / 2, (n % half_width) * 2 + pos % 2}
                      : Pixel{-1, 0};
  };
  // rows x kHeadDim window columns of one third of qkv (0: q, 1: k, 2: v) for the tokens of
  // `pixels`, kVec columns a step: kChunk (one 16-byte chunk, args.chunked) or 1 (through the
  // channel stride). Columns outside the head and rows past the sequence are 0, except that
  // with kAsync (cp.async) the lead columns 0 .. shift - 1 keep the previous head's channels.
  const Map& m = args.qkv;
  auto stage = [&](auto vec, auto async, Operand* tile, int ld, int rows, const Pixel* pixels,
                   int third, float scale) {
    constexpr int kVec = decltype(vec)::value;
    constexpr bool kAsync = decltype(async)::value;
    constexpr int kVecs = kHeadDim / kVec;  // per row
    const T* window =
        qkv + b * m.stride_b + (third * dim + head * args.head_dim - shift) * m.stride_c;
    for (int e = tid; e < rows * kVecs; e += kThreads) {
      const int r = e / kVecs, c = e % kVecs * kVec;
      const Pixel p = pixels[r];
      // Of this vector's columns c .. c + kVec - 1, those in [lo, hi) are the head's.
      const int lo = shift - c, hi = shift + args.head_dim - c;
      const bool any = p.y >= 0 && hi > 0;
      const T* src = any ? window + p.y * m.stride_h + p.x * m.stride_w + c * m.stride_c : qkv;
      Operand* dst = tile + r * ld + c;
      if constexpr (kAsync) {
        cp_async<16>(dst, src, any ? (hi < kVec ? hi : kVec) * int(sizeof(T)) : 0);
      } else {
        T raw[kVec] = {};
        if (any) {
          if constexpr (kVec == kChunk)
            gemm::load_chunk(raw, src);  // within the pixel's 3d channels: d is whole chunks
          else
            raw[0] = *src;
        }
        float v[kVec];
        MVIT3_UNROLL
        for (int i = 0; i < kVec; ++i)
          v[i] = any && i >= lo && i < hi ? to_float(raw[i]) * scale : 0.0f;
        if constexpr (kVec == kChunk)
          gemm::store_chunk(dst, v);
        else
          *dst = from_float<Operand>(v[0]);
      }
    }
  };
  using Chunk = std::integral_constant<int, kChunk>;
  using Scalar = std::integral_constant<int, 1>;
  using Async = std::integral_constant<bool, kAsyncCopy>;
  using Sync = std::false_type;
  // K and V of key tile t into stage t % kStages, if the tile exists (from slot t % 2's pixels).
  auto stage_keys = [&](int t) {
    if (t * kKeys >= tokens) return;
    Operand* k_tile = kv_tiles + t % kStages * kStageElems;
    Operand* v_tile = k_tile + kKeys * kLdK;
    const Pixel* pixels = kv_pixels[t % 2];
    if (args.chunked) {
      stage(Chunk{}, Async{}, k_tile, kLdK, kKeys, pixels, 1, 1.0f);
      stage(Chunk{}, Async{}, v_tile, kLdV, kKeys, pixels, 2, 1.0f);
    } else {
      stage(Scalar{}, Sync{}, k_tile, kLdK, kKeys, pixels, 1, 1.0f);
      stage(Scalar{}, Sync{}, v_tile, kLdV, kKeys, pixels, 2, 1.0f);
    }
  };
  // cp.async zero-fills only a chunk's tail: once its copies have landed, the thread that
  // issued a K row's first chunk (the same e as in stage) clears the lead columns, so that they
  // are 0 as in Q rather than the previous head's keys (0 * inf would be NaN).
  auto clear_lead = [&](int t) {
    if (!kAsyncCopy || shift == 0) return;
    Operand* k_tile = kv_tiles + t % kStages * kStageElems;
    constexpr int kVecs = kHeadDim / kChunk;
    for (int e = tid; e < kKeys * kVecs; e += kThreads)
      if (e % kVecs == 0)
        for (int c = 0; c < shift; ++c) k_tile[e / kVecs * kLdK + c] = from_float<Operand>(0.0f);
  };

  if (tid < kQueries) q_pixels[tid] = pixel_of(q0 + tid);
  if (tid < kKeys)
    for (int t = 0; t < kStages; ++t) kv_pixels[t][tid] = pixel_of(t * kKeys + tid);
  __syncthreads();
  if (args.chunked)
    stage(Chunk{}, Sync{}, q_tile, kLdQ, kQueries, q_pixels, 0, args.q_scale);
  else
    stage(Scalar{}, Sync{}, q_tile, kLdQ, kQueries, q_pixels, 0, args.q_scale);
  for (int t = 0; t < kStages - 1; ++t) {
    stage_keys(t);
    if constexpr (kAsyncCopy) cp_async_commit();
  }
  __syncthreads();
  const Operand* q_warp = q_tile + 16 * warp * kLdQ;
  typename Math::State state;
  Math::init(state, q_warp);

  // Iteration t stages tile t + kStages - 1 (two stages: its copies in flight while tile t is
  // computed) and writes the pixels of tile t + kStages over those of tile t + kStages - 2,
  // staged in iteration t - 1; then it waits for tile t.
  for (int t = 0; t * kKeys < tokens; ++t) {
    // Every warp is done with tile t - 1, whose stage is rewritten next, and every thread with
    // staging tile t + kStages - 2, whose pixel slot is.
    __syncthreads();
    stage_keys(t + kStages - 1);
    if constexpr (kAsyncCopy) cp_async_commit();  // possibly empty: one group per iteration
    if (tid < kKeys) kv_pixels[(t + kStages) % 2][tid] = pixel_of((t + kStages) * kKeys + tid);
    if constexpr (kAsyncCopy) cp_async_wait<kStages - 1>();  // this thread's copies of tile t
    if (args.chunked) clear_lead(t);
    __syncthreads();
    const Operand* k_tile = kv_tiles + t % kStages * kStageElems;
    const int keys = tokens - t * kKeys < kKeys ? tokens - t * kKeys : kKeys;
    Math::step(state, q_warp, k_tile, k_tile + kKeys * kLdK, keys, scratch[warp]);
  }

  const T* residual = static_cast<const T*>(args.residual.data);
  T* out = static_cast<T*>(args.out.data);
  Math::finish(state, scratch[warp], [&](int r, int c, float o) {
    const Pixel p = q_pixels[16 * warp + r];
    c -= shift;  // window column -> head dim
    if (p.y < 0 || c < 0 || c >= args.head_dim) return;
    const int channel = head * args.head_dim + c;
    if (residual) o += to_float(residual[map_offset(args.residual, b, channel, p.y, p.x)]);
    out[map_offset(args.out, b, channel, p.y, p.x)] = from_float<T>(o);
  });
}

// Resident blocks asked of ptxas. 2 lifts its default register cap, under which the bf16 kernel
// for sm_90 spilled; shared memory bounds the residency to a few blocks anyway. 16-bit 4-warp
// blocks of head dims up to 48 on sm_80+ ask 4 (128 registers): with the two K/V stages ptxas
// took 125-142 there (4 -> 3 blocks/SM at 48) and fits 128 without spilling; 64 dims spill at
// 128, and sm_75's one-stage 48-dim kernel spills 56 bytes, so those keep 2.
template <class T, int kHeadDim, int kWarps>
constexpr int kMinBlocks =
    kAsyncCopy && !std::is_same_v<T, float> && kWarps == 4 && kHeadDim <= 48 ? 4 : 2;

template <class T, int kHeadDim, int kWarps>
__global__ void __launch_bounds__(32 * kWarps, (kMinBlocks<T, kHeadDim, kWarps>))
    patch_attention_kernel(AttentionArgs args) {
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
    // Chunked staging (top of file) where the layout allows it and the widest head window,
    // max over heads of (h * head_dim) % kChunk + head_dim (the residues of h < kChunk are all
    // there are), fits the kernels.
    constexpr int kChunk = 16 / int(sizeof(T));
    const int dim = args.heads * args.head_dim;
    const bool aligned = gemm::chunked_rows<T>(args.qkv) && dim % kChunk == 0;
    int lead = 0;
    for (int h = 0; aligned && h < std::min(args.heads, kChunk); ++h)
      lead = std::max(lead, h * args.head_dim % kChunk);
    attention.chunked = aligned && lead + args.head_dim <= kMaxHeadDim;
    dispatch_head_dim(attention.chunked ? lead + args.head_dim : args.head_dim, [&](auto head_dim) {
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
