// Hand-written CPU kernels for decode, registered as torch custom ops (torch.ops.qwen35.*).
//
// gemv_bf16: out[M, N] = x[M, K] . w[N, K]^T with bf16 weights and inputs, fp32 accumulation, for the
// few rows M of a decode step. Each weight row is one linear 2*K-byte stream, read once per call for up
// to 4 input rows (AVX512-BF16 vdpbf16ps: 32 products into 16 fp32 lanes, two accumulators to cover
// its latency), and rows are split across torch's threads. Measured on this 2-core Zen 4: ~30 GB/s on the
// 248320x1024 head (memory speed), where torch's bf16 path reaches 10-20 GB/s. No software prefetch: the
// hardware prefetcher follows one linear stream per thread best.
//
// Only light headers (ATen core + the op registry), so the JIT build takes seconds, not a minute. One
// translation unit (one JIT build, shared helpers inlined across kernels), hence its length.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <cmath>
#include <cstring>
#include <atomic>
#include <tuple>
#include <vector>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "attn_blocks.h"
#include "avx512_math.h"
#include "delta_rule.h"
#include "layer_steps.h"
#include "quant_common.h"

namespace {

constexpr int64_t kMaxM = 4;

template <int M, typename Out>
inline void dot_row(const c10::BFloat16* __restrict x, int64_t ldx, const c10::BFloat16* __restrict w,
                    int64_t K, Out* __restrict out, int64_t ldo) {
  __m512 a0[M], a1[M];
  for (int m = 0; m < M; ++m) {
    a0[m] = _mm512_setzero_ps();
    a1[m] = _mm512_setzero_ps();
  }
  const bool pf = qwen35_qc::gemv_prefetch();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    if (pf) {  // quant_common.h: where software prefetch helps
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + qwen35_qc::kGemvPrefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + qwen35_qc::kGemvPrefetch + 64, _MM_HINT_T0);
    }
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
    for (int m = 0; m < M; ++m) {
      a0[m] = _mm512_dpbf16_ps(a0[m], w0, (__m512bh)_mm512_loadu_si512(x + m * ldx + k));
      a1[m] = _mm512_dpbf16_ps(a1[m], w1, (__m512bh)_mm512_loadu_si512(x + m * ldx + k + 32));
    }
  }
  for (; k < K; k += 32) {
    const int64_t rem = std::min<int64_t>(32, K - k);
    const __mmask32 mask = rem == 32 ? 0xffffffffu : ((1u << rem) - 1);
    const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < M; ++m)
      a0[m] = _mm512_dpbf16_ps(a0[m], w0, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k));
  }
  for (int m = 0; m < M; ++m) out[m * ldo] = static_cast<Out>(_mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m])));
}

template <int M, typename Out>
void gemv_pass(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t N, int64_t K, Out* out,
               int64_t ldo) {
  // grain: at least ~64 KB of weights per task so thread hand-off stays negligible
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dot_row<M, Out>(x, ldx, w + n * K, K, out + n, ldo);
  });
}

// out[m * ldo + n] (ldo = N for a whole result; wider for one part of a fused projection)
template <typename Out>
void gemv_all(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t M, int64_t N, int64_t K,
              Out* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const auto* xm = x + m0 * ldx;
    Out* om = out + m0 * ldo;
    switch (std::min<int64_t>(kMaxM, M - m0)) {
      case 1: gemv_pass<1, Out>(xm, ldx, w, N, K, om, ldo); break;
      case 2: gemv_pass<2, Out>(xm, ldx, w, N, K, om, ldo); break;
      case 3: gemv_pass<3, Out>(xm, ldx, w, N, K, om, ldo); break;
      default: gemv_pass<4, Out>(xm, ldx, w, N, K, om, ldo); break;
    }
  }
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w, bool out_fp32) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "gemv_bf16: x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 inputs");
  TORCH_CHECK(x.size(1) == w.size(1), "gemv_bf16: K mismatch");
  TORCH_CHECK(w.is_contiguous() && x.stride(1) == 1, "gemv_bf16: contiguous rows expected");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  if (out_fp32) {
    at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
    gemv_all<float>(xp, x.stride(0), wp, M, N, K, out.data_ptr<float>(), N);
    return out;
  }
  at::Tensor out = at::empty({M, N}, x.options());
  gemv_all<c10::BFloat16>(xp, x.stride(0), wp, M, N, K, out.data_ptr<c10::BFloat16>(), N);
  return out;
}


// ---------------------------------------------------------------------------------------------------
// Fused element-wise kernels for decode. A decode step is ~200 tiny ops per layer stack in eager torch;
// each costs microseconds of dispatch, which adds up to a third of the step. These fuse the chains.

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// RMSNorm: layer_steps.h (both libraries run it)
using qwen35_steps::rmsnorm;

