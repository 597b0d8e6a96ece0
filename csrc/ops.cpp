// The op table of the mvit3 CUDA library: the schemas (TORCH_LIBRARY(mvit3, m), generated from
// mvit3/ops/schemas.def, the file mvit3/ops/library.py reads too), each op's argument checks and
// its CUDA kernel (TORCH_LIBRARY_IMPL).
//
// Each op's checks are written once, as <op>_why_not: the reason the kernels cannot take a call,
// or "" when they can. The op runs them first (TORCH_CHECK: "mvit3: <reason>"), then allocates
// its output (channels_last, like every op of mvit3) and workspaces with torch's caching
// allocator and calls the launcher of csrc/<op>.cu on the current stream. The library also
// registers them as the op mvit3::<op>_why_not (the op's arguments -> str, for any device), which
// mvit3/ops/cuda_lib.py::why_unsupported asks with meta tensors before dispatching a call here.
// Nothing here waits for the GPU, so the ops can be captured in CUDA graphs.
//
// Built with MVIT3_EMULATE, the same table registers the ops as mvit3_emulated::<op> for CPU
// tensors, run by the CPU emulator of the kernels (emulator.h); the tests use it where there
// is no GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
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
//
// A check returns the reason a call is refused, or "" (empty) when it passes. Meta tensors
// describe a call by sizes, strides and dtypes alone: the checks of the device are skipped for
// them, every other check applies.

using Reason = std::string;

// In a check: return the reason, built from the message parts, unless `condition` holds.
#define MVIT3_REQUIRE(condition, ...)               \
  do {                                              \
    if (!(condition)) return c10::str(__VA_ARGS__); \
  } while (false)
// In a check: return the reason of a nested check, if it has one.
#define MVIT3_REQUIRE_OK(check)                                    \
  do {                                                             \
    if (Reason reason_ = (check); !reason_.empty()) return reason_; \
  } while (false)

// Every tensor of a call shares the dtype and device of the input x.
Reason check_like(const Tensor& t, const Tensor& x, const char* name) {
  MVIT3_REQUIRE(t.scalar_type() == x.scalar_type(), name, " is ", t.scalar_type(),
                " but the input is ", x.scalar_type(),
                " (every tensor of a call shares its dtype)");
  MVIT3_REQUIRE(t.device() == x.device(), name, " is on ", t.device(), " but the input is on ",
                x.device());
  return {};
}

// A tensor of the call with the input's dtype and device and the expected shape.
Reason check_tensor(const Tensor& t, const Tensor& x, at::IntArrayRef expected, const char* name) {
  MVIT3_REQUIRE_OK(check_like(t, x, name));
  MVIT3_REQUIRE(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
  return {};
}

bool present(const OptionalTensor& t) { return t.has_value() && t->defined(); }

Reason check_optional(const OptionalTensor& t, const Tensor& x, at::IntArrayRef expected,
                      const char* name) {
  return present(t) ? check_tensor(*t, x, expected, name) : Reason{};
}

// A second map of the call: same batch as x and the given channels and spatial size.
Reason check_map(const Tensor& t, const Tensor& x, const char* name, int64_t channels,
                 int64_t height, int64_t width) {
  return check_tensor(t, x, {x.size(0), channels, height, width}, name);
}

// The size limits of mvit3.h.
Reason check_channels(int64_t channels, const char* name) {
  MVIT3_REQUIRE(channels <= kMaxChannels, name, " has ", channels, " channels, over ", kMaxChannels,
                " (the kernels put 64 channels per block on grid axis y, at most ", kMaxGridYZ,
                " blocks)");
  return {};
}

// The input map x [B, C, H, W] of an op: any strides, on the kernels' device (or meta). Any
// numel: the kernels' offsets are int64 and the launchers split grids that would pass CUDA's
// limits.
Reason check_input(const Tensor& x, const char* name) {
  MVIT3_REQUIRE(x.defined(), name, " is undefined");
  MVIT3_REQUIRE(x.is_meta() || on_kernel_device(x), name, " must be a ", kDeviceName,
                " tensor, got ", x.device());
  const auto type = x.scalar_type();
  MVIT3_REQUIRE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, "dtype ", type,
                " is not supported (float32, float16, bfloat16)");
  MVIT3_REQUIRE(x.dim() == 4, name, " must be a [B, C, H, W] map, got shape ", x.sizes());
  for (const int64_t size : x.sizes())
    MVIT3_REQUIRE(size <= INT_MAX, name, " [B, C, H, W] = ", x.sizes(),
                  " has a size over 2^31 - 1 (the kernels index samples, channels, rows and",
                  " columns with int32)");
  MVIT3_REQUIRE(x.size(2) * x.size(3) <= INT_MAX, name, " has H * W = ", x.size(2) * x.size(3),
                " pixels, over 2^31 - 1 (the kernels index the pixels of a sample with int32)");
  MVIT3_REQUIRE_OK(check_channels(x.size(1), name));
#ifndef MVIT3_EMULATE
  if (type == at::kBFloat16 && x.is_cuda()) {
    int major = 0;
    const cudaError_t error =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device());
    MVIT3_REQUIRE(error == cudaSuccess, cudaGetErrorString(error));
    MVIT3_REQUIRE(major >= 8, "bfloat16 needs compute capability 8.0 or newer (device ",
                  x.get_device(), " has ", major, ".x)");
  }
