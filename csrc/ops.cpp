// The op table of the mvit3 CUDA library: the schemas (TORCH_LIBRARY(mvit3, m), generated from
// mvit3/ops/schemas.def, the file mvit3/ops/library.py reads too) and the CUDA kernels
// (TORCH_LIBRARY_IMPL).
//
// Each op here validates its arguments (the limits mvit3/ops/cuda_lib.py::why_unsupported
// mirrors), allocates its output (channels_last, like every op of mvit3) and workspaces with
// torch's caching allocator, and calls the launcher of csrc/<op>.cu on the current stream.
// Nothing here waits for the GPU, so the ops can be captured in CUDA graphs.
//
// Built with MVIT3_EMULATE, the same table registers the ops as mvit3_emulated::<op> for CPU
// tensors, run by the CPU emulator of the kernels (emulator.h); the tests use it where there
// is no GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <string_view>
#include <tuple>

#ifndef MVIT3_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "mvit3.h"

namespace mvit3 {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

#ifdef MVIT3_EMULATE
constexpr const char* kDeviceName = "CPU (emulated kernels)";
bool on_kernel_device(const Tensor& t) { return t.is_cpu(); }
#else
constexpr const char* kDeviceName = "CUDA";
bool on_kernel_device(const Tensor& t) { return t.is_cuda(); }
#endif

// ---- argument checks ------------------------------------------------------------------------

DType dtype_of(const Tensor& x) {
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "mvit3: dtype ", type, " is not supported (float32, float16, bfloat16)");
  return type == at::kFloat ? DType::f32 : type == at::kHalf ? DType::f16 : DType::bf16;
}

// Every tensor of a call shares the dtype and device of the input x.
void check_like(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mvit3: ", name, " is ", t.scalar_type(),
              " but the input is ", x.scalar_type(), " (every tensor of a call shares its dtype)");
  TORCH_CHECK(t.device() == x.device(), "mvit3: ", name, " is on ", t.device(),
              " but the input is on ", x.device());
}

void check_shape(const Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "mvit3: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// The size limits of mvit3.h, in the words of mvit3/ops/cuda_lib.py::why_unsupported.
void check_channels(int64_t channels, const char* name) {
  TORCH_CHECK(channels <= kMaxChannels, "mvit3: ", name, " has ", channels, " channels, over ",
              kMaxChannels, " (the kernels put 64 channels per block on grid axis y, at most ",
              kMaxGridYZ, " blocks)");
}

// The input map x [B, C, H, W] of an op: any strides, on the kernels' device. Any numel: the
// kernels' offsets are int64 and the launchers split grids that would pass CUDA's limits.
void check_input(const Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), "mvit3: ", name, " is undefined");
  TORCH_CHECK(on_kernel_device(x), "mvit3: ", name, " must be a ", kDeviceName, " tensor, got ",
              x.device());
  dtype_of(x);
  TORCH_CHECK(x.dim() == 4, "mvit3: ", name, " must be a [B, C, H, W] map, got shape ", x.sizes());
  for (const int64_t size : x.sizes())
    TORCH_CHECK(size <= INT_MAX, "mvit3: ", name, " [B, C, H, W] = ", x.sizes(),
                " has a size over 2^31 - 1 (the kernels index samples, channels, rows and columns",
                " with int32)");
  TORCH_CHECK(x.size(2) * x.size(3) <= INT_MAX, "mvit3: ", name, " has H * W = ",
              x.size(2) * x.size(3), " pixels, over 2^31 - 1 (the kernels index the pixels of a",
              " sample with int32)");
  check_channels(x.size(1), name);
#ifndef MVIT3_EMULATE
  if (x.scalar_type() == at::kBFloat16) {
    int major = 0;
    const cudaError_t error =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device());
    TORCH_CHECK(error == cudaSuccess, "mvit3: ", cudaGetErrorString(error));
    TORCH_CHECK(major >= 8, "mvit3: bfloat16 needs compute capability 8.0 or newer (device ",
                x.get_device(), " has ", major, ".x)");
  }
#endif
}

// A second map of the call: same batch and spatial size as x (or as given).
void check_map(const Tensor& t, const Tensor& x, const char* name, int64_t channels, int64_t height,
               int64_t width) {
  check_like(t, x, name);
  check_shape(t, {x.size(0), channels, height, width}, name);
}

