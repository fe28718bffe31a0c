// fp8 (e4m3) state on CPU: a group of codes decoded with its block's scale, and a block's codes and absmax
// scale encoded from its staged float32 values (the quantiser of fastopt/state.py, bit for bit:
// tests/test_backends.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
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
// 32 codes of values already scaled by the block's inverse scale and by 2^-8 (y·2^-8), on 16-bit lanes: the value
// truncated to fp16, with the truncation's sticky bit OR-ed into the last place (round to odd, so that no second
// rounding can go wrong), sits on fp16 bits whose top bits are its e4m3 code (the decoder's identity below:
// code << 7, subnormals included); rounding the bits to nearest even at bit 7 is then encode_e4m3's rounding,
// exactly. Saturates at 448, NaN -> 0x7F with its sign, as encode_e4m3. About 30 instructions per 32 codes where
// a 32-bit-lane version of encode_e4m3 took 42: an fp8 AdamW step on 8 × 4096×1024 params, two threads, 16.6–17.3
// → 15.4–15.6 ms (alternating builds); `bench step --optimizer adamw --preset large`, 33.4–33.5 → 33.2 ms (noise).
FASTOPT_INLINE __m256i encode32_via_fp16(__m512 lo, __m512 hi) {
  constexpr int kTruncate = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;
  const __m256i h_lo = _mm512_cvtps_ph(lo, kTruncate), h_hi = _mm512_cvtps_ph(hi, kTruncate);
  const __mmask32 inexact = _mm512_kunpackw(_mm512_cmp_ps_mask(_mm512_cvtph_ps(h_hi), hi, _CMP_NEQ_UQ),
                                            _mm512_cmp_ps_mask(_mm512_cvtph_ps(h_lo), lo, _CMP_NEQ_UQ));
  const __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(h_lo), h_hi, 1);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi16(h, 8), _mm512_set1_epi16(0x80));
  __m512i mag = _mm512_and_si512(h, _mm512_set1_epi16(0x7FFF));
  const __mmask32 nan = _mm512_cmpgt_epu16_mask(mag, _mm512_set1_epi16(0x7C00));
  mag = _mm512_min_epu16(mag, _mm512_set1_epi16(0x3F00));  // 448 · 2^-8
  mag = _mm512_mask_mov_epi16(mag, inexact, _mm512_or_si512(mag, _mm512_set1_epi16(1)));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(mag, 7), _mm512_set1_epi16(1));
  __m512i code = _mm512_srli_epi16(_mm512_add_epi16(_mm512_add_epi16(mag, _mm512_set1_epi16(0x3F)), odd), 7);
  code = _mm512_mask_mov_epi16(code, nan, _mm512_set1_epi16(0x7F));
  return _mm512_cvtepi16_epi8(_mm512_or_si512(code, sign));
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
  // x·(inv·2^-8) rounds as (x·inv)·2^-8 (a result too small for that encodes to ±0 either way) while inv·2^-8 is a
  // normal float or 0 (a zero, NaN or inf absmax): all but an absmax above ~1.5e38, whose block the scalar loop takes
  const float inv_fp16 = inv * 0.00390625f;
  if (inv == 0.f || inv_fp16 >= std::numeric_limits<float>::min()) {
    const __m512 vinv_fp16 = _mm512_set1_ps(inv_fp16);
    for (; k + 32 <= len; k += 32) {
      const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(staged + k), vinv_fp16);
      const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(staged + k + 16), vinv_fp16);
      // narrowed in a register, then stored (the former encoder's vpmovdb straight to memory was 4% slower)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k), encode32_via_fp16(lo, hi));
    }
  }
#endif
  for (; k < len; ++k) codes[k] = encode_e4m3(staged[k] * inv);
  *scale = absmax / kE4M3Max;
}

}  // namespace
}  // namespace fastopt