#endif
  return {};
}

// An optional second input map [B, C2, H, W] (the v3 fusion's concat); its channel count.
Reason check_x2(const OptionalTensor& x2, const Tensor& x, int64_t& c2) {
  c2 = 0;
  if (!present(x2)) return {};
  MVIT3_REQUIRE(x2->dim() == 4, "x2 must be a [B, C2, H, W] map, got shape ", x2->sizes());
  c2 = x2->size(1);
  MVIT3_REQUIRE_OK(check_map(*x2, x, "x2", c2, x.size(2), x.size(3)));
  return check_channels(c2, "x2");
}

Reason check_norm(std::string_view norm) {
  MVIT3_REQUIRE(norm == "none" || norm == "layer" || norm == "group",
                "norm must be 'none', 'layer' or 'group', got '", norm, "'");
  return {};
}

Reason check_act(std::string_view act) {
  MVIT3_REQUIRE(act == "none" || act == "silu", "act must be 'none' or 'silu', got '", act, "'");
  return {};
}

Reason check_stride(int64_t stride) {
  MVIT3_REQUIRE(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  return {};
}

// After check_input (H, W < 2^31): the taps' input rows and columns reach H - 1 + dilation.
Reason check_dilation(int64_t dilation, const Tensor& x) {
  MVIT3_REQUIRE(dilation >= 1, "dilation must be a positive int, got ", dilation);
  MVIT3_REQUIRE(dilation <= (int64_t(1) << 31) - std::max(x.size(2), x.size(3)),
                "H + dilation and W + dilation must be <= 2^31 (the kernels index tap rows and ",
                "columns with int32), got ", x.size(2), "x", x.size(3), " with dilation ",
                dilation);
  return {};
}

Reason check_even(const Tensor& x, const char* op) {
  MVIT3_REQUIRE(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, op,
                " sees the map as 2x2 patches: H and W must be even, got ", x.size(2), "x",
                x.size(3));
  return {};
}

// ---- each op's checks (registered as mvit3::<op>_why_not) -------------------------------------

Reason pointwise_conv_why_not(const Tensor& x, const Tensor& weight, const OptionalTensor& bias,
                              const OptionalTensor& x2, const OptionalTensor& residual,
                              c10::string_view norm, const OptionalTensor& norm_weight,
                              const OptionalTensor& norm_bias, double /*eps*/,
                              c10::string_view act) {
  MVIT3_REQUIRE_OK(check_input(x, "x"));
  const int64_t c1 = x.size(1), height = x.size(2), width = x.size(3);
  int64_t c2 = 0;
  MVIT3_REQUIRE_OK(check_x2(x2, x, c2));
  MVIT3_REQUIRE(weight.dim() == 2, "weight must be [Cout, C1 + C2], got ", weight.sizes());
  const int64_t cout = weight.size(0);
  MVIT3_REQUIRE_OK(check_channels(cout, "weight (Cout)"));
  MVIT3_REQUIRE_OK(check_tensor(weight, x, {cout, c1 + c2}, "weight"));
  MVIT3_REQUIRE_OK(check_optional(bias, x, {cout}, "bias"));
  if (present(residual)) MVIT3_REQUIRE_OK(check_map(*residual, x, "residual", cout, height, width));
  MVIT3_REQUIRE_OK(check_optional(norm_weight, x, {c1}, "norm_weight"));
  MVIT3_REQUIRE_OK(check_optional(norm_bias, x, {c1}, "norm_bias"));
  MVIT3_REQUIRE_OK(check_norm(norm));
  return check_act(act);
}

// With expand_weight, the depthwise 3x3 reads the expansion's [B, Ch, H, W] output (a workspace).
Reason dwconv_pointwise_why_not(const Tensor& x, const Tensor& dw_weight, const Tensor& dw_bias,
                                const Tensor& weight, const OptionalTensor& bias, int64_t stride,
                                const OptionalTensor& residual, int64_t dilation,
                                const OptionalTensor& expand_weight,
                                const OptionalTensor& expand_bias) {
  MVIT3_REQUIRE_OK(check_input(x, "x"));
  int64_t channels = x.size(1);  // of the depthwise 3x3's input: x, or the expansion's output
  if (present(expand_weight)) {
    MVIT3_REQUIRE(dw_weight.dim() == 4, "dw_weight must be [Ch, 1, 3, 3], got ", dw_weight.sizes());
    channels = dw_weight.size(0);
    MVIT3_REQUIRE_OK(check_channels(channels, "the hidden workspace (Ch)"));
    MVIT3_REQUIRE_OK(check_tensor(*expand_weight, x, {channels, x.size(1)}, "expand_weight"));
    MVIT3_REQUIRE_OK(check_optional(expand_bias, x, {channels}, "expand_bias"));
  } else {
    MVIT3_REQUIRE(!present(expand_bias), "expand_bias given without expand_weight");
  }
  MVIT3_REQUIRE_OK(check_stride(stride));
  MVIT3_REQUIRE_OK(check_dilation(dilation, x));
  const int64_t out_height = (x.size(2) - 1) / stride + 1, out_width = (x.size(3) - 1) / stride + 1;
  MVIT3_REQUIRE_OK(check_tensor(dw_weight, x, {channels, 1, 3, 3}, "dw_weight"));
  MVIT3_REQUIRE_OK(check_tensor(dw_bias, x, {channels}, "dw_bias"));
  MVIT3_REQUIRE(weight.dim() == 2, "weight must be [Cout, C], got ", weight.sizes());
  const int64_t cout = weight.size(0);
  MVIT3_REQUIRE_OK(check_channels(cout, "weight (Cout)"));
  MVIT3_REQUIRE_OK(check_tensor(weight, x, {cout, channels}, "weight"));
  MVIT3_REQUIRE_OK(check_optional(bias, x, {cout}, "bias"));
  if (present(residual))
    MVIT3_REQUIRE_OK(check_map(*residual, x, "residual", cout, out_height, out_width));
  return {};
}

Reason conv3x3_why_not(const Tensor& x, const Tensor& weight, const OptionalTensor& bias,
                       const OptionalTensor& x2, int64_t stride, c10::string_view act,
                       int64_t dilation) {
  MVIT3_REQUIRE_OK(check_input(x, "x"));
  int64_t c2 = 0;
  MVIT3_REQUIRE_OK(check_x2(x2, x, c2));
  MVIT3_REQUIRE_OK(check_stride(stride));
  MVIT3_REQUIRE_OK(check_dilation(dilation, x));
  MVIT3_REQUIRE(weight.dim() == 4, "weight must be [Cout, C1 + C2, 3, 3], got ", weight.sizes());
  const int64_t cout = weight.size(0);
  MVIT3_REQUIRE_OK(check_channels(cout, "weight (Cout)"));
  MVIT3_REQUIRE_OK(check_tensor(weight, x, {cout, x.size(1) + c2, 3, 3}, "weight"));
  MVIT3_REQUIRE_OK(check_optional(bias, x, {cout}, "bias"));
  return check_act(act);
}

Reason patch_attention_why_not(const Tensor& qkv, int64_t num_heads, double /*scale*/,
                               const OptionalTensor& proj_weight, const OptionalTensor& proj_bias,
                               const OptionalTensor& residual) {
  MVIT3_REQUIRE_OK(check_input(qkv, "qkv"));
  MVIT3_REQUIRE_OK(check_even(qkv, "patch_attention"));
  MVIT3_REQUIRE(qkv.size(1) % 3 == 0, "qkv must have 3d channels, got ", qkv.size(1));
  const int64_t dim = qkv.size(1) / 3;
  MVIT3_REQUIRE(num_heads > 0 && dim % num_heads == 0, "num_heads (", num_heads,
                ") must divide d (", dim, ")");
  MVIT3_REQUIRE(num_heads <= kMaxGridYZ, "num_heads ", num_heads, " is over ", kMaxGridYZ,
                " (one head per block on grid axis y)");
  const int64_t head_dim = dim / num_heads;
  MVIT3_REQUIRE(head_dim <= kMaxHeadDim, "head dim ", head_dim, " > ", kMaxHeadDim,
                " is not supported by the CUDA kernels");
  if (present(proj_weight)) {
    MVIT3_REQUIRE_OK(check_tensor(*proj_weight, qkv, {dim, dim}, "proj_weight"));
    // Like the reference, proj_bias only counts with proj_weight.
    MVIT3_REQUIRE_OK(check_optional(proj_bias, qkv, {dim}, "proj_bias"));
  }
  if (present(residual))
    MVIT3_REQUIRE_OK(check_map(*residual, qkv, "residual", dim, qkv.size(2), qkv.size(3)));
  return {};
}

Reason transformer_mlp_why_not(const Tensor& x, c10::string_view norm, const Tensor& norm_weight,
                               const Tensor& norm_bias, double /*eps*/, const Tensor& w1,
                               const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  MVIT3_REQUIRE_OK(check_input(x, "x"));
  const int64_t dim = x.size(1);
  MVIT3_REQUIRE(w1.dim() == 2, "w1 must be [F, d], got ", w1.sizes());
  const int64_t ffn_dim = w1.size(0);
  MVIT3_REQUIRE_OK(check_channels(ffn_dim, "w1 (F)"));
  MVIT3_REQUIRE_OK(check_tensor(norm_weight, x, {dim}, "norm_weight"));
  MVIT3_REQUIRE_OK(check_tensor(norm_bias, x, {dim}, "norm_bias"));
  MVIT3_REQUIRE_OK(check_tensor(w1, x, {ffn_dim, dim}, "w1"));
  MVIT3_REQUIRE_OK(check_tensor(b1, x, {ffn_dim}, "b1"));
  MVIT3_REQUIRE_OK(check_tensor(w2, x, {dim, ffn_dim}, "w2"));
  MVIT3_REQUIRE_OK(check_tensor(b2, x, {dim}, "b2"));
  return check_norm(norm);
}

// The projection reads the FFN's output t, a map of x's sizes, dtype and device: its checks
// are pointwise_conv's on x.
Reason transformer_mlp_project_why_not(
    const Tensor& x, const Tensor& norm_weight, const Tensor& norm_bias, double eps,
    const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
    const Tensor& proj_norm_weight, const Tensor& proj_norm_bias, double proj_eps,
    const Tensor& proj_weight, const OptionalTensor& proj_bias, c10::string_view act) {
  MVIT3_REQUIRE_OK(
      transformer_mlp_why_not(x, "layer", norm_weight, norm_bias, eps, w1, b1, w2, b2));
  MVIT3_REQUIRE(proj_weight.dim() == 2, "proj_weight must be [Cout, d], got ", proj_weight.sizes());
  return pointwise_conv_why_not(x, proj_weight, proj_bias, std::nullopt, std::nullopt, "layer",
                                proj_norm_weight, proj_norm_bias, proj_eps, act);
}

Reason separable_attention_why_not(const Tensor& x, const Tensor& norm_weight,
                                   const Tensor& norm_bias, double /*eps*/,
                                   const Tensor& qkv_weight, const Tensor& qkv_bias,
                                   const Tensor& out_weight, const Tensor& out_bias) {
  MVIT3_REQUIRE_OK(check_input(x, "x"));
  MVIT3_REQUIRE_OK(check_even(x, "separable_attention"));
  const int64_t dim = x.size(1);
  MVIT3_REQUIRE(dim <= kMaxSeparableDim, "separable_attention takes d <= ", kMaxSeparableDim,
                " (a lane of its context kernel holds 8 channels of a pixel), got d = ", dim);
  MVIT3_REQUIRE_OK(check_tensor(norm_weight, x, {dim}, "norm_weight"));
  MVIT3_REQUIRE_OK(check_tensor(norm_bias, x, {dim}, "norm_bias"));
  MVIT3_REQUIRE_OK(check_tensor(qkv_weight, x, {1 + 2 * dim, dim}, "qkv_weight"));
  MVIT3_REQUIRE_OK(check_tensor(qkv_bias, x, {1 + 2 * dim}, "qkv_bias"));
  MVIT3_REQUIRE_OK(check_tensor(out_weight, x, {dim, dim}, "out_weight"));
  return check_tensor(out_bias, x, {dim}, "out_bias");
}

#undef MVIT3_REQUIRE
#undef MVIT3_REQUIRE_OK

// An op refuses a call its checks refuse, in their words.
void check(const Reason& reason) { TORCH_CHECK(reason.empty(), "mvit3: ", reason); }

// ---- checked tensors -> launcher arguments ---------------------------------------------------

DType dtype_of(const Tensor& x) {
  const auto type = x.scalar_type();
  return type == at::kFloat ? DType::f32 : type == at::kHalf ? DType::f16 : DType::bf16;
}

Norm parse_norm(std::string_view norm) {
  return norm == "layer" ? Norm::layer : norm == "group" ? Norm::group : Norm::none;
}

Act parse_act(std::string_view act) { return act == "silu" ? Act::silu : Act::none; }

// A vector or a 3x3 filter: made contiguous (a no-op for the fast models' weights); the kernels
// index it densely.
Tensor dense(const Tensor& t) { return t.contiguous(); }

std::optional<Tensor> optional_dense(const OptionalTensor& t) {
  if (!present(t)) return std::nullopt;
  return dense(*t);
}

// A 2-D weight, read through its strides (the fast models pack them K-major).
Matrix matrix(const Tensor& t) { return Matrix{t.data_ptr(), t.stride(0), t.stride(1)}; }

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

// At least n int32 counters, all 0, for the kernels whose sample's last program merges the
// partial results of its other programs and resets the sample's counter to 0. Outside a CUDA
// graph capture: one buffer per device and stream (launches on two streams never share a
// counter), zeroed when made or grown; the caller holds the tensor until its launch, so a
// buffer another host thread grows meanwhile is not reused under it (and the caching allocator
// reuses a freed block on its own stream only, after the work queued there). During a capture:
// a fresh zeroed buffer from the graph's pool, so every replay zeroes its own counters (one
// fill node more in the graph) and two graphs captured on one stream share nothing.
Tensor split_counters(const Tensor& x, int64_t n) {
  const auto options = x.options().dtype(at::kInt);
  const int64_t size = std::max<int64_t>(n, 1024);
#ifdef MVIT3_EMULATE
  const std::pair<int64_t, int64_t> key{-1, 0};
#else
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(x.get_device());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t error = cudaStreamIsCapturing(stream.stream(), &capture);
  TORCH_CHECK(error == cudaSuccess, "mvit3: ", cudaGetErrorString(error));
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({n}, options);
  const std::pair<int64_t, int64_t> key{x.get_device(), int64_t(stream.id())};
#endif
  static std::mutex mutex;
  // never destroyed: CUDA tensors must not be freed after the CUDA context at exit
  static auto& buffers = *new std::map<std::pair<int64_t, int64_t>, Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& buffer = buffers[key];
  if (!buffer.defined() || buffer.numel() < n) buffer = at::zeros({size}, options);
  return buffer;
}

int as_int(int64_t v) { return int(v); }  // sizes: within int32 by check_input and check_channels

// The shared memory a block may take on x's device with the opt-in
// (cudaDevAttrMaxSharedMemoryPerBlockOptin: sm_75 64 KB, sm_80 163 KB, sm_86/89 99 KB, sm_90
// 227 KB), which decides whether an fp32 FFN is one launch (mvit3.h: transformer_mlp_fused).
// The emulator's: an sm_90's, or what the tests set (emulator.h: shared_optin).
int64_t shared_memory_optin(const Tensor& x) {
#ifdef MVIT3_EMULATE
  (void)x;
  return int64_t(emu::shared_optin);
#else
  // Read once per device: the ops ask on every call (a forward's FFNs and separable attention).
  static std::mutex mutex;
  static std::map<int, int64_t> limits;
  const int device = x.get_device();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto known = limits.find(device);
  if (known != limits.end()) return known->second;
  int bytes = 0;
  const cudaError_t error =
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  TORCH_CHECK(error == cudaSuccess, "mvit3: cannot read the shared memory limit of device ",
              device, ": ", cudaGetErrorString(error));
  return limits[device] = bytes;
#endif
}

// ---- the ops --------------------------------------------------------------------------------

// A pointwise_conv call (checked): its launcher arguments, the output and workspace they point
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
  const int64_t batch = x.size(0), c1 = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t c2 = present(x2) ? x2->size(1) : 0, cout = weight.size(0);
  PointwiseConvCall call;
  call.bias = optional_dense(bias);
  call.norm_weight = optional_dense(norm_weight);
  call.norm_bias = optional_dense(norm_bias);

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
  args.weight = matrix(weight);
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
  check(pointwise_conv_why_not(x, weight, bias, x2, residual, norm, norm_weight, norm_bias, eps,
                               act));
  PointwiseConvCall call =
      pointwise_conv_call(x, weight, bias, x2, residual, norm, norm_weight, norm_bias, eps, act);
  KernelContext context(x);
  pointwise_conv(call.args, dtype_of(x), context.stream);
  return call.out;
}

