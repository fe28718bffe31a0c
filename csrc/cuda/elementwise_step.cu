// CUDA kernels of the element-wise steps fastopt::adam_step_, fastopt::lion_step_,
// fastopt::mars_step_, fastopt::sophia_step_ and fastopt::adam_mini_step_ (schemas:
// csrc/fastopt.cpp; math: fastopt/reference), multi-tensor-apply style.
//
// Engine: a by-value metadata struct lists up to kMaxSlots tensors (pointers, numel) and where each
// one's chunks of kChunk elements start in the launch's chunk numbering. The grid is as many CTAs
// as the GPU holds at once; CTA b updates chunks b, b + gridDim.x, ... (so no launch ends in a
// part-filled second wave), each in tiles of kTile elements, kVec contiguous elements per thread.
// The engine loads/stores params, master weights and optimizer state in every storage format
// (fp32 / bf16 / block-scaled e4m3fn) and applies
//   p = p·(1 − lr·wd) − u·c,  c = 1, or for cautious [u·g > 0] / max(mean over the tensor, 1e-3);
// the update u comes from a device functor per rule (AdamOp, LionOp, MarsOp, SophiaOp, AdamMiniOp),
// which also says which of its states it writes: the others (Sophia's Hessian) are read only, in
// every storage format, and never stored (neither codes nor scales). A rule with kSegmentScale
// (Adam-mini) also gets, per element i, value[i / L] of a per-tensor fp32 array that is constant
// over segments of L contiguous elements (Adam-mini's per-segment step sizes; read only, fp32
// whatever the state dtype); only its kernels carry the array in the slot table and look it up.
// The kernel runs in
// up to three passes over the same tensors (Pass), in stream order, none synchronising the host:
//   squares  rules with kNeedsNorm (MARS): adds each tensor's sum of direction(g)² into a
//            per-tensor fp64 sum with atomics; writes nothing else;
//   count    cautious: adds each tensor's number of u·g > 0 into a 64-bit counter with atomics;
//            writes nothing else;
//   update   reads the sums (the rule's per-tensor clip factor) and the counts, writes params,
//            master weights and the states the rule writes.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>
#include "common/step_checks.h"
#include "common/numerics.h"
#include "common/cuda_convert.h"

#if defined(__USE_FAST_MATH__)
#error "elementwise_step.cu needs IEEE division and sqrt: do not build it with --use_fast_math"
#endif

