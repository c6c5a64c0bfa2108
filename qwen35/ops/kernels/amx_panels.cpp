// gemm_panels: prefill of a few dozen to a few hundred rows on block-quantized weights (or bf16 ones, kind 0:
// read in place, nothing to dequantize) where oneDNN has AMX tiles. y[M, N] = x[M, K] . W^T computed as F.linear(x, dequantize(W)) computes it (bf16 weights and inputs,
// exact products, fp32 sums: only the order of the sums differs), without a dequantized copy of W in memory:
// panels of PN weight rows are dequantized into a buffer that stays in L1/L2 and are the A operand of torch's
// exported oneDNN micro-kernel (at::native::cpublas::brgemm, which owns the AMX tile configuration and the
// permission to use the tiles); x is packed once as the B operand (x^T in VNNI pairs, rows padded to 16).
//
// Why this orientation: the weight rows are already the A tiles' layout (a row of 32 bf16 is one 64-byte tile
// row), so a panel is dequantized with the plain row dequantizers, no transpose; x^T is small and packed once.
// The output tile is transposed on the way out (16x16 fp32 in registers). Measured on the 0.8B's shapes (README):
// faster than the integer VNNI GEMM and than dequantizing the whole matrix for oneDNN's GEMM between ~16 and a
// few hundred rows; at 512 rows the packed inputs outgrow L2 (K = 3584) and oneDNN's own blocking wins.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "quant_common.h"

namespace qwen35_quant {
void dequant_row_bf16(int64_t kind, const uint8_t* row, const c10::Half* d, int64_t K, c10::BFloat16* out);
void dequant_k_row_bf16(int64_t kind, const uint8_t* row, int64_t K, c10::BFloat16* out);
}  // namespace qwen35_quant

namespace {

constexpr int64_t PN = 32;  // weight rows per panel: 2 A tiles high

// 16 rows of 16 32-bit values, transposed in registers
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xDD);
  }
}

