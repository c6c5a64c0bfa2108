// prefill_attn: causal attention of a prompt chunk over a row's keys (the cached ones and its own), on
// AVX512-BF16 dot products, for CPUs without AMX. torch's CPU flash attention hands its bf16 products to MKL,
// which on AMD runs them as fp32 SGEMMs (perf, Zen 4: 74% of its time in mkl_blas_def_sgemm_kernel_0_zen, ~180
// GFLOP/s): the chunk attention was a fifth of a 4,096-token prefill and grows with the prompt.
//
// What it computes is torch's flash attention for bf16 inputs: scores from exact bf16 products summed in fp32,
// a running max and sum per query (flash attention's online softmax over blocks of keys), probabilities
// rounded to bf16 for the P.V products (as torch's kernel does for reduced types; the sum taken over the
// rounded values, so numerator and denominator agree), fp32 output accumulators, one bf16 rounding at the end.
//
// Layout: the G query heads of a KV head share its keys, so their rows (position-major: row t * G + g) form one
// M dimension; groups of TG tiles of MR rows meet the keys in blocks of KB, each block packed once per group
// into L2 (the packing is ~1% of the products it feeds; packing a whole cache up front had cost a fresh
// allocation as large as the cache at every call, and at 32K keys lost to torch on short chunks):
// - scores: vdpbf16ps with 16 keys in the lanes, each lane a pair of head dims: the block's keys packed as
//   [keys / 16][D / 2][16] dwords (pairs of dims), the query pairs broadcast; 2 x 16 keys x MR rows of
//   accumulators;
// - P.V: 16 output dims in the lanes, each lane a pair of keys: the block's values packed as [keys / 2][D]
//   dwords (the two keys' values of one dim), the probability pairs broadcast; MR rows x 32 dims of
//   accumulators, the tile's fp32 output rescaled by the running max once per key block.
// Key blocks past a tile's last position are skipped; the block holding the diagonal masks the rest.
//
// prefill_attn_q8 is the same kernel over a q8_0 KV cache (kv_storage.py: int8 rows, one fp16 scale per 32
// values): each block of KB keys is dequantized as it is packed (q * d exact in fp32, rounded once to bf16, as
// kv_storage.dequantize_rows does), so it computes bit for bit what prefill_attn does over the dequantized cache
// without that cache ever existing (dequantizing a 128K-token prefix had taken 2.5x the layer's bf16 KV bytes
// transiently, per chunk, and more time than the attention at 64K).
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

#include "avx512_math.h"

