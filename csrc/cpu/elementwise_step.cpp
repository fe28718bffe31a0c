// The element-wise optimizer steps on CPU (fastopt::adam_step_, lion_step_, mars_step_,
// sophia_step_, adam_mini_step_): one engine, one update rule per optimizer.
//
// A rule (AdamRule, LionRule, MarsRule, SophiaRule, AdamMiniRule) names its moments and gives a
// functor Math<V>, written once for V = Vectorized<float> and V = float, that advances the moments
// from the gradient and returns the update u. The engine does everything else, one pass over p, g and the moments per element:
//
//   g ← grad·grad_factor (unscale, negate for maximize);  u = Math(g, moments)
//   p ← p·(1 − lr·wd) − u·c,  c = 1, or for cautious c = [u·g > 0] / max(mean over the tensor, 1e-3)
//
// It walks every element of every tensor of the bucket in blocks, with one parallel_for over all
// blocks of all tensors (small tensors share threads):
//
// * fp32 / bf16 state: groups of 2×Vec::size() elements (one Vectorized<BFloat16>) are loaded,
//   converted to fp32, updated and stored back in place.
// * fp8 state: one quantisation block at a time, a plain loop (which gcc vectorises: the codecs
//   in common/numerics.h are branch-free) decodes the codes, updates with Math<float>, stores the
//   params and stages the new moments with their absmax; a second loop per moment encodes.
//   Written with Vectorized, the same block spilled registers and ran 1.6× slower. The encode
//   loop takes AVX-512 intrinsics where built for them (gcc narrowed the codes to bytes with
//   permutes, not vpmovdb): the 16M-element fp8 AdamW step 1.46 → 1.28 ns/element on one thread,
//   0.74 → 0.62 on two (a 2-core Intel Xeon, 2026-11-26). Decoding ahead into the staging rows
//   the same way measured slower (1.30 → 1.40 ns): the main loop's own decode stays.
// * per-tensor reductions run as earlier passes over the same blocks that write nothing, their
//   per-block results summed per tensor in block order (deterministic): MARS's norm of its
//   corrected gradient (the squares pass), then cautious's count of [u·g > 0] (the count pass).
//
// See fastopt/reference/ for the math.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numerics.h"
#include "common/step_checks.h"
#include "cpu/fp8_block.h"
#include "cpu/vector_group.h"

