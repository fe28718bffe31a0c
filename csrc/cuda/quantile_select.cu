// fastopt::quantile_clamp_ on CUDA (schema: csrc/fastopt.cpp; op: fastopt/ops/quantile_clamp.py,
// which computes the ranks and the weight): ROOT's quantile clamp by exact radix select. Per matrix b
// of a contiguous (B, m, n) input x, N = m·n elements, ranks k_lo <= k_hi <= k_lo + 1, k_hi < N:
//
//   key(v)  = the uint32 bits of |v| as fp32 (non-negative floats order like their bit patterns);
//             NaN -> 0xFFFFFFFF, above +inf
//   lo, hi  = the values of the k_lo-th and k_hi-th smallest keys (0-based)
//   t       = NaN if the matrix holds a NaN, else lerp(lo, hi, w) + offset          (fp32)
//             lerp = |w| < 0.5 ? fma(w, hi - lo, lo) : fma(w - 1, hi - lo, hi), each fma rounded
//             once: torch.lerp's formula (ATen/native/Lerp.h) as its fp32 kernels evaluate it
//   threshold[b] = t,   out[b] = min(max(x[b], -t), t) in fp32, NaN where t is NaN, stored in
//             out's dtype (fp32 / bf16 / fp16, round to nearest even)
//   norm[b] = ||out[b]||_F (float64, where norm is given) = t * sqrt(sum over the matrix of
//             (out / t)^2): every term is <= 1, so no overflow; 0 where t = 0, NaN where t is NaN
//             or infinite. Each clamp block stores its chunk's fp32 sum, and one block per matrix
//             adds them in a fixed order (the same norm every run on a given GPU).
//
// so that t is torch.quantile(|x|.float(), q, interpolation="linear") + offset bit for bit. The
// same algorithm as the Triton kernels (triton_kernels/select.py), with one change: the scan of each
// finished histogram is done once per matrix, by the last block to finish it, not by every block.
//
// Radix select: a key is cut into digits from the top, at most kDigitBits = 11 bits wide (fp32:
// 11 + 11 + 10; the keys of bf16 / fp16 input end in 16 / 13 zero bits: 11 + 5 and 11 + 8). Every
// launch covers all matrices: block i handles chunk i % chunks of matrix i / chunks. Launch p (one
// per digit) reads its chunk, histograms digit p of the keys whose higher digits equal the prefix
// found so far (per target: k_lo and k_hi; pass 1 histograms every key once for both), first in
// shared memory, then adds the non-zero bins into the matrix's global histogram with atomics. The
// block that finishes last for its matrix (a per-matrix atomic ticket after a fence) scans that
// histogram: the bin whose exclusive..inclusive prefix sum holds the rank extends the prefix by
// digit p, the rank minus the exclusive sum is the rank inside it. It stores (prefix, rank) for the
// next launch, re-zeroes the histogram and the ticket for it, and after pass 1 records whether the
// matrix holds a NaN (its top-digit bin 0x7FF). After the last digit the prefix is the key itself:
// that block computes t and stores threshold[b]. A final launch writes the clamp. P + 1 launches
// (P = 3 for fp32 input, 2 for bf16 / fp16) after one memset of the scratch; no host
// synchronisation. Counts are uint32 (N < 2^32), element offsets int64. Blocks of 256 threads; a
// chunk is 4096 elements, doubled (up to 65536) while the grid keeps >= 16 blocks per SM; 16-byte
// vector accesses where every matrix start is aligned (N a multiple of 16 / sizeof(element)).
//
// Scratch (int32, zeroed): hist [B][2 targets][kBins] | tickets [B] | state [B][kStateWords]
// (prefix_lo, rank_lo, prefix_hi, rank_hi, has_nan) | the clamp blocks' sums [B][chunks] (fp32).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common/cuda_convert.h"
#include <climits>
#include <cstdint>
#include <type_traits>

#if defined(__USE_FAST_MATH__)
#error "quantile_select.cu needs IEEE fma and rounding: do not build it with --use_fast_math"
#endif

