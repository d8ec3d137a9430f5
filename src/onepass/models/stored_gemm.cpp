// y = x @ W.T for a few rows x against a weight W kept in its GGUF format (Q8_0, Q4_1), widened
// to fp32 in registers (simd.h, widen.h).
//
// Why: a decoding step streams every weight; the default model's Q4_1 blocks are 5 bits a
// weight against fp32's 32. The widened values are exactly those of the `gguf` package's
// dequantization (gguf.quants: Q8_0 = d * q, Q4_1 = (d * q) + m, d and m fp16 -> fp32), and each
// output then sums its K products in order with one FMA each, starting from zero, as
// small_gemm.cpp does: the result equals small_gemm on the dequantized weight bit for bit, and a
// row does not depend on the other rows.
//
// Exactness of the widening: fp16 -> fp32 and int -> fp32 conversions are exact. d has at most
// 11 significant bits and q at most 8 (Q8_0) or 4 (Q4_1), so d * q is exact in fp32 (24 bits);
// then Q8_0's mul(d, q) is that exact product, and Q4_1's fmadd(d, q, m) rounds d * q + m once,
// as numpy's (d * q) + m does (its product rounds to itself).
//
// RMSNorm weights g folded into a projection (llama.py: W * g, one rounding per weight) come
// along as a column scale: the widened weight is multiplied by g[k], the same rounding.
//
// Layout (stored_pack): per tile of kTile output columns, per block of 32 values of k:
//   Q8_0: d[kTile] fp16 | q[32][kTile] int8                                  34 * kTile bytes
//   Q4_1: d[kTile] fp16 | m[kTile] fp16 | q[32][kLanes] bytes                20 * kTile bytes
// Q4_1's byte j of row k holds column j in its low nibble and column kLanes + j in its high
// nibble: one load and an and / a shift widen the tile's two registers. The kernel reads a
// tile's blocks in k order, a contiguous stream, as it reads small_gemm's fp32 tiles; a block's
// scales stay in registers for its 32 rows. The packed tensor is [tiles][K / 32][block bytes],
// int8 for Q8_0 and uint8 for Q4_1: its dtype names its format.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>

#include "small_gemm.h"
#include "stored_gemm.h"
#include "widen.h"

namespace {

using namespace onepass::simd;
using onepass::kTile;
using onepass::kTileRegisters;

constexpr int64_t kBlock = 32;      // k values per GGUF block
constexpr int64_t kLineBytes = 64;  // a cache line

struct Q8Tile {
  static constexpr int64_t kBytes = 34 * kTile;
  static constexpr int kLive = 2 * kTileRegisters;  // registers held across a block: d, w

  const uint8_t* p;  // the chunk's first block

  struct Block {
    Vec d[kTileRegisters];
    const int8_t* q;
    void widen(int64_t j, Vec* w) const {
      for (int i = 0; i < kTileRegisters; i++) w[i] = mul(d[i], load_i8(q + j * kTile + i * kLanes));
    }
  };
  Block block(int64_t b) const {
    const uint8_t* s = p + b * kBytes;
    Block out;
    for (int i = 0; i < kTileRegisters; i++) {
      out.d[i] = load_half(reinterpret_cast<const uint16_t*>(s) + i * kLanes);
    }
    out.q = reinterpret_cast<const int8_t*>(s + 2 * kTile);
    return out;
  }
};

struct Q41Tile {
  static constexpr int64_t kBytes = 20 * kTile;
  static constexpr int kLive = 3 * kTileRegisters;  // d, m, w

  const uint8_t* p;