namespace fastopt {
namespace {

constexpr int64_t kDenseBlock = 4096;        // work unit for fp32 / bf16 state
constexpr int64_t kMaxBlock = 4096;          // largest fp8 block (staging buffer size)

FASTOPT_INLINE Vec fmadd(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
FASTOPT_INLINE float fmadd(float a, float b, float c) { return a * b + c; }
// maximum / minimum propagate NaN, as torch.maximum / torch.minimum and at::vec do
FASTOPT_INLINE Vec maximum(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
FASTOPT_INLINE float maximum(float a, float b) { return a > b || a != a ? a : b; }
FASTOPT_INLINE Vec minimum(const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }
FASTOPT_INLINE float minimum(float a, float b) { return a < b || a != a ? a : b; }
FASTOPT_INLINE Vec absolute(const Vec& x) { return x.abs(); }
FASTOPT_INLINE float absolute(float x) { return std::fabs(x); }
FASTOPT_INLINE Vec square_root(const Vec& x) { return x.sqrt(); }
FASTOPT_INLINE float square_root(float x) { return std::sqrt(x); }
// sign(x): ±1, and x itself for ±0 and NaN (as torch.sign)
FASTOPT_INLINE Vec sign(const Vec& x) {
  const Vec one(1.f), zero(0.f);
  return Vec::blendv(Vec::blendv(x, -one, x < zero), one, x > zero);
}
FASTOPT_INLINE float sign(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : x); }
// u·c of the cautious rule: u·factor where u·g > 0, else 0 (factor 1 and no mask without cautious)
FASTOPT_INLINE Vec masked(const Vec& u, const Vec& g, const Vec& factor) {
  return Vec::blendv(Vec(0.f), u * factor, (u * g) > Vec(0.f));
}
FASTOPT_INLINE float masked(float u, float g, float factor) { return u * g > 0.f ? u * factor : 0.f; }

// ---- the rules ------------------------------------------------------------------------------------
//
// A rule's coefficients are members of Math (registers for a whole block): a struct read through a
// reference would be reloaded after every store, since float stores may alias it. Math bodies are
// branch-free so that the scalar instance vectorises. s[k] are the moments' values; for the moments
// with root_stored(k) (fp8 keeps sqrt: second moments exceed e4m3's range), Math also sets root[k].
// The first kWritten moments are written back; the rest are read only (Sophia's Hessian).
// A rule with kSegmentScale (Adam-mini) also takes a per-element input that is constant over
// segments of the tensor: value[i / segment_length], an fp32 array of the tensor's slot.
// A rule with kClips (MARS) also has a per-tensor clip factor in its Coef, which the engine sets from a
// squares pass over Math::unclipped(g, s[kPrev]) before the update.

// AdamW (c_m = lr/(1-β1^t), c_g = 0) and NAdamW (c_m = lr·β1/(1-β1^(t+1)), c_g = lr·(1-β1)/(1-β1^t)).
// Moments: m, v and, with amsgrad, vmax.
struct AdamCoef {
  float beta1, beta2, inv_bias2_sqrt, eps, c_m, c_g;
};

template <bool kAmsgrad>
struct AdamRule {
  static constexpr int kStates = kAmsgrad ? 3 : 2;
  static constexpr int kWritten = kStates;
  static constexpr bool kClips = false;
  static constexpr bool kSegmentScale = false;
  static constexpr bool root_stored(int k) { return k >= 1; }
  using Coef = AdamCoef;
  template <typename V>
  struct Math {
    V one_minus_beta1, beta2, one_minus_beta2, inv_bias2_sqrt, eps, c_m, c_g;
    explicit Math(const Coef& c)
        : one_minus_beta1(1.f - c.beta1), beta2(c.beta2), one_minus_beta2(1.f - c.beta2),
          inv_bias2_sqrt(c.inv_bias2_sqrt), eps(c.eps), c_m(c.c_m), c_g(c.c_g) {}

    // m += (1-β1)(g-m); v = β2 v + (1-β2) g²; vmax = max(vmax, v); u = (c_m m + c_g g) / (√v/√bc2 + eps)
    // (s and root may be longer: a rule that extends Adam keeps its own moments after Adam's)
    template <int N>
    FASTOPT_INLINE V operator()(V g, V (&s)[N], V (&root)[N]) const {
      s[0] = fmadd(one_minus_beta1, g - s[0], s[0]);
      s[1] = fmadd(beta2, s[1], one_minus_beta2 * g * g);
      V r = root[1] = square_root(s[1]);
      if constexpr (kAmsgrad) {
        s[2] = maximum(s[2], s[1]);
        r = root[2] = square_root(s[2]);
      }
      return fmadd(c_m, s[0], c_g * g) / fmadd(r, inv_bias2_sqrt, eps);
    }
  };
};

// Lion: u = lr·sign(β1 m + (1-β1) g); m = β2 m + (1-β2) g.
struct LionRule {
  static constexpr int kStates = 1;
  static constexpr int kWritten = kStates;
  static constexpr bool kClips = false;
  static constexpr bool kSegmentScale = false;
  static constexpr bool root_stored(int) { return false; }
  struct Coef {
    float lr, beta1, beta2;
  };
  template <typename V>
  struct Math {
    V lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
    explicit Math(const Coef& c)
        : lr(c.lr), beta1(c.beta1), one_minus_beta1(1.f - c.beta1), beta2(c.beta2), one_minus_beta2(1.f - c.beta2) {}

    FASTOPT_INLINE V operator()(V g, V (&s)[1], V (&)[1]) const {
      const V c = beta1 * s[0] + one_minus_beta1 * g;
      s[0] = beta2 * s[0] + one_minus_beta2 * g;
      return lr * sign(c);
    }
  };
};

// MARS-AdamW: c = (g + k·(g − g_prev))·clip with k = γβ1/(1−β1) and clip = 1/max(‖c‖₂, 1) per tensor;
// g_prev ← g; then AdamW on c. Moments: m, v, (vmax,) g_prev.
struct MarsCoef {
  AdamCoef adam;  // AdamW's (c_g = 0)
  float correction, clip;
};

template <bool kAmsgrad>
struct MarsRule {
  using Adam = AdamRule<kAmsgrad>;
  static constexpr int kStates = Adam::kStates + 1;
  static constexpr int kWritten = kStates;
  static constexpr int kPrev = kStates - 1;
  static constexpr bool kClips = true;
  static constexpr bool kSegmentScale = false;
  static constexpr bool root_stored(int k) { return k != kPrev && Adam::root_stored(k); }
  using Coef = MarsCoef;
  template <typename V>
  struct Math {
    typename Adam::template Math<V> adam;
    V correction, clip;
    explicit Math(const Coef& c) : adam(c.adam), correction(c.correction), clip(c.clip) {}

    FASTOPT_INLINE V unclipped(V g, V g_prev) const { return fmadd(correction, g - g_prev, g); }
    FASTOPT_INLINE V operator()(V g, V (&s)[kStates], V (&root)[kStates]) const {
      const V c = unclipped(g, s[kPrev]) * clip;
      s[kPrev] = g;
      return adam(c, s, root);
    }
  };
};

// Sophia (SophiaG): m = β1 m + (1-β1) g; u = lr·sign(m)·min(|m| / (max(ρ·bs·h, 0) + 1e-15), 1).
// Moments: m, and h (read only: the optimizer's update_hessian writes it).
struct SophiaRule {
  static constexpr int kStates = 2;
  static constexpr int kWritten = 1;
  static constexpr bool kClips = false;
  static constexpr bool kSegmentScale = false;
  static constexpr bool root_stored(int) { return false; }
  struct Coef {
    float lr, beta1, rho_bs;
  };
  template <typename V>
  struct Math {
    V lr, beta1, one_minus_beta1, rho_bs;
    explicit Math(const Coef& c) : lr(c.lr), beta1(c.beta1), one_minus_beta1(1.f - c.beta1), rho_bs(c.rho_bs) {}

    FASTOPT_INLINE V operator()(V g, V (&s)[2], V (&)[2]) const {
      s[0] = beta1 * s[0] + one_minus_beta1 * g;
      const V denom = maximum(rho_bs * s[1], V(0.f)) + V(1e-15f);
      return lr * sign(s[0]) * minimum(absolute(s[0]) / denom, V(1.f));
    }
  };
};

// Adam-mini's element-wise half: m = β1 m + (1-β1) g; u = m·step, step = the segment's
// lr/(1-β1^t) / (√(v_b/(1-β2^t)) + eps) (fastopt.AdamMini computes it from its small v). Moment: m.
struct AdamMiniRule {
  static constexpr int kStates = 1;
  static constexpr int kWritten = 1;
  static constexpr bool kClips = false;
  static constexpr bool kSegmentScale = true;
  static constexpr bool root_stored(int) { return false; }
  struct Coef {
    float beta1;
  };
  template <typename V>
  struct Math {
    V beta1, one_minus_beta1;
    explicit Math(const Coef& c) : beta1(c.beta1), one_minus_beta1(1.f - c.beta1) {}

    FASTOPT_INLINE V operator()(V g, V (&s)[1], V (&)[1], V step) const {
      s[0] = beta1 * s[0] + one_minus_beta1 * g;
      return s[0] * step;
    }
  };
};

// One tensor of a launch.
template <typename Rule>
struct TensorSlot {
  void* param;
  const void* grad;
  float* master;                    // nullptr: no fp32 master weights
  void* state[Rule::kStates];
  float* scale[Rule::kStates];      // fp8 only
  int64_t numel;
  typename Rule::Coef coef;
  float decay;                      // 1 - lr·wd
  float grad_factor;                // ±1/grad_scale: unscales, and negates for maximize (both exact for ±1)
  float cautious_factor;            // 1 / max(mean of the cautious mask, 1e-3); 1 without cautious
  const float* segment_values;      // kSegmentScale rules: one value per segment_length elements
  int64_t segment_length;
  uint32_t sr_key;
};

// ---- dense state: groups of 2×Vec::size() elements ------------------------------------------------

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

// What a pass over a block does: kSquares sums Math::unclipped(g, g_prev)² and kCount counts u·g > 0
// (both write nothing); kApply updates the block in place.
enum class Pass { kSquares, kCount, kApply };

// value[j / length] for the n elements j = i, i+1, ...: a broadcast when they lie in one segment.
FASTOPT_INLINE Group load_segments(const float* values, int64_t length, int64_t i, int64_t n) {
  const int64_t first = i / length;
  if (first == (i + n - 1) / length) return {Vec(values[first]), Vec(values[first])};
  alignas(64) float lanes[kGroup] = {};
  for (int64_t k = 0; k < n; ++k) lanes[k] = values[(i + k) / length];
  return load_group(lanes, kGroup);
}

template <typename Rule, Pass kPass, typename P, typename S>
double dense_block(const TensorSlot<Rule>& t, int64_t start, int64_t end, bool stochastic, bool cautious) {
  constexpr int K = Rule::kStates;
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  S* state[K];
  for (int k = 0; k < K; ++k) state[k] = static_cast<S*>(t.state[k]);
  const typename Rule::template Math<Vec> math(t.coef);
  const Vec decay(t.decay), grad_factor(t.grad_factor), factor(t.cautious_factor), zero(0.f), one(1.f);
  Vec total = zero;
  for (int64_t i = start; i < end; i += kGroup) {
    const int64_t n = std::min(kGroup, end - i);
    Group g = load_group(grad + i, n);
    g = {g.lo * grad_factor, g.hi * grad_factor};
    if constexpr (kPass == Pass::kSquares) {  // lanes past n are zero in g and g_prev: they add 0
      const Group prev = load_group(state[Rule::kPrev] + i, n);
      const Vec c_lo = math.unclipped(g.lo, prev.lo), c_hi = math.unclipped(g.hi, prev.hi);
      total = fmadd(c_lo, c_lo, fmadd(c_hi, c_hi, total));
      continue;
    }
    Vec s_lo[K], s_hi[K], root_lo[K], root_hi[K];  // roots: unused, dense state keeps the values
    for (int k = 0; k < K; ++k) {
      const Group x = load_group(state[k] + i, n);
      s_lo[k] = x.lo;
      s_hi[k] = x.hi;
    }
    Group u;
    if constexpr (Rule::kSegmentScale) {
      const Group step = load_segments(t.segment_values, t.segment_length, i, n);
      u = {math(g.lo, s_lo, root_lo, step.lo), math(g.hi, s_hi, root_hi, step.hi)};
    } else {
      u = {math(g.lo, s_lo, root_lo), math(g.hi, s_hi, root_hi)};
    }
    if constexpr (kPass == Pass::kCount) {
      // lanes past n are zero in g, so they never count
      total = total + (((u.lo * g.lo) > zero) & one) + (((u.hi * g.hi) > zero) & one);
    } else {
      if (cautious) u = {masked(u.lo, g.lo, factor), masked(u.hi, g.hi, factor)};
      Group p = t.master ? load_group(t.master + i, n) : load_group(param + i, n);
      p = {p.lo * decay - u.lo, p.hi * decay - u.hi};
      if (t.master) store_group(t.master + i, p, n);
      store_param(param, p, i, n, stochastic, t.sr_key);
      for (int k = 0; k < Rule::kWritten; ++k) store_group(state[k] + i, Group{s_lo[k], s_hi[k]}, n);
    }
  }
  if constexpr (kPass == Pass::kApply) return 0;
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, total);
}

// ---- fp8 state: one quantisation block, plain loops the compiler vectorises ---------------------

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

// Block b = elements [start, start + len) of one tensor. Compile-time options keep the loop free of
// branches, and every pointer is a local (a struct member would be reloaded after each store), so
// that the loop vectorises. kPass: kCount or kApply, as in dense_block.
template <typename Rule, Pass kPass, typename P, bool kMaster, bool kStochastic>
double fp8_block(const TensorSlot<Rule>& t, int64_t b, int64_t start, int64_t len, bool cautious, float* staging) {
  static_assert(kPass != Pass::kSquares, "the squares pass is fp8_squares");
  constexpr bool kApply = kPass == Pass::kApply;
  constexpr int K = Rule::kStates;
  Raw<P>* param = static_cast<Raw<P>*>(t.param) + start;
  const Raw<P>* grad = static_cast<const Raw<P>*>(t.grad) + start;
  float* master = kMaster ? t.master + start : nullptr;
  const uint8_t* codes[K];
  float scale[K], *staged[K];
  for (int k = 0; k < K; ++k) {
    codes[k] = static_cast<const uint8_t*>(t.state[k]) + start;
    scale[k] = t.scale[k][b];
    staged[k] = staging + k * kMaxBlock;
  }
  const typename Rule::template Math<float> math(t.coef);
  const float decay = t.decay, grad_factor = t.grad_factor, factor = t.cautious_factor;
  const uint32_t key = t.sr_key;
  float* steps = staging + K * kMaxBlock;  // kSegmentScale: the block's per-element segment values
  if constexpr (Rule::kSegmentScale) {
    // segment by segment, without a division per element
    int64_t segment = start / t.segment_length, end = (segment + 1) * t.segment_length - start;
    for (int64_t i = 0; i < len; ++segment, end += t.segment_length) {
      const float value = t.segment_values[segment];
      for (const int64_t stop = std::min(len, end); i < stop; ++i) steps[i] = value;
    }
  }
  uint32_t absmax[K] = {};
  int32_t count = 0;  // (an int64_t counter would stop the loop from vectorising)
  for (int64_t i = 0; i < len; ++i) {
    float s[K], root[K];
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      if (Rule::root_stored(k)) {
        const float r = decode_e4m3_magnitude(codes[k][i]) * scale[k];
        s[k] = r * r;
      } else {
        s[k] = decode_e4m3(codes[k][i]) * scale[k];
      }
    }
    const float g = to_float<P>(grad[i]) * grad_factor;
    float u;
    if constexpr (Rule::kSegmentScale) {
      u = math(g, s, root, steps[i]);
    } else {
      u = math(g, s, root);
    }
    if constexpr (!kApply) {
      count += u * g > 0.f;
    } else {
      // branch-free: factor is 1 without cautious, and then every u is kept
      u = (u * g > 0.f || !cautious) ? u * factor : 0.f;
      const float p = (kMaster ? master[i] : to_float<P>(param[i])) * decay - u;
      if constexpr (kMaster) master[i] = p;
      param[i] = from_float<P, kStochastic>(p, key, start + i);
#pragma GCC unroll 4
      for (int k = 0; k < Rule::kWritten; ++k) {
        const float x = Rule::root_stored(k) ? root[k] : s[k];
        staged[k][i] = x;
        absmax[k] = std::max(absmax[k], abs_bits(x));
      }
    }
  }
  if constexpr (kApply) {
    for (int k = 0; k < Rule::kWritten; ++k) {
      encode_block(staged[k], absmax[k], static_cast<uint8_t*>(t.state[k]) + start, t.scale[k] + b, len,
                   Rule::root_stored(k));
    }
  }
  return count;
}

template <typename Rule, Pass kPass>
using Fp8BlockFn = double (*)(const TensorSlot<Rule>&, int64_t, int64_t, int64_t, bool, float*);

template <typename Rule, Pass kPass, typename P>
Fp8BlockFn<Rule, kPass> fp8_block_variant(bool master, bool stochastic) {
  if constexpr (std::is_same_v<P, float>) {
    return &fp8_block<Rule, kPass, P, false, false>;
  } else {
    if (master) return &fp8_block<Rule, kPass, P, true, false>;
    if constexpr (std::is_same_v<P, BFloat16>) {
      if (stochastic) return &fp8_block<Rule, kPass, P, false, true>;
    }
    return &fp8_block<Rule, kPass, P, false, false>;
  }
}

// The squares pass on one fp8 block: Σ Math::unclipped(g, g_prev)², in kWidth running sums so that the
// loop vectorises (a single float sum would be a serial dependency chain).
template <typename Rule, typename P>
double fp8_squares(const TensorSlot<Rule>& t, int64_t b, int64_t start, int64_t len) {
  constexpr int64_t kWidth = 16;
  const Raw<P>* grad = static_cast<const Raw<P>*>(t.grad) + start;
  const uint8_t* prev = static_cast<const uint8_t*>(t.state[Rule::kPrev]) + start;
  const float scale = t.scale[Rule::kPrev][b], grad_factor = t.grad_factor;
  const typename Rule::template Math<float> math(t.coef);
  auto square = [&](int64_t i) {
    const float c = math.unclipped(to_float<P>(grad[i]) * grad_factor, decode_e4m3(prev[i]) * scale);
    return c * c;
  };
  float sums[kWidth] = {};
  int64_t i = 0;
  for (; i + kWidth <= len; i += kWidth) {
    for (int64_t l = 0; l < kWidth; ++l) sums[l] += square(i + l);
  }
  double total = 0.0;
  for (; i < len; ++i) total += square(i);
  for (int64_t l = 0; l < kWidth; ++l) total += sums[l];
  return total;
}

// ---- the engine: one parallel_for over all blocks of all tensors ----------------------------------

// Calls visit(tensor, local block index, start, len, staging) for every block; returns the result
// of each block in block order.
template <typename Rule, typename Visit>
std::vector<double> for_each_block(const std::vector<TensorSlot<Rule>>& slots, const std::vector<int64_t>& first,
                                   int64_t block, bool fp8, Visit visit) {
  std::vector<double> results(first.back(), 0.0);
  const int64_t grain = std::max<int64_t>(1, 32768 / block);
  at::parallel_for(0, first.back(), grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> staging(fp8 ? (Rule::kStates + Rule::kSegmentScale) * kMaxBlock : 0);
    size_t t = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first[t + 1]) ++t;
      const int64_t local = b - first[t], start = local * block;
      results[b] = visit(slots[t], local, start, std::min(block, slots[t].numel - start), staging.data());
    }
  });
  return results;
}

