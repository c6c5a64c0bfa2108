// The input side of the portable integer kernels (portable_kernels.cpp's GEMV, portable_gemm.cpp's GEMM): the rows
// quantized per block of 32 as the reference quantizes them (formats.quantize_activations), and the checks of a
// packed weight's operands. One definition, so the two kernels meet the same integers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <c10/util/BFloat16.h>

#include "portable_simd.h"
#include "quantizers.h"

namespace qwen35_prows {

constexpr int64_t QB = 32;  // inputs (and q8_0 / q4_0 weights) per block
using qfit::QK;             // weights per K-quant super-block
using qfit::Q4K, qfit::Q6K;  // bytes per Q4_K / Q6_K super-block
using qfit::kq_half_at;     // the fp16 stored (unaligned) at a byte pointer, as fp32

inline int64_t row_bytes(int64_t kind, int64_t K) {
  return kind == 1 ? K : kind == 2 ? K / 2 : K / QK * (kind == 3 ? Q4K : Q6K);
}

// The input rows quantized per block of 32: values xq [M, K], scales dx [M, K/32], dx times the block's sum of
// values, dsx [M, K/32] (what q4_k's mins multiply), and the sums of the values of each 16 in the lane order fold4
// leaves four blocks' halves in, hs [M, K/16]: for blocks 4g..4g+3, lanes 8g + k = the sum over elements 0-15 of
// block 4g + k and 8g + 4 + k over 16-31 (the last K/32 % 4 blocks have none). Weights stored with an offset
// (q4_0's nibbles - 8, q6_k's 6 bits - 32) multiply as unsigned bytes and take offset * hs off the exact integer
// sums: the same integers as the signed products, without the two sign instructions a 32-weight product needs.
struct Rows {
  std::vector<int8_t> xq;
  std::vector<float> dx, dsx;
  std::vector<int32_t> hs;
  int64_t K = 0, nb = 0;
};

inline void size_rows(Rows& r, int64_t M, int64_t K) {
  r.K = K;
  r.nb = K / QB;
  r.xq.resize(static_cast<size_t>(M * K));
  r.dx.resize(static_cast<size_t>(M * r.nb));
  r.dsx.resize(static_cast<size_t>(M * r.nb));
  r.hs.assign(static_cast<size_t>(M * r.nb * 2), 0);
}

inline psimd::f32x8 load8f(const c10::BFloat16* v) { return psimd::bf16x8(v); }
inline psimd::f32x8 load8f(const float* v) { return psimd::load_v<psimd::f32x8>(v); }

// 32 int32 lanes in [-127, 127] as 32 int8 at q, in order (AVX2: two saturating packs and a lane permute, where
// the generic narrowing is 32 scalar moves)
inline void store_i8x32(int8_t* q, const psimd::i32x8 (&v)[4]) {
#if defined(__AVX2__)
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32((__m256i)v[0], (__m256i)v[1]),
                                       _mm256_packs_epi32((__m256i)v[2], (__m256i)v[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 8; ++j) q[8 * i + j] = static_cast<int8_t>(v[i][j]);
#endif
}

// Row m of r (sized by size_rows) from the K values at x: rows are independent, so callers may fill them in
// parallel. 8 lanes at a time, each lane the reference's scalar operations (so the same bits): amax = max |x|
// (a NaN skipped, as std::max(amax, NaN) skips it), d = amax / 127, q = C's roundf(x / d) (half away from zero)
// clamped to [-127, 127], without roundf's library call: t = trunc(v) (|v| <= ~127 fits an int) and v - t is
// exact, so comparing it with +-0.5 decides as roundf does. (Scalar, this loop had taken 10 of a 512 x 3584 GEMM's
// 29 ms: perf.)
template <typename T>
void quantize_row(const T* x, int64_t m, Rows& r) {
  using namespace psimd;
  const int64_t K = r.K;
  const f32x8 zero{}, half = zero + 0.5f, one = zero + 1.f, lo = zero - 127.f, hi = zero + 127.f;
  for (int64_t b = 0; b < r.nb; ++b) {
    f32x8 f[4], amax = zero;
    for (int i = 0; i < 4; ++i) {
      f[i] = load8f(x + b * QB + 8 * i);
      const f32x8 a = (f32x8)((i32x8)f[i] & 0x7fffffff);
      amax = amax < a ? a : amax;
    }
    float am = 0.f;
    for (int j = 0; j < 8; ++j) am = std::max(am, amax[j]);
    const float d = am / 127.f, inv = d != 0.f ? 1.f / d : 0.f;
    i32x8 q[4];
    for (int i = 0; i < 4; ++i) {
      const f32x8 v = f[i] * inv, t = __builtin_convertvector(__builtin_convertvector(v, i32x8), f32x8), e = v - t;
      f32x8 rv = e >= half ? t + one : e <= -half ? t - one : t;
      rv = rv < hi ? rv : hi;   // std::min(127.f, rv)
      rv = lo < rv ? rv : lo;   // std::max(-127.f, rv)
      q[i] = __builtin_convertvector(rv, i32x8);
    }
    store_i8x32(r.xq.data() + m * K + b * QB, q);
    const i32x8 s0 = q[0] + q[1], s1 = q[2] + q[3];
    int32_t h0 = 0, h1 = 0;
    for (int j = 0; j < 8; ++j) {
      h0 += s0[j];
      h1 += s1[j];
    }
    if (b < r.nb / 4 * 4) {
      int32_t* h = r.hs.data() + m * r.nb * 2 + b / 4 * 8 + b % 4;
      h[0] = h0;
      h[4] = h1;
    }
    r.dx[m * r.nb + b] = d;
    r.dsx[m * r.nb + b] = d * static_cast<float>(h0 + h1);
  }
}

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, Rows& r) {
  size_rows(r, M, K);
  for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, m, r);
}

