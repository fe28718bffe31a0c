// CUDA kernels of the element-wise steps fastopt::adam_step_ and fastopt::lion_step_
// (contract: spec_adam.md, csrc/fastopt.cpp), multi-tensor-apply style.
//
// Engine: a by-value metadata struct lists up to kMaxSlots tensors (pointers, numel) and a
// CTA -> (slot, chunk) map; one CTA updates one chunk of kChunk elements, in tiles of kTile
// elements, kVec contiguous elements per thread. The engine loads/stores params, master weights
// and optimizer state in every storage format (fp32 / bf16 / block-scaled e4m3fn) and applies
//   p = p·(1 − lr·wd) − u·c,  c = 1, or for cautious [u·g > 0] / max(mean over the tensor, 1e-3);
// the update u comes from a device functor per rule (AdamOp, LionOp). Cautious runs the kernel
// twice: a counting pass (nothing written) adds each tensor's number of u·g > 0 into a 64-bit
// counter with atomics, then the update pass reads it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>
#include "common/step_checks.h"
#include "common/numerics.h"

#if defined(__USE_FAST_MATH__)
#error "adam_step.cu needs IEEE division and sqrt: do not build it with --use_fast_math"
#endif

namespace fastopt {
namespace {

constexpr int kThreads = 512;                // threads per CTA
constexpr int kVec = 8;                      // contiguous elements per thread per tile
constexpr int kTile = kThreads * kVec;       // 4096: the largest supported fp8 block_size
constexpr int kChunk = 4 * kTile;            // elements per CTA; a multiple of every block_size
constexpr int kMaxSlots = 20;                // tensors per launch
constexpr int kMaxBlocks = 320;              // CTAs per launch
using fp8_t = uint8_t;                       // float8_e4m3fn codes, accessed as bytes

// ---------------------------------------------------------------------------------------------
// Engine: metadata, storage conversions, vectorised access.

template <typename P, typename S, int K>
struct Slot {
  P* param;
  const P* grad;
  float* master;           // nullptr: no fp32 master weights
  S* state[K];             // nullptr: state absent (e.g. max_exp_avg_sq without amsgrad)
  float* scale[K];         // fp8 only: one fp32 scale per block_size elements
  const float* step;       // 0-d step count, already incremented
  int64_t numel;
  int32_t index;           // position in the op's lists (stochastic-rounding stream)
  bool vec;                // all pointers 16-byte aligned: vector loads/stores allowed
};

template <typename P, typename S, int K>
struct Meta {
  Slot<P, S, K> slot[kMaxSlots];
  int32_t blk_chunk[kMaxBlocks];
  uint8_t blk_slot[kMaxBlocks];
};

struct Common {
  const float* grad_scale;  // nullptr: none
  const float* found_inf;   // nullptr: none
  unsigned long long* counts;  // cautious: per-tensor count of u·g > 0 (by op list index); nullptr: not cautious
  bool maximize;
  int64_t sr_seed;
  int group;                // fp8: threads per quantisation block (block_size / kVec)
  int bs_shift;             // fp8: log2(block_size)
  bool sr;                  // stochastic rounding of bf16 params
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x) {  // round to nearest even
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return x;
}

template <typename T>
struct alignas(kVec * sizeof(T) < 16 ? kVec * sizeof(T) : 16) Pack { T v[kVec]; };  // one vector access

// Raw elements p[i .. i+kVec-1]; those at or beyond n read as zero.
template <typename T>
__device__ __forceinline__ Pack<T> load_vec(const T* p, int64_t i, int64_t n, bool vec) {
  if (vec && i + kVec <= n) return *reinterpret_cast<const Pack<T>*>(p + i);
  Pack<T> pk;
#pragma unroll
  for (int j = 0; j < kVec; ++j) pk.v[j] = i + j < n ? p[i + j] : T{};
  return pk;
}

// Stored state -> fp32 value. fp8: decode(code) * scale, squared where the moment is stored as sqrt.
template <typename Op, typename S>
__device__ __forceinline__ float load_state(S x, float scale, int k) {
  if constexpr (std::is_same_v<S, fp8_t>) {
    const float y = decode_e4m3(x) * scale;
    return Op::sqrt_stored(k) ? y * y : y;
  } else {
    return to_f(x);
  }
}

// p[i + j] = make(j) for the elements below n.
template <typename T, typename Make>
__device__ __forceinline__ void store_vec(T* p, int64_t i, int64_t n, bool vec, Make make) {
  if (vec && i + kVec <= n) {
    Pack<T> pk;
#pragma unroll
    for (int j = 0; j < kVec; ++j) pk.v[j] = make(j);
    *reinterpret_cast<Pack<T>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (i + j < n) p[i + j] = make(j);
  }
}

// Max of a[k] over each group of `group` consecutive threads (group: power of two, 1..kThreads).
// The values are the bits of |x|: integer order is float order, and a NaN wins, so a block with a
// NaN gets a NaN scale and reads back as NaN, as in the reference and the other backends.
template <int K>
__device__ __forceinline__ void group_max(uint32_t (&a)[K], int group, uint32_t (*red)[kThreads / 32]) {
  const int lanes = group < 32 ? group : 32;
  for (int off = lanes >> 1; off > 0; off >>= 1)
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] = max(a[k], __shfl_xor_sync(0xffffffffu, a[k], off));
  if (group > 32) {  // uniform across the CTA
    const int warp = threadIdx.x >> 5, wpg = group >> 5, w0 = warp - warp % wpg;
    __syncthreads();  // previous tile's readers of red are done
    if ((threadIdx.x & 31) == 0)
#pragma unroll
      for (int k = 0; k < K; ++k) red[k][warp] = a[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      uint32_t m = red[k][w0];
      for (int w = 1; w < wpg; ++w) m = max(m, red[k][w0 + w]);
      a[k] = m;
    }
  }
}

// kCount: the counting pass of cautious (writes nothing but c.counts).
template <typename P, typename S, typename Op, bool kCount>
__global__ void __launch_bounds__(kThreads)
multi_tensor_kernel(const __grid_constant__ Meta<P, S, Op::kStates> meta, const Op op, const Common c) {
  constexpr int K = Op::kStates;
  constexpr bool kFp8 = std::is_same_v<S, fp8_t>;
  if (c.found_inf != nullptr && *c.found_inf != 0.f) return;  // skipped step: write nothing

  const Slot<P, S, K>& T = meta.slot[meta.blk_slot[blockIdx.x]];
  const int64_t n = T.numel, chunk0 = int64_t(meta.blk_chunk[blockIdx.x]) * kChunk;
  const typename Op::Consts tc = op.prepare(T.step != nullptr ? *T.step : 0.f);
  const float gscale = c.grad_scale != nullptr ? *c.grad_scale : 1.f;
  const uint32_t sr_key = sr_tensor_key(c.sr_seed, T.index);
  float factor = 1.f;  // cautious: 1 / max(mean of the mask, 1e-3), as torch: mask.mean() in fp32
  if (!kCount && c.counts != nullptr) {
    const float mean = __fdiv_rn(float(c.counts[T.index]), float(n));
    factor = __fdiv_rn(1.f, fmaxf(mean, 1e-3f));
  }
  unsigned long long agree = 0;
  __shared__ uint32_t red[K][kThreads / 32];

  // Tile loop bounds are uniform across the CTA (group_max may __syncthreads).
  for (int64_t t0 = chunk0; t0 < n && t0 < chunk0 + kChunk; t0 += kTile) {
    const int64_t i = t0 + int64_t(threadIdx.x) * kVec;  // this thread: elements i .. i+kVec-1
    float p[kVec], s[K][kVec], sc[K];
    const Pack<P> g = load_vec(T.grad, i, n, T.vec);
    if (T.master != nullptr) {
      const Pack<float> pm = load_vec(T.master, i, n, T.vec);
      for (int j = 0; j < kVec; ++j) p[j] = pm.v[j];
    } else {
      const Pack<P> pp = load_vec(T.param, i, n, T.vec);
      for (int j = 0; j < kVec; ++j) p[j] = to_f(pp.v[j]);
    }
    Pack<S> raw[K];  // absent states read as zero
#pragma unroll
    for (int k = 0; k < K; ++k) {
      raw[k] = T.state[k] != nullptr ? load_vec(T.state[k], i, n, T.vec) : Pack<S>{};
      sc[k] = kFp8 && T.state[k] != nullptr && i < n ? T.scale[k][i >> c.bs_shift] : 0.f;
    }

#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float st[K];
#pragma unroll
      for (int k = 0; k < K; ++k) st[k] = load_state<Op>(raw[k].v[j], sc[k], k);
      float gj = c.grad_scale != nullptr ? to_f(g.v[j]) / gscale : to_f(g.v[j]);
      if (c.maximize) gj = -gj;
      float u = op(tc, gj, st);
      const bool agrees = u * gj > 0.f && i + j < n;
      if constexpr (kCount) {
        agree += agrees;
      } else {
        if (c.counts != nullptr) u = agrees ? u * factor : 0.f;
        p[j] = p[j] * tc.decay - u;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) s[k][j] = st[k];
    }
    if constexpr (kCount) continue;

    if (T.master != nullptr) store_vec(T.master, i, n, T.vec, [&](int j) { return p[j]; });
    store_vec(T.param, i, n, T.vec, [&](int j) {
      if constexpr (std::is_same_v<P, __nv_bfloat16>) {
        if (c.sr) return __ushort_as_bfloat16(bf16_stochastic_round(p[j], sr_key, uint64_t(i + j)));
      }
      return from_f<P>(p[j]);
    });

    if constexpr (kFp8) {
      // Per quantisation block: absmax -> scale = absmax/448, code = encode(x * 448/absmax).
      uint32_t amax[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        amax[k] = 0u;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (Op::sqrt_stored(k)) s[k][j] = sqrtf(s[k][j]);
          if (i + j < n) amax[k] = max(amax[k], __float_as_uint(fabsf(s[k][j])));
        }
      }
      group_max<K>(amax, c.group, red);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (T.state[k] == nullptr) continue;
        const float absmax = __uint_as_float(amax[k]);
        const float inv = absmax > 0.f ? __fdiv_rn(kE4M3Max, absmax) : 0.f;
        store_vec(T.state[k], i, n, T.vec, [&](int j) { return encode_e4m3(s[k][j] * inv); });
        if (threadIdx.x % c.group == 0 && i < n) T.scale[k][i >> c.bs_shift] = __fdiv_rn(absmax, kE4M3Max);
      }
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (T.state[k] != nullptr) store_vec(T.state[k], i, n, T.vec, [&](int j) { return from_f<S>(s[k][j]); });
    }
  }
  if constexpr (kCount) {
    for (int off = 16; off > 0; off >>= 1) agree += __shfl_xor_sync(0xffffffffu, agree, off);
    if ((threadIdx.x & 31) == 0 && agree != 0) atomicAdd(c.counts + T.index, agree);
  }
}

