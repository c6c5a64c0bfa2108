// Kernels on GGUF's K-quant layouts (qwen35/quant/kquants.py: Q4_K and Q6_K block bytes verbatim, super-blocks
// of 256 weights), registered beside quant_kernels.cpp's under torch.ops.qwen35. Layout codes: 3 = q4_k, 4 = q6_k.
//
// gemv_q4_k / gemv_q6_k: out[M, N] = x[M, K] . W^T for the few rows M (<= 8) of a decode step, reading each
// weight byte once. The input rows are quantized on the fly per block of 32 exactly as quant_kernels.cpp does
// it (scale max|x|/127, round half away from zero: formats.reference_matmul's rule), and the products are
// AVX512-VNNI vpdpbusd (unsigned weights x signed inputs, exact int32 sums):
// - q4_k: a sub-block of 32 is d*sc*q - dmin*m with q in 0..15, so its dot product with an input block is
//   dx * (d*sc * sum(q*xq) - dmin*m * sum(xq)). The two 64-byte loads of a super-block's nibbles have their
//   qwords permuted (vpermt2q) so that every sub-block spreads over all four nibble vectors, 2 lanes of 4 bytes
//   in each: the four vpdpbusd then chain into two accumulators (low nibbles: sub-blocks 0,2,4,6; high: 1,3,5,7),
//   one lane shuffle merges them, and one conversion and one FMA a super-block apply every scale. The high
//   nibbles are used in place (16 q: no shift; the 1/16 is in the input scales). The mins ride in the same
//   vector: of the 2 lanes of a sub-block, one holds sum(q*xq), the other -sum(xq) (an input-side constant)
//   times dmin*m. The inputs are laid out per super-block in the matching order once per call
//   (k4_position). On Zen 4 this is 1.16x the former kernel's rate with the weights in L2 (it had converted and
//   scaled each of the 4 vectors apart, a lane permute each: the shuffle and multiply pipes both full).
// - q6_k: a sub-block of 16 is d*sc*(q - 32) with q in 0..63 (4 low bits from ql, 2 from qh). Each 64-byte
//   chunk of 6-bit values holds 4 sub-blocks, one per 128-bit lane; two chunks interleaved by qwords
//   (vpunpck[lh]qdq) keep one sub-block per 4-byte lane over both, so the four vpdpbusd chain into two
//   accumulators, which one pairwise add and one blend merge into 16 lanes of 16 sub-blocks: one conversion
//   and one FMA a super-block (the former kernel scaled each chunk apart, a lane permute each: Zen 4, weights
//   in L2, 1.08x with one input row, 1.17x two, 1.27x four). The -32 offset is folded into the integer sums:
//   the chains start from -32 * (sum of the inputs each lane meets), laid out with the inputs once per call.
// quantize_k: W (bf16 / fp32) -> K-quant bytes, the same algorithm and fp32 operations, in the same order, as
//   kquants.quantize_q4_k / quantize_q6_k; 16 sub-blocks run side by side, one per vector lane, so each
//   lane's arithmetic is exactly the scalar sequence (tested byte for byte against the torch reference).
// dequant_k_bf16: W as bf16 [N, K] (prefill: the caller dequantizes a band of rows for a bf16 GEMM).
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
#include <cstring>
#include <vector>

#include "fp_contract.h"
#include "quantizers.h"
#include "quant_common.h"

