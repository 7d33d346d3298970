// The quantized decode matmul (gemv) for GLM-130B-format INT8 / INT4 weights on the CPU, as a header: the
// quantization extension (cpu_kernels.cpp) and the fused decode block (glm/kernels/module.cpp) both compile
// it, so a quantized layer computes the same bits whichever of them runs it.
//
// y[m, n] = sum_k x[m, k] * q[n, k] * scale[n, group(k)] for a few rows m (decode). The activations
// are rounded to int16 per row (scale absmax / 32767) so that the products are exact integer multiply-adds
// (_mm256_madd_epi16, 16 per instruction) on the weight bytes as they are stored: INT8 as is, INT4 in the
// original nibble layout (column 2i in the high nibble of byte i, 2i + 1 in the low one).
//
// INT8 is bound by memory bandwidth: each thread streams its weight rows in order, one row at a time
// against up to 4 activation rows (one long sequential stream is what the hardware prefetchers follow
// best; interleaving 4 rows ran 10-35 % slower). INT4 is bound by the nibble unpacking: two rows a step
// share each activation vector load (5-15 % faster than one), with a software prefetch kPrefetchBytes
// ahead, since the two interleaved streams are followed poorly (2.2 x slower without). Integer sums are
// flushed to fp32 per group and at least every 2048 columns, before int32 could overflow. A row holding a
// NaN or an infinity gives NaN outputs. Requires AVX2 + FMA + F16C; the caller checks the CPU and the shapes
// (K / groups a multiple of 32).
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace qgemv {

// Per int32 lane, INT8: 2048 / 16 madds of 2 products <= 32767 * 128 each: 1.07e9 < 2^31.
constexpr int64_t kFlushColumns = 2048;
// Weight rows per step and activation rows per pass (NB * MB int32 accumulators in registers).
template <bool INT4>
constexpr int kStepRows = INT4 ? 2 : 1;
template <bool INT4>
constexpr int kPassRows = INT4 ? 2 : 4;
constexpr int64_t kPrefetchBytes = 8192;  // INT4; 4-16 KB alike on a Zen 3 EPYC

inline void prefetch(const int8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rounds one activation row (k % 16 == 0) to int16, to nearest even (the default MXCSR mode, as
// std::nearbyint); returns its scale absmax / 32767, or NaN if the row holds a NaN or an infinity.
inline float round_row(const float* x, int64_t k, int16_t* out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
    const __m256 zero_if_finite = _mm256_sub_ps(v, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(zero_if_finite, zero_if_finite, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  const float absmax = *std::max_element(lanes, lanes + 8);
  const bool finite = _mm256_movemask_ps(bad) == 0;
  if (!finite || absmax == 0.f) {
    std::fill(out, out + k, int16_t{0});
    return finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
  }
  const __m256 inv = _mm256_set1_ps(32767.f / absmax);
  const __m256 hi = _mm256_set1_ps(32767.f), lo = _mm256_set1_ps(-32767.f);
  for (int64_t i = 0; i < k; i += 16) {
    const __m256 a = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv), lo), hi);
    const __m256 b = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), inv), lo), hi);
    // packs works per 128-bit lane: [a0-3 b0-3 a4-7 b4-7]; the permute restores column order.
    const __m256i v = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permute4x64_epi64(v, 0xD8));
  }
  return absmax / 32767.f;
}

// The flush chunks of a weight row, in order: fn(group, first column, columns).
template <class F>
void for_each_chunk(int64_t k, int64_t groups, F&& fn) {
  const int64_t width = k / groups;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = g * width; c < (g + 1) * width; c += kFlushColumns)
      fn(g, c, std::min(kFlushColumns, (g + 1) * width - c));
}

// INT4 weights are read 32 bytes (64 columns) at a time as 16 16-bit lanes of 4 nibbles each: lane l's
// nibbles, from the low bits up, are columns 4l + 1, 4l, 4l + 3, 4l + 2. After `byte ^ 0x88` each nibble is
// the unsigned q + 8, taken out with a shift and a mask, and the dot product is sum x (q + 8) - 8 sum x.
// The activations are laid out to match: per chunk, blocks of 4 x 16 values in that order (a 32-column
// tail block is zero-padded to 64), with the 8 sum x of each int32 accumulator lane kept per row and chunk.
constexpr int kNibbleColumn[4] = {1, 0, 3, 2};

inline int64_t int4_slots(int64_t columns) { return (columns + 63) / 64 * 64; }

struct Activations {
  // [M, stride]: INT8 the rounded rows, INT4 their blocks; 64-byte aligned (torch's allocator), since 32-byte
  // loads across cache lines made the INT8 loop ~1.6 x slower.
  torch::Tensor storage;
  int16_t* x = nullptr;
  std::vector<float> scale;     // [M]
  std::vector<int32_t> offset;  // INT4: [M, chunks, 8 lanes]
  int64_t stride = 0, chunks = 0;
};

