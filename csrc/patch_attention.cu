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
// with proj_weight and d <= kMaxFusedProjectionDim (every model), one (sequence, query tile)
// for every head in turn, then the out_proj (below);
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
// division by W/2 per row, not per element).
//
// Fused out_proj (kDim > 0, one launch): each head's normalised output goes to a heads tile
// [16 kWarps][kDim + one chunk] in shared memory (the I/O type, as the heads map of the two
// launches was), then the block computes heads @ proj_weight^T + proj_bias + residual for its
// queries (project_heads) and writes the output map. kDim (128 or 256) sizes the tile for the
// largest d of the instance; the warps are the most, up to those covering N, whose tiles fit
// the 48 KB of static shared memory (AttentionConfig::kFits; one warp always does). d > 256
// (kMaxFusedProjectionDim: no model) writes the heads to a workspace map and runs the out_proj
// (+ bias + residual) as the pointwise_conv GEMM, a second launch.
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
  int64_t first_block;  // the block of block x = 0 (a launch covers a chunk of the grid)
  bool chunked;      // Q/K/V rows staged as 16-byte chunks of head windows (top of file)
  // The fused kernel's out_proj (project_heads): W [d, d], bias [d] or null; W tiles kept
  // n-fastest (only Cout unit-stride), moved by 16-byte chunks; the output by 16-byte chunks.
  Matrix proj_weight;
  const void* proj_bias = nullptr;
  bool proj_n_fastest = false, proj_chunked = false, out_chunked = false;
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
  // (Also what keeps the constants referenced where only AttentionConfig reads the class: the
  // launcher's choice of warps, and sm_75's empty bf16 kernels.)
  static_assert(kDimSlices * 16 == kHeadDim && kKeySlices * 16 == kKeys, "whole k16 slices");

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

// The out_proj of the fused kernel (kDim > 0): out[row, n] = sum_k heads[row, k] W[n, k] +
// bias[n] + residual[row, n] for the block's rows, from the heads tile in shared memory. W is
// walked in kN x kK tiles (n chunks outer, k chunks inner), two stages: the next tile's copies
// in flight while the current one is computed. A tile is kept along W's unit-stride dimension:
// [kN][kLdK] (k-fastest, a row-major W) or [kK][kLdN] (n-fastest, the fast models' K-major
// packing), moved by 16-byte chunks (cp.async on sm_80+, 16-byte loads and stores on sm_75)
// where that dimension has stride 1 and the base and the other stride are 16-byte aligned, else
// element by element through the strides.
//   fp16/bf16: warp w owns rows 16 w .. 16 w + 15, mma.sync m16n8k16 with the heads tile as A
//     (ldmatrix, as Q) and the W tile as B (ldmatrix as K^T when k-fastest, .trans as V when
//     n-fastest); kN = 32 columns (4 n8 fragments) a chunk, kK = 64.
//   fp32: lane c owns column c of the chunk for the warp's 16 rows, IEEE FMAs in k order; the
//     heads are read as warp broadcasts, W 4 k at a time (a 128-bit load of its row when
//     k-fastest: kLdK / 4 = 9 is odd, so the 8 lanes of a phase hit distinct bank groups).
// Per n chunk the warp's accumulators go through its own [16][kLdOut] fp32 rows of shared
// memory, so that a lane then takes 16 bytes of a pixel's channels: bias, a 16-byte residual
// load and one 16-byte store where d is whole chunks and out (and the residual) are
// channel-fastest with aligned pixels; element by element otherwise.
template <class T>
struct ProjectionTiles {
  static constexpr bool kMma = !std::is_same_v<T, float>;
  static constexpr int kChunk = 16 / int(sizeof(T));
  static constexpr int kN = 32;
  static constexpr int kK = kMma ? 64 : 32;
  static constexpr int kLdK = kK + kChunk;  // [kN][kLdK]
  static constexpr int kLdN = kN + kChunk;  // [kK][kLdN]
  static constexpr int kElems = std::max(kN * kLdK, kK * kLdN);
  static constexpr int kLdOut = kN + 4;  // a warp's output rows (fp32)
  static_assert((kElems * int(sizeof(T))) % 16 == 0, "every tile starts 16-byte aligned");
};

