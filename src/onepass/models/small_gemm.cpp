// y = x @ W.T for a few rows x (1..~32) against a large weight W, on CPU (simd.h: AVX-512, AVX2
// or NEON).
//
// Why: at batch size 1 a decoder step streams every weight from memory while the cores idle;
// scoring a draft of k tokens should cost little more than one token. MKL's packed GEMM does
// not overlap the streaming with the arithmetic at these sizes (16 rows cost ~1.8x one row on
// the default model). Here each thread walks its own tiles of two registers of output columns
// in chunks of 16 KB: the first block of rows pulls a chunk from memory while prefetching the
// next two, the other blocks reuse it from L1.
//
// Block sizes follow from the register file: a block of R rows holds 2R accumulators, the
// tile's 2 weight registers and the broadcast row value, one register left to the compiler.
// AVX-512 (32 x 16 lanes): tiles of 32 columns, 14 rows. AVX2 (16 x 8): 16 columns, 6 rows.
// NEON (32 x 4): 8 columns, 14 rows; with 32 registers the block stays as tall as AVX-512's,
// so a verification step of up to 14 rows reads each chunk of weights once, as there.
//
// Lossless decoding needs more than speed: row i of the result is computed with exactly the
// same operations whatever the other rows are (each output sums its K products in order, one
// FMA each, in one accumulator, saved to y between chunks), so scoring a draft gives the same
// logits as plain decoding, whatever the row count or the block a row falls in.
#include "small_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>

namespace {

using namespace onepass::simd;
using onepass::kTile;
using onepass::kTileRegisters;

constexpr int kMaxRows = (kRegisters - kTileRegisters - 2) / kTileRegisters;
constexpr int64_t kChunk = 16384 / (kTile * sizeof(float));  // a chunk of a tile: 16 KB, in L1
constexpr int64_t kLineFloats = 16;                          // a 64-byte cache line

// A chunk of one packed tile, as the kernel reads it: row k (kTile weights) as kTileRegisters
// fp32 registers. Weights stored in another format (quantized blocks, half precision) would
// come as another such type whose widen() computes these same fp32 values in registers; the
// accumulation, and so the results, would not change.
struct Fp32Tile {
  const float* p;  // [K][kTile] from the chunk's first row, 64-byte aligned

  void widen(int64_t k, Vec* w) const {
    for (int i = 0; i < kTileRegisters; i++) w[i] = load(p + k * kTile + i * kLanes);
  }

  // Row k of the next chunk toward L1, of the one after it toward L2 (possibly in the next
  // tile; past the end, harmless). The L1 prefetch of the next chunk alone keeps too few lines
  // in flight once the arithmetic of several rows slows the loop (AVX-512, the default model
  // at 300 cached tokens: 1 row 2% faster with the L2 prefetch, 8 rows 11%, 12 rows 4%).
  void prefetch(int64_t k) const {
    for (int64_t o = 0; o < kTile; o += kLineFloats) {
      prefetch_l1(p + (k + kChunk) * kTile + o);
      prefetch_l2(p + (k + 2 * kChunk) * kTile + o);
    }
  }
};

// Rows x[0..R) (row stride K) times rows 0..kc of a tile chunk, accumulated into y[0..R)[0..cols)
// (row stride ldy). FIRST: start from zero. PREFETCH: fetch the next chunks meanwhile.
template <int R, bool FIRST, bool PREFETCH>
void block(const float* x, Fp32Tile tile, float* y, int64_t kc, int64_t K, int64_t ldy,
           int64_t cols) {
  Vec acc[R][kTileRegisters];
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < kTileRegisters; i++) {
      acc[r][i] = FIRST ? zero() : load_n(y + r * ldy + i * kLanes, cols - i * kLanes);
    }
  }
  for (int64_t k = 0; k < kc; k++) {
    if (PREFETCH) tile.prefetch(k);
    Vec w[kTileRegisters];
    tile.widen(k, w);
    for (int r = 0; r < R; r++) {
      const Vec xr = set1(x[r * K + k]);
      for (int i = 0; i < kTileRegisters; i++) acc[r][i] = fmadd(xr, w[i], acc[r][i]);
    }
  }
  for (int r = 0; r < R; r++) {
    for (int i = 0; i < kTileRegisters; i++) {
      store_n(y + r * ldy + i * kLanes, acc[r][i], cols - i * kLanes);
    }
  }
}

using BlockFn = void (*)(const float*, Fp32Tile, float*, int64_t, int64_t, int64_t, int64_t);

template <int R>
constexpr std::array<BlockFn, 4> variants() {
  return {block<R, true, true>, block<R, false, true>, block<R, true, false>,
          block<R, false, false>};
}

template <int... I>
constexpr auto block_table(std::integer_sequence<int, I...>) {
  return std::array<std::array<BlockFn, 4>, sizeof...(I)>{variants<I + 1>()...};
}

// kBlocks[rows - 1][variant]: blocks of 1..kMaxRows rows.
constexpr auto kBlocks = block_table(std::make_integer_sequence<int, kMaxRows>{});

}  // namespace

namespace onepass {

// W [N, K] -> tiles [ceil(N / kTile)][K][kTile], zero-padded past N, 64-byte aligned rows.
at::Tensor small_gemm_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "pack expects a 2-D float32 CPU weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t tiles = (N + kTile - 1) / kTile;
  auto padded = at::zeros({tiles * kTile, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({tiles, kTile, K}).transpose(1, 2).contiguous();
}

// x [M, K] float32, packed from pack(W) with W [N, K]: returns x @ W.T, [M, N].
at::Tensor small_gemm(const at::Tensor& x_in, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kTile && packed.size(1) == x_in.size(1),
              "packed weight does not match x (packed by another ISA's build?)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0, "packed not aligned");
  const auto x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (M + kMaxRows - 1) / kMaxRows;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      const float* wt = wp + t * K * kTile;
      const int64_t cols = std::min(kTile, N - t * kTile);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t kc = std::min(kChunk, K - k0);
        const Fp32Tile chunk{wt + k0 * kTile};
        int64_t r0 = 0;
        for (int64_t b = 0; b < blocks; b++) {
          // Full blocks first: the first block's arithmetic overlaps the memory stream, the
          // rest runs from L1 (16 rows on AVX-512: 14 + 2 measured faster than 8 + 8; 8 rows on
          // AVX2: 6 + 2 as fast as 4 + 4).
          const int64_t r1 = std::min<int64_t>(r0 + kMaxRows, M);
          const int variant = (k0 == 0 ? 0 : 1) + (b == 0 ? 0 : 2);
          kBlocks[r1 - r0 - 1][variant](xp + r0 * K + k0, chunk, yp + r0 * N + t * kTile, kc, K,
                                        N, cols);
          r0 = r1;
        }
      }
    }
  });
  return y;
}

}  // namespace onepass

TORCH_LIBRARY_FRAGMENT(ONEPASS_OPS, m) {
  m.def("small_gemm_pack(Tensor weight) -> Tensor", onepass::small_gemm_pack);
  m.def("small_gemm(Tensor x, Tensor packed, int n) -> Tensor", onepass::small_gemm);
}
