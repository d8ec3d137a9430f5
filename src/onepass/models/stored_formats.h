// The weight formats stored_gemm.cpp keeps as stored: GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the
// K-quants Q4_K, Q5_K, Q6_K, and half precision (F16, BF16; also a Hugging Face model's bf16 /
// fp16 safetensors). For each: the layout its blocks are repacked into per GEMM tile, the
// repacking from GGUF's blocks, and the widening of a tile's row of weights to fp32 registers.
//
// Exactness. Each widening computes, per weight, exactly the value of the `gguf` package's
// dequantization (gguf/quants.py), by the same operations in the same order:
//   Q4_0  d * (q - 8)             Q4_1  (d * q) + m        Q8_0  q * d
//   Q5_0  d * (q - 16)            Q5_1  (d * q) + m
//   Q4_K, Q5_K  (d * sc) * q - (dmin * m), sc and m the sub-block's 6-bit scale and min
//   Q6_K  (d * sc) * (q - 32), sc an int8 scale per 16 values
//   F16   the fp16 value          BF16  the 16 bits over a zero low half
// d, m, dmin are fp16 converted to fp32 first, quants are small integers (exact in fp32). Every
// product is exact in fp32: d has at most 11 significant bits, an int8 at most 7, so d * q
// (Q8_0's int8 q bounds the legacy formats' quants) has at most 18, and d * sc * q at most
// 11 + 7 + 5 = 23 (sc: 6 bits or Q6_K's int8; q: -32..31), never rounded (fp16's exponents
// times these integers stay inside fp32's normal range). So `mul` computes the reference's
// products exactly, and where the reference adds a term after a product (Q4_1, Q5_1, the
// K-quants' min) fmadd(a, b, c) rounds the exact a * b + c once: the reference's one rounding,
// of its addition (tests/test_stored_weights.py checks these products exhaustively).
//
// Layout. A packed block holds one tile's kTile columns for kValues values of k (a GGUF block;
// 32 for half precision), split into groups of kGroupValues rows sharing their scales:
//   Q4_0  d[kTile] | n[32]                                   18 bytes per column
//   Q4_1  d[kTile] | m[kTile] | n[32]                        20
//   Q5_0  d[kTile] | h[kTile] | n[32]                        22
//   Q5_1  d[kTile] | m[kTile] | h[kTile] | n[32]             24
//   Q8_0  d[kTile] | q[32][kTile] int8                       34
//   Q4_K  d | dmin | sc[8][kTile] | m[8][kTile] | n[256]                  148 per 256 values
//   Q5_K  d | dmin | sc[8][kTile] | m[8][kTile] | h[8][kTile] | n[256]    180
//   Q6_K  d | sc[16][kTile] int8 | h[16][kTile] | n[256]                  210
//   F16, BF16  v[32][kTile] 16-bit values                                  64 per 32 values
// where d, m, dmin are fp16 per column, sc and m bytes per column, n[rows] the low 4 bits of
// each quant as kLanes bytes per row (byte j holds column j in its low nibble and column
// kLanes + j in its high one: one load, an and and a shift give the tile's two registers), and
// h one 32-bit word per column and group holding the high bits of its quants, row j's at bit
// (bits per quant - 4) * j. The sizes are GGUF's own (Q4_K, Q5_K: 4 bytes more per 256 values,
// the 6-bit scales spread to bytes), so the weight stream stays the file's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "small_gemm.h"
#include "widen.h"