// Shared memory of an attention block: the Q tile, the K/V stages (which the fused kernel's
// out_proj reuses for its W tiles and output rows), the per-warp scratch, the pixel tables and,
// fused, the heads tile [kQueries][kLdH] of all heads' outputs. kDim: 0 for the per-head
// kernel, else the largest d the fused kernel takes (128 or 256). A configuration fits when one
// K/V stage does; it has two (sm_80+) where they fit too.
template <class T, int kHeadDim, int kWarps, int kDim>
struct AttentionConfig {
  using Math = std::conditional_t<std::is_same_v<T, float>, SimtAttention<kHeadDim>,
                                  MmaAttention<T, kHeadDim, kWarps>>;
  using Proj = ProjectionTiles<T>;
  static constexpr bool kFused = kDim > 0;
  static constexpr int kQueries = 16 * kWarps, kThreads = 32 * kWarps;
  static constexpr int kKeys = Math::kKeys;
  static constexpr int kChunk = 16 / int(sizeof(T));
  static constexpr int kLdH = kDim + kChunk;  // 16-bit: (kDim + 8) * 2 bytes, an odd number of 16
  static constexpr int kStageElems = kKeys * (Math::kLdK + Math::kLdV);
  static constexpr int kHeadsBytes = kFused ? kQueries * kLdH * int(sizeof(T)) : 0;
  static constexpr int kProjBytes =
      kFused ? 2 * Proj::kElems * int(sizeof(T)) + kWarps * 16 * Proj::kLdOut * int(sizeof(float))
             : 0;
  // Every array here is a multiple of 16 bytes, so the sum is what ptxas allocates; it has no
  // headroom where an instance sits at the limit (fp32 <64, 1, 128> with two stages: 49152
  // bytes): a shared array added without counting it here fails the sm_80+ build.
  static constexpr int kFixedBytes = kQueries * Math::kLdQ * int(sizeof(T)) +
                                     kWarps * int(sizeof(typename Math::Scratch)) +
                                     (kQueries + 2 * kKeys) * int(sizeof(Pixel)) + kHeadsBytes;
  static constexpr int region_bytes(int stages) {
    return std::max(stages * kStageElems * int(sizeof(T)), kProjBytes);
  }
  static constexpr bool kFits = kFixedBytes + region_bytes(1) <= kStaticSharedBytes;
  static constexpr int kStages =
      kAsyncCopy && kFixedBytes + region_bytes(2) <= kStaticSharedBytes ? 2 : 1;
  static constexpr int kRegionElems = region_bytes(kStages) / int(sizeof(T));
  // (Also keeps every constant referenced where the launcher only asks kFits, and in sm_75's
  // empty bf16 kernels: nvcc warns of unreferenced members of a class in this namespace.)
  static_assert(kThreads == 2 * kQueries && kStages >= 1 && kRegionElems * int(sizeof(T)) >=
                    region_bytes(1), "a warp takes 16 queries; one stage at least");
};

// fp16/bf16 out_proj math of a warp: its 16 rows x kN columns in n8 C fragments.
template <class T>
struct MmaProjection {
  using Proj = ProjectionTiles<T>;
  float acc[Proj::kN / 8][4];

  MVIT3_DEVICE void zero() {
    MVIT3_UNROLL
    for (int j = 0; j < Proj::kN / 8; ++j)
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
  }

  // acc += heads[rows, k0 .. k0 + kK - 1] @ the W tile (its k chunk, k-fastest or n-fastest).
  template <int kLdH>
  MVIT3_DEVICE void step(const T* heads, int k0, const T* tile, bool n_fastest) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const T* a_row = heads + (16 * warp + lane % 16) * kLdH + k0 + 8 * (lane / 16);
    MVIT3_UNROLL
    for (int ks = 0; ks < Proj::kK / 16; ++ks) {
      uint32_t a[4];
      ldmatrix<4>(a, a_row + 16 * ks);
      MVIT3_UNROLL
      for (int np = 0; np < Proj::kN / 16; ++np) {
        // x4 of 16 k x 16 n: b of n tile 2 np (regs 0, 1) and 2 np + 1 (regs 2, 3), as V's
        // (.trans of [k][n] rows) or as K's (of [n][k] rows) in the attention.
        uint32_t b[4];
        if (n_fastest)
          ldmatrix<4, true>(b, tile + (16 * ks + lane % 16) * Proj::kLdN + 16 * np + 8 * (lane / 16));
        else
          ldmatrix<4>(b, tile + (16 * np + lane % 8 + 8 * (lane / 16)) * Proj::kLdK + 16 * ks +
                             8 * (lane / 8 % 2));
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_m16n8k16<T>(acc[2 * np], a, b0, acc[2 * np]);
        mma_m16n8k16<T>(acc[2 * np + 1], a, b1, acc[2 * np + 1]);
      }
    }
  }

  // The warp's [16][kLdOut] output rows.
  MVIT3_DEVICE void store(float* rows) const {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    MVIT3_UNROLL
    for (int j = 0; j < Proj::kN / 8; ++j)
      MVIT3_UNROLL
      for (int i = 0; i < 4; ++i)
        rows[(g + 8 * (i / 2)) * Proj::kLdOut + 8 * j + 2 * t + i % 2] = acc[j][i];
  }
};

