// The products of a few rows, shared by the fused kernels (gemm.h, in fused_rnn.cpp's
// translation unit) and the layer-normalised ones (layer_norm_rnn.cpp): gemv_rows, one dot
// product per row of a weight as stored, and few_rows_strips, 1-3 rows over a weight packed in
// gemm_own's 16-column strips. Both need engine/csrc/blas.h (and own_gemm.h) included first.
#pragma once

#include <ATen/ATen.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

#ifdef RNNKIT_OWN_GEMM
using rnnkit::g_own_kc;
using rnnkit::kOwnCols;
#endif

// Rows [0, N - N % 8) of gemv_rows, eight at a time: eight independent FMA chains, and each
// load of a serves eight rows. One dot at a time is bound by the latency of its one chain of
// FMAs (and a horizontal sum per row), not by the weight's bandwidth: measured 1 thread,
// 1024 x 256 22.4 -> 11.8 us, 256 x 256 4.8 -> 2.3 us, 2048 x 512 77 -> 51 us (AVX-512), i.e.
// the weight now streams at L2 / L3 bandwidth. Software prefetch measured no better (the rows
// of a block are adjacent: the hardware prefetcher follows them). Returns the rows done.
// Set by lstm_fwd_loop on odd steps at batch 1: gemv_rows8 then takes its blocks last to first,
// so a step starts with the rows the previous one read last, still in L2 (a 4H x H weight of
// H = 256 is 1 MiB, this CPU's whole L2: read in one direction every step, each read evicts a
// row the next step needs first). Each output is the same dot product in either order.
thread_local bool g_rows_descending = false;

