// The decoder layers of a Llama-family model for the new rows of a step, in one op (CPU,
// float32, over simd.h): RMSNorm, the four projections (small_gemm.cpp), rotary embedding, the
// KV-cache write, grouped-query attention over the cache and among the new rows, SwiGLU. It
// runs every decoding step, and the prompt's prefill in chunks (each chunk causal). One call
// can carry the rows of several requests, each with its own KV cache (continuous batching):
// they share the weight stream and nothing else.
//
// Why: with the GEMM kernel, a 13-row step of the default model spent a third of its time
// outside the GEMMs: ~35 small ops a layer dispatched one at a time (some on strided views,
// slower the more rows), and CPU flash attention, which is built for long queries, not for a
// dozen rows against a long cache.
//
// Lossless decoding: every row is computed as plain decoding (one row) computes it, by
// construction. Elementwise steps touch only their row, with loops whose length does not
// depend on the row count. Attention walks, for each row, the keys it may see in position
// order: the committed cache, then its ancestors among the new rows. A draft token therefore
// sees the same key sequence as plain decoding would at its position; each score is a fixed
// dot product, the softmax's max and sum run over that sequence in its order (key c in lane
// c mod kLanes), and the value sum adds the keys one at a time. How the keys are grouped for
// speed (shared runs of the cache, blocks of keys and of query vectors) never changes a row's
// arithmetic: a prompt prefilled in chunks of any size leaves the KV cache plain decoding of
// it would have left, bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "small_gemm.h"
#include "stored_gemm.h"
#include "widen.h"

namespace {

using namespace onepass::simd;

// y = x / sqrt(mean(x^2) + eps) for one row of length H (RMSNorm; its weight is folded into
// the projection that follows).
void rms_normalize(const float* x, float* y, int64_t H, float eps) {
  Vec acc = zero();
  for (int64_t k = 0; k < H; k += kLanes) {
    const Vec v = load_n(x + k, H - k);
    acc = fmadd(v, v, acc);
  }
  const Vec scale = set1(1.0f / std::sqrt(reduce_add(acc) / H + eps));
  for (int64_t k = 0; k < H; k += kLanes) store_n(y + k, mul(load_n(x + k, H - k), scale), H - k);
}

// Rotary embedding of one head stored as adjacent (re, im) pairs: (a, b) * (cos, sin) =
// (a cos - b sin, b cos + a sin), each with one rounded product and one FMA. rotation:
// [hd / 2][2] (cos, sin). Scalar: a sliver of the step's work.
void rotate(const float* x, const float* rotation, float* y, int64_t hd) {
  for (int64_t i = 0; i < hd; i += 2) {
    const float a = x[i], b = x[i + 1], c = rotation[i], s = rotation[i + 1];
    y[i] = std::fma(a, c, -(b * s));
    y[i + 1] = std::fma(b, c, a * s);
  }
}

// act = silu(gate) * up for one row; gate_up = [gate (I) | up (I)].
void silu_mul(const float* gate_up, float* act, int64_t I) {
  const Vec one = set1(1.0f);
  for (int64_t k = 0; k < I; k += kLanes) {
    const Vec g = load_n(gate_up + k, I - k);
    const Vec u = load_n(gate_up + I + k, I - k);
    const Vec silu = div(g, add(one, exp(sub(zero(), g))));
    store_n(act + k, mul(silu, u), I - k);
  }
}

void add_into(float* x, const float* y, int64_t count) {
  for (int64_t k = 0; k < count; k += kLanes) {
    store_n(x + k, add(load_n(x + k, count - k), load_n(y + k, count - k)), count - k);
  }
}

// The cache rows one new row attends to, in position order: a run of the committed cache, then
// some of the new rows (its ancestors in a draft tree, or the rows before it in a prompt chunk,
// and itself).
struct KeySpan {
  int64_t lo = 0, hi = 0;      // cache rows lo..hi
  std::vector<int64_t> extra;  // then these rows
  int64_t size() const { return hi - lo + static_cast<int64_t>(extra.size()); }
  int64_t row(int64_t c) const { return c < hi - lo ? lo + c : extra[c - (hi - lo)]; }
};

// One query vector (a row's query head) and where its output goes.
struct QueryVector {
  const float* q;         // [hd]
  float* out;             // [hd]
  const KeySpan* span;    // the row's keys
};

// The KV cache holds float32 (T = float) or, with kv_cache_dtype float16, fp16 bits (T =
// uint16_t), widened exactly on load: half the bytes a step reads from a long cache, and the
// same arithmetic from there on.
inline Vec load_kv(const float* p) { return loadu(p); }
inline Vec load_kv(const uint16_t* p) { return load_half(p); }

// Dot product of q (C registers) with one key: C lane-wise products summed in order.
template <int C, typename T>
inline Vec dot_lanes(const Vec* q, const T* key) {
  Vec a = mul(q[0], load_kv(key));
  for (int k = 1; k < C; k++) a = fmadd(q[k], load_kv(key + k * kLanes), a);
  return a;
}

// Scores q . key * scale for kLanes keys given by their rows (lane j: a fixed function of key j).
template <int C, typename T>
inline Vec score_block(const Vec* q, const T* const* key_rows, Vec scale) {
  Vec acc[kLanes];
#pragma GCC unroll 16
  for (int j = 0; j < kLanes; j++) acc[j] = dot_lanes<C>(q, key_rows[j]);
  return mul(transpose_sum(acc), scale);
}

// Asks for `count` elements from `p` into L1, a cache line at a time.
template <typename T>
inline void prefetch_rows(const T* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < count * static_cast<int64_t>(sizeof(T)); o += 64) prefetch_l1(bytes + o);
}