// fp32 out_proj math of a warp: lane c owns column c of the chunk for the warp's 16 rows.
struct SimtProjection {
  using Proj = ProjectionTiles<float>;
  float acc[16];

  MVIT3_DEVICE void zero() {
    MVIT3_UNROLL
    for (int r = 0; r < 16; ++r) acc[r] = 0.0f;
  }

  template <int kLdH>
  MVIT3_DEVICE void step(const float* heads, int k0, const float* tile, bool n_fastest) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float* rows = heads + 16 * warp * kLdH + k0;
    MVIT3_UNROLL
    for (int k = 0; k < Proj::kK; k += 4) {
      float4 w;
      if (n_fastest) {
        const float* column = tile + k * Proj::kLdN + lane;
        w = float4{column[0], column[Proj::kLdN], column[2 * Proj::kLdN], column[3 * Proj::kLdN]};
      } else {
        w = *reinterpret_cast<const float4*>(tile + lane * Proj::kLdK + k);
      }
      MVIT3_UNROLL
      for (int r = 0; r < 16; ++r) {
        const float4 h = *reinterpret_cast<const float4*>(rows + r * kLdH + k);
        acc[r] = fmaf(h.x, w.x, acc[r]);
        acc[r] = fmaf(h.y, w.y, acc[r]);
        acc[r] = fmaf(h.z, w.z, acc[r]);
        acc[r] = fmaf(h.w, w.w, acc[r]);
      }
    }
  }

  MVIT3_DEVICE void store(float* rows) const {
    const int lane = threadIdx.x % 32;
    MVIT3_UNROLL
    for (int r = 0; r < 16; ++r) rows[r * Proj::kLdOut + lane] = acc[r];
  }
};

