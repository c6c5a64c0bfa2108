// Whole decoder layers for decode on CPUs without AVX512-BF16 / VNNI (most laptops), and the decoder stack of a
// decode step in one call: layer_steps.h's two layer steps and decode_plan.h's plan, on the portable library's
// kernels (portable_kernels.cpp: the quantized GEMVs, the Gated DeltaNet step) plus the two written here, a bf16
// GEMV for matrices kept in bf16 and the decode attention over the KV cache (bf16 or q8_0).
//
// Before this a laptop ran a decode step per op from Python: on the 0.8B int4 replica held to AVX2 (2 threads)
// ~500 small torch ops a token (norms, dtype casts, residual adds, the attention's blocks) took ~8 of its 28 ms
// beside the GEMVs (torch.profiler). The AVX512 machines had run whole layers in C++ for a long time.
//
// Rounding is the per-op path's: the layer steps round where it rounds (layer_steps.h); the attention is fp32 from
// the bf16 keys and values with one exact softmax, as ops/attention.decode_attention computes on the torch path,
// block by block over the keys (flash-decoding: blocks of one KV head run in parallel, merged by their maxima).
// Over a q8_0 cache it reads the stored values in place, where the torch path reads them back rounded to bf16: the
// reference is kv_storage.attend_reference in fp32. Built for AVX2 it sums them in 16-bit integers (scores_of and
// pv_of for Q8Rows: roundings of 2^-16 of the largest term, under the output's bf16 rounding); elsewhere in fp32,
// exactly (int8 times the fp16 scale).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "attn_blocks.h"
#include "fp_contract.h"
#include "layer_steps.h"
#include "portable_simd.h"

namespace qwen35_portable {  // portable_kernels.cpp
void gemv_into(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, c10::BFloat16* out,
               int64_t ldo);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gdn_decode(const at::Tensor& proj, const at::Tensor& conv_state,
                                                          const at::Tensor& conv_w, const at::Tensor& A_log,
                                                          const at::Tensor& dt_bias, const at::Tensor& state,
                                                          const at::Tensor& norm_w, int64_t Hk, double eps,
                                                          bool in_place);
}  // namespace qwen35_portable

namespace {

using namespace psimd;

// Asks for the cache lines of n bytes at p (a hint: never faults, costs an instruction a line)
inline void prefetch_bytes(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i);
  __builtin_prefetch(c + n - 1);
}

// Rows as the bf16 GEMV and the attention read them, 8 lanes of fp32 at a time: bf16 as stored, or a q8_0 cache's
// int8 blocks times their fp16 scale, exact in fp32. (Rounding those to bf16, as the torch path's read-back
// kv_storage.dequantize_rows does, had cost 5 of the 7 instructions a vector took to widen: decode at 32K keys
// held to AVX2, 18.2-19.3 tok/s against 19.8-20.5 without it, benchmarks/bench_kv_cache.py.)
struct Bf16Rows {
  const c10::BFloat16* p;
  int64_t D;
  float scale(int64_t, int64_t) const { return 0.f; }  // (none: the q8_0 form's signature)
  f32x8 at(int64_t s, int64_t d, float = 0.f) const { return bf16x8(p + s * D + d); }
  void prefetch(int64_t s) const { prefetch_bytes(p + s * D, D * 2); }
  int64_t row_bytes() const { return D * 2; }
  const char* row_ptr(int64_t s) const { return reinterpret_cast<const char*>(p + s * D); }
};
struct Q8Rows {
  const int8_t* q;
  const c10::Half* sc;
  int64_t D;
  // the fp16 scale of the block of 32 holding value d of row s: taken once for the 16 values the attention reads
  // at a time (converting it at every 8 had cost as much as the values' own widening)
  float scale(int64_t s, int64_t d) const { return half1(sc[s * (D / 32) + d / 32].x); }
  f32x8 at(int64_t s, int64_t d, float scale) const {
    return widen8(q + s * D + d) * scale;
  }
  void prefetch(int64_t s) const {
    prefetch_bytes(q + s * D, D);
    prefetch_bytes(sc + s * (D / 32), D / 16);
  }
  int64_t row_bytes() const { return D + D / 16; }  // (the scales' D / 16 bytes lie apart)
  const char* row_ptr(int64_t s) const { return reinterpret_cast<const char*>(q + s * D); }
};

// count fp16 values at h as fp32 at out: 8 at a time with F16C, the rest one by one
inline void halves_to_float(const c10::Half* h, int64_t count, float* out) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < count; ++i) out[i] = half1(h[i].x);
}

// sum_d a[d] * row s of r over n values (a multiple of 8), 8 lanes at a time in two chains, then one tree sum
template <typename Rows>
QWEN35_CONTRACT(fast) inline float dot(const float* a, const Rows& r, int64_t s, int64_t n) {
  QWEN35_CONTRACT_BODY(fast)
  f32x8 acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += load_v<f32x8>(a + i) * r.at(s, i);
    acc1 += load_v<f32x8>(a + i + 8) * r.at(s, i + 8);
  }
  for (; i < n; i += 8) acc0 += load_v<f32x8>(a + i) * r.at(s, i);
  return hsum(acc0 + acc1);
}

