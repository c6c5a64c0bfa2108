// gemm_quant: prefill (many rows) on the packed weights with AVX512-VNNI integer dot products, for CPUs whose
// bf16 GEMM has no AMX tiles (Zen 4, Ice Lake, Cooper Lake: oneDNN runs vdpbf16ps there). What it computes is
// formats.reference_matmul, the decode GEMVs' rule: the input rows quantized per block of 32 (max|x|/127,
// round half away from zero), times the dequantized weights, in fp32; the integer sums are exact, so only the
// order of the fp32 roundings differs from the reference (tested within that).
//
// Layout codes as the GEMVs': 1 = q8_0, 2 = q4_0, 3 = q4_k, 4 = q6_k. Every layout is a block of 32 weights
// u * s - o with u unsigned (vpdpbusd's unsigned operand; the signed one is the broadcast input):
// - q8_0: u = q + 128, s = d; the 128 * sum(xq) it adds is taken off the integer sum, exactly;
// - q4_0: u = the nibble, s = d, 8 * sum(xq) off the integer sum;
// - q4_k: u = q, s = d * sc, o = dmin * m: the block's dot product is dx * (s * sum(u xq) - o * sum(xq));
// - q6_k: u = q in 0..63 and two scales per block (sub-blocks of 16), 32 * sum(xq) off each half's sum.
// A panel of 32 weight rows is unpacked once into that form (k in groups of 4 across 16 rows, the layout
// vpdpbusd reads; 16 rows x 8 blocks at a time, transposed in shuffles) and then meets every input row, 4 rows
// at a time: 8 vpdpbusd per block and per 16 outputs, then one conversion and one FMA with (s * dx). Measured on the 0.8B's shapes with oneDNN capped at
// avx512_core_bf16 (ONEDNN_MAX_CPU_ISA, what a Zen 4 runs), 512 rows: 3.5-3.9x its bf16 GEMM.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_common.h"

namespace {

using namespace qwen35_qc;

constexpr int NR = 2;         // groups of 16 weight rows in a panel
constexpr int PN = 16 * NR;   // weight rows per panel
constexpr int MR = 4;         // input rows per tile
constexpr int64_t QK = 256;   // weights per K-quant super-block

// The input rows, quantized: xq [M, K]; per (row, block) its scale and the integer sums of its halves.
struct Inputs {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s16;  // [M, nb, 2]
  int64_t K, nb;
};

template <typename T>
Inputs quantize_inputs(const T* x, int64_t M, int64_t K) {
  Inputs r{std::vector<int8_t>(M * K), std::vector<float>(M * (K / QB)), std::vector<int32_t>(2 * M * (K / QB)), K, K / QB};
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < r.nb; ++b) {
        const Block32 blk = quantize_block32(x + m * K + b * QB);
        r.d[m * r.nb + b] = blk.d;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(&r.q[m * K + b * QB]), _mm512_cvtepi32_epi8(blk.q0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(&r.q[m * K + b * QB + 16]), _mm512_cvtepi32_epi8(blk.q1));
        r.s16[(m * r.nb + b) * 2] = _mm512_reduce_add_epi32(blk.q0);
        r.s16[(m * r.nb + b) * 2 + 1] = _mm512_reduce_add_epi32(blk.q1);
      }
  });
  return r;
}

// Block b of a q8_0 / q4_0 weight row as 32 unsigned values u (32-byte aligned). unpack_group takes 8 blocks at
// a time (the K-quants always: K is a multiple of their super-block of 256), this the 32-blocks past the last 8.
template <int KIND>
inline void unpack32(const uint8_t* row, int64_t b, uint8_t* u) {
  static_assert(KIND == 1 || KIND == 2, "32-blocks: q8_0 or q4_0");
  if (KIND == 1) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * QB));
    _mm256_store_si256(reinterpret_cast<__m256i*>(u), _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80))));
  } else {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    _mm_store_si128(reinterpret_cast<__m128i*>(u), _mm_and_si128(q, m4));
    _mm_store_si128(reinterpret_cast<__m128i*>(u + 16), _mm_and_si128(_mm_srli_epi16(q, 4), m4));
  }
}

constexpr int halves(int kind) { return kind == 4 ? 2 : 1; }

