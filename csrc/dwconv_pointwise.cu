// dwconv_pointwise: out = silu(depthwise3x3(h, stride, dilation, padding = dilation) + dw_bias)
// @ weight^T + bias + residual, h = x or, with expand_weight, h = silu(x @ expand_weight^T +
// expand_bias). Semantics: mvit3.ops.reference.dwconv_pointwise. The second half of an MV2 block
// and the local representation of a MobileViT block (dilated in the v2-style dense backbones);
// with expand_weight the whole MV2 block.
//
// Without expand_weight: one tile GEMM whose producer computes the depthwise conv while staging
// the A tile, so the [B, C, Ho, Wo] intermediate never reaches memory. Each block recomputes the
// depthwise values of its pixels for its kBlockN output channels: 9 FMAs per staged element,
// cheap next to the kBlockN FMAs the element then feeds.
//
// With expand_weight (mv2_block_fused in mvit3.h: dilation 1, at most kMv2MaxInChannels block
// input channels): one kernel for the whole MV2 block (mv2_block_kernel below), so neither the
// expanded map [B, C, H, W] nor the depthwise output reaches memory. Otherwise (dilated, or a
// wider input) ops.cpp runs the expansion as a pointwise_conv launch into a workspace first.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

template <class T>
struct DwconvProducer {
  Map x;
  int height = 0, width = 0, stride = 1, dilation = 1;
  const T* dw_weight = nullptr;  // [C, 1, 3, 3] contiguous
  const T* dw_bias = nullptr;    // [C]
  bool channels_contiguous = false;
  bool chunked = false;  // x channels_last with 16-byte aligned pixels

  MVIT3_DEVICE void init_row(gemm::Row& row) const { row.offset = int64_t(row.b) * x.stride_b; }

  MVIT3_DEVICE void prepare(gemm::Row*) const {}

  // visit(offset of the tap's pixel in x, tap index 3 * ky + kx) for each tap of row's 3x3
  // window that lies inside the map (the zero padding adds nothing).
  template <class Visit>
  MVIT3_DEVICE void for_each_tap(const gemm::Row& row, Visit&& visit) const {
    MVIT3_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      const int iy = row.y * stride + (ky - 1) * dilation;
      if (iy < 0 || iy >= height) continue;
      MVIT3_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        const int ix = row.x * stride + (kx - 1) * dilation;
        if (ix < 0 || ix >= width) continue;
        visit(iy * x.stride_h + ix * x.stride_w, 3 * ky + kx);
      }
    }
  }

  MVIT3_DEVICE float a(const gemm::Row& row, int c) const {
    const T* src = static_cast<const T*>(x.data) + row.offset + int64_t(c) * x.stride_c;
    const T* w = dw_weight + 9 * c;
    float acc = to_float(dw_bias[c]);
    for_each_tap(row, [&](int64_t offset, int tap) {
      acc = fmaf(to_float(src[offset]), to_float(w[tap]), acc);
    });
    return silu(acc);
  }

  // Channels c .. c + 16 / sizeof(T) - 1 (a(row, c + i) for each, the same FMAs): one 16-byte
  // load a tap.
  MVIT3_DEVICE void a_chunk(const gemm::Row& row, int c, float (&v)[16 / sizeof(T)]) const {
    constexpr int kChunk = 16 / sizeof(T);
    const T* src = static_cast<const T*>(x.data) + row.offset + c;
    MVIT3_UNROLL
    for (int i = 0; i < kChunk; ++i) v[i] = to_float(dw_bias[c + i]);
    for_each_tap(row, [&](int64_t offset, int tap) {
      T values[kChunk];
      gemm::load_chunk(values, src + offset);
      MVIT3_UNROLL
      for (int i = 0; i < kChunk; ++i)
        v[i] = fmaf(to_float(values[i]), to_float(dw_weight[9 * (c + i) + tap]), v[i]);
    });
    MVIT3_UNROLL
    for (int i = 0; i < kChunk; ++i) v[i] = silu(v[i]);
  }
};