namespace {

constexpr int MR = 8;        // query rows per tile
constexpr int64_t KB = 256;  // keys per block of the online softmax

using qwen35_math::exp512;
using qwen35_math::round_bf16;

// 16 x 16 dwords: r[i] (row i) -> r[j] holding column j of every row. Interleaves of dwords, then of qwords,
// give 4 x 4 blocks within 128-bit lanes; two rounds of lane shuffles finish the transpose (64 shuffles).
inline void transpose16x16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int k = 0; k < 8; ++k) {
    a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // b[4q + c], lane l: column 4l + c of rows 4q..4q+3
    b[4 * q] = _mm512_unpacklo_epi64(a[4 * q], a[4 * q + 2]);
    b[4 * q + 1] = _mm512_unpackhi_epi64(a[4 * q], a[4 * q + 2]);
    b[4 * q + 2] = _mm512_unpacklo_epi64(a[4 * q + 1], a[4 * q + 3]);
    b[4 * q + 3] = _mm512_unpackhi_epi64(a[4 * q + 1], a[4 * q + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4l + c: lane l of b[c], b[4 + c], b[8 + c], b[12 + c]
    const __m512i x0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// Where the keys (or values) of one KV head are read from: 32 bf16 values of a row (dims d0..d0 + 31) as one
// vector. Bf16Rows: the cache's own bf16 rows; Q8Rows: a q8_0 cache's int8 rows, dequantized on the way.
struct Bf16Rows {
  const c10::BFloat16* x;
  int64_t rs;  // row stride (elements)
  inline __m512i row32(int64_t s, int64_t d0) const { return _mm512_loadu_si512(x + s * rs + d0); }
};
struct Q8Rows {
  const int8_t* x;
  const c10::Half* d;
  int64_t rs, ds;  // row strides of the values and of their scales
  inline __m512i row32(int64_t s, int64_t d0) const {
    const int8_t* r = x + s * rs + d0;  // d0 % 32 == 0: one Q8_0 block, one scale
    const __m512 sc = _mm512_set1_ps(_cvtsh_ss(d[s * ds + d0 / 32].x));
    auto times_scale = [sc](const int8_t* p) {  // 16 values, q * d: exact in fp32 (8 bits times 11)
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), sc);
    };
    return (__m512i)_mm512_cvtne2ps_pbh(times_scale(r + 16), times_scale(r));  // nearest even: torch's rounding
  }
};

// Keys [s0, s0 + n) -> kp [ceil(n / 16)][D / 2][16] dwords (pairs of dims, 16 keys in the lanes), keys past n
// zero: 16 keys x 16 pairs of dims transposed in registers at a time
template <class Rows>
void pack_keys(const Rows& k, int64_t s0, int64_t n, int64_t D, uint32_t* kp) {
  const int64_t groups = (n + 15) / 16, P = D / 2;
  for (int64_t gi = 0; gi < groups; ++gi) {
    uint32_t* out = kp + gi * P * 16;
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t s = gi * 16 + i;
        r[i] = s < n ? k.row32(s0 + s, 2 * p0) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(out + (p0 + j) * 16, r[j]);
    }
  }
}

// Values [s0, s0 + n) -> vp [ceil(n / 2)][D] dwords: (v[2j][d], v[2j + 1][d]), a key past n zero. 32 dims of
// the two rows at a time: unpacklo/hi_epi16 interleave within 128-bit lanes (dims 0-3 | 8-11 | ... and 4-7 |
// 12-15 | ...), one two-source permute each puts them back in order.
template <class Rows>
void pack_values(const Rows& v, int64_t s0, int64_t n, int64_t D, uint32_t* vp) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int64_t j = 0; j < (n + 1) / 2; ++j) {
    const bool odd = 2 * j + 1 >= n;
    uint32_t* out = vp + j * D;
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i x = v.row32(s0 + 2 * j, d), y = odd ? _mm512_setzero_si512() : v.row32(s0 + 2 * j + 1, d);
      const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
      _mm512_store_si512(out + d, _mm512_permutex2var_epi32(lo, first, hi));
      _mm512_store_si512(out + d + 16, _mm512_permutex2var_epi32(lo, second, hi));
    }
  }
}

// Scores of R rows against 16 * NC keys starting at key group kg: s[r * KB + 16 c + i] = scale * q_r . k
template <int R, int NC>
inline void scores_tile(const uint32_t* qr, int64_t P, const uint32_t* kp, int64_t kg, float scale, float* s) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint32_t* kc[NC];
  for (int c = 0; c < NC; ++c) kc[c] = kp + (kg + c) * P * 16;
  for (int64_t p = 0; p < P; ++p) {
    __m512bh kv[NC];
    for (int c = 0; c < NC; ++c) kv[c] = (__m512bh)_mm512_load_si512(kc[c] + p * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qr[r * P + p]));
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], kv[c], qb);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(s + r * KB + 16 * c, _mm512_mul_ps(acc[r][c], sc));
}