namespace fastopt {
namespace {

constexpr int kThreads = 256;                       // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 11;                      // the widest digit
constexpr int kBins = 1 << kDigitBits;              // 2048 bins per histogram row
constexpr int kBinsPerThread = kBins / kThreads;    // 8 consecutive bins per thread in the scan
constexpr uint32_t kNanBin = kBins - 1;             // the top digit of the NaN key; finite and
                                                    // infinite keys have top digits <= 0x3FC
constexpr int kStateWords = 8;                      // per matrix: see the top of the file
constexpr int64_t kMinChunk = 4096;                 // elements per block (a multiple of kThreads * 8)
constexpr int64_t kMaxChunk = 65536;
constexpr int kWaveBlocks = 16;                     // grow the chunk while >= this many blocks per SM remain
static_assert(kBins % kThreads == 0, "the scan gives each thread whole bins");

// The digits of the keys of T input, from the top: digit p is (key >> shift(p)) & (2^bits(p) - 1).
template <typename T>
struct Digits;
template <>
struct Digits<float> {
  static constexpr int kPasses = 3;
  __host__ __device__ static constexpr int shift(int p) { return p == 0 ? 21 : p == 1 ? 10 : 0; }
};
template <>
struct Digits<__nv_bfloat16> {  // 8 exponent + 7 mantissa bits: bits 30..16 of the key (31: NaN only)
  static constexpr int kPasses = 2;
  __host__ __device__ static constexpr int shift(int p) { return p == 0 ? 21 : 16; }
};
template <>
struct Digits<__half> {  // 10 mantissa bits (subnormals become fp32 normals): bits 30..13 (31: NaN only)
  static constexpr int kPasses = 2;
  __host__ __device__ static constexpr int shift(int p) { return p == 0 ? 21 : 13; }
};
template <typename T>
__host__ __device__ constexpr int digit_bits(int p) {
  return (p == 0 ? 32 : Digits<T>::shift(p - 1)) - Digits<T>::shift(p);
}

__device__ __forceinline__ uint32_t key_of(float v) {
  return v != v ? 0xFFFFFFFFu : (__float_as_uint(v) & 0x7FFFFFFFu);
}

// kVec<T> elements = 16 bytes of input per vector access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));
template <typename T, int V>
struct alignas(sizeof(T) * V < 16 ? sizeof(T) * V : 16) Pack { T v[V]; };

// f(i, x[i] as fp32) for every i in [begin, end) that this thread owns, coalesced across the block.
// vec: x and begin are 16-byte aligned and end - begin is a multiple of kVec<T>.
template <typename T, typename F>
__device__ __forceinline__ void for_each_element(const T* x, int64_t begin, int64_t end, bool vec, F f) {
  constexpr int V = kVec<T>;
  if (vec) {
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end; i += int64_t{kThreads} * V) {
      const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(x + i);
#pragma unroll
      for (int j = 0; j < V; ++j) f(to_f(pk.v[j]));
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) f(to_f(x[i]));
  }
}

// The exclusive prefix sum of v over the block, in thread order. All threads call it; s_warp holds
// kWarps words and is free again when it returns.
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t v, uint32_t* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t inclusive = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t y = __shfl_up_sync(0xFFFFFFFFu, inclusive, d);
    if (lane >= d) inclusive += y;
  }
  if (lane == 31) s_warp[warp] = inclusive;
  __syncthreads();
  uint32_t before = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) before += w < warp ? s_warp[w] : 0u;
  __syncthreads();
  return before + inclusive - v;
}

// torch.lerp(lo, hi, w) in fp32, each fma rounded once (no contraction can change it).
__device__ __forceinline__ float lerp_like_torch(float lo, float hi, float w) {
  const float d = __fsub_rn(hi, lo);
  return fabsf(w) < 0.5f ? __fmaf_rn(w, d, lo) : __fmaf_rn(__fsub_rn(w, 1.0f), d, hi);
}

struct SelectArgs {
  uint32_t* hist;      // [B][2][kBins]
  uint32_t* tickets;   // [B]
  uint32_t* state;     // [B][kStateWords]
  float* threshold;    // [B]
  int64_t n;           // elements per matrix
  int64_t chunk;       // elements per block
  int64_t chunks;      // blocks per matrix
  uint32_t rank[2];    // k_lo, k_hi
  int targets;         // 2 if k_hi != k_lo, else 1
  bool vec;            // vector loads of x
  float weight, offset;
};