namespace {

using namespace qwen35_qc;

constexpr int64_t QK = 256;  // weights per super-block
constexpr int64_t Q4K = 144, Q6K = 210;  // bytes per super-block

// Input rows quantized per block of 32, laid out for each kernel: xq int8 [M, K] (q4_k: k4_position order, q6_k:
// k6_position), and per super-block 16 lanes in the kernel's lane order: the block scales dx16 (fp32; K4_LANE_BLOCK,
// K6_LANE_SUB), for q4_k bs16 (int32: the mins' -sum of the block's inputs), for q6_k xc (2 x 16 int32: -32 * the
// inputs each lane meets).
struct Rows {
  int8_t* xq;
  float* dx16;
  int32_t* bs16;
  int32_t* xc;
};
struct Scratch {
  std::vector<int8_t> bytes;
  std::vector<float> floats;
  std::vector<int32_t> ints;
};
thread_local Scratch scratch;


// q4_k's kernel: input element e of sub-block j of a super-block sits at byte k4_position(j, e) of its 256, the
// order of the permuted nibble vectors (q4k_rows): low-nibble sub-blocks (even j) in bytes 0-127, high in
// 128-255; within each, elements 0-15 then 16-31 (64 bytes each), within those elements 0-7 then 8-15 (32
// bytes), within those the 4 sub-blocks of that parity, 8 bytes each.
constexpr int64_t k4_position(int64_t j, int64_t e) {
  return (j % 2) * 128 + (e / 16) * 64 + ((e % 16) / 8) * 32 + (j / 2) * 8 + e % 8;
}
// The sub-block whose sum lane l (0-15) of q4k_rows' merged vector holds: lane pairs (sum, mins) per sub-block
constexpr int K4_LANE_BLOCK[16] = {0, 0, 2, 2, 4, 4, 6, 6, 1, 1, 3, 3, 5, 5, 7, 7};
// q6_k's kernel: input element e (0-255) of a super-block at byte k6_position(e): chunk c = e / 64 of the
// 6-bit values, paired with its neighbour (c / 2) and interleaved by qwords (first halves of each 16, then
// second halves; 128-bit lane q = sub-block 4c + q).
constexpr int64_t k6_position(int64_t e) {
  const int64_t c = e / 64;
  return (c / 2) * 128 + ((e % 16) / 8) * 64 + ((e % 64) / 16) * 16 + (c % 2) * 8 + e % 8;
}
// The sub-block (of 16) whose sum lane l of q6k_rows' merged vector holds
constexpr int K6_LANE_SUB[16] = {0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15};

template <typename T>
Rows quantize_rows(const T* x, int64_t M, int64_t K, int64_t kind) {
  const int64_t nb = K / QB, ns = K / QK;
  scratch.bytes.resize(static_cast<size_t>(M * K));
  scratch.floats.resize(static_cast<size_t>(16 * M * ns));
  scratch.ints.resize(static_cast<size_t>((kind == 3 ? 16 : 32) * M * ns));
  Rows r{scratch.bytes.data(), scratch.floats.data(), nullptr, nullptr};
  (kind == 3 ? r.bs16 : r.xc) = scratch.ints.data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const Block32 blk = quantize_block32(x + m * K + b * QB);
      const float d = blk.d;
      const int64_t s = b / 8, j = b % 8, l16 = (m * ns + s) * 16;
      // 8-byte runs of the block's 32 values (elements 0-7, 8-15, 16-23, 24-31) to their kernel positions
      const __m128i b0 = _mm512_cvtepi32_epi8(blk.q0), b1 = _mm512_cvtepi32_epi8(blk.q1);
      const __m128i run[4] = {b0, _mm_unpackhi_epi64(b0, b0), b1, _mm_unpackhi_epi64(b1, b1)};
      int8_t* dst = r.xq + m * K + s * QK;
      for (int t = 0; t < 4; ++t)
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (kind == 3 ? k4_position(j, 8 * t) : k6_position(32 * j + 8 * t))), run[t]);
      const int32_t sum = kind == 3 ? _mm512_reduce_add_epi32(_mm512_add_epi32(blk.q0, blk.q1)) : 0;  // q4_k's mins
      for (int l = 0; l < 16; ++l) {
        if (kind == 3 && K4_LANE_BLOCK[l] == j) {
          // the high nibbles' sums are 16x (used in place): their lanes take dx / 16 (exact) and -16 * sum
          r.dx16[l16 + l] = j % 2 ? d * 0.0625f : d;
          r.bs16[l16 + l] = l % 2 ? -sum * (j % 2 ? 16 : 1) : 0;
        } else if (kind == 4 && K6_LANE_SUB[l] / 2 == j) {
          r.dx16[l16 + l] = d;
        }
      }
    }
  if (kind == 4) {  // each lane's chain meets 8 inputs, 4 in each of its super-block half's two vectors
    const __m512i m32 = _mm512_set1_epi8(32);
    for (int64_t i = 0; i < M * ns * 2; ++i) {
      const int8_t* v = r.xq + i * 128;
      const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), m32, _mm512_loadu_si512(v)), m32,
                                            _mm512_loadu_si512(v + 64));
      _mm512_storeu_si512(r.xc + i * 16, _mm512_sub_epi32(_mm512_setzero_si512(), s));
    }
  }
  return r;
}