// The fused kernel's out_proj (ProjectionTiles), after every head is in heads_tile. `region`
// is the K/V stages' memory: two W tiles, then the warps' output rows.
template <class Config, class T>
MVIT3_DEVICE void project_heads(const AttentionArgs& args, const T* heads_tile, T* region,
                                const Pixel* q_pixels, int b) {
  using Proj = ProjectionTiles<T>;
  using Math = std::conditional_t<Proj::kMma, MmaProjection<T>, SimtProjection>;
  constexpr int kN = Proj::kN, kK = Proj::kK, kChunk = Proj::kChunk, kLdOut = Proj::kLdOut;
  constexpr int kThreads = Config::kThreads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int dim = args.heads * args.head_dim;
  const Matrix& w = args.proj_weight;
  const T* weight = static_cast<const T*>(w.data);
  const bool n_fastest = args.proj_n_fastest;
  float* out_rows = reinterpret_cast<float*>(region + 2 * Proj::kElems) + warp * 16 * kLdOut;
  const int k_steps = (dim + kK - 1) / kK;
  const int steps = (dim + kN - 1) / kN * k_steps;

  // The W tile of step i = (n chunk i / k_steps, k chunk i % k_steps) into stage i % 2: lines
  // along W's other dimension (n when k-fastest, k when n-fastest), each `length` elements of
  // the unit-stride one; 0 past d.
  auto stage_w = [&](int i) {
    if (i >= steps) return;
    T* tile = region + i % 2 * Proj::kElems;
    const int n0 = i / k_steps * kN, k0 = i % k_steps * kK;
    const int lines = n_fastest ? kK : kN, length = n_fastest ? kN : kK;
    const int ld = n_fastest ? Proj::kLdN : Proj::kLdK;
    const int line0 = n_fastest ? k0 : n0, along0 = n_fastest ? n0 : k0;
    const int64_t line_stride = n_fastest ? w.stride_col : w.stride_row;
    if (args.proj_chunked) {
      const int per_line = length / kChunk;
      for (int e = tid; e < lines * per_line; e += kThreads) {
        const int l = e / per_line, a = e % per_line * kChunk;
        const int left = line0 + l < dim ? dim - (along0 + a) : 0;
        const int count = left < 0 ? 0 : left < kChunk ? left : kChunk;
        const T* src = count > 0 ? weight + (line0 + l) * line_stride + along0 + a : weight;
        T* dst = tile + l * ld + a;
        if constexpr (kAsyncCopy) {
          cp_async<16>(dst, src, count * int(sizeof(T)));
        } else {
          float v[kChunk];
          if (count == kChunk) {
            T raw[kChunk];
            gemm::load_chunk(raw, src);
            MVIT3_UNROLL
            for (int j = 0; j < kChunk; ++j) v[j] = to_float(raw[j]);
          } else {
            MVIT3_UNROLL
            for (int j = 0; j < kChunk; ++j) v[j] = j < count ? to_float(src[j]) : 0.0f;
          }
          gemm::store_chunk(dst, v);
        }
      }
    } else {
      const int64_t along_stride = n_fastest ? w.stride_row : w.stride_col;
      for (int e = tid; e < lines * length; e += kThreads) {
        const int l = e / length, a = e % length;
        const bool in = line0 + l < dim && along0 + a < dim;
        tile[l * ld + a] = in ? weight[(line0 + l) * line_stride + (along0 + a) * along_stride]
                              : from_float<T>(0.0f);
      }
    }
  };

  // The warp's rows of n chunk n0 from out_rows, + bias + residual, to the output.
  const T* bias = static_cast<const T*>(args.proj_bias);
  const T* residual = static_cast<const T*>(args.residual.data);
  T* out = static_cast<T*>(args.out.data);
  auto emit_chunk = [&](int n0) {
    __syncwarp();  // the warp's accumulators are in out_rows
    if (args.out_chunked) {
      constexpr int kPerRow = kN / kChunk;
      for (int e = lane; e < 16 * kPerRow; e += 32) {
        const int r = e / kPerRow, c = e % kPerRow * kChunk, o = n0 + c;
        const Pixel p = q_pixels[16 * warp + r];
        if (p.y < 0 || o >= dim) continue;  // d is whole chunks: o < d covers the chunk
        float v[kChunk];
        gemm::load_floats(v, out_rows + r * kLdOut + c);
        if (bias) {
          MVIT3_UNROLL
          for (int i = 0; i < kChunk; ++i) v[i] += to_float(bias[o + i]);
        }
        if (residual) {
          T res[kChunk];
          gemm::load_chunk(res, residual + map_offset(args.residual, b, o, p.y, p.x));
          MVIT3_UNROLL
          for (int i = 0; i < kChunk; ++i) v[i] += to_float(res[i]);
        }
        gemm::store_chunk(out + map_offset(args.out, b, o, p.y, p.x), v);
      }
    } else {
      for (int e = lane; e < 16 * kN; e += 32) {
        const int r = e / kN, c = e % kN, o = n0 + c;
        const Pixel p = q_pixels[16 * warp + r];
        if (p.y < 0 || o >= dim) continue;
        float v = out_rows[r * kLdOut + c];
        if (bias) v += to_float(bias[o]);
        if (residual) v += to_float(residual[map_offset(args.residual, b, o, p.y, p.x)]);
        out[map_offset(args.out, b, o, p.y, p.x)] = from_float<T>(v);
      }
    }
    __syncwarp();  // read before the next chunk's accumulators overwrite them
  };

  Math math;
  math.zero();
  for (int i = 0; i < steps; ++i) {
    // Every warp is done with step i - 1's W tile, whose stage is rewritten next; at i = 0 with
    // the attention's K/V tiles (the same memory), and every head's output is in heads_tile.
    __syncthreads();
    if (i == 0) {
      stage_w(0);
      if constexpr (kAsyncCopy) cp_async_commit();
    }
    stage_w(i + 1);
    if constexpr (kAsyncCopy) {
      cp_async_commit();  // possibly empty: one group per step
      cp_async_wait<1>();  // this thread's copies of step i
    }
    __syncthreads();
    const int k_chunk = i % k_steps;
    math.template step<Config::kLdH>(heads_tile, k_chunk * kK, region + i % 2 * Proj::kElems,
                                     n_fastest);
    if (k_chunk == k_steps - 1) {
      math.store(out_rows);
      emit_chunk(i / k_steps * kN);
      math.zero();
    }
  }
}