namespace onepass::stored {

using namespace simd;
static_assert(kTileRegisters == 2, "a nibble byte holds the columns of the tile's two registers");

// ---- Repacking helpers (scalar, at load) ----------------------------------------------------

inline void put_half(uint8_t* halves, int64_t c, const uint8_t* value) {
  std::memcpy(halves + 2 * c, value, 2);
}
// Quant q's low 4 bits as row j, column c of the nibble rows n.
inline void put_nibble(uint8_t* n, int64_t j, int64_t c, uint32_t q) {
  n[j * kLanes + c % kLanes] |= static_cast<uint8_t>((q & 0x0F) << (c < kLanes ? 0 : 4));
}
// Quant q's bits from bit 4 on as row j of column c's word of high bits (kBits per row).
template <int kBits>
inline void put_high(uint8_t* words, int64_t j, int64_t c, uint32_t q) {
  uint32_t word;
  std::memcpy(&word, words + 4 * c, 4);
  word |= (q >> 4) << (kBits * j);
  std::memcpy(words + 4 * c, &word, 4);
}
// Value v's 4-bit quant in GGUF's legacy blocks: value j < 16 is the low nibble of byte j,
// value 16 + j its high nibble.
inline uint32_t legacy_nibble(const uint8_t* qs, int64_t v) { return (qs[v % 16] >> (v < 16 ? 0 : 4)) & 0x0F; }
// Value v's high bit in Q5_0 / Q5_1's little-endian 32-bit qh.
inline uint32_t legacy_high_bit(const uint8_t* qh, int64_t v) { return (qh[v / 8] >> (v % 8)) & 1; }

// Sub-block s's 6-bit scale and min from Q4_K / Q5_K's 12 scale bytes (gguf's get_scale_min):
// bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3, bytes 8-11 the low 4 bits
// of scales (low nibble) and mins (high nibble) 4-7, whose top 2 bits are the top 2 bits of
// bytes 0-3 (scales) and 4-7 (mins).
inline void scale_min(const uint8_t* q, int64_t s, uint32_t& sc, uint32_t& m) {
  if (s < 4) {
    sc = q[s] & 0x3F;
    m = q[s + 4] & 0x3F;
  } else {
    sc = (q[s + 4] & 0x0F) | ((q[s - 4] >> 2) & 0x30);
    m = (q[s + 4] >> 4) | ((q[s] >> 2) & 0x30);
  }
}

// ---- Widening helpers (in registers) --------------------------------------------------------

// kTileRegisters fp16 values per column (a tile's d, m or dmin) as fp32.
inline void load_halves(const uint8_t* p, Vec* out) {
  for (int i = 0; i < kTileRegisters; i++) out[i] = load_half(reinterpret_cast<const uint16_t*>(p) + i * kLanes);
}
// Row j's low 4 bits of the quants from the nibble rows n, as 32-bit lanes per register.
inline void low_bits(const uint8_t* n, int64_t j, IVec* q) {
  const IVec bytes = load_u8(n + j * kLanes);
  q[0] = bits_and(bytes, 0x0F);
  q[1] = shr(bytes, 4);
}
// Row j's high bits (kBits per row in the words h) on top of its low 4 bits q: shifted down to
// bit 0, up to the top of the word (dropping the other rows' bits), then down to bit 4. Shifts
// by scalar counts need no register, where a mask would (on AVX2 it costs an accumulator).
template <int kBits>
inline void add_high_bits(const IVec* h, int64_t j, IVec* q) {
  const int row = kBits * static_cast<int>(j);
  for (int i = 0; i < kTileRegisters; i++) {
    q[i] = bits_or(q[i], shr(shl(shr(h[i], row), 32 - kBits), 28 - kBits));
  }
}
inline void load_words(const uint8_t* p, IVec* out) {
  for (int i = 0; i < kTileRegisters; i++) out[i] = load_u32(reinterpret_cast<const uint32_t*>(p) + i * kLanes);
}
// Per column, the product of fp16 values at `halves` and the bytes at `bytes` (u8 or int8): the
// K-quants' sub-block scales d * sc (exact).
template <bool kSigned>
inline void scaled(const uint8_t* halves, const uint8_t* bytes, Vec* out) {
  Vec d[kTileRegisters];
  load_halves(halves, d);
  for (int i = 0; i < kTileRegisters; i++) {
    const IVec b = kSigned ? load_s8(reinterpret_cast<const int8_t*>(bytes) + i * kLanes)
                           : load_u8(bytes + i * kLanes);
    out[i] = mul(d[i], to_float(b));
  }
}

// ---- The formats ----------------------------------------------------------------------------
//
// Each: kType (its GGML type id), kGGUFValues and kGGUFBytes (GGUF's block), kValues (k values
// per packed block), kGroupValues (rows per group of scales), kBytes (packed bytes per tile and
// block), kLive (registers a group holds across its rows, widened weights included); group(s, g)
// the scales of group g of the packed block s, whose widen(j, w) gives row j of the group as
// the tile's registers w; pack(row, b, K, c, out) repacks block b of a GGUF row (K values) as
// column c of the packed block out (zeroed before).

struct Q4_0 {
  static constexpr int64_t kType = 2, kGGUFValues = 32, kGGUFBytes = 18;
  static constexpr int64_t kValues = 32, kGroupValues = 32, kBytes = 18 * kTile;
  static constexpr int kLive = 2 * kTileRegisters;  // d, w

