// Portable kernels for quantized weights: what runs on CPUs without AVX512-BF16 / VNNI (most laptops: Intel Core
// since Alder Lake, older Intel and AMD, ARM), where the AVX512 kernels cannot. Built apart from them (a library
// of its own, ops named portable_*) for the machine they run on (-march=native / -mcpu=native),
// in vector code the compiler lowers to what the CPU has, with hand-written int8 dot products for AVX2 and ARM's
// sdot (portable_simd.h).
// Without them a quantized model ran the torch reference, which dequantizes each whole matrix at every call:
// the 0.8B in int4 decoded 0.11 tok/s at a 10 GB peak.
//
// They compute what the AVX512 kernels and the reference (quant/formats.reference_matmul) compute:
// - portable_gemv: out[M, N] = x[M, K] . W^T, the input rows quantized per block of 32 on the fly (scale
//   max|x|/127, round half away from zero), exact integer sums per block (q8_0, q4_0: 32 weights; q4_k: sub-blocks
//   of 32 with their 6-bit scale and min; q6_k: sub-blocks of 16 with their int8 scale), combined in fp32;
//   equal to the reference up to the order of the fp32 sums (tested);
// - portable_dequant_bf16_out: rows of W as bf16, the reference's bits exactly (prefill: bands for a bf16
//   GEMM; a tied embedding's rows);
// - portable_quantize_weights / portable_quantize_k: quantizers.h, the reference's bytes exactly;
// - portable_delta_rule, portable_gdn_decode: the Gated DeltaNet recurrence over a sequence (delta_rule.h) and its whole decode
//   step after the input projection, see there.
// Layout codes as everywhere: 1 = q8_0, 2 = q4_0, 3 = q4_k, 4 = q6_k.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "delta_rule.h"
#include "fp_contract.h"
#include "portable_simd.h"
#include "portable_rows.h"
#include "quantizers.h"

namespace qwen35_portable {  // portable_layers.cpp
std::tuple<at::Tensor, at::Tensor> conv_silu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& state);
}  // namespace qwen35_portable

