// The vector helpers of portable_kernels.cpp, apart so that they can be built and checked without torch:
// tests/portable_simd_check.cpp runs each against its scalar definition, for x86 targets natively and for ARM
// (with and without sdot) under qemu. Nothing here depends on ATen.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace psimd {

// The arithmetic is written in GCC's vector extensions (clang has them too), which the compiler lowers to what
// the target has (SSE / AVX2 / AVX512 / NEON), except the one operation no compiler finds by itself: the int8 dot
// product, hand-written where the CPU has one (AVX2 vpmaddubsw + vpmaddwd; ARM's sdot), generic otherwise.
// Measured on plain loops: once inlined, the nibble unpacking became byte-by-byte inserts, and unpacked bytes
// stored then reloaded at another width stalled on store forwarding (perf: q4_0 at 1.1 and 2.1 GB/s against
// q8_0's 17). Here 32 weights are unpacked in registers at a time, their 32 products folded into 8 int32 lanes
// (exact) that are scaled and accumulated in 8 fp32 lanes: one horizontal sum per output, not one per block.
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x32 __attribute__((vector_size(32)));
typedef int8_t i8x32 __attribute__((vector_size(32)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));

template <typename V>
inline V load_v(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename H>
inline V join(H lo, H hi) {  // two half vectors side by side
#if defined(__AVX2__)
  return (V)_mm256_set_m128i((__m128i)hi, (__m128i)lo);
#else
  V v;
  std::memcpy(&v, &lo, sizeof(H));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(H), &hi, sizeof(H));
  return v;
#endif
}

// The 32 products w[i] * x[i] of int8 vectors, exact, in 8 int32 lanes: lanes 0-3 hold the sum over elements
// 0-15 and lanes 4-7 over 16-31 (q6_k scales the halves apart). Weights and inputs are in [-128, 127] and
// [-127, 127]: a pair of products fits vpmaddubsw's int16 (2 * 128 * 127 < 32767).
inline i32x8 dot32(i8x32 w, i8x32 x) {
#if defined(__AVX2__)
  const __m256i a = (__m256i)w, b = (__m256i)x;
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));  // |w| * (x * sign w)
  return (i32x8)_mm256_madd_epi16(p, _mm256_set1_epi16(1));
#elif defined(__ARM_FEATURE_DOTPROD)
  const int8x16_t* wp = reinterpret_cast<const int8x16_t*>(&w);
  const int8x16_t* xp = reinterpret_cast<const int8x16_t*>(&x);
  return join<i32x8>((i32x4)vdotq_s32(vdupq_n_s32(0), wp[0], xp[0]), (i32x4)vdotq_s32(vdupq_n_s32(0), wp[1], xp[1]));
#else
  i32x4 h[2];
  for (int k = 0; k < 2; ++k) {
    i8x16 wk, xk;
    std::memcpy(&wk, reinterpret_cast<const char*>(&w) + 16 * k, 16);
    std::memcpy(&xk, reinterpret_cast<const char*>(&x) + 16 * k, 16);
    const i32x16 q = __builtin_convertvector(__builtin_convertvector(wk, i16x16) * __builtin_convertvector(xk, i16x16),
                                             i32x16);  // |w x| <= 128 * 127
    i32x4 part[4];
    std::memcpy(part, &q, sizeof(q));
    h[k] = part[0] + part[1] + part[2] + part[3];
  }
  return join<i32x8>(h[0], h[1]);
#endif
}
// The same for weights in [0, 127] (q4_k's unsigned nibbles; its mins are subtracted apart): AVX2 multiplies
// unsigned by signed bytes without the sign juggling; elsewhere such weights are valid int8
inline i32x8 dot32u(u8x32 w, i8x32 x) {
#if defined(__AVX2__)
  return (i32x8)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)w, (__m256i)x), _mm256_set1_epi16(1));
#else
  return dot32((i8x32)w, x);  // nibbles are valid int8