// ---- AVX512 helpers (exp512, round_bf16: avx512_math.h) ----
using qwen35_math::exp512;
using qwen35_math::round_bf16;
inline __m512 bf16x16_to_f32(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store_bf16x16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
inline __m512 silu512(__m512 x) {
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// One value head of the delta rule: delta = beta * (v - (decay * S0)^T k), S1 = decay * S0 + k delta^T,
// o = S1^T q. NV = Dv / 16 is a compile-time constant so the 2*NV accumulators stay in registers: with a
// runtime count they lived in memory and every update waited on a store. next: the state this thread updates
// after this one (prefetched meanwhile), or null.
template <int NV>
// s1 may be s0 (the state updated in place): each element is read before it is written, and never after.
inline void delta_rule_head(const float* s0, float* s1, const float* __restrict k,
                            const float* __restrict q, const float* __restrict v, float kn, float qn, float decay,
                            float beta, int64_t Dk, __m512* ov_out, bool aligned, const float* next) {
  constexpr int64_t Dv = NV * 16;
  __m512 dl[NV], ov[NV];
  for (int e = 0; e < NV; ++e) dl[e] = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dk; ++d) {
    const __m512 kd = _mm512_set1_ps(k[d] * kn * decay);
    for (int e = 0; e < NV; ++e) dl[e] = _mm512_fmadd_ps(_mm512_loadu_ps(s0 + d * Dv + e * 16), kd, dl[e]);
  }
  const __m512 vb = _mm512_set1_ps(beta);
  for (int e = 0; e < NV; ++e) {
    dl[e] = _mm512_mul_ps(vb, _mm512_sub_ps(_mm512_loadu_ps(v + e * 16), dl[e]));
    ov[e] = _mm512_setzero_ps();
  }
  const __m512 vdecay = _mm512_set1_ps(decay);
  for (int64_t d = 0; d < Dk; ++d) {
    const __m512 kd = _mm512_set1_ps(k[d] * kn), qd = _mm512_set1_ps(q[d] * qn);
    for (int e = 0; e < NV; ++e) {
      const __m512 s = _mm512_fmadd_ps(kd, dl[e], _mm512_mul_ps(vdecay, _mm512_loadu_ps(s0 + d * Dv + e * 16)));
      if (aligned) _mm512_stream_ps(s1 + d * Dv + e * 16, s);
      else _mm512_storeu_ps(s1 + d * Dv + e * 16, s);
      ov[e] = _mm512_fmadd_ps(s, qd, ov[e]);
      // the next head's state into L2 while this pass only writes to memory (its reads hit L2): the next
      // head's first pass then reads from L2, not DRAM (0.8B int4: the step 130 -> 117 us a layer)
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + d * Dv + e * 16), _MM_HINT_T1);
    }
  }
  for (int e = 0; e < NV; ++e) ov_out[e] = ov[e];
}

