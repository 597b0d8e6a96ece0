// transformer_mlp: the pre-norm FFN sub-layer with its residual,
//   out = x + silu(norm(x) @ w1^T + b1) @ w2^T + b2,
// norm "layer" (v1-style), "group" (v2-style) or "none". Semantics:
// mvit3.ops.reference.transformer_mlp.
//
// One launch (fused_mlp_kernel; "group" first runs group_norm_stats) where d <= 256, F <= 512
// (every model's FFN) and the block's tiles fit the device's shared memory, decided by
// transformer_mlp_fused (mvit3.h), which ops.cpp asks too (it allocates the hidden workspace
// only for the other path). Shared memory (fused_mlp_layout): fp16/bf16 the widest tiles
// (d 256, F 512) in 45.6 KB of static shared memory; fp32, whose tiles are twice as wide,
// dynamic shared memory sized from the call's d and F (45.6 KB at d 128 / F 256, 65.9 KB at
// d 240 / F 480, 68.9 KB at d 256 / F 512; past 48 KB the kernel is allowed them once per
// device, cudaFuncSetAttribute): within an sm_80/86/89/90's limit at every d, an sm_75's
// (64 KB) up to d 224 / F 448. A block owns kRows = 16 pixels and runs both GEMMs for them:
//   1. the [16][d] x rows go to the A tile (the I/O type: raw x is exact there), then each
//      pixel's LayerNorm statistics are taken from it (8 threads a pixel, two passes: mean,
//      then centred squares) or its sample's GroupNorm statistics read, and the tile is
//      normalised in place (fp32 math, rounded to the I/O type as the tile GEMM's A tile is);
//   2. hidden = silu(A @ w1^T + b1) in chunks of 128 of F, each warp 32 of them: the hidden
//      tile [16][F] stays in shared memory, in the I/O type (as the hidden map of the two
//      launches was; fp32 for fp32);
//   3. out = hidden @ w2^T + b2 + x in chunks of 128 of d, each warp 32: the accumulators go
//      through the warp's [16][32] fp32 rows (in the A tile's memory, free by then), so that a
//      lane takes 16 bytes of a pixel's channels: b2, a 16-byte load of x and one 16-byte store
//      where d is whole chunks and x and out are channel-fastest with aligned pixels; element
//      by element otherwise.
// The four warps share the 16 rows and split the output columns, so no W element is used by
// two warps: each warp stages its own W tiles (32 output channels x kK of K, along W's
// unit-stride dimension: k-fastest for a row-major W, n-fastest for the fast models' K-major
// packing) in two stages of its own and synchronises with __syncwarp alone; one __syncthreads
// after the A tile, one between the two GEMMs. W tiles move by 16-byte chunks where W's
// unit-stride dimension has stride 1 and its base and other stride are 16-byte aligned: cp.async
// on sm_80+ (the next step's chunks in flight while the current step computes; a chunk cut by
// the end of a line reads only the line and zero-fills the rest), 16-byte loads into registers
// stored after the math on sm_75 (gemm::ChunkCopy); element by element otherwise. Math:
// fp16/bf16 mma.sync m16n8k16 (fp32 accumulators), A (or hidden) by ldmatrix, W by ldmatrix
// (.trans for the n-fastest tile); fp32 SIMT IEEE FMAs, a lane per output column (no TF32).
//
// transformer_mlp_project (csrc/transformer_mlp_project.cu) runs here too, where
// transformer_mlp_project_fused (mvit3.h): fused_mlp_kernel<T, kProject = true> forms the second
// GEMM's out = acc + b2 + x per accumulator and keeps it, rounded, in [16][d] t rows where the A
// tile was (each warp copies its columns of them to out); after a block barrier their LayerNorm
// goes to the hidden tile's place (free by then), and after another the projection runs as a
// third GEMM (K = d, chunks of 128 of Cout) with the same W staging and step driver, its
// accumulators through the warp's fp32 rows to act(acc + bias), 16-byte stores where aligned.
// No shared memory beyond the FFN's.
//
// separable_attention's second launch runs here too (fused_separable_attention_out, where
// separable_attention_fused): F = d, w1 / b1 the v rows of qkv, and the hidden activation
// relu(acc + b1) * context[b, p, n] of the pixel's sequence p = 2 (y % 2) + x % 2
// (FusedMlpArgs::context) in place of silu.
//
// Elsewhere (any d > 256 or F > 512; fp32 tiles past the device's limit: an sm_75's past
// d 224 / F 448) it is two tile GEMMs through pointwise_conv: the first has the norm as its
// prologue and SiLU as its epilogue and writes the hidden map [B, F, H, W] (the workspace
// TransformerMlpArgs::hidden, in the I/O dtype); the second adds b2 and the residual x.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

constexpr int kRows = 16;                    // pixels a block
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpN = 32;                   // output channels of a warp per chunk
constexpr int kChunkN = kWarps * kWarpN;     // output channels of the block per chunk
constexpr int kNormLanes = kThreads / kRows;  // threads per pixel for the norm

