// Fused CPU kernels for rnnkit's recurrent layers (Elman, LSTM +peephole +coupled, GRU both forms).
//
// One call runs a whole layer over time:
//   forward:  gx = x W_ih^T + b            one parallel GEMM over all T*B rows      (T, B, G*H)
//             for t: h_{t-1} W_hh^T (per-thread columns); pointwise cell update of own units
//             (LSTM: the recurrent GEMM goes to a cache-resident (B, G*H) scratch and the
//             pointwise pass adds gx; training also writes the activations over gx for backward)
//   backward: for t (reverse): pointwise cell backward -> dgates_t; dh_{t-1} = dgates_t W_hh
//             dW_ih, dW_hh, dx, db: one parallel GEMM each over all T*B rows
//
// The time loop runs inside ONE OpenMP parallel region: thread k owns the hidden units
// [j0, j1) and computes, per step, only its columns of every gate block (a small
// single-threaded GEMM with the oneDNN brgemm micro-kernel that torch exports), then the
// pointwise update of its own units, then one barrier. No fork/join per step, no allocation.
// Or (the batch split, wide enough batches: see Split) thread k runs that same loop as one
// thread on a block of the batch rows, every unit, with no barrier until the loop ends: a
// thread the scheduler parks delays the others once, not at every step.
// Short inputs (T*B < 16, e.g. a streaming step) use the weights as stored through BLAS instead
// of transposed copies. float64 runs the same code with BLAS dgemm and libm (for exactness).
// bf16 mode (float32 only; see "bfloat16 mixed precision" below): the same loops, with every
// GEMM reading bf16 copies of its operands and writing float32.
//
// Math (same as rnnkit.cells; rows of W_* stacked per gate block in this order):
//   Elman  h' = f(W_ih x + b_ih + W_hh h + b_hh)
//   LSTM   i,f,g,o: i = s(pi + w_ci c); f = s(pf + w_cf c); g = tanh(pg);
//          c' = f c + i g; o = s(po + w_co c'); h' = o tanh(c')      (coupled: i,g,o and f = 1 - i)
//   GRU    r,z,n: r = s(xr + hr); z = s(xz + hz);
//          after:  n = tanh(xn + r (W_hn h + b_hn));  before: n = tanh(xn + W_hn (r h) + b_hn)
//          h' = (1 - z) n + z h
// Regularisers (rnnkit.engine.regularise; masks drawn by the layer, passed in as tensors):
//   recurrent dropout  W_hh multiplies h ⊙ m (m: (B, H), one per sequence); the GRU's blend keeps h
//   zoneout            h' = k_h h + (1 - k_h) h~,  c' = k_c c + (1 - k_c) c~  (k: (T, B, H))
//   where h~, c~ are the cell's new state above. Plain reference: rnnkit.engine.regularise.step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ctime>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../csrc/own_gemm.h"
#include "../../csrc/pointwise.h"

// The barrier between the phases of a time loop's step, inside its parallel region: skipped in a
// team of one thread. libgomp's barrier makes a futex wake-up system call even then (gdb:
// gomp_team_barrier_wait_end; strace: one per step), so a one-thread loop of T steps made T
// system calls. Every thread of a team takes the same branch (the team size is one value). The
// team is the loop's own (run_team's count), not omp_get_num_threads(): a one-thread loop of the
// batch split runs inside the split's parallel region, whose team it must not wait for.
#define RNNKIT_STEP_BARRIER(team)                              \
  do {                                                         \
    if ((team) > 1) {                                          \
      _Pragma("omp barrier")                                   \
    }                                                          \
  } while (0)

namespace {

enum Kind { RNN = 0, LSTM = 1, GRU = 2 };
enum Act { TANH = 0, RELU = 1, SIGMOID = 2, IDENTITY = 3 };  // IDENTITY: the linear Elman RNN

// ----------------------------------------------------------------------------------------------
// GEMM: row-major C(M, N) (+)= A(M, K) B(K, N), single-threaded (called from inside a parallel
// region, or from one tile of a parallel GEMM).
// ----------------------------------------------------------------------------------------------
// Which single-thread float32 GEMM gemm_rm runs (choose_gemm; set_gemm for benchmarks/tests).
enum class Gemm { LOOP, BLAS, BRGEMM, OWN };
Gemm g_gemm = Gemm::LOOP;

// Fortran BLAS from the BLAS torch links (MKL / OpenBLAS export sgemm_ / dgemm_), resolved at
// init; a plain loop GEMM if there is none.
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const double*, const double*, const int*, const double*, const int*,
                         const double*, double*, const int*);
sgemm_t g_sgemm = nullptr;
dgemm_t g_dgemm = nullptr;
// GEMV of the same BLAS, for float64 one-row products (float ones use gemv_rows below): at
// batch 1 every recurrent product is a vector times the weight, a GEMM with one column.
using sgemv_t = void (*)(const char*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemv_t = void (*)(const char*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*,
                         const int*);
sgemv_t g_sgemv = nullptr;
dgemv_t g_dgemv = nullptr;

// Row-major c(1, N) (+)= a(1, K) op(B) through BLAS gemv, where op(B) is B (K, N) with leading
// dimension ldb (transposed = false) or Bt^T for Bt (N, K) (transposed = true). False if no gemv.
template <typename T>
bool blas_gemv(bool transposed, int64_t N, int64_t K, const T* a, const T* B, int64_t ldb, T* c,
               bool acc) {
  // row-major B (K, N) is column-major (N, K): c = B_cm a ("N"); row-major Bt (N, K) is
  // column-major (K, N): c = Bt_cm^T a ("T")
  const int m = static_cast<int>(transposed ? K : N), n = static_cast<int>(transposed ? N : K);
  const int ld = static_cast<int>(ldb), one_i = 1;
  const T one = 1, beta = acc ? T(1) : T(0);
  if constexpr (std::is_same_v<T, float>) {
    if (!g_sgemv) return false;
    g_sgemv(transposed ? "T" : "N", &m, &n, &one, B, &ld, a, &one_i, &beta, c, &one_i);
  } else {
    if (!g_dgemv) return false;
    g_dgemv(transposed ? "T" : "N", &m, &n, &one, B, &ld, a, &one_i, &beta, c, &one_i);
  }
  return true;
}

template <typename T>
void loop_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool acc) {
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

template <typename T, typename F>
void blas_gemm(F f, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool acc) {
  // row-major C = A B  <=>  column-major C^T = B^T A^T
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one = 1, beta = acc ? T(1) : T(0);
  f("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}

// rnnkit's own float32 GEMM for AVX2 CPUs (gemm_own, own_gemm_fits_cpu): engine/csrc/own_gemm.h.
using rnnkit::own_gemm_fits_cpu;
#ifdef RNNKIT_OWN_GEMM
using rnnkit::g_own_kc;
using rnnkit::g_own_pack_rows;
using rnnkit::gemm_own;
using rnnkit::kOwnCols;
#endif

inline void gemm_rm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                    const double* B, int64_t ldb, double* C, int64_t ldc, bool acc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!acc) for (int64_t m = 0; m < M; ++m) std::memset(C + m * ldc, 0, N * sizeof(double));
    return;
  }
  if (g_dgemm) return blas_gemm(g_dgemm, M, N, K, A, lda, B, ldb, C, ldc, acc);
  loop_gemm(M, N, K, A, lda, B, ldb, C, ldc, acc);
}

inline void gemm_rm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!acc) for (int64_t m = 0; m < M; ++m) std::memset(C + m * ldc, 0, N * sizeof(float));
    return;
  }
#ifdef RNNKIT_OWN_GEMM
  if (g_gemm == Gemm::OWN) return gemm_own(M, N, K, A, lda, B, ldb, C, ldc, acc);
#endif
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (g_gemm == Gemm::BRGEMM) {
    // Long reductions (the backward's K = G*H) in chunks that keep the B panel in cache:
    // 1.4-1.7x faster at K = 2048 than one call.
    const int64_t KB = K > 512 ? 256 : K;
    for (int64_t k0 = 0; k0 < K; k0 += KB)
      at::native::cpublas::brgemm(M, N, std::min(KB, K - k0), lda, ldb, ldc, acc || k0 > 0,
                                  A + k0, B + k0 * ldb, C, false);
    return;
  }
#endif
  if (g_sgemm) return blas_gemm(g_sgemm, M, N, K, A, lda, B, ldb, C, ldc, acc);
  loop_gemm(M, N, K, A, lda, B, ldb, C, ldc, acc);
}

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

template <typename S>
inline int64_t gemv_rows8_with(int64_t N, int64_t K, const float* a, const float* Bt,
                               int64_t ldbt, float* c, bool acc) {
  using V = typename S::V;
  const int64_t N8 = N / 8 * 8, KW = K / S::kWidth * S::kWidth;
  const typename S::Tail tail = S::tail(K - KW);
  for (int64_t i = 0; i < N8; i += 8) {
    const int64_t n = g_rows_descending ? N8 - 8 - i : i;
    const float* w = Bt + n * ldbt;
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
  return N8;
}

inline int64_t gemv_rows8(int64_t N, int64_t K, const float* a, const float* Bt, int64_t ldbt,
                          float* c, bool acc) {
#if defined(__AVX512F__)
  return gemv_rows8_with<Avx512>(N, K, a, Bt, ldbt, c, acc);
#elif defined(__AVX2__) && defined(__FMA__)
  return gemv_rows8_with<Avx2>(N, K, a, Bt, ldbt, c, acc);
#else
  (void)N;
  (void)K;
  (void)a;
  (void)Bt;
  (void)ldbt;
  (void)c;
  (void)acc;
  return 0;
#endif
}

// Row-major c(1, N) (+)= a(1, K) Bt(N, K)^T: one dot product per row of the weight as stored.
// The batch-1 recurrent product. Not BLAS: MKL's sgemv on the AMD EPYC machines this project
// runs on takes 79 us for a 768 x 256 weight where OpenBLAS takes 10 us (measured, 1 thread);
// a vectorised dot per row streams the weight once at cache bandwidth on any x86 CPU.
inline void gemv_rows(int64_t N, int64_t K, const float* a, const float* Bt, int64_t ldbt,
                      float* c, bool acc) {
  for (int64_t n = gemv_rows8(N, K, a, Bt, ldbt, c, acc); n < N; ++n) {
    const float* w = Bt + n * ldbt;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < K; ++k) sum += w[k] * a[k];
    c[n] = acc ? c[n] + sum : sum;
  }
}

// ---- Batch-1 inference over weights packed once (pack_gemv) ---------------------------------
// gemv_rows reads W (G*H, K) as stored: eight rows at a time (eight streams) and a horizontal
// sum per output. onnxruntime's DeepCPU LSTM/GRU instead packs its weights once per session
// (MlasGemmPackB: column panels of W^T, contiguous along K) and streams them in order. pack_gemv
// does the same for the batch-1 products of rnnkit's inference plan: per gate, the units in
// panels of up to kGemvBlocks vector widths, each panel the (K, width) slice of W^T stored
// row after row, so one product reads the weight in one sequential stream and accumulates along
// the units (whole vectors, no horizontal sums). Each gate's units are padded with zero columns
// to a multiple of the vector width (the padded outputs are computed and not stored).
#if defined(__AVX512F__)
using GemvSimd = Avx512;
#elif defined(__AVX2__) && defined(__FMA__)
using GemvSimd = Avx2;
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr int64_t kGemvWidth = GemvSimd::kWidth;
#else
constexpr int64_t kGemvWidth = 0;  // (no packed path: pack_gemv returns an empty tensor)
#endif
constexpr int64_t kGemvBlocks = 4;  // vectors per panel: 4 x 2 independent FMA chains

// The units of one gate, padded to the vector width.
inline int64_t gemv_padded(int64_t H) { return (H + kGemvWidth - 1) / kGemvWidth * kGemvWidth; }

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// Calls fn(g, u0, valid, nb) for each gate g of G and each panel of its units in the pack_gemv
// layout: units u0 .. u0 + nb * kGemvWidth of the gate, the first `valid` real (the rest padding),
// nb a std::integral_constant 1-4 for the panel kernels' template; in order, or in reverse when
// `descending` (g_rows_descending: see there).
template <typename Fn>
inline void for_each_packed_panel(int64_t G, int64_t H, bool descending, Fn&& fn) {
  const int64_t Hp = gemv_padded(H), L = kGemvBlocks * kGemvWidth;
  const int64_t panels = (Hp + L - 1) / L;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t g = descending ? G - 1 - gi : gi;
    for (int64_t pi = 0; pi < panels; ++pi) {
      const int64_t u0 = (descending ? panels - 1 - pi : pi) * L;
      const int64_t width = std::min(L, Hp - u0), valid = std::min(width, H - u0);
      switch (width / kGemvWidth) {
        case 4: fn(g, u0, valid, std::integral_constant<int, 4>{}); break;
        case 3: fn(g, u0, valid, std::integral_constant<int, 3>{}); break;
        case 2: fn(g, u0, valid, std::integral_constant<int, 2>{}); break;
        default: fn(g, u0, valid, std::integral_constant<int, 1>{}); break;
      }
    }
  }
}
#endif

// out[0 : valid) (+)= a(1, K) P(K, NB * width) for one packed panel. Two chains per vector (even
// and odd k): FMA latency, not the loads, bounds a single chain.
template <typename S, int NB>
inline void gemv_panel(int64_t K, const float* a, const float* P, float* out, int64_t valid,
                       bool acc) {
  using V = typename S::V;
  constexpr int64_t W = S::kWidth, L = NB * W;
  V s0[NB], s1[NB];
  for (int r = 0; r < NB; ++r) s0[r] = s1[r] = S::zero();
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const V a0 = S::set1(a[k]), a1 = S::set1(a[k + 1]);
    const float* p = P + k * L;
    for (int r = 0; r < NB; ++r) {
      s0[r] = S::fma(S::load(p + r * W), a0, s0[r]);
      s1[r] = S::fma(S::load(p + L + r * W), a1, s1[r]);
    }
  }
  if (k < K) {
    const V a0 = S::set1(a[k]);
    for (int r = 0; r < NB; ++r) s0[r] = S::fma(S::load(P + k * L + r * W), a0, s0[r]);
  }
  for (int r = 0; r < NB; ++r) {
    const int64_t n = std::min<int64_t>(W, valid - r * W);
    if (n <= 0) break;
    V v = S::add(s0[r], s1[r]);
    if (n == W) {
      if (acc) v = S::add(v, S::load(out + r * W));
      S::store(out + r * W, v);
    } else {
      const typename S::Tail m = S::tail(n);
      if (acc) v = S::add(v, S::load_tail(out + r * W, m));
      S::store_tail(out + r * W, v, m);
    }
  }
}

// c(1, gates * H) (+)= a(1, K) W[g0 * H : (g0 + gates) * H]^T for W packed by pack_gemv (P), gate
// after gate; each gate's outputs are H apart in c. g_rows_descending reverses the panels'
// order (see there), as it reverses gemv_rows8's rows.
inline void gemv_packed(int64_t gates, int64_t H, int64_t K, const float* a, const float* P,
                        int64_t g0, float* c, bool acc) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  using S = GemvSimd;
  const int64_t Hp = gemv_padded(H);
  for_each_packed_panel(gates, H, g_rows_descending, [&](int64_t g, int64_t u0, int64_t valid,
                                                         auto nb) {
    gemv_panel<S, decltype(nb)::value>(K, a, P + (g0 + g) * Hp * K + u0 * K, c + g * H + u0,
                                       valid, acc);
  });
#else
  (void)gates, (void)H, (void)K, (void)a, (void)P, (void)g0, (void)c, (void)acc;
  TORCH_CHECK(false, "gemv_packed needs AVX2 + FMA");
#endif
}

// C(MR rows, valid) += A(MR, K) P(K, NB * width): the input projection's micro-kernel over NB
// vectors of one packed panel whose rows are ldp floats apart (MR x NB accumulators; each k loads
// NB vectors of the panel and broadcasts MR elements of A, so the FMAs, not the loads, bound it).
template <typename S, int NB, int MR>
inline void gemm_panel(int64_t K, const float* A, int64_t lda, const float* P, int64_t ldp,
                       float* C, int64_t ldc, int64_t valid) {
  using V = typename S::V;
  constexpr int64_t W = S::kWidth;
  V s[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NB; ++r) s[i][r] = S::zero();
  for (int64_t k = 0; k < K; ++k) {
    V b[NB];
    for (int r = 0; r < NB; ++r) b[r] = S::load(P + k * ldp + r * W);
    for (int i = 0; i < MR; ++i) {
      const V a = S::set1(A[i * lda + k]);
      for (int r = 0; r < NB; ++r) s[i][r] = S::fma(b[r], a, s[i][r]);
    }
  }
  for (int r = 0; r < NB; ++r) {
    const int64_t n = std::min<int64_t>(W, valid - r * W);
    if (n <= 0) break;
    const typename S::Tail m = S::tail(n == W ? 0 : n);
    for (int i = 0; i < MR; ++i) {
      float* c = C + i * ldc + r * W;
      if (n == W) S::store(c, S::add(s[i][r], S::load(c)));
      else S::store_tail(c, S::add(s[i][r], S::load_tail(c, m)), m);
    }
  }
}

// C(M, valid) += A(M, K) P(K, NB * width) for one packed panel: six rows at a time, and the
// panel's NB vectors in column blocks of at most kSub, so that the 6 x kSub accumulators, kSub
// panel vectors and one broadcast fit the vector registers (AVX-512 has 32: the whole panel,
// 6 x 4 + 4 + 1; AVX2 has 16: two vectors, 6 x 2 + 2 + 1 — 6 x 4 there spilled the
// accumulators to the stack on every k, perf: 140 stack accesses in the kernel, 14 % of a
// GRU 200,1,64 inference forward).
template <typename S, int NB>
inline void gemm_panel_rows(int64_t M, int64_t K, const float* A, int64_t lda, const float* P,
                            float* C, int64_t ldc, int64_t valid) {
  constexpr int64_t kRows = 6, W = S::kWidth, L = NB * W;
  constexpr int kSub = std::min(NB, W >= 16 ? 4 : 2);
  for (int r0 = 0; r0 < NB; r0 += kSub) {
    const int64_t left = valid - r0 * W;
    if (left <= 0) break;
    const float* Pr = P + r0 * W;
    float* Cr = C + r0 * W;
    // (the last block of an odd NB has one vector: its own instantiation)
    auto block = [&](auto nb_c) {
      constexpr int NS = decltype(nb_c)::value;
      int64_t m = 0;
      for (; m + kRows <= M; m += kRows)
        gemm_panel<S, NS, kRows>(K, A + m * lda, lda, Pr, L, Cr + m * ldc, ldc, left);
      const float* Am = A + m * lda;
      float* Cm = Cr + m * ldc;
      switch (M - m) {
        case 5: gemm_panel<S, NS, 5>(K, Am, lda, Pr, L, Cm, ldc, left); break;
        case 4: gemm_panel<S, NS, 4>(K, Am, lda, Pr, L, Cm, ldc, left); break;
        case 3: gemm_panel<S, NS, 3>(K, Am, lda, Pr, L, Cm, ldc, left); break;
        case 2: gemm_panel<S, NS, 2>(K, Am, lda, Pr, L, Cm, ldc, left); break;
        case 1: gemm_panel<S, NS, 1>(K, Am, lda, Pr, L, Cm, ldc, left); break;
        default: break;
      }
    };
    if (NB - r0 >= kSub) block(std::integral_constant<int, kSub>{});
    else block(std::integral_constant<int, 1>{});
  }
}

// C(M, G*H) += A(M, K) W^T for W (G*H, K) packed by pack_gemv: the batch-1 input projection of
// every step at once, reading the weight packed once per weight version (as onnxruntime reads
// its session-time packed W) instead of BLAS repacking W_ih on every call.
inline void gemm_packed(int64_t M, int64_t G, int64_t H, int64_t K, const float* A, int64_t lda,
                        const float* P, float* C, int64_t ldc) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  using S = GemvSimd;
  const int64_t Hp = gemv_padded(H);
  for_each_packed_panel(G, H, false, [&](int64_t g, int64_t u0, int64_t valid, auto nb) {
    gemm_panel_rows<S, decltype(nb)::value>(M, K, A, lda, P + g * Hp * K + u0 * K, C + g * H + u0,
                                            ldc, valid);
  });
#else
  (void)M, (void)G, (void)H, (void)K, (void)A, (void)lda, (void)P, (void)C, (void)ldc;
  TORCH_CHECK(false, "gemm_packed needs AVX2 + FMA");
#endif
}

// gemv_panel for the streaming step's two products at once: ci[0 : valid) += x(1, I) Pi(I, NB *
// width) and ch[0 : valid) = h(1, H) Ph(H, NB * width), the two packed weights read side by side
// (two sequential streams: at batch 1 the step is bound by reading its weights from L3, and two
// streams keep more of those reads in flight than one).
template <typename S, int NB>
inline void gemv2_panel(int64_t I, const float* x, const float* Pi, int64_t H, const float* h,
                        const float* Ph, float* ci, float* ch, int64_t valid) {
  using V = typename S::V;
  constexpr int64_t W = S::kWidth, L = NB * W;
  V si[NB], sh[NB];
  for (int r = 0; r < NB; ++r) si[r] = sh[r] = S::zero();
  const int64_t both = std::min(I, H);
  for (int64_t k = 0; k < both; ++k) {
    const V ax = S::set1(x[k]), ah = S::set1(h[k]);
    for (int r = 0; r < NB; ++r) {
      si[r] = S::fma(S::load(Pi + k * L + r * W), ax, si[r]);
      sh[r] = S::fma(S::load(Ph + k * L + r * W), ah, sh[r]);
    }
  }
  for (int64_t k = both; k < I; ++k) {
    const V ax = S::set1(x[k]);
    for (int r = 0; r < NB; ++r) si[r] = S::fma(S::load(Pi + k * L + r * W), ax, si[r]);
  }
  for (int64_t k = both; k < H; ++k) {
    const V ah = S::set1(h[k]);
    for (int r = 0; r < NB; ++r) sh[r] = S::fma(S::load(Ph + k * L + r * W), ah, sh[r]);
  }
  for (int r = 0; r < NB; ++r) {
    const int64_t n = std::min<int64_t>(W, valid - r * W);
    if (n <= 0) break;
    if (n == W) {
      S::store(ci + r * W, S::add(si[r], S::load(ci + r * W)));
      S::store(ch + r * W, sh[r]);
    } else {
      const typename S::Tail m = S::tail(n);
      S::store_tail(ci + r * W, S::add(si[r], S::load_tail(ci + r * W, m)), m);
      S::store_tail(ch + r * W, sh[r], m);
    }
  }
}

// ci(1, G*H) += x(1, I) W_ih^T and ch(1, G*H) = h(1, H) W_hh^T, both weights packed by pack_gemv
// (gemv2_panel); g_rows_descending reverses the order as in gemv_packed.
inline void gemv2_packed(int64_t G, int64_t H, const float* x, int64_t I, const float* Pi,
                         const float* h, const float* Ph, float* ci, float* ch) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  using S = GemvSimd;
  const int64_t Hp = gemv_padded(H);
  for_each_packed_panel(G, H, g_rows_descending, [&](int64_t g, int64_t u0, int64_t valid,
                                                     auto nb) {
    gemv2_panel<S, decltype(nb)::value>(I, x, Pi + g * Hp * I + u0 * I, H, h,
                                        Ph + g * Hp * H + u0 * H, ci + g * H + u0,
                                        ch + g * H + u0, valid);
  });
#else
  (void)G, (void)H, (void)x, (void)I, (void)Pi, (void)h, (void)Ph, (void)ci, (void)ch;
  TORCH_CHECK(false, "gemv2_packed needs AVX2 + FMA");
#endif
}

// W (G*H, K) float32 -> its pack_gemv layout (G * gemv_padded(H) * K floats): per gate g and
// panel u0, element (k, u) at g * Hp * K + u0 * K + k * width + (u - u0). Empty where there is no
// packed path (no AVX2: the caller keeps reading W as stored).
at::Tensor pack_gemv(const at::Tensor& w_, int64_t gates) {
  TORCH_CHECK(w_.dim() == 2 && w_.scalar_type() == at::kFloat && gates > 0 &&
                  w_.size(0) % gates == 0,
              "pack_gemv takes a float32 (G*H, K) weight");
  if (kGemvWidth == 0) return at::empty({0}, w_.options());
  const at::Tensor w = w_.contiguous();
  const int64_t H = w.size(0) / gates, K = w.size(1), Hp = gemv_padded(H);
  const int64_t L = kGemvBlocks * kGemvWidth;
  at::Tensor out = at::zeros({gates * Hp * K}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t g = 0; g < gates; ++g)
    for (int64_t u0 = 0; u0 < Hp; u0 += L) {
      const int64_t width = std::min(L, Hp - u0);
      float* d = dst + g * Hp * K + u0 * K;
      for (int64_t u = u0; u < std::min(H, u0 + width); ++u) {
        const float* row = src + (g * H + u) * K;
        for (int64_t k = 0; k < K; ++k) d[k * width + (u - u0)] = row[k];
      }
    }
  return out;
}

// Whether packed is pack_gemv(w) of a (G*H, K) weight (its size; anything else: not used).
inline bool is_packed_gemv(const at::Tensor& packed, int64_t G, int64_t H, int64_t K) {
  return kGemvWidth > 0 && packed.defined() && packed.scalar_type() == at::kFloat &&
         packed.is_contiguous() && packed.numel() == G * gemv_padded(H) * K;
}