// One Gated DeltaNet decode step for a batch of single tokens, everything after the input projections:
// causal conv update + SiLU, L2 norm and scaling of q and k, beta/g gates, the delta-rule update of the
// fp32 state, and the gated RMSNorm of the output. Inputs:
//   proj [B, conv_dim + value_dim + 2*Hv] (bf16): [qkv | z | b | a] from one fused projection
//   conv_state [B, K-1, conv_dim] (bf16), conv_w [conv_dim, K] (bf16), A_log, dt_bias [Hv] (fp32),
//   state [B, Hv, Dk, Dv] (fp32), norm_w [Dv] (fp32)
// Returns (out [B, Hv*Dv] bf16, new conv_state, new state); the inputs are left untouched, so earlier
// snapshots that share them stay valid. Rounding follows the reference bf16 path: the conv output and
// its SiLU are rounded to bf16, everything after is fp32 until the output.
// Requires conv_dim a multiple of 16 and Dv one of 64, 128, 256 (every Qwen3.5 shape); the caller checks.
// in_place: the new recurrent state is written over `state` (returned as the new state) instead of into a new
// tensor; the caller makes sure nothing else holds it (decode_stack.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gdn_decode_impl(
    const at::Tensor& proj, const at::Tensor& conv_state, const at::Tensor& conv_w, const at::Tensor& A_log,
    const at::Tensor& dt_bias, const at::Tensor& state, const at::Tensor& norm_w, int64_t Hk, double eps,
    bool in_place) {
  TORCH_CHECK(proj.scalar_type() == at::kBFloat16 && conv_state.scalar_type() == at::kBFloat16 &&
              conv_w.scalar_type() == at::kBFloat16, "gdn_decode: bf16 activations and conv");
  TORCH_CHECK(state.scalar_type() == at::kFloat && A_log.scalar_type() == at::kFloat &&
              dt_bias.scalar_type() == at::kFloat && norm_w.scalar_type() == at::kFloat, "gdn_decode: fp32 params");
  TORCH_CHECK(proj.is_contiguous() && conv_state.is_contiguous() && conv_w.is_contiguous() && state.is_contiguous(),
              "gdn_decode: contiguous");
  const int64_t B = state.size(0), Hv = state.size(1), Dk = state.size(2), Dv = state.size(3);
  const int64_t Km1 = conv_state.size(1), C = conv_state.size(2), K = Km1 + 1;
  const int64_t key_dim = Hk * Dk, value_dim = Hv * Dv, P = proj.size(-1);
  TORCH_CHECK(C == 2 * key_dim + value_dim && P == C + value_dim + 2 * Hv, "gdn_decode: sizes");
  TORCH_CHECK(C % 16 == 0 && (Dv == 64 || Dv == 128 || Dv == 256) && Km1 >= 1 && K <= 8,
              "gdn_decode: unsupported sizes");
  const int64_t rep = Hv / Hk;

  at::Tensor new_conv = at::empty_like(conv_state);
  at::Tensor new_state = in_place ? state : at::empty_like(state);
  at::Tensor out = at::empty({B, value_dim}, proj.options());
  at::Tensor act = at::empty({B, C}, proj.options().dtype(at::kFloat));  // conv + silu output
  const auto* pp = proj.data_ptr<c10::BFloat16>();
  const auto* cs = conv_state.data_ptr<c10::BFloat16>();
  const auto* cw = conv_w.data_ptr<c10::BFloat16>();
  auto* ncs = new_conv.data_ptr<c10::BFloat16>();
  float* ap = act.data_ptr<float>();

  // Phase 1: conv over the window [state rows..., x] for 16 channels at a time.
  at::parallel_for(0, B * (C / 16), 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (C / 16), c = (i % (C / 16)) * 16;
      // gather the 16x K filter taps (stored [C, K]) into K vectors
      alignas(64) float taps[8][16];
      for (int64_t l = 0; l < 16; ++l)
        for (int64_t j = 0; j < K; ++j) taps[j][l] = static_cast<float>(cw[(c + l) * K + j]);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < Km1; ++j)
        acc = _mm512_fmadd_ps(bf16x16_to_f32(cs + (b * Km1 + j) * C + c), _mm512_load_ps(taps[j]), acc);
      acc = _mm512_fmadd_ps(bf16x16_to_f32(pp + b * P + c), _mm512_load_ps(taps[Km1]), acc);
      _mm512_storeu_ps(ap + b * C + c, round_bf16(silu512(round_bf16(acc))));
      for (int64_t j = 0; j + 1 < Km1; ++j)
        std::memcpy(ncs + (b * Km1 + j) * C + c, cs + (b * Km1 + j + 1) * C + c, 16 * sizeof(c10::BFloat16));
      std::memcpy(ncs + (b * Km1 + Km1 - 1) * C + c, pp + b * P + c, 16 * sizeof(c10::BFloat16));
    }
  });

  const float* A = A_log.data_ptr<float>();
  const float* dtb = dt_bias.data_ptr<float>();
  const float* nw = norm_w.data_ptr<float>();
  const float* S0 = state.data_ptr<float>();
  float* S1 = new_state.data_ptr<float>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const float qscale = 1.f / std::sqrt(static_cast<float>(Dk));
  const int64_t nv = Dv / 16;

  // Phase 2: per (sequence, value head), the delta rule on its Dk x Dv state.
  at::parallel_for(0, B * Hv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qk(2 * Dk);
    __m512 ov[16];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hv, h = i % Hv, kh = h / rep;
      const float* __restrict a = ap + b * C;
      float* __restrict q = qk.data();
      float* __restrict k = qk.data() + Dk;
      float qs = 0.f, ks = 0.f;
      for (int64_t d = 0; d < Dk; ++d) {
        q[d] = a[kh * Dk + d];
        k[d] = a[key_dim + kh * Dk + d];
        qs += q[d] * q[d];
        ks += k[d] * k[d];
      }
      const float qn = qscale / std::sqrt(qs + 1e-6f), kn = 1.f / std::sqrt(ks + 1e-6f);
      const float* __restrict v = a + 2 * key_dim + h * Dv;
      const c10::BFloat16* zba = pp + b * P + C;
      const float bb = to_f(zba[value_dim + h]), aa = to_f(zba[value_dim + Hv + h]);
      const float beta = 1.f / (1.f + std::exp(-bb));
      const float sp_in = aa + dtb[h];
      const float softplus = sp_in > 20.f ? sp_in : std::log1p(std::exp(sp_in));
      const float decay = std::exp(-std::exp(A[h]) * softplus);
      const float* s0 = S0 + i * Dk * Dv;
      float* s1 = S1 + i * Dk * Dv;
      // The new state is written with streaming stores: it is not read again this step (and the weight
      // stream would evict it before the next), so skipping the read-for-ownership of its 1 MiB per layer
      // saves a third of the state's memory traffic.
      // In place, the lines just read are in cache: plain stores (measured 1.03x a token on the 0.8B int4
      // in an alternating A/B against a new tensor written with streaming stores).
      const bool aligned = !in_place && reinterpret_cast<uintptr_t>(s1) % 64 == 0;
      const float* next = i + 1 < i1 ? s0 + Dk * Dv : nullptr;  // this thread's next head, prefetched
      switch (nv) {
        case 4: delta_rule_head<4>(s0, s1, k, q, v, kn, qn, decay, beta, Dk, ov, aligned, next); break;
        case 8: delta_rule_head<8>(s0, s1, k, q, v, kn, qn, decay, beta, Dk, ov, aligned, next); break;
        default: delta_rule_head<16>(s0, s1, k, q, v, kn, qn, decay, beta, Dk, ov, aligned, next); break;
      }
      // gated RMSNorm (not zero-centred): o * rsqrt(mean(o^2) + eps) * w * silu(z)
      __m512 ss = _mm512_setzero_ps();
      for (int64_t e = 0; e < nv; ++e) ss = _mm512_fmadd_ps(ov[e], ov[e], ss);
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / Dv + static_cast<float>(eps)));
      const c10::BFloat16* z = zba + h * Dv;
      for (int64_t e = 0; e < nv; ++e) {
        const __m512 g = silu512(bf16x16_to_f32(z + e * 16));
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(ov[e], inv), _mm512_loadu_ps(nw + e * 16)), g);
        store_bf16x16(op + b * value_dim + h * Dv + e * 16, y);
      }
    }
  });
  _mm_sfence();  // order the streaming stores before anyone reads the new state
  return {out, new_conv, new_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdn_decode(
    const at::Tensor& proj, const at::Tensor& conv_state, const at::Tensor& conv_w, const at::Tensor& A_log,
    const at::Tensor& dt_bias, const at::Tensor& state, const at::Tensor& norm_w, int64_t Hk, double eps) {
  return gdn_decode_impl(proj, conv_state, conv_w, A_log, dt_bias, state, norm_w, Hk, eps, false);
}

// Decode attention: one query token per sequence against its whole KV cache, streamed once.
//   q [B, Hq, D] bf16 (after norm and RoPE), k/v [B, Hkv, cap, D] bf16 of which the first S are valid,
//   pad [B] int64 (keys before pad[b] are left padding) or an empty tensor. Returns [B, Hq, D] bf16.
// The G query heads of one KV head share a single pass over its keys and values; the cache is split into
// blocks processed in parallel, each keeping its own running max and sum (flash-decoding), merged at the
// end. Scores, softmax and accumulation are fp32; G is a template parameter so accumulators stay in
// registers.
using qwen35_attn::kAttnBlock;  // attn_blocks.h: the block walk both cache formats share

// A block's scores -> exp(score - max), rounded to bf16 (as the reference bf16 path does before its P.V matmul)
// with the sum taken over the rounded values, so numerator and denominator agree; out[g*(D+2)] = max,
// out[g*(D+2)+1] = sum. Shared with the q8_0 blocks (kv_kernels.cpp), so both formats round alike.
void softmax_block(int64_t G, int64_t n, const float* mx, float* scores, float* out, int64_t D) {
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores + g * kAttnBlock;
    const __m512 vm = _mm512_set1_ps(mx[g]);
    __m512 vs = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
      const __m512 e = round_bf16(exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + s), vm)));
      _mm512_storeu_ps(sc + s, e);
      vs = _mm512_add_ps(vs, e);
    }
    float sum = _mm512_reduce_add_ps(vs);
    for (; s < n; ++s) {
      sc[s] = static_cast<float>(static_cast<c10::BFloat16>(std::exp(sc[s] - mx[g])));
      sum += sc[s];
    }
    out[g * (D + 2)] = mx[g];
    out[g * (D + 2) + 1] = sum;
  }
}

}  // namespace
namespace qwen35_attn {
void softmax_block(int64_t G, int64_t n, const float* mx, float* scores, float* out, int64_t D) {
  ::softmax_block(G, n, mx, scores, out, D);
}
}  // namespace qwen35_attn
namespace qwen35_kv {
void attend_blocks_q8(const c10::BFloat16* q, int64_t B, int64_t Hkv, int64_t G, int64_t D,
                      const std::vector<const int8_t*>& k, const std::vector<const c10::Half*>& kd,
                      const std::vector<const int8_t*>& v, const std::vector<const c10::Half*>& vd,
                      const std::vector<int64_t>& cap, at::IntArrayRef lengths, int64_t nblocks, float scale,
                      float* part);
}  // namespace qwen35_kv
namespace {

using qwen35_attn::RowPrefetch;

template <int G>
void attend_block(const __m512bh (*qv)[16], int64_t D, const c10::BFloat16* kb, int64_t kstride,
                  const c10::BFloat16* vb, int64_t vstride, int64_t s0, int64_t s1, float scale, float* scores,
                  float* out, RowPrefetch ahead) {
  const int64_t n = s1 - s0, nc = D / 32;
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t s = 0; s < n; ++s) {
    const c10::BFloat16* kr = kb + (s0 + s) * kstride;
    const char* vrow = reinterpret_cast<const char*>(vb + (s0 + s) * vstride);
    for (int64_t off = 0; off < D * 2; off += 64) _mm_prefetch(vrow + off, _MM_HINT_T1);
    // and the key row a few ahead into L1: the hardware prefetcher alone leaves this loop waiting on memory
    const char* knext = reinterpret_cast<const char*>(kr + 8 * kstride);
    for (int64_t off = 0; off < D * 2; off += 64) _mm_prefetch(knext + off, _MM_HINT_T0);
    __m512 dots[G];
    for (int g = 0; g < G; ++g) dots[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      const __m512bh kc = (__m512bh)_mm512_loadu_si512(kr + c * 32);
      for (int g = 0; g < G; ++g) dots[g] = _mm512_dpbf16_ps(dots[g], qv[g][c], kc);
    }
    for (int g = 0; g < G; ++g) {
      const float sc = _mm512_reduce_add_ps(dots[g]) * scale;
      scores[g * kAttnBlock + s] = sc;
      mx[g] = std::max(mx[g], sc);
    }
  }
  softmax_block(G, n, mx, scores, out, D);
  // P.V with bf16 pair dot products: keys s and s+1 are interleaved per output dim (unpacklo/hi of the two
  // value rows) and multiplied by the broadcast pair (p[s], p[s+1]): 32 products per instruction, no
  // conversions. unpack works within 128-bit lanes, so accumulator `lo` lane 4k+t holds dim 8k+t and `hi`
  // holds dim 8k+4+t of each 32-dim chunk; the stores undo that. The values were prefetched into L2 during
  // the score pass, so the D/32 passes read L2, not memory.
  alignas(64) uint32_t pairs[G][kAttnBlock / 2 + 1];
  const int64_t np = (n + 1) / 2;
  for (int g = 0; g < G; ++g) {
    const float* sc = scores + g * kAttnBlock;
    for (int64_t j = 0; j < np; ++j) {
      const c10::BFloat16 a = static_cast<c10::BFloat16>(sc[2 * j]);
      const c10::BFloat16 b = 2 * j + 1 < n ? static_cast<c10::BFloat16>(sc[2 * j + 1]) : c10::BFloat16(0.f);
      pairs[g][j] = static_cast<uint32_t>(a.x) | (static_cast<uint32_t>(b.x) << 16);
    }
  }
  const __m512i zero = _mm512_setzero_si512();
  ahead.spread(D / 32 * np);
  for (int64_t c = 0; c < D / 32; ++c) {
    __m512 lo[G], hi[G];
    for (int g = 0; g < G; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t j = 0; j < np; ++j) {
      ahead.step();
      const int64_t s = s0 + 2 * j;
      const __m512i v0 = _mm512_loadu_si512(vb + s * vstride + c * 32);
      const __m512i v1 = 2 * j + 1 < n ? _mm512_loadu_si512(vb + (s + 1) * vstride + c * 32) : zero;
      const __m512bh vl = (__m512bh)_mm512_unpacklo_epi16(v0, v1), vh = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
      for (int g = 0; g < G; ++g) {
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[g][j]));
        lo[g] = _mm512_dpbf16_ps(lo[g], vl, pp);
        hi[g] = _mm512_dpbf16_ps(hi[g], vh, pp);
      }
    }
    for (int g = 0; g < G; ++g) {
      alignas(64) float l[16], h[16];
      _mm512_store_ps(l, lo[g]);
      _mm512_store_ps(h, hi[g]);
      float* o = out + g * (D + 2) + 2 + c * 32;
      for (int k = 0; k < 4; ++k)
        for (int t = 0; t < 4; ++t) {
          o[8 * k + t] = l[4 * k + t];
          o[8 * k + 4 + t] = h[4 * k + t];
        }
    }
  }
}

