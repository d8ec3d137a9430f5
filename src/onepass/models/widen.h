// Widening of stored weight formats to fp32 registers, one thin wrapper per ISA (next to
// simd.h's float operations): half-precision scales and 8-bit / 4-bit integer quants. Every
// conversion here is exact (fp16 -> fp32, small integers -> fp32), so the values a kernel gets
// depend only on the stored bits, not on the ISA.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace onepass::simd {

#if ONEPASS_SIMD_AVX512

// kLanes fp16 values -> fp32.
inline Vec load_half(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
// kLanes int8 values -> fp32.
inline Vec load_i8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// kLanes bytes -> their low nibbles (lo) and high nibbles (hi) as fp32.
inline void load_nibbles(const uint8_t* p, Vec& lo, Vec& hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = {_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)))};
  hi = {_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4))};
}

#elif ONEPASS_SIMD_AVX2

inline Vec load_half(const uint16_t* p) {  // F16C, which every AVX2 CPU has (-mf16c)
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline Vec load_i8(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
inline void load_nibbles(const uint8_t* p, Vec& lo, Vec& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = {_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0x0F)))};
  hi = {_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
}

#elif ONEPASS_SIMD_NEON

inline Vec load_half(const uint16_t* p) {
  return {vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)))};
}
// 4 bytes into the low lanes of a 64-bit register (reading 8 could cross the end of the data).
inline uint8x8_t load4(const void* p) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  return vcreate_u8(word);
}
inline Vec load_i8(const int8_t* p) {
  const int16x8_t h = vmovl_s8(vreinterpret_s8_u8(load4(p)));
  return {vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)))};
}
inline void load_nibbles(const uint8_t* p, Vec& lo, Vec& hi) {
  const uint32x4_t b = vmovl_u16(vget_low_u16(vmovl_u8(load4(p))));
  lo = {vcvtq_f32_u32(vandq_u32(b, vdupq_n_u32(0x0F)))};
  hi = {vcvtq_f32_u32(vshrq_n_u32(b, 4))};
}

#endif

// One fp16 value -> fp32, exactly (subnormals, infinities and NaN included): for scalar code.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exponent = 113;
    while (!(mantissa & 0x400)) mantissa <<= 1, exponent--;
    bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace onepass::simd