template <int C>
inline void load_query(const float* q, Vec* qv) {
  for (int k = 0; k < C; k++) qv[k] = loadu(q + k * kLanes);
}

// The value sums of a head of C registers are built a slice of kSlice registers at a time, for
// up to kVectors query vectors per loaded slice of values: their accumulators, the slice and
// the broadcast weight fit the register file. AVX-512: head_dim 64 in one slice for 6 vectors,
// 128 for 2; AVX2: slices of 4 registers for 2 vectors; NEON: slices of 8 for 2.
template <int C>
struct ValueBlocks {
  static constexpr int kSlice = std::min(C, kRegisters / 4);
  static constexpr int kVectors = (kRegisters - 1 - kSlice) / kSlice;
  static_assert(C % kSlice == 0);
};

// out[g][0..S) += sum over j < count of p[g][j] * values[j][0..S) (S registers) for G query
// vectors, one key at a time in order; values: rows `stride` elements apart.
template <int S, int G, typename T>
void accumulate_slice(const float* const* p, const T* values, int64_t stride, int64_t count,
                      float* const* out) {
  Vec acc[G][S];
  for (int g = 0; g < G; g++)
    for (int k = 0; k < S; k++) acc[g][k] = loadu(out[g] + k * kLanes);
  for (int64_t j = 0; j < count; j++, values += stride) {
    Vec v[S];
    for (int k = 0; k < S; k++) v[k] = load_kv(values + k * kLanes);
    for (int g = 0; g < G; g++) {
      const Vec weight = set1(p[g][j]);
      for (int k = 0; k < S; k++) acc[g][k] = fmadd(weight, v[k], acc[g][k]);
    }
  }
  for (int g = 0; g < G; g++)
    for (int k = 0; k < S; k++) storeu(out[g] + k * kLanes, acc[g][k]);
}

