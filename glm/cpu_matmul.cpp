// y = x W^T (+ bias) for a few rows of fp32 activations (decode), weights in fp32, fp16 or bf16.
//
// Decode reads every weight once per token, so its speed is the speed the weights stream at. MKL's sgemm
// with one to a few rows streams them at 12-16 GB/s on a 2-core AVX2 machine; this loop reaches 20-26
// (bench/results/cpu-matmul.json). Each thread takes blocks of 4 weight rows. For each block it walks the columns
// 8 at a time with up to 4 activation rows held in registers, so an activation vector load serves 4 weight
// rows and a weight vector load serves every activation row. fp16 / bf16 weights are widened to fp32 in
// registers (exactly) and every product and sum is fp32, so the result is the fp32 model's up to the order
// of summation. Requires AVX2 + FMA + F16C and K % 8 == 0; the caller checks both.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename W>
inline __m256 load8(const W* p);

template <>
inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <>
inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// y[m, n..n+NB) for MB activation rows (row stride k) and NB weight rows (row stride k), plus bias[0..NB)
// when given.
template <int NB, int MB, typename W>
inline void tile(const W* w, const float* x, int64_t k, const float* bias, float* y, int64_t y_stride) {
  __m256 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; c += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * k + c);
    for (int i = 0; i < NB; ++i) {
      const __m256 wv = load8<W>(w + i * k + c);
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm256_fmadd_ps(wv, xv[m], acc[i][m]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MB; ++m) y[m * y_stride + i] = hsum(acc[i][m]) + (bias ? bias[i] : 0.f);
}

// Every activation row against NB weight rows, MB_MAX rows at a time while the block sits in cache.
template <int NB, typename W>
inline void rows_tile(const W* w, const float* x, int64_t m_rows, int64_t k, const float* bias, float* y,
                      int64_t n_rows) {
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4) tile<NB, 4, W>(w, x + m * k, k, bias, y + m * n_rows, n_rows);
  switch (m_rows - m) {
    case 3: tile<NB, 3, W>(w, x + m * k, k, bias, y + m * n_rows, n_rows); break;
    case 2: tile<NB, 2, W>(w, x + m * k, k, bias, y + m * n_rows, n_rows); break;
    case 1: tile<NB, 1, W>(w, x + m * k, k, bias, y + m * n_rows, n_rows); break;
    default: break;
  }
}

template <typename W>
void matmul(const float* x, const W* w, const float* bias, float* y, int64_t m_rows, int64_t k, int64_t n_rows) {
  constexpr int64_t kBlock = 4;
  const int64_t blocks = n_rows / kBlock;
  auto bias_at = [bias](int64_t n) { return bias ? bias + n : nullptr; };
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      rows_tile<kBlock, W>(w + b * kBlock * k, x, m_rows, k, bias_at(b * kBlock), y + b * kBlock, n_rows);
  });
  for (int64_t n = blocks * kBlock; n < n_rows; ++n) rows_tile<1, W>(w + n * k, x, m_rows, k, bias_at(n), y + n, n_rows);
}

}  // namespace

// x [..., K] (any leading dims, M rows in all) -> y [..., N]: no reshapes around the call.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.dim() >= 1, "x: float32 [..., K], contiguous");
  const int64_t k = x.size(-1);
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(1) == k, "weight: [N, K], contiguous");
  TORCH_CHECK(k % 8 == 0, "K must be a multiple of 8");
  const int64_t m_rows = k ? x.numel() / k : 0, n_rows = weight.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = n_rows;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dtype() == torch::kFloat && bias->is_contiguous() && bias->numel() == n_rows,
                "bias: float32 [N], contiguous");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (weight.scalar_type()) {
    case torch::kFloat: matmul(xp, weight.data_ptr<float>(), b, yp, m_rows, k, n_rows); break;
    case torch::kHalf: matmul(xp, weight.data_ptr<at::Half>(), b, yp, m_rows, k, n_rows); break;
    case torch::kBFloat16: matmul(xp, weight.data_ptr<at::BFloat16>(), b, yp, m_rows, k, n_rows); break;
    default: TORCH_CHECK(false, "weight must be float32, float16 or bfloat16");
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x W^T (+ bias) for a few fp32 rows; fp32, fp16 or bf16 weights", py::arg("x"),
        py::arg("weight"), py::arg("bias") = py::none());
}
