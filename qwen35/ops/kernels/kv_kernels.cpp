// Decode attention over a q8_0 KV cache (qwen35/kv_storage.py): keys and values as int8 rows [cap, D] with one
// fp16 scale per 32 values ([cap, D/32]), read in place, never expanded to bf16. Half the bytes of a bf16
// cache stream through (272 vs 512 per head-row at D = 256), which is what bounds decode at long context.
//
// attend_blocks_q8 is attn_decode's block pass (cpu_kernels.cpp: flash-decoding, blocks of kAttnBlock keys
// processed in parallel and merged by their running max and sum) for q8_0 blocks:
// - scores: integer dot products (AVX512-VNNI) of each int8 key block with the query in Q8_0 blocks (as
//   llama.cpp's CPU path does against a Q8_0 K cache: the query's rounding costs about what a bf16 rounding
//   of it would, tests/test_kv_cache.py), 4 query heads per instruction, scaled by both blocks' scales;
//   widening the keys to fp32 instead would cost 4 conversions and G multiply-adds per 16 values;
// - softmax: cpu_kernels.cpp's (shared, so both formats round probabilities alike);
// - P.V in 16-bit integers (pv_q8): each key's value scales folded into its probabilities, put in int16, and
//   two keys' int8 values (widened to int16) multiplied by them per vpdpwssd, 32 output dims at a time over
//   the block's keys (the block's values, 128 KiB at most, stay in L2 across the D/32 passes);
// - memory: the score pass streams the keys and pulls the values into L2; P.V, computing from L2, pulls the
//   next block's keys in, so both phases keep memory busy.
// The reference is dequantize-then-attend in torch (kv_storage.attend_reference, quantize_query=True).
//
// New keys and values are written by layer_steps.h's q8_0_row (both libraries): the same bytes as the torch path
// writes (tested).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <vector>

#include "attn_blocks.h"

