// The element-wise passes of the orthogonalized optimizers (Muon, Scion, ROOT) on CPU, around Newton-Schulz.
//
// fastopt::momentum_direction_, one pass over the gradient and the buffer:
//
//   B ← β·B + γ·g;   M = δ·g + ε·B (the new B);   sumsq = Σ M²
//
// Muon: β = μ, γ = 1 − μ, M = (1 − μ)·g + μ·B with Nesterov (δ = 0, ε = 1 without); ROOT: β = μ, γ = 1, δ = 1,
// ε = μ; Scion: β = 1 − α, γ = α, δ = 0, ε = 1. B is float32, bfloat16 (rounded to nearest) or fp8 e4m3 with one
// float32 scale per block of block_size elements (decoded, updated and re-encoded one block at a time, as
// fastopt/state.py quantises); g float32, bfloat16 or float16; M float32 or bfloat16 (the Newton-Schulz operand:
// M in bf16 and ‖M‖ = √sumsq are what the engine takes, so the matrix is not read again to be normalised and
// cast). sumsq sums M² in float32 per block and the blocks in float64 in block order: the same bits for any
// thread count.
//
// fastopt::decayed_update_, the parameter update from the orthogonalised direction:
//
//   p ← (1 − decay)·p − step·u
//
// p float32, bfloat16 or float16 (rounded to nearest), u float32 or bfloat16: one pass, where torch's
// p.mul_().add_(u) takes two and converts a bf16 u element by element. The torch reference: fastopt/optim/muon.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/fp8_block.h"
#include "cpu/vector_group.h"

namespace fastopt {
namespace {

constexpr int64_t kBlock = 4096;

// B ← β·B + γ·g and M = δ·g + ε·B (the new B) on one group, with Σ M² accumulated in acc.
struct MomentumMath {
  Vec beta, gamma, delta, epsilon;

  FASTOPT_INLINE Group buffer(const Group& b, const Group& g) const {
    return {at::vec::fmadd(beta, b.lo, gamma * g.lo), at::vec::fmadd(beta, b.hi, gamma * g.hi)};
  }
  FASTOPT_INLINE Group direction(const Group& b, const Group& g, Group& acc) const {
    const Group d{at::vec::fmadd(delta, g.lo, epsilon * b.lo), at::vec::fmadd(delta, g.hi, epsilon * b.hi)};
    acc = {at::vec::fmadd(d.lo, d.lo, acc.lo), at::vec::fmadd(d.hi, d.hi, acc.hi)};
    return d;
  }
};

FASTOPT_INLINE double total(const Group& acc) {
  return at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc.lo + acc.hi);
}

// Σ of the per-block partial sums in block order: the same bits for any thread count.
double sum_in_block_order(const std::vector<double>& partial) {
  double sum = 0;
  for (double p : partial) sum += p;
  return sum;
}

template <typename B, typename G, typename D>
void momentum_direction(B* buf, const G* grad, D* direction, int64_t n, const MomentumMath& math, double* sumsq) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t end = std::min(n, (b + 1) * kBlock);
      Group acc{Vec(0.f), Vec(0.f)};
      for (int64_t i = b * kBlock; i < end; i += kGroup) {
        const int64_t k = std::min(kGroup, end - i);  // a partial group loads zeros past the end
        const Group g = load_group(grad + i, k);
        const Group m = math.buffer(load_group(buf + i, k), g);
        store_group(buf + i, m, k);
        store_group(direction + i, math.direction(m, g, acc), k);
      }
      partial[b] = total(acc);
    }
  });
  *sumsq = sum_in_block_order(partial);
}

