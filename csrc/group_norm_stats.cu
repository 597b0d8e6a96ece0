// Per-sample GroupNorm(1) statistics: mean and 1/sqrt(var + eps) over all C*H*W values of a
// sample -> stats [B, 2] fp32. A helper of the norm="group" ops (pointwise_conv,
// transformer_mlp), not a public op. Twin of mvit3.ops.reference.group_norm_stats and
// kernels/group_norm_stats.py; separable_attention's context kernel takes the same statistics
// itself (sample_moments, device.cuh).
//
// One block per sample, two passes over the map (sample_moments: 16-byte loads where each
// sample is a dense aligned range). A v2-style map is at most a few hundred thousand values,
// which one block reads in a few microseconds, and a single block per sample keeps the result
// deterministic.
#include "device.cuh"

namespace mvit3 {
namespace {

constexpr int kThreads = 512;

template <class T>
__global__ void __launch_bounds__(kThreads) group_norm_stats_kernel(GroupNormStatsArgs args,
                                                                    int vector_width,
                                                                    int first_sample) {
  if constexpr (arch_supports<T>()) {
    MVIT3_SHARED(float[32], scratch);
    const int b = first_sample + int(blockIdx.x);
    const float2 moments = sample_moments<kThreads, T>(args.x, vector_width, b, args.channels,
                                                       args.height, args.width, scratch);
    if (threadIdx.x == 0) {
      float* stats = args.stats + 2 * int64_t(b);  // [B, 2]
      stats[0] = moments.x;
      stats[1] = rsqrtf(moments.y + args.eps);
    }
  }
}

}  // namespace

void group_norm_stats(const GroupNormStatsArgs& args, DType dtype, Stream stream) {
  if (args.batch == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int vector_width = sample_vector_width<T>(args.x, args.channels, args.height, args.width);
    launch_chunks(args.batch, 1, [&](int64_t first, int64_t samples) {
      launch(&group_norm_stats_kernel<T>, grid_of(samples), dim3(kThreads), stream, args,
             vector_width, int(first));
    });
  });
}

}  // namespace mvit3
