// The gated delta rule over a sequence (prefill, speculative verification, any decode the whole-layer kernels do
// not take), blocks of tokens at a time. Included by both libraries (cpu_kernels.cpp: op delta_rule, built for
// AVX512; portable_kernels.cpp: op portable_delta_rule, built for the machine): the same source, vectors as wide
// as the target has. It computes what ops/gated_delta.recurrent_gated_delta_rule computes, per value head,
//   S_t = a_t S_{t-1} + k_t d_t^T,  d_t = beta_t (v_t - (a_t S_{t-1})^T k_t),  o_t = S_t^T q_t   (a_t = exp(g_t))
// with S fp32 [Dk, Dv]. Token by token that is two passes over S a token (the recall, then the update with the
// output): bound by the cache, as S (64 KiB for 128 x 128) does not fit L1. Unrolled over a block of C tokens,
// with G(j, i] = g_{j+1} + ... + g_i and S = S_0 the state before the block,
//   d_i = beta_i (v_i - e^{G(0,i]} S^T k_i - sum_{j<i} e^{G(j,i]} (k_j . k_i) d_j)
//   o_i = e^{G(0,i]} S^T q_i + sum_{j<=i} e^{G(j,i]} (k_j . q_i) d_j
//   S_C = e^{G(0,C]} S + sum_j e^{G(j,C]} k_j d_j^T
// so a block makes two passes over S (one reading S^T k_i and S^T q_i for all its tokens, one writing S_C): the
// same multiply-adds as token by token, 1/C of the state's traffic, the products in registers. This is the
// chunked form (ops/gated_delta.chunk_gated_delta_rule) with chunks small enough that the within-block part is a
// few dot products, and with no triangular solve. The segment sums G(j, i] are summed directly, never as a
// difference of cumulative sums: a decay of -inf (a packed sequence's start: the state resets) then gives e^-inf
// = 0, not inf - inf. Multiply-adds may fuse (tested against the reference within fp32 rounding).
// Functions and types are in an anonymous namespace: each library has its own (built for its own target), never
// the other's through the dynamic linker.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "fp_contract.h"

