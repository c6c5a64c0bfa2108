// Kernels on block-quantized weights (qwen35/quant/formats.py: GGUF's q8_0 and q4_0 values, fp16 scales
// d [N, K/32] in their own array), registered beside cpu_kernels.cpp's under torch.ops.qwen35.
//
// gemv_q8_0 / gemv_q4_0: out[M, N] = x[M, K] . W^T for the few rows M (<= 8) of a decode step, reading the
// packed weights once and never expanding them in memory. The input rows are quantized on the fly per
// block of 32 (q8_0-style: scale max|x|/127, round half away from zero), exactly as
// quant/formats.reference_matmul does, and each block's dot product is one AVX512-VNNI vpdpbusd
// (unsigned x signed bytes -> int32, exact). vpdpbusd wants one unsigned operand, so the weights are made
// unsigned: q8_0 bytes XOR 0x80 (= q + 128), q4_0 nibbles are 0..15 already (= q + 8); the offset times the
// block's sum of quantized inputs is subtracted once per block. Per block: dw * dx * (dot - offset * sum).
//
// dequant_bf16: W as bf16 [N, K] (prefill: the caller dequantizes a band of rows and runs a bf16 GEMM).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "quant_common.h"
#include "quantizers.h"

namespace {

using namespace qwen35_qc;

// Input rows quantized per block: xq int8 [M, nbp*32], dx fp32 [M, nbp], sx fp32 [M, nbp] (block sums of
// xq, exact in fp32), padded with zero blocks up to nbp (a multiple of 16) so that the kernels' groups of
// 16 blocks never read past a row.
struct QuantRows {
  int8_t* xq;
  float* dx;
  float* sx;
  int8_t* xlo;  // q4_0 only: each block's elements 0-15 and 16-31, the halves its nibbles hold
  int8_t* xhi;
  int64_t nb, nbp;
};

// Per-call scratch, reused: allocating (and zeroing) tensors for it cost ~15 us a call, a third of a small
// projection's GEMV. Calls come from one thread at a time per engine; thread_local keeps two engines apart.
struct Scratch {
  std::vector<int8_t> bytes;
  std::vector<float> floats;
};
thread_local Scratch scratch;

template <typename T>
QuantRows quantize_rows(const T* x, int64_t M, int64_t K, bool split) {
  const int64_t nb = K / QB, nbp = (nb + 15) / 16 * 16;
  const size_t nx = static_cast<size_t>(M * nbp * QB);
  scratch.bytes.assign(split ? 2 * nx : nx, 0);
  scratch.floats.assign(static_cast<size_t>(2 * M * nbp), 0.f);
  QuantRows r{scratch.bytes.data(), scratch.floats.data(), scratch.floats.data() + M * nbp, nullptr, nullptr, nb, nbp};
  int8_t* xq = r.xq;
  float* dx = r.dx;
  float* sx = r.sx;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const Block32 blk = quantize_block32(x + m * K + b * QB);
      const float d = blk.d;
      const __m512i q0 = blk.q0, q1 = blk.q1;
      int8_t* dst = xq + m * nbp * QB + b * QB;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(q1));
      dx[m * nbp + b] = d;
      sx[m * nbp + b] = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
  if (split) {  // q4_0: the halves side by side, [M, nbp*16] each, in the same (already zeroed) buffer
    int8_t* lo = scratch.bytes.data() + nx;
    int8_t* hi = lo + nx / 2;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nbp; ++b)
        for (int64_t j = 0; j < 16; ++j) {
          lo[m * nbp * 16 + b * 16 + j] = xq[m * nbp * QB + b * QB + j];
          hi[m * nbp * 16 + b * 16 + j] = xq[m * nbp * QB + b * QB + 16 + j];
        }
    r.xlo = lo;
    r.xhi = hi;
  }
  return r;
}

QuantRows quantize_input(const at::Tensor& x, bool split) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quantized gemv: x must be a contiguous [M, K] matrix");
  if (x.scalar_type() == at::kBFloat16) return quantize_rows(x.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), split);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quantized gemv: x must be bf16 or fp32");
  return quantize_rows(x.data_ptr<float>(), x.size(0), x.size(1), split);
}