  struct Block {
    Vec d[kTileRegisters], m[kTileRegisters];
    const uint8_t* q;
    void widen(int64_t j, Vec* w) const {
      static_assert(kTileRegisters == 2, "a byte holds the tile's two registers' nibbles");
      Vec lo, hi;
      load_nibbles(q + j * kLanes, lo, hi);
      w[0] = fmadd(d[0], lo, m[0]);
      w[1] = fmadd(d[1], hi, m[1]);
    }
  };
  Block block(int64_t b) const {
    const uint8_t* s = p + b * kBytes;
    const auto* half = reinterpret_cast<const uint16_t*>(s);
    Block out;
    for (int i = 0; i < kTileRegisters; i++) {
      out.d[i] = load_half(half + i * kLanes);
      out.m[i] = load_half(half + kTile + i * kLanes);
    }
    out.q = s + 4 * kTile;
    return out;
  }
};

// Rows x[0..R) (row stride K) times blocks 0..blocks of a tile chunk, accumulated into
// y[0..R)[0..cols) (row stride ldy); g: the chunk's column scales or null. FIRST: start from
// zero. PREFETCH: fetch the chunks `ahead` bytes on meanwhile (toward L1, and twice as far
// toward L2). The arithmetic per output is small_gemm.cpp's block(), weight for weight.
template <class Tile, int R, bool FIRST, bool PREFETCH>
void block(const float* x, Tile tile, const float* g, float* y, int64_t blocks, int64_t K,
           int64_t ldy, int64_t cols, int64_t ahead) {
  Vec acc[R][kTileRegisters];
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < kTileRegisters; i++) {
      acc[r][i] = FIRST ? zero() : load_n(y + r * ldy + i * kLanes, cols - i * kLanes);
    }
  }
  for (int64_t b = 0; b < blocks; b++) {
    if (PREFETCH) {
      const auto* s = reinterpret_cast<const char*>(tile.p + b * Tile::kBytes);
      for (int64_t o = 0; o < Tile::kBytes; o += kLineBytes) {
        prefetch_l1(s + ahead + o);
        prefetch_l2(s + 2 * ahead + o);
      }
    }
    const auto weights = tile.block(b);
    for (int64_t j = 0; j < kBlock; j++) {
      const int64_t k = b * kBlock + j;
      Vec w[kTileRegisters];
      weights.widen(j, w);
      if (g != nullptr) {
        const Vec scale = set1(g[k]);
        for (int i = 0; i < kTileRegisters; i++) w[i] = mul(w[i], scale);
      }
      for (int r = 0; r < R; r++) {
        const Vec xr = set1(x[r * K + k]);
        for (int i = 0; i < kTileRegisters; i++) acc[r][i] = fmadd(xr, w[i], acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < kTileRegisters; i++) {
      store_n(y + r * ldy + i * kLanes, acc[r][i], cols - i * kLanes);
    }
  }
}

template <class Tile>
struct Kernel {
  // Rows per block: the accumulators, the block's live registers (scales, widened weights),
  // the broadcast row value and the column scale. AVX-512: 12 (Q4_1), 13 (Q8_0); AVX2: 4, 5.
  static constexpr int kMaxRows = (kRegisters - Tile::kLive - 2) / kTileRegisters;
  // Blocks per chunk: about 16 KB, which the first block of rows pulls from memory and the
  // other blocks read from L1.
  static constexpr int64_t kChunkBlocks = std::max<int64_t>(1, 16384 / Tile::kBytes);

  using Fn = void (*)(const float*, Tile, const float*, float*, int64_t, int64_t, int64_t,
                      int64_t, int64_t);

  template <int R>
  static constexpr std::array<Fn, 4> variants() {
    return {block<Tile, R, true, true>, block<Tile, R, false, true>, block<Tile, R, true, false>,
            block<Tile, R, false, false>};
  }
  template <int... I>
  static constexpr auto table(std::integer_sequence<int, I...>) {
    return std::array<std::array<Fn, 4>, sizeof...(I)>{variants<I + 1>()...};
  }
  static constexpr auto kBlocks = table(std::make_integer_sequence<int, kMaxRows>{});

  // y [M, N] = x [M, K] @ W.T; packed: [tiles][K / 32][Tile::kBytes]; g: [K] or null.
  static void run(const float* xp, const uint8_t* wp, const float* g, float* yp, int64_t M,
                  int64_t K, int64_t N, int64_t tiles) {
    const int64_t nb = K / kBlock;
    const int64_t row_blocks = (M + kMaxRows - 1) / kMaxRows;
    const int64_t ahead = kChunkBlocks * Tile::kBytes;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; t++) {
        const uint8_t* wt = wp + t * nb * Tile::kBytes;
        const int64_t cols = std::min(kTile, N - t * kTile);
        for (int64_t b0 = 0; b0 < nb; b0 += kChunkBlocks) {
          const int64_t bc = std::min(kChunkBlocks, nb - b0), k0 = b0 * kBlock;
          const Tile chunk{wt + b0 * Tile::kBytes};
          int64_t r0 = 0;
          for (int64_t rb = 0; rb < row_blocks; rb++) {
            const int64_t r1 = std::min<int64_t>(r0 + kMaxRows, M);
            const int variant = (b0 == 0 ? 0 : 1) + (rb == 0 ? 0 : 2);
            kBlocks[r1 - r0 - 1][variant](xp + r0 * K + k0, chunk, g ? g + k0 : nullptr,
                                          yp + r0 * N + t * kTile, bc, K, N, cols, ahead);
            r0 = r1;
          }
        }
      }
    });
  }
};

int64_t block_bytes(onepass::StoredFormat format) {
  return format == onepass::StoredFormat::kQ8_0 ? Q8Tile::kBytes : Q41Tile::kBytes;
}

// GGUF's bytes per block of 32 values.
int64_t gguf_block_bytes(onepass::StoredFormat format) {
  return format == onepass::StoredFormat::kQ8_0 ? 34 : 20;
}

}  // namespace