// o[r * D + dc .. + 32] = o * alpha[r] + sum over key pairs j < np of p_r[2j, 2j + 1] . v[2j, 2j + 1][d]
template <int R>
inline void pv_tile(const uint32_t* pb, const uint32_t* vp, int64_t D, int64_t np, int64_t dc, const float* alpha,
                    float* o) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    acc[r][0] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + dc), a);
    acc[r][1] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + dc + 16), a);
  }
  for (int64_t j = 0; j < np; ++j) {
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vp + j * D + dc);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vp + j * D + dc + 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pb[r * (KB / 2) + j]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], v0, pp);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], v1, pp);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(o + r * D + dc, acc[r][0]);
    _mm512_storeu_ps(o + r * D + dc + 16, acc[r][1]);
  }
}

struct Scratch {                    // one key block's scores and probabilities for one tile
  float s[MR * KB];                 // scores (fp32)
  uint32_t p[MR * (KB / 2)];        // probabilities as bf16 pairs of keys
};
struct RowState {                   // a tile's running max and sum per row, and this block's rescaling
  float m[MR], l[MR], alpha[MR];
};

// Keys [k0, k0 + KB) for the R rows of one tile (limit[r]: row r sees keys [0, limit[r])): their scores, the
// online softmax's update, and the P.V products added into o (fp32 [R, D], rescaled by the new max first).
template <int R>
void tile_block(const uint32_t* qr, const uint32_t* kp, const uint32_t* vp, int64_t D, const int64_t* limit,
                int64_t k0, float scale, Scratch& t, RowState& st, float* o) {
  const int64_t P = D / 2;
  const int64_t n = std::min(KB, limit[R - 1] - k0), groups = (n + 15) / 16;  // rows are position-major
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) scores_tile<R, 2>(qr, P, kp, g, scale, t.s + 16 * g);
  if (g < groups) scores_tile<R, 1>(qr, P, kp, g, scale, t.s + 16 * g);
  const int64_t n16 = groups * 16, np = (n + 1) / 2;
  for (int r = 0; r < R; ++r) {
    float* s = t.s + r * KB;
    const int64_t valid = std::min(n, limit[r] - k0);  // keys past it are masked (the diagonal's block)
    auto keep = [valid](int64_t i) -> __mmask16 {
      return valid >= i + 16 ? 0xFFFF : valid <= i ? 0 : static_cast<__mmask16>((1u << (valid - i)) - 1);
    };
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n16; i += 16) mx = _mm512_mask_max_ps(mx, keep(i), mx, _mm512_loadu_ps(s + i));
    // every row sees key 0, so after the first block the running max is finite
    const float m_new = std::max(st.m[r], _mm512_reduce_max_ps(mx));
    st.alpha[r] = std::exp(st.m[r] - m_new);
    st.m[r] = m_new;
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n16; i += 16) {
      // masked keys get exactly 0 (exp512 of a large negative number would not)
      const __m512 e = _mm512_maskz_mov_ps(keep(i), round_bf16(exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm))));
      sum = _mm512_add_ps(sum, e);
      // in key order: dword j of the 16 is the bf16 pair of keys i + 2j, i + 2j + 1
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.p + r * (KB / 2) + i / 2), (__m256i)_mm512_cvtneps_pbh(e));
    }
    st.l[r] = st.l[r] * st.alpha[r] + _mm512_reduce_add_ps(sum);
  }
  // n odd: the last pair's second key is past n, its probability 0 (masked above)
  for (int64_t dc = 0; dc < D; dc += 32) pv_tile<R>(t.p, vp, D, np, dc, st.alpha, o);
}

template <int R>
void tile_block_r(int64_t rows, const uint32_t* qr, const uint32_t* kp, const uint32_t* vp, int64_t D,
                  const int64_t* limit, int64_t k0, float scale, Scratch& t, RowState& st, float* o) {
  if (rows == R) return tile_block<R>(qr, kp, vp, D, limit, k0, scale, t, st, o);
  if constexpr (R > 1) tile_block_r<R - 1>(rows, qr, kp, vp, D, limit, k0, scale, t, st, o);
}

constexpr int64_t TG = 16;  // tiles that share each key block while it is in L2 (128 rows)