// out[g] += sum over j < count of p[g][j] * values[j] for G query vectors (values: consecutive
// rows of the head's cache), slice by slice. out[g] holds the unnormalized sum between calls.
template <int C, int G, typename T>
void accumulate_values(const float* const* p, const T* values, int64_t count,
                       float* const* out) {
  constexpr int S = ValueBlocks<C>::kSlice;
  for (int s0 = 0; s0 < C; s0 += S) {
    float* slice_out[G];
    for (int g = 0; g < G; g++) slice_out[g] = out[g] + s0 * kLanes;
    accumulate_slice<S, G>(p, values + s0 * kLanes, C * kLanes, count, slice_out);
  }
}

// The same for m query vectors, 1 <= m <= G.
template <int C, typename T, int G = ValueBlocks<C>::kVectors>
void accumulate_values_of(int64_t m, const float* const* p, const T* values, int64_t count,
                          float* const* out) {
  if constexpr (G > 1) {
    if (m < G) return accumulate_values_of<C, T, G - 1>(m, p, values, count, out);
  }
  accumulate_values<C, G>(p, values, count, out);
}

// Softmax attention of query vectors of one kv head whose rows share the same run of the
// cache. keys, values: this kv head's cache, [max_len][hd]. The full blocks of kLanes keys of
// the run are scored for all the vectors while they are in L1, the run's values are added a
// few vectors at a time per block of keys; each vector's remaining keys (the run's last partial
// block, its ancestors among the new rows) follow, one vector at a time, in the same order and
// arithmetic.
template <int C, typename T>
void attend_job(const QueryVector* vectors, int64_t count, const T* keys, const T* values,
                float scale, std::vector<float>& scratch) {
  constexpr int64_t hd = C * kLanes;
  constexpr int kGroup = ValueBlocks<C>::kVectors;
  const int64_t lo = vectors[0].span->lo, run = vectors[0].span->hi - lo;
  const int64_t full = run / kLanes * kLanes;
  int64_t stride = 0;
  for (int64_t v = 0; v < count; v++) stride = std::max(stride, vectors[v].span->size());
  // One more register's width: a stride of a multiple of 4 KB puts every vector's scores on the
  // same cache sets and stalls on address aliasing (measured 4x slower at 1000 keys).
  stride = (stride + kLanes - 1) / kLanes * kLanes + kLanes;
  scratch.resize(count * (stride + 1));
  float* inv_sum = scratch.data() + count * stride;
  auto probs = [&](int64_t v) { return scratch.data() + v * stride; };
  const Vec scale_v = set1(scale);
  Vec qv[C];

  // Scores of the run's full blocks, all vectors per block; the block after next is fetched
  // meanwhile (the hardware prefetcher alone leaves the first vector of each block waiting).
  const T* key_rows[kLanes];
  for (int64_t b = 0; b < full; b += kLanes) {
    if (b + 2 * kLanes < run) prefetch_rows(keys + (lo + b + 2 * kLanes) * hd, kLanes * hd);
    for (int j = 0; j < kLanes; j++) key_rows[j] = keys + (lo + b + j) * hd;
    for (int64_t v = 0; v < count; v++) {
      load_query<C>(vectors[v].q, qv);
      storeu(probs(v) + b, score_block<C>(qv, key_rows, scale_v));
    }
  }
  // Each vector's remaining scores, then its softmax. In the last block, lanes past the span
  // score its last key again: the maximum may read them.
  const Vec minus_inf = set1(-std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < count; v++) {
    const KeySpan& span = *vectors[v].span;
    const int64_t L = span.size();
    float* s = probs(v);
    load_query<C>(vectors[v].q, qv);
    for (int64_t b = full; b < L; b += kLanes) {
      for (int j = 0; j < kLanes; j++) key_rows[j] = keys + span.row(std::min(b + j, L - 1)) * hd;
      storeu(s + b, score_block<C>(qv, key_rows, scale_v));
    }
    Vec top = minus_inf;
    for (int64_t b = 0; b < L; b += kLanes) top = max(top, loadu(s + b));
    const Vec max_v = set1(reduce_max(top));
    Vec total = zero();
    for (int64_t b = 0; b < L; b += kLanes) {
      store_n(s + b, exp(sub(loadu(s + b), max_v)), L - b);
      total = add(total, load_n(s + b, L - b));
    }
    inv_sum[v] = 1.0f / reduce_add(total);
    std::fill_n(vectors[v].out, hd, 0.0f);
  }
  // Values of the run: blocks of keys that stay in L1, kGroup vectors at a time.
  constexpr int64_t kKeys = 64;
  for (int64_t k0 = 0; k0 < run; k0 += kKeys) {
    const int64_t keys_now = std::min(kKeys, run - k0);
    const T* vp = values + (lo + k0) * hd;
    if (k0 + kKeys < run) prefetch_rows(vp + kKeys * hd, std::min(kKeys, run - k0 - kKeys) * hd);
    for (int64_t v0 = 0; v0 < count; v0 += kGroup) {
      const float* p[kGroup];
      float* o[kGroup];
      const int64_t m = std::min<int64_t>(kGroup, count - v0);
      for (int64_t g = 0; g < m; g++) p[g] = probs(v0 + g) + k0, o[g] = vectors[v0 + g].out;
      accumulate_values_of<C, T>(m, p, vp, keys_now, o);
    }
  }
  // Then each vector's other keys, a stretch of consecutive cache rows at a time, and the
  // normalization.
  for (int64_t v = 0; v < count; v++) {
    const KeySpan& span = *vectors[v].span;
    const int64_t L = span.size();
    float* o = vectors[v].out;
    for (int64_t c = run, e; c < L; c = e) {
      for (e = c + 1; e < L && span.row(e) == span.row(e - 1) + 1;) e++;
      const float* p = probs(v) + c;
      accumulate_values<C, 1>(&p, values + span.row(c) * hd, e - c, &o);
    }
    const Vec inv = set1(inv_sum[v]);
    for (int k = 0; k < C; k++) storeu(o + k * kLanes, mul(loadu(o + k * kLanes), inv));
  }
}

