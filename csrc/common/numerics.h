// Scalar numerics shared by the CPU and CUDA kernels: the e4m3fn state format and the
// stochastic-rounding hash. The formats are defined by integer/float ops only, so every
// device (sm_80 has no fp8 instructions, the CPU none either) writes the same bytes.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline
#endif

namespace fastopt {

constexpr float kE4M3Max = 448.0f;

FASTOPT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

FASTOPT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// The e4m3 codecs are branch-free (selects, no libm calls) so that a loop of them vectorises
// on the CPU (gcc -O3 -fno-trapping-math) and has no divergence on the GPU. The magnitude
// halves are the 7-bit cores the signed codecs below are built from (every moment, the square
// roots of second moments included, is stored with the signed codec).

// 7-bit e4m3 magnitude (0..126) -> float: exponent bias 7, 3 mantissa bits, 2^-9 subnormal grid.
FASTOPT_HD float decode_e4m3_magnitude(uint32_t mag) {
  const float subnormal = float(int32_t(mag)) * 0.001953125f;   // mantissa * 2^-9
  const float normal = bits_float((mag << 20) + (120u << 23));   // rebias exponent 7 -> 127
  return mag < 8u ? subnormal : normal;
}

// float in [0, 448] -> 7-bit e4m3 magnitude, round to nearest even.
FASTOPT_HD uint32_t encode_e4m3_magnitude(float a) {
  // below 2^-6 the grid is 2^-9: a·512 < 8, rounded to an integer by adding 2^23 (RNE)
  const uint32_t subnormal = float_bits(a * 512.0f + 8388608.0f) - 0x4B000000u;
  uint32_t bits = float_bits(a);
  bits += 0x7FFFFu + ((bits >> 20) & 1u);                     // round to 3 mantissa bits, RNE
  const uint32_t normal = (bits >> 20) - (120u << 3);         // rebias exponent 127 -> 7
  return a < 0.015625f ? subnormal : normal;
}

// e4m3fn byte -> float; 0x7F/0xFF are NaN.
FASTOPT_HD float decode_e4m3(uint8_t code) {
  const uint32_t mag = code & 0x7Fu;
  uint32_t bits = float_bits(decode_e4m3_magnitude(mag));
  bits = mag == 0x7Fu ? 0x7FC00000u : bits;
  return bits_float(bits | (uint32_t(code & 0x80u) << 24));
}

// float -> e4m3fn byte: round to nearest even, saturate at 448, NaN -> 0x7F.
FASTOPT_HD uint8_t encode_e4m3(float y) {
  const uint32_t abs_bits = float_bits(y) & 0x7FFFFFFFu;
  const float abs_y = bits_float(abs_bits);
  uint32_t mag = encode_e4m3_magnitude(abs_y < kE4M3Max ? abs_y : kE4M3Max);
  mag = abs_bits > 0x7F800000u ? 0x7Fu : mag;
  return uint8_t(((float_bits(y) >> 24) & 0x80u) | mag);
}

// fp32 -> bf16 bits, round to nearest even; NaN stays NaN.
FASTOPT_HD uint16_t bf16_round_nearest(float x) {
  const uint32_t bits = float_bits(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return uint16_t((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// lowbias32 integer hash (Chris Wellons); wraps mod 2^32.
FASTOPT_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Per-tensor key of the stochastic-rounding stream.
FASTOPT_HD uint32_t sr_tensor_key(int64_t seed, int64_t tensor_index) {
  return hash32(uint32_t(seed) + 0x9E3779B9u * uint32_t(tensor_index + 1));
}

// fp32 -> bf16 bits with stochastic rounding: add 16 random bits below the bf16 mantissa, truncate.
FASTOPT_HD uint16_t bf16_stochastic_round(float x, uint32_t key, uint64_t element_index) {
  const uint32_t r = hash32(uint32_t(element_index) ^ key);
  return uint16_t((float_bits(x) + (r & 0xFFFFu)) >> 16);
}

}  // namespace fastopt
