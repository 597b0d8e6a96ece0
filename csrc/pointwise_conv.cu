// pointwise_conv: out = act(cat(norm(x), x2) @ weight^T + bias) + residual, per pixel.
// Semantics: mvit3.ops.reference.pointwise_conv. The 1x1-conv GEMM of the fast path; with two
// inputs and a residual it is the MobileViTv3 "fusion + residual" (no concat is materialised:
// the producer reads the two maps through their own strides), with a LayerNorm/GroupNorm
// prologue it is "norm + qkv" and "norm + conv_proj".
//
// One tile GEMM (tile_gemm.cuh); norm="group" first runs group_norm_stats.
#include "tile_gemm.cuh"

namespace mvit3 {

void pointwise_conv(const PointwiseConvArgs& args, DType dtype, Stream stream) {
  if (args.norm == Norm::group) {
    group_norm_stats({args.x, args.batch, args.c1, args.height, args.width, args.eps, args.group_stats},
                     dtype, stream);
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto producer = gemm::pointwise_producer<T>(args.x, args.c1, args.x2, args.norm,
                                                      args.norm_weight, args.norm_bias, args.eps,
                                                      args.group_stats);
    gemm::Epilogue ep;
    ep.bias = args.bias;
    ep.residual = args.residual;
    ep.out = args.out;
    ep.act = args.act;
    const gemm::Shape shape{args.batch, args.height, args.width, args.cout, args.c1 + args.c2};
    gemm::run<T>(producer, args.weight, ep, shape, stream);
  });
}

}  // namespace mvit3