template <class T>
struct FusedMlpTiles {
  static constexpr bool kMma = !std::is_same_v<T, float>;
  // fp32's tiles, twice as wide, take dynamic shared memory sized from the call's d and F
  // (fused_mlp_layout); 16-bit's static shared memory, the widest tiles.
  static constexpr bool kDynamic = !kMma;
  static constexpr int kChunk = 16 / int(sizeof(T));  // elements in 16 bytes
  static constexpr int kMaxDim = kFusedMlpMaxDim;
  static constexpr int kMaxFfn = 2 * kMaxDim;
  static constexpr int kK = kMma ? 32 : 16;  // K of a W tile (a step)
  // Rows padded by one chunk: 16-bit rows are then an odd number of 16-byte units (ldmatrix
  // without bank conflicts), fp32 rows stay 16-byte aligned (float4 reads). The widest tiles'
  // (fp32's at d 256 / F 512).
  static constexpr int kLdA = kMaxDim + kChunk;
  static constexpr int kLdH = kMaxFfn + kChunk;
  static constexpr int kLdK = kK + kChunk;      // k-fastest W tile [kWarpN][kLdK]
  static constexpr int kLdN = kWarpN + kChunk;  // n-fastest W tile [kK][kLdN]
  static constexpr int kTileElems = std::max(kWarpN * kLdK, kK * kLdN);
  static constexpr int kLdOut = kWarpN + 4;     // a warp's fp32 output rows [kRows][kLdOut]
  static constexpr int kHiddenBytes = kRows * kLdH * int(sizeof(T));
  static constexpr int kABytes = std::max(kRows * kLdA * int(sizeof(T)),
                                          kWarps * kRows * kLdOut * int(sizeof(float)));
  static constexpr int kWBytes = kWarps * 2 * kTileElems * int(sizeof(T));
  // 16-byte chunks of a W tile per lane (one step of the warp).
  static constexpr int kCopies = kWarpN * kK / kChunk / 32;
  static_assert(kCopies * 32 * kChunk == kWarpN * kK, "whole chunks per lane");
  static_assert(kMaxDim % kK == 0 && kMaxFfn % kWarpN == 0 && kMaxFfn % kK == 0,
                "padded K of either GEMM stays inside the tiles");
  static_assert((kTileElems * int(sizeof(T))) % 16 == 0 && (kLdA * int(sizeof(T))) % 16 == 0 &&
                    (kLdH * int(sizeof(T))) % 16 == 0,
                "rows and tiles 16-byte aligned");
};

// What a block knows of each of its pixels.
struct Pixel {
  int64_t x_offset;  // of the pixel's channel 0 in x
  int b;             // sample; -1 past the last pixel
  int y, x;
};

// A block's shared memory: the row strides (elements) of the A tile (also of the kProject t
// and normalised rows) and of the hidden tile, and the bytes of its regions, in this order:
// the hidden tile, the A tile (then the warps' fp32 output rows), the warps' W tiles, the
// pixels. 16-bit: the static tiles, the widest, for any d and F. fp32: sized from d and F (the
// dynamic shared memory of the launch): the first GEMM reads the A tile's columns up to d
// rounded up to kK and writes the hidden tile's up to F rounded up to kWarpN, the second reads
// them up to F rounded up to kK; the normalised rows (ld_a) take the hidden tile's place.
struct FusedMlpLayout {
  int ld_a, ld_h;
  int hidden_bytes, a_bytes, w_bytes, pixel_bytes;
  __host__ __device__ constexpr int total() const {
    return hidden_bytes + a_bytes + w_bytes + pixel_bytes;
  }
};

