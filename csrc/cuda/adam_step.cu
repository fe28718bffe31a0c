// CUDA kernel of fastopt::adam_step_ (contract: spec_adam.md), multi-tensor-apply style.
//
// Engine: a by-value metadata struct lists up to kMaxSlots tensors (pointers, numel) and a
// CTA -> (slot, chunk) map; one CTA updates one chunk of kChunk elements, in tiles of kTile
// elements, kVec contiguous elements per thread. The engine loads/stores params, master weights
// and optimizer state in every storage format (fp32 / bf16 / block-scaled e4m3fn); the math is a
// device functor (AdamOp) so other optimizers can reuse the engine with another functor.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>
#include "common/adam_checks.h"
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

template <typename P, typename S, typename Op>
__global__ void __launch_bounds__(kThreads)
multi_tensor_kernel(const __grid_constant__ Meta<P, S, Op::kStates> meta, const Op op, const Common c) {
  constexpr int K = Op::kStates;
  constexpr bool kFp8 = std::is_same_v<S, fp8_t>;
  if (c.found_inf != nullptr && *c.found_inf != 0.f) return;  // skipped step: write nothing

  const Slot<P, S, K>& T = meta.slot[meta.blk_slot[blockIdx.x]];
  const int64_t n = T.numel, chunk0 = int64_t(meta.blk_chunk[blockIdx.x]) * kChunk;
  const typename Op::Consts tc = op.prepare(*T.step);
  const float gscale = c.grad_scale != nullptr ? *c.grad_scale : 1.f;
  const uint32_t sr_key = sr_tensor_key(c.sr_seed, T.index);
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
      const float gj = c.grad_scale != nullptr ? to_f(g.v[j]) / gscale : to_f(g.v[j]);
      op(tc, gj, p[j], st);
#pragma unroll
      for (int k = 0; k < K; ++k) s[k][j] = st[k];
    }

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
}

// ---------------------------------------------------------------------------------------------
// Functor: AdamW, and NAdamW (nesterov). States: 0 = exp_avg (m), 1 = exp_avg_sq (v),
// 2 = max_exp_avg_sq (vmax, amsgrad only).

struct AdamOp {
  static constexpr int kStates = 3;
  __host__ __device__ static constexpr bool sqrt_stored(int k) { return k >= 1; }  // fp8 stores sqrt(v)

  const float* lr_ptr;  // lr_tensor or nullptr
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  bool nesterov, maximize, amsgrad;

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

  // p *= 1 - lr*wd;  m += (1-b1)(g-m);  v = b2 v + (1-b2) g^2;  vmax = max(vmax, v);
  // denom = sqrt(v or vmax)/sqrt(bc2) + eps;  AdamW:  p -= (lr/bc1) m / denom;
  // NAdamW: p -= lr (b1 m / (1 - b1^(t+1)) + (1-b1) g / bc1) / denom.
  __device__ __forceinline__ void operator()(const Consts& q, float g, float& p, float (&s)[kStates]) const {
    if (maximize) g = -g;
    p = p * q.decay;
    const float m = s[0] + one_minus_beta1 * (g - s[0]);
    const float v = beta2 * s[1] + one_minus_beta2 * g * g;
    float vv = v;
    if (amsgrad) vv = s[2] = fmaxf(s[2], v);
    const float denom = sqrtf(vv) / q.sqrt_bc2 + eps;
    if (nesterov) {
      const float mhat = beta1 * m / q.bc1_next + one_minus_beta1 * g / q.bc1;
      p = p - q.lr * mhat / denom;
    } else {
      p = p - q.step_size * m / denom;
    }
    s[0] = m;
    s[1] = v;
  }
};

// ---------------------------------------------------------------------------------------------
// Host: pack tensors into launches of at most kMaxSlots tensors / kMaxBlocks CTAs.

struct Lists {
  at::TensorList params, grads, masters, steps;
  at::TensorList states[AdamOp::kStates], scales[AdamOp::kStates];
};

template <typename P, typename S, typename Op>
void launch_all(const Lists& L, const Op& op, const Common& c) {
  constexpr int K = Op::kStates;
  using M = Meta<P, S, K>;
  static_assert(sizeof(M) + sizeof(Op) + sizeof(Common) <= 4000, "kernel parameters must fit in 4 KB");
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // == at::cuda::getCurrentCUDAStream()
  M meta{};
  int ns = 0, nb = 0;
  auto launch = [&] {
    multi_tensor_kernel<P, S, Op><<<nb, kThreads, 0, stream>>>(meta, op, c);
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
    sl.step = L.steps[t].data_ptr<float>();
    sl.numel = numel;
    sl.index = int32_t(t);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= INT32_MAX, "adam_step_: tensor ", t, " is too large");
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

template <typename P>
void dispatch_state(at::ScalarType sdt, const Lists& L, const AdamOp& op, const Common& c) {
  switch (sdt) {
    case at::kFloat: return launch_all<P, float>(L, op, c);
    case at::kBFloat16: return launch_all<P, __nv_bfloat16>(L, op, c);
    case at::kFloat8_e4m3fn: return launch_all<P, fp8_t>(L, op, c);
    default: TORCH_CHECK(false, "adam_step_: unsupported state dtype ", sdt);
  }
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                    at::TensorList max_exp_avg_sq_scales, at::TensorList master_params, at::TensorList state_steps,
                    const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool nesterov, bool maximize, int64_t block_size, int64_t sr_seed,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "fastopt::adam_step_ (CUDA kernel): params are on ", dev);
  check_adam_args({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                   max_exp_avg_sq_scales, master_params, state_steps, block_size},
                  dev, kTile, {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}},
                  /*scalars_on_device=*/true);
  const at::ScalarType pdt = params[0].scalar_type(), sdt = exp_avgs[0].scalar_type();
  const bool fp8 = sdt == at::kFloat8_e4m3fn, amsgrad = !max_exp_avg_sqs.empty();

  const c10::cuda::CUDAGuard guard(dev);
  const float b1 = float(beta1), b2 = float(beta2);
  const AdamOp op{lr_tensor.has_value() ? lr_tensor->data_ptr<float>() : nullptr, float(lr), b1, b2, 1.f - b1, 1.f - b2,
                  float(eps), float(weight_decay), nesterov, maximize, amsgrad};
  int bs_shift = 0;
  while (fp8 && (int64_t(1) << bs_shift) < block_size) ++bs_shift;
  const Common c{grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr,
                 found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr, sr_seed,
                 fp8 ? int(block_size / kVec) : 1, bs_shift, sr_seed >= 0 && pdt == at::kBFloat16};
  const Lists L{params, grads, master_params, state_steps, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                {exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales}};
  switch (pdt) {
    case at::kFloat: return dispatch_state<float>(sdt, L, op, c);
    case at::kBFloat16: return dispatch_state<__nv_bfloat16>(sdt, L, op, c);
    default: return dispatch_state<__half>(sdt, L, op, c);
  }
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) { m.impl("adam_step_", &fastopt::adam_step_cuda); }