namespace fastopt {
namespace {

constexpr int kThreads = 512;                // threads per CTA
constexpr int kVec = 8;                      // contiguous elements per thread per tile
constexpr int kTile = kThreads * kVec;       // 4096: the largest supported fp8 block_size
constexpr int kChunk = 4 * kTile;            // a CTA's unit of work; a multiple of every block_size
constexpr int kMaxSlots = 20;                // tensors per launch
constexpr int kMaxStates = 4;                // optimizer states per tensor (MARS)
using fp8_t = uint8_t;                       // float8_e4m3fn codes, accessed as bytes

// ---------------------------------------------------------------------------------------------
// Engine: metadata, storage conversions, vectorised access.

// Rules with kSegmentScale: the tensor's per-segment fp32 values and segment length (a divisor of
// numel). An empty base for the other rules, so that their slot table keeps its layout and size.
template <bool kSegments>
struct SlotSegments {};
template <>
struct SlotSegments<true> {
  const float* seg_values;  // numel / seg_len values, read only
  int64_t seg_len;          // >= 1
};

template <typename P, typename S, int K, bool kSegments>
struct Slot : SlotSegments<kSegments> {
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

template <typename P, typename S, int K, bool kSegments>
struct Meta {
  Slot<P, S, K, kSegments> slot[kMaxSlots];
  int64_t chunk_end[kMaxSlots];  // slot s holds the launch's chunks chunk_end[s - 1] .. chunk_end[s] - 1
  int32_t slots;                 // slots in use, >= 1
};

// The passes of the kernel (see the top of the file), in launch order.
enum class Pass {
  kSquares,  // rules with a norm: per-tensor sum of direction(g)² into Common::sums; writes nothing else
  kCount,    // cautious: per-tensor count of u·g > 0 into Common::counts; writes nothing else
  kUpdate,   // params, master weights and state
};

struct Common {
  const float* grad_scale;  // nullptr: none
  const float* found_inf;   // nullptr: none
  unsigned long long* counts;  // cautious: per-tensor count of u·g > 0 (by op list index); nullptr: not cautious
  double* sums;             // rules with kNeedsNorm: per-tensor sum of squares (by op list index); else nullptr
  bool maximize;
  int64_t sr_seed;
  int group;                // fp8: threads per quantisation block (block_size / kVec)
  int bs_shift;             // fp8: log2(block_size)
  bool sr;                  // stochastic rounding of bf16 params
};

template <typename T>
struct alignas(kVec * sizeof(T) < 16 ? kVec * sizeof(T) : 16) Pack { T v[kVec]; };  // one vector access

// A Pack as machine words (16 bytes; fp8's 8-byte Pack: one 8-byte word). Vector loads and stores
// go through these words, stores with __stwb (inline assembly, which the compiler cannot split): a
// Pack assigned as a struct was compiled into one store per element (sm_90 SASS), four (fp32) to
// eight (bf16) times the store instructions.
template <typename T>
union PackWords {
  using Word = std::conditional_t<sizeof(Pack<T>) % 16 == 0, uint4, uint2>;
  static constexpr int kWords = sizeof(Pack<T>) / sizeof(Word);
  Pack<T> pack;
  Word word[kWords];
};

// Raw elements p[i .. i+kVec-1]; those at or beyond n read as zero.
template <typename T>
__device__ __forceinline__ Pack<T> load_vec(const T* p, int64_t i, int64_t n, bool vec) {
  if (vec && i + kVec <= n) {
    using W = PackWords<T>;
    W u;
#pragma unroll
    for (int w = 0; w < W::kWords; ++w) u.word[w] = reinterpret_cast<const typename W::Word*>(p + i)[w];
    return u.pack;
  }
  Pack<T> pk;
#pragma unroll
  for (int j = 0; j < kVec; ++j) pk.v[j] = i + j < n ? p[i + j] : T{};
  return pk;
}

// Two e4m3fn codes (the first in the low byte) -> fp32. sm_89 and later convert in hardware (to
// f16, exactly); elsewhere the software codec of numerics.h, which defines the bytes everywhere.
__device__ __forceinline__ float2 decode_e4m3x2(uint16_t codes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t halves;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"(codes));
  return make_float2(__half2float(__ushort_as_half(uint16_t(halves))),
                     __half2float(__ushort_as_half(uint16_t(halves >> 16))));
#else
  return make_float2(decode_e4m3(uint8_t(codes)), decode_e4m3(uint8_t(codes >> 8)));
#endif
}

// One thread's kVec stored values as fp32: fp8 decode(code) * scale, squared where the state is
// stored as its square root; bf16 and fp32 widened.
template <typename Op, typename S>
__device__ __forceinline__ void decode_state(const Pack<S>& raw, float scale, int k, float (&out)[kVec]) {
  if constexpr (std::is_same_v<S, fp8_t>) {
#pragma unroll
    for (int j = 0; j < kVec; j += 2) {
      const float2 y = decode_e4m3x2(uint16_t(raw.v[j] | (raw.v[j + 1] << 8)));
      out[j] = y.x * scale;
      out[j + 1] = y.y * scale;
    }
    if (Op::sqrt_stored(k))
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] *= out[j];
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = to_f(raw.v[j]);
  }
}

// e4m3fn codes of x[j] * inv, one quantisation block's values (|x| <= absmax, inv = 448 / absmax,
// or 0 where absmax is 0 or not finite). sm_89 and later encode pairs in hardware (round to nearest
// even, saturating at 448: the software codec's bytes for every finite input); a block with an
// infinite or NaN absmax, whose products include NaN, takes the software codec on every device, so
// that its NaN codes (0x7F with the NaN's sign) are the same bytes everywhere.
__device__ __forceinline__ Pack<fp8_t> encode_e4m3_pack(const float (&x)[kVec], float inv, bool finite_absmax) {
  union { Pack<fp8_t> pack; uint16_t pair[kVec / 2]; } u;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if (finite_absmax) {
#pragma unroll
    for (int j = 0; j < kVec; j += 2)
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(u.pair[j / 2]) : "f"(x[j + 1] * inv), "f"(x[j] * inv));
    return u.pack;
  }
#endif
#pragma unroll
  for (int j = 0; j < kVec; ++j) u.pack.v[j] = encode_e4m3(x[j] * inv);
  return u.pack;
}

// p[i .. i+kVec-1] = pk, the elements below n.
template <typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, int64_t n, bool vec, const Pack<T>& pk) {
  if (vec && i + kVec <= n) {
    using W = PackWords<T>;
    W u;
    u.pack = pk;
#pragma unroll
    for (int w = 0; w < W::kWords; ++w) __stwb(reinterpret_cast<typename W::Word*>(p + i) + w, u.word[w]);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (i + j < n) p[i + j] = pk.v[j];
  }
}

// p[i + j] = make(j) for the elements below n.
template <typename T, typename Make>
__device__ __forceinline__ void store_vec(T* p, int64_t i, int64_t n, bool vec, Make make) {
  Pack<T> pk;
#pragma unroll
  for (int j = 0; j < kVec; ++j) pk.v[j] = make(j);
  store_pack(p, i, n, vec, pk);
}