// kd, vd: empty for a bf16 cache; for a q8_0 cache (kv_storage.py) k[b], v[b] are int8 [Hkv, cap_b, D], contiguous,
// and kd[b], vd[b] their fp16 scales [Hkv, cap_b, D/32] (kv_kernels.cpp reads them in place).
at::Tensor attn_decode_impl(const at::Tensor& q, at::TensorList k, at::TensorList v, at::TensorList kd,
                            at::TensorList vd, at::IntArrayRef lengths, double scale) {
  // Rows live in buffers of their own (they never move when another row joins or leaves the batch):
  // k[b], v[b] [Hkv, cap_b, D] bf16, of which the first lengths[b] keys are row b's.
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const bool q8 = !kd.empty();
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.is_contiguous(), "attn_decode: q bf16 contiguous");
  TORCH_CHECK(static_cast<int64_t>(k.size()) == B && static_cast<int64_t>(v.size()) == B &&
              static_cast<int64_t>(lengths.size()) == B, "attn_decode: one key/value buffer and length per row");
  TORCH_CHECK(!q8 || (static_cast<int64_t>(kd.size()) == B && static_cast<int64_t>(vd.size()) == B),
              "attn_decode_q8: one scale buffer per row");
  const int64_t Hkv = k[0].size(0);
  int64_t S = 0;
  for (int64_t b = 0; b < B; ++b) {
    const auto vt = q8 ? at::kChar : at::kBFloat16;
    TORCH_CHECK(k[b].scalar_type() == vt && v[b].scalar_type() == vt, q8 ? "attn_decode_q8: int8" : "attn_decode: bf16");
    TORCH_CHECK(k[b].dim() == 3 && k[b].size(0) == Hkv && k[b].size(2) == D && k[b].stride(2) == 1 &&
                v[b].stride(2) == 1 && v[b].sizes() == k[b].sizes() && k[b].stride(1) == v[b].stride(1) &&
                k[b].stride(0) == v[b].stride(0), "attn_decode: layout");
    if (q8)
      TORCH_CHECK(k[b].is_contiguous() && v[b].is_contiguous() && kd[b].is_contiguous() && vd[b].is_contiguous() &&
                  kd[b].scalar_type() == at::kHalf && vd[b].scalar_type() == at::kHalf && kd[b].dim() == 3 &&
                  kd[b].size(0) == Hkv && kd[b].size(1) == k[b].size(1) && kd[b].size(2) == D / 32 &&
                  vd[b].sizes() == kd[b].sizes(), "attn_decode_q8: scales layout");
    TORCH_CHECK(lengths[b] >= 1 && lengths[b] <= k[b].size(1), "attn_decode: length beyond the buffer");
    S = std::max(S, lengths[b]);
  }
  TORCH_CHECK(D % 32 == 0 && D <= 512 && Hq % Hkv == 0, "attn_decode: sizes");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(G == 1 || G == 2 || G == 4 || G == 8, "attn_decode: 1, 2, 4 or 8 query heads per KV head");
  const int64_t nblocks = (S + kAttnBlock - 1) / kAttnBlock;
  at::Tensor part = at::empty({B * Hkv * nblocks, G, D + 2}, q.options().dtype(at::kFloat));
  float* pp = part.data_ptr<float>();
  const auto* qp = q.data_ptr<c10::BFloat16>();
  std::vector<const c10::BFloat16*> kp(B), vp(B);
  std::vector<int64_t> hstride(B), sstride(B);
  for (int64_t b = 0; b < B; ++b) {
    kp[b] = q8 ? nullptr : k[b].data_ptr<c10::BFloat16>();
    vp[b] = q8 ? nullptr : v[b].data_ptr<c10::BFloat16>();
    hstride[b] = k[b].stride(0);
    sstride[b] = k[b].stride(1);
  }
  const float fscale = static_cast<float>(scale);
  if (q8) {
    std::vector<const int8_t*> k8(B), v8(B);
    std::vector<const c10::Half*> kd8(B), vd8(B);
    std::vector<int64_t> cap(B);
    for (int64_t b = 0; b < B; ++b) {
      k8[b] = k[b].data_ptr<int8_t>();
      v8[b] = v[b].data_ptr<int8_t>();
      kd8[b] = kd[b].data_ptr<c10::Half>();
      vd8[b] = vd[b].data_ptr<c10::Half>();
      cap[b] = k[b].size(1);
    }
    qwen35_kv::attend_blocks_q8(qp, B, Hkv, G, D, k8, kd8, v8, vd8, cap, lengths, nblocks, fscale, pp);
  } else {
  at::parallel_for(0, B * Hkv * nblocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(G * kAttnBlock);
    __m512bh qv[8][16];
    for (int64_t i = i0; i < i1; ++i) {
      const auto [b, h, s0, s1] = qwen35_attn::block_of(i, Hkv, nblocks, lengths);
      float* out = pp + i * G * (D + 2);
      if (s0 >= s1) {  // past this row's length
        for (int64_t g = 0; g < G; ++g) { out[g * (D + 2)] = -INFINITY; out[g * (D + 2) + 1] = 0.f; }
        continue;
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < D / 32; ++c)
          qv[g][c] = (__m512bh)_mm512_loadu_si512(qp + (b * Hq + h * G + g) * D + c * 32);
      const c10::BFloat16* kb = kp[b] + h * hstride[b];
      const c10::BFloat16* vb = vp[b] + h * hstride[b];
      const int64_t st = sstride[b];
      RowPrefetch ahead;  // the keys of this thread's next block, during this one's P.V
      if (i + 1 < i1) {
        const qwen35_attn::Block nx = qwen35_attn::block_of(i + 1, Hkv, nblocks, lengths);
        if (nx.s0 < nx.s1)
          ahead = RowPrefetch(kp[nx.b] + nx.h * hstride[nx.b] + nx.s0 * sstride[nx.b], nx.s1 - nx.s0,
                              sstride[nx.b] * 2, D * 2);
      }
      switch (G) {
        case 1: attend_block<1>(qv, D, kb, st, vb, st, s0, s1, fscale, scores.data(), out, ahead); break;
        case 2: attend_block<2>(qv, D, kb, st, vb, st, s0, s1, fscale, scores.data(), out, ahead); break;
        case 4: attend_block<4>(qv, D, kb, st, vb, st, s0, s1, fscale, scores.data(), out, ahead); break;
        default: attend_block<8>(qv, D, kb, st, vb, st, s0, s1, fscale, scores.data(), out, ahead); break;
      }
    }
  });
  }

  at::Tensor result = at::empty({B, Hq, D}, q.options());
  auto* rp = result.data_ptr<c10::BFloat16>();
  at::parallel_for(0, B * Hkv * G, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> o(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / G, g = i % G;
      float m = -INFINITY;
      for (int64_t blk = 0; blk < nblocks; ++blk) m = std::max(m, pp[((bh * nblocks + blk) * G + g) * (D + 2)]);
      float total = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const float* r = pp + ((bh * nblocks + blk) * G + g) * (D + 2);
        if (r[1] == 0.f) continue;
        const float w = std::exp(r[0] - m);
        total += w * r[1];
        for (int64_t d = 0; d < D; ++d) o[d] += w * r[2 + d];
      }
      const int64_t b = bh / Hkv, h = bh % Hkv;
      for (int64_t d = 0; d < D; ++d) rp[(b * Hq + h * G + g) * D + d] = static_cast<c10::BFloat16>(o[d] / total);
    }
  });
  return result;
}

