// fastopt::adam_step_ on CPU: one vectorised pass over p, g, m, v per element.
//
// The engine walks every element of every tensor of the bucket in blocks (one parallel_for
// over all blocks of all tensors); a block is the fp8 quantisation block, or kDenseBlock
// elements for dense state. Inside a block it loads groups of 2×Vec::size() elements (one
// Vectorized<BFloat16>), converts params and state to fp32, applies the update functor and
// stores them back in their formats. See fastopt/reference/adam.py for the math.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "common/numerics.h"

namespace fastopt {
namespace {

using at::BFloat16;
using at::Half;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kGroup = 2 * kLanes;       // elements per step of the inner loop
constexpr int64_t kDenseBlock = 4096;        // work unit for fp32 / bf16 state
constexpr int64_t kMaxBlock = 4096;          // largest fp8 block (staging buffer size)

// Everything called per group must inline: a call would pass the vectors through memory.
#define FASTOPT_INLINE inline __attribute__((always_inline))

struct Group {
  Vec lo, hi;
};

// ---- loads and stores of a group (n <= kGroup elements) in each storage dtype ----------

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

// ---- a moment tensor in its storage format ---------------------------------------------
// load() gives the moment's value (v itself for second moments). store() takes the new value
// and, for second moments, its square root, which the functor computes anyway: fp8 keeps the
// root. fp8 stages a block in fp32 and writes its scale and codes in end_block().

struct Moment {
  Group value, root;  // root: sqrt(value) for second moments, unused otherwise
};

template <typename S>
struct DenseMoment {
  S* data;
  void begin_block(int64_t, int64_t, int64_t) {}
  FASTOPT_INLINE Group load(int64_t i, int64_t, int64_t n) const { return load_group(data + i, n); }
  FASTOPT_INLINE void store(int64_t i, int64_t, const Moment& x, int64_t n) { store_group(data + i, x.value, n); }
  void end_block(int64_t, int64_t, int64_t) {}
};

// Plain loops the compiler vectorises (checked with -fopt-info-vec).
void decode_block(const uint8_t* codes, float scale, bool square, float* out, int64_t len) {
  for (int64_t k = 0; k < len; ++k) {
    const float x = decode_e4m3(codes[k]) * scale;
    out[k] = square ? x * x : x;
  }
}

void encode_block(const float* x, uint8_t* codes, float inv, int64_t len) {
  for (int64_t k = 0; k < len; ++k) codes[k] = encode_e4m3(x[k] * inv);
}

struct Fp8Moment {
  uint8_t* codes;
  float* scales;
  bool root;         // second moments are stored as sqrt(v)
  float* staging;    // kMaxBlock floats owned by the calling thread: the block in fp32
  Vec absmax{0.f};   // of the values staged so far in this block

  void begin_block(int64_t b, int64_t start, int64_t len) {
    decode_block(codes + start, scales[b], root, staging, len);
    absmax = Vec(0.f);
  }
  FASTOPT_INLINE Group load(int64_t i, int64_t start, int64_t n) const { return load_group(staging + (i - start), n); }
  // Lanes past n hold zeros (partial loads zero-fill and the update keeps zeros), so the running
  // absmax may take whole groups.
  FASTOPT_INLINE void store(int64_t i, int64_t start, const Moment& x, int64_t n) {
    const Group& y = root ? x.root : x.value;
    absmax = at::vec::maximum(absmax, at::vec::maximum(y.lo.abs(), y.hi.abs()));
    store_group(staging + (i - start), y, n);
  }
  void end_block(int64_t b, int64_t start, int64_t len) {
    const float amax = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, absmax);
    encode_block(staging, codes + start, amax > 0.f ? kE4M3Max / amax : 0.f, len);
    scales[b] = amax / kE4M3Max;
  }
};

// ---- the update functor -------------------------------------------------------------------

// Per-tensor scalars, folded on the host from (lr, betas, t). With c_m = lr/(1-β1^t), c_g = 0
// this is AdamW; NAdamW uses c_m = lr·β1/(1-β1^(t+1)), c_g = lr·(1-β1)/(1-β1^t).
struct AdamCoefficients {
  float decay;         // 1 - lr·wd
  float beta1, beta2;
  float inv_bias2_sqrt, eps;
  float c_m, c_g;
  float inv_grad_scale;
  bool maximize;
};

// The coefficients live in registers for a whole block (a struct read through a reference
// would be reloaded after every store, since float stores may alias it).
struct AdamFunctor {
  Vec decay, one_minus_beta1, beta2, one_minus_beta2, inv_bias2_sqrt, eps, c_m, c_g, inv_grad_scale;
  bool scale_grad, maximize, nesterov;