// ---- the whole MV2 block in one kernel ---------------------------------------------------------
//
// A block owns a kTile x kTile tile of output pixels of one sample (gemm::kBlockM pixels) and
// kBlockN output channels, and walks the hidden channels C in chunks of the GEMM's kBlockK (32
// for fp16/bf16, 16 for fp32). Per chunk:
//   1. the chunk's expansion weights [in_channels][kBlockK] (transposed, so a thread reads 8
//      hidden channels of an input channel with one or two 16-byte loads), expansion bias,
//      depthwise weights and bias go to shared memory;
//   2. the expansion of the tile's input halo, (kTile - 1) * stride + 3 pixels square (10 x 10 at
//      stride 1, 17 x 17 at stride 2): h = silu(x @ We^T + be), fp16/bf16 on tensor cores
//      (mma.sync, fp32 accumulators), fp32 with IEEE FMAs (x read through its strides, 16
//      bytes a load where x is channels_last with aligned pixels), rounded to T into shared
//      memory; halo pixels outside the map hold 0, the depthwise conv's
//      zero padding of h (not silu(be)). Meanwhile the reduce weights' tile is staged as the tile
//      GEMM stages it (16-byte chunks, cp.async on sm_80+, or element by element);
//   3. the A tile of the reduce GEMM, silu(depthwise3x3(h) + dw_bias) of each output pixel, in
//      fp32 with the FMAs of the two-launch path in the same order (bias, then the taps);
//   4. the GEMM step of the tile GEMM (WMMA for fp16/bf16, IEEE FMAs for fp32).
// Then the tile GEMM's epilogue: bias, residual, channel-fastest stores (16 bytes a thread where
// Cout and the rows allow). Three __syncthreads a chunk, one stage (nothing is double-buffered:
// the halo is the largest buffer, 23 KB at stride 2).
//
// The blocks of the channel tiles of one pixel tile (Cout > 64) each recompute the expansion of
// the tile: Cout <= 64 (most MV2 blocks of the small models) pays nothing for it, and v3-XS's
// largest, 96, pays it twice.
constexpr int kTile = 8;
static_assert(kTile * kTile == gemm::kBlockM, "one output pixel per GEMM row");

template <class T, int kStride>
struct Mv2Tiles {
  using Gemm = gemm::Tiles<T>;
  static constexpr int kBlockK = Gemm::kBlockK;           // hidden channels a chunk
  static constexpr int kHalo = (kTile - 1) * kStride + 3;  // input rows and columns of a tile
  static constexpr int kHaloPixels = kHalo * kHalo;
  static constexpr int kLdH = kBlockK + Gemm::kChunk;      // 16-byte aligned rows
  static constexpr int kGroups = kBlockK / 8;              // 8 hidden channels an expansion item
  static constexpr int kHBytes = kHaloPixels * kLdH * int(sizeof(T));
  // The accumulators' tile of the epilogue aliases the halo (read by the last chunk's depthwise
  // step, before the barrier that precedes its GEMM step).
  static constexpr int kHaloBytes = std::max(kHBytes, Gemm::kResultBytes);
  // The step's expansion weights: fp32 [in_channels][kBlockK] (SIMT: 8 hidden channels of an
  // input channel in two 16-byte loads); fp16/bf16 [kBlockK][kLdWe] (mma.sync's B fragments:
  // pairs of consecutive input channels of a hidden channel, rows of 100 words, conflict-free).
  static constexpr int kLdWe = kMv2MaxInChannels + 8;
  static constexpr int kWeElems = Gemm::kTensorCores ? kBlockK * kLdWe : kMv2MaxInChannels * kBlockK;
  static constexpr int kSharedBytes = kHaloBytes + (Gemm::kAElems + Gemm::kBElems + kWeElems) *
                                      int(sizeof(T)) + (11 * kBlockK + gemm::kBlockN) * 4;
  static_assert(kSharedBytes <= 48 * 1024, "static shared memory of a block");
  static_assert(kBlockK % 8 == 0 && (kLdH * int(sizeof(T))) % 16 == 0, "16-byte halo rows");
};