// Max of a[k] over each group of `group` consecutive threads (group: power of two, 1..kThreads),
// for the k in kMask (the others are left as they are). The values are the bits of |x|: integer
// order is float order, and a NaN wins, so a block with a NaN gets a NaN scale and reads back as
// NaN, as in the reference and the other backends.
template <int K, unsigned kMask>
__device__ __forceinline__ void group_max(uint32_t (&a)[K], int group, uint32_t (*red)[kThreads / 32]) {
  const int lanes = group < 32 ? group : 32;
  for (int off = lanes >> 1; off > 0; off >>= 1)
#pragma unroll
    for (int k = 0; k < K; ++k)
      if ((kMask >> k) & 1u) a[k] = max(a[k], __shfl_xor_sync(0xffffffffu, a[k], off));
  if (group > 32) {  // uniform across the CTA
    const int warp = threadIdx.x >> 5, wpg = group >> 5, w0 = warp - warp % wpg;
    __syncthreads();  // previous tile's readers of red are done
    if ((threadIdx.x & 31) == 0)
#pragma unroll
      for (int k = 0; k < K; ++k)
        if ((kMask >> k) & 1u) red[k][warp] = a[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (!((kMask >> k) & 1u)) continue;
      uint32_t m = red[k][w0];
      for (int w = 1; w < wpg; ++w) m = max(m, red[k][w0 + w]);
      a[k] = m;
    }
  }
}

// The clip factor of a rule with a norm: 1/‖x‖ if ‖x‖ > 1 else 1 (a NaN norm gives 1), with
// ‖x‖ = sqrt of the sum of squares rounded to fp32, as torch.linalg.vector_norm in fp32.
__device__ __forceinline__ float clip_factor(double sum_sq) {
  const float norm = sqrtf(float(sum_sq));
  return norm > 1.f ? __fdiv_rn(1.f, norm) : 1.f;
}

// Whether pass kPass loads state k: the squares pass only the states that the rule's direction() reads.
template <typename Op, Pass kPass>
__device__ __forceinline__ constexpr bool pass_reads_state(int k) {
  if constexpr (kPass == Pass::kSquares) return Op::direction_reads(k);
  else return true;
}

// The states the update pass stores, bit k for state k (Op::writes(k)).
template <typename Op>
__host__ __device__ constexpr unsigned written_mask() {
  unsigned mask = 0u;
  for (int k = 0; k < Op::kStates; ++k) mask |= Op::writes(k) ? 1u << k : 0u;
  return mask;
}

// A tensor's constants for one pass: the rule's (AdamOp: three fp64 pow), with the clip factor of
// a rule with a norm (the squares pass, which computes the sums, needs none).
template <typename Op, Pass kPass, typename T>
__device__ typename Op::Consts tensor_consts(const Op& op, const T& slot, const Common& c) {
  const float t = slot.step != nullptr ? *slot.step : 0.f;
  if constexpr (Op::kNeedsNorm) return op.prepare(t, kPass == Pass::kSquares ? 1.f : clip_factor(c.sums[slot.index]));
  else return op.prepare(t);
}