  explicit AdamFunctor(const AdamCoefficients& c)
      : decay(c.decay), one_minus_beta1(1.f - c.beta1), beta2(c.beta2), one_minus_beta2(1.f - c.beta2),
        inv_bias2_sqrt(c.inv_bias2_sqrt), eps(c.eps), c_m(c.c_m), c_g(c.c_g), inv_grad_scale(c.inv_grad_scale),
        scale_grad(c.inv_grad_scale != 1.f), maximize(c.maximize), nesterov(c.c_g != 0.f) {}

  // p, m, v (and vmax, null without amsgrad) are updated in place; v_root = sqrt(v) and
  // vmax_root = sqrt(vmax) come out for the storage of fp8 second moments.
  FASTOPT_INLINE void operator()(Vec& p, Vec g, Vec& m, Vec& v, Vec& v_root, Vec* vmax, Vec* vmax_root) const {
    if (scale_grad) g = g * inv_grad_scale;
    if (maximize) g = Vec(0.f) - g;
    p = p * decay;
    m = at::vec::fmadd(one_minus_beta1, g - m, m);
    v = at::vec::fmadd(beta2, v, one_minus_beta2 * g * g);
    v_root = v.sqrt();
    Vec root_used = v_root;
    if (vmax) {
      *vmax = at::vec::maximum(*vmax, v);
      root_used = *vmax_root = vmax->sqrt();
    }
    const Vec denom = at::vec::fmadd(root_used, inv_bias2_sqrt, eps);
    const Vec direction = nesterov ? at::vec::fmadd(c_m, m, c_g * g) : c_m * m;
    p = p - direction / denom;
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
  c.inv_grad_scale = float(1.0 / grad_scale);
  c.maximize = maximize;
  return c;
}

// ---- the engine -------------------------------------------------------------------------------

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

template <typename P, typename Storage>
void update_block(const TensorSlot& s, Storage m, Storage v, Storage vmax, bool amsgrad, int64_t b,
                  int64_t block, bool stochastic) {
  P* param = static_cast<P*>(s.param);
  const P* grad = static_cast<const P*>(s.grad);
  const int64_t start = b * block, len = std::min(block, s.numel - start), end = start + len;
  const AdamFunctor update(s.coef);
  m.begin_block(b, start, len);
  v.begin_block(b, start, len);
  if (amsgrad) vmax.begin_block(b, start, len);
  for (int64_t i = start; i < end; i += kGroup) {
    const int64_t n = std::min(kGroup, end - i);
    Group p = s.master ? load_group(s.master + i, n) : load_group(param + i, n);
    const Group g = load_group(grad + i, n);
    Moment mg{m.load(i, start, n)}, vg{v.load(i, start, n)}, wg{};
    if (amsgrad) wg.value = vmax.load(i, start, n);
    update(p.lo, g.lo, mg.value.lo, vg.value.lo, vg.root.lo, amsgrad ? &wg.value.lo : nullptr, &wg.root.lo);
    update(p.hi, g.hi, mg.value.hi, vg.value.hi, vg.root.hi, amsgrad ? &wg.value.hi : nullptr, &wg.root.hi);
    if (s.master) store_group(s.master + i, p, n);
    store_param(param, p, i, n, stochastic, s.sr_key);
    m.store(i, start, mg, n);
    v.store(i, start, vg, n);
    if (amsgrad) vmax.store(i, start, wg, n);
  }
  m.end_block(b, start, len);
  v.end_block(b, start, len);
  if (amsgrad) vmax.end_block(b, start, len);
}

// One parallel_for over all blocks of all tensors, so small tensors share threads.
template <typename P, typename S>
void run(const std::vector<TensorSlot>& slots, int64_t block, bool amsgrad, bool stochastic) {
  std::vector<int64_t> first(slots.size() + 1, 0);
  for (size_t i = 0; i < slots.size(); ++i) first[i + 1] = first[i] + (slots[i].numel + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, 32768 / block);
  at::parallel_for(0, first.back(), grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> staging(std::is_same_v<S, uint8_t> ? 3 * kMaxBlock : 0);
    size_t t = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[t + 1]) ++t;
      const TensorSlot& s = slots[t];
      if constexpr (std::is_same_v<S, uint8_t>) {
        Fp8Moment m{static_cast<uint8_t*>(s.m), s.m_scale, false, staging.data()};
        Fp8Moment v{static_cast<uint8_t*>(s.v), s.v_scale, true, staging.data() + kMaxBlock};
        Fp8Moment w{static_cast<uint8_t*>(s.vmax), s.vmax_scale, true, staging.data() + 2 * kMaxBlock};
        update_block<P>(s, m, v, w, amsgrad, b - first[t], block, stochastic);
      } else {
        DenseMoment<S> m{static_cast<S*>(s.m)}, v{static_cast<S*>(s.v)}, w{static_cast<S*>(s.vmax)};
        update_block<P>(s, m, v, w, amsgrad, b - first[t], block, stochastic);
      }
    }
  });
}

