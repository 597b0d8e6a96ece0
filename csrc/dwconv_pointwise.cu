// dwconv_pointwise: out = silu(depthwise3x3(x, stride, dilation, padding = dilation) + dw_bias)
// @ weight^T + bias + residual. Semantics: mvit3.ops.reference.dwconv_pointwise. The second half
// of an MV2 block and the local representation of a MobileViT block (dilated in the v2-style
// dense backbones).
//
// One tile GEMM whose producer computes the depthwise conv while staging the A tile, so the
// [B, C, Ho, Wo] intermediate never reaches memory. Each block recomputes the depthwise values
// of its pixels for its kBlockN output channels: 9 FMAs per staged element, cheap next to the
// kBlockN FMAs the element then feeds.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

template <class T>
struct DwconvProducer {
  Map x;
  int height = 0, width = 0, stride = 1, dilation = 1;
  const T* dw_weight = nullptr;  // [C, 1, 3, 3] contiguous
  const T* dw_bias = nullptr;    // [C]
  bool channels_contiguous = false;
  bool chunked = false;  // x channels_last with 16-byte aligned pixels

  MVIT3_DEVICE void init_row(gemm::Row& row) const { row.offset = int64_t(row.b) * x.stride_b; }

  MVIT3_DEVICE void prepare(gemm::Row*) const {}

  // visit(offset of the tap's pixel in x, tap index 3 * ky + kx) for each tap of row's 3x3
  // window that lies inside the map (the zero padding adds nothing).
  template <class Visit>
  MVIT3_DEVICE void for_each_tap(const gemm::Row& row, Visit&& visit) const {
    MVIT3_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      const int iy = row.y * stride + (ky - 1) * dilation;
      if (iy < 0 || iy >= height) continue;
      MVIT3_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        const int ix = row.x * stride + (kx - 1) * dilation;
        if (ix < 0 || ix >= width) continue;
        visit(iy * x.stride_h + ix * x.stride_w, 3 * ky + kx);
      }
    }
  }

  MVIT3_DEVICE float a(const gemm::Row& row, int c) const {
    const T* src = static_cast<const T*>(x.data) + row.offset + int64_t(c) * x.stride_c;
    const T* w = dw_weight + 9 * c;
    float acc = to_float(dw_bias[c]);
    for_each_tap(row, [&](int64_t offset, int tap) {
      acc = fmaf(to_float(src[offset]), to_float(w[tap]), acc);
    });
    return silu(acc);
  }

  // Channels c .. c + 16 / sizeof(T) - 1 (a(row, c + i) for each, the same FMAs): one 16-byte
  // load a tap.
  MVIT3_DEVICE void a_chunk(const gemm::Row& row, int c, float (&v)[16 / sizeof(T)]) const {
    constexpr int kChunk = 16 / sizeof(T);
    const T* src = static_cast<const T*>(x.data) + row.offset + c;
    MVIT3_UNROLL
    for (int i = 0; i < kChunk; ++i) v[i] = to_float(dw_bias[c + i]);
    for_each_tap(row, [&](int64_t offset, int tap) {
      T values[kChunk];
      gemm::load_chunk(values, src + offset);
      MVIT3_UNROLL
      for (int i = 0; i < kChunk; ++i)
        v[i] = fmaf(to_float(values[i]), to_float(dw_weight[9 * (c + i) + tap]), v[i]);
    });
    MVIT3_UNROLL
    for (int i = 0; i < kChunk; ++i) v[i] = silu(v[i]);
  }
};

}  // namespace

void dwconv_pointwise(const DwconvPointwiseArgs& args, DType dtype, Stream stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    DwconvProducer<T> producer;
    producer.x = args.x;
    producer.height = args.height;
    producer.width = args.width;
    producer.stride = args.stride;
    producer.dilation = args.dilation;
    producer.dw_weight = static_cast<const T*>(args.dw_weight);
    producer.dw_bias = static_cast<const T*>(args.dw_bias);
    producer.channels_contiguous = args.x.stride_c == 1;
    producer.chunked = gemm::chunked_rows<T>(args.x);
    gemm::Epilogue ep;
    ep.bias = args.bias;
    ep.residual = args.residual;
    ep.out = args.out;
    const gemm::Shape shape{args.batch, args.out_height, args.out_width, args.cout, args.channels};
    gemm::run<T>(producer, args.weight, ep, shape, stream);
  });
}

}  // namespace mvit3
