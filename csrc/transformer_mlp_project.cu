// transformer_mlp_project: a v1-style FFN sub-layer and the LayerNorm + 1x1 projection after it,
//   t = x + silu(LayerNorm(x) @ w1^T + b1) @ w2^T + b2,
//   out = act(LayerNorm(t) @ proj_weight^T + proj_bias),
// returning both (t is the next sub-layer's residual). Semantics:
// mvit3.ops.reference.transformer_mlp_project.
//
// One launch where transformer_mlp_project_fused (mvit3.h: where the FFN is one launch, any
// Cout): fused_mlp_kernel<T, true> (csrc/transformer_mlp.cu) keeps its 16 pixels' t rows in
// shared memory, takes their LayerNorm there and runs the projection as its third GEMM.
// Elsewhere (FFNs past d 256 or F 512, fp32 ones past the device's shared memory) the two parts
// run one after the other:
// transformer_mlp (one launch or two), then pointwise_conv with the LayerNorm prologue reading
// t back.
#include "mvit3.h"

namespace mvit3 {

void transformer_mlp_project(const TransformerMlpProjectArgs& args, DType dtype, Stream stream) {
  if (transformer_mlp_project_fused(dtype, args.mlp.dim, args.mlp.ffn_dim, args.project.cout,
                                    args.mlp.shared_limit)) {
    fused_transformer_mlp_project(args, dtype, stream);
    return;
  }
  transformer_mlp(args.mlp, dtype, stream);
  pointwise_conv(args.project, dtype, stream);
}

}  // namespace mvit3