// With expand_weight [Ch, Cin] (the whole MV2 block): one kernel (expansion, depthwise, reduce,
// residual) where mv2_block_fused (mvit3.h) allows, the usual case; otherwise (dilation > 1, or
// Cin over kMv2MaxInChannels) the expansion silu(x @ expand_weight^T + expand_bias) runs first as
// its own pointwise_conv launch into a [B, Ch, H, W] workspace that the depthwise kernel reads.
Tensor dwconv_pointwise_op(const Tensor& block_input, const Tensor& dw_weight, const Tensor& dw_bias,
                           const Tensor& weight, const OptionalTensor& bias, int64_t stride,
                           const OptionalTensor& residual, int64_t dilation,
                           const OptionalTensor& expand_weight, const OptionalTensor& expand_bias) {
  check(dwconv_pointwise_why_not(block_input, dw_weight, dw_bias, weight, bias, stride, residual,
                                 dilation, expand_weight, expand_bias));
  const bool fused =
      present(expand_weight) && mv2_block_fused(block_input.size(1), stride, dilation);
  Tensor x = block_input;
  if (present(expand_weight) && !fused)
    x = pointwise_conv_op(block_input, *expand_weight, expand_bias, std::nullopt, std::nullopt,
                          "none", std::nullopt, std::nullopt, 1e-5, "silu");
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3);
  const int64_t channels = present(expand_weight) ? dw_weight.size(0) : x.size(1);
  const auto eb = fused ? optional_dense(expand_bias) : std::optional<Tensor>();
  const int64_t out_height = (height - 1) / stride + 1, out_width = (width - 1) / stride + 1;
  const Tensor dw = dense(dw_weight), db = dense(dw_bias);
  const auto b = optional_dense(bias);
  const int64_t cout = weight.size(0);

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
  args.stride = int(stride);
  args.dilation = int(dilation);
  args.out_height = as_int(out_height);
  args.out_width = as_int(out_width);
  args.dw_weight = dw.data_ptr();
  args.dw_bias = db.data_ptr();
  args.weight = matrix(weight);
  args.bias = data_of(b);
  if (fused) {
    args.in_channels = as_int(x.size(1));
    args.expand_weight = matrix(*expand_weight);
    args.expand_bias = data_of(eb);
  }
  KernelContext context(x);
  dwconv_pointwise(args, dtype_of(x), context.stream);
  return out;
}