bool present(const OptionalTensor& t) { return t.has_value() && t->defined(); }

// A vector or a 3x3 filter: checked, then made contiguous (a no-op for the fast models'
// weights); the kernels index it densely.
Tensor dense(const Tensor& t, const Tensor& x, at::IntArrayRef expected, const char* name) {
  check_like(t, x, name);
  check_shape(t, expected, name);
  return t.contiguous();
}

std::optional<Tensor> optional_dense(const OptionalTensor& t, const Tensor& x,
                                     at::IntArrayRef expected, const char* name) {
  if (!present(t)) return std::nullopt;
  return dense(*t, x, expected, name);
}

// A 2-D weight: checked, then read through its strides (the fast models pack them K-major).
Matrix matrix(const Tensor& t, const Tensor& x, at::IntArrayRef expected, const char* name) {
  check_like(t, x, name);
  check_shape(t, expected, name);
  return Matrix{t.data_ptr(), t.stride(0), t.stride(1)};
}

Norm parse_norm(std::string_view norm) {
  TORCH_CHECK(norm == "none" || norm == "layer" || norm == "group",
              "mvit3: norm must be 'none', 'layer' or 'group', got '", norm, "'");
  return norm == "layer" ? Norm::layer : norm == "group" ? Norm::group : Norm::none;
}

Act parse_act(std::string_view act) {
  TORCH_CHECK(act == "none" || act == "silu", "mvit3: act must be 'none' or 'silu', got '", act, "'");
  return act == "silu" ? Act::silu : Act::none;
}

int check_stride(int64_t stride) {
  TORCH_CHECK(stride == 1 || stride == 2, "mvit3: stride must be 1 or 2, got ", stride);
  return int(stride);
}

// After check_input (H, W < 2^31): the taps' input rows and columns reach H - 1 + dilation.
int check_dilation(int64_t dilation, const Tensor& x) {
  TORCH_CHECK(dilation >= 1, "mvit3: dilation must be a positive int, got ", dilation);
  TORCH_CHECK(dilation <= (int64_t(1) << 31) - std::max(x.size(2), x.size(3)),
              "mvit3: H + dilation and W + dilation must be <= 2^31 (the kernels index tap rows and ",
              "columns with int32), got ", x.size(2), "x", x.size(3), " with dilation ", dilation);
  return int(dilation);
}

void check_even(const Tensor& x, const char* op) {
  TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, "mvit3: ", op,
              " sees the map as 2x2 patches: H and W must be even, got ", x.size(2), "x", x.size(3));
}

// ---- tensors -> launcher arguments ---------------------------------------------------------