// out[m * ldo + j] = x[m] . w[j] for bf16 x [M, K], w [N, K] (K a multiple of 8): fp32 sums, rounded to bf16
QWEN35_CONTRACT(fast) void gemv_bf16(const at::Tensor& x, const at::Tensor& w,
                                     c10::BFloat16* out, int64_t ldo) {
  QWEN35_CONTRACT_BODY(fast)
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<float> xf(static_cast<size_t>(M * K));
  const auto* xp = x.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) xf[static_cast<size_t>(i)] = static_cast<float>(xp[i]);
  const Bf16Rows rows{w.data_ptr<c10::BFloat16>(), K};
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) out[m * ldo + n] = static_cast<c10::BFloat16>(dot(xf.data() + m * K, rows, n, K));
  });
}

constexpr int64_t kKeyBlock = 256;  // keys per block of the decode attention

// The scores of NG query heads (fp32 rows q + g * D) against keys [s0, s0 + n) of one KV head: scores[g * n + s] =
// (q_g . k_s) * scale, each dot summed in two chains (of each 16 values, the first 8 into one and the last 8 into
// the other; a last 8 into the first) and one tree sum. Each key's values are read and widened once for all NG
// heads: a head at a time had read and widened every key G times (a q8_0 cache of 4,096 keys, 8 query heads over
// 2 KV heads, held to AVX2: 5.2 ms, against 1.0 for bf16 keys).
template <int NG, typename Rows>
QWEN35_CONTRACT(fast) void scores_of(const float* q, int64_t D, const Rows& k, int64_t s0,
                                     int64_t n, float scale, float* scores, const Rows& pre) {
  QWEN35_CONTRACT_BODY(fast)
  for (int64_t s = 0; s < n; ++s) {
    pre.prefetch(s0 + s);
    f32x8 a0[NG], a1[NG];
    for (int g = 0; g < NG; ++g) a0[g] = a1[g] = f32x8{};
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) {  // (16 values lie in one q8_0 block of 32: one scale)
      const float sc = k.scale(s0 + s, i);
      const f32x8 k0 = k.at(s0 + s, i, sc), k1 = k.at(s0 + s, i + 8, sc);
      for (int g = 0; g < NG; ++g) {
        a0[g] += load_v<f32x8>(q + g * D + i) * k0;
        a1[g] += load_v<f32x8>(q + g * D + i + 8) * k1;
      }
    }
    for (; i < D; i += 8) {
      const f32x8 k0 = k.at(s0 + s, i, k.scale(s0 + s, i));
      for (int g = 0; g < NG; ++g) a0[g] += load_v<f32x8>(q + g * D + i) * k0;
    }
    for (int g = 0; g < NG; ++g) scores[g * n + s] = hsum(a0[g] + a1[g]) * scale;
  }
}

// A block's working memory, one per thread: the scores (then the probabilities) of 4 heads, and for the 16-bit
// forms below, the queries in int16, a block's key or value scales in fp32, each chunk's largest value scale, the
// value scales' ratios, the weights and the integer sums; and the next block's keys and values, asked into L2 a
// few lines at a time during this block's 16-bit P.V (q8_0, AVX2), which computes from L2 with the memory bus
// otherwise idle. Without them a block's rows came in as its scores and P.V asked for them: at 128K keys (from
// DRAM) a key took as long over a q8_0 cache as over a bf16 one, half the bytes, ~41 ns either way with 2 threads,
// the rows' latency and not the bandwidth the limit (a layer's 2 KV heads x 256 over 128K / 32K keys, held to
// AVX2: 11.3-11.7 -> 9.4-9.5 ms, 2.4-2.5 -> 1.8 ms). The bf16 form's P.V (fp32 FMAs, compute-bound there)
// measured no faster with it (12.7-13.2 -> 13.7-14.4 ms at 128K).
struct Scratch {
  std::vector<float> scores, ratio, scales, top;
  std::vector<int16_t> q16, w16;
  std::vector<int32_t> iacc;
  qwen35_attn::RowPrefetch next_k, next_v;
};

