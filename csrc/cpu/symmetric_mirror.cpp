// fastopt::mirror_upper_(x): x[j][i] = x[i][j] for every i < j of a square CPU matrix (rows may be strided,
// columns contiguous) — the lower triangle of a symmetric product whose upper block triangle was computed
// (fastopt/ops/symmetric.py). A transposed copy by 32×32 tiles, each held in registers (at::vec::transpose_mxn);
// torch's strided copy of the same transpose took ~3.6 ms for a 1024×1024 bf16 block (a 2-core Intel Xeon),
// longer than the products the symmetric blocking saved.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace fastopt {
namespace {

constexpr int64_t kTile = 32;  // at::vec::transpose_mxn takes bf16 tiles of up to 32×32

// Word: the element's bits (BFloat16 for every 2-byte dtype, float for 4 bytes: at::vec's transposes only move
// them), so one kernel per element size serves every dtype.
template <typename Word>
void mirror_tiles(Word* x, int64_t m, int64_t row_stride) {
  const int64_t tiles = (m + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (tile row I, tile column J ≥ I) of the upper triangle
  pairs.reserve(tiles * (tiles + 1) / 2);
  for (int64_t i = 0; i < tiles; ++i)
    for (int64_t j = i; j < tiles; ++j) pairs.emplace_back(i, j);
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = pairs[p].first * kTile, c0 = pairs[p].second * kTile;
      const int64_t rows = std::min(kTile, m - r0), cols = std::min(kTile, m - c0);
      if (r0 != c0) {  // a whole tile above the diagonal: its transpose is the tile below (AVX-512 where built)
        at::vec::transpose_mxn<Word>(x + r0 * row_stride + c0, row_stride, x + c0 * row_stride + r0, row_stride,
                                     static_cast<int>(rows), static_cast<int>(cols));
        continue;
      }
      for (int64_t c = c0; c < c0 + cols; ++c) {  // a diagonal tile: lower row c from upper column c, r < c
        Word* dst = x + c * row_stride;
        for (int64_t r = r0; r < c; ++r) dst[r] = x[r * row_stride + c];
      }
    }
  });
}

void mirror_upper_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fastopt::mirror_upper_ (CPU kernel): x is on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == x.size(1), "fastopt::mirror_upper_: x must be a square matrix, got ",
              x.sizes());
  TORCH_CHECK(x.size(0) <= 1 || (x.stride(1) == 1 && x.stride(0) >= x.size(1)),
              "fastopt::mirror_upper_: x's rows must be contiguous and not overlap, got strides ", x.strides());
  TORCH_CHECK(x.is_floating_point(), "fastopt::mirror_upper_: x must be real floating point, got ", x.scalar_type());
  const int64_t m = x.size(0), row_stride = x.stride(0);
  switch (x.element_size()) {
    case 2: mirror_tiles(static_cast<at::BFloat16*>(x.data_ptr()), m, row_stride); break;
    case 4: mirror_tiles(static_cast<float*>(x.data_ptr()), m, row_stride); break;
    case 8: mirror_tiles(static_cast<uint64_t*>(x.data_ptr()), m, row_stride); break;
    default: TORCH_CHECK(false, "fastopt::mirror_upper_: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CPU, m) { m.impl("mirror_upper_", &fastopt::mirror_upper_cpu); }