namespace {

using namespace qwen35_prows;

using namespace psimd;

// Rows n0..n1 of W (layout kind) times the M quantized input rows; out[m * ldo + n] in fp32 or rounded to bf16
// (nearest even, as torch's .to). Multiply-adds may fuse here (they round once, better): the tests bound the GEMV
// by fp32 rounding, not by bits.
template <int M, typename Out>
QWEN35_CONTRACT(fast) void gemv_rows(int64_t kind, const uint8_t* qs, const c10::Half* d,
                                     int64_t n0, int64_t n1, const Rows& r, Out* out, int64_t ldo) {
  QWEN35_CONTRACT_BODY(fast)
  const int64_t K = r.K, nb = r.nb, rb = row_bytes(kind, K);
  const int8_t* xq = r.xq.data();
  const float* dx = r.dx.data();
  const float* dsx = r.dsx.data();
  const int32_t* hs = r.hs.data();
  // weight rows four at a time: each row's lanes are summed with its three neighbours' in one tree (sum4), the
  // four results stored together; a row short of four sums zeros beside it, the same bits (perf: one row's own
  // horizontal sum and store were ~15% of a q4_k GEMV at K = 1024)
  for (int64_t n4 = n0; n4 < n1; n4 += 4) {
    const int64_t rows = std::min<int64_t>(4, n1 - n4);
    f32x8 tot[4][M];
    for (int i = 0; i < 4; ++i)
      for (int m = 0; m < M; ++m) tot[i][m] = f32x8{};
    for (int64_t n = n4; n < n4 + rows; ++n) {
      const uint8_t* w = qs + n * rb;
      f32x8 acc[M], mins[M];
      for (int m = 0; m < M; ++m) acc[m] = mins[m] = f32x8{};
      if (kind == 1 || kind == 2) {
        const c10::Half* wd = d + n * nb;
        auto nibbles = [&](int64_t b) -> u8x32 {  // byte j: element j in the low nibble, j + 16 in the high, +8
          const u8x16 v = load_v<u8x16>(w + b * 16);
          return join<u8x32>(v & 15, v >> 4);
        };
        auto block = [&](int64_t b) -> i8x32 { return kind == 1 ? load_v<i8x32>(w + b * QB) : (i8x32)nibbles(b) - 8; };
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4) {  // four blocks: their four scales side by side, twice
          const f32x8 ws = halves4(reinterpret_cast<const uint16_t*>(wd + b));
          auto scaled = [&](int m, i32x8 f) {
            const float* xs = dx + m * nb + b;
            acc[m] += to_f(f) * (ws * f32x8{xs[0], xs[1], xs[2], xs[3], xs[0], xs[1], xs[2], xs[3]});
          };
          if (kind == 1) {
            const i8x32 q0 = block(b), q1 = block(b + 1), q2 = block(b + 2), q3 = block(b + 3);
            for (int m = 0; m < M; ++m) {
              const int8_t* x = xq + m * K + b * QB;
              scaled(m, fold4(dot32(q0, load_v<i8x32>(x)), dot32(q1, load_v<i8x32>(x + 32)),
                              dot32(q2, load_v<i8x32>(x + 64)), dot32(q3, load_v<i8x32>(x + 96))));
            }
          } else {  // the nibbles as stored, 8 * (sums of x) taken off: the same integers
            const u8x32 q0 = nibbles(b), q1 = nibbles(b + 1), q2 = nibbles(b + 2), q3 = nibbles(b + 3);
            for (int m = 0; m < M; ++m) {
              const int8_t* x = xq + m * K + b * QB;
              const i32x8 f = fold4u<4>(q0, load_v<i8x32>(x), q1, load_v<i8x32>(x + 32), q2, load_v<i8x32>(x + 64), q3,
                                        load_v<i8x32>(x + 96));
              scaled(m, f - (load_v<i32x8>(hs + m * nb * 2 + b * 2) << 3));
            }
          }
        }
        for (; b < nb; ++b) {  // the last K / 32 % 4 blocks, one by one
          const i8x32 q = block(b);
          const float s = static_cast<float>(wd[b]);
          for (int m = 0; m < M; ++m) acc[m] += to_f(dot32(q, load_v<i8x32>(xq + m * K + b * QB))) * (s * dx[m * nb + b]);
        }
      } else if (kind == 3) {  // sub-block j (32 weights) is input block j: dx * (d sc sum(q x) - dmin m sum(x))
        for (int64_t t = 0; t < K / QK; ++t) {
          const uint8_t* blk = w + t * Q4K;
          const float dd = kq_half_at(blk), dmin = kq_half_at(blk + 2);
          f32x8 scale, minv;
          q4k_scales8(blk + 4, dd, dmin, scale, minv);
        
          u8x32 q[8];  // bytes 32c.. hold sub-block 2c in their low nibbles, 2c + 1 in their high ones
          for (int c = 0; c < 4; ++c) {
            const u8x32 v = load_v<u8x32>(blk + 16 + 32 * c);
            q[2 * c] = v & 15;
            q[2 * c + 1] = v >> 4;
          }
          for (int m = 0; m < M; ++m) {
            const int8_t* x = xq + m * K + t * QK;
            const int64_t b0 = m * nb + t * 8;
            const f32x8 s = scale * load_v<f32x8>(dx + b0);
            for (int h = 0; h < 2; ++h) {
              const int j = 4 * h;
              const i32x8 f = fold4u<4>(q[j], load_v<i8x32>(x + 32 * j), q[j + 1], load_v<i8x32>(x + 32 * j + 32),
                                        q[j + 2], load_v<i8x32>(x + 32 * j + 64), q[j + 3],
                                        load_v<i8x32>(x + 32 * j + 96));
              acc[m] += to_f(f) * twice(s, h);
            }
            mins[m] += minv * load_v<f32x8>(dsx + b0);
          }
        }
      } else {  // q6_k: element 128h + 32g + l takes 4 bits of ql (bytes 64h + 32(g % 2) + l, low nibble for g < 2)
        // and 2 bits of qh (byte 128 + 32h + l, bits 2g..2g+1), minus 32; sub-blocks of 16, int8 scales
        for (int64_t t = 0; t < K / QK; ++t) {
          const uint8_t* blk = w + t * Q6K;
          const float dd = kq_half_at(blk + 208);
          const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
          u8x32 q[8];  // input block j = 4h + g: elements 32j..32j+31, sub-blocks 2j and 2j + 1, + 32
          for (int h = 0; h < 2; ++h) {
            const u8x32 l0 = load_v<u8x32>(blk + 64 * h), l1 = load_v<u8x32>(blk + 64 * h + 32);
            const u8x32 qh = load_v<u8x32>(blk + 128 + 32 * h);
            // bits 2g..2g+1 of qh moved to bits 4-5 by 16-bit shifts (x86 has no byte shift: GCC made each byte
            // shift by 4 four byte adds); what crosses into the neighbouring byte is masked off
            q[4 * h] = (l0 & 15) | (shl16<4>(qh) & 0x30);
            q[4 * h + 1] = (l1 & 15) | (shl16<2>(qh) & 0x30);
            q[4 * h + 2] = shr16<4>(l0) | (qh & 0x30);
            q[4 * h + 3] = shr16<4>(l1) | (shr16<2>(qh) & 0x30);
          }
          // fold4 of blocks 4h..4h+3 holds sub-blocks 8h + {0, 2, 4, 6, 1, 3, 5, 7}: their scales in that order
          const f32x8 scale[2] = {q6k_scales8(sc, 0, dd), q6k_scales8(sc, 1, dd)};
          for (int m = 0; m < M; ++m) {
            const int8_t* x = xq + m * K + t * QK;
            const f32x8 s = load_v<f32x8>(dx + m * nb + t * 8);
            for (int h = 0; h < 2; ++h) {
              const int j = 4 * h;
              const i32x8 f = fold4u<6>(q[j], load_v<i8x32>(x + 32 * j), q[j + 1], load_v<i8x32>(x + 32 * j + 32),
                                        q[j + 2], load_v<i8x32>(x + 32 * j + 64), q[j + 3],
                                        load_v<i8x32>(x + 32 * j + 96)) -
                              (load_v<i32x8>(hs + m * nb * 2 + (t * 8 + j) * 2) << 5);  // - 32 * (sums of x)
              acc[m] += to_f(f) * (scale[h] * twice(s, h));
            }
          }
        }
      }
      for (int m = 0; m < M; ++m) tot[n - n4][m] = acc[m] - mins[m];
    }
    for (int m = 0; m < M; ++m) {
      const f32x4 v = sum4(tot[0][m], tot[1][m], tot[2][m], tot[3][m]);
      for (int64_t i = 0; i < rows; ++i) out[m * ldo + n4 + i] = static_cast<Out>(v[i]);
    }
  }
}