#if defined(__AVX2__)
// acc + the sums of neighbouring pairs of 16-bit products a * b, in 32-bit lanes: one vpdpwssd where the CPU has
// AVX-VNNI (Intel since Alder Lake, AMD since Zen 5) or AVX512-VNNI with 256-bit vectors, else vpmaddwd + vpaddd
inline __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// The scores over a q8_0 block's keys in 16-bit integers (AVX2). The fp32 form widens, converts and scales each
// key's 16 values and spends 8 FMAs on the 4 heads, all on the two multiply ports (perf: after the 16-bit P.V
// below, the larger half of the kernel). Here each head's query is put in int16 against its largest magnitude
// (q = round(q * 32767 / max|q|): the rounding is 2^-16 of the largest, where the query is bf16, 2^-9), a key's
// 32 values of a block widened to int16 once, and vpmaddwd multiplies 16 pairs an instruction, exactly in int32
// (2 * 2 * 127 * 32767 < 2^31 a lane). The 4 heads' sums are folded into one vector by three vphaddd, so one
// conversion and one multiply-add by the block's key scale serve all four heads.
template <int NG>
QWEN35_CONTRACT(fast) void scores_of(const float* q, int64_t D, const Q8Rows& k, int64_t s0, int64_t n,
                                     float scale, float* scores, const Q8Rows& pre, Scratch& sc) {
  QWEN35_CONTRACT_BODY(fast)
  const int64_t nc = D / 32;
  sc.q16.resize(static_cast<size_t>(NG * D));
  int16_t* q16 = sc.q16.data();
  float unit[4] = {0.f, 0.f, 0.f, 0.f};  // per head: what one integer step of its scores is worth
  for (int g = 0; g < NG; ++g) {
    const float* qg = q + g * D;
    f32x8 m8{};
    for (int64_t i = 0; i < D; i += 8) {
      const f32x8 a = (f32x8)((i32x8)load_v<f32x8>(qg + i) & 0x7fffffff);
      m8 = m8 < a ? a : m8;
    }
    float amax = 0.f;
    for (int j = 0; j < 8; ++j) amax = std::max(amax, m8[j]);
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    for (int64_t i = 0; i < D; i += 16) {
      const __m256i a = _mm256_cvtps_epi32((__m256)(load_v<f32x8>(qg + i) * inv));
      const __m256i b = _mm256_cvtps_epi32((__m256)(load_v<f32x8>(qg + i + 8) * inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + g * D + i),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    unit[g] = amax / 32767.f * scale;
  }
  const f32x4 units = load_v<f32x4>(unit);
  sc.scales.resize(static_cast<size_t>(n * nc));
  float* ks = sc.scales.data();  // ks[s * nc + c]: key s's scale of block c (the block's rows are contiguous)
  halves_to_float(k.sc + s0 * nc, n * nc, ks);
  for (int64_t s = 0; s < n; ++s) {
    pre.prefetch(s0 + s);
    const int8_t* row = k.q + (s0 + s) * D;
    // block c's 4 heads' sums, folded into one vector: lanes g and 4 + g hold head g's over the two 128-bit halves
    auto block = [&](int64_t c) {
      const __m256i x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 32 * c)));
      const __m256i x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 32 * c + 16)));
      __m256i t[4];
      for (int g = 0; g < 4; ++g) {
        if (g >= NG) {
          t[g] = _mm256_setzero_si256();
          continue;
        }
        const int16_t* qc = q16 + g * D + 32 * c;
        t[g] = dpwssd(_mm256_madd_epi16(x0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc))), x1,
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + 16)));
      }
      return to_f((i32x8)_mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]))) *
             splat8(ks[s * nc + c]);
    };
    f32x8 acc0{}, acc1{};  // even and odd blocks: two chains of adds, not one
    int64_t c = 0;
    for (; c + 2 <= nc; c += 2) {
      acc0 += block(c);
      acc1 += block(c + 1);
    }
    if (c < nc) acc0 += block(c);
    const f32x8 a = acc0 + acc1;
    const f32x4 r = (__builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7)) * units;
    for (int g = 0; g < NG; ++g) scores[g * n + s] = r[g];
  }
}
#endif
// Elsewhere (bf16 keys; targets without AVX2) the fp32 form
template <int NG, typename Rows>
void scores_of(const float* q, int64_t D, const Rows& k, int64_t s0, int64_t n, float scale, float* scores,
               const Rows& pre, Scratch&) {
  scores_of<NG>(q, D, k, s0, n, scale, scores, pre);
}

// acc[g * lda + d] = sum over keys s in order of p[g * n + s] * v_s[d], for NG heads: 16 dimensions at a time
// held in registers over a run of keys, each value's 16 read and widened once for all NG heads. The runs are as
// many keys as fill 16 KiB, so that the 16 passes over their rows (one per 16 dimensions of 256) find them in L1:
// over a whole block (256 keys, 64 KiB of q8_0 values) every pass had read the rows again from L2, and a third of
// the kernel's time stalled on those loads (perf, 32K keys held to AVX2).
template <int NG, typename Rows>
QWEN35_CONTRACT(fast) void pv_of(const float* p, int64_t D, const Rows& v, int64_t s0,
                                 int64_t n, float* acc, int64_t lda) {
  QWEN35_CONTRACT_BODY(fast)
  const int64_t run = std::max<int64_t>(8, 16384 / v.row_bytes());
  for (int64_t t0 = 0; t0 < n; t0 += run) {
    const int64_t t1 = std::min(n, t0 + run);
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      f32x8 a0[NG], a1[NG];
      for (int g = 0; g < NG; ++g) {
        a0[g] = t0 ? load_v<f32x8>(acc + g * lda + d) : f32x8{};
        a1[g] = t0 ? load_v<f32x8>(acc + g * lda + d + 8) : f32x8{};
      }
      for (int64_t s = t0; s < t1; ++s) {
        const float sc = v.scale(s0 + s, d);
        const f32x8 v0 = v.at(s0 + s, d, sc), v1 = v.at(s0 + s, d + 8, sc);
        for (int g = 0; g < NG; ++g) {
          const f32x8 pg = splat8(p[g * n + s]);
          a0[g] += pg * v0;
          a1[g] += pg * v1;
        }
      }
      for (int g = 0; g < NG; ++g) {
        std::memcpy(acc + g * lda + d, &a0[g], sizeof(f32x8));
        std::memcpy(acc + g * lda + d + 8, &a1[g], sizeof(f32x8));
      }
    }
    for (; d < D; d += 8) {
      f32x8 a0[NG];
      for (int g = 0; g < NG; ++g) a0[g] = t0 ? load_v<f32x8>(acc + g * lda + d) : f32x8{};
      for (int64_t s = t0; s < t1; ++s) {
        const f32x8 v0 = v.at(s0 + s, d, v.scale(s0 + s, d));
        for (int g = 0; g < NG; ++g) a0[g] += splat8(p[g * n + s]) * v0;
      }
      for (int g = 0; g < NG; ++g) std::memcpy(acc + g * lda + d, &a0[g], sizeof(f32x8));
    }
  }
}

