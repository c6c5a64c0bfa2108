// The two whole-layer decode steps, a Gated DeltaNet layer and a gated-attention layer (one token a row, or the T
// tokens of a speculative verify pass), written once over a library's kernels and compiled into both libraries:
// the AVX512 one (cpu_kernels.cpp: its bf16 and VNNI GEMVs, gdn_decode, attn_decode) and the portable one
// (portable_layers.cpp: the portable GEMVs, gated delta rule and attention), so a laptop without AVX512 runs a
// decode step as one C++ call a layer too. The layer's math, order and rounding are written here once; the
// kernels each Ops brings are tested against the torch reference on their own.
//
// Ops provides (static):
//   gemv_bf16_into(x [M, K] bf16, w [n, K] bf16, out, ldo)              out[m * ldo + j] = x . w^T, bf16
//   gemv_quant_into(kind, x [<= 8, K] bf16, qs, d, out, ldo)             the same for a quantized part (kind 1-4)
//   silu_mul(gate_up [.., 2I] bf16) -> [.., I] bf16                    silu(gate) rounded to bf16, times up
//   gdn_decode(proj, conv_state, conv_w, A_log, dt_bias, state, norm_w, Hk, eps, in_place) -> (out, conv, state)
//   attn_decode(q, k, v, kd, vd, lengths, scale) -> [B, Hq, D] bf16
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

// The two steps' signatures, written once: the templates below, each library's named entry points
// (QWEN35_DECODE_LAYERS(Ops), in the namespace decode_plan.h calls) and decode_plan.h's declarations of them.
#define QWEN35_GDN_LAYER(name)                                                                                      \
  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> name(                                    \
      const at::Tensor& x, const at::Tensor& ln1, at::TensorList w_in, at::IntArrayRef k_in,                        \
      const at::Tensor& conv_state, const at::Tensor& conv_w, const at::Tensor& A_log, const at::Tensor& dt_bias,    \
      const at::Tensor& state, const at::Tensor& norm_w, at::TensorList w_out, at::IntArrayRef k_out,               \
      const at::Tensor& ln2, at::TensorList w_gate_up, at::IntArrayRef k_gate_up, at::TensorList w_down,            \
      at::IntArrayRef k_down, int64_t Hk, double eps, bool in_place)
#define QWEN35_ATTN_LAYER(name)                                                                                     \
  at::Tensor name(const at::Tensor& x, const at::Tensor& ln1, at::TensorList w_qkv, at::IntArrayRef k_qkv,          \
                  const at::Tensor& q_norm, const at::Tensor& k_norm, const at::Tensor& cos, const at::Tensor& sin, \
                  at::TensorList k_buf, at::TensorList v_buf, at::TensorList k_scale, at::TensorList v_scale,       \
                  at::IntArrayRef pos, at::TensorList w_o, at::IntArrayRef k_o, const at::Tensor& ln2,              \
                  at::TensorList w_gate_up, at::IntArrayRef k_gate_up, at::TensorList w_down,                       \
                  at::IntArrayRef k_down, int64_t Hq, double eps)
// ... and their op schemas, after the name each library registers them under
#define QWEN35_GDN_LAYER_SCHEMA                                                                                     \
  "(Tensor x, Tensor ln1, Tensor[] w_in, int[] k_in, Tensor conv_state, Tensor conv_w, Tensor A_log, "             \
  "Tensor dt_bias, Tensor state, Tensor norm_w, Tensor[] w_out, int[] k_out, Tensor ln2, Tensor[] w_gate_up, "     \
  "int[] k_gate_up, Tensor[] w_down, int[] k_down, int Hk, float eps, bool in_place=False) "                       \
  "-> (Tensor, Tensor[], Tensor[])"
#define QWEN35_ATTN_LAYER_SCHEMA                                                                                    \
  "(Tensor x, Tensor ln1, Tensor[] w_qkv, int[] k_qkv, Tensor q_norm, Tensor k_norm, Tensor cos, Tensor sin, "     \
  "Tensor(a!)[] k_buf, Tensor(b!)[] v_buf, Tensor(c!)[] k_scale, Tensor(d!)[] v_scale, int[] pos, Tensor[] w_o, "  \
  "int[] k_o, Tensor ln2, Tensor[] w_gate_up, int[] k_gate_up, Tensor[] w_down, int[] k_down, int Hq, float eps) " \
  "-> Tensor"
