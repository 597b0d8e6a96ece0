// Per-sample GroupNorm(1) statistics: mean and 1/sqrt(var + eps) over all C*H*W values of a
// sample -> stats [B, 2] fp32. A helper of the norm="group" ops (pointwise_conv,
// transformer_mlp, separable_attention), not a public op. Twin of
// mvit3.ops.reference.group_norm_stats and kernels/group_norm_stats.py.
//
// One block per sample, two passes over the map (mean, then centred squares) so the variance
// never suffers the cancellation of E[x^2] - E[x]^2. A v2-style map is at most a few hundred
// thousand values, which one block reads in a few microseconds, and a single block per sample
// keeps the result deterministic.
#include "device.cuh"

namespace mvit3 {
namespace {

constexpr int kThreads = 512;

template <class T>
__global__ void __launch_bounds__(kThreads) group_norm_stats_kernel(GroupNormStatsArgs args,
                                                                    int first_sample) {
  if constexpr (arch_supports<T>()) {
    MVIT3_SHARED(float[32], scratch);
    const T* x = static_cast<const T*>(args.x.data);
    const int b = first_sample + int(blockIdx.x);
    const int pixels = args.height * args.width;
    const int64_t count = int64_t(args.channels) * pixels;
    // Walk the unit-stride dimension fastest: channels for channels_last, pixels for NCHW.
    const bool channels_fastest = args.x.stride_c == 1;
    auto value = [&](int64_t e) {
      const int c = channels_fastest ? int(e % args.channels) : int(e / pixels);
      const int p = channels_fastest ? int(e / args.channels) : int(e % pixels);
      return to_float(x[map_offset(args.x, b, c, p / args.width, p % args.width)]);
    };
    float sum = 0.0f;
    for (int64_t e = threadIdx.x; e < count; e += kThreads) sum += value(e);
    const float mean = block_allreduce<kThreads>(sum, scratch, Sum()) / float(count);
    float squares = 0.0f;
    for (int64_t e = threadIdx.x; e < count; e += kThreads) {
      const float d = value(e) - mean;
      squares += d * d;
    }
    const float var = block_allreduce<kThreads>(squares, scratch, Sum()) / float(count);
    if (threadIdx.x == 0) {
      float* stats = args.stats + 2 * int64_t(b);  // [B, 2]
      stats[0] = mean;
      stats[1] = rsqrtf(var + args.eps);
    }
  }
}

}  // namespace

void group_norm_stats(const GroupNormStatsArgs& args, DType dtype, Stream stream) {
  if (args.batch == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_chunks(args.batch, 1, [&](int64_t first, int64_t samples) {
      launch(&group_norm_stats_kernel<T>, grid_of(samples), dim3(kThreads), stream, args,
             int(first));
    });
  });
}

}  // namespace mvit3
