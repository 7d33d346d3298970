// The dense CPU kernels' Python module (built by glm/cpu_matmul.py through quantization/native.py, once
// per instruction set): `linear` for decode-sized matmuls (gemv.h) and the fused decode block
// (decode_block.h), whose linears may also be INT8 / INT4 (the quantized layers' own decode kernel,
// quantization/cpu_gemv.h, compiled in here too). Shapes and dtypes are checked here; glm/cpu_matmul.py and
// glm/model.py decide when a call applies.

#include <torch/extension.h>

#include "../../quantization/cpu_gemv.h"
#include "decode_block.h"
#include "gemm.h"
#include "gemv.h"

namespace {

void check_weight(const torch::Tensor& w, int64_t k, const char* name) {
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(1) == k, name, ": [N, ", k, "], contiguous");
  TORCH_CHECK(k % 8 == 0, name, ": K must be a multiple of 8");
}

const float* float_data(const c10::optional<torch::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->dtype() == torch::kFloat && t->is_contiguous() && t->numel() == n, name, ": float32 [", n,
              "], contiguous");
  return t->data_ptr<float>();
}

// Rows from which the blocked GEMM beats streaming the weights once per 4 rows (bench/cpu_matmul.py).
constexpr int64_t kGemmMinRows = 17;

template <typename W>
void matmul(const float* x, const W* w, const float* bias, float* y, int64_t m, int64_t k, int64_t n) {
  if (m >= kGemmMinRows) {
    gemm::matmul(x, gemm::DenseRows<W>{w, k}, bias, y, m, k, n);
  } else {
    gemv::matmul(x, w, bias, y, m, k, n);
  }
}

// y [m, N] = x [m, K] w^T (+ bias), w fp32, fp16 or bf16.
void linear_into(const float* x, const torch::Tensor& w, const float* bias, float* y, int64_t m) {
  const int64_t n = w.size(0), k = w.size(1);
  switch (w.scalar_type()) {
    case torch::kFloat: matmul(x, w.data_ptr<float>(), bias, y, m, k, n); break;
    case torch::kHalf: matmul(x, w.data_ptr<at::Half>(), bias, y, m, k, n); break;
    case torch::kBFloat16: matmul(x, w.data_ptr<at::BFloat16>(), bias, y, m, k, n); break;
    default: TORCH_CHECK(false, "weight must be float32, float16 or bfloat16");
  }
}

// Rows up to which a quantized layer runs its decode kernel, above which the blocked GEMM of the dequantised
// tiles (quantization/cpu.py DECODE_MAX_ROWS: the fused block computes what the layer would).
constexpr int64_t kQuantizedGemvMaxRows = 8;

// A linear layer's weight as the block receives it: dense (fp32, fp16 or bf16 [N, K]) or, with a scale,
// quantized as quantization/schemes.py stores it (int8 [N, K], or packed INT4 [N, K / 2], with fp16 scales
// [N, groups]).
struct Weight {
  const torch::Tensor& w;
  const torch::Tensor* scale;  // nullptr: dense
  int64_t k;
};

Weight weight_of(const torch::Tensor& w, const c10::optional<torch::Tensor>& scale, int64_t k, const char* name) {
  if (!scale.has_value() || !scale->defined()) {
    check_weight(w, k, name);
    return {w, nullptr, k};
  }
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.is_contiguous() && w.dim() == 2 && (w.size(1) == k || 2 * w.size(1) == k),
              name, ": int8 [N, ", k, "] or packed INT4 [N, ", k / 2, "], contiguous");
  TORCH_CHECK(scale->dtype() == torch::kHalf && scale->is_contiguous() && scale->dim() == 2 &&
                  scale->size(0) == w.size(0) && k % scale->size(1) == 0 && (k / scale->size(1)) % 32 == 0,
              name, " scale: float16 [N, groups], contiguous, K / groups a multiple of 32");
  return {w, &*scale, k};
}

// y [m, N] = x [m, K] W^T (+ bias) for either kind of weight; a quantized one adds the bias after the
// matmul, as the layer does.
void linear_into(const float* x, const Weight& weight, const float* bias, float* y, int64_t m) {
  if (weight.scale == nullptr) return linear_into(x, weight.w, bias, y, m);
  const torch::Tensor &w = weight.w, &scale = *weight.scale;
  const int64_t n = w.size(0), k = weight.k, groups = scale.size(1);
  const bool int4 = w.size(1) != k;
  const auto* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  if (m <= kQuantizedGemvMaxRows) {
    qgemv::gemv(x, m, k, w.data_ptr<int8_t>(), w.size(1), s, groups, n, int4, y);
  } else {
    const gemm::QuantizedRows rows{w.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), k, groups, k / groups, int4};
    gemm::matmul(x, rows, nullptr, y, m, k, n);
  }
  if (bias != nullptr)
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < n; ++j) y[r * n + j] += bias[j];
}

