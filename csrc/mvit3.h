// The interface between the op table (ops.cpp: checks, outputs, torch) and the kernels (one
// <op>.cu per op: no torch). ops.cpp validates every argument (each op's <op>_why_not),
// allocates the outputs and workspaces with torch, fills one of the argument structs below and
// calls the op's launcher; the launcher only picks tile configurations and launches on the
// given stream.
//
// Maps and 2-D weights are passed with their strides (no copies); 1-D vectors and the 3x3
// weights are contiguous (ops.cpp makes them so, a no-op for the fast models' weights).
// Plain structs keep the .cu files free of torch headers: they compile in seconds per arch, and
// the same files build for the CPU emulator (MVIT3_EMULATE, see emulator.h).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef MVIT3_EMULATE
#include "emulator.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace mvit3 {

#ifdef MVIT3_EMULATE
using Stream = emu::Stream;
#else
using Stream = cudaStream_t;
#endif

enum class DType : int { f32, f16, bf16 };
enum class Norm : int { none, layer, group };  // see mvit3/ops/reference.py: apply_norm
enum class Act : int { none, silu };

// A [B, C, H, W] map with any strides (in elements). data == nullptr means "absent".
struct Map {
  void* data = nullptr;
  int64_t stride_b = 0, stride_c = 0, stride_h = 0, stride_w = 0;
};

// A [rows, cols] weight with any strides (the fast models pack 1x1 weights K-major: a
// [Cout, K] view of a contiguous [K, Cout] buffer). data == nullptr means "absent".
// With col_segment > 0 its columns are segments of col_segment: element (r, c) is at
// r * stride_row + (c % col_segment) * stride_col + (c / col_segment) * segment_stride (a
// contiguous [Cout, C, 3, 3] weight read in tap-major order, c = tap * C + channel).
struct Matrix {
  const void* data = nullptr;
  int64_t stride_row = 0, stride_col = 0;
  int64_t col_segment = 0, segment_stride = 0;
};

// pointwise_conv: out = act(cat(norm(x), x2) @ weight^T + bias) + residual, per pixel.
struct PointwiseConvArgs {
  Map x, x2, residual, out;           // x [B, C1, H, W], x2 [B, C2, H, W], residual/out [B, Cout, H, W]
  int batch = 0, height = 0, width = 0, c1 = 0, c2 = 0, cout = 0;
  Matrix weight;                      // [Cout, C1 + C2]
  const void* bias = nullptr;         // [Cout] or null
  Norm norm = Norm::none;
  const void* norm_weight = nullptr;  // [C1] or null (no affine)
  const void* norm_bias = nullptr;    // [C1] or null
  float eps = 1e-5f;
  float* group_stats = nullptr;       // workspace [B, 2] fp32 when norm == group
  Act act = Act::none;
};

// dwconv_pointwise: out = silu(dw3x3(h, stride, dilation, padding = dilation) + dw_bias)
// @ weight^T + bias + residual, with h = x, or with expand_weight (the whole MV2 block in one
// kernel, see mv2_block_fused) h = silu(x @ expand_weight^T + expand_bias).
struct DwconvPointwiseArgs {
  Map x, residual, out;          // x [B, C, H, W] (with expand_weight [B, in_channels, H, W]),
                                 // residual/out [B, Cout, Ho, Wo]
  int batch = 0, height = 0, width = 0, channels = 0, cout = 0;
  int stride = 1, dilation = 1, out_height = 0, out_width = 0;
  const void* dw_weight = nullptr;  // [C, 1, 3, 3], contiguous
  const void* dw_bias = nullptr;    // [C]
  Matrix weight;                    // [Cout, C]
  const void* bias = nullptr;       // [Cout] or null
  int in_channels = 0;                // with expand_weight: the block input's channels
  Matrix expand_weight;               // [C, in_channels], or absent
  const void* expand_bias = nullptr;  // [C] or null
};

// The largest block input (in_channels) the one-kernel MV2 block takes: its expansion weights of
// a chunk of hidden channels, [in_channels][32 or 16 channels], stay in shared memory (12 KB at
// 192) beside the expanded halo and the GEMM tiles, within 48 KB.
constexpr int kMv2MaxInChannels = 192;