template <typename Rule, typename P, typename S>
void run(std::vector<TensorSlot<Rule>>& slots, int64_t block, bool stochastic, bool cautious) {
  constexpr bool kFp8 = std::is_same_v<S, uint8_t>;
  std::vector<int64_t> first(slots.size() + 1, 0);
  for (size_t i = 0; i < slots.size(); ++i) first[i + 1] = first[i] + (slots[i].numel + block - 1) / block;
  auto pass = [&](auto tag) {
    constexpr Pass kPass = decltype(tag)::value;
    return for_each_block(slots, first, block, kFp8, [&](const TensorSlot<Rule>& t, int64_t b, int64_t start,
                                                         int64_t len, float* staging) {
      if constexpr (kFp8 && kPass == Pass::kSquares) {
        return fp8_squares<Rule, P>(t, b, start, len);
      } else if constexpr (kFp8) {
        return fp8_block_variant<Rule, kPass, P>(t.master != nullptr, stochastic)(t, b, start, len, cautious,
                                                                                 staging);
      } else {
        return dense_block<Rule, kPass, P, S>(t, start, start + len, stochastic, cautious);
      }
    });
  };
  auto tensor_total = [&](const std::vector<double>& per_block, size_t i) {
    double total = 0.0;
    for (int64_t b = first[i]; b < first[i + 1]; ++b) total += per_block[b];
    return total;
  };
  if constexpr (Rule::kClips) {
    const std::vector<double> squares = pass(std::integral_constant<Pass, Pass::kSquares>{});
    for (size_t i = 0; i < slots.size(); ++i) {
      const double norm = std::sqrt(tensor_total(squares, i));
      slots[i].coef.clip = norm > 1.0 ? float(1.0 / norm) : 1.f;  // a NaN norm leaves c as it is
    }
  }
  if (cautious) {
    const std::vector<double> counts = pass(std::integral_constant<Pass, Pass::kCount>{});
    for (size_t i = 0; i < slots.size(); ++i) {
      const float mean = float(tensor_total(counts, i)) / float(slots[i].numel);  // as torch: mask.mean() in fp32
      slots[i].cautious_factor = 1.f / std::max(mean, 1e-3f);
    }
  }
  pass(std::integral_constant<Pass, Pass::kApply>{});
}

