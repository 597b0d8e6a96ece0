// separable_attention: the v2-style attention sub-layer with its residual (cvnets
// LinearSelfAttention). Semantics: mvit3.ops.reference.separable_attention.
//
//   a = GroupNorm1(x); [q | k | v] = a @ qkv_weight^T + qkv_bias      (1, d, d channels)
//   for each sequence (b, p): score = softmax over its N patches of q
//                              context[b, p, :] = sum_n score_n * k_n
//   out = x + (relu(v) * context) @ out_weight^T + out_bias
//
// Four launches: group_norm_stats and the qkv GEMM (pointwise_conv with norm="group") write
// qkv [B, 1+2d, H, W] to a workspace; one context kernel reduces each sequence over its N
// patches into context [B, 4, d] (fp32); the out GEMM's producer forms relu(v) * context while
// staging its A tile, and its epilogue adds the bias and the residual. The patch layout is pure
// index arithmetic: pixel (y, x) is patch n = (y/2) * (W/2) + x/2 of sequence p = 2*(y%2) + x%2.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

constexpr int kContextThreads = 256;  // 8 warps
constexpr int kContextChannels = 32;  // one channel per lane

struct ContextArgs {
  Map qkv;
  float* context;  // [B, 4, d]
  int height, width, dim;
  int first_sample;  // the sample of block x = 0 (a launch covers a chunk of the batch)
};

// Block (sequence of the launch's chunk of samples, 32 channels): softmax statistics of q over
// the sequence's N patches, then warp w sums score_n * k_n over patches n = w, w + 8, ... for
// its lane's channel.
template <class T>
MVIT3_DEVICE void context_body(const ContextArgs& args) {
  MVIT3_SHARED(float[32], scratch);
  MVIT3_SHARED(float[kContextThreads / 32][kContextChannels], partial);
  const T* qkv = static_cast<const T*>(args.qkv.data);
  const int b = args.first_sample + int(blockIdx.x) / 4, pos = blockIdx.x % 4;
  const int half_width = args.width / 2;
  const int tokens = (args.height / 2) * half_width;
  auto offset = [&](int n, int channel) {  // of patch n of this sequence
    return map_offset(args.qkv, b, channel, (n / half_width) * 2 + pos / 2,
                      (n % half_width) * 2 + pos % 2);
  };
  auto q = [&](int n) { return to_float(qkv[offset(n, 0)]); };

  float local_max = -INFINITY;
  for (int n = threadIdx.x; n < tokens; n += kContextThreads) local_max = fmaxf(local_max, q(n));
  const float q_max = block_allreduce<kContextThreads>(local_max, scratch, Max());
  float local_sum = 0.0f;
  for (int n = threadIdx.x; n < tokens; n += kContextThreads) local_sum += expf(q(n) - q_max);
  const float denominator = block_allreduce<kContextThreads>(local_sum, scratch, Sum());

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = blockIdx.y * kContextChannels + lane;
  float acc = 0.0f;
  if (c < args.dim)
    for (int n = warp; n < tokens; n += kContextThreads / 32)
      acc = fmaf(expf(q(n) - q_max), to_float(qkv[offset(n, 1 + c)]), acc);
  partial[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < args.dim) {
    float total = 0.0f;
    for (int w = 0; w < kContextThreads / 32; ++w) total += partial[w][lane];
    args.context[(int64_t(b) * 4 + pos) * args.dim + c] = total / denominator;
  }
}

template <class T>
__global__ void __launch_bounds__(kContextThreads) context_kernel(ContextArgs args) {
  if constexpr (arch_supports<T>()) context_body<T>(args);
}

// A[pixel, c] = relu(v[pixel, c]) * context[b, p(pixel), c], v = qkv channel 1 + d + c.
template <class T>
struct SeparableOutProducer {
  Map qkv;
  const float* context = nullptr;
  int dim = 0;
  bool channels_contiguous = false;

  MVIT3_DEVICE void init_row(gemm::Row& row) const {
    row.offset = map_offset(qkv, row.b, 1 + dim, row.y, row.x);
    row.offset2 = (int64_t(row.b) * 4 + 2 * (row.y % 2) + row.x % 2) * dim;  // context row
  }

  MVIT3_DEVICE void prepare(gemm::Row*) const {}

  MVIT3_DEVICE float a(const gemm::Row& row, int c) const {
    const float v = to_float(static_cast<const T*>(qkv.data)[row.offset + c * qkv.stride_c]);
    return fmaxf(v, 0.0f) * context[row.offset2 + c];
  }
};

}  // namespace

void separable_attention(const SeparableAttentionArgs& args, DType dtype, Stream stream) {
  const int tokens = (args.height / 2) * (args.width / 2);
  if (args.batch == 0 || tokens == 0) return;
  const int dim = args.dim;

  PointwiseConvArgs qkv;
  qkv.x = args.x;
  qkv.out = args.qkv;
  qkv.batch = args.batch;
  qkv.height = args.height;
  qkv.width = args.width;
  qkv.c1 = dim;
  qkv.cout = 1 + 2 * dim;
  qkv.weight = args.qkv_weight;
  qkv.bias = args.qkv_bias;
  qkv.norm = Norm::group;
  qkv.norm_weight = args.norm_weight;
  qkv.norm_bias = args.norm_bias;
  qkv.eps = args.eps;
  qkv.group_stats = args.group_stats;
  pointwise_conv(qkv, dtype, stream);

  ContextArgs context;
  context.qkv = args.qkv;
  context.context = args.context;
  context.height = args.height;
  context.width = args.width;
  context.dim = dim;
  // Grid: x = the 4 sequences of each sample of the chunk, y = 32 channels each (1 + 2d <=
  // kMaxChannels, which ops.cpp checks, keeps d / 32 within 65535).
  const int64_t channel_blocks = ceil_div(dim, kContextChannels);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_chunks(args.batch, 4, [&](int64_t first, int64_t samples) {
      context.first_sample = int(first);
      launch(&context_kernel<T>, grid_of(4 * samples, channel_blocks), dim3(kContextThreads),
             stream, context);
    });

    SeparableOutProducer<T> producer;
    producer.qkv = args.qkv;
    producer.context = args.context;
    producer.dim = dim;
    producer.channels_contiguous = args.qkv.stride_c == 1;
    gemm::Epilogue ep;
    ep.bias = args.out_bias;
    ep.residual = args.x;
    ep.out = args.out;
    const gemm::Shape shape{args.batch, args.height, args.width, dim, dim};
    gemm::run<T>(producer, args.out_weight, ep, shape, stream);
  });
}

}  // namespace mvit3