#if defined(__AVX2__)
// P.V over a block of a q8_0 cache in 16-bit integers (AVX2): the fp32 form above spends, for every key and 16
// dimensions, two widenings, two conversions and two multiplies by the scale beside its 8 FMAs, and was the
// slower half of the kernel (perf, 32K keys). Here each key's value scale of each 32 dimensions (chunk c) is folded
// into its probability, against the block's largest scale of that chunk: w = round(p * scale / max_c * 32767), at
// most 32767 (p <= 1: the block's own maximum is subtracted), so the weights' rounding is 2^-16 of the largest term
// (fp32 p had been exact; bf16 p, as the torch path and the AVX512 kernel round it, is 2^-9). Two keys' int8 values
// are widened to int16 and interleaved per dimension, and one vpmaddwd multiplies them by the broadcast pair of
// weights: 16 products an instruction, summed exactly in int32 over the block (256 * 32767 * 127 < 2^31), then
// scaled by max_c / 32767 into the fp32 part.
template <int NG>
void pv_of(const float* p, int64_t D, const Q8Rows& v, int64_t s0, int64_t n, float* acc, int64_t lda,
           Scratch& sc) {
  const int64_t nc = D / 32, n2 = (n + 1) / 2 * 2;  // chunks of 32 dimensions; keys rounded up to pairs
  sc.ratio.resize(static_cast<size_t>(nc * n2));
  sc.w16.resize(static_cast<size_t>(NG * nc * n2));
  sc.iacc.resize(static_cast<size_t>(NG * D));
  sc.scales.resize(static_cast<size_t>(n * nc));
  float* vs = sc.scales.data();  // vs[s * nc + c]: key s's value scale of chunk c
  halves_to_float(v.sc + s0 * nc, n * nc, vs);
  sc.top.assign(static_cast<size_t>(nc), 0.f);  // each chunk's largest (scales are amax / 127 >= 0)
  std::vector<float>& top = sc.top;
  int64_t c8 = 0;
  for (; c8 + 8 <= nc; c8 += 8) {  // 8 chunks at a time in a register (kept in memory, a store each key had
    f32x8 m{};                     // chained every maximum through store forwarding: a tenth of the P.V)
    for (int64_t s = 0; s < n; ++s) {
      const f32x8 x = load_v<f32x8>(vs + s * nc + c8);
      m = m < x ? x : m;
    }
    std::memcpy(top.data() + c8, &m, sizeof m);
  }
  for (; c8 < nc; ++c8)
    for (int64_t s = 0; s < n; ++s) top[c8] = std::max(top[c8], vs[s * nc + c8]);
  float* rt = sc.ratio.data();  // rt[c * n2 + s]: key s's scale of chunk c over the chunk's largest, times 32767
  for (int64_t c = 0; c < nc; ++c) {
    const float inv = top[c] > 0.f ? 32767.f / top[c] : 0.f;
    for (int64_t s = 0; s < n; ++s) rt[c * n2 + s] = vs[s * nc + c] * inv;
    if (n2 > n) rt[c * n2 + n] = 0.f;
  }
  int16_t* w16 = sc.w16.data();  // w16[(g * nc + c) * n2 + s]
  for (int g = 0; g < NG; ++g)
    for (int64_t c = 0; c < nc; ++c) {
      int16_t* w = w16 + (g * nc + c) * n2;
      const float* r = rt + c * n2;
      int64_t s = 0;
      for (; s + 16 <= n; s += 16) {
        const __m256i a = _mm256_cvtps_epi32((__m256)(load_v<f32x8>(p + g * n + s) * load_v<f32x8>(r + s)));
        const __m256i b = _mm256_cvtps_epi32((__m256)(load_v<f32x8>(p + g * n + s + 8) * load_v<f32x8>(r + s + 8)));
        // (packs works within 128-bit lanes: the permute puts the 16 keys back in order)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + s),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
      }
      for (; s < n; ++s) w[s] = static_cast<int16_t>(std::lrintf(std::min(32767.f, p[g * n + s] * r[s])));
      if (n2 > n) w[n] = 0;
    }
  int32_t* ia = sc.iacc.data();  // ia[g * D + d]: the block's exact sums, dimensions in the order below
  const int64_t run = std::max<int64_t>(2, 16384 / v.row_bytes() / 2 * 2);  // rows filling 16 KiB, as the fp32 form
  sc.next_k.spread(D / 16 * ((n + 1) / 2));  // over the pair steps below
  sc.next_v.spread(D / 16 * ((n + 1) / 2));
  for (int64_t t0 = 0; t0 < n; t0 += run) {
    const int64_t t1 = std::min(n, t0 + run);
    for (int64_t d = 0; d < D; d += 16) {
      const int64_t c = d / 32;
      __m256i lo[NG], hi[NG];  // lanes: dims {0-3, 8-11} and {4-7, 12-15} of these 16
      for (int g = 0; g < NG; ++g) {
        lo[g] = t0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ia + g * D + d)) : _mm256_setzero_si256();
        hi[g] = t0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ia + g * D + d + 8)) : _mm256_setzero_si256();
      }
      for (int64_t s = t0; s < t1; s += 2) {
        sc.next_k.step();
        sc.next_v.step();
        const int8_t* r0 = v.q + (s0 + s) * D + d;
        const __m256i x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
        const __m256i x1 = s + 1 < n ? _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + D)))
                                     : _mm256_setzero_si256();  // (an odd block's last key: its pair weighs 0)
        const __m256i a = _mm256_unpacklo_epi16(x0, x1), b = _mm256_unpackhi_epi16(x0, x1);
        for (int g = 0; g < NG; ++g) {
          int32_t pair;
          std::memcpy(&pair, w16 + (g * nc + c) * n2 + s, 4);
          const __m256i w = _mm256_set1_epi32(pair);
          lo[g] = dpwssd(lo[g], a, w);
          hi[g] = dpwssd(hi[g], b, w);
        }
      }
      for (int g = 0; g < NG; ++g) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ia + g * D + d), lo[g]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ia + g * D + d + 8), hi[g]);
      }
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int64_t d = 0; d < D; d += 16) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ia + g * D + d));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ia + g * D + d + 8));
      const f32x8 unit = splat8(top[d / 32] / 32767.f);
      const f32x8 r0 = (f32x8)_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x20)) * unit;
      const f32x8 r1 = (f32x8)_mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo, hi, 0x31)) * unit;
      std::memcpy(acc + g * lda + d, &r0, sizeof(f32x8));
      std::memcpy(acc + g * lda + d + 8, &r1, sizeof(f32x8));
    }
}
#endif
// Elsewhere (bf16 rows; targets without AVX2) the fp32 form
template <int NG, typename Rows>
void pv_of(const float* p, int64_t D, const Rows& v, int64_t s0, int64_t n, float* acc, int64_t lda, Scratch&) {
  pv_of<NG>(p, D, v, s0, n, acc, lda);
}

