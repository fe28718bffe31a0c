// fastopt::mirror_upper_(x): x[j][i] = x[i][j] for every i < j of a square CPU matrix (rows may be strided,
// columns contiguous) — the lower triangle of a symmetric product whose upper block triangle was computed
// (fastopt/ops/symmetric.py). A transposed copy: it walks 32×32 tiles, so that the rows it reads and the
// columns it writes stay in L1; torch's strided copy of the same transpose took ~3.6 ms for a 1024×1024 bf16
// block (a 2-core Intel Xeon), longer than the products the symmetric blocking saved.
// The copy moves bytes: one kernel per element size serves every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace fastopt {
namespace {

constexpr int64_t kTile = 32;

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
      const int64_t r1 = std::min(r0 + kTile, m), c1 = std::min(c0 + kTile, m);
      for (int64_t c = c0; c < c1; ++c) {  // write lower row c, contiguous, from upper column c
        Word* dst = x + c * row_stride;
        const int64_t stop = std::min(r1, c);  // strictly above the diagonal: r < c
        for (int64_t r = r0; r < stop; ++r) dst[r] = x[r * row_stride + c];
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
    case 2: mirror_tiles(static_cast<uint16_t*>(x.data_ptr()), m, row_stride); break;
    case 4: mirror_tiles(static_cast<uint32_t*>(x.data_ptr()), m, row_stride); break;
    case 8: mirror_tiles(static_cast<uint64_t*>(x.data_ptr()), m, row_stride); break;
    default: TORCH_CHECK(false, "fastopt::mirror_upper_: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CPU, m) { m.impl("mirror_upper_", &fastopt::mirror_upper_cpu); }