// Row-major C(M, N) (+)= A(M, K) Bt(N, K)^T: the weight used as stored, no transposed copy.
template <typename T>
void gemm_bt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bt,
             int64_t ldbt, T* C, int64_t ldc, bool acc) {
  if (M <= 0 || N <= 0) return;
  if (M == 1 && K > 0) {
    if constexpr (std::is_same_v<T, float>) return gemv_rows(N, K, A, Bt, ldbt, C, acc);
    if (blas_gemv<T>(true, N, K, A, Bt, ldbt, C, acc)) return;
  }
  if (K > 0) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldbt), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const T one = 1, beta = acc ? T(1) : T(0);
    if constexpr (std::is_same_v<T, float>) {
      if (g_sgemm) return g_sgemm("T", "N", &m, &n, &k, &one, Bt, &la, A, &lb, &beta, C, &lc);
    } else {
      if (g_dgemm) return g_dgemm("T", "N", &m, &n, &k, &one, Bt, &la, A, &lb, &beta, C, &lc);
    }
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      T sum = acc ? C[i * ldc + j] : T(0);
      for (int64_t k = 0; k < K; ++k) sum += A[i * lda + k] * Bt[j * ldbt + k];
      C[i * ldc + j] = sum;
    }
}

// The bulk rounding passes of bf16 mode (whole operands: x, dG, the transposed copies, and the
// per-step rows) are compiled for AVX-512 (BW: 16-bit lanes), which every CPU with bf16 dot
// products has (AVX-512 BF16 implies it; AMX CPUs have it too) — the rest of this file is built
// for baseline x86-64, whose SSE2 loops made these passes ~1.6 cycles per element (perf: 5% of a
// GRU's bf16 forward+backward at 100,32,256 in dG's VNNI pack alone). They run only in bf16
// mode, and probe_bf16 checks the CPU before it calls one.
#if defined(__GNUC__) && defined(__x86_64__)
#define RNNKIT_BF16_SIMD __attribute__((target("avx512f,avx512bw,avx512vl")))
#define RNNKIT_BF16_CPU_OK \
  (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
#else
#define RNNKIT_BF16_SIMD
#define RNNKIT_BF16_CPU_OK true
#endif

// bfloat16 mode's per-step product (defined with the other bf16 helpers below).
using BF16 = at::BFloat16;
RNNKIT_BF16_SIMD inline void mm_bf16(int64_t M, int64_t n, int64_t K, const float* A,
                                     int64_t lda, const BF16* Bv, int64_t ldb, int64_t k0,
                                     int64_t col0, float* C, int64_t ldc, bool acc);

// Slice i of `count` of the cache lines of [p, p + bytes), prefetched into L2 (a hint: no result
// depends on it). The one-thread time loops call it once per panel of a step's recurrent product
// for the rows of the input projection the step's cell update reads next: those rows (B x G*H
// floats, 64-128 KiB at 35,20,200 / 100,32,256) were written by one GEMM over all steps and
// have left L2 by then; the cell update's short per-row streams (each gate's H floats) are too
// short for the hardware prefetcher, and perf put ~30 % of the LSTM update's samples on
// their loads. Spread over the product's calls, the prefetches never queue up in a burst.
inline void prefetch_ahead(const void* p, int64_t bytes, int64_t i, int64_t count) {
  const int64_t lines = (bytes + 63) / 64, per = (lines + count - 1) / count;
  const char* c = static_cast<const char*>(p);
  for (int64_t l = i * per, e = std::min(lines, l + per); l < e; ++l)
    __builtin_prefetch(c + l * 64, 0, 2);
}

// The recurrent weight either as a transposed copy W^T (K, G*H) (brgemm-friendly) or as stored,
// W (G*H, K) (no copy: for short inputs where the copy would cost more than the GEMMs).
template <typename T>
struct RecW {
  const T* p;
  int64_t ld;
  bool bt;
  const BF16* vnni = nullptr;  // bf16 mode: W^T as a bf16 VNNI copy (ldb = ld), p unused
  bool done = false;  // the (one-step) loop's recurrent product is already in place (step_lean)
  // > 0: p is W^T in column panels of this width (pack_panels), read by panels()
  int64_t panel = 0;
  // C(M, n) (+)= A(M, K) W^T[:, col0 : col0 + n] for a panel-packed W^T of `width` columns
  // (col0 on a panel boundary): one product per panel, each reading its (K, np) block
  // contiguously; the last panel of the packed block may be narrower.
  // ahead, ahead_bytes: memory the caller reads right after the product (the step's rows of
  // the input projection, written by one GEMM over all steps long before: from L3), prefetched
  // into L2 a slice per panel while the compute-bound product runs (see prefetch_ahead).
  void panels(int64_t M, int64_t n, int64_t K, const T* A, int64_t lda, int64_t col0,
              int64_t width, T* C, int64_t ldc, bool acc, const void* ahead = nullptr,
              int64_t ahead_bytes = 0) const {
    const int64_t count = (n + panel - 1) / panel;
    for (int64_t c0 = col0, i = 0; c0 < col0 + n; c0 += panel, ++i) {
      const int64_t np = std::min(panel, width - c0);
      // (AVX2 with gemm_own only: measured there; AVX-512 CPUs keep their tuned loop)
      if (ahead && g_gemm == Gemm::OWN) prefetch_ahead(ahead, ahead_bytes, i, count);
      gemm_rm(M, std::min(np, col0 + n - c0), K, A, lda, p + c0 * K, np, C + (c0 - col0), ldc,
              acc);
    }
  }
  // C(M, N) = A(M, K) W^T for the whole panel-packed W^T of N columns
  void mm_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, T* C,
                 int64_t ldc, const void* ahead = nullptr, int64_t ahead_bytes = 0) const {
    panels(M, N, K, A, lda, 0, N, C, ldc, false, ahead, ahead_bytes);
  }
  // batch-1 inference: W_hh packed by pack_gemv (p stays W as stored, for other products)
  const float* gemv = nullptr;
  // C(M, n) (+)= A(M, K) W^T[:, col0 : col0 + n]
  void mm(int64_t M, int64_t n, int64_t K, const T* A, int64_t lda, int64_t col0, T* C,
          int64_t ldc, bool acc) const {
    // (one group of ld columns: the Elman loop's W^T)
    if (panel > 0 && col0 % panel == 0) return panels(M, n, K, A, lda, col0, ld, C, ldc, acc);
    if constexpr (std::is_same_v<T, float>) {
      if (vnni) return mm_bf16(M, n, K, A, lda, vnni, ld, 0, col0, C, ldc, acc);
      // (whole gates only: K = H, the columns of gates col0 / H onwards)
      if (gemv && M == 1 && col0 % K == 0 && n % K == 0)
        return gemv_packed(n / K, K, K, A, gemv, col0 / K, C, acc);
    }
    if (bt) gemm_bt(M, n, K, A, lda, p + col0 * ld, ld, C, ldc, acc);
    else gemm_rm(M, n, K, A, lda, p + col0, ld, C, ldc, acc);
  }
};

// The recurrent weight W_hh (G*H, H) (ldw = H) as the backward's per-step products read it,
// dh_{t-1} (+)= dgates_t W_hh: float as stored, or (bf16 mode) a bf16 VNNI copy (ldb = H).
template <typename T>
struct BwdW {
  const T* p;
  const BF16* vnni = nullptr;
  // gemm_own (float32): W_hh in column panels of its strip width (pack_panels of W_hh^T, GH
  // rows each), so each strip product reads contiguous B (see g_rec_panel); null: as stored
  const T* strips = nullptr;
  int64_t rows = 0;  // G*H: the rows of W_hh (each panel's length)
  // C(M, n) (+)= A(M, K) W_hh[k0 : k0 + K, col0 : col0 + n]   (k0 even)
  void mm(int64_t M, int64_t n, int64_t H, int64_t K, const T* A, int64_t lda, int64_t k0,
          int64_t col0, T* C, int64_t ldc, bool acc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (vnni) return mm_bf16(M, n, K, A, lda, vnni, H, k0, col0, C, ldc, acc);
#ifdef RNNKIT_OWN_GEMM
      if (strips && col0 % kOwnCols == 0) {
        for (int64_t c0 = col0; c0 < col0 + n; c0 += kOwnCols) {
          const int64_t ld = std::min(kOwnCols, H - c0);  // (the last panel may be narrower)
          gemm_rm(M, std::min(ld, col0 + n - c0), K, A, lda, strips + c0 * rows + k0 * ld, ld,
                  C + (c0 - col0), ldc, acc);
        }
        return;
      }
#endif
    }
    gemm_rm(M, n, K, A, lda, p + k0 * H + col0, H, C, ldc, acc);
  }
};

// Check once that the brgemm micro-kernel exists and computes what we expect.
bool probe_brgemm() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
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
#else
  return false;
#endif
}

// Tile sizes for a parallel GEMM of C(M, N) on nt threads (see pgemm). per_thread: the least
// tile count per thread (pgemm_bf16: 1, see there).
inline void pgemm_tiles(int64_t M, int64_t N, int nt, int64_t& MB, int64_t& NB,
                        int per_thread = 2) {
  // Tiles of at most 256 x 256 (256-row tiles measured fastest, 1 thread, 2-5% over 64-128),
  // of even sizes (N rounded up to 16 for the micro-kernel), and a tile count that is at least
  // two per thread and a multiple of the thread count: 256-wide tiles as they fall split
  // N = 800 on 2 threads 64/36 (the T,B,H = 35,20,200 input projection and weight gradients).
  const int64_t nn = (N + 255) / 256;
  NB = std::min(N, ((N + nn - 1) / nn + 15) / 16 * 16);
  const int64_t ntl = (N + NB - 1) / NB;
  int64_t nm = (M + 255) / 256;
  while (nm < M && (nm * ntl < per_thread * nt || (nm * ntl) % nt != 0) &&
         (M + nm) / (nm + 1) >= 16)
    ++nm;
  MB = (M + nm - 1) / nm;
}

// Ct(N, M) (+)= (A(M, K) B(K, N))^T: each tile is computed in a per-thread buffer and stored
// transposed, so the result lands in the (N, M) layout without a separate transpose pass.
// acc: add to Ct (the chunked backward's weight gradients).
template <typename T>
void pgemm_tout(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                T* Ct, int64_t ldct, int nt, bool acc = false) {
  if (M <= 0 || N <= 0) return;
  const int64_t KB = 256;
  int64_t MB, NB;
  pgemm_tiles(M, N, nt, MB, NB);
  const int64_t mt = (M + MB - 1) / MB, ntile = (N + NB - 1) / NB;
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> buf(MB * NB);
#pragma omp for collapse(2) schedule(static)
    for (int64_t bm = 0; bm < mt; ++bm) {
      for (int64_t bn = 0; bn < ntile; ++bn) {
        const int64_t m0 = bm * MB, n0 = bn * NB;
        const int64_t mm = std::min(MB, M - m0), nn = std::min(NB, N - n0);
        T* c = buf.data();
        if (K == 0) gemm_rm(mm, nn, K, A, lda, B, ldb, c, nn, false);
        for (int64_t k0 = 0; k0 < K; k0 += KB) {
          const int64_t kk = std::min(KB, K - k0);
          gemm_rm(mm, nn, kk, A + m0 * lda + k0, lda, B + k0 * ldb + n0, ldb, c, nn, k0 > 0);
        }
        // 16 x 16 blocks: reads and writes both stay within a few cache lines.
        for (int64_t nb = 0; nb < nn; nb += 16)
          for (int64_t mb = 0; mb < mm; mb += 16) {
            const int64_t ne = std::min(nn, nb + 16), me = std::min(mm, mb + 16);
            for (int64_t n = nb; n < ne; ++n) {
              T* dst = Ct + (n0 + n) * ldct + m0;
              if (acc)
                for (int64_t m = mb; m < me; ++m) dst[m] += c[m * nn + n];
              else
                for (int64_t m = mb; m < me; ++m) dst[m] = c[m * nn + n];
            }
          }
      }
    }
  }
}

// C(M, N) split into pgemm_tiles' tiles, spread over nt threads: tile(m0, n0, mm, nn) computes
// rows [m0, m0 + mm) x columns [n0, n0 + nn). The one parallel tile loop of pgemm and pgemm_bf16.
template <typename Fn>
void parallel_tiles(int64_t M, int64_t N, int nt, Fn&& tile, int per_thread = 2) {
  int64_t MB, NB;
  pgemm_tiles(M, N, nt, MB, NB, per_thread);
  const int64_t mt = (M + MB - 1) / MB, ntile = (N + NB - 1) / NB;
#pragma omp parallel for num_threads(nt) collapse(2) schedule(static)
  for (int64_t bm = 0; bm < mt; ++bm) {
    for (int64_t bn = 0; bn < ntile; ++bn) {
      const int64_t m0 = bm * MB, n0 = bn * NB;
      tile(m0, n0, std::min(MB, M - m0), std::min(NB, N - n0));
    }
  }
}

// c(mm, nn) (ldc) += bias[n] on every row (bias already offset to the tile's first column).
template <typename T>
inline void add_bias_rows(int64_t mm, int64_t nn, const T* bias, T* c, int64_t ldc) {
  for (int64_t m = 0; m < mm; ++m) {
    T* cr = c + m * ldc;
#pragma omp simd
    for (int64_t n = 0; n < nn; ++n) cr[n] += bias[n];
  }
}

// The one tile loop of pgemm and pgemm_panels: C(M, N) (+)= A(M, K) B(K, N) [+ bias[n] on every
// row] in pgemm_tiles' tiles; each tile in column blocks of nb (nb >= the tile's width: one
// block), each block in K chunks of 256, one gemm_rm call per chunk. b_at(k0, c0) is {the address
// of B(k0, c0), B's row stride there}: B's layout is the one thing the callers differ in.
// The bias is added to each column block after its last chunk, while the block is in L1 (a whole
// tile at a time, its C came back from L2: ~3 % of a 35,20,200 LSTM forward's samples).
template <typename T, typename BAt>
void pgemm_blocks(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, BAt&& b_at,
                  int64_t nb, T* C, int64_t ldc, bool acc, const T* bias, int nt) {
  if (M <= 0 || N <= 0) return;
  const int64_t KB = 256;
  parallel_tiles(M, N, nt, [&](int64_t m0, int64_t n0, int64_t mm, int64_t nn) {
    for (int64_t c0 = n0; c0 < n0 + nn; c0 += nb) {
      const int64_t np = std::min(nb, n0 + nn - c0);
      T* c = C + m0 * ldc + c0;
      if (K == 0) gemm_rm(mm, np, K, A, lda, b_at(0, c0).first, np, c, ldc, acc);
      for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const auto [b, ldb] = b_at(k0, c0);
        gemm_rm(mm, np, std::min(KB, K - k0), A + m0 * lda + k0, lda, b, ldb, c, ldc,
                acc || k0 > 0);
      }
      if (bias) add_bias_rows(mm, np, bias + c0, c, ldc);
    }
  });
}

// Parallel GEMM over tiles: C(M, N) (+)= A(M, K) B(K, N) [+ bias[n] on every row].
template <typename T>
void pgemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
           T* C, int64_t ldc, bool acc, const T* bias, int nt) {
  pgemm_blocks<T>(
      M, N, K, A, lda,
      [&](int64_t k0, int64_t c0) { return std::make_pair(B + k0 * ldb + c0, ldb); }, N, C, ldc,
      acc, bias, nt);
}

// pgemm with B = W^T (K, N) in column panels of width nb (pack_panels' layout; nb = kOwnCols,
// g_rec_panel under gemm_own): the same tiles (pgemm_tiles: NB a multiple of 16, or N) and the
// same K chunks, so each output is the same sum in the same order as pgemm's over W^T as one
// block — only B's layout differs (tiles start on panel boundaries: NB is a multiple of nb).
// Each call's B is then one contiguous strip, which gemm_own reads in place (ldb = kOwnCols);
// over a plain W^T it copied every tile's B into strips first (the input projection, per call
// and row tile: perf put ~5 % of gemm_own's samples on that copy at 35,20,200, its strided
// reads of W^T).
template <typename T>
void pgemm_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bp,
                  int64_t nb, T* C, int64_t ldc, const T* bias, int nt) {
  // (the panel of columns [c0, c0 + np) is a (K, np) block at c0 K; np = nb but for the last)
  pgemm_blocks<T>(
      M, N, K, A, lda,
      [&](int64_t k0, int64_t c0) {
        const int64_t np = std::min(nb, N - c0);
        return std::make_pair(Bp + c0 * K + k0 * np, np);
      },
      nb, C, ldc, false, bias, nt);
}

// W (N, K) (a weight as stored, contiguous) -> W^T in column panels of width nb: panel p holds
// columns [p nb, p nb + np) of W^T as a (K, np) row-major block at offset p nb K. As one (K, N)
// W^T every row of a product's B panel is N floats from the previous one (4 KiB at N = 1024: a
// new page per row and the same L1 set for all of them); packed, the micro-kernel reads its B
// block in order.
// The panel width, per CPU (init): 128 for oneDNN's brgemm (AVX-512); with gemm_own, its strip
// width kOwnCols, so that each call's B is one contiguous strip that gemm_own reads from L1
// without copying it (at 128, each call copied its panel or read it across a few L1 sets).
int64_t g_rec_panel = 128;

template <typename T>
at::Tensor pack_panels(const at::Tensor& w, int64_t nb) {
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({N, K}, w.options());
  const T* src = w.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t np = std::min(nb, N - n0);
    T* d = dst + n0 * K;
    for (int64_t n = 0; n < np; ++n) {
      const T* sr = src + (n0 + n) * K;
      for (int64_t k = 0; k < K; ++k) d[k * np + n] = sr[k];
    }
  }
  return out;
}

// ----------------------------------------------------------------------------------------------
// bfloat16 mixed precision (torch.autocast("cpu", dtype=torch.bfloat16); the `bf16` argument of
// the operators). Every GEMM reads bf16 copies of its inputs — x, h_{t-1}, W_ih, W_hh, the gate
// gradients — and accumulates and writes float32 (the oneDNN brgemm micro-kernel's bf16 x bf16
// -> f32 form); states, gates and all pointwise math stay float32, as do the weights and their
// gradients the caller owns. The micro-kernel reads B in the VNNI layout: rows k = 2p and
// 2p + 1 interleaved, element (k, n) at ((k / 2) * ldb + n) * 2 + k % 2, so K is padded to an
// even count with a zero row of B (and a zero column of A). torch's cpublas::pack would do this
// only on AMX CPUs (could_pack), so the packing is ours.
// ----------------------------------------------------------------------------------------------
inline int64_t even_up(int64_t k) { return (k + 1) / 2 * 2; }

// float -> bf16 bits, round to nearest even, NaN -> 0x7FC0: c10::BFloat16's rounding, written on
// plain integers so that the conversion loops vectorise (through the BFloat16 struct they do not:
// the conversions took twice the time of the forward's pointwise pass, measured with perf).
static_assert(sizeof(BF16) == sizeof(uint16_t), "at::BFloat16 is its 16 bits");
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

// out (even_up(K) / 2, N, 2): B(k, n) = src[k * rs + n * cs] in the VNNI layout (ldb = N).
RNNKIT_BF16_SIMD void pack_vnni(int64_t K, int64_t N, const float* src, int64_t rs,
                                int64_t cs, BF16* out, int nt) {
  const int64_t pairs = even_up(K) / 2;
#pragma omp parallel for num_threads(nt) schedule(static) if (pairs * N > 32768)
  for (int64_t p = 0; p < pairs; ++p) {
    const float* r0 = src + 2 * p * rs;
    const float* r1 = 2 * p + 1 < K ? r0 + rs : nullptr;  // (an odd K's last pair: zero row)
    // (row 2p, row 2p + 1) pairs as one little-endian word: row 2p in the low half (x86)
    uint32_t* o = reinterpret_cast<uint32_t*>(out + p * N * 2);
    if (cs == 1 && r1) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n)
        o[n] = uint32_t(bf16_bits(r0[n])) | (uint32_t(bf16_bits(r1[n])) << 16);
    } else {
      for (int64_t n = 0; n < N; ++n)
        o[n] = uint32_t(bf16_bits(r0[n * cs])) | (r1 ? uint32_t(bf16_bits(r1[n * cs])) << 16 : 0u);
    }
  }
}

// out (M, ldo) bf16 = A (M, K) rounded to nearest even, columns K..ldo zero.
inline void rows_to_bf16(int64_t M, int64_t K, const float* A, int64_t lda, BF16* out,
                         int64_t ldo) {
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    uint16_t* o = reinterpret_cast<uint16_t*>(out + m * ldo);
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) o[k] = bf16_bits(a[k]);
    for (int64_t k = K; k < ldo; ++k) o[k] = 0;
  }
}

// Row-major C(M, N) (+)= A(M, Kp) B(Kp, N), A bf16 (lda), B bf16 VNNI (ldb), C float; Kp even.
inline void gemm_bf16(int64_t M, int64_t N, int64_t Kp, const BF16* A, int64_t lda,
                      const BF16* Bv, int64_t ldb, float* C, int64_t ldc, bool acc) {
  if (M <= 0 || N <= 0) return;
  if (Kp <= 0) {
    if (!acc) for (int64_t m = 0; m < M; ++m) std::memset(C + m * ldc, 0, N * sizeof(float));
    return;
  }
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  // (chunks of K as gemm_rm, for the same reason: the B panel stays in cache)
  const int64_t KB = Kp > 512 ? 256 : Kp;
  for (int64_t k0 = 0; k0 < Kp; k0 += KB)
    at::native::cpublas::brgemm(M, N, std::min(KB, Kp - k0), lda, ldb, ldc, acc || k0 > 0,
                                A + k0, Bv + k0 * ldb, C, true);
#else
  TORCH_CHECK(false, "this torch has no bfloat16 brgemm micro-kernel");
#endif
}

// C(M, n) (+)= BF16(A(M, K)) B[k0 : k0 + K, col0 : col0 + n] for a VNNI B (ldb); k0 even. A is
// converted into a per-thread buffer: the per-step products' A (h_{t-1}, the step's gate
// gradients) is float32 state written by every thread in the step before.
RNNKIT_BF16_SIMD inline void mm_bf16(int64_t M, int64_t n, int64_t K, const float* A,
                                     int64_t lda, const BF16* Bv, int64_t ldb, int64_t k0,
                                     int64_t col0, float* C, int64_t ldc, bool acc) {
  if (M <= 0 || n <= 0) return;
  static thread_local std::vector<BF16> buf;
  const int64_t Kp = even_up(K);
  if (static_cast<int64_t>(buf.size()) < M * Kp) buf.resize(M * Kp);
  rows_to_bf16(M, K, A, lda, buf.data(), Kp);
  gemm_bf16(M, n, Kp, buf.data(), Kp, Bv + (k0 / 2) * ldb * 2 + col0 * 2, ldb, C, ldc, acc);
}

// Parallel tiles (as pgemm): C(M, N) = A(M, Kp) B(Kp, N) [+ bias[n] on every row]. One tile per
// thread suffices (per_thread 1): the weight gradients (M = I or H <= 256, K = T*B) as two tiles
// on one thread read B, the whole VNNI-packed dG, twice from memory.
void pgemm_bf16(int64_t M, int64_t N, int64_t Kp, const BF16* A, int64_t lda, const BF16* Bv,
                int64_t ldb, float* C, int64_t ldc, const float* bias, int nt) {
  if (M <= 0 || N <= 0) return;
  parallel_tiles(M, N, nt, [&](int64_t m0, int64_t n0, int64_t mm, int64_t nn) {
    float* c = C + m0 * ldc + n0;
    gemm_bf16(mm, nn, Kp, A + m0 * lda, lda, Bv + n0 * 2, ldb, c, ldc, false);
    if (bias) add_bias_rows(mm, nn, bias + n0, c, ldc);
  }, 1);
}

// A bf16 copy of a float (rows, cols) tensor with cols padded to even (zero), for a GEMM's A.
RNNKIT_BF16_SIMD at::Tensor bf16_rows(const at::Tensor& a, int nt) {
  const int64_t rows = a.size(0), cols = a.size(1), ld = even_up(cols);
  at::Tensor out = at::empty({rows, ld}, a.options().dtype(at::kBFloat16));
  const float* src = a.data_ptr<float>();
  BF16* dst = out.data_ptr<BF16>();
#pragma omp parallel for num_threads(nt) schedule(static) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) rows_to_bf16(1, cols, src + r * cols, cols, dst + r * ld, ld);
  return out;
}

// B = src as a (K, N) matrix (strides rs, cs) in the VNNI layout, (even_up(K) / 2, N, 2) bf16.
at::Tensor vnni_of(const float* src, int64_t K, int64_t N, int64_t rs, int64_t cs,
                   const at::TensorOptions& opts, int nt) {
  if (rs == 1 && cs == K && N > 1) {
    // The transpose of a row-major (N, K) weight (the forward's W_ih^T, W_hh^T): its rows
    // rounded to bf16 (N, Kp) are, read as 32-bit words, the VNNI pairs (k = 2p, 2p + 1) of
    // each column n, so the layout is a 32-bit transpose of them (torch's blocked copy).
    // pack_vnni's strided reads took 5% of a GRU's bf16 forward+backward at 100,32,256 (perf).
    const at::Tensor rows = bf16_rows(at::from_blob(const_cast<float*>(src), {N, K},
                                                    opts.dtype(at::kFloat)), nt);
    return rows.view(at::kInt).t().contiguous().view(at::kBFloat16).view({even_up(K) / 2, N, 2});
  }
  at::Tensor out = at::empty({even_up(K) / 2, N, 2}, opts.dtype(at::kBFloat16));
  pack_vnni(K, N, src, rs, cs, out.data_ptr<BF16>(), nt);
  return out;
}

