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

namespace {

// a = LayerNorm(x) and qkv = a W^T + b for `rows` rows of h, per head [q | k | v], with rotary applied to q and
// k (cos, sin [rows, hn]).
void attention_input_into(const float* x, int64_t rows, int64_t h, const float* ln_w, const float* ln_b, float eps,
                          const Weight& qkv_weight, const float* qkv_b, const float* cos, const float* sin,
                          int64_t heads, int64_t hn, float* a, float* qkv) {
  const int64_t width = 3 * heads * hn;
  for (int64_t r = 0; r < rows; ++r) block::layer_norm(x + r * h, ln_w, ln_b, eps, h, a + r * h);
  linear_into(a, qkv_weight, qkv_b, qkv, rows);
  std::vector<float> scratch(hn);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < heads; ++n)
      for (int64_t part = 0; part < 2; ++part)  // q, k
        block::rotary(qkv + r * width + (n * 3 + part) * hn, cos + r * hn, sin + r * hn, hn, scratch.data());
}

// The layer norms', dense, up and down operands of attention_output and decode_block, checked.
struct OutputOperands {
  Weight dense, up, down;
  const float *dense_b, *ln_w, *ln_b, *up_b, *down_b;
  float eps;
  int64_t f;
};

OutputOperands output_operands(int64_t h, int64_t heads, int64_t hn, const torch::Tensor& dense_w,
                               const c10::optional<torch::Tensor>& dense_scale,
                               const c10::optional<torch::Tensor>& dense_b, const torch::Tensor& ln_w,
                               const torch::Tensor& ln_b, double eps, const torch::Tensor& up_w,
                               const c10::optional<torch::Tensor>& up_scale, const c10::optional<torch::Tensor>& up_b,
                               const torch::Tensor& down_w, const c10::optional<torch::Tensor>& down_scale,
                               const c10::optional<torch::Tensor>& down_b) {
  const int64_t f = up_w.size(0) / 2;
  const Weight dense = weight_of(dense_w, dense_scale, heads * hn, "dense weight");
  TORCH_CHECK(dense_w.size(0) == h, "dense weight: [h, heads x head_dim]");
  const Weight up = weight_of(up_w, up_scale, h, "up weight");
  const Weight down = weight_of(down_w, down_scale, f, "down weight");
  TORCH_CHECK(up_w.size(0) == 2 * f && down_w.size(0) == h, "up [2F, h] and down [h, F] weights");
  return {dense,
          up,
          down,
          float_data(dense_b, h, "dense bias"),
          float_data(ln_w, h, "layernorm weight"),
          float_data(ln_b, h, "layernorm bias"),
          float_data(up_b, 2 * f, "up bias"),
          float_data(down_b, h, "down bias"),
          static_cast<float>(eps),
          f};
}

// The rest of the block for `groups` x `width` rows (a [rows, h], qkv [rows, 3 heads hn]): attention over the
// first `length` keys and values, then h = alpha a + dense(ctx); m = LayerNorm(h); out = alpha m + down(GeGLU(up(m))).
void attention_output_into(const float* a, const float* qkv, int64_t groups, int64_t width, int64_t h, int64_t heads,
                           int64_t hn, block::Strided4 keys, block::Strided4 values, block::Strided4 bias,
                           int64_t length, float alpha, const OutputOperands& p, float* out) {
  const int64_t rows = groups * width, f = p.f;
  std::vector<float> ctx(rows * heads * hn), hidden(rows * h), up_out(rows * 2 * f), gated(rows * f);
  block::attention(qkv, rows, width, heads, hn, keys, values, bias, length, ctx.data());
  linear_into(ctx.data(), p.dense, p.dense_b, hidden.data(), rows);
  float* m = out;  // holds m until the last step turns it into the output
  for (int64_t i = 0; i < rows * h; ++i) hidden[i] += alpha * a[i];
  for (int64_t r = 0; r < rows; ++r) block::layer_norm(hidden.data() + r * h, p.ln_w, p.ln_b, p.eps, h, m + r * h);
  linear_into(m, p.up, p.up_b, up_out.data(), rows);
  for (int64_t r = 0; r < rows; ++r) block::geglu(up_out.data() + r * 2 * f, f, gated.data() + r * f);
  linear_into(gated.data(), p.down, p.down_b, hidden.data(), rows);
  for (int64_t i = 0; i < rows * h; ++i) m[i] = alpha * m[i] + hidden[i];
}