#define QWEN35_DECODE_LAYERS(Ops)                                                                                   \
  QWEN35_GDN_LAYER(decode_gdn_layer) {                                                                              \
    return qwen35_steps::gdn_layer<Ops>(x, ln1, w_in, k_in, conv_state, conv_w, A_log, dt_bias, state, norm_w,      \
                                        w_out, k_out, ln2, w_gate_up, k_gate_up, w_down, k_down, Hk, eps, in_place); \
  }                                                                                                                 \
  QWEN35_ATTN_LAYER(decode_attn_layer) {                                                                            \
    return qwen35_steps::attn_layer<Ops>(x, ln1, w_qkv, k_qkv, q_norm, k_norm, cos, sin, k_buf, v_buf, k_scale,     \
                                         v_scale, pos, w_o, k_o, ln2, w_gate_up, k_gate_up, w_down, k_down, Hq,     \
                                         eps);                                                                      \
  }

namespace qwen35_steps {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// One row of D bf16 values to Q8_0 blocks (a q8_0 KV cache's keys and values), by quant/formats.py's rule: scale
// max|x|/127 in fp32, x * (1/d) rounded half away from zero as floor(|v| + 0.5), the fp16 scale rounded to nearest
// even: what the torch path writes (kv_storage.quantize_rows), byte for byte (tested)
inline void q8_0_row(const c10::BFloat16* x, int64_t D, int8_t* q, c10::Half* d) {
  for (int64_t b = 0; b < D / 32; ++b) {
    const c10::BFloat16* xb = x + b * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(static_cast<float>(xb[j])));
    const float dd = amax / 127.f, inv = dd != 0.f ? 1.f / dd : 0.f;
    for (int j = 0; j < 32; ++j) {
      const float v = static_cast<float>(xb[j]) * inv;
      const float r = std::min(127.f, std::floor(std::fabs(v) + 0.5f));
      q[b * 32 + j] = static_cast<int8_t>(v < 0.f ? -r : r);
    }
    d[b] = static_cast<c10::Half>(dd);
  }
}

// RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * (add_one ? 1 + w : w), computed in fp32.
template <typename T>
inline void rmsnorm_impl(const T* x, const float* w, T* y, int64_t rows, int64_t D, double eps, bool add_one) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      T* yr = y + r * D;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) { const float v = to_f(xr[d]); ss += v * v; }
      const float inv = 1.f / std::sqrt(ss / D + static_cast<float>(eps));
      for (int64_t d = 0; d < D; ++d) yr[d] = static_cast<T>(to_f(xr[d]) * inv * (add_one ? 1.f + w[d] : w[d]));
    }
  });
}

inline at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps, bool add_one) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.scalar_type() == at::kFloat, "rmsnorm: layout");
  const int64_t D = x.size(-1), rows = x.numel() / D;
  TORCH_CHECK(w.numel() == D, "rmsnorm: weight size");
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    rmsnorm_impl(x.data_ptr<c10::BFloat16>(), w.data_ptr<float>(), y.data_ptr<c10::BFloat16>(), rows, D, eps, add_one);
  else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rmsnorm: bf16 or fp32");
    rmsnorm_impl(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D, eps, add_one);
  }
  return y;
}

// a + b for bf16 tensors of one shape (fp32 add, one rounding, like torch)
inline at::Tensor add_bf16(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty_like(a);
  const auto* ap = a.data_ptr<c10::BFloat16>();
  const auto* bp = b.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < a.numel(); ++i) op[i] = static_cast<c10::BFloat16>(to_f(ap[i]) + to_f(bp[i]));
  return out;
}

// A projection as the whole-layer kernels take it: parts stacked along N (a fused group whose members are
// stored differently), each as (data, scales) with a kind: 0 = bf16 matrix (scales unused), 1 = q8_0,
// 2 = q4_0 (quant_kernels.cpp), 3 = q4_k, 4 = q6_k (quant_k_kernels.cpp). The same kernels, and so the same
// rounding, as the per-op path's weight objects (ops/fast.py GemvWeight, quant/weight.py QuantizedWeight).
struct Matrix {
  at::TensorList parts;  // data0, scales0, data1, scales1, ...
  at::IntArrayRef kinds;
};

