// Integer dot products for the int8 arithmetic (stored_gemm.cpp's "int8" weights), one thin
// wrapper per ISA beside simd.h and widen.h. BVec holds 4 * kLanes bytes: for each of the
// kLanes 32-bit lanes (one output column) 4 consecutive values of k. dot_u / dot_s add to each
// 32-bit lane of an IVec the sum of its 4 byte products, exactly (no saturation for the ranges
// stated below), so every ISA computes the same integer sums:
//   AVX-512 with VNNI   vpdpbusd (u8 x s8, 4 products per lane in one instruction)
//   AVX-512 BW, AVX2    vpmaddubsw (u8 x s8 pairs to int16) then vpmaddwd by ones (pairs to int32)
//   NEON                sdot where the CPU has the dot-product extension, else widening products
// Signed weights (Q8_0) on x86 multiply |w| by x carrying w's sign, as vpmaddubsw needs an
// unsigned operand: |w| <= 128 and |x| <= 127 keep each int16 pair sum below 2^15.
// 4-bit weights sum a block's products in a PVec first (nibble_dot, widen_pairs): on x86 without
// VNNI, vpmaddubsw's int16 pair sums added in int16 (a pair is at most 2 * 15 * 127 = 3810, and
// a block adds 8 of them per lane, 30480 < 2^15), widened to int32 once per block; elsewhere the
// PVec is the IVec itself.
#pragma once

#include <cstdint>
#include <cstring>

#include "widen.h"

namespace onepass::simd {

#if ONEPASS_SIMD_AVX512

#if !defined(__AVX512BW__)
#define ONEPASS_NO_INT8 1  // AVX-512F alone has no byte arithmetic: no int8 kernels
#else
struct BVec {
  __m512i v;
};
inline BVec load_bytes(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline BVec low_nibbles(BVec a) { return {_mm512_and_si512(a.v, _mm512_set1_epi8(0x0F))}; }
inline BVec high_nibbles(BVec a) {
  return {_mm512_and_si512(_mm512_srli_epi16(a.v, 4), _mm512_set1_epi8(0x0F))};
}
// The 4 bytes at p in every lane.
inline BVec broadcast4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return {_mm512_set1_epi32(word)};
}
// 32 integral float values (in [-127, 127]) from 32 / kLanes registers as int8.
inline void store_i8(int8_t* p, const Vec* v) {
  for (int i = 0; i < 2; i++) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 16 * i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v[i].v)));
  }
}
inline IVec izero() { return {_mm512_setzero_si512()}; }
// w unsigned (u8), x signed (s8, |x| <= 127).
inline IVec dot_u(IVec acc, BVec w, BVec x) {
#if defined(__AVX512VNNI__)
  return {_mm512_dpbusd_epi32(acc.v, w.v, x.v)};
#else
  const __m512i pairs = _mm512_maddubs_epi16(w.v, x.v);
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))};
#endif
}
#if defined(__AVX512VNNI__)
using PVec = IVec;
inline PVec pzero() { return izero(); }
inline PVec nibble_dot(PVec acc, BVec w, BVec x) { return dot_u(acc, w, x); }
inline IVec widen_pairs(PVec a) { return a; }
// Whether signed 8-bit weights are stored offset by 128 (as the u8 w + 128): with vpdpbusd a
// product by x is then one instruction, and the block's sum less 128 * sum(x) is the same
// integer (int8_formats.h).
constexpr bool kOffsetSigned = true;
#else
struct PVec {
  __m512i v;
};
inline PVec pzero() { return {_mm512_setzero_si512()}; }
inline PVec nibble_dot(PVec acc, BVec w, BVec x) {
  return {_mm512_add_epi16(acc.v, _mm512_maddubs_epi16(w.v, x.v))};
}
inline IVec widen_pairs(PVec a) { return {_mm512_madd_epi16(a.v, _mm512_set1_epi16(1))}; }
constexpr bool kOffsetSigned = false;
#endif
// w signed (s8), x signed (|x| <= 127).
inline IVec dot_s(IVec acc, BVec w, BVec x) {
  const __mmask64 negative = _mm512_movepi8_mask(w.v);
  const __m512i signed_x = _mm512_mask_sub_epi8(x.v, negative, _mm512_setzero_si512(), x.v);
  return dot_u(acc, {_mm512_abs_epi8(w.v)}, {signed_x});
}
#endif

#elif ONEPASS_SIMD_AVX2