// An additive bias [G or 1, 1, W, length] (unit last stride) as a view broadcast over groups by a zero stride
// (at::expand costs more than a whole block's small ops).
block::Strided4 bias_view(const torch::Tensor& bias, int64_t groups, int64_t width, int64_t length) {
  TORCH_CHECK(bias.dtype() == torch::kFloat && bias.dim() == 4 && (bias.size(0) == groups || bias.size(0) == 1) &&
                  bias.size(1) == 1 && bias.size(2) == width && bias.size(3) == length && bias.stride(3) == 1,
              "bias: float32 [G or 1, 1, W, length], unit last stride");
  return {bias.data_ptr<float>(), bias.size(0) == 1 ? 0 : bias.stride(0), 0, bias.stride(2)};
}

block::Strided4 view_of(const torch::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// cos or sin: float32, contiguous, one row of hn per token (any leading shape, [b, s, 1, hn] from the model).
const float* rotary_table(const torch::Tensor& t, int64_t rows, int64_t hn, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kFloat && t.is_contiguous() && t.numel() == rows * hn && t.size(-1) == hn, name,
              ": float32 [..., head_dim], contiguous, one row per token");
  return t.data_ptr<float>();
}

}  // namespace

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
  auto a = torch::empty_like(x);
  auto qkv_sizes = x.sizes().vec();
  qkv_sizes.back() = width;
  auto qkv = torch::empty(qkv_sizes, x.options());
  attention_input_into(x.data_ptr<float>(), rows, h, float_data(ln_w, h, "layernorm weight"),
                       float_data(ln_b, h, "layernorm bias"), static_cast<float>(eps), qkv_weight,
                       float_data(qkv_b, width, "qkv bias"), rotary_table(cos, rows, hn, "cos"),
                       rotary_table(sin, rows, hn, "sin"), heads, hn, a.data_ptr<float>(), qkv.data_ptr<float>());
  return {a, qkv};
}

// The rest of the block for a [G, W, h] and attention_input's qkv: attention of each row over the first
// `length` = keys.size(2) columns of keys / values [G, nh, length, hn] with an additive bias [G or 1, 1, W,
// length] (unit last stride), then the dense matmul, residuals, LayerNorm and GeGLU (attention_output_into).
torch::Tensor attention_output(const torch::Tensor& a, const torch::Tensor& qkv, const torch::Tensor& keys,
                               const torch::Tensor& values, const torch::Tensor& bias, double alpha,
                               const torch::Tensor& dense_w, const c10::optional<torch::Tensor>& dense_scale,
                               const c10::optional<torch::Tensor>& dense_b, const torch::Tensor& ln_w,
                               const torch::Tensor& ln_b, double eps, const torch::Tensor& up_w,
                               const c10::optional<torch::Tensor>& up_scale, const c10::optional<torch::Tensor>& up_b,
                               const torch::Tensor& down_w, const c10::optional<torch::Tensor>& down_scale,
                               const c10::optional<torch::Tensor>& down_b, int64_t heads) {
  TORCH_CHECK(a.dim() == 3, "a: [G, W, h]");
  const int64_t groups = a.size(0), width = a.size(1), h = a.size(2);
  const int64_t hn = qkv.size(-1) / (3 * heads), length = keys.size(2);
  rows_of(a, h, "a");
  rows_of(qkv, 3 * heads * hn, "qkv");
  for (const auto* t : {&keys, &values})
    TORCH_CHECK(t->dtype() == torch::kFloat && t->dim() == 4 && t->size(0) == groups && t->size(1) == heads &&
                    t->size(2) == length && t->size(3) == hn && t->stride(3) == 1,
                "keys, values: float32 [G, heads, length, head_dim], unit last stride");
  const OutputOperands p = output_operands(h, heads, hn, dense_w, dense_scale, dense_b, ln_w, ln_b, eps, up_w,
                                           up_scale, up_b, down_w, down_scale, down_b);
  auto out = torch::empty_like(a);
  attention_output_into(a.data_ptr<float>(), qkv.data_ptr<float>(), groups, width, h, heads, hn, view_of(keys),
                        view_of(values), bias_view(bias, groups, width, length), length, static_cast<float>(alpha), p,
                        out.data_ptr<float>());
  return out;
}