template <typename Rule>
void dispatch(std::vector<TensorSlot<Rule>>& slots, at::ScalarType param_dtype, at::ScalarType state_dtype,
              int64_t block_size, bool stochastic, bool cautious) {
  auto with_param = [&](auto param_tag) {
    using P = decltype(param_tag);
    if (state_dtype == at::kFloat8_e4m3fn) {
      run<Rule, P, uint8_t>(slots, block_size, stochastic, cautious);
    } else if (state_dtype == at::kBFloat16) {
      run<Rule, P, BFloat16>(slots, kDenseBlock, stochastic, cautious);
    } else {
      run<Rule, P, float>(slots, kDenseBlock, stochastic, cautious);
    }
  };
  if (param_dtype == at::kFloat) {
    with_param(float{});
  } else if (param_dtype == at::kBFloat16) {
    with_param(BFloat16{});
  } else {
    with_param(Half{});
  }
}

// ---- the ops --------------------------------------------------------------------------------------

void* data_or_null(at::TensorList list, size_t i) { return list.empty() ? nullptr : list[i].data_ptr(); }
float* floats_or_null(at::TensorList list, size_t i) { return list.empty() ? nullptr : list[i].data_ptr<float>(); }

// The slots of the non-empty tensors, with the engine's per-tensor scalars; coef(i) gives the rule's.
template <typename Rule, typename Coef>
std::vector<TensorSlot<Rule>> make_slots(at::TensorList params, at::TensorList grads, at::TensorList master_params,
                                         std::initializer_list<std::pair<at::TensorList, at::TensorList>> moments,
                                         double lr, double weight_decay, bool maximize, double grad_scale,
                                         int64_t sr_seed, Coef coef) {
  std::vector<TensorSlot<Rule>> slots;
  slots.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    TensorSlot<Rule> t{};
    t.param = params[i].data_ptr();
    t.grad = grads[i].data_ptr();
    t.master = floats_or_null(master_params, i);
    int k = 0;
    for (const auto& [states, scales] : moments) {
      if (k == Rule::kStates) break;
      t.state[k] = data_or_null(states, i);
      t.scale[k++] = floats_or_null(scales, i);
    }
    t.numel = params[i].numel();
    t.coef = coef(i);
    t.decay = float(1.0 - lr * weight_decay);
    t.grad_factor = float((maximize ? -1.0 : 1.0) / grad_scale);
    t.cautious_factor = 1.f;
    t.sr_key = sr_tensor_key(sr_seed, int64_t(i));
    slots.push_back(t);
  }
  return slots;
}