#endif
}
// Four dot32 results folded into one vector: lanes 0-3 hold the sums of the halves 0-15 of a, b, c, e, lanes 4-7
// those of their halves 16-31 (vphaddd, ARM's addp). One conversion and one multiply-add then scale four blocks.
inline i32x8 fold4(i32x8 a, i32x8 b, i32x8 c, i32x8 e) {
#if defined(__AVX2__)
  return (i32x8)_mm256_hadd_epi32(_mm256_hadd_epi32((__m256i)a, (__m256i)b), _mm256_hadd_epi32((__m256i)c, (__m256i)e));
#elif defined(__ARM_FEATURE_DOTPROD)
  int32x4_t h[8];
  const i32x8 v[4] = {a, b, c, e};
  std::memcpy(h, v, sizeof(v));  // h[2k] = lanes 0-3 of the k-th, h[2k + 1] = lanes 4-7
  return join<i32x8>((i32x4)vpaddq_s32(vpaddq_s32(h[0], h[2]), vpaddq_s32(h[4], h[6])),
                     (i32x4)vpaddq_s32(vpaddq_s32(h[1], h[3]), vpaddq_s32(h[5], h[7])));
#else
  const i32x8 v[4] = {a, b, c, e};
  i32x8 r;
  for (int k = 0; k < 4; ++k) {
    r[k] = v[k][0] + v[k][1] + v[k][2] + v[k][3];
    r[k + 4] = v[k][4] + v[k][5] + v[k][6] + v[k][7];
  }
  return r;
#endif
}
// fold4 of four dot32u products, for weights of at most Bits bits (q4_0 / q4_k nibbles: 4; q6_k: 6): the same
// integers, in the same lanes. With AVX2 the pairs vpmaddubsw leaves are summed in 16 bits while they fit, so fewer
// instructions widen them: for nibbles three vphaddw (sums of 8 products, |.| <= 8 * 15 * 127 < 2^15) and one
// vpmaddwd, for 6 bits one vphaddw each pair (4 products, <= 4 * 63 * 127), two vpmaddwd and one vphaddd; against
// four vpmaddwd and three vphaddd.
template <int Bits>
inline i32x8 fold4u(u8x32 q0, i8x32 x0, u8x32 q1, i8x32 x1, u8x32 q2, i8x32 x2, u8x32 q3, i8x32 x3) {
  static_assert(Bits <= 7, "fold4u: weights of at most 7 bits (vpmaddubsw's pairs must fit 16 bits)");
#if defined(__AVX2__)
  const __m256i p0 = _mm256_maddubs_epi16((__m256i)q0, (__m256i)x0), p1 = _mm256_maddubs_epi16((__m256i)q1, (__m256i)x1);
  const __m256i p2 = _mm256_maddubs_epi16((__m256i)q2, (__m256i)x2), p3 = _mm256_maddubs_epi16((__m256i)q3, (__m256i)x3);
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (Bits <= 4) {
    const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(p0, p1), _mm256_hadd_epi16(p2, p3));
    return (i32x8)_mm256_madd_epi16(h, ones);
  } else if constexpr (Bits <= 6) {
    return (i32x8)_mm256_hadd_epi32(_mm256_madd_epi16(_mm256_hadd_epi16(p0, p1), ones),
                                    _mm256_madd_epi16(_mm256_hadd_epi16(p2, p3), ones));
  }
#endif
  return fold4(dot32u(q0, x0), dot32u(q1, x1), dot32u(q2, x2), dot32u(q3, x3));
}

// Bytes shifted by N bits as 16-bit lanes (x86 has no byte shift): bits that cross into the neighbouring byte are
// the caller's to mask off; shr16<4> masks them itself (the high nibble of each byte)
typedef uint16_t u16x16 __attribute__((vector_size(32)));
template <int N>
inline u8x32 shl16(u8x32 v) { return (u8x32)((u16x16)v << N); }
template <int N>
inline u8x32 shr16(u8x32 v) {
  const u8x32 r = (u8x32)((u16x16)v >> N);
  return N == 4 ? r & 15 : r;
}
// x in all 8 lanes: one broadcast (the generic `f32x8{} + x` is an add of zero before it: -0 + 0 is not -0)
inline f32x8 splat8(float x) { return f32x8{x, x, x, x, x, x, x, x}; }
inline f32x8 to_f(i32x8 v) { return __builtin_convertvector(v, f32x8); }
// 8 int8 values as fp32 lanes (exact). GCC 12 lowers __builtin_convertvector from 8 int8 lanes to 8 fp32 lanes
// to eight scalar conversions, for x86-64-v3 and for ARM alike, which had made the portable attention over a q8_0
// cache 5x slower than over bf16 keys: the sign extension and conversion are spelled out where the target has them.
inline f32x8 widen8(const int8_t* p) {
#if defined(__AVX2__)
  return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#elif defined(__ARM_NEON)
  const int16x8_t w = vmovl_s8(vld1_s8(p));
  const float32x4_t lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), hi = vcvtq_f32_s32(vmovl_s16(vget_high_s16(w)));
  return join<f32x8>((f32x4)lo, (f32x4)hi);