// fp8 B: one quantisation block at a time, decoded in registers (load_e4m3_group), the new values staged in float32
// with their absmax, then encoded (encode_codes) with the block's new scale
template <typename G, typename D>
void momentum_direction_fp8(uint8_t* codes, float* scales, int64_t block_size, const G* grad, D* direction,
                            int64_t n, const MomentumMath& math, double* sumsq) {
  const int64_t blocks = (n + block_size - 1) / block_size;
  std::vector<double> partial(blocks);
  at::parallel_for(0, blocks, std::max<int64_t>(1, kBlock / block_size), [&](int64_t first, int64_t last) {
    alignas(64) float staged[kBlock];
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * block_size, len = std::min(block_size, n - start);
      const Vec scale256(scales[b] * 256.f);
      AbsmaxBits absmax;
      Group acc{Vec(0.f), Vec(0.f)};
      for (int64_t i = 0; i < len; i += kGroup) {
        const int64_t k = std::min(kGroup, len - i);
        const Group g = load_group(grad + start + i, k);
        const Group m = math.buffer(load_e4m3_group(codes + start + i, k, scale256), g);
        store_group(staged + i, m, k);
        absmax.add(m, k);
        store_group(direction + start + i, math.direction(m, g, acc), k);
      }
      const BlockCodec codec(absmax.bits());
      encode_codes(staged, codes + start, len, codec);
      scales[b] = codec.scale;
      partial[b] = total(acc);
    }
  });
  *sumsq = sum_in_block_order(partial);
}

template <typename B, typename G>
void with_direction(const at::Tensor& buf, const at::Tensor& grad, const at::Tensor& direction, double* sumsq,
                    const MomentumMath& math) {
  const int64_t n = grad.numel();
  if (direction.scalar_type() == at::kFloat) {
    momentum_direction(buf.data_ptr<B>(), grad.data_ptr<G>(), direction.data_ptr<float>(), n, math, sumsq);
  } else {
    momentum_direction(buf.data_ptr<B>(), grad.data_ptr<G>(), direction.data_ptr<BFloat16>(), n, math, sumsq);
  }
}

template <typename B>
void with_grad(const at::Tensor& buf, const at::Tensor& grad, const at::Tensor& direction, double* sumsq,
               const MomentumMath& math) {
  switch (grad.scalar_type()) {
    case at::kFloat: with_direction<B, float>(buf, grad, direction, sumsq, math); break;
    case at::kBFloat16: with_direction<B, BFloat16>(buf, grad, direction, sumsq, math); break;
    default: with_direction<B, Half>(buf, grad, direction, sumsq, math);
  }
}

template <typename G>
void fp8_with_direction(const at::Tensor& buf, const at::Tensor& scale, int64_t block_size, const at::Tensor& grad,
                        const at::Tensor& direction, double* sumsq, const MomentumMath& math) {
  auto* codes = static_cast<uint8_t*>(buf.data_ptr());
  if (direction.scalar_type() == at::kFloat) {
    momentum_direction_fp8(codes, scale.data_ptr<float>(), block_size, grad.data_ptr<G>(),
                           direction.data_ptr<float>(), grad.numel(), math, sumsq);
  } else {
    momentum_direction_fp8(codes, scale.data_ptr<float>(), block_size, grad.data_ptr<G>(),
                           direction.data_ptr<BFloat16>(), grad.numel(), math, sumsq);
  }
}