// ---- the op -------------------------------------------------------------------------------------

void check_list(const at::TensorList list, size_t n, const char* name, bool optional) {
  TORCH_CHECK((optional && list.empty()) || list.size() == n, "fastopt::adam_step_: ", name, " has ",
              list.size(), " tensors, expected ", n, optional ? " or 0" : "");
}

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
  if (found_inf && found_inf->item<double>() != 0.0) return;
  check_list(grads, n, "grads", false);
  check_list(exp_avgs, n, "exp_avgs", false);
  check_list(exp_avg_sqs, n, "exp_avg_sqs", false);
  check_list(state_steps, n, "state_steps", false);
  check_list(max_exp_avg_sqs, n, "max_exp_avg_sqs", true);
  check_list(master_params, n, "master_params", true);
  const auto param_dtype = params[0].scalar_type(), state_dtype = exp_avgs[0].scalar_type();
  const bool fp8 = state_dtype == at::kFloat8_e4m3fn, amsgrad = !max_exp_avg_sqs.empty();
  TORCH_CHECK(param_dtype == at::kFloat || param_dtype == at::kBFloat16 || param_dtype == at::kHalf,
              "fastopt::adam_step_: params must be float32, bfloat16 or float16, got ", param_dtype);
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kBFloat16 || fp8,
              "fastopt::adam_step_: state must be float32, bfloat16 or float8_e4m3fn, got ", state_dtype);
  if (fp8) {
    TORCH_CHECK(block_size >= kGroup && block_size <= kMaxBlock && (block_size & (block_size - 1)) == 0,
                "fastopt::adam_step_: block_size must be a power of two in [", kGroup, ", ", kMaxBlock, "]");
    check_list(exp_avg_scales, n, "exp_avg_scales", false);
    check_list(exp_avg_sq_scales, n, "exp_avg_sq_scales", false);
    if (amsgrad) check_list(max_exp_avg_sq_scales, n, "max_exp_avg_sq_scales", false);
  }
  const double lr_value = lr_tensor ? lr_tensor->item<double>() : lr;
  const double scale_value = grad_scale ? grad_scale->item<double>() : 1.0;

  std::vector<TensorSlot> slots;
  slots.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    auto same = [&](const at::Tensor& t, at::ScalarType dtype, const char* name) {
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel,
                  "fastopt::adam_step_: ", name, "[", i, "] must be a contiguous CPU ", dtype, " tensor of ",
                  numel, " elements, got ", t.device(), " ", t.scalar_type(), " ", t.sizes());
    };
    same(params[i], param_dtype, "params");
    same(grads[i], param_dtype, "grads");
    same(exp_avgs[i], state_dtype, "exp_avgs");
    same(exp_avg_sqs[i], state_dtype, "exp_avg_sqs");
    if (amsgrad) same(max_exp_avg_sqs[i], state_dtype, "max_exp_avg_sqs");
    if (!master_params.empty()) same(master_params[i], at::kFloat, "master_params");
    if (fp8) {
      const auto blocks = (numel + block_size - 1) / block_size;
      auto scales = [&](at::TensorList l, const char* name) {
        TORCH_CHECK(l[i].device().is_cpu() && l[i].is_contiguous() && l[i].scalar_type() == at::kFloat &&
                        l[i].numel() == blocks,
                    "fastopt::adam_step_: ", name, "[", i, "] must be ", blocks, " contiguous float32 scales");
      };
      scales(exp_avg_scales, "exp_avg_scales");
      scales(exp_avg_sq_scales, "exp_avg_sq_scales");
      if (amsgrad) scales(max_exp_avg_sq_scales, "max_exp_avg_sq_scales");
    }
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