// 16 rows of 8 dwords (32-byte aligned) -> out + g * stride (g < 8): dword g of the 16 rows, one 64-byte vector
// each (aligned).
// Two 8 x 8 transposes in shuffles: 16-lane gathers of the same dwords had taken ~1/3 of a panel's packing on
// a Zen 4, which for a prompt of 8-64 rows is most of the GEMM's time (perf, 8224 x 1024 q4_k, 8 rows).
inline void transpose16x8(const uint32_t* rows, int64_t ld, uint8_t* out, int64_t stride) {  // row r at rows + r ld
  __m256i c[2][8];
  for (int half = 0; half < 2; ++half) {
    __m256i r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(rows + (8 * half + i) * ld));
    for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved: t[2i] dwords 0,1 | 4,5, t[2i+1] dwords 2,3 | 6,7
      t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // four rows: u[4i + g] holds dword g | g + 4 of rows 4i..4i+3
      u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
      u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
      u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int g = 0; g < 4; ++g) {
      c[half][g] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x20);
      c[half][g + 4] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x31);
    }
  }
  for (int g = 0; g < 8; ++g)
    _mm512_store_si512(out + g * stride, _mm512_inserti64x4(_mm512_castsi256_si512(c[0][g]), c[1][g], 1));
}

// Row n's 8 blocks from block 8 t on as 32 unsigned values each, u[bb] (bb < 8), and v their scales: q8_0 /
// q4_0 v[bb] = d (v[8..15] unused), q4_k v[bb] = d sc, v[8 + bb] = dmin m (its offsets), q6_k v[bb] and v[8 + bb]
// the scales of block bb's two halves (one fp32 product each, as the reference rounds them), in vectors: a row's
// scales had been decoded byte by byte.
template <int KIND>
inline void unpack_group(const uint8_t* row, const c10::Half* d, int64_t t, uint32_t (*u)[16][8], int r, float* v) {
  uint8_t* out[8];
  for (int bb = 0; bb < 8; ++bb) out[bb] = reinterpret_cast<uint8_t*>(u[bb][r]);
  if constexpr (KIND <= 2) {
    for (int bb = 0; bb < 8; ++bb) unpack32<KIND>(row, 8 * t + bb, out[bb]);
    _mm256_store_ps(v, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 8 * t))));
  } else if (KIND == 3) {
    const uint8_t* sb = row + t * 144;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {  // 32 bytes: block 2c in the low nibbles, 2c + 1 in the high
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 16 + 32 * c));
      _mm256_store_si256(reinterpret_cast<__m256i*>(out[2 * c]), _mm256_and_si256(raw, m4));
      _mm256_store_si256(reinterpret_cast<__m256i*>(out[2 * c + 1]), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
    }
    // scale j = d * sm[Q4K_ORDER[j]], offset j = dmin * sm[8 + Q4K_ORDER[j]] (sm: the 6-bit scales and mins)
    const __m512i order = _mm512_setr_epi32(Q4K_ORDER[0], Q4K_ORDER[1], Q4K_ORDER[2], Q4K_ORDER[3], Q4K_ORDER[4],
                                            Q4K_ORDER[5], Q4K_ORDER[6], Q4K_ORDER[7], 8 + Q4K_ORDER[0],
                                            8 + Q4K_ORDER[1], 8 + Q4K_ORDER[2], 8 + Q4K_ORDER[3], 8 + Q4K_ORDER[4],
                                            8 + Q4K_ORDER[5], 8 + Q4K_ORDER[6], 8 + Q4K_ORDER[7]);
    const __m512 sm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q4k_scales_mins(sb + 4)));
    const __m512 dd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(half_at(sb)), _mm512_set1_ps(half_at(sb + 2)));
    _mm512_store_ps(v, _mm512_mul_ps(_mm512_permutexvar_ps(order, sm), dd));
  } else {
    const uint8_t* sb = row + t * 210;
    const __m256i low4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    for (int bb = 0; bb < 8; ++bb) {
      const int h = bb / 4, g = bb % 4;
      const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 64 * h + (g % 2) * 32));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * h));
      const __m256i lo = _mm256_and_si256(g < 2 ? ql : _mm256_srli_epi16(ql, 4), low4);
      const __m256i top = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), three);
      _mm256_store_si256(reinterpret_cast<__m256i*>(out[bb]), _mm256_or_si256(lo, _mm256_slli_epi16(top, 4)));
    }
    // sub-block scales sc[0..15] (two a block): even ones to v[0..7], odd ones to v[8..15]
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 192))));
    const __m512i halves_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    _mm512_store_ps(v, _mm512_mul_ps(_mm512_permutexvar_ps(halves_idx, sc), _mm512_set1_ps(half_at(sb + 208))));
  }
}