// out[m * ldo + n] = x . W^T for the M rows of x (bf16 or fp32, contiguous), 8 rows at a time: each weight
// block read once for all of them
template <typename Out>
void gemv_out(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t kind, Out* o, int64_t ldo) {
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  const uint8_t* q = static_cast<const uint8_t*>(qs.data_ptr());
  const c10::Half* dp = kind <= 2 ? d.data_ptr<c10::Half>() : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m0);
    Rows r;
    if (x.scalar_type() == at::kBFloat16)
      quantize_rows(x.data_ptr<c10::BFloat16>() + m0 * K, rows, K, r);
    else
      quantize_rows(x.data_ptr<float>() + m0 * K, rows, K, r);
    Out* om = o + m0 * ldo;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      switch (rows) {
        case 1: gemv_rows<1>(kind, q, dp, n0, n1, r, om, ldo); break;
        case 2: gemv_rows<2>(kind, q, dp, n0, n1, r, om, ldo); break;
        case 3: gemv_rows<3>(kind, q, dp, n0, n1, r, om, ldo); break;
        case 4: gemv_rows<4>(kind, q, dp, n0, n1, r, om, ldo); break;
        case 5: gemv_rows<5>(kind, q, dp, n0, n1, r, om, ldo); break;
        case 6: gemv_rows<6>(kind, q, dp, n0, n1, r, om, ldo); break;
        case 7: gemv_rows<7>(kind, q, dp, n0, n1, r, om, ldo); break;
        default: gemv_rows<8>(kind, q, dp, n0, n1, r, om, ldo); break;
      }
    });
  }
}

at::Tensor portable_gemv(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t kind, bool out_fp32) {
  return integer_product(x, qs, d, kind, out_fp32, "portable_gemv",
                         [&](const at::Tensor& xc, auto* out) { gemv_out(xc, qs, d, kind, out, qs.size(0)); });
}