__host__ __device__ constexpr int round_up(int n, int multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

template <class T>
__host__ __device__ constexpr FusedMlpLayout fused_mlp_layout(int dim, int ffn) {
  using Tile = FusedMlpTiles<T>;
  if constexpr (!Tile::kDynamic) {
    return {Tile::kLdA, Tile::kLdH, Tile::kHiddenBytes, Tile::kABytes, Tile::kWBytes,
            kRows * int(sizeof(Pixel))};
  } else {
    FusedMlpLayout l{};
    l.ld_a = round_up(dim, Tile::kK) + Tile::kChunk;
    l.ld_h = std::max(round_up(ffn, kWarpN), round_up(dim, Tile::kK)) + Tile::kChunk;
    l.hidden_bytes = kRows * l.ld_h * int(sizeof(T));
    l.a_bytes = std::max(kRows * l.ld_a * int(sizeof(T)),
                         kWarps * kRows * Tile::kLdOut * int(sizeof(float)));
    l.w_bytes = Tile::kWBytes;
    l.pixel_bytes = kRows * int(sizeof(Pixel));
    return l;
  }
}

// A weight with its staging decisions (the host's).
struct Weight {
  Matrix m;
  bool n_fastest;  // only the output dimension (rows of W) is unit-stride: tile [k][n]
  bool chunked;    // its unit-stride dimension moves by 16-byte chunks
};

struct FusedMlpArgs {
  Map x, out;
  int batch, height, width, dim, ffn;
  Norm norm;
  const void* norm_weight;
  const void* norm_bias;
  float eps;
  const float* group_stats;
  Weight w1, w2;
  const void* b1;
  const void* b2;
  // separable_attention's second launch (fused_separable_attention_out): the hidden activation
  // is relu(v) * context[b, p, :] of the pixel's sequence p instead of silu; [B, 4, F], or null.
  const float* context;
  bool x_chunked;    // x channels_last with aligned pixels and d whole chunks (A and residual)
  bool out_chunked;  // and out too: 16-byte output stores
  int64_t first_block;
  // The projection of the fused transformer_mlp_project (the kProject kernels only):
  // z = act(LayerNorm(out) @ w3^T + b3), out's rows kept in shared memory.
  Map z;
  int cout;
  Weight w3;
  const void* b3;                // [cout] or null
  const void* proj_norm_weight;  // [d] or null
  const void* proj_norm_bias;    // [d] or null
  float proj_eps;
  Act act;
  bool z_chunked;  // z channels_last with aligned pixels and cout whole chunks
};

template <class T, bool kProject>
MVIT3_DEVICE void fused_mlp_body(const FusedMlpArgs& args) {
  using Tile = FusedMlpTiles<T>;
  constexpr int kChunk = Tile::kChunk, kK = Tile::kK, kLdA = Tile::kLdA, kLdH = Tile::kLdH;
  constexpr int kLdK = Tile::kLdK, kLdN = Tile::kLdN, kLdOut = Tile::kLdOut;
  // The block's tiles (fused_mlp_layout): 16-bit's static, the widest (ld_a == kLdA,
  // ld_h == kLdH); fp32's carved from the launch's dynamic shared memory for d and F.
  const FusedMlpLayout layout = fused_mlp_layout<T>(args.dim, args.ffn);
  const int ld_a = layout.ld_a, ld_h = layout.ld_h;
  T* hidden;
  unsigned char* a_region;  // the A tile, then (in the second GEMM) the warps' fp32 output rows
  T* w_tiles;
  Pixel* pixels;
  if constexpr (Tile::kDynamic) {
    MVIT3_SHARED_DYNAMIC(shared, 16);
    hidden = reinterpret_cast<T*>(shared);
    a_region = shared + layout.hidden_bytes;
    w_tiles = reinterpret_cast<T*>(a_region + layout.a_bytes);
    pixels = reinterpret_cast<Pixel*>(a_region + layout.a_bytes + layout.w_bytes);
  } else {
    MVIT3_SHARED_ALIGNED(T[kRows * kLdH], hidden_static, 16);
    MVIT3_SHARED_ALIGNED(unsigned char[Tile::kABytes], a_static, 16);
    MVIT3_SHARED_ALIGNED(T[Tile::kWBytes / int(sizeof(T))], w_static, 16);
    MVIT3_SHARED(Pixel[kRows], pixels_static);
    hidden = hidden_static;
    a_region = a_static;
    w_tiles = w_static;
    pixels = pixels_static;
  }
  T* const a_tile = reinterpret_cast<T*>(a_region);
  // kProject: the second GEMM's out rows [16][d] (as stored) take the A tile's place, free by
  // then; their LayerNorm goes to the hidden tile's, free after the second GEMM (ld_a there
  // too), the third GEMM's A operand.
  T* const t_rows = a_tile;
  T* const normed_rows = hidden;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int dim = args.dim, ffn = args.ffn;
  const int hw = args.height * args.width;
  const int64_t pixel_count = int64_t(args.batch) * hw;
  const int64_t m0 = (args.first_block + blockIdx.x) * kRows;
  const T* x = static_cast<const T*>(args.x.data);

  // ---- the warp's steps: W tiles of the first GEMM (its chunks of F), then of the second
  // (its chunks of d); a chunk takes k_steps of kK
  // (kProject: then of the third, its chunks of cout, K = d)
  const int k1_steps = (dim + kK - 1) / kK, k2_steps = (ffn + kK - 1) / kK;
  auto warp_chunks = [&](int n) {  // chunks c with c * kChunkN + kWarpN * warp < n
    const int left = n - kWarpN * warp;
    return left > 0 ? (left + kChunkN - 1) / kChunkN : 0;
  };
  const int steps1 = warp_chunks(ffn) * k1_steps;
  const int steps2 = steps1 + warp_chunks(dim) * k2_steps;
  const int steps = kProject ? steps2 + warp_chunks(args.cout) * k1_steps : steps2;
  // The three GEMMs' W [N, K] and sizes.
  auto weight_at = [&](int gemm) -> const Weight& {
    return gemm == 0 ? args.w1 : gemm == 1 ? args.w2 : args.w3;
  };
  auto n_size_at = [&](int gemm) { return gemm == 0 ? ffn : gemm == 1 ? dim : args.cout; };
  auto k_size_at = [&](int gemm) { return gemm == 1 ? ffn : dim; };
  struct Where {
    int gemm, n0, k0, k_step;
    bool last;  // the last step of its chunk
  };
  auto where = [&](int s) {
    Where w;
    w.gemm = s < steps1 ? 0 : s < steps2 ? 1 : 2;
    const int t = w.gemm == 0 ? s : w.gemm == 1 ? s - steps1 : s - steps2;
    const int k_steps = w.gemm == 1 ? k2_steps : k1_steps;
    w.k_step = t % k_steps;
    w.last = w.k_step == k_steps - 1;
    w.n0 = t / k_steps * kChunkN + kWarpN * warp;
    w.k0 = w.k_step * kK;
    return w;
  };
  auto tile_of = [&](int s) { return w_tiles + (2 * warp + s % 2) * Tile::kTileElems; };

  // W tile of step s: kWarpN output channels from n0, kK of K from k0; 0 past N or K.
  gemm::ChunkCopy copies[Tile::kCopies];
  auto fetch = [&](int s) {  // by chunks (args.wN.chunked)
    const Where at = where(s);
    const Weight& w = weight_at(at.gemm);
    const int n_size = n_size_at(at.gemm), k_size = k_size_at(at.gemm);
    const T* weight = static_cast<const T*>(w.m.data);
    const int per_line = (w.n_fastest ? kWarpN : kK) / kChunk;
    const int lines = w.n_fastest ? k_size : n_size, length = w.n_fastest ? n_size : k_size;
    const int line0 = w.n_fastest ? at.k0 : at.n0, along0 = w.n_fastest ? at.n0 : at.k0;
    const int64_t line_stride = w.n_fastest ? w.m.stride_col : w.m.stride_row;
    T* tile = tile_of(s);
    MVIT3_UNROLL
    for (int i = 0; i < Tile::kCopies; ++i) {
      const int e = lane + 32 * i, l = e / per_line, a = e % per_line * kChunk;
      const int left = line0 + l < lines ? length - (along0 + a) : 0;
      const int count = left < 0 ? 0 : left < kChunk ? left : kChunk;
      const T* src = count > 0 ? weight + (line0 + l) * line_stride + along0 + a : weight;
      copies[i].fetch(tile + l * (w.n_fastest ? kLdN : kLdK) + a, src, count * int(sizeof(T)));
    }
  };
  auto land = [&] {
    MVIT3_UNROLL
    for (int i = 0; i < Tile::kCopies; ++i) copies[i].land();
  };
  auto stage_elements = [&](int s) {  // element by element, through the strides
    const Where at = where(s);
    const Weight& w = weight_at(at.gemm);
    const int n_size = n_size_at(at.gemm), k_size = k_size_at(at.gemm);
    const T* weight = static_cast<const T*>(w.m.data);
    const bool k_contiguous = w.m.stride_col == 1;
    T* tile = tile_of(s);
    for (int e = lane; e < kWarpN * kK; e += 32) {
      const int n = k_contiguous ? e / kK : e % kWarpN, k = k_contiguous ? e % kK : e / kWarpN;
      const int o = at.n0 + n, kk = at.k0 + k;
      tile[w.n_fastest ? k * kLdN + n : n * kLdK + k] =
          o < n_size && kk < k_size ? weight[o * w.m.stride_row + kk * w.m.stride_col]
                                    : from_float<T>(0.0f);
    }
  };
  auto chunked = [&](int s) { return weight_at(s < steps1 ? 0 : s < steps2 ? 1 : 2).chunked; };

  // The first W tile is in flight while the A tile is built.
  if (steps > 0 && chunked(0)) fetch(0);

  // ---- the pixels and the A tile
  if (tid < kRows) {
    Pixel p{};
    p.b = -1;
    const int64_t m = m0 + tid;
    if (m < pixel_count) {
      p.b = int(m / hw);
      const int rest = int(m % hw);
      p.y = rest / args.width;
      p.x = rest % args.width;
      p.x_offset = map_offset(args.x, p.b, 0, p.y, p.x);
    }
    pixels[tid] = p;
  }
  __syncthreads();
  // Raw x, 0 in the columns d .. (d rounded up to kK) - 1 the first GEMM reads and in the rows
  // past the last pixel.
  const int a_columns = k1_steps * kK;
  if (args.x_chunked) {
    const int per_row = a_columns / kChunk;
    for (int e = tid; e < kRows * per_row; e += kThreads) {
      const int r = e / per_row, c = e % per_row * kChunk;
      const Pixel& p = pixels[r];
      uint4 bits = make_uint4(0, 0, 0, 0);
      if (p.b >= 0 && c < dim) bits = *reinterpret_cast<const uint4*>(x + p.x_offset + c);
      *reinterpret_cast<uint4*>(a_tile + r * ld_a + c) = bits;
    }
  } else {
    const bool channels_fastest = args.x.stride_c == 1;
    for (int e = tid; e < kRows * a_columns; e += kThreads) {
      const int r = channels_fastest ? e / a_columns : e % kRows;
      const int c = channels_fastest ? e % a_columns : e / kRows;
      const Pixel& p = pixels[r];
      a_tile[r * ld_a + c] = p.b >= 0 && c < dim ? x[p.x_offset + c * args.x.stride_c]
                                                 : from_float<T>(0.0f);
    }
  }
  __syncthreads();
  // Normalise a [16][d] tile (ld_a) into dst (in place where dst == src): kNormLanes
  // neighbouring threads a pixel (the same warp); LayerNorm statistics in fp32, two passes
  // (mean, then centred squares).
  auto normalise = [&](const T* src, T* dst, Norm norm, const void* norm_weight,
                       const void* norm_bias, float eps) {
    static_assert(kThreads == kNormLanes * kRows && 32 % kNormLanes == 0, "lanes per pixel");
    const int r = tid / kNormLanes, part = tid % kNormLanes;
    const Pixel& p = pixels[r];
    const T* row = src + r * ld_a;
    float mean = 0.0f, rstd = 1.0f;
    if (norm == Norm::layer) {
      float sum = 0.0f;
      if (p.b >= 0)
        for (int c = part; c < dim; c += kNormLanes) sum += to_float(row[c]);
      MVIT3_UNROLL
      for (int mask = 1; mask < kNormLanes; mask <<= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, mask);
      mean = sum / float(dim);
      float squares = 0.0f;
      if (p.b >= 0)
        for (int c = part; c < dim; c += kNormLanes) {
          const float v = to_float(row[c]) - mean;
          squares += v * v;
        }
      MVIT3_UNROLL
      for (int mask = 1; mask < kNormLanes; mask <<= 1)
        squares += __shfl_xor_sync(0xffffffffu, squares, mask);
      rstd = rsqrtf(squares / float(dim) + eps);
    } else if (norm == Norm::group && p.b >= 0) {
      const float* stats = args.group_stats + 2 * int64_t(p.b);  // [B, 2]
      mean = stats[0];
      rstd = stats[1];
    }
    if (norm != Norm::none && p.b >= 0) {
      const T* weight = static_cast<const T*>(norm_weight);
      const T* bias = static_cast<const T*>(norm_bias);
      for (int c = part; c < dim; c += kNormLanes) {
        float v = (to_float(row[c]) - mean) * rstd;
        if (weight) v *= to_float(weight[c]);
        if (bias) v += to_float(bias[c]);
        dst[r * ld_a + c] = from_float<T>(v);
      }
    }
  };
  normalise(a_tile, a_tile, args.norm, args.norm_weight, args.norm_bias, args.eps);
  if (steps > 0) {
    if (chunked(0))
      land();
    else
      stage_elements(0);
  }
  __syncthreads();  // the A tile and every warp's first W tile are in place

  // ---- the two GEMMs
  const T* b1 = static_cast<const T*>(args.b1);
  const T* b2 = static_cast<const T*>(args.b2);
  T* out = static_cast<T*>(args.out.data);
  float* out_rows = reinterpret_cast<float*>(a_region) + warp * kRows * kLdOut;

  const T* b3 = static_cast<const T*>(args.b3);
  T* z = static_cast<T*>(args.z.data);

  // The hidden unit n < F of row r from its first-GEMM sum v = acc + b1: silu(v), or
  // relu(v) * context of the pixel's sequence (0 past the last pixel).
  auto hidden_value = [&](int r, int n, float v) {
    if (!args.context) return silu(v);
    const Pixel& p = pixels[r];
    if (p.b < 0) return 0.0f;
    const int64_t sequence = int64_t(p.b) * 4 + 2 * (p.y % 2) + p.x % 2;
    return fmaxf(v, 0.0f) * args.context[sequence * ffn + n];
  };

  // A last step's accumulator of row r, column c of the warp's chunk at.n0: to out_rows, or
  // (kProject, the second GEMM) + b2 + x, rounded, to t_rows, which keep it.
  auto stage_acc = [&](const Where& at, int r, int c, float v) {
    if (kProject && at.gemm == 1) {
      const Pixel& p = pixels[r];
      const int o = at.n0 + c;
      if (p.b >= 0 && o < dim)
        t_rows[r * ld_a + o] =
            from_float<T>(v + (to_float(b2[o]) + to_float(x[p.x_offset + o * args.x.stride_c])));
    } else {
      out_rows[r * kLdOut + c] = v;
    }
  };

  // The warp's output columns n0 .. n0 + 31 of GEMM `gemm` to its output. The second GEMM's:
  // out_rows + b2 + x to out, or (kProject) a copy of t_rows; the third's: act(out_rows + b3)
  // to z.
  auto emit = [&](int gemm, int n0) {
    __syncwarp();  // the warp's accumulators are in out_rows (t_rows)
    const bool ffn_out = gemm == 1;
    const int n_size = ffn_out ? dim : args.cout;
    const T* bias = ffn_out ? b2 : b3;
    const Map& dst_map = ffn_out ? args.out : args.z;
    T* dst = ffn_out ? out : z;
    const bool copy = kProject && ffn_out;
    if (ffn_out ? args.out_chunked : args.z_chunked) {
      constexpr int kPerRow = kWarpN / kChunk;
      for (int e = lane; e < kRows * kPerRow; e += 32) {
        const int r = e / kPerRow, c = e % kPerRow * kChunk, o = n0 + c;
        const Pixel& p = pixels[r];
        if (p.b < 0 || o >= n_size) continue;  // whole chunks: o < n_size covers the chunk
        T* to = dst + map_offset(dst_map, p.b, o, p.y, p.x);
        if (copy) {
          *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(t_rows + r * ld_a + o);
          continue;
        }
        float v[kChunk];
        gemm::load_floats(v, out_rows + r * kLdOut + c);
        if (ffn_out) {
          T res[kChunk];
          gemm::load_chunk(res, x + p.x_offset + o);
          MVIT3_UNROLL
          for (int i = 0; i < kChunk; ++i) v[i] += to_float(bias[o + i]) + to_float(res[i]);
        } else {
          MVIT3_UNROLL
          for (int i = 0; i < kChunk; ++i)
            v[i] = apply_act(bias ? v[i] + to_float(bias[o + i]) : v[i], args.act);
        }
        gemm::store_chunk(to, v);
      }
    } else {
      for (int e = lane; e < kRows * kWarpN; e += 32) {
        const int r = e / kWarpN, c = e % kWarpN, o = n0 + c;
        const Pixel& p = pixels[r];
        if (p.b < 0 || o >= n_size) continue;
        T* to = dst + map_offset(dst_map, p.b, o, p.y, p.x);
        if (copy) {
          *to = t_rows[r * ld_a + o];
          continue;
        }
        float v = out_rows[r * kLdOut + c];
        if (ffn_out)
          v += to_float(bias[o]) + to_float(x[p.x_offset + o * args.x.stride_c]);
        else
          v = apply_act(bias ? v + to_float(bias[o]) : v, args.act);
        *to = from_float<T>(v);
      }
    }
    __syncwarp();  // read before the next chunk's accumulators overwrite them
  };

  // The steps: the math of step s (`compute`) on its W tile, staged, while step s + 1's tile is
  // in flight; the first GEMM's steps, a block barrier, then the second GEMM's.
  auto run_steps = [&](auto&& compute) {
    auto step = [&](int s) {
      const bool more = s + 1 < steps;
      if (more && chunked(s + 1)) fetch(s + 1);
      compute(where(s), tile_of(s));
      if (more) {
        if (chunked(s + 1))
          land();
        else
          stage_elements(s + 1);
      }
      __syncwarp();  // step s + 1's tile is the warp's; step s's may be rewritten
    };
    int s = 0;
    for (; s < steps1; ++s) step(s);
    __syncthreads();  // every hidden column is written, the A tile is free for out_rows
    for (; s < steps2; ++s) step(s);
    if constexpr (kProject) {
      __syncthreads();  // every out row is in t_rows, the hidden tile is free
      normalise(t_rows, normed_rows, Norm::layer, args.proj_norm_weight, args.proj_norm_bias,
                args.proj_eps);
      // 0 where the normalisation writes nothing: the columns d .. (d rounded up to kK) - 1 the
      // third GEMM reads, the rows past the last pixel
      for (int e = tid; e < kRows * a_columns; e += kThreads) {
        const int r = e / a_columns, c = e % a_columns;
        if (pixels[r].b < 0 || c >= dim) normed_rows[r * ld_a + c] = from_float<T>(0.0f);
      }
      __syncthreads();
      for (; s < steps; ++s) step(s);
    }
  };

  if constexpr (Tile::kMma) {
    static_assert(!Tile::kDynamic, "16-bit: the static tiles, ld_a == kLdA and ld_h == kLdH");
    float acc[kWarpN / 8][4];
    run_steps([&](const Where& at, const T* tile) {
      if (at.k_step == 0) {
        MVIT3_UNROLL
        for (int j = 0; j < kWarpN / 8; ++j)
          MVIT3_UNROLL
          for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
      }
      const bool n_fastest = weight_at(at.gemm).n_fastest;
      const T* a_row = at.gemm == 0   ? a_tile + (lane % 16) * kLdA
                       : at.gemm == 1 ? hidden + (lane % 16) * kLdH
                                      : normed_rows + (lane % 16) * kLdA;
      a_row += at.k0 + 8 * (lane / 16);
      MVIT3_UNROLL
      for (int ks = 0; ks < kK / 16; ++ks) {
        uint32_t a[4];
        ldmatrix<4>(a, a_row + 16 * ks);
        MVIT3_UNROLL
        for (int np = 0; np < kWarpN / 16; ++np) {
          // b of n8 tiles 2 np (regs 0, 1) and 2 np + 1 (regs 2, 3): of [k][n] rows with
          // .trans, or of [n][k] rows
          uint32_t b[4];
          if (n_fastest)
            ldmatrix<4, true>(b, tile + (16 * ks + lane % 16) * kLdN + 16 * np + 8 * (lane / 16));
          else
            ldmatrix<4>(b, tile + (16 * np + lane % 8 + 8 * (lane / 16)) * kLdK + 16 * ks +
                               8 * (lane / 8 % 2));
          const uint32_t b0[2] = {b[0], b[1]}, b1_[2] = {b[2], b[3]};
          mma_m16n8k16<T>(acc[2 * np], a, b0, acc[2 * np]);
          mma_m16n8k16<T>(acc[2 * np + 1], a, b1_, acc[2 * np + 1]);
        }
      }
      const int g = lane / 4, t = lane % 4;
      if (at.gemm == 0 && at.last) {
        // hidden = its activation of acc + b1, 0 past F (the second GEMM's padded K reads it)
        MVIT3_UNROLL
        for (int j = 0; j < kWarpN / 8; ++j) {
          const int n = at.n0 + 8 * j + 2 * t;
          const float bias0 = n < ffn ? to_float(b1[n]) : 0.0f;
          const float bias1 = n + 1 < ffn ? to_float(b1[n + 1]) : 0.0f;
          MVIT3_UNROLL
          for (int half = 0; half < 2; ++half) {
            const int r = g + 8 * half;
            const float v0 = n < ffn ? hidden_value(r, n, acc[j][2 * half] + bias0) : 0.0f;
            const float v1 = n + 1 < ffn ? hidden_value(r, n + 1, acc[j][2 * half + 1] + bias1) : 0.0f;
            *reinterpret_cast<uint32_t*>(hidden + r * kLdH + n) =
                pack_pair<T>(v0, v1);
          }
        }
      } else if (at.gemm > 0 && at.last) {
        MVIT3_UNROLL
        for (int j = 0; j < kWarpN / 8; ++j)
          MVIT3_UNROLL
          for (int i = 0; i < 4; ++i)
            stage_acc(at, g + 8 * (i / 2), 8 * j + 2 * t + i % 2, acc[j][i]);
        emit(at.gemm, at.n0);
      }
    });
  } else {
    float acc[kRows];  // column n0 + lane of the warp's chunk
    run_steps([&](const Where& at, const T* tile) {
      if (at.k_step == 0) {
        MVIT3_UNROLL
        for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
      }
      const bool n_fastest = weight_at(at.gemm).n_fastest;
      const T* rows = at.gemm == 0 ? a_tile : at.gemm == 1 ? hidden : normed_rows;
      const int ld = at.gemm == 1 ? ld_h : ld_a;
      rows += at.k0;
      MVIT3_UNROLL
      for (int k = 0; k < kK; k += 4) {
        float4 w;
        if (n_fastest) {
          const T* column = tile + k * kLdN + lane;
          w = float4{column[0], column[kLdN], column[2 * kLdN], column[3 * kLdN]};
        } else {
          w = *reinterpret_cast<const float4*>(tile + lane * kLdK + k);
        }
        MVIT3_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const float4 h = *reinterpret_cast<const float4*>(rows + r * ld + k);
          acc[r] = fmaf(h.x, w.x, acc[r]);
          acc[r] = fmaf(h.y, w.y, acc[r]);
          acc[r] = fmaf(h.z, w.z, acc[r]);
          acc[r] = fmaf(h.w, w.w, acc[r]);
        }
      }
      const int n = at.n0 + lane;
      if (at.gemm == 0 && at.last) {
        const float bias = n < ffn ? to_float(b1[n]) : 0.0f;
        MVIT3_UNROLL
        for (int r = 0; r < kRows; ++r)
          hidden[r * ld_h + n] = n < ffn ? hidden_value(r, n, acc[r] + bias) : 0.0f;
      } else if (at.gemm > 0 && at.last) {
        MVIT3_UNROLL
        for (int r = 0; r < kRows; ++r) stage_acc(at, r, lane, acc[r]);
        emit(at.gemm, at.n0);
      }
    });
  }
}

