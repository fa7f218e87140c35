// Vector building blocks of the compiled kernels: register-blocked matrix products, the masked-row operations and
// the softmax exp, on ATen's Vectorized (AVX2, AVX-512, or portable code for other CPUs).
#pragma once
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>

namespace nearfar_native {

using Vec = at::vec::Vectorized<float>;
constexpr int VS = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------- micro-kernels
// C[M x N] (+)= A · B with A's element (r, k) at A[r * sar + k * sak], B row-major (ldb), N a multiple of VS.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int RB = 6, NVB = 4;  // 24 accumulators of 32 registers
#else
constexpr int RB = 6, NVB = 2;  // 12 accumulators of 16 registers (+ 2 for B, 1 for A's broadcast)
#endif

template <int R, int NV>
inline void tile_kernel(int K, const float* A, int64_t sar, int64_t sak, const float* B, int64_t ldb, float* C,
                        int64_t ldc, bool accumulate) {
  Vec c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? Vec::loadu(C + r * ldc + v * VS) : Vec(0.f);
  for (int k = 0; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * VS);
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * sar + k * sak]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * VS);
}

template <int NV>
inline void rows_kernel(int M, int K, const float* A, int64_t sar, int64_t sak, const float* B, int64_t ldb, float* C,
                        int64_t ldc, bool acc) {
  int r = 0;
  for (; r + RB <= M; r += RB) tile_kernel<RB, NV>(K, A + r * sar, sar, sak, B, ldb, C + r * ldc, ldc, acc);
  const float* a = A + r * sar;
  float* c = C + r * ldc;
  switch (M - r) {
    case 1: tile_kernel<1, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 2: tile_kernel<2, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 3: tile_kernel<3, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 4: tile_kernel<4, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    case 5: tile_kernel<5, NV>(K, a, sar, sak, B, ldb, c, ldc, acc); break;
    default: break;
  }
}

inline void gemm(int M, int N, int K, const float* A, int64_t sar, int64_t sak, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool acc) {
  if (M <= 0 || N <= 0) return;
  int j = 0;
  for (; j + NVB * VS <= N; j += NVB * VS) rows_kernel<NVB>(M, K, A, sar, sak, B + j, ldb, C + j, ldc, acc);
  // the rest in one pass over A (each broadcast of A feeds every remaining column vector)
  switch ((N - j) / VS) {
#if defined(CPU_CAPABILITY_AVX512)
    case 3: rows_kernel<3>(M, K, A, sar, sak, B + j, ldb, C + j, ldc, acc); break;
#endif
    case 2: rows_kernel<2>(M, K, A, sar, sak, B + j, ldb, C + j, ldc, acc); break;
    case 1: rows_kernel<1>(M, K, A, sar, sak, B + j, ldb, C + j, ldc, acc); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------------------------ row ops
template <typename T>
inline void load_row(const T* src, float* dst, int n, float mul) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * mul;
}

template <typename T>
inline void store_row(const float* src, T* dst, int n, float mul) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * mul);
}

// Scores of a sub-block are kept transposed, St (keys x query columns), so that every softmax reduction runs down
// the key rows, vectorised over queries, and K is read row by row as stored (no transposed copy of K).

// One key row of St over query columns [c0, c0 + mc): the cleared bits of the key's query mask (bit r = query
// row r of the tile may see this key) become -inf, then the key padding value is added.
inline void mask_key_row(float* x, int mc, int c0, const uint64_t* words, bool full, float kp) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const __m512 vk = _mm512_set1_ps(kp);
  for (int i = 0; i < mc; i += 16) {
    const int col = c0 + i;
    __m512 v = _mm512_loadu_ps(x + i);
    if (!full) v = _mm512_mask_blend_ps(static_cast<__mmask16>(words[col >> 6] >> (col & 63)), ninf, v);
    if (kp != 0.f) v = _mm512_add_ps(v, vk);
    _mm512_storeu_ps(x + i, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // 8 columns at a time (c0 and mc are multiples of 8, so the 8 bits never straddle a mask word): lane i keeps its
  // score where bit i of the byte is set
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  const __m256 vk = _mm256_set1_ps(kp);
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int i = 0; i < mc; i += 8) {
    const int col = c0 + i;
    __m256 v = _mm256_loadu_ps(x + i);
    if (!full) {
      const __m256i bits = _mm256_set1_epi32(static_cast<int>((words[col >> 6] >> (col & 63)) & 0xFF));
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(bits, lane), lane));
      v = _mm256_blendv_ps(ninf, v, keep);
    }
    if (kp != 0.f) v = _mm256_add_ps(v, vk);
    _mm256_storeu_ps(x + i, v);
  }