void momentum_direction_cpu(const at::Tensor& buf, const std::optional<at::Tensor>& buf_scale, int64_t block_size,
                            const at::Tensor& grad, const at::Tensor& direction, const at::Tensor& sumsq,
                            double beta, double gamma, double delta, double epsilon) {
  for (const at::Tensor* t : {&buf, &grad, &direction, &sumsq}) {
    TORCH_CHECK(t->device().is_cpu(), "fastopt::momentum_direction_ (CPU kernel): a tensor is on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "fastopt::momentum_direction_: tensors must be contiguous");
  }
  TORCH_CHECK(buf.numel() == grad.numel() && direction.numel() == grad.numel(),
              "fastopt::momentum_direction_: buf, grad and direction must have the same number of elements, got ",
              buf.numel(), ", ", grad.numel(), " and ", direction.numel());
  const bool fp8 = buf.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(buf.scalar_type() == at::kFloat || buf.scalar_type() == at::kBFloat16 || fp8,
              "fastopt::momentum_direction_: buf must be float32, bfloat16 or float8_e4m3fn, got ", buf.scalar_type());
  TORCH_CHECK(fp8 == buf_scale.has_value(), "fastopt::momentum_direction_: buf_scale goes with an fp8 buf only");
  if (fp8) {
    TORCH_CHECK(block_size >= 1 && block_size <= kBlock, "fastopt::momentum_direction_: block_size must be in [1, ",
                kBlock, "], got ", block_size);
    TORCH_CHECK(buf_scale->device().is_cpu() && buf_scale->is_contiguous() &&
                    buf_scale->scalar_type() == at::kFloat &&
                    buf_scale->numel() == (grad.numel() + block_size - 1) / block_size,
                "fastopt::momentum_direction_: buf_scale must be a contiguous float32 CPU tensor of one scale per ",
                "block of ", block_size, " elements");
  }
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16 ||
                  grad.scalar_type() == at::kHalf,
              "fastopt::momentum_direction_: grad must be float32, bfloat16 or float16, got ", grad.scalar_type());
  TORCH_CHECK(direction.scalar_type() == at::kFloat || direction.scalar_type() == at::kBFloat16,
              "fastopt::momentum_direction_: direction must be float32 or bfloat16, got ", direction.scalar_type());
  TORCH_CHECK(sumsq.scalar_type() == at::kDouble && sumsq.numel() == 1,
              "fastopt::momentum_direction_: sumsq must be one float64 element");
  double* out = sumsq.data_ptr<double>();
  const MomentumMath math{Vec(float(beta)), Vec(float(gamma)), Vec(float(delta)), Vec(float(epsilon))};
  if (fp8) {
    switch (grad.scalar_type()) {
      case at::kFloat: fp8_with_direction<float>(buf, *buf_scale, block_size, grad, direction, out, math); break;
      case at::kBFloat16: fp8_with_direction<BFloat16>(buf, *buf_scale, block_size, grad, direction, out, math); break;
      default: fp8_with_direction<Half>(buf, *buf_scale, block_size, grad, direction, out, math);
    }
  } else if (buf.scalar_type() == at::kFloat) {
    with_grad<float>(buf, grad, direction, out, math);
  } else {
    with_grad<BFloat16>(buf, grad, direction, out, math);
  }
}

template <typename P, typename U>
void decayed_update(P* param, const U* update, int64_t n, float keep, float step) {
  const Vec vkeep(keep), vstep(-step);
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first * kBlock, end = std::min(n, last * kBlock); i < end; i += kGroup) {
      const int64_t k = std::min(kGroup, end - i);
      Group p = load_group(param + i, k);
      const Group u = load_group(update + i, k);
      p.lo = at::vec::fmadd(vstep, u.lo, vkeep * p.lo);
      p.hi = at::vec::fmadd(vstep, u.hi, vkeep * p.hi);
      store_group(param + i, p, k);
    }
  });
}

template <typename P>
void decayed_update_with(const at::Tensor& param, const at::Tensor& update, float keep, float step) {
  if (update.scalar_type() == at::kFloat) {
    decayed_update(param.data_ptr<P>(), update.data_ptr<float>(), param.numel(), keep, step);
  } else {
    decayed_update(param.data_ptr<P>(), update.data_ptr<BFloat16>(), param.numel(), keep, step);
  }
}

void decayed_update_cpu(const at::Tensor& param, const at::Tensor& update, double decay, double step) {
  for (const at::Tensor* t : {&param, &update}) {
    TORCH_CHECK(t->device().is_cpu(), "fastopt::decayed_update_ (CPU kernel): a tensor is on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "fastopt::decayed_update_: tensors must be contiguous");
  }
  TORCH_CHECK(param.numel() == update.numel(), "fastopt::decayed_update_: param and update must have the same ",
              "number of elements, got ", param.numel(), " and ", update.numel());
  TORCH_CHECK(update.scalar_type() == at::kFloat || update.scalar_type() == at::kBFloat16,
              "fastopt::decayed_update_: update must be float32 or bfloat16, got ", update.scalar_type());
  const float keep = float(1.0 - decay);
  switch (param.scalar_type()) {
    case at::kFloat: decayed_update_with<float>(param, update, keep, float(step)); break;
    case at::kBFloat16: decayed_update_with<BFloat16>(param, update, keep, float(step)); break;
    case at::kHalf: decayed_update_with<Half>(param, update, keep, float(step)); break;
    default: TORCH_CHECK(false, "fastopt::decayed_update_: param must be float32, bfloat16 or float16, got ",
                         param.scalar_type());
  }
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("momentum_direction_", &fastopt::momentum_direction_cpu);
  m.impl("decayed_update_", &fastopt::decayed_update_cpu);
}
