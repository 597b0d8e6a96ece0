// separable_attention: the v2-style attention sub-layer with its residual (cvnets
// LinearSelfAttention). Semantics: mvit3.ops.reference.separable_attention.
//
//   a = GroupNorm1(x); [q | k | v] = a @ qkv_weight^T + qkv_bias      (1, d, d channels)
//   for each sequence (b, p): score = softmax over its N patches of q
//                              context[b, p, :] = sum_n score_n * k_n
//   out = x + (relu(v) * context) @ out_weight^T + out_bias
//
// Two launches, no qkv map. Since the scores sum to 1, context = Wk (sum_n score_n a_n) + bk:
// k is one matrix-vector product per sequence, and q_n one dot product per pixel. And softmax
// ignores a constant added to every q_n, so with a_n = (x_n - mean) * rstd * gamma + beta,
// q_n = sum_c w_q,c gamma_c rstd (x_n,c - mean) up to such a constant (b_q, the beta terms).
// 1. context_kernel, grid (sample, split): each program takes its sample's GroupNorm statistics
//    itself (sample_moments: two passes over the sample, the other splits' reads of it mostly
//    from L2), then reduces a band of the sample's patch rows, for each of the 4 sequences, to
//    an online-softmax state: max m, l = sum 2^(q - m), X = sum 2^(q - m) (x - mean) (q in
//    log2 units). A warp walks the band's pixels of a sequence 4 at a time, a lane holding 8
//    channels of a pixel (d <= 256), q by a warp reduction; the 8 warps' states merge in shared
//    memory, and the program's goes to the partials workspace. The sample's last program to
//    finish (a counter, as in the split-K merge of the Triton kernels) merges the splits in
//    split order (deterministic), forms mean_a = rstd gamma X / l + beta and
//    context = Wk mean_a + bk, writes the sample's statistics and resets the counter.
// 2. The fused FFN kernel of transformer_mlp (fused_separable_attention_out): GroupNorm by those
//    statistics, v = a @ Wv^T + bv, hidden = relu(v) * context of the row's sequence, out =
//    x + hidden @ Wo^T + bo, in one kernel; where its tiles cannot take d
//    (separable_attention_fused), v is a tile GEMM of its own into a workspace and the out GEMM's
//    producer forms relu(v) * context while staging its A tile: three launches.
// The patch layout is pure index arithmetic: pixel (y, x) is patch n = (y/2) * (W/2) + x/2 of
// sequence p = 2*(y%2) + x%2.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kSlots = kMaxSeparableDim / 32;  // channels of a pixel a lane holds
constexpr int kPixelsPerStep = 4;              // a warp's pixels in flight
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kMaxSeparableDim <= kThreads, "a thread a channel in the merges");

struct ContextArgs {
  Map x;
  int vector_width;  // sample_moments
  int height, width, dim, splits;
  const void* norm_weight;
  const void* norm_bias;
  float eps;
  Matrix qkv_weight;
  const void* qkv_bias;
  float* partials;  // [B, splits, 4, 2 + d]: m, l, X[d] of each program and sequence
  int* counters;    // [B]
  float* context;   // [B, 4, d]
  float* group_stats;  // [B, 2]
  int first_sample;    // of block x = 0 (a launch covers a chunk of the batch)
};

