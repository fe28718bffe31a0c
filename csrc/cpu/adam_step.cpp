// fastopt::adam_step_ on CPU: one pass over p, g, m, v per element.
//
// The engine walks every element of every tensor of the bucket in blocks, with one
// parallel_for over all blocks of all tensors (small tensors share threads). The update is one
// functor, AdamMath<V>, written once for V = Vectorized<float> and V = float:
//
// * fp32 / bf16 state: groups of 2×Vec::size() elements (one Vectorized<BFloat16>) are loaded,
//   converted to fp32, updated with AdamMath<Vec> and stored back in place.
// * fp8 state: one quantisation block at a time, a plain loop (which gcc vectorises: the codecs
//   in common/numerics.h are branch-free) decodes the codes, updates with AdamMath<float>,
//   stores the params and stages the new moments with their absmax; a second loop encodes.
//   Written with Vectorized, the same block spilled registers and ran 1.6× slower.
//
// See fastopt/reference/adam.py for the math.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/adam_checks.h"
#include "common/numerics.h"

namespace fastopt {
namespace {

using at::BFloat16;
using at::Half;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kGroup = 2 * kLanes;       // elements per step of the dense inner loop
constexpr int64_t kDenseBlock = 4096;        // work unit for fp32 / bf16 state
constexpr int64_t kMaxBlock = 4096;          // largest fp8 block (staging buffer size)

// Everything called per element or group must inline: a call passes vectors through memory.
#define FASTOPT_INLINE inline __attribute__((always_inline))

// ---- the update functor, for V = Vec and V = float ------------------------------------------

FASTOPT_INLINE Vec fmadd(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
FASTOPT_INLINE float fmadd(float a, float b, float c) { return a * b + c; }
FASTOPT_INLINE Vec maximum(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
FASTOPT_INLINE float maximum(float a, float b) { return a > b ? a : b; }
FASTOPT_INLINE Vec square_root(const Vec& x) { return x.sqrt(); }
FASTOPT_INLINE float square_root(float x) { return std::sqrt(x); }

// Per-tensor scalars, folded on the host from (lr, betas, t). With c_m = lr/(1-β1^t), c_g = 0
// this is AdamW; NAdamW uses c_m = lr·β1/(1-β1^(t+1)), c_g = lr·(1-β1)/(1-β1^t).
struct AdamCoefficients {
  float decay;         // 1 - lr·wd
  float beta1, beta2;
  float inv_bias2_sqrt, eps;
  float c_m, c_g;
  float grad_factor;   // ±1/grad_scale: unscales, and negates for maximize (both exact for ±1)
};

// The coefficients are members (registers for a whole block): a struct read through a
// reference would be reloaded after every store, since float stores may alias it. The body is
// branch-free (AdamW is c_g = 0) so that the scalar instance vectorises.
template <typename V>
struct AdamMath {
  V decay, one_minus_beta1, beta2, one_minus_beta2, inv_bias2_sqrt, eps, c_m, c_g, grad_factor;

  explicit AdamMath(const AdamCoefficients& c)
      : decay(c.decay), one_minus_beta1(1.f - c.beta1), beta2(c.beta2), one_minus_beta2(1.f - c.beta2),
        inv_bias2_sqrt(c.inv_bias2_sqrt), eps(c.eps), c_m(c.c_m), c_g(c.c_g), grad_factor(c.grad_factor) {}

  // p, m, v (and vmax, null without amsgrad) are updated in place; v_root = sqrt(v) and
  // vmax_root = sqrt(vmax) come out for the storage of fp8 second moments.
  FASTOPT_INLINE void operator()(V& p, V g, V& m, V& v, V& v_root, V* vmax, V* vmax_root) const {
    g = g * grad_factor;
    p = p * decay;
    m = fmadd(one_minus_beta1, g - m, m);
    v = fmadd(beta2, v, one_minus_beta2 * g * g);
    v_root = square_root(v);
    V root_used = v_root;
    if (vmax) {
      *vmax = maximum(*vmax, v);
      root_used = *vmax_root = square_root(*vmax);
    }
    const V denom = fmadd(root_used, inv_bias2_sqrt, eps);
    p = p - fmadd(c_m, m, c_g * g) / denom;
  }
};

AdamCoefficients adam_coefficients(double lr, double beta1, double beta2, double eps, double wd, double t,
                                   bool nesterov, bool maximize, double grad_scale) {
  const double bias1 = 1.0 - std::pow(beta1, t);
  const double bias2 = 1.0 - std::pow(beta2, t);
  AdamCoefficients c{};
  c.decay = float(1.0 - lr * wd);
  c.beta1 = float(beta1);
  c.beta2 = float(beta2);
  c.inv_bias2_sqrt = float(1.0 / std::sqrt(bias2));
  c.eps = float(eps);
  c.c_m = float(nesterov ? lr * beta1 / (1.0 - std::pow(beta1, t + 1)) : lr / bias1);
  c.c_g = float(nesterov ? lr * (1.0 - beta1) / bias1 : 0.0);
  c.grad_factor = float((maximize ? -1.0 : 1.0) / grad_scale);
  return c;
}

struct TensorSlot {
  void* param;
  const void* grad;
  float* master;
  void *m, *v, *vmax;
  float *m_scale, *v_scale, *vmax_scale;
  int64_t numel;
  AdamCoefficients coef;
  uint32_t sr_key;
};

// ---- dense state: groups of 2×Vec::size() elements ------------------------------------------

struct Group {
  Vec lo, hi;
};

FASTOPT_INLINE Group load_group(const float* p, int64_t n) {
  if (n == kGroup) return {Vec::loadu(p), Vec::loadu(p + kLanes)};
  return {Vec::loadu(p, std::min(n, kLanes)), Vec::loadu(p + kLanes, std::max<int64_t>(n - kLanes, 0))};
}

template <typename T>  // BFloat16 or Half
FASTOPT_INLINE Group load_group(const T* p, int64_t n) {
  auto v = n == kGroup ? at::vec::Vectorized<T>::loadu(p) : at::vec::Vectorized<T>::loadu(p, n);
  auto [lo, hi] = at::vec::convert_to_float<T>(v);
  return {lo, hi};
}

FASTOPT_INLINE void store_group(float* p, const Group& x, int64_t n) {
  if (n == kGroup) {
    x.lo.store(p);
    x.hi.store(p + kLanes);
    return;
  }
  x.lo.store(p, std::min(n, kLanes));
  if (n > kLanes) x.hi.store(p + kLanes, n - kLanes);
}

template <typename T>
FASTOPT_INLINE void store_group(T* p, const Group& x, int64_t n) {
  auto v = at::vec::convert_from_float<T>(x.lo, x.hi);  // round to nearest even
  if (n == kGroup) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

template <typename P>
FASTOPT_INLINE void store_param(P* param, const Group& x, int64_t i, int64_t n, bool stochastic, uint32_t key) {
  if constexpr (std::is_same_v<P, BFloat16>) {
    if (stochastic) {
      alignas(64) float tmp[kGroup];
      store_group(tmp, x, n);
      for (int64_t k = 0; k < n; ++k) {
        param[i + k] = BFloat16(bf16_stochastic_round(tmp[k], key, uint64_t(i + k)), BFloat16::from_bits());
      }
      return;
    }
  }
  store_group(param + i, x, n);
}

template <typename P, typename S>
void update_dense_block(const TensorSlot& s, bool amsgrad, int64_t start, int64_t end, bool stochastic) {
  P* param = static_cast<P*>(s.param);
  const P* grad = static_cast<const P*>(s.grad);
  S *m = static_cast<S*>(s.m), *v = static_cast<S*>(s.v), *vmax = static_cast<S*>(s.vmax);
  const AdamMath<Vec> update(s.coef);
  for (int64_t i = start; i < end; i += kGroup) {
    const int64_t n = std::min(kGroup, end - i);
    Group p = s.master ? load_group(s.master + i, n) : load_group(param + i, n);
    const Group g = load_group(grad + i, n);
    Group mg = load_group(m + i, n), vg = load_group(v + i, n), wg{}, root;
    if (amsgrad) wg = load_group(vmax + i, n);
    update(p.lo, g.lo, mg.lo, vg.lo, root.lo, amsgrad ? &wg.lo : nullptr, &root.lo);
    update(p.hi, g.hi, mg.hi, vg.hi, root.hi, amsgrad ? &wg.hi : nullptr, &root.hi);
    if (s.master) store_group(s.master + i, p, n);
    store_param(param, p, i, n, stochastic, s.sr_key);
    store_group(m + i, mg, n);
    store_group(v + i, vg, n);
    if (amsgrad) store_group(vmax + i, wg, n);
  }
}

// ---- fp8 state: one quantisation block, plain loops the compiler vectorises -------------------

// Params are accessed as raw bits (uint16_t for bf16 / fp16): the compiler vectorises loads of
// plain integers, not of c10::BFloat16 / c10::Half objects.
template <typename P>
using Raw = std::conditional_t<std::is_same_v<P, float>, float, uint16_t>;

template <typename P>
FASTOPT_INLINE float to_float(Raw<P> x) {
  if constexpr (std::is_same_v<P, BFloat16>) return bits_float(uint32_t(x) << 16);
  else if constexpr (std::is_same_v<P, Half>) return c10::detail::fp16_ieee_to_fp32_value(x);
  else return x;
}

template <typename P, bool kStochastic>
FASTOPT_INLINE Raw<P> from_float(float x, uint32_t key, int64_t i) {
  if constexpr (std::is_same_v<P, BFloat16>) {
    return kStochastic ? bf16_stochastic_round(x, key, uint64_t(i)) : bf16_round_nearest(x);
  } else if constexpr (std::is_same_v<P, Half>) {
    return c10::detail::fp16_ieee_from_fp32_value(x);
  } else {
    return x;
  }
}

// absmax of non-negative floats (or |x| bits): integer order is float order, and NaN is the
// largest, so a NaN anywhere makes the block's scale NaN and the whole block reads back as NaN.
FASTOPT_INLINE uint32_t abs_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

// Writes a block's codes and scale from its staged fp32 values. Second moments (root) are
// stored as sqrt(v): non-negative, so they take the magnitude codec.
void encode_block(const float* staged, uint32_t absmax_bits, uint8_t* codes, float* scale, int64_t len, bool root) {
  const float absmax = bits_float(absmax_bits);
  const float inv = absmax > 0.f ? kE4M3Max / absmax : 0.f;
  if (root) {
    for (int64_t k = 0; k < len; ++k) codes[k] = uint8_t(encode_e4m3_magnitude(std::min(staged[k] * inv, kE4M3Max)));
  } else {
    for (int64_t k = 0; k < len; ++k) codes[k] = encode_e4m3(staged[k] * inv);
  }
  *scale = absmax / kE4M3Max;
}

// Compile-time options keep the loop free of branches, and every pointer is a local (a struct
// member would be reloaded after each store), so that the loop vectorises.
template <typename P, bool kAmsgrad, bool kMaster, bool kStochastic>
void update_fp8_block(const TensorSlot& s, int64_t b, int64_t start, int64_t len, float* staging) {
  Raw<P>* param = static_cast<Raw<P>*>(s.param) + start;
  const Raw<P>* grad = static_cast<const Raw<P>*>(s.grad) + start;
  float* master = kMaster ? s.master + start : nullptr;
  uint8_t* m_codes = static_cast<uint8_t*>(s.m) + start;
  uint8_t* v_codes = static_cast<uint8_t*>(s.v) + start;
  uint8_t* w_codes = kAmsgrad ? static_cast<uint8_t*>(s.vmax) + start : nullptr;
  const float m_scale = s.m_scale[b], v_scale = s.v_scale[b], w_scale = kAmsgrad ? s.vmax_scale[b] : 0.f;
  float *m_new = staging, *v_new = staging + kMaxBlock, *w_new = staging + 2 * kMaxBlock;
  const uint32_t key = s.sr_key;
  const AdamMath<float> update(s.coef);
  uint32_t m_max = 0, v_max = 0, w_max = 0;
  for (int64_t k = 0; k < len; ++k) {
    float p = kMaster ? master[k] : to_float<P>(param[k]);
    float m = decode_e4m3(m_codes[k]) * m_scale;
    float v_root = decode_e4m3_magnitude(v_codes[k]) * v_scale, v = v_root * v_root;
    float w_root = 0.f, w = 0.f;
    if constexpr (kAmsgrad) {
      w_root = decode_e4m3_magnitude(w_codes[k]) * w_scale;
      w = w_root * w_root;
    }
    update(p, to_float<P>(grad[k]), m, v, v_root, kAmsgrad ? &w : nullptr, &w_root);
    if constexpr (kMaster) master[k] = p;
    param[k] = from_float<P, kStochastic>(p, key, start + k);
    m_new[k] = m;
    v_new[k] = v_root;
    m_max = std::max(m_max, abs_bits(m));
    v_max = std::max(v_max, abs_bits(v_root));
    if constexpr (kAmsgrad) {
      w_new[k] = w_root;
      w_max = std::max(w_max, abs_bits(w_root));
    }
  }
  encode_block(m_new, m_max, m_codes, s.m_scale + b, len, false);
  encode_block(v_new, v_max, v_codes, s.v_scale + b, len, true);
  if constexpr (kAmsgrad) encode_block(w_new, w_max, w_codes, s.vmax_scale + b, len, true);
}

using Fp8BlockFn = void (*)(const TensorSlot&, int64_t, int64_t, int64_t, float*);

template <typename P>
Fp8BlockFn fp8_block_variant(bool amsgrad, bool master, bool stochastic) {
  auto pick = [&](auto ams, auto mst) -> Fp8BlockFn {
    if constexpr (std::is_same_v<P, BFloat16>) {
      if (stochastic) return &update_fp8_block<P, decltype(ams)::value, decltype(mst)::value, true>;
    }
    return &update_fp8_block<P, decltype(ams)::value, decltype(mst)::value, false>;
  };
  using T = std::true_type;
  using F = std::false_type;
  if (amsgrad) return master ? pick(T{}, T{}) : pick(T{}, F{});
  return master ? pick(F{}, T{}) : pick(F{}, F{});
}

// ---- the engine: one parallel_for over all blocks of all tensors ------------------------------

template <typename P, typename S>
void run(const std::vector<TensorSlot>& slots, int64_t block, bool amsgrad, bool stochastic) {
  constexpr bool kFp8 = std::is_same_v<S, uint8_t>;
  std::vector<int64_t> first(slots.size() + 1, 0);
  for (size_t i = 0; i < slots.size(); ++i) first[i + 1] = first[i] + (slots[i].numel + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, 32768 / block);
  at::parallel_for(0, first.back(), grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> staging(kFp8 ? 3 * kMaxBlock : 0);
    size_t t = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[t + 1]) ++t;
      const TensorSlot& s = slots[t];
      const int64_t local = b - first[t], start = local * block, len = std::min(block, s.numel - start);
      if constexpr (kFp8) {
        fp8_block_variant<P>(amsgrad, s.master != nullptr, stochastic)(s, local, start, len, staging.data());
      } else {
        update_dense_block<P, S>(s, amsgrad, start, start + len, stochastic);
      }
    }
  });
}

// ---- the op -------------------------------------------------------------------------------------

void* data_or_null(at::TensorList list, size_t i) { return list.empty() ? nullptr : list[i].data_ptr(); }
float* floats_or_null(at::TensorList list, size_t i) {
  return list.empty() ? nullptr : list[i].data_ptr<float>();
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList exp_avg_scales,
                   at::TensorList exp_avg_sq_scales, at::TensorList max_exp_avg_sq_scales,
                   at::TensorList master_params, at::TensorList state_steps,
                   const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool nesterov, bool maximize, int64_t block_size, int64_t sr_seed,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(params[0].device().is_cpu(), "fastopt::adam_step_ (CPU kernel): params are on ", params[0].device());
  check_adam_args({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                   max_exp_avg_sq_scales, master_params, state_steps, block_size},
                  params[0].device(), kMaxBlock,
                  {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  /*scalars_on_device=*/false);
  if (found_inf && found_inf->item<double>() != 0.0) return;
  const auto param_dtype = params[0].scalar_type(), state_dtype = exp_avgs[0].scalar_type();
  const bool fp8 = state_dtype == at::kFloat8_e4m3fn, amsgrad = !max_exp_avg_sqs.empty();
  const double lr_value = lr_tensor ? lr_tensor->item<double>() : lr;
  const double scale_value = grad_scale ? grad_scale->item<double>() : 1.0;

  std::vector<TensorSlot> slots;
  slots.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const double t = state_steps[i].item<double>();
    slots.push_back(TensorSlot{
        params[i].data_ptr(), grads[i].data_ptr(), floats_or_null(master_params, i), exp_avgs[i].data_ptr(),
        exp_avg_sqs[i].data_ptr(), data_or_null(max_exp_avg_sqs, i), floats_or_null(exp_avg_scales, i),
        floats_or_null(exp_avg_sq_scales, i), floats_or_null(max_exp_avg_sq_scales, i), numel,
        adam_coefficients(lr_value, beta1, beta2, eps, weight_decay, t, nesterov, maximize, scale_value),
        sr_tensor_key(sr_seed, int64_t(i))});
  }
  const bool stochastic = sr_seed >= 0 && param_dtype == at::kBFloat16;
  const int64_t block = fp8 ? block_size : kDenseBlock;
  auto dispatch_state = [&](auto param_tag) {
    using P = decltype(param_tag);
    if (fp8) {
      run<P, uint8_t>(slots, block, amsgrad, stochastic);
    } else if (state_dtype == at::kBFloat16) {
      run<P, BFloat16>(slots, block, amsgrad, stochastic);
    } else {
      run<P, float>(slots, block, amsgrad, stochastic);
    }
  };
  if (param_dtype == at::kFloat) {
    dispatch_state(float{});
  } else if (param_dtype == at::kBFloat16) {
    dispatch_state(BFloat16{});
  } else {
    dispatch_state(Half{});
  }
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CPU, m) { m.impl("adam_step_", &fastopt::adam_step_cpu); }