// One pass over elements chunk0 .. chunk0 + kChunk - 1 of tensor T (those below its numel), by the
// whole CTA. The count and squares passes add the chunk's totals into the per-tensor sums.
template <typename P, typename S, typename Op, Pass kPass, typename Tensor>
__device__ __forceinline__ void step_chunk(const Tensor& T, int64_t chunk0, const typename Op::Consts& tc,
                                           const Op& op, const Common& c) {
  constexpr int K = Op::kStates;
  constexpr unsigned kWritten = written_mask<Op>();  // the states the update pass stores
  constexpr bool kFp8 = std::is_same_v<S, fp8_t>;
  const int64_t n = T.numel;
  const float gscale = c.grad_scale != nullptr ? *c.grad_scale : 1.f;
  const uint32_t sr_key = sr_tensor_key(c.sr_seed, T.index);
  float factor = 1.f;  // cautious: 1 / max(mean of the mask, 1e-3), as torch: mask.mean() in fp32
  if (kPass == Pass::kUpdate && c.counts != nullptr) {
    const float mean = __fdiv_rn(float(c.counts[T.index]), float(n));
    factor = __fdiv_rn(1.f, fmaxf(mean, 1e-3f));
  }
  uint32_t agree = 0;            // count pass: at most kChunk / kThreads per thread, 32× that per warp
  double sum_sq = 0.0;           // squares pass
  __shared__ uint32_t red[K][kThreads / 32];

  // Tile loop bounds are uniform across the CTA (group_max may __syncthreads).
  for (int64_t t0 = chunk0; t0 < n && t0 < chunk0 + kChunk; t0 += kTile) {
    const int64_t i = t0 + int64_t(threadIdx.x) * kVec;  // this thread: elements i .. i+kVec-1
    float p[kVec], s[K][kVec];
    const Pack<P> g = load_vec(T.grad, i, n, T.vec);
    if constexpr (kPass == Pass::kUpdate) {
      if (T.master != nullptr) {
        const Pack<float> pm = load_vec(T.master, i, n, T.vec);
        for (int j = 0; j < kVec; ++j) p[j] = pm.v[j];
      } else {
        const Pack<P> pp = load_vec(T.param, i, n, T.vec);
        for (int j = 0; j < kVec; ++j) p[j] = to_f(pp.v[j]);
      }
    }
    // kSegmentScale: element i + j lies in segment seg + (number of boundaries crossed), seg_off
    // being element i's offset in its segment. One division per thread and tile (nvcc's 64-bit
    // division takes a 32-bit path when both operands fit), then the segment advances at each
    // boundary, and its value is loaded once per segment (L = 1: once per element); elements at or
    // beyond n get 0.
    [[maybe_unused]] int64_t seg = 0, seg_off = 0;
    [[maybe_unused]] float seg_value = 0.f;
    if constexpr (Op::kSegmentScale) {
      seg = i / T.seg_len;
      seg_off = i - seg * T.seg_len;
      if (i < n) seg_value = __ldg(T.seg_values + seg);
    }
    // Absent (or, in the squares pass, unread) states read as zero and are not decoded.
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (pass_reads_state<Op, kPass>(k) && T.state[k] != nullptr) {
        const float sc = kFp8 && i < n ? T.scale[k][i >> c.bs_shift] : 0.f;
        decode_state<Op>(load_vec(T.state[k], i, n, T.vec), sc, k, s[k]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) s[k][j] = 0.f;
      }
    }

#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float st[K];
#pragma unroll
      for (int k = 0; k < K; ++k) st[k] = s[k][j];
      float gj = c.grad_scale != nullptr ? to_f(g.v[j]) / gscale : to_f(g.v[j]);
      if (c.maximize) gj = -gj;
      if constexpr (kPass == Pass::kSquares) {
        const float x = op.direction(tc, gj, st);
        if (i + j < n) sum_sq += double(x * x);  // x² rounded to fp32 as in the reference, summed in fp64
      } else {
        float u;
        if constexpr (Op::kSegmentScale) {
          u = op(tc, gj, st, seg_value);
          if (j + 1 < kVec && ++seg_off == T.seg_len) {  // element i + j + 1 starts segment seg + 1
            seg_off = 0;
            ++seg;
            seg_value = i + j + 1 < n ? __ldg(T.seg_values + seg) : 0.f;
          }
        } else {
          u = op(tc, gj, st);
        }
        const bool agrees = u * gj > 0.f && i + j < n;  // the raw gradient, whatever the rule's direction
        if constexpr (kPass == Pass::kCount) {
          agree += agrees;
        } else {
          if (c.counts != nullptr) u = agrees ? u * factor : 0.f;
          p[j] = p[j] * tc.decay - u;
        }
#pragma unroll
        for (int k = 0; k < K; ++k) s[k][j] = st[k];
      }
    }
    if constexpr (kPass == Pass::kUpdate) {
      if (T.master != nullptr) store_vec(T.master, i, n, T.vec, [&](int j) { return p[j]; });
      store_vec(T.param, i, n, T.vec, [&](int j) {
        if constexpr (std::is_same_v<P, __nv_bfloat16>) {
          if (c.sr) return __ushort_as_bfloat16(bf16_stochastic_round(p[j], sr_key, uint64_t(i + j)));
        }
        return from_f<P>(p[j]);
      });

      if constexpr (kFp8) {
        // Per quantisation block of each written state: absmax -> scale = absmax/448,
        // code = encode(x * 448/absmax). A read-only or absent state gets no absmax, codes or scale; the
        // reduction (and its __syncthreads) runs over the written states whatever the tensor.
        uint32_t amax[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          amax[k] = 0u;
          if (!Op::writes(k) || T.state[k] == nullptr) continue;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            if (Op::sqrt_stored(k)) s[k][j] = sqrtf(s[k][j]);
            if (i + j < n) amax[k] = max(amax[k], __float_as_uint(fabsf(s[k][j])));
          }
        }
        group_max<K, kWritten>(amax, c.group, red);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (!Op::writes(k) || T.state[k] == nullptr) continue;
          const float absmax = __uint_as_float(amax[k]);
          const float inv = absmax > 0.f ? __fdiv_rn(kE4M3Max, absmax) : 0.f;
          store_pack(T.state[k], i, n, T.vec, encode_e4m3_pack(s[k], inv, absmax <= FLT_MAX));
          if (threadIdx.x % c.group == 0 && i < n) T.scale[k][i >> c.bs_shift] = __fdiv_rn(absmax, kE4M3Max);
        }
      } else {
#pragma unroll
        for (int k = 0; k < K; ++k)
          if (Op::writes(k) && T.state[k] != nullptr)
            store_vec(T.state[k], i, n, T.vec, [&](int j) { return from_f<S>(s[k][j]); });
      }
    }
  }
  if constexpr (kPass == Pass::kCount) {
    for (int off = 16; off > 0; off >>= 1) agree += __shfl_xor_sync(0xffffffffu, agree, off);
    if ((threadIdx.x & 31) == 0 && agree != 0) atomicAdd(c.counts + T.index, static_cast<unsigned long long>(agree));
  }
  if constexpr (kPass == Pass::kSquares) {
    // One atomic per chunk: a large tensor has thousands of chunks adding into one address.
    static_assert(kThreads % 32 == 0 && kThreads / 32 <= 32, "one warp reduces the warps' sums");
    __shared__ double warp_sums[kThreads / 32];
    for (int off = 16; off > 0; off >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, off);
    __syncthreads();  // the previous chunk's warp_sums are read
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum_sq;
    __syncthreads();  // reached by every thread: the only early exit (found_inf) is uniform
    if (threadIdx.x < 32) {
      double total = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
      for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
      if (threadIdx.x == 0 && total != 0.0) atomicAdd(c.sums + T.index, total);  // NaN != 0: NaN propagates
    }
  }
}

