// The pieces of one GLM block for a few rows (decode); glm/kernels/module.cpp strings them together.
//
// A decode step of a small model is bound by the ~25 small ops around its matmuls (layer norms, rotary,
// attention over the cache, GeGLU, residuals), each a torch op of 5-60 us from Python. Here they run in
// place on the rows between the matmuls. module.cpp's `decode_block` runs the whole block in one call:
// LayerNorm, the query-key-value matmul and rotary on q and k, the write of k and v into the cache's
// buffers, then attention, the dense matmul, the DeepNorm residual, the second LayerNorm, GeGLU and its
// residual. `attention_input` and `attention_output` are its two halves, for a cache that writes itself.
// fp32 throughout, the same formulas as glm/model.py (erf GeLU, biased-variance LayerNorm, softmax(q k^T /
// sqrt(hn) + bias)), so results equal the module path's up to the order of summation.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gemv.h"
#include "simd.h"

namespace block {

// y = (x - mean) / sqrt(var + eps) * w + b over one row of n (n % 8 == 0).
inline void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t n, float* y) {
  float mean = 0.f, var = 0.f;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.f / std::sqrt(var / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

// x[i] cos[i] + x[(i + hn/2) % hn] sin[i] (sin's first half negated, as glm.model.rotary_tables makes it).
inline void rotary(float* x, const float* cos, const float* sin, int64_t hn, float* scratch) {
  const int64_t half = hn / 2;
  for (int64_t i = 0; i < hn; ++i) scratch[i] = x[i] * cos[i] + x[(i + half) % hn] * sin[i];
  for (int64_t i = 0; i < hn; ++i) x[i] = scratch[i];
}

inline float dot(const float* a, const float* b, int64_t n) {
  using namespace simd;
  F acc = zero();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) acc = fmadd(load(a + i), load(b + i), acc);
  if (i < n) acc = fmadd(load8(a + i), load8(b + i), acc);
  return sum(acc);
}

// y[0..n) += p * x[0..n)
inline void axpy(float p, const float* x, float* y, int64_t n) {
  using namespace simd;
  const F pv = set1(p);
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) store(y + i, fmadd(pv, load(x + i), load(y + i)));
  for (; i < n; ++i) y[i] += p * x[i];
}

struct Strided4 {  // a [d0, d1, d2, d3] float view with a unit last stride
  const float* data;
  int64_t s0, s1, s2;
  const float* at(int64_t i, int64_t j, int64_t k) const { return data + i * s0 + j * s1 + k * s2; }
};

// ctx[r, n * hn + d] for query row r = g * width + w, head n: softmax over the t < length columns of
// q k^T / sqrt(hn) + bias[g, w, t] (a -inf bias: no weight, and no dot product), times the values.
inline void attention(const float* qkv, int64_t rows, int64_t width, int64_t nh, int64_t hn, Strided4 keys,
                      Strided4 values, Strided4 bias, int64_t length, float* ctx) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hn));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(length * hn, 1));
  at::parallel_for(0, rows * nh, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(length);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / nh, n = job % nh, g = r / width, w = r % width;
      const float* q = qkv + (r * nh + n) * 3 * hn;
      const float* bias_row = bias.at(g, 0, w);
      float top = neg_inf;
      for (int64_t t = 0; t < length; ++t) {
        const float b = bias_row[t];
        scores[t] = b == neg_inf ? neg_inf : dot(q, keys.at(g, n, t), hn) * scale + b;
        top = std::max(top, scores[t]);
      }
      float* out = ctx + r * nh * hn + n * hn;
      std::fill(out, out + hn, 0.f);
      if (top == neg_inf) continue;  // a fully masked row (padding): zeros, as glm.model's SDPA note says
      float total = 0.f;
      for (int64_t t = 0; t < length; ++t) {
        if (scores[t] == neg_inf) continue;
        const float p = std::exp(scores[t] - top);
        total += p;
        axpy(p, values.at(g, n, t), out, hn);
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < hn; ++d) out[d] *= inv;
    }
  });
}

// g[j] = value[j] gelu(gate[j]) with [value | gate] = u[0..2f), gelu(x) = x (1 + erf(x / sqrt 2)) / 2;
// f % 8 == 0.
inline void geglu(const float* u, int64_t f, float* g) {
  using namespace simd;
  const F half = set1(0.5f), one = set1(1.f), inv_sqrt2 = set1(0.70710678118654752f);
  int64_t j = 0;
  for (; j + kWidth <= f; j += kWidth) {
    const F gate = load(u + f + j);
    const F gelu = mul(mul(gate, half), add(one, erf(mul(gate, inv_sqrt2))));
    store(g + j, mul(load(u + j), gelu));
  }
  if (j < f) {  // AVX-512 only: the last 8 (f % 8 == 0)
    const F gate = load8(u + f + j);
    const F gelu = mul(mul(gate, half), add(one, erf(mul(gate, inv_sqrt2))));
    store8(g + j, mul(load8(u + j), gelu));
  }
}

}  // namespace block