  struct Group {
    Vec d[kTileRegisters];
    const uint8_t* n;
    void widen(int64_t j, Vec* w) const {
      IVec q[kTileRegisters];
      low_bits(n, j, q);
      for (int i = 0; i < kTileRegisters; i++) w[i] = mul(d[i], to_float(sub(q[i], 8)));
    }
  };
  static Group group(const uint8_t* s, int64_t) {
    Group g;
    load_halves(s, g.d);
    g.n = s + 2 * kTile;
    return g;
  }
  static void pack(const uint8_t* row, int64_t b, int64_t, int64_t c, uint8_t* out) {
    const uint8_t* in = row + b * kGGUFBytes;
    put_half(out, c, in);
    for (int64_t v = 0; v < kValues; v++) put_nibble(out + 2 * kTile, v, c, legacy_nibble(in + 2, v));
  }
};

struct Q4_1 {
  static constexpr int64_t kType = 3, kGGUFValues = 32, kGGUFBytes = 20;
  static constexpr int64_t kValues = 32, kGroupValues = 32, kBytes = 20 * kTile;
  static constexpr int kLive = 3 * kTileRegisters;  // d, m, w

  struct Group {
    Vec d[kTileRegisters], m[kTileRegisters];
    const uint8_t* n;
    void widen(int64_t j, Vec* w) const {
      IVec q[kTileRegisters];
      low_bits(n, j, q);
      for (int i = 0; i < kTileRegisters; i++) w[i] = fmadd(d[i], to_float(q[i]), m[i]);
    }
  };
  static Group group(const uint8_t* s, int64_t) {
    Group g;
    load_halves(s, g.d);
    load_halves(s + 2 * kTile, g.m);
    g.n = s + 4 * kTile;
    return g;
  }
  static void pack(const uint8_t* row, int64_t b, int64_t, int64_t c, uint8_t* out) {
    const uint8_t* in = row + b * kGGUFBytes;
    put_half(out, c, in);
    put_half(out + 2 * kTile, c, in + 2);
    for (int64_t v = 0; v < kValues; v++) put_nibble(out + 4 * kTile, v, c, legacy_nibble(in + 4, v));
  }
};

struct Q5_0 {
  static constexpr int64_t kType = 6, kGGUFValues = 32, kGGUFBytes = 22;
  static constexpr int64_t kValues = 32, kGroupValues = 32, kBytes = 22 * kTile;
  static constexpr int kLive = 3 * kTileRegisters;  // d, h, w