Rows quantize_input(const at::Tensor& x, int64_t kind) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "K-quant gemv: x must be a contiguous [M, K] matrix");
  if (x.scalar_type() == at::kBFloat16) return quantize_rows(x.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), kind);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "K-quant gemv: x must be bf16 or fp32");
  return quantize_rows(x.data_ptr<float>(), x.size(0), x.size(1), kind);
}

// Software prefetch this many bytes ahead of the weights being read: the super-blocks' 144 / 210 bytes straddle
// cache lines, and without it the 1-thread head GEMV read ~20% slower than q4_0's aligned streams. (On Zen 4
// too, unlike the bf16 / q8_0 / q4_0 GEMVs: cold q6_k on one thread 17.9 against 17.0 GB/s without.)
constexpr int64_t PREFETCH = 2048;
// The loop's prefetches run PREFETCH ahead of what it reads, so a range's first PREFETCH bytes would arrive one
// demand miss at a time: asked for all at once when a thread starts its rows (~190 matrices a decode step).
inline void prefetch_start(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < std::min(bytes, PREFETCH); o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}
template <int M>
void q4k_rows(const uint8_t* qs, int64_t n0, int64_t n1, int64_t K, const Rows& r, const Out& out) {
  const int64_t ns = K / QK;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // qwords of (nibbles 0-63, 64-127): vector u01 = elements 0-15 of every sub-block pair, u23 = elements 16-31
  const __m512i idx01 = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13), idx23 = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
  // (sc0-3, mn0-3, sc4-7, mn4-7) -> lanes (sc, mn) of sub-blocks in K4_LANE_BLOCK order; [d, dmin] alternating
  const __m128i scmn_order = _mm_setr_epi8(0, 4, 2, 6, 8, 12, 10, 14, 1, 5, 3, 7, 9, 13, 11, 15);
  const __m512i d_dmin = _mm512_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1);
  prefetch_start(qs + n0 * ns * Q4K, (n1 - n0) * ns * Q4K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = qs + n * ns * Q4K;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
      const uint8_t* b = w + s * Q4K;
      _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH + 128), _MM_HINT_T0);
      int32_t dm2;
      std::memcpy(&dm2, b, 4);
      const __m512 dd = _mm512_permutexvar_ps(d_dmin, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(dm2))));
      const __m512 scmn = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(q4k_scales_mins_raw(b + 4), scmn_order))));
      const __m512i v0 = _mm512_loadu_si512(b + 16), v1 = _mm512_loadu_si512(b + 80);
      const __m512i u01 = _mm512_permutex2var_epi64(v0, idx01, v1), u23 = _mm512_permutex2var_epi64(v0, idx23, v1);
      const __m512i l01 = _mm512_and_si512(u01, low4), h01 = _mm512_andnot_si512(low4, u01);
      const __m512i l23 = _mm512_and_si512(u23, low4), h23 = _mm512_andnot_si512(low4, u23);
      for (int m = 0; m < M; ++m) {
        const int8_t* xm = r.xq + m * K + s * QK;
        const int64_t l16 = (m * ns + s) * 16;
        // lanes [0,0,2,2,4,4,6,6 | 0,0,...] (elements 0-15 of the even sub-blocks, then 16-31) and odd alike
        const __m512i lo = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), l01, _mm512_loadu_si512(xm)),
                                               l23, _mm512_loadu_si512(xm + 64));
        const __m512i hi = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), h01, _mm512_loadu_si512(xm + 128)),
                                               h23, _mm512_loadu_si512(xm + 192));
        // K4_LANE_BLOCK order, each sub-block's sum split over its 2 lanes; then the whole sum in both, and
        // the mins' input constant loaded over the second
        const __m512i c = _mm512_add_epi32(_mm512_shuffle_i64x2(lo, hi, 0x44), _mm512_shuffle_i64x2(lo, hi, 0xEE));
        const __m512i t = _mm512_mask_loadu_epi32(_mm512_add_epi32(c, _mm512_shuffle_epi32(c, _MM_PERM_CDAB)), 0xAAAA,
                                                  r.bs16 + l16);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(scmn, _mm512_loadu_ps(r.dx16 + l16)), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) out.store(m, n, _mm512_reduce_add_ps(acc[m]));
  }
}

