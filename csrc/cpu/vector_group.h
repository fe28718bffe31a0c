// Groups of 2×Vectorized<float>::size() elements, loaded from and stored to float, BFloat16 or Half memory
// (converted to float in registers): the unit of the CPU element-wise kernels' inner loops.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace fastopt {
namespace {

using at::BFloat16;
using at::Half;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kGroup = 2 * kLanes;  // elements per step of the dense inner loops

// Everything called per element or group must inline: a call passes vectors through memory.
#define FASTOPT_INLINE inline __attribute__((always_inline))

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

}  // namespace
}  // namespace fastopt
