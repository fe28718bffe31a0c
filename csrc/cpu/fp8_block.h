// The fp8 (e4m3) block encoder of the CPU kernels: a block's codes and its absmax scale, written from the
// block's staged float32 values (the quantiser of fastopt/state.py, bit for bit: tests/test_backends.py).
#pragma once

#include <algorithm>
#include <cstdint>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/numerics.h"
#include "cpu/vector_group.h"

namespace fastopt {
namespace {

// absmax of non-negative floats (or |x| bits): integer order is float order, and NaN is the
// largest, so a NaN anywhere makes the block's scale NaN and the whole block reads back as NaN.
FASTOPT_INLINE uint32_t abs_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

#if defined(CPU_CAPABILITY_AVX512)
// encode_e4m3_magnitude on 16 lanes of a in [0, 448] (the same integer steps).
FASTOPT_INLINE __m512i encode_magnitude16(__m512 a) {
  const __m512i subnormal = _mm512_sub_epi32(
      _mm512_castps_si512(_mm512_fmadd_ps(a, _mm512_set1_ps(512.0f), _mm512_set1_ps(8388608.0f))),
      _mm512_set1_epi32(0x4B000000));
  __m512i bits = _mm512_castps_si512(a);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFFF), odd));
  const __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(120 << 3));
  const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.015625f), _CMP_LT_OQ);
  return _mm512_mask_blend_epi32(small, normal, subnormal);
}
#endif

// Writes a block's codes and scale from its staged fp32 values. Roots (non-negative) take the
// magnitude codec.
void encode_block(const float* staged, uint32_t absmax_bits, uint8_t* codes, float* scale, int64_t len, bool root) {
  const float absmax = bits_float(absmax_bits);
  const float inv = absmax > 0.f ? kE4M3Max / absmax : 0.f;
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vinv = _mm512_set1_ps(inv), vmax = _mm512_set1_ps(kE4M3Max);
  for (; k + 16 <= len; k += 16) {
    const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(staged + k), vinv);
    __m512i code;
    if (root) {
      code = encode_magnitude16(_mm512_min_ps(vmax, y));  // NaN stays NaN, as std::min(y, max)
    } else {
      const __m512i ybits = _mm512_castps_si512(y);
      const __m512i abs_bits = _mm512_and_si512(ybits, _mm512_set1_epi32(0x7FFFFFFF));
      code = encode_magnitude16(_mm512_min_ps(_mm512_castsi512_ps(abs_bits), vmax));
      const __mmask16 nan = _mm512_cmpgt_epu32_mask(abs_bits, _mm512_set1_epi32(0x7F800000));
      code = _mm512_mask_mov_epi32(code, nan, _mm512_set1_epi32(0x7F));
      code = _mm512_or_si512(code, _mm512_and_si512(_mm512_srli_epi32(ybits, 24), _mm512_set1_epi32(0x80)));
    }
    _mm512_mask_cvtepi32_storeu_epi8(codes + k, 0xFFFF, code);
  }
#endif
  if (root) {
    for (; k < len; ++k) codes[k] = uint8_t(encode_e4m3_magnitude(std::min(staged[k] * inv, kE4M3Max)));
  } else {
    for (; k < len; ++k) codes[k] = encode_e4m3(staged[k] * inv);
  }
  *scale = absmax / kE4M3Max;
}

}  // namespace
}  // namespace fastopt