Tensor conv3x3_op(const Tensor& x, const Tensor& weight, const OptionalTensor& bias,
                  const OptionalTensor& x2, int64_t stride, c10::string_view act, int64_t dilation) {
  check(conv3x3_why_not(x, weight, bias, x2, stride, act, dilation));
  const int64_t batch = x.size(0), c1 = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t c2 = present(x2) ? x2->size(1) : 0, cout = weight.size(0);
  const int64_t out_height = (height - 1) / stride + 1, out_width = (width - 1) / stride + 1;
  const Tensor w = dense(weight);
  const auto b = optional_dense(bias);

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
  args.stride = int(stride);
  args.dilation = int(dilation);
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
  check(patch_attention_why_not(qkv, num_heads, scale, proj_weight, proj_bias, residual));
  const int64_t batch = qkv.size(0), height = qkv.size(2), width = qkv.size(3);
  const int64_t dim = qkv.size(1) / 3;
  const bool project = present(proj_weight);
  // Like the reference, proj_bias only counts with proj_weight.
  const auto pb = project ? optional_dense(proj_bias) : std::nullopt;

  Tensor out = empty_map(qkv, dim, height, width);
  Tensor heads_out;
  // The heads go to a workspace only where the out_proj is not fused (csrc/mvit3.h).
  if (project && dim > kMaxFusedProjectionDim) heads_out = empty_map(qkv, dim, height, width);
  PatchAttentionArgs args;
  args.qkv = map_of(qkv);
  args.residual = map_of(residual);
  args.out = map_of(out);
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.heads = as_int(num_heads);
  args.head_dim = as_int(dim / num_heads);
  args.scale = float(scale);
  args.proj_weight = project ? matrix(*proj_weight) : Matrix{};
  args.proj_bias = data_of(pb);
  if (heads_out.defined()) args.heads_out = map_of(heads_out);
  KernelContext context(qkv);
  patch_attention(args, dtype_of(qkv), context.stream);
  return out;
}