// One request's rows in a forward: its KV cache and where its rows are.
struct Segment {
  void* cache_k;  // [layers][kv_heads][max_len][hd] of float or fp16 bits (kv_half)
  void* cache_v;
  int64_t max_len, start;  // cache rows; committed rows (the new rows are written after them)
  int64_t first, n;        // its rows of the forward: first..first + n
  std::vector<KeySpan> spans;
};

// Grouped-query attention of every segment's rows in layer `layer`, head_dim C * kLanes. q,
// out: [rows][heads][hd]; each segment's cache already holds its new rows' K/V. The query
// vectors (per segment, per kv head, row-major: v = row * group + g) are split evenly between
// threads; a thread's consecutive vectors of one segment and kv head with the same cache run
// form a job. A row's arithmetic depends only on its own query and keys.
template <int C, typename T>
void attend(const float* q, std::vector<Segment>& segments, int64_t layer, int64_t heads,
            int64_t kv_heads, float scale, float* out) {
  constexpr int64_t hd = C * kLanes;
  const int64_t group = heads / kv_heads;
  std::vector<int64_t> first_unit{0};
  for (const Segment& seg : segments) first_unit.push_back(first_unit.back() + kv_heads * seg.n * group);
  at::parallel_for(0, first_unit.back(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    std::vector<QueryVector> job;
    int64_t job_segment = 0, job_head = 0;
    auto flush = [&]() {
      if (job.empty()) return;
      const Segment& seg = segments[job_segment];
      const int64_t offset = (layer * kv_heads + job_head) * seg.max_len * hd;
      attend_job<C>(job.data(), job.size(), static_cast<const T*>(seg.cache_k) + offset,
                    static_cast<const T*>(seg.cache_v) + offset, scale, scratch);
      job.clear();
    };
    int64_t s = std::upper_bound(first_unit.begin(), first_unit.end(), begin) - first_unit.begin() - 1;
    for (int64_t u = begin; u < end; u++) {
      while (u >= first_unit[s + 1]) s++;
      const Segment& seg = segments[s];
      const int64_t per_head = seg.n * group, local = u - first_unit[s];
      const int64_t h = local / per_head, v = local % per_head, row = v / group;
      const int64_t offset = ((seg.first + row) * heads + h * group + v % group) * hd;
      const KeySpan& span = seg.spans[row];
      if (!job.empty()) {
        const KeySpan& run = *job.front().span;
        if (s != job_segment || h != job_head || span.lo != run.lo || span.hi != run.hi) flush();
      }
      if (job.empty()) job_segment = s, job_head = h;
      job.push_back(QueryVector{q + offset, out + offset, &span});
    }
    flush();
  });
}

