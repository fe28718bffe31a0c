// fp8 (e4m3) state on CPU: a group of codes decoded with its block's scale (load_e4m3_group); a block's new
// values, staged in float32, their absmax taken in registers (AbsmaxBits), the block's scale and inverse from it
// (BlockCodec), and its codes (encode_codes): the quantiser of fastopt/state.py, bit for bit (tests/test_backends.py,
// tests/test_muon.py).
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
// The AVX-512 encoder, on 16-bit lanes, for finite values y = x·inv·2^-8 (x staged, inv the block's inverse scale;
// |y| ≤ 1.75·(1 + 2^-22): BlockCodec::vector). An e4m3 code is the top bits of the fp16 of y (the decoder's identity
// below: code << 7, subnormals included), rounded to nearest even at bit 7. That fp16 is y truncated after y's
// float32 bits 0-17 are folded into bit 18 (set if any of them is): the truncation drops bits 0-12 (more below
// fp16's normal range), and bit 18, which survives it, lies below the rounding's round bit (fp32 bit 19, or higher on
// e4m3's subnormals), so the rounding sees the true round and sticky bits: encode_e4m3's rounding, exactly. (Where
// the truncation drops bit 18 too, y < 2^-19, the e4m3 value is below 2^-11 and its code 0 either way.) y rounds to
// at most 448 (code 0x7E): no saturation; finite: no NaN code; so the sign bit rides along: after the rounding
// shift it sits in bit 8, one above the 7-bit magnitude, and (kSigned) one ternary-logic select moves it to bit 7.
// 18 instructions per 32 codes, 16 for non-negative values (rounding to odd by converting back and comparing took
// 23; the first version, which also handled NaN and saturation, 30; a 32-bit-lane encode_e4m3, 42).
FASTOPT_INLINE __m512 fold_sticky_bits(__m512 y) {
  const __m512i bits = _mm512_castps_si512(y);
  const __mmask16 sticky = _mm512_test_epi32_mask(bits, _mm512_set1_epi32((1 << 18) - 1));
  return _mm512_castsi512_ps(_mm512_mask_or_epi32(bits, sticky, bits, _mm512_set1_epi32(1 << 18)));
}

// staged[0, 32) × inv_fp16 (the block's inverse scale × 2^-8) encoded into codes[0, 32); !kSigned: no value has
// its sign bit set.
template <bool kSigned>
FASTOPT_INLINE void encode32(const float* staged, uint8_t* codes, __m512 inv_fp16) {
  constexpr int kTruncate = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;
  const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(staged), inv_fp16);
  const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(staged + 16), inv_fp16);
  const __m256i h_lo = _mm512_cvtps_ph(fold_sticky_bits(lo), kTruncate);
  const __m256i h_hi = _mm512_cvtps_ph(fold_sticky_bits(hi), kTruncate);
  const __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(h_lo), h_hi, 1);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(h, 7), _mm512_set1_epi16(1));
  __m512i code = _mm512_srli_epi16(_mm512_add_epi16(_mm512_add_epi16(h, _mm512_set1_epi16(0x3F)), odd), 7);
  if constexpr (kSigned) {
    // bits 0-6 from the code (the magnitude), bit 7 from code >> 1 (the sign); 0xE4: C ? A : B
    code = _mm512_ternarylogic_epi32(code, _mm512_srli_epi16(code, 1), _mm512_set1_epi16(0x7F), 0xE4);
  }
  // narrowed in a register, then stored (vpmovwb straight to memory was 4% slower)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), _mm512_cvtepi16_epi8(code));
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
  // + 0x80 carries into bit 14 from magnitude 0x7F alone (bits 0x3F80, the NaN codes); that bit OR-ed in sets
  // fp16's exponent to all ones under a non-zero mantissa (NaN, the sign kept). 0xF8: A | (B & C)
  h = _mm512_ternarylogic_epi32(h, _mm512_add_epi16(h, _mm512_set1_epi16(0x80)), _mm512_set1_epi16(0x4000), 0xF8);
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

// Running max of |x| over vectors of floats, on the bits (abs_bits' order: NaN largest).
class AbsmaxBits {
 public:
  FASTOPT_INLINE void add(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
    acc_ = _mm512_max_epu32(acc_, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
#elif defined(CPU_CAPABILITY_AVX2)
    acc_ = _mm256_max_epu32(acc_, _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF)));
#else
    alignas(64) float lanes[kLanes];
    x.store(lanes);
    for (float value : lanes) acc_ = std::max(acc_, abs_bits(value));
#endif
  }
  // a group's first n lanes
  FASTOPT_INLINE void add(const Group& x, int64_t n) {
    if (n == kGroup) {
      add(x.lo);
      add(x.hi);
    } else {
      const Vec zero(0.f);
      add(Vec::set(zero, x.lo, std::min(n, kLanes)));
      add(Vec::set(zero, x.hi, std::max<int64_t>(n - kLanes, 0)));
    }
  }
  FASTOPT_INLINE uint32_t bits() const {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_reduce_max_epu32(acc_);
#elif defined(CPU_CAPABILITY_AVX2)
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc_);
    return *std::max_element(lanes, lanes + 8);
#else
    return acc_;
#endif
  }

 private:
#if defined(CPU_CAPABILITY_AVX512)
  __m512i acc_ = _mm512_setzero_si512();
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i acc_ = _mm256_setzero_si256();
#else
  uint32_t acc_ = 0;
#endif
};

// How a block with this absmax encodes: its scale (absmax / 448), the inverse (448 / absmax, 0 for a zero or NaN
// absmax), and whether the AVX-512 encoder is exact for it: x·(inv·2^-8) rounds as (x·inv)·2^-8 (a result too
// small for that encodes to ±0 either way) while inv·2^-8 is a normal float or 0, and every value is finite.
// Blocks with an infinite, NaN or subnormal absmax, or one above ~1.5e38, take the scalar encoder.
struct BlockCodec {
  float scale = 0.f, inv = 0.f;
  bool vector = false;

  BlockCodec() = default;
  explicit BlockCodec(uint32_t absmax_bits) {
    const float absmax = bits_float(absmax_bits);
    scale = absmax / kE4M3Max;
    inv = absmax > 0.f ? kE4M3Max / absmax : 0.f;
    vector = absmax_bits < 0x7F800000u &&
             (inv == 0.f || (inv_fp16() >= std::numeric_limits<float>::min() &&
                             inv_fp16() <= std::numeric_limits<float>::max()));
  }
  float inv_fp16() const { return inv * 0.00390625f; }
};

// The codes of n staged values of a block (all of it, or a group of it) with the block's codec; !kSigned: the
// values are square roots (+0 or above, or NaN, which makes the block's codec scalar).
template <bool kSigned = true>
FASTOPT_INLINE void encode_codes(const float* staged, uint8_t* codes, int64_t n, const BlockCodec& codec) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (codec.vector) {
    const __m512 inv_fp16 = _mm512_set1_ps(codec.inv_fp16());
    for (; k + 32 <= n; k += 32) encode32<kSigned>(staged + k, codes + k, inv_fp16);
  }
#endif
  for (; k < n; ++k) codes[k] = encode_e4m3(staged[k] * codec.inv);
}

}  // namespace
}  // namespace fastopt