// The rows of a contiguous float (K, N) matrix (the backward's gate gradients, K = T*B) in the
// VNNI layout, as vnni_of(a, K, N, N, 1), in the same pass over a (which a separate pass read
// again, 2-4% of a bf16 forward+backward at 100,32,256 each, perf): with colsum, its column sums
// in float32 (the biases' gradients, instead of torch's sum), with rows, its bf16 copy as
// bf16_rows makes (the A of dx = dG W_ih). a's rows may be strided (a block of columns of a
// wider matrix); its columns are contiguous.
RNNKIT_BF16_SIMD at::Tensor vnni_rows_sum(const at::Tensor& a, at::Tensor* colsum,
                                           at::Tensor* rows, int nt) {
  const int64_t K = a.size(0), N = a.size(1), pairs = even_up(K) / 2, ldr = even_up(N);
  const int64_t lda = a.stride(0);
  TORCH_CHECK(a.stride(1) == 1 || N <= 1, "vnni_rows_sum: columns must be contiguous");
  at::Tensor out = at::empty({pairs, N, 2}, a.options().dtype(at::kBFloat16));
  const float* src = a.data_ptr<float>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<BF16>());
  if (colsum) *colsum = at::zeros({N}, a.options());
  float* sum = colsum ? colsum->data_ptr<float>() : nullptr;
  if (rows) *rows = at::empty({K, ldr}, a.options().dtype(at::kBFloat16));
  uint16_t* rp = rows ? reinterpret_cast<uint16_t*>(rows->data_ptr<BF16>()) : nullptr;
#pragma omp parallel num_threads(nt) if (pairs * N > 32768)
  {
    std::vector<float> part(sum ? N : 0, 0.0f);  // this thread's rows' sums
    float* ps = part.data();
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
      const float* r0 = src + 2 * p * lda;
      uint32_t* o = dst + p * N;
      if (2 * p + 1 < K) {
        const float* r1 = r0 + lda;
        if (rp) {
          uint16_t* q0 = rp + 2 * p * ldr;
          uint16_t* q1 = q0 + ldr;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) {
            const uint16_t b0 = bf16_bits(r0[n]), b1 = bf16_bits(r1[n]);
            q0[n] = b0;
            q1[n] = b1;
            o[n] = uint32_t(b0) | (uint32_t(b1) << 16);
          }
          if (ldr > N) q0[N] = q1[N] = 0;
        } else {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n)
            o[n] = uint32_t(bf16_bits(r0[n])) | (uint32_t(bf16_bits(r1[n])) << 16);
        }
        if (sum) {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) ps[n] += r0[n] + r1[n];
        }
      } else {  // an odd K's last row, paired with a zero row
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) o[n] = uint32_t(bf16_bits(r0[n]));
        if (rp) rows_to_bf16(1, N, r0, N, rows->data_ptr<BF16>() + 2 * p * ldr, ldr);
        if (sum) {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) ps[n] += r0[n];
        }
      }
    }
    if (sum) {
#pragma omp critical
      for (int64_t n = 0; n < N; ++n) sum[n] += ps[n];
    }
  }
  return out;
}

// Check once that the bf16 micro-kernel exists and reads the VNNI layout as packed above
// (odd K, a column offset into B, accumulation): rnnkit.engine.fused asks before using it.
bool probe_bf16() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  if (!RNNKIT_BF16_CPU_OK) return false;  // (the RNNKIT_BF16_SIMD passes need AVX-512 BW)
  try {
    const int64_t M = 3, N = 40, K = 7, col0 = 8, n = 20;
    std::vector<float> A(M * K), B(K * N), C(M * n, 1.0f), R(M * n, 1.0f);
    // values exact in bf16, so the product is exact in float32
    for (int64_t i = 0; i < M * K; ++i) A[i] = 0.25f * static_cast<float>(i % 5) - 0.5f;
    for (int64_t i = 0; i < K * N; ++i) B[i] = 0.125f * static_cast<float>(i % 7) - 0.25f;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < K; ++k) R[m * n + j] += A[m * K + k] * B[k * N + col0 + j];
    std::vector<BF16> Bv(even_up(K) * N);
    pack_vnni(K, N, B.data(), N, 1, Bv.data(), 1);
    mm_bf16(M, n, K, A.data(), K, Bv.data(), N, 0, col0, C.data(), n, true);
    for (int64_t i = 0; i < M * n; ++i)
      if (std::fabs(C[i] - R[i]) > 1e-6f) return false;
    return true;
  } catch (...) {
    return false;
  }
#else
  return false;
#endif
}

// Pointwise math (fexp, sigm, tanh_): one definition for every rnnkit kernel, in
// engine/csrc/pointwise.h.
using rnnkit::fexp;
using rnnkit::sigm;
using rnnkit::tanh_;

// body() on a team of nt threads (the forward time loops: body splits the units by
// omp_get_thread_num()); one thread runs it without a parallel region. libgomp's region ends with
// a barrier that makes a futex wake-up system call even in a team of one (strace: one per
// call), as RNNKIT_STEP_BARRIER's do per step. body(team, tid) gets its team size and thread
// number from here, not from omp_get_*: a one-thread loop of the batch split runs inside the
// split's parallel region, where those name the split's team (thread k of 2 would take only
// its half of the units).
template <typename Fn>
void run_team(int nt, Fn&& body) {
  if (nt == 1) return body(1, 0);
#pragma omp parallel num_threads(nt)
  body(omp_get_num_threads(), omp_get_thread_num());
}

// Hidden units owned by thread tid: chunks aligned to 16 elements.
inline void unit_range(int64_t H, int nt, int tid, int64_t& j0, int64_t& j1) {
  int64_t chunk = (H + nt - 1) / nt;
  chunk = (chunk + 15) / 16 * 16;
  j0 = std::min(H, chunk * tid);
  j1 = std::min(H, j0 + chunk);
}

// Below this many rows (T * B) the forward uses the weights as stored (see forward_impl).
constexpr int64_t kAsStoredRows = 16;

struct Cfg {
  int kind = 0, act = 0;
  bool peep = false, coupled = false, before = false;
  int64_t T = 0, B = 0, I = 0, H = 0, G = 0;
  std::vector<int64_t> bs;  // active rows per step (size T)
};

// The regularisers' tensors (all null: none). hd is a (2, B, H) double buffer of h ⊙ m, the
// recurrent GEMM's input: step t reads half t % 2 and writes half (t + 1) % 2, so no thread
// overwrites what another still reads before the step's barrier.
template <typename T>
struct Reg {
  const T* rmask = nullptr;  // (B, H) recurrent-dropout mask
  const T* kh = nullptr;     // (T, B, H) zoneout keep mask of h
  const T* kc = nullptr;     // (T, B, H) zoneout keep mask of c (LSTM)
  T* hd = nullptr;           // (2, B, H) h ⊙ m
  T* ctil = nullptr;         // (T, B, H) the LSTM's new cell c~ before zoneout (training, kc)
  bool any() const { return rmask || kh || kc; }
  // the recurrent GEMM's input at step t: h ⊙ m, or h itself
  const T* gemm_input(int64_t t, int64_t BH, const T* hp) const {
    return rmask ? hd + (t % 2) * BH : hp;
  }
  T* next_input(int64_t t, int64_t BH) const { return rmask ? hd + ((t + 1) % 2) * BH : nullptr; }
  const T* row(const T* k, int64_t t, int64_t B, int64_t m, int64_t H) const {
    return k ? k + (t * B + m) * H : nullptr;
  }
  // The same regularisers seen from batch row m0 on (a row block of the batch split; every
  // tensor is (., B, H) with rows H apart, so the block's rows stay B * H apart per step)
  Reg from_row(int64_t m0, int64_t H) const {
    auto at = [&](auto* p) { return p ? p + m0 * H : p; };
    return {at(rmask), at(kh), at(kc), at(hd), at(ctil)};
  }
};

// p moved to batch row m0 of a (., B, width) tensor (null stays null).
template <typename P>
P* from_row(P* p, int64_t m0, int64_t width) {
  return p ? p + m0 * width : p;
}

int64_t gates_of(const Cfg& c) {
  if (c.kind == RNN) return 1;
  if (c.kind == LSTM) return c.coupled ? 3 : 4;
  return 3;
}

// ----------------------------------------------------------------------------------------------
// Forward time loops.
// gates: (T, B, G*H) holds x W_ih^T + folded biases on entry, activations on exit (training).
// ----------------------------------------------------------------------------------------------
// rec: (B, G*H) scratch for the recurrent GEMM (stays in cache; the GEMM never touches the
// cold gates rows). SAVE: write activations back into gates (training).
template <typename T, bool PEEP, bool COUPLED, bool SAVE, bool REG>
void lstm_fwd_loop(const Cfg& cf, T* gates, T* rec, T* y, T* cs, T* hst, T* cst, const T* h0,
                   const RecW<T>& W, const T* pw, const Reg<T>& R, int nt) {
  const int64_t H = cf.H, B = cf.B, G = cf.G, GH = G * H;
  run_team(nt, [&](const int team, const int tid) {
    int64_t j0, j1;
    unit_range(H, team, tid, j0, j1);
    const T* wci = PEEP ? pw : nullptr;
    const T* wcf = PEEP && !COUPLED ? pw + H : nullptr;
    const T* wco = PEEP ? pw + (COUPLED ? 1 : 2) * H : nullptr;
    std::vector<T> ctmp_buf(REG ? H : 0);  // c~ of a row when it is neither kept nor saved
    for (int64_t t = 0; t < cf.T; ++t) {
      const int64_t M = cf.bs[t];
      const T* hp = t == 0 ? h0 : y + (t - 1) * B * H;
      const T* hin = REG ? R.gemm_input(t, B * H, hp) : hp;
      T* hdn = REG ? R.next_input(t, B * H) : nullptr;
      T* g = gates + t * B * GH;
      if (j1 > j0 && !W.done) {
        // batch 1: odd steps read W_hh last row to first (see g_rows_descending)
        const bool descending = M == 1 && W.bt && (t & 1);
        g_rows_descending = descending;
        if (j0 == 0 && j1 == H && !descending) {
          // One thread owns every unit: its columns of the G gate blocks are adjacent, so one
          // product of G*H columns instead of G of H (one micro-kernel call and one N-tail per
          // step rather than G: H = 200 is 3 x 64 + 8 columns per block).
          if (W.panel > 0) W.mm_panels(M, GH, H, hin, H, rec, GH, g, M * GH * sizeof(T));
          else W.mm(M, GH, H, hin, H, 0, rec, GH, false);
        } else
        for (int64_t i = 0; i < G; ++i) {
          const int64_t b = descending ? G - 1 - i : i;
          W.mm(M, j1 - j0, H, hin, H, b * H + j0, rec + b * H + j0, GH, false);
        }
        g_rows_descending = false;
      }
      for (int64_t m = 0; m < M; ++m) {
        T* gr = g + m * GH;
        const T* rr = rec + m * GH;
        T* cr = cst + m * H;
        T* hr = hst + m * H;
        T* yr = y + (t * B + m) * H;
        T* csr = cs ? cs + (t * B + m) * H : nullptr;
        const T* khr = REG ? R.row(R.kh, t, B, m, H) : nullptr;
        const T* kcr = REG ? R.row(R.kc, t, B, m, H) : nullptr;
        T* ctr = REG && R.ctil ? R.ctil + (t * B + m) * H : nullptr;
        const T* rmr = REG && R.rmask ? R.rmask + m * H : nullptr;
        T* hdr = hdn ? hdn + m * H : nullptr;
        // The loops below compute c~ and h~ as without regularisers, and the masks are applied
        // after them in loops of their own: a mask test inside the vectorised loop made it 2-3x
        // slower. cw: where c~ goes (the state itself unless zoneout must blend it with c_{t-1})
        T* cw = REG && kcr ? (ctr ? ctr : ctmp_buf.data()) : cr;
        if (!COUPLED) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T cp = cr[j];
            T pi = gr[j] + rr[j], pf = gr[H + j] + rr[H + j];
            T pg = gr[2 * H + j] + rr[2 * H + j], po = gr[3 * H + j] + rr[3 * H + j];
            if (PEEP) {
              pi += wci[j] * cp;
              pf += wcf[j] * cp;
            }
            const T i = sigm(pi), f = sigm(pf), gg = tanh_(pg);
            const T c = f * cp + i * gg;
            if (PEEP) po += wco[j] * c;
            const T o = sigm(po);
            const T h = o * tanh_(c);
            if (SAVE) {
              gr[j] = i;
              gr[H + j] = f;
              gr[2 * H + j] = gg;
              gr[3 * H + j] = o;
            }
            cw[j] = c;
            yr[j] = h;
          }
        } else {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T cp = cr[j];
            T pi = gr[j] + rr[j], pg = gr[H + j] + rr[H + j], po = gr[2 * H + j] + rr[2 * H + j];
            if (PEEP) pi += wci[j] * cp;
            const T i = sigm(pi), gg = tanh_(pg);
            const T c = (T(1) - i) * cp + i * gg;
            if (PEEP) po += wco[j] * c;
            const T o = sigm(po);
            const T h = o * tanh_(c);
            if (SAVE) {
              gr[j] = i;
              gr[H + j] = gg;
              gr[2 * H + j] = o;
            }
            cw[j] = c;
            yr[j] = h;
          }
        }
        if constexpr (REG) {
          if (kcr) {  // c = k_c c_{t-1} + (1 - k_c) c~
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) cr[j] = kcr[j] * cr[j] + (T(1) - kcr[j]) * cw[j];
          }
          if (khr) {  // h = k_h h_{t-1} + (1 - k_h) h~ (hr still holds h_{t-1})
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) yr[j] = khr[j] * hr[j] + (T(1) - khr[j]) * yr[j];
          }
          if (hdr) {  // the next step's GEMM input h ⊙ m
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) hdr[j] = yr[j] * rmr[j];
          }
        }
        if (csr) std::memcpy(csr + j0, cr + j0, (j1 - j0) * sizeof(T));
        // hst is the final h (the products read h_{t-1} from y): a row's last step writes it,
        // zoneout reads it as h_{t-1} at every step
        if (REG || t + 1 == cf.T || m >= cf.bs[t + 1])
          std::memcpy(hr + j0, yr + j0, (j1 - j0) * sizeof(T));
      }
      RNNKIT_STEP_BARRIER(team);
    }
  });
}

template <typename T>
void rnn_fwd_loop(const Cfg& cf, T* gates, T* y, T* hst, const T* h0, const RecW<T>& W,
                  const Reg<T>& R, int nt) {
  const bool reg = R.any();
  const int64_t H = cf.H, B = cf.B;
  const int act = cf.act;
  run_team(nt, [&](const int team, const int tid) {
    int64_t j0, j1;
    unit_range(H, team, tid, j0, j1);
    for (int64_t t = 0; t < cf.T; ++t) {
      const int64_t M = cf.bs[t];
      const T* hp = t == 0 ? h0 : y + (t - 1) * B * H;
      T* g = gates + t * B * H;
      if (j1 > j0 && !W.done) W.mm(M, j1 - j0, H, R.gemm_input(t, B * H, hp), H, j0, g + j0, H, true);
      T* hdn = R.next_input(t, B * H);
      for (int64_t m = 0; m < M; ++m) {
        T* gr = g + m * H;
        T* hr = hst + m * H;
        T* yr = y + (t * B + m) * H;
        if (reg) {
          // the gates row keeps h~ = f(pre) (the backward's activation when h is zoned out)
          const T* khr = R.row(R.kh, t, B, m, H);
          const T* rmr = R.rmask ? R.rmask + m * H : nullptr;
          T* hdr = hdn ? hdn + m * H : nullptr;
          for (int64_t j = j0; j < j1; ++j) {
            const T p = gr[j];
            const T a = act == TANH       ? tanh_(p)
                        : act == RELU     ? (p < T(0) ? T(0) : p)
                        : act == IDENTITY ? p
                                          : sigm(p);
            gr[j] = a;
            const T h = khr ? khr[j] * hr[j] + (T(1) - khr[j]) * a : a;
            if (hdr) hdr[j] = h * rmr[j];
            hr[j] = yr[j] = h;
          }
        } else if (act == TANH) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) hr[j] = yr[j] = tanh_(gr[j]);
        } else if (act == RELU) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) hr[j] = yr[j] = gr[j] < T(0) ? T(0) : gr[j];  // relu(NaN) = NaN
        } else if (act == IDENTITY) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) hr[j] = yr[j] = gr[j];
        } else {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) hr[j] = yr[j] = sigm(gr[j]);
        }
      }
      RNNKIT_STEP_BARRIER(team);
    }
  });
}

// GRU, reset after: gates hold x-part (+ b_ih + b_hh for r, z); gh is a (B, 3H) scratch;
// ghn (T, B, H) saves W_hn h + b_hn for backward (may be null in inference).
// rec (B, 3H) scratch or null: with one thread owning every unit and W_hh^T panel-packed
// (W.panel), each step is ONE product h W_hh^T over all 3H columns into rec (one micro-kernel
// call per panel instead of three N = H products with their N-tails, and never a store into
// the cold gates rows), and the pointwise adds the gates' x-part; otherwise each thread's
// columns of r, z accumulate into the gates and W_hn h goes to gh. save: write r, z, n back
// into the gates (training; the inference forward only needs h).
// The end of a GRU forward step for one row's units [j0, j1), after the cell update wrote h~
// into yr: zoneout (h = k_h h_{t-1} + (1 - k_h) h~), the next step's product input h ⊙ m under
// recurrent dropout, and the state hr. Separate loops, not tests inside the update: a null test
// there compiled to masked loads (microcoded on Zen 3 when the pointer is null).
template <typename T>
inline void gru_row_end(T* yr, T* hr, const T* hpr, const T* khr, const T* rmr, T* hdr,
                        int64_t j0, int64_t j1) {
  if (khr) {
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) yr[j] = khr[j] * hpr[j] + (T(1) - khr[j]) * yr[j];
  }
  if (hdr) {
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) hdr[j] = yr[j] * rmr[j];
  }
  std::memcpy(hr + j0, yr + j0, (j1 - j0) * sizeof(T));
}

template <typename T>
void gru_after_fwd_loop(const Cfg& cf, T* gates, T* y, T* hst, T* gh, T* ghn, const T* h0,
                        const RecW<T>& W, const T* bhn, const Reg<T>& R, int nt,
                        T* rec = nullptr, bool save = true) {
  const int64_t H = cf.H, B = cf.B, GH = 3 * H;
  run_team(nt, [&](const int team, const int tid) {
    int64_t j0, j1;
    unit_range(H, team, tid, j0, j1);
    const bool one = rec && W.panel > 0 && j0 == 0 && j1 == H;
    // ONE: the recurrent parts are in rec (r, z, n blocks); SAVE: write the activations back;
    // BIAS: b_hn is added inside r (.) (bhn not null)
    auto rows = [&](auto one_c, auto save_c, auto bias_c, int64_t t, int64_t M, const T* hp,
                    T* g, T* hdn) {
      constexpr bool ONE = decltype(one_c)::value, SAVE = decltype(save_c)::value;
      constexpr bool BIAS = decltype(bias_c)::value;
      for (int64_t m = 0; m < M; ++m) {
        T* gr = g + m * GH;
        const T* rr = ONE ? rec + m * GH : nullptr;
        const T* ghr = ONE ? rec + m * GH + 2 * H : gh + m * H;
        const T* hpr = hp + m * H;
        T* hr = hst + m * H;
        T* yr = y + (t * B + m) * H;
        T* sv = ghn ? ghn + (t * B + m) * H : nullptr;
        const T* khr = R.row(R.kh, t, B, m, H);
        const T* rmr = R.rmask ? R.rmask + m * H : nullptr;
        T* hdr = hdn ? hdn + m * H : nullptr;
        // The cell update alone; what only some calls need (the saved W_hn h + b_hn, zoneout,
        // the next product's h ⊙ m) in loops of their own after it, as in lstm_fwd_loop. A test
        // of a pointer that may be null inside the vectorised loop becomes a masked load or
        // store through it (vmaskmovps), which on the AMD EPYC here is microcoded when the
        // pointer is null: perf put 55 % of this loop's time on one such load (GRU 200,1,64
        // inference, khr null).
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const T r = sigm(ONE ? gr[j] + rr[j] : gr[j]);
          const T z = sigm(ONE ? gr[H + j] + rr[H + j] : gr[H + j]);
          const T hn = ghr[j] + (BIAS ? bhn[j] : T(0));
          const T n = tanh_(gr[2 * H + j] + r * hn);
          const T h = (T(1) - z) * n + z * hpr[j];
          if (SAVE) {
            gr[j] = r;
            gr[H + j] = z;
            gr[2 * H + j] = n;
          }
          yr[j] = h;
        }
        if (sv) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) sv[j] = ghr[j] + (BIAS ? bhn[j] : T(0));
        }
        gru_row_end(yr, hr, hpr, khr, rmr, hdr, j0, j1);
      }
    };
    // rows with its flags as compile-time constants
    auto rows_of = [&](auto one_c, int64_t t, int64_t M, const T* hp, T* g, T* hdn) {
      const std::true_type yes;
      const std::false_type no;
      if (save && bhn) rows(one_c, yes, yes, t, M, hp, g, hdn);
      else if (save) rows(one_c, yes, no, t, M, hp, g, hdn);
      else if (bhn) rows(one_c, no, yes, t, M, hp, g, hdn);
      else rows(one_c, no, no, t, M, hp, g, hdn);
    };
    for (int64_t t = 0; t < cf.T; ++t) {
      const int64_t M = cf.bs[t];
      const T* hp = t == 0 ? h0 : y + (t - 1) * B * H;
      const T* hin = R.gemm_input(t, B * H, hp);
      T* hdn = R.next_input(t, B * H);
      T* g = gates + t * B * GH;
      if (one) {
        W.mm_panels(M, GH, H, hin, H, rec, GH, g, M * GH * sizeof(T));
        rows_of(std::true_type{}, t, M, hp, g, hdn);
      } else {
        if (j1 > j0) {
          for (int64_t b = 0; b < 2; ++b)
            W.mm(M, j1 - j0, H, hin, H, b * H + j0, g + b * H + j0, GH, true);
          W.mm(M, j1 - j0, H, hin, H, 2 * H + j0, gh + j0, H, false);
        }
        rows_of(std::false_type{}, t, M, hp, g, hdn);
      }
      RNNKIT_STEP_BARRIER(team);
    }
  });
}

// GRU, reset before: all biases folded into gates; rh (T, B, H) (or (B, H) in inference) = r h.
// rec (B, 3H) scratch or null: as gru_after_fwd_loop's, with W_hh^T packed as two panel-packed
// parts (pack_recurrent): the r, z columns (2H) and the n columns (H), one product each per
// step into rec; z waits in rec between the two halves of the step. save: as there.
template <typename T>
void gru_before_fwd_loop(const Cfg& cf, T* gates, T* y, T* hst, T* rh, bool rh_all,
                         const T* h0, const RecW<T>& W, const Reg<T>& R, int nt,
                         T* rec = nullptr, bool save = true) {
  const int64_t H = cf.H, B = cf.B, GH = 3 * H;
  run_team(nt, [&](const int team, const int tid) {
    int64_t j0, j1;
    unit_range(H, team, tid, j0, j1);
    const bool one = rec && W.panel > 0 && j0 == 0 && j1 == H;
    RecW<T> Wn = W;  // the n part of the packed W_hh^T (one only)
    if (one) Wn.p = W.p + 2 * H * H;
    for (int64_t t = 0; t < cf.T; ++t) {
      const int64_t M = cf.bs[t];
      const T* hp = t == 0 ? h0 : y + (t - 1) * B * H;
      T* g = gates + t * B * GH;
      T* rht = rh_all ? rh + t * B * H : rh;
      const T* hin = R.gemm_input(t, B * H, hp);
      T* hdn = R.next_input(t, B * H);
      if (one) W.mm_panels(M, 2 * H, H, hin, H, rec, GH, g, M * GH * sizeof(T));
      else if (j1 > j0)
        for (int64_t b = 0; b < 2; ++b)
          W.mm(M, j1 - j0, H, hin, H, b * H + j0, g + b * H + j0, GH, true);
      for (int64_t m = 0; m < M; ++m) {
        T* gr = g + m * GH;
        const T* hpr = hin + m * H;  // r ⊙ (h ⊙ m) under recurrent dropout
        T* rr = rht + m * H;
        if (one) {
          T* ar = rec + m * GH;
          // (save a compile-time constant: a runtime test in the loop became masked stores)
          auto gates_rz = [&](auto save_c) {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) {
              const T r = sigm(gr[j] + ar[j]), z = sigm(gr[H + j] + ar[H + j]);
              if (decltype(save_c)::value) {
                gr[j] = r;
                gr[H + j] = z;
              }
              ar[H + j] = z;
              rr[j] = r * hpr[j];
            }
          };
          if (save) gates_rz(std::true_type{});
          else gates_rz(std::false_type{});
          continue;
        }
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const T r = sigm(gr[j]);
          gr[j] = r;
          gr[H + j] = sigm(gr[H + j]);
          rr[j] = r * hpr[j];
        }
      }
      RNNKIT_STEP_BARRIER(team);
      if (one) Wn.mm_panels(M, H, H, rht, H, rec + 2 * H, GH);
      else if (j1 > j0)
        W.mm(M, j1 - j0, H, rht, H, 2 * H + j0, g + 2 * H + j0, GH, true);
      for (int64_t m = 0; m < M; ++m) {
        T* gr = g + m * GH;
        const T* ar = one ? rec + m * GH : gr;  // where z and the n product are
        const T* hpr = hp + m * H;
        T* hr = hst + m * H;
        T* yr = y + (t * B + m) * H;
        const T* khr = R.row(R.kh, t, B, m, H);
        const T* rmr = R.rmask ? R.rmask + m * H : nullptr;
        T* hdr = hdn ? hdn + m * H : nullptr;
        // one: the n pre-activation is the gates' x-part + rec's product; else the gates hold it.
        // The cell update alone, zoneout and h ⊙ m after it in loops of their own (see
        // gru_after_fwd_loop: a null-pointer test in the vectorised loop is a masked load).
        auto update = [&](auto one_c, auto save_c) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T z = ar[H + j];
            const T n = tanh_(decltype(one_c)::value ? gr[2 * H + j] + ar[2 * H + j]
                                                     : gr[2 * H + j]);
            if (decltype(save_c)::value) gr[2 * H + j] = n;
            yr[j] = (T(1) - z) * n + z * hpr[j];
          }
        };
        const std::true_type yes;
        const std::false_type no;
        if (one && save) update(yes, yes);
        else if (one) update(yes, no);
        else if (save) update(no, yes);
        else update(no, no);
        gru_row_end(yr, hr, hpr, khr, rmr, hdr, j0, j1);
      }
      RNNKIT_STEP_BARRIER(team);
    }
  });
}