// Whether dwconv_pointwise with expand_weight runs as one kernel (expansion, depthwise with its
// halo in shared memory, reduce, residual); otherwise (a dilated depthwise conv, as in the
// v2-style dense backbones, or a wider block input) the expansion is its own pointwise_conv
// launch into a [B, C, H, W] workspace that the depthwise GEMM reads.
inline bool mv2_block_fused(int64_t in_channels, int64_t stride, int64_t dilation) {
  return dilation == 1 && (stride == 1 || stride == 2) && in_channels <= kMv2MaxInChannels;
}

// conv3x3: out = act(conv3x3(cat(x, x2), weight, stride, dilation, padding = dilation) + bias).
struct Conv3x3Args {
  Map x, x2, out;                // x [B, C1, H, W], x2 [B, C2, H, W], out [B, Cout, Ho, Wo]
  int batch = 0, height = 0, width = 0, c1 = 0, c2 = 0, cout = 0;
  int stride = 1, dilation = 1, out_height = 0, out_width = 0;
  const void* weight = nullptr;  // [Cout, C1 + C2, 3, 3], contiguous
  const void* bias = nullptr;    // [Cout] or null
  Act act = Act::none;
};

// patch_attention: multi-head attention over the 2x2 patches of qkv, then optionally
// @ proj_weight^T + proj_bias, then + residual.
struct PatchAttentionArgs {
  Map qkv, residual, out;  // qkv [B, 3d, H, W], residual/out [B, d, H, W]
  int batch = 0, height = 0, width = 0, heads = 0, head_dim = 0;
  float scale = 1.0f;
  Matrix proj_weight;                 // [d, d], or absent
  const void* proj_bias = nullptr;    // [d] or null
  Map heads_out;                      // workspace [B, d, H, W] for the heads when projecting
                                      // with d > kMaxFusedProjectionDim (absent otherwise)
};

// The shared memory a block may take on any device without the opt-in (static shared memory is
// limited to it; a kernel opts in past it with cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr int64_t kSharedBytesWithoutOptIn = 48 * 1024;

// transformer_mlp: out = x + silu(norm(x) @ w1^T + b1) @ w2^T + b2.
struct TransformerMlpArgs {
  Map x, out;       // [B, d, H, W]
  Map hidden;       // workspace [B, F, H, W] where not transformer_mlp_fused (absent there)
  int batch = 0, height = 0, width = 0, dim = 0, ffn_dim = 0;
  Norm norm = Norm::layer;
  const void* norm_weight = nullptr;  // [d]
  const void* norm_bias = nullptr;    // [d]
  float eps = 1e-5f;
  float* group_stats = nullptr;       // workspace [B, 2] fp32 when norm == group
  Matrix w1;                          // [F, d]
  const void* b1 = nullptr;           // [F]
  Matrix w2;                          // [d, F]
  const void* b2 = nullptr;           // [d]
  // The shared memory a block may take on the device (cudaDevAttrMaxSharedMemoryPerBlockOptin;
  // ops.cpp asks the device of x): whether the FFN is one launch depends on it (below).
  int64_t shared_limit = kSharedBytesWithoutOptIn;
};

// transformer_mlp_project: mlp (norm layer), then project, a LayerNorm pointwise_conv whose x is
// mlp.out: the FFN output t and its projection (the next qkv, or the block's conv_proj).
struct TransformerMlpProjectArgs {
  TransformerMlpArgs mlp;
  PointwiseConvArgs project;
};

// separable_attention: out = x + (relu(v) * context) @ out_weight^T + out_bias, with
// [q | k | v] = GroupNorm1(x) @ qkv_weight^T + qkv_bias and context = sum_n softmax_n(q) k.
struct SeparableAttentionArgs {
  Map x, out;       // [B, d, H, W]
  Map v;            // workspace [B, d, H, W] where not separable_attention_fused (absent there)
  int splits = 1;   // separable_attention_splits(batch, height): programs a sample's context takes
  float* partials = nullptr;     // workspace [B, splits, 4, 2 + d] fp32: each program's states
  int* counters = nullptr;       // [B] int32, 0 before the launch (its last programs reset them)
  float* context = nullptr;      // workspace [B, 4, d] fp32: one context vector per sequence
  float* group_stats = nullptr;  // workspace [B, 2] fp32
  int batch = 0, height = 0, width = 0, dim = 0;
  const void* norm_weight = nullptr;  // [d]
  const void* norm_bias = nullptr;    // [d]
  float eps = 1e-5f;
  Matrix qkv_weight;                  // [1 + 2d, d]
  const void* qkv_bias = nullptr;     // [1 + 2d]
  Matrix out_weight;                  // [d, d]
  const void* out_bias = nullptr;     // [d]
  int64_t shared_limit = kSharedBytesWithoutOptIn;  // the device's (separable_attention_fused)
};