// Panel of PN weight rows from n0 (rows past N are zeros): U[b][g][j] 64 bytes = 16 rows x 4 values of
// k-group g; S[b][half][PN] scales; O[b][PN] offsets (q4_k).
template <int KIND>
void pack_panel(const uint8_t* qs, int64_t row_bytes, const c10::Half* d, int64_t N, int64_t nb, int64_t n0,
                uint8_t* U, float* S, float* O) {
  // groups of 8 blocks (a K-quant's super-block), 16 rows at a time: the rows' values and scales unpacked, then
  // each block's values and the scales transposed into the panel's layout
  alignas(64) uint32_t u[8][16][8];
  alignas(64) float v[16][16];
  const int64_t groups = nb / 8;
  for (int64_t t = 0; t < groups; ++t)
    for (int j = 0; j < NR; ++j) {
      for (int r = 0; r < 16; ++r) {
        const int64_t n = n0 + j * 16 + r;
        if (n < N) {
          unpack_group<KIND>(qs + n * row_bytes, d ? d + n * nb : nullptr, t, u, r, v[r]);
        } else {
          for (int bb = 0; bb < 8; ++bb) std::memset(u[bb][r], 0, sizeof(u[bb][r]));
          std::memset(v[r], 0, sizeof(v[r]));
        }
      }
      for (int bb = 0; bb < 8; ++bb) transpose16x8(&u[bb][0][0], 8, U + ((8 * t + bb) * 8 * NR + j) * 64, NR * 64);
      float* s0 = S + (8 * t * 2) * PN + j * 16;  // S[(b * 2 + hf) * PN + column]
      transpose16x8(reinterpret_cast<const uint32_t*>(&v[0][0]), 16, reinterpret_cast<uint8_t*>(s0), 2 * PN * 4);
      if (KIND == 3)  // offsets: O[b * PN + column]
        transpose16x8(reinterpret_cast<const uint32_t*>(&v[0][8]), 16, reinterpret_cast<uint8_t*>(O + 8 * t * PN + j * 16),
                      PN * 4);
      if (KIND == 4)  // second halves' scales
        transpose16x8(reinterpret_cast<const uint32_t*>(&v[0][8]), 16, reinterpret_cast<uint8_t*>(s0 + PN), 2 * PN * 4);
    }
  if constexpr (KIND <= 2) {  // 32-blocks past the last group of 8, one at a time
    alignas(64) uint32_t rows[16][8];
    for (int64_t b = 8 * groups; b < nb; ++b)
      for (int j = 0; j < NR; ++j) {
        for (int r = 0; r < 16; ++r) {
          const int64_t n = n0 + j * 16 + r;
          if (n < N) {
            unpack32<KIND>(qs + n * row_bytes, b, reinterpret_cast<uint8_t*>(rows[r]));
            S[b * 2 * PN + j * 16 + r] = static_cast<float>(d[n * nb + b]);
          } else {
            std::memset(rows[r], 0, sizeof(rows[r]));
            S[b * 2 * PN + j * 16 + r] = 0.f;
          }
        }
        // k-group g of the 16 rows: dword g of each row
        transpose16x8(&rows[0][0], 8, U + (b * 8 * NR + j) * 64, NR * 64);
      }
  }
}