Map map_of(const Tensor& t) {
  return Map{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

Map map_of(const OptionalTensor& t) { return present(t) ? map_of(*t) : Map{}; }

const void* data_of(const std::optional<Tensor>& t) { return t ? t->data_ptr() : nullptr; }

// Outputs and map workspaces: channels_last (NHWC storage).
Tensor empty_map(const Tensor& x, int64_t channels, int64_t height, int64_t width) {
  return at::empty({x.size(0), channels, height, width},
                   x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

Tensor empty_fp32(const Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().dtype(at::kFloat));
}

// The device and stream the kernels of a call run on.
struct KernelContext {
#ifdef MVIT3_EMULATE
  explicit KernelContext(const Tensor&) {}
  Stream stream{};
#else
  explicit KernelContext(const Tensor& x)
      : guard(x.device()), stream(c10::cuda::getCurrentCUDAStream(x.get_device()).stream()) {}
  c10::cuda::CUDAGuard guard;
  Stream stream;
#endif
};

int as_int(int64_t v) { return int(v); }  // sizes: within int32 by check_input and check_channels

// ---- the ops --------------------------------------------------------------------------------

// A checked pointwise_conv call: its launcher arguments, the output and workspace they point
// to, and the contiguous vectors (kept alive here until the launch).
struct PointwiseConvCall {
  PointwiseConvArgs args;
  Tensor out, stats;
  std::optional<Tensor> bias, norm_weight, norm_bias;
};

PointwiseConvCall pointwise_conv_call(const Tensor& x, const Tensor& weight,
                                      const OptionalTensor& bias, const OptionalTensor& x2,
                                      const OptionalTensor& residual, c10::string_view norm,
                                      const OptionalTensor& norm_weight,
                                      const OptionalTensor& norm_bias, double eps,
                                      c10::string_view act) {
  check_input(x, "x");
  const int64_t batch = x.size(0), c1 = x.size(1), height = x.size(2), width = x.size(3);
  int64_t c2 = 0;
  if (present(x2)) {
    c2 = x2->size(1);
    check_map(*x2, x, "x2", c2, height, width);
    check_channels(c2, "x2");
  }
  TORCH_CHECK(weight.dim() == 2, "mvit3: weight must be [Cout, C1 + C2], got ", weight.sizes());
  const int64_t cout = weight.size(0);
  check_channels(cout, "weight (Cout)");
  const Matrix w = matrix(weight, x, {cout, c1 + c2}, "weight");
  PointwiseConvCall call;
  call.bias = optional_dense(bias, x, {cout}, "bias");
  if (present(residual)) check_map(*residual, x, "residual", cout, height, width);
  call.norm_weight = optional_dense(norm_weight, x, {c1}, "norm_weight");
  call.norm_bias = optional_dense(norm_bias, x, {c1}, "norm_bias");

  call.out = empty_map(x, cout, height, width);
  PointwiseConvArgs& args = call.args;
  args.norm = parse_norm(norm);
  args.act = parse_act(act);
  if (args.norm == Norm::group) call.stats = empty_fp32(x, {batch, 2});
  args.x = map_of(x);
  args.x2 = map_of(x2);
  args.residual = map_of(residual);
  args.out = map_of(call.out);
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.c1 = as_int(c1);
  args.c2 = as_int(c2);
  args.cout = as_int(cout);
  args.weight = w;
  args.bias = data_of(call.bias);
  args.norm_weight = data_of(call.norm_weight);
  args.norm_bias = data_of(call.norm_bias);
  args.eps = float(eps);
  args.group_stats = call.stats.defined() ? call.stats.data_ptr<float>() : nullptr;
  return call;
}

Tensor pointwise_conv_op(const Tensor& x, const Tensor& weight, const OptionalTensor& bias,
                         const OptionalTensor& x2, const OptionalTensor& residual,
                         c10::string_view norm, const OptionalTensor& norm_weight,
                         const OptionalTensor& norm_bias, double eps, c10::string_view act) {
  PointwiseConvCall call =
      pointwise_conv_call(x, weight, bias, x2, residual, norm, norm_weight, norm_bias, eps, act);
  KernelContext context(x);
  pointwise_conv(call.args, dtype_of(x), context.stream);
  return call.out;
}

// With expand_weight [Ch, Cin] (the whole MV2 block): the expansion silu(x @ expand_weight^T +
// expand_bias) runs first as its own pointwise_conv launch into a [B, Ch, H, W] workspace that the
// depthwise kernel then reads: 2 launches for now (issue 12 item 3: one kernel).
Tensor dwconv_pointwise_op(const Tensor& block_input, const Tensor& dw_weight, const Tensor& dw_bias,
                           const Tensor& weight, const OptionalTensor& bias, int64_t stride,
                           const OptionalTensor& residual, int64_t dilation,
                           const OptionalTensor& expand_weight, const OptionalTensor& expand_bias) {
  Tensor x = block_input;
  if (present(expand_weight)) {
    check_input(block_input, "x");
    TORCH_CHECK(dw_weight.dim() == 4, "mvit3: dw_weight must be [Ch, 1, 3, 3], got ", dw_weight.sizes());
    const int64_t hidden = dw_weight.size(0);
    check_channels(hidden, "the hidden workspace (Ch)");
    matrix(*expand_weight, block_input, {hidden, block_input.size(1)}, "expand_weight");
    optional_dense(expand_bias, block_input, {hidden}, "expand_bias");
    x = pointwise_conv_op(block_input, *expand_weight, expand_bias, std::nullopt, std::nullopt,
                          "none", std::nullopt, std::nullopt, 1e-5, "silu");
  } else {
    TORCH_CHECK(!present(expand_bias), "mvit3: expand_bias given without expand_weight");
  }
  check_input(x, "x");
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int s = check_stride(stride);
  const int d = check_dilation(dilation, x);
  const int64_t out_height = (height - 1) / s + 1, out_width = (width - 1) / s + 1;
  const Tensor dw = dense(dw_weight, x, {channels, 1, 3, 3}, "dw_weight");
  const Tensor db = dense(dw_bias, x, {channels}, "dw_bias");
  TORCH_CHECK(weight.dim() == 2, "mvit3: weight must be [Cout, C], got ", weight.sizes());
  const int64_t cout = weight.size(0);
  check_channels(cout, "weight (Cout)");
  const Matrix w = matrix(weight, x, {cout, channels}, "weight");
  const auto b = optional_dense(bias, x, {cout}, "bias");
  if (present(residual)) check_map(*residual, x, "residual", cout, out_height, out_width);

  Tensor out = empty_map(x, cout, out_height, out_width);
  DwconvPointwiseArgs args;
  args.x = map_of(x);
  args.residual = map_of(residual);
  args.out = map_of(out);
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.channels = as_int(channels);
  args.cout = as_int(cout);
  args.stride = s;
  args.dilation = d;
  args.out_height = as_int(out_height);
  args.out_width = as_int(out_width);
  args.dw_weight = dw.data_ptr();
  args.dw_bias = db.data_ptr();
  args.weight = w;
  args.bias = data_of(b);
  KernelContext context(x);
  dwconv_pointwise(args, dtype_of(x), context.stream);
  return out;
}

Tensor conv3x3_op(const Tensor& x, const Tensor& weight, const OptionalTensor& bias,
                  const OptionalTensor& x2, int64_t stride, c10::string_view act, int64_t dilation) {
  check_input(x, "x");
  const int64_t batch = x.size(0), c1 = x.size(1), height = x.size(2), width = x.size(3);
  int64_t c2 = 0;
  if (present(x2)) {
    c2 = x2->size(1);
    check_map(*x2, x, "x2", c2, height, width);
    check_channels(c2, "x2");
  }
  const int s = check_stride(stride);
  const int d = check_dilation(dilation, x);
  const int64_t out_height = (height - 1) / s + 1, out_width = (width - 1) / s + 1;
  TORCH_CHECK(weight.dim() == 4, "mvit3: weight must be [Cout, C1 + C2, 3, 3], got ", weight.sizes());
  const int64_t cout = weight.size(0);
  check_channels(cout, "weight (Cout)");
  const Tensor w = dense(weight, x, {cout, c1 + c2, 3, 3}, "weight");
  const auto b = optional_dense(bias, x, {cout}, "bias");

  Tensor out = empty_map(x, cout, out_height, out_width);
  Conv3x3Args args;
  args.x = map_of(x);
  args.x2 = map_of(x2);
  args.out = map_of(out);
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.c1 = as_int(c1);
  args.c2 = as_int(c2);
  args.cout = as_int(cout);
  args.stride = s;
  args.dilation = d;
  args.out_height = as_int(out_height);
  args.out_width = as_int(out_width);
  args.weight = w.data_ptr();
  args.bias = data_of(b);
  args.act = parse_act(act);
  KernelContext context(x);
  conv3x3(args, dtype_of(x), context.stream);
  return out;
}

Tensor patch_attention_op(const Tensor& qkv, int64_t num_heads, double scale,
                          const OptionalTensor& proj_weight, const OptionalTensor& proj_bias,
                          const OptionalTensor& residual) {
  check_input(qkv, "qkv");
  check_even(qkv, "patch_attention");
  const int64_t batch = qkv.size(0), height = qkv.size(2), width = qkv.size(3);
  TORCH_CHECK(qkv.size(1) % 3 == 0, "mvit3: qkv must have 3d channels, got ", qkv.size(1));
  const int64_t dim = qkv.size(1) / 3;
  TORCH_CHECK(num_heads > 0 && dim % num_heads == 0, "mvit3: num_heads (", num_heads,
              ") must divide d (", dim, ")");
  TORCH_CHECK(num_heads <= kMaxGridYZ, "mvit3: num_heads ", num_heads, " is over ", kMaxGridYZ,
              " (one head per block on grid axis y)");
  const int64_t head_dim = dim / num_heads;
  TORCH_CHECK(head_dim <= kMaxHeadDim, "mvit3: head dim ", head_dim, " > ", kMaxHeadDim,
              " is not supported by the CUDA kernels");
  const bool project = present(proj_weight);
  const Matrix pw = project ? matrix(*proj_weight, qkv, {dim, dim}, "proj_weight") : Matrix{};
  // Like the reference, proj_bias only counts with proj_weight.
  const auto pb = project ? optional_dense(proj_bias, qkv, {dim}, "proj_bias") : std::nullopt;
  if (present(residual)) check_map(*residual, qkv, "residual", dim, height, width);

  Tensor out = empty_map(qkv, dim, height, width);
  Tensor heads_out;
  if (project) heads_out = empty_map(qkv, dim, height, width);
  PatchAttentionArgs args;
  args.qkv = map_of(qkv);
  args.residual = map_of(residual);
  args.out = map_of(out);
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.heads = as_int(num_heads);
  args.head_dim = as_int(head_dim);
  args.scale = float(scale);
  args.proj_weight = pw;
  args.proj_bias = data_of(pb);
  if (project) args.heads_out = map_of(heads_out);
  KernelContext context(qkv);
  patch_attention(args, dtype_of(qkv), context.stream);
  return out;
}

// A checked transformer_mlp call: its launcher arguments, the output and workspaces they point
// to, and the contiguous vectors (kept alive here until the launch).
struct TransformerMlpCall {
  TransformerMlpArgs args;
  Tensor out, hidden, stats, norm_weight, norm_bias, b1, b2;
};

TransformerMlpCall transformer_mlp_call(const Tensor& x, c10::string_view norm,
                                        const Tensor& norm_weight, const Tensor& norm_bias,
                                        double eps, const Tensor& w1, const Tensor& b1,
                                        const Tensor& w2, const Tensor& b2) {
  check_input(x, "x");
  const int64_t batch = x.size(0), dim = x.size(1), height = x.size(2), width = x.size(3);
  TORCH_CHECK(w1.dim() == 2, "mvit3: w1 must be [F, d], got ", w1.sizes());
  const int64_t ffn_dim = w1.size(0);
  check_channels(ffn_dim, "w1 (F)");
  TransformerMlpCall call;
  call.norm_weight = dense(norm_weight, x, {dim}, "norm_weight");
  call.norm_bias = dense(norm_bias, x, {dim}, "norm_bias");
  const Matrix w1m = matrix(w1, x, {ffn_dim, dim}, "w1");
  call.b1 = dense(b1, x, {ffn_dim}, "b1");
  const Matrix w2m = matrix(w2, x, {dim, ffn_dim}, "w2");
  call.b2 = dense(b2, x, {dim}, "b2");

  call.out = empty_map(x, dim, height, width);
  call.hidden = empty_map(x, ffn_dim, height, width);
  TransformerMlpArgs& args = call.args;
  args.norm = parse_norm(norm);
  if (args.norm == Norm::group) call.stats = empty_fp32(x, {batch, 2});
  args.x = map_of(x);
  args.out = map_of(call.out);
  args.hidden = map_of(call.hidden);
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.dim = as_int(dim);
  args.ffn_dim = as_int(ffn_dim);
  args.norm_weight = call.norm_weight.data_ptr();
  args.norm_bias = call.norm_bias.data_ptr();
  args.eps = float(eps);
  args.group_stats = call.stats.defined() ? call.stats.data_ptr<float>() : nullptr;
  args.w1 = w1m;
  args.b1 = call.b1.data_ptr();
  args.w2 = w2m;
  args.b2 = call.b2.data_ptr();
  return call;
}

Tensor transformer_mlp_op(const Tensor& x, c10::string_view norm, const Tensor& norm_weight,
                          const Tensor& norm_bias, double eps, const Tensor& w1, const Tensor& b1,
                          const Tensor& w2, const Tensor& b2) {
  TransformerMlpCall call = transformer_mlp_call(x, norm, norm_weight, norm_bias, eps, w1, b1, w2, b2);
  KernelContext context(x);
  transformer_mlp(call.args, dtype_of(x), context.stream);
  return call.out;
}

// The FFN's output t is the projection's input: checked and allocated before either launch.
std::tuple<Tensor, Tensor> transformer_mlp_project_op(
    const Tensor& x, const Tensor& norm_weight, const Tensor& norm_bias, double eps,
    const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
    const Tensor& proj_norm_weight, const Tensor& proj_norm_bias, double proj_eps,
    const Tensor& proj_weight, const OptionalTensor& proj_bias, c10::string_view act) {
  TransformerMlpCall mlp = transformer_mlp_call(x, "layer", norm_weight, norm_bias, eps, w1, b1, w2, b2);
  TORCH_CHECK(proj_weight.dim() == 2, "mvit3: proj_weight must be [Cout, d], got ", proj_weight.sizes());
  PointwiseConvCall project =
      pointwise_conv_call(mlp.out, proj_weight, proj_bias, std::nullopt, std::nullopt, "layer",
                          proj_norm_weight, proj_norm_bias, proj_eps, act);
  TransformerMlpProjectArgs args;
  args.mlp = mlp.args;
  args.project = project.args;
  KernelContext context(x);
  transformer_mlp_project(args, dtype_of(x), context.stream);
  return {mlp.out, project.out};
}

Tensor separable_attention_op(const Tensor& x, const Tensor& norm_weight, const Tensor& norm_bias,
                              double eps, const Tensor& qkv_weight, const Tensor& qkv_bias,
                              const Tensor& out_weight, const Tensor& out_bias) {
  check_input(x, "x");
  check_even(x, "separable_attention");
  const int64_t batch = x.size(0), dim = x.size(1), height = x.size(2), width = x.size(3);
  check_channels(1 + 2 * dim, "the qkv workspace (1 + 2d)");
  const Tensor nw = dense(norm_weight, x, {dim}, "norm_weight");
  const Tensor nb = dense(norm_bias, x, {dim}, "norm_bias");
  const Matrix qw = matrix(qkv_weight, x, {1 + 2 * dim, dim}, "qkv_weight");
  const Tensor qb = dense(qkv_bias, x, {1 + 2 * dim}, "qkv_bias");
  const Matrix ow = matrix(out_weight, x, {dim, dim}, "out_weight");
  const Tensor ob = dense(out_bias, x, {dim}, "out_bias");

  Tensor out = empty_map(x, dim, height, width);
  Tensor qkv = empty_map(x, 1 + 2 * dim, height, width);
  Tensor context_vectors = empty_fp32(x, {batch, 4, dim});
  Tensor stats = empty_fp32(x, {batch, 2});
  SeparableAttentionArgs args;
  args.x = map_of(x);
  args.out = map_of(out);
  args.qkv = map_of(qkv);
  args.context = context_vectors.data_ptr<float>();
  args.group_stats = stats.data_ptr<float>();
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.dim = as_int(dim);
  args.norm_weight = nw.data_ptr();
  args.norm_bias = nb.data_ptr();
  args.eps = float(eps);
  args.qkv_weight = qw;
  args.qkv_bias = qb.data_ptr();
  args.out_weight = ow;
  args.out_bias = ob.data_ptr();
  KernelContext context(x);
  separable_attention(args, dtype_of(x), context.stream);
  return out;
}

}  // namespace
}  // namespace mvit3

#ifdef MVIT3_EMULATE
#define MVIT3_NAMESPACE mvit3_emulated
#define MVIT3_DISPATCH_KEY CPU
#else
#define MVIT3_NAMESPACE mvit3
#define MVIT3_DISPATCH_KEY CUDA
#endif
// One level of indirection so the namespace and key macros expand before TORCH_LIBRARY pastes.
#define MVIT3_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define MVIT3_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

// The schemas come from mvit3/ops/schemas.def, one MVIT3_OP(name, arguments, returns) per op.
MVIT3_LIBRARY(MVIT3_NAMESPACE, m) {
#define MVIT3_OP(name, arguments, returns) m.def(#name arguments " -> " returns);
#include "../mvit3/ops/schemas.def"
#undef MVIT3_OP
}

MVIT3_LIBRARY_IMPL(MVIT3_NAMESPACE, MVIT3_DISPATCH_KEY, m) {
#define MVIT3_OP(name, arguments, returns) m.impl(#name, &mvit3::name##_op);
#include "../mvit3/ops/schemas.def"
#undef MVIT3_OP
}