namespace onepass {

std::optional<StoredFormat> stored_format(const at::Tensor& packed) {
  if (packed.dim() != 3) return std::nullopt;
  if (packed.scalar_type() == at::kChar && packed.size(2) == Q8Tile::kBytes) {
    return StoredFormat::kQ8_0;
  }
  if (packed.scalar_type() == at::kByte && packed.size(2) == Q41Tile::kBytes) {
    return StoredFormat::kQ4_1;
  }
  return std::nullopt;
}

StoredFormat format_of(int64_t ggml_type) {
  TORCH_CHECK(ggml_type == 8 || ggml_type == 3, "stored weights: GGML type ", ggml_type,
              " is not supported (Q8_0 = 8, Q4_1 = 3)");
  return ggml_type == 8 ? StoredFormat::kQ8_0 : StoredFormat::kQ4_1;
}

// raw: a GGUF tensor's blocks, uint8 [rows][K / 32 * block bytes]; order: the raw row of each
// output column (None: 0..rows). Returns the tiled layout stored_gemm reads.
at::Tensor stored_pack(const at::Tensor& raw_in, int64_t ggml_type,
                       const std::optional<at::Tensor>& order_in) {
  const StoredFormat format = format_of(ggml_type);
  TORCH_CHECK(raw_in.dim() == 2 && raw_in.scalar_type() == at::kByte && raw_in.device().is_cpu(),
              "raw blocks must be a 2-D uint8 CPU tensor");
  const auto raw = raw_in.contiguous();
  const int64_t gb = gguf_block_bytes(format), nb = raw.size(1) / gb;
  TORCH_CHECK(raw.size(1) == nb * gb, "a raw row is not a whole number of blocks");
  const auto order =
      order_in ? order_in->to(at::kLong).contiguous() : at::arange(raw.size(0), at::kLong);
  const int64_t N = order.size(0), tiles = (N + kTile - 1) / kTile, bytes = block_bytes(format);
  const int64_t* rows = order.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; n++) TORCH_CHECK(rows[n] >= 0 && rows[n] < raw.size(0), "bad row");
  // Padding columns: all-zero blocks (d = m = 0), which widen to zero.
  auto packed = at::zeros({tiles, nb, bytes},
                          at::TensorOptions().dtype(format == StoredFormat::kQ8_0 ? at::kChar : at::kByte));
  const uint8_t* src = raw.data_ptr<uint8_t>();
  auto* dst = reinterpret_cast<uint8_t*>(packed.data_ptr());
  const int64_t stride = raw.size(1);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      for (int64_t b = 0; b < nb; b++) {
        uint8_t* out = dst + (t * nb + b) * bytes;
        auto* half = reinterpret_cast<uint16_t*>(out);
        for (int64_t c = 0; c < kTile && t * kTile + c < N; c++) {
          const uint8_t* in = src + rows[t * kTile + c] * stride + b * gb;
          std::memcpy(half + c, in, 2);  // d
          if (format == StoredFormat::kQ8_0) {
            for (int64_t j = 0; j < kBlock; j++) out[2 * kTile + j * kTile + c] = in[2 + j];
          } else {
            std::memcpy(half + kTile + c, in + 2, 2);  // m
            // llama.cpp's nibble order: value j < 16 is the low nibble of byte j, value 16 + j
            // its high nibble.
            const int64_t byte = c % kLanes, shift = c < kLanes ? 0 : 4;
            for (int64_t j = 0; j < kBlock; j++) {
              const uint8_t q = (in[4 + j % 16] >> (j < 16 ? 0 : 4)) & 0x0F;
              out[4 * kTile + j * kLanes + byte] |= static_cast<uint8_t>(q << shift);
            }
          }
        }
      }
    }
  });
  return packed;
}

void stored_gemm_into(const at::Tensor& x, const at::Tensor& packed,
                      const std::optional<at::Tensor>& scale, int64_t N, at::Tensor& y) {
  const auto format = stored_format(packed);
  TORCH_CHECK(format, "not a stored weight of this ISA's build (Q8_0 int8 / Q4_1 uint8 tiles)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.size(1) * kBlock == K, "stored weight does not match x");
  TORCH_CHECK(packed.size(0) * kTile >= N && packed.is_contiguous(), "bad stored weight");
  const float* g = nullptr;
  if (scale && scale->defined()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->numel() == K,
                "the column scale must be a contiguous float32 [K]");
    g = scale->data_ptr<float>();
  }
  if (M == 0) return;
  const auto* wp = reinterpret_cast<const uint8_t*>(packed.data_ptr());
  if (*format == StoredFormat::kQ8_0) {
    Kernel<Q8Tile>::run(x.data_ptr<float>(), wp, g, y.data_ptr<float>(), M, K, N, packed.size(0));
  } else {
    Kernel<Q41Tile>::run(x.data_ptr<float>(), wp, g, y.data_ptr<float>(), M, K, N, packed.size(0));
  }
}