namespace qwen35_kv {
namespace {

using qwen35_attn::kAttnBlock;
using qwen35_attn::RowPrefetch;

inline float half_f(c10::Half h) { return _cvtsh_ss(h.x); }  // F16C, one instruction (c10's is in software)

// The query of each head, per block of 32, as Q8_0 int8 (ggml's rule, as llama.cpp's CPU path quantizes the
// query against a Q8_0 K cache), laid out for the score loop: 4 query heads side by side in one register,
// one head per 128-bit lane, so one VNNI instruction (vpdpbusd: 64 u8 x s8 products into 16 int32 lanes)
// serves 4 heads at once and the key's 16 bytes are simply broadcast to the 4 lanes.
struct QueryBlocks {
  int64_t groups, nb;
  std::vector<__m512i> qa;     // [group][block][half]: head (4 group + l)'s 16 bytes of that half-block in lane l
  std::vector<__m512i> corr;   // [group][block]: -128 * sum of each lane's 4 q bytes over both halves
  std::vector<__m512> dq;      // [group][block]: each lane's head's q scale
};

void quantize_query(const float* q, int64_t G, int64_t D, QueryBlocks& qb) {
  qb.nb = D / 32;
  qb.groups = (G + 3) / 4;
  qb.qa.resize(qb.groups * qb.nb * 2);
  qb.corr.resize(qb.groups * qb.nb);
  qb.dq.resize(qb.groups * qb.nb);
  alignas(64) int8_t bytes[2][64];
  alignas(64) int32_t corr[16];
  alignas(64) float dq[16];
  for (int64_t grp = 0; grp < qb.groups; ++grp)
    for (int64_t blk = 0; blk < qb.nb; ++blk) {
      for (int l = 0; l < 4; ++l) {
        const int64_t g = grp * 4 + l;
        int8_t qs[32] = {0};
        float d = 0.f;
        if (g < G) {  // heads past G (G < 4) stay zero: their lanes are never read
          const float* x = q + g * D + blk * 32;
          float amax = 0.f;
          for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
          d = amax / 127.f;
          const float inv = d != 0.f ? 1.f / d : 0.f;
          for (int j = 0; j < 32; ++j) {
            const float v = x[j] * inv;
            const float r = std::min(127.f, std::floor(std::fabs(v) + 0.5f));
            qs[j] = static_cast<int8_t>(v < 0.f ? -r : r);
          }
        }
        for (int t = 0; t < 4; ++t) {
          int32_t sum = 0;
          for (int half = 0; half < 2; ++half)
            for (int j = 0; j < 4; ++j) {
              bytes[half][l * 16 + t * 4 + j] = qs[half * 16 + t * 4 + j];
              sum += qs[half * 16 + t * 4 + j];
            }
          corr[l * 4 + t] = -128 * sum;
          dq[l * 4 + t] = d;
        }
      }
      qb.qa[(grp * qb.nb + blk) * 2] = _mm512_load_si512(bytes[0]);
      qb.qa[(grp * qb.nb + blk) * 2 + 1] = _mm512_load_si512(bytes[1]);
      qb.corr[grp * qb.nb + blk] = _mm512_load_si512(corr);
      qb.dq[grp * qb.nb + blk] = _mm512_load_ps(dq);
    }
}

// scores[g * kAttnBlock + s] for keys [s0, s1): sum over blocks of kd * dq * (integer dot of the int8 key and
// query blocks). The key bytes enter vpdpbusd as unsigned (k ^ 0x80 = k + 128); the accumulator starts at
// -128 * sum(q) to take the offset back out, exactly.
constexpr int64_t KAHEAD = 8;

// One key's raw per-lane sums, over all blocks: acc[grp] lane 4l + t is a quarter of head (4 grp + l)'s dot.
template <int NG>
inline void key_sums(const QueryBlocks& qb, int64_t nb, const int8_t* kr, const float* kdf, __m512 (&acc)[NG]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int grp = 0; grp < NG; ++grp) acc[grp] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nb; ++blk) {
    const __m512i k0 = _mm512_xor_si512(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kr + blk * 32))), flip);
    const __m512i k1 = _mm512_xor_si512(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kr + blk * 32 + 16))), flip);
    const __m512 kd = _mm512_set1_ps(kdf[blk]);
    for (int grp = 0; grp < NG; ++grp) {
      const int64_t i = grp * nb + blk;
      __m512i dot = _mm512_dpbusd_epi32(qb.corr[i], k0, qb.qa[2 * i]);
      dot = _mm512_dpbusd_epi32(dot, k1, qb.qa[2 * i + 1]);
      acc[grp] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(kd, qb.dq[i]), acc[grp]);
    }
  }
}

// A key's block scales as fp32, and its value row into L2 / a later key row into L1 (see scores_q8).
inline void key_prologue(int64_t D, int64_t nb, const int8_t* kb, const c10::Half* kdb, const int8_t* vb, int64_t s,
                         float* kdf) {
  // the value row into L2 while this pass is bound by the keys: pv_q8 then reads it from there
  for (int64_t off = 0; off < D; off += 64) _mm_prefetch(reinterpret_cast<const char*>(vb + s * D + off), _MM_HINT_T1);
  for (int64_t off = 0; off < D; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(kb + (s + KAHEAD) * D + off), _MM_HINT_T0);
  const c10::Half* dr = kdb + s * nb;
  int64_t c = 0;
  for (; c + 8 <= nb; c += 8)
    _mm256_storeu_ps(kdf + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dr + c))));
  for (; c < nb; ++c) kdf[c] = half_f(dr[c]);
}