inline Activations prepare(const float* x, int64_t m_rows, int64_t k, int64_t groups, bool int4) {
  Activations a;
  a.scale.resize(m_rows);
  if (!int4) {
    a.stride = k;
    a.storage = torch::empty({m_rows * k}, torch::kShort);
    a.x = a.storage.data_ptr<int16_t>();
    for (int64_t m = 0; m < m_rows; ++m) a.scale[m] = round_row(x + m * k, k, a.x + m * k);
    return a;
  }
  for_each_chunk(k, groups, [&](int64_t, int64_t, int64_t len) {
    a.stride += int4_slots(len);
    ++a.chunks;
  });
  a.storage = torch::zeros({m_rows * a.stride}, torch::kShort);
  a.x = a.storage.data_ptr<int16_t>();
  a.offset.resize(m_rows * a.chunks * 8);
  std::vector<int16_t> row(k);
  const __m256i eight = _mm256_set1_epi16(8);
  for (int64_t m = 0; m < m_rows; ++m) {
    a.scale[m] = round_row(x + m * k, k, row.data());
    int16_t* out = a.x + m * a.stride;
    int32_t* offset = a.offset.data() + m * a.chunks * 8;
    for_each_chunk(k, groups, [&](int64_t, int64_t c, int64_t len) {
      __m256i lanes = _mm256_setzero_si256();  // each <= 8 * 2048 / 8 * 32767
      for (int64_t b = 0; b < len; b += 64) {
        for (int l = 0; l < 16; ++l)
          for (int j = 0; j < 4; ++j) {
            const int64_t col = b + 4 * l + kNibbleColumn[j];
            if (col < len) out[b + 16 * j + l] = row[c + col];
          }
        for (int j = 0; j < 4; ++j) {  // the lanes the kernel's madds add these values into
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + b + 16 * j));
          lanes = _mm256_add_epi32(lanes, _mm256_madd_epi16(v, eight));
        }
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(offset), lanes);
      offset += 8;
      out += int4_slots(len);
    });
  }
  return a;
}

struct Problem {
  const int8_t* w;    // [N, row_bytes]
  const uint16_t* s;  // fp16 [N, groups]
  const Activations* a;
  float* y;  // [M, N]
  int64_t m_rows, n_rows, k, row_bytes, groups;
};

// Integer dot products of NB weight rows (from w, row_bytes apart) with MB activation rows (from x, stride
// apart) over the `len` columns (len % 32 == 0, len <= kFlushColumns) from column c.
template <int NB, int MB>
inline void dots_int8(const Problem& p, const int8_t* w, const int16_t* x, int64_t c, int64_t len,
                      __m256i (&acc)[NB][MB]) {
  for (int nb = 0; nb < NB; ++nb)
    for (int mb = 0; mb < MB; ++mb) acc[nb][mb] = _mm256_setzero_si256();
  const int64_t stride = p.a->stride;
  for (int64_t j = c; j < c + len; j += 16) {
    __m256i xv[MB];
    for (int mb = 0; mb < MB; ++mb) xv[mb] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + mb * stride + j));
    for (int nb = 0; nb < NB; ++nb) {
      const auto* wj = reinterpret_cast<const __m128i*>(w + nb * p.row_bytes + j);
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(wj));
      for (int mb = 0; mb < MB; ++mb) acc[nb][mb] = _mm256_add_epi32(acc[nb][mb], _mm256_madd_epi16(wv, xv[mb]));
    }
  }
}

// One 64-column INT4 block of one weight row against MB activation rows: acc += x (q + 8), per lane and
// chunk <= 2048 / 8 * 15 * 32767.
template <int MB>
inline void int4_block(__m256i bytes, const int16_t* x, int64_t stride, __m256i (&acc)[MB]) {
  const __m256i nibble = _mm256_set1_epi16(0x000F);
  const __m256i v = _mm256_xor_si256(bytes, _mm256_set1_epi8(static_cast<char>(0x88)));
  const __m256i u0 = _mm256_and_si256(v, nibble), u1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
  const __m256i u2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), nibble), u3 = _mm256_srli_epi16(v, 12);
  for (int mb = 0; mb < MB; ++mb) {
    const auto* xb = reinterpret_cast<const __m256i*>(x + mb * stride);
    const __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(u0, _mm256_loadu_si256(xb)),
                                         _mm256_madd_epi16(u1, _mm256_loadu_si256(xb + 1)));
    const __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(u2, _mm256_loadu_si256(xb + 2)),
                                         _mm256_madd_epi16(u3, _mm256_loadu_si256(xb + 3)));
    acc[mb] = _mm256_add_epi32(acc[mb], _mm256_add_epi32(s01, s23));
  }
}