// Each new row's keys: the committed cache (from the sliding window's start), then the new rows
// `mask` allows (None: causal).
std::vector<KeySpan> key_spans(const int64_t* pos, int64_t n, int64_t start, const bool* allowed,
                               int64_t window) {
  std::vector<KeySpan> spans(n);
  for (int64_t i = 0; i < n; i++) {
    KeySpan& span = spans[i];
    span.lo = window > 0 ? std::clamp<int64_t>(pos[i] - window + 1, 0, start) : 0;
    span.hi = start;
    for (int64_t j = 0; j < n; j++) {
      const bool sees = allowed ? allowed[i * n + j] : j <= i;
      if (sees && (window <= 0 || pos[j] > pos[i] - window)) span.extra.push_back(start + j);
    }
    TORCH_CHECK(span.size() > 0, "row ", i, " attends to nothing");
  }
  return spans;
}

}  // namespace

namespace onepass {

// Runs every layer on rows x [n, hidden], the rows of one or more requests, and returns the
// hidden states after the last layer. Segment s is rows[s] consecutive rows of x whose K/V go
// to caches_k[s] / caches_v[s] ([layers, kv_heads, max_len, head_dim], all float32 or all
// float16: each key and value rounded once, here, and widened exactly to read) at rows starts[s]...,
// attending to that cache's committed rows and, among themselves, as masks[s] ([rows, rows]
// bool, None: causal) allows. The projections multiply all the rows at once: the weights
// stream once per forward whatever the number of requests. Weights as
// layer_stack.decoder_layers, packed by small_gemm_pack or stored_pack (then `scales`: the
// RMSNorm weight the projection's columns are scaled by, or None); the rotation as
// [n, head_dim / 2, 2] (cos, sin).
at::Tensor decode_layers(const at::Tensor& x_in, double eps, const std::vector<at::Tensor>& packed,
                         const std::vector<int64_t>& out_features,
                         const c10::List<std::optional<at::Tensor>>& biases,
                         const c10::List<std::optional<at::Tensor>>& scales,
                         const std::vector<at::Tensor>& caches_k, const std::vector<at::Tensor>& caches_v,
                         const at::Tensor& rotation_in, const at::Tensor& positions_in,
                         const std::vector<int64_t>& starts, const std::vector<int64_t>& rows,
                         const c10::List<std::optional<at::Tensor>>& masks_in,
                         const std::vector<int64_t>& heads, int64_t window) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(heads.size() == 3, "heads must be [query heads, kv heads, head_dim]");
  const int64_t nh = heads[0], nkv = heads[1], hd = heads[2];
  const int64_t n = x_in.size(0), H = x_in.size(1);
  const size_t count = caches_k.size();
  TORCH_CHECK(count > 0 && caches_v.size() == count && starts.size() == count &&
                  rows.size() == count && masks_in.size() == count,
              "one cache pair, start, row count and mask per segment");
  TORCH_CHECK(hd == 64 || hd == 128, "head_dim must be 64 or 128");
  TORCH_CHECK(nh % nkv == 0, "query heads must be a multiple of kv heads");
  const int64_t layers = caches_k[0].size(0);
  TORCH_CHECK(static_cast<int64_t>(packed.size()) == 4 * layers &&
                  out_features.size() == packed.size() &&
                  static_cast<int64_t>(biases.size()) == 4 * layers &&
                  static_cast<int64_t>(scales.size()) == 4 * layers,
              "4 packed weights, sizes, biases and column scales per layer");
  for (int64_t l = 0; l < layers; l++) {  // widths checked before anything is written
    TORCH_CHECK(out_features[4 * l] == (nh + 2 * nkv) * hd && out_features[4 * l + 1] == H &&
                    out_features[4 * l + 2] % 2 == 0 && out_features[4 * l + 3] == H,
                "layer ", l, ": projection widths do not match the heads and hidden size");
  }
  const auto rotation = rotation_in.contiguous();
  const auto positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(rotation.scalar_type() == at::kFloat && rotation.numel() == n * hd,
              "rotation must be float32 [n, head_dim / 2, 2]");
  TORCH_CHECK(positions.numel() == n, "one position per row");
  std::vector<Segment> segments(count);
  std::vector<at::Tensor> masks(count);  // keeps the converted masks alive
  const bool kv_half = caches_k[0].scalar_type() == at::kHalf;
  const auto kv_type = kv_half ? at::kHalf : at::kFloat;
  int64_t first = 0;
  for (size_t s = 0; s < count; s++) {
    const at::Tensor &ck = caches_k[s], &cv = caches_v[s];
    TORCH_CHECK(ck.is_contiguous() && cv.is_contiguous() && ck.scalar_type() == kv_type &&
                    cv.scalar_type() == kv_type && cv.sizes() == ck.sizes() && ck.dim() == 4 &&
                    ck.size(0) == layers && ck.size(1) == nkv && ck.size(3) == hd,
                "caches must be contiguous [layers, kv_heads, max_len, head_dim], all float32 "
                "or all float16");
    Segment& seg = segments[s];
    seg.cache_k = ck.data_ptr(), seg.cache_v = cv.data_ptr();
    seg.max_len = ck.size(2), seg.start = starts[s], seg.first = first, seg.n = rows[s];
    TORCH_CHECK(seg.n > 0 && seg.start >= 0 && seg.start + seg.n <= seg.max_len,
                "segment ", s, ": its new rows do not fit in its cache");
    const std::optional<at::Tensor> mask_in = masks_in.get(s);
    const bool* allowed = nullptr;
    if (mask_in && mask_in->defined()) {
      masks[s] = mask_in->to(at::kBool).contiguous();
      TORCH_CHECK(masks[s].dim() == 2 && masks[s].size(0) == seg.n && masks[s].size(1) == seg.n,
                  "segment ", s, ": mask must be [rows, rows]");
      allowed = masks[s].data_ptr<bool>();
    }
    seg.spans = key_spans(positions.data_ptr<int64_t>() + first, seg.n, seg.start, allowed, window);
    first += seg.n;
  }
  TORCH_CHECK(first == n, "the segments' rows must add up to x's rows");