at::Tensor attn_decode(const at::Tensor& q, at::TensorList k, at::TensorList v, at::IntArrayRef lengths,
                       double scale) {
  return attn_decode_impl(q, k, v, {}, {}, lengths, scale);
}

at::Tensor attn_decode_q8(const at::Tensor& q, at::TensorList k, at::TensorList kd, at::TensorList v,
                          at::TensorList vd, at::IntArrayRef lengths, double scale) {
  TORCH_CHECK(!kd.empty(), "attn_decode_q8: scales");
  return attn_decode_impl(q, k, v, kd, vd, lengths, scale);
}

// silu(gate) * up where gate_up = [.., 2I] holds gate in the first half and up in the second (bf16).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.scalar_type() == at::kBFloat16, "silu_mul: contiguous bf16");
  const int64_t I2 = gate_up.size(-1), I = I2 / 2, rows = gate_up.numel() / I2;
  TORCH_CHECK(I % 16 == 0, "silu_mul: size must be a multiple of 32");
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  at::Tensor out = at::empty(sizes, gate_up.options());
  const auto* g = gate_up.data_ptr<c10::BFloat16>();
  auto* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, rows * (I / 16), 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / (I / 16), c = (i % (I / 16)) * 16;
      const __m512 a = bf16x16_to_f32(g + r * I2 + c), b = bf16x16_to_f32(g + r * I2 + I + c);
      store_bf16x16(o + r * I + c, _mm512_mul_ps(round_bf16(silu512(a)), b));
    }
  });
  return out;
}

