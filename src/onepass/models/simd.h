// A float vector for onepass's CPU kernels, one thin wrapper per ISA: AVX-512, AVX2 + FMA, and
// NEON (aarch64). The kernels (small_gemm.cpp, decoder.cpp, top_k.cpp) are written once over
// it; the ISA is chosen by the compiler flags of the build (cpu_kernels.py).
//
// Why wrappers over intrinsics, and not GCC's vector extensions, ATen's Vectorized or Highway:
// lossless decoding needs every row of a multi-row forward to do exactly the arithmetic of a
// one-row forward, so the kernels must say where an FMA happens and in which order lanes are
// summed. With vector extensions `a * b + c` is fused or not at the compiler's discretion
// (-ffp-contract), which may differ between two template instances of one kernel (one row
// block against another); here `fmadd` is the only fused operation, every other operation
// rounds once, and the builds pass -ffp-contract=off so that scalar code is not fused either.
// Horizontal sums run in a fixed order that this header states. ATen's Vectorized picks its
// width from the build of ATen, not from ours, and Highway would be a new dependency for the
// dozen operations used here.
//
// Vec is a struct, not the raw intrinsic type: GCC defines +, -, * on __m512 and friends, and
// a struct keeps every arithmetic step a named call.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define ONEPASS_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ONEPASS_SIMD_AVX2 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define ONEPASS_SIMD_NEON 1
#else
#error "onepass's kernels need AVX-512, AVX2 + FMA, or NEON on aarch64"
#endif

namespace onepass::simd {

#if ONEPASS_SIMD_AVX512

constexpr int kLanes = 16;      // floats in a register
constexpr int kRegisters = 32;  // vector registers

struct Vec {
  __m512 v;
};

inline Vec zero() { return {_mm512_setzero_ps()}; }
inline Vec set1(float x) { return {_mm512_set1_ps(x)}; }
inline Vec load(const float* p) { return {_mm512_load_ps(p)}; }  // p aligned to 64 bytes
inline Vec loadu(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void storeu(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }

inline __mmask16 first_lanes(int64_t count) {
  return count >= kLanes ? (__mmask16)0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
}
// Lanes 0..count of p (count <= 0: none), the others zero; memory past them is not touched.
inline Vec load_n(const float* p, int64_t count) {
  return {_mm512_maskz_loadu_ps(first_lanes(count), p)};
}
inline void store_n(float* p, Vec a, int64_t count) {
  _mm512_mask_storeu_ps(p, first_lanes(count), a.v);
}

inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec add(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec sub(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec div(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Vec round(Vec a) {  // to the nearest integer, ties to even
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline Vec pow2(Vec n) {  // 2^n for integer n in [-126, 127]
  const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(biased, 23))};
}

// Bit j set where lane j of a > lane j of b (false for NaN), where lane j is NaN.
inline uint32_t greater_bits(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
inline uint32_t nan_bits(Vec a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q); }

// The lanes' sum by halving: lanes i and i + 8 first, then i and i + 4, i + 2, i + 1.
inline float reduce_add(Vec a) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a.v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
inline float reduce_max(Vec a) { return _mm512_reduce_max_ps(a.v); }

// Lane j of the result is the sum of the lanes of a[j], j < 16, by the same addition tree for
// every j (lanes of different registers are moved, never added together): within each
// 128-bit quarter (x0 + x2) + (x1 + x3), then the quarters (q0 + q2) + (q1 + q3).
inline Vec transpose_sum(const Vec* a) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; i++) {  // per quarter: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i].v, a[2 * i + 1].v),
                         _mm512_unpackhi_ps(a[2 * i].v, a[2 * i + 1].v));
  }
  for (int i = 0; i < 4; i++) {  // per quarter: that quarter's sums of 4 registers
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  }
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44),
                                  _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44),
                                  _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return {_mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD))};
}

#elif ONEPASS_SIMD_AVX2

constexpr int kLanes = 8;
constexpr int kRegisters = 16;

struct Vec {
  __m256 v;
};

inline Vec zero() { return {_mm256_setzero_ps()}; }
inline Vec set1(float x) { return {_mm256_set1_ps(x)}; }
inline Vec load(const float* p) { return {_mm256_load_ps(p)}; }  // p aligned to 32 bytes
inline Vec loadu(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void storeu(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }

inline __m256i first_lanes(int64_t count) {  // all ones in lanes 0..count
  const int n = count >= kLanes ? kLanes : count <= 0 ? 0 : static_cast<int>(count);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec load_n(const float* p, int64_t count) {
  if (count >= kLanes) return loadu(p);
  return {_mm256_maskload_ps(p, first_lanes(count))};
}
inline void store_n(float* p, Vec a, int64_t count) {
  if (count >= kLanes) return storeu(p, a);
  _mm256_maskstore_ps(p, first_lanes(count), a.v);
}

inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec sub(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec div(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
inline Vec round(Vec a) {
  return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline Vec pow2(Vec n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(biased, 23))};
}

inline uint32_t greater_bits(Vec a, Vec b) {
  return _mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ));
}
inline uint32_t nan_bits(Vec a) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)); }