// After a step's backward GEMM wrote (d_pre W_hh) into dh (B, H) for this thread's units:
// dh_{t-1} = (d_pre W_hh) ⊙ m + direct, where direct (may be null) is the part of the gradient
// that reaches h_{t-1} outside the product (zoneout's k_h dh, the GRU's z dh).
template <typename T>
void finish_dh(int64_t M, int64_t H, int64_t j0, int64_t j1, const T* rmask, const T* direct,
               T* dh) {
  for (int64_t m = 0; m < M; ++m) {
    T* d = dh + m * H;
    const T* rm = rmask ? rmask + m * H : nullptr;
    const T* dr = direct ? direct + m * H : nullptr;
    // (one loop per case: a test inside a vectorised loop costs more than the loop's work)
    if (rm && dr) {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) d[j] = d[j] * rm[j] + dr[j];
    } else if (rm) {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) d[j] = d[j] * rm[j];
    } else if (dr) {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) d[j] = d[j] + dr[j];
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Backward time loops. dg: (T, B, G*H) pre-activation gradients (rows >= bs[t] must be zero on
// entry). dhs / dcs: (B, H) running state gradients, in place.
// ----------------------------------------------------------------------------------------------
// REG: zoneout / recurrent dropout; cs holds the zoned cells (the next step's c_{t-1}) and
// R.ctil the cells c~ before zoneout; zh (B, H) scratch for k_h dh.
template <typename T, bool PEEP, bool COUPLED, bool REG>
void lstm_bwd_loop(const Cfg& cf, const T* acts, const T* cs, const T* c0, const T* gy, T* dg,
                   T* dhs, T* dcs, const BwdW<T>& Whh, const T* pw, T* dpw, const Reg<T>& R,
                   T* zh, int nt) {
  const int64_t H = cf.H, B = cf.B, G = cf.G, GH = G * H;
#pragma omp parallel num_threads(nt)
  {
    int64_t j0, j1;
    unit_range(H, omp_get_num_threads(), omp_get_thread_num(), j0, j1);
    const T* wci = PEEP ? pw : nullptr;
    const T* wcf = PEEP && !COUPLED ? pw + H : nullptr;
    const T* wco = PEEP ? pw + (COUPLED ? 1 : 2) * H : nullptr;
    T* dwci = PEEP ? dpw : nullptr;
    T* dwcf = PEEP && !COUPLED ? dpw + H : nullptr;
    T* dwco = PEEP ? dpw + (COUPLED ? 1 : 2) * H : nullptr;
    // REG: a row's dh and dc split by the zoneout masks (see the pre-pass below)
    std::vector<T> dh_buf(REG ? H : 0), dc_buf(REG ? H : 0), dcz_buf(REG ? H : 0);
    for (int64_t t = cf.T - 1; t >= 0; --t) {
      const int64_t M = cf.bs[t];
      const T* a = acts + t * B * GH;
      T* d = dg + t * B * GH;
      const T* cp_t = t == 0 ? c0 : cs + (t - 1) * B * H;
      for (int64_t m = 0; m < M; ++m) {
        const T* ar = a + m * GH;
        T* dr = d + m * GH;
        const T* cr = (REG && R.kc ? R.ctil : cs) + (t * B + m) * H;
        const T* cpr = cp_t + m * H;
        const T* gyr = gy + (t * B + m) * H;
        T* dhr = dhs + m * H;
        T* dcr = dcs + m * H;
        const T* khr = REG ? R.row(R.kh, t, B, m, H) : nullptr;
        const T* kcr = REG ? R.row(R.kc, t, B, m, H) : nullptr;
        T* zhr = REG && khr ? zh + m * H : nullptr;
        // REG: the zoneout splits first, in loops of their own (as in lstm_fwd_loop): dh_in =
        // (dh + gy) (1 - k_h) with k_h (dh + gy) to h_{t-1} (zhr), dc_in = dc (1 - k_c) with
        // dcz = dc k_c to c_{t-1} (added after the main loop)
        const T* dh_in = REG ? dh_buf.data() : nullptr;
        const T* dc_in = REG && kcr ? dc_buf.data() : dcr;
        if constexpr (REG) {
          T* dhb = dh_buf.data();
          if (khr) {
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) {
              const T dh = dhr[j] + gyr[j];
              zhr[j] = dh * khr[j];
              dhb[j] = dh * (T(1) - khr[j]);
            }
          } else {
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) dhb[j] = dhr[j] + gyr[j];
          }
          if (kcr) {
            T* dcb = dc_buf.data();
            T* dcz = dcz_buf.data();
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) {
              dcz[j] = dcr[j] * kcr[j];
              dcb[j] = dcr[j] * (T(1) - kcr[j]);
            }
          }
        }
        if (!COUPLED) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T i = ar[j], f = ar[H + j], gg = ar[2 * H + j], o = ar[3 * H + j];
            const T c = cr[j], cp = cpr[j];
            const T dh = REG ? dh_in[j] : dhr[j] + gyr[j], dcn = dc_in[j];
            const T tc = tanh_(c);
            const T dpo = dh * tc * o * (T(1) - o);
            T dc = dcn + dh * o * (T(1) - tc * tc);
            if (PEEP) dc += dpo * wco[j];
            const T dpi = dc * gg * i * (T(1) - i);
            const T dpf = dc * cp * f * (T(1) - f);
            const T dpg = dc * i * (T(1) - gg * gg);
            T dcp = dc * f;
            if (PEEP) {
              dcp += dpi * wci[j] + dpf * wcf[j];
              dwci[j] += dpi * cp;
              dwcf[j] += dpf * cp;
              dwco[j] += dpo * c;
            }
            dr[j] = dpi;
            dr[H + j] = dpf;
            dr[2 * H + j] = dpg;
            dr[3 * H + j] = dpo;
            dcr[j] = dcp;
          }
        } else {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T i = ar[j], gg = ar[H + j], o = ar[2 * H + j];
            const T c = cr[j], cp = cpr[j];
            const T dh = REG ? dh_in[j] : dhr[j] + gyr[j], dcn = dc_in[j];
            const T tc = tanh_(c);
            const T dpo = dh * tc * o * (T(1) - o);
            T dc = dcn + dh * o * (T(1) - tc * tc);
            if (PEEP) dc += dpo * wco[j];
            // dc * gg - dc * cp, not dc * (gg - cp): the two products autograd forms (i g and
            // (1 - i) c_prev), so that an infinite c_prev gives the same NaN or inf
            const T dpi = (dc * gg - dc * cp) * i * (T(1) - i);
            const T dpg = dc * i * (T(1) - gg * gg);
            T dcp = dc * (T(1) - i);
            if (PEEP) {
              dcp += dpi * wci[j];
              dwci[j] += dpi * cp;
              dwco[j] += dpo * c;
            }
            dr[j] = dpi;
            dr[H + j] = dpg;
            dr[2 * H + j] = dpo;
            dcr[j] = dcp;
          }
        }
        if constexpr (REG) {
          if (kcr) {  // dc_{t-1} = (the cell's part) + k_c dc
            const T* dcz = dcz_buf.data();
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) dcr[j] = dcr[j] + dcz[j];
          }
        }
      }
      RNNKIT_STEP_BARRIER(omp_get_num_threads());
      if (j1 > j0) Whh.mm(M, j1 - j0, H, GH, d, GH, 0, j0, dhs + j0, H, false);
      if (REG && j1 > j0) finish_dh(M, H, j0, j1, R.rmask, R.kh ? zh : nullptr, dhs);
    }
  }
}

// With R.kh, y is the saved h~ = f(pre) (not the zoned output) and zh a (B, H) scratch.
template <typename T>
void rnn_bwd_loop(const Cfg& cf, const T* y, const T* gy, T* dg, T* dhs, const BwdW<T>& Whh,
                  const Reg<T>& R, T* zh, int nt) {
  const bool reg = R.any();
  const int64_t H = cf.H, B = cf.B;
  const int act = cf.act;
#pragma omp parallel num_threads(nt)
  {
    int64_t j0, j1;
    unit_range(H, omp_get_num_threads(), omp_get_thread_num(), j0, j1);
    for (int64_t t = cf.T - 1; t >= 0; --t) {
      const int64_t M = cf.bs[t];
      T* d = dg + t * B * H;
      for (int64_t m = 0; m < M; ++m) {
        const T* yr = y + (t * B + m) * H;
        const T* gyr = gy + (t * B + m) * H;
        const T* dhr = dhs + m * H;
        T* dr = d + m * H;
        if (reg && R.kh) {
          // dh~ = (1 - k_h) dh, and k_h dh goes straight to h_{t-1}
          const T* khr = R.row(R.kh, t, B, m, H);
          T* zhr = zh + m * H;
          for (int64_t j = j0; j < j1; ++j) {
            const T dh = dhr[j] + gyr[j];
            zhr[j] = dh * khr[j];
            const T dn = dh * (T(1) - khr[j]);
            dr[j] = act == TANH       ? dn * (T(1) - yr[j] * yr[j])
                    : act == RELU     ? (yr[j] <= T(0) ? T(0) : dn)
                    : act == IDENTITY ? dn
                                      : dn * yr[j] * (T(1) - yr[j]);
          }
        } else if (act == TANH) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) dr[j] = (dhr[j] + gyr[j]) * (T(1) - yr[j] * yr[j]);
        } else if (act == RELU) {
          // torch's threshold_backward: the gradient passes where the output is NaN, and is an
          // exact 0 (not 0 * NaN) where the output is <= 0
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) dr[j] = yr[j] <= T(0) ? T(0) : dhr[j] + gyr[j];
        } else if (act == IDENTITY) {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) dr[j] = dhr[j] + gyr[j];
        } else {
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) dr[j] = (dhr[j] + gyr[j]) * yr[j] * (T(1) - yr[j]);
        }
      }
      RNNKIT_STEP_BARRIER(omp_get_num_threads());
      if (j1 > j0) Whh.mm(M, j1 - j0, H, H, d, H, 0, j0, dhs + j0, H, false);
      if (reg && j1 > j0) finish_dh(M, H, j0, j1, R.rmask, R.kh ? zh : nullptr, dhs);
    }
  }
}

// GRU reset after. dg: d(x-part) (T,B,3H); dgh: d(W_hh h + b_hh) (T,B,3H).
// REG: sc (B, H) scratch holds the direct gradient (z dh, + k_h dh) while the GEMM's product is
// masked.
template <typename T>
void gru_after_bwd_loop(const Cfg& cf, const T* acts, const T* ghn, const T* y, const T* h0,
                        const T* gy, T* dg, T* dgh, T* dhs, const BwdW<T>& Whh, const Reg<T>& R,
                        T* sc, int nt) {
  const bool reg = R.any();
  const int64_t H = cf.H, B = cf.B, GH = 3 * H;
#pragma omp parallel num_threads(nt)
  {
    int64_t j0, j1;
    unit_range(H, omp_get_num_threads(), omp_get_thread_num(), j0, j1);
    for (int64_t t = cf.T - 1; t >= 0; --t) {
      const int64_t M = cf.bs[t];
      const T* a = acts + t * B * GH;
      const T* hp = t == 0 ? h0 : y + (t - 1) * B * H;
      T* d = dg + t * B * GH;
      T* dh2 = dgh + t * B * GH;
      for (int64_t m = 0; m < M; ++m) {
        const T* ar = a + m * GH;
        const T* hnr = ghn + (t * B + m) * H;
        const T* hpr = hp + m * H;
        const T* gyr = gy + (t * B + m) * H;
        T* dr = d + m * GH;
        T* dr2 = dh2 + m * GH;
        T* dhr = dhs + m * H;
        const T* khr = R.row(R.kh, t, B, m, H);
        T* direct = reg ? sc + m * H : dhr;  // where dh z (+ k_h dh) goes
        // ZONE (khr not null) a compile-time constant: tested inside the vectorised loop, a
        // null khr became a masked load through it (vmaskmovps), microcoded on Zen 3 — perf put
        // 94 % of this loop's samples (14 % of a 100,32,256 forward+backward) on it.
        auto update = [&](auto zone_c) {
          constexpr bool ZONE = decltype(zone_c)::value;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T r = ar[j], z = ar[H + j], n = ar[2 * H + j];
            T dh = dhr[j] + gyr[j], dz = T(0);
            if (ZONE) {
              dz = dh * khr[j];
              dh = dh * (T(1) - khr[j]);
            }
            const T dpn = dh * (T(1) - z) * (T(1) - n * n);
            // dh h_prev - dh n as autograd forms it (dh * (h_prev - n) differs where dh is
            // infinite and h_prev is 0)
            const T dpz = (dh * hpr[j] - dh * n) * z * (T(1) - z);
            const T dpr = dpn * hnr[j] * r * (T(1) - r);
            dr[j] = dpr;
            dr[H + j] = dpz;
            dr[2 * H + j] = dpn;
            dr2[j] = dpr;
            dr2[H + j] = dpz;
            dr2[2 * H + j] = dpn * r;
            direct[j] = ZONE ? dh * z + dz : dh * z;
          }
        };
        if (khr) update(std::true_type{});
        else update(std::false_type{});
      }
      RNNKIT_STEP_BARRIER(omp_get_num_threads());
      if (j1 > j0) Whh.mm(M, j1 - j0, H, GH, dh2, GH, 0, j0, dhs + j0, H, !reg);
      if (reg && j1 > j0) finish_dh(M, H, j0, j1, R.rmask, sc, dhs);
    }
  }
}