// dots_int8 for INT4 weights, x pointing at this chunk's blocks.
template <int NB, int MB>
inline void dots_int4(const Problem& p, const int8_t* w, const int16_t* x, int64_t c, int64_t len,
                      __m256i (&acc)[NB][MB]) {
  for (int nb = 0; nb < NB; ++nb)
    for (int mb = 0; mb < MB; ++mb) acc[nb][mb] = _mm256_setzero_si256();
  const int64_t stride = p.a->stride, full = len / 64 * 64;
  const int8_t* wc = w + c / 2;
  const int8_t* ahead = w + NB * (c / 2) + kPrefetchBytes;
  for (int64_t b = 0; b < full; b += 64, wc += 32, ahead += NB * 32) {
    for (int line = 0; line < NB * 32; line += 64) prefetch(ahead + line);  // NB * 32 bytes a step
    for (int nb = 0; nb < NB; ++nb) {
      const auto* wb = reinterpret_cast<const __m256i*>(wc + nb * p.row_bytes);
      int4_block<MB>(_mm256_loadu_si256(wb), x + b, stride, acc[nb]);
    }
  }
  if (full < len) {  // 32 columns in 16 bytes: the upper lanes' nibbles meet zero activations
    for (int nb = 0; nb < NB; ++nb) {
      const auto* wb = reinterpret_cast<const __m128i*>(wc + nb * p.row_bytes);
      int4_block<MB>(_mm256_zextsi128_si256(_mm_loadu_si128(wb)), x + full, stride, acc[nb]);
    }
  }
}

// y[m0 .. m0 + MB, n .. n + NB]: each chunk's int32 lanes (INT4: less their 8 sum x) are scaled and added
// in fp32 lanes, summed across lanes once at the end.
template <int NB, int MB, bool INT4>
void tile(const Problem& p, int64_t n, int64_t m0) {
  const int8_t* w = p.w + n * p.row_bytes;
  const Activations& a = *p.a;
  __m256 total[NB][MB];
  for (int nb = 0; nb < NB; ++nb)
    for (int mb = 0; mb < MB; ++mb) total[nb][mb] = _mm256_setzero_ps();
  __m256i acc[NB][MB];
  int64_t chunk = 0, slot = 0;
  for_each_chunk(p.k, p.groups, [&](int64_t g, int64_t c, int64_t len) {
    const int16_t* x = a.x + m0 * a.stride;
    if constexpr (INT4) {
      dots_int4<NB, MB>(p, w, x + slot, c, len, acc);
    } else {
      dots_int8<NB, MB>(p, w, x, c, len, acc);
    }
    for (int nb = 0; nb < NB; ++nb) {
      const __m256 sg = _mm256_set1_ps(_cvtsh_ss(p.s[(n + nb) * p.groups + g]));
      for (int mb = 0; mb < MB; ++mb) {
        __m256i sums = acc[nb][mb];
        if constexpr (INT4) {
          const int32_t* offset = a.offset.data() + ((m0 + mb) * a.chunks + chunk) * 8;
          sums = _mm256_sub_epi32(sums, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offset)));
        }
        total[nb][mb] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), sg, total[nb][mb]);
      }
    }
    ++chunk;
    slot += int4_slots(len);
  });
  for (int mb = 0; mb < MB; ++mb)
    for (int nb = 0; nb < NB; ++nb) p.y[(m0 + mb) * p.n_rows + n + nb] = hsum(total[nb][mb]) * a.scale[m0 + mb];
}

// Weight rows n .. n + NB against every activation row, kPassRows at a time (the NB rows stay in L1).
template <int NB, bool INT4>
void weight_rows(const Problem& p, int64_t n) {
  constexpr int MB = kPassRows<INT4>;
  int64_t m = 0;
  for (; m + MB <= p.m_rows; m += MB) tile<NB, MB, INT4>(p, n, m);
  switch (p.m_rows - m) {
    case 3: tile<NB, 3, INT4>(p, n, m); break;
    case 2: tile<NB, 2, INT4>(p, n, m); break;
    case 1: tile<NB, 1, INT4>(p, n, m); break;
    default: break;
  }
}

template <bool INT4>
void gemv_rows(const Problem& p) {
  constexpr int NB = kStepRows<INT4>;
  const int64_t steps = p.n_rows / NB;
  at::parallel_for(0, steps, 32 / NB, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) weight_rows<NB, INT4>(p, b * NB);
  });
  for (int64_t n = steps * NB; n < p.n_rows; ++n) weight_rows<1, INT4>(p, n);
}

// y [m_rows, n_rows] = x [m_rows, k] (fp32) times the stored weight [n_rows, row_bytes] with fp16 scales
// [n_rows, groups] (raw bits).
inline void gemv(const float* x, int64_t m_rows, int64_t k, const int8_t* w, int64_t row_bytes,
                 const uint16_t* scale, int64_t groups, int64_t n_rows, bool int4, float* y) {
  const Activations a = prepare(x, m_rows, k, groups, int4);
  const Problem p{w, scale, &a, y, m_rows, n_rows, k, row_bytes, groups};
  if (int4) {
    gemv_rows<true>(p);
  } else {
    gemv_rows<false>(p);
  }
}

}  // namespace qgemv