// Halving: lanes i and i + 4, then i + 2, then i + 1.
inline float reduce_add(Vec a) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
inline float reduce_max(Vec a) {
  const __m128 q = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  const __m128 d = _mm_max_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_max_ss(d, _mm_movehdup_ps(d)));
}

// Lane j: the sum of the lanes of a[j], j < 8, by one tree for every j:
// ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)).
inline Vec transpose_sum(const Vec* a) {
  // Per 128-bit half: [a0 pair sums, a1 pair sums] of pairs (0 1) (2 3) / (4 5) (6 7).
  const __m256 t0 = _mm256_hadd_ps(a[0].v, a[1].v), t1 = _mm256_hadd_ps(a[2].v, a[3].v);
  const __m256 t2 = _mm256_hadd_ps(a[4].v, a[5].v), t3 = _mm256_hadd_ps(a[6].v, a[7].v);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // half sums
  return {_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31))};
}

#elif ONEPASS_SIMD_NEON

constexpr int kLanes = 4;
constexpr int kRegisters = 32;

struct Vec {
  float32x4_t v;
};

inline Vec zero() { return {vdupq_n_f32(0.0f)}; }
inline Vec set1(float x) { return {vdupq_n_f32(x)}; }
inline Vec load(const float* p) { return {vld1q_f32(p)}; }
inline Vec loadu(const float* p) { return {vld1q_f32(p)}; }
inline void storeu(float* p, Vec a) { vst1q_f32(p, a.v); }

inline Vec load_n(const float* p, int64_t count) {
  if (count >= kLanes) return loadu(p);
  float lanes[kLanes] = {};
  for (int64_t i = 0; i < count; i++) lanes[i] = p[i];
  return loadu(lanes);
}
inline void store_n(float* p, Vec a, int64_t count) {
  if (count >= kLanes) return storeu(p, a);
  float lanes[kLanes];
  storeu(lanes, a);
  for (int64_t i = 0; i < count; i++) p[i] = lanes[i];
}

inline Vec fmadd(Vec a, Vec b, Vec c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
inline Vec add(Vec a, Vec b) { return {vaddq_f32(a.v, b.v)}; }
inline Vec sub(Vec a, Vec b) { return {vsubq_f32(a.v, b.v)}; }
inline Vec mul(Vec a, Vec b) { return {vmulq_f32(a.v, b.v)}; }
inline Vec div(Vec a, Vec b) { return {vdivq_f32(a.v, b.v)}; }
inline Vec max(Vec a, Vec b) { return {vmaxq_f32(a.v, b.v)}; }
inline Vec min(Vec a, Vec b) { return {vminq_f32(a.v, b.v)}; }
inline Vec round(Vec a) { return {vrndnq_f32(a.v)}; }
inline Vec pow2(Vec n) {
  const int32x4_t biased = vaddq_s32(vcvtnq_s32_f32(n.v), vdupq_n_s32(127));
  return {vreinterpretq_f32_s32(vshlq_n_s32(biased, 23))};
}

inline uint32_t lane_bits(uint32x4_t all_ones) {
  const uint32x4_t bit = {1, 2, 4, 8};
  return vaddvq_u32(vandq_u32(all_ones, bit));
}
inline uint32_t greater_bits(Vec a, Vec b) { return lane_bits(vcgtq_f32(a.v, b.v)); }
inline uint32_t nan_bits(Vec a) { return lane_bits(vmvnq_u32(vceqq_f32(a.v, a.v))); }

// Halving: lanes i and i + 2, then i + 1.
inline float reduce_add(Vec a) {
  const float32x2_t d = vadd_f32(vget_low_f32(a.v), vget_high_f32(a.v));
  return vget_lane_f32(d, 0) + vget_lane_f32(d, 1);
}
inline float reduce_max(Vec a) { return vmaxvq_f32(a.v); }

// Lane j: the sum of the lanes of a[j], j < 4, as (x0 + x1) + (x2 + x3) for every j.
inline Vec transpose_sum(const Vec* a) {
  return {vpaddq_f32(vpaddq_f32(a[0].v, a[1].v), vpaddq_f32(a[2].v, a[3].v))};
}

#endif

// Asks for the cache line holding p: into L1 (prefetch_l1) or L2 (prefetch_l2).
inline void prefetch_l1(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// e^x per lane, by the same steps on every ISA: reduction to r in [-ln2/2, ln2/2] (x = n ln2 + r,
// ln2 in two parts), Cephes' degree-7 polynomial for e^r, then scaling by 2^n in two exact
// halves (n reaches +-128, past a normal float's exponent), so only the last product rounds.
// About 1 ulp; each lane depends only on its input.
inline Vec exp(Vec x) {
  x = max(min(x, set1(88.37626f)), set1(-88.37626f));
  const Vec n = round(mul(x, set1(1.44269504f)));
  Vec r = fmadd(n, set1(-0.693359375f), x);
  r = fmadd(n, set1(2.12194440e-4f), r);
  Vec p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  const Vec y = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  const Vec half = round(mul(n, set1(0.5f)));
  return mul(mul(y, pow2(half)), pow2(sub(n, half)));
}

}  // namespace onepass::simd
