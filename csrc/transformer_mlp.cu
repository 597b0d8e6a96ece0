// transformer_mlp: the pre-norm FFN sub-layer with its residual,
//   out = x + silu(norm(x) @ w1^T + b1) @ w2^T + b2,
// norm "layer" (v1-style) or "group" (v2-style). Semantics: mvit3.ops.reference.transformer_mlp.
//
// Two tile GEMMs through pointwise_conv: the first has the norm as its prologue and SiLU as its
// epilogue and writes the hidden map [B, F, H, W] (a workspace in the I/O dtype); the second
// adds b2 and the residual x. Keeping the hidden tile on chip instead would need F = 2d (up to
// 512) channels of 64 pixels in shared memory, more than sm_75 offers.
#include "mvit3.h"

namespace mvit3 {

void transformer_mlp(const TransformerMlpArgs& args, DType dtype, Stream stream) {
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

}  // namespace mvit3