// ---------------------------------------------------------------------------------------------
// Functors: prepare(t) gives per-tensor constants (with decay = 1 - lr·wd), operator() advances
// the moments s[] from the gradient g and returns the update u.

// AdamW, and NAdamW (nesterov). States: 0 = exp_avg (m), 1 = exp_avg_sq (v), 2 = max_exp_avg_sq
// (vmax, amsgrad only).
struct AdamOp {
  static constexpr int kStates = 3;
  __host__ __device__ static constexpr bool sqrt_stored(int k) { return k >= 1; }  // fp8 stores sqrt(v)

  const float* lr_ptr;  // lr_tensor or nullptr
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  bool nesterov, amsgrad;

  struct Consts { float lr, decay, step_size, bc1, bc1_next, sqrt_bc2; };

  // Per tensor: bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t (pow in double, then cast).
  __device__ Consts prepare(float t) const {
    Consts q;
    q.lr = lr_ptr != nullptr ? *lr_ptr : lr;
    q.decay = 1.f - q.lr * weight_decay;
    const double b1 = beta1, b2 = beta2, td = t;
    q.bc1 = float(1.0 - pow(b1, td));
    q.bc1_next = float(1.0 - pow(b1, td + 1.0));
    q.sqrt_bc2 = sqrtf(float(1.0 - pow(b2, td)));
    q.step_size = q.lr / q.bc1;
    return q;
  }