// group_norm_stats: per-sample mean and 1/sqrt(var + eps) over C*H*W -> stats [B, 2] fp32.
struct GroupNormStatsArgs {
  Map x;
  int batch = 0, channels = 0, height = 0, width = 0;
  float eps = 1e-5f;
  float* stats = nullptr;
};

// The launchers (one per csrc/<name>.cu). They throw std::runtime_error on a launch failure.
void pointwise_conv(const PointwiseConvArgs& args, DType dtype, Stream stream);
void dwconv_pointwise(const DwconvPointwiseArgs& args, DType dtype, Stream stream);
void conv3x3(const Conv3x3Args& args, DType dtype, Stream stream);
void patch_attention(const PatchAttentionArgs& args, DType dtype, Stream stream);
void transformer_mlp(const TransformerMlpArgs& args, DType dtype, Stream stream);
void transformer_mlp_project(const TransformerMlpProjectArgs& args, DType dtype, Stream stream);
void separable_attention(const SeparableAttentionArgs& args, DType dtype, Stream stream);
// transformer_mlp_project's one launch (csrc/transformer_mlp.cu), only where
// transformer_mlp_project_fused (below); transformer_mlp_project calls it.
void fused_transformer_mlp_project(const TransformerMlpProjectArgs& args, DType dtype,
                                   Stream stream);
void group_norm_stats(const GroupNormStatsArgs& args, DType dtype, Stream stream);
// separable_attention's second launch (csrc/transformer_mlp.cu), only where
// separable_attention_fused (below): out = x + (relu(GroupNorm1(x) @ w1^T + b1) * context)
// @ w2^T + b2, with mlp.w1 / mlp.b1 the v rows of qkv_weight / qkv_bias, mlp.w2 / mlp.b2 the
// out_weight / out_bias and context [B, 4, d] by sequence.
void fused_separable_attention_out(const TransformerMlpArgs& mlp, const float* context, DType dtype,
                                   Stream stream);

// Largest head dim the attention kernel takes (head dims are padded to 16, 32, 48 or 64).
constexpr int kMaxHeadDim = 64;

// Largest d whose out_proj patch_attention fuses into its one launch (a block holds all heads of
// its queries in shared memory): every model's (64 .. 240). A larger d with proj_weight writes
// the heads to PatchAttentionArgs::heads_out and runs the out_proj as a second launch.
constexpr int kMaxFusedProjectionDim = 256;

// transformer_mlp runs in one launch (fused_mlp_kernel, csrc/transformer_mlp.cu: a block keeps
// its 16 pixels' hidden tile in shared memory) where d <= kFusedMlpMaxDim, F <= 2 kFusedMlpMaxDim
// (every model's FFN) and the block's shared memory, fused_mlp_shared_bytes, fits the device's
// per-block limit. fp16/bf16: 45.6 KB of static shared memory for any such d and F, which every
// device takes. fp32 (tiles twice as wide): dynamic shared memory sized from d and F, 45.6 KB at
// d 128 / F 256, 65.9 KB at d 240 / F 480, 68.9 KB at d 256 / F 512; past 48 KB the kernel opts
// in, up to the device's limit (sm_75 64 KB: fp32 up to d 224 / F 448 there; sm_80 163 KB,
// sm_86/89 99 KB, sm_90 227 KB: all). Elsewhere it is two launches through the
// TransformerMlpArgs::hidden workspace, which ops.cpp allocates only then. The one place that
// decides.
constexpr int kFusedMlpMaxDim = 256;
// The shared memory a fused_mlp_kernel block of dtype takes for d <= kFusedMlpMaxDim and
// F <= 2 kFusedMlpMaxDim (csrc/transformer_mlp.cu: fused_mlp_layout).
int64_t fused_mlp_shared_bytes(DType dtype, int dim, int ffn_dim);
inline bool transformer_mlp_fused(DType dtype, int64_t dim, int64_t ffn_dim,
                                  int64_t shared_limit) {
  return dim >= 1 && ffn_dim >= 1 && dim <= kFusedMlpMaxDim && ffn_dim <= 2 * kFusedMlpMaxDim &&
         fused_mlp_shared_bytes(dtype, int(dim), int(ffn_dim)) <= shared_limit;
}