// Built with -fPIC, gcc spills a loop that masks every load and picks scales from an array (measured 3x
// slower); whole groups therefore run an unmasked, fully unrolled loop and only a row's tail is masked.
// Scales are handled 16 blocks at a time: one fp16 load + conversion gives dw for 16 blocks, times the
// inputs' dx gives s16 (per input row), and each 64-byte chunk of weights picks its blocks' scales out of
// s16 with one permute. The offset correction is one FMA per 16 blocks.
inline __mmask16 first_n16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// The scales of 16 blocks (from block g; nblk of them are real) for every input row m: s16[m] = dw * dx,
// and the offset correction's running sum corr[m] += s16[m] * sx.
template <int M>
inline __attribute__((always_inline)) void group_scales(const c10::Half* dn, int64_t g, int64_t nblk,
                                                        const float* dx, const float* sx, int64_t nbp,
                                                        __m512* s16, __m512* corr) {
  const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_n16(nblk), dn + g));
  for (int m = 0; m < M; ++m) {
    s16[m] = _mm512_mul_ps(dw, _mm512_loadu_ps(dx + m * nbp + g));
    corr[m] = _mm512_fmadd_ps(s16[m], _mm512_loadu_ps(sx + m * nbp + g), corr[m]);
  }
}

template <int M>
void q8_rows(const int8_t* qs, const c10::Half* d, int64_t n0, int64_t n1, int64_t K, const QuantRows& r,
             const Out& out) {
  const int64_t nb = r.nb, nbp = r.nbp;
  const int8_t* xq = r.xq;
  const float* dx = r.dx;
  const float* sx = r.sx;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // chunk c of a group holds blocks 2c (lanes 0-7) and 2c+1 (lanes 8-15): their scales are s16[pair + 2c]
  const __m512i pair = _mm512_mask_blend_epi32(0xFF00, _mm512_setzero_si512(), _mm512_set1_epi32(1));
  const bool pf = gemv_prefetch();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = qs + n * K;
    const c10::Half* dn = d + n * nb;
    __m512 acc[M], corr[M];
    for (int m = 0; m < M; ++m) { acc[m] = _mm512_setzero_ps(); corr[m] = _mm512_setzero_ps(); }
    for (int64_t g = 0; g < nb; g += 16) {
      const int64_t nblk = std::min<int64_t>(16, nb - g);
      __m512 s16[M];
      group_scales<M>(dn, g, nblk, dx, sx, nbp, s16, corr);
      if (nblk == 16) {  // a whole group: unmasked and fully unrolled (what the compiler keeps in registers)
        if (pf)
          for (int l = 0; l < 8; ++l) _mm_prefetch(reinterpret_cast<const char*>(w + g * QB) + kGemvPrefetch + 64 * l, _MM_HINT_T0);
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {
          const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + (g + 2 * c) * QB), flip);
          const __m512i sel = _mm512_add_epi32(pair, _mm512_set1_epi32(2 * c));
          for (int m = 0; m < M; ++m) {
            const __m512i iv = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv,
                                                   _mm512_loadu_si512(xq + m * nbp * QB + (g + 2 * c) * QB));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv), _mm512_permutexvar_ps(sel, s16[m]), acc[m]);
          }
        }
        continue;
      }
      for (int64_t c = 0; c < (nblk + 1) / 2; ++c) {  // the row's last, partial group
        const int64_t b = g + 2 * c;
        const __mmask64 mask = b + 1 < nb ? ~__mmask64(0) : __mmask64(0xFFFFFFFFull);
        const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + b * QB), flip);
        const __m512i sel = _mm512_add_epi32(pair, _mm512_set1_epi32(static_cast<int>(2 * c)));
        for (int m = 0; m < M; ++m) {
          const __m512i iv = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv,
                                                 _mm512_loadu_si512(xq + m * nbp * QB + b * QB));
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv), _mm512_permutexvar_ps(sel, s16[m]), acc[m]);
        }
      }
    }
    for (int m = 0; m < M; ++m)
      out.store(m, n, _mm512_reduce_add_ps(acc[m]) - 128.f * _mm512_reduce_add_ps(corr[m]));
  }
}