torch::Tensor rows_of(const torch::Tensor& x, int64_t width, const char* name) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.dim() >= 1 && x.size(-1) == width, name,
              ": float32 [..., ", width, "], contiguous");
  return x;
}

}  // namespace

// x [..., K] (any leading dims, M rows in all) -> y [..., N]: no reshapes around the call. With `scale`, the
// weight is quantized (Weight), multiplied as its quantized layer would.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                     const c10::optional<torch::Tensor>& scale) {
  TORCH_CHECK(x.dim() >= 1, "x: float32 [..., K]");
  const int64_t k = x.size(-1);
  rows_of(x, k, "x");
  const Weight w = weight_of(weight, scale, k, "weight");
  const int64_t m = k ? x.numel() / k : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = weight.size(0);
  auto y = torch::empty(sizes, x.options());
  linear_into(x.data_ptr<float>(), w, float_data(bias, weight.size(0), "bias"), y.data_ptr<float>(), m);
  return y;
}

// a = LayerNorm(x); qkv = a W^T + b, per head [q | k | v], with rotary applied to q and k (cos, sin [R, hn]).
std::vector<torch::Tensor> attention_input(const torch::Tensor& x, const torch::Tensor& ln_w, const torch::Tensor& ln_b,
                                           double eps, const torch::Tensor& qkv_w,
                                           const c10::optional<torch::Tensor>& qkv_scale,
                                           const c10::optional<torch::Tensor>& qkv_b, const torch::Tensor& cos,
                                           const torch::Tensor& sin, int64_t heads) {
  const int64_t h = x.size(-1), rows = x.numel() / h, width = qkv_w.size(0), hn = width / (3 * heads);
  rows_of(x, h, "x");
  const Weight qkv_weight = weight_of(qkv_w, qkv_scale, h, "qkv weight");
  TORCH_CHECK(width == 3 * heads * hn && hn % 2 == 0, "qkv weight: 3 x heads x head_dim rows");
  rows_of(cos, hn, "cos");
  rows_of(sin, hn, "sin");
  TORCH_CHECK(cos.numel() == rows * hn && sin.numel() == rows * hn, "cos, sin: one row per token");
  const float* w = float_data(ln_w, h, "layernorm weight");
  const float* b = float_data(ln_b, h, "layernorm bias");
  auto a = torch::empty_like(x);
  auto qkv_sizes = x.sizes().vec();
  qkv_sizes.back() = width;
  auto qkv = torch::empty(qkv_sizes, x.options());
  float* ap = a.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    block::layer_norm(x.data_ptr<float>() + r * h, w, b, static_cast<float>(eps), h, ap + r * h);
  float* q = qkv.data_ptr<float>();
  linear_into(ap, qkv_weight, float_data(qkv_b, width, "qkv bias"), q, rows);
  std::vector<float> scratch(hn);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < heads; ++n)
      for (int64_t part = 0; part < 2; ++part)  // q, k
        block::rotary(q + r * width + (n * 3 + part) * hn, cos.data_ptr<float>() + r * hn,
                      sin.data_ptr<float>() + r * hn, hn, scratch.data());
  return {a, qkv};
}

