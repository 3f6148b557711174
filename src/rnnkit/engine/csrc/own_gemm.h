// rnnkit's own float32 GEMM for AVX2 CPUs (gemm_own), shared by rnnkit's C++ kernels
// (fused/csrc/fused_rnn.cpp, fused/csrc/layer_norm_rnn.cpp), and the one rule for which CPUs
// take it (own_gemm_fits_cpu).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rnnkit {
// (internal linkage: each extension that includes this has its own gemm_own settings, which
// set_own_gemm of one never changes in another loaded in the same process)
namespace {

// oneDNN's brgemm micro-kernel reaches 76-90 % of the single-thread peak on the AVX-512 machine
// these kernels were tuned on, but 44-57 % on an AVX2 CPU (Zen 3): its AVX2 code path is not the
// one oneDNN tunes. gemm_own is the textbook register-blocked kernel for 16 ymm registers: a tile
// of up to kOwnRows rows x two vectors (16 columns) of C in 12 accumulators, per k two loads of B
// and one broadcast of A per row (12 FMAs per 8 loads: the two FMA pipes, not the loads, bound
// it). Loop order per K chunk: 16-column strips of B outside, row tiles inside, so a strip
// (kc x 16 floats, 16 KiB at kc = 256) is read from L1 by every row tile. With enough rows to
// pay for it (M >= kOwnPackRows) a chunk of B is first copied into contiguous zero-padded
// strips: read in place, a strip's rows are ldb floats apart and (ldb a multiple of 128 floats)
// fall into a few L1 sets, so each row tile read it from L2 again. Every product is computed —
// no skipped zero operand — so NaN and inf propagate as in any GEMM; padded columns are never
// stored. Float32 only (float64 keeps BLAS); which CPUs take it: own_gemm_fits_cpu below.
#if defined(__AVX2__) && defined(__FMA__)
#define RNNKIT_OWN_GEMM 1
constexpr int kOwnRows = 6;
constexpr int64_t kOwnCols = 16;
int64_t g_own_kc = 256;       // K chunk (tunable for benchmarks: set_own_gemm)
int64_t g_own_pack_rows = 12;  // pack B's chunk when M >= this (0: never; benchmarks)

// Lanes [0, n) of an 8-float vector (n in 0..8).
inline __m256i own_mask(int64_t n) {
  alignas(32) static const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 8 - std::clamp<int64_t>(n, 0, 8)));
}

// C(MR, n) (+)= A(MR, K) B(K, 16) with n <= 16 columns stored. full: B's 16 columns may all be
// read (packed strips, or a whole strip in place); else B's columns past n are not read.
// Inlining matters both ways (session 10): out of line (GCC's choice once a file has several
// call sites) the tile keeps its 2·MR accumulators in memory and stores them at every k (1.4-3x
// slower: layer_norm_rnn.cpp therefore flattens its one caller, own_mm); but always_inline here
// made fused_rnn.cpp's inference loops 1.2-1.5x slower (LSTM 35,20,200). Check the tile's code
// (no ymm stores to the stack in its k loop) after adding a call site.
template <int MR, bool full>
inline void own_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc, int64_t n, bool acc) {
  __m256 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  const __m256i m0 = own_mask(n), m1 = own_mask(n - 8);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    __m256 b0, b1;
    if constexpr (full) {
      b0 = _mm256_loadu_ps(b);
      b1 = _mm256_loadu_ps(b + 8);
    } else {
      b0 = _mm256_maskload_ps(b, m0);
      b1 = _mm256_maskload_ps(b + 8, m1);
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
    if (n == kOwnCols) {
      if (acc) {
        c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(c));
        c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(c + 8));
      }
      _mm256_storeu_ps(c, c0[i]);
      _mm256_storeu_ps(c + 8, c1[i]);
    } else {
      if (acc) {
        c0[i] = _mm256_add_ps(c0[i], _mm256_maskload_ps(c, m0));
        c1[i] = _mm256_add_ps(c1[i], _mm256_maskload_ps(c + 8, m1));
      }
      _mm256_maskstore_ps(c, m0, c0[i]);
      _mm256_maskstore_ps(c + 8, m1, c1[i]);
    }
  }
}