// The whole block for x [G, W, h] in one call, the cache write included: attention_input, then row (g, w)'s
// new key and value written at column columns[g, w] of the cache buffers keys / values [>= G, nh, T, hn]
// (contiguous), then attention_output over their first `length` columns.
torch::Tensor decode_block(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                           const torch::Tensor& bias, const torch::Tensor& keys, const torch::Tensor& values,
                           const torch::Tensor& columns, int64_t length, double alpha, int64_t heads,
                           const torch::Tensor& ln1_w, const torch::Tensor& ln1_b, double eps1, const torch::Tensor& qkv_w,
                           const c10::optional<torch::Tensor>& qkv_scale, const c10::optional<torch::Tensor>& qkv_b,
                           const torch::Tensor& dense_w, const c10::optional<torch::Tensor>& dense_scale,
                           const c10::optional<torch::Tensor>& dense_b, const torch::Tensor& ln2_w,
                           const torch::Tensor& ln2_b, double eps2, const torch::Tensor& up_w,
                           const c10::optional<torch::Tensor>& up_scale, const c10::optional<torch::Tensor>& up_b,
                           const torch::Tensor& down_w, const c10::optional<torch::Tensor>& down_scale,
                           const c10::optional<torch::Tensor>& down_b) {
  TORCH_CHECK(x.dim() == 3, "x: [G, W, h]");
  const int64_t groups = x.size(0), width = x.size(1), h = x.size(2), rows = groups * width;
  const int64_t qkv_width = qkv_w.size(0), hn = qkv_width / (3 * heads);
  rows_of(x, h, "x");
  const Weight qkv_weight = weight_of(qkv_w, qkv_scale, h, "qkv weight");
  TORCH_CHECK(qkv_width == 3 * heads * hn && hn % 2 == 0, "qkv weight: 3 x heads x head_dim rows");
  for (const auto* t : {&keys, &values})
    TORCH_CHECK(t->dtype() == torch::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) >= groups &&
                    t->size(1) == heads && t->size(3) == hn && t->size(2) >= length,
                "cache keys, values: float32 [>= G, heads, >= length, head_dim], contiguous");
  TORCH_CHECK(columns.dtype() == torch::kLong && columns.dim() == 2 && columns.size(0) == groups &&
                  columns.size(1) == width,
              "columns: int64 [G, W]");
  const OutputOperands p = output_operands(h, heads, hn, dense_w, dense_scale, dense_b, ln2_w, ln2_b, eps2, up_w,
                                           up_scale, up_b, down_w, down_scale, down_b);
  const block::Strided4 bias_at = bias_view(bias, groups, width, length);
  const auto column = columns.accessor<int64_t, 2>();
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t w = 0; w < width; ++w)
      TORCH_CHECK(column[g][w] >= 0 && column[g][w] < length, "columns: each within the attended length");
  std::vector<float> a(rows * h), qkv(rows * qkv_width);
  attention_input_into(x.data_ptr<float>(), rows, h, float_data(ln1_w, h, "layernorm weight"),
                       float_data(ln1_b, h, "layernorm bias"), static_cast<float>(eps1), qkv_weight,
                       float_data(qkv_b, qkv_width, "qkv bias"), rotary_table(cos, rows, hn, "cos"),
                       rotary_table(sin, rows, hn, "sin"), heads, hn, a.data(), qkv.data());
  const block::Strided4 k = view_of(keys), v = view_of(values);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t w = 0; w < width; ++w)
      for (int64_t n = 0; n < heads; ++n) {
        const float* source = qkv.data() + (g * width + w) * qkv_width + n * 3 * hn;
        std::copy(source + hn, source + 2 * hn, const_cast<float*>(k.at(g, n, column[g][w])));
        std::copy(source + 2 * hn, source + 3 * hn, const_cast<float*>(v.at(g, n, column[g][w])));
      }
  auto out = torch::empty_like(x);
  attention_output_into(a.data(), qkv.data(), groups, width, h, heads, hn, k, v, bias_at, length,
                        static_cast<float>(alpha), p, out.data_ptr<float>());
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

