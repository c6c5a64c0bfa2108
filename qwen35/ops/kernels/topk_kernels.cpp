// The k largest logits of each row, for the sampler (qwen35/sampling.py): greedy decoding is k = 1, top-k
// sampling k = top_k + 1 (the extra one tells whether the k-th value is tied).
//
// torch's topk over one 248,320-logit row takes ~0.55 ms here and its argmax ~0.2-0.45 ms, single-threaded
// and scalar: 2-3% of a 0.8B int4 decode step, every token. This reads the row once with 16-wide compares
// against the current k-th value; a lane above it (rare once k values are in: ~k ln(V/k) of them in a row of
// random order) is inserted into a sorted buffer of k. Result: values highest first, equal values by
// ascending id (the order a stable sort of the row gives, and for k = 1 torch.argmax's first maximum).
// A row holding a NaN is reported (ok = false) and left to torch, whose NaN rules the caller keeps.
//
// One source in both libraries: the AVX512 one registers top_k_rows (16-wide compares), the portable one
// (QWEN35_PORTABLE_LIBRARY, built for the machine it runs on) portable_top_k_rows, 8-wide in vector code the
// compiler lowers to what the CPU has. Without it a laptop's greedy step took 134-256 us for its argmax and the
// model card's sampling 1.1-1.2 ms a token (0.25 with the kernel), 4-5% of a 0.8B int4 step there.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(QWEN35_PORTABLE_LIBRARY)
#define QWEN35_TOPK_OP "portable_top_k_rows"
#else
#define QWEN35_TOPK_OP "top_k_rows"
#endif

namespace {

struct Best {
  std::vector<float> v;
  std::vector<int64_t> i;
  int64_t n = 0;  // filled so far (< k until k values have been seen)
  explicit Best(int64_t k) : v(k), i(k) {}
  // insert (x, id), id larger than every id seen so far: after every value >= x (equal values stay by id)
  void insert(float x, int64_t id) {
    const int64_t k = static_cast<int64_t>(v.size());
    int64_t p = n < k ? n : k - 1;
    if (n == k && !(x > v[k - 1])) return;
    while (p > 0 && v[p - 1] < x) {
      v[p] = v[p - 1];
      i[p] = i[p - 1];
      --p;
    }
    v[p] = x;
    i[p] = id;
    if (n < k) ++n;
  }
};

// One row: returns false where it holds a NaN (nothing written).
bool top_row(const float* x, int64_t V, int64_t k, float* vals, int64_t* ids) {
  Best b(k);
  int64_t j = 0;
  for (; j < V && b.n < k; ++j) {  // the first k values go in as they come
    if (x[j] != x[j]) return false;
    b.insert(x[j], j);
  }
#if defined(__AVX512F__)
  __m512 thr = _mm512_set1_ps(b.v[k - 1]);
  __mmask16 nan = 0;
  for (; j + 16 <= V; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __mmask16 m = _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ);
    if (m) {
      while (m) {
        const int l = __builtin_ctz(m);
        b.insert(x[j + l], j + l);
        m &= m - 1;
      }
      thr = _mm512_set1_ps(b.v[k - 1]);
    }
  }
  if (nan) return false;
#else
  typedef float f32x8 __attribute__((vector_size(32)));
  typedef int32_t i32x8 __attribute__((vector_size(32)));
  auto any = [](i32x8 m) {
    uint64_t w[4];
    std::memcpy(w, &m, sizeof(w));
    return (w[0] | w[1] | w[2] | w[3]) != 0;
  };
  f32x8 thr = f32x8{} + b.v[k - 1];
  i32x8 nan{};
  for (; j + 8 <= V; j += 8) {
    f32x8 v;
    std::memcpy(&v, x + j, sizeof(v));
    nan |= v != v;
    const i32x8 m = v > thr;
    if (any(m)) {
      for (int l = 0; l < 8; ++l)
        if (m[l]) b.insert(x[j + l], j + l);
      thr = f32x8{} + b.v[k - 1];
    }
  }
  if (any(nan)) return false;
#endif
  for (; j < V; ++j) {
    if (x[j] != x[j]) return false;
    b.insert(x[j], j);
  }
  for (int64_t t = 0; t < k; ++t) {
    vals[t] = b.v[t];
    ids[t] = b.i[t];
  }
  return true;
}

// x [B, V] fp32 (rows contiguous) -> (values [B, k], ids [B, k] int64, ok [B] bool: false for a row with a NaN)
std::tuple<at::Tensor, at::Tensor, at::Tensor> top_k_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, QWEN35_TOPK_OP ": fp32 rows [B, V]");
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(k >= 1 && k <= V, QWEN35_TOPK_OP ": k must be in [1, ", V, "], got ", k);
  at::Tensor vals = at::empty({B, k}, x.options());
  at::Tensor ids = at::empty({B, k}, x.options().dtype(at::kLong));
  at::Tensor ok = at::empty({B}, x.options().dtype(at::kBool));
  const float* xp = x.data_ptr<float>();
  auto* vp = vals.data_ptr<float>();
  auto* ip = ids.data_ptr<int64_t>();
  auto* okp = ok.data_ptr<bool>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) okp[b] = top_row(xp + b * x.stride(0), V, k, vp + b * k, ip + b * k);
  });
  return {vals, ids, ok};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def(QWEN35_TOPK_OP "(Tensor x, int k) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) { m.impl(QWEN35_TOPK_OP, &top_k_rows); }
