// Widening of stored weight formats to fp32 registers, one thin wrapper per ISA next to simd.h's
// float operations: IVec, kLanes 32-bit integer lanes, for assembling quants from their bits
// (bytes, nibbles, high bits in words), and the exact conversions to fp32 (small integers,
// fp16, bf16). Every conversion here is exact, so the values a kernel gets depend only on the
// stored bits, not on the ISA; the formats themselves are in stored_formats.h. store_half, the
// one narrowing, rounds to nearest even on every ISA.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace onepass::simd {

#if ONEPASS_SIMD_AVX512

struct IVec {
  __m512i v;
};

// kLanes bytes, zero-extended (u8) or sign-extended (s8) to 32-bit lanes.
inline IVec load_u8(const uint8_t* p) {
  return {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline IVec load_s8(const int8_t* p) {
  return {_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline IVec load_u16(const uint16_t* p) {
  return {_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline IVec load_u32(const uint32_t* p) { return {_mm512_loadu_si512(p)}; }
// Logical shifts of every lane by n (an immediate when n is a constant, else a count register,
// never a vector of counts: no register held for it).
inline IVec shr(IVec a, int n) { return {_mm512_srli_epi32(a.v, static_cast<unsigned>(n))}; }
inline IVec shl(IVec a, int n) { return {_mm512_slli_epi32(a.v, static_cast<unsigned>(n))}; }
inline IVec bits_and(IVec a, uint32_t mask) {
  return {_mm512_and_si512(a.v, _mm512_set1_epi32(static_cast<int>(mask)))};
}
inline IVec bits_or(IVec a, IVec b) { return {_mm512_or_si512(a.v, b.v)}; }
inline IVec sub(IVec a, int32_t b) { return {_mm512_sub_epi32(a.v, _mm512_set1_epi32(b))}; }
// Signed 32-bit lanes -> fp32 (exact below 2^24 in magnitude).
inline Vec to_float(IVec a) { return {_mm512_cvtepi32_ps(a.v)}; }
// The lanes' bits as fp32 (no conversion).
inline Vec bits_to_float(IVec a) { return {_mm512_castsi512_ps(a.v)}; }
// kLanes fp16 values -> fp32.
inline Vec load_half(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
// kLanes fp32 -> fp16, rounded to nearest even (a half-precision KV cache's writes).
inline void store_half(uint16_t* p, Vec a) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.v, kNearest));
}

#elif ONEPASS_SIMD_AVX2

struct IVec {
  __m256i v;
};

inline IVec load_u8(const uint8_t* p) {
  return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))};
}
inline IVec load_s8(const int8_t* p) {
  return {_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))};
}
inline IVec load_u16(const uint16_t* p) {
  return {_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline IVec load_u32(const uint32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))};
}
inline IVec shr(IVec a, int n) { return {_mm256_srli_epi32(a.v, n)}; }
inline IVec shl(IVec a, int n) { return {_mm256_slli_epi32(a.v, n)}; }
inline IVec bits_and(IVec a, uint32_t mask) {
  return {_mm256_and_si256(a.v, _mm256_set1_epi32(static_cast<int>(mask)))};
}
inline IVec bits_or(IVec a, IVec b) { return {_mm256_or_si256(a.v, b.v)}; }
inline IVec sub(IVec a, int32_t b) { return {_mm256_sub_epi32(a.v, _mm256_set1_epi32(b))}; }
inline Vec to_float(IVec a) { return {_mm256_cvtepi32_ps(a.v)}; }
inline Vec bits_to_float(IVec a) { return {_mm256_castsi256_ps(a.v)}; }
inline Vec load_half(const uint16_t* p) {  // F16C, which every AVX2 CPU has (-mf16c)
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store_half(uint16_t* p, Vec a) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, kNearest));
}

#elif ONEPASS_SIMD_NEON

struct IVec {
  uint32x4_t v;
};

// 4 bytes into the low lanes of a 64-bit register (reading 8 could cross the end of the data).
inline uint8x8_t load4(const void* p) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  return vcreate_u8(word);
}
inline IVec load_u8(const uint8_t* p) { return {vmovl_u16(vget_low_u16(vmovl_u8(load4(p))))}; }
inline IVec load_s8(const int8_t* p) {
  const int16x8_t h = vmovl_s8(vreinterpret_s8_u8(load4(p)));
  return {vreinterpretq_u32_s32(vmovl_s16(vget_low_s16(h)))};
}
inline IVec load_u16(const uint16_t* p) { return {vmovl_u16(vld1_u16(p))}; }
inline IVec load_u32(const uint32_t* p) { return {vld1q_u32(p)}; }
inline IVec shr(IVec a, int n) { return {vshlq_u32(a.v, vdupq_n_s32(-n))}; }
inline IVec shl(IVec a, int n) { return {vshlq_u32(a.v, vdupq_n_s32(n))}; }
inline IVec bits_and(IVec a, uint32_t mask) { return {vandq_u32(a.v, vdupq_n_u32(mask))}; }
inline IVec bits_or(IVec a, IVec b) { return {vorrq_u32(a.v, b.v)}; }
inline IVec sub(IVec a, int32_t b) { return {vsubq_u32(a.v, vdupq_n_u32(static_cast<uint32_t>(b)))}; }
inline Vec to_float(IVec a) { return {vcvtq_f32_s32(vreinterpretq_s32_u32(a.v))}; }
inline Vec bits_to_float(IVec a) { return {vreinterpretq_f32_u32(a.v)}; }
inline Vec load_half(const uint16_t* p) {
  return {vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)))};
}
inline void store_half(uint16_t* p, Vec a) {  // FPCR's default: to nearest even
  vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(a.v)));
}

#endif

// kLanes bf16 values -> fp32: the 16 bits on top of a zero low half, as gguf's `<< 16`.
inline Vec load_bf16(const uint16_t* p) { return bits_to_float(shl(load_u16(p), 16)); }

}  // namespace onepass::simd
