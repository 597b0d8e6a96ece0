// conv3x3: out = act(conv3x3(cat(x, x2), weight, stride, dilation, padding = dilation) + bias).
// Semantics: mvit3.ops.reference.conv3x3. The dense 3x3 convs: the stem, MobileViTv1's local
// conv and fusion (whose concat of two maps is read through two pointers, never materialised)
// and the dilated branches of DeepLabv3's ASPP.
//
// An implicit GEMM (tile_gemm.cuh) with K = 9 * C, C = C1 + C2, in one of two orders:
// - tap-major, k = (3 * ky + kx) * C + c, where x (and x2) are channels_last with 16-byte
//   aligned pixels and C1 and C whole 16-byte chunks (`chunked`): a chunk of k is 16 bytes of
//   one pixel's channels, staged by one load (or zeros where the tap falls in the padding), and
//   the contiguous [Cout, C, 3, 3] weight is read as segments of C columns (Matrix::col_segment:
//   element (o, k) at o * 9C + c * 9 + tap), element by element;
// - channel-major, k = c * 9 + 3 * ky + kx, elsewhere: the flattening of the weight, a row-major
//   [Cout, K] matrix as it is (16-byte weight chunks); the A tile is staged pixel-fastest, which
//   is unit-stride for NCHW maps.
#include "tile_gemm.cuh"

namespace mvit3 {
namespace {

template <class T>
struct Conv3x3Producer {
  static constexpr int kChunk = 16 / int(sizeof(T));
  using SegmentedWeightTag = void;  // tap-major K reads the weight in segments
  Map x, x2;
  int c1 = 0, channels = 0, height = 0, width = 0, stride = 1, dilation = 1;
  bool chunked = false;  // tap-major K (see the top of the file)
  bool channels_contiguous = false;  // the element path stages pixel-fastest

  MVIT3_DEVICE void init_row(gemm::Row& row) const {
    row.offset = int64_t(row.b) * x.stride_b;
    row.offset2 = int64_t(row.b) * x2.stride_b;
  }

  MVIT3_DEVICE void prepare(gemm::Row*) const {}

  // The input pixel of a tap for an output row, or false in the zero padding.
  MVIT3_DEVICE bool tap_pixel(const gemm::Row& row, int tap, int& iy, int& ix) const {
    iy = row.y * stride + (tap / 3 - 1) * dilation;
    ix = row.x * stride + (tap % 3 - 1) * dilation;
    return iy >= 0 && iy < height && ix >= 0 && ix < width;
  }

  MVIT3_DEVICE float a(const gemm::Row& row, int k) const {
    const int c = chunked ? k % channels : k / 9, tap = chunked ? k / channels : k % 9;
    int iy, ix;
    if (!tap_pixel(row, tap, iy, ix)) return 0.0f;
    if (c < c1) {
      const T* src = static_cast<const T*>(x.data) + row.offset;
      return to_float(src[c * x.stride_c + iy * x.stride_h + ix * x.stride_w]);
    }
    const T* src = static_cast<const T*>(x2.data) + row.offset2;
    return to_float(src[(c - c1) * x2.stride_c + iy * x2.stride_h + ix * x2.stride_w]);
  }

  // Tap-major channels k .. k + kChunk - 1: one tap, all of x or all of x2 (C1 whole chunks).
  MVIT3_DEVICE void a_chunk(const gemm::Row& row, int k, float (&v)[kChunk]) const {
    const int c = k % channels;
    int iy, ix;
    T raw[kChunk];
    if (!tap_pixel(row, k / channels, iy, ix)) {
      MVIT3_UNROLL
      for (int i = 0; i < kChunk; ++i) v[i] = 0.0f;
      return;
    }
    if (c < c1)
      load_chunk(raw, static_cast<const T*>(x.data) + row.offset + iy * x.stride_h +
                          ix * x.stride_w + c);
    else
      load_chunk(raw, static_cast<const T*>(x2.data) + row.offset2 + iy * x2.stride_h +
                          ix * x2.stride_w + (c - c1));
    MVIT3_UNROLL
    for (int i = 0; i < kChunk; ++i) v[i] = to_float(raw[i]);
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
    producer.channels = args.c1 + args.c2;
    producer.height = args.height;
    producer.width = args.width;
    producer.stride = args.stride;
    producer.dilation = args.dilation;
    producer.chunked = gemm::chunked_rows<T>(args.x) && args.c1 % producer.kChunk == 0 &&
                       producer.channels % producer.kChunk == 0 &&
                       (!args.x2.data || gemm::chunked_rows<T>(args.x2));
    producer.channels_contiguous = producer.chunked;
    gemm::Epilogue ep;
    ep.bias = args.bias;
    ep.out = args.out;
    ep.act = args.act;
    const int k = 9 * producer.channels;
    const gemm::Shape shape{args.batch, args.out_height, args.out_width, args.cout, k};
    const Matrix weight = producer.chunked ? Matrix{args.weight, k, 9, producer.channels, 1}
                                           : Matrix{args.weight, k, 1};
    gemm::run<T>(producer, weight, ep, shape, stream);
  });
}

}  // namespace mvit3