// transformer_mlp_project runs in one launch where its FFN does (transformer_mlp_fused), any
// Cout: the fused FFN kernel keeps its 16 pixels' output rows in shared memory (where the A
// tile was), normalises them into the hidden tile's place once the second GEMM is done, and runs
// the projection as a third GEMM by chunks of 128 of Cout; no shared memory beyond the FFN's.
// Elsewhere (an FFN past d 256 or F 512, or an fp32 one whose tiles pass the device's limit)
// the FFN (two launches), then the LayerNorm pointwise_conv reading its output back. The one
// place that decides.
inline bool transformer_mlp_project_fused(DType dtype, int64_t dim, int64_t ffn_dim, int64_t cout,
                                          int64_t shared_limit) {
  return cout >= 1 && transformer_mlp_fused(dtype, dim, ffn_dim, shared_limit);
}

// separable_attention takes d <= kMaxSeparableDim (every model's: 64 .. 256): a lane of its
// context kernel holds 8 channels of a pixel.
constexpr int kMaxSeparableDim = 256;

// separable_attention runs in two launches (the context kernel, then the fused FFN kernel of
// transformer_mlp with relu(v) * context as its hidden activation) where that kernel's tiles
// take F = d; otherwise the v rows are a GEMM of their own into SeparableAttentionArgs::v, which
// ops.cpp allocates only then, and the out GEMM reads them back: three launches.
inline bool separable_attention_fused(DType dtype, int64_t dim, int64_t shared_limit) {
  return transformer_mlp_fused(dtype, dim, dim, shared_limit);
}

// ---- size limits (ops.cpp checks them, in <op>_why_not, which cuda_lib.why_unsupported asks)
//
// There is no limit on numel: offsets into maps are int64 (strides are int64), and a launcher
// whose grid would pass axis x's limit launches in chunks (launch_chunks in device.cuh). What
// stays int32 is each size and index of one dimension:
// - B, C, H and W, and the H * W pixels of one sample (a sample's pixel index), < 2^31;
// - every channel count (inputs, outputs, workspaces) <= kMaxChannels: an output's channels
//   take 64 per block on grid axis y (65535 at most), and reduction lengths (9 (C1 + C2) for
//   conv3x3) stay far inside int32;
// - patch_attention's heads <= kMaxGridYZ (one head per block row on grid axis y);
// - the 3x3 ops' H + dilation and W + dilation <= 2^31: the last tap's input row or column,
//   at most H - 1 + dilation, is an int.
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on grid axes y and z
constexpr int64_t kMaxChannels = kMaxGridYZ * 64;
#ifdef MVIT3_EMULATE
// The emulator's limit on grid axis x is tiny (8) so that the CPU tests run the launchers' chunk
// loops (a GPU's is 2^31 - 1, which only a batch of thousands of 256 px samples reaches); its
// record mode takes the GPU's (emulator.h), to record the launches a GPU would get.
inline const int64_t& kMaxGridX = emu::max_grid_x;
#else
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
#endif

// separable_attention's context kernel gives each sample `splits` programs, each a band of its
// patch rows (at most H / 2 of them): about kSeparablePrograms programs in all at small batch,
// one a sample at large. Each program takes its sample's GroupNorm statistics itself (two passes
// over the sample, mostly from L2), so more splits cost more reads: at most kMaxSeparableSplits,
// and at most kMaxGridX (a sample's programs are in one launch; the emulator's limit is 8). The
// one place that decides (ops.cpp sizes the partial-state workspace by it).
constexpr int64_t kSeparablePrograms = 128;
constexpr int64_t kMaxSeparableSplits = 16;
inline int separable_attention_splits(int64_t batch, int64_t height) {
  const int64_t wanted = (kSeparablePrograms + batch - 1) / std::max<int64_t>(batch, 1);
  const int64_t most = std::min({kMaxSeparableSplits, kMaxGridX, height / 2});
  return int(std::max<int64_t>(1, std::min(wanted, most)));
}

}  // namespace mvit3