// Two CTAs per multiprocessor (at most 64 registers a thread) for the rules that fit them without
// spilling; MARS (four states) keeps one.
template <typename Op>
constexpr int kCtasPerSm = Op::kStates <= 3 ? 2 : 1;

// CTA b takes the launch's chunks b, b + gridDim.x, ...: consecutive chunks of a tensor go to
// different CTAs, and a CTA meets each tensor in chunk order (its slot only moves forward).
template <typename P, typename S, typename Op, Pass kPass>
__global__ void __launch_bounds__(kThreads, kCtasPerSm<Op>)
multi_tensor_kernel(const __grid_constant__ Meta<P, S, Op::kStates, Op::kSegmentScale> meta, const Op op,
                    const Common c) {
  static_assert(kPass != Pass::kSquares || Op::kNeedsNorm, "the squares pass is for rules with a norm");
  static_assert(!(Op::kSegmentScale && Op::kNeedsNorm), "direction() takes no segment value");
  static_assert(written_mask<Op>() != 0u, "a rule writes at least one state");
  if (c.found_inf != nullptr && *c.found_inf != 0.f) return;  // skipped step: write nothing (uniform per launch)
  // The tensor's constants, computed by one thread for the CTA: in every warp they would cost as
  // many instructions as a few elements' updates.
  __shared__ typename Op::Consts shared_consts;
  typename Op::Consts tc;
  int slot = -1;
  const int64_t chunks = meta.chunk_end[meta.slots - 1];
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    int next = slot < 0 ? 0 : slot;
    while (meta.chunk_end[next] <= chunk) ++next;
    if (next != slot) {  // uniform across the CTA
      slot = next;
      __syncthreads();  // every thread has read the previous tensor's constants
      if (threadIdx.x == 0) shared_consts = tensor_consts<Op, kPass>(op, meta.slot[slot], c);
      __syncthreads();
      tc = shared_consts;
    }
    const int64_t first = slot == 0 ? 0 : meta.chunk_end[slot - 1];
    step_chunk<P, S, Op, kPass>(meta.slot[slot], (chunk - first) * kChunk, tc, op, c);
  }
}

// ---------------------------------------------------------------------------------------------
// Functors: prepare(t) gives per-tensor constants (with decay = 1 - lr·wd), operator() advances
// the moments s[] from the gradient g and returns the update u. sqrt_stored(k): fp8 stores the
// square root of state k (second moments). writes(k): the update pass stores state k; a state it
// does not write is read only (what operator() leaves in its s[k] is dropped). kCautious: the rule
// has a cautious variant (the count pass is compiled for it). A rule with kNeedsNorm (MARS) also has
// direction(q, g, s), the per-element direction whose whole-tensor sum of squares the squares
// pass computes (reading only the states k with direction_reads(k)), and prepare(t, clip)
// instead of prepare(t), clip being that tensor's clip_factor of the sum. A rule with
// kSegmentScale (Adam-mini) has operator()(q, g, s, value) instead, value being the element's
// segment value (Slot::seg_values[i / seg_len]).

// AdamW, and NAdamW (nesterov). States: 0 = exp_avg (m), 1 = exp_avg_sq (v), 2 = max_exp_avg_sq
// (vmax, amsgrad only).
struct AdamOp {
  static constexpr int kStates = 3;
  static constexpr bool kNeedsNorm = false;
  static constexpr bool kCautious = true;
  static constexpr bool kSegmentScale = false;
  __host__ __device__ static constexpr bool sqrt_stored(int k) { return k >= 1; }  // fp8 stores sqrt(v)
  __host__ __device__ static constexpr bool writes(int) { return true; }

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
  static constexpr bool kNeedsNorm = false;
  static constexpr bool kCautious = true;
  static constexpr bool kSegmentScale = false;
  __host__ __device__ static constexpr bool sqrt_stored(int) { return false; }
  __host__ __device__ static constexpr bool writes(int) { return true; }

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

// MARS-AdamW: AdamW (AdamOp, not nesterov) on the clipped variance-reduced gradient
//   c = g + k·(g − g_prev),  k = gamma·beta1/(1 − beta1);  c ← c·clip;  g_prev ← g.
// States: 0 = exp_avg (m), 1 = exp_avg_sq (v), 2 = max_exp_avg_sq (vmax, amsgrad only),
// 3 = last_grads (g_prev; signed, not stored as a square root).
struct MarsOp {
  static constexpr int kStates = 4;
  static constexpr bool kNeedsNorm = true;
  static constexpr bool kCautious = true;
  static constexpr bool kSegmentScale = false;
  __host__ __device__ static constexpr bool sqrt_stored(int k) { return k == 1 || k == 2; }
  __host__ __device__ static constexpr bool writes(int) { return true; }
  __host__ __device__ static constexpr bool direction_reads(int k) { return k == 3; }