// Digit pass P (0-based) of the radix select, for one chunk of one matrix; the last block of each
// matrix scans the finished histogram (see the top of the file).
template <typename T, int P>
__global__ void __launch_bounds__(kThreads) radix_pass_kernel(const T* __restrict__ x, const SelectArgs a) {
  constexpr bool kFirst = P == 0, kLast = P == Digits<T>::kPasses - 1;
  constexpr int kShift = Digits<T>::shift(P), kBits = digit_bits<T>(P);
  constexpr int kPrevShift = kFirst ? 0 : Digits<T>::shift(P > 0 ? P - 1 : 0);
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  static_assert(Digits<T>::kPasses >= 2 && kBits <= kDigitBits, "digit schedule");

  __shared__ uint32_t s_hist[2][kBins];
  __shared__ uint32_t s_warp[kWarps];
  __shared__ uint32_t s_found[2][2];  // per target: bin, rank inside it
  __shared__ bool s_last;

  const int64_t b = blockIdx.x / a.chunks, c = blockIdx.x % a.chunks;
  const int rows = kFirst ? 1 : a.targets;  // pass 1 histograms every key once, for both targets
  uint32_t* const state = a.state + b * kStateWords;
  uint32_t* const hist = a.hist + b * 2 * kBins;

  for (int i = threadIdx.x; i < rows * kBins; i += kThreads) (&s_hist[0][0])[i] = 0u;
  uint32_t prefix[2] = {0u, 0u};  // key >> kPrevShift of each target
  if constexpr (!kFirst) {
    prefix[0] = state[0];
    prefix[1] = state[2];
  }
  __syncthreads();

  const int64_t begin = c * a.chunk, end = begin + a.chunk < a.n ? begin + a.chunk : a.n;
  const bool two = a.targets == 2;
  for_each_element(x + b * a.n, begin, end, a.vec, [&](float v) {
    const uint32_t key = key_of(v);
    if constexpr (kFirst) {
      atomicAdd(&s_hist[0][key >> kShift], 1u);
    } else {
      const uint32_t digit = (key >> kShift) & kMask, high = key >> kPrevShift;
      if (high == prefix[0]) atomicAdd(&s_hist[0][digit], 1u);
      if (two && high == prefix[1]) atomicAdd(&s_hist[1][digit], 1u);
    }
  });
  __syncthreads();
  for (int i = threadIdx.x; i < rows * kBins; i += kThreads) {
    const uint32_t v = (&s_hist[0][0])[i];
    if (v) atomicAdd(hist + i, v);
  }
  // Release this block's counts, then take a ticket: the block with the last one sees every count.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(a.tickets + b, 1u) == static_cast<uint32_t>(a.chunks - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  // The last block of matrix b: per target, the bin that holds its rank (thread threadIdx.x owns
  // bins [threadIdx.x * kBinsPerThread, +kBinsPerThread)); the rows are re-zeroed for the next pass.
  uint32_t rank[2] = {a.rank[0], a.rank[1]};
  if constexpr (!kFirst) {
    rank[0] = state[1];
    rank[1] = state[3];
  }
  uint32_t count[kBinsPerThread];
  uint32_t below = 0;
  const int first_bin = threadIdx.x * kBinsPerThread;
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    if (t == 1 && !two) break;
    if (t == 0 || !kFirst) {  // pass 1: both targets read row 0
      uint32_t* const row = hist + t * kBins + first_bin;
      uint32_t sum = 0;
#pragma unroll
      for (int j = 0; j < kBinsPerThread; ++j) {
        count[j] = __ldcg(row + j);
        sum += count[j];
        row[j] = 0u;
      }
      below = block_exclusive_sum(sum, s_warp);
      if (kFirst && threadIdx.x == kThreads - 1) state[4] = count[kBinsPerThread - 1] > 0u;  // kNanBin
    }
    uint32_t run = below;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (rank[t] >= run && rank[t] - run < count[j]) {  // exactly one bin of the row holds the rank
        s_found[t][0] = first_bin + j;
        s_found[t][1] = rank[t] - run;
      }
      run += count[j];
    }
  }
  static_assert((kBins - 1) / kBinsPerThread == kThreads - 1 && kNanBin % kBinsPerThread == kBinsPerThread - 1,
                "the NaN bin is the last bin of the last thread");
  __syncthreads();
  if (threadIdx.x != 0) return;
  a.tickets[b] = 0u;
  uint32_t found[2];