// One row of K weights in fp32, the reference's operations (formats.dequantize / kquants.dequantize_*): fp-contract
// off, so d * sc * q - dmin * m rounds after the multiply as the reference does, and the bf16 of it is the same.
QWEN35_CONTRACT(off) void dequant_row(int64_t kind, const uint8_t* w, const c10::Half* d, int64_t K,
                                      float* out) {
  QWEN35_CONTRACT_BODY(off)
  if (kind == 1 || kind == 2) {
    for (int64_t b = 0; b < K / QB; ++b) {
      const float s = static_cast<float>(d[b]);
      float* o = out + b * QB;
      if (kind == 1) {
        const int8_t* q = reinterpret_cast<const int8_t*>(w) + b * QB;
        for (int j = 0; j < QB; ++j) o[j] = static_cast<float>(q[j]) * s;
      } else {
        const uint8_t* q = w + b * 16;
        for (int j = 0; j < 16; ++j) {
          o[j] = (static_cast<float>(q[j] & 15) - 8.f) * s;
          o[j + 16] = (static_cast<float>(q[j] >> 4) - 8.f) * s;
        }
      }
    }
  } else if (kind == 3) {
    for (int64_t t = 0; t < K / QK; ++t) {
      const uint8_t* blk = w + t * Q4K;
      const float dd = kq_half_at(blk), dmin = kq_half_at(blk + 2);
      f32x8 sc, mn;  // d * scale and dmin * min of each sub-block (one multiply each, as the reference)
      q4k_scales8(blk + 4, dd, dmin, sc, mn);
      for (int c = 0; c < 4; ++c) {
        const uint8_t* q = blk + 16 + 32 * c;
        const float d0 = sc[2 * c], m0 = mn[2 * c], d1 = sc[2 * c + 1], m1 = mn[2 * c + 1];
        float* o = out + t * QK + 64 * c;
        for (int l = 0; l < 32; ++l) {
          o[l] = d0 * static_cast<float>(q[l] & 15) - m0;
          o[32 + l] = d1 * static_cast<float>(q[l] >> 4) - m1;
        }
      }
    }
  } else {
    for (int64_t t = 0; t < K / QK; ++t) {
      const uint8_t* blk = w + t * Q6K;
      const float dd = kq_half_at(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      for (int h = 0; h < 2; ++h)
        for (int g = 0; g < 4; ++g) {
          const uint8_t* lq = blk + 64 * h + 32 * (g & 1);
          const uint8_t* hq = blk + 128 + 32 * h;
          const int shift_lo = 4 * (g >> 1), shift_hi = 2 * g;
          float* o = out + t * QK + 128 * h + 32 * g;
          for (int half = 0; half < 2; ++half) {  // sub-blocks of 16, one scale each (a loop GCC vectorizes)
            const float s = dd * static_cast<float>(sc[(128 * h + 32 * g) / 16 + half]);
            for (int l = 16 * half; l < 16 * half + 16; ++l) {
              const int q = ((lq[l] >> shift_lo) & 15) | (((hq[l] >> shift_hi) & 3) << 4);
              o[l] = s * static_cast<float>(q - 32);
            }
          }
        }
    }
  }
}

void portable_dequant_bf16_out(const at::Tensor& qs, const at::Tensor& d, int64_t kind, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == qs.size(0),
              "portable_dequant_bf16_out: out must be contiguous bf16 [", qs.size(0), ", K], got ", out.sizes());
  const int64_t K = out.size(1), N = qs.size(0), rb = row_bytes(kind, K);
  check_layout(qs, d, kind, K, "portable_dequant_bf16_out");
  const uint8_t* q = static_cast<const uint8_t*>(qs.data_ptr());
  const c10::Half* dp = kind <= 2 ? d.data_ptr<c10::Half>() : nullptr;
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      dequant_row(kind, q + n * rb, dp ? dp + n * (K / QB) : nullptr, K, row.data());
      for (int64_t k = 0; k < K; ++k) o[n * K + k] = static_cast<c10::BFloat16>(row[k]);  // nearest even, as torch
    }
  });
}