// The vector operations gemv_rows8 needs, per instruction set: one body (gemv_rows8_with) serves
// both. A tail load reads lanes [0, K % width) and gives 0 in the others (nothing past K is read).
#if defined(__AVX512F__)
struct Avx512 {
  using V = __m512;
  static constexpr int64_t kWidth = 16;
  using Tail = __mmask16;
  static Tail tail(int64_t rest) { return static_cast<__mmask16>((1u << rest) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_tail(const float* p, Tail m) { return _mm512_maskz_loadu_ps(m, p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_tail(float* p, V v, Tail m) { _mm512_mask_storeu_ps(p, m, v); }
};
#endif
#if defined(__AVX2__) && defined(__FMA__)
struct Avx2 {
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  using Tail = __m256i;
  static Tail tail(int64_t rest) {
    alignas(32) int32_t lanes[8];
    for (int i = 0; i < 8; ++i) lanes[i] = i < rest ? -1 : 0;
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_tail(const float* p, Tail m) { return _mm256_maskload_ps(p, m); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    alignas(32) float x[8];
    _mm256_store_ps(x, v);
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
  }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_tail(float* p, V v, Tail m) { _mm256_maskstore_ps(p, m, v); }
};
#endif

// Each block of 8 rows of Bt is read once for all M rows of A (from L1 for the second row on).
template <typename S>
inline int64_t gemv_rows8_with(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                               const float* Bt, int64_t ldbt, float* C, int64_t ldc, bool acc) {
  using V = typename S::V;
  const int64_t N8 = N / 8 * 8, KW = K / S::kWidth * S::kWidth;
  const typename S::Tail tail = S::tail(K - KW);
  for (int64_t i = 0; i < N8; i += 8) {
    const int64_t n = g_rows_descending ? N8 - 8 - i : i;
    const float* w = Bt + n * ldbt;
    for (int64_t m = 0; m < M; ++m) {
      const float* a = A + m * lda;
      float* c = C + m * ldc;
      V s[8];
      for (int r = 0; r < 8; ++r) s[r] = S::zero();
      int64_t k = 0;
      for (; k < KW; k += S::kWidth) {
        const V av = S::load(a + k);
        for (int r = 0; r < 8; ++r) s[r] = S::fma(S::load(w + r * ldbt + k), av, s[r]);
      }
      if (KW < K) {
        const V av = S::load_tail(a + k, tail);
        for (int r = 0; r < 8; ++r) s[r] = S::fma(S::load_tail(w + r * ldbt + k, tail), av, s[r]);
      }
      for (int r = 0; r < 8; ++r) {
        const float sum = S::sum(s[r]);
        c[n + r] = acc ? c[n + r] + sum : sum;
      }
    }
  }
  return N8;
}

inline int64_t gemv_rows8(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                          const float* Bt, int64_t ldbt, float* C, int64_t ldc, bool acc) {
#if defined(__AVX512F__)
  return gemv_rows8_with<Avx512>(M, N, K, A, lda, Bt, ldbt, C, ldc, acc);
#elif defined(__AVX2__) && defined(__FMA__)
  return gemv_rows8_with<Avx2>(M, N, K, A, lda, Bt, ldbt, C, ldc, acc);
#else
  (void)M, (void)N, (void)K, (void)A, (void)lda, (void)Bt, (void)ldbt, (void)C, (void)ldc,
      (void)acc;
  return 0;
#endif
}

// Row-major C(M, N) (+)= A(M, K) Bt(N, K)^T: one dot product per row of the weight as stored,
// each row read once for all M rows. The products of a few rows where the weight is read once
// (the batch-1 recurrent product; a streaming cell step): there W^T packed or transposed for a
// GEMM costs a copy of the weight, more than the product. Not BLAS: MKL's sgemv on the AMD EPYC
// machines this project runs on takes 79 us for a 768 x 256 weight where OpenBLAS takes 10 us
// (measured, 1 thread); a vectorised dot per row streams the weight once at cache bandwidth on
// any x86 CPU. Holds no rows of A in registers as a GEMM tile does: for many rows a GEMM over a
// transposed copy pays. float: gemv_rows8, float64 (and the rows past N - N % 8): one dot per
// output. Plain reference: A @ Bt.T.
template <typename T>
inline void gemv_rows(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bt,
                      int64_t ldbt, T* C, int64_t ldc, bool acc) {
  int64_t n0 = 0;
  if constexpr (std::is_same_v<T, float>) n0 = gemv_rows8(M, N, K, A, lda, Bt, ldbt, C, ldc, acc);
  for (int64_t n = n0; n < N; ++n) {
    const T* w = Bt + n * ldbt;
    for (int64_t m = 0; m < M; ++m) {
      const T* a = A + m * lda;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) sum += w[k] * a[k];
      T& c = C[m * ldc + n];
      c = acc ? c + sum : sum;
    }
  }
}


#ifdef RNNKIT_OWN_GEMM
// The per-step products of a ragged batch's last steps, where 1-3 rows still run. gemm_own
// computes one 16-column strip at a time: a tile of MR <= 3 rows keeps 2 MR <= 6 accumulators,
// each a chain of dependent FMAs, fewer than the 8 that the two FMA pipes x 4 cycles of latency
// need, so a step of 1 row cost as much as one of 4 (latency bound; session 13's skewed lengths
// rows spent most steps there: prop up to 2.8). Here one tile spans S strips (MR x S x 2 = 8-12
// accumulators). Each output is the same chain as in gemm_own (k in order from 0, in the same
// K chunks g_own_kc, C added at the end): the results are bit-equal to gemm_own's.
// Measured in session 15 (one step's product alone, 64-byte-aligned panels as the kernels pack
// them, 1 thread, thread CPU time, min of 7, H = 128-256, forward and backward), in GFLOP/s:
// 1 row 31-48, 2 rows 55-75, 3 rows 79-97, 4-6 rows (gemm_own) 85-100. 1 row is bound by
// streaming the weight from L2/L3 once per step, whatever the rows. Tried and not kept: loading
// each B vector into a register before the FMAs (GCC folds the load into every FMA that reads
// it) raised 2 rows to 67-89 there, but not in the layer (perf samples of the 2-row tile 4043
// vs 4077 with lengths [400, 400, 1, 1], H = 128); 3 rows on one strip (6 accumulators) made the
// layer slower (lengths [400] * 3 + [1], forward+backward over the padded call: 0.80-0.91 ->
// 0.84-1.00). Without the 64-byte alignment (a std::vector) the 2-row tile read 33-44: split
// cache-line loads, an artefact of the benchmark, not of the kernels.
// C(MR, 16 S) (+)= A(MR, K) [strip 0 | ... | strip S-1], strip s at B + s sb, (K, 16) row-major.
template <int MR, int S>
inline void few_rows_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t sb,
                          float* C, int64_t ldc, bool acc) {
  // (every loop over the accumulators unrolled by pragma: else GCC kept the chains in registers
  // but also stored each accumulator to the stack at every k, which bounds the tile by the
  // stores — objdump)
  constexpr int N = MR * S;  // accumulator pairs: row i, strip s at i * S + s
  __m256 c0[N], c1[N];
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) c0[q] = c1[q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const float* b = B + s * sb + k * kOwnCols;
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
        c0[i * S + s] = _mm256_fmadd_ps(a, b0, c0[i * S + s]);
        c1[i * S + s] = _mm256_fmadd_ps(a, b1, c1[i * S + s]);
      }
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) {
    float* o = C + (q / S) * ldc + (q % S) * kOwnCols;
    if (acc) {
      c0[q] = _mm256_add_ps(c0[q], _mm256_loadu_ps(o));
      c1[q] = _mm256_add_ps(c1[q], _mm256_loadu_ps(o + 8));
    }
    _mm256_storeu_ps(o, c0[q]);
    _mm256_storeu_ps(o + 8, c1[q]);
  }
}

// Strips per tile for MR rows: 8 accumulators at least (1 row: 4 strips; 2, 3 rows: 2).
template <int MR>
constexpr int kFewStrips = MR == 1 ? 4 : 2;

template <int MR>
inline void few_rows_strips_of(int64_t strips, int64_t K, const float* A, int64_t lda,
                               const float* B, int64_t sb, float* C, int64_t ldc, bool acc) {
  constexpr int S = kFewStrips<MR>;
  const int64_t KC = g_own_kc > 0 ? g_own_kc : K;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {  // (gemm_own's K chunks: the same sums)
    const int64_t kk = std::min(KC, K - k0);
    const bool a = acc || k0 > 0;
    const float* Bk = B + k0 * kOwnCols;
    int64_t s = 0;
    for (; s + S <= strips; s += S)
      few_rows_tile<MR, S>(kk, A + k0, lda, Bk + s * sb, sb, C + s * kOwnCols, ldc, a);
    for (; s < strips; ++s)
      few_rows_tile<MR, 1>(kk, A + k0, lda, Bk + s * sb, sb, C + s * kOwnCols, ldc, a);
  }
}

// C(M, 16 strips) (+)= A(M, K) B for M = 1..kFewRows rows, B in whole 16-column strips (strip s
// at B + s sb, ld 16: pack_panels' panels of width kOwnCols), K > 0.
constexpr int64_t kFewRows = 3;
inline void few_rows_strips(int64_t M, int64_t strips, int64_t K, const float* A, int64_t lda,
                            const float* B, int64_t sb, float* C, int64_t ldc, bool acc) {
  switch (M) {
    case 1: return few_rows_strips_of<1>(strips, K, A, lda, B, sb, C, ldc, acc);
    case 2: return few_rows_strips_of<2>(strips, K, A, lda, B, sb, C, ldc, acc);
    case 3: return few_rows_strips_of<3>(strips, K, A, lda, B, sb, C, ldc, acc);
    default: break;
  }
}

#endif

}  // namespace
