// The int8 arithmetic's weight layouts (stored_gemm.cpp): GGUF's Q4_0, Q4_1 and Q8_0 blocks
// repacked so that integer dot products (int8_dot.h) multiply them by activations quantized to
// 8 bits, as llama.cpp computes. A row of activations is quantized per block of 32 values of k:
// xd = max|x| / 127, xq = round(x / xd) (ties to even), xs = xd * sum(xq); then per block
//   Q4_0  y += (d * xd) * (sum(q * xq) - 8 * sum(xq))
//   Q4_1  y += (d * xd) * sum(q * xq);  y += m * xs
//   Q8_0  y += (d * xd) * sum(q * xq)
// each `y +=` one FMA, blocks in order of k. The integer sums are exact, so the result depends
// on the row alone: a row of a multi-row product equals a one-row product bit for bit, and every
// ISA computes the same bits. It is not the float32 reference's arithmetic (the activations are
// rounded to 8 bits): an opt-in with its own reference (tests/test_int8.py).
//
// Layout. A packed block holds one tile's kTile columns for 32 values of k, the size of GGUF's
// block (so the weight stream stays the file's): d[kTile] fp16 | [Q4_1: m[kTile] fp16] | quants.
// The quants come as BVecs of 4 * kLanes bytes, register i of the tile (columns i * kLanes ..)
// and quad g (values 4g .. 4g + 3 of k): byte 4l + j is column i * kLanes + l, value 4g + j.
//   Q4_0, Q4_1: for i, for g < 4: one BVec whose low nibbles are quad g and high nibbles quad
//               g + 4 (values 16 + 4g ..), 16 * kTile bytes
//   Q8_0:       for i, for g < 8: one BVec of int8 quants, 32 * kTile bytes (with AVX-512 VNNI
//               offset by 128, as u8: int8_dot.h's kOffsetSigned)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "int8_dot.h"
#include "small_gemm.h"
#include "stored_formats.h"

namespace onepass::int8 {

using namespace simd;

constexpr int64_t kBlockValues = 32;
constexpr int64_t kQuadBytes = 4 * kLanes;  // one BVec
// Pseudo GGML type ids of the int8 layouts: the source format's id plus kTypeOffset.
constexpr int64_t kTypeOffset = 1000;

// An fp16 value as fp32 (exact; scalar, for widening single weights).
inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F;
  const uint32_t mantissa = h & 0x3FF;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal (or zero)
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    uint32_t bits = (exponent + 112) << 23 | mantissa << 13;
    std::memcpy(&magnitude, &bits, 4);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Where value v (0..31) of column c lies in a block's quants: its byte, and for 4-bit quants
// whether it is the high nibble.
inline int64_t quad_byte(int64_t quads_per_register, int64_t v, int64_t c) {
  const int64_t i = c / kLanes, l = c % kLanes, g = v / 4 % quads_per_register;
  return (i * quads_per_register + g) * kQuadBytes + 4 * l + v % 4;
}

// kMin: Q4_1's m; kOffset: Q4_0's 8; kSigned: int8 quants (Q8_0) rather than nibbles.
template <int64_t kSource, int64_t kGGUFBytes_, bool kMin, int kOffset, bool kSigned>
struct Format {
  static constexpr int64_t kType = kSource + kTypeOffset, kGGUFValues = 32, kGGUFBytes = kGGUFBytes_;
  static constexpr int64_t kValues = kBlockValues;
  static constexpr int64_t kScaleBytes = (kMin ? 4 : 2) * kTile;
  static constexpr int64_t kBytes = kScaleBytes + (kSigned ? 32 : 16) * kTile;
  static constexpr bool kHasMin = kMin, kIsSigned = kSigned;
  // Signed quants offset by 128 where the ISA multiplies u8 weights faster (kOffsetSigned).
  static constexpr bool kOffsetQuants = kSigned && kOffsetSigned;
  static constexpr uint8_t kStoredOffset = kOffsetQuants ? 0x80 : 0;  // added mod 256 (xor)
  // What the block's integer sum is less, per unit of sum(xq).
  static constexpr int kQuantOffset = kOffsetQuants ? 128 : kOffset;
  static constexpr int64_t kQuads = kSigned ? 8 : 4;  // BVecs per register of the tile

  // Block b of a GGUF row as column c of the packed block out (zeroed before).
  static void pack(const uint8_t* row, int64_t b, int64_t, int64_t c, uint8_t* out) {
    const uint8_t* in = row + b * kGGUFBytes;
    std::memcpy(out + 2 * c, in, 2);
    if (kMin) std::memcpy(out + 2 * kTile + 2 * c, in + 2, 2);
    uint8_t* quants = out + kScaleBytes;
    for (int64_t v = 0; v < kValues; v++) {
      if (kSigned) {
        quants[quad_byte(kQuads, v, c)] = in[2 + v] ^ kStoredOffset;
      } else {  // GGUF: value v < 16 the low nibble of byte v, value 16 + v its high nibble
        const uint8_t q = (in[(kMin ? 4 : 2) + v % 16] >> (v < 16 ? 0 : 4)) & 0x0F;
        quants[quad_byte(kQuads, v, c)] |= static_cast<uint8_t>(q << (v < 16 ? 0 : 4));
      }
    }
  }

  // Weight v of column c as fp32: the value the float32 path widens it to (stored_formats.h),
  // for embedding lookups and tests.
  static float value(const uint8_t* s, int64_t v, int64_t c) {
    const float d = half_to_float(s + 2 * c);
    const uint8_t byte = s[kScaleBytes + quad_byte(kQuads, v, c)];
    if (kSigned) return static_cast<float>(static_cast<int8_t>(byte ^ kStoredOffset)) * d;
    const int q = (v < 16 ? byte : byte >> 4) & 0x0F;
    if (kMin) return std::fma(d, static_cast<float>(q), half_to_float(s + 2 * kTile + 2 * c));
    return d * static_cast<float>(q - kOffset);
  }
};

using Q4_0 = Format<2, 18, false, 8, false>;
using Q4_1 = Format<3, 20, true, 0, false>;
using Q8_0 = Format<8, 34, false, 0, true>;

// The int8 layout of GGML type `type`, if it has one.
inline bool has_layout(int64_t type) { return type == 2 || type == 3 || type == 8; }

// Calls fn(F{}) with the int8 format whose (pseudo) type id is `type`; false if there is none.
template <class Fn>
bool with_format(int64_t type, Fn&& fn) {
  return stored::with_one_of<Q4_0, Q4_1, Q8_0>(type, fn);
}

}  // namespace onepass::int8