namespace {
namespace delta_rule_blocks {

// Vector width and block length by register file: a block keeps 2C accumulators in registers while reading the
// state (S^T k_i and S^T q_i for its C tokens): 16 of AVX512's 32 registers at C = 8; 8 of AVX2's 16 at C = 4.
#if defined(__AVX512F__)
constexpr int W = 16;
constexpr int BLOCK = 8;
#else
constexpr int W = 8;  // AVX2's 8 lanes; two of NEON's 128-bit registers
constexpr int BLOCK = 4;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

struct Token {
  const float *q, *k, *v;
  float* o;
  float g, beta;
};

// Per-thread scratch: kq[d][W] the block's keys and queries transposed (one contiguous stream for the read
// pass's broadcasts), sk / sq [C][Dv] = S^T k_i / S^T q_i, dl [C][Dv] the deltas, kt [C][Dk] the keys as they
// enter S_C (k_j e^{G(j,C]}).
struct Scratch {
  std::vector<float> kq, sk, sq, dl, kt;
  Scratch(int64_t Dk, int64_t Dv)
      : kq(static_cast<size_t>(Dk * W), 0.f), sk(static_cast<size_t>(BLOCK * Dv)),
        sq(static_cast<size_t>(BLOCK * Dv)), dl(static_cast<size_t>(BLOCK * Dv)),
        kt(static_cast<size_t>(BLOCK * Dk)) {}
};

// One block of C tokens of one head: s0 the state before (may be s1: each element is read before it is written,
// the read pass finishing before the update pass starts), s1 the state after.
template <int C>
QWEN35_CONTRACT(fast) void block(const float* s0, float* s1, const Token* tk, int64_t Dk, int64_t Dv, Scratch& sc) {
  QWEN35_CONTRACT_BODY(fast)
  // seg[j][i] = e^{G(j, i]} for 0 <= j <= i <= C (j, i count tokens: 0 is the state before the block)
  float seg[C + 1][C + 1];
  for (int j = 0; j <= C; ++j) {
    float sum = 0.f;
    seg[j][j] = 1.f;
    for (int i = j + 1; i <= C; ++i) {
      sum += tk[i - 1].g;
      seg[j][i] = std::exp(sum);
    }
  }
  // kq[d] = [k_0[d] .. k_{C-1}[d], 0.., q_0[d] .. q_{C-1}[d], 0..]: BLOCK keys then BLOCK queries, W = 2 BLOCK
  // lanes (one vector)
  static_assert(2 * BLOCK == W, "a row of keys and queries is one vector");
  float* kq = sc.kq.data();
  for (int64_t d = 0; d < Dk; ++d) {
    float* row = kq + d * W;
    for (int i = 0; i < C; ++i) {
      row[i] = tk[i].k[d];
      row[BLOCK + i] = tk[i].q[d];
    }
  }
  // read pass: S^T k_i and S^T q_i, W columns of S at a time
  float *sk = sc.sk.data(), *sq = sc.sq.data();
  int64_t e = 0;
  for (; e + W <= Dv; e += W) {
    vf acc[2 * C];
#pragma GCC unroll 16
    for (int i = 0; i < 2 * C; ++i) acc[i] = vf{};
    for (int64_t d = 0; d < Dk; ++d) {
      const vf s = loadv(s0 + d * Dv + e);
      const float* b = kq + d * W;
#pragma GCC unroll 16
      for (int i = 0; i < C; ++i) {
        acc[i] += s * b[i];
        acc[C + i] += s * b[BLOCK + i];
      }
    }
    for (int i = 0; i < C; ++i) {
      storev(sk + i * Dv + e, acc[i]);
      storev(sq + i * Dv + e, acc[C + i]);
    }
  }
  for (; e < Dv; ++e)  // columns past the last full vector
    for (int i = 0; i < C; ++i) {
      float a = 0.f, b = 0.f;
      for (int64_t d = 0; d < Dk; ++d) {
        a += s0[d * Dv + e] * kq[d * W + i];
        b += s0[d * Dv + e] * kq[d * W + BLOCK + i];
      }
      sk[i * Dv + e] = a;
      sq[i * Dv + e] = b;
    }
  // within the block: dots[j] = [k_j . k_0 .. k_j . k_{C-1}, 0.., k_j . q_0 .. k_j . q_{C-1}, 0..], a vector per
  // key over the same rows (C multiply-adds a row, where pair by pair each dot product ends in a horizontal sum)
  vf dv[C];
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) dv[j] = vf{};
  for (int64_t d = 0; d < Dk; ++d) {
    const vf row = loadv(kq + d * W);
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) dv[j] += row * kq[d * W + j];
  }
  float dots[C][W];
  for (int j = 0; j < C; ++j) storev(dots[j], dv[j]);
  // the deltas in token order, then the outputs, W columns at a time
  float* dl = sc.dl.data();
  for (int i = 0; i < C; ++i) {
    const float gi = seg[0][i + 1], bi = tk[i].beta;
    float ck[C], cq[C];  // e^{G(j,i]} k_j . k_i (j < i) and e^{G(j,i]} k_j . q_i (j <= i)
    for (int j = 0; j <= i; ++j) {
      ck[j] = seg[j + 1][i + 1] * dots[j][i];
      cq[j] = seg[j + 1][i + 1] * dots[j][BLOCK + i];
    }
    float *di = dl + i * Dv, *o = tk[i].o;
    const float* v = tk[i].v;
    for (e = 0; e + W <= Dv; e += W) {
      vf x = loadv(v + e) - loadv(sk + i * Dv + e) * gi;
      for (int j = 0; j < i; ++j) x -= loadv(dl + j * Dv + e) * ck[j];
      x *= bi;
      storev(di + e, x);
      vf y = loadv(sq + i * Dv + e) * gi + x * cq[i];
      for (int j = 0; j < i; ++j) y += loadv(dl + j * Dv + e) * cq[j];
      storev(o + e, y);
    }
    for (; e < Dv; ++e) {
      float x = v[e] - gi * sk[i * Dv + e];
      for (int j = 0; j < i; ++j) x -= ck[j] * dl[j * Dv + e];
      x *= bi;
      di[e] = x;
      float y = gi * sq[i * Dv + e] + cq[i] * x;
      for (int j = 0; j < i; ++j) y += cq[j] * dl[j * Dv + e];
      o[e] = y;
    }
  }
  // update pass: S_C = e^{G(0,C]} S + sum_j (e^{G(j,C]} k_j) d_j^T
  float* kt = sc.kt.data();
  for (int64_t d = 0; d < Dk; ++d)
    for (int j = 0; j < C; ++j) kt[d * C + j] = seg[j + 1][C] * tk[j].k[d];
  const float gc = seg[0][C];
  for (e = 0; e + W <= Dv; e += W) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) dv[j] = loadv(dl + j * Dv + e);
    for (int64_t d = 0; d < Dk; ++d) {
      vf x = loadv(s0 + d * Dv + e) * gc;
      const float* b = kt + d * C;
#pragma GCC unroll 16
      for (int j = 0; j < C; ++j) x += dv[j] * b[j];
      storev(s1 + d * Dv + e, x);
    }
  }
  for (; e < Dv; ++e)
    for (int64_t d = 0; d < Dk; ++d) {
      float x = s0[d * Dv + e] * gc;
      for (int j = 0; j < C; ++j) x += kt[d * C + j] * dl[j * Dv + e];
      s1[d * Dv + e] = x;
    }
}

