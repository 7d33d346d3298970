// AVX2 kernels for GLM-130B-format quantized weights on the CPU (built by quantization/cpu.py).
//
// gemv: y[m, n] = sum_k x[m, k] * q[n, k] * scale[n, group(k)] for a few rows m (decode). The activations
// are rounded to int16 per row (scale absmax / 32767) so that the products are integer multiply-adds
// (_mm256_madd_epi16: 16 per instruction) on the weight bytes as they are stored: INT8 as is, INT4 in the
// original nibble layout (column 2i in the high nibble of byte i, 2i + 1 in the low one), read against the
// activations split into even and odd columns. Integer sums are flushed to fp32 at least every 2048
// columns, before int32 could overflow. Requires AVX2 + FMA + F16C; the caller checks the CPU.
//
// dequantize: the float weight q * scale, for the prefill path (dequantise, then an fp32 matmul).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kFlushColumns = 2048;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Round one activation row to int16; returns its scale. For INT4 the row is written as even columns then
// odd columns (each k / 2 long), matching the high and low nibbles.
float quantize_row(const float* x, int64_t k, bool split, int16_t* out) {
  float absmax = 0.f;
  for (int64_t i = 0; i < k; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  if (absmax == 0.f) {
    std::fill(out, out + k, int16_t{0});
    return 0.f;
  }
  const float scale = absmax / 32767.f;
  const float inv = 32767.f / absmax;
  const int64_t half = k / 2;
  for (int64_t i = 0; i < k; ++i) {
    const auto v = static_cast<int16_t>(std::nearbyint(std::min(std::max(x[i] * inv, -32767.f), 32767.f)));
    if (split) {
      out[(i & 1) * half + (i >> 1)] = v;
    } else {
      out[i] = v;
    }
  }
  return scale;
}

// Integer dot products of one weight row segment of `len` columns (len % 32 == 0, len <= kFlushColumns)
// with MB activation rows at once, so each weight byte is loaded and unpacked once for all of them. INT8:
// x rows are `stride` apart. INT4: the segment is len / 2 bytes and each x row holds its even columns, then
// (k / 2 later) its odd ones.
template <int MB>
inline void dot_int8(const int8_t* w, const int16_t* x, int64_t stride, int64_t len, __m256i* acc) {
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_si256();
  for (int64_t k = 0; k < len; k += 16) {
    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    for (int mb = 0; mb < MB; ++mb) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + mb * stride + k));
      acc[mb] = _mm256_add_epi32(acc[mb], _mm256_madd_epi16(wv, xv));
    }
  }
}

template <int MB>
inline void dot_int4(const int8_t* w, const int16_t* x, int64_t stride, int64_t half, int64_t len, __m256i* acc) {
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_si256();
  for (int64_t j = 0; j < len / 2; j += 16) {
    const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
    const __m256i high = _mm256_srai_epi16(b, 4);
    const __m256i low = _mm256_srai_epi16(_mm256_slli_epi16(b, 12), 12);
    for (int mb = 0; mb < MB; ++mb) {
      const int16_t* xe = x + mb * stride + j;
      const __m256i even = _mm256_madd_epi16(high, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe)));
      const __m256i odd = _mm256_madd_epi16(low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe + half)));
      acc[mb] = _mm256_add_epi32(acc[mb], _mm256_add_epi32(even, odd));
    }
  }
}

// y[m, n] for MB rows m starting at x (int16, row stride k) and one weight row n.
template <int MB, bool INT4>
inline void row_times(const int8_t* wn, const uint16_t* sn, const int16_t* x, const float* xs, int64_t k,
                      int64_t groups, float* out, int64_t out_stride) {
  const int64_t width = k / groups;
  __m256 acc[MB];
  __m256i dot[MB];
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 sg = _mm256_set1_ps(_cvtsh_ss(sn[g]));
    for (int64_t c = g * width; c < (g + 1) * width; c += kFlushColumns) {
      const int64_t len = std::min(kFlushColumns, (g + 1) * width - c);
      if (INT4) {
        dot_int4<MB>(wn + c / 2, x + c / 2, k, k / 2, len, dot);
      } else {
        dot_int8<MB>(wn + c, x + c, k, len, dot);
      }
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[mb]), sg, acc[mb]);
    }
  }
  for (int mb = 0; mb < MB; ++mb) out[mb * out_stride] = hsum(acc[mb]) * xs[mb];
}