// One token of the gated delta rule on one value head, for the decode step below (portable_delta_rule, a
// sequence, takes blocks of tokens: delta_rule.h):
//   S <- a S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q   (S fp32 [Dk, Dv])
// in two passes over S (the recall S^T k, then the update with the output) where the torch form makes eight.
// Multiply-adds may fuse (tested against the reference within fp32 rounding).
QWEN35_CONTRACT(fast) void delta_rule_head(const float* s0, float* s1, const float* q,
                                           const float* k, const float* v, float a, float beta,
                                           int64_t Dk, int64_t Dv, float* o, float* r) {
  QWEN35_CONTRACT_BODY(fast)
  for (int64_t e = 0; e < Dv; ++e) r[e] = 0.f;
  for (int64_t d = 0; d < Dk; ++d) {
    const float kd = k[d] * a;  // (a S)^T k
    const float* row = s0 + d * Dv;
    for (int64_t e = 0; e < Dv; ++e) r[e] += row[e] * kd;
  }
  for (int64_t e = 0; e < Dv; ++e) {
    r[e] = beta * (v[e] - r[e]);  // delta
    o[e] = 0.f;
  }
  for (int64_t d = 0; d < Dk; ++d) {
    const float kd = k[d], qd = q[d];
    const float* row = s0 + d * Dv;
    float* out = s1 + d * Dv;
    for (int64_t e = 0; e < Dv; ++e) {
      const float x = a * row[e] + kd * r[e];
      out[e] = x;
      o[e] += x * qd;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> portable_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& g, const at::Tensor& beta,
                                                       const at::Tensor& state) {
  return delta_rule_blocks::delta_rule("portable_delta_rule", q, k, v, g, beta, state);  // delta_rule.h
}

// One Gated DeltaNet decode step after the input projection, as the AVX512 library's gdn_decode computes it (the
// same signature and rounding, less its in-place option): the causal conv update + SiLU (conv output and SiLU
// rounded to bf16, as the reference bf16 path rounds them), L2 norm and scaling of q and k, the beta / decay
// gates, the delta rule (delta_rule_head above) and the gated RMSNorm of the output. One call where the torch
// form makes ~40 small ops (~0.4 ms a layer of dispatch on a 0.8B step).
//   proj [B, C + value_dim + 2 Hv] bf16 ([qkv | z | b | a]), conv_state [B, K-1, C] bf16, conv_w [C, K] bf16,
//   A_log, dt_bias [Hv], norm_w [Dv] fp32, state [B, Hv, Dk, Dv] fp32 (read, never written)
// Returns (out [B, Hv Dv] bf16, new conv_state, new state).
inline float round_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }
inline float silu(float v) { return v / (1.f + std::exp(-v)); }
inline f32x8 silu8(f32x8 v) { return v / (1.f + exp8(-v)); }  // silu in 8 lanes, through exp8 as prefill's conv

// in_place: the new recurrent state is written over `state` (returned as the new state): each element of a head's
// state is read before it is written (delta_rule_head), and heads are disjoint; the caller makes sure nothing
// else holds it (ops/layer_decode.exclusive).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gdn_decode_impl(const at::Tensor& proj, const at::Tensor& conv_state,
                                                               const at::Tensor& conv_w, const at::Tensor& A_log,
                                                               const at::Tensor& dt_bias, const at::Tensor& state,
                                                               const at::Tensor& norm_w, int64_t Hk, double eps,
                                                               bool in_place) {
  TORCH_CHECK(proj.scalar_type() == at::kBFloat16 && conv_state.scalar_type() == at::kBFloat16 &&
                  conv_w.scalar_type() == at::kBFloat16,
              "portable_gdn_decode: proj, conv_state and conv_w must be bf16");
  TORCH_CHECK(state.scalar_type() == at::kFloat && A_log.scalar_type() == at::kFloat &&
                  dt_bias.scalar_type() == at::kFloat && norm_w.scalar_type() == at::kFloat,
              "portable_gdn_decode: state, A_log, dt_bias and norm_w must be fp32");
  TORCH_CHECK(proj.is_contiguous() && conv_state.is_contiguous() && conv_w.is_contiguous() && state.is_contiguous() &&
                  A_log.is_contiguous() && dt_bias.is_contiguous() && norm_w.is_contiguous(),
              "portable_gdn_decode: operands must be contiguous");
  TORCH_CHECK(proj.dim() == 2 && conv_state.dim() == 3 && conv_w.dim() == 2 && state.dim() == 4,
              "portable_gdn_decode: proj [B, P], conv_state [B, K-1, C], conv_w [C, K], state [B, Hv, Dk, Dv]");
  const int64_t B = state.size(0), Hv = state.size(1), Dk = state.size(2), Dv = state.size(3);
  const int64_t Km1 = conv_state.size(1), C = conv_state.size(2), K = Km1 + 1;
  const int64_t key_dim = Hk * Dk, value_dim = Hv * Dv, P = proj.size(1);
  TORCH_CHECK(Km1 >= 1 && Hk >= 1 && Hv % Hk == 0 && C == 2 * key_dim + value_dim && P == C + value_dim + 2 * Hv &&
                  proj.size(0) == B && conv_state.size(0) == B && conv_w.size(0) == C && conv_w.size(1) == K &&
                  A_log.numel() == Hv && dt_bias.numel() == Hv && norm_w.numel() == Dv,
              "portable_gdn_decode: sizes do not fit one layer: proj ", proj.sizes(), ", conv_state ", conv_state.sizes(),
              ", conv_w ", conv_w.sizes(), ", state ", state.sizes(), ", Hk ", Hk);
  const int64_t rep = Hv / Hk;
  at::Tensor new_conv;  // the conv step's new state
  at::Tensor new_state = in_place ? state : at::empty_like(state);
  at::Tensor out = at::empty({B, value_dim}, proj.options());
  std::vector<float> act(static_cast<size_t>(B * C));  // silu(conv), bf16-rounded
  const auto* pp = proj.data_ptr<c10::BFloat16>();
  const auto* cs = conv_state.data_ptr<c10::BFloat16>();
  const auto* cw = conv_w.data_ptr<c10::BFloat16>();
  if (C % 8 == 0 && K <= 8) {  // prefill's kernel on one token: 8 channels a vector, its SiLU through exp8 (a
    // scalar expf a channel had cost about as much as the delta rule itself: perf, 0.8B layer held to AVX2)
    at::Tensor y;
    std::tie(y, new_conv) = qwen35_portable::conv_silu(proj.narrow(1, 0, C).unsqueeze(1), conv_w, conv_state);
    const auto* yp = y.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < B * C; ++i) act[static_cast<size_t>(i)] = static_cast<float>(yp[i]);
  } else {
    new_conv = at::empty_like(conv_state);
    auto* ncs = new_conv.data_ptr<c10::BFloat16>();
    at::parallel_for(0, B * C, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / C, c = i % C;
        float acc = 0.f;
        for (int64_t j = 0; j < Km1; ++j)
          acc += static_cast<float>(cs[(b * Km1 + j) * C + c]) * static_cast<float>(cw[c * K + j]);
        acc += static_cast<float>(pp[b * P + c]) * static_cast<float>(cw[c * K + Km1]);
        act[static_cast<size_t>(i)] = round_bf16(silu(round_bf16(acc)));
        for (int64_t j = 0; j + 1 < Km1; ++j) ncs[(b * Km1 + j) * C + c] = cs[(b * Km1 + j + 1) * C + c];
        ncs[(b * Km1 + Km1 - 1) * C + c] = pp[b * P + c];
      }
    });
  }
  const float *A = A_log.data_ptr<float>(), *dtb = dt_bias.data_ptr<float>(), *nw = norm_w.data_ptr<float>();
  const float* S0 = state.data_ptr<float>();
  float* S1 = new_state.data_ptr<float>();
  auto* op = out.data_ptr<c10::BFloat16>();
  const float qscale = 1.f / std::sqrt(static_cast<float>(Dk));
  at::parallel_for(0, B * Hv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(static_cast<size_t>(2 * Dk + 2 * Dv));
    float *q = buf.data(), *k = q + Dk, *o = k + Dk, *r = o + Dv;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hv, h = i % Hv, kh = h / rep;
      const float* a = act.data() + b * C;
      float qs = 0.f, ks = 0.f;
      for (int64_t d = 0; d < Dk; ++d) {
        qs += a[kh * Dk + d] * a[kh * Dk + d];
        ks += a[key_dim + kh * Dk + d] * a[key_dim + kh * Dk + d];
      }
      const float qn = qscale / std::sqrt(qs + 1e-6f), kn = 1.f / std::sqrt(ks + 1e-6f);
      for (int64_t d = 0; d < Dk; ++d) {
        q[d] = a[kh * Dk + d] * qn;
        k[d] = a[key_dim + kh * Dk + d] * kn;
      }
      const c10::BFloat16* zba = pp + b * P + C;
      const float beta = 1.f / (1.f + std::exp(-static_cast<float>(zba[value_dim + h])));
      const float sp_in = static_cast<float>(zba[value_dim + Hv + h]) + dtb[h];
      const float softplus = sp_in > 20.f ? sp_in : std::log1p(std::exp(sp_in));
      const float decay = std::exp(-std::exp(A[h]) * softplus);
      delta_rule_head(S0 + i * Dk * Dv, S1 + i * Dk * Dv, q, k, a + 2 * key_dim + h * Dv, decay, beta, Dk, Dv, o, r);
      // gated RMSNorm (not zero-centred): o * rsqrt(mean(o^2) + eps) * w * silu(z)
      float ss = 0.f;
      for (int64_t e = 0; e < Dv; ++e) ss += o[e] * o[e];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(Dv) + static_cast<float>(eps));
      const c10::BFloat16* z = zba + h * Dv;
      c10::BFloat16* oh = op + b * value_dim + h * Dv;
      int64_t e = 0;
      for (; e + 8 <= Dv; e += 8)
        store_bf16x8(oh + e, round_bf16x8(load_v<f32x8>(o + e) * inv * load_v<f32x8>(nw + e) * silu8(bf16x8(z + e))));
      for (; e < Dv; ++e) oh[e] = c10::BFloat16(o[e] * inv * nw[e] * silu(static_cast<float>(z[e])));
    }
  });
  return {out, new_conv, new_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> portable_gdn_decode(const at::Tensor& proj, const at::Tensor& conv_state,
                                                                   const at::Tensor& conv_w, const at::Tensor& A_log,
                                                                   const at::Tensor& dt_bias, const at::Tensor& state,
                                                                   const at::Tensor& norm_w, int64_t Hk, double eps) {
  return gdn_decode_impl(proj, conv_state, conv_w, A_log, dt_bias, state, norm_w, Hk, eps, false);
}

std::tuple<at::Tensor, at::Tensor> portable_quantize_weights(const at::Tensor& w, int64_t bits) {
  return qfit::quantize_weights_tensor(w, bits);
}
at::Tensor portable_quantize_k(const at::Tensor& w, int64_t kind) { return qfit::quantize_k_tensor(w, kind); }

}  // namespace