// scores[g * kAttnBlock + s] for keys [s0, s1): sum over blocks of kd * dq * (integer dot of the int8 key and
// query blocks). The key bytes enter vpdpbusd as unsigned (k ^ 0x80 = k + 128); the accumulator starts at
// -128 * sum(q) to take the offset back out, exactly. Four keys at a time: their 4 x 4 lanes of partial sums
// per head are added across in one 4 x 4 transpose (6 instructions), which leaves head l's four scores in
// 128-bit lane l: one store a head for four keys, and the running max kept as a vector.
template <int NG>
void scores_q8(const QueryBlocks& qb, int64_t G, int64_t D, const int8_t* kb, const c10::Half* kdb,
               const int8_t* vb, int64_t s0, int64_t s1, float scale, float* scores, float* mx) {
  const int64_t nb = D / 32;
  alignas(64) float kdf[4][16];
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax[NG];
  for (int grp = 0; grp < NG; ++grp) vmax[grp] = _mm512_set1_ps(-INFINITY);
  int64_t s = s0;
  for (; s + 4 <= s1; s += 4) {
    __m512 acc[4][NG];
    for (int r = 0; r < 4; ++r) {
      key_prologue(D, nb, kb, kdb, vb, s + r, kdf[r]);
      key_sums<NG>(qb, nb, kb + (s + r) * D, kdf[r], acc[r]);
    }
    for (int grp = 0; grp < NG; ++grp) {
      // per 128-bit lane (one head): [t0 t1 t2 t3] of keys r = 0..3 -> [key0 key1 key2 key3] sums
      const __m512 u01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[0][grp], acc[1][grp]),
                                       _mm512_unpackhi_ps(acc[0][grp], acc[1][grp]));
      const __m512 u23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[2][grp], acc[3][grp]),
                                       _mm512_unpackhi_ps(acc[2][grp], acc[3][grp]));
      const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(u01, u23, 0x44), _mm512_shuffle_ps(u01, u23, 0xEE));
      const __m512 v = _mm512_mul_ps(sums, vscale);
      vmax[grp] = _mm512_max_ps(vmax[grp], v);
      float* out = scores + (grp * 4) * kAttnBlock + (s - s0);
      _mm_storeu_ps(out, _mm512_castps512_ps128(v));
      if (grp * 4 + 1 < G) _mm_storeu_ps(out + kAttnBlock, _mm512_extractf32x4_ps(v, 1));
      if (grp * 4 + 2 < G) {
        _mm_storeu_ps(out + 2 * kAttnBlock, _mm512_extractf32x4_ps(v, 2));
        _mm_storeu_ps(out + 3 * kAttnBlock, _mm512_extractf32x4_ps(v, 3));
      }
    }
  }
  alignas(64) float lanes[16];
  for (int grp = 0; grp < NG; ++grp) {
    _mm512_store_ps(lanes, vmax[grp]);
    for (int l = 0; l < 4 && grp * 4 + l < G; ++l)
      mx[grp * 4 + l] = std::max({mx[grp * 4 + l], lanes[4 * l], lanes[4 * l + 1], lanes[4 * l + 2], lanes[4 * l + 3]});
  }
  for (; s < s1; ++s) {  // the last 0-3 keys one at a time
    key_prologue(D, nb, kb, kdb, vb, s, kdf[0]);
    __m512 acc[NG];
    key_sums<NG>(qb, nb, kb + s * D, kdf[0], acc);
    for (int grp = 0; grp < NG; ++grp) {
      // each 128-bit lane's 4 floats summed: that lane's head's score
      __m512 t = _mm512_add_ps(acc[grp], _mm512_permute_ps(acc[grp], 0xB1));
      t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
      _mm512_store_ps(lanes, t);
      for (int l = 0; l < 4 && grp * 4 + l < G; ++l) {
        const int64_t g = grp * 4 + l;
        const float sc = lanes[l * 4] * scale;
        scores[g * kAttnBlock + (s - s0)] = sc;
        mx[g] = std::max(mx[g], sc);
      }
    }
  }
}

// P.V in 16-bit integers. out[g * (D + 2) + 2 + d] = sum_s p[g][s] * vd[s][c] * v[s][d] (c = d / 32): each
// key's value scale is folded into its probability, and the product put in int16 against the block's largest
// scale of that chunk, W[c] = max_s vd[s][c]: w[c][g][s] = round(p * vd[s][c] / W[c] * 32767). p <= 1 (the block's
// own max gives exp(0) = 1), so w fits in 15 bits, and sum_s w * v stays exact in int32: 512 keys * 128 * 32767 <
// 2^31. The output is that sum times W[c] / 32767: the rounding of w is 2^-16 of the chunk's largest term, far
// under the bf16 rounding of p the bf16 path makes. vpdpwssd then multiplies two keys' values (interleaved per
// output dim) by the broadcast pair (w[s], w[s+1]): 32 products an instruction, from int8 widened once to int16,
// where fp32 took 2 conversions per 16 values and one FMA per 16 products.
// unpacklo/hi work within 128-bit lanes: accumulator `lo` lane 4k+t holds dim 8k+t, `hi` dim 8k+4+t of each 32.
constexpr int64_t kPairs = kAttnBlock / 2;