template <int M>
void q6k_rows(const uint8_t* qs, int64_t n0, int64_t n1, int64_t K, const Rows& r, const Out& out) {
  const int64_t ns = K / QK;
  const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
  const __m128i sc_order = _mm_setr_epi8(0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15);  // K6_LANE_SUB
  prefetch_start(qs + n0 * ns * Q6K, (n1 - n0) * ns * Q6K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = qs + n * ns * Q6K;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ns; ++s) {
      const uint8_t* b = w + s * Q6K;
      for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH + 64 * l), _MM_HINT_T0);
      const __m128i sc8 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)), sc_order);
      const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(half_at(b + 208)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc8)));
      __m512i ch[4];  // the 6-bit values of elements 64c .. 64c+63
      for (int h = 0; h < 2; ++h) {
        const __m512i v = _mm512_loadu_si512(b + 64 * h);
        const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
        const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(hb), _mm256_srli_epi16(hb, 2), 1);
        ch[2 * h] = _mm512_or_si512(_mm512_and_si512(v, low4), _mm512_and_si512(_mm512_slli_epi16(hh, 4), bits45));
        ch[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), _mm512_and_si512(hh, bits45));
      }
      // 128-bit lane q: [sub-block q of chunk 2p: first 8, of chunk 2p+1: first 8], then the second 8s
      const __m512i p0 = _mm512_unpacklo_epi64(ch[0], ch[1]), p1 = _mm512_unpackhi_epi64(ch[0], ch[1]);
      const __m512i p2 = _mm512_unpacklo_epi64(ch[2], ch[3]), p3 = _mm512_unpackhi_epi64(ch[2], ch[3]);
      for (int m = 0; m < M; ++m) {
        const int8_t* xm = r.xq + m * K + s * QK;
        const int32_t* cm = r.xc + (m * ns + s) * 32;
        // lanes [q, q, 4+q, 4+q] and [8+q, 8+q, 12+q, 12+q] (sub-blocks, per 128-bit lane q) ...
        __m512i a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_loadu_si512(cm), p0, _mm512_loadu_si512(xm)), p1,
                                        _mm512_loadu_si512(xm + 64));
        __m512i c = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_loadu_si512(cm + 16), p2, _mm512_loadu_si512(xm + 128)),
                                        p3, _mm512_loadu_si512(xm + 192));
        // ... each pair summed, one lane of each kept: K6_LANE_SUB order
        a = _mm512_add_epi32(a, _mm512_shuffle_epi32(a, _MM_PERM_CDAB));
        c = _mm512_add_epi32(c, _mm512_shuffle_epi32(c, _MM_PERM_CDAB));
        const __m512 S = _mm512_mul_ps(sc, _mm512_loadu_ps(r.dx16 + (m * ns + s) * 16));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_mask_blend_epi32(0xAAAA, a, c)), S, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) out.store(m, n, _mm512_reduce_add_ps(acc[m]));
  }
}

int64_t block_bytes(int64_t kind) {
  TORCH_CHECK(kind == 3 || kind == 4, "K-quant kernels: kind must be 3 (q4_k) or 4 (q6_k), got ", kind);
  return kind == 3 ? Q4K : Q6K;
}

void check_weights(int64_t kind, const at::Tensor& x, const at::Tensor& qs) {
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.scalar_type() == at::kByte, "K-quant gemv: qs must be contiguous uint8 [N, bytes]");
  const int64_t K = x.size(1);
  TORCH_CHECK(x.dim() == 2 && K % QK == 0 && qs.size(1) == K / QK * block_bytes(kind),
              "K-quant gemv: x has ", K, " columns, weights ", qs.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "K-quant gemv: 1 to 8 rows");
}