template <class T, int kHeadDim, int kWarps, int kDim>
MVIT3_DEVICE void attention_body(const AttentionArgs& args) {
  using Config = AttentionConfig<T, kHeadDim, kWarps, kDim>;
  using Math = typename Config::Math;
  using Operand = typename Math::Operand;
  static_assert(std::is_same_v<Operand, T>, "tiles hold the I/O type: chunks are copied as is");
  static_assert(Config::kFits, "the launcher takes only configurations that fit");
  constexpr bool kFused = Config::kFused;
  constexpr int kQueries = Config::kQueries, kThreads = Config::kThreads;
  constexpr int kKeys = Math::kKeys, kLdQ = Math::kLdQ, kLdK = Math::kLdK, kLdV = Math::kLdV;
  constexpr int kChunk = Config::kChunk, kLdH = Config::kLdH;
  static_assert(kQueries <= kThreads && kKeys <= kThreads, "one thread per pixel table entry");
  static_assert(kHeadDim % kChunk == 0 && kLdQ % kChunk == 0 && kLdK % kChunk == 0 &&
                    kLdV % kChunk == 0 && (kKeys * kLdK) % kChunk == 0,
                "staged rows and the V tile start 16-byte aligned");
  // A stage: the K tile [kKeys][kLdK], then the V tile [kKeys][kLdV].
  constexpr int kStageElems = Config::kStageElems;
  constexpr int kStages = Config::kStages;
  MVIT3_SHARED_ALIGNED(Operand[kQueries * kLdQ], q_tile, 16);  // scaled queries
  MVIT3_SHARED_ALIGNED(Operand[Config::kRegionElems], kv_tiles, 16);
  MVIT3_SHARED(typename Math::Scratch[kWarps], scratch);
  MVIT3_SHARED(Pixel[kQueries], q_pixels);
  MVIT3_SHARED(Pixel[2][kKeys], kv_pixels);  // key tile t's in slot t % 2
  // Fused: every head's output of the block's queries, the out_proj's A operand.
  MVIT3_SHARED_ALIGNED(Operand[kFused ? kQueries * kLdH : 1], heads_tile, 16);

  const T* qkv = static_cast<const T*>(args.qkv.data);
  const int tid = threadIdx.x, warp = tid / 32;
  const int half_width = args.width / 2;
  const int tokens = (args.height / 2) * half_width;
  const int query_tiles = (tokens + kQueries - 1) / kQueries;
  const int64_t block = args.first_block + blockIdx.x;  // (sample, position, query tile)
  const int64_t sequence = block / query_tiles;
  const int q0 = int(block % query_tiles) * kQueries;
  const int b = int(sequence / 4), pos = int(sequence % 4);
  const int dim = args.heads * args.head_dim;
  int head = 0, shift = 0;  // the head being computed and its window's first column

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

  const T* residual = static_cast<const T*>(args.residual.data);
  T* out = static_cast<T*>(args.out.data);
  if (tid < kQueries) q_pixels[tid] = pixel_of(q0 + tid);
  if constexpr (kFused) {
    // The heads tile's columns d .. up to the last k chunk of the out_proj are read (times the
    // W tile's zeros): 0, not the NaN an unwritten column could hold.
    constexpr int kK = ProjectionTiles<T>::kK;
    const int padded = (dim + kK - 1) / kK * kK;
    for (int e = tid; e < kQueries * (padded - dim); e += kThreads)
      heads_tile[e / (padded - dim) * kLdH + dim + e % (padded - dim)] = from_float<Operand>(0.0f);
  }

  // The heads: the block's one (blockIdx.y), or fused every head in turn.
  const int first_head = kFused ? 0 : int(blockIdx.y);
  const int last_head = kFused ? args.heads - 1 : first_head;
  for (head = first_head; head <= last_head; ++head) {
    shift = args.chunked ? head * args.head_dim % kChunk : 0;
    // The pixels of the first key tiles: their slots are read only while staging, which every
    // thread has finished with for the previous head (before its last key tile's barrier).
    if (tid < kKeys)
      for (int t = 0; t < kStages; ++t) kv_pixels[t][tid] = pixel_of(t * kKeys + tid);
    // The pixel tables are written, the heads tile's padding too, and every warp is done with
    // the previous head's Q and K/V tiles, which are rewritten next.
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
      // staging tile t + kStages - 2, whose pixel slot is. One barrier a head suffices because
      // nothing after this loop's last barrier reads kv_pixels (Math::step, finish and
      // clear_lead do not; stage_keys of a tile past the last returns before reading it), and
      // only threads tid < kKeys write the slots, the same threads in every head: a reader of
      // kv_pixels added after the loop would race with the next head's writes.
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

    Math::finish(state, scratch[warp], [&](int r, int c, float o) {
      c -= shift;  // window column -> head dim
      if (c < 0 || c >= args.head_dim) return;
      const int channel = head * args.head_dim + c;
      if constexpr (kFused) {  // every row, those past the sequence too (finite: their Q is 0)
        heads_tile[(16 * warp + r) * kLdH + channel] = from_float<Operand>(o);
      } else {
        const Pixel p = q_pixels[16 * warp + r];
        if (p.y < 0) return;
        if (residual) o += to_float(residual[map_offset(args.residual, b, channel, p.y, p.x)]);
        out[map_offset(args.out, b, channel, p.y, p.x)] = from_float<T>(o);
      }
    });
  }
  if constexpr (kFused) project_heads<Config>(args, heads_tile, kv_tiles, q_pixels, b);
}