template <class T>
struct Mv2Params {
  Map x;                             // [B, in_channels, H, W]
  Matrix expand_weight;              // [C, in_channels]
  const T* expand_bias = nullptr;    // [C] or null
  const T* dw_weight = nullptr;      // [C, 1, 3, 3], contiguous
  const T* dw_bias = nullptr;        // [C]
  Matrix weight;                     // [Cout, C]
  gemm::Epilogue ep;
  int height = 0, width = 0, in_channels = 0, channels = 0, cout = 0;
  int out_height = 0, out_width = 0, tiles_x = 0, tiles_per_sample = 0;
  bool x_chunked = false;  // x channels_last, aligned pixels, in_channels whole 16-byte chunks
  bool x_pairs = false;    // x's channels unit-stride, 4-byte aligned pixels, in_channels even
};

// 8 consecutive values of T at src (16-byte aligned) in fp32.
template <class T>
MVIT3_DEVICE void load8(const T* src, float (&v)[8]) {
  constexpr int kPer = 16 / int(sizeof(T));
  MVIT3_UNROLL
  for (int i = 0; i < 8; i += kPer) {
    T raw[kPer];
    gemm::load_chunk(raw, src + i);
    MVIT3_UNROLL
    for (int j = 0; j < kPer; ++j) v[i + j] = to_float(raw[j]);
  }
}

// 8 fp32 values rounded to T at dst (16-byte aligned).
template <class T>
MVIT3_DEVICE void store8(T* dst, const float (&v)[8]) {
  constexpr int kPer = 16 / int(sizeof(T));
  MVIT3_UNROLL
  for (int i = 0; i < 8; i += kPer) {
    float part[kPer];
    MVIT3_UNROLL
    for (int j = 0; j < kPer; ++j) part[j] = v[i + j];
    gemm::store_chunk(dst + i, part);
  }
}