at::Tensor gemm_panels(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t kind, bool out_fp32) {
  TORCH_CHECK(kind >= 0 && kind <= 4, "gemm_panels: unknown layout code ", kind);
  TORCH_CHECK(at::native::cpublas::could_pack(at::kBFloat16),
              "gemm_panels: this CPU has no AMX-BF16 tiles for oneDNN's micro-kernel (use the integer or dequantizing GEMM)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "gemm_panels: x must be a contiguous bf16 [M, K] matrix");
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && (qs.element_size() == 1 || kind == 0),
              "gemm_panels: qs must be contiguous bytes [N, row bytes] (kind 0: a bf16 matrix [N, K])");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(kind == 0 ? qs.scalar_type() == at::kBFloat16 && qs.size(1) == K
                        : K % (kind <= 2 ? 32 : 256) == 0 && qs.size(1) == qwen35_qc::row_bytes(kind, K),
              "gemm_panels: x has ", K, " columns, weights ", qs.sizes());
  TORCH_CHECK(K % 32 == 0, "gemm_panels: K = ", K, " is not a multiple of 32");
  if (kind == 1 || kind == 2)
    TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(0) == N && d.size(1) == K / 32,
                "gemm_panels: scales must be fp16 [", N, ", ", K / 32, "], got ", d.sizes());
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_fp32 ? at::kFloat : at::kBFloat16));
  if (M == 0 || N == 0) return y;
  // B: x^T in VNNI pairs, [K/2][Mp][2] bf16 = dword (kp, m) holds x[m][2kp], x[m][2kp+1]; rows past M are zeros
  const int64_t Mp = (M + 15) / 16 * 16, K2 = K / 2;
  std::vector<uint32_t> Bv(K2 * Mp + 16);
  uint32_t* B = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(Bv.data()) + 63) & ~uintptr_t(63));
  const auto* xd = reinterpret_cast<const uint32_t*>(x.data_ptr<c10::BFloat16>());
  at::parallel_for(0, K2 / 16, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t kb = k0; kb < k1; ++kb)
      for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = m0 + i < M ? _mm512_loadu_si512(xd + (m0 + i) * K2 + kb * 16) : _mm512_setzero_si512();
        transpose16(r);
        for (int j = 0; j < 16; ++j) _mm512_store_si512(B + (kb * 16 + j) * Mp + m0, r[j]);
      }
  });
  const auto* q = static_cast<const uint8_t*>(qs.data_ptr());
  const c10::Half* dp = kind == 1 || kind == 2 ? d.data_ptr<c10::Half>() : nullptr;
  const int64_t rb = kind == 0 ? 2 * K : qwen35_qc::row_bytes(kind, K), nbk = K / 32;
  auto* yb = out_fp32 ? nullptr : y.data_ptr<c10::BFloat16>();
  auto* yf = out_fp32 ? y.data_ptr<float>() : nullptr;
  at::parallel_for(0, (N + PN - 1) / PN, 1, [&](int64_t p0, int64_t p1) {
    std::vector<c10::BFloat16> Av(PN * K + 32);
    std::vector<float> Cv(PN * Mp + 16);
    auto* A = reinterpret_cast<c10::BFloat16*>((reinterpret_cast<uintptr_t>(Av.data()) + 63) & ~uintptr_t(63));
    float* C = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(Cv.data()) + 63) & ~uintptr_t(63));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * PN, rows = std::min(PN, N - n0), rows16 = (rows + 15) / 16 * 16;
      // kind 0 (bf16 weights): a whole panel is read where it lies, only a short last one is copied and padded
      const bool in_place = kind == 0 && rows == rows16;
      for (int64_t r = 0; r < rows16 && !in_place; ++r) {
        c10::BFloat16* a = A + r * K;
        if (r >= rows)
          std::fill(a, a + K, c10::BFloat16(0.f));
        else if (kind == 0)
          std::copy_n(reinterpret_cast<const c10::BFloat16*>(q + (n0 + r) * rb), K, a);
        else if (kind <= 2)
          qwen35_quant::dequant_row_bf16(kind, q + (n0 + r) * rb, dp + (n0 + r) * nbk, K, a);
        else
          qwen35_quant::dequant_k_row_bf16(kind, q + (n0 + r) * rb, K, a);
      }
      const c10::BFloat16* Ap = in_place ? reinterpret_cast<const c10::BFloat16*>(q + n0 * rb) : A;
      at::native::cpublas::brgemm(rows16, Mp, K, K, Mp, Mp, false, Ap, reinterpret_cast<const c10::BFloat16*>(B), C, true);
      // C [rows16, Mp] (weight row, input row) -> y[m, n0 + i], 16x16 at a time
      for (int64_t i0 = 0; i0 < rows; i0 += 16) {
        const int64_t cnt = std::min<int64_t>(16, rows - i0);
        const __mmask16 mk = cnt == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cnt) - 1);
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
          __m512i r[16];
          for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(C + (i0 + i) * Mp + m0);
          transpose16(r);
          for (int j = 0; j < 16 && m0 + j < M; ++j) {
            const __m512 v = _mm512_castsi512_ps(r[j]);
            if (out_fp32)
              _mm512_mask_storeu_ps(yf + (m0 + j) * N + n0 + i0, mk, v);
            else
              _mm256_mask_storeu_epi16(yb + (m0 + j) * N + n0 + i0, mk, (__m256i)_mm512_cvtneps_pbh(v));
          }
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  return y;
}

bool panels_supported() { return at::native::cpublas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("gemm_panels(Tensor x, Tensor qs, Tensor d, int kind, bool out_fp32) -> Tensor");
  m.def("panels_supported() -> bool");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) { m.impl("gemm_panels", &gemm_panels); }
TORCH_LIBRARY_IMPL(qwen35, CompositeExplicitAutograd, m) { m.impl("panels_supported", &panels_supported); }
