// What quant_kernels.cpp (q8_0 / q4_0) and quant_k_kernels.cpp (q4_k / q6_k) share: the one rule by which an
// input row is quantized on the fly (per block of 32: scale max|x|/127, round half away from zero, as
// quant/formats.reference_matmul does; the kernels' results equal that reference only while both files use
// it), where results are written, and the dispatch on the number of input rows. Included by both; the kernel
// build hashes it with the sources (ops/kernels/__init__.py), so a change here rebuilds them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cpuid.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace qwen35_qc {

constexpr int64_t QB = 32;  // inputs (and q8_0 / q4_0 weights) per quantization block

// Whether the GEMVs prefetch their weight stream 2 KiB ahead in software. On Intel (Sapphire Rapids class,
// measured: the bf16 GEMV over the 248320x1024 head 20 -> 22 GB/s with one input row, 13.5 -> 15.5 GB/s with
// four; a speculative verify round on the 0.8B shape ~20% faster) one core's hardware prefetcher keeps too few
// lines in flight; on Zen 4 the hardware prefetcher alone measured best. QWEN35_GEMV_PREFETCH=0/1 overrides.
inline bool gemv_prefetch() {
  static const bool on = [] {
    if (const char* e = std::getenv("QWEN35_GEMV_PREFETCH")) return e[0] == '1';
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;  // "GenuineIntel"
  }();
  return on;
}
constexpr int64_t kGemvPrefetch = 2048;  // bytes ahead

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// C's roundf (halves away from zero), exactly: truncate, then step away where the dropped part is >= 0.5
// (v - trunc(v) is exact in fp32)
inline __m512 round_away(__m512 v) {
  const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512 one = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_set1_ps(1.f)), sign));
  return _mm512_mask_add_ps(t, up, t, one);
}
inline __m512 clamp127(__m512 v) { return _mm512_max_ps(_mm512_set1_ps(-127.f), _mm512_min_ps(_mm512_set1_ps(127.f), v)); }

// One input block of 32 values at x: its scale d and its quantized values as 16 int32 each (elements 0-15, 16-31).
struct Block32 {
  float d;
  __m512i q0, q1;
};
template <typename T>
inline Block32 quantize_block32(const T* x) {
  const __m512 v0 = load16(x), v1 = load16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / 127.f, inv = d != 0.f ? 1.f / d : 0.f;
  const __m512 vi = _mm512_set1_ps(inv);
  return {d, _mm512_cvtps_epi32(clamp127(round_away(_mm512_mul_ps(v0, vi)))),
          _mm512_cvtps_epi32(clamp127(round_away(_mm512_mul_ps(v1, vi))))};
}

// The fp16 stored (unaligned) at p, as fp32: the K-quants' d and dmin sit inside each super-block's bytes
inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Bytes of one weight row of K values in a layout (the kernels' codes: 1 = q8_0, 2 = q4_0, 3 = q4_k, 4 = q6_k)
inline int64_t row_bytes(int64_t kind, int64_t K) {
  return kind == 1 ? K : kind == 2 ? K / 2 : K / 256 * (kind == 3 ? 144 : 210);
}

constexpr int Q4K_ORDER[8] = {0, 2, 1, 3, 4, 6, 5, 7};  // kernel position k holds input block Q4K_ORDER[k]

// Q4_K's 12 bytes -> its 8 scales and 8 mins as bytes sc0-3, mn0-3, sc4-7, mn4-7 (6 bits each). Scalar 64-bit
// arithmetic (it runs on the integer ports, beside the vector work): bytes 0-7 hold the low 6 bits of scales 0-3
// and mins 0-3 and, in their top 2 bits, the high bits of scales / mins 4-7, whose low nibbles are bytes 8-11.
inline __m128i q4k_scales_mins_raw(const uint8_t* p) {
  uint64_t u01;
  uint32_t u2;
  std::memcpy(&u01, p, 8);
  std::memcpy(&u2, p + 8, 4);
  const uint64_t lo = u01 & 0x3F3F3F3F3F3F3F3Full;  // sc0-3, mn0-3
  const uint64_t top = (u01 >> 6) & 0x0303030303030303ull;
  const uint64_t nib = (static_cast<uint64_t>((u2 >> 4) & 0x0F0F0F0Fu) << 32) | (u2 & 0x0F0F0F0Fu);
  const uint64_t hi = nib | (top << 4);  // sc4-7, mn4-7
  return _mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo));
}

// The same as 8 scales (bytes 0-7) and 8 mins (bytes 8-15), each in kernel block order (Q4K_ORDER)
inline __m128i q4k_scales_mins(const uint8_t* p) {
  return _mm_shuffle_epi8(q4k_scales_mins_raw(p), _mm_setr_epi8(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15));
}
// Where results go: fp32 or bf16, out[m * ld + n], resolved once per call (not per element: Tensor
// accessors cost more than a row's whole dot product). ld > N when the result is a column block of a wider
// output (one part of a fused projection, written in place by the whole-layer kernels).
struct Out {
  float* f = nullptr;
  c10::BFloat16* h = nullptr;
  int64_t ld = 0;
  Out() = default;
  explicit Out(at::Tensor& t) : ld(t.size(1)) {
    if (t.scalar_type() == at::kFloat) f = t.data_ptr<float>(); else h = t.data_ptr<c10::BFloat16>();
  }
  Out(c10::BFloat16* p, int64_t ld_) : h(p), ld(ld_) {}
  void store(int64_t m, int64_t n, float v) const {
    if (f) f[m * ld + n] = v; else h[m * ld + n] = static_cast<c10::BFloat16>(v);
  }
};

}  // namespace qwen35_qc

// The kernels are templates on the number of input rows R (1..8): one switch turns a runtime M into R.
#define QWEN35_DISPATCH_M(M, CALL)                    \
  switch (M) {                                        \
    case 1: { constexpr int R = 1; CALL; break; }     \
    case 2: { constexpr int R = 2; CALL; break; }     \
    case 3: { constexpr int R = 3; CALL; break; }     \
    case 4: { constexpr int R = 4; CALL; break; }     \
    case 5: { constexpr int R = 5; CALL; break; }     \
    case 6: { constexpr int R = 6; CALL; break; }     \
    case 7: { constexpr int R = 7; CALL; break; }     \
    default: { constexpr int R = 8; CALL; break; }    \
  }