inline void check_layout(const at::Tensor& qs, const at::Tensor& d, int64_t kind, int64_t K, const char* who) {
  TORCH_CHECK(kind >= 1 && kind <= 4, who, ": kind must be 1 (q8_0), 2 (q4_0), 3 (q4_k) or 4 (q6_k), got ", kind);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.element_size() == 1, who, ": qs must be contiguous bytes [N, row bytes]");
  TORCH_CHECK(K % (kind <= 2 ? QB : QK) == 0 && qs.size(1) == row_bytes(kind, K), who, ": ", K, " columns do not match weights ",
              qs.sizes(), " of layout ", kind);
  if (kind <= 2)
    TORCH_CHECK(d.dim() == 2 && d.is_contiguous() && d.scalar_type() == at::kHalf && d.size(0) == qs.size(0) &&
                    d.size(1) == K / QB, who, ": d must be contiguous fp16 [N, K/32], got ", d.sizes());
}

// An integer kernel's op around fill(x, out): x [M, K] (bf16 or fp32) checked and made contiguous, the weights'
// layout checked, out [M, N] written by fill as bf16 (rounded as it is written: what .to(bf16) gives) where x is
// bf16 and fp32 is not asked for, else as fp32 (then cast to x's dtype unless out_fp32). fill is called with a
// c10::BFloat16* or a float*.
template <typename Fill>
at::Tensor integer_product(const at::Tensor& x_, const at::Tensor& qs, const at::Tensor& d, int64_t kind, bool out_fp32,
                           const char* who, Fill fill) {
  TORCH_CHECK(x_.dim() == 2 && x_.size(0) >= 1, who, ": x must be [M, K] with M >= 1");
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 || x_.scalar_type() == at::kFloat, who, ": x must be bf16 or fp32");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), N = qs.size(0);
  check_layout(qs, d, kind, x.size(1), who);
  if (!out_fp32 && x.scalar_type() == at::kBFloat16) {
    at::Tensor out = at::empty({M, N}, x.options());
    fill(x, out.data_ptr<c10::BFloat16>());
    return out;
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  fill(x, out.data_ptr<float>());
  return out_fp32 ? out : out.to(x.scalar_type());
}

}  // namespace qwen35_prows