template <int M>
void q4_rows(const uint8_t* qs, const c10::Half* d, int64_t n0, int64_t n1, int64_t K, const QuantRows& r,
             const int8_t* xlo, const int8_t* xhi, const Out& out) {
  const int64_t nb = r.nb, nbp = r.nbp, half = nbp * 16;
  const float* dx = r.dx;
  const float* sx = r.sx;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // chunk c of a group holds blocks 4c..4c+3, four lanes each: their scales are s16[quad + 4c]
  const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const bool pf = gemv_prefetch();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = qs + n * (K / 2);
    const c10::Half* dn = d + n * nb;
    __m512 acc[M], corr[M];
    for (int m = 0; m < M; ++m) { acc[m] = _mm512_setzero_ps(); corr[m] = _mm512_setzero_ps(); }
    for (int64_t g = 0; g < nb; g += 16) {
      const int64_t nblk = std::min<int64_t>(16, nb - g);
      __m512 s16[M];
      group_scales<M>(dn, g, nblk, dx, sx, nbp, s16, corr);
      const int64_t chunks = nblk == 16 ? 4 : (nblk + 3) / 4;
      if (pf)
        for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(w + g * 16) + kGemvPrefetch + 64 * l, _MM_HINT_T0);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t b = g + 4 * c, left = std::min<int64_t>(4, nb - b);
        const __m512i v = left == 4 ? _mm512_loadu_si512(w + b * 16)
                                    : _mm512_maskz_loadu_epi8((__mmask64(1) << (16 * left)) - 1, w + b * 16);
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        const __m512i sel = _mm512_add_epi32(quad, _mm512_set1_epi32(static_cast<int>(4 * c)));
        for (int m = 0; m < M; ++m) {
          __m512i iv = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xlo + m * half + b * 16));
          iv = _mm512_dpbusd_epi32(iv, hi, _mm512_loadu_si512(xhi + m * half + b * 16));
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv), _mm512_permutexvar_ps(sel, s16[m]), acc[m]);
        }
      }
    }
    for (int m = 0; m < M; ++m)
      out.store(m, n, _mm512_reduce_add_ps(acc[m]) - 8.f * _mm512_reduce_add_ps(corr[m]));
  }
}

void check_weights(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t bytes_per_block) {
  TORCH_CHECK(qs.dim() == 2 && d.dim() == 2 && qs.is_contiguous() && d.is_contiguous(), "quantized gemv: layout");
  TORCH_CHECK(d.scalar_type() == at::kHalf, "quantized gemv: scales must be fp16");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % QB == 0 && qs.size(1) == K / QB * bytes_per_block && d.size(1) == K / QB && d.size(0) == qs.size(0),
              "quantized gemv: x has ", K, " columns, weights ", qs.sizes(), " scales ", d.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "quantized gemv: 1 to 8 rows");
}

// out[m, n] for the M (<= 8) rows of x against quantized weights (qs, d): kind 1 = q8_0, 2 = q4_0.
void gemv_rows(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const Out& o) {
  TORCH_CHECK(kind == 1 || kind == 2, "quantized gemv: unknown kind ", kind);
  TORCH_CHECK(qs.scalar_type() == (kind == 1 ? at::kChar : at::kByte), "quantized gemv: qs must be ",
              kind == 1 ? "int8 (q8_0)" : "uint8 (q4_0)");
  check_weights(x, qs, d, kind == 1 ? QB : QB / 2);
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  const QuantRows r = quantize_input(x, kind == 2);
  const c10::Half* dp = d.data_ptr<c10::Half>();
  if (kind == 1) {
    const int8_t* q = qs.data_ptr<int8_t>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { QWEN35_DISPATCH_M(M, (q8_rows<R>(q, dp, n0, n1, K, r, o))); });
  } else {
    const uint8_t* q = qs.data_ptr<uint8_t>();
    const int8_t* lp = r.xlo;
    const int8_t* hp = r.xhi;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      QWEN35_DISPATCH_M(M, (q4_rows<R>(q, dp, n0, n1, K, r, lp, hp, o)));
    });
  }
}

at::Tensor gemv_kind(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, bool out_fp32) {
  at::Tensor out = at::empty({x.size(0), qs.size(0)}, x.options().dtype(out_fp32 ? at::kFloat : x.scalar_type()));
  gemv_rows(kind, x, qs, d, Out(out));
  return out;
}

at::Tensor gemv_q8_0(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, bool out_fp32) {
  return gemv_kind(1, x, qs, d, out_fp32);
}

at::Tensor gemv_q4_0(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, bool out_fp32) {
  return gemv_kind(2, x, qs, d, out_fp32);
}