// GRU reset before. dg: (T,B,3H) pre-activation grads; drh: (B,H) scratch.
// REG: sc (B, H) scratch for the gradient of h ⊙ m (masked once the GEMM has added to it).
template <typename T>
void gru_before_bwd_loop(const Cfg& cf, const T* acts, const T* y, const T* h0, const T* gy,
                         T* dg, T* drh, T* dhs, const BwdW<T>& Whh, const Reg<T>& R, T* sc,
                         int nt) {
  const bool reg = R.any();
  const int64_t H = cf.H, B = cf.B, GH = 3 * H;
#pragma omp parallel num_threads(nt)
  {
    int64_t j0, j1;
    unit_range(H, omp_get_num_threads(), omp_get_thread_num(), j0, j1);
    for (int64_t t = cf.T - 1; t >= 0; --t) {
      const int64_t M = cf.bs[t];
      const T* a = acts + t * B * GH;
      const T* hp = t == 0 ? h0 : y + (t - 1) * B * H;
      T* d = dg + t * B * GH;
      for (int64_t m = 0; m < M; ++m) {
        const T* ar = a + m * GH;
        const T* hpr = hp + m * H;
        const T* gyr = gy + (t * B + m) * H;
        T* dr = d + m * GH;
        T* dhr = dhs + m * H;
        const T* khr = R.row(R.kh, t, B, m, H);
        // (ZONE a compile-time constant: see gru_after_bwd_loop)
        auto update = [&](auto zone_c) {
          constexpr bool ZONE = decltype(zone_c)::value;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T z = ar[H + j], n = ar[2 * H + j];
            T dh = dhr[j] + gyr[j], dz = T(0);
            if (ZONE) {
              dz = dh * khr[j];
              dh = dh * (T(1) - khr[j]);
            }
            dr[H + j] = (dh * hpr[j] - dh * n) * z * (T(1) - z);  // (as in reset-after)
            dr[2 * H + j] = dh * (T(1) - z) * (T(1) - n * n);
            dhr[j] = ZONE ? dh * z + dz : dh * z;
          }
        };
        if (khr) update(std::true_type{});
        else update(std::false_type{});
      }
      RNNKIT_STEP_BARRIER(omp_get_num_threads());
      if (j1 > j0) Whh.mm(M, j1 - j0, H, H, d + 2 * H, GH, 2 * H, j0, drh + j0, H, false);
      for (int64_t m = 0; m < M; ++m) {
        const T* ar = a + m * GH;
        const T* hpr = hp + m * H;
        const T* drr = drh + m * H;
        const T* rmr = R.rmask ? R.rmask + m * H : nullptr;
        T* dr = d + m * GH;
        T* dhr = reg ? sc + m * H : dhs + m * H;
        // (MASK: rmr not null, REG: reg; compile-time constants, see gru_after_bwd_loop)
        auto reset = [&](auto mask_c, auto reg_c) {
          constexpr bool MASK = decltype(mask_c)::value, REG = decltype(reg_c)::value;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) {
            const T r = ar[j];
            const T hin = MASK ? hpr[j] * rmr[j] : hpr[j];  // what W_hn's r ⊙ h multiplied
            dr[j] = drr[j] * hin * r * (T(1) - r);
            if (REG) dhr[j] = drr[j] * r;
            else dhr[j] += drr[j] * r;
          }
        };
        const std::true_type yes;
        const std::false_type no;
        if (rmr) reset(yes, yes);  // (a mask implies reg)
        else if (reg) reset(no, yes);
        else reset(no, no);
      }
      RNNKIT_STEP_BARRIER(omp_get_num_threads());
      if (j1 > j0)
        Whh.mm(M, j1 - j0, H, 2 * H, d, GH, 0, j0, (reg ? sc : dhs) + j0, H, true);
      if (reg && j1 > j0) {
        finish_dh(M, H, j0, j1, R.rmask, dhs, sc);  // sc = (product) ⊙ m + (z dh + k_h dh)
        for (int64_t m = 0; m < M; ++m)
          std::memcpy(dhs + m * H + j0, sc + m * H + j0, (j1 - j0) * sizeof(T));
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Entry points
// ----------------------------------------------------------------------------------------------
// The config of a variant over T steps of B rows (every row to the end: bs = T x B).
Cfg variant_cfg(int64_t kind, int64_t act, bool peep, bool coupled, bool before, int64_t T,
                int64_t B, int64_t I, int64_t H) {
  // (every operator's variant comes from Python as integers: one outside the enums would run
  // some loop on a wrong gate count)
  TORCH_CHECK(kind >= RNN && kind <= GRU && act >= TANH && act <= IDENTITY,
              "rnnkit_fused: unknown variant (kind ", kind, ", activation ", act, ")");
  Cfg c;
  c.kind = static_cast<int>(kind);
  c.act = static_cast<int>(act);
  c.peep = peep;
  c.coupled = coupled;
  c.before = before;
  c.T = T;
  c.B = B;
  c.I = I;
  c.H = H;
  c.G = gates_of(c);
  c.bs.assign(T, B);
  return c;
}

Cfg make_cfg(int64_t kind, int64_t act, bool peep, bool coupled, bool before, const at::Tensor& x,
             int64_t H, const std::vector<int64_t>& batch_sizes) {
  Cfg c = variant_cfg(kind, act, peep, coupled, before, x.size(0), x.size(1), x.size(2), H);
  if (!batch_sizes.empty()) {
    TORCH_CHECK(static_cast<int64_t>(batch_sizes.size()) == c.T, "batch_sizes must have T entries");
    c.bs = batch_sizes;
    for (auto b : c.bs) TORCH_CHECK(b >= 0 && b <= c.B, "batch_sizes out of range");
  }
  return c;
}

bool partial(const Cfg& c) {
  for (auto b : c.bs)
    if (b != c.B) return true;
  return false;
}

// Threads for the time loop. nthreads > 0 forces a count (tests); otherwise torch's thread count,
// or one thread when the per-step work is too small to amortise a barrier.
int pick_threads(const Cfg& c, int64_t nthreads) {
  if (nthreads > 0) return static_cast<int>(nthreads);
  const double flops = 2.0 * static_cast<double>(c.B) * c.H * c.H * c.G;
  if (flops < 2.0e5) return 1;
  return std::max(1, at::get_num_threads());
}

// How nt > 1 loop threads share a time loop (set_thread_split: tests and benchmarks force one):
// HIDDEN, each thread owns a slice of the hidden units of every row and the threads meet at a
// barrier every step (the loops' own `#pragma omp parallel`); BATCH, each thread runs the whole
// one-thread loop (every unit, the panel-packed W_hh^T) on a block of the batch rows, which are
// independent, and the threads meet once, at the end of the loop. The whole-sequence GEMMs
// (input projection, dx, dW_ih, dW_hh) stay multi-threaded GEMMs over all T*B rows either way.
enum class Split { AUTO, HIDDEN, BATCH };
Split g_split = Split::AUTO;

// AUTO splits the batch when every thread gets at least this many rows. Measured at 1 thread
// (what a thread of the split runs; process CPU time, min of 9, load average 7.5-8, shared core:
// benchmarks/fused_kernels.py --threads 1 --clock cpu --stat min --no-native), the time of a
// layer at B/2 rows over half its time at B, forward+backward, Elman tanh / peephole LSTM /
// GRU: 100,·,256: B = 32 1.05 / 1.05 / 0.99; B = 16 1.01 / 1.03 / 1.07; B = 8 1.13 / 1.16 /
// 1.19; 35,20,200 1.25 / 1.12 / 1.21; 50,·,512: B = 64 1.12 / 0.95 / 1.13; B = 32 1.10 / 1.22 /
// 1.01 (B / 2 = 8-32 rows per thread: 0.95-1.25; 4 rows: 1.13-1.19). A thread of the split
// thus does 0.48-0.63 of the one-thread work, no barrier per step; for comparison the hidden
// split at 2 threads reached 57-70 % of the peak at 100,32,256 where one thread reaches
// 76-90 %. Not yet measured: both splits at 2 threads on two quiet cores
// (fused_kernels.py --threads 2 --split compare), which should set this number.
constexpr int64_t kBatchSplitRows = 8;

// Threads of the batch split of a loop that nt_loop threads run: 0 = the hidden split (or one
// thread). A forced BATCH gives each thread one row at least (B = 1: one thread, no split).
int batch_split_threads(const Cfg& c, int nt_loop) {
  if (nt_loop < 2 || g_split == Split::HIDDEN) return 0;
  const int64_t per = g_split == Split::BATCH ? 1 : kBatchSplitRows;
  const int nt = static_cast<int>(std::min<int64_t>(nt_loop, c.B / per));
  return nt >= 2 ? nt : 0;
}

// The batch split's row blocks: bounds[k] .. bounds[k + 1] for thread k, contiguous (the
// active rows of a step are a prefix: bs[t]) and balanced by the steps the rows run (a row's
// length; rows are sorted longest first), each at least one row.
std::vector<int64_t> row_blocks(const Cfg& c, int nt) {
  std::vector<int64_t> length(c.B + 1, 0);  // length[m] = #{t : bs[t] > m}
  for (const int64_t b : c.bs) length[b] -= 1;
  int64_t run = c.T, total = 0;
  for (int64_t m = 0; m < c.B; ++m) {
    run += length[m];
    length[m] = run;
    total += run;
  }
  std::vector<int64_t> bounds(nt + 1, c.B);
  bounds[0] = 0;
  int64_t m = 0;
  double done = 0;
  for (int k = 1; k < nt; ++k) {
    // take rows while a row's midpoint is at or below this thread's share of the steps (with
    // no steps at all: equal numbers of rows)
    const double target = total > 0 ? static_cast<double>(total) * k / nt
                                     : static_cast<double>(c.B) * k / nt;
    while (m < c.B - (nt - k)) {
      const double w = total > 0 ? static_cast<double>(length[m]) : 1.0;
      if (m >= bounds[k - 1] + 1 && done + w / 2 > target) break;
      done += w;
      ++m;
    }
    bounds[k] = m;
  }
  return bounds;
}

// Runs loop(c, m0, nt, k) once with every row (m0 = 0, k = 0) on nt_loop threads (the hidden
// split), or, with nt_rows >= 2, on nt_rows threads at once, thread k with one thread on row
// block k: c is cf with bs counting the block's rows (B stays the row stride of a step), m0 the
// block's first row, to which the loop moves every (., B, .) pointer.
template <typename Loop>
void run_time_loop(const Cfg& cf, int nt_loop, int nt_rows, Loop&& loop) {
  if (nt_rows < 2) return loop(cf, int64_t(0), nt_loop, 0);
  const std::vector<int64_t> bounds = row_blocks(cf, nt_rows);
#pragma omp parallel for num_threads(nt_rows) schedule(static, 1)
  for (int k = 0; k < nt_rows; ++k) {
    const int64_t m0 = bounds[k], rows = bounds[k + 1] - m0;
    Cfg c = cf;
    for (int64_t t = 0; t < c.T; ++t) c.bs[t] = std::clamp<int64_t>(cf.bs[t] - m0, 0, rows);
    loop(c, m0, 1, k);
  }
}

// W_hh^T as the one-thread time loops read it (RecW::panel): panel-packed (pack_panels); the
// reset-before GRU's r, z rows and its n rows packed apart (its step has two products).
// The panel width of T's packed W_hh^T: g_rec_panel (the float32 GEMM's) for float32; float64
// runs BLAS, for which gemm_own's 16-column panels would mean one dgemm call per 16 columns.
template <typename T>
int64_t rec_panel() {
  return std::is_same_v<T, float> ? g_rec_panel : int64_t(128);
}

template <typename T>
at::Tensor pack_recurrent(const at::Tensor& w_hh, const Cfg& cf) {
  const int64_t panel = rec_panel<T>();
  if (cf.kind == GRU && cf.before) {
    const int64_t H = cf.H;
    return at::cat({pack_panels<T>(w_hh.narrow(0, 0, 2 * H), panel),
                    pack_panels<T>(w_hh.narrow(0, 2 * H, H), panel)});
  }
  return pack_panels<T>(w_hh, panel);
}

// Whether T's input projection reads W_ih^T in kOwnCols-column panels (pack_input,
// pgemm_panels): float32 under gemm_own. Elsewhere (AVX-512's brgemm, BLAS, float64) W_ih^T
// stays one (I, G*H) block, as before.
template <typename T>
bool input_panels() {
#ifdef RNNKIT_OWN_GEMM
  return std::is_same_v<T, float> && g_gemm == Gemm::OWN;
#else
  return false;
#endif
}

// W_ih (G*H, I) -> the W^T the input projection reads: in panels (input_panels) or one block;
// (I, G*H)-shaped either way (pack_weights' result has one shape whichever GEMM runs).
template <typename T>
at::Tensor pack_input(const at::Tensor& w_ih) {
#ifdef RNNKIT_OWN_GEMM
  if (input_panels<T>())
    return pack_panels<T>(w_ih, kOwnCols).view({w_ih.size(1), w_ih.size(0)});
#endif
  return w_ih.t().contiguous();
}

// x (M, I) W_ih^T (+ bias) into C (M, G*H) with W^T from pack_input.
template <typename T>
void input_projection(int64_t M, int64_t N, int64_t K, const T* x, const T* wt, T* C,
                      const T* bias, int nt) {
#ifdef RNNKIT_OWN_GEMM
  if (input_panels<T>()) return pgemm_panels<T>(M, N, K, x, K, wt, kOwnCols, C, N, bias, nt);
#endif
  pgemm<T>(M, N, K, x, K, wt, N, C, N, false, bias, nt);
}

// Weights packed ahead of the call by pack_weights, kept by the caller while the weights do not
// change (the inference plan): pack_input(W_ih) and pack_recurrent(W_hh) (used with one loop
// thread only; undefined: pack per call). Like the panel width of W_hh, the layout of W_ih^T
// follows the GEMM in use when packed (set_gemm: pack again after changing it; gemm_layout
// says which layout that is).
struct Prepacked {
  at::Tensor wih_t, whh_rec;
};

// The forward's (T, B, G*H) gates buffer. Training returns it (the activations); inference only
// reads it within the call, so there it is one block of memory per thread reused from call to
// call (up to kGatesCacheBytes; larger ones are allocated per call and freed), seen through a
// tensor made per call (from_blob: a tensor kept from a call under torch.inference_mode would be
// an inference tensor, which a later call outside it may not write). A fresh buffer is new
// memory from the allocator on every call — 2.2 MiB at 35,20,200, mmap'ed or handed back to the
// system by glibc's heap trimming depending on the process's allocation history: measured 1-270
// page faults per 6-9 ms LSTM forward in three runs of the same script (onnxruntime, the
// comparison, keeps its buffers in an arena).
constexpr size_t kGatesCacheBytes = size_t(64) << 20;

struct ScratchBlock {
  void* p = nullptr;
  size_t bytes = 0;
  ScratchBlock() = default;
  ScratchBlock(const ScratchBlock&) = delete;
  ScratchBlock& operator=(const ScratchBlock&) = delete;
  ~ScratchBlock() { std::free(p); }
};

at::Tensor gates_buffer(int64_t numel, bool training, const at::TensorOptions& opts) {
  const size_t bytes =
      static_cast<size_t>(numel) * c10::elementSize(opts.dtype().toScalarType());
  if (training || bytes > kGatesCacheBytes) return at::empty({numel}, opts);
  static thread_local ScratchBlock block;
  if (block.bytes < bytes) {
    std::free(block.p);
    const size_t size = (bytes + 63) / 64 * 64;
    block.p = std::aligned_alloc(64, size);
    block.bytes = block.p ? size : 0;
    if (!block.p) return at::empty({numel}, opts);
  }
  return at::from_blob(block.p, {numel}, opts);
}

template <typename T>
std::vector<at::Tensor> forward_impl(const Cfg& cf, const at::Tensor& x, const at::Tensor& h0,
                                     const at::Tensor& c0, const at::Tensor& w_ih,
                                     const at::Tensor& w_hh, const at::Tensor& b_ih,
                                     const at::Tensor& b_hh, const at::Tensor& pw,
                                     const at::Tensor& rmask, const at::Tensor& kh,
                                     const at::Tensor& kc, bool training, int nt_loop,
                                     int nt_all, bool bf16 = false,
                                     const at::Tensor& gemv_hh = at::Tensor(),
                                     const at::Tensor& gemv_ih = at::Tensor(),
                                     const Prepacked* pre = nullptr) {
  const int64_t T_ = cf.T, B = cf.B, I = cf.I, H = cf.H, G = cf.G, GH = G * H;
  auto opts = x.options();
  const bool part = partial(cf);
  const int nt_rows = batch_split_threads(cf, nt_loop);
  Reg<T> R;
  at::Tensor hd, ctil;
  if (rmask.defined()) {
    hd = at::empty({2, B, H}, opts);
    hd[0].copy_(h0 * rmask);  // step 0's GEMM input; later steps write the other half
    R.rmask = rmask.data_ptr<T>();
    R.hd = hd.data_ptr<T>();
  }
  if (kh.defined()) R.kh = kh.data_ptr<T>();
  if (kc.defined()) {
    R.kc = kc.data_ptr<T>();
    if (training) {
      ctil = part ? at::zeros({T_, B, H}, opts) : at::empty({T_, B, H}, opts);
      R.ctil = ctil.data_ptr<T>();
    }
  }
  // Folded bias for the input projection: b_ih + b_hh (the reset-after GRU keeps b_hn for
  // inside r (.), so its n rows are b_ih alone), in plain memory. As ATen ops (a clone and an
  // add_: the same sums) they were two dispatcher calls per forward, which after a long call
  // has evicted the caches cost ~10-20 us each (an unsqueeze measured 21 us cold, 1 thread,
  // loaded): the lean inference path's whole remaining overhead per call is of that order.
  const bool has_bias = b_ih.defined();
  std::vector<T> folded_bias(has_bias ? GH : 0);
  if (has_bias) {
    const T* bi = b_ih.data_ptr<T>();
    const T* bh = b_hh.data_ptr<T>();
    const int64_t folded = cf.kind == GRU && !cf.before ? 2 * H : GH;
    for (int64_t n = 0; n < GH; ++n) folded_bias[n] = n < folded ? bi[n] + bh[n] : bi[n];
  }
  const T* bias = has_bias ? folded_bias.data() : nullptr;
  at::Tensor gates = gates_buffer(T_ * B * GH, training, opts).view({T_, B, GH});
  // Few rows (streaming steps) or batch 1: use the weights as stored through BLAS. Transposed
  // copies for the brgemm micro-kernel would cost more than the GEMMs themselves, and at batch 1
  // every recurrent product is a GEMV, which gains nothing from them (a strided transposition
  // of a 600 x 200 weight takes ~110 us, ten steps' worth).
  const bool have_blas = std::is_same_v<T, float> ? g_sgemm != nullptr : g_dgemm != nullptr;
  const bool as_stored = !bf16 && have_blas && (T_ * B < kAsStoredRows || B == 1);
  at::Tensor WhhT;
  RecW<T> W{nullptr, 0, as_stored};
  if (as_stored) {
    if (has_bias) {
      T* g = gates.data_ptr<T>();
      for (int64_t r = 0; r < T_ * B; ++r) std::memcpy(g + r * GH, bias, GH * sizeof(T));
    }
    bool projected = false;
    if constexpr (std::is_same_v<T, float>) {  // batch-1 inference: W_ih packed once
      if (B == 1 && is_packed_gemv(gemv_ih, G, H, I)) {
        if (!has_bias) gates.zero_();
        gemm_packed(T_, G, H, I, x.data_ptr<float>(), I, gemv_ih.data_ptr<float>(),
                    gates.data_ptr<float>(), GH);
        projected = true;
      }
    }
    if (!projected)
      gemm_bt<T>(T_ * B, GH, I, x.data_ptr<T>(), I, w_ih.data_ptr<T>(), I, gates.data_ptr<T>(),
                 GH, has_bias);
    W.p = w_hh.data_ptr<T>();
    W.ld = H;
    // batch-1 inference: W_hh packed once (forward_packed)
    if constexpr (std::is_same_v<T, float>) {
      if (B == 1 && is_packed_gemv(gemv_hh, G, H, H)) W.gemv = gemv_hh.data_ptr<float>();
    }
  } else if (bf16) {
    if constexpr (std::is_same_v<T, float>) {
      // gx = BF16(x) BF16(W_ih)^T + b; the loop's products read W_hh^T as bf16 VNNI (WhhT)
      at::Tensor xb = bf16_rows(x.reshape({T_ * B, I}), nt_all);
      at::Tensor wih = vnni_of(w_ih.data_ptr<float>(), I, GH, 1, I, opts, nt_all);
      WhhT = vnni_of(w_hh.data_ptr<float>(), H, GH, 1, H, opts, nt_all);
      pgemm_bf16(T_ * B, GH, even_up(I), xb.data_ptr<BF16>(), xb.size(1), wih.data_ptr<BF16>(),
                 GH, gates.data_ptr<float>(), GH, bias,
                 nt_all);
      W.vnni = WhhT.data_ptr<BF16>();
      W.ld = GH;
    }
  } else {
    at::Tensor WihT = pre ? pre->wih_t : pack_input<T>(w_ih);  // (I, GH)
    input_projection<T>(T_ * B, GH, I, x.data_ptr<T>(), WihT.data_ptr<T>(), gates.data_ptr<T>(),
                        bias, nt_all);
    const bool own_f32 = std::is_same_v<T, float> && g_gemm == Gemm::OWN;
    if ((cf.kind != RNN || own_f32) && (nt_loop == 1 || nt_rows > 1)) {
      // one thread (or one per row block): the LSTM's and GRU's per-step products read W_hh^T
      // in panels (pack_panels); the Elman layer's too with gemm_own (its 16-column strips:
      // else gemm_own copies W_hh^T into strips at every step).
      // Measured 1 thread, forward, min CPU time of 9 interleaved, load ~5: rnnkit / nn.LSTM
      // at 100,32,256 1.13 (one W^T) -> 1.10 / 1.09 / 1.07 (panels 32 / 64 / 128); 50,64,512
      // 1.00 -> 0.99 / 0.95 / 0.96; 35,20,200 1.02 either way.
      WhhT = pre && pre->whh_rec.defined() ? pre->whh_rec : pack_recurrent<T>(w_hh, cf);
      W.panel = rec_panel<T>();
    } else {
      WhhT = w_hh.t().contiguous();  // (H, GH)
    }
    W.p = WhhT.data_ptr<T>();
    W.ld = GH;
  }
  at::Tensor y = part ? at::zeros({T_, B, H}, opts) : at::empty({T_, B, H}, opts);
  at::Tensor hst = h0.clone();
  at::Tensor cst, cs, extra;
  if (cf.kind == LSTM) {
    cst = c0.clone();
    if (training) cs = part ? at::zeros({T_, B, H}, opts) : at::empty({T_, B, H}, opts);
    const T* p = cf.peep ? pw.data_ptr<T>() : nullptr;
    T* csp = training ? cs.data_ptr<T>() : nullptr;
    // (the recurrent product's scratch, never returned: plain memory, not an ATen op per call)
    std::unique_ptr<T[]> rec(new T[B * GH]);
    auto run = [&](auto peep, auto coupled, auto save, auto reg) {
      run_time_loop(cf, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
        lstm_fwd_loop<T, decltype(peep)::value, decltype(coupled)::value, decltype(save)::value,
                      decltype(reg)::value>(
            c, from_row(gates.data_ptr<T>(), m0, GH), from_row(rec.get(), m0, GH),
            from_row(y.data_ptr<T>(), m0, H), from_row(csp, m0, H),
            from_row(hst.data_ptr<T>(), m0, H), from_row(cst.data_ptr<T>(), m0, H),
            from_row(h0.data_ptr<T>(), m0, H), W, p, R.from_row(m0, H), nt);
      });
    };
    auto run_r = [&](auto peep, auto coupled, auto save) {
      if (R.any()) run(peep, coupled, save, std::true_type{});
      else run(peep, coupled, save, std::false_type{});
    };
    auto run_s = [&](auto peep, auto coupled) {
      if (training) run_r(peep, coupled, std::true_type{});
      else run_r(peep, coupled, std::false_type{});
    };
    if (cf.peep && cf.coupled) run_s(std::true_type{}, std::true_type{});
    else if (cf.peep) run_s(std::true_type{}, std::false_type{});
    else if (cf.coupled) run_s(std::false_type{}, std::true_type{});
    else run_s(std::false_type{}, std::false_type{});
    if (training && ctil.defined()) extra = ctil;  // the LSTM's c~ before zoneout, for backward
  } else if (cf.kind == RNN) {
    run_time_loop(cf, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
      rnn_fwd_loop<T>(c, from_row(gates.data_ptr<T>(), m0, H), from_row(y.data_ptr<T>(), m0, H),
                      from_row(hst.data_ptr<T>(), m0, H), from_row(h0.data_ptr<T>(), m0, H), W,
                      R.from_row(m0, H), nt);
    });
  } else if (!cf.before) {
    at::Tensor gh = at::empty({B, H}, opts);
    at::Tensor rec = W.panel > 0 ? at::empty({B, GH}, opts) : at::Tensor();
    // (zeros past each length: an operator's outputs must not depend on uninitialised memory)
    if (training) extra = part ? at::zeros({T_, B, H}, opts) : at::empty({T_, B, H}, opts);
    at::Tensor bhn;
    if (has_bias) bhn = b_hh.narrow(0, 2 * H, H).contiguous();
    run_time_loop(cf, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
      gru_after_fwd_loop<T>(
          c, from_row(gates.data_ptr<T>(), m0, GH), from_row(y.data_ptr<T>(), m0, H),
          from_row(hst.data_ptr<T>(), m0, H), from_row(gh.data_ptr<T>(), m0, H),
          from_row(training ? extra.data_ptr<T>() : nullptr, m0, H),
          from_row(h0.data_ptr<T>(), m0, H), W, has_bias ? bhn.data_ptr<T>() : nullptr,
          R.from_row(m0, H), nt, from_row(rec.defined() ? rec.data_ptr<T>() : nullptr, m0, GH),
          training);
    });
  } else {
    // Rows past their length multiply zero gradients in dW_hn: they must not hold NaN garbage.
    extra = training ? (part ? at::zeros({T_, B, H}, opts) : at::empty({T_, B, H}, opts))
                     : at::empty({B, H}, opts);
    at::Tensor rec = W.panel > 0 ? at::empty({B, GH}, opts) : at::Tensor();
    run_time_loop(cf, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
      gru_before_fwd_loop<T>(
          c, from_row(gates.data_ptr<T>(), m0, GH), from_row(y.data_ptr<T>(), m0, H),
          from_row(hst.data_ptr<T>(), m0, H), from_row(extra.data_ptr<T>(), m0, H), training,
          from_row(h0.data_ptr<T>(), m0, H), W, R.from_row(m0, H), nt,
          from_row(rec.defined() ? rec.data_ptr<T>() : nullptr, m0, GH), training);
    });
  }
  // The Elman backward reads the activations from y, which equals them unless h is zoned out:
  // saving them as well would keep a second (T, B, H) tensor alive until the backward.
  if (!training || (cf.kind == RNN && !kh.defined())) gates = at::Tensor();
  return {y, hst, cst, gates, cs, extra};
}

// Steps per chunk of the backward (0: automatic). The backward walks time in chunks and forms
// dx, dW_ih, dW_hh and the biases' gradients chunk by chunk, so that its gate-gradient buffers
// are (chunk, B, G*H) instead of (T, B, G*H): at T,B,H = 1000,32,512 an LSTM's whole gate
// gradient is 250 MiB. Automatic: chunks of kChunkRows rows (T*B <= kChunkRows, every speed.py
// shape, is one chunk: the GEMMs of the backward as they were). set_backward_chunk (tests,
// benchmarks) forces a size.
constexpr int64_t kChunkRows = 4096;
int64_t g_backward_chunk = 0;

int64_t backward_chunk_steps(const Cfg& cf) {
  if (g_backward_chunk > 0) return g_backward_chunk;
  return std::max<int64_t>(1, kChunkRows / std::max<int64_t>(1, cf.B));
}

// out (cols, ld) bf16 = the transpose of a float (rows, cols) matrix whose row r is row(r)
// (times mask(r) elementwise, when mask(r) is not null), columns rows..ld of out zero: the A of
// the weight gradients. Tiles of 32 rows x 256 columns (16 KiB): each row's 256 floats are
// rounded by a contiguous, vectorised loop into the tile, which is then written out transposed
// from L1 in 8 x 8 blocks (rounding element by element along a strided column instead took 7% of
// an Elman layer's bf16 forward+backward, measured with perf at 100,32,256; 64-column tiles,
// which read 256 bytes of each of 32 rows in turn, stalled on those loads: 6.5% against 3.7%).
// dst[j * ldd + i] = src[i * lds + j] for an 8 x 8 block of 16-bit values: three rounds of
// SSE2 unpacks (baseline x86-64; the scalar loop elsewhere), 8 loads and 8 stores instead of 64.
inline void transpose8x8_u16(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd) {
#if defined(__SSE2__)
  __m128i a[8], t[8], u[8];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * lds));
  for (int i = 0; i < 4; ++i) {  // t[2i], t[2i+1]: rows 2i, 2i+1 interleaved (columns 0-3, 4-7)
    t[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // u: pairs of columns, rows 0-3 (h = 0) or 4-7 (h = 1)
    const __m128i* q = t + 4 * h;
    u[4 * h] = _mm_unpacklo_epi32(q[0], q[2]);      // columns 0, 1
    u[4 * h + 1] = _mm_unpackhi_epi32(q[0], q[2]);  // columns 2, 3
    u[4 * h + 2] = _mm_unpacklo_epi32(q[1], q[3]);  // columns 4, 5
    u[4 * h + 3] = _mm_unpackhi_epi32(q[1], q[3]);  // columns 6, 7
  }
  for (int k = 0; k < 4; ++k) {  // column 2k: low halves of rows 0-3 and 4-7, 2k + 1: high
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * k * ldd),
                     _mm_unpacklo_epi64(u[k], u[4 + k]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * k + 1) * ldd),
                     _mm_unpackhi_epi64(u[k], u[4 + k]));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}

template <typename Row, typename Mask>
RNNKIT_BF16_SIMD void transpose_to_bf16(int64_t rows, int64_t cols, Row row, Mask mask,
                                        uint16_t* dst, int64_t ld, int nt) {
  constexpr int64_t RB = 32, CB = 256;
  const int64_t rbn = (rows + RB - 1) / RB;
  // (blocks of rows outermost: the source is read in order, 32 rows at a time; columns
  // outermost, each row read a cache line at a time across the whole matrix, stalled on the
  // loads: 70% of the samples, perf annotate)
#pragma omp parallel for num_threads(nt) schedule(static) if (rows * cols > 32768)
  for (int64_t b = 0; b < rbn; ++b) {
    const int64_t r0 = b * RB, rw = std::min(rows, r0 + RB) - r0;
    alignas(64) uint16_t tile[RB][CB];
    for (int64_t c0 = 0; c0 < cols; c0 += CB) {
      const int64_t cw = std::min(cols, c0 + CB) - c0;
      for (int64_t r = 0; r < rw; ++r) {
        const float* a = row(r0 + r) + c0;
        const float* mk = mask(r0 + r);
        uint16_t* t = tile[r];
        if (mk) {
          mk += c0;
#pragma omp simd
          for (int64_t c = 0; c < cw; ++c) t[c] = bf16_bits(a[c] * mk[c]);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < cw; ++c) t[c] = bf16_bits(a[c]);
        }
      }
      if (rw == RB && cw == CB) {
        for (int64_t rq = 0; rq < RB; rq += 8)
          for (int64_t cq = 0; cq < CB; cq += 8)
            transpose8x8_u16(&tile[rq][cq], CB, dst + (c0 + cq) * ld + r0 + rq, ld);
      } else {
        for (int64_t c = 0; c < cw; ++c) {
          uint16_t* d = dst + (c0 + c) * ld + r0;
          for (int64_t r = 0; r < rw; ++r) d[r] = tile[r][c];
        }
      }
    }
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = rows; r < ld; ++r) dst[c * ld + r] = 0;
}

// A bf16 copy of a float (rows, cols) tensor's transpose, (cols, even_up(rows)), padded with
// zeros.
at::Tensor bf16_transposed(const at::Tensor& a, int nt) {
  const int64_t rows = a.size(0), cols = a.size(1), ld = even_up(rows);
  at::Tensor out = at::empty({cols, ld}, a.options().dtype(at::kBFloat16));
  const float* src = a.data_ptr<float>();
  transpose_to_bf16(
      rows, cols, [&](int64_t r) { return src + r * cols; },
      [](int64_t) { return static_cast<const float*>(nullptr); },
      reinterpret_cast<uint16_t*>(out.data_ptr<BF16>()), ld, nt);
  return out;
}

// The previous hidden states of every step, (h0, y[0], ..., y[T-2]) as (T*B, H) rows, times the
// recurrent-dropout mask (B, H) if defined, transposed to bf16 (H, even_up(T*B)): read straight
// from h0 and y (no float copy of them gathered first).
at::Tensor bf16_hprev_transposed(const at::Tensor& h0, const at::Tensor& y,
                                 const at::Tensor& rmask, int64_t T_, int64_t B, int64_t H,
                                 int nt) {
  const int64_t rows = T_ * B, ld = even_up(rows);
  at::Tensor out = at::empty({H, ld}, y.options().dtype(at::kBFloat16));
  const float* hp = h0.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* mp = rmask.defined() ? rmask.data_ptr<float>() : nullptr;
  transpose_to_bf16(
      rows, H, [&](int64_t r) { return r < B ? hp + r * H : yp + (r - B) * H; },
      [&](int64_t r) { return mp ? mp + (r % B) * H : nullptr; },
      reinterpret_cast<uint16_t*>(out.data_ptr<BF16>()), ld, nt);
  return out;
}

// bf16 mode's GEMMs over all T*B rows of the backward (backward_impl's float ones below):
// dx = dG W_ih, and the weight gradients transposed, dW_ih^T = X^T dG and dW_hh^T = H_prev^T dG
// (GRU reset-after: the dG of W_hh h + b_hh; reset-before: r ⊙ h_prev for the n block), each
// from bf16 copies, float32 results. dG, the largest operand, is packed once (VNNI, read in
// order) for both weight gradients; the transposes are of X and H_prev and of the (small)
// results.
void bf16_input_and_weight_grads(const Cfg& cf, const at::Tensor& x, const at::Tensor& h0,
                                 const at::Tensor& w_ih, const at::Tensor& y,
                                 const at::Tensor& extra, const at::Tensor& dg,
                                 const at::Tensor& dgh, const at::Tensor& rmask, bool need_dx,
                                 bool need_dw, bool has_bias, int nt, at::Tensor& dx,
                                 at::Tensor& dwih, at::Tensor& dwhh, at::Tensor& dbih,
                                 at::Tensor& dbhh) {
  const int64_t T_ = cf.T, B = cf.B, I = cf.I, H = cf.H, GH = cf.G * H, TB = T_ * B;
  auto opts = x.options();
  const at::Tensor dg2 = dg.reshape({TB, GH});
  const bool gru_after = cf.kind == GRU && !cf.before;
  // dG packed for the weight gradients, with the biases' gradients and dG's bf16 rows (for dx)
  // from the same pass
  at::Tensor dgv, dgb;
  if (need_dw) dgv = vnni_rows_sum(dg2, has_bias ? &dbih : nullptr, need_dx ? &dgb : nullptr, nt);
  if (need_dx) {
    if (!need_dw) dgb = bf16_rows(dg2, nt);
    at::Tensor wih = vnni_of(w_ih.data_ptr<float>(), GH, I, I, 1, opts, nt);  // (K = GH, N = I)
    dx = at::empty({T_, B, I}, opts);
    pgemm_bf16(TB, I, dgb.size(1), dgb.data_ptr<BF16>(), dgb.size(1), wih.data_ptr<BF16>(), I,
               dx.data_ptr<float>(), I, nullptr, nt);
  }
  if (!need_dw) return;
  const int64_t TBp = even_up(TB);
  // out^T[:, col0 : col0 + n] = a^T g[:, col0 : col0 + n] for a (T*B, K) float, g VNNI (T*B, GH)
  // (aT: a (K, TBp) bf16 transpose, as bf16_transposed makes)
  auto weight_grad_t = [&](const at::Tensor& aT, const at::Tensor& gv, int64_t col0, int64_t n,
                           at::Tensor& outT) {
    pgemm_bf16(aT.size(0), n, TBp, aT.data_ptr<BF16>(), TBp, gv.data_ptr<BF16>() + col0 * 2, GH,
               outT.data_ptr<float>() + col0, GH, nullptr, nt);
  };
  at::Tensor dwihT = at::empty({I, GH}, opts);
  weight_grad_t(bf16_transposed(x.reshape({TB, I}), nt), dgv, 0, GH, dwihT);
  dwih = dwihT.t().contiguous();
  // previous hidden states (T*B, H): h0, y[0..T-2]; W_hh multiplied h ⊙ m under recurrent dropout
  const at::Tensor hprevT = bf16_hprev_transposed(h0, y, rmask, T_, B, H, nt);
  at::Tensor dwhhT = at::empty({H, GH}, opts);
  if (gru_after) {
    // d(W_hh h + b_hh) is dG in its r and z blocks (gru_after_bwd_loop writes the same values to
    // both): only its n block (dpn r) is packed again (packing all of it took 2% of a GRU's bf16
    // forward+backward at 100,32,256, perf), and the r, z bias gradients are dG's sums.
    at::Tensor dbn;
    const at::Tensor dgnv = vnni_rows_sum(dgh.reshape({TB, GH}).narrow(1, 2 * H, H),
                                          has_bias ? &dbn : nullptr, nullptr, nt);
    weight_grad_t(hprevT, dgv, 0, 2 * H, dwhhT);
    pgemm_bf16(H, H, TBp, hprevT.data_ptr<BF16>(), TBp, dgnv.data_ptr<BF16>(), H,
               dwhhT.data_ptr<float>() + 2 * H, GH, nullptr, nt);
    if (has_bias) dbhh = at::cat({dbih.narrow(0, 0, 2 * H), dbn});
  } else if (cf.kind == GRU) {
    weight_grad_t(hprevT, dgv, 0, 2 * H, dwhhT);
    weight_grad_t(bf16_transposed(extra.reshape({TB, H}), nt), dgv, 2 * H, H, dwhhT);
  } else {
    weight_grad_t(hprevT, dgv, 0, GH, dwhhT);
  }
  dwhh = dwhhT.t().contiguous();
  if (has_bias && !gru_after) dbhh = dbih;
}