template <class T, bool kProject>
__global__ void __launch_bounds__(kThreads) fused_mlp_kernel(FusedMlpArgs args) {
  if constexpr (arch_supports<T>()) fused_mlp_body<T, kProject>(args);
}

// The staging decisions of a weight (see the top of the file).
template <class T>
Weight weight_of(const Matrix& m) {
  Weight w;
  w.m = m;
  w.n_fastest = m.stride_row == 1 && m.stride_col != 1;
  const int64_t line_stride = w.n_fastest ? m.stride_col : m.stride_row;
  w.chunked = (w.n_fastest || m.stride_col == 1) && reinterpret_cast<uintptr_t>(m.data) % 16 == 0 &&
              (line_stride * int64_t(sizeof(T))) % 16 == 0;
  return w;
}

// project: the projection of transformer_mlp_project (with kProject), or null; context:
// separable_attention's (FusedMlpArgs::context), or null.
template <class T, bool kProject>
void fused_mlp(const TransformerMlpArgs& args, const PointwiseConvArgs* project,
               const float* context, Stream stream) {
  using Tile = FusedMlpTiles<T>;
  static_assert(Tile::kDynamic || fused_mlp_layout<T>(1, 1).total() <= kSharedBytesWithoutOptIn,
                "a block's tiles fit the static shared memory");
  static_assert(Tile::kLdA <= Tile::kLdH, "the normalised t rows fit the hidden tile");
  constexpr FusedMlpLayout kWidest = fused_mlp_layout<T>(Tile::kMaxDim, Tile::kMaxFfn);
  static_assert(kWidest.ld_a == Tile::kLdA && kWidest.ld_h == Tile::kLdH &&
                    kWidest.hidden_bytes == Tile::kHiddenBytes && kWidest.a_bytes == Tile::kABytes,
                "fp32's tiles at d 256 / F 512 are the widest, as laid out for 16-bit");
  FusedMlpArgs f{};
  f.x = args.x;
  f.out = args.out;
  f.batch = args.batch;
  f.height = args.height;
  f.width = args.width;
  f.dim = args.dim;
  f.ffn = args.ffn_dim;
  f.norm = args.norm;
  f.norm_weight = args.norm_weight;
  f.norm_bias = args.norm_bias;
  f.eps = args.eps;
  f.group_stats = args.group_stats;
  f.w1 = weight_of<T>(args.w1);
  f.w2 = weight_of<T>(args.w2);
  f.b1 = args.b1;
  f.b2 = args.b2;
  f.context = context;
  f.x_chunked = gemm::chunked_rows<T>(args.x) && args.dim % Tile::kChunk == 0;
  f.out_chunked = f.x_chunked && gemm::chunked_rows<T>(args.out);
  if (kProject) {
    f.z = project->out;
    f.cout = project->cout;
    f.w3 = weight_of<T>(project->weight);
    f.b3 = project->bias;
    f.proj_norm_weight = project->norm_weight;
    f.proj_norm_bias = project->norm_bias;
    f.proj_eps = project->eps;
    f.act = project->act;
    f.z_chunked = gemm::chunked_rows<T>(project->out) && project->cout % Tile::kChunk == 0;
  }
  // fp32: the call's dynamic shared memory; the kernel is allowed the most it can take on the
  // device (its widest tiles', or the device's limit), once.
  const auto kernel = &fused_mlp_kernel<T, kProject>;
  size_t dynamic_bytes = 0;
  if constexpr (Tile::kDynamic) {
    dynamic_bytes = size_t(fused_mlp_layout<T>(args.dim, args.ffn_dim).total());
    if (int64_t(dynamic_bytes) > kSharedBytesWithoutOptIn)
      allow_dynamic_shared(kernel, size_t(std::min(int64_t(kWidest.total()), args.shared_limit)));
  }
  const int64_t pixels = int64_t(args.batch) * args.height * args.width;
  launch_chunks(ceil_div(pixels, kRows), 1, [&](int64_t first, int64_t count) {
    f.first_block = first;
    launch_with_dynamic_shared(kernel, grid_of(count), dim3(kThreads), dynamic_bytes, stream, f);
  });
}

}  // namespace