template <bool INT4>
void rows_times(const int8_t* wn, const uint16_t* sn, const int16_t* x, const float* xs, int64_t m_rows,
                int64_t k, int64_t groups, float* out, int64_t out_stride) {
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4)
    row_times<4, INT4>(wn, sn, x + m * k, xs + m, k, groups, out + m * out_stride, out_stride);
  switch (m_rows - m) {
    case 3: row_times<3, INT4>(wn, sn, x + m * k, xs + m, k, groups, out + m * out_stride, out_stride); break;
    case 2: row_times<2, INT4>(wn, sn, x + m * k, xs + m, k, groups, out + m * out_stride, out_stride); break;
    case 1: row_times<1, INT4>(wn, sn, x + m * k, xs + m, k, groups, out + m * out_stride, out_stride); break;
    default: break;
  }
}

void check_inputs(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(weight.dtype() == torch::kInt8 && weight.is_contiguous() && weight.dim() == 2, "weight: int8 [N, Kb]");
  TORCH_CHECK(scale.dtype() == torch::kHalf && scale.is_contiguous() && scale.dim() == 2, "scale: fp16 [N, G]");
  TORCH_CHECK(weight.size(1) * (8 / bits) == k, "weight columns do not match the input size");
  TORCH_CHECK(scale.size(0) == weight.size(0), "one scale row per weight row");
  TORCH_CHECK(k % scale.size(1) == 0 && (k / scale.size(1)) % 32 == 0, "group width must be a multiple of 32");
}

}  // namespace

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "x: float32 [M, K]");
  const int64_t m_rows = x.size(0), k = x.size(1), n_rows = weight.size(0), groups = scale.size(1);
  check_inputs(weight, scale, bits, k);
  const bool int4 = bits == 4;
  std::vector<int16_t> xq(m_rows * k);
  std::vector<float> xs(m_rows);
  for (int64_t m = 0; m < m_rows; ++m) xs[m] = quantize_row(x.data_ptr<float>() + m * k, k, int4, xq.data() + m * k);

  auto y = torch::empty({m_rows, n_rows}, x.options());
  float* out = y.data_ptr<float>();
  const int8_t* w = weight.data_ptr<int8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const int64_t row_bytes = weight.size(1);
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* wn = w + n * row_bytes;
      if (int4) {
        rows_times<true>(wn, s + n * groups, xq.data(), xs.data(), m_rows, k, groups, out + n, n_rows);
      } else {
        rows_times<false>(wn, s + n * groups, xq.data(), xs.data(), m_rows, k, groups, out + n, n_rows);
      }
    }
  });
  return y;
}

torch::Tensor dequantize(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits) {
  const int64_t n_rows = weight.size(0), k = weight.size(1) * (8 / bits), groups = scale.size(1);
  check_inputs(weight, scale, bits, k);
  const int64_t width = k / groups;
  auto out = torch::empty({n_rows, k}, weight.options().dtype(torch::kFloat));
  float* o = out.data_ptr<float>();
  const int8_t* w = weight.data_ptr<int8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const int64_t row_bytes = weight.size(1);
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* wn = w + n * row_bytes;
      float* on = o + n * k;
      for (int64_t g = 0; g < groups; ++g) {
        const float sg = _cvtsh_ss(s[n * groups + g]);
        if (bits == 8) {
          for (int64_t c = g * width; c < (g + 1) * width; ++c) on[c] = static_cast<float>(wn[c]) * sg;
        } else {
          for (int64_t j = g * width / 2; j < (g + 1) * width / 2; ++j) {
            const int8_t b = wn[j];
            on[2 * j] = static_cast<float>(b >> 4) * sg;
            on[2 * j + 1] = static_cast<float>(static_cast<int8_t>(b << 4) >> 4) * sg;
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "quantized weight x float activations, few rows (decode)");
  m.def("dequantize", &dequantize, "quantized weight to float32");
}
