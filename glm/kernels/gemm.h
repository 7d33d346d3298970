// y = x W^T (+ bias) for many rows (prefill): a blocked GEMM in fp32 arithmetic.
//
// torch's fp32 GEMM reaches a third to a half of these CPUs' FMA peak (../shared/reference/cpu-kernels.md
// sections 6-7); this is the BLIS loop structure around one register-blocked microkernel. For each depth
// block of KC columns, the activations are packed into strips of MR rows (Ap[p][i]); for each NR-column
// panel of the output, the NR weight rows are packed transposed (Bp[p][j]), widened to fp32 (16-bit
// weights exactly, INT8 / INT4 dequantised exactly: the weight is never materialised in fp32), and held in L1 while the microkernel runs it against every strip: MR x NR accumulators
// in registers, MR broadcasts and NR / width vector loads per depth step. Threads take disjoint column
// panels, so every output element is one thread's FMA chain over k in order: the result does not depend
// on the thread count or on the vector width (AVX2 and AVX-512 builds agree bit for bit).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd.h"

namespace gemm {

constexpr int kMR = 6;                   // activation rows per microkernel
constexpr int kNR = 2 * simd::kWidth;    // output columns per microkernel: 16 (AVX2) or 32 (AVX-512)
constexpr int64_t kKC = 256;             // depth per packed block: a kKC x kNR panel is 16-32 KB (L1)

// Ap[strip][p][i] = x[strip * MR + i][p0 + p] for every row of x (zero past m_rows).
inline void pack_activations(const float* x, int64_t m_rows, int64_t k, int64_t p0, int64_t kc, float* ap) {
  const int64_t strips = (m_rows + kMR - 1) / kMR;
  for (int64_t s = 0; s < strips; ++s) {
    float* out = ap + s * kc * kMR;
    for (int i = 0; i < kMR; ++i) {
      const int64_t m = s * kMR + i;
      if (m < m_rows) {
        const float* row = x + m * k + p0;
        for (int64_t p = 0; p < kc; ++p) out[p * kMR + i] = row[p];
      } else {
        for (int64_t p = 0; p < kc; ++p) out[p * kMR + i] = 0.f;
      }
    }
  }
}

// Widen 8 consecutive values of a weight row to fp32.
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 widen8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// r[i] = column i of the 8 x 8 block whose rows are r[0..8) (AVX2 shuffles; AVX-512 CPUs have them too).
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const __m256 a = t[4 * i + j], b = t[4 * i + j + 2];
      u[4 * i + 2 * j] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * i + 2 * j + 1] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2));
    }
  // u[c] (c < 4): rows 0-3 of column c in the low lanes, of column c + 4 in the high; u[4 + c]: rows 4-7
  r[0] = _mm256_permute2f128_ps(u[0], u[4], 0x20);
  r[1] = _mm256_permute2f128_ps(u[1], u[5], 0x20);
  r[2] = _mm256_permute2f128_ps(u[2], u[6], 0x20);
  r[3] = _mm256_permute2f128_ps(u[3], u[7], 0x20);
  r[4] = _mm256_permute2f128_ps(u[0], u[4], 0x31);
  r[5] = _mm256_permute2f128_ps(u[1], u[5], 0x31);
  r[6] = _mm256_permute2f128_ps(u[2], u[6], 0x31);
  r[7] = _mm256_permute2f128_ps(u[3], u[7], 0x31);
}

// The weights a GEMM reads, row n's columns [p, p + 8) widened to fp32 by `load8(n, p)` (p % 8 == 0).
template <typename W>
struct DenseRows {  // fp32, fp16 or bf16 [N, K]
  const W* w;
  int64_t k;
  __m256 load8(int64_t n, int64_t p) const { return widen8(w + n * k + p); }
};

// INT8 or INT4 [N, K] (quantization/schemes.py: INT4 two columns a byte, 2i in the high nibble) with fp16
// scales [N, groups], each group `width` consecutive columns (width % 8 == 0). q * scale is exact in fp32
// (8 + 11 significant bits), so this GEMM equals the fp32 GEMM of the dequantised weight bit for bit.
struct QuantizedRows {
  const int8_t* w;
  const c10::Half* scale;
  int64_t k, groups, width;
  bool int4;
  __m256 load8(int64_t n, int64_t p) const {
    const __m256 s = _mm256_set1_ps(static_cast<float>(scale[n * groups + p / width]));
    __m256i q;
    if (int4) {
      int32_t packed;  // 8 columns in 4 bytes
      std::memcpy(&packed, w + n * (k / 2) + p / 2, 4);
      const __m128i b = _mm_cvtepi8_epi32(_mm_cvtsi32_si128(packed));  // bytes, sign-extended
      const __m128i high = _mm_srai_epi32(b, 4), low = _mm_srai_epi32(_mm_slli_epi32(b, 28), 28);
      q = _mm256_set_m128i(_mm_unpackhi_epi32(high, low), _mm_unpacklo_epi32(high, low));
    } else {
      q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + n * k + p)));
    }
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), s);
  }
};

