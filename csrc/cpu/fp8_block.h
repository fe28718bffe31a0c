// fp8 (e4m3) state on CPU: a group of codes decoded with its block's scale, and a block's codes and absmax
// scale encoded from its staged float32 values (the quantiser of fastopt/state.py, bit for bit:
// tests/test_backends.py).
#pragma once

#include <algorithm>
#include <cstdint>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
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

// n ≤ kGroup codes, decoded and multiplied by scale256 = the block's scale × 256. An e4m3 code is an fp16
// with one exponent bit fewer: shifted into fp16's bits it reads as its value × 2^-8, exactly (subnormals
// included), and the hardware fp16 → fp32 conversion does the rest; × (scale · 2^8) then rounds to the same
// float as value × scale. Codes 0x7F / 0xFF read as NaN, as decode_e4m3. Lanes past n read 0.
FASTOPT_INLINE Group load_e4m3_group(const uint8_t* codes, int64_t n, const Vec& scale256) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kGroup == 32, "one __m256i of codes per group");
  const __m256i bytes = _mm256_maskz_loadu_epi8(n >= kGroup ? ~0u : (1u << n) - 1u, codes);
  // sign-extended and shifted by 7: mantissa and exponent in place, the sign in bit 15; bit 14 (fp16's top
  // exponent bit, which holds a copy of the sign) cleared
  __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(bytes), 7), _mm512_set1_epi16(int16_t(0xBFFF)));
  const __m512i all_ones = _mm512_set1_epi16(0x3F80);  // magnitude 0x7F: set fp16's exponent to all ones (NaN)
  const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, all_ones), all_ones);
  h = _mm512_mask_mov_epi16(h, nan, _mm512_or_si512(h, _mm512_set1_epi16(0x7C00)));
  return {Vec(_mm512_cvtph_ps(_mm512_castsi512_si256(h))) * scale256,
          Vec(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1))) * scale256};
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(kGroup == 16, "one __m128i of codes per group");
  alignas(16) uint8_t tail[16] = {};
  if (n < kGroup) std::copy(codes, codes + n, tail);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(n < kGroup ? tail : codes));
  __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7), _mm256_set1_epi16(int16_t(0xBFFF)));
  const __m256i all_ones = _mm256_set1_epi16(0x3F80);
  const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, all_ones), all_ones);
  h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7C00)));
  return {Vec(_mm256_cvtph_ps(_mm256_castsi256_si128(h))) * scale256,
          Vec(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))) * scale256};
#else
  alignas(64) float lanes[kGroup] = {};
  for (int64_t k = 0; k < n; ++k) {
    lanes[k] = decode_e4m3(codes[k]) * 0.00390625f;  // × 2^-8
  }
  const Group x = load_group(lanes, kGroup);
  return {x.lo * scale256, x.hi * scale256};
#endif
}

// Writes a block's codes and scale from its staged fp32 values: encode_e4m3 of value / scale, for every
// moment (roots too: the NaN code for a NaN, as on the GPU and in the reference quantiser).
void encode_block(const float* staged, uint8_t* codes, float* scale, int64_t len) {
  uint32_t absmax_bits = 0;
  for (int64_t k = 0; k < len; ++k) absmax_bits = std::max(absmax_bits, abs_bits(staged[k]));
  const float absmax = bits_float(absmax_bits);
  const float inv = absmax > 0.f ? kE4M3Max / absmax : 0.f;
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vinv = _mm512_set1_ps(inv), vmax = _mm512_set1_ps(kE4M3Max);
  for (; k + 16 <= len; k += 16) {
    const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(staged + k), vinv);
    const __m512i ybits = _mm512_castps_si512(y);
    const __m512i abs_bits = _mm512_and_si512(ybits, _mm512_set1_epi32(0x7FFFFFFF));
    __m512i code = encode_magnitude16(_mm512_min_ps(_mm512_castsi512_ps(abs_bits), vmax));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(abs_bits, _mm512_set1_epi32(0x7F800000));
    code = _mm512_mask_mov_epi32(code, nan, _mm512_set1_epi32(0x7F));
    code = _mm512_or_si512(code, _mm512_and_si512(_mm512_srli_epi32(ybits, 24), _mm512_set1_epi32(0x80)));
    // narrowed in a register, then stored: vpmovdb straight to memory made the fp8 AdamW step 4% slower
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtepi32_epi8(code));
  }
#endif
  for (; k < len; ++k) codes[k] = encode_e4m3(staged[k] * inv);
  *scale = absmax / kE4M3Max;
}

}  // namespace
}  // namespace fastopt