// Causal depthwise conv + SiLU over a chunk of tokens (prefill): x [B, T, C] bf16, w [C, K] bf16,
// state [B, K-1, C] bf16 (the previous K-1 inputs). Returns (silu(conv) [B, T, C] bf16, new state).
// Rounds like the reference bf16 path: conv output to bf16, then SiLU to bf16.
std::tuple<at::Tensor, at::Tensor> conv_silu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& state) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
              state.scalar_type() == at::kBFloat16, "conv_silu: bf16");
  // x may be a column slice of a wider matrix (the qkv part of the fused input projection): rows at any
  // stride, channels contiguous, so prefill need not copy it out first
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && w.is_contiguous() && state.is_contiguous(),
              "conv_silu: x with contiguous channels, w and state contiguous");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), K = w.size(1), Km1 = K - 1;
  const int64_t sb = x.stride(0), st = x.stride(1);
  TORCH_CHECK(w.dim() == 2 && state.dim() == 3 && C % 16 == 0 && w.size(0) == C && K >= 2 && K <= 8 &&
                  state.size(0) == B && state.size(1) == Km1 && state.size(2) == C,
              "conv_silu: sizes do not fit: x ", x.sizes(), ", w ", w.sizes(), ", state ", state.sizes(),
              " (channels a multiple of 16, 2-8 taps)");
  at::Tensor y = at::empty({B, T, C}, x.options());
  at::Tensor new_state = at::empty_like(state);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  const auto* sp = state.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  auto* np = new_state.data_ptr<c10::BFloat16>();
  // input row j of the window (j < 0: from the state)
  auto row = [&](int64_t b, int64_t t) -> const c10::BFloat16* {
    return t >= 0 ? xp + b * sb + t * st : sp + (b * Km1 + Km1 + t) * C;
  };
  const int64_t nc = C / 16;
  at::parallel_for(0, B * nc, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nc, c = (i % nc) * 16;
      alignas(64) float taps[8][16];
      for (int64_t l = 0; l < 16; ++l)
        for (int64_t j = 0; j < K; ++j) taps[j][l] = static_cast<float>(wp[(c + l) * K + j]);
      __m512 tv[8];
      for (int64_t j = 0; j < K; ++j) tv[j] = _mm512_load_ps(taps[j]);
      for (int64_t t = 0; t < T; ++t) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < K; ++j) acc = _mm512_fmadd_ps(bf16x16_to_f32(row(b, t - Km1 + j) + c), tv[j], acc);
        store_bf16x16(yp + (b * T + t) * C + c, silu512(round_bf16(acc)));
      }
      for (int64_t j = 0; j < Km1; ++j)
        std::memcpy(np + (b * Km1 + j) * C + c, row(b, T - Km1 + j) + c, 16 * sizeof(c10::BFloat16));
    }
  });
  return {y, new_state};
}