double scalar_or(const std::optional<at::Tensor>& t, double fallback) { return t ? t->item<double>() : fallback; }

// Adam's coefficients for a tensor at step t: bias corrections folded with lr into c_m, c_g.
AdamCoef adam_coef(double lr, double beta1, double beta2, double eps, bool nesterov, const at::Tensor& step) {
  const double t = step.item<double>();
  const double bias1 = 1.0 - std::pow(beta1, t), bias2 = 1.0 - std::pow(beta2, t);
  return AdamCoef{float(beta1), float(beta2), float(1.0 / std::sqrt(bias2)), float(eps),
                  float(nesterov ? lr * beta1 / (1.0 - std::pow(beta1, t + 1)) : lr / bias1),
                  float(nesterov ? lr * (1.0 - beta1) / bias1 : 0.0)};
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList exp_avg_scales,
                   at::TensorList exp_avg_sq_scales, at::TensorList max_exp_avg_sq_scales,
                   at::TensorList master_params, at::TensorList state_steps,
                   const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool nesterov, bool maximize, bool cautious, int64_t block_size,
                   int64_t sr_seed, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "fastopt::adam_step_ (CPU kernel): params are on ", params[0].device());
  check_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                  max_exp_avg_sq_scales, master_params, state_steps, lr_tensor, block_size, grad_scale, found_inf,
                  kMaxBlock, /*scalars_on_device=*/false);
  if (scalar_or(found_inf, 0.0) != 0.0) return;
  const double lr_value = scalar_or(lr_tensor, lr);
  auto coef = [&](size_t i) { return adam_coef(lr_value, beta1, beta2, eps, nesterov, state_steps[i]); };
  const bool stochastic = sr_seed >= 0 && params[0].scalar_type() == at::kBFloat16;
  auto go = [&](auto amsgrad) {
    using Rule = AdamRule<decltype(amsgrad)::value>;
    auto slots = make_slots<Rule>(params, grads, master_params,
                                  {{exp_avgs, exp_avg_scales}, {exp_avg_sqs, exp_avg_sq_scales},
                                   {max_exp_avg_sqs, max_exp_avg_sq_scales}},
                                  lr_value, weight_decay, maximize, scalar_or(grad_scale, 1.0), sr_seed,
                                  coef);
    dispatch(slots, params[0].scalar_type(), exp_avgs[0].scalar_type(), block_size, stochastic, cautious);
  };
  if (max_exp_avg_sqs.empty()) {
    go(std::false_type{});
  } else {
    go(std::true_type{});
  }
}