  AdamOp adam;       // nesterov = false
  float correction;  // k, computed in double on the host

  struct Consts : AdamOp::Consts { float clip; };  // decay comes from AdamOp::Consts

  __device__ Consts prepare(float t, float clip) const { return {adam.prepare(t), clip}; }

  // c = g + k·(g − g_prev), before clipping; each operation rounded on its own (no contraction into
  // an fma), as the reference computes it, and so bit-identical in the squares, count and update passes.
  __device__ __forceinline__ float direction(const Consts&, float g, const float (&s)[kStates]) const {
    return __fadd_rn(g, __fmul_rn(correction, __fsub_rn(g, s[3])));
  }

  __device__ __forceinline__ float operator()(const Consts& q, float g, float (&s)[kStates]) const {
    const float c = __fmul_rn(direction(q, g, s), q.clip);
    float a[AdamOp::kStates] = {s[0], s[1], s[2]};
    const float u = adam(q, c, a);
    s[0] = a[0];
    s[1] = a[1];
    s[2] = a[2];
    s[3] = g;
    return u;
  }
};

// Sophia (SophiaG). States: 0 = exp_avg (m, written), 1 = hessian (h: the EMA of diagonal Hessian
// estimates, read only; signed, stored as is in fp8, not as a square root).
//   m = b1 m + (1-b1) g;  u = lr·sign(m)·min(|m| / (max(rho·bs·h, 0) + 1e-15), 1)
// Each operation rounded on its own in fp32 (no contraction into an fma), as the reference computes it.
struct SophiaOp {
  static constexpr int kStates = 2;
  static constexpr bool kNeedsNorm = false;
  static constexpr bool kCautious = false;  // the op has no cautious variant
  static constexpr bool kSegmentScale = false;
  __host__ __device__ static constexpr bool sqrt_stored(int) { return false; }
  __host__ __device__ static constexpr bool writes(int k) { return k == 0; }

  const float* lr_ptr;  // lr_tensor or nullptr
  float lr, beta1, one_minus_beta1, rho_bs, weight_decay;  // 1 - b1 and rho·bs computed in double on the host

  struct Consts { float lr, decay; };

  __device__ Consts prepare(float) const {
    const float l = lr_ptr != nullptr ? *lr_ptr : lr;
    return {l, 1.f - l * weight_decay};
  }

  // max(x, 0) and min(x, 1) keep a NaN (as torch.clamp, unlike fmaxf/fminf); sign(±0) = 0 and
  // sign(NaN) = NaN, as torch.sign.
  __device__ __forceinline__ float operator()(const Consts& q, float g, float (&s)[kStates]) const {
    const float m = __fadd_rn(__fmul_rn(beta1, s[0]), __fmul_rn(one_minus_beta1, g));
    s[0] = m;
    const float h = __fmul_rn(rho_bs, s[1]);
    const float denom = __fadd_rn(h < 0.f ? 0.f : h, 1e-15f);
    const float r = __fdiv_rn(fabsf(m), denom);
    const float ratio = r > 1.f ? 1.f : r;
    const float sgn = m > 0.f ? 1.f : (m < 0.f ? -1.f : (m == m ? 0.f : m));
    return __fmul_rn(q.lr * sgn, ratio);  // lr·sign(m) is exact
  }
};

// Adam-mini's element-wise half. State: 0 = exp_avg (m, written; signed, stored as is in fp8).
// The per-segment step size (lr/(1 − β1^k) / (√(v_s/(1 − β2^k)) + eps), computed by
// fastopt.AdamMini) is the segment value; lr only enters the weight decay.
//   m = b1 m + (1-b1) g;  u = m·step
// Each operation rounded on its own in fp32 (no contraction into an fma), as the reference computes it.
struct AdamMiniOp {
  static constexpr int kStates = 1;
  static constexpr bool kNeedsNorm = false;
  static constexpr bool kCautious = false;  // the op has no cautious variant
  static constexpr bool kSegmentScale = true;
  __host__ __device__ static constexpr bool sqrt_stored(int) { return false; }
  __host__ __device__ static constexpr bool writes(int) { return true; }