#ifdef RNNKIT_OWN_GEMM
// d (ld ldd) = the transpose of the 8 x 8 block s (ld lds), through AVX2 registers.
inline void transpose8x8_f32(const float* s, int64_t lds, float* d, int64_t ldd) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(d + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(d + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

// dst (M, kk) (ld kk) = the transpose of src (kk, M) (ld lds).
inline void transpose_rows(int64_t kk, int64_t M, const float* src, int64_t lds, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= kk; k += 8) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) transpose8x8_f32(src + k * lds + m, lds, dst + m * kk + k, kk);
    for (; m < M; ++m)
      for (int64_t i = 0; i < 8; ++i) dst[m * kk + k + i] = src[(k + i) * lds + m];
  }
  for (; k < kk; ++k)
    for (int64_t m = 0; m < M; ++m) dst[m * kk + k] = src[k * lds + m];
}

// The weight gradients of one backward chunk under gemm_own, dW (+)= dG^T Z over the chunk's K
// rows (Z: x, or the previous hidden states), straight into dW (rows = gate units) — in place of
// pgemm_tout over transposed copies of x and of the previous states (two (K, H) transposes and
// a gather per chunk, and products whose A rows were K floats apart: perf put those two products
// at ~1.2x the time of the equal-FLOP dx product, Elman and GRU 100,32,256). Per K chunk of
// kOwnKC rows each thread transposes its rows of dG once, in cache (8 x 8 AVX2 blocks), and
// every product of those rows reads that copy as gemm_own's A (ld kk), 256 rows per call (A's
// block then stays in L2 across gemm_own's strips). rows_of(k0, kk, fn): the products of dG's
// columns [m0, m1) over chunk rows [k0, k0 + kk), fn(At, ldat) with At row 0 = column m0.
// Threads split the rows of dW (multiples of 16). Each output is the same sum as before, in a
// different order (K in chunks of kOwnKC, as pgemm_tout's): equal within float32 rounding.
constexpr int64_t kOwnKC = 256;
// C(M, N) (+)= A B in blocks of 256 columns: gemm_own packs B's K chunk per call, and a block's
// packed B (256 KiB at K = 256) beside the A block and the C rows stays in the 1 MiB L2; all N
// columns at once (N = 512: 512 KiB packed) did not (Elman 50,64,512 forward+backward 0.77 ->
// 0.84 of nn.RNN, one loaded run).
inline void gemm_cols(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
  for (int64_t n0 = 0; n0 < N; n0 += 256)
    gemm_rm(M, std::min<int64_t>(256, N - n0), K, A, lda, B + n0, ldb, C + n0, ldc, acc);
}
template <typename Fn>
void own_weight_grads(int64_t K, int64_t M, const float* dG, int64_t ldg, int nt, Fn&& product) {
  if (K <= 0 || M <= 0) return;
  run_team(nt, [&](const int team, const int tid) {
    int64_t m0, m1;
    unit_range(M, team, tid, m0, m1);
    if (m1 <= m0) return;
    thread_local std::vector<float> buf;
    buf.resize((m1 - m0) * std::min(kOwnKC, K));
    for (int64_t k0 = 0; k0 < K; k0 += kOwnKC) {
      const int64_t kk = std::min(kOwnKC, K - k0);
      transpose_rows(kk, m1 - m0, dG + k0 * ldg + m0, ldg, buf.data());
      for (int64_t r0 = m0; r0 < m1; r0 += 256)
        product(buf.data() + (r0 - m0) * kk, kk, r0, std::min(m1, r0 + 256), k0, kk);
    }
  });
}
#endif

// W (R, C) as pack_panels(W^T, nb) lays it out (column strips of nb: strip c0 holds W[:, c0 :
// c0 + np] row after row, ld np = min(nb, C - c0)), copied from W as stored: each row of a strip
// is one contiguous run of W, in place of pack_panels over a transposed copy of W (the copy, and
// pack_panels' scatter element by element: 2.4 % of an LSTM 35,20,200 forward+backward with the
// forward's own pack_panels calls, perf, 1 thread).
template <typename T, int64_t NB>
at::Tensor column_strips(const at::Tensor& w) {
  const int64_t R = w.size(0), C = w.size(1);
  at::Tensor out = at::empty({C, R}, w.options());
  const T* src = w.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t c0 = 0; c0 < C; c0 += NB) {
    const int64_t np = std::min(NB, C - c0);
    T* d = dst + c0 * R;
    if (np == NB) {  // (a copy of constant size: a few vector moves, no call)
      for (int64_t r = 0; r < R; ++r) std::memcpy(d + r * NB, src + r * C + c0, NB * sizeof(T));
    } else {
      for (int64_t r = 0; r < R; ++r) std::memcpy(d + r * np, src + r * C + c0, np * sizeof(T));
    }
  }
  return out;
}

template <typename T>
std::vector<at::Tensor> backward_impl(const Cfg& cf, const at::Tensor& x, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const at::Tensor& pw, bool has_bias,
                                      const at::Tensor& y, const at::Tensor& acts,
                                      const at::Tensor& cs, const at::Tensor& extra,
                                      const at::Tensor& gy, const at::Tensor& ghT,
                                      const at::Tensor& gcT, const at::Tensor& rmask,
                                      const at::Tensor& kh, const at::Tensor& kc, bool need_dx,
                                      bool need_dw, int nt_loop, int nt_all, bool bf16 = false) {
  const int64_t T_ = cf.T, B = cf.B, I = cf.I, H = cf.H, G = cf.G, GH = G * H;
  auto opts = x.options();
  const bool part = partial(cf);
  const int nt_rows = batch_split_threads(cf, nt_loop);
  Reg<T> R;
  if (rmask.defined()) R.rmask = rmask.data_ptr<T>();
  if (kh.defined()) R.kh = kh.data_ptr<T>();
  if (kc.defined()) {
    R.kc = kc.data_ptr<T>();
    R.ctil = const_cast<T*>(extra.data_ptr<T>());  // the forward's c~ (read only here)
  }
  at::Tensor scratch = R.any() ? at::zeros({B, H}, opts) : at::Tensor();
  T* sc = R.any() ? scratch.data_ptr<T>() : nullptr;
  // One chunk's gate gradients, reused by every chunk (rows >= bs[t] are zeroed per chunk).
  // bf16 mode forms its GEMMs over all T*B rows at once (bf16_input_and_weight_grads): one chunk
  const int64_t CS =
      bf16 ? T_ : std::max<int64_t>(1, std::min(backward_chunk_steps(cf), T_));
  const bool gru_after = cf.kind == GRU && !cf.before;
  at::Tensor dg = part ? at::zeros({CS, B, GH}, opts) : at::empty({CS, B, GH}, opts);
  at::Tensor dgh;  // GRU reset after: d(W_hh h + b_hh)
  if (gru_after) dgh = part ? at::zeros({CS, B, GH}, opts) : at::empty({CS, B, GH}, opts);
  at::Tensor dhs = ghT.defined() ? ghT.clone() : at::zeros({B, H}, opts);
  at::Tensor dcs, dpw, drh;
  const T* p = nullptr;
  // the peephole weights' gradients: row block k of the batch split adds its rows' part into
  // dpw_block[k] (block 0: dpw itself), summed after the time loop
  std::vector<at::Tensor> dpw_block;
  BwdW<T> whh{w_hh.data_ptr<T>()};
  at::Tensor whh_vnni, whh_strips;
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) {  // W_hh (G*H, H) as the (K = G*H, N = H) B of dh = dgates W_hh
      whh_vnni = vnni_of(w_hh.data_ptr<float>(), GH, H, H, 1, opts, nt_all);
      whh.vnni = whh_vnni.data_ptr<BF16>();
    }
#ifdef RNNKIT_OWN_GEMM
    if (!bf16 && g_gemm == Gemm::OWN) {  // one pass over W_hh, read T times (BwdW::strips)
      whh_strips = column_strips<float, kOwnCols>(w_hh);
      whh.strips = whh_strips.data_ptr<float>();
      whh.rows = GH;
    }
#endif
  }
  if (cf.kind == LSTM) {
    dcs = gcT.defined() ? gcT.clone() : at::zeros({B, H}, opts);
    if (cf.peep) {
      dpw = at::zeros_like(pw);
      p = pw.data_ptr<T>();
      dpw_block.push_back(dpw);
      for (int k = 1; k < nt_rows; ++k) dpw_block.push_back(at::zeros_like(pw));
    }
  }
  if (cf.kind == GRU && cf.before) drh = at::empty({B, H}, opts);
  at::Tensor dx, dwih, dwhh, dwhhT, dbih, dbhh;
  // the weight gradients by gemm_own over dG^T (own_weight_grads): float32 under gemm_own (AVX2
  // CPUs), every cell; AVX-512's brgemm, BLAS and float64 keep pgemm_tout over transposed copies.
  // (The LSTM's two pgemm_tout products took 32 % of a 100,32,256 forward+backward against 14 %
  // for the equal-FLOP dx product, perf, 1 thread.)
  bool own_dw = false;
#ifdef RNNKIT_OWN_GEMM
  own_dw = std::is_same_v<T, float> && g_gemm == Gemm::OWN && !bf16;
#endif
  if (need_dx) dx = at::empty({T_, B, I}, opts);
  if (need_dw) {
    // (a batch of 0 rows: own_weight_grads has no K to write them with; pgemm_tout zeroes)
    const auto alloc = [&](at::IntArrayRef sizes) {
      return own_dw && B == 0 ? at::zeros(sizes, opts) : at::empty(sizes, opts);
    };
    dwih = alloc({GH, I});
    if (cf.kind == GRU && cf.before && !own_dw) dwhhT = at::empty({H, GH}, opts);
    else dwhh = alloc({GH, H});
  }
  // (with zoneout the Elman activation's derivative needs h~, saved over the gates, not y)
  const at::Tensor& h_new = cf.kind == RNN && R.kh ? acts : y;
  const T* yp = y.data_ptr<T>();
  const T* ep = extra.numel() > 0 ? extra.data_ptr<T>() : nullptr;
  auto sum_dpw_blocks = [&] {
    for (size_t k = 1; k < dpw_block.size(); ++k) dpw.add_(dpw_block[k]);
  };

  // Chunks from the last step back: the loops see a Cfg of the chunk's steps, and every
  // (T, B, .) pointer and the initial states moved to the chunk's first step (its h_{t0-1} is
  // y[t0 - 1], its c_{t0-1} cs[t0 - 1]); dhs, dcs and the peephole gradients run on across
  // chunks. With one chunk this is the unchunked backward, call for call.
  for (int64_t t1 = T_;;) {
    const int64_t t0 = std::max<int64_t>(0, t1 - CS), n = t1 - t0, nB = n * B;
    Cfg cc = cf;
    cc.T = n;
    cc.bs.assign(cf.bs.begin() + t0, cf.bs.begin() + t1);
    Reg<T> Rc = R;
    if (R.kh) Rc.kh = R.kh + t0 * B * H;
    if (R.kc) Rc.kc = R.kc + t0 * B * H;
    if (R.ctil) Rc.ctil = R.ctil + t0 * B * H;
    if (part) {  // rows past their length: zero gradients (the loops write rows < bs[t] only)
      for (int64_t k = 0; k < n; ++k) {
        const int64_t M = cc.bs[k];
        dg[k].narrow(0, M, B - M).zero_();
        if (gru_after) dgh[k].narrow(0, M, B - M).zero_();
      }
    }
    // a grad_y that is not contiguous (the expanded ones of y.sum()) is made so a chunk at a time
    at::Tensor gyc = gy.narrow(0, t0, n).contiguous();
    const T* gyp = gyc.data_ptr<T>();
    const T* hp0 = t0 == 0 ? h0.data_ptr<T>() : yp + (t0 - 1) * B * H;
    T* dgp = dg.data_ptr<T>();
    if (cf.kind == LSTM) {
      const T* csp = cs.data_ptr<T>();
      const T* cp0 = t0 == 0 ? c0.data_ptr<T>() : csp + (t0 - 1) * B * H;
#define LSTM_BWD(P, C, REG)                                                                     \
  run_time_loop(cc, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int k) {             \
    lstm_bwd_loop<T, P, C, REG>(                                                                \
        c, from_row(acts.data_ptr<T>() + t0 * B * GH, m0, GH), from_row(csp + t0 * B * H, m0, H), \
        from_row(cp0, m0, H), from_row(gyp, m0, H), from_row(dgp, m0, GH),                      \
        from_row(dhs.data_ptr<T>(), m0, H), from_row(dcs.data_ptr<T>(), m0, H), whh, p,          \
        P ? dpw_block[k].data_ptr<T>() : nullptr, Rc.from_row(m0, H), from_row(sc, m0, H), nt); \
  })
#define LSTM_BWD_R(P, C)           \
  do {                             \
    if (R.any()) LSTM_BWD(P, C, true); \
    else LSTM_BWD(P, C, false);    \
  } while (0)
      if (cf.peep && cf.coupled) LSTM_BWD_R(true, true);
      else if (cf.peep) LSTM_BWD_R(true, false);
      else if (cf.coupled) LSTM_BWD_R(false, true);
      else LSTM_BWD_R(false, false);
#undef LSTM_BWD_R
#undef LSTM_BWD
    } else if (cf.kind == RNN) {
      run_time_loop(cc, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
        rnn_bwd_loop<T>(c, from_row(h_new.template data_ptr<T>() + t0 * B * H, m0, H),
                        from_row(gyp, m0, H), from_row(dgp, m0, H),
                        from_row(dhs.data_ptr<T>(), m0, H), whh, Rc.from_row(m0, H),
                        from_row(sc, m0, H), nt);
      });
    } else if (gru_after) {
      run_time_loop(cc, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
        gru_after_bwd_loop<T>(c, from_row(acts.data_ptr<T>() + t0 * B * GH, m0, GH),
                              from_row(ep + t0 * B * H, m0, H), from_row(yp + t0 * B * H, m0, H),
                              from_row(hp0, m0, H), from_row(gyp, m0, H), from_row(dgp, m0, GH),
                              from_row(dgh.data_ptr<T>(), m0, GH),
                              from_row(dhs.data_ptr<T>(), m0, H), whh, Rc.from_row(m0, H),
                              from_row(sc, m0, H), nt);
      });
    } else {
      run_time_loop(cc, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
        gru_before_bwd_loop<T>(c, from_row(acts.data_ptr<T>() + t0 * B * GH, m0, GH),
                               from_row(yp + t0 * B * H, m0, H), from_row(hp0, m0, H),
                               from_row(gyp, m0, H), from_row(dgp, m0, GH),
                               from_row(drh.data_ptr<T>(), m0, H),
                               from_row(dhs.data_ptr<T>(), m0, H), whh, Rc.from_row(m0, H),
                               from_row(sc, m0, H), nt);
      });
    }

    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {  // one chunk: CS = T in bf16 mode
        bf16_input_and_weight_grads(cf, x, h0, w_ih, y, extra, dg, dgh, rmask, need_dx, need_dw,
                                    has_bias, nt_all, dx, dwih, dwhh, dbih, dbhh);
        sum_dpw_blocks();
        return {dx, dhs, dcs, dwih, dwhh, dbih, dbhh, dpw};
      }
    }
    if (need_dx)
      pgemm<T>(nB, I, GH, dgp, GH, w_ih.data_ptr<T>(), I, dx.data_ptr<T>() + t0 * B * I, I, false,
               nullptr, nt_all);
#ifdef RNNKIT_OWN_GEMM
    if constexpr (std::is_same_v<T, float>) if (need_dw && own_dw) {
      const bool acc = t1 < T_;
      // Z's rows k of the chunk: x; and h_{t-1} (h0 / y[t0 - 1] for the first B rows, then y),
      // or under recurrent dropout h_{t-1} ⊙ m gathered as below
      const float* xs = x.data_ptr<float>() + t0 * B * I;
      at::Tensor hmask;
      if (rmask.defined()) {
        hmask = at::empty({n, B, H}, opts);
        hmask[0].copy_(t0 == 0 ? h0 : y[t0 - 1]);
        if (n > 1) hmask.narrow(0, 1, n - 1).copy_(y.narrow(0, t0, n - 1));
        hmask.mul_(rmask);
      }
      const float* h_first = hmask.defined() ? hmask.data_ptr<float>() : (const float*)hp0;
      const float* h_rest = hmask.defined() ? h_first + B * H
                                            : (const float*)(yp + t0 * B * H);
      // C rows [r0, r1) (+)= At Z over chunk rows [k0, k0 + kk), Z's rows split where the
      // previous states move from h_first to h_rest (row B)
      auto prev_states = [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                             int64_t kk, float* C, int64_t ldc) {
        const int64_t ks = std::clamp<int64_t>(B - k0, 0, kk);  // rows from h_first
        if (ks > 0)
          gemm_cols(r1 - r0, H, ks, At, ldat, h_first + k0 * H, H, C + r0 * ldc, ldc,
                    acc || k0 > 0);
        if (kk > ks)
          gemm_cols(r1 - r0, H, kk - ks, At + ks, ldat, h_rest + (k0 + ks - B) * H, H, C + r0 * ldc,
                  ldc, acc || k0 + ks > 0);
      };
      float* dwi = dwih.data_ptr<float>();
      float* dwh = dwhh.data_ptr<float>();
      auto input = [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                       int64_t kk) {
        gemm_cols(r1 - r0, I, kk, At, ldat, xs + k0 * I, I, dwi + r0 * I, I, acc || k0 > 0);
      };
      if (gru_after) {  // dW_hh from d(W_hh h + b_hh), dW_ih from d(x-part)
        own_weight_grads(nB, GH, (const float*)dgp, GH, nt_all, input);
        own_weight_grads(nB, GH, dgh.data_ptr<float>(), GH, nt_all,
                         [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                             int64_t kk) { prev_states(At, ldat, r0, r1, k0, kk, dwh, H); });
      } else if (cf.kind == GRU) {  // reset before: W_hn multiplied r ⊙ h (extra), not h
        const float* rh = (const float*)ep + t0 * B * H;
        own_weight_grads(nB, GH, (const float*)dgp, GH, nt_all,
                         [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                             int64_t kk) {
          input(At, ldat, r0, r1, k0, kk);
          const int64_t rs = std::clamp<int64_t>(2 * H, r0, r1);  // rows of r, z: h_{t-1}
          if (rs > r0) prev_states(At, ldat, r0, rs, k0, kk, dwh, H);
          if (r1 > rs)
            gemm_cols(r1 - rs, H, kk, At + (rs - r0) * ldat, ldat, rh + k0 * H, H, dwh + rs * H, H,
                    acc || k0 > 0);
        });
      } else {  // Elman, LSTM: W_ih multiplied x, W_hh h_{t-1} (⊙ m), every gate block
        own_weight_grads(nB, GH, (const float*)dgp, GH, nt_all,
                         [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                             int64_t kk) {
          input(At, ldat, r0, r1, k0, kk);
          prev_states(At, ldat, r0, r1, k0, kk, dwh, H);
        });
      }
    }
#endif
    if (need_dw && !own_dw) {
      const bool acc = t1 < T_;  // later chunks add to the first one's weight gradients
      // dW_ih^T (I, GH) = X^T (I, nB) dG (nB, GH), stored transposed tile by tile (no pass)
      at::Tensor xT = x.narrow(0, t0, n).reshape({nB, I}).t().contiguous();
      pgemm_tout<T>(I, GH, nB, xT.data_ptr<T>(), nB, dgp, GH, dwih.data_ptr<T>(), I, nt_all, acc);
      // previous hidden states of the chunk, transposed (H, nB): h_{t0-1}, y[t0 .. t1-2]
      // (gathered in (n, B, H) order and transposed in one pass: faster than copying y into a
      // strided (H, nB) view, measured 1.7x at T,B,H = 100,32,256)
      at::Tensor hprev;
      if (t0 > 0) {
        hprev = y.narrow(0, t0 - 1, n);  // already in order: no gather
      } else {
        hprev = at::empty({n, B, H}, opts);
        if (n > 0) hprev[0].copy_(h0);
        if (n > 1) hprev.narrow(0, 1, n - 1).copy_(y.narrow(0, 0, n - 1));
      }
      if (rmask.defined()) hprev = hprev * rmask;  // W_hh multiplied h ⊙ m: one mask every step
      at::Tensor hT = hprev.reshape({nB, H}).t().contiguous();
      const T* dhp = gru_after ? dgh.data_ptr<T>() : dgp;
      if (cf.kind == GRU && cf.before) {
        pgemm<T>(H, 2 * H, nB, hT.data_ptr<T>(), nB, dgp, GH, dwhhT.data_ptr<T>(), GH, acc,
                 nullptr, nt_all);
        at::Tensor rhT = extra.narrow(0, t0, n).reshape({nB, H}).t().contiguous();
        pgemm<T>(H, H, nB, rhT.data_ptr<T>(), nB, dgp + 2 * H, GH, dwhhT.data_ptr<T>() + 2 * H,
                 GH, acc, nullptr, nt_all);
      } else {
        pgemm_tout<T>(H, GH, nB, hT.data_ptr<T>(), nB, dhp, GH, dwhh.data_ptr<T>(), H, nt_all,
                      acc);
      }
    }
    if (need_dw && has_bias) {
      const bool acc = t1 < T_;
      at::Tensor s = dg.narrow(0, 0, n).reshape({nB, GH}).sum(0);
      dbih = acc ? dbih.add_(s) : s;
      if (gru_after) {
        at::Tensor sh = dgh.narrow(0, 0, n).reshape({nB, GH}).sum(0);
        dbhh = acc ? dbhh.add_(sh) : sh;
      }
    }
    if (t0 == 0) break;
    t1 = t0;
  }
  sum_dpw_blocks();
  if (need_dw) {
    if (cf.kind == GRU && cf.before && !own_dw) dwhh = dwhhT.t().contiguous();
    if (has_bias && !gru_after) dbhh = dbih;
  }
  return {dx, dhs, dcs, dwih, dwhh, dbih, dbhh, dpw};
}

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// Operators return defined tensors only (torch.library's contract): a result that does not exist
// for this cell (c_n of a GRU, activations when not training, a gradient not asked for) is an
// empty (0,) tensor, and the Python side maps it back to None.
at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

// The cell variant of every operator: the first five arguments of each schema.
struct Variant {
  int64_t kind, act;
  bool peep, coupled, before;
};

void make_contiguous(at::Tensor& t) {
  if (t.defined()) t = t.contiguous();
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// rnnkit_fused::layer_forward: one layer, one direction, the whole time loop.
// Returns (y, h_n, c_n, acts, cells, extra); the last three are what layer_backward needs
// (empty unless training).
// The regularisers' masks of an operator call, each checked and made contiguous (or undefined).
struct Masks {
  at::Tensor recurrent, keep_h, keep_c;
};

Masks check_masks(const Cfg& cf, const at::Tensor& x, const std::optional<at::Tensor>& rm,
                  const std::optional<at::Tensor>& kh, const std::optional<at::Tensor>& kc) {
  Masks m{opt(rm), opt(kh), opt(kc)};
  for (at::Tensor* t : {&m.recurrent, &m.keep_h, &m.keep_c}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "masks must have the dtype of x");
    *t = t->contiguous();
  }
  TORCH_CHECK(!m.recurrent.defined() || (m.recurrent.dim() == 2 && m.recurrent.size(0) == cf.B &&
                                         m.recurrent.size(1) == cf.H),
              "recurrent_mask must be (B, H)");
  for (const at::Tensor* t : {&m.keep_h, &m.keep_c})
    TORCH_CHECK(!t->defined() || (t->dim() == 3 && t->size(0) == cf.T && t->size(1) == cf.B &&
                                  t->size(2) == cf.H),
                "zoneout masks must be (T, B, H)");
  TORCH_CHECK(!m.keep_c.defined() || cf.kind == LSTM, "zoneout_c is for an LSTM's cell state");
  return m;
}