// Bp[p][j] = w[n0 + j][p0 + p] for j < NR (zero past n_rows), kc % 8 == 0.
template <typename Rows>
inline void pack_weights(const Rows& w, int64_t n0, int64_t n_rows, int64_t p0, int64_t kc, float* bp) {
  for (int j0 = 0; j0 < kNR; j0 += 8) {
    const int64_t valid = std::min<int64_t>(8, std::max<int64_t>(0, n_rows - n0 - j0));
    for (int64_t p = 0; p < kc; p += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = i < valid ? w.load8(n0 + j0 + i, p0 + p) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(bp + (p + i) * kNR + j0, r[i]);
    }
  }
}

// c[i][0..NR) (row stride ldc) = (accumulate ? c : init or 0) + sum_p ap[p][i] bp[p][..], i < MR. Not
// inlined: inside the caller's loops the compiler spilled the accumulators to the stack (2.7 x slower).
__attribute__((noinline)) inline void microkernel(const float* ap, const float* bp, int64_t kc, float* c,
                                                  int64_t ldc, bool accumulate, const float* init) {
  using namespace simd;
  constexpr int V = kNR / kWidth;
  F acc[kMR][V];
  for (int i = 0; i < kMR; ++i)
    for (int v = 0; v < V; ++v)
      acc[i][v] = accumulate ? load(c + i * ldc + v * kWidth) : init ? load(init + v * kWidth) : zero();
  for (int64_t p = 0; p < kc; ++p) {
    F b[V];
    for (int v = 0; v < V; ++v) b[v] = load(bp + p * kNR + v * kWidth);
    for (int i = 0; i < kMR; ++i) {
      const F a = set1(ap[p * kMR + i]);
      for (int v = 0; v < V; ++v) acc[i][v] = fmadd(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < kMR; ++i)
    for (int v = 0; v < V; ++v) store(c + i * ldc + v * kWidth, acc[i][v]);
}

// The microkernel on an edge tile (mr < MR rows or nr < NR columns), through a full-size buffer.
inline void edge_microkernel(const float* ap, const float* bp, int64_t kc, float* c, int64_t ldc, int mr, int nr,
                             bool accumulate, const float* init) {
  alignas(64) float tile[kMR * kNR] = {};
  if (accumulate)
    for (int i = 0; i < mr; ++i) std::memcpy(tile + i * kNR, c + i * ldc, sizeof(float) * nr);
  microkernel(ap, bp, kc, tile, kNR, accumulate, init);
  for (int i = 0; i < mr; ++i) std::memcpy(c + i * ldc, tile + i * kNR, sizeof(float) * nr);
}

// y [m_rows, n_rows] = x [m_rows, k] w [n_rows, k]^T (+ bias [n_rows]); k % 8 == 0; w a DenseRows or
// QuantizedRows.
//
// Each thread takes a contiguous range of column panels. Per kMC rows of x it packs those rows once for
// every depth block, then walks its panels kNC columns at a time, depth block by depth block, so that the
// output block it accumulates into (kMC x kNC) and one depth block of packed rows stay in L2 together.
template <typename Rows>
void matmul(const float* x, const Rows& w, const float* bias, float* y, int64_t m_rows, int64_t k, int64_t n_rows) {
  constexpr int64_t kMC = 32 * kMR, kNC = 256;
  const int64_t panels = (n_rows + kNR - 1) / kNR, blocks = (k + kKC - 1) / kKC;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), panels));
  at::parallel_for(0, panels, (panels + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    std::vector<float> ap(kMC * blocks * kKC);
    alignas(64) float bp[kKC * kNR];
    alignas(64) float padded_bias[kNR];
    for (int64_t m0 = 0; m0 < m_rows; m0 += kMC) {
      const int64_t mc = std::min(kMC, m_rows - m0), strips = (mc + kMR - 1) / kMR;
      for (int64_t b = 0; b < blocks; ++b)
        pack_activations(x + m0 * k, mc, k, b * kKC, std::min(kKC, k - b * kKC), ap.data() + b * kMC * kKC);
      for (int64_t first = begin; first < end; first += kNC / kNR) {
        const int64_t last = std::min(end, first + kNC / kNR);
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t p0 = b * kKC, kc = std::min(kKC, k - p0);
          for (int64_t panel = first; panel < last; ++panel) {
            const int64_t n0 = panel * kNR;
            const int nr = static_cast<int>(std::min<int64_t>(kNR, n_rows - n0));
            pack_weights(w, n0, n_rows, p0, kc, bp);
            const float* init = nullptr;
            if (bias && p0 == 0) {
              std::fill(padded_bias, padded_bias + kNR, 0.f);
              std::memcpy(padded_bias, bias + n0, sizeof(float) * nr);
              init = padded_bias;
            }
            for (int64_t s = 0; s < strips; ++s) {
              const int mr = static_cast<int>(std::min<int64_t>(kMR, mc - s * kMR));
              const float* a = ap.data() + b * kMC * kKC + s * kc * kMR;
              float* c = y + (m0 + s * kMR) * n_rows + n0;
              if (mr == kMR && nr == kNR) {
                microkernel(a, bp, kc, c, n_rows, p0 > 0, init);
              } else {
                edge_microkernel(a, bp, kc, c, n_rows, mr, nr, p0 > 0, init);
              }
            }
          }
        }
      }
    }
  });
}

}  // namespace gemm