int64_t fused_mlp_shared_bytes(DType dtype, int dim, int ffn_dim) {
  int64_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    bytes = fused_mlp_layout<typename decltype(tag)::type>(dim, ffn_dim).total();
  });
  return bytes;
}

void transformer_mlp(const TransformerMlpArgs& args, DType dtype, Stream stream) {
  if (args.batch == 0 || args.height == 0 || args.width == 0 || args.dim == 0) return;
  if (transformer_mlp_fused(dtype, args.dim, args.ffn_dim, args.shared_limit)) {
    if (args.norm == Norm::group) {
      group_norm_stats({args.x, args.batch, args.dim, args.height, args.width, args.eps, args.group_stats},
                       dtype, stream);
    }
    dispatch_dtype(dtype, [&](auto tag) {
      fused_mlp<typename decltype(tag)::type, false>(args, nullptr, nullptr, stream);
    });
    return;
  }

  PointwiseConvArgs expand;
  expand.x = args.x;
  expand.out = args.hidden;
  expand.batch = args.batch;
  expand.height = args.height;
  expand.width = args.width;
  expand.c1 = args.dim;
  expand.cout = args.ffn_dim;
  expand.weight = args.w1;
  expand.bias = args.b1;
  expand.norm = args.norm;
  expand.norm_weight = args.norm_weight;
  expand.norm_bias = args.norm_bias;
  expand.eps = args.eps;
  expand.group_stats = args.group_stats;
  expand.act = Act::silu;
  pointwise_conv(expand, dtype, stream);

  PointwiseConvArgs reduce;
  reduce.x = args.hidden;
  reduce.residual = args.x;
  reduce.out = args.out;
  reduce.batch = args.batch;
  reduce.height = args.height;
  reduce.width = args.width;
  reduce.c1 = args.ffn_dim;
  reduce.cout = args.dim;
  reduce.weight = args.w2;
  reduce.bias = args.b2;
  pointwise_conv(reduce, dtype, stream);
}