  const float* lr_ptr;  // lr_tensor or nullptr
  float lr, beta1, one_minus_beta1, weight_decay;  // 1 - b1 computed in double on the host

  struct Consts { float lr, decay; };

  __device__ Consts prepare(float) const {
    const float l = lr_ptr != nullptr ? *lr_ptr : lr;
    return {l, 1.f - l * weight_decay};
  }

  __device__ __forceinline__ float operator()(const Consts&, float g, float (&s)[kStates], float step) const {
    const float m = __fadd_rn(__fmul_rn(beta1, s[0]), __fmul_rn(one_minus_beta1, g));
    s[0] = m;
    return __fmul_rn(m, step);
  }
};

// ---------------------------------------------------------------------------------------------
// Host: pack tensors into launches of at most kMaxSlots tensors, each launch on as many CTAs as
// the GPU holds at once (or fewer, with fewer chunks).

struct Lists {
  at::TensorList params, grads, masters, steps;
  at::TensorList states[kMaxStates], scales[kMaxStates];  // a rule's kStates first, the rest empty
  at::TensorList segment_values = {};                     // kSegmentScale rules: fp32, numel / length each
  at::IntArrayRef segment_lengths = {};                   // kSegmentScale rules
};

// CTAs of a kernel resident on the current device at once (its multiprocessors times the kernel's
// occupancy), cached per kernel and device.
template <typename P, typename S, typename Op, Pass kPass>
int resident_ctas() {
  static int cached[C10_COMPILE_TIME_MAX_GPUS] = {};  // 0: not yet asked
  int& ctas = cached[c10::cuda::current_device()];
  if (ctas == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, multi_tensor_kernel<P, S, Op, kPass>,
                                                                 kThreads, 0));
    ctas = std::max(per_sm, 1) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  }
  return ctas;
}

template <typename P, typename S, typename Op, Pass kPass>
void launch_all(const Lists& L, const Op& op, const Common& c) {
  constexpr int K = Op::kStates;
  static_assert(K <= kMaxStates, "Lists holds kMaxStates states");
  using M = Meta<P, S, K, Op::kSegmentScale>;
  static_assert(sizeof(M) + sizeof(Op) + sizeof(Common) <= 4000, "kernel parameters must fit in 4 KB");
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // == at::cuda::getCurrentCUDAStream()
  const int64_t grid_limit = resident_ctas<P, S, Op, kPass>();
  M meta{};
  int ns = 0;
  int64_t chunks = 0;
  auto launch = [&] {
    meta.slots = ns;
    multi_tensor_kernel<P, S, Op, kPass><<<int(std::min(chunks, grid_limit)), kThreads, 0, stream>>>(meta, op, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ns = 0;
    chunks = 0;
  };
  for (size_t t = 0; t < L.params.size(); ++t) {
    const int64_t numel = L.params[t].numel();
    if (numel == 0) continue;
    Slot<P, S, K, Op::kSegmentScale>& sl = meta.slot[ns];
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
    if constexpr (Op::kSegmentScale) {
      sl.seg_values = L.segment_values[t].data_ptr<float>();
      sl.seg_len = L.segment_lengths[t];
    }
    sl.numel = numel;
    sl.index = int32_t(t);
    chunks += (numel + kChunk - 1) / kChunk;
    meta.chunk_end[ns++] = chunks;
    if (ns == kMaxSlots) launch();
  }
  if (ns > 0) launch();
}

// The squares pass (rules with a norm), the counting pass (cautious), then the update pass, in
// stream order: each pass sees the previous one's sums complete.
template <typename P, typename S, typename Op>
void launch_passes(const Lists& L, const Op& op, const Common& c) {
  if constexpr (Op::kNeedsNorm) launch_all<P, S, Op, Pass::kSquares>(L, op, c);
  if constexpr (Op::kCautious) {
    if (c.counts != nullptr) launch_all<P, S, Op, Pass::kCount>(L, op, c);
  }
  launch_all<P, S, Op, Pass::kUpdate>(L, op, c);
}

template <typename Op>
void dispatch(const Lists& L, const Op& op, Common c, bool cautious, int64_t block_size) {
  const at::ScalarType pdt = L.params[0].scalar_type(), sdt = L.states[0][0].scalar_type();
  const bool fp8 = sdt == at::kFloat8_e4m3fn;
  const c10::cuda::CUDAGuard guard(L.params[0].device());
  TORCH_INTERNAL_ASSERT(Op::kCautious || !cautious, "fastopt: this rule has no cautious variant");
  at::Tensor counts;
  if (cautious) {
    counts = at::zeros({int64_t(L.params.size())}, L.params[0].options().dtype(at::kLong));
    c.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  }
  // fp64 sums: thousands of CTAs add into one tensor's sum in an arbitrary order; in fp64 the
  // rounding error of that order stays far below fp32's, so the fp32 norm is accurate and (but
  // for a sum within ~1e-9 of an fp32 rounding tie) the same from run to run.
  at::Tensor sums;
  if constexpr (Op::kNeedsNorm) {
    sums = at::zeros({int64_t(L.params.size())}, L.params[0].options().dtype(at::kDouble));
    c.sums = sums.data_ptr<double>();
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
  check_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                  max_exp_avg_sq_scales, master_params, state_steps, lr_tensor, block_size, grad_scale, found_inf,
                  kTile, /*scalars_on_device=*/true);
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
  check_lion_step(params, grads, exp_avgs, exp_avg_scales, master_params, lr_tensor, block_size, grad_scale,
                  found_inf, kTile, /*scalars_on_device=*/true);
  const float b1 = float(beta1), b2 = float(beta2);
  const LionOp op{data_or_null(lr_tensor), float(lr), b1, b2, 1.f - b1, 1.f - b2, float(weight_decay)};
  const Lists L{params, grads, master_params, {}, {exp_avgs, {}, {}}, {exp_avg_scales, {}, {}}};
  dispatch(L, op, common_args(grad_scale, found_inf, maximize, sr_seed), cautious, block_size);
}

void mars_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList last_grads, at::TensorList exp_avg_scales,
                    at::TensorList exp_avg_sq_scales, at::TensorList max_exp_avg_sq_scales,
                    at::TensorList last_grad_scales, at::TensorList master_params, at::TensorList state_steps,
                    const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2, double eps,
                    double weight_decay, double gamma, bool maximize, bool cautious, int64_t block_size,
                    int64_t sr_seed, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "fastopt::mars_step_ (CUDA kernel): params are on ", dev);
  check_mars_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, exp_avg_scales,
                  exp_avg_sq_scales, max_exp_avg_sq_scales, last_grad_scales, master_params, state_steps, lr_tensor,
                  block_size, grad_scale, found_inf, kTile, /*scalars_on_device=*/true);
  const float b1 = float(beta1), b2 = float(beta2);
  const AdamOp adam{data_or_null(lr_tensor), float(lr), b1, b2, 1.f - b1, 1.f - b2, float(eps), float(weight_decay),
                    /*nesterov=*/false, !max_exp_avg_sqs.empty()};
  const MarsOp op{adam, float(gamma * beta1 / (1.0 - beta1))};
  const Lists L{params, grads, master_params, state_steps, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads},
                {exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales, last_grad_scales}};
  dispatch(L, op, common_args(grad_scale, found_inf, maximize, sr_seed), cautious, block_size);
}

