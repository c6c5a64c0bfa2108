// portable_gemm: prefill (many input rows) on packed weights for CPUs without AVX512 (laptops: AVX2), in integer
// arithmetic. What it computes is formats.reference_matmul, as portable_gemv does: the input rows quantized per
// block of 32 (portable_rows.h), exact integer sums per block against the weights' integers, combined in fp32
// with the blocks' scales; only the order of the fp32 roundings differs from the reference.
//
// Without it such a machine dequantized each weight to bf16, widened it to fp32 and ran torch's fp32 GEMM
// (ops/linear.dense_linear): 8 multiply-adds a vector instruction. Here vpmaddubsw multiplies 32 byte pairs
// an instruction (unsigned weights by the signed inputs), summed in 16-bit lanes while they fit.
//
// A panel of NP = 16 weight rows is unpacked once (per thread) into bytes u in groups of 4 consecutive k across
// the 16 rows, the layout a broadcast of 4 input bytes meets in one vpmaddubsw, with per block fp32 scale(s) s
// and offset o:
// - q8_0: w = d q, u = q (signed): vpmaddubsw takes |q| and the input with q's sign (vpsignb); with vpdpbusd,
//   u + 128 and o = 128 d;
// - q4_0: w = d (u - 8)          -> s = d, o = 8 d;
// - q4_k: w = d sc u - dmin m    -> s = d sc, o = dmin m;
//   the block's dot product with the input block (dx, xq) is dx s sum(u xq) - o (dx sum(xq)) = ... - o dsx;
// - q6_k: w = d sc_h (u - 32) in two halves of 16 (their own scales): 32 sum(xq over the half) is taken off
//   each half's integer sum (exact), then one scale per half.
// Then every tile of MR input rows runs over the panel's blocks: 8 groups of 4 k, each a broadcast and two
// vpmaddubsw per row (16 rows = two vectors); the 16-bit sums widened by one vpmaddwd per block (nibbles: at most
// 8 * 2 * 15 * 127 < 2^15), per two groups (6 bits: 2 * 2 * 63 * 127 < 2^15) or per group (q8_0), converted and
// scaled once per block. Where the CPU has AVX-VNNI (Intel since Alder Lake, AMD since Zen 5) or AVX512-VNNI with
// 256-bit vectors, vpdpbusd does the multiply and the 32-bit sum in one instruction instead.
//
// Measured on a Zen 4 (2 threads, 512 input rows, the 0.8B's 7168 x 1024 / 1024 x 3584, GOP/s): built for AVX2
// (x86-64-v3) q4_k 390-422 / 354-400 (220-331 / 288-300 before in_register), q6_k 318-332 / 284-308; with vpdpbusd
// (-march=native there) q4_k 429-563 / 415-486, q6_k 365-463 / 313-403; torch's fp32 GEMM on the dequantized
// weights (what ran before) 115-178 GFLOP/s.
//
// Without AVX2 the same panels run a plain C++ form (correct everywhere, tested; prefill_gemm only picks this
// kernel where portable_gemm_vectorized() says the AVX2 one is built).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fp_contract.h"
#include "portable_rows.h"
#include "portable_simd.h"

