// The GEMM dispatch shared by rnnkit's C++ extensions that multiply matrices: the fused kernels
// (fused/csrc/fused_rnn.cpp through fused/csrc/gemm.h) and the layer-normalised kernels
// (fused/csrc/layer_norm_rnn.cpp). One definition of each piece, so the two cannot drift apart:
//   - the Fortran BLAS of the library torch links, found by name (blas_symbol, resolve_blas),
//     and the row-major call through it (blas_gemm); a plain loop where there is none (loop_gemm)
//   - oneDNN's brgemm micro-kernel that torch exports: whether it works (brgemm_works) and a
//     row-major product through it in blocks of B (brgemm_rm)
//   - which float32 GEMM a CPU runs (Gemm, choose_gemm): rnnkit's own gemm_own (own_gemm.h) on
//     AVX2 CPUs without AVX-512 (own_gemm_fits_cpu), else brgemm, else BLAS, else the loop.
// What stays with each extension is how it calls these (its gemm_rm): fused_rnn.cpp switches on
// a process-wide choice that set_gemm can change (benchmarks/tests) and calls gemm_own inline;
// layer_norm_rnn.cpp keeps brgemm for products of < 4 rows and calls gemm_own through a
// flattened wrapper (own_mm, see there). Plain reference of every product here: torch.mm.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "own_gemm.h"

namespace rnnkit {
// (internal linkage, as own_gemm.h: each extension that includes this has its own copy)
namespace {

// ---- BLAS ------------------------------------------------------------------------------------
// Fortran BLAS (MKL's / OpenBLAS's sgemm_, dgemm_, sgemv_, dgemv_), column-major.
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const double*, const double*, const int*, const double*, const int*,
                         const double*, double*, const int*);
using sgemv_t = void (*)(const char*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemv_t = void (*)(const char*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*,
                         const int*);

// A BLAS entry point of the library torch links. Python loads libtorch_cpu with RTLD_LOCAL, so
// its symbols (MKL's sgemm_ & co. in the CPU wheels) are not in the global scope that
// dlsym(RTLD_DEFAULT) searches: look in libtorch_cpu itself (already loaded) first.
inline void* blas_symbol(const char* name) {
  static void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* symbol = torch_cpu ? dlsym(torch_cpu, name) : nullptr;
  return symbol ? symbol : dlsym(RTLD_DEFAULT, name);
}

// The BLAS entry points the kernels call (null: not found, or switched off by a caller).
struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  sgemv_t sgemv = nullptr;
  dgemv_t dgemv = nullptr;
};

inline Blas resolve_blas() {
  Blas b;
  b.sgemm = reinterpret_cast<sgemm_t>(blas_symbol("sgemm_"));
  b.dgemm = reinterpret_cast<dgemm_t>(blas_symbol("dgemm_"));
  b.sgemv = reinterpret_cast<sgemv_t>(blas_symbol("sgemv_"));
  b.dgemv = reinterpret_cast<dgemv_t>(blas_symbol("dgemv_"));
  return b;
}

// Row-major C(M, N) (+)= A(M, K) B(K, N) through a BLAS gemm f (sgemm_t or dgemm_t): one call,
// with none of a tensor op's dispatch cost (at::mm on narrowed views cost ~10 us per step at
// batch 1, more than the product itself).
template <typename T, typename F>
inline void blas_gemm(F f, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool acc) {
  // row-major C = A B  <=>  column-major C^T = B^T A^T
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one = 1, beta = acc ? T(1) : T(0);
  f("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}

// Row-major C(M, N) (+)= A(M, K) B(K, N) as a plain loop: where no BLAS was found.
template <typename T>
inline void loop_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool acc) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    if (!acc) std::memset(c, 0, N * sizeof(T));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[m * lda + k];
      const T* b = B + k * ldb;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// ---- oneDNN's brgemm micro-kernel --------------------------------------------------------------
// Whether torch exports oneDNN's float32 brgemm micro-kernel and it computes a small product
// (3 x 7 x 20, accumulating into C) right; checked once per process.
inline bool brgemm_works() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  static const bool works = [] {
    try {
      const int64_t M = 3, N = 20, K = 7;
      std::vector<float> A(M * K), B(K * N), C(M * N, 1.0f), R(M * N, 1.0f);
      for (int64_t i = 0; i < M * K; ++i) A[i] = 0.25f * static_cast<float>(i % 5) - 0.5f;
      for (int64_t i = 0; i < K * N; ++i) B[i] = 0.125f * static_cast<float>(i % 7) - 0.25f;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < K; ++k) R[m * N + n] += A[m * K + k] * B[k * N + n];
      at::native::cpublas::brgemm(M, N, K, K, N, N, true, A.data(), B.data(), C.data(), false);
      for (int64_t i = 0; i < M * N; ++i)
        if (std::fabs(C[i] - R[i]) > 1e-5f) return false;
      return true;
    } catch (...) {
      return false;
    }
  }();
  return works;
#else
  return false;
#endif
}

// Row-major C(M, N) (+)= A(M, K) B(K, N), float, through the brgemm micro-kernel (brgemm_works),
// in blocks of nb columns x kb rows of B, columns outside, K chunks inside (the first chunk of a
// block writes C unless acc, the later ones add). Each caller's blocking is its own, measured
// where it was chosen; the chunks fix the order of each output's sum, so changing a caller's kb
// changes its results in the last bits:
//   fused_rnn.cpp's gemm_rm: one column block, K in chunks of 256 only past K = 512 (the
//     backward's K = G*H; 1.4-1.7x faster at K = 2048 than one call);
//   layer_norm_rnn.cpp's: 256 x 256 blocks, B's block staying in cache for every step's call.
// M, N, K > 0, nb, kb > 0.
inline void brgemm_rm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool acc, int64_t nb,
                      int64_t kb) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  for (int64_t n0 = 0; n0 < N; n0 += nb)
    for (int64_t k0 = 0; k0 < K; k0 += kb)
      at::native::cpublas::brgemm(M, std::min(nb, N - n0), std::min(kb, K - k0), lda, ldb, ldc,
                                  acc || k0 > 0, A + k0, B + k0 * ldb + n0, C + n0, false);
#else
  (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc,
      (void)acc, (void)nb, (void)kb;
#endif
}

// ---- Which float32 GEMM ------------------------------------------------------------------------
// The single-thread float32 GEMMs a kernel can run, in the order fused_rnn.cpp's gemm_layout
// reports them (its value keys packed inference plans: do not reorder).
enum class Gemm { LOOP, BLAS, BRGEMM, OWN };

// The float32 GEMM for this CPU: gemm_own where own_gemm_fits_cpu (the rule, own_gemm.h: AVX2
// without AVX-512; there the fused layers' forward and forward+backward took 0.6-0.97x
// brgemm's time at H >= 256, Zen 3, 1 thread, session 9); else brgemm where torch has it and it
// works (AVX-512 CPUs), else BLAS sgemm (have_sgemm), else the plain loop.
inline Gemm choose_gemm(bool have_sgemm) {
  const bool brgemm = brgemm_works();
  if (own_gemm_fits_cpu()) return Gemm::OWN;
  if (brgemm) return Gemm::BRGEMM;
  return have_sgemm ? Gemm::BLAS : Gemm::LOOP;
}

inline const char* gemm_name(Gemm g) {
  switch (g) {
    case Gemm::OWN: return "own";
    case Gemm::BRGEMM: return "brgemm";
    case Gemm::BLAS: return "blas";
    default: return "loop";
  }
}

}  // namespace
}  // namespace rnnkit