// Heads g0 .. g0 + NG - 1 of a block: scores, their maxima and exp(score - max) in place, then P.V
template <int NG, typename Rows>
void attend_heads(const float* q, int64_t D, const Rows& k, const Rows& v, int64_t s0, int64_t n, float scale,
                  float* part, Scratch& sc) {
  float* scores = sc.scores.data();
  scores_of<NG>(q, D, k, s0, n, scale, scores, v, sc);  // the values' rows asked for meanwhile
  // the maximum and exp(score - max) 8 keys at a time (exp8): a scalar expf a key and head had been a fifth of
  // the kernel's time (perf, 4,096 bf16 keys held to AVX2)
  for (int g = 0; g < NG; ++g) {
    float* sg = scores + g * n;
    int64_t s = 0;
    f32x8 m8 = f32x8{} - std::numeric_limits<float>::infinity();
    for (; s + 8 <= n; s += 8) {
      const f32x8 x = load_v<f32x8>(sg + s);
      m8 = m8 < x ? x : m8;
    }
    float mx = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < 8; ++j) mx = std::max(mx, m8[j]);
    for (; s < n; ++s) mx = std::max(mx, sg[s]);
    f32x8 e8{};
    for (s = 0; s + 8 <= n; s += 8) {
      const f32x8 e = exp8(load_v<f32x8>(sg + s) - mx);
      std::memcpy(sg + s, &e, sizeof(f32x8));
      e8 += e;
    }
    float sum = hsum(e8);
    for (; s < n; ++s) {
      sg[s] = std::exp(sg[s] - mx);
      sum += sg[s];
    }
    part[g * (D + 2) + D] = mx;
    part[g * (D + 2) + D + 1] = sum;
  }
  pv_of<NG>(scores, D, v, s0, n, part, D + 2, sc);
}