// The shapes both forms share: q [Hq, T, D] bf16 contiguous; k, v [Hkv, S, D] with unit stride along D and
// S = past + T (the row's keys, this chunk's last).
void check_shapes(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t past) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q [Hq, T, D], k and v [Hkv, S, D]");
  const int64_t Hq = q.size(0), T = q.size(1), D = q.size(2), Hkv = k.size(0), S = k.size(1);
  TORCH_CHECK(q.is_contiguous(), op, ": q must be contiguous");
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(2) == D && k.stride(2) == 1 && v.stride(2) == 1,
              op, ": k and v [Hkv, S, D] with unit stride along D, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": ", Hq, " query heads over ", Hkv, " KV heads");
  TORCH_CHECK(D % 32 == 0 && D <= 512, op, ": head dim ", D, " (a multiple of 32, at most 512)");
  TORCH_CHECK(past >= 0 && S == past + T, op, ": ", S, " keys for ", past, " cached and ", T, " new");
}

// query t sees keys [0, past + t]; key_rows(h) and value_rows(h): head h's rows (Bf16Rows or Q8Rows).
// -> [Hq, T, D] bf16.
template <class KeyRows, class ValueRows>
at::Tensor attend(const at::Tensor& q, int64_t Hkv, int64_t past, double scale, const KeyRows& key_rows,
                  const ValueRows& value_rows) {
  const int64_t Hq = q.size(0), T = q.size(1), D = q.size(2);
  const int64_t G = Hq / Hkv, M = G * T, P = D / 2;
  at::Tensor out = at::empty({Hq, T, D}, q.options());
  if (T == 0) return out;
  const auto* qd = reinterpret_cast<const uint32_t*>(q.data_ptr<c10::BFloat16>());
  auto* od = out.data_ptr<c10::BFloat16>();
  const int64_t tiles = (M + MR - 1) / MR, groups = (tiles + TG - 1) / TG;
  const float fscale = static_cast<float>(scale);
  // items (KV head, group of TG tiles): each key block, once in L2, meets all the group's tiles (a tile at a
  // time through all keys had streamed the keys from memory once per 8 rows: at 16K keys no faster than
  // torch's). Within a head, groups alternate from the two ends, so that each thread's contiguous share holds
  // as many short (early) as long (late) rows: causal work grows with the position.
  at::parallel_for(0, Hkv * groups, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) Scratch t;
    std::vector<RowState> st(TG);
    std::vector<uint32_t> qr(TG * MR * P);
    std::vector<float> o(TG * MR * D);
    std::vector<int64_t> limit(TG * MR);
    // this key block, packed (kp: pairs of dims for 16 keys a vector; vp: pairs of keys a dword), in L2
    std::vector<uint32_t> kbuf(KB * P + 16), vbuf(KB / 2 * D + 16);
    auto align = [](uint32_t* p) {
      return reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
    };
    uint32_t* kp = align(kbuf.data());
    uint32_t* vp = align(vbuf.data());
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / groups, j = i % groups;
      const int64_t grp = j % 2 == 0 ? j / 2 : groups - 1 - j / 2;
      const int64_t row0 = grp * TG * MR, rows = std::min(TG * MR, M - row0), nt = (rows + MR - 1) / MR;
      for (int64_t r = 0; r < rows; ++r) {  // row row0 + r: position (row0 + r) / G of head h G + (row0 + r) % G
        const int64_t tq = (row0 + r) / G, hq = h * G + (row0 + r) % G;
        std::memcpy(&qr[r * P], qd + (hq * T + tq) * P, P * 4);
        limit[r] = past + tq + 1;
      }
      for (int64_t tt = 0; tt < nt; ++tt)
        for (int r = 0; r < MR; ++r) { st[tt].m[r] = -INFINITY; st[tt].l[r] = 0.f; }
      std::fill(o.begin(), o.begin() + rows * D, 0.f);
      const auto krows = key_rows(h);
      const auto vrows = value_rows(h);
      for (int64_t k0 = 0; k0 < limit[rows - 1]; k0 += KB) {
        const int64_t n = std::min(KB, limit[rows - 1] - k0);
        pack_keys(krows, k0, n, D, kp);
        pack_values(vrows, k0, n, D, vp);
        for (int64_t tt = 0; tt < nt; ++tt) {
          const int64_t r0 = tt * MR, R = std::min<int64_t>(MR, rows - r0);
          if (k0 >= limit[r0 + R - 1]) continue;  // past this tile's last position
          tile_block_r<MR>(R, &qr[r0 * P], kp, vp, D, &limit[r0], k0, fscale, t, st[tt], &o[r0 * D]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t tq = (row0 + r) / G, hq = h * G + (row0 + r) % G;
        const __m512 inv = _mm512_set1_ps(1.f / st[r / MR].l[r % MR]);
        c10::BFloat16* dst = od + (hq * T + tq) * D;
        for (int64_t d = 0; d < D; d += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&o[r * D + d]), inv)));
      }
    }
  });
  return out;
}