// What portable_layers.cpp's whole-layer steps call (named outside the anonymous namespace)
namespace qwen35_portable {
void gemv_into(int64_t kind, const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, c10::BFloat16* out,
               int64_t ldo) {
  check_layout(qs, d, kind, x.size(1), "portable layer");
  gemv_out(x, qs, d, kind, out, ldo);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> gdn_decode(const at::Tensor& proj, const at::Tensor& conv_state,
                                                          const at::Tensor& conv_w, const at::Tensor& A_log,
                                                          const at::Tensor& dt_bias, const at::Tensor& state,
                                                          const at::Tensor& norm_w, int64_t Hk, double eps,
                                                          bool in_place) {
  return gdn_decode_impl(proj, conv_state, conv_w, A_log, dt_bias, state, norm_w, Hk, eps, in_place);
}
}  // namespace qwen35_portable

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("portable_gemv(Tensor x, Tensor qs, Tensor d, int kind, bool out_fp32) -> Tensor");
  m.def("portable_dequant_bf16_out(Tensor qs, Tensor d, int kind, Tensor(a!) out) -> ()");
  m.def("portable_quantize_weights(Tensor w, int bits) -> (Tensor, Tensor)");
  m.def("portable_quantize_k(Tensor w, int kind) -> Tensor");
  m.def("portable_gdn_decode(Tensor proj, Tensor conv_state, Tensor conv_w, Tensor A_log, Tensor dt_bias, Tensor state, "
        "Tensor norm_w, int Hk, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("portable_delta_rule(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) {
  m.impl("portable_gemv", &portable_gemv);
  m.impl("portable_dequant_bf16_out", &portable_dequant_bf16_out);
  m.impl("portable_quantize_weights", &portable_quantize_weights);
  m.impl("portable_quantize_k", &portable_quantize_k);
  m.impl("portable_delta_rule", &portable_delta_rule);
  m.impl("portable_gdn_decode", &portable_gdn_decode);
}