void lion_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_scales, at::TensorList master_params,
                   const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                   double weight_decay, bool maximize, bool cautious, int64_t block_size, int64_t sr_seed,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "fastopt::lion_step_ (CPU kernel): params are on ", params[0].device());
  check_lion_step(params, grads, exp_avgs, exp_avg_scales, master_params, lr_tensor, block_size, grad_scale,
                  found_inf, kMaxBlock, /*scalars_on_device=*/false);
  if (scalar_or(found_inf, 0.0) != 0.0) return;
  const double lr_value = scalar_or(lr_tensor, lr);
  const LionRule::Coef coef{float(lr_value), float(beta1), float(beta2)};
  auto slots = make_slots<LionRule>(params, grads, master_params, {{exp_avgs, exp_avg_scales}}, lr_value,
                                    weight_decay, maximize, scalar_or(grad_scale, 1.0), sr_seed,
                                    [&](size_t) { return coef; });
  dispatch(slots, params[0].scalar_type(), exp_avgs[0].scalar_type(), block_size,
           sr_seed >= 0 && params[0].scalar_type() == at::kBFloat16, cautious);
}

void mars_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList last_grads,
                   at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                   at::TensorList max_exp_avg_sq_scales, at::TensorList last_grad_scales,
                   at::TensorList master_params, at::TensorList state_steps,
                   const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2, double eps,
                   double weight_decay, double gamma, bool maximize, bool cautious, int64_t block_size,
                   int64_t sr_seed, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "fastopt::mars_step_ (CPU kernel): params are on ", params[0].device());
  check_mars_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, exp_avg_scales,
                  exp_avg_sq_scales, max_exp_avg_sq_scales, last_grad_scales, master_params, state_steps, lr_tensor,
                  block_size, grad_scale, found_inf, kMaxBlock, /*scalars_on_device=*/false);
  if (scalar_or(found_inf, 0.0) != 0.0) return;
  const double lr_value = scalar_or(lr_tensor, lr);
  const float correction = float(gamma * beta1 / (1.0 - beta1));
  auto coef = [&](size_t i) {
    return MarsCoef{adam_coef(lr_value, beta1, beta2, eps, false, state_steps[i]), correction, 1.f};
  };
  const bool stochastic = sr_seed >= 0 && params[0].scalar_type() == at::kBFloat16;
  const double scale = scalar_or(grad_scale, 1.0);
  const at::ScalarType param_dtype = params[0].scalar_type(), state_dtype = exp_avgs[0].scalar_type();
  if (max_exp_avg_sqs.empty()) {
    auto slots = make_slots<MarsRule<false>>(
        params, grads, master_params,
        {{exp_avgs, exp_avg_scales}, {exp_avg_sqs, exp_avg_sq_scales}, {last_grads, last_grad_scales}}, lr_value,
        weight_decay, maximize, scale, sr_seed, coef);
    dispatch(slots, param_dtype, state_dtype, block_size, stochastic, cautious);
  } else {
    auto slots = make_slots<MarsRule<true>>(
        params, grads, master_params,
        {{exp_avgs, exp_avg_scales}, {exp_avg_sqs, exp_avg_sq_scales}, {max_exp_avg_sqs, max_exp_avg_sq_scales},
         {last_grads, last_grad_scales}},
        lr_value, weight_decay, maximize, scale, sr_seed, coef);
    dispatch(slots, param_dtype, state_dtype, block_size, stochastic, cautious);
  }
}