// x [M, K] float32 times the stored weight (with its column scale): x @ (W * scale).T, [M, N].
at::Tensor stored_gemm(const at::Tensor& x_in, const at::Tensor& packed,
                       const std::optional<at::Tensor>& scale, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x must be a 2-D float32 CPU tensor");
  const auto x = x_in.contiguous();
  auto y = at::empty({x.size(0), N}, x.options());
  stored_gemm_into(x, packed, scale, N, y);
  return y;
}

// The weight as the kernel widens it, [N, K] float32 (times the column scale): for tests.
at::Tensor stored_unpack(const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                         int64_t N) {
  // The product with the identity would add zeros to each weight; widen directly instead.
  const auto format = stored_format(packed);
  TORCH_CHECK(format, "not a stored weight of this ISA's build");
  const int64_t nb = packed.size(1), K = nb * kBlock;
  auto out = at::empty({N, K}, at::kFloat);
  float* o = out.data_ptr<float>();
  const float* g = scale && scale->defined() ? scale->data_ptr<float>() : nullptr;
  const auto* wp = reinterpret_cast<const uint8_t*>(packed.data_ptr());
  auto each = [&](auto tile_type) {
    using Tile = decltype(tile_type);
    for (int64_t t = 0; t < packed.size(0); t++) {
      const Tile tile{wp + t * nb * Tile::kBytes};
      for (int64_t b = 0; b < nb; b++) {
        const auto weights = tile.block(b);
        for (int64_t j = 0; j < kBlock; j++) {
          const int64_t k = b * kBlock + j;
          Vec w[kTileRegisters];
          weights.widen(j, w);
          float lanes[kTile];
          for (int i = 0; i < kTileRegisters; i++) {
            storeu(lanes + i * kLanes, g ? mul(w[i], set1(g[k])) : w[i]);
          }
          for (int64_t c = 0; c < kTile && t * kTile + c < N; c++) o[(t * kTile + c) * K + k] = lanes[c];
        }
      }
    }
  };
  if (*format == StoredFormat::kQ8_0) {
    each(Q8Tile{nullptr});
  } else {
    each(Q41Tile{nullptr});
  }
  return out;
}

// Rows `ids` of the stored weight W [N, K] as float32 (an embedding lookup), by scalar code
// computing the widening's values: d * q, or fma(d, q, m) (exact product, one rounding).
at::Tensor stored_rows(const at::Tensor& packed, const at::Tensor& ids_in, int64_t N) {
  const auto format = stored_format(packed);
  TORCH_CHECK(format, "not a stored weight of this ISA's build");
  const auto ids = ids_in.to(at::kLong).contiguous();
  const int64_t nb = packed.size(1), K = nb * kBlock, n = ids.numel();
  const int64_t bytes = block_bytes(*format);
  auto out = at::empty({n, K}, at::kFloat);
  float* o = out.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint8_t*>(packed.data_ptr());
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; r++) {
    TORCH_CHECK(id[r] >= 0 && id[r] < N, "id ", id[r], " out of range");
    const int64_t t = id[r] / kTile, c = id[r] % kTile;
    for (int64_t b = 0; b < nb; b++) {
      const uint8_t* s = wp + (t * nb + b) * bytes;
      const auto* half = reinterpret_cast<const uint16_t*>(s);
      const float d = half_to_float(half[c]);
      float* row = o + r * K + b * kBlock;
      if (*format == StoredFormat::kQ8_0) {
        const auto* q = reinterpret_cast<const int8_t*>(s + 2 * kTile);
        for (int64_t j = 0; j < kBlock; j++) row[j] = d * static_cast<float>(q[j * kTile + c]);
      } else {
        const float m = half_to_float(half[kTile + c]);
        const uint8_t* q = s + 4 * kTile;
        const int shift = c < kLanes ? 0 : 4;
        for (int64_t j = 0; j < kBlock; j++) {
          const float v = static_cast<float>((q[j * kLanes + c % kLanes] >> shift) & 0x0F);
          row[j] = std::fma(d, v, m);
        }
      }
    }
  }
  return out;
}

}  // namespace onepass

TORCH_LIBRARY_FRAGMENT(ONEPASS_OPS, m) {
  m.def("stored_pack(Tensor raw, int ggml_type, Tensor? order) -> Tensor", onepass::stored_pack);
  m.def("stored_gemm(Tensor x, Tensor packed, Tensor? scale, int n) -> Tensor",
        onepass::stored_gemm);
  m.def("stored_unpack(Tensor packed, Tensor? scale, int n) -> Tensor", onepass::stored_unpack);
  m.def("stored_rows(Tensor packed, Tensor ids, int n) -> Tensor", onepass::stored_rows);
}
