// fastopt::symmetric_product_ on CUDA (schema: csrc/fastopt.cpp): for each matrix b of a batch,
//
//   out[b] <- beta * out[b] + alpha * a[b] * a[b]^T        (transpose = false; a: (B, r, c), out: (B, r, r))
//   out[b] <- beta * out[b] + alpha * a[b]^T * a[b]        (transpose = true;  out: (B, c, c))
//
// the symmetric products of the Newton-Schulz engine (X X^T, and A^2 = A A^T for a symmetric A) and
// of the Kronecker factor update (L <- beta L + (1 - beta) G G^T, R <- beta R + (1 - beta) G^T G).
// float32: cublasSsyrk computes one triangle, half the FLOPs of a GEMM, with the old value as its
// beta term (the EMA fused); mirror_upper_to_lower then copies that triangle onto the other one.
// cuBLAS has no bf16 SYRK: bf16 products are plain batched GEMMs, in Python (fastopt/ops).
// SYRK follows the handle's math mode, i.e. torch.backends.cuda.matmul.allow_tf32.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

namespace fastopt {
namespace {

constexpr int kTile = 32;     // a thread block copies one kTile x kTile tile
constexpr int kTileRows = 8;  // ... with kTile x kTileRows threads, kTile / kTileRows rows each

// m[i][j] = m[j][i] for i > j, in each n x n row-major matrix of the batch (blockIdx.z): the lower
// triangle from the upper one. Block (x, y) writes the lower tile at tile row y, tile column x
// (blocks above the diagonal exit), reading its mirror tile through shared memory so that both
// the read and the write are coalesced. Blocks read only upper-triangle elements that no block
// writes, and a diagonal block reads all of its tile before it writes: no races.
__global__ void mirror_upper_to_lower(float* __restrict__ matrices, int64_t n) {
  const int64_t tile_row = blockIdx.y, tile_col = blockIdx.x;
  if (tile_col > tile_row) return;
  float* m = matrices + static_cast<int64_t>(blockIdx.z) * n * n;
  __shared__ float tile[kTile][kTile + 1];  // +1: no shared-memory bank conflicts on the transposed read
  // tile[r][x] = m[tile_col * kTile + r][tile_row * kTile + x]: the mirror tile, above the diagonal
  const int64_t source_col = tile_row * kTile + threadIdx.x;
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t source_row = tile_col * kTile + r;
    if (source_row < n && source_col < n) tile[r][threadIdx.x] = m[source_row * n + source_col];
  }
  __syncthreads();
  // m[row][col] = m[col][row] = tile[col - tile_col * kTile][row - tile_row * kTile]
  const int64_t col = tile_col * kTile + threadIdx.x;
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t row = tile_row * kTile + r;
    if (row < n && row > col) m[row * n + col] = tile[threadIdx.x][r];
  }
}

void symmetric_product_cuda(at::Tensor out, const at::Tensor& a, double alpha, double beta, bool transpose) {
  TORCH_CHECK(a.is_cuda() && out.is_cuda() && a.device() == out.device(),
              "symmetric_product_: a and out must be CUDA tensors on one device, got ", a.device(), " and ",
              out.device());
  TORCH_CHECK(a.dim() == 3 && out.dim() == 3, "symmetric_product_: a must be (B, r, c) and out (B, n, n), got ",
              a.sizes(), " and ", out.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "symmetric_product_: the cuda kernel takes float32 a and out (cuBLAS has no bf16 SYRK), got ",
              a.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(a.is_contiguous() && out.is_contiguous(), "symmetric_product_: a and out must be contiguous");
  const int64_t batch = a.size(0), rows = a.size(1), cols = a.size(2);
  const int64_t n = transpose ? cols : rows, k = transpose ? rows : cols;
  TORCH_CHECK(out.size(0) == batch && out.size(1) == n && out.size(2) == n, "symmetric_product_: out has shape ",
              out.sizes(), ", expected (", batch, ", ", n, ", ", n, ") for a of shape ", a.sizes(),
              transpose ? " (transposed)" : "");
  TORCH_CHECK(n <= INT_MAX && k <= INT_MAX && cols <= INT_MAX, "symmetric_product_: a dimension over 2^31 - 1");
  TORCH_CHECK(batch <= 65535, "symmetric_product_: at most 65535 matrices per call, got ", batch);
  if (batch == 0 || n == 0) return;

  const c10::cuda::CUDAGuard guard(a.device());
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  // A row-major r x c matrix is the column-major c x r matrix a^T, leading dimension c. Hence
  // a a^T = (a^T)^T (a^T): SYRK with op T on a^T; a^T a = (a^T)(a^T)^T: SYRK with op N. The
  // column-major lower triangle cuBLAS writes is the row-major upper one.
  const cublasOperation_t op = transpose ? CUBLAS_OP_N : CUBLAS_OP_T;
  const int lda = static_cast<int>(cols > 0 ? cols : 1);
  const float* a_data = a.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CUDABLAS_CHECK(cublasSsyrk(handle, CUBLAS_FILL_MODE_LOWER, op, static_cast<int>(n), static_cast<int>(k),
                                     &alpha_f, a_data + b * rows * cols, lda, &beta_f, out_data + b * n * n,
                                     static_cast<int>(n)));
  }
  const int64_t tiles = (n + kTile - 1) / kTile;
  TORCH_CHECK(tiles <= 65535, "symmetric_product_: matrices of at most ", 65535 * kTile, " rows");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles), static_cast<unsigned>(batch));
  mirror_upper_to_lower<<<grid, dim3(kTile, kTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(out_data, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) { m.impl("symmetric_product_", &fastopt::symmetric_product_cuda); }