  auto x = x_in.contiguous().clone();
  auto normed = at::empty({n, H}, x.options());
  auto q = at::empty({n, nh * hd}, x.options());
  auto attended = at::empty({n, nh * hd}, x.options());
  float* xp = x.data_ptr<float>();
  const float* rot = rotation.data_ptr<float>();
  const float scale = static_cast<float>(1.0 / std::sqrt(hd));

  // A projection's weight: fp32 tiles (small_gemm_pack, RMSNorm weight folded in) or a GGUF
  // format's blocks (stored_pack) with the RMSNorm weight as a column scale: the same values.
  auto project = [&](const at::Tensor& input, int64_t j) {
    at::Tensor y;
    if (is_stored(packed[j])) {
      y = at::empty({input.size(0), out_features[j]}, input.options());
      stored_gemm_into(input.contiguous(), packed[j], scales.get(j), out_features[j], y);
    } else {
      y = small_gemm(input, packed[j], out_features[j]);
    }
    const std::optional<at::Tensor> bias = biases.get(j);
    if (bias && bias->defined()) y.add_(*bias);
    return y;
  };
  auto normalize_rows = [&]() {
    for (int64_t r = 0; r < n; r++) rms_normalize(xp + r * H, normed.data_ptr<float>() + r * H, H, static_cast<float>(eps));
  };
  auto add_rows = [&](const at::Tensor& y) {
    for (int64_t r = 0; r < n; r++) add_into(xp + r * H, y.data_ptr<float>() + r * H, H);
  };