// One row of nb blocks as bf16: bits 8 -> q8_0 (q int8), 4 -> q4_0 (GGUF nibble order). Per block: its scale
// picked out of 16 converted at once (a scalar fp16 conversion per block cost as much as the block's vector
// work), both halves widened and scaled, one 64-byte store of 32 bf16.
void dequant_row(int64_t bits, const uint8_t* row, const c10::Half* d, int64_t nb, c10::BFloat16* out) {
  alignas(64) float sc[16];
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t nb16 = std::min<int64_t>(16, nb - b0);
    const __mmask16 mk = nb16 == 16 ? 0xFFFF : static_cast<__mmask16>((1u << nb16) - 1);
    _mm512_store_ps(sc, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, d + b0)));
    for (int64_t j = 0; j < nb16; ++j) {
      const int64_t b = b0 + j;
      const __m512 s = _mm512_set1_ps(sc[j]);
      __m512i q0, q1;  // 16 int32 each: elements 0-15 and 16-31 of the block
      if (bits == 8) {
        const auto* q = reinterpret_cast<const int8_t*>(row) + b * QB;
        q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
      } else {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
        const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
        q0 = _mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(v, m4), eight));
        q1 = _mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m4), eight));
      }
      _mm512_storeu_si512(out + b * QB, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(q1), s),
                                                                    _mm512_mul_ps(_mm512_cvtepi32_ps(q0), s)));
    }
  }
}

// W [N, K] as bf16 into out (contiguous [N, K], e.g. a row block of a stacked matrix): bits 8 -> q8_0, 4 -> q4_0.
void dequant_bf16_out(const at::Tensor& qs, const at::Tensor& d, int64_t bits, at::Tensor& out) {
  TORCH_CHECK(qs.is_contiguous() && d.is_contiguous() && d.scalar_type() == at::kHalf, "dequant_bf16: layout");
  TORCH_CHECK(bits == 8 || bits == 4, "dequant_bf16: bits must be 8 or 4");
  const int64_t N = qs.size(0), nb = d.size(1), K = nb * QB;
  TORCH_CHECK(qs.size(1) == (bits == 8 ? K : K / 2) && d.size(0) == N, "dequant_bf16: weights ", qs.sizes(),
              " do not match scales ", d.sizes());
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
              out.size(1) == K, "dequant_bf16: out must be contiguous bf16 [", N, ", ", K, "], got ", out.sizes());
  auto* op = out.data_ptr<c10::BFloat16>();
  const c10::Half* dp = d.data_ptr<c10::Half>();
  const auto* q = static_cast<const uint8_t*>(qs.data_ptr());
  const int64_t rb = row_bytes(bits == 8 ? 1 : 2, K);
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequant_row(bits, q + n * rb, dp + n * nb, nb, op + n * K);
  });
}

at::Tensor dequant_bf16(const at::Tensor& qs, const at::Tensor& d, int64_t bits) {
  at::Tensor out = at::empty({qs.size(0), d.size(1) * QB}, qs.options().dtype(at::kBFloat16));
  dequant_bf16_out(qs, d, bits, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_weights(const at::Tensor& w, int64_t bits) {
  return qfit::quantize_weights_tensor(w, bits);
}

bool vnni_supported() { return __builtin_cpu_supports("avx512vnni"); }

}  // namespace

// For the whole-layer decode kernels (cpu_kernels.cpp): one part of a projection, written as bf16 into the
// columns out[m * ldo + n], without a trip through the dispatcher.
namespace qwen35_quant {
void gemv_into(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, c10::BFloat16* out,
               int64_t ldo) {
  gemv_rows(kind, x, qs, d, Out(out, ldo));
}
// For the panel GEMM (amx_panels.cpp): one weight row dequantized to bf16 (kind 1 = q8_0, 2 = q4_0)
void dequant_row_bf16(int64_t kind, const uint8_t* row, const c10::Half* d, int64_t K, c10::BFloat16* out) {
  dequant_row(kind == 1 ? 8 : 4, row, d, K / QB, out);
}
}  // namespace qwen35_quant

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("gemv_q8_0(Tensor x, Tensor qs, Tensor d, bool out_fp32) -> Tensor");
  m.def("gemv_q4_0(Tensor x, Tensor qs, Tensor d, bool out_fp32) -> Tensor");
  m.def("dequant_bf16(Tensor qs, Tensor d, int bits) -> Tensor");
  m.def("dequant_bf16_out(Tensor qs, Tensor d, int bits, Tensor(a!) out) -> ()");
  m.def("vnni_supported() -> bool");
  m.def("quantize_weights(Tensor w, int bits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) {
  m.impl("gemv_q8_0", &gemv_q8_0);
  m.impl("gemv_q4_0", &gemv_q4_0);
  m.impl("dequant_bf16", &dequant_bf16);
  m.impl("dequant_bf16_out", &dequant_bf16_out);
  m.impl("quantize_weights", &quantize_weights);
}

TORCH_LIBRARY_IMPL(qwen35, CompositeExplicitAutograd, m) { m.impl("vnni_supported", &vnni_supported); }