namespace {

using namespace qwen35_prows;

constexpr int NP = 16;          // weight rows per panel (two vectors of 8 fp32 lanes)
constexpr int PB = 8 * NP * 4;  // bytes of one block of 32 weights across the panel: [group][row][4 k]
// Input rows per tile. Measured (0.8B shapes, 512 rows, AVX2 build, 2 threads, GOP/s, q4_k / q6_k): 2 rows
// 117-214 / 140-211, 3 rows 263-275 / 145-224, 4 rows 253-294 / 143-224, 5 and 6 no better (a noisy host; more
// rows spill the 16 AVX2 registers).
constexpr int MR = 4;

// Where the CPU multiplies bytes into 32-bit sums in one instruction (AVX-VNNI: Alder Lake and later, Zen 5; or
// AVX512-VNNI with 256-bit vectors), vpdpbusd replaces vpmaddubsw + the 16-bit sums + vpmaddwd: no 16-bit
// bound, one instruction a group and row vector.
#if defined(__AVX2__) && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
constexpr bool VNNI = true;
#else
constexpr bool VNNI = false;
#endif

// One panel of up to NP weight rows, unpacked (rows past the weight's last are zeros, never stored).
struct Panel {
  std::vector<uint8_t> u;  // [nb][8][NP][4]
  std::vector<float> s;    // [nb][2][NP]: the block's scale ([0]), or its halves' (q6_k)
  std::vector<float> o;    // [nb][NP]: the block's offset (q4_0, q4_k)
  void size(int64_t nb) {
    u.assign(static_cast<size_t>(nb * PB), 0);
    s.assign(static_cast<size_t>(nb * 2 * NP), 0.f);
    o.assign(static_cast<size_t>(nb * NP), 0.f);
  }
};

// Weight rows n0..n0+nr-1 into panel p (kind 2, 3 or 4; layouts as formats.py / kquants.py). Each block's 32
// values are unpacked in one vector as portable_gemv unpacks them, then stored 4 bytes a group (byte by byte, this
// had cost more than the products at 512 input rows: 5 of a 7168 x 1024 q4_k GEMM's 34 ms).
void unpack(int64_t kind, const uint8_t* qs, const c10::Half* d, int64_t K, int64_t n0, int nr, Panel& p) {
  using namespace psimd;
  const int64_t nb = K / QB, rb = row_bytes(kind, K);
  p.size(nb);
  for (int c = 0; c < nr; ++c) {
    const uint8_t* w = qs + (n0 + c) * rb;
    auto put = [&](int64_t b, u8x32 v) {  // block b of row c, weights in k order
      uint8_t* u = p.u.data() + b * PB + c * 4;
      for (int g = 0; g < 8; ++g) std::memcpy(u + g * NP * 4, reinterpret_cast<const uint8_t*>(&v) + 4 * g, 4);
    };
    if (kind == 1) {  // the signed bytes as they are (the AVX2 tile takes |q| and moves q's sign onto the input);
      // vpdpbusd's unsigned operand is q + 128 (the tile flips the top bit), 128 d sum(xq) its offset (exact)
      for (int64_t b = 0; b < nb; ++b) {
        put(b, load_v<u8x32>(w + b * QB));
        const float s = static_cast<float>(d[(n0 + c) * nb + b]);
        p.s[b * 2 * NP + c] = s;
        p.o[b * NP + c] = VNNI ? 128.f * s : 0.f;
      }
    } else if (kind == 2) {
      for (int64_t b = 0; b < nb; ++b) {
        const u8x16 v = load_v<u8x16>(w + b * 16);  // element j in the low nibble of byte j, j + 16 in the high
        put(b, join<u8x32>(v & 15, v >> 4));
        const float s = static_cast<float>(d[(n0 + c) * nb + b]);
        p.s[b * 2 * NP + c] = s;
        p.o[b * NP + c] = 8.f * s;  // exact
      }
    } else if (kind == 3) {
      for (int64_t t = 0; t < K / QK; ++t) {
        const uint8_t* blk = w + t * Q4K;
        f32x8 sc, mn;  // d * scale and dmin * min of each sub-block, as the reference rounds them
        q4k_scales8(blk + 4, qfit::kq_half_at(blk), qfit::kq_half_at(blk + 2), sc, mn);
        for (int j = 0; j < 4; ++j) {  // bytes 32j.. hold sub-block 2j in their low nibbles, 2j + 1 in their high
          const u8x32 v = load_v<u8x32>(blk + 16 + 32 * j);
          put(t * 8 + 2 * j, v & 15);
          put(t * 8 + 2 * j + 1, shr16<4>(v));
        }
        for (int j = 0; j < 8; ++j) {
          p.s[(t * 8 + j) * 2 * NP + c] = sc[j];
          p.o[(t * 8 + j) * NP + c] = mn[j];
        }
      }
    } else {  // q6_k: element 128h + 32g + l takes 4 bits of ql and 2 of qh (portable_gemv's unpacking)
      for (int64_t t = 0; t < K / QK; ++t) {
        const uint8_t* blk = w + t * Q6K;
        const float dd = qfit::kq_half_at(blk + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        for (int h = 0; h < 2; ++h) {
          const u8x32 l0 = load_v<u8x32>(blk + 64 * h), l1 = load_v<u8x32>(blk + 64 * h + 32);
          const u8x32 qh = load_v<u8x32>(blk + 128 + 32 * h);
          const int64_t b = t * 8 + 4 * h;
          put(b, (l0 & 15) | (shl16<4>(qh) & 0x30));
          put(b + 1, (l1 & 15) | (shl16<2>(qh) & 0x30));
          put(b + 2, shr16<4>(l0) | (qh & 0x30));
          put(b + 3, shr16<4>(l1) | (shr16<2>(qh) & 0x30));
        }
        for (int j = 0; j < 8; ++j)  // block t * 8 + j = sub-blocks 2j, 2j + 1
          for (int half = 0; half < 2; ++half)
            p.s[((t * 8 + j) * 2 + half) * NP + c] = dd * static_cast<float>(sc[2 * j + half]);
      }
    }
  }
}

// The sum of xq over half `half` of input block b of row m (portable_rows.h's hs lane order)
inline int32_t half_sum(const Rows& r, int64_t m, int64_t b, int half) {
  return r.hs[m * r.nb * 2 + b / 4 * 8 + b % 4 + 4 * half];
}

template <typename Out>
inline void store(Out* o, int nr, const float* v) {
  for (int c = 0; c < nr; ++c) o[c] = static_cast<Out>(v[c]);  // bf16: nearest even, as torch's .to
}

#if defined(__AVX2__)
constexpr bool VECTORIZED = true;

inline __m256i bcast4(const int8_t* x) {  // 4 input bytes in every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// An accumulator pinned to a register at this point of its chain. Without it GCC 12 unrolled the 8 groups, ran all
// their products first and stored each to the stack to add them up in a tree after (perf: ~1 instruction a cycle);
// the empty asm keeps each sum a running chain in a register.
inline void in_register(__m256i& v) { asm("" : "+x"(v)); }

#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i x) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, x);
#else
  return _mm256_dpbusd_epi32(acc, u, x);
#endif
}
#else
inline __m256i dpbusd(__m256i, __m256i, __m256i) { return _mm256_setzero_si256(); }  // never called
#endif

// Rows m0..m0+R-1 (R <= MR) times the panel: out[i * ldo + c] for c < nr
template <int KIND, int R, typename Out>
QWEN35_CONTRACT(fast) void tile(const Panel& p, const Rows& r, int64_t m0, Out* out,
                                int64_t ldo, int nr) {
  QWEN35_CONTRACT_BODY(fast)
  const int64_t K = r.K, nb = r.nb;
  const __m256i ones = _mm256_set1_epi16(1);
  constexpr int H = KIND == 4 ? 2 : 1;  // scales a block: q6_k's halves
  __m256 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* u = p.u.data() + b * PB;
    const int8_t* x = r.xq.data() + m0 * K + b * QB;
    for (int h = 0; h < H; ++h) {
      const int g0 = 8 / H * h, g1 = g0 + 8 / H;  // the groups of 4 k this scale covers
      __m256i a[R][2];  // exact int32 sums of u * xq
      for (int i = 0; i < R; ++i) a[i][0] = a[i][1] = _mm256_setzero_si256();
      // without VNNI, pairs of products summed in 16 bits: nibbles over all 8 groups (8 * 2 * 15 * 127 < 2^15),
      // 6 bits over 2 (2 * 2 * 63 * 127 < 2^15), q8_0's (|q| <= 128) one at a time, then widened by vpmaddwd
      constexpr int G16 = KIND == 4 ? 2 : KIND == 1 ? 1 : 8;
      for (int gs = g0; gs < g1; gs += (VNNI ? g1 - g0 : G16)) {
        __m256i t[R][2];
        for (int i = 0; i < R; ++i) t[i][0] = t[i][1] = _mm256_setzero_si256();
        for (int g = gs; g < (VNNI ? g1 : gs + G16); ++g) {
          __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + g * NP * 4));
          __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + g * NP * 4 + 32));
          const __m256i q0 = w0, q1 = w1;  // q8_0: the signed weights
          if (KIND == 1) {
            const __m256i top = _mm256_set1_epi8(static_cast<char>(0x80));
            w0 = VNNI ? _mm256_xor_si256(q0, top) : _mm256_abs_epi8(q0);  // q + 128, or |q|
            w1 = VNNI ? _mm256_xor_si256(q1, top) : _mm256_abs_epi8(q1);
          }
          for (int i = 0; i < R; ++i) {
            const __m256i xb = bcast4(x + i * K + 4 * g);
            if (KIND == 1 && !VNNI) {  // |q| * (x with q's sign): q x, a pair at most 2 * 128 * 127 < 2^15
              t[i][0] = _mm256_add_epi16(t[i][0], _mm256_maddubs_epi16(w0, _mm256_sign_epi8(xb, q0)));
              t[i][1] = _mm256_add_epi16(t[i][1], _mm256_maddubs_epi16(w1, _mm256_sign_epi8(xb, q1)));
            } else if (VNNI) {
              a[i][0] = dpbusd(a[i][0], w0, xb);
              a[i][1] = dpbusd(a[i][1], w1, xb);
            } else {
              t[i][0] = _mm256_add_epi16(t[i][0], _mm256_maddubs_epi16(w0, xb));
              t[i][1] = _mm256_add_epi16(t[i][1], _mm256_maddubs_epi16(w1, xb));
            }
            if (!VNNI)
              for (int v = 0; v < 2; ++v) in_register(t[i][v]);
          }
        }
        if (!VNNI)
          for (int i = 0; i < R; ++i)
            for (int v = 0; v < 2; ++v) a[i][v] = _mm256_add_epi32(a[i][v], _mm256_madd_epi16(t[i][v], ones));
      }
      const float* s = p.s.data() + (b * 2 + h) * NP;
      const float* o = p.o.data() + b * NP;
      for (int i = 0; i < R; ++i) {
        const __m256 dx = _mm256_set1_ps(r.dx[(m0 + i) * nb + b]);
        for (int v = 0; v < 2; ++v) {
          if (KIND != 4) {  // dx s sum(u xq) - o dsx (q8_0 without VNNI: o = 0, not applied)
            const __m256 f = _mm256_cvtepi32_ps(a[i][v]);
            acc[i][v] = _mm256_fmadd_ps(f, _mm256_mul_ps(_mm256_loadu_ps(s + 8 * v), dx), acc[i][v]);
            if (KIND != 1 || VNNI)
              acc[i][v] = _mm256_fnmadd_ps(_mm256_loadu_ps(o + 8 * v), _mm256_set1_ps(r.dsx[(m0 + i) * nb + b]), acc[i][v]);
          } else {  // dx s_h (sum(u xq) - 32 sum(xq)) over the half
            const __m256i off = _mm256_set1_epi32(32 * half_sum(r, m0 + i, b, h));
            const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(a[i][v], off));
            acc[i][v] = _mm256_fmadd_ps(f, _mm256_mul_ps(_mm256_loadu_ps(s + 8 * v), dx), acc[i][v]);
          }
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    alignas(32) float v[NP];
    _mm256_store_ps(v, acc[i][0]);
    _mm256_store_ps(v + 8, acc[i][1]);
    store(out + i * ldo, nr, v);
  }
}
#else
constexpr bool VECTORIZED = false;

