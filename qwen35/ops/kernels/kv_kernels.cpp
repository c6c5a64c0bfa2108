// Decode attention over a q8_0 KV cache (qwen35/kv_storage.py): keys and values as int8 rows [cap, D] with one
// fp16 scale per 32 values ([cap, D/32]), read in place, never expanded to bf16. Half the bytes of a bf16
// cache stream through (272 vs 512 per head-row at D = 256), which is what bounds decode at long context.
//
// attend_block_q8 is attn_decode's per-block body (cpu_kernels.cpp: flash-decoding, blocks of kAttnBlock keys
// processed in parallel and merged by their running max and sum) for q8_0 blocks:
// - scores: each key block's 32 int8 values are widened to fp32 and multiplied by their scale (q * d is
//   exact in fp32), then dotted with the fp32 query of each of the G query heads sharing this KV head;
// - softmax: cpu_kernels.cpp's (shared, so both formats round probabilities alike);
// - P.V: value rows widened and scaled the same way, accumulated in fp32, 32 output dims at a time over
//   the block's keys (the block's values, 128 KiB at most, stay in L2 across the D/32 passes).
// The reference is dequantize-then-attend in torch (kv_storage.attend_reference); the only differences are
// fp32 instead of bf16 dequantized values and summation order.
//
// quantize_row: one row of D bf16 values to Q8_0, by quant/formats.py's rule (scale max|x|/127 in fp32,
// x * (1/d) rounded half away from zero as floor(|v| + 0.5), fp16 scale rounded to nearest even): the
// decode step writes the same bytes as the torch path does (tested).
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <immintrin.h>

namespace qwen35_attn {
constexpr int64_t kAttnBlock = 512;  // cpu_kernels.cpp's; checked there by a static_assert on the same name
void softmax_block(int64_t G, int64_t n, const float* mx, float* scores, float* out, int64_t D);
}  // namespace qwen35_attn

namespace qwen35_kv {
namespace {

using qwen35_attn::kAttnBlock;

inline __m512 widen16(const int8_t* p) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int G>
void attend_q8(const float* q, int64_t D, const int8_t* kb, const c10::Half* kdb, const int8_t* vb,
               const c10::Half* vdb, int64_t s0, int64_t s1, float scale, float* scores, float* out) {
  const int64_t n = s1 - s0, nb = D / 32, nbd = D / 32;
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t s = 0; s < n; ++s) {
    const int8_t* kr = kb + (s0 + s) * D;
    const c10::Half* dr = kdb + (s0 + s) * nbd;
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nb; ++c) {
      const __m512 d = _mm512_set1_ps(static_cast<float>(dr[c]));
      const __m512 k0 = _mm512_mul_ps(widen16(kr + c * 32), d), k1 = _mm512_mul_ps(widen16(kr + c * 32 + 16), d);
      for (int g = 0; g < G; ++g) {
        acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + c * 32), k0, acc[g]);
        acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + c * 32 + 16), k1, acc[g]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const float sc = _mm512_reduce_add_ps(acc[g]) * scale;
      scores[g * kAttnBlock + s] = sc;
      mx[g] = std::max(mx[g], sc);
    }
  }
  qwen35_attn::softmax_block(G, n, mx, scores, out, D);
  for (int64_t c = 0; c < nb; ++c) {
    __m512 lo[G], hi[G];
    for (int g = 0; g < G; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {
      const int8_t* vr = vb + (s0 + s) * D + c * 32;
      const __m512 d = _mm512_set1_ps(static_cast<float>(vdb[(s0 + s) * nbd + c]));
      const __m512 v0 = _mm512_mul_ps(widen16(vr), d), v1 = _mm512_mul_ps(widen16(vr + 16), d);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * kAttnBlock + s]);
        lo[g] = _mm512_fmadd_ps(p, v0, lo[g]);
        hi[g] = _mm512_fmadd_ps(p, v1, hi[g]);
      }
    }
    for (int g = 0; g < G; ++g) {
      float* o = out + g * (D + 2) + 2 + c * 32;
      _mm512_storeu_ps(o, lo[g]);
      _mm512_storeu_ps(o + 16, hi[g]);
    }
  }
}

}  // namespace

// One (row, KV head, key block) of decode attention over q8_0 keys/values: q [G, D] fp32 (the query heads of
// this KV head), kb/vb the head's int8 rows [cap, D], kdb/vdb its scales [cap, D/32]; keys [s0, s1).
// out: per query head (max score, sum of probabilities, D unnormalised outputs), as attn_decode merges them.
void attend_block_q8(int64_t G, const float* q, int64_t D, const int8_t* kb, const c10::Half* kdb,
                     const int8_t* vb, const c10::Half* vdb, int64_t s0, int64_t s1, float scale, float* scores,
                     float* out) {
  switch (G) {
    case 1: attend_q8<1>(q, D, kb, kdb, vb, vdb, s0, s1, scale, scores, out); break;
    case 2: attend_q8<2>(q, D, kb, kdb, vb, vdb, s0, s1, scale, scores, out); break;
    case 4: attend_q8<4>(q, D, kb, kdb, vb, vdb, s0, s1, scale, scores, out); break;
    default: attend_q8<8>(q, D, kb, kdb, vb, vdb, s0, s1, scale, scores, out); break;
  }
}

void quantize_row(const c10::BFloat16* x, int64_t D, int8_t* q, c10::Half* d) {
  for (int64_t b = 0; b < D / 32; ++b) {
    const c10::BFloat16* xb = x + b * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(static_cast<float>(xb[j])));
    const float dd = amax / 127.f, inv = dd != 0.f ? 1.f / dd : 0.f;
    for (int j = 0; j < 32; ++j) {
      const float v = static_cast<float>(xb[j]) * inv;
      const float r = std::min(127.f, std::floor(std::fabs(v) + 0.5f));
      q[b * 32 + j] = static_cast<int8_t>(v < 0.f ? -r : r);
    }
    d[b] = static_cast<c10::Half>(dd);
  }
}

}  // namespace qwen35_kv