  for (int64_t l = 0; l < layers; l++) {
    normalize_rows();
    const auto qkv = project(normed, 4 * l);
    for (const Segment& seg : segments) {
      const int64_t layer_offset = l * nkv * seg.max_len * hd;
      for (int64_t r = seg.first; r < seg.first + seg.n; r++) {
        const float* row = qkv.data_ptr<float>() + r * (nh + 2 * nkv) * hd;
        const float* rot_r = rot + r * hd;
        for (int64_t h = 0; h < nh; h++) rotate(row + h * hd, rot_r, q.data_ptr<float>() + (r * nh + h) * hd, hd);
        for (int64_t h = 0; h < nkv; h++) {
          const int64_t cache_row = layer_offset + (h * seg.max_len + seg.start + r - seg.first) * hd;
          const float* value = row + (nh + nkv + h) * hd;
          if (kv_half) {
            float key[128];
            rotate(row + (nh + h) * hd, rot_r, key, hd);
            uint16_t* ck = static_cast<uint16_t*>(seg.cache_k) + cache_row;
            uint16_t* cv = static_cast<uint16_t*>(seg.cache_v) + cache_row;
            for (int64_t k = 0; k < hd; k += kLanes) {
              store_half(ck + k, loadu(key + k));
              store_half(cv + k, loadu(value + k));
            }
          } else {
            rotate(row + (nh + h) * hd, rot_r, static_cast<float*>(seg.cache_k) + cache_row, hd);
            std::copy_n(value, hd, static_cast<float*>(seg.cache_v) + cache_row);
          }
        }
      }
    }
    const float* qp = q.data_ptr<float>();
    float* op = attended.data_ptr<float>();
    if (hd == 64) {
      if (kv_half) attend<64 / kLanes, uint16_t>(qp, segments, l, nh, nkv, scale, op);
      else attend<64 / kLanes, float>(qp, segments, l, nh, nkv, scale, op);
    } else {
      if (kv_half) attend<128 / kLanes, uint16_t>(qp, segments, l, nh, nkv, scale, op);
      else attend<128 / kLanes, float>(qp, segments, l, nh, nkv, scale, op);
    }
    add_rows(project(attended, 4 * l + 1));
    normalize_rows();
    const auto gate_up = project(normed, 4 * l + 2);
    const int64_t I = gate_up.size(1) / 2;
    auto act = at::empty({n, I}, x.options());
    for (int64_t r = 0; r < n; r++) silu_mul(gate_up.data_ptr<float>() + r * 2 * I, act.data_ptr<float>() + r * I, I);
    add_rows(project(act, 4 * l + 3));
  }
  return x;
}

}  // namespace onepass

TORCH_LIBRARY_FRAGMENT(ONEPASS_OPS, m) {
  m.def(
      "decode_layers(Tensor x, float eps, Tensor[] packed, int[] out_features, Tensor?[] biases, "
      "Tensor?[] scales, Tensor(a!)[] caches_k, Tensor(b!)[] caches_v, Tensor rotation, "
      "Tensor positions, int[] starts, int[] rows, Tensor?[] masks, int[] heads, int window) -> Tensor",
      onepass::decode_layers);
}