  struct Group {
    Vec d[kTileRegisters];
    IVec h[kTileRegisters];
    const uint8_t* n;
    void widen(int64_t j, Vec* w) const {
      IVec q[kTileRegisters];
      low_bits(n, j, q);
      add_high_bits<1>(h, j, q);
      for (int i = 0; i < kTileRegisters; i++) w[i] = mul(d[i], to_float(sub(q[i], 16)));
    }
  };
  static Group group(const uint8_t* s, int64_t) {
    Group g;
    load_halves(s, g.d);
    load_words(s + 2 * kTile, g.h);
    g.n = s + 6 * kTile;
    return g;
  }
  static void pack(const uint8_t* row, int64_t b, int64_t, int64_t c, uint8_t* out) {
    const uint8_t* in = row + b * kGGUFBytes;
    put_half(out, c, in);
    for (int64_t v = 0; v < kValues; v++) {
      const uint32_t q = legacy_nibble(in + 6, v) | legacy_high_bit(in + 2, v) << 4;
      put_nibble(out + 6 * kTile, v, c, q);
      put_high<1>(out + 2 * kTile, v, c, q);
    }
  }
};

struct Q5_1 {
  static constexpr int64_t kType = 7, kGGUFValues = 32, kGGUFBytes = 24;
  static constexpr int64_t kValues = 32, kGroupValues = 32, kBytes = 24 * kTile;
  static constexpr int kLive = 4 * kTileRegisters;  // d, m, h, w

  struct Group {
    Vec d[kTileRegisters], m[kTileRegisters];
    IVec h[kTileRegisters];
    const uint8_t* n;
    void widen(int64_t j, Vec* w) const {
      IVec q[kTileRegisters];
      low_bits(n, j, q);
      add_high_bits<1>(h, j, q);
      for (int i = 0; i < kTileRegisters; i++) w[i] = fmadd(d[i], to_float(q[i]), m[i]);
    }
  };
  static Group group(const uint8_t* s, int64_t) {
    Group g;
    load_halves(s, g.d);
    load_halves(s + 2 * kTile, g.m);
    load_words(s + 4 * kTile, g.h);
    g.n = s + 8 * kTile;
    return g;
  }
  static void pack(const uint8_t* row, int64_t b, int64_t, int64_t c, uint8_t* out) {
    const uint8_t* in = row + b * kGGUFBytes;
    put_half(out, c, in);
    put_half(out + 2 * kTile, c, in + 2);
    for (int64_t v = 0; v < kValues; v++) {
      const uint32_t q = legacy_nibble(in + 8, v) | legacy_high_bit(in + 4, v) << 4;
      put_nibble(out + 8 * kTile, v, c, q);
      put_high<1>(out + 4 * kTile, v, c, q);
    }
  }
};

struct Q8_0 {
  static constexpr int64_t kType = 8, kGGUFValues = 32, kGGUFBytes = 34;
  static constexpr int64_t kValues = 32, kGroupValues = 32, kBytes = 34 * kTile;
  static constexpr int kLive = 2 * kTileRegisters;  // d, w

  struct Group {
    Vec d[kTileRegisters];
    const int8_t* q;
    void widen(int64_t j, Vec* w) const {
      for (int i = 0; i < kTileRegisters; i++) {
        w[i] = mul(to_float(load_s8(q + j * kTile + i * kLanes)), d[i]);
      }
    }
  };
  static Group group(const uint8_t* s, int64_t) {
    Group g;
    load_halves(s, g.d);
    g.q = reinterpret_cast<const int8_t*>(s + 2 * kTile);
    return g;
  }
  static void pack(const uint8_t* row, int64_t b, int64_t, int64_t c, uint8_t* out) {
    const uint8_t* in = row + b * kGGUFBytes;
    put_half(out, c, in);
    for (int64_t v = 0; v < kValues; v++) out[2 * kTile + v * kTile + c] = in[2 + v];
  }
};

// Q4_K and Q5_K: super-blocks of 256 values, 8 sub-blocks of 32 with a 6-bit scale and min each;
// GGUF's block: d, dmin (fp16), 12 bytes of scales and mins, [Q5_K: qh[32], bit s of byte i the
// high bit of value i of sub-block s], qs[128] (value i of sub-block s: byte 32 * (s / 2) + i,
// low nibble for even s, high for odd).
template <int64_t kTypeId, int kBits>
struct KQuant {
  static constexpr bool kHigh = kBits > 4;
  static constexpr int64_t kType = kTypeId, kGGUFValues = 256;
  static constexpr int64_t kGGUFBytes = kHigh ? 176 : 144;
  static constexpr int64_t kValues = 256, kGroupValues = 32, kGroups = 8;
  static constexpr int64_t kScales = 4 * kTile;                  // after d, dmin
  static constexpr int64_t kMins = kScales + kGroups * kTile;
  static constexpr int64_t kWords = kMins + kGroups * kTile;     // Q5_K's high bits
  static constexpr int64_t kNibbles = kWords + (kHigh ? 4 * kGroups * kTile : 0);
  static constexpr int64_t kBytes = kNibbles + kValues * kLanes;
  static constexpr int kLive = (kHigh ? 4 : 3) * kTileRegisters;  // d * sc, -(dmin * m), h, w

