// Portable kernels for quantized weights: what runs on CPUs without AVX512-BF16 / VNNI (most laptops: Intel Core
// since Alder Lake, older Intel and AMD, ARM), where the AVX512 kernels cannot. Plain C++ loops, built apart from
// them (a library of its own, ops named portable_*) for the machine they run on (-march=native / -mcpu=native:
// the compiler vectorizes the integer dot products with what the CPU has: AVX2 vpmaddwd, NEON, ...).
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
// - portable_quantize_weights / portable_quantize_k: quantizers.h, the reference's bytes exactly.
// Layout codes as everywhere: 1 = q8_0, 2 = q4_0, 3 = q4_k, 4 = q6_k.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quantizers.h"

namespace {

constexpr int64_t QB = 32;  // inputs (and q8_0 / q4_0 weights) per block
using qfit::QK;             // weights per K-quant super-block
using qfit::Q4K, qfit::Q6K;  // bytes per Q4_K / Q6_K super-block
using qfit::kq_half_at;     // the fp16 stored (unaligned) at a byte pointer, as fp32

int64_t row_bytes(int64_t kind, int64_t K) {
  return kind == 1 ? K : kind == 2 ? K / 2 : K / QK * (kind == 3 ? Q4K : Q6K);
}

// The input rows quantized per block of 32: values xq [M, K], scales dx [M, K/32], block sums sx [M, K/32]
struct Rows {
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> sx;
  int64_t K = 0, nb = 0;
};

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, Rows& r) {
  r.K = K;
  r.nb = K / QB;
  r.xq.resize(static_cast<size_t>(M * K));
  r.dx.resize(static_cast<size_t>(M * r.nb));
  r.sx.resize(static_cast<size_t>(M * r.nb));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < r.nb; ++b) {
      const T* v = x + m * K + b * QB;
      float f[QB], amax = 0.f;
      for (int j = 0; j < QB; ++j) {
        f[j] = static_cast<float>(v[j]);
        amax = std::max(amax, std::fabs(f[j]));
      }
      const float d = amax / 127.f, inv = d != 0.f ? 1.f / d : 0.f;
      int8_t* q = r.xq.data() + m * K + b * QB;
      int32_t s = 0;
      for (int j = 0; j < QB; ++j) {
        q[j] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::round(f[j] * inv))));  // C's roundf
        s += q[j];
      }
      r.dx[m * r.nb + b] = d;
      r.sx[m * r.nb + b] = s;
    }
}

// Q4_K's 12 bytes -> 8 scales and 8 mins (kquants.q4_k_scales)
inline void q4k_scales(const uint8_t* b, int* sc, int* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = b[j] & 63;
    mn[j] = b[j + 4] & 63;
    sc[j + 4] = (b[j + 8] & 0xF) | ((b[j] >> 6) << 4);
    mn[j + 4] = (b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4);
  }
}

// The arithmetic is written in GCC's vector extensions (clang has them too), which the compiler lowers to what
// the target has (SSE / AVX2 / AVX512 / NEON). Two things measured on plain loops: once inlined, the nibble
// unpacking became byte-by-byte inserts, and unpacked bytes stored then reloaded at another width stalled on
// store forwarding (perf: q4_0 at 1.1 and 2.1 GB/s against q8_0's 17). Here weights are unpacked in registers,
// 16 at a time, and each 16 products are folded into 8 int32 lanes (exact) that are scaled and accumulated in
// 8 fp32 lanes: one horizontal sum per output, not one per block.
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));