// Every row of one 16-column strip: tiles of kOwnRows rows, the last one shorter. A tile of 1 or
// 2 rows has 2 or 4 accumulators, fewer than the FMA latency x 2 pipes needs (8): 6 + 1 and 6 + 2
// rows are taken as 4 + 3 and 4 + 4 (batch 32 = 4 x 6 + 2 x 4, batch 20 = 2 x 6 + 2 x 4).
template <bool full>
inline void own_strip(int64_t M, int64_t K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc, int64_t n, bool acc) {
  const int64_t rest = M % kOwnRows;
  const int64_t six = M - ((rest == 1 || rest == 2) && M > kOwnRows ? kOwnRows + rest : rest);
  int64_t m = 0;
  for (; m < six; m += kOwnRows)
    own_tile<kOwnRows, full>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, n, acc);
  if (M - m > kOwnRows) {  // 7 or 8 rows: a 4-row tile first
    own_tile<4, full>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc, n, acc);
    m += 4;
  }
  const float* Am = A + m * lda;
  float* Cm = C + m * ldc;
  switch (M - m) {
    case 5: own_tile<5, full>(K, Am, lda, B, ldb, Cm, ldc, n, acc); break;
    case 4: own_tile<4, full>(K, Am, lda, B, ldb, Cm, ldc, n, acc); break;
    case 3: own_tile<3, full>(K, Am, lda, B, ldb, Cm, ldc, n, acc); break;
    case 2: own_tile<2, full>(K, Am, lda, B, ldb, Cm, ldc, n, acc); break;
    case 1: own_tile<1, full>(K, Am, lda, B, ldb, Cm, ldc, n, acc); break;
    default: break;
  }
}

// Row-major C(M, N) (+)= A(M, K) B(K, N), M, N, K > 0.
inline void gemm_own(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                     const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  const int64_t KC = g_own_kc > 0 ? g_own_kc : K;
  // (ldb = kOwnCols: B is already one contiguous strip, a panel of pack_panels(w, kOwnCols))
  const bool pack = g_own_pack_rows > 0 && M >= g_own_pack_rows && ldb != kOwnCols;
  const int64_t strips = (N + kOwnCols - 1) / kOwnCols;
  thread_local std::vector<float> buf;
  if (pack) buf.resize(std::min(KC, K) * strips * kOwnCols);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kk = std::min(KC, K - k0);
    const bool a = acc || k0 > 0;
    const float* Bk = B + k0 * ldb;
    if (pack) {
      // strip s: (kk, 16) row-major at s * kk * 16, columns past N zero
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t n0 = s * kOwnCols, n = std::min(kOwnCols, N - n0);
        float* d = buf.data() + s * kk * kOwnCols;
        const __m256i m0 = own_mask(n), m1 = own_mask(n - 8);
        for (int64_t k = 0; k < kk; ++k) {
          const float* b = Bk + k * ldb + n0;
          _mm256_storeu_ps(d + k * kOwnCols, _mm256_maskload_ps(b, m0));
          _mm256_storeu_ps(d + k * kOwnCols + 8, _mm256_maskload_ps(b + 8, m1));
        }
      }
    }
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t n0 = s * kOwnCols, n = std::min(kOwnCols, N - n0);
      const float* Ak = A + k0;
      if (pack)
        own_strip<true>(M, kk, Ak, lda, buf.data() + s * kk * kOwnCols, kOwnCols, C + n0, ldc, n,
                        a);
      else if (n == kOwnCols)
        own_strip<true>(M, kk, Ak, lda, Bk + n0, ldb, C + n0, ldc, n, a);
      else
        own_strip<false>(M, kk, Ak, lda, Bk + n0, ldb, C + n0, ldc, n, a);
    }
  }
}
#endif

// Whether this CPU should run float32 GEMMs through gemm_own (the one rule, for every kernel
// file): AVX2 + FMA without AVX-512. CPUs with AVX-512 keep oneDNN's brgemm micro-kernel (76-90 %
// of the 1-thread peak there, the tuning every other choice of the kernels assumes); on Zen 3
// (1 thread, benchmarks/gemm_shapes.py, session 9) gemm_own ran the whole-sequence tiles at
// 2-3x brgemm's rate and the per-step products on 16-column panels as fast or faster. False when
// this build has no gemm_own (compiled without AVX2 + FMA).
inline bool own_gemm_fits_cpu() {
#ifdef RNNKIT_OWN_GEMM
  return !__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace
}  // namespace rnnkit
