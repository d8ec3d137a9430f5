// y = x @ W.T for a few rows x against a weight W kept in its stored format (GGUF's Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, or half precision), widened to fp32 in registers
// (stored_formats.h over simd.h and widen.h).
//
// Why: a decoding step streams every weight; a Q4_1 weight is 5 bits against fp32's 32, a
// K-quant 4.5-6.6. The widened values are exactly those of the `gguf` package's dequantization
// (stored_formats.h says why), and each output then sums its K products in order with one FMA
// each, starting from zero, as small_gemm.cpp does: the result equals small_gemm on the
// dequantized weight bit for bit, and a row does not depend on the other rows.
//
// RMSNorm weights g folded into a projection (llama.py: W * g, one rounding per weight) come
// along as a column scale: the widened weight is multiplied by g[k], the same rounding.
//
// The int8 arithmetic (weights="int8", int8_formats.h) is a second kernel here: Q4_0, Q4_1 and
// Q8_0 parts packed for it multiply rows of activations quantized once per call (times the
// column scale) with integer dot products (int8_dot.h); other parts of the same weight widen
// as above. Its results are not small_gemm's, but a row still depends on nothing else.
//
// A packed weight (stored_pack) is one uint8 tensor: a header, then its parts, each a run of
// output columns in one format (a projection may concatenate tensors stored differently, as
// Q4_K_M files store attn_v in Q6_K beside a Q4_K attn_q). A part is [tiles][blocks][kBytes]:
// per tile of kTile output columns, its packed blocks in k order, a contiguous stream that the
// kernel reads as it reads small_gemm's fp32 tiles, each group's scales staying in registers for
// the group's rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "int8_formats.h"
#include "small_gemm.h"
#include "stored_formats.h"
#include "stored_gemm.h"

namespace {

using namespace onepass::simd;
using onepass::kTile;
using onepass::kTileRegisters;
namespace stored = onepass::stored;
namespace int8 = onepass::int8;

constexpr int64_t kLineBytes = 64;  // a cache line

// ---- The packed weight's header ---------------------------------------------------------------

constexpr char kMagic[8] = {'o', 'n', 'e', 'p', 'a', 's', 's', 'W'};
constexpr int kMaxParts = 6;
constexpr int64_t kHeaderBytes = 256;

struct Part {
  int64_t type;     // GGML type id (stored_formats.h)
  int64_t first;    // first output column
  int64_t columns;  // output columns
  int64_t offset;   // bytes from the start of the packed tensor, a multiple of 64
};

struct Header {
  char magic[8];
  int64_t tile;  // kTile of the build that packed it: another ISA's weight is refused
  int64_t K, N, parts;
  Part part[kMaxParts];
};
static_assert(sizeof(Header) <= kHeaderBytes);

std::optional<Header> header_of(const at::Tensor& packed) {
  if (packed.dim() != 1 || packed.scalar_type() != at::kByte || packed.numel() < kHeaderBytes ||
      !packed.is_contiguous()) {
    return std::nullopt;
  }
  Header h;
  std::memcpy(&h, packed.data_ptr<uint8_t>(), sizeof(Header));
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0 || h.tile != kTile) return std::nullopt;
  return h;
}

Header checked_header(const at::Tensor& packed, int64_t N) {
  const auto h = header_of(packed);
  TORCH_CHECK(h, "not a stored weight of this ISA's build (stored_pack)");
  TORCH_CHECK(h->N == N, "the stored weight has ", h->N, " output columns, not ", N);
  return *h;
}

// ---- The kernel -------------------------------------------------------------------------------

// Fetches the `bytes` at s + ahead toward L1, and twice as far on toward L2.
inline void prefetch_ahead(const uint8_t* s, int64_t bytes, int64_t ahead) {
  for (int64_t o = 0; o < bytes; o += kLineBytes) {
    prefetch_l1(s + ahead + o);
    prefetch_l2(s + 2 * ahead + o);
  }
}