#else
  typedef int8_t i8x8 __attribute__((vector_size(8)));
  return __builtin_convertvector(load_v<i8x8>(p), f32x8);
#endif
}
// 8 bf16 values (their bits at p) as fp32 lanes (a bf16 is the top half of an fp32). On x86 GCC 12 spells the
// generic form in six instructions (two 128-bit widenings, a lane insert, the shift); AVX2 widens 8 lanes from
// memory in one.
inline f32x8 bf16x8(const void* p) {
#if defined(__AVX2__)
  return (f32x8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  return (f32x8)(__builtin_convertvector(load_v<u16x8>(p), u32x8) << 16);
#endif
}
// 8 fp32 lanes already rounded to bf16 values (round_bf16x8) stored as 8 bf16 at p: their top halves
inline void store_bf16x8(void* p, f32x8 v) {
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  const u16x8 h = __builtin_convertvector((u32x8)v >> 16, u16x8);
  std::memcpy(p, &h, sizeof h);
}
// 8 unsigned bytes (little-endian in a uint64) as 8 fp32 lanes
inline f32x8 bytes8_to_f(uint64_t b) {
#if defined(__AVX2__)
  return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(b))));
#elif defined(__ARM_NEON)  // (GCC's generic form is 8 scalar conversions there too, as widen8's note says)
  const uint16x8_t w = vmovl_u8(vcreate_u8(b));
  return join<f32x8>((f32x4)vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))), (f32x4)vcvtq_f32_u32(vmovl_u16(vget_high_u16(w))));
#else
  typedef uint8_t u8x8 __attribute__((vector_size(8)));
  return __builtin_convertvector(__builtin_convertvector(load_v<u8x8>(&b), i32x8), f32x8);
#endif
}
// Q4_K's 12 scale bytes -> its 8 sub-block scales * d and 8 mins * dmin (kquants.q4_k_scales), as fp32 lanes.
// Bytes 0-3 hold scales 0-3 and the top 2 bits of scales 4-7, bytes 4-7 the same for the mins, bytes 8-11 the
// low nibbles of scales (low) and mins (high) 4-7: the 16 six-bit values are gathered in one 16-byte vector by two
// byte shuffles and masks ({scales 0-7, mins 0-7}), then widened 8 at a time. (Per-lane shuffles of 8-byte vectors
// had compiled to ~40 scalar inserts a super-block, and 32-bit scalar words to ~30 instructions: a third of the
// q4_k GEMV's instructions at one input row.)
inline void q4k_scales8(const uint8_t* b, float d, float dmin, f32x8& scale, f32x8& minv) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  const u8x16 v = load_v<u8x16>(b);  // 12 bytes wanted; the 4 after them are the block's own quants
  const u8x16 z{};
  // a: {b0-3, b8-11, b4-7, b8-11}: the six low bits (lanes 0-3, 8-11) or the nibble (4-7 low, 12-15 high)
  const u8x16 a = __builtin_shufflevector(v, z, 0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11);
  // t: {0, b0-3, 0, b4-7}: whose top two bits are bits 4-5 of scales and mins 4-7
  const u8x16 t = __builtin_shufflevector(v, z, 16, 16, 16, 16, 0, 1, 2, 3, 16, 16, 16, 16, 4, 5, 6, 7);
  const u8x16 low = a & u8x16{63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0};
  const u8x16 high = (u8x16)((u16x8)a >> 4) & u8x16{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15};
  const u8x16 top = (u8x16)((u16x8)t >> 2) & u8x16{0, 0, 0, 0, 48, 48, 48, 48, 0, 0, 0, 0, 48, 48, 48, 48};
  const u8x16 six = low | high | top;
  uint64_t sc, mn;
  std::memcpy(&sc, &six, 8);
  std::memcpy(&mn, reinterpret_cast<const char*>(&six) + 8, 8);
  scale = bytes8_to_f(sc) * d;
  minv = bytes8_to_f(mn) * dmin;
}
// Q6_K's 16 int8 sub-block scales of one half h (8 of them, 8h..8h+7) in the order fold4 leaves its sub-blocks:
// 8h + {0, 2, 4, 6, 1, 3, 5, 7}, as fp32 lanes times d
inline f32x8 q6k_scales8(const int8_t* sc, int h, float d) {
#if defined(__AVX2__)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc));
  const __m128i idx = h ? _mm_setr_epi8(8, 10, 12, 14, 9, 11, 13, 15, 0, 0, 0, 0, 0, 0, 0, 0)
                        : _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 0, 0, 0, 0, 0, 0, 0, 0);
  return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_shuffle_epi8(v, idx))) * d;