struct PVScratch {
  std::vector<float> vdT;    // [nb][kAttnBlock]: the block's value scales, transposed, zero past n
  std::vector<int32_t> w;    // [nb][G][kPairs]: (w[s], w[s+1]) as int16 pairs
};

template <int G, int BL>
void pv_pass(const int32_t* w, const float* W, int64_t D, const int8_t* vb, int64_t s0, int64_t n, int64_t c0,
             float* out, RowPrefetch& ahead) {
  __m512i acc[G][2 * BL];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 2 * BL; ++j) acc[g][j] = _mm512_setzero_si512();
  const int64_t np = (n + 1) / 2;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t j = 0; j < np; ++j) {
    const int8_t* vr = vb + (s0 + 2 * j) * D + c0 * 32;
    const bool odd = 2 * j + 1 == n;  // the last key has no partner: zeros (its w pair's high half is 0 too)
    ahead.step();
    for (int c = 0; c < BL; ++c) {
      const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + 32 * c)));
      const __m256i* next = reinterpret_cast<const __m256i*>(vr + D + 32 * c);
      const __m512i b = odd ? zero : _mm512_cvtepi8_epi16(_mm256_loadu_si256(next));
      const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
      const int32_t* wc = w + (c0 + c) * G * kPairs + j;
      for (int g = 0; g < G; ++g) {
        const __m512i pw = _mm512_set1_epi32(wc[g * kPairs]);
        acc[g][2 * c] = _mm512_dpwssd_epi32(acc[g][2 * c], lo, pw);
        acc[g][2 * c + 1] = _mm512_dpwssd_epi32(acc[g][2 * c + 1], hi, pw);
      }
    }
  }
  // lanes back into dim order: dims 0-15 are lo 0-3, hi 0-3, lo 4-7, hi 4-7; dims 16-31 the same from 8
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int c = 0; c < BL; ++c) {
    const __m512 scale = _mm512_set1_ps(W[c0 + c] / 32767.f);
    for (int g = 0; g < G; ++g) {
      float* o = out + g * (D + 2) + 2 + (c0 + c) * 32;
      const __m512 lo = _mm512_cvtepi32_ps(acc[g][2 * c]), hi = _mm512_cvtepi32_ps(acc[g][2 * c + 1]);
      _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), scale));
      _mm512_storeu_ps(o + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), scale));
    }
  }
}