// One block of keys [s0, s1) of one KV head for its G query heads (fp32 q [G, D]): each query's maximum score,
// sum of exp(score - max) and sum of exp(score - max) v, written to part [G, D + 2] as (acc..., max, sum); the
// heads four at a time
template <typename Rows>
void attend_block(const float* q, int64_t G, int64_t D, const Rows& k, const Rows& v, int64_t s0, int64_t s1,
                  int64_t s2, float scale, float* part, Scratch& sc) {
  const int64_t n = s1 - s0;
  sc.scores.resize(static_cast<size_t>(4 * n));
  for (int64_t g = 0; g < G; g += 4) {
    const float* qg = q + g * D;
    float* pg = part + g * (D + 2);
    sc.next_k = sc.next_v = qwen35_attn::RowPrefetch();
    if (g + 4 >= G) {  // the block's last heads: the next block [s1, s2) (this thread's next, as items are split)
      const int64_t stride = k.row_ptr(1) - k.row_ptr(0);  // (keys and values rows alike, contiguous)
      sc.next_k = qwen35_attn::RowPrefetch(k.row_ptr(s1), s2 - s1, stride, stride);
      sc.next_v = qwen35_attn::RowPrefetch(v.row_ptr(s1), s2 - s1, stride, stride);
    }
    switch (std::min<int64_t>(4, G - g)) {
      case 4: attend_heads<4>(qg, D, k, v, s0, n, scale, pg, sc); break;
      case 3: attend_heads<3>(qg, D, k, v, s0, n, scale, pg, sc); break;
      case 2: attend_heads<2>(qg, D, k, v, s0, n, scale, pg, sc); break;
      default: attend_heads<1>(qg, D, k, v, s0, n, scale, pg, sc);
    }
  }
}

// q [B, Hq, D] bf16 (normed and rotated); k[b], v[b] [Hkv, cap_b, D] of which the first lengths[b] are row b's:
// bf16, or (kd, vd not empty) a q8_0 cache's int8 blocks with their fp16 scales kd[b], vd[b] [Hkv, cap_b, D/32]
// -> [B, Hq, D] bf16
at::Tensor attn_decode(const at::Tensor& q, at::TensorList k, at::TensorList v, at::TensorList kd, at::TensorList vd,
                       at::IntArrayRef lengths, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const bool q8 = !kd.empty();
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.is_contiguous() && D % (q8 ? 32 : 8) == 0, "portable attention: q");
  TORCH_CHECK(static_cast<int64_t>(k.size()) == B && static_cast<int64_t>(v.size()) == B &&
                  static_cast<int64_t>(lengths.size()) == B, "portable attention: one buffer and length per row");
  TORCH_CHECK(!q8 || (static_cast<int64_t>(kd.size()) == B && static_cast<int64_t>(vd.size()) == B),
              "portable attention: a q8_0 cache has one scale buffer per key and value buffer");
  const int64_t Hkv = k[0].size(0), G = Hq / Hkv;
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "portable attention: ", Hq, " query heads over ", Hkv, " KV heads");
  std::vector<float> qf(static_cast<size_t>(B * Hq * D));
  const auto* qp = q.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < B * Hq * D; ++i) qf[static_cast<size_t>(i)] = static_cast<float>(qp[i]);
  // work items (row, KV head, key block), each writing its own partial result
  std::vector<int64_t> first(static_cast<size_t>(B + 1), 0);  // first[b]: row b's first block index
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(k[b].is_contiguous() && v[b].is_contiguous() && k[b].scalar_type() == (q8 ? at::kChar : at::kBFloat16) &&
                    v[b].scalar_type() == k[b].scalar_type() && v[b].sizes() == k[b].sizes() && k[b].dim() == 3 &&
                    k[b].size(0) == Hkv && k[b].size(2) == D && lengths[b] >= 1 && lengths[b] <= k[b].size(1),
                "portable attention: row ", b, "'s buffers");
    if (q8)
      TORCH_CHECK(kd[b].is_contiguous() && vd[b].is_contiguous() && kd[b].scalar_type() == at::kHalf &&
                      vd[b].scalar_type() == at::kHalf && kd[b].numel() == k[b].numel() / 32 &&
                      vd[b].numel() == kd[b].numel(),
                  "portable attention: row ", b, "'s q8_0 scales");
    first[b + 1] = first[b] + (lengths[b] + kKeyBlock - 1) / kKeyBlock;
  }
  const int64_t per_head = first[B];  // blocks of all rows, for one KV head
  // every element written by its block (not zero-filled first: 1 MiB a layer at 32K keys)
  const std::unique_ptr<float[]> parts(new float[static_cast<size_t>(per_head * Hkv * G * (D + 2))]);
  at::parallel_for(0, per_head * Hkv, 1, [&](int64_t i0, int64_t i1) {
    Scratch scratch;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t hk = i / per_head, blk = i % per_head;
      const int64_t b = std::upper_bound(first.begin(), first.end(), blk) - first.begin() - 1;
      const int64_t s0 = (blk - first[b]) * kKeyBlock, s1 = std::min(lengths[b], s0 + kKeyBlock);
      const int64_t s2 = std::min(lengths[b], s1 + kKeyBlock);  // the next block's end (none past the last)
      const int64_t head = hk * k[b].size(1);  // the head's first slot
      const float* qh = qf.data() + (b * Hq + hk * G) * D;
      float* part = parts.get() + i * G * (D + 2);
      if (q8) {
        const Q8Rows kr{k[b].data_ptr<int8_t>() + head * D, kd[b].data_ptr<c10::Half>() + head * (D / 32), D};
        const Q8Rows vr{v[b].data_ptr<int8_t>() + head * D, vd[b].data_ptr<c10::Half>() + head * (D / 32), D};
        attend_block(qh, G, D, kr, vr, s0, s1, s2, static_cast<float>(scale), part, scratch);
      } else {
        const Bf16Rows kr{k[b].data_ptr<c10::BFloat16>() + head * D, D}, vr{v[b].data_ptr<c10::BFloat16>() + head * D, D};
        attend_block(qh, G, D, kr, vr, s0, s1, s2, static_cast<float>(scale), part, scratch);
      }
    }
  });
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  auto* op = out.data_ptr<c10::BFloat16>();
  // merge each row's blocks, a query head at a time (in parallel: serial, it had been ~4% of a 32K-key step)
  at::parallel_for(0, B * Hq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hq, hk = i % Hq / G, g = i % G;
      float mx = -std::numeric_limits<float>::infinity();  // each block scaled by exp(its max - the max)
      for (int64_t blk = first[b]; blk < first[b + 1]; ++blk)
        mx = std::max(mx, parts[((hk * per_head + blk) * G + g) * (D + 2) + D]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float sum = 0.f;
      for (int64_t blk = first[b]; blk < first[b + 1]; ++blk) {
        const float* p = parts.get() + ((hk * per_head + blk) * G + g) * (D + 2);
        const float w = std::exp(p[D] - mx);
        sum += p[D + 1] * w;
        for (int64_t d = 0; d < D; ++d) acc[d] += p[d] * w;
      }
      c10::BFloat16* o = op + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<c10::BFloat16>(acc[d] / sum);
    }
  });
  return out;
}