// For each row of scores [N, V] (float32, contiguous): the index of its largest value where that value occurs
// once, is a number and lies above `floor`, else -1 (the caller settles such rows its own way); columns inside
// the [start, stop) pairs of `skip` count as absent. Also whether every row found one. Greedy decoding's argmax
// in one pass instead of the ~8 torch ops (~150 us at a 16 k vocabulary) that check for ties.
std::tuple<torch::Tensor, bool> unique_argmax(const torch::Tensor& scores, const std::vector<int64_t>& skip,
                                              double floor) {
  TORCH_CHECK(scores.dtype() == torch::kFloat && scores.dim() == 2 && scores.is_contiguous(),
              "scores: float32 [N, V], contiguous");
  TORCH_CHECK(skip.size() % 2 == 0, "skip: [start, stop) pairs");
  const int64_t rows = scores.size(0), v = scores.size(1);
  std::vector<char> absent(skip.empty() ? 0 : v, 0);
  for (size_t i = 0; i < skip.size(); i += 2)
    for (int64_t j = std::max<int64_t>(skip[i], 0); j < std::min(skip[i + 1], v); ++j) absent[j] = 1;
  auto out = torch::empty({rows}, scores.options().dtype(torch::kLong));
  int64_t* index = out.data_ptr<int64_t>();
  bool all_found = true;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = scores.data_ptr<float>() + r * v;
    float best = -std::numeric_limits<float>::infinity();
    int64_t at = -1, count = 0;
    bool nan = false;
    for (int64_t j = 0; j < v; ++j) {
      if (!absent.empty() && absent[j]) continue;
      const float value = row[j];
      nan |= value != value;
      if (value > best) {
        best = value, at = j, count = 1;
      } else if (value == best) {
        ++count;
      }
    }
    const bool found = !nan && count == 1 && best > static_cast<float>(floor);
    index[r] = found ? at : -1;
    all_found &= found;
  }
  return {out, all_found};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x W^T (+ bias) for fp32 rows; fp32, fp16 or bf16 weights, or INT8 / INT4 with a scale",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("scale") = py::none());
  m.def("quantized_linear", &quantized_linear, "x W^T for fp32 rows and an INT8 / INT4 weight (blocked GEMM)",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("bits"));
  m.def("attention_input", &attention_input, "LayerNorm, qkv matmul and rotary of a GLM block (decode)");
  m.def("attention_output", &attention_output, "attention, dense, residuals, LayerNorm and GeGLU (decode)");
  m.def("unique_argmax", &unique_argmax, "each row's argmax where unique (greedy decoding)", py::arg("scores"),
        py::arg("skip"), py::arg("floor"));
  m.def("decode_block", &decode_block, "a whole GLM block for a few rows, the KV-cache write included (decode)");
}