// A transformer_mlp call (checked): its launcher arguments, the output and workspaces they
// point to, and the contiguous vectors (kept alive here until the launch).
struct TransformerMlpCall {
  TransformerMlpArgs args;
  Tensor out, hidden, stats, norm_weight, norm_bias, b1, b2;
};

TransformerMlpCall transformer_mlp_call(const Tensor& x, c10::string_view norm,
                                        const Tensor& norm_weight, const Tensor& norm_bias,
                                        double eps, const Tensor& w1, const Tensor& b1,
                                        const Tensor& w2, const Tensor& b2) {
  const int64_t batch = x.size(0), dim = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t ffn_dim = w1.size(0);
  TransformerMlpCall call;
  call.norm_weight = dense(norm_weight);
  call.norm_bias = dense(norm_bias);
  call.b1 = dense(b1);
  call.b2 = dense(b2);

  call.out = empty_map(x, dim, height, width);
  TransformerMlpArgs& args = call.args;
  args.shared_limit = shared_memory_optin(x);
  // The hidden map goes through memory only where the FFN is not one launch (csrc/mvit3.h).
  if (!transformer_mlp_fused(dtype_of(x), dim, ffn_dim, args.shared_limit))
    call.hidden = empty_map(x, ffn_dim, height, width);
  args.norm = parse_norm(norm);
  if (args.norm == Norm::group) call.stats = empty_fp32(x, {batch, 2});
  args.x = map_of(x);
  args.out = map_of(call.out);
  if (call.hidden.defined()) args.hidden = map_of(call.hidden);
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.dim = as_int(dim);
  args.ffn_dim = as_int(ffn_dim);
  args.norm_weight = call.norm_weight.data_ptr();
  args.norm_bias = call.norm_bias.data_ptr();
  args.eps = float(eps);
  args.group_stats = call.stats.defined() ? call.stats.data_ptr<float>() : nullptr;
  args.w1 = matrix(w1);
  args.b1 = call.b1.data_ptr();
  args.w2 = matrix(w2);
  args.b2 = call.b2.data_ptr();
  return call;
}

