// y = x W^T (+ bias) for a few rows of fp32 activations (decode), weights fp32, fp16 or bf16.
//
// Decode reads every weight once per token, so its speed is the speed the weights stream at. MKL's sgemm
// with one to a few rows streams them at 12-16 GB/s on a 2-core AVX2 machine; this loop reaches 20-26
// (bench/results/cpu-matmul.json). Each thread takes blocks of 4 weight rows; for each block it walks the
// columns one vector at a time with up to 4 activation rows in registers, so an activation load serves 4
// weight rows and a weight load serves every activation row. 16-bit weights widen to fp32 in registers and
// every product and sum is fp32: the fp32 model's result up to the order of summation. K % 8 == 0.
#pragma once

#include <ATen/Parallel.h>

#include "simd.h"

namespace gemv {

// y[m, 0..NB) for MB activation rows (row stride k) and NB weight rows (row stride k), + bias[0..NB).
template <int NB, int MB, typename W>
inline void tile(const W* w, const float* x, int64_t k, const float* bias, float* y, int64_t y_stride) {
  using namespace simd;
  F acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MB; ++m) acc[i][m] = zero();
  int64_t c = 0;
  for (; c + kWidth <= k; c += kWidth) {
    F xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = load(x + m * k + c);
    for (int i = 0; i < NB; ++i) {
      const F wv = load(w + i * k + c);
      for (int m = 0; m < MB; ++m) acc[i][m] = fmadd(wv, xv[m], acc[i][m]);
    }
  }
  if (c < k) {  // AVX-512 only: the last 8 columns
    F xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = load8(x + m * k + c);
    for (int i = 0; i < NB; ++i) {
      const F wv = load8(w + i * k + c);
      for (int m = 0; m < MB; ++m) acc[i][m] = fmadd(wv, xv[m], acc[i][m]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MB; ++m) y[m * y_stride + i] = sum(acc[i][m]) + (bias ? bias[i] : 0.f);
}

// Every activation row against NB weight rows, 4 rows at a time while the block sits in cache.
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

// y [m_rows, n_rows] = x [m_rows, k] w [n_rows, k]^T (+ bias [n_rows]), threads over blocks of weight rows.
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

}  // namespace gemv
