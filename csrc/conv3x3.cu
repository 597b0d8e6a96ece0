// conv3x3: out = act(conv3x3(cat(x, x2), weight, stride, dilation, padding = dilation) + bias).
// Semantics: mvit3.ops.reference.conv3x3. The dense 3x3 convs: the stem, MobileViTv1's local
// conv and fusion (whose concat of two maps is read through two pointers, never materialised)
// and the dilated branches of DeepLabv3's ASPP.
//
// An implicit GEMM (tile_gemm.cuh) with K = 9 * (C1 + C2). k = c * 9 + 3 * ky + kx is the
// flattening of a contiguous [Cout, Cin, 3, 3] weight: a row-major [Cout, K] matrix as it is.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

template <class T>
struct Conv3x3Producer {
  Map x, x2;
  int c1 = 0, height = 0, width = 0, stride = 1, dilation = 1;
  // Consecutive k are taps of one channel, so stage pixel-fastest: unit-stride for NCHW maps.
  bool channels_contiguous = false;

  MVIT3_DEVICE void init_row(gemm::Row& row) const {
    row.offset = int64_t(row.b) * x.stride_b;
    row.offset2 = int64_t(row.b) * x2.stride_b;
  }

  MVIT3_DEVICE void prepare(gemm::Row*) const {}

  MVIT3_DEVICE float a(const gemm::Row& row, int k) const {
    const int c = k / 9, tap = k % 9;
    const int iy = row.y * stride + (tap / 3 - 1) * dilation;
    const int ix = row.x * stride + (tap % 3 - 1) * dilation;
    if (iy < 0 || iy >= height || ix < 0 || ix >= width) return 0.0f;  // zero padding
    if (c < c1) {
      const T* src = static_cast<const T*>(x.data) + row.offset;
      return to_float(src[c * x.stride_c + iy * x.stride_h + ix * x.stride_w]);
    }
    const T* src = static_cast<const T*>(x2.data) + row.offset2;
    return to_float(src[(c - c1) * x2.stride_c + iy * x2.stride_h + ix * x2.stride_w]);
  }
};

}  // namespace

void conv3x3(const Conv3x3Args& args, DType dtype, Stream stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    Conv3x3Producer<T> producer;
    producer.x = args.x;
    producer.x2 = args.x2;
    producer.c1 = args.c1;
    producer.height = args.height;
    producer.width = args.width;
    producer.stride = args.stride;
    producer.dilation = args.dilation;
    gemm::Epilogue ep;
    ep.bias = args.bias;
    ep.out = args.out;
    ep.act = args.act;
    const int k = 9 * (args.c1 + args.c2);
    const gemm::Shape shape{args.batch, args.out_height, args.out_width, args.cout, k};
    gemm::run<T>(producer, Matrix{args.weight, k, 1}, ep, shape, stream);
  });
}

}  // namespace mvit3