#pragma unroll
  for (int t = 0; t < 2; ++t) found[t] = (prefix[t] << kBits) | s_found[t][0];
  if constexpr (!kLast) {
    state[0] = found[0];
    state[1] = s_found[0][1];
    if (two) {
      state[2] = found[1];
      state[3] = s_found[1][1];
    }
  } else {
    const float lo = __uint_as_float(found[0] << kShift);
    const float hi = two ? __uint_as_float(found[1] << kShift) : lo;
    const bool has_nan = state[4] != 0u;
    a.threshold[b] = has_nan ? __int_as_float(0x7FC00000) : __fadd_rn(lerp_like_torch(lo, hi, a.weight), a.offset);
  }
}

// min(max(v, -t), t) with std::min / std::max's tie rules (as torch.clamp); NaN where t is NaN
// (a NaN in x makes its matrix's t NaN).
__device__ __forceinline__ float clamp_to(float v, float t) {
  if (t != t) return t;
  const float y = v < -t ? -t : v;
  return t < y ? t : y;
}

// The block's sum of v (a fixed order: the same result every run), in thread 0; s_warp: kWarps slots.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* s_warp) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, d);
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = v;
  __syncthreads();
  A total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += s_warp[w];
  }
  return total;
}

// out = clamp(x, -threshold[b], threshold[b]) for one chunk of one matrix b, and the chunk's sum of
// (out / t)^2 (of the stored values) into partial[blockIdx.x].
// vec: x, out and every chunk start are aligned for kVec<T>-element accesses, n % kVec<T> == 0.
template <typename T, typename TO>
__global__ void __launch_bounds__(kThreads)
    clamp_kernel(const T* x, TO* out, const float* __restrict__ threshold, float* __restrict__ partial, int64_t n,
                 int64_t chunk, int64_t chunks, bool vec) {
  __shared__ float s_warp[kWarps];
  constexpr int V = kVec<T>;
  const int64_t b = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const float t = threshold[b];
  const float inverse = t > 0.f ? 1.f / t : 0.f;  // t = 0 clamps to zeros; a NaN t gives a NaN norm anyway
  float squares = 0.f;
  const auto clamp_one = [&](float v) {
    const TO y = from_f<TO>(clamp_to(v, t));
    const float ratio = to_f(y) * inverse;
    squares = fmaf(ratio, ratio, squares);
    return y;
  };
  const int64_t begin = b * n + c * chunk, end = b * n + (c * chunk + chunk < n ? c * chunk + chunk : n);
  if (vec) {
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * V; i < end; i += int64_t{kThreads} * V) {
      const Pack<T, V> in = *reinterpret_cast<const Pack<T, V>*>(x + i);
      Pack<TO, V> res;
#pragma unroll
      for (int j = 0; j < V; ++j) res.v[j] = clamp_one(to_f(in.v[j]));
      *reinterpret_cast<Pack<TO, V>*>(out + i) = res;
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) out[i] = clamp_one(to_f(x[i]));
  }
  const float total = block_sum(squares, s_warp);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// norm[b] = t * sqrt(sum of partial[b][0 .. chunks)), one block per matrix, in float64.
__global__ void __launch_bounds__(kThreads)
    norm_kernel(const float* __restrict__ partial, const float* __restrict__ threshold, double* __restrict__ norm,
                int64_t chunks) {
  __shared__ double s_warp[kWarps];
  const int64_t b = blockIdx.x;
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) sum += partial[b * chunks + c];
  const double total = block_sum(sum, s_warp);
  if (threadIdx.x == 0) norm[b] = static_cast<double>(threshold[b]) * sqrt(total);
}

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<the CUDA element type of dtype>{}) for float32 / bfloat16 / float16.
template <typename F>
void with_element_type(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    default:
      TORCH_CHECK(false, "quantile_clamp_: ", name, " must be float32, bfloat16 or float16, got ", dtype);
  }
}