// ---------------------------------------------------------------------------------------------------
// Whole decoder layers for decode (one token per sequence), so a decode step makes one call per layer
// instead of ~20 small ops from Python: layer_steps.h, on the kernels above; the math and rounding are those
// of the per-op fast path, which is tested against the torch reference.

}  // namespace
namespace qwen35_quant {
void gemv_into(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, c10::BFloat16* out,
               int64_t ldo);
void gemv_k_into(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, c10::BFloat16* out,
                 int64_t ldo);
}
namespace {

// The AVX512 library's kernels, as layer_steps.h's layers take them
struct Avx512Ops {
  static void gemv_bf16_into(const at::Tensor& x, const at::Tensor& w, c10::BFloat16* out, int64_t ldo) {
    const int64_t K = x.size(1);
    gemv_all<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), K, w.data_ptr<c10::BFloat16>(), x.size(0), w.size(0), K, out,
                            ldo);
  }
  static void gemv_quant_into(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                              c10::BFloat16* out, int64_t ldo) {
    if (kind <= 2)
      qwen35_quant::gemv_into(kind, x, qs, d, out, ldo);
    else
      qwen35_quant::gemv_k_into(kind, x, qs, d, out, ldo);
  }
  static constexpr auto* silu_mul = &::silu_mul;
  static constexpr auto* gdn_decode = &gdn_decode_impl;
  static constexpr auto* attn_decode = &attn_decode_impl;
};

}  // namespace