#else
  typedef int8_t i8x8 __attribute__((vector_size(8)));
  const i8x16 v = load_v<i8x16>(sc);
  const i8x8 s = h ? __builtin_shufflevector(v, v, 8, 10, 12, 14, 9, 11, 13, 15)
                   : __builtin_shufflevector(v, v, 0, 2, 4, 6, 1, 3, 5, 7);
  int8_t b[8];
  std::memcpy(b, &s, 8);
  return widen8(b) * d;
#endif
}
inline f32x8 twice(f32x8 v, int h) {  // lanes 4h..4h+3 of v, twice: {v[4h..4h+3], v[4h..4h+3]}
  return h ? __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7) : __builtin_shufflevector(v, v, 0, 1, 2, 3, 0, 1, 2, 3);
}
// 4 fp16 scales as fp32, twice: {s0, s1, s2, s3, s0, s1, s2, s3}
inline float half_to_float(uint16_t h) {  // IEEE fp16 bits -> fp32, exact (subnormals, inf, nan included)
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
  uint32_t bits;
  if (e == 31) {
    bits = sign | 0x7F800000u | (m << 13);
  } else if (e != 0) {
    bits = sign | ((e + 112) << 23) | (m << 13);
  } else {  // zero or subnormal: m * 2^-24, exact in fp32
    float f = static_cast<float>(m) * 0x1p-24f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float half1(uint16_t h) {  // one fp16 as fp32: F16C's instruction where the target has it
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return half_to_float(h);
#endif
}
inline f32x8 halves4(const uint16_t* p) {
#if defined(__F16C__)
  const f32x4 v = (f32x4)_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 0, 1, 2, 3);
#else
  const float s0 = half_to_float(p[0]), s1 = half_to_float(p[1]), s2 = half_to_float(p[2]), s3 = half_to_float(p[3]);
  return f32x8{s0, s1, s2, s3, s0, s1, s2, s3};
#endif
}
// Pairwise sums of two vectors' neighbouring lanes, as AVX's vhaddps: {x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7,
// y4+y5, y6+y7} (the compiler finds the instruction where there is one)
inline f32x8 hadd(f32x8 x, f32x8 y) {
  return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
}
// The sums of the lanes of four vectors, lane i of the result for the i-th: three pairwise steps for all four (a
// GEMV's output rows are summed four at a time), each as ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))
inline f32x4 sum4(f32x8 a, f32x8 b, f32x8 c, f32x8 d) {
  const f32x8 t = hadd(hadd(a, b), hadd(c, d));
  return __builtin_shufflevector(t, t, 0, 1, 2, 3) + __builtin_shufflevector(t, t, 4, 5, 6, 7);
}
// One vector's sum in the same order as sum4's lanes: a row's result does not depend on the rows summed beside it
inline float hsum(f32x8 v) { return sum4(v, f32x8{}, f32x8{}, f32x8{})[0]; }

// e^x in 8 lanes: Cephes' expf (the AVX512 library's exp512: range reduction by ln 2 in two parts, a degree-7
// polynomial, the exponent added in integer), here without fused multiply-adds; within ~2 ulp of expf. x is
// clamped to [-87.3, 88.3], where 2^n stays a normal fp32.
inline f32x8 exp8(f32x8 x) {
  const f32x8 hi = f32x8{} + 88.3f, lo = f32x8{} - 87.3f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const f32x8 magic = f32x8{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest even
  const f32x8 n = (x * 1.44269504088896341f + magic) - magic;
  f32x8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32x8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + (r + 1.f);
  return p * (f32x8)((__builtin_convertvector(n, i32x8) + 127) << 23);
}

// fp32 lanes rounded to bf16 (nearest even, NaN to 0x7FC0: c10::BFloat16's rule), kept as fp32 lanes
inline f32x8 round_bf16x8(f32x8 v) {
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  const u32x8 u = (u32x8)v;
  const u32x8 r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return (f32x8)(v != v ? u32x8{} + 0x7FC00000u : r);
}

}  // namespace psimd