// Rows x[0..R) (row stride ldx) times `blocks` packed blocks of a tile, holding `values` values of
// k (fewer than blocks * kValues only at the end of a half-precision row), accumulated into
// y[0..R)[0..cols) (row stride ldy); g: the column scales of these values or null. first: start
// from zero. ahead > 0: fetch the data `ahead` bytes on meanwhile (toward L1, and twice as far
// toward L2). The arithmetic per output is small_gemm.cpp's block(), weight for weight.
template <class F, int R>
void block(const float* x, int64_t ldx, const uint8_t* w, const float* g, float* y, int64_t ldy,
           int64_t cols, int64_t blocks, int64_t values, bool first, int64_t ahead) {
  Vec acc[R][kTileRegisters];
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < kTileRegisters; i++) {
      acc[r][i] = first ? zero() : load_n(y + r * ldy + i * kLanes, cols - i * kLanes);
    }
  }
  for (int64_t b = 0; b < blocks; b++) {
    const uint8_t* s = w + b * F::kBytes;
    if (ahead > 0) prefetch_ahead(s, F::kBytes, ahead);
    for (int64_t k0 = b * F::kValues; k0 < (b + 1) * F::kValues && k0 < values; k0 += F::kGroupValues) {
      const auto group = F::group(s, (k0 - b * F::kValues) / F::kGroupValues);
      const int64_t rows = std::min(F::kGroupValues, values - k0);
      for (int64_t j = 0; j < rows; j++) {
        const int64_t k = k0 + j;
        Vec wk[kTileRegisters];
        group.widen(j, wk);
        if (g != nullptr) {
          const Vec scale = set1(g[k]);
          for (int i = 0; i < kTileRegisters; i++) wk[i] = mul(wk[i], scale);
        }
        for (int r = 0; r < R; r++) {
          const Vec xr = set1(x[r * ldx + k]);
          for (int i = 0; i < kTileRegisters; i++) acc[r][i] = fmadd(xr, wk[i], acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < kTileRegisters; i++) {
      store_n(y + r * ldy + i * kLanes, acc[r][i], cols - i * kLanes);
    }
  }
}

template <class F>
struct Kernel {
  // Rows per block: the accumulators, the group's live registers (scales, high bits, widened
  // weights), the broadcast row value and the column scale. AVX-512 and NEON: 11 (Q5_1, Q5_K)
  // to 14 (F16, BF16); AVX2: 3 to 6.
  static constexpr int kMaxRows = (kRegisters - F::kLive - 2) / kTileRegisters;
  // Blocks per chunk: about 16 KB, which the first block of rows pulls from memory and the
  // other blocks read from L1.
  static constexpr int64_t kChunkBlocks = std::max<int64_t>(1, 16384 / F::kBytes);

  using Fn = void (*)(const float*, int64_t, const uint8_t*, const float*, float*, int64_t,
                      int64_t, int64_t, int64_t, bool, int64_t);
  template <int... I>
  static constexpr std::array<Fn, sizeof...(I)> table(std::integer_sequence<int, I...>) {
    return {block<F, I + 1>...};
  }
  static constexpr auto kBlocks = table(std::make_integer_sequence<int, kMaxRows>{});

  static int64_t blocks(int64_t K) { return (K + F::kValues - 1) / F::kValues; }

  // y[0..M)[0..cols) = x [M, K] @ the tile's columns (packed: the tile's blocks); row stride ldy.
  static void tile(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* g,
                   float* y, int64_t ldy, int64_t cols) {
    const int64_t nb = blocks(K), ahead = kChunkBlocks * F::kBytes;
    for (int64_t b0 = 0; b0 < nb; b0 += kChunkBlocks) {
      const int64_t bc = std::min(kChunkBlocks, nb - b0), k0 = b0 * F::kValues;
      for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, M - r0);
        kBlocks[rows - 1](x + r0 * K + k0, K, packed + b0 * F::kBytes, g ? g + k0 : nullptr,
                          y + r0 * ldy, ldy, cols, bc, K - k0, b0 == 0, r0 == 0 ? ahead : 0);
      }
    }
  }

  // visit(k, w) for each row k of the tile's widened weights (w: kTileRegisters registers), as
  // block() walks them (written out there: through a lambda, GCC's block of 4 rows ran 10%
  // slower on AVX-512).
  template <class Visit>
  static void each_row(const uint8_t* packed, int64_t K, Visit&& visit) {
    for (int64_t b = 0; b < blocks(K); b++) {
      const uint8_t* s = packed + b * F::kBytes;
      for (int64_t k0 = b * F::kValues; k0 < (b + 1) * F::kValues && k0 < K; k0 += F::kGroupValues) {
        const auto group = F::group(s, (k0 - b * F::kValues) / F::kGroupValues);
        for (int64_t j = 0; j < std::min(F::kGroupValues, K - k0); j++) {
          Vec w[kTileRegisters];
          group.widen(j, w);
          visit(k0 + j, w);
        }
      }
    }
  }
};