  struct Group {
    Vec d[kTileRegisters], neg_min[kTileRegisters];
    IVec h[kTileRegisters];
    const uint8_t* n;
    void widen(int64_t j, Vec* w) const {
      IVec q[kTileRegisters];
      low_bits(n, j, q);
      if constexpr (kHigh) add_high_bits<1>(h, j, q);
      // gguf: (d * sc) * q - (dmin * m); the product is exact, the subtraction rounds once.
      for (int i = 0; i < kTileRegisters; i++) w[i] = fmadd(d[i], to_float(q[i]), neg_min[i]);
    }
  };
  static Group group(const uint8_t* s, int64_t g) {
    Group out;
    scaled<false>(s, s + kScales + g * kTile, out.d);
    scaled<false>(s + 2 * kTile, s + kMins + g * kTile, out.neg_min);
    for (int i = 0; i < kTileRegisters; i++) out.neg_min[i] = mul(out.neg_min[i], set1(-1.0f));
    if constexpr (kHigh) load_words(s + kWords + 4 * g * kTile, out.h);
    out.n = s + kNibbles + g * kGroupValues * kLanes;
    return out;
  }
  static void pack(const uint8_t* row, int64_t b, int64_t, int64_t c, uint8_t* out) {
    const uint8_t* in = row + b * kGGUFBytes;
    const uint8_t* qh = in + 16;
    const uint8_t* qs = in + 16 + (kHigh ? 32 : 0);
    put_half(out, c, in);
    put_half(out + 2 * kTile, c, in + 2);
    for (int64_t g = 0; g < kGroups; g++) {
      uint32_t sc, m;
      scale_min(in + 4, g, sc, m);
      out[kScales + g * kTile + c] = static_cast<uint8_t>(sc);
      out[kMins + g * kTile + c] = static_cast<uint8_t>(m);
      for (int64_t i = 0; i < kGroupValues; i++) {
        uint32_t q = (qs[32 * (g / 2) + i] >> (g % 2 == 0 ? 0 : 4)) & 0x0F;
        if constexpr (kHigh) q |= ((qh[i] >> g) & 1) << 4;
        put_nibble(out + kNibbles, g * kGroupValues + i, c, q);
        if constexpr (kHigh) put_high<1>(out + kWords + 4 * g * kTile, i, c, q);
      }
    }
  }
};
using Q4_K = KQuant<12, 4>;
using Q5_K = KQuant<13, 5>;

// Q6_K: super-blocks of 256 values, 16 groups of 16 with an int8 scale each; GGUF's block:
// ql[128] (value 128 h + 64 t + i, i < 64: nibble t of byte 64 h + i), qh[64] (value
// 128 h + 32 u + i, i < 32: bits 2u, 2u + 1 of byte 32 h + i), scales[16] int8, d (fp16).
struct Q6_K {
  static constexpr int64_t kType = 14, kGGUFValues = 256, kGGUFBytes = 210;
  static constexpr int64_t kValues = 256, kGroupValues = 16, kGroups = 16;
  static constexpr int64_t kScales = 2 * kTile;
  static constexpr int64_t kWords = kScales + kGroups * kTile;
  static constexpr int64_t kNibbles = kWords + 4 * kGroups * kTile;
  static constexpr int64_t kBytes = kNibbles + kValues * kLanes;
  static constexpr int kLive = 3 * kTileRegisters;  // d * sc, h, w