template <class T, int kStride>
MVIT3_DEVICE void mv2_block_body(const Mv2Params<T>& p, int64_t first_tile, int channel_tiles_x) {
  using Tiles = Mv2Tiles<T, kStride>;
  using Gemm = gemm::Tiles<T>;
  using Math = std::conditional_t<Gemm::kTensorCores, gemm::WmmaMath<T>, gemm::SimtMath>;
  constexpr int kBlockK = Tiles::kBlockK, kHalo = Tiles::kHalo, kLdH = Tiles::kLdH;
  constexpr int kHaloPixels = Tiles::kHaloPixels, kGroups = Tiles::kGroups;
  constexpr int kLdA = Gemm::kLdA, kChunk = Gemm::kChunk;
  constexpr int kBlockM = gemm::kBlockM, kBlockN = gemm::kBlockN, kThreads = gemm::kThreads;
  MVIT3_SHARED_ALIGNED(unsigned char[Tiles::kHaloBytes], halo_bytes, 32);
  MVIT3_SHARED_ALIGNED(T[Gemm::kAElems], a_tile, 32);
  MVIT3_SHARED_ALIGNED(T[Gemm::kBElems], b_tile, 32);
  MVIT3_SHARED_ALIGNED(T[Tiles::kWeElems], we_tile, 16);
  MVIT3_SHARED(float[kBlockK], expand_bias_tile);
  MVIT3_SHARED(float[9 * kBlockK], dw_tile);  // [kBlockK][9]
  MVIT3_SHARED(float[kBlockK], dw_bias_tile);
  MVIT3_SHARED(float[kBlockN], bias_tile);
  T* const h = reinterpret_cast<T*>(halo_bytes);            // [kHaloPixels][kLdH]
  float* const c_tile = reinterpret_cast<float*>(halo_bytes);  // [kBlockM][kLdC], after the loop

  const int tid = threadIdx.x;
  const int64_t tile = first_tile + blockIdx.x / channel_tiles_x;
  const int n0 = int(blockIdx.y * channel_tiles_x + blockIdx.x % channel_tiles_x) * kBlockN;
  if (n0 >= p.cout) return;  // a channel tile past the last of a group on axis y
  const int b = int(tile / p.tiles_per_sample);
  const int rest = int(tile % p.tiles_per_sample);
  const int oy0 = rest / p.tiles_x * kTile, ox0 = rest % p.tiles_x * kTile;
  const int iy0 = oy0 * kStride - 1, ix0 = ox0 * kStride - 1;  // the halo's first input pixel

  const T* bias = static_cast<const T*>(p.ep.bias);
  if (tid < kBlockN) bias_tile[tid] = bias && n0 + tid < p.cout ? to_float(bias[n0 + tid]) : 0.0f;

  // The reduce weights' B tile, staged as tile_gemm_body stages it (WeightStager).
  gemm::WeightStager<T> weights(p.weight, n0, p.cout, p.channels);

  // Step 1: the chunk's expansion weights (transposed to [ci][kk]; along their unit-stride
  // dimension), expansion bias, depthwise weights and bias; 0 past the last hidden channel.
  const T* expand_weight = static_cast<const T*>(p.expand_weight.data);
  // fp16/bf16: in_channels rounded up to the mma's k16 (0 past the last, which the zero A
  // columns meet: a NaN of the shared memory's fill there would still poison the sums).
  const int we_columns = Gemm::kTensorCores ? (p.in_channels + 15) / 16 * 16 : p.in_channels;
  auto stage_chunk_weights = [&](int c0) {
    const bool hidden_contiguous = p.expand_weight.stride_row == 1;
    for (int e = tid; e < we_columns * kBlockK; e += kThreads) {
      const int kk = hidden_contiguous ? e % kBlockK : e / we_columns;
      const int ci = hidden_contiguous ? e / kBlockK : e % we_columns;
      const int c = c0 + kk;
      const T value = c < p.channels && ci < p.in_channels
                          ? expand_weight[c * p.expand_weight.stride_row +
                                          ci * p.expand_weight.stride_col]
                          : from_float<T>(0.0f);
      if constexpr (Gemm::kTensorCores)
        we_tile[kk * Tiles::kLdWe + ci] = value;
      else
        we_tile[ci * kBlockK + kk] = value;
    }
    for (int e = tid; e < 9 * kBlockK; e += kThreads) {
      const int c = c0 + e / 9;
      dw_tile[e] = c < p.channels ? to_float(p.dw_weight[9 * c0 + e]) : 0.0f;
    }
    if (tid < kBlockK) {
      const int c = c0 + tid;
      expand_bias_tile[tid] = c < p.channels && p.expand_bias ? to_float(p.expand_bias[c]) : 0.0f;
      dw_bias_tile[tid] = c < p.channels ? to_float(p.dw_bias[c]) : 0.0f;
    }
  };

  // Step 2: the expansion of the halo. fp32 (SIMT): an item = 8 hidden channels of one halo
  // pixel (the pixels of a warp share their channels: the weight reads are broadcasts).
  const T* x = static_cast<const T*>(p.x.data);
  auto expand_simt = [&]() {
    if constexpr (!Gemm::kTensorCores) {
      for (int e = tid; e < kGroups * kHaloPixels; e += kThreads) {
        const int g = e / kHaloPixels, pixel = e % kHaloPixels;
        const int iy = iy0 + pixel / kHalo, ix = ix0 + pixel % kHalo;
        float acc[8];
        if (iy >= 0 && iy < p.height && ix >= 0 && ix < p.width) {
          MVIT3_UNROLL
          for (int j = 0; j < 8; ++j) acc[j] = expand_bias_tile[8 * g + j];
          const T* src = x + b * p.x.stride_b + iy * p.x.stride_h + ix * p.x.stride_w;
          const T* w = we_tile + 8 * g;
          if (p.x_chunked) {
            for (int ci = 0; ci < p.in_channels; ci += kChunk) {
              T raw[kChunk];
              gemm::load_chunk(raw, src + ci);
              MVIT3_UNROLL
              for (int i = 0; i < kChunk; ++i) {
                float wv[8];
                load8(w + (ci + i) * kBlockK, wv);
                const float xv = to_float(raw[i]);
                MVIT3_UNROLL
                for (int j = 0; j < 8; ++j) acc[j] = fmaf(xv, wv[j], acc[j]);
              }
            }
          } else {
            for (int ci = 0; ci < p.in_channels; ++ci) {
              float wv[8];
              load8(w + ci * kBlockK, wv);
              const float xv = to_float(src[ci * p.x.stride_c]);
              MVIT3_UNROLL
              for (int j = 0; j < 8; ++j) acc[j] = fmaf(xv, wv[j], acc[j]);
            }
          }
          MVIT3_UNROLL
          for (int j = 0; j < 8; ++j) acc[j] = silu(acc[j]);
        } else {
          MVIT3_UNROLL
          for (int j = 0; j < 8; ++j) acc[j] = 0.0f;  // the zero padding of h
        }
        store8(h + pixel * kLdH + 8 * g, acc);
      }
    }
  };

  // Step 3: A[r][kk] = silu(dw_bias + sum of the 9 taps of h) for output pixel r of the tile;
  // every tap of an output pixel inside the map lies in the halo (0 outside the map). Rows of
  // pixels past the map's edge are 0 (not written out).
  auto depthwise = [&]() {
    for (int e = tid; e < kBlockM * kBlockK; e += kThreads) {
      const int r = e / kBlockK, kk = e % kBlockK;
      const int ly = r / kTile, lx = r % kTile;
      float v = 0.0f;
      if (oy0 + ly < p.out_height && ox0 + lx < p.out_width) {
        float acc = dw_bias_tile[kk];
        const T* window = h + ((ly * kStride) * kHalo + lx * kStride) * kLdH + kk;
        MVIT3_UNROLL
        for (int ky = 0; ky < 3; ++ky)
          MVIT3_UNROLL
          for (int kx = 0; kx < 3; ++kx)
            acc = fmaf(to_float(window[(ky * kHalo + kx) * kLdH]), dw_tile[kk * 9 + 3 * ky + kx],
                       acc);
        v = silu(acc);
      }
      a_tile[r * kLdA + kk] = from_float<T>(v);
    }
  };

  // fp16/bf16: mma.sync m16n8k16 (fp32 accumulators), warp w taking the 16-pixel row tiles w,
  // w + 8, ... of the halo and all kBlockK hidden channels (kBlockK / 8 n8 tiles). The A
  // fragments come straight from x (L1/L2: a tile's halo is read once per step): a register
  // holds input channels k, k + 1 of a pixel, one 32-bit load where x's channels are
  // unit-stride with 4-byte aligned pixels and in_channels is even, else two; 0 past
  // in_channels and for halo pixels outside the map. The B fragments are 32-bit loads from
  // we_tile. Then + expansion bias, SiLU, rounded to T into h (0 outside the map).
  auto expand_mma = [&]() {
    if constexpr (Gemm::kTensorCores) {
      constexpr int kRowTiles = (kHaloPixels + 15) / 16, kNTiles = kBlockK / 8;
      const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
      for (int tile_row = warp; tile_row < kRowTiles; tile_row += kThreads / 32) {
        // This lane's two pixels of the tile (rows g and g + 8): their offset in x, or -1.
        int64_t offset[2];
        int pixels[2];
        MVIT3_UNROLL
        for (int i = 0; i < 2; ++i) {
          const int pixel = tile_row * 16 + g + 8 * i;
          const int iy = iy0 + pixel / kHalo, ix = ix0 + pixel % kHalo;
          pixels[i] = pixel;
          offset[i] = pixel < kHaloPixels && iy >= 0 && iy < p.height && ix >= 0 && ix < p.width
                          ? b * p.x.stride_b + iy * p.x.stride_h + ix * p.x.stride_w
                          : -1;
        }
        // Input channels k, k + 1 of pixel i, packed as an mma register.
        auto pair = [&](int i, int k) -> uint32_t {
          T values[2] = {from_float<T>(0.0f), from_float<T>(0.0f)};
          if (offset[i] >= 0) {
            if (p.x_pairs) {
              if (k < p.in_channels) {
                uint32_t bits = *reinterpret_cast<const uint32_t*>(x + offset[i] + k);
                return bits;
              }
            } else {
              if (k < p.in_channels) values[0] = x[offset[i] + k * p.x.stride_c];
              if (k + 1 < p.in_channels) values[1] = x[offset[i] + (k + 1) * p.x.stride_c];
            }
          }
          uint32_t bits;
          memcpy(&bits, &values, 4);
          return bits;
        };
        float acc[kNTiles][4] = {};
        for (int k0 = 0; k0 < p.in_channels; k0 += 16) {
          const uint32_t a[4] = {pair(0, k0 + 2 * t), pair(1, k0 + 2 * t), pair(0, k0 + 2 * t + 8),
                                 pair(1, k0 + 2 * t + 8)};
          MVIT3_UNROLL
          for (int j = 0; j < kNTiles; ++j) {
            const T* w = we_tile + (8 * j + g) * Tiles::kLdWe + k0 + 2 * t;
            const uint32_t bw[2] = {*reinterpret_cast<const uint32_t*>(w),
                                    *reinterpret_cast<const uint32_t*>(w + 8)};
            mma_m16n8k16<T>(acc[j], a, bw, acc[j]);
          }
        }
        MVIT3_UNROLL
        for (int i = 0; i < 2; ++i) {
          if (pixels[i] >= kHaloPixels) continue;
          MVIT3_UNROLL
          for (int j = 0; j < kNTiles; ++j) {
            const int n = 8 * j + 2 * t;
            float low = 0.0f, high = 0.0f;  // the zero padding of h
            if (offset[i] >= 0) {
              low = silu(acc[j][2 * i] + expand_bias_tile[n]);
              high = silu(acc[j][2 * i + 1] + expand_bias_tile[n + 1]);
            }
            *reinterpret_cast<uint32_t*>(h + pixels[i] * kLdH + n) = pack_pair<T>(low, high);
          }
        }
      }
    }
  };

  Math math;
  for (int c0 = 0; c0 < p.channels; c0 += kBlockK) {
    stage_chunk_weights(c0);
    __syncthreads();  // the chunk's weights are in; the previous GEMM step is done with A and B
    if (weights.chunked)
      weights.fetch(c0, b_tile);
    else
      weights.stage_elements(c0, b_tile);
    if constexpr (Gemm::kTensorCores)
      expand_mma();
    else
      expand_simt();
    if (weights.chunked) weights.land();
    __syncthreads();  // h and B are complete
    depthwise();
    __syncthreads();  // A is complete
    math.step(a_tile, b_tile, weights.n_fastest);
  }
  math.store(c_tile);  // the halo's last reads were before the last barrier
  __syncthreads();

  // The epilogue of tile_gemm_body (store_tile): + bias, + residual, channel-fastest.
  gemm::store_tile<T>(c_tile, bias_tile, p.ep, n0, p.cout, [&](int r, int& sample, int& y, int& x) {
    sample = b;
    y = oy0 + r / kTile;
    x = ox0 + r % kTile;
    return y < p.out_height && x < p.out_width;
  });
}