template <typename V>
inline V load_v(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
// 16 int8 products, exact, summed pairwise-by-halves into 8 int32 lanes
inline i32x8 dot16(i8x16 w, i8x16 x) {
  const i16x16 p = __builtin_convertvector(w, i16x16) * __builtin_convertvector(x, i16x16);  // |p| <= 127 * 127
  const i32x16 q = __builtin_convertvector(p, i32x16);
  i32x8 a, b;
  std::memcpy(&a, &q, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&q) + sizeof(a), sizeof(b));
  return a + b;
}
inline f32x8 to_f(i32x8 v) { return __builtin_convertvector(v, f32x8); }
inline float hsum(f32x8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Rows n0..n1 of W (layout kind) times the M quantized input rows; out[m * ldo + n] in fp32
template <int M>
void gemv_rows(int64_t kind, const uint8_t* qs, const c10::Half* d, int64_t n0, int64_t n1, const Rows& r, float* out,
               int64_t ldo) {
  const int64_t K = r.K, nb = r.nb, rb = row_bytes(kind, K);
  const int8_t* xq = r.xq.data();
  const float* dx = r.dx.data();
  const int32_t* sx = r.sx.data();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = qs + n * rb;
    f32x8 acc[M];
    float mins[M];
    for (int m = 0; m < M; ++m) {
      acc[m] = f32x8{};
      mins[m] = 0.f;
    }
    if (kind == 1 || kind == 2) {
      for (int64_t b = 0; b < nb; ++b) {
        const float wd = static_cast<float>(d[n * nb + b]);
        i8x16 w0, w1;
        if (kind == 1) {
          w0 = load_v<i8x16>(w + b * QB);
          w1 = load_v<i8x16>(w + b * QB + 16);
        } else {  // byte j: element j in the low nibble, j + 16 in the high, both offset by 8
          const u8x16 v = load_v<u8x16>(w + b * 16);
          w0 = (i8x16)((v & 15) - 8);
          w1 = (i8x16)((v >> 4) - 8);
        }
        for (int m = 0; m < M; ++m) {
          const int8_t* x = xq + m * K + b * QB;
          acc[m] += to_f(dot16(w0, load_v<i8x16>(x)) + dot16(w1, load_v<i8x16>(x + 16))) * (wd * dx[m * nb + b]);
        }
      }
    } else if (kind == 3) {  // sub-block j (32 weights) is input block j: dx * (d sc sum(q x) - dmin m sum(x))
      for (int64_t t = 0; t < K / QK; ++t) {
        const uint8_t* blk = w + t * Q4K;
        const float dd = kq_half_at(blk), dmin = kq_half_at(blk + 2);
        int sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        i8x16 q[16];  // bytes 32c.. hold sub-block 2c in their low nibbles, 2c + 1 in their high ones
        for (int c = 0; c < 4; ++c)
          for (int h = 0; h < 2; ++h) {
            const u8x16 v = load_v<u8x16>(blk + 16 + 32 * c + 16 * h);
            q[4 * c + h] = (i8x16)(v & 15);
            q[4 * c + 2 + h] = (i8x16)(v >> 4);
          }
        for (int m = 0; m < M; ++m) {
          const int8_t* x = xq + m * K + t * QK;
          const int64_t b0 = m * nb + t * 8;
          for (int j = 0; j < 8; ++j) {
            const float s = dx[b0 + j];
            acc[m] += to_f(dot16(q[2 * j], load_v<i8x16>(x + 32 * j)) + dot16(q[2 * j + 1], load_v<i8x16>(x + 32 * j + 16))) *
                      (s * (dd * static_cast<float>(sc[j])));
            mins[m] += s * (dmin * static_cast<float>(mn[j])) * static_cast<float>(sx[b0 + j]);
          }
        }
      }
    } else {  // q6_k: element 128h + 32g + l takes 4 bits of ql (bytes 64h + 32(g % 2) + l, low nibble for g < 2)
      // and 2 bits of qh (byte 128 + 32h + l, bits 2g..2g+1), minus 32; sub-blocks of 16, int8 scales
      for (int64_t t = 0; t < K / QK; ++t) {
        const uint8_t* blk = w + t * Q6K;
        const float dd = kq_half_at(blk + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        i8x16 q[16];  // sub-block i = elements 16i..16i+15
        for (int h = 0; h < 2; ++h)
          for (int k = 0; k < 2; ++k) {  // l in 16k..16k+15
            const u8x16 l0 = load_v<u8x16>(blk + 64 * h + 16 * k), l1 = load_v<u8x16>(blk + 64 * h + 32 + 16 * k);
            const u8x16 qh = load_v<u8x16>(blk + 128 + 32 * h + 16 * k);
            q[8 * h + k] = (i8x16)(((l0 & 15) | ((qh & 3) << 4)) - 32);
            q[8 * h + 2 + k] = (i8x16)(((l1 & 15) | (((qh >> 2) & 3) << 4)) - 32);
            q[8 * h + 4 + k] = (i8x16)(((l0 >> 4) | (((qh >> 4) & 3) << 4)) - 32);
            q[8 * h + 6 + k] = (i8x16)(((l1 >> 4) | (((qh >> 6) & 3) << 4)) - 32);
          }
        for (int m = 0; m < M; ++m) {
          const int8_t* x = xq + m * K + t * QK;
          const int64_t b0 = m * nb + t * 8;
          for (int j = 0; j < 8; ++j) {
            const float s = dx[b0 + j];
            acc[m] += to_f(dot16(q[2 * j], load_v<i8x16>(x + 32 * j))) * (s * (dd * static_cast<float>(sc[2 * j]))) +
                      to_f(dot16(q[2 * j + 1], load_v<i8x16>(x + 32 * j + 16))) * (s * (dd * static_cast<float>(sc[2 * j + 1])));
          }
        }
      }
    }
    for (int m = 0; m < M; ++m) out[m * ldo + n] = hsum(acc[m]) - mins[m];
  }
}

void check_layout(const at::Tensor& qs, const at::Tensor& d, int64_t kind, int64_t K, const char* who) {
  TORCH_CHECK(kind >= 1 && kind <= 4, who, ": kind must be 1 (q8_0), 2 (q4_0), 3 (q4_k) or 4 (q6_k), got ", kind);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.element_size() == 1, who, ": qs must be contiguous bytes [N, row bytes]");
  TORCH_CHECK(K % (kind <= 2 ? QB : QK) == 0 && qs.size(1) == row_bytes(kind, K), who, ": ", K, " columns do not match weights ",
              qs.sizes(), " of layout ", kind);
  if (kind <= 2)
    TORCH_CHECK(d.dim() == 2 && d.is_contiguous() && d.scalar_type() == at::kHalf && d.size(0) == qs.size(0) &&
                    d.size(1) == K / QB, who, ": d must be contiguous fp16 [N, K/32], got ", d.sizes());
}

