// The flash-decoding block walk that attn_decode's two cache formats share (cpu_kernels.cpp: bf16 keys and
// values; kv_kernels.cpp: q8_0 blocks): work items are (row, KV head, block of kAttnBlock keys) in that order,
// each thread taking a contiguous range of them; while a thread's P.V computes from L2 it prefetches the keys of
// its next item (the score pass streams keys and values from memory, P.V nothing: without this the memory bus
// idles through P.V). RowPrefetch is plain C++ (GCC's and clang's prefetch builtin): the portable library's
// attention (portable_layers.cpp, its own blocks of 256 keys) prefetches its next block with it too.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace qwen35_attn {

constexpr int64_t kAttnBlock = 512;  // keys per block (a block's score rows are this long)

// Item i's row b, KV head h and keys [s0, s1) (empty past the row's length).
struct Block {
  int64_t b, h, s0, s1;
};
inline Block block_of(int64_t i, int64_t Hkv, int64_t nblocks, at::IntArrayRef lengths) {
  const int64_t b = i / (Hkv * nblocks), blk = i % nblocks;
  return {b, (i / nblocks) % Hkv, blk * kAttnBlock, std::min(lengths[b], (blk + 1) * kAttnBlock)};
}

// Rows of keys brought into L2 a few lines at a time: spread(steps) sizes each step() so the rows are asked for
// over that many calls.
struct RowPrefetch {
  const char* row = nullptr;  // the row being prefetched
  int64_t rows = 0, stride = 0, row_bytes = 0, off = 0, per_step = 0;
  RowPrefetch() = default;
  RowPrefetch(const void* first, int64_t rows, int64_t stride, int64_t row_bytes)
      : row(static_cast<const char*>(first)), rows(rows), stride(stride), row_bytes(row_bytes) {}
  inline void spread(int64_t steps) {
    if (rows > 0 && steps > 0) per_step = (rows * ((row_bytes + 63) / 64) + steps - 1) / steps;
  }
  inline void step() {
    for (int64_t i = 0; i < per_step && rows > 0; ++i) {
      __builtin_prefetch(row + off, 0, 2);  // (x86: prefetcht1, into L2)
      if ((off += 64) >= row_bytes) { off = 0; row += stride; --rows; }
    }
  }
};

// A block's scores -> bf16-rounded exp(score - max) and the block's max and sum (cpu_kernels.cpp)
void softmax_block(int64_t G, int64_t n, const float* mx, float* scores, float* out, int64_t D);

}  // namespace qwen35_attn