#else
  for (int i = 0; i < mc; ++i) {
    const int col = c0 + i;
    if (!full && !((words[col >> 6] >> (col & 63)) & 1)) x[i] = kNegInf;
    else x[i] += kp;
  }
#endif
}

// Row-causal mode: columns whose last visible key (``lim``) is before ``key`` become -inf, then the key padding
// value is added.
inline void causal_key_row(float* x, int mc, const float* lim, float key, float kp) {
  const Vec vkey(key), ninf(kNegInf), vk(kp);
  for (int i = 0; i < mc; i += VS) {
    Vec v = Vec::blendv(Vec::loadu(x + i), ninf, Vec::loadu(lim + i) < vkey);
    if (kp != 0.f) v = v + vk;
    v.store(x + i);
  }
}

// exp(x) for the kernel's softmax arguments (a score less its running max or its LSE: about 0 at most, -inf for a
// masked pair) in 14 vector operations against ATen's exp_u20's 19, with exp_u20's polynomial and so its accuracy
// (the same bits on [-87, 1]): x / ln 2 is rounded to n by adding 1.5 * 2**23 (n lands in the low mantissa bits,
// whose integer view, plus 127 shifted into the exponent field, is 2**n), exp(r) on r = x - n ln 2 in
// [-ln 2 / 2, ln 2 / 2] is a degree-5 polynomial, times 2**n. Below ln(FLT_MIN), -inf included, the result is
// exactly 0 (an empty row stays empty; exp_u20 is 0 from -87 down); valid for x < 88.7, NaN in gives NaN out.
// Written on ATen's Vectorized (AVX2 and AVX-512 alike); intrinsics with an immediate shift were ~10% faster on
// the exp alone, ~1% of the kernel.
inline Vec exp_score(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec magic(12582912.f);
  const Vec t = at::vec::fmadd(x, Vec(1.44269504088896341f), magic);
  const Vec r = at::vec::fnmadd(t - magic, Vec(0.693147180559945309f), x);
  Vec p = at::vec::fmadd(r, Vec(0.00828929059f), Vec(0.0418978221f));
  p = at::vec::fmadd(r, p, Vec(0.166676521f));
  p = at::vec::fmadd(r, p, Vec(0.499991506f));
  p = at::vec::fmadd(r, p, Vec(0.999999701f));
  p = at::vec::fmadd(r, p, Vec(1.f));
  const Vec pow2n = at::vec::cast<float>((at::vec::cast<int32_t>(t) + IVec(127)) << IVec(23));
  return Vec::blendv(p * pow2n, Vec(0.f), x < Vec(-87.3365402f));  // ordered: NaN stays NaN
#else
  return x.exp_u20();
#endif
}

// x = exp(x - sub) elementwise over n columns (sub a per-column vector)
inline void exp_sub(float* x, const float* sub, int n) {
  for (int i = 0; i < n; i += VS) exp_score(Vec::loadu(x + i) - Vec::loadu(sub + i)).store(x + i);
}

inline void scale_row(float* x, int n, float a) {
  const Vec va(a);
  for (int i = 0; i < n; i += VS) (Vec::loadu(x + i) * va).store(x + i);
}

inline void add_row(float* dst, const float* src, int n) {
  int i = 0;
  for (; i + VS <= n; i += VS) (Vec::loadu(dst + i) + Vec::loadu(src + i)).store(dst + i);
  for (; i < n; ++i) dst[i] += src[i];
}

}  // namespace nearfar_native