template <class T>
MVIT3_DEVICE void context_body(const ContextArgs& args) {
  MVIT3_SHARED(float[32], scratch);
  MVIT3_SHARED(float[kMaxSeparableDim], q_weight);              // w_q gamma rstd log2(e)
  MVIT3_SHARED(float[kWarps][2 + kMaxSeparableDim], warp_states);  // m, l, X of each warp
  MVIT3_SHARED(float[4][kMaxSeparableDim], mean_a);              // the last program's, per sequence
  MVIT3_SHARED(int, is_last);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int b = args.first_sample + int(blockIdx.x) / args.splits;
  const int split = int(blockIdx.x) % args.splits;
  const int dim = args.dim;
  const T* x = static_cast<const T*>(args.x.data);
  const T* gamma = static_cast<const T*>(args.norm_weight);
  const T* beta = static_cast<const T*>(args.norm_bias);
  const T* weight = static_cast<const T*>(args.qkv_weight.data);

  const float2 moments = sample_moments<kThreads, T>(args.x, args.vector_width, b, dim,
                                                     args.height, args.width, scratch);
  const float mean = moments.x, rstd = rsqrtf(moments.y + args.eps);
  for (int c = tid; c < dim; c += kThreads)  // row 0 of qkv_weight is q's
    q_weight[c] = to_float(weight[c * args.qkv_weight.stride_col]) * to_float(gamma[c]) * rstd *
                  kLog2e;
  __syncthreads();
  float lane_q_weight[kSlots];
  MVIT3_UNROLL
  for (int i = 0; i < kSlots; ++i)
    lane_q_weight[i] = lane + 32 * i < dim ? q_weight[lane + 32 * i] : 0.0f;

  // The band: patch rows row0 .. row1 - 1, tokens of each sequence in it.
  const int patch_rows = args.height / 2, half_width = args.width / 2;
  const int row0 = int(int64_t(split) * patch_rows / args.splits);
  const int row1 = int(int64_t(split + 1) * patch_rows / args.splits);
  const int tokens = (row1 - row0) * half_width;
  float* const partials = args.partials + (int64_t(b) * args.splits + split) * 4 * (2 + dim);

  for (int p = 0; p < 4; ++p) {
    float m = -INFINITY, l = 0.0f, acc[kSlots];
    MVIT3_UNROLL
    for (int i = 0; i < kSlots; ++i) acc[i] = 0.0f;
    for (int t0 = warp * kPixelsPerStep; t0 < tokens; t0 += kWarps * kPixelsPerStep) {
      float v[kPixelsPerStep][kSlots], q[kPixelsPerStep];
      MVIT3_UNROLL
      for (int j = 0; j < kPixelsPerStep; ++j) {  // the loads of 4 pixels first
        const int t = t0 + j;
        const int y = 2 * (row0 + t / half_width) + p / 2, xx = 2 * (t % half_width) + p % 2;
        const T* pixel = t < tokens ? x + map_offset(args.x, b, 0, y, xx) : x;
        MVIT3_UNROLL
        for (int i = 0; i < kSlots; ++i) {
          const int c = lane + 32 * i;
          v[j][i] = t < tokens && c < dim ? to_float(pixel[c * args.x.stride_c]) - mean : 0.0f;
        }
      }
      MVIT3_UNROLL
      for (int j = 0; j < kPixelsPerStep; ++j) {
        q[j] = 0.0f;
        MVIT3_UNROLL
        for (int i = 0; i < kSlots; ++i) q[j] = fmaf(lane_q_weight[i], v[j][i], q[j]);
        q[j] = warp_allreduce(q[j], Sum());
      }
      MVIT3_UNROLL
      for (int j = 0; j < kPixelsPerStep; ++j) {
        if (t0 + j >= tokens) break;
        const float m_new = fmaxf(m, q[j]);
        const float rescale = exp2f(m - m_new), e = exp2f(q[j] - m_new);
        l = fmaf(l, rescale, e);
        MVIT3_UNROLL
        for (int i = 0; i < kSlots; ++i) acc[i] = fmaf(acc[i], rescale, e * v[j][i]);
        m = m_new;
      }
    }
    // The warps' states -> the program's (a thread a channel), to the partials workspace.
    if (lane == 0) {
      warp_states[warp][0] = m;
      warp_states[warp][1] = l;
    }
    MVIT3_UNROLL
    for (int i = 0; i < kSlots; ++i)
      if (lane + 32 * i < dim) warp_states[warp][2 + lane + 32 * i] = acc[i];
    __syncthreads();
    float m_all = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, warp_states[w][0]);
    float l_all = 0.0f, x_all = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      // 0 for a warp without tokens (its m is -inf), which the band's shortness can leave
      const float f = warp_states[w][0] == -INFINITY ? 0.0f : exp2f(warp_states[w][0] - m_all);
      l_all = fmaf(f, warp_states[w][1], l_all);
      if (tid < dim) x_all = fmaf(f, warp_states[w][2 + tid], x_all);
    }
    float* state = partials + p * (2 + dim);
    if (tid == 0) {
      state[0] = m_all;
      state[1] = l_all;
    }
    if (tid < dim) state[2 + tid] = x_all;
    __syncthreads();  // warp_states are read before the next sequence rewrites them
  }

  // The sample's last program merges the splits. The block's stores, a barrier, then thread 0
  // fences (release, cumulative over what the barrier ordered before it), counts, and fences
  // again (acquire) before the barrier after which the block reads the others' states at L2.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    is_last = atomicAdd(args.counters + b, 1) == args.splits - 1;
    __threadfence();
  }
  __syncthreads();
  if (!is_last) return;
  const float* sample_states = args.partials + int64_t(b) * args.splits * 4 * (2 + dim);
  for (int p = 0; p < 4; ++p) {
    if (tid >= dim) continue;
    float m_all = -INFINITY;
    for (int s = 0; s < args.splits; ++s)
      m_all = fmaxf(m_all, load_coherent(sample_states + (s * 4 + p) * (2 + dim)));
    float l_all = 0.0f, x_all = 0.0f;
    for (int s = 0; s < args.splits; ++s) {  // in split order: the same sum every run
      const float* state = sample_states + (s * 4 + p) * (2 + dim);
      const float f = exp2f(load_coherent(state) - m_all);
      l_all = fmaf(f, load_coherent(state + 1), l_all);
      x_all = fmaf(f, load_coherent(state + 2 + tid), x_all);
    }
    mean_a[p][tid] = x_all / l_all * rstd * to_float(gamma[tid]) + to_float(beta[tid]);
  }
  __syncthreads();
  // context[b, p, o] = Wk[o] . mean_a[p] + bk[o], a thread an output channel (k is rows 1 .. d)
  const T* bias = static_cast<const T*>(args.qkv_bias);
  for (int o = tid; o < dim; o += kThreads) {
    const T* row = weight + (1 + o) * args.qkv_weight.stride_row;
    float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c = 0; c < dim; ++c) {
      const float w = to_float(row[c * args.qkv_weight.stride_col]);
      MVIT3_UNROLL
      for (int p = 0; p < 4; ++p) sums[p] = fmaf(w, mean_a[p][c], sums[p]);
    }
    MVIT3_UNROLL
    for (int p = 0; p < 4; ++p)
      args.context[(int64_t(b) * 4 + p) * dim + o] = sums[p] + to_float(bias[1 + o]);
  }
  if (tid == 0) {
    args.group_stats[2 * int64_t(b)] = mean;
    args.group_stats[2 * int64_t(b) + 1] = rstd;
    args.counters[b] = 0;  // every program of the sample has counted: ready for the next launch
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) context_kernel(ContextArgs args) {
  if constexpr (arch_supports<T>()) context_body<T>(args);
}