  // m += (1-b1)(g-m);  v = b2 v + (1-b2) g^2;  vmax = max(vmax, v);
  // denom = sqrt(v or vmax)/sqrt(bc2) + eps;  AdamW:  u = (lr/bc1) m / denom;
  // NAdamW: u = lr (b1 m / (1 - b1^(t+1)) + (1-b1) g / bc1) / denom.
  __device__ __forceinline__ float operator()(const Consts& q, float g, float (&s)[kStates]) const {
    const float m = s[0] + one_minus_beta1 * (g - s[0]);
    const float v = beta2 * s[1] + one_minus_beta2 * g * g;
    float vv = v;
    if (amsgrad) vv = s[2] = fmaxf(s[2], v);
    const float denom = sqrtf(vv) / q.sqrt_bc2 + eps;
    s[0] = m;
    s[1] = v;
    if (nesterov) return q.lr * (beta1 * m / q.bc1_next + one_minus_beta1 * g / q.bc1) / denom;
    return q.step_size * m / denom;
  }
};

// Lion. State: 0 = exp_avg (m).  u = lr·sign(b1 m + (1-b1) g);  m = b2 m + (1-b2) g.
struct LionOp {
  static constexpr int kStates = 1;
  __host__ __device__ static constexpr bool sqrt_stored(int) { return false; }