// ---- The int8 arithmetic (int8_formats.h) -----------------------------------------------------

// Rows of activations quantized per block of 32 values: q [M][K], and per row and block the
// scale d, d * sum(q) (s) and sum(q).
struct Quantized {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> sum;
  int64_t K = 0, blocks = 0;
};

// One block of 32 values of x (times the column scale g, if given): xq, and returns xd. Every
// step is exact or one IEEE rounding (the product by g, the scale's two divisions, the product
// by 1 / xd), and max is exact in any order, so each ISA gives the same bytes.
float quantize_block(const float* x, const float* g, int8_t* q, int32_t& sum) {
  constexpr int kVecs = int8::kBlockValues / kLanes;
  Vec v[kVecs], amax = zero();
  for (int i = 0; i < kVecs; i++) {
    v[i] = loadu(x + i * kLanes);
    if (g != nullptr) v[i] = mul(v[i], loadu(g + i * kLanes));
    amax = max(amax, max(v[i], sub(zero(), v[i])));
  }
  const float d = reduce_max(amax) / 127.0f, inverse = d != 0.0f ? 1.0f / d : 0.0f;
  Vec total = zero();
  for (int i = 0; i < kVecs; i++) {
    v[i] = min(max(round(mul(v[i], set1(inverse))), set1(-127.0f)), set1(127.0f));
    total = add(total, v[i]);  // integers below 2^12: exact in any order
  }
  store_i8(q, v);
  sum = static_cast<int32_t>(reduce_add(total));
  return d;
}

Quantized quantize_rows(const float* x, int64_t M, int64_t K, const float* g) {
  TORCH_CHECK(K % int8::kBlockValues == 0, "int8 weights need rows of a multiple of 32 values");
  Quantized out;
  out.K = K, out.blocks = K / int8::kBlockValues;
  out.q.resize(M * K), out.d.resize(M * out.blocks), out.s.resize(M * out.blocks);
  out.sum.resize(M * out.blocks);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      for (int64_t b = 0; b < out.blocks; b++) {
        const int64_t i = r * out.blocks + b, k = b * int8::kBlockValues;
        out.d[i] = quantize_block(x + r * K + k, g ? g + k : nullptr, out.q.data() + r * K + k, out.sum[i]);
        out.s[i] = out.d[i] * static_cast<float>(out.sum[i]);
      }
    }
  });
  return out;
}