// The same sums in plain C++ (any CPU): exact integers per block (half), the same fp32 combination
template <int KIND, int R, typename Out>
QWEN35_CONTRACT(fast) void tile(const Panel& p, const Rows& r, int64_t m0, Out* out,
                                int64_t ldo, int nr) {
  QWEN35_CONTRACT_BODY(fast)
  const int64_t K = r.K, nb = r.nb;
  for (int i = 0; i < R; ++i) {
    const int64_t m = m0 + i;
    float acc[NP] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* u = p.u.data() + b * PB;
      const int8_t* x = r.xq.data() + m * K + b * QB;
      int32_t sum[2][NP] = {};
      for (int g = 0; g < 8; ++g)
        for (int c = 0; c < NP; ++c)
          for (int k = 0; k < 4; ++k) {
            const uint8_t v = u[(g * NP + c) * 4 + k];
            sum[g / 4][c] += (KIND == 1 ? static_cast<int32_t>(static_cast<int8_t>(v)) : v) * x[4 * g + k];
          }
      const float dx = r.dx[m * nb + b];
      for (int c = 0; c < NP; ++c) {
        if (KIND != 4) {
          acc[c] += static_cast<float>(sum[0][c] + sum[1][c]) * (p.s[b * 2 * NP + c] * dx);
          acc[c] -= p.o[b * NP + c] * r.dsx[m * nb + b];
        } else {
          for (int half = 0; half < 2; ++half)
            acc[c] += static_cast<float>(sum[half][c] - 32 * half_sum(r, m, b, half)) * (p.s[(b * 2 + half) * NP + c] * dx);
        }
      }
    }
    store(out + i * ldo, nr, acc);
  }
}
#endif