struct BVec {
  __m256i v;
};
inline BVec load_bytes(const uint8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))};
}
inline BVec low_nibbles(BVec a) { return {_mm256_and_si256(a.v, _mm256_set1_epi8(0x0F))}; }
inline BVec high_nibbles(BVec a) {
  return {_mm256_and_si256(_mm256_srli_epi16(a.v, 4), _mm256_set1_epi8(0x0F))};
}
inline BVec broadcast4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return {_mm256_set1_epi32(word)};
}
inline void store_i8(int8_t* p, const Vec* v) {
  const __m256i ab = _mm256_packs_epi32(_mm256_cvtps_epi32(v[0].v), _mm256_cvtps_epi32(v[1].v));
  const __m256i cd = _mm256_packs_epi32(_mm256_cvtps_epi32(v[2].v), _mm256_cvtps_epi32(v[3].v));
  // Per 128-bit half, 4-byte groups of v0, v1, v2, v3 (low half: lanes 0-3, high: 4-7).
  const __m256i bytes = _mm256_packs_epi16(ab, cd);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permutevar8x32_epi32(bytes, order));
}
inline IVec izero() { return {_mm256_setzero_si256()}; }
#if defined(__AVXVNNI__)  // AVX-VNNI (Intel client chips since Alder Lake, Zen 5): vpdpbusd
inline IVec dot_u(IVec acc, BVec w, BVec x) { return {_mm256_dpbusd_avx_epi32(acc.v, w.v, x.v)}; }
using PVec = IVec;
inline PVec pzero() { return izero(); }
inline PVec nibble_dot(PVec acc, BVec w, BVec x) { return dot_u(acc, w, x); }
inline IVec widen_pairs(PVec a) { return a; }
constexpr bool kOffsetSigned = true;
#else
inline IVec dot_u(IVec acc, BVec w, BVec x) {
  const __m256i pairs = _mm256_maddubs_epi16(w.v, x.v);
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}
struct PVec {
  __m256i v;
};
inline PVec pzero() { return {_mm256_setzero_si256()}; }
inline PVec nibble_dot(PVec acc, BVec w, BVec x) {
  return {_mm256_add_epi16(acc.v, _mm256_maddubs_epi16(w.v, x.v))};
}
inline IVec widen_pairs(PVec a) { return {_mm256_madd_epi16(a.v, _mm256_set1_epi16(1))}; }
constexpr bool kOffsetSigned = false;
#endif
inline IVec dot_s(IVec acc, BVec w, BVec x) {
  return dot_u(acc, {_mm256_sign_epi8(w.v, w.v)}, {_mm256_sign_epi8(x.v, w.v)});
}

#elif ONEPASS_SIMD_NEON

struct BVec {
  int8x16_t v;
};
inline BVec load_bytes(const uint8_t* p) { return {vreinterpretq_s8_u8(vld1q_u8(p))}; }
inline BVec low_nibbles(BVec a) {
  return {vreinterpretq_s8_u8(vandq_u8(vreinterpretq_u8_s8(a.v), vdupq_n_u8(0x0F)))};
}
inline BVec high_nibbles(BVec a) { return {vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(a.v), 4))}; }
inline BVec broadcast4(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return {vreinterpretq_s8_s32(vdupq_n_s32(word))};
}
inline void store_i8(int8_t* p, const Vec* v) {
  int16x8_t h[4];
  for (int i = 0; i < 4; i++) {
    h[i] = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(v[2 * i].v)), vqmovn_s32(vcvtnq_s32_f32(v[2 * i + 1].v)));
  }
  vst1q_s8(p, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
  vst1q_s8(p + 16, vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
}
inline IVec izero() { return {vdupq_n_u32(0)}; }
// Both operands signed here: the nibbles (0..15) are valid int8.
inline IVec dot_s(IVec acc, BVec w, BVec x) {
#if defined(__ARM_FEATURE_DOTPROD)
  return {vreinterpretq_u32_s32(vdotq_s32(vreinterpretq_s32_u32(acc.v), w.v, x.v))};
#else
  const int16x8_t low = vmull_s8(vget_low_s8(w.v), vget_low_s8(x.v));
  const int16x8_t high = vmull_s8(vget_high_s8(w.v), vget_high_s8(x.v));
  const int32x4_t sums = vpaddq_s32(vpaddlq_s16(low), vpaddlq_s16(high));
  return {vreinterpretq_u32_s32(vaddq_s32(vreinterpretq_s32_u32(acc.v), sums))};
#endif
}
inline IVec dot_u(IVec acc, BVec w, BVec x) { return dot_s(acc, w, x); }
using PVec = IVec;
inline PVec pzero() { return izero(); }
inline PVec nibble_dot(PVec acc, BVec w, BVec x) { return dot_s(acc, w, x); }
inline IVec widen_pairs(PVec a) { return a; }
constexpr bool kOffsetSigned = false;

#endif

}  // namespace onepass::simd