// The last block of a sequence may hold fewer than BLOCK tokens: its length picks the instance.
template <int C>
void block_of(int c, const float* s0, float* s1, const Token* tk, int64_t Dk, int64_t Dv, Scratch& sc) {
  if (c == C) {
    block<C>(s0, s1, tk, Dk, Dv, sc);
  } else if constexpr (C > 1) {
    block_of<C - 1>(c, s0, s1, tk, Dk, Dv, sc);
  }
}

// q, k [B, T, H, Dk], v [B, T, H, Dv], g, beta [B, T, H], state [B, H, Dk, Dv] (read, never written; any float
// dtype, computed in fp32). Returns (o [B, T, H, Dv], new state [B, H, Dk, Dv]), both fp32.
inline std::tuple<at::Tensor, at::Tensor> delta_rule(const char* name, const at::Tensor& q_, const at::Tensor& k_,
                                                     const at::Tensor& v_, const at::Tensor& g_,
                                                     const at::Tensor& beta_, const at::Tensor& state_) {
  TORCH_CHECK(q_.dim() == 4 && k_.sizes() == q_.sizes() && v_.dim() == 4 && v_.size(0) == q_.size(0) &&
                  v_.size(1) == q_.size(1) && v_.size(2) == q_.size(2),
              name, ": q, k must be [B, T, H, Dk] and v [B, T, H, Dv], got ", q_.sizes(), ", ", k_.sizes(), ", ",
              v_.sizes());
  const int64_t B = q_.size(0), T = q_.size(1), H = q_.size(2), Dk = q_.size(3), Dv = v_.size(3);
  TORCH_CHECK(g_.sizes() == at::IntArrayRef({B, T, H}) && beta_.sizes() == g_.sizes(), name,
              ": g and beta must be [B, T, H] = [", B, ", ", T, ", ", H, "], got ", g_.sizes(), ", ", beta_.sizes());
  TORCH_CHECK(state_.sizes() == at::IntArrayRef({B, H, Dk, Dv}), name, ": state must be [B, H, Dk, Dv] = [", B, ", ",
              H, ", ", Dk, ", ", Dv, "], got ", state_.sizes());
  const at::Tensor q = q_.to(at::kFloat).contiguous(), k = k_.to(at::kFloat).contiguous();
  const at::Tensor v = v_.to(at::kFloat).contiguous(), g = g_.to(at::kFloat).contiguous();
  const at::Tensor beta = beta_.to(at::kFloat).contiguous(), state = state_.to(at::kFloat).contiguous();
  at::Tensor o = at::empty({B, T, H, Dv}, q.options());
  at::Tensor out = at::empty({B, H, Dk, Dv}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>(), *sp = state.data_ptr<float>();
  float *op = o.data_ptr<float>(), *np = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    Scratch sc(Dk, Dv);
    Token tk[BLOCK];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      float* s1 = np + i * Dk * Dv;
      if (T == 0) std::memcpy(s1, sp + i * Dk * Dv, static_cast<size_t>(Dk * Dv) * sizeof(float));
      for (int64_t t0 = 0; t0 < T; t0 += BLOCK) {
        const int c = static_cast<int>(std::min<int64_t>(BLOCK, T - t0));
        for (int j = 0; j < c; ++j) {
          const int64_t bth = (b * T + t0 + j) * H + h;
          tk[j] = Token{qp + bth * Dk, kp + bth * Dk, vp + bth * Dv, op + bth * Dv, gp[bth], bp[bth]};
        }
        block_of<BLOCK>(c, t0 == 0 ? sp + i * Dk * Dv : s1, s1, tk, Dk, Dv, sc);
      }
    }
  });
  return {o, out};
}

}  // namespace delta_rule_blocks
}  // namespace