// Rows r0 .. r0 + R of the quantized activations times `blocks` packed blocks of a tile from
// block b0 of k on, accumulated into y (row stride ldy) as int8_formats.h states.
template <class F, int R>
void int8_block(const Quantized& x, int64_t r0, int64_t b0, const uint8_t* w, float* y,
                int64_t ldy, int64_t cols, int64_t blocks, bool first, int64_t ahead) {
  constexpr int T = kTileRegisters;
  Vec acc[R][T];
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < T; i++) acc[r][i] = first ? zero() : load_n(y + r * ldy + i * kLanes, cols - i * kLanes);
  }
  for (int64_t b = 0; b < blocks; b++) {
    const uint8_t* s = w + b * F::kBytes;
    if (ahead > 0) prefetch_ahead(s, F::kBytes, ahead);
    const uint8_t* quants = s + F::kScaleBytes;
    const int64_t kb = b0 + b;
    IVec sums[R][T];
    PVec pairs[R][T];
    for (int r = 0; r < R; r++) {
      for (int i = 0; i < T; i++) sums[r][i] = izero(), pairs[r][i] = pzero();
    }
    for (int64_t g = 0; g < F::kQuads; g++) {
      BVec lo[T], hi[T];
      for (int i = 0; i < T; i++) {
        const BVec raw = load_bytes(quants + (i * F::kQuads + g) * int8::kQuadBytes);
        if constexpr (F::kIsSigned) {
          lo[i] = raw;
        } else {
          lo[i] = low_nibbles(raw), hi[i] = high_nibbles(raw);
        }
      }
      for (int r = 0; r < R; r++) {
        const int8_t* xr = x.q.data() + (r0 + r) * x.K + kb * int8::kBlockValues + 4 * g;
        const BVec xl = broadcast4(xr);
        for (int i = 0; i < T; i++) {
          if constexpr (F::kOffsetQuants) {
            sums[r][i] = dot_u(sums[r][i], lo[i], xl);
          } else if constexpr (F::kIsSigned) {
            sums[r][i] = dot_s(sums[r][i], lo[i], xl);
          } else {
            pairs[r][i] = nibble_dot(nibble_dot(pairs[r][i], lo[i], xl), hi[i], broadcast4(xr + 16));
          }
        }
      }
    }
    Vec d[T], m[T];
    stored::load_halves(s, d);
    if constexpr (F::kHasMin) stored::load_halves(s + 2 * kTile, m);
    for (int r = 0; r < R; r++) {
      const int64_t i_row = (r0 + r) * x.blocks + kb;
      const Vec xd = set1(x.d[i_row]);
      for (int i = 0; i < T; i++) {
        IVec total;
        if constexpr (F::kIsSigned) {
          total = sums[r][i];
        } else {
          total = widen_pairs(pairs[r][i]);
        }
        if constexpr (F::kQuantOffset != 0) total = sub(total, F::kQuantOffset * x.sum[i_row]);
        acc[r][i] = fmadd(mul(d[i], xd), to_float(total), acc[r][i]);
        if constexpr (F::kHasMin) acc[r][i] = fmadd(m[i], set1(x.s[i_row]), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < T; i++) store_n(y + r * ldy + i * kLanes, acc[r][i], cols - i * kLanes);
  }
}

template <class F>
struct Int8Kernel {
  // Rows per block: per row kTileRegisters accumulators and as many integer sums, a quarter of
  // the registers (AVX-512 and NEON 4 rows, AVX2 2), the rest left to a quad's weights, the
  // broadcast activations and the scales, which the compiler may spill from L1 (one row more
  // or less measured the same).
  static constexpr int kMaxRows = kRegisters / (4 * kTileRegisters);
  static constexpr int64_t kChunkBlocks = std::max<int64_t>(1, 16384 / F::kBytes);

  using Fn = void (*)(const Quantized&, int64_t, int64_t, const uint8_t*, float*, int64_t,
                      int64_t, int64_t, bool, int64_t);
  template <int... I>
  static constexpr std::array<Fn, sizeof...(I)> table(std::integer_sequence<int, I...>) {
    return {int8_block<F, I + 1>...};
  }
  static constexpr auto kBlocks = table(std::make_integer_sequence<int, kMaxRows>{});

  static void tile(const Quantized& x, int64_t M, const uint8_t* packed, float* y, int64_t ldy,
                   int64_t cols) {
    const int64_t nb = x.blocks, ahead = kChunkBlocks * F::kBytes;
    for (int64_t b0 = 0; b0 < nb; b0 += kChunkBlocks) {
      const int64_t bc = std::min(kChunkBlocks, nb - b0);
      for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, M - r0);
        kBlocks[rows - 1](x, r0, b0, packed + b0 * F::kBytes, y + r0 * ldy, ldy, cols, bc,
                          b0 == 0, r0 == 0 ? ahead : 0);
      }
    }
  }
};