void gemv_k(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const Out& o) {
  check_weights(kind, x, qs);
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  const Rows r = quantize_input(x, kind);
  const uint8_t* q = qs.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (kind == 3) {
      QWEN35_DISPATCH_M(M, (q4k_rows<R>(q, n0, n1, K, r, o)));
    } else {
      QWEN35_DISPATCH_M(M, (q6k_rows<R>(q, n0, n1, K, r, o)));
    }
  });
}

at::Tensor gemv_k_tensor(int64_t kind, const at::Tensor& x, const at::Tensor& qs, bool out_fp32) {
  at::Tensor out = at::empty({x.size(0), qs.size(0)}, x.options().dtype(out_fp32 ? at::kFloat : x.scalar_type()));
  Out o;
  o.ld = qs.size(0);
  if (out.scalar_type() == at::kFloat) o.f = out.data_ptr<float>(); else o.h = out.data_ptr<c10::BFloat16>();
  gemv_k(kind, x, qs, o);
  return out;
}

// d is the layout's empty [N, 0] scale array (the scales live in qs's blocks): accepted for a uniform signature.
at::Tensor gemv_q4_k(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, bool out_fp32) {
  return gemv_k_tensor(3, x, qs, out_fp32);
}
at::Tensor gemv_q6_k(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, bool out_fp32) {
  return gemv_k_tensor(4, x, qs, out_fp32);
}

// 32 fp32 values (lo: elements 0-15, hi: 16-31) as 32 bf16 at o, rounded to nearest even: one 64-byte store
inline void store_bf16x32(c10::BFloat16* o, __m512 lo, __m512 hi) {
  _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// One super-block of QK values straight to bf16 (no fp32 round trip through memory: that cost as much as the
// unpacking). fp-contract off: d*sc*q - dmin*m must round as kquants.dequantize_* does (no FMA), so bf16 is the same.
QWEN35_CONTRACT(off) void dequant_superblock_bf16(int64_t kind, const uint8_t* b, c10::BFloat16* o) {
  QWEN35_CONTRACT_BODY(off)
  if (kind == 3) {
    const float d = half_at(b), dmin = half_at(b + 2);
    uint8_t sm[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(sm), q4k_scales_mins(b + 4));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int k = 0; k < 8; ++k) {  // sm is in kernel order: position k is sub-block Q4K_ORDER[k]
      const int j = Q4K_ORDER[k];
      const float dj = d * static_cast<float>(sm[k]), mj = dmin * static_cast<float>(sm[8 + k]);
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + (j / 2) * 32));
      const __m256i q = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw, 4) : raw, low4);
      // dj * q - mj in two roundings (a multiply, then a subtract: no FMA), as the reference computes it
      const __m512 vd = _mm512_set1_ps(dj), vm = _mm512_set1_ps(mj);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1)));
      store_bf16x32(o + j * 32, _mm512_sub_ps(_mm512_mul_ps(vd, lo), vm), _mm512_sub_ps(_mm512_mul_ps(vd, hi), vm));
    }
  } else {
    const float d = half_at(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
      // 32 lanes l at once: value g*32 + l of this half is (4 low bits from ql, 2 high bits from qh) - 32
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
      const __m256i top[4] = {_mm256_and_si256(qh, two), _mm256_and_si256(_mm256_srli_epi16(qh, 2), two),
                              _mm256_and_si256(_mm256_srli_epi16(qh, 4), two), _mm256_and_si256(_mm256_srli_epi16(qh, 6), two)};
      const __m256i bottom[4] = {_mm256_and_si256(lo, low4), _mm256_and_si256(hi, low4),
                                 _mm256_and_si256(_mm256_srli_epi16(lo, 4), low4), _mm256_and_si256(_mm256_srli_epi16(hi, 4), low4)};
      for (int g = 0; g < 4; ++g) {
        // bytes 0..63 - 32, then sign-extended: the q - 32 of the scalar form
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(bottom[g], _mm256_slli_epi16(top[g], 4)), off);
        const int e = h * 128 + g * 32;
        // (d * sc) * (q - 32), two roundings in that order, as the scalar reference computes it
        const __m512 t0 = _mm512_set1_ps(d * static_cast<float>(sc[e / 16]));
        const __m512 t1 = _mm512_set1_ps(d * static_cast<float>(sc[e / 16 + 1]));
        const __m512 v0 = _mm512_mul_ps(t0, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))));
        const __m512 v1 = _mm512_mul_ps(t1, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))));
        store_bf16x32(o + e, v0, v1);
      }
    }
  }
}