void sophia_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                     at::TensorList exp_avg_scales, at::TensorList hessian_scales, at::TensorList master_params,
                     const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double rho, double bs,
                     double weight_decay, bool maximize, int64_t block_size, int64_t sr_seed,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "fastopt::sophia_step_ (CPU kernel): params are on ", params[0].device());
  check_sophia_step(params, grads, exp_avgs, hessians, exp_avg_scales, hessian_scales, master_params, lr_tensor,
                    block_size, grad_scale, found_inf, kMaxBlock, /*scalars_on_device=*/false);
  if (scalar_or(found_inf, 0.0) != 0.0) return;
  const double lr_value = scalar_or(lr_tensor, lr);
  const SophiaRule::Coef coef{float(lr_value), float(beta1), float(rho * bs)};
  auto slots = make_slots<SophiaRule>(params, grads, master_params,
                                      {{exp_avgs, exp_avg_scales}, {hessians, hessian_scales}}, lr_value,
                                      weight_decay, maximize, scalar_or(grad_scale, 1.0), sr_seed,
                                      [&](size_t) { return coef; });
  dispatch(slots, params[0].scalar_type(), exp_avgs[0].scalar_type(), block_size,
           sr_seed >= 0 && params[0].scalar_type() == at::kBFloat16, /*cautious=*/false);
}