void sophia_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                      at::TensorList exp_avg_scales, at::TensorList hessian_scales, at::TensorList master_params,
                      const std::optional<at::Tensor>& lr_tensor, double lr, double beta1, double rho, double bs,
                      double weight_decay, bool maximize, int64_t block_size, int64_t sr_seed,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "fastopt::sophia_step_ (CUDA kernel): params are on ", dev);
  check_sophia_step(params, grads, exp_avgs, hessians, exp_avg_scales, hessian_scales, master_params, lr_tensor,
                    block_size, grad_scale, found_inf, kTile, /*scalars_on_device=*/true);
  const SophiaOp op{data_or_null(lr_tensor), float(lr), float(beta1), float(1.0 - beta1), float(rho * bs),
                    float(weight_decay)};
  const Lists L{params, grads, master_params, {}, {exp_avgs, hessians, {}}, {exp_avg_scales, hessian_scales, {}}};
  dispatch(L, op, common_args(grad_scale, found_inf, maximize, sr_seed), /*cautious=*/false, block_size);
}

void adam_mini_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_scales, at::TensorList step_sizes, at::IntArrayRef segment_lengths,
                         at::TensorList master_params, const std::optional<at::Tensor>& lr_tensor, double lr,
                         double beta1, double weight_decay, bool maximize, int64_t block_size, int64_t sr_seed,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "fastopt::adam_mini_step_ (CUDA kernel): params are on ", dev);
  check_adam_mini_step(params, grads, exp_avgs, exp_avg_scales, step_sizes, segment_lengths, master_params, lr_tensor,
                       block_size, grad_scale, found_inf, kTile, /*scalars_on_device=*/true);
  const AdamMiniOp op{data_or_null(lr_tensor), float(lr), float(beta1), float(1.0 - beta1), float(weight_decay)};
  const Lists L{params, grads, master_params, {}, {exp_avgs, {}, {}}, {exp_avg_scales, {}, {}}, step_sizes,
                segment_lengths};
  dispatch(L, op, common_args(grad_scale, found_inf, maximize, sr_seed), /*cautious=*/false, block_size);
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adam_step_", &fastopt::adam_step_cuda);
  m.impl("lion_step_", &fastopt::lion_step_cuda);
  m.impl("mars_step_", &fastopt::mars_step_cuda);
  m.impl("sophia_step_", &fastopt::sophia_step_cuda);
  m.impl("adam_mini_step_", &fastopt::adam_mini_step_cuda);
}
