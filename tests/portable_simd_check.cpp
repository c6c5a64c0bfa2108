// Each helper of qwen35/ops/kernels/portable_simd.h against its scalar definition, bit for bit, on random and
// extreme operands: built by tests/test_portable_simd.py for several targets (x86-64, x86-64-v3, this CPU; ARM
// with and without sdot, run under qemu). Prints the target's paths and "ok", or the first mismatch (exit 1).
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "portable_simd.h"

using namespace psimd;

static uint64_t seed = 0x9E3779B97F4A7C15ull;
static uint32_t next() {  // xorshift64*: the same operands on every target
  seed ^= seed >> 12;
  seed ^= seed << 25;
  seed ^= seed >> 27;
  return static_cast<uint32_t>((seed * 0x2545F4914F6CDD1Dull) >> 32);
}
static int failures = 0;
#define CHECK(cond, ...)                              \
  do {                                                \
    if (!(cond) && failures++ < 5) {                  \
      std::printf("MISMATCH %s: ", #cond);            \
      std::printf(__VA_ARGS__);                       \
      std::printf("\n");                              \
    }                                                 \
  } while (0)

static bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

// exp8's definition in scalar fp32: the clamp, n = x log2(e) rounded to nearest even, the two-part reduction, the
// polynomial, times 2^n
static float exp_ref(float x) {
  x = x > 88.3f ? 88.3f : x;
  x = x < -87.3f ? -87.3f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + (r + 1.f);
  return p * std::ldexp(1.f, static_cast<int>(n));
}
// c10::BFloat16's rounding of an fp32 (nearest even; NaN to 0x7FC0), widened back to fp32
static float bf16_ref(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = std::isnan(v) ? 0x7FC00000u : ((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

int main() {
#if defined(__AVX2__)
  std::printf("dot products: AVX2\n");
#elif defined(__ARM_FEATURE_DOTPROD)
  std::printf("dot products: sdot\n");
#else
  std::printf("dot products: generic\n");
#endif
  for (int trial = 0; trial < 20000; ++trial) {
    // operands: random, or the extremes the comments promise (weights -128 / 127, inputs -127 / 127)
    int8_t w[32], x[32];
    uint8_t u[32];
    const int mode = trial % 4;
    for (int i = 0; i < 32; ++i) {
      w[i] = mode == 1 ? -128 : mode == 2 ? 127 : static_cast<int8_t>(next());
      x[i] = mode == 1 || mode == 2 ? (i % 2 ? 127 : -127) : static_cast<int8_t>(static_cast<int>(next() % 255) - 127);
      u[i] = mode == 1 ? 127 : static_cast<uint8_t>(next() % (mode == 3 ? 16 : 128));
    }
    int32_t lo = 0, hi = 0, ulo = 0, uhi = 0;
    for (int i = 0; i < 32; ++i) {
      (i < 16 ? lo : hi) += w[i] * x[i];
      (i < 16 ? ulo : uhi) += u[i] * x[i];
    }
    const i32x8 d = dot32(load_v<i8x32>(w), load_v<i8x32>(x));
    const i32x8 du = dot32u(load_v<u8x32>(u), load_v<i8x32>(x));
    CHECK(d[0] + d[1] + d[2] + d[3] == lo && d[4] + d[5] + d[6] + d[7] == hi, "dot32 trial %d", trial);
    CHECK(du[0] + du[1] + du[2] + du[3] == ulo && du[4] + du[5] + du[6] + du[7] == uhi, "dot32u trial %d", trial);
    {  // fold4u: fold4 of four dot32u, weights of 4 bits (nibbles) and of 6 (q6_k), extremes included
      uint8_t q4[4][32], q6[4][32];
      int8_t xs[4][32];
      for (int k = 0; k < 4; ++k)
        for (int i = 0; i < 32; ++i) {
          q4[k][i] = mode == 1 ? 15 : static_cast<uint8_t>(next() % 16);
          q6[k][i] = mode == 1 ? 63 : static_cast<uint8_t>(next() % 64);
          xs[k][i] = mode == 1 ? 127 : mode == 2 ? -127 : static_cast<int8_t>(static_cast<int>(next() % 255) - 127);
        }
      const uint8_t(*qs[2])[32] = {q4, q6};
      for (int b = 0; b < 2; ++b) {
        i32x8 want{};
        for (int k = 0; k < 4; ++k)
          for (int i = 0; i < 32; ++i) want[k + (i < 16 ? 0 : 4)] += qs[b][k][i] * xs[k][i];
        const u8x32 a0 = load_v<u8x32>(qs[b][0]), a1 = load_v<u8x32>(qs[b][1]), a2 = load_v<u8x32>(qs[b][2]),
                    a3 = load_v<u8x32>(qs[b][3]);
        const i8x32 y0 = load_v<i8x32>(xs[0]), y1 = load_v<i8x32>(xs[1]), y2 = load_v<i8x32>(xs[2]),
                    y3 = load_v<i8x32>(xs[3]);
        const i32x8 got = b == 0 ? fold4u<4>(a0, y0, a1, y1, a2, y2, a3, y3) : fold4u<6>(a0, y0, a1, y1, a2, y2, a3, y3);
        for (int l = 0; l < 8; ++l) CHECK(got[l] == want[l], "fold4u<%d> lane %d trial %d", b ? 6 : 4, l, trial);
      }
    }

    i32x8 v[4];
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 8; ++l) v[k][l] = static_cast<int32_t>(next() % 2000001) - 1000000;
    const i32x8 f = fold4(v[0], v[1], v[2], v[3]);
    for (int k = 0; k < 4; ++k) {
      CHECK(f[k] == v[k][0] + v[k][1] + v[k][2] + v[k][3], "fold4 lane %d trial %d", k, trial);
      CHECK(f[k + 4] == v[k][4] + v[k][5] + v[k][6] + v[k][7], "fold4 lane %d trial %d", k + 4, trial);
    }

    uint8_t sb[16];  // q4_k's 12 scale bytes (and 4 more read beside them)
    for (int i = 0; i < 16; ++i) sb[i] = static_cast<uint8_t>(next());
    const float dd = static_cast<float>(next() % 1000) / 977.f, dmin = static_cast<float>(next() % 1000) / 1013.f;
    f32x8 scale, minv;
    q4k_scales8(sb, dd, dmin, scale, minv);
    for (int j = 0; j < 4; ++j) {  // kquants.q4_k_scales
      const int sc[2] = {sb[j] & 63, (sb[j + 8] & 0xF) | ((sb[j] >> 6) << 4)};
      const int mn[2] = {sb[j + 4] & 63, (sb[j + 8] >> 4) | ((sb[j + 4] >> 6) << 4)};
      for (int h = 0; h < 2; ++h) {
        CHECK(same_bits(scale[j + 4 * h], static_cast<float>(sc[h]) * dd), "q4k scale %d trial %d", j + 4 * h, trial);
        CHECK(same_bits(minv[j + 4 * h], static_cast<float>(mn[h]) * dmin), "q4k min %d trial %d", j + 4 * h, trial);
      }
    }
    // q6_k: its 16 int8 sub-block scales, half h in fold4's order 8h + {0, 2, 4, 6, 1, 3, 5, 7}, times d
    int8_t s6[16];
    for (int i = 0; i < 16; ++i) s6[i] = mode == 1 ? -128 : mode == 2 ? 127 : static_cast<int8_t>(next());
    const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    for (int h = 0; h < 2; ++h) {
      const f32x8 s = q6k_scales8(s6, h, dd);
      for (int l = 0; l < 8; ++l)
        CHECK(same_bits(s[l], static_cast<float>(s6[8 * h + order[l]]) * dd), "q6k scale %d half %d trial %d", l, h, trial);
    }
    uint64_t b8 = static_cast<uint64_t>(next()) << 32 | next();
    if (mode == 1) b8 = ~0ull;
    const f32x8 bf = bytes8_to_f(b8);
    for (int l = 0; l < 8; ++l) CHECK(same_bits(bf[l], static_cast<float>((b8 >> (8 * l)) & 255)), "bytes8 lane %d", l);
    f32x8 a;
    for (int l = 0; l < 8; ++l) a[l] = static_cast<float>(next());
    f32x8 hv;  // values of mixed sign and magnitude, so that any other order of the sum rounds differently
    for (int l = 0; l < 8; ++l) hv[l] = static_cast<float>(static_cast<int32_t>(next())) * std::ldexp(1.f, static_cast<int>(next() % 40) - 20);
    const float want = ((hv[0] + hv[1]) + (hv[2] + hv[3])) + ((hv[4] + hv[5]) + (hv[6] + hv[7]));
    CHECK(same_bits(hsum(hv), want), "hsum trial %d", trial);
    const f32x4 s4 = sum4(a, hv, a + hv, hv * hv);
    const f32x8 four[4] = {a, hv, a + hv, hv * hv};
    for (int i = 0; i < 4; ++i) {
      const f32x8 u = four[i];
      CHECK(same_bits(s4[i], ((u[0] + u[1]) + (u[2] + u[3])) + ((u[4] + u[5]) + (u[6] + u[7]))), "sum4 lane %d", i);
    }
    for (int h = 0; h < 2; ++h) {
      const f32x8 t = twice(a, h);
      for (int l = 0; l < 8; ++l) CHECK(same_bits(t[l], a[4 * h + l % 4]), "twice lane %d", l);
    }
  }
  // exp8 against its scalar definition bit for bit, and within 3 ulp of the C library's expf over the unclamped
  // range; beyond it the clamp's values; NaN stays NaN
  for (int trial = 0; trial < 20000; ++trial) {
    f32x8 x;
    for (int l = 0; l < 8; ++l) x[l] = -87.f + 175.f * static_cast<float>(next() >> 8) / 16777216.f;
    if (trial % 3 == 1)
      for (int l = 0; l < 8; ++l) x[l] = (x[l] - 0.5f) / 8.f;  // near 0, where SiLU's exponentials mostly are
    const f32x8 e = exp8(x);
    for (int l = 0; l < 8; ++l) {
      CHECK(same_bits(e[l], exp_ref(x[l])), "exp8 lane %d x %.9g: %.9g vs %.9g", l, x[l], e[l], exp_ref(x[l]));
      const double want = std::exp(static_cast<double>(x[l]));
      CHECK(std::fabs(e[l] - want) <= 3 * want * 0x1p-24, "exp8 x %.9g: %.9g vs %.9g", x[l], e[l], want);
    }
  }
  {
    const f32x8 e = exp8(f32x8{-1e30f, -100.f, 100.f, 1e30f, NAN, -87.3f, 88.3f, 0.f});
    CHECK(same_bits(e[0], exp_ref(-87.3f)) && same_bits(e[1], exp_ref(-87.3f)), "exp8 below the range");
    CHECK(same_bits(e[2], exp_ref(88.3f)) && same_bits(e[3], exp_ref(88.3f)) && std::isfinite(e[3]), "exp8 above");
    CHECK(std::isnan(e[4]) && e[7] == 1.f, "exp8 of NaN and 0");
  }
  // round_bf16x8 against c10's rule on random bit patterns (NaNs, infinities, ties and subnormals among them)
  for (int trial = 0; trial < 20000; ++trial) {
    f32x8 v;
    for (int l = 0; l < 8; ++l) {
      uint32_t u = next();
      if (l == 1) u = (u & 0xFFFF0000u) | 0x8000u;          // a tie
      if (l == 2) u = 0x7F800000u | (u & 0x807FFFFFu);      // inf or NaN
      if (l == 3) u &= 0x807FFFFFu;                         // subnormal
      std::memcpy(&v[l], &u, 4);
    }
    const f32x8 r = round_bf16x8(v);
    for (int l = 0; l < 8; ++l) CHECK(same_bits(r[l], bf16_ref(v[l])), "round_bf16x8 lane %d trial %d", l, trial);
  }
  // every fp16 bit pattern, against the hardware's or the standard's conversion
  for (uint32_t h = 0; h < 65536; h += 4) {
    uint16_t p[4];
    for (int k = 0; k < 4; ++k) p[k] = static_cast<uint16_t>(h + k);
    const f32x8 s = halves4(p);
    for (int k = 0; k < 8; ++k) {
      const float want = half_to_float(p[k % 4]);
      const uint32_t e = (p[k % 4] >> 10) & 31, m = p[k % 4] & 1023;
      // the reference value by arithmetic: (-1)^s 2^(e-15) (1 + m/1024), subnormals 2^-14 m/1024
      const double ref = (p[k % 4] & 0x8000 ? -1.0 : 1.0) *
                         (e == 0 ? std::ldexp(static_cast<double>(m), -24) : std::ldexp(1.0 + m / 1024.0, static_cast<int>(e) - 15));
      if (e == 31) {
        CHECK(m ? std::isnan(s[k]) : (std::isinf(s[k]) && std::signbit(s[k]) == std::signbit(want)), "halves4 %x", p[k % 4]);
      } else {
        CHECK(same_bits(s[k], want) && static_cast<double>(want) == ref, "halves4 %x: %g vs %g", p[k % 4], s[k], ref);
      }
    }
  }
  // half1 (one fp16: F16C's instruction or the same arithmetic) on every bit pattern: halves4's values
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = half1(static_cast<uint16_t>(h)), want = half_to_float(static_cast<uint16_t>(h));
    CHECK(std::isnan(want) ? std::isnan(got) : same_bits(got, want), "half1 %x", h);
  }
  // widen8: every int8 value in every lane (the bytes rotated through the lanes)
  for (int start = 0; start < 256; ++start) {
    int8_t b[8];
    for (int l = 0; l < 8; ++l) b[l] = static_cast<int8_t>(static_cast<uint8_t>(start + 37 * l));
    const f32x8 w = widen8(b);
    for (int l = 0; l < 8; ++l) CHECK(same_bits(w[l], static_cast<float>(b[l])), "widen8 lane %d byte %d", l, b[l]);
  }
  // bf16x8 and store_bf16x8 on random bit patterns (NaNs and infinities among them): a bf16's bits are the top
  // half of its fp32, both ways
  for (int trial = 0; trial < 4000; ++trial) {
    uint16_t h[8], back[8];
    for (int l = 0; l < 8; ++l) h[l] = static_cast<uint16_t>(next());
    const f32x8 f = bf16x8(h);
    for (int l = 0; l < 8; ++l) {
      uint32_t u;
      std::memcpy(&u, &f[l], 4);
      CHECK(u == static_cast<uint32_t>(h[l]) << 16, "bf16x8 lane %d bits %x", l, h[l]);
    }
    store_bf16x8(back, f);
    for (int l = 0; l < 8; ++l) CHECK(back[l] == h[l], "store_bf16x8 lane %d bits %x", l, h[l]);
  }
  if (failures) {
    std::printf("%d mismatches\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