// minBlocksPerSM 2, as tile_gemm_kernel: at most 128 registers.
template <class T, int kStride>
__global__ void __launch_bounds__(gemm::kThreads, 2)
    mv2_block_kernel(Mv2Params<T> params, int64_t first_tile, int channel_tiles_x) {
  if constexpr (arch_supports<T>()) mv2_block_body<T, kStride>(params, first_tile, channel_tiles_x);
}

template <class T, int kStride>
void run_mv2_block(const DwconvPointwiseArgs& args, Stream stream) {
  const int64_t pixels = int64_t(args.batch) * args.out_height * args.out_width;
  if (pixels == 0 || args.cout == 0) return;
  Mv2Params<T> p;
  p.x = args.x;
  p.expand_weight = args.expand_weight;
  p.expand_bias = static_cast<const T*>(args.expand_bias);
  p.dw_weight = static_cast<const T*>(args.dw_weight);
  p.dw_bias = static_cast<const T*>(args.dw_bias);
  p.weight = args.weight;
  p.ep.bias = args.bias;
  p.ep.residual = args.residual;
  p.ep.out = args.out;
  p.height = args.height;
  p.width = args.width;
  p.in_channels = args.in_channels;
  p.channels = args.channels;
  p.cout = args.cout;
  p.out_height = args.out_height;
  p.out_width = args.out_width;
  p.tiles_x = int(ceil_div(args.out_width, kTile));
  p.tiles_per_sample = int(ceil_div(args.out_height, kTile)) * p.tiles_x;
  p.x_chunked = gemm::chunked_rows<T>(args.x) && args.in_channels % int(16 / sizeof(T)) == 0;
  p.x_pairs = args.x.stride_c == 1 && args.in_channels % 2 == 0 &&
              reinterpret_cast<uintptr_t>(args.x.data) % 4 == 0 &&
              (args.x.stride_b * int64_t(sizeof(T))) % 4 == 0 &&
              (args.x.stride_h * int64_t(sizeof(T))) % 4 == 0 &&
              (args.x.stride_w * int64_t(sizeof(T))) % 4 == 0;
  // The grid of gemm::run: the channel tiles of a pixel tile side by side on axis x.
  const int64_t channel_tiles = ceil_div(args.cout, gemm::kBlockN);
  const int64_t groups = ceil_div(channel_tiles, kMaxGridX);
  const int64_t channel_tiles_x = ceil_div(channel_tiles, groups);
  const int64_t tiles = int64_t(args.batch) * p.tiles_per_sample;
  launch_chunks(tiles, channel_tiles_x, [&](int64_t first_tile, int64_t count) {
    launch(&mv2_block_kernel<T, kStride>, grid_of(count * channel_tiles_x, groups),
           dim3(gemm::kThreads), stream, p, first_tile, int(channel_tiles_x));
  });
}

}  // namespace