// silu(gate) * up for gate_up [.., gate | up] bf16: silu rounded to bf16 (torch's F.silu on bf16), the product
// rounded again. 8 values a vector through exp8 (a scalar expf each had cost ~20 us a 0.8B layer's decode step);
// a row's last I % 8 the same way, scalar.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.scalar_type() == at::kBFloat16, "portable silu_mul: contiguous bf16");
  const int64_t I2 = gate_up.size(-1), I = I2 / 2, rows = gate_up.numel() / I2, nb = (I + 7) / 8;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  at::Tensor out = at::empty(sizes, gate_up.options());
  const auto* g = gate_up.data_ptr<c10::BFloat16>();
  auto* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, rows * nb, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / nb, c = (i % nb) * 8;
      const c10::BFloat16* gate = g + r * I2 + c;
      c10::BFloat16* y = o + r * I + c;
      if (c + 8 <= I) {
        const f32x8 a = bf16x8(gate), s = round_bf16x8(a / (1.f + exp8(-a)));
        store_bf16x8(y, round_bf16x8(s * bf16x8(gate + I)));
      } else {
        for (int64_t l = 0; c + l < I; ++l) {
          const f32x8 a = f32x8{} + static_cast<float>(gate[l]), s = round_bf16x8(a / (1.f + exp8(-a)));
          y[l] = static_cast<c10::BFloat16>(s[0] * static_cast<float>(gate[I + l]));
        }
      }
    }
  });
  return out;
}

// conv_silu's channels c0.. (nv vectors of 8) of one sequence over its T tokens; row(b, t): input row t (t < 0:
// the state's)
template <int K, typename Row>
inline void conv_silu_cols(const Row& row, int64_t b, int64_t T, int64_t c0, int64_t nv, const c10::BFloat16* wp,
                           c10::BFloat16* y, int64_t C) {
  f32x8 taps[K][2];
  for (int j = 0; j < K; ++j)
    for (int64_t v = 0; v < nv; ++v)
      for (int l = 0; l < 8; ++l) taps[j][v][l] = static_cast<float>(wp[(c0 + 8 * v + l) * K + j]);
  for (int64_t t = 0; t < T; ++t) {
    const c10::BFloat16* r[K];
    for (int j = 0; j < K; ++j) r[j] = row(b, t - (K - 1) + j) + c0;
    for (int64_t v = 0; v < nv; ++v) {
      f32x8 acc = bf16x8(r[0] + 8 * v) * taps[0][v];
      for (int j = 1; j < K; ++j) acc += bf16x8(r[j] + 8 * v) * taps[j][v];
      const f32x8 a = round_bf16x8(acc);
      store_bf16x8(y + t * C + c0 + 8 * v, round_bf16x8(a / (1.f + exp8(-a))));
    }
  }
}

