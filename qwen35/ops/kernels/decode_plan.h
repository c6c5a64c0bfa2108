// A decode step's whole decoder stack in one call: the plan (each layer's constant arguments) and the op, written
// once and compiled into both libraries, each on its own whole-layer steps (layer_steps.h):
//   decode_stack.cpp (AVX512):        QWEN35_PLAN_LAYERS qwen35_layers, class DecodePlan, op decode_stack
//   portable_layers.cpp (portable):   qwen35_portable_layers, class PortableDecodePlan, op portable_decode_stack
// The includer defines the three names (a process may load both libraries: the registered names differ).
#pragma once
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "layer_steps.h"

namespace QWEN35_PLAN_LAYERS {
QWEN35_GDN_LAYER(decode_gdn_layer);
QWEN35_ATTN_LAYER(decode_attn_layer);
}  // namespace QWEN35_PLAN_LAYERS

// The plan's types live in the library's own namespace, not an anonymous one: torch finds a custom class by its C++
// type, and where type identity compares RTTI names (clang's libstdc++ builds, Apple's libc++), an anonymous
// namespace's DecodePlan in one library was the other's: loading the second aborted on a schema mismatch.
namespace QWEN35_PLAN_LAYERS {

using Tensors = std::vector<at::Tensor>;
using Ints = std::vector<int64_t>;

// What decode_gdn_layer takes besides its input and states, in its order.
struct GdnArgs {
  at::Tensor ln1;
  Tensors w_in;
  Ints k_in;
  at::Tensor conv_w, A_log, dt_bias, norm_w;
  Tensors w_out;
  Ints k_out;
  at::Tensor ln2;
  Tensors w_gate_up;
  Ints k_gate_up;
  Tensors w_down;
  Ints k_down;
  int64_t Hk;
  double eps;
};

// What decode_attn_layer takes besides its input, rotary rows, buffers and lengths.
struct AttnArgs {
  at::Tensor ln1;
  Tensors w_qkv;
  Ints k_qkv;
  at::Tensor q_norm, k_norm;
  Tensors w_o;
  Ints k_o;
  at::Tensor ln2;
  Tensors w_gate_up;
  Ints k_gate_up;
  Tensors w_down;
  Ints k_down;
  int64_t Hq;
  double eps;
};

struct DecodePlan : torch::CustomClassHolder {
  std::vector<GdnArgs> gdn;
  std::vector<AttnArgs> attn;
  std::vector<bool> is_gdn;  // the layers in model order

  void add_gdn(at::Tensor ln1, Tensors w_in, Ints k_in, at::Tensor conv_w, at::Tensor A_log, at::Tensor dt_bias,
               at::Tensor norm_w, Tensors w_out, Ints k_out, at::Tensor ln2, Tensors w_gate_up, Ints k_gate_up,
               Tensors w_down, Ints k_down, int64_t Hk, double eps) {
    gdn.push_back({ln1, w_in, k_in, conv_w, A_log, dt_bias, norm_w, w_out, k_out, ln2, w_gate_up, k_gate_up, w_down,
                   k_down, Hk, eps});
    is_gdn.push_back(true);
  }

  void add_attn(at::Tensor ln1, Tensors w_qkv, Ints k_qkv, at::Tensor q_norm, at::Tensor k_norm, Tensors w_o,
                Ints k_o, at::Tensor ln2, Tensors w_gate_up, Ints k_gate_up, Tensors w_down, Ints k_down, int64_t Hq,
                double eps) {
    attn.push_back({ln1, w_qkv, k_qkv, q_norm, k_norm, w_o, k_o, ln2, w_gate_up, k_gate_up, w_down, k_down, Hq, eps});
    is_gdn.push_back(false);
  }

