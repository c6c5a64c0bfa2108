// Floating-point contraction (a * b + c fused into one FMA, rounded once) chosen per function, with GCC and clang
// alike. The quantizers and dequantizers must round as the reference does (contraction off); dot products gain
// from FMAs (fast). GCC takes the choice as a function attribute; clang (Apple's is every Mac's compiler) ignores
// that attribute, with a warning, and takes a pragma at the start of the body instead (it covers the lambdas
// inside too). Without it a clang build fused the quantizers' multiply-adds: q6_k bytes differed from the
// reference's. Such a function is written
//   QWEN35_CONTRACT(off) void f(...) {
//     QWEN35_CONTRACT_BODY(off)
//     ...
#pragma once

#define QWEN35_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define QWEN35_CONTRACT(mode)
#define QWEN35_CONTRACT_BODY(mode) QWEN35_PRAGMA(clang fp contract(mode))
#else
#define QWEN35_CONTRACT(mode) __attribute__((optimize("fp-contract=" #mode)))
#define QWEN35_CONTRACT_BODY(mode)
#endif