// Calls fn(F{}) with the format (float32-widened or int8 layout) of type id `type`.
template <class Fn>
bool with_any_format(int64_t type, Fn&& fn) {
  return stored::with_format(type, fn) || int8::with_format(type, fn);
}

// The bytes of one tile of a part in format `type` for rows of K values.
int64_t tile_bytes(int64_t type, int64_t K) {
  int64_t bytes = 0;
  with_any_format(type, [&](auto f) {
    using F = decltype(f);
    bytes = (K + F::kValues - 1) / F::kValues * F::kBytes;
  });
  return bytes;
}

}  // namespace

namespace onepass {

bool is_stored(const at::Tensor& packed) { return header_of(packed).has_value(); }

// parts: GGUF tensors' rows, uint8 [rows_i][bytes per row] (blocks of a quantized type, or 16-bit
// values), of GGML types `types_in` and one row length K. Returns the packed weight whose output
// columns are the parts' rows, one after another; consecutive parts of one type share tiles.
// int8: parts in Q4_0, Q4_1 or Q8_0 take the int8 arithmetic's layout (int8_formats.h).
at::Tensor stored_pack(const std::vector<at::Tensor>& parts_in, const std::vector<int64_t>& types_in,
                       bool int8) {
  TORCH_CHECK(!parts_in.empty() && parts_in.size() == types_in.size(), "one type per part");
  std::vector<int64_t> types = types_in;
  if (int8) {
    for (auto& type : types) type += int8::has_layout(type) ? int8::kTypeOffset : 0;
  }
  std::vector<at::Tensor> parts;
  int64_t K = -1;
  for (size_t i = 0; i < parts_in.size(); i++) {
    const auto& raw = parts_in[i];
    TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.device().is_cpu(),
                "raw blocks must be 2-D uint8 CPU tensors");
    int64_t k = -1;
    const bool known = with_any_format(types[i], [&](auto f) {
      using F = decltype(f);
      TORCH_CHECK(raw.size(1) % F::kGGUFBytes == 0, "a raw row is not a whole number of blocks");
      k = raw.size(1) / F::kGGUFBytes * F::kGGUFValues;
    });
    TORCH_CHECK(known, "stored weights: GGML type ", types_in[i], " is not supported (Q4_0 = 2, ",
                "Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, ",
                "F16 = 1, BF16 = 30)");
    TORCH_CHECK(K < 0 || k == K, "parts of different row lengths: ", K, " and ", k);
    K = k;
    parts.push_back(raw.contiguous());
  }
  // Runs of one type: the packed parts, with the raw rows of their output columns.
  Header h{};
  std::memcpy(h.magic, kMagic, sizeof(kMagic));
  h.tile = kTile;
  h.K = K;
  std::vector<std::vector<const uint8_t*>> rows;
  int64_t offset = kHeaderBytes;
  for (size_t i = 0; i < parts.size(); i++) {
    if (i == 0 || types[i] != types[i - 1]) {
      TORCH_CHECK(h.parts < kMaxParts, "at most ", kMaxParts, " runs of one format per weight");
      if (h.parts > 0) {
        const Part& last = h.part[h.parts - 1];
        offset += (last.columns + kTile - 1) / kTile * tile_bytes(last.type, K);
        offset = (offset + kLineBytes - 1) / kLineBytes * kLineBytes;
      }
      h.part[h.parts++] = Part{types[i], h.N, 0, offset};
      rows.emplace_back();
    }
    for (int64_t r = 0; r < parts[i].size(0); r++) {
      rows.back().push_back(parts[i].data_ptr<uint8_t>() + r * parts[i].size(1));
    }
    h.part[h.parts - 1].columns += parts[i].size(0);
    h.N += parts[i].size(0);
  }
  const Part& last = h.part[h.parts - 1];
  const int64_t total = last.offset + (last.columns + kTile - 1) / kTile * tile_bytes(last.type, K);
  // Padding columns: all-zero blocks (zero scales, zero values), which widen to zero.
  auto packed = at::zeros({total}, at::TensorOptions().dtype(at::kByte));
  uint8_t* dst = packed.data_ptr<uint8_t>();
  std::memcpy(dst, &h, sizeof(Header));
  for (int64_t p = 0; p < h.parts; p++) {
    const Part part = h.part[p];
    const auto& src = rows[p];
    with_any_format(part.type, [&](auto f) {
      using F = decltype(f);
      const int64_t nb = (K + F::kValues - 1) / F::kValues, tiles = (part.columns + kTile - 1) / kTile;
      at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; t++) {
          for (int64_t b = 0; b < nb; b++) {
            uint8_t* out = dst + part.offset + (t * nb + b) * F::kBytes;
            for (int64_t c = 0; c < kTile && t * kTile + c < part.columns; c++) {
              F::pack(src[t * kTile + c], b, K, c, out);
            }
          }
        }
      });
    });
  }
  return packed;
}