// Causal depthwise conv + SiLU over a chunk of tokens (prefill), what the AVX512 library's conv_silu computes:
// x [B, T, C] bf16 (rows at any stride, channels contiguous: the qkv columns of the fused projection's output),
// w [C, K] bf16, state [B, K-1, C] bf16 (the previous K-1 inputs). Returns (silu(conv) [B, T, C], new state). The
// taps are summed in ops/causal_conv.causal_conv1d's order (products of bf16 values, exact in fp32), so the conv
// output rounded to bf16 is the reference's bit for bit; the SiLU of it differs from torch's by exp8's ulps, at
// most one bf16 step after rounding. The torch form made ~10 passes over [B, T, C] fp32 (~19 ms a 0.8B layer at
// 512 tokens held to AVX2, a tenth of the prefill's time beside the GEMMs).
std::tuple<at::Tensor, at::Tensor> conv_silu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& state) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
                  state.scalar_type() == at::kBFloat16,
              "portable_conv_silu: x, w and state must be bf16");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && w.dim() == 2 && w.is_contiguous() && state.dim() == 3 &&
                  state.is_contiguous(),
              "portable_conv_silu: x [B, T, C] with contiguous channels, w [C, K] and state [B, K-1, C] contiguous");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = w.size(1), Km1 = K - 1;
  TORCH_CHECK(C % 8 == 0 && w.size(0) == C && K >= 2 && K <= 8 && state.size(0) == B && state.size(1) == Km1 &&
                  state.size(2) == C,
              "portable_conv_silu: sizes do not fit: x ", x.sizes(), ", w ", w.sizes(), ", state ", state.sizes(),
              " (channels a multiple of 8, 2-8 taps)");
  const int64_t sb = x.stride(0), st = x.stride(1);
  at::Tensor y = at::empty({B, T, C}, x.options());
  at::Tensor new_state = at::empty_like(state);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  const auto* sp = state.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  auto* np = new_state.data_ptr<c10::BFloat16>();
  auto row = [&](int64_t b, int64_t t) -> const c10::BFloat16* {  // input row t of the window (t < 0: the state's)
    return t >= 0 ? xp + b * sb + t * st : sp + (b * Km1 + Km1 + t) * C;
  };
  constexpr int64_t CB = 16;  // channels a task: two vectors, their taps in registers
  const int64_t nc = (C + CB - 1) / CB;
  at::parallel_for(0, B * nc, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nc, c0 = (i % nc) * CB, nv = std::min<int64_t>(CB, C - c0) / 8;
      switch (K) {  // the tap count as a constant: the tap loop unrolled, its weights in registers
        case 2: conv_silu_cols<2>(row, b, T, c0, nv, wp, yp + b * T * C, C); break;
        case 3: conv_silu_cols<3>(row, b, T, c0, nv, wp, yp + b * T * C, C); break;
        case 4: conv_silu_cols<4>(row, b, T, c0, nv, wp, yp + b * T * C, C); break;
        case 5: conv_silu_cols<5>(row, b, T, c0, nv, wp, yp + b * T * C, C); break;
        case 6: conv_silu_cols<6>(row, b, T, c0, nv, wp, yp + b * T * C, C); break;
        case 7: conv_silu_cols<7>(row, b, T, c0, nv, wp, yp + b * T * C, C); break;
        default: conv_silu_cols<8>(row, b, T, c0, nv, wp, yp + b * T * C, C); break;
      }
      for (int64_t j = 0; j < Km1; ++j)
        std::memcpy(np + (b * Km1 + j) * C + c0, row(b, T - Km1 + j) + c0, 8 * nv * sizeof(c10::BFloat16));
    }
  });
  return {y, new_state};
}

// The portable library's kernels, as layer_steps.h's layers take them
struct PortableOps {
  static void gemv_bf16_into(const at::Tensor& x, const at::Tensor& w, c10::BFloat16* out, int64_t ldo) {
    TORCH_CHECK(x.size(1) % 8 == 0, "portable decode layers: bf16 matrices need a multiple of 8 columns");
    gemv_bf16(x, w, out, ldo);
  }
  static constexpr auto* gemv_quant_into = &qwen35_portable::gemv_into;
  static constexpr auto* silu_mul = &::silu_mul;
  static constexpr auto* gdn_decode = &qwen35_portable::gdn_decode;
  static constexpr auto* attn_decode = &::attn_decode;
};

}  // namespace

namespace qwen35_portable_layers {
QWEN35_DECODE_LAYERS(PortableOps)
}  // namespace qwen35_portable_layers

namespace qwen35_portable {  // what portable_kernels.cpp's decode step calls
std::tuple<at::Tensor, at::Tensor> conv_silu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& state) {
  return ::conv_silu(x, w, state);
}
}  // namespace qwen35_portable

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("portable_decode_gdn_layer" QWEN35_GDN_LAYER_SCHEMA);
  m.def("portable_decode_attn_layer" QWEN35_ATTN_LAYER_SCHEMA);
  m.def("portable_attn_decode(Tensor q, Tensor[] k, Tensor[] v, Tensor[] kd, Tensor[] vd, int[] lengths, "
        "float scale) -> Tensor");
  m.def("portable_conv_silu(Tensor x, Tensor w, Tensor state) -> (Tensor, Tensor)");
  m.def("portable_silu_mul(Tensor gate_up) -> Tensor");
}

namespace {
at::Tensor portable_attn_decode(const at::Tensor& q, at::TensorList k, at::TensorList v, at::TensorList kd,
                                at::TensorList vd, at::IntArrayRef lengths, double scale) {
  return attn_decode(q.contiguous(), k, v, kd, vd, lengths, scale);
}
}  // namespace

TORCH_LIBRARY_IMPL(qwen35, CPU, m) {
  m.impl("portable_decode_gdn_layer", &qwen35_portable_layers::decode_gdn_layer);
  m.impl("portable_decode_attn_layer", &qwen35_portable_layers::decode_attn_layer);
  m.impl("portable_attn_decode", &portable_attn_decode);
  m.impl("portable_conv_silu", &conv_silu);
  m.impl("portable_silu_mul", &silu_mul);
}

#define QWEN35_PLAN_LAYERS qwen35_portable_layers
#define QWEN35_PLAN_CLASS "PortableDecodePlan"
#define QWEN35_PLAN_OP "portable_decode_stack"
#include "decode_plan.h"