// 16 rows of 8 fp16 scales (row-major, contiguous) -> out[c * kAttnBlock + r] fp32: two rounds of two-source
// word permutes (c 0-3 and 4-7 of rows 0-7 and 8-15, then each pair of c for all 16 rows), 8 in all.
inline void transpose_scales16x8(const c10::Half* src, float* out) {
  alignas(64) static const struct Idx {
    int16_t lo[32], hi[32], c01[32];
    Idx() {
      for (int t = 0; t < 32; ++t) {
        lo[t] = static_cast<int16_t>((t % 8) * 8 + t / 8);  // c = t / 8 (0-3), row t % 8
        hi[t] = static_cast<int16_t>(lo[t] + 4);           // c 4-7
        c01[t] = static_cast<int16_t>((t / 16) * 8 + (t % 16 < 8 ? t % 16 : 32 + t % 16 - 8));
      }
    }
  } idx;
  const __m512i* p = reinterpret_cast<const __m512i*>(src);
  const __m512i z0 = _mm512_loadu_si512(p), z1 = _mm512_loadu_si512(p + 1), z2 = _mm512_loadu_si512(p + 2),
                z3 = _mm512_loadu_si512(p + 3);
  const __m512i ilo = _mm512_load_si512(idx.lo), ihi = _mm512_load_si512(idx.hi), i01 = _mm512_load_si512(idx.c01);
  const __m512i i23 = _mm512_add_epi16(i01, _mm512_set1_epi16(16));
  const __m512i a = _mm512_permutex2var_epi16(z0, ilo, z1), b = _mm512_permutex2var_epi16(z0, ihi, z1);
  const __m512i c = _mm512_permutex2var_epi16(z2, ilo, z3), d = _mm512_permutex2var_epi16(z2, ihi, z3);
  const __m512i t[4] = {_mm512_permutex2var_epi16(a, i01, c), _mm512_permutex2var_epi16(a, i23, c),
                        _mm512_permutex2var_epi16(b, i01, d), _mm512_permutex2var_epi16(b, i23, d)};
  for (int k = 0; k < 4; ++k) {
    _mm512_storeu_ps(out + (2 * k) * kAttnBlock, _mm512_cvtph_ps(_mm512_castsi512_si256(t[k])));
    _mm512_storeu_ps(out + (2 * k + 1) * kAttnBlock, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(t[k], 1)));
  }
}

template <int G>
void pv_q8(const float* scores, int64_t D, const int8_t* vb, const c10::Half* vdb, int64_t s0, int64_t n,
           PVScratch& sc, float* out, RowPrefetch& ahead) {
  const int64_t nb = D / 32;
  sc.vdT.resize(nb * kAttnBlock);
  sc.w.resize(nb * G * kPairs);
  // the scales transposed (keys along a vector), zero from n to the next 16
  const int64_t n16 = (n + 15) / 16 * 16;
  int64_t s = 0;
  if (nb == 8)  // D = 256 (every Qwen3.5 size): 16 keys' scales (256 contiguous bytes) transposed in registers
    for (; s + 16 <= n; s += 16) transpose_scales16x8(vdb + (s0 + s) * 8, sc.vdT.data() + s);
  for (; s < n; ++s) {
    const c10::Half* dr = vdb + (s0 + s) * nb;
    for (int64_t c = 0; c < nb; ++c) sc.vdT[c * kAttnBlock + s] = half_f(dr[c]);
  }
  for (int64_t c = 0; c < nb; ++c)
    for (int64_t s = n; s < n16; ++s) sc.vdT[c * kAttnBlock + s] = 0.f;
  float W[16];  // D <= 512
  const __mmask16 tail = n16 > n ? static_cast<__mmask16>((1u << (n - (n16 - 16))) - 1) : 0xFFFF;
  for (int64_t c = 0; c < nb; ++c) {
    const float* d = sc.vdT.data() + c * kAttnBlock;
    __m512 m = _mm512_setzero_ps();
    for (int64_t s = 0; s < n16; s += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(d + s));
    W[c] = _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(W[c] > 0.f ? 32767.f / W[c] : 0.f);
    int16_t* wc = reinterpret_cast<int16_t*>(sc.w.data() + c * G * kPairs);
    for (int64_t s = 0; s < n16; s += 16) {
      const __m512 ds = _mm512_mul_ps(_mm512_loadu_ps(d + s), inv);
      const __mmask16 keep = s + 16 <= n ? 0xFFFF : tail;  // probabilities past n are whatever the buffer held
      for (int g = 0; g < G; ++g) {
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(keep, scores + g * kAttnBlock + s), ds);
        // saturating: a product a few ulps past 32767 must not wrap
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wc + g * 2 * kPairs + s),
                            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(x)));
      }
    }
  }
  constexpr int BL = G <= 4 ? 2 : 1;
  ahead.spread((nb + BL - 1) / BL * ((n + 1) / 2));
  int64_t c0 = 0;
  for (; c0 + BL <= nb; c0 += BL) pv_pass<G, BL>(sc.w.data(), W, D, vb, s0, n, c0, out, ahead);
  for (; c0 < nb; ++c0) pv_pass<G, 1>(sc.w.data(), W, D, vb, s0, n, c0, out, ahead);
}

