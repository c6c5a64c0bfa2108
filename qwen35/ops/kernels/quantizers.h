// The weight quantizers, written once and compiled twice: into the AVX512 kernels (quant_kernels.cpp,
// quant_k_kernels.cpp) and into the portable ones (portable_kernels.cpp, any CPU). Each writes the bytes of its
// torch reference (quant/formats.py, quant/kquants.py; tested byte for byte) by the same fp32 operations in the
// same order, so fp-contract is off throughout: a fused multiply-add would round differently.
// - q8_0 / q4_0: ggml's reference quantizers, scalar.
// - GGUF's K-quants (Q4_K, Q6_K): kquants.quantize_q4_k / quantize_q6_k's algorithm in GCC's vector extensions,
//   sub-blocks side by side (lane i one sub-block, every lane the scalar algorithm exactly), as many as the
//   machine's vector holds: 16 in the AVX512 build's zmm registers, 8 with AVX (ymm), 4 elsewhere (NEON, SSE2).
//   (The portable build had run 16-lane vectors everywhere: GCC splits them into 256-bit halves and, where an
//   operation has no instruction of that width, spills them to the stack lane by lane; quantizing the int4 0.8B
//   at load took 33-35 s held to AVX2 against 4 s with AVX512.)
// Everything here has internal linkage, so the two libraries never bind to each other's copy.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "fp_contract.h"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace {
namespace qfit {

constexpr int64_t QK = 256;              // weights per super-block
constexpr int64_t Q4K = 144, Q6K = 210;  // bytes per super-block

inline float kq_half_at(const uint8_t* p) {  // the fp16 stored (unaligned) at p, as fp32
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int vi __attribute__((vector_size(4 * kLanes)));

inline vf vsplat(float v) { return vf{} + v; }
// Rounding to nearest even and square root per lane: one instruction where the build has one of the vector's
// width, C's correctly rounded functions lane by lane elsewhere (the same results either way)
#if defined(__AVX512F__)
inline vf vround(vf v) { return (vf)_mm512_roundscale_ps((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vsqrt(vf v) { return (vf)_mm512_sqrt_ps((__m512)v); }
#elif defined(__AVX__)
inline vf vround(vf v) { return (vf)_mm256_round_ps((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vsqrt(vf v) { return (vf)_mm256_sqrt_ps((__m256)v); }
#elif defined(__ARM_NEON) && defined(__aarch64__)
inline vf vround(vf v) { return (vf)vrndnq_f32((float32x4_t)v); }
inline vf vsqrt(vf v) { return (vf)vsqrtq_f32((float32x4_t)v); }
#else
inline vf vround(vf v) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::nearbyint(v[i]);
  return r;
}
inline vf vsqrt(vf v) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::sqrt(v[i]);
  return r;
}
#endif
inline vf vabs(vf v) { return (vf)((vi)v & 0x7FFFFFFF); }
inline vf vsel(vi m, vf a, vf b) { return m ? a : b; }
inline vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
inline vf vclamp(vf v, float lo, float hi) { return vmin(vmax(v, vsplat(lo)), vsplat(hi)); }

// Q4_K's sub-block fit (kquants._fit_min_scale with nmax 15, rmin -1, rdelta 0.1, 20 steps) on kLanes lanes:
// x[i], w[i] element i of each lane's sub-block; out: scale, min (>= 0), L[i].
QWEN35_CONTRACT(off) void fit_min_scale(const vf* x, const vf* w, vf& scale_out, vf& min_out, vf* L) {
  QWEN35_CONTRACT_BODY(off)
  const float nmax = 15.f;
  vf mn = x[0], mx = x[0], sum_w = vsplat(0.f) + w[0], sum_x = vsplat(0.f) + w[0] * x[0];
  for (int i = 1; i < 32; ++i) {
    mn = vsel(x[i] < mn, x[i], mn);
    mx = vsel(x[i] > mx, x[i], mx);
    sum_w = sum_w + w[i];
    sum_x = sum_x + w[i] * x[i];
  }
  mn = vsel(mn > 0.f, vsplat(0.f), mn);
  const vi flat = mx == mn;
  const vf one = vsplat(1.f);
  vf iscale = vsplat(nmax) / vsel(flat, one, mx - mn);
  vf scale = one / iscale;
  vf best = vsplat(0.f);
  for (int i = 0; i < 32; ++i) {
    L[i] = vclamp(vround(iscale * (x[i] - mn)), 0.f, nmax);
    const vf diff = scale * L[i] + mn - x[i];
    best = best + w[i] * (diff * diff);
  }
  vf Lc[32];
  for (int step = 0; step <= 20; ++step) {
    const float cand = (-1.f + 0.1f * static_cast<float>(step)) + nmax;
    const vf is = vsplat(cand) / vsel(flat, one, mx - mn);
    vf sum_l = vsplat(0.f), sum_l2 = vsplat(0.f), sum_xl = vsplat(0.f);
    for (int i = 0; i < 32; ++i) {
      Lc[i] = vclamp(vround(is * (x[i] - mn)), 0.f, nmax);
      const vf wl = w[i] * Lc[i];
      sum_l = sum_l + wl;
      sum_l2 = sum_l2 + wl * Lc[i];
      sum_xl = sum_xl + wl * x[i];
    }
    const vf D = sum_w * sum_l2 - sum_l * sum_l;
    const vi ok = D > 0.f;
    const vf Ds = vsel(ok, D, one);
    vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds;
    vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds;
    const vi pos = this_min > 0.f;
    this_min = vsel(pos, vsplat(0.f), this_min);
    this_scale = vsel(pos, sum_xl / vsel(sum_l2 != 0.f, sum_l2, one), this_scale);
    vf err = vsplat(0.f);
    for (int i = 0; i < 32; ++i) {
      const vf d = this_scale * Lc[i] + this_min - x[i];
      err = err + w[i] * (d * d);
    }
    const vi better = ok & ~flat & (err < best);
    for (int i = 0; i < 32; ++i) L[i] = vsel(better, Lc[i], L[i]);
    best = vsel(better, err, best);
    scale = vsel(better, this_scale, scale);
    mn = vsel(better, this_min, mn);
  }
  scale_out = vsel(flat, vsplat(0.f), scale);
  min_out = -mn;
  for (int i = 0; i < 32; ++i) L[i] = vsel(flat, vsplat(0.f), L[i]);
}

// Q6_K's sub-block fit (kquants._fit_scale_x2 with nmax 32) on kLanes lanes; L[i] = l + 32 (0 for an all-zero lane).
QWEN35_CONTRACT(off) void fit_scale_x2(const vf* x, vf& scale_out, vf* L) {
  QWEN35_CONTRACT_BODY(off)
  const float nmax = 32.f;
  vf amax = vsplat(0.f), mx = vsplat(0.f);
  for (int i = 0; i < 16; ++i) {
    const vi gt = vabs(x[i]) > amax;
    amax = vsel(gt, vabs(x[i]), amax);
    mx = vsel(gt, x[i], mx);
  }
  const vi zero = amax < 1e-15f;
  const vf one = vsplat(1.f), mxs = vsel(zero, one, mx);
  vf li[16];
  auto fit = [&](vf iscale, vf& sumlx, vf& suml2) {
    sumlx = vsplat(0.f);
    suml2 = vsplat(0.f);
    for (int i = 0; i < 16; ++i) {
      li[i] = vclamp(vround(iscale * x[i]), -nmax, nmax - 1.f);
      const vf w = x[i] * x[i];
      sumlx = sumlx + (w * x[i]) * li[i];
      suml2 = suml2 + (w * li[i]) * li[i];
    }
  };
  vf sumlx, suml2;
  fit(vsplat(-nmax) / mxs, sumlx, suml2);
  vf scale = vsel(suml2 != 0.f, sumlx / vsel(suml2 != 0.f, suml2, one), vsplat(0.f));
  vf best = scale * sumlx;
  for (int i = 0; i < 16; ++i) L[i] = li[i] + nmax;
  for (int step = -9; step <= 9; ++step) {
    if (step == 0) continue;
    fit(-(vsplat(nmax + 0.1f * static_cast<float>(step))) / mxs, sumlx, suml2);
    const vi better = (suml2 > 0.f) & (sumlx * sumlx > best * suml2);
    for (int i = 0; i < 16; ++i) L[i] = vsel(better, li[i] + nmax, L[i]);
    scale = vsel(better, sumlx / vsel(suml2 > 0.f, suml2, one), scale);
    best = vsel(better, scale * sumlx, best);
  }
  scale_out = vsel(zero, vsplat(0.f), scale);
  for (int i = 0; i < 16; ++i) L[i] = vsel(zero, vsplat(0.f), L[i]);
}

inline uint16_t half_bits(float v) { return c10::Half(v).x; }
inline float rint_f(float v) { return std::nearbyint(v); }

// One Q4_K super-block's bytes from its sub-block fits (kquants.quantize_q4_k's super-block step).
QWEN35_CONTRACT(off) void q4k_pack(const float* x, const float* scales, const float* mins,
                                   const uint8_t* Lfit, uint8_t* out) {
  QWEN35_CONTRACT_BODY(off)
  float max_scale = 0.f, max_min = 0.f;
  for (int j = 0; j < 8; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_s = max_scale > 0 ? 63.f / max_scale : 0.f, inv_m = max_min > 0 ? 63.f / max_min : 0.f;
  int ls[8], lm[8];
  for (int j = 0; j < 8; ++j) {
    ls[j] = std::min(63, static_cast<int>(rint_f(inv_s * scales[j])) & 0xFF);
    lm[j] = std::min(63, static_cast<int>(rint_f(inv_m * mins[j])) & 0xFF);
  }
  const uint16_t dh = half_bits(max_scale / 63.f), mh = half_bits(max_min / 63.f);
  std::memcpy(out, &dh, 2);
  std::memcpy(out + 2, &mh, 2);
  for (int j = 0; j < 4; ++j) {
    out[4 + j] = static_cast<uint8_t>(ls[j] | ((ls[j + 4] >> 4) << 6));
    out[8 + j] = static_cast<uint8_t>(lm[j] | ((lm[j + 4] >> 4) << 6));
    out[12 + j] = static_cast<uint8_t>((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
  }
  const float d = kq_half_at(out), dmin = kq_half_at(out + 2);
  uint8_t L[QK];
  for (int j = 0; j < 8; ++j) {
    const float dj = d * static_cast<float>(ls[j]), dm = dmin * static_cast<float>(lm[j]);
    for (int i = 0; i < 32; ++i)
      L[j * 32 + i] = dj != 0.f ? static_cast<uint8_t>(std::min(15.f, std::max(0.f, rint_f((x[j * 32 + i] + dm) / dj))))
                                : Lfit[j * 32 + i];
  }
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) out[16 + c * 32 + l] = static_cast<uint8_t>(L[c * 64 + l] | (L[c * 64 + 32 + l] << 4));
}

QWEN35_CONTRACT(off) void q6k_pack(const float* x, const float* scales, const uint8_t* Lfit,
                                   uint8_t* out) {
  QWEN35_CONTRACT_BODY(off)
  float max_scale = 0.f, amax = 0.f;
  for (int j = 0; j < 16; ++j)
    if (std::fabs(scales[j]) > amax) { amax = std::fabs(scales[j]); max_scale = scales[j]; }
  std::memset(out, 0, Q6K);
  if (amax < 1e-15f) return;
  const float iscale = -128.f / max_scale;
  const uint16_t dh = half_bits(1.f / iscale);
  std::memcpy(out + 208, &dh, 2);
  const float d = kq_half_at(out + 208);
  int8_t sc[16];
  for (int j = 0; j < 16; ++j) sc[j] = static_cast<int8_t>(std::min(127.f, rint_f(iscale * scales[j])));
  std::memcpy(out + 192, sc, 16);
  uint8_t L[QK];
  for (int j = 0; j < 16; ++j) {
    const float dj = d * static_cast<float>(sc[j]);
    for (int i = 0; i < 16; ++i)
      L[j * 16 + i] = dj != 0.f ? static_cast<uint8_t>(std::min(31.f, std::max(-32.f, rint_f(x[j * 16 + i] / dj))) + 32.f)
                                : Lfit[j * 16 + i];
  }
  for (int h = 0; h < 2; ++h) {
    const uint8_t* Lh = L + 128 * h;
    for (int l = 0; l < 32; ++l) {
      out[64 * h + l] = static_cast<uint8_t>((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4));
      out[64 * h + 32 + l] = static_cast<uint8_t>((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4));
      out[128 + 32 * h + l] = static_cast<uint8_t>((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                                                   ((Lh[l + 96] >> 4) << 6));
    }
  }
}

// Super-blocks t0..t1 of w (flat, 256 floats each) into their bytes. A group is the 16 sub-blocks of 2 (q4_k)
// or 1 (q6_k) super-blocks; a missing second super-block runs on zeros and is dropped.
template <typename T>
QWEN35_CONTRACT(off) void quantize_k_range(const T* w, int64_t t0, int64_t t1, int64_t kind, uint8_t* qs) {
  QWEN35_CONTRACT_BODY(off)
  const int per = kind == 3 ? 2 : 1, sub = kind == 3 ? 32 : 16;
  alignas(64) float x[2 * QK];
  for (int64_t t = t0; t < t1; t += per) {
    const int have = static_cast<int>(std::min<int64_t>(per, t1 - t));
    for (int i = 0; i < per * QK; ++i) x[i] = i < have * QK ? static_cast<float>(w[t * QK + i]) : 0.f;
    float scales[16], mins[16];
    uint8_t Lfit[2 * QK];
    for (int g0 = 0; g0 < 16; g0 += kLanes) {  // sub-blocks g0 .. g0 + kLanes - 1, one a lane
      vf xv[32], L[32];
      for (int i = 0; i < sub; ++i)
        for (int lane = 0; lane < kLanes; ++lane) xv[i][lane] = x[(g0 + lane) * sub + i];
      if (kind == 3) {
        vf sum_x2 = vsplat(0.f);
        for (int i = 0; i < 32; ++i) sum_x2 = sum_x2 + xv[i] * xv[i];
        const vf av = vsqrt(sum_x2 / 32.f);
        vf wv[32];
        for (int i = 0; i < 32; ++i) wv[i] = av + vabs(xv[i]);
        vf sc, mn;
        fit_min_scale(xv, wv, sc, mn, L);
        for (int lane = 0; lane < kLanes; ++lane) {
          scales[g0 + lane] = sc[lane];
          mins[g0 + lane] = mn[lane];
        }
      } else {
        vf sc;
        fit_scale_x2(xv, sc, L);
        for (int lane = 0; lane < kLanes; ++lane) scales[g0 + lane] = sc[lane];
      }
      for (int i = 0; i < sub; ++i)
        for (int lane = 0; lane < kLanes; ++lane) Lfit[(g0 + lane) * sub + i] = static_cast<uint8_t>(L[i][lane]);
    }
    for (int k = 0; k < have; ++k) {
      if (kind == 3)
        q4k_pack(x + k * QK, scales + 8 * k, mins + 8 * k, Lfit + k * QK, qs + (t + k) * Q4K);
      else
        q6k_pack(x, scales, Lfit, qs + t * Q6K);
    }
  }
}

// C's roundf (half away from zero) of kLanes values, then clamped to [-127, 127] as std::max(-127.f,
// std::min(127.f, .)) clamps (a NaN gives 127, as there): exact for |v| < 2^23 (the truncation and the remainder
// are exact there), v itself beyond (already an integer). libm's roundf called per weight had been most of the
// q8_0 quantizer's time (0.43 G weights a second on 2 cores: ~20 s of loading a 9B with --quant int8), and a
// branch per weight on the remainder mispredicted half the time (0.15).
QWEN35_CONTRACT(off) inline vi round_clamp127(vf v) {
  const vf t = __builtin_convertvector(__builtin_convertvector(v, vi), vf), e = v - t;
  vf r = vsel(e >= 0.5f, t + 1.f, vsel(e <= -0.5f, t - 1.f, t));
  r = vsel(vabs(v) < 8388608.f, r, v);
  r = vsel(r < 127.f, r, vsplat(127.f));
  r = vsel(vsplat(-127.f) < r, r, vsplat(-127.f));
  return __builtin_convertvector(r, vi);
}

// W [N, K] (bf16 or fp32) -> (qs, d) exactly as formats.quantize_q8_0 / quantize_q4_0 (ggml's reference:
// the same fp32 operations in the same order, roundf / truncation, fp16 scales rounded to nearest even).
// fp-contract off: `v * inv + 8.5f` must round twice, as ggml's reference and ours do, not fuse into one FMA.
template <typename T>
QWEN35_CONTRACT(off) void quantize_weights_impl(const T* w, int64_t N, int64_t K, int64_t bits, uint8_t* qs, c10::Half* d) {
  QWEN35_CONTRACT_BODY(off)
  const int64_t nb = K / 32;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const T* x = w + n * K + b * 32;
        float v[32];
        for (int64_t j = 0; j < 32; ++j) v[j] = static_cast<float>(x[j]);
        if (bits == 8) {
          float amax = 0.f;
          for (int64_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
          const float dd = amax / 127.f, inv = dd != 0.f ? 1.f / dd : 0.f;
          int8_t* q = reinterpret_cast<int8_t*>(qs) + n * K + b * 32;
          for (int64_t j = 0; j < 32; j += kLanes) {
            vf x;
            std::memcpy(&x, v + j, sizeof x);
            const vi r = round_clamp127(x * inv);
            for (int l = 0; l < kLanes; ++l) q[j + l] = static_cast<int8_t>(r[l]);
          }
          d[n * nb + b] = static_cast<c10::Half>(dd);
        } else {
          float amax = 0.f, mx = 0.f;
          for (int64_t j = 0; j < 32; ++j)
            if (amax < std::fabs(v[j])) { amax = std::fabs(v[j]); mx = v[j]; }
          const float dd = mx / -8.f, inv = dd != 0.f ? 1.f / dd : 0.f;
          uint8_t* q = qs + n * (K / 2) + b * 16;
          for (int64_t j = 0; j < 16; ++j) {
            const int lo = std::min(15, static_cast<int>(std::trunc(v[j] * inv + 8.5f)));
            const int hi = std::min(15, static_cast<int>(std::trunc(v[16 + j] * inv + 8.5f)));
            q[j] = static_cast<uint8_t>(lo | (hi << 4));
          }
          d[n * nb + b] = static_cast<c10::Half>(dd);
        }
      }
  });
}

inline std::tuple<at::Tensor, at::Tensor> quantize_weights_tensor(const at::Tensor& w, int64_t bits) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) % 32 == 0,
              "quantize_weights: contiguous [N, K], K % 32 == 0");
  TORCH_CHECK(bits == 8 || bits == 4, "quantize_weights: bits must be 8 or 4");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor qs = at::empty({N, bits == 8 ? K : K / 2}, w.options().dtype(bits == 8 ? at::kChar : at::kByte));
  at::Tensor d = at::empty({N, K / 32}, w.options().dtype(at::kHalf));
  auto* q = static_cast<uint8_t*>(qs.data_ptr());
  auto* dp = d.data_ptr<c10::Half>();
  if (w.scalar_type() == at::kBFloat16)
    quantize_weights_impl(w.data_ptr<c10::BFloat16>(), N, K, bits, q, dp);
  else if (w.scalar_type() == at::kFloat)
    quantize_weights_impl(w.data_ptr<float>(), N, K, bits, q, dp);
  else
    TORCH_CHECK(false, "quantize_weights: bf16 or fp32 weights");
  return {qs, d};
}

// W [N, K] (bf16 or fp32, K % 256 == 0) -> K-quant bytes [N, K/256 * block bytes]; kind 3 = q4_k, 4 = q6_k
inline at::Tensor quantize_k_tensor(const at::Tensor& w, int64_t kind) {
  TORCH_CHECK(kind == 3 || kind == 4, "quantize_k: kind must be 3 (q4_k) or 4 (q6_k), got ", kind);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) % QK == 0, "quantize_k: contiguous [N, K], K % 256 == 0");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat, "quantize_k: bf16 or fp32 weights");
  const int64_t bb = kind == 3 ? Q4K : Q6K, N = w.size(0), K = w.size(1), total = N * K / QK;
  at::Tensor qs = at::empty({N, K / QK * bb}, w.options().dtype(at::kByte));
  uint8_t* q = qs.data_ptr<uint8_t>();
  // grains of an even number of super-blocks: q4_k's groups of 2 never straddle two threads' ranges
  at::parallel_for(0, (total + 1) / 2, 8, [&](int64_t a, int64_t b) {
    const int64_t t0 = 2 * a, t1 = std::min(total, 2 * b);
    if (w.scalar_type() == at::kBFloat16)
      quantize_k_range(w.data_ptr<c10::BFloat16>(), t0, t1, kind, q);
    else
      quantize_k_range(w.data_ptr<float>(), t0, t1, kind, q);
  });
  return qs;
}

}  // namespace qfit
}  // namespace