// The two whole-layer decode steps (layer_steps.h on this library's kernels), named outside this file's anonymous
// namespace so decode_stack.cpp (which runs a model's layers in one call) calls them directly.
namespace qwen35_layers {
QWEN35_DECODE_LAYERS(Avx512Ops)
}  // namespace qwen35_layers
namespace {

bool cpu_supported() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }

// Flush-to-zero and denormals-are-zero (MXCSR bits 15 and 6) on the calling thread and on every thread of
// the OpenMP team torch's parallel ops use (MXCSR is per thread; threads created later inherit the creating
// thread's). Returns the number of threads set.
constexpr unsigned kFlushBits = 0x8040;

int64_t set_flush_denormals(bool on) {
  auto apply = [on] {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(on ? (csr | kFlushBits) : (csr & ~kFlushBits));
  };
  apply();
  std::atomic<int64_t> n{1};
#ifdef _OPENMP
  n = 0;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    apply();
    n.fetch_add(1);
  }
#endif
  return n.load();
}

bool flushing_denormals() { return (_mm_getcsr() & kFlushBits) == kFlushBits; }  // the calling thread's setting

// How many threads a parallel_for in this library really runs on: 1 when it was built without OpenMP (the
// pragma inside at::parallel_for is compiled here, not in libtorch), whatever torch.get_num_threads() says.
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 256, 1, [&](int64_t i0, int64_t i1) {
    volatile double sink = 0;
    for (int64_t i = i0; i < i1; ++i)
      for (int j = 0; j < 20000; ++j) sink = sink + j;  // long enough that every thread gets work
    seen.fetch_or(uint64_t{1} << (at::get_thread_num() % 64));
  });
  return __builtin_popcountll(seen.load());
}

}  // namespace

// The gated delta rule over a sequence, blocks of 8 tokens (delta_rule.h; ops/step_forms.delta_rule).
std::tuple<at::Tensor, at::Tensor> delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& g, const at::Tensor& beta, const at::Tensor& state) {
  return delta_rule_blocks::delta_rule("delta_rule", q, k, v, g, beta, state);
}

TORCH_LIBRARY(qwen35, m) {
  m.def("gemv_bf16(Tensor x, Tensor w, bool out_fp32) -> Tensor");
  m.def("cpu_supported() -> bool");
  m.def("parallel_threads() -> int");
  m.def("set_flush_denormals(bool on) -> int");
  m.def("flushing_denormals() -> bool");
  m.def("rmsnorm(Tensor x, Tensor w, float eps, bool add_one) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("gdn_decode(Tensor proj, Tensor conv_state, Tensor conv_w, Tensor A_log, Tensor dt_bias, Tensor state, "
        "Tensor norm_w, int Hk, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("conv_silu(Tensor x, Tensor w, Tensor state) -> (Tensor, Tensor)");
  m.def("delta_rule(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor)");
  // each matrix: Tensor[] (data, scales per part) and int[] kinds (see Matrix)
  m.def("decode_gdn_layer" QWEN35_GDN_LAYER_SCHEMA);
  m.def("decode_attn_layer" QWEN35_ATTN_LAYER_SCHEMA);
  m.def("attn_decode(Tensor q, Tensor[] k, Tensor[] v, int[] lengths, float scale) -> Tensor");
  m.def("attn_decode_q8(Tensor q, Tensor[] k, Tensor[] kd, Tensor[] v, Tensor[] vd, int[] lengths, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("rmsnorm", &rmsnorm);
  m.impl("silu_mul", &silu_mul);
  m.impl("gdn_decode", &gdn_decode);
  m.impl("attn_decode", &attn_decode);
  m.impl("attn_decode_q8", &attn_decode_q8);
  m.impl("conv_silu", &conv_silu);
  m.impl("delta_rule", &delta_rule);
  m.impl("decode_gdn_layer", &qwen35_layers::decode_gdn_layer);
  m.impl("decode_attn_layer", &qwen35_layers::decode_attn_layer);
}
TORCH_LIBRARY_IMPL(qwen35, CompositeExplicitAutograd, m) {
  m.impl("cpu_supported", &cpu_supported);
  m.impl("parallel_threads", &parallel_threads);
  m.impl("set_flush_denormals", &set_flush_denormals);
  m.impl("flushing_denormals", &flushing_denormals);
}