void stored_gemm_into(const at::Tensor& x, const at::Tensor& packed,
                      const std::optional<at::Tensor>& scale, int64_t N, at::Tensor& y) {
  const Header h = checked_header(packed, N);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(h.K == K, "the stored weight's rows have ", h.K, " values, x has ", K);
  const float* g = nullptr;
  if (scale && scale->defined()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->numel() == K,
                "the column scale must be a contiguous float32 [K]");
    g = scale->data_ptr<float>();
  }
  if (M == 0) return;
  // The operands a tile reads: x (float32 parts) or its quantization (int8 parts, made once).
  struct Input {
    const float* x;
    int64_t M, K;
    const float* g;
    Quantized q;
  };
  Input in{x.data_ptr<float>(), M, K, g, {}};
  // Each part's tiles and how to run one; threads split the tiles of all parts.
  using TileFn = void (*)(const Input&, const uint8_t*, float*, int64_t, int64_t);
  std::array<TileFn, kMaxParts> run{};
  std::array<int64_t, kMaxParts + 1> first_tile{};
  std::array<int64_t, kMaxParts> bytes{};
  bool quantize = false;
  for (int64_t p = 0; p < h.parts; p++) {
    stored::with_format(h.part[p].type, [&](auto f) {
      run[p] = [](const Input& in, const uint8_t* w, float* y, int64_t ldy, int64_t cols) {
        Kernel<decltype(f)>::tile(in.x, in.M, in.K, w, in.g, y, ldy, cols);
      };
    });
    quantize |= int8::with_format(h.part[p].type, [&](auto f) {
      run[p] = [](const Input& in, const uint8_t* w, float* y, int64_t ldy, int64_t cols) {
        Int8Kernel<decltype(f)>::tile(in.q, in.M, w, y, ldy, cols);
      };
    });
    bytes[p] = tile_bytes(h.part[p].type, K);
    first_tile[p + 1] = first_tile[p] + (h.part[p].columns + kTile - 1) / kTile;
  }
  if (quantize) in.q = quantize_rows(in.x, M, K, g);
  const auto* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, first_tile[h.parts], 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      int64_t p = 0;
      while (t >= first_tile[p + 1]) p++;
      const Part& part = h.part[p];
      const int64_t i = t - first_tile[p], cols = std::min(kTile, part.columns - i * kTile);
      run[p](in, wp + part.offset + i * bytes[p], yp + part.first + i * kTile, N, cols);
    }
  });
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

