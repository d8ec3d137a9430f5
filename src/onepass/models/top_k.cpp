// The k largest logits of each row, in one pass over the row, for Token Recycling (k = 8), on
// CPU (simd.h).
//
// Why: a step's logits (rows x 49k floats, 2.4 MB at 12 rows) were just written by the two
// threads of the lm_head GEMM, each into its own half of the columns. torch's top-k reads them
// from one thread, several times (block maxima, gathers, topk): ~0.6 ms a step at 12 rows, 2%
// of an auto step. Here each thread reads the half it wrote, once, keeping a sorted list of its
// k best and comparing a register of logits at a time with the k-th: ~0.1 ms.
//
// Order: value descending, ties by lower index first, so k = 1 is torch.argmax's first index.
// NaN ranks above every number, as in torch.topk and numpy's argmax (rows with NaN take a slow,
// exact path).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "small_gemm.h"

namespace {

using namespace onepass::simd;
using onepass::kTile;

// A sorted list of the k best (value, index) seen so far, for columns scanned in order.
struct Best {
  float* value;
  int64_t* index;
  int64_t k, count = 0;

  // Strictly greater only: an equal value seen later (higher index) does not displace.
  void offer(float v, int64_t i) {
    if (count == k && !(v > value[k - 1])) return;
    int64_t j = count < k ? count++ : k - 1;
    while (j > 0 && value[j - 1] < v) {
      value[j] = value[j - 1];
      index[j] = index[j - 1];
      j--;
    }
    value[j] = v;
    index[j] = i;
  }
};

// Offer columns [c0, c1) of row x; returns whether the range holds a NaN.
bool scan(const float* x, int64_t c0, int64_t c1, Best& best) {
  int64_t c = c0;
  for (; c < c1 && best.count < best.k; c++) {
    if (std::isnan(x[c])) return true;
    best.offer(x[c], c);
  }
  uint32_t nan = 0;
  Vec threshold = set1(best.value[best.k - 1]);
  for (; c < c1; c += kLanes) {
    // Lanes past c1 load zeros: masked out of both tests.
    const uint32_t lanes = c1 - c >= kLanes ? (1u << kLanes) - 1 : (1u << (c1 - c)) - 1;
    const Vec v = load_n(x + c, c1 - c);
    nan |= nan_bits(v) & lanes;
    uint32_t above = greater_bits(v, threshold) & lanes;
    if (above == 0) continue;
    for (; above; above &= above - 1) {
      const int lane = __builtin_ctz(above);
      best.offer(x[c + lane], c + lane);
    }
    threshold = set1(best.value[best.k - 1]);
  }
  return nan != 0;
}

// Exact order with NaN above every number (and NaNs among themselves by index).
void slow_row(const float* x, int64_t V, int64_t k, int64_t* out) {
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [x](int64_t a, int64_t b) {
    const bool na = std::isnan(x[a]), nb = std::isnan(x[b]);
    if (na != nb) return na;
    if (!na && x[a] != x[b]) return x[a] > x[b];
    return a < b;
  });
  std::copy(order.begin(), order.begin() + k, out);
}

}  // namespace

namespace onepass {

// logits [n, V] float32 (rows may be strided): indices [n, k] int64 of each row's k largest.
at::Tensor row_top_k(const at::Tensor& logits_in, int64_t k) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat &&
                  logits_in.device().is_cpu(),
              "row_top_k expects 2-D float32 CPU logits");
  const auto logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  TORCH_CHECK(1 <= k && k <= V, "k must be in 1..", V, ", got ", k);
  auto out = at::empty({n, k}, logits.options().dtype(at::kLong));
  if (n == 0) return out;
  const float* xp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  // One part of the columns per thread, split at the tiles the GEMM's threads wrote.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), V / 1024));
  const int64_t tiles = (V + kTile - 1) / kTile, per_part = (tiles + parts - 1) / parts;
  std::vector<float> values(n * parts * k);
  std::vector<int64_t> indices(n * parts * k);
  std::vector<char> nan(n * parts, 0);
  at::parallel_for(0, n * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; job++) {
      const int64_t part = job / n, row = job % n;
      const int64_t c0 = std::min(V, part * per_part * kTile);
      const int64_t c1 = std::min(V, (part + 1) * per_part * kTile);
      Best best{values.data() + (row * parts + part) * k, indices.data() + (row * parts + part) * k,
                k};
      nan[row * parts + part] = scan(xp + row * ld, c0, c1, best);
      for (int64_t j = best.count; j < k; j++) {  // a part narrower than k: pad, never chosen
        best.value[j] = -std::numeric_limits<float>::infinity();
        best.index[j] = -1;
      }
    }
  });
  std::vector<int64_t> merged(parts * k);
  for (int64_t row = 0; row < n; row++) {
    const float* v = values.data() + row * parts * k;
    const int64_t* i = indices.data() + row * parts * k;
    if (std::any_of(nan.begin() + row * parts, nan.begin() + (row + 1) * parts,
                    [](char c) { return c != 0; })) {
      slow_row(xp + row * ld, V, k, op + row * k);
      continue;
    }
    std::iota(merged.begin(), merged.end(), 0);
    const auto before = [v, i](int64_t a, int64_t b) {
      if ((i[a] < 0) != (i[b] < 0)) return i[b] < 0;  // padding last
      if (v[a] != v[b]) return v[a] > v[b];
      return i[a] < i[b];
    };
    std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), before);
    for (int64_t j = 0; j < k; j++) op[row * k + j] = i[merged[j]];
  }
  return out;
}

}  // namespace onepass

TORCH_LIBRARY_FRAGMENT(ONEPASS_OPS, m) {
  m.def("row_top_k(Tensor logits, int k) -> Tensor", onepass::row_top_k);
}