// x [M, K] bf16 -> [M, N] bf16, N the parts' rows together
template <class Ops>
at::Tensor matmul(const at::Tensor& x, const Matrix& w) {
  TORCH_CHECK(static_cast<int64_t>(w.parts.size()) == 2 * static_cast<int64_t>(w.kinds.size()) && !w.kinds.empty(),
              "layer kernel: a matrix is (data, scales) per kind");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "layer kernel: bf16 rows");
  int64_t N = 0;
  for (size_t i = 0; i < w.kinds.size(); ++i) N += w.parts[2 * i].size(0);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  auto* op = out.data_ptr<c10::BFloat16>();
  int64_t col = 0;
  for (size_t i = 0; i < w.kinds.size(); ++i) {
    const at::Tensor& data = w.parts[2 * i];
    const int64_t n = data.size(0);
    if (w.kinds[i] == 0) {
      TORCH_CHECK(data.scalar_type() == at::kBFloat16 && data.is_contiguous() && data.size(1) == K,
                  "layer kernel: bf16 part");
      Ops::gemv_bf16_into(x, data, op + col, N);
    } else {
      TORCH_CHECK(w.kinds[i] >= 1 && w.kinds[i] <= 4, "layer kernel: unknown matrix kind ", w.kinds[i]);
      for (int64_t m0 = 0; m0 < M; m0 += 8) {  // the quantized GEMVs take up to 8 rows at a time
        const at::Tensor xm = x.narrow(0, m0, std::min<int64_t>(8, M - m0));
        Ops::gemv_quant_into(w.kinds[i], xm, data, w.parts[2 * i + 1], op + m0 * N + col, N);
      }
    }
    col += n;
  }
  return out;
}

// x + down(silu(gate(n)) * up(n)), n = rmsnorm(x)
template <class Ops>
at::Tensor mlp_residual(const at::Tensor& x, const at::Tensor& ln, const Matrix& w_gate_up, const Matrix& w_down,
                        double eps) {
  at::Tensor h = rmsnorm(x, ln, eps, true);
  at::Tensor a = Ops::silu_mul(matmul<Ops>(h, w_gate_up));
  return add_bf16(x, matmul<Ops>(a, w_down));
}

// Gated DeltaNet layer: x [B*T, H] bf16, T tokens per row in row order (b, t) -> (x', conv states, recurrent
// states after each of the T tokens). T > 1 is a speculative verify pass (or a short prompt): the matrices are
// read once for all B*T rows, the recurrence steps token by token through the same gdn_decode as T = 1, so
// every token's result equals what T separate decode steps give, and the cache can land on any position.
template <class Ops>
QWEN35_GDN_LAYER(gdn_layer) {
  const int64_t B = state.size(0), T = x.size(0) / B;
  TORCH_CHECK(T >= 1 && x.size(0) == B * T, "decode layer: x holds T tokens for each of the state's rows");
  at::Tensor h = rmsnorm(x, ln1, eps, true);
  at::Tensor proj = matmul<Ops>(h, {w_in, k_in});
  std::vector<at::Tensor> convs, recs;
  at::Tensor o;
  if (T == 1) {
    // in place only where no other tensor shares the state's memory (a view), whatever the caller checked
    const bool own = in_place && state.storage().use_count() == 1;
    auto [o1, conv, rec] = Ops::gdn_decode(proj, conv_state, conv_w, A_log, dt_bias, state, norm_w, Hk, eps, own);
    o = o1;
    convs.push_back(conv);
    recs.push_back(rec);
  } else {
    const int64_t P = proj.size(1);
    at::Tensor conv = conv_state, rec = state;
    std::vector<at::Tensor> outs;
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor pt = proj.view({B, T, P}).select(1, t).contiguous();
      auto [ot, c2, r2] = Ops::gdn_decode(pt, conv, conv_w, A_log, dt_bias, rec, norm_w, Hk, eps, false);
      conv = c2;
      rec = r2;
      outs.push_back(ot);
      convs.push_back(c2);
      recs.push_back(r2);
    }
    const int64_t Vd = outs[0].size(1);
    o = at::empty({B * T, Vd}, x.options());
    auto* op = o.data_ptr<c10::BFloat16>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(op + (b * T + t) * Vd, outs[t].data_ptr<c10::BFloat16>() + b * Vd, Vd * sizeof(c10::BFloat16));
  }
  at::Tensor x1 = add_bf16(x, matmul<Ops>(o, {w_out, k_out}));
  return {mlp_residual<Ops>(x1, ln2, {w_gate_up, k_gate_up}, {w_down, k_down}, eps), convs, recs};
}