// Resident blocks asked of ptxas. 2 lifts its default register cap, under which the bf16 kernel
// for sm_90 spilled; shared memory bounds the residency to a few blocks anyway. 16-bit 4-warp
// blocks of head dims up to 48 on sm_80+ ask 4 (128 registers): with the two K/V stages ptxas
// took 125-142 there (4 -> 3 blocks/SM at 48) and fits 128 without spilling; 64 dims spill at
// 128, and sm_75's one-stage 48-dim kernel spills 56 bytes, so those keep 2. The fused kernels
// keep 2: their heads tile leaves room for fewer blocks than 4 anyway.
template <class T, int kHeadDim, int kWarps, int kDim>
constexpr int kMinBlocks =
    kAsyncCopy && !std::is_same_v<T, float> && kWarps == 4 && kHeadDim <= 48 && kDim == 0 ? 4
                                                                                          : 2;

template <class T, int kHeadDim, int kWarps, int kDim>
__global__ void __launch_bounds__(32 * kWarps, (kMinBlocks<T, kHeadDim, kWarps, kDim>))
    patch_attention_kernel(AttentionArgs args) {
  if constexpr (arch_supports<T>()) attention_body<T, kHeadDim, kWarps, kDim>(args);
}

// Calls f(std::integral_constant<int, kWarps>) with the warps a block takes for `tokens`
// queries: the fewest 16-row warps, up to 4, that cover them.
template <class F>
void dispatch_warps(int tokens, F&& f) {
  if (tokens <= 16) return f(std::integral_constant<int, 1>{});
  if (tokens <= 32) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 4>{});
}

// The fused kernel's warps when kWanted would cover the queries: the most, up to kWanted, whose
// heads tile and attention tiles fit the static shared memory (one warp always does: below).
template <class T, int kHeadDim, int kDim, int kWanted>
constexpr int kFusedWarps = kWanted >= 4 && AttentionConfig<T, kHeadDim, 4, kDim>::kFits   ? 4
                            : kWanted >= 2 && AttentionConfig<T, kHeadDim, 2, kDim>::kFits ? 2
                                                                                           : 1;
static_assert(AttentionConfig<float, 64, 1, kMaxFusedProjectionDim>::kFits &&
                  AttentionConfig<__half, 64, 1, kMaxFusedProjectionDim>::kFits,
              "every head dim fuses its out_proj with one warp up to kMaxFusedProjectionDim");

