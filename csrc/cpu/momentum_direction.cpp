// fastopt::momentum_direction_: the momentum pass of the orthogonalized optimizers (Muon, ROOT) on CPU, in one
// pass over the gradient and the buffer:
//
//   B ← β·B + γ·g;   M = δ·g + ε·B (the new B);   sumsq = Σ M²
//
// Muon: β = μ, γ = 1 − μ, M = (1 − μ)·g + μ·B with Nesterov (δ = 0, ε = 1 without); ROOT: β = μ, γ = 1, δ = 1,
// ε = μ. B is float32 or bfloat16 (rounded to nearest), g float32, bfloat16 or float16, M float32 or bfloat16 (the
// Newton-Schulz operand: M in bf16 and ‖M‖ = √sumsq are what the engine takes, so the matrix is not read again
// to be normalised and cast). sumsq (a float64 scalar) sums M in float32 per block of kBlock elements and the
// blocks in float64 in block order: the same bits for any thread count. The torch reference: fastopt/optim/muon.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/vector_group.h"

namespace fastopt {
namespace {

constexpr int64_t kBlock = 4096;

template <typename B, typename G, typename D>
void momentum_direction(B* buf, const G* grad, D* direction, int64_t n, float beta, float gamma, float delta,
                        float epsilon, double* sumsq) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks);
  const Vec vbeta(beta), vgamma(gamma), vdelta(delta), vepsilon(epsilon);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t end = std::min(n, (b + 1) * kBlock);
      Vec acc_lo(0.f), acc_hi(0.f);
      for (int64_t i = b * kBlock; i < end; i += kGroup) {
        const int64_t k = std::min(kGroup, end - i);  // a partial group loads zeros past the end
        const Group g = load_group(grad + i, k);
        Group m = load_group(buf + i, k);
        m.lo = at::vec::fmadd(vbeta, m.lo, vgamma * g.lo);
        m.hi = at::vec::fmadd(vbeta, m.hi, vgamma * g.hi);
        store_group(buf + i, m, k);
        const Group d{at::vec::fmadd(vdelta, g.lo, vepsilon * m.lo), at::vec::fmadd(vdelta, g.hi, vepsilon * m.hi)};
        store_group(direction + i, d, k);
        acc_lo = at::vec::fmadd(d.lo, d.lo, acc_lo);
        acc_hi = at::vec::fmadd(d.hi, d.hi, acc_hi);
      }
      partial[b] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc_lo + acc_hi);
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  *sumsq = total;
}

template <typename B, typename G>
void with_direction(const at::Tensor& buf, const at::Tensor& grad, const at::Tensor& direction, double* sumsq,
                    float beta, float gamma, float delta, float epsilon) {
  const int64_t n = grad.numel();
  if (direction.scalar_type() == at::kFloat) {
    momentum_direction(buf.data_ptr<B>(), grad.data_ptr<G>(), direction.data_ptr<float>(), n, beta, gamma, delta,
                       epsilon, sumsq);
  } else {
    momentum_direction(buf.data_ptr<B>(), grad.data_ptr<G>(), direction.data_ptr<BFloat16>(), n, beta, gamma,
                       delta, epsilon, sumsq);
  }
}

template <typename B>
void with_grad(const at::Tensor& buf, const at::Tensor& grad, const at::Tensor& direction, double* sumsq, float beta,
               float gamma, float delta, float epsilon) {
  switch (grad.scalar_type()) {
    case at::kFloat: with_direction<B, float>(buf, grad, direction, sumsq, beta, gamma, delta, epsilon); break;
    case at::kBFloat16: with_direction<B, BFloat16>(buf, grad, direction, sumsq, beta, gamma, delta, epsilon); break;
    default: with_direction<B, Half>(buf, grad, direction, sumsq, beta, gamma, delta, epsilon);
  }
}

void momentum_direction_cpu(const at::Tensor& buf, const at::Tensor& grad, const at::Tensor& direction,
                            const at::Tensor& sumsq, double beta, double gamma, double delta, double epsilon) {
  for (const at::Tensor* t : {&buf, &grad, &direction, &sumsq}) {
    TORCH_CHECK(t->device().is_cpu(), "fastopt::momentum_direction_ (CPU kernel): a tensor is on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "fastopt::momentum_direction_: tensors must be contiguous");
  }
  TORCH_CHECK(buf.numel() == grad.numel() && direction.numel() == grad.numel(),
              "fastopt::momentum_direction_: buf, grad and direction must have the same number of elements, got ",
              buf.numel(), ", ", grad.numel(), " and ", direction.numel());
  TORCH_CHECK(buf.scalar_type() == at::kFloat || buf.scalar_type() == at::kBFloat16,
              "fastopt::momentum_direction_: buf must be float32 or bfloat16, got ", buf.scalar_type());
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16 ||
                  grad.scalar_type() == at::kHalf,
              "fastopt::momentum_direction_: grad must be float32, bfloat16 or float16, got ", grad.scalar_type());
  TORCH_CHECK(direction.scalar_type() == at::kFloat || direction.scalar_type() == at::kBFloat16,
              "fastopt::momentum_direction_: direction must be float32 or bfloat16, got ", direction.scalar_type());
  TORCH_CHECK(sumsq.scalar_type() == at::kDouble && sumsq.numel() == 1,
              "fastopt::momentum_direction_: sumsq must be one float64 element");
  double* out = sumsq.data_ptr<double>();
  if (buf.scalar_type() == at::kFloat) {
    with_grad<float>(buf, grad, direction, out, beta, gamma, delta, epsilon);
  } else {
    with_grad<BFloat16>(buf, grad, direction, out, beta, gamma, delta, epsilon);
  }
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CPU, m) { m.impl("momentum_direction_", &fastopt::momentum_direction_cpu); }