ForwardResult forward_op(const Variant& v, at::Tensor x, at::Tensor h0, at::Tensor c0,
                         at::Tensor w_ih, at::Tensor w_hh, at::Tensor b_ih, at::Tensor b_hh,
                         at::Tensor pw, const std::vector<int64_t>& batch_sizes, bool training,
                         int64_t nthreads, const Masks& masks = {}, bool bf16 = false,
                         const at::Tensor& gemv_hh = at::Tensor(),
                         const at::Tensor& gemv_ih = at::Tensor(),
                         const Prepacked* pre = nullptr) {
  TORCH_CHECK(x.dim() == 3, "x must be (T, B, I)");
  TORCH_CHECK(h0.dim() == 2, "h0 must be (B, H)");
  const int64_t H = h0.size(1);
  Cfg cf = make_cfg(v.kind, v.act, v.peep, v.coupled, v.before, x, H, batch_sizes);
  TORCH_CHECK(w_ih.size(0) == cf.G * H && w_ih.size(1) == cf.I, "w_ih has the wrong shape");
  TORCH_CHECK(w_hh.size(0) == cf.G * H && w_hh.size(1) == H, "w_hh has the wrong shape");
  TORCH_CHECK(cf.kind != LSTM || c0.defined(), "an LSTM needs c0");
  const int nt_all = nthreads > 0 ? static_cast<int>(nthreads) : at::get_num_threads();
  const int nt = pick_threads(cf, nthreads);
  x = x.contiguous();
  h0 = h0.contiguous();
  make_contiguous(c0);
  w_ih = w_ih.contiguous();
  w_hh = w_hh.contiguous();
  make_contiguous(b_ih);
  make_contiguous(b_hh);
  make_contiguous(pw);
  std::vector<at::Tensor> r;
  TORCH_CHECK(!bf16 || x.scalar_type() == at::kFloat, "bf16 mode takes float32 tensors");
  if (x.scalar_type() == at::kFloat) {
    r = forward_impl<float>(cf, x, h0, c0, w_ih, w_hh, b_ih, b_hh, pw, masks.recurrent,
                            masks.keep_h, masks.keep_c, training, nt, nt_all, bf16, gemv_hh,
                            gemv_ih, pre);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kDouble, "fused kernels support float32 and float64");
    r = forward_impl<double>(cf, x, h0, c0, w_ih, w_hh, b_ih, b_hh, pw, masks.recurrent,
                             masks.keep_h, masks.keep_c, training, nt, nt_all, false, at::Tensor(),
                             at::Tensor(), pre);
  }
  at::Tensor cells = training ? r[4] : at::Tensor(), extra = training ? r[5] : at::Tensor();
  return {r[0], r[1], or_empty(r[2], x), or_empty(r[3], x), or_empty(cells, x),
          or_empty(extra, x)};
}

ForwardResult layer_forward(int64_t kind, int64_t act, bool peep, bool coupled, bool before,
                            const at::Tensor& x, const at::Tensor& h0,
                            const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh,
                            const std::optional<at::Tensor>& pw,
                            const std::optional<at::Tensor>& recurrent_mask,
                            const std::optional<at::Tensor>& zoneout_h,
                            const std::optional<at::Tensor>& zoneout_c,
                            at::IntArrayRef batch_sizes, bool training, int64_t nthreads,
                            bool bf16) {
  TORCH_CHECK(x.dim() == 3 && h0.dim() == 2, "x must be (T, B, I) and h0 (B, H)");
  const Cfg cf = make_cfg(kind, act, peep, coupled, before, x, h0.size(1), batch_sizes.vec());
  const Masks masks = check_masks(cf, x, recurrent_mask, zoneout_h, zoneout_c);
  return forward_op({kind, act, peep, coupled, before}, x, h0, opt(c0), w_ih, w_hh, opt(b_ih),
                    opt(b_hh), opt(pw), batch_sizes.vec(), training, nthreads, masks, bf16);
}

// rnnkit_fused::pack_weights: W_ih^T and W_hh^T laid out as forward_impl's one-thread loops
// read them, built once for a caller that keeps them while the weights do not change (the
// inference plan, engine/fused/inference.py): per call they cost a strided transpose each,
// ~100 us at H = 200 (5% of a 35,20,200 forward).
std::tuple<at::Tensor, at::Tensor> pack_weights(int64_t kind, int64_t act, bool peep,
                                                bool coupled, bool before,
                                                const at::Tensor& w_ih, const at::Tensor& w_hh) {
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2 && w_ih.size(0) == w_hh.size(0) &&
                  w_ih.scalar_type() == w_hh.scalar_type(),
              "pack_weights: w_ih (G*H, I) and w_hh (G*H, H) of one dtype");
  const Cfg cf = variant_cfg(kind, act, peep, coupled, before, 0, 0, w_ih.size(1), w_hh.size(1));
  TORCH_CHECK(w_hh.size(0) == cf.G * cf.H, "w_hh has the wrong shape");
  const at::Tensor wih = w_ih.contiguous(), whh = w_hh.contiguous();
  // Every kind, whichever GEMM this process runs: the result's shape must not depend on it (the
  // fake kernel, and so a compiled or exported graph, cannot know it). The Elman loop reads these
  // panels only with gemm_own; with brgemm forward_impl makes W_hh^T as one block per call.
  if (whh.scalar_type() == at::kFloat)
    return {pack_input<float>(wih), pack_recurrent<float>(whh, cf)};
  TORCH_CHECK(whh.scalar_type() == at::kDouble, "fused kernels support float32 and float64");
  return {pack_input<double>(wih), pack_recurrent<double>(whh, cf)};
}

// rnnkit_fused::layer_forward_packed: layer_forward without regularisers, bf16 or saving
// (inference), given also pack_weights' result for these weights: the same loops on the same
// numbers, so exactly layer_forward's result. Returns (y, h_n, c_n).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_forward_packed(
    int64_t kind, int64_t act, bool peep, bool coupled, bool before, const at::Tensor& x,
    const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& pw,
    const at::Tensor& w_ih_t, const at::Tensor& w_hh_packed, at::IntArrayRef batch_sizes,
    int64_t nthreads) {
  TORCH_CHECK(w_ih_t.dim() == 2 && w_ih_t.size(0) == w_ih.size(1) &&
                  w_ih_t.size(1) == w_ih.size(0) && w_ih_t.is_contiguous() &&
                  w_ih_t.scalar_type() == w_ih.scalar_type(),
              "w_ih_t must be pack_weights' W_ih^T");
  Prepacked pre{w_ih_t, at::Tensor()};
  if (w_hh_packed.numel() > 0) {
    TORCH_CHECK(w_hh_packed.sizes() == w_hh.sizes() && w_hh_packed.is_contiguous() &&
                    w_hh_packed.scalar_type() == w_hh.scalar_type(),
                "w_hh_packed must be pack_weights' W_hh");
    pre.whh_rec = w_hh_packed;
  }
  auto r = forward_op({kind, act, peep, coupled, before}, x, h0, opt(c0), w_ih, w_hh, opt(b_ih),
                      opt(b_hh), opt(pw), batch_sizes.vec(), false, nthreads, {}, false, at::Tensor(),
                      at::Tensor(), &pre);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

// What step_lean and forward_lean share: the batch-1 Cfg of T steps, the check that every
// argument is a contiguous float32 tensor of the shape the loops read (x is checked by each),
// the folded biases and the cell's forward loop over T steps at batch 1.
Cfg lean_cfg(const Variant& v, int64_t T, int64_t I, int64_t H) {
  return variant_cfg(v.kind, v.act, v.peep, v.coupled, v.before, T, 1, I, H);
}

bool lean_float(const at::Tensor& t, std::initializer_list<int64_t> shape) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes().equals(shape);
}

int64_t lean_peepholes(const Cfg& cf) {  // rows of the peephole weights (0: none)
  return cf.kind == LSTM && cf.peep ? (cf.coupled ? 2 : 3) : 0;
}

bool lean_weights_ok(const Cfg& cf, const at::Tensor& h, const at::Tensor& c,
                     const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                     const at::Tensor& b_hh, const at::Tensor& pw) {
  const int64_t H = cf.H, GH = cf.G * H, num_peep = lean_peepholes(cf);
  const bool has_bias = b_ih.defined();
  return lean_float(h, {1, H}) && lean_float(w_ih, {GH, cf.I}) && lean_float(w_hh, {GH, H}) &&
         (cf.kind != LSTM || (c.defined() && lean_float(c, {1, H}))) &&
         has_bias == b_hh.defined() &&
         (!has_bias || (lean_float(b_ih, {GH}) && lean_float(b_hh, {GH}))) &&
         (num_peep == 0 || (pw.defined() && lean_float(pw, {num_peep, H})));
}

// lean_loops' pointer arguments from the operators' tensors
const float* lean_peep_ptr(const Cfg& cf, const at::Tensor& pw) {
  return lean_peepholes(cf) > 0 ? pw.data_ptr<float>() : nullptr;
}
const float* lean_bhn_ptr(const Cfg& cf, const at::Tensor& b_hh) {
  return cf.kind == GRU && !cf.before && b_hh.defined() ? b_hh.data_ptr<float>() + 2 * cf.H
                                                        : nullptr;
}

// gates[0, GH) = the biases folded as forward_impl folds them: the reset-after GRU keeps b_hn
// for inside r (.)
void lean_fold_biases(const Cfg& cf, const at::Tensor& b_ih, const at::Tensor& b_hh,
                      float* gates) {
  const int64_t GH = cf.G * cf.H;
  if (!b_ih.defined()) {
    std::fill(gates, gates + GH, 0.0f);
    return;
  }
  const float* bi = b_ih.data_ptr<float>();
  const float* bh = b_hh.data_ptr<float>();
  const int64_t folded = cf.kind == GRU && !cf.before ? 2 * cf.H : GH;
  for (int64_t n = 0; n < GH; ++n) gates[n] = n < folded ? bi[n] + bh[n] : bi[n];
}

// The cell's forward loop over cf.T steps at batch 1, nothing saved: y (T, H) the outputs,
// h_n / c_n the state copies the loops keep (c_n holding c0 on entry), rec / aux the loops'
// scratch (the LSTM's recurrent product, the GRU's W_hn h or r h).
// pw: the peephole weights (null: none); b_hn: the reset-after GRU's b_hn (null: no bias).
void lean_loops(const Cfg& cf, float* gates, float* rec, float* aux, float* y, float* h_n,
                float* c_n, const float* h0, const RecW<float>& W, const float* pw,
                const float* b_hn) {
  const Reg<float> R;
  if (cf.kind == LSTM) {
    const float* p = lean_peepholes(cf) > 0 ? pw : nullptr;
    auto run = [&](auto peep, auto coupled) {
      lstm_fwd_loop<float, decltype(peep)::value, decltype(coupled)::value, false, false>(
          cf, gates, rec, y, nullptr, h_n, c_n, h0, W, p, R, 1);
    };
    if (cf.peep && cf.coupled) run(std::true_type{}, std::true_type{});
    else if (cf.peep) run(std::true_type{}, std::false_type{});
    else if (cf.coupled) run(std::false_type{}, std::true_type{});
    else run(std::false_type{}, std::false_type{});
  } else if (cf.kind == RNN) {
    rnn_fwd_loop<float>(cf, gates, y, h_n, h0, W, R, 1);
  } else if (!cf.before) {
    gru_after_fwd_loop<float>(cf, gates, y, h_n, aux, nullptr, h0, W, b_hn, R, 1, nullptr,
                              false);
  } else {
    gru_before_fwd_loop<float>(cf, gates, y, h_n, aux, false, h0, W, R, 1, nullptr, false);
  }
}

// The streaming step's short path: float32, batch 1, one thread. At batch 1 a step is two
// matrix-vector products and a pointwise update of a few µs; forward_op's generic set-up (about
// ten ATen calls through the dispatcher: contiguous copies, the folded-bias clone, the gates
// and state buffers, the bias broadcast) costs ~5 µs more. Here the only ATen calls are the two
// outputs' allocations; the folded bias, gates and recurrent products live in per-thread scratch
// reused across calls. The math is the layer's own: the same loops with T = 1, so the results
// are exactly forward_op's. False (nothing done) where the generic path must run.
bool step_lean(const Variant& v, const at::Tensor& x, const at::Tensor& h,
               const at::Tensor& c, const at::Tensor& w_ih, const at::Tensor& w_hh,
               const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& pw,
               int64_t nthreads, at::Tensor& h_out, at::Tensor& c_out,
               const at::Tensor& gemv_ih = at::Tensor(), const at::Tensor& gemv_hh = at::Tensor()) {
  if (x.dim() != 2 || x.size(0) != 1 || h.dim() != 2 || x.scalar_type() != at::kFloat) return false;
  const Cfg cf = lean_cfg(v, 1, x.size(1), h.size(1));
  const int64_t H = cf.H, GH = cf.G * H, I = cf.I;
  if (nthreads > 1 || pick_threads(cf, nthreads) != 1) return false;
  // anything unusual (shapes, dtypes, layouts) takes the generic path, which checks and says
  if (!lean_float(x, {1, I}) || !lean_weights_ok(cf, h, c, w_ih, w_hh, b_ih, b_hh, pw))
    return false;
  thread_local std::vector<float> scratch;
  scratch.resize(2 * GH + 2 * H);
  float* gates = scratch.data();  // (1, GH): x W_ih^T + folded biases
  float* rec = gates + GH;        // (1, GH): h W_hh^T (the LSTM's; the Elman's on odd calls)
  float* hst = rec + GH;          // (1, H): the state copy the loops keep
  float* aux = hst + H;           // (1, H): the GRU's W_hn h or r h
  // Streaming steps read both weights every call, W_ih then W_hh; together they are often
  // larger than L2 (H = 256: 2 MiB), so each call would start with rows evicted by the previous
  // one. Every other call (LSTM and Elman) reads them in the reverse order, W_hh last row to
  // first, then W_ih likewise: it starts with the rows the previous call read last, still in
  // L2 (as lstm_fwd_loop alternates W_hh's direction between steps). Each sum is the same
  // in either order: rec holds h W_hh^T and the loop adds it as it would its own product.
  thread_local uint64_t calls = 0;
  const bool reverse = (calls++ & 1) && cf.kind != GRU;
  // step_packed: both weights packed once by pack_gemv (one sequential stream each)
  const bool packed = is_packed_gemv(gemv_ih, cf.G, H, I) && is_packed_gemv(gemv_hh, cf.G, H, H);
  auto product = [&](const at::Tensor& a, const at::Tensor& w, const at::Tensor& pk, float* out,
                     bool acc) {
    const int64_t K = a.size(1);
    if (packed) gemv_packed(cf.G, H, K, a.data_ptr<float>(), pk.data_ptr<float>(), 0, out, acc);
    else gemm_bt<float>(1, GH, K, a.data_ptr<float>(), K, w.data_ptr<float>(), K, out, GH, acc);
  };
  // packed LSTM and Elman steps read both weights in one pass (gemv2_packed); the GRU's loops
  // form their recurrent products themselves
  const bool both = packed && cf.kind != GRU;
  if (reverse && !both) {
    g_rows_descending = true;
    product(h, w_hh, gemv_hh, rec, false);
  }
  lean_fold_biases(cf, b_ih, b_hh, gates);
  if (both) {
    g_rows_descending = reverse;
    gemv2_packed(cf.G, H, x.data_ptr<float>(), I, gemv_ih.data_ptr<float>(), h.data_ptr<float>(),
                 gemv_hh.data_ptr<float>(), gates, rec);
  } else {
    product(x, w_ih, gemv_ih, gates, true);
  }
  g_rows_descending = false;
  if ((reverse || both) && cf.kind == RNN)  // (rnn_fwd_loop accumulates its product into gates)
    for (int64_t n = 0; n < GH; ++n) gates[n] = gates[n] + rec[n];
  h_out = at::empty({1, H}, x.options());
  RecW<float> W{w_hh.data_ptr<float>(), H, true};
  W.done = reverse || both;
  if (packed) W.gemv = gemv_hh.data_ptr<float>();
  if (cf.kind == LSTM) {
    c_out = at::empty({1, H}, x.options());
    std::memcpy(c_out.data_ptr<float>(), c.data_ptr<float>(), H * sizeof(float));
  }
  lean_loops(cf, gates, rec, aux, h_out.data_ptr<float>(), hst,
             cf.kind == LSTM ? c_out.data_ptr<float>() : nullptr, h.data_ptr<float>(), W,
             lean_peep_ptr(cf, pw), lean_bhn_ptr(cf, b_hh));
  return true;
}

// rnnkit_fused::step: one time step of a streaming cell, x (B, I) -> (h, c). The same kernel
// as a layer of length 1 without saving anything, behind the smallest possible call.
std::tuple<at::Tensor, at::Tensor> step(int64_t kind, int64_t act, bool peep, bool coupled,
                                        bool before, const at::Tensor& x, const at::Tensor& h,
                                        const std::optional<at::Tensor>& c,
                                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                                        const std::optional<at::Tensor>& b_ih,
                                        const std::optional<at::Tensor>& b_hh,
                                        const std::optional<at::Tensor>& pw, int64_t nthreads) {
  TORCH_CHECK(x.dim() == 2, "x must be (B, I)");
  at::Tensor h_out, c_out;
  if (step_lean({kind, act, peep, coupled, before}, x, h, opt(c), w_ih, w_hh, opt(b_ih),
                opt(b_hh), opt(pw), nthreads, h_out, c_out))
    return {h_out, or_empty(c_out, x)};
  auto r = forward_op({kind, act, peep, coupled, before}, x.unsqueeze(0), h, opt(c), w_ih, w_hh,
                      opt(b_ih), opt(b_hh), opt(pw), {}, false, nthreads);
  return {std::get<1>(r), std::get<2>(r)};
}

// forward_packed's short path: float32, batch 1, one thread, both weights packed. forward_op's
// generic set-up (contiguous copies, the folded-bias clone, the gates, state and scratch tensors,
// the bias broadcast: about ten ATen calls, ~7 us of a call) becomes per-thread scratch reused
// across calls; the only ATen calls are the three outputs' allocations. The math is
// forward_impl's: the same products (gemm_packed, then each step's over the packed W_hh) and the
// same loops. False (nothing done) where forward_op must run.
constexpr int64_t kLeanScratch = 1 << 20;  // floats of gates kept per thread (4 MiB; more: per call)
bool forward_lean(const Variant& v, const at::Tensor& x, const at::Tensor& h0,
                  const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& pw,
                  const at::Tensor& gemv_ih, const at::Tensor& gemv_hh, int64_t nthreads,
                  at::Tensor& y, at::Tensor& h_n, at::Tensor& c_n) {
  if (x.dim() != 3 || x.size(0) < 1 || x.size(1) != 1 || h0.dim() != 2 ||
      x.scalar_type() != at::kFloat)
    return false;
  const Cfg cf = lean_cfg(v, x.size(0), x.size(2), h0.size(1));
  const int64_t T_ = cf.T, H = cf.H, G = cf.G, GH = G * H, I = cf.I;
  if (nthreads > 1 || pick_threads(cf, nthreads) != 1) return false;
  // anything unusual (shapes, dtypes, layouts) takes forward_op, which checks and says
  if (!lean_float(x, {T_, 1, I}) || !lean_weights_ok(cf, h0, c0, w_ih, w_hh, b_ih, b_hh, pw) ||
      !is_packed_gemv(gemv_ih, G, H, I) || !is_packed_gemv(gemv_hh, G, H, H))
    return false;
  thread_local std::vector<float> scratch;
  at::Tensor big;  // (gates of a long input: allocated per call rather than kept per thread)
  float* gates;    // (T, GH): x W_ih^T + folded biases
  if (T_ * GH <= kLeanScratch) {
    scratch.resize(T_ * GH + GH + H);
    gates = scratch.data();
  } else {
    big = at::empty({T_ * GH + GH + H}, x.options());
    gates = big.data_ptr<float>();
  }
  float* rec = gates + T_ * GH;  // (1, GH): the LSTM's recurrent product
  float* aux = rec + GH;         // (1, H): the GRU's W_hn h or r h
  lean_fold_biases(cf, b_ih, b_hh, gates);
  for (int64_t t = 1; t < T_; ++t) std::memcpy(gates + t * GH, gates, GH * sizeof(float));
  gemm_packed(T_, G, H, I, x.data_ptr<float>(), I, gemv_ih.data_ptr<float>(), gates, GH);
  y = at::empty({T_, 1, H}, x.options());
  h_n = at::empty({1, H}, x.options());  // (the loops' state copy: h_n at the end)
  std::memcpy(h_n.data_ptr<float>(), h0.data_ptr<float>(), H * sizeof(float));
  RecW<float> W{w_hh.data_ptr<float>(), H, true};
  W.gemv = gemv_hh.data_ptr<float>();
  if (cf.kind == LSTM) {
    c_n = at::empty({1, H}, x.options());
    std::memcpy(c_n.data_ptr<float>(), c0.data_ptr<float>(), H * sizeof(float));
  }
  lean_loops(cf, gates, rec, aux, y.data_ptr<float>(), h_n.data_ptr<float>(),
             cf.kind == LSTM ? c_n.data_ptr<float>() : nullptr, h0.data_ptr<float>(), W,
             lean_peep_ptr(cf, pw), lean_bhn_ptr(cf, b_hh));
  return true;
}

// rnnkit_fused::forward_packed: layer_forward for inference (nothing saved) whose batch-1
// products read gemv_ih = pack_gemv(w_ih) (the input projection of all steps, one GEMM) and
// gemv_hh = pack_gemv(w_hh) (each step's recurrent product); the inference plan packs them once
// per weight version. Returns (y, h_n, c_n); c_n empty for a cell without one.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_packed(
    int64_t kind, int64_t act, bool peep, bool coupled, bool before, const at::Tensor& x,
    const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& pw,
    const at::Tensor& gemv_ih, const at::Tensor& gemv_hh, int64_t nthreads) {
  at::Tensor y, h_n, c_n;
  if (forward_lean({kind, act, peep, coupled, before}, x, h0, opt(c0), w_ih, w_hh, opt(b_ih),
                   opt(b_hh), opt(pw), gemv_ih, gemv_hh, nthreads, y, h_n, c_n))
    return {y, h_n, or_empty(c_n, x)};
  auto r = forward_op({kind, act, peep, coupled, before}, x, h0, opt(c0), w_ih, w_hh, opt(b_ih),
                      opt(b_hh), opt(pw), {}, false, nthreads, {}, false, gemv_hh, gemv_ih);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

// rnnkit_fused::step_packed: step with both weights packed by pack_gemv (batch 1, float32, one
// thread: step_lean; anything else runs as step does and ignores the packed copies).
std::tuple<at::Tensor, at::Tensor> step_packed(
    int64_t kind, int64_t act, bool peep, bool coupled, bool before, const at::Tensor& x,
    const at::Tensor& h, const std::optional<at::Tensor>& c, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& pw,
    const at::Tensor& gemv_ih, const at::Tensor& gemv_hh, int64_t nthreads) {
  TORCH_CHECK(x.dim() == 2, "x must be (B, I)");
  at::Tensor h_out, c_out;
  if (step_lean({kind, act, peep, coupled, before}, x, h, opt(c), w_ih, w_hh, opt(b_ih),
                opt(b_hh), opt(pw), nthreads, h_out, c_out, gemv_ih, gemv_hh))
    return {h_out, or_empty(c_out, x)};
  return step(kind, act, peep, coupled, before, x, h, c, w_ih, w_hh, b_ih, b_hh, pw, nthreads);
}

// ---- The streaming step over one packed tensor (pack_step, step_stream) ---------------------
// A stream steps one cell many times with the same weights, one call per step at batch 1, where
// the call's fixed cost is a large part of the step: step_packed takes 16 arguments, and torch's
// operator call converts each from Python (~0.17 us per argument on the Zen 3 machine, measured:
// 5.5 us for a 16-argument operator that only allocates its two outputs, 3.3 us for 5
// arguments). pack_step therefore puts everything the step reads, once per weight version, into
// one float32 tensor, and step_stream takes four arguments: x, h, c and that tensor. Its layout
// (StepLayout): a 64-byte header (a tag, the variant, I and H — so the step needs no other
// argument and checks the tensors it is given against them), W_ih and W_hh in pack_gemv's layout
// (each panel 64-byte aligned), the biases folded as forward_impl folds them (copied per step
// instead of added), the reset-after GRU's b_hn, and the peephole weights.
constexpr int64_t kStepHeader = 16;      // floats
constexpr int32_t kStepTag = 0x31534b52;  // "RKS1": a tensor pack_step made
enum StepField { kTag, kKind, kAct, kPeep, kCoupled, kBefore, kBias, kInput, kHidden, kWidth,
                 kFields };

struct StepLayout {
  Variant v{};
  bool bias = false;
  int64_t I = 0, H = 0, G = 0, Hp = 0, P = 0;
  StepLayout(const Variant& variant, bool has_bias, int64_t input, int64_t hidden)
      : v(variant), bias(has_bias), I(input), H(hidden) {
    const Cfg cf = lean_cfg(v, 1, I, H);
    G = cf.G;
    Hp = gemv_padded(H);
    P = lean_peepholes(cf);
  }
  int64_t w_ih() const { return kStepHeader; }
  int64_t w_hh() const { return w_ih() + G * Hp * I; }
  int64_t folded() const { return w_hh() + G * Hp * H; }  // (G*H) b_ih + b_hh as folded
  int64_t b_hn() const { return folded() + G * H; }       // (H) the reset-after GRU's
  int64_t peep() const { return b_hn() + H; }             // (P, H)
  int64_t size() const { return peep() + P * H; }
};

// The layout a pack_step tensor describes; TORCH_CHECKs that it is one.
StepLayout step_layout(const at::Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 1 &&
                  packed.is_contiguous() && packed.numel() >= kStepHeader,
              "rnnkit_fused::step_stream: packed must be what pack_step returned");
  int32_t f[kFields];
  std::memcpy(f, packed.data_ptr<float>(), sizeof f);
  // (the kind and activation select loops, and pack_gemv's panel order depends on the vector
  // width of the build that packed it: a tensor from elsewhere is refused, never misread)
  TORCH_CHECK(f[kTag] == kStepTag && f[kKind] >= RNN && f[kKind] <= GRU && f[kAct] >= TANH &&
                  f[kAct] <= IDENTITY && f[kWidth] == int32_t(kGemvWidth) && f[kInput] > 0 &&
                  f[kHidden] > 0,
              "rnnkit_fused::step_stream: packed must be what pack_step returned in this process");
  const StepLayout L({f[kKind], f[kAct], f[kPeep] != 0, f[kCoupled] != 0, f[kBefore] != 0},
                     f[kBias] != 0, f[kInput], f[kHidden]);
  TORCH_CHECK(packed.numel() == L.size(), "rnnkit_fused::step_stream: packed must be what "
              "pack_step returned (its size does not match its header)");
  return L;
}