template <typename T, int P>
void launch_passes(const T* x, const SelectArgs& a, unsigned grid, cudaStream_t stream) {
  radix_pass_kernel<T, P><<<grid, kThreads, 0, stream>>>(x, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (P + 1 < Digits<T>::kPasses) launch_passes<T, P + 1>(x, a, grid, stream);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void quantile_clamp_cuda(const at::Tensor& x, at::Tensor out, at::Tensor threshold,
                         const std::optional<at::Tensor>& norm, int64_t k_lo, int64_t k_hi, double weight,
                         double offset) {
  TORCH_CHECK(x.is_cuda() && out.is_cuda() && threshold.is_cuda() && out.device() == x.device() &&
                  threshold.device() == x.device(),
              "quantile_clamp_: x, out and threshold must be CUDA tensors on one device, got ", x.device(), ", ",
              out.device(), " and ", threshold.device());
  TORCH_CHECK(x.dim() == 3, "quantile_clamp_: x must be a (B, m, n) tensor, got shape ", x.sizes());
  TORCH_CHECK(out.sizes() == x.sizes(), "quantile_clamp_: out must have x's shape ", x.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), "quantile_clamp_: x and out must be contiguous");
  TORCH_CHECK(threshold.scalar_type() == at::kFloat && threshold.dim() == 1 && threshold.size(0) == x.size(0) &&
                  threshold.is_contiguous(),
              "quantile_clamp_: threshold must be a contiguous float32 tensor of shape (", x.size(0), "), got ",
              threshold.scalar_type(), " of shape ", threshold.sizes());
  TORCH_CHECK(!norm || (norm->is_cuda() && norm->device() == x.device() && norm->scalar_type() == at::kDouble &&
                        norm->dim() == 1 && norm->size(0) == x.size(0) && norm->is_contiguous()),
              "quantile_clamp_: norm must be a contiguous float64 tensor of shape (", x.size(0), ") on ",
              x.device());
  const int64_t batch = x.size(0), n = x.size(1) * x.size(2);
  if (batch == 0) return;
  TORCH_CHECK(n >= 1, "quantile_clamp_: x has empty matrices (shape ", x.sizes(), "): no quantile");
  TORCH_CHECK(n <= static_cast<int64_t>(UINT32_MAX), "quantile_clamp_: at most 2^32 - 1 elements per matrix (",
              "uint32 counts), got ", n);
  TORCH_CHECK(0 <= k_lo && k_lo <= k_hi && k_hi <= k_lo + 1 && k_hi < n, "quantile_clamp_: ranks k_lo = ", k_lo,
              ", k_hi = ", k_hi, " must satisfy 0 <= k_lo <= k_hi <= k_lo + 1 and k_hi < ", n,
              " (elements per matrix)");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The chunk grows from kMinChunk while the grid keeps >= kWaveBlocks blocks per SM.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t chunk = kMinChunk;
  while (chunk < kMaxChunk && batch * ((n + 2 * chunk - 1) / (2 * chunk)) >= kWaveBlocks * sms) chunk *= 2;
  const int64_t chunks = (n + chunk - 1) / chunk;
  TORCH_CHECK(batch <= INT_MAX / chunks, "quantile_clamp_: ", batch, " matrices of ", n,
              " elements need more than 2^31 - 1 blocks");
  const unsigned grid = static_cast<unsigned>(batch * chunks);

  at::Tensor scratch = at::zeros({batch * (2 * kBins + 1 + kStateWords + chunks)}, x.options().dtype(at::kInt));
  uint32_t* const base = reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>());
  SelectArgs a{};
  a.hist = base;
  a.tickets = base + batch * 2 * kBins;
  a.state = a.tickets + batch;
  a.threshold = threshold.data_ptr<float>();
  float* const partial = reinterpret_cast<float*>(a.state + batch * kStateWords);
  a.n = n;
  a.chunk = chunk;
  a.chunks = chunks;
  a.rank[0] = static_cast<uint32_t>(k_lo);
  a.rank[1] = static_cast<uint32_t>(k_hi);
  a.targets = k_hi != k_lo ? 2 : 1;
  a.weight = static_cast<float>(weight);
  a.offset = static_cast<float>(offset);

  with_element_type(x.scalar_type(), "x", [&](auto in_tag) {
    using T = typename decltype(in_tag)::type;
    constexpr int V = kVec<T>;
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    a.vec = n % V == 0 && aligned(xp, 16);
    launch_passes<T, 0>(xp, a, grid, stream);
    with_element_type(out.scalar_type(), "out", [&](auto out_tag) {
      using TO = typename decltype(out_tag)::type;
      TO* op = reinterpret_cast<TO*>(out.data_ptr());
      const bool vec = a.vec && aligned(op, sizeof(TO) * V < 16 ? sizeof(TO) * V : 16);
      clamp_kernel<T, TO><<<grid, kThreads, 0, stream>>>(xp, op, a.threshold, partial, n, chunk, chunks, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (norm) {
    norm_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(partial, a.threshold,
                                                                        norm->data_ptr<double>(), chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) { m.impl("quantile_clamp_", &fastopt::quantile_clamp_cuda); }