  const float* lr_ptr;  // lr_tensor or nullptr
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay;

  struct Consts { float lr, decay; };

  __device__ Consts prepare(float) const {
    const float l = lr_ptr != nullptr ? *lr_ptr : lr;
    return {l, 1.f - l * weight_decay};
  }

  // sign(0) = 0 and sign(NaN) = NaN, as torch.sign
  __device__ __forceinline__ float operator()(const Consts& q, float g, float (&s)[kStates]) const {
    const float c = beta1 * s[0] + one_minus_beta1 * g;
    s[0] = beta2 * s[0] + one_minus_beta2 * g;
    return c > 0.f ? q.lr : (c < 0.f ? -q.lr : c * q.lr);
  }
};

// ---------------------------------------------------------------------------------------------
// Host: pack tensors into launches of at most kMaxSlots tensors / kMaxBlocks CTAs.

struct Lists {
  at::TensorList params, grads, masters, steps;
  at::TensorList states[AdamOp::kStates], scales[AdamOp::kStates];
};

template <typename P, typename S, typename Op, bool kCount>
void launch_all(const Lists& L, const Op& op, const Common& c) {
  constexpr int K = Op::kStates;
  using M = Meta<P, S, K>;
  static_assert(sizeof(M) + sizeof(Op) + sizeof(Common) <= 4000, "kernel parameters must fit in 4 KB");
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // == at::cuda::getCurrentCUDAStream()
  M meta{};
  int ns = 0, nb = 0;
  auto launch = [&] {
    multi_tensor_kernel<P, S, Op, kCount><<<nb, kThreads, 0, stream>>>(meta, op, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nb = 0;
  };
  for (size_t t = 0; t < L.params.size(); ++t) {
    const int64_t numel = L.params[t].numel();
    if (numel == 0) continue;
    Slot<P, S, K>& sl = meta.slot[ns];
    sl.param = static_cast<P*>(L.params[t].data_ptr());
    sl.grad = static_cast<const P*>(L.grads[t].data_ptr());
    sl.master = L.masters.empty() ? nullptr : L.masters[t].data_ptr<float>();
    sl.vec = aligned(sl.param) && aligned(sl.grad) && aligned(sl.master);
    for (int k = 0; k < K; ++k) {
      sl.state[k] = L.states[k].empty() ? nullptr : static_cast<S*>(L.states[k][t].data_ptr());
      sl.scale[k] = L.scales[k].empty() ? nullptr : L.scales[k][t].data_ptr<float>();
      sl.vec = sl.vec && aligned(sl.state[k]);
    }
    sl.step = L.steps.empty() ? nullptr : L.steps[t].data_ptr<float>();
    sl.numel = numel;
    sl.index = int32_t(t);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= INT32_MAX, "fastopt: tensor ", t, " is too large");
    for (int64_t ch = 0; ch < chunks; ++ch) {
      meta.blk_slot[nb] = uint8_t(ns);
      meta.blk_chunk[nb++] = int32_t(ch);
      const bool last = ch + 1 == chunks;
      if (nb == kMaxBlocks || (last && ns + 1 == kMaxSlots)) {
        launch();  // then: next tensor starts a fresh slot table, or the rest of this one goes on in slot 0
        if (last) ns = -1;
        else meta.slot[0] = meta.slot[ns], ns = 0;
      }
    }
    ++ns;
  }
  if (nb > 0) launch();
}