// rnnkit_fused::pack_step: the weights of one cell packed for step_stream (see above). Empty
// where there is no packed path (no AVX2: the caller steps with `step`).
at::Tensor pack_step(int64_t kind, int64_t act, bool peep, bool coupled, bool before,
                     const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                     const std::optional<at::Tensor>& b_ih_, const std::optional<at::Tensor>& b_hh_,
                     const std::optional<at::Tensor>& pw_) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_ih_.dim() == 2 && w_hh_.size(1) > 0,
              "pack_step: w_ih and w_hh must be (G*H, I) and (G*H, H)");
  const Variant v{kind, act, peep, coupled, before};
  const bool bias = b_ih_.has_value() && b_ih_->defined();
  const StepLayout L(v, bias, w_ih_.size(1), w_hh_.size(1));
  const Cfg cf = lean_cfg(v, 1, L.I, L.H);
  const at::Tensor w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  at::Tensor b_ih = opt(b_ih_), b_hh = opt(b_hh_), pw = opt(pw_);
  make_contiguous(b_ih);
  make_contiguous(b_hh);
  make_contiguous(pw);
  const at::Tensor h = at::empty({1, L.H}, w_hh.options());
  TORCH_CHECK(lean_weights_ok(cf, h, kind == LSTM ? h : at::Tensor(), w_ih, w_hh, b_ih, b_hh, pw),
              "pack_step: float32 weights of the variant's shapes expected");
  if (kGemvWidth == 0) return at::empty({0}, w_hh.options());
  at::Tensor out = at::zeros({L.size()}, w_hh.options());
  float* dst = out.data_ptr<float>();
  int32_t f[kFields] = {kStepTag, int32_t(kind), int32_t(act), peep, coupled, before, bias,
                        int32_t(L.I), int32_t(L.H), int32_t(kGemvWidth)};
  std::memcpy(dst, f, sizeof f);
  const at::Tensor pi = pack_gemv(w_ih, L.G), ph = pack_gemv(w_hh, L.G);
  std::memcpy(dst + L.w_ih(), pi.data_ptr<float>(), pi.numel() * sizeof(float));
  std::memcpy(dst + L.w_hh(), ph.data_ptr<float>(), ph.numel() * sizeof(float));
  lean_fold_biases(cf, b_ih, b_hh, dst + L.folded());
  if (const float* bhn = lean_bhn_ptr(cf, b_hh)) std::memcpy(dst + L.b_hn(), bhn, L.H * sizeof(float));
  if (L.P > 0) std::memcpy(dst + L.peep(), pw.data_ptr<float>(), L.P * L.H * sizeof(float));
  return out;
}

// rnnkit_fused::step_stream: one step at batch 1 of the cell pack_step packed, x (1, I), h and
// (LSTM) c (1, H) -> (h, c) (c empty for a cell without one). One thread: the step reads its
// weights once, at the bandwidth of one core. The math is step_lean's with both weights packed
// (the same products and loops, so the results are step_packed's), reading everything from the
// packed tensor.
std::tuple<at::Tensor, at::Tensor> step_stream(const at::Tensor& x_, const at::Tensor& h_,
                                               const std::optional<at::Tensor>& c_,
                                               const at::Tensor& packed) {
  const StepLayout L = step_layout(packed);
  const bool lstm = L.v.kind == LSTM;
  const int64_t H = L.H, GH = L.G * H, I = L.I;
  auto check = [](const at::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == 1 && t.size(1) == n,
                "rnnkit_fused::step_stream: ", name, " must be a float32 (1, ", n,
                ") tensor, got ", t.scalar_type(), " ", t.sizes());
  };
  check(x_, "x", I);
  check(h_, "h", H);
  TORCH_CHECK(c_.has_value() == lstm, "rnnkit_fused::step_stream: c must be given for an LSTM, "
              "and only for one");
  if (lstm) check(*c_, "c", H);
  const at::Tensor x = x_.contiguous(), h = h_.contiguous();
  const Cfg cf = lean_cfg(L.v, 1, I, H);
  const float* blob = packed.data_ptr<float>();
  thread_local std::vector<float> scratch;
  scratch.resize(2 * GH + 2 * H);
  float* gates = scratch.data();  // (1, GH): folded biases + x W_ih^T
  float* rec = gates + GH;        // (1, GH): h W_hh^T (LSTM, Elman)
  float* hst = rec + GH;          // (1, H): the state copy the loops keep
  float* aux = hst + H;           // (1, H): the GRU's W_hn h or r h
  std::memcpy(gates, blob + L.folded(), GH * sizeof(float));
  // every other call reads the weights last panel first (see step_lean)
  thread_local uint64_t calls = 0;
  const bool reverse = (calls++ & 1) && cf.kind != GRU;
  if (cf.kind != GRU) {
    g_rows_descending = reverse;
    gemv2_packed(L.G, H, x.data_ptr<float>(), I, blob + L.w_ih(), h.data_ptr<float>(),
                 blob + L.w_hh(), gates, rec);
    g_rows_descending = false;
    if (cf.kind == RNN)  // (rnn_fwd_loop accumulates its product into gates)
      for (int64_t n = 0; n < GH; ++n) gates[n] = gates[n] + rec[n];
  } else {  // (the GRU's loops form their recurrent products themselves, from the packed W_hh)
    gemv_packed(L.G, H, I, x.data_ptr<float>(), blob + L.w_ih(), 0, gates, true);
  }
  at::Tensor h_out = at::empty({1, H}, x.options()), c_out;
  RecW<float> W{nullptr, H, true};  // (batch 1, whole gates: RecW::mm reads W.gemv only)
  W.done = cf.kind != GRU;
  W.gemv = blob + L.w_hh();
  if (lstm) {
    c_out = at::empty({1, H}, x.options());
    const at::Tensor c = c_->contiguous();
    std::memcpy(c_out.data_ptr<float>(), c.data_ptr<float>(), H * sizeof(float));
  }
  lean_loops(cf, gates, rec, aux, h_out.data_ptr<float>(), hst,
             lstm ? c_out.data_ptr<float>() : nullptr, h.data_ptr<float>(), W,
             L.P > 0 ? blob + L.peep() : nullptr,
             cf.kind == GRU && !cf.before && L.bias ? blob + L.b_hn() : nullptr);
  return {h_out, or_empty(c_out, x)};
}

// rnnkit_fused::layer_backward: the hand-derived BPTT of layer_forward.
// Returns (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dpeep); empty where not asked for / absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
layer_backward(int64_t kind, int64_t act, bool peep, bool coupled, bool before,
               const at::Tensor& x_, const at::Tensor& h0_, const std::optional<at::Tensor>& c0_,
               const at::Tensor& w_ih_, const at::Tensor& w_hh_,
               const std::optional<at::Tensor>& pw_,
               const std::optional<at::Tensor>& recurrent_mask,
               const std::optional<at::Tensor>& zoneout_h,
               const std::optional<at::Tensor>& zoneout_c, bool has_bias,
               at::IntArrayRef batch_sizes,
               const at::Tensor& y_, const at::Tensor& acts_, const at::Tensor& cs_,
               const at::Tensor& extra_, const at::Tensor& gy_,
               const std::optional<at::Tensor>& ghT_, const std::optional<at::Tensor>& gcT_,
               bool need_dx, bool need_dw, int64_t nthreads, bool bf16) {
  at::Tensor x = x_.contiguous(), h0 = h0_.contiguous(), w_ih = w_ih_.contiguous(),
             w_hh = w_hh_.contiguous(), y = y_.contiguous(), acts = acts_.contiguous(),
             gy = gy_;  // (made contiguous a chunk at a time by backward_impl)
  at::Tensor c0 = opt(c0_), pw = opt(pw_), cs = cs_.contiguous(), extra = extra_.contiguous(),
             gh = opt(ghT_), gc = opt(gcT_);
  make_contiguous(c0);
  make_contiguous(pw);
  make_contiguous(gh);
  make_contiguous(gc);
  const int64_t H = h0.size(1);
  Cfg cf = make_cfg(kind, act, peep, coupled, before, x, H, batch_sizes.vec());
  const Masks masks = check_masks(cf, x, recurrent_mask, zoneout_h, zoneout_c);
  // (an Elman layer without zoneout of h saves no activations: its backward reads them from y)
  const bool acts_in_y = cf.kind == RNN && !masks.keep_h.defined();
  TORCH_CHECK(acts.numel() == (acts_in_y ? 0 : cf.T * cf.B * cf.G * H),
              "layer_backward needs the activations of layer_forward(training=True)");
  TORCH_CHECK(gy.dim() == 3 && gy.size(0) == cf.T && gy.size(1) == cf.B && gy.size(2) == H,
              "grad_y must be (T, B, H)");
  const int nt_all = nthreads > 0 ? static_cast<int>(nthreads) : at::get_num_threads();
  const int nt = pick_threads(cf, nthreads);
  std::vector<at::Tensor> r;
  TORCH_CHECK(!bf16 || x.scalar_type() == at::kFloat, "bf16 mode takes float32 tensors");
  if (x.scalar_type() == at::kFloat)
    r = backward_impl<float>(cf, x, h0, c0, w_ih, w_hh, pw, has_bias, y, acts, cs, extra, gy, gh,
                             gc, masks.recurrent, masks.keep_h, masks.keep_c, need_dx, need_dw, nt,
                             nt_all, bf16);
  else
    r = backward_impl<double>(cf, x, h0, c0, w_ih, w_hh, pw, has_bias, y, acts, cs, extra, gy,
                              gh, gc, masks.recurrent, masks.keep_h, masks.keep_c, need_dx,
                              need_dw, nt, nt_all);
  // backward_impl shares one tensor for db_ih and db_hh where they are equal; outputs of an
  // operator must not alias each other.
  if (r[5].defined() && r[6].defined() && r[6].is_same(r[5])) r[6] = r[5].clone();
  return {or_empty(r[0], x), r[1], or_empty(r[2], x), or_empty(r[3], x), or_empty(r[4], x),
          or_empty(r[5], x), or_empty(r[6], x), or_empty(r[7], x)};
}

// A BLAS entry point of the library torch links. Python loads libtorch_cpu with RTLD_LOCAL, so
// its symbols (MKL's sgemm_ & co. in the CPU wheels) are not in the global scope that
// dlsym(RTLD_DEFAULT) searches: look in libtorch_cpu itself (already loaded) first.
void* blas_symbol(const char* name) {
  static void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* symbol = torch_cpu ? dlsym(torch_cpu, name) : nullptr;
  return symbol ? symbol : dlsym(RTLD_DEFAULT, name);
}

void resolve_blas() {
  g_sgemm = reinterpret_cast<sgemm_t>(blas_symbol("sgemm_"));
  g_dgemm = reinterpret_cast<dgemm_t>(blas_symbol("dgemm_"));
  g_sgemv = reinterpret_cast<sgemv_t>(blas_symbol("sgemv_"));
  g_dgemv = reinterpret_cast<dgemv_t>(blas_symbol("dgemv_"));
}

// The float32 GEMM of gemm_rm for this CPU, decided once at start-up: gemm_own where
// own_gemm_fits_cpu (the rule, in own_gemm.h: AVX2 without AVX-512; here forward and
// forward+backward of the fused layers took 0.6-0.97x brgemm's time at H >= 256, Zen 3, 1 thread,
// session 9); else brgemm where torch has it (AVX-512 CPUs), else BLAS (or the plain loop).
Gemm choose_gemm() {
  const bool brgemm = probe_brgemm();
  if (own_gemm_fits_cpu()) return Gemm::OWN;
  if (brgemm) return Gemm::BRGEMM;
  return g_sgemm ? Gemm::BLAS : Gemm::LOOP;
}

// The recurrent weight's panel width for GEMM g (g_rec_panel).
int64_t rec_panel_for(Gemm g) {
#ifdef RNNKIT_OWN_GEMM
  if (g == Gemm::OWN) return kOwnCols;
#endif
  (void)g;
  return 128;
}

const char* gemm_name(Gemm g) {
  switch (g) {
    case Gemm::OWN: return "own";
    case Gemm::BRGEMM: return "brgemm";
    case Gemm::BLAS: return "blas";
    default: return "loop";
  }
}

bool init() {
  resolve_blas();
  g_gemm = choose_gemm();
  g_rec_panel = rec_panel_for(g_gemm);
  return g_gemm == Gemm::BRGEMM || g_gemm == Gemm::OWN;
}

// For benchmarks/tests: choose the single-thread float32 GEMM ("auto": choose_gemm's, "own",
// "brgemm", "blas" or "loop"; one this build or CPU lacks falls back as choose_gemm does).
// Returns the one in use. (set_gemm_op also sets the recurrent panel width that GEMM is run
// with: weights packed by pack_weights before it must be packed again.)
std::string set_gemm(const std::string& which) {
  TORCH_CHECK(which == "auto" || which == "own" || which == "brgemm" || which == "blas" ||
                  which == "loop",
              "set_gemm: \"auto\", \"own\", \"brgemm\", \"blas\" or \"loop\", not \"", which, "\"");
  if (which == "loop") {
    g_sgemm = nullptr;
    g_dgemm = nullptr;
    g_sgemv = nullptr;
    g_dgemv = nullptr;
  } else {
    resolve_blas();
  }
  g_gemm = choose_gemm();
  if (which == "brgemm" && probe_brgemm()) g_gemm = Gemm::BRGEMM;
  else if (which == "blas" || which == "loop") g_gemm = g_sgemm ? Gemm::BLAS : Gemm::LOOP;
#ifdef RNNKIT_OWN_GEMM
  else if (which == "own") g_gemm = Gemm::OWN;
#endif
  return gemm_name(g_gemm);
}

// For benchmarks/tests: gemm_own's K chunk (0: all of K in one) and the least row count at which
// it packs B (0: never); negative keeps a setting. Returns the previous (kc, pack_rows).
std::tuple<int64_t, int64_t> set_own_gemm(int64_t kc, int64_t pack_rows) {
#ifdef RNNKIT_OWN_GEMM
  const auto previous = std::make_tuple(g_own_kc, g_own_pack_rows);
  if (kc >= 0) g_own_kc = kc;
  if (pack_rows >= 0) g_own_pack_rows = pack_rows;
  return previous;
#else
  (void)kc, (void)pack_rows;
  return {0, 0};
#endif
}

// For benchmarks/tests: `repeats` times C (+)= A B through gemm_rm with the GEMM `which` (as
// set_gemm), float32, each operand read with its row stride (lda, ldb, ldc; unit column stride).
// panel > 0: B holds W^T in column panels of that width (pack_panels' layout, as RecW::panels
// reads it) and the product runs one call per panel, as panels() does; kb > 0: K in chunks of
// kb, one call each (as pgemm). Returns the thread's CPU seconds for all repeats.
double gemm_run(c10::string_view which, const at::Tensor& A, const at::Tensor& B, at::Tensor C,
                bool acc, int64_t panel, int64_t kb, int64_t repeats) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat &&
                  C.scalar_type() == at::kFloat && A.dim() == 2 && C.dim() == 2 &&
                  A.stride(1) == 1 && C.stride(1) == 1 && B.stride(-1) == 1,
              "gemm_run takes float32 A (M, K), B, C (M, N) with unit column strides");
  const int64_t M = A.size(0), K = A.size(1), N = C.size(1);
  TORCH_CHECK(C.size(0) == M, "gemm_run: C must have A's rows");
  TORCH_CHECK(panel > 0 ? B.is_contiguous() && B.numel() == K * N
                        : B.dim() == 2 && B.size(0) == K && B.size(1) == N,
              "gemm_run: B must be (K, N), or K*N contiguous floats when panel-packed");
  const Gemm saved = g_gemm;
  const std::string got = set_gemm(std::string(which));
  TORCH_CHECK(got == std::string(which), "gemm_run: ", which, " is not available here");
  const float* a = A.data_ptr<float>();
  const float* b = B.data_ptr<float>();
  float* c = C.data_ptr<float>();
  const int64_t lda = A.stride(0), ldb = panel > 0 ? 0 : B.stride(0), ldc = C.stride(0);
  const int64_t KB = kb > 0 ? kb : std::max<int64_t>(K, 1);
  timespec t0{}, t1{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  for (int64_t r = 0; r < repeats; ++r) {
    if (panel > 0) {
      for (int64_t n0 = 0; n0 < N; n0 += panel) {
        const int64_t np = std::min(panel, N - n0);
        gemm_rm(M, np, K, a, lda, b + n0 * K, np, c + n0, ldc, acc);
      }
    } else {
      for (int64_t k0 = 0; k0 < K; k0 += KB)
        gemm_rm(M, N, std::min(KB, K - k0), a + k0, lda, b + k0 * ldb, ldb, c, ldc,
                acc || k0 > 0);
    }
  }
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  g_gemm = saved;
  resolve_blas();
  return static_cast<double>(t1.tv_sec - t0.tv_sec) + 1e-9 * static_cast<double>(t1.tv_nsec - t0.tv_nsec);
}

// For tests/benchmarks: force the backward's chunk to `steps` time steps (0: automatic);
// returns the previous setting.
int64_t set_backward_chunk(int64_t steps) {
  TORCH_CHECK(steps >= 0, "set_backward_chunk: steps must be >= 0");
  const int64_t previous = g_backward_chunk;
  g_backward_chunk = steps;
  return previous;
}

// For tests/benchmarks: how loop threads split a time loop, "auto", "hidden" or "batch" (see
// Split); returns the previous setting.
std::string set_thread_split(c10::string_view which) {
  static const char* const names[] = {"auto", "hidden", "batch"};
  const std::string previous = names[static_cast<int>(g_split)];
  if (which == "auto") g_split = Split::AUTO;
  else if (which == "hidden") g_split = Split::HIDDEN;
  else if (which == "batch") g_split = Split::BATCH;
  else
    TORCH_CHECK(false, "set_thread_split: \"auto\", \"hidden\" or \"batch\", not \"", which,
                "\"");
  return previous;
}

bool init_op() { return init(); }
// Whether bf16 mode can run: the micro-kernel exists and computes what pack_vnni packs.
bool bf16_available_op() {
  static const bool ok = probe_bf16();
  return ok;
}
std::string set_gemm_op(c10::string_view which) {
  const std::string got = set_gemm(std::string(which));
  g_rec_panel = rec_panel_for(g_gemm);
  return got;
}
// Which layout pack_weights makes now: it follows the GEMM in use (pack_input's panels under
// gemm_own, pack_recurrent's panel width g_rec_panel), which set_gemm changes. The inference plan
// (engine/fused/inference.py) keys its packed weights by this number, so that weights packed
// before a set_gemm are never read as if packed after it.
int64_t gemm_layout_op() { return static_cast<int64_t>(g_gemm) * 1024 + g_rec_panel; }

}  // namespace

// The variant arguments (kind: 0 rnn, 1 lstm, 2 gru; act: 0 tanh, 1 relu, 2 sigmoid) come first;
// rnnkit.engine.fused._ops registers the fake (shape) kernels and the autograd formula.
#define RNNKIT_VARIANT "int kind, int act, bool peephole, bool coupled, bool reset_before, "
TORCH_LIBRARY(rnnkit_fused, m) {
  m.def("layer_forward(" RNNKIT_VARIANT
        "Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? peephole_weights, Tensor? recurrent_mask, Tensor? zoneout_h, Tensor? zoneout_c, "
        "int[] batch_sizes, bool training, int threads, bool bf16=False) -> "
        "(Tensor y, Tensor h_n, Tensor c_n, Tensor acts, Tensor cells, Tensor extra)");
  m.def("layer_backward(" RNNKIT_VARIANT
        "Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? peephole_weights, "
        "Tensor? recurrent_mask, Tensor? zoneout_h, Tensor? zoneout_c, "
        "bool has_bias, int[] batch_sizes, Tensor y, Tensor acts, Tensor cells, Tensor extra, "
        "Tensor grad_y, Tensor? grad_h_n, Tensor? grad_c_n, bool need_dx, bool need_dw, "
        "int threads, bool bf16=False) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("step(" RNNKIT_VARIANT
        "Tensor x, Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? peephole_weights, int threads) -> (Tensor h, Tensor c)");
  m.def("pack_gemv(Tensor w, int gates) -> Tensor");
  m.def("forward_packed(" RNNKIT_VARIANT
        "Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? peephole_weights, Tensor gemv_ih, Tensor gemv_hh, int threads) -> "
        "(Tensor y, Tensor h_n, Tensor c_n)");
  m.def("step_packed(" RNNKIT_VARIANT
        "Tensor x, Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? peephole_weights, Tensor gemv_ih, Tensor gemv_hh, int threads) -> "
        "(Tensor h, Tensor c)");
  m.def("pack_step(" RNNKIT_VARIANT "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? peephole_weights) -> Tensor");
  m.def("step_stream(Tensor x, Tensor h, Tensor? c, Tensor packed) -> (Tensor h, Tensor c)");
  m.def("pack_weights(" RNNKIT_VARIANT "Tensor w_ih, Tensor w_hh) -> (Tensor w_ih_t, "
        "Tensor w_hh_packed)");
  m.def("layer_forward_packed(" RNNKIT_VARIANT
        "Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? peephole_weights, Tensor w_ih_t, Tensor w_hh_packed, int[] batch_sizes, "
        "int threads) -> (Tensor y, Tensor h_n, Tensor c_n)");
  m.def("init() -> bool");
  m.def("bf16_available() -> bool");
  m.def("set_gemm(str which) -> str");
  m.def("gemm_layout() -> int");
  m.def("set_own_gemm(int kc, int pack_rows) -> (int, int)");
  m.def("gemm_run(str which, Tensor A, Tensor B, Tensor(a!) C, bool acc, int panel, int kb, "
        "int repeats) -> float");
  m.def("set_backward_chunk(int steps) -> int");
  m.def("set_thread_split(str which) -> str");
  m.impl("layer_forward", c10::DispatchKey::CPU, TORCH_FN(layer_forward));
  m.impl("layer_backward", c10::DispatchKey::CPU, TORCH_FN(layer_backward));
  m.impl("step", c10::DispatchKey::CPU, TORCH_FN(step));
  m.impl("pack_gemv", c10::DispatchKey::CPU, TORCH_FN(pack_gemv));
  m.impl("forward_packed", c10::DispatchKey::CPU, TORCH_FN(forward_packed));
  m.impl("step_packed", c10::DispatchKey::CPU, TORCH_FN(step_packed));
  m.impl("pack_step", c10::DispatchKey::CPU, TORCH_FN(pack_step));
  m.impl("step_stream", c10::DispatchKey::CPU, TORCH_FN(step_stream));
  m.impl("pack_weights", c10::DispatchKey::CPU, TORCH_FN(pack_weights));
  m.impl("layer_forward_packed", c10::DispatchKey::CPU, TORCH_FN(layer_forward_packed));
  m.impl("init", c10::DispatchKey::CatchAll, TORCH_FN(init_op));
  m.impl("bf16_available", c10::DispatchKey::CatchAll, TORCH_FN(bf16_available_op));
  m.impl("set_gemm", c10::DispatchKey::CatchAll, TORCH_FN(set_gemm_op));
  m.impl("gemm_layout", c10::DispatchKey::CatchAll, TORCH_FN(gemm_layout_op));
  m.impl("set_own_gemm", c10::DispatchKey::CatchAll, TORCH_FN(set_own_gemm));
  m.impl("gemm_run", c10::DispatchKey::CPU, TORCH_FN(gemm_run));
  m.impl("set_backward_chunk", c10::DispatchKey::CatchAll, TORCH_FN(set_backward_chunk));
  m.impl("set_thread_split", c10::DispatchKey::CatchAll, TORCH_FN(set_thread_split));
}