// q [Hq, T, D] bf16 contiguous; k, v [Hkv, S, D] bf16 with unit stride along D and S = past + T (the row's keys,
// this chunk's last); query t sees keys [0, past + t]. -> [Hq, T, D] bf16.
at::Tensor prefill_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t past, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "prefill_attn: bf16 q, k, v");
  check_shapes("prefill_attn", q, k, v, past);
  const auto* kd = k.data_ptr<c10::BFloat16>();
  const auto* vd = v.data_ptr<c10::BFloat16>();
  return attend(q, k.size(0), past, scale, [&](int64_t h) { return Bf16Rows{kd + h * k.stride(0), k.stride(1)}; },
                [&](int64_t h) { return Bf16Rows{vd + h * v.stride(0), v.stride(1)}; });
}

// prefill_attn over a q8_0 cache: k, v int8 [Hkv, S, D] (views of the buffers, unit stride along D), kd, vd
// their fp16 scales [Hkv, S, D / 32] (unit stride along the blocks).
at::Tensor prefill_attn_q8(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kd, const at::Tensor& v,
                           const at::Tensor& vd, int64_t past, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kChar && v.scalar_type() == at::kChar &&
                  kd.scalar_type() == at::kHalf && vd.scalar_type() == at::kHalf,
              "prefill_attn_q8: bf16 q, int8 k and v, fp16 kd and vd");
  check_shapes("prefill_attn_q8", q, k, v, past);
  const int64_t Hkv = k.size(0), S = k.size(1), D = k.size(2);
  for (const at::Tensor* d : {&kd, &vd})
    TORCH_CHECK(d->dim() == 3 && d->size(0) == Hkv && d->size(1) == S && d->size(2) == D / 32 && d->stride(2) == 1,
                "prefill_attn_q8: scales [Hkv, S, D / 32] with unit stride along the blocks, got ", d->sizes());
  const auto* k8 = k.data_ptr<int8_t>();
  const auto* v8 = v.data_ptr<int8_t>();
  const auto* kd16 = kd.data_ptr<c10::Half>();
  const auto* vd16 = vd.data_ptr<c10::Half>();
  return attend(
      q, Hkv, past, scale,
      [&](int64_t h) { return Q8Rows{k8 + h * k.stride(0), kd16 + h * kd.stride(0), k.stride(1), kd.stride(1)}; },
      [&](int64_t h) { return Q8Rows{v8 + h * v.stride(0), vd16 + h * vd.stride(0), v.stride(1), vd.stride(1)}; });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  m.def("prefill_attn(Tensor q, Tensor k, Tensor v, int past, float scale) -> Tensor");
  m.def("prefill_attn_q8(Tensor q, Tensor k, Tensor kd, Tensor v, Tensor vd, int past, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) {
  m.impl("prefill_attn", &prefill_attn);
  m.impl("prefill_attn_q8", &prefill_attn_q8);
}