Tensor transformer_mlp_op(const Tensor& x, c10::string_view norm, const Tensor& norm_weight,
                          const Tensor& norm_bias, double eps, const Tensor& w1, const Tensor& b1,
                          const Tensor& w2, const Tensor& b2) {
  check(transformer_mlp_why_not(x, norm, norm_weight, norm_bias, eps, w1, b1, w2, b2));
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
  check(transformer_mlp_project_why_not(x, norm_weight, norm_bias, eps, w1, b1, w2, b2,
                                        proj_norm_weight, proj_norm_bias, proj_eps, proj_weight,
                                        proj_bias, act));
  TransformerMlpCall mlp = transformer_mlp_call(x, "layer", norm_weight, norm_bias, eps, w1, b1, w2, b2);
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
  check(separable_attention_why_not(x, norm_weight, norm_bias, eps, qkv_weight, qkv_bias,
                                    out_weight, out_bias));
  const int64_t batch = x.size(0), dim = x.size(1), height = x.size(2), width = x.size(3);
  const Tensor nw = dense(norm_weight), nb = dense(norm_bias);
  const Tensor qb = dense(qkv_bias), ob = dense(out_bias);

  Tensor out = empty_map(x, dim, height, width);
  const int splits = separable_attention_splits(batch, height);
  Tensor partials = empty_fp32(x, {batch, splits, 4, 2 + dim});
  Tensor context_vectors = empty_fp32(x, {batch, 4, dim});
  Tensor stats = empty_fp32(x, {batch, 2});
  SeparableAttentionArgs args;
  args.shared_limit = shared_memory_optin(x);
  Tensor v;  // only where the out GEMM is not fused
  if (!separable_attention_fused(dtype_of(x), dim, args.shared_limit))
    v = empty_map(x, dim, height, width);
  args.x = map_of(x);
  args.out = map_of(out);
  if (v.defined()) args.v = map_of(v);
  args.splits = splits;
  args.partials = partials.data_ptr<float>();
  const Tensor counters = split_counters(x, batch);
  args.counters = counters.data_ptr<int>();
  args.context = context_vectors.data_ptr<float>();
  args.group_stats = stats.data_ptr<float>();
  args.batch = as_int(batch);
  args.height = as_int(height);
  args.width = as_int(width);
  args.dim = as_int(dim);
  args.norm_weight = nw.data_ptr();
  args.norm_bias = nb.data_ptr();
  args.eps = float(eps);
  args.qkv_weight = matrix(qkv_weight);
  args.qkv_bias = qb.data_ptr();
  args.out_weight = matrix(out_weight);
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

// The table comes from mvit3/ops/schemas.def, one MVIT3_OP(name, arguments, returns) per op:
// the op <name>, and <name>_why_not (the same arguments -> str: the reason its checks give, ""
// when the kernels take the call). The checks are a catch-all kernel, so they take tensors of
// any device, meta tensors included.
MVIT3_LIBRARY(MVIT3_NAMESPACE, m) {
#define MVIT3_OP(name, arguments, returns)    \
  m.def(#name arguments " -> " returns);      \
  m.def(#name "_why_not" arguments " -> str", &mvit3::name##_why_not);
#include "../mvit3/ops/schemas.def"
#undef MVIT3_OP
}

MVIT3_LIBRARY_IMPL(MVIT3_NAMESPACE, MVIT3_DISPATCH_KEY, m) {
#define MVIT3_OP(name, arguments, returns) m.impl(#name, &mvit3::name##_op);
#include "../mvit3/ops/schemas.def"
#undef MVIT3_OP
}