// W [N, K] as bf16 into out (contiguous [N, K], e.g. a row block of a stacked matrix)
void dequant_k_bf16_out(const at::Tensor& qs, int64_t kind, at::Tensor& out) {
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.scalar_type() == at::kByte, "dequant_k_bf16: layout");
  const int64_t bb = block_bytes(kind), N = qs.size(0);
  TORCH_CHECK(qs.size(1) % bb == 0, "dequant_k_bf16: ", qs.size(1), " bytes per row is not whole blocks");
  const int64_t ns = qs.size(1) / bb, K = ns * QK;
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
              out.size(1) == K, "dequant_k_bf16: out must be contiguous bf16 [", N, ", ", K, "], got ", out.sizes());
  auto* op = out.data_ptr<c10::BFloat16>();
  const uint8_t* q = qs.data_ptr<uint8_t>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t s = 0; s < ns; ++s) dequant_superblock_bf16(kind, q + (n * ns + s) * bb, op + n * K + s * QK);
  });
}

at::Tensor dequant_k_bf16(const at::Tensor& qs, int64_t kind) {
  TORCH_CHECK(qs.dim() == 2 && qs.size(1) % block_bytes(kind) == 0, "dequant_k_bf16: ", qs.sizes(),
              " is not rows of whole blocks");
  at::Tensor out = at::empty({qs.size(0), qs.size(1) / block_bytes(kind) * QK}, qs.options().dtype(at::kBFloat16));
  dequant_k_bf16_out(qs, kind, out);
  return out;
}

at::Tensor quantize_k(const at::Tensor& w, int64_t kind) { return qfit::quantize_k_tensor(w, kind); }

}  // namespace

namespace qwen35_quant {
// For the whole-layer decode kernels: out[m * ldo + n] (bf16) = x[M, K] . W^T, W in K-quant layout `kind`
// (3 = q4_k, 4 = q6_k); x bf16 [M, K] contiguous, M <= 8; d is the layout's empty scale array (unused).
void gemv_k_into(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, c10::BFloat16* out,
                 int64_t ldo) {
  Out o;
  o.h = out;
  o.ld = ldo;
  gemv_k(kind, x, qs, o);
}
// For the panel GEMM (amx_panels.cpp): one weight row of K values dequantized to bf16 (3 = q4_k, 4 = q6_k)
void dequant_k_row_bf16(int64_t kind, const uint8_t* row, int64_t K, c10::BFloat16* out) {
  const int64_t bb = block_bytes(kind);
  for (int64_t s = 0; s < K / QK; ++s) dequant_superblock_bf16(kind, row + s * bb, out + s * QK);
}
}  // namespace qwen35_quant

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("gemv_q4_k(Tensor x, Tensor qs, Tensor d, bool out_fp32) -> Tensor");
  m.def("gemv_q6_k(Tensor x, Tensor qs, Tensor d, bool out_fp32) -> Tensor");
  m.def("dequant_k_bf16(Tensor qs, int kind) -> Tensor");
  m.def("dequant_k_bf16_out(Tensor qs, int kind, Tensor(a!) out) -> ()");
  m.def("quantize_k(Tensor w, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) {
  m.impl("gemv_q4_k", &gemv_q4_k);
  m.impl("gemv_q6_k", &gemv_q6_k);
  m.impl("dequant_k_bf16", &dequant_k_bf16);
  m.impl("dequant_k_bf16_out", &dequant_k_bf16_out);
  m.impl("quantize_k", &quantize_k);
}