// Cautious: the counting pass, then the update pass; else the update pass alone.
template <typename P, typename S, typename Op>
void launch_passes(const Lists& L, const Op& op, const Common& c) {
  if (c.counts != nullptr) launch_all<P, S, Op, true>(L, op, c);
  launch_all<P, S, Op, false>(L, op, c);
}

template <typename Op>
void dispatch(const Lists& L, const Op& op, Common c, bool cautious, int64_t block_size) {
  const at::ScalarType pdt = L.params[0].scalar_type(), sdt = L.states[0][0].scalar_type();
  const bool fp8 = sdt == at::kFloat8_e4m3fn;
  const c10::cuda::CUDAGuard guard(L.params[0].device());
  at::Tensor counts;
  if (cautious) {
    counts = at::zeros({int64_t(L.params.size())}, L.params[0].options().dtype(at::kLong));
    c.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  }
  c.group = fp8 ? int(block_size / kVec) : 1;
  c.bs_shift = 0;
  while (fp8 && (int64_t(1) << c.bs_shift) < block_size) ++c.bs_shift;
  c.sr = c.sr_seed >= 0 && pdt == at::kBFloat16;
  auto with_param = [&](auto param_tag) {
    using P = decltype(param_tag);
    switch (sdt) {
      case at::kFloat: return launch_passes<P, float>(L, op, c);
      case at::kBFloat16: return launch_passes<P, __nv_bfloat16>(L, op, c);
      default: return launch_passes<P, fp8_t>(L, op, c);
    }
  };
  switch (pdt) {
    case at::kFloat: return with_param(float{});
    case at::kBFloat16: return with_param(__nv_bfloat16{});
    default: return with_param(__half{});
  }
}

Common common_args(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   bool maximize, int64_t sr_seed) {
  Common c{};
  c.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  c.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  c.maximize = maximize;
  c.sr_seed = sr_seed;
  return c;
}

const float* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                    at::TensorList max_exp_avg_sq_scales, at::TensorList master_params, at::TensorList state_steps,
                    const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool nesterov, bool maximize, bool cautious, int64_t block_size,
                    int64_t sr_seed, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "fastopt::adam_step_ (CUDA kernel): params are on ", dev);
  check_step_args({"fastopt::adam_step_", params, grads, master_params, state_steps, true,
                   {{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, false},
                    {"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_scales", exp_avg_sq_scales, false},
                    {"max_exp_avg_sqs", max_exp_avg_sqs, "max_exp_avg_sq_scales", max_exp_avg_sq_scales, true}},
                   block_size},
                  dev, kTile, {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  /*scalars_on_device=*/true);
  const float b1 = float(beta1), b2 = float(beta2);
  const AdamOp op{data_or_null(lr_tensor), float(lr), b1, b2, 1.f - b1, 1.f - b2, float(eps), float(weight_decay),
                  nesterov, !max_exp_avg_sqs.empty()};
  const Lists L{params, grads, master_params, state_steps, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                {exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales}};
  dispatch(L, op, common_args(grad_scale, found_inf, maximize, sr_seed), cautious, block_size);
}

void lion_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_scales, at::TensorList master_params,
                    const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                    double weight_decay, bool maximize, bool cautious, int64_t block_size, int64_t sr_seed,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "fastopt::lion_step_ (CUDA kernel): params are on ", dev);
  check_step_args({"fastopt::lion_step_", params, grads, master_params, {}, false,
                   {{"exp_avgs", exp_avgs, "exp_avg_scales", exp_avg_scales, false}}, block_size},
                  dev, kTile, {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  /*scalars_on_device=*/true);
  const float b1 = float(beta1), b2 = float(beta2);
  const LionOp op{data_or_null(lr_tensor), float(lr), b1, b2, 1.f - b1, 1.f - b2, float(weight_decay)};
  const Lists L{params, grads, master_params, {}, {exp_avgs, {}, {}}, {exp_avg_scales, {}, {}}};
  dispatch(L, op, common_args(grad_scale, found_inf, maximize, sr_seed), cautious, block_size);
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adam_step_", &fastopt::adam_step_cuda);
  m.impl("lion_step_", &fastopt::lion_step_cuda);
}