template <int KIND, typename Out>
void panel_rows(const Panel& p, const Rows& r, int64_t M, Out* out, int64_t ldo, int nr) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<KIND, MR>(p, r, m, out + m * ldo, ldo, nr);
  switch (M - m) {
    case 3: tile<KIND, 3>(p, r, m, out + m * ldo, ldo, nr); break;
    case 2: tile<KIND, 2>(p, r, m, out + m * ldo, ldo, nr); break;
    case 1: tile<KIND, 1>(p, r, m, out + m * ldo, ldo, nr); break;
    default: break;
  }
}

template <typename Out>
void gemm_out(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t kind, Out* out) {
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  Rows r;
  size_rows(r, M, K);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (x.scalar_type() == at::kBFloat16)
        quantize_row(x.data_ptr<c10::BFloat16>() + m * K, m, r);
      else
        quantize_row(x.data_ptr<float>() + m * K, m, r);
    }
  });
  const uint8_t* q = static_cast<const uint8_t*>(qs.data_ptr());
  const c10::Half* dp = kind <= 2 ? d.data_ptr<c10::Half>() : nullptr;
  at::parallel_for(0, (N + NP - 1) / NP, 1, [&](int64_t p0, int64_t p1) {
    Panel p;
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int64_t n0 = pi * NP;
      const int nr = static_cast<int>(std::min<int64_t>(NP, N - n0));
      unpack(kind, q, dp, K, n0, nr, p);
      if (kind == 1)
        panel_rows<1>(p, r, M, out + n0, N, nr);
      else if (kind == 2)
        panel_rows<2>(p, r, M, out + n0, N, nr);
      else if (kind == 3)
        panel_rows<3>(p, r, M, out + n0, N, nr);
      else
        panel_rows<4>(p, r, M, out + n0, N, nr);
    }
  });
}

at::Tensor portable_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t kind, bool out_fp32) {
  return integer_product(x, qs, d, kind, out_fp32, "portable_gemm",
                         [&](const at::Tensor& xc, auto* out) { gemm_out(xc, qs, d, kind, out); });
}

bool portable_gemm_vectorized() { return VECTORIZED; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("portable_gemm(Tensor x, Tensor qs, Tensor d, int kind, bool out_fp32) -> Tensor");
  m.def("portable_gemm_vectorized() -> bool");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) { m.impl("portable_gemm", &portable_gemm); }

TORCH_LIBRARY_IMPL(qwen35, CompositeExplicitAutograd, m) {
  m.impl("portable_gemm_vectorized", &portable_gemm_vectorized);
}