at::Tensor portable_gemv(const at::Tensor& x_, const at::Tensor& qs, const at::Tensor& d, int64_t kind, bool out_fp32) {
  TORCH_CHECK(x_.dim() == 2 && x_.size(0) >= 1, "portable_gemv: x must be [M, K] with M >= 1");
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 || x_.scalar_type() == at::kFloat, "portable_gemv: x must be bf16 or fp32");
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  check_layout(qs, d, kind, K, "portable_gemv");
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const uint8_t* q = static_cast<const uint8_t*>(qs.data_ptr());
  const c10::Half* dp = kind <= 2 ? d.data_ptr<c10::Half>() : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += 8) {  // 8 rows at a time: each weight block read once for all of them
    const int64_t rows = std::min<int64_t>(8, M - m0);
    Rows r;
    if (x.scalar_type() == at::kBFloat16)
      quantize_rows(x.data_ptr<c10::BFloat16>() + m0 * K, rows, K, r);
    else
      quantize_rows(x.data_ptr<float>() + m0 * K, rows, K, r);
    float* om = o + m0 * N;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      switch (rows) {
        case 1: gemv_rows<1>(kind, q, dp, n0, n1, r, om, N); break;
        case 2: gemv_rows<2>(kind, q, dp, n0, n1, r, om, N); break;
        case 3: gemv_rows<3>(kind, q, dp, n0, n1, r, om, N); break;
        case 4: gemv_rows<4>(kind, q, dp, n0, n1, r, om, N); break;
        case 5: gemv_rows<5>(kind, q, dp, n0, n1, r, om, N); break;
        case 6: gemv_rows<6>(kind, q, dp, n0, n1, r, om, N); break;
        case 7: gemv_rows<7>(kind, q, dp, n0, n1, r, om, N); break;
        default: gemv_rows<8>(kind, q, dp, n0, n1, r, om, N); break;
      }
    });
  }
  return out_fp32 ? out : out.to(x.scalar_type());
}

// One row of K weights in fp32, the reference's operations (formats.dequantize / kquants.dequantize_*): fp-contract
// off, so d * sc * q - dmin * m rounds after the multiply as the reference does, and the bf16 of it is the same.
__attribute__((optimize("fp-contract=off"))) void dequant_row(int64_t kind, const uint8_t* w, const c10::Half* d, int64_t K,
                                                             float* out) {
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
      int sc[8], mn[8];
      q4k_scales(blk + 4, sc, mn);
      for (int c = 0; c < 4; ++c) {
        const uint8_t* q = blk + 16 + 32 * c;
        const float d0 = dd * static_cast<float>(sc[2 * c]), m0 = dmin * static_cast<float>(mn[2 * c]);
        const float d1 = dd * static_cast<float>(sc[2 * c + 1]), m1 = dmin * static_cast<float>(mn[2 * c + 1]);
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
          for (int l = 0; l < 32; ++l) {
            const int q = ((lq[l] >> shift_lo) & 15) | (((hq[l] >> shift_hi) & 3) << 4);
            o[l] = (dd * static_cast<float>(sc[(128 * h + 32 * g + l) / 16])) * static_cast<float>(q - 32);
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

std::tuple<at::Tensor, at::Tensor> portable_quantize_weights(const at::Tensor& w, int64_t bits) {
  return qfit::quantize_weights_tensor(w, bits);
}
at::Tensor portable_quantize_k(const at::Tensor& w, int64_t kind) { return qfit::quantize_k_tensor(w, kind); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("portable_gemv(Tensor x, Tensor qs, Tensor d, int kind, bool out_fp32) -> Tensor");
  m.def("portable_dequant_bf16_out(Tensor qs, Tensor d, int kind, Tensor(a!) out) -> ()");
  m.def("portable_quantize_weights(Tensor w, int bits) -> (Tensor, Tensor)");
  m.def("portable_quantize_k(Tensor w, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) {
  m.impl("portable_gemv", &portable_gemv);
  m.impl("portable_dequant_bf16_out", &portable_dequant_bf16_out);
  m.impl("portable_quantize_weights", &portable_quantize_weights);
  m.impl("portable_quantize_k", &portable_quantize_k);
}