  int64_t layers() const { return static_cast<int64_t>(is_gdn.size()); }
};

// x [B*T, H] through every layer. conv / rec: each Gated DeltaNet layer's states, in layer order. k_buf, v_buf
// (and k_scale, v_scale for a q8_0 cache, else empty): B per attention layer, layer-major; pos: each row's
// length; in_place: per Gated DeltaNet layer, whether its recurrent state may be updated in place (nothing else
// holds it: decode_stack.py). Returns (x', conv states, recurrent states), the states T per Gated DeltaNet layer
// (after each token).
std::tuple<at::Tensor, Tensors, Tensors> decode_stack(const c10::intrusive_ptr<DecodePlan>& plan, const at::Tensor& x,
                                                      at::TensorList conv, at::TensorList rec, const at::Tensor& cos,
                                                      const at::Tensor& sin, at::TensorList k_buf,
                                                      at::TensorList v_buf, at::TensorList k_scale,
                                                      at::TensorList v_scale, at::IntArrayRef pos,
                                                      const c10::List<bool>& in_place) {
  const int64_t G = static_cast<int64_t>(plan->gdn.size()), A = static_cast<int64_t>(plan->attn.size());
  const int64_t B = static_cast<int64_t>(pos.size());
  TORCH_CHECK(static_cast<int64_t>(conv.size()) == G && static_cast<int64_t>(rec.size()) == G,
              QWEN35_PLAN_OP ": one conv and one recurrent state per Gated DeltaNet layer (", G, "), got ", conv.size(),
              " and ", rec.size());
  TORCH_CHECK(static_cast<int64_t>(k_buf.size()) == A * B && static_cast<int64_t>(v_buf.size()) == A * B,
              QWEN35_PLAN_OP ": ", B, " key and value buffers per attention layer (", A, "), got ", k_buf.size());
  TORCH_CHECK(static_cast<int64_t>(in_place.size()) == G, QWEN35_PLAN_OP ": one in_place flag per Gated DeltaNet layer");
  TORCH_CHECK(k_scale.empty() || (static_cast<int64_t>(k_scale.size()) == A * B &&
                                  static_cast<int64_t>(v_scale.size()) == A * B),
              QWEN35_PLAN_OP ": a q8_0 cache has one scale buffer per key and value buffer");
  at::Tensor h = x;
  Tensors convs, recs;
  int64_t g = 0, a = 0;
  for (const bool is_gdn : plan->is_gdn) {
    if (is_gdn) {
      const GdnArgs& l = plan->gdn[g];
      auto [out, c, r] = QWEN35_PLAN_LAYERS::decode_gdn_layer(
          h, l.ln1, l.w_in, l.k_in, conv[g], l.conv_w, l.A_log, l.dt_bias, rec[g], l.norm_w, l.w_out, l.k_out,
          l.ln2, l.w_gate_up, l.k_gate_up, l.w_down, l.k_down, l.Hk, l.eps, in_place.get(g));
      h = out;
      convs.insert(convs.end(), c.begin(), c.end());
      recs.insert(recs.end(), r.begin(), r.end());
      ++g;
    } else {
      const AttnArgs& l = plan->attn[a];
      const auto rows = [&](at::TensorList t) { return t.empty() ? t : t.slice(a * B, B); };
      h = QWEN35_PLAN_LAYERS::decode_attn_layer(h, l.ln1, l.w_qkv, l.k_qkv, l.q_norm, l.k_norm, cos, sin, rows(k_buf),
                                           rows(v_buf), rows(k_scale), rows(v_scale), pos, l.w_o, l.k_o, l.ln2,
                                           l.w_gate_up, l.k_gate_up, l.w_down, l.k_down, l.Hq, l.eps);
      ++a;
    }
  }
  return {h, convs, recs};
}

}  // namespace QWEN35_PLAN_LAYERS

TORCH_LIBRARY_FRAGMENT(qwen35, m) {
  using QWEN35_PLAN_LAYERS::DecodePlan;
  m.class_<DecodePlan>(QWEN35_PLAN_CLASS)
      .def(torch::init<>())
      .def("add_gdn", &DecodePlan::add_gdn)
      .def("add_attn", &DecodePlan::add_attn)
      .def("layers", &DecodePlan::layers);
  m.def(QWEN35_PLAN_OP "(__torch__.torch.classes.qwen35." QWEN35_PLAN_CLASS " plan, Tensor x, Tensor[] conv, "
        "Tensor[] rec, Tensor cos, Tensor sin, Tensor(a!)[] k_buf, Tensor(b!)[] v_buf, Tensor(c!)[] k_scale, "
        "Tensor(d!)[] v_scale, int[] pos, bool[] in_place) -> (Tensor, Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(qwen35, CPU, m) { m.impl(QWEN35_PLAN_OP, &QWEN35_PLAN_LAYERS::decode_stack); }
