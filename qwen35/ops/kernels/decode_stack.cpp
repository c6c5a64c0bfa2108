// A model's whole decoder stack for one decode step in one call from Python.
//
// The per-layer kernels (decode_gdn_layer / decode_attn_layer, cpu_kernels.cpp) left the layer loop in
// Python: 24 calls a token on the 0.8B, each converting ~20 arguments (lists of weight parts among them)
// through the dispatcher, with the interpreter's and the dispatcher's data evicted by the weight stream
// between calls. Measured on the 0.8B int4 replica: the layers took 15.4 ms a token inside C++ and 18.3 ms
// seen from Python (~120 us a layer outside the kernels). A DecodePlan holds every layer's constant
// arguments, given once at bind time (ops/decode_stack.py); a step passes only what changes (the input, the
// Gated DeltaNet states, the attention rows' buffers and lengths) and runs the same layer functions in the
// same order, so its results are those of the per-layer calls bit for bit (tested).

#define QWEN35_PLAN_LAYERS qwen35_layers
#define QWEN35_PLAN_CLASS "DecodePlan"
#define QWEN35_PLAN_OP "decode_stack"
#include "decode_plan.h"