void dwconv_pointwise(const DwconvPointwiseArgs& args, DType dtype, Stream stream) {
  if (args.expand_weight.data) {
    if (!mv2_block_fused(args.in_channels, args.stride, args.dilation))
      throw std::runtime_error("mvit3: dwconv_pointwise with expand_weight outside the one-kernel "
                               "MV2 block's limits (ops.cpp runs the expansion apart)");
    dispatch_dtype(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (args.stride == 1)
        run_mv2_block<T, 1>(args, stream);
      else
        run_mv2_block<T, 2>(args, stream);
    });
    return;
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    DwconvProducer<T> producer;
    producer.x = args.x;
    producer.height = args.height;
    producer.width = args.width;
    producer.stride = args.stride;
    producer.dilation = args.dilation;
    producer.dw_weight = static_cast<const T*>(args.dw_weight);
    producer.dw_bias = static_cast<const T*>(args.dw_bias);
    producer.channels_contiguous = args.x.stride_c == 1;
    producer.chunked = gemm::chunked_rows<T>(args.x);
    gemm::Epilogue ep;
    ep.bias = args.bias;
    ep.residual = args.residual;
    ep.out = args.out;
    const gemm::Shape shape{args.batch, args.out_height, args.out_width, args.cout, args.channels};
    gemm::run<T>(producer, args.weight, ep, shape, stream);
  });
}

}  // namespace mvit3
