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
// - P.V: each key's value scales folded into its probabilities once, value rows widened to fp32 and
//   accumulated in fp32, 32 output dims at a time over the block's keys (the block's values, 128 KiB at most,
//   stay in L2 across the D/32 passes).
// The reference is dequantize-then-attend in torch (kv_storage.attend_reference, quantize_query=True).
//
// New keys and values are written by layer_steps.h's q8_0_row (both libraries): the same bytes as the torch path
// writes (tested).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <vector>

namespace qwen35_attn {
constexpr int64_t kAttnBlock = 512;  // cpu_kernels.cpp's; checked there by a static_assert on the same name
void softmax_block(int64_t G, int64_t n, const float* mx, float* scores, float* out, int64_t D);
}  // namespace qwen35_attn

namespace qwen35_kv {
namespace {

using qwen35_attn::kAttnBlock;

inline float half_f(c10::Half h) { return _cvtsh_ss(h.x); }  // F16C, one instruction (c10's is in software)

inline __m512 widen16(const int8_t* p) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

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
template <int NG>
void scores_q8(const QueryBlocks& qb, int64_t G, int64_t D, const int8_t* kb, const c10::Half* kdb,
               const int8_t* vb, int64_t s0, int64_t s1, float scale, float* scores, float* mx) {
  const int64_t nb = D / 32;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  alignas(64) float kdf[16];
  alignas(64) float lanes[16];
  for (int64_t s = s0; s < s1; ++s) {
    const int8_t* kr = kb + s * D;
    const c10::Half* dr = kdb + s * nb;
    // the value row into L2 while this pass is bound by the keys: pv_q8 then reads it from there
    for (int64_t off = 0; off < D; off += 64) _mm_prefetch(reinterpret_cast<const char*>(vb + s * D + off), _MM_HINT_T1);
    for (int64_t off = 0; off < D; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(kb + (s + KAHEAD) * D + off), _MM_HINT_T0);
    int64_t c = 0;
    for (; c + 8 <= nb; c += 8)
      _mm256_store_ps(kdf + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dr + c))));
    for (; c < nb; ++c) kdf[c] = half_f(dr[c]);
    __m512 acc[NG];
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

// out[g * (D + 2) + 2 + d] = sum_s p[g][s] * vd[s][d / 32] * v[s][d]: the value scale folded into the probability
// once per key (w[s][c][g]), then BL blocks of 32 output dims at a time over the block's keys, fp32: with BL = 2
// each pass reads whole 64-byte lines of the value rows (prefetched into L2 by the score pass), so every line
// comes in once; 4 * BL * G accumulators stay in registers (16 for G = 4 or 8 with BL = 2 or 1).
template <int G, int BL>
void pv_pass(const float* w, int64_t D, const int8_t* vb, int64_t s0, int64_t n, int64_t c0, float* out) {
  const int64_t nb = D / 32;
  __m512 acc[G][2 * BL];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 2 * BL; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    const int8_t* vr = vb + (s0 + s) * D + c0 * 32;
    __m512 v[2 * BL];
    for (int j = 0; j < 2 * BL; ++j) v[j] = widen16(vr + 16 * j);
    const float* ws = w + (s * nb + c0) * G;
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < BL; ++c) {
        const __m512 p = _mm512_set1_ps(ws[c * G + g]);
        acc[g][2 * c] = _mm512_fmadd_ps(p, v[2 * c], acc[g][2 * c]);
        acc[g][2 * c + 1] = _mm512_fmadd_ps(p, v[2 * c + 1], acc[g][2 * c + 1]);
      }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 2 * BL; ++j) _mm512_storeu_ps(out + g * (D + 2) + 2 + c0 * 32 + 16 * j, acc[g][j]);
}

template <int G>
void pv_q8(const float* scores, int64_t D, const int8_t* vb, const c10::Half* vdb, int64_t s0, int64_t n,
           float* w, float* out) {
  const int64_t nb = D / 32;
  alignas(64) float d[16];
  for (int64_t s = 0; s < n; ++s) {
    const c10::Half* dr = vdb + (s0 + s) * nb;
    float pg[G];
    for (int g = 0; g < G; ++g) pg[g] = scores[g * kAttnBlock + s];
    int64_t c = 0;
    for (; c + 8 <= nb; c += 8)
      _mm256_store_ps(d + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dr + c))));
    for (; c < nb; ++c) d[c] = half_f(dr[c]);
    float* ws = w + s * nb * G;
    for (c = 0; c < nb; ++c)
      for (int g = 0; g < G; ++g) ws[c * G + g] = pg[g] * d[c];
  }
  constexpr int BL = G <= 4 ? 2 : 1;
  int64_t c0 = 0;
  for (; c0 + BL <= nb; c0 += BL) pv_pass<G, BL>(w, D, vb, s0, n, c0, out);
  for (; c0 < nb; ++c0) pv_pass<G, 1>(w, D, vb, s0, n, c0, out);
}

template <int G>
void attend_q8(const QueryBlocks& qb, int64_t D, const int8_t* kb, const c10::Half* kdb, const int8_t* vb,
               const c10::Half* vdb, int64_t s0, int64_t s1, float scale, float* scores, float* out) {
  thread_local std::vector<float> w;
  w.resize(kAttnBlock * (D / 32) * G);
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  constexpr int NG = (G + 3) / 4;
  scores_q8<NG>(qb, G, D, kb, kdb, vb, s0, s1, scale, scores, mx);
  const int64_t n = s1 - s0;
  qwen35_attn::softmax_block(G, n, mx, scores, out, D);
  pv_q8<G>(scores, D, vb, vdb, s0, n, w.data(), out);
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
      const int64_t b = i / (Hkv * nblocks), h = (i / nblocks) % Hkv, blk = i % nblocks;
      const int64_t s0 = blk * kAttnBlock, s1 = std::min(lengths[b], (blk + 1) * kAttnBlock);
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
      switch (G) {
        case 1: attend_q8<1>(qb, D, kb, kdb, vb, vdb, s0, s1, scale, sc, out); break;
        case 2: attend_q8<2>(qb, D, kb, kdb, vb, vdb, s0, s1, scale, sc, out); break;
        case 4: attend_q8<4>(qb, D, kb, kdb, vb, vdb, s0, s1, scale, sc, out); break;
        default: attend_q8<8>(qb, D, kb, kdb, vb, vdb, s0, s1, scale, sc, out); break;
      }
    }
  });
}

}  // namespace qwen35_kv
