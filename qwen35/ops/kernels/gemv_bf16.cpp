// Decode-time matrix-vector products with bf16 weights, streamed at memory bandwidth.
//
// out[M, N] (fp32) = x[M, K] (bf16) . W[N, K]^T (bf16), for the few rows M a decode step has.
// Each weight byte is read once per call: 4 weight rows are processed together against all M inputs
// with AVX512-BF16 dot products (vdpbf16ps: 32 bf16 products accumulated into 16 fp32 lanes), and the
// rows are split across threads. torch's own bf16 matrix-vector path reaches ~10-20 GB/s here; this
// one aims at the ~30 GB/s the memory delivers.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kRows = 4;     // weight rows per block
constexpr int kMaxM = 4;     // input rows handled per pass over the weights

inline __m512bh load_bf16(const at::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}
inline __m512bh load_bf16_masked(const at::BFloat16* p, __mmask32 m) {
  return (__m512bh)_mm512_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p));
}

template <int M>
void block_rows(const at::BFloat16* __restrict x, int64_t ldx, const at::BFloat16* __restrict w, int64_t K,
                int64_t rows, float* __restrict out, int64_t ldo) {
  __m512 acc[kRows][M];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t K32 = K & ~int64_t(31);
  for (int64_t k = 0; k < K32; k += 32) {
    __m512bh xv[M];
    for (int m = 0; m < M; ++m) xv[m] = load_bf16(x + m * ldx + k);
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + 512), _MM_HINT_T0);
      __m512bh wv = load_bf16(w + r * K + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  if (K32 < K) {
    __mmask32 mask = (__mmask32)((1ull << (K - K32)) - 1);
    __m512bh xv[M];
    for (int m = 0; m < M; ++m) xv[m] = load_bf16_masked(x + m * ldx + K32, mask);
    for (int r = 0; r < rows; ++r) {
      __m512bh wv = load_bf16_masked(w + r * K + K32, mask);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < M; ++m) out[m * ldo + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M>
void run(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t N, int64_t K, float* out,
         int64_t ldo) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kRows;
      block_rows<M>(x, ldx, w + n * K, K, std::min<int64_t>(kRows, N - n), out + n, ldo);
    }
  });
}

}  // namespace

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "gemv_bf16: x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 inputs");
  TORCH_CHECK(x.size(1) == w.size(1), "gemv_bf16: K mismatch");
  TORCH_CHECK(w.is_contiguous() && x.stride(1) == 1, "gemv_bf16: contiguous rows expected");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  float* op = out.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const int64_t mb = std::min<int64_t>(kMaxM, M - m0);
    const auto* xm = xp + m0 * x.stride(0);
    float* om = op + m0 * N;
    switch (mb) {
      case 1: run<1>(xm, x.stride(0), wp, N, K, om, N); break;
      case 2: run<2>(xm, x.stride(0), wp, N, K, om, N); break;
      case 3: run<3>(xm, x.stride(0), wp, N, K, om, N); break;
      default: run<4>(xm, x.stride(0), wp, N, K, om, N); break;
    }
  }
  return out;
}

bool cpu_supported() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "out[M,N] fp32 = x[M,K] bf16 . w[N,K]^T bf16");
  m.def("cpu_supported", &cpu_supported, "whether this CPU has AVX512-BF16");
}