// Gated attention layer, x [B*T, H]: T tokens per row, in row order (b, t). qkv projection rows per token:
// [q0 g0 q1 g1 ... | k heads | v heads]. Token t of row b has its key and value written into the row's own cache
// buffers k_buf[b], v_buf[b] [Hkv, cap_b, D] at slot pos[b] + t (capacity reserved by the caller), then its
// query attends to slots [0, pos[b] + t] (each token as a row of its own in attn_decode: exactly what T
// decode steps compute). cos/sin: [1, B or B*T (row order), R] rows fp32, or T rows shared by every row.
template <class Ops>
QWEN35_ATTN_LAYER(attn_layer) {
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "decode layer: layout");
  const int64_t B = static_cast<int64_t>(k_buf.size()), R = cos.size(-1), T = x.size(0) / std::max<int64_t>(B, 1);
  TORCH_CHECK(B >= 1 && x.size(0) == B * T && static_cast<int64_t>(v_buf.size()) == B &&
              static_cast<int64_t>(pos.size()) == B, "decode layer: one buffer and position per row");
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == B * T || cos.size(0) == T, "decode layer: rotary rows");
  const int64_t Hkv = k_buf[0].size(0), D = k_buf[0].size(2);
  const bool q8 = !k_scale.empty();  // a q8_0 cache: int8 buffers and their fp16 scales (kv_storage.py)
  TORCH_CHECK(!q8 || (static_cast<int64_t>(k_scale.size()) == B && static_cast<int64_t>(v_scale.size()) == B),
              "decode layer: one scale buffer per row");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(k_buf[b].is_contiguous() && v_buf[b].is_contiguous() && pos[b] + T <= k_buf[b].size(1) &&
                v_buf[b].sizes() == k_buf[b].sizes(), "decode layer: buffers");
    TORCH_CHECK(k_buf[b].scalar_type() == (q8 ? at::kChar : at::kBFloat16), "decode layer: buffer dtype");
    if (q8)
      TORCH_CHECK(k_scale[b].is_contiguous() && v_scale[b].is_contiguous() && k_scale[b].scalar_type() == at::kHalf &&
                  v_scale[b].scalar_type() == at::kHalf && k_scale[b].size(1) == k_buf[b].size(1) &&
                  k_scale[b].size(2) * 32 == k_buf[b].size(2), "decode layer: scales");
  }
  TORCH_CHECK(R <= D && R % 2 == 0, "decode layer: sizes");
  at::Tensor h = rmsnorm(x, ln1, eps, true);
  at::Tensor qkv = matmul<Ops>(h, {w_qkv, k_qkv});  // [B, 2*Hq*D + 2*Hkv*D]
  const int64_t P = qkv.size(1);
  TORCH_CHECK(P == 2 * Hq * D + 2 * Hkv * D, "decode layer: projection size");
  const int64_t BT = B * T;
  at::Tensor q = at::empty({BT, Hq, D}, x.options());
  const auto* qp = qkv.data_ptr<c10::BFloat16>();
  auto* qo = q.data_ptr<c10::BFloat16>();
  const float* qn = q_norm.data_ptr<float>();
  const float* kn = k_norm.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  std::vector<float> t(D), r(D);
  std::vector<c10::BFloat16> krow(D);  // a q8_0 cache: the normed, rotated key before it is quantized
  // zero-centred RMSNorm (rounded to bf16, as the per-op path) then partial NeoX RoPE (rounded again)
  auto norm_rope = [&](const c10::BFloat16* src, const float* w, const float* c, const float* sn,
                       c10::BFloat16* dst) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += to_f(src[d]) * to_f(src[d]);
    const float inv = 1.f / std::sqrt(ss / D + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) t[d] = to_f(static_cast<c10::BFloat16>(to_f(src[d]) * inv * (1.f + w[d])));
    const int64_t half = R / 2;
    for (int64_t d = 0; d < R; ++d) {
      const float rot = d < half ? -t[d + half] : t[d - half];
      dst[d] = static_cast<c10::BFloat16>(t[d] * c[d] + rot * sn[d]);
    }
    for (int64_t d = R; d < D; ++d) dst[d] = static_cast<c10::BFloat16>(t[d]);
  };
  std::vector<at::Tensor> ks, vs, kds, vds;  // token (b, t) reads row b's buffers over its first pos[b] + t + 1 slots
  std::vector<int64_t> lengths;
  for (int64_t i = 0; i < BT; ++i) {
    const int64_t b = i / T, t = i % T, slot = pos[b] + t;
    const c10::BFloat16* row = qp + i * P;
    const int64_t crow = cos.size(0) == 1 ? 0 : (cos.size(0) == BT ? i : t);
    const float* c = cp + crow * R;
    const float* sn = sp + crow * R;
    for (int64_t hq = 0; hq < Hq; ++hq) norm_rope(row + hq * 2 * D, qn, c, sn, qo + (i * Hq + hq) * D);
    const int64_t cap = k_buf[b].size(1);
    if (q8) {  // quantized on write, with the reference rule (the bytes the torch path writes)
      auto* kb = k_buf[b].data_ptr<int8_t>();
      auto* vb = v_buf[b].data_ptr<int8_t>();
      auto* kdp = k_scale[b].data_ptr<c10::Half>();
      auto* vdp = v_scale[b].data_ptr<c10::Half>();
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const int64_t at_ = hk * cap + slot;
        norm_rope(row + 2 * Hq * D + hk * D, kn, c, sn, krow.data());
        q8_0_row(krow.data(), D, kb + at_ * D, kdp + at_ * (D / 32));
        q8_0_row(row + 2 * Hq * D + Hkv * D + hk * D, D, vb + at_ * D, vdp + at_ * (D / 32));
      }
    } else {
      auto* kb = k_buf[b].data_ptr<c10::BFloat16>();
      auto* vb = v_buf[b].data_ptr<c10::BFloat16>();
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        norm_rope(row + 2 * Hq * D + hk * D, kn, c, sn, kb + (hk * cap + slot) * D);
        std::memcpy(vb + (hk * cap + slot) * D, row + 2 * Hq * D + Hkv * D + hk * D, D * sizeof(c10::BFloat16));
      }
    }
    ks.push_back(k_buf[b]);
    vs.push_back(v_buf[b]);
    if (q8) {
      kds.push_back(k_scale[b]);
      vds.push_back(v_scale[b]);
    }
    lengths.push_back(slot + 1);
  }
  at::Tensor o = Ops::attn_decode(q, ks, vs, kds, vds, lengths, 1.0 / std::sqrt(static_cast<double>(D)));
  // output gate: o * sigmoid(gate), both bf16 like the per-op path
  auto* op = o.data_ptr<c10::BFloat16>();
  for (int64_t b = 0; b < BT; ++b)
    for (int64_t hq = 0; hq < Hq; ++hq)
      for (int64_t d = 0; d < D; ++d) {
        const float g = to_f(qp[b * P + hq * 2 * D + D + d]);
        const float sg = to_f(static_cast<c10::BFloat16>(1.f / (1.f + std::exp(-g))));
        op[(b * Hq + hq) * D + d] = static_cast<c10::BFloat16>(to_f(op[(b * Hq + hq) * D + d]) * sg);
      }
  at::Tensor x1 = add_bf16(x, matmul<Ops>(o.view({BT, Hq * D}), {w_o, k_o}));
  return mlp_residual<Ops>(x1, ln2, {w_gate_up, k_gate_up}, {w_down, k_down}, eps);
}


}  // namespace qwen35_steps