  struct Group {
    Vec d[kTileRegisters];
    IVec h[kTileRegisters];
    const uint8_t* n;
    void widen(int64_t j, Vec* w) const {
      IVec q[kTileRegisters];
      low_bits(n, j, q);
      add_high_bits<2>(h, j, q);
      for (int i = 0; i < kTileRegisters; i++) w[i] = mul(d[i], to_float(sub(q[i], 32)));
    }
  };
  static Group group(const uint8_t* s, int64_t g) {
    Group out;
    scaled<true>(s, s + kScales + g * kTile, out.d);
    load_words(s + kWords + 4 * g * kTile, out.h);
    out.n = s + kNibbles + g * kGroupValues * kLanes;
    return out;
  }
  static void pack(const uint8_t* row, int64_t b, int64_t, int64_t c, uint8_t* out) {
    const uint8_t* in = row + b * kGGUFBytes;
    const uint8_t *ql = in, *qh = in + 128, *scales = in + 192;
    put_half(out, c, in + 208);
    for (int64_t g = 0; g < kGroups; g++) out[kScales + g * kTile + c] = scales[g];
    for (int64_t v = 0; v < kValues; v++) {
      const int64_t h = v / 128, t = (v % 128) / 64, u = (v % 128) / 32;
      const uint32_t low = (ql[64 * h + v % 64] >> (4 * t)) & 0x0F;
      const uint32_t high = (qh[32 * h + v % 32] >> (2 * u)) & 0x03;
      const uint32_t q = low | high << 4;
      put_nibble(out + kNibbles, v, c, q);
      put_high<2>(out + kWords + 4 * (v / kGroupValues) * kTile, v % kGroupValues, c, q);
    }
  }
};

// Half precision: 16-bit values, packed in blocks of 32 rows of the tile (the last block of a
// row whose length is not a multiple of 32 is padded with zeros, which the kernel never reads).
template <int64_t kTypeId, bool kBrain>
struct Half {
  static constexpr int64_t kType = kTypeId, kGGUFValues = 1, kGGUFBytes = 2;
  static constexpr int64_t kValues = 32, kGroupValues = 32, kBytes = 2 * kValues * kTile;
  static constexpr int kLive = kTileRegisters;  // w

  struct Group {
    const uint16_t* v;
    void widen(int64_t j, Vec* w) const {
      for (int i = 0; i < kTileRegisters; i++) {
        w[i] = kBrain ? load_bf16(v + j * kTile + i * kLanes) : load_half(v + j * kTile + i * kLanes);
      }
    }
  };
  static Group group(const uint8_t* s, int64_t) { return {reinterpret_cast<const uint16_t*>(s)}; }
  static void pack(const uint8_t* row, int64_t b, int64_t K, int64_t c, uint8_t* out) {
    const int64_t first = b * kValues, count = std::min(kValues, K - first);
    for (int64_t v = 0; v < count; v++) std::memcpy(out + 2 * (v * kTile + c), row + 2 * (first + v), 2);
  }
};
using F16 = Half<1, false>;
using BF16 = Half<30, true>;

// Calls fn(F{}) with the one of Formats whose kType is `type`; false if there is none.
template <class... Formats, class Fn>
bool with_one_of(int64_t type, Fn&& fn) {
  return ((Formats::kType == type ? (fn(Formats{}), true) : false) || ...);
}

// Calls fn(F{}) with the format F whose GGML type id is `type`; false if there is none.
template <class Fn>
bool with_format(int64_t type, Fn&& fn) {
  return with_one_of<Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16>(type, fn);
}

}  // namespace onepass::stored