// The out GEMM's A of the three-launch path: A[pixel, c] = relu(v[pixel, c]) * context[b,
// p(pixel), c].
template <class T>
struct SeparableOutProducer {
  Map v;
  const float* context = nullptr;
  int dim = 0;
  bool channels_contiguous = false;

  MVIT3_DEVICE void init_row(gemm::Row& row) const {
    row.offset = map_offset(v, row.b, 0, row.y, row.x);
    row.offset2 = (int64_t(row.b) * 4 + 2 * (row.y % 2) + row.x % 2) * dim;  // context row
  }

  MVIT3_DEVICE void prepare(gemm::Row*) const {}

  MVIT3_DEVICE float a(const gemm::Row& row, int c) const {
    const float value = to_float(static_cast<const T*>(v.data)[row.offset + c * v.stride_c]);
    return fmaxf(value, 0.0f) * context[row.offset2 + c];
  }
};

}  // namespace

void separable_attention(const SeparableAttentionArgs& args, DType dtype, Stream stream) {
  if (args.batch == 0 || args.height < 2 || args.width < 2) return;
  const int dim = args.dim;
  if (dim > kMaxSeparableDim || args.splits < 1)
    throw std::runtime_error("separable_attention: d " + std::to_string(dim) + " (at most " +
                             std::to_string(kMaxSeparableDim) + "), splits " +
                             std::to_string(args.splits) + " (at least 1)");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    ContextArgs context;
    context.x = args.x;
    context.vector_width = sample_vector_width<T>(args.x, dim, args.height, args.width);
    context.height = args.height;
    context.width = args.width;
    context.dim = dim;
    context.splits = args.splits;
    context.norm_weight = args.norm_weight;
    context.norm_bias = args.norm_bias;
    context.eps = args.eps;
    context.qkv_weight = args.qkv_weight;
    context.qkv_bias = args.qkv_bias;
    context.partials = args.partials;
    context.counters = args.counters;
    context.context = args.context;
    context.group_stats = args.group_stats;
    launch_chunks(args.batch, args.splits, [&](int64_t first, int64_t samples) {
      context.first_sample = int(first);
      launch(&context_kernel<T>, grid_of(samples * args.splits), dim3(kThreads), stream, context);
    });

    // The v rows of qkv (1 + d .. 1 + 2d - 1) as the first GEMM's weight and bias.
    const Matrix v_weight{static_cast<const T*>(args.qkv_weight.data) +
                              (1 + dim) * args.qkv_weight.stride_row,
                          args.qkv_weight.stride_row, args.qkv_weight.stride_col};
    const T* v_bias = static_cast<const T*>(args.qkv_bias) + 1 + dim;
    if (separable_attention_fused(dtype, dim, args.shared_limit)) {
      TransformerMlpArgs mlp;
      mlp.x = args.x;
      mlp.out = args.out;
      mlp.batch = args.batch;
      mlp.height = args.height;
      mlp.width = args.width;
      mlp.dim = dim;
      mlp.ffn_dim = dim;
      mlp.norm = Norm::group;
      mlp.norm_weight = args.norm_weight;
      mlp.norm_bias = args.norm_bias;
      mlp.eps = args.eps;
      mlp.group_stats = args.group_stats;
      mlp.w1 = v_weight;
      mlp.b1 = v_bias;
      mlp.w2 = args.out_weight;
      mlp.b2 = args.out_bias;
      mlp.shared_limit = args.shared_limit;
      fused_separable_attention_out(mlp, args.context, dtype, stream);
      return;
    }

    gemm::Epilogue v_ep;
    v_ep.bias = v_bias;
    v_ep.out = args.v;
    const gemm::Shape shape{args.batch, args.height, args.width, dim, dim};
    gemm::run<T>(gemm::pointwise_producer<T>(args.x, dim, Map{}, Norm::group, args.norm_weight,
                                             args.norm_bias, args.eps, args.group_stats),
                 v_weight, v_ep, shape, stream);

    SeparableOutProducer<T> producer;
    producer.v = args.v;
    producer.context = args.context;
    producer.dim = dim;
    producer.channels_contiguous = args.v.stride_c == 1;
    gemm::Epilogue ep;
    ep.bias = args.out_bias;
    ep.residual = args.x;
    ep.out = args.out;
    gemm::run<T>(producer, args.out_weight, ep, shape, stream);
  });
}

}  // namespace mvit3