// Rows m0..m0+R-1 against the panel: out[r * ldo + c], c < PN, in fp32.
template <int KIND, int R>
void tile(const uint8_t* U, const float* S, const float* O, const Inputs& x, int64_t m0, float* out, int64_t ldo) {
  constexpr int C = KIND == 1 ? 128 : KIND == 2 ? 8 : KIND == 4 ? 32 : 0;  // offset of u taken off the sums
  constexpr int H = halves(KIND), G = 8 / H;                             // k-groups per scale
  __m512 f[R][NR];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) f[r][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.nb; ++b) {
    const uint8_t* ub = U + b * 8 * NR * 64;
    for (int hf = 0; hf < H; ++hf) {
      // each sum starts at -C * sum(xq): the offset of u comes off exactly, with no instruction of its own
      __m512i acc[R][NR];
      for (int r = 0; r < R; ++r) {
        const int32_t* s16 = &x.s16[((m0 + r) * x.nb + b) * 2];
        const __m512i start = _mm512_set1_epi32(-C * (H == 2 ? s16[hf] : s16[0] + s16[1]));
        for (int j = 0; j < NR; ++j) acc[r][j] = start;
      }
      for (int g = hf * G; g < (hf + 1) * G; ++g) {
        __m512i w[NR];
        for (int j = 0; j < NR; ++j) w[j] = _mm512_load_si512(ub + (g * NR + j) * 64);
        for (int r = 0; r < R; ++r) {
          int32_t a4;
          std::memcpy(&a4, &x.q[(m0 + r) * x.K + b * QB + g * 4], 4);
          const __m512i a = _mm512_set1_epi32(a4);
          for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], w[j], a);
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = (m0 + r) * x.nb + b;
        const int32_t* s16 = &x.s16[i * 2];
        const int32_t xsum = H == 2 ? s16[hf] : s16[0] + s16[1];
        const __m512 dx = _mm512_set1_ps(x.d[i]);
        for (int j = 0; j < NR; ++j) {
          const __m512 sc = _mm512_mul_ps(_mm512_load_ps(S + (b * 2 + hf) * PN + j * 16), dx);
          f[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), sc, f[r][j]);
          if (KIND == 3)  // - dmin*m * dx * sum(xq)
            f[r][j] = _mm512_fnmadd_ps(_mm512_load_ps(O + b * PN + j * 16), _mm512_set1_ps(x.d[i] * static_cast<float>(xsum)), f[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(out + r * ldo + j * 16, f[r][j]);
}

template <int KIND>
void gemm(const Inputs& x, int64_t M, const uint8_t* qs, int64_t row_bytes, const c10::Half* d, int64_t N, const Out& o) {
  const int64_t nb = x.nb, panels = (N + PN - 1) / PN;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint8_t> Ubuf(nb * 8 * NR * 64 + 64);
    std::vector<float> Sbuf(nb * 2 * PN + 16), Obuf(nb * PN + 16);
    auto align = [](auto* p) { return reinterpret_cast<decltype(p)>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63)); };
    uint8_t* U = align(Ubuf.data());
    float* S = align(Sbuf.data());
    float* O = align(Obuf.data());
    alignas(64) float tmp[MR * PN];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * PN, nc = std::min<int64_t>(PN, N - n0);
      pack_panel<KIND>(qs, row_bytes, d, N, nb, n0, U, S, O);
      for (int64_t m = 0; m < M; m += MR) {
        const int64_t rows = std::min<int64_t>(MR, M - m);
        switch (rows) {
          case 4: tile<KIND, 4>(U, S, O, x, m, tmp, PN); break;
          case 3: tile<KIND, 3>(U, S, O, x, m, tmp, PN); break;
          case 2: tile<KIND, 2>(U, S, O, x, m, tmp, PN); break;
          default: tile<KIND, 1>(U, S, O, x, m, tmp, PN); break;
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < nc; ++c) o.store(m + r, n0 + c, tmp[r * PN + c]);
      }
    }
  });
}

at::Tensor gemm_quant(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t kind, bool out_fp32) {
  TORCH_CHECK(kind >= 1 && kind <= 4, "gemm_quant: unknown layout code ", kind);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "gemm_quant: x must be a contiguous bf16 or fp32 [M, K] matrix");
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.element_size() == 1, "gemm_quant: qs must be contiguous bytes [N, row bytes]");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  const int64_t block = kind <= 2 ? QB : QK;
  const int64_t rb = row_bytes(kind, K);
  TORCH_CHECK(K % block == 0 && qs.size(1) == rb, "gemm_quant: x has ", K, " columns, weights ", qs.sizes());
  if (kind <= 2)
    TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(0) == N && d.size(1) == K / QB,
                "gemm_quant: scales must be fp16 [", N, ", ", K / QB, "], got ", d.sizes());
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_fp32 ? at::kFloat : x.scalar_type()));
  if (M == 0 || N == 0) return out;
  const Inputs xin = x.scalar_type() == at::kBFloat16 ? quantize_inputs(x.data_ptr<c10::BFloat16>(), M, K)
                                                      : quantize_inputs(x.data_ptr<float>(), M, K);
  const Out o(out);
  const auto* q = static_cast<const uint8_t*>(qs.data_ptr());
  const c10::Half* dp = kind <= 2 ? d.data_ptr<c10::Half>() : nullptr;
  switch (kind) {
    case 1: gemm<1>(xin, M, q, rb, dp, N, o); break;
    case 2: gemm<2>(xin, M, q, rb, dp, N, o); break;
    case 3: gemm<3>(xin, M, q, rb, dp, N, o); break;
    default: gemm<4>(xin, M, q, rb, dp, N, o); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("gemm_quant(Tensor x, Tensor qs, Tensor d, int kind, bool out_fp32) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) { m.impl("gemm_quant", &gemm_quant); }