void fused_transformer_mlp_project(const TransformerMlpProjectArgs& args, DType dtype,
                                   Stream stream) {
  if (args.mlp.batch == 0 || args.mlp.height == 0 || args.mlp.width == 0) return;
  if (!transformer_mlp_project_fused(dtype, args.mlp.dim, args.mlp.ffn_dim, args.project.cout,
                                     args.mlp.shared_limit))
    throw std::runtime_error("fused_transformer_mlp_project: not transformer_mlp_project_fused");
  dispatch_dtype(dtype, [&](auto tag) {
    fused_mlp<typename decltype(tag)::type, true>(args.mlp, &args.project, nullptr, stream);
  });
}

void fused_separable_attention_out(const TransformerMlpArgs& mlp, const float* context, DType dtype,
                                   Stream stream) {
  if (mlp.batch == 0 || mlp.height == 0 || mlp.width == 0) return;
  if (!separable_attention_fused(dtype, mlp.dim, mlp.shared_limit) || mlp.ffn_dim != mlp.dim)
    throw std::runtime_error("fused_separable_attention_out: not separable_attention_fused");
  dispatch_dtype(dtype, [&](auto tag) {
    fused_mlp<typename decltype(tag)::type, false>(mlp, nullptr, context, stream);
  });
}

}  // namespace mvit3