// The rest of the block for a [G, W, h] and attention_input's qkv: attention of each row over the first
// `length` = keys.size(2) columns of keys / values [G, nh, length, hn] with an additive bias [G or 1, 1, W,
// length] (unit last stride), then h = alpha a + dense(ctx); m = LayerNorm(h); out = alpha m + down(GeGLU(up(m))).
torch::Tensor attention_output(const torch::Tensor& a, const torch::Tensor& qkv, const torch::Tensor& keys,
                               const torch::Tensor& values, const torch::Tensor& bias, double alpha,
                               const torch::Tensor& dense_w, const c10::optional<torch::Tensor>& dense_scale,
                               const c10::optional<torch::Tensor>& dense_b, const torch::Tensor& ln_w,
                               const torch::Tensor& ln_b, double eps, const torch::Tensor& up_w,
                               const c10::optional<torch::Tensor>& up_scale, const c10::optional<torch::Tensor>& up_b,
                               const torch::Tensor& down_w, const c10::optional<torch::Tensor>& down_scale,
                               const c10::optional<torch::Tensor>& down_b, int64_t heads) {
  TORCH_CHECK(a.dim() == 3, "a: [G, W, h]");
  const int64_t groups = a.size(0), width = a.size(1), h = a.size(2), rows = groups * width;
  const int64_t hn = qkv.size(-1) / (3 * heads), length = keys.size(2), f = up_w.size(0) / 2;
  rows_of(a, h, "a");
  rows_of(qkv, 3 * heads * hn, "qkv");
  for (const auto* t : {&keys, &values})
    TORCH_CHECK(t->dtype() == torch::kFloat && t->dim() == 4 && t->size(0) == groups && t->size(1) == heads &&
                    t->size(2) == length && t->size(3) == hn && t->stride(3) == 1,
                "keys, values: float32 [G, heads, length, head_dim], unit last stride");
  TORCH_CHECK(bias.dtype() == torch::kFloat && bias.dim() == 4 && (bias.size(0) == groups || bias.size(0) == 1) &&
                  bias.size(1) == 1 && bias.size(2) == width && bias.size(3) == length && bias.stride(3) == 1,
              "bias: float32 [G or 1, 1, W, length], unit last stride");
  // broadcast over groups by a zero stride (at::expand costs more than this whole call's small ops)
  const block::Strided4 bias_view{bias.data_ptr<float>(), bias.size(0) == 1 ? 0 : bias.stride(0), 0,
                                  bias.stride(2)};
  const Weight dense = weight_of(dense_w, dense_scale, heads * hn, "dense weight");
  TORCH_CHECK(dense_w.size(0) == h, "dense weight: [h, heads x head_dim]");
  const Weight up = weight_of(up_w, up_scale, h, "up weight");
  const Weight down = weight_of(down_w, down_scale, f, "down weight");
  TORCH_CHECK(up_w.size(0) == 2 * f && down_w.size(0) == h, "up [2F, h] and down [h, F] weights");
  auto view = [](const torch::Tensor& t) {
    return block::Strided4{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
  };
  std::vector<float> ctx(rows * heads * hn), hidden(rows * h), up_out(rows * 2 * f), gated(rows * f);
  block::attention(qkv.data_ptr<float>(), rows, width, heads, hn, view(keys), view(values), bias_view, length,
                   ctx.data());
  linear_into(ctx.data(), dense, float_data(dense_b, h, "dense bias"), hidden.data(), rows);
  const float al = static_cast<float>(alpha);
  const float* ap = a.data_ptr<float>();
  auto out = torch::empty_like(a);
  float* m = out.data_ptr<float>();  // holds m until the last step turns it into the output
  const float* w = float_data(ln_w, h, "layernorm weight");
  const float* b = float_data(ln_b, h, "layernorm bias");
  for (int64_t i = 0; i < rows * h; ++i) hidden[i] += al * ap[i];
  for (int64_t r = 0; r < rows; ++r) block::layer_norm(hidden.data() + r * h, w, b, static_cast<float>(eps), h, m + r * h);
  linear_into(m, up, float_data(up_b, 2 * f, "up bias"), up_out.data(), rows);
  for (int64_t r = 0; r < rows; ++r) block::geglu(up_out.data() + r * 2 * f, f, gated.data() + r * f);
  linear_into(gated.data(), down, float_data(down_b, h, "down bias"), hidden.data(), rows);
  for (int64_t i = 0; i < rows * h; ++i) m[i] = al * m[i] + hidden[i];
  return out;
}

// y [..., N] = x [..., K] (fp32) times the dequantised INT8 / INT4 weight [N, K] (`bits`; INT4 packed [N, K / 2])
// with fp16 scales [N, groups], through the blocked GEMM (prefill; quantization's own kernel streams decode).
torch::Tensor quantized_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                               int64_t bits) {
  TORCH_CHECK(x.dim() >= 1, "x: float32 [..., K]");
  const int64_t k = x.size(-1);
  rows_of(x, k, "x");
  TORCH_CHECK(bits == 8 || bits == 4, "bits: 8 or 4");
  TORCH_CHECK(weight.dtype() == torch::kInt8 && weight.is_contiguous() && weight.dim() == 2 &&
                  weight.size(1) * (bits == 4 ? 2 : 1) == k,
              "weight: int8 [N, K] (INT8) or [N, K / 2] (INT4), contiguous");
  const int64_t n = weight.size(0);
  TORCH_CHECK(scale.dtype() == torch::kHalf && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == n,
              "scale: float16 [N, groups], contiguous");
  const int64_t groups = scale.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % 8 == 0, "scale groups: K / groups a multiple of 8");
  const int64_t m = k ? x.numel() / k : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto y = torch::empty(sizes, x.options());
  const gemm::QuantizedRows rows{weight.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), k, groups, k / groups,
                                 bits == 4};
  gemm::matmul(x.data_ptr<float>(), rows, nullptr, y.data_ptr<float>(), m, k, n);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x W^T (+ bias) for fp32 rows; fp32, fp16 or bf16 weights, or INT8 / INT4 with a scale",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("scale") = py::none());
  m.def("quantized_linear", &quantized_linear, "x W^T for fp32 rows and an INT8 / INT4 weight (blocked GEMM)",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("bits"));
  m.def("attention_input", &attention_input, "LayerNorm, qkv matmul and rotary of a GLM block (decode)");
  m.def("attention_output", &attention_output, "attention, dense, residuals, LayerNorm and GeGLU (decode)");
}