template <int G>
void attend_q8(const QueryBlocks& qb, int64_t D, const int8_t* kb, const c10::Half* kdb, const int8_t* vb,
               const c10::Half* vdb, int64_t s0, int64_t s1, float scale, float* scores, float* out,
               RowPrefetch& ahead) {
  thread_local PVScratch pv;
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  constexpr int NG = (G + 3) / 4;
  scores_q8<NG>(qb, G, D, kb, kdb, vb, s0, s1, scale, scores, mx);
  const int64_t n = s1 - s0;
  qwen35_attn::softmax_block(G, n, mx, scores, out, D);
  pv_q8<G>(scores, D, vb, vdb, s0, n, pv, out, ahead);
}

}  // namespace

// attn_decode's blocks over q8_0 keys/values (flash-decoding: cpu_kernels.cpp merges them): q [B, Hkv * G, D]
// bf16; k[b], v[b] row b's int8 buffers [Hkv, cap[b], D], kd[b], vd[b] their scales [Hkv, cap[b], D/32];
// part [B * Hkv * nblocks, G, D + 2] gets, per (row, KV head, block of kAttnBlock keys) and query head, the
// block's max score, sum of probabilities and D unnormalised outputs. Each row's query is put in Q8_0 blocks
// once, not once per key block.
void attend_blocks_q8(const c10::BFloat16* q, int64_t B, int64_t Hkv, int64_t G, int64_t D,
                      const std::vector<const int8_t*>& k, const std::vector<const c10::Half*>& kd,
                      const std::vector<const int8_t*>& v, const std::vector<const c10::Half*>& vd,
                      const std::vector<int64_t>& cap, at::IntArrayRef lengths, int64_t nblocks, float scale,
                      float* part) {
  std::vector<QueryBlocks> qbs(B * Hkv);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(G * D);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < G * D; ++j) qf[j] = static_cast<float>(q[i * G * D + j]);
      quantize_query(qf.data(), G, D, qbs[i]);
    }
  });
  at::parallel_for(0, B * Hkv * nblocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(G * kAttnBlock);
    for (int64_t i = i0; i < i1; ++i) {
      const auto [b, h, s0, s1] = qwen35_attn::block_of(i, Hkv, nblocks, lengths);
      float* out = part + i * G * (D + 2);
      if (s0 >= s1) {  // past this row's length
        for (int64_t g = 0; g < G; ++g) { out[g * (D + 2)] = -INFINITY; out[g * (D + 2) + 1] = 0.f; }
        continue;
      }
      const QueryBlocks& qb = qbs[b * Hkv + h];
      const int8_t* kb = k[b] + h * cap[b] * D;
      const int8_t* vb = v[b] + h * cap[b] * D;
      const c10::Half* kdb = kd[b] + h * cap[b] * (D / 32);
      const c10::Half* vdb = vd[b] + h * cap[b] * (D / 32);
      float* sc = scores.data();
      RowPrefetch ahead;  // the keys of this thread's next block, during this one's P.V
      if (i + 1 < i1) {
        const qwen35_attn::Block nx = qwen35_attn::block_of(i + 1, Hkv, nblocks, lengths);
        if (nx.s0 < nx.s1) ahead = RowPrefetch(k[nx.b] + (nx.h * cap[nx.b] + nx.s0) * D, nx.s1 - nx.s0, D, D);
      }
      switch (G) {
        case 1: attend_q8<1>(qb, D, kb, kdb, vb, vdb, s0, s1, scale, sc, out, ahead); break;
        case 2: attend_q8<2>(qb, D, kb, kdb, vb, vdb, s0, s1, scale, sc, out, ahead); break;
        case 4: attend_q8<4>(qb, D, kb, kdb, vb, vdb, s0, s1, scale, sc, out, ahead); break;
        default: attend_q8<8>(qb, D, kb, kdb, vb, vdb, s0, s1, scale, sc, out, ahead); break;
      }
    }
  });
}

}  // namespace qwen35_kv