namespace {

// visit(i, k, value) for the weights of output column columns[i] as the kernels widen them (in
// ascending k; times the column scale g if given).
template <class Visit>
void each_weight(const at::Tensor& packed, const Header& h, const std::vector<int64_t>& columns,
                 const float* g, Visit&& visit) {
  const auto* wp = packed.data_ptr<uint8_t>();
  for (size_t i = 0; i < columns.size(); i++) {
    const int64_t n = columns[i];
    int64_t p = 0;
    while (n >= h.part[p].first + h.part[p].columns) p++;
    const Part& part = h.part[p];
    const int64_t t = (n - part.first) / kTile, c = (n - part.first) % kTile;
    stored::with_format(part.type, [&](auto f) {
      using F = decltype(f);
      const uint8_t* tile = wp + part.offset + t * tile_bytes(part.type, h.K);
      Kernel<F>::each_row(tile, h.K, [&](int64_t k, const Vec* w) {
        float lanes[kTile];
        for (int r = 0; r < kTileRegisters; r++) {
          storeu(lanes + r * kLanes, g ? mul(w[r], set1(g[k])) : w[r]);
        }
        visit(static_cast<int64_t>(i), k, lanes[c]);
      });
    });
    int8::with_format(part.type, [&](auto f) {  // the same values, one at a time
      using F = decltype(f);
      const uint8_t* tile = wp + part.offset + t * tile_bytes(part.type, h.K);
      for (int64_t k = 0; k < h.K; k++) {
        const float v = F::value(tile + k / F::kValues * F::kBytes, k % F::kValues, c);
        visit(static_cast<int64_t>(i), k, g ? v * g[k] : v);
      }
    });
  }
}

}  // namespace

// The weight as the kernel widens it, [N, K] float32 (times the column scale): for tests.
at::Tensor stored_unpack(const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                         int64_t N) {
  const Header h = checked_header(packed, N);
  auto out = at::empty({N, h.K}, at::kFloat);
  float* o = out.data_ptr<float>();
  const float* g = scale && scale->defined() ? scale->data_ptr<float>() : nullptr;
  std::vector<int64_t> columns(N);
  for (int64_t n = 0; n < N; n++) columns[n] = n;
  each_weight(packed, h, columns, g, [&](int64_t n, int64_t k, float v) { o[n * h.K + k] = v; });
  return out;
}

// Rows `ids` of the stored weight W [N, K] as float32 (an embedding lookup), widened as the
// GEMM widens them.
at::Tensor stored_rows(const at::Tensor& packed, const at::Tensor& ids_in, int64_t N) {
  const Header h = checked_header(packed, N);
  const auto ids = ids_in.to(at::kLong).contiguous();
  const int64_t n = ids.numel();
  std::vector<int64_t> columns(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + n);
  for (const int64_t id : columns) TORCH_CHECK(id >= 0 && id < N, "id ", id, " out of range");
  auto out = at::empty({n, h.K}, at::kFloat);
  float* o = out.data_ptr<float>();
  each_weight(packed, h, columns, nullptr, [&](int64_t r, int64_t k, float v) { o[r * h.K + k] = v; });
  return out;
}

}  // namespace onepass

TORCH_LIBRARY_FRAGMENT(ONEPASS_OPS, m) {
  m.def("stored_pack(Tensor[] parts, int[] ggml_types, bool int8=False) -> Tensor",
        onepass::stored_pack);
  m.def("stored_gemm(Tensor x, Tensor packed, Tensor? scale, int n) -> Tensor",
        onepass::stored_gemm);
  m.def("stored_unpack(Tensor packed, Tensor? scale, int n) -> Tensor", onepass::stored_unpack);
  m.def("stored_rows(Tensor packed, Tensor ids, int n) -> Tensor", onepass::stored_rows);
}