// One launch of the kernel over the batch (in chunks of blocks where grid axis x needs them:
// a chunk may end inside a sample). Grid: x = (sample, position, query tile) from
// first_block on; y = head (<= 65535: ops.cpp), or 1 for the fused kernel, whose blocks take
// every head.
template <class T, int kHeadDim, int kWarps, int kDim>
void launch_attention(AttentionArgs& attention, int batch, int tokens, int heads, Stream stream) {
  const int64_t blocks = int64_t(batch) * 4 * ceil_div(tokens, 16 * kWarps);
  launch_chunks(blocks, 1, [&](int64_t first, int64_t count) {
    attention.first_block = first;
    launch(&patch_attention_kernel<T, kHeadDim, kWarps, kDim>,
           grid_of(count, kDim > 0 ? 1 : heads), dim3(32 * kWarps), stream, attention);
  });
}

}  // namespace

void patch_attention(const PatchAttentionArgs& args, DType dtype, Stream stream) {
  const int tokens = (args.height / 2) * (args.width / 2);
  if (args.batch == 0 || tokens == 0) return;
  const int dim = args.heads * args.head_dim;
  const bool project = args.proj_weight.data != nullptr;
  // With proj_weight, one launch where the heads tile fits (d <= kMaxFusedProjectionDim, every
  // model's); else the heads go to the heads_out workspace and the out_proj is a tile GEMM.
  const bool fused = project && dim <= kMaxFusedProjectionDim;
  AttentionArgs attention;
  attention.qkv = args.qkv;
  attention.residual = project && !fused ? Map{} : args.residual;  // the GEMM adds it then
  attention.out = project && !fused ? args.heads_out : args.out;
  attention.height = args.height;
  attention.width = args.width;
  attention.heads = args.heads;
  attention.head_dim = args.head_dim;
  attention.q_scale = args.scale * kLog2e;
  attention.proj_weight = fused ? args.proj_weight : Matrix{};
  attention.proj_bias = fused ? args.proj_bias : nullptr;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Chunked staging (top of file) where the layout allows it and the widest head window,
    // max over heads of (h * head_dim) % kChunk + head_dim (the residues of h < kChunk are all
    // there are), fits the kernels.
    constexpr int kChunk = 16 / int(sizeof(T));
    const bool aligned = gemm::chunked_rows<T>(args.qkv) && dim % kChunk == 0;
    int lead = 0;
    for (int h = 0; aligned && h < std::min(args.heads, kChunk); ++h)
      lead = std::max(lead, h * args.head_dim % kChunk);
    attention.chunked = aligned && lead + args.head_dim <= kMaxHeadDim;
    if (fused) {
      // The W tiles: along W's unit-stride dimension (ProjectionTiles), by 16-byte chunks
      // where the base and the other stride are aligned. The output: by 16-byte chunks where d
      // is whole chunks and out (and the residual) have aligned channel-fastest pixels.
      const Matrix& w = args.proj_weight;
      attention.proj_n_fastest = w.stride_row == 1 && w.stride_col != 1;
      const int64_t line_stride = attention.proj_n_fastest ? w.stride_col : w.stride_row;
      attention.proj_chunked = (attention.proj_n_fastest || w.stride_col == 1) &&
                               reinterpret_cast<uintptr_t>(w.data) % 16 == 0 &&
                               (line_stride * int64_t(sizeof(T))) % 16 == 0;
      attention.out_chunked = dim % kChunk == 0 && gemm::chunked_rows<T>(args.out) &&
                              (!args.residual.data || gemm::chunked_rows<T>(args.residual));
    }
    dispatch_head_dim(attention.chunked ? lead + args.head_dim : args.head_dim, [&](auto head_dim) {
      constexpr int kHeadDim = decltype(head_dim)::value;
      dispatch_warps(tokens, [&](auto warps) {
        constexpr int kWarps = decltype(warps)::value;
        if (!fused) {
          launch_attention<T, kHeadDim, kWarps, 0>(attention, args.batch, tokens, args.heads,
                                                   stream);
        } else if (dim <= 128) {
          launch_attention<T, kHeadDim, kFusedWarps<T, kHeadDim, 128, kWarps>, 128>(
              attention, args.batch, tokens, args.heads, stream);
        } else {
          launch_attention<T, kHeadDim, kFusedWarps<T, kHeadDim, 256, kWarps>, 256>(
              attention, args.batch, tokens, args.heads, stream);
        }
      });
    });
  });
  if (!project || fused) return;
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