void adam_mini_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_scales, at::TensorList step_sizes, at::IntArrayRef segment_lengths,
                        at::TensorList master_params, const std::optional<at::Tensor>& lr_tensor, double lr,
                        double beta1, double weight_decay, bool maximize, int64_t block_size, int64_t sr_seed,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().is_cpu(), "fastopt::adam_mini_step_ (CPU kernel): params are on ",
              params[0].device());
  check_adam_mini_step(params, grads, exp_avgs, exp_avg_scales, step_sizes, segment_lengths, master_params, lr_tensor,
                       block_size, grad_scale, found_inf, kMaxBlock, /*scalars_on_device=*/false);
  if (scalar_or(found_inf, 0.0) != 0.0) return;
  const double lr_value = scalar_or(lr_tensor, lr);
  const AdamMiniRule::Coef coef{float(beta1)};
  auto slots = make_slots<AdamMiniRule>(params, grads, master_params, {{exp_avgs, exp_avg_scales}}, lr_value,
                                        weight_decay, maximize, scalar_or(grad_scale, 1.0), sr_seed,
                                        [&](size_t) { return coef; });
  // make_slots skips empty tensors: match the segment inputs by position among the non-empty ones
  size_t k = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    slots[k].segment_values = step_sizes[i].data_ptr<float>();
    slots[k++].segment_length = segment_lengths[i];
  }
  dispatch(slots, params[0].scalar_type(), exp_avgs[0].scalar_type(), block_size,
           sr_seed >= 0 && params[0].scalar_type() == at::kBFloat16, /*cautious=*/false);
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_step_", &fastopt::adam_step_cpu);
  m.impl("lion_step_", &fastopt::lion_step_cpu);
  m.impl("mars_step_", &fastopt::mars_step_cpu);
  m.impl("sophia_step_", &fastopt::sophia_step_cpu);
  m.impl("adam_mini_step_", &fastopt::adam_mini_step_cpu);
}
