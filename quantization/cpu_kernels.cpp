// The quantization extension's CPU kernels (built by quantization/cpu.py): `gemv`, the decode matmul of
// cpu_gemv.h, and `dequantize`, q * scale of some rows of a weight into the caller's float32 buffer (the
// prefill fallback dequantises a tile of rows at a time, then runs a dense matmul on it). AVX2 + FMA + F16C.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

#include "cpu_gemv.h"

namespace {

void check_inputs(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(weight.dtype() == torch::kInt8 && weight.is_contiguous() && weight.dim() == 2, "weight: int8 [N, Kb]");
  TORCH_CHECK(scale.dtype() == torch::kHalf && scale.is_contiguous() && scale.dim() == 2, "scale: fp16 [N, G]");
  TORCH_CHECK(weight.size(1) * (8 / bits) == k, "weight columns do not match the input size");
  TORCH_CHECK(scale.size(0) == weight.size(0), "one scale row per weight row");
  TORCH_CHECK(k % scale.size(1) == 0 && (k / scale.size(1)) % 32 == 0, "group width must be a multiple of 32");
}

// q * scale for one group of one row, 16 (INT8) or 32 (INT4) columns a step.
void dequantize_group(const int8_t* w, float sg, int64_t columns, bool int4, float* out) {
  const __m256 s = _mm256_set1_ps(sg);
  const auto store8 = [&](__m128i q16, float* o) {  // 8 int16 values
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(q16)), s));
  };
  if (!int4) {
    for (int64_t c = 0; c < columns; c += 16) {
      const __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c)));
      store8(_mm256_castsi256_si128(q), out + c);
      store8(_mm256_extracti128_si256(q, 1), out + c + 8);
    }
    return;
  }
  for (int64_t j = 0; j < columns / 2; j += 8) {  // 8 bytes: columns 2j .. 2j + 16
    const __m128i b = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j)));
    const __m128i high = _mm_srai_epi16(b, 4), low = _mm_srai_epi16(_mm_slli_epi16(b, 12), 12);
    store8(_mm_unpacklo_epi16(high, low), out + 2 * j);
    store8(_mm_unpackhi_epi16(high, low), out + 2 * j + 8);
  }
}

}  // namespace

// x [..., K] (M rows in all) -> y [..., N]: no reshapes around the call.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.dim() >= 1, "x: float32 [..., K], contiguous");
  const int64_t k = x.size(-1), m_rows = k ? x.numel() / k : 0, groups = scale.size(1);
  check_inputs(weight, scale, bits, k);
  auto sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  auto y = torch::empty(sizes, x.options());
  qgemv::gemv(x.data_ptr<float>(), m_rows, k, weight.data_ptr<int8_t>(), weight.size(1),
              reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()), groups, weight.size(0), bits == 4,
              y.data_ptr<float>());
  return y;
}

// Writes q * scale of `weight` (any rows of a stored weight, with their scale rows) into `out` (float32
// [rows, k], contiguous) and returns it.
torch::Tensor dequantize(const torch::Tensor& weight, const torch::Tensor& scale, int64_t bits, torch::Tensor out) {
  const int64_t n_rows = weight.size(0), k = weight.size(1) * (8 / bits), groups = scale.size(1);
  check_inputs(weight, scale, bits, k);
  TORCH_CHECK(out.dtype() == torch::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == n_rows &&
                  out.size(1) == k,
              "out: float32 [N, K], contiguous");
  const int64_t width = k / groups, row_bytes = weight.size(1);
  const int8_t* w = weight.data_ptr<int8_t>();
  const auto* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < groups; ++g)
        dequantize_group(w + n * row_bytes + g * width * bits / 8, _cvtsh_ss(s[n * groups + g]), width, bits == 4,
                         o + n * k + g * width);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "quantized weight x float activations, few rows (decode)");
  m.def("dequantize", &dequantize, "quantized weight rows to float32, into out");
}
