// The time loop of the layer-normalised LSTM and GRU (issue 12; math in cells/layer_norm.py).
//
//   input side:  every layer gets the raw projection x W_ih^T (T, B, G*H) and normalises each
//                row in the loop, the input LN's backward too (the reset-before GRU in the
//                backward's second pass over the rows, where its d(gx_r) is formed, after the
//                n block's product); rnnkit_ln::step gets gx = LN(x W_ih^T) (no in_w)
//   forward:     per step a = h_{t-1} W_hh^T, LN over each row, the gates, (LSTM) LN of the cell
//   backward:    the hand-derived step backward in reverse time; it returns d(gx) (the LSTM:
//                d(x W_ih^T)) and d(a) (the gradient before the recurrent LN); the W_hh
//                gradient is then one GEMM over the rows in Python (all T*B, or a ragged
//                batch's rows that run: Packed, packed.h)
//                (engine/fused/_layer_norm.py); the LN gains' and biases' and the peepholes'
//                gradients are summed in the loop, per thread
//
// Threads split the *batch*: a row's LN needs all G*H columns of that row, and rows never
// interact, so each thread runs every step for its own rows with no barrier at all (the
// hidden-unit split of fused_rnn.cpp needs one barrier per step). The per-step GEMMs are
// at::mm calls on the thread's row block, which ATen runs single-threaded inside the region.
//
// Rows are sorted longest first; batch_sizes[t] rows are active at step t (empty: all). Rows
// past their length keep their state and output 0, as every rnnkit backend.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../../csrc/blas.h"  // (and own_gemm.h)
#include "../../csrc/checks.h"
#include "../../csrc/pointwise.h"
#include "few_rows.h"
#include "packed.h"

namespace {

using at::Tensor;
constexpr double kEps = 1e-5;  // F.layer_norm's default (cells/layer_norm.py EPS)

enum Kind : int64_t { kLSTM = 1, kGRU = 2 };

// Saved per row and step (stats): 1/sigma of the recurrent LN (GRU-before: of its r, z blocks),
// 1/sigma of the cell LN (GRU-before: of the n block), and the mean and 1/sigma of the input LN
// where the kernel normalises the input itself (see ln_layer_forward).
constexpr int64_t kStats = 4;

struct Variant {
  int64_t kind;
  bool peephole, coupled, before;
  int64_t gates() const { return kind == kLSTM ? (coupled ? 3 : 4) : 3; }
};

// sum over j < n of f(j), in 16 independent lanes: the compiler vectorises that without
// -ffast-math (a single accumulator is a serial dependency it may not reorder), and 16 partial
// sums are also more accurate than one.
template <typename T, typename F>
inline T lane_sum(int64_t n, const F& f) {
  constexpr int64_t L = 16;
  T acc[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t k = 0; k < L; ++k) acc[k] += f(j + k);
  T s = 0;
  for (; j < n; ++j) s += f(j);
  for (int64_t k = 0; k < L; ++k) s += acc[k];
  return s;
}

// The mean and 1/sigma of one row of n columns (two passes: the mean, then the variance about it,
// as torch's CPU layer norm).
template <typename T>
inline void ln_stats(const T* a, int64_t n, T* mean_out, T* rstd_out) {
  const T mean = lane_sum<T>(n, [&](int64_t j) { return a[j]; }) / static_cast<T>(n);
  const T var = lane_sum<T>(n, [&](int64_t j) {
    const T d = a[j] - mean;
    return d * d;
  }) / static_cast<T>(n);
  *mean_out = mean;
  *rstd_out = static_cast<T>(1) / std::sqrt(var + static_cast<T>(kEps));
}

// y = w * (a - mean) * rstd + b over one row of n columns; keeps a_hat and rstd.
template <typename T>
inline void ln_row(const T* a, const T* w, const T* b, int64_t n, T* y, T* a_hat, T* rstd_out) {
  T mean, rstd;
  ln_stats(a, n, &mean, &rstd);
  for (int64_t j = 0; j < n; ++j) {
    const T h = (a[j] - mean) * rstd;
    a_hat[j] = h;
    y[j] = h * w[j] + b[j];
  }
  *rstd_out = rstd;
}

// da = rstd * (g - mean(g) - a_hat * mean(g * a_hat)), g = dy * w (layer_norm_backward).
template <typename T>
inline void ln_row_backward(const T* dy, const T* a_hat, T rstd, const T* w, int64_t n, T* da) {
  const T mean_g = lane_sum<T>(n, [&](int64_t j) { return dy[j] * w[j]; }) / static_cast<T>(n);
  const T mean_ga =
      lane_sum<T>(n, [&](int64_t j) { return dy[j] * w[j] * a_hat[j]; }) / static_cast<T>(n);
  for (int64_t j = 0; j < n; ++j) da[j] = rstd * (dy[j] * w[j] - mean_g - a_hat[j] * mean_ga);
}

// ln_row_backward and accumulate_ln (below) together in two passes over the row instead of four:
// the first forms both means and adds the row's gain and bias gradients to acc (acc[0:n] += dy *
// a_hat, acc[n:2n] += dy), the second writes da. da may be dy (in place).
template <typename T>
inline void ln_row_backward_acc(const T* dy, const T* a_hat, T rstd, const T* w, int64_t n, T* da,
                                T* __restrict__ acc) {
  constexpr int64_t L = 16;  // (independent lanes, as lane_sum)
  T s_g[L] = {}, s_ga[L] = {};
  T* __restrict__ acc_w = acc;
  T* __restrict__ acc_b = acc + n;
  T mean_g = 0, mean_ga = 0;
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t k = 0; k < L; ++k) {
      const T d = dy[j + k], h = a_hat[j + k], g = d * w[j + k];
      s_g[k] += g;
      s_ga[k] += g * h;
      acc_w[j + k] += d * h;
      acc_b[j + k] += d;
    }
  for (; j < n; ++j) {
    const T d = dy[j], h = a_hat[j], g = d * w[j];
    mean_g += g;
    mean_ga += g * h;
    acc_w[j] += d * h;
    acc_b[j] += d;
  }
  for (int64_t k = 0; k < L; ++k) {
    mean_g += s_g[k];
    mean_ga += s_ga[k];
  }
  mean_g /= static_cast<T>(n);
  mean_ga /= static_cast<T>(n);
  for (j = 0; j < n; ++j) da[j] = rstd * (dy[j] * w[j] - mean_g - a_hat[j] * mean_ga);
}

// The BLAS, brgemm and GEMM-choice pieces are engine/csrc/blas.h's, shared with fused_rnn.cpp,
// and the few-row products (gemv_rows, few_rows_strips) few_rows.h's; what is this file's own
// is how its products use them (gemm_rm below: brgemm for < 4 rows of B as stored, gemm_own
// through own_mm, brgemm in 256 x 256 blocks), and that nothing here changes the choice after
// start-up (fused_rnn.cpp's set_gemm does not reach this extension).
using rnnkit::brgemm_works;
using rnnkit::Gemm;

// The BLAS entry points of the library torch links, resolved once.
const rnnkit::Blas& blas() {
  static const rnnkit::Blas b = rnnkit::resolve_blas();
  return b;
}

// The float32 GEMM for this CPU by the rule fused_rnn.cpp's init applies (rnnkit::choose_gemm),
// decided once.
Gemm float_gemm() {
  static const Gemm g = rnnkit::choose_gemm(blas().sgemm != nullptr);
  return g;
}

// Whether float32 products run through rnnkit's own AVX2 GEMM (gemm_own, own_gemm.h) rather than
// oneDNN's brgemm (choose_gemm: on the CPUs own_gemm_fits_cpu names).
bool use_own_gemm() { return float_gemm() == Gemm::OWN; }

// brgemm_rm's blocks here: 256 columns x 256 rows of B, which stay in cache for every step's
// call. MKL's sgemm_ packs B again on every call: the per-step products of this file (B = W_hh,
// the same every step) spent a fifth of their time packing (perf, T,B,H = 100,32,256, 1
// thread), which oneDNN's LSTM and fused_rnn.cpp do not. (fused_rnn.cpp's gemm_rm chunks K only
// past 512 and keeps one column block: each caller's own measured blocking, see brgemm_rm.)
constexpr int64_t kBrgemmCols = 256, kBrgemmDepth = 256;

#ifdef RNNKIT_OWN_GEMM
// rnnkit::gemm_own with its tiles compiled into this one function (flatten). gemm_own keeps a
// tile's 12 accumulators in registers only where GCC inlines own_tile into its caller: an
// out-of-line own_tile (GCC's choice per file and per number of call sites) stored all of them
// to the stack at every k, and the tile ran at the rate of those stores. perf, GRU-LN 100,32,256
// forward, 1 thread: the per-step weight packed once (StepB) made GCC leave own_tile<6> out of
// line, 12 vmovaps to (%rsp) per k in its loop, and the forward ran 71 ms against 52 ms with
// gemm_own's own per-call packing (the unexplained regression of session 9's 371519b).
__attribute__((flatten)) void own_mm(int64_t M, int64_t N, int64_t K, const float* A,
                                     int64_t lda, const float* B, int64_t ldb, float* C,
                                     int64_t ldc) {
  rnnkit::gemm_own(M, N, K, A, lda, B, ldb, C, ldc, false);
}
#endif

// Whether a product of M rows over B as stored runs through gemm_own (use_own_gemm): with
// brgemm at hand, not below 4 rows, where gemm_own's tile holds 2-6 accumulators, fewer than the
// FMA latency x 2 pipes needs (8) (speed.py, 1 thread, loaded: LSTM-LN 200,1,64 forward 0.85 ms
// through gemm_own, 0.71 through brgemm). The loops' per-step products over W_hh packed in
// strips (StepB) run their 1-3 rows through few_rows_strips instead, as fused_rnn.cpp's.
bool own_rows(int64_t M) { return use_own_gemm() && (M >= 4 || !brgemm_works()); }

// Whether gemm_rm has a micro-kernel for float (gemm_own or brgemm).
bool fast_sgemm() { return float_gemm() == Gemm::OWN || float_gemm() == Gemm::BRGEMM; }

// Row-major C(M, N) = A(M, K) B(K, N), float, M, N, K > 0: gemm_own where own_rows, else
// brgemm in kBrgemmCols x kBrgemmDepth blocks. Only with a micro-kernel (fast_sgemm()).
inline void fast_sgemm_rm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                          const float* B, int64_t ldb, float* C, int64_t ldc) {
#ifdef RNNKIT_OWN_GEMM
  if (own_rows(M)) return own_mm(M, N, K, A, lda, B, ldb, C, ldc);
#endif
  rnnkit::brgemm_rm(M, N, K, A, lda, B, ldb, C, ldc, false, kBrgemmCols, kBrgemmDepth);
}

// Row-major C(M, N) = A(M, K) B(K, N), single-threaded: a micro-kernel for float (fast_sgemm_rm),
// else one BLAS call (rnnkit::blas_gemm) per step and row block, else the plain loop.
template <typename T>
inline void gemm_rm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if constexpr (std::is_same<T, float>::value) {
    if (K > 0 && fast_sgemm()) return fast_sgemm_rm(M, N, K, A, lda, B, ldb, C, ldc);
    if (blas().sgemm) return rnnkit::blas_gemm(blas().sgemm, M, N, K, A, lda, B, ldb, C, ldc, false);
  } else {
    if (blas().dgemm) return rnnkit::blas_gemm(blas().dgemm, M, N, K, A, lda, B, ldb, C, ldc, false);
  }
  rnnkit::loop_gemm(M, N, K, A, lda, B, ldb, C, ldc, false);
}

// At most this many rows take gemv_rows (few_rows.h) in a single step: it reads W once per
// block of 8 of its rows for all of them, but holds no rows of A in registers as a GEMM tile
// does, so many rows run at a fraction of the GEMM's rate (the transposed copy of W then pays).
// A single step's products at a few rows read W as stored: there W^T packed or transposed for a
// GEMM costs a copy of the weight, more than the product, which reads it once.
constexpr int64_t kGemvRowsMax = 4;

// The B operand (K, N), row-major, of a product that every step of the time loop repeats (W_hh^T
// in the forward, W_hh in the backward), as the steps read it. With gemm_own (float32,
// use_own_gemm) it is packed once per call into zero-padded 16-column strips, strip s the
// (K, 16) block of columns [16 s, 16 s + 16) at s K 16, in a 64-byte-aligned tensor, and each
// step runs one gemm_own per strip with ldb = 16, which gemm_own reads in place: as fused_rnn.cpp
// packs W_hh (RecW::panels). Read as stored instead, gemm_own copied all of B into strips at
// every step with 12+ rows (a 640 KiB copy per step at 35,20,200), or with fewer rows read rows
// ldb floats apart that fall into a few L1 sets. Only for a loop of 2+ steps: for one step (a
// streaming cell step) the packing copies as much as gemm_own's per-call packing and more than
// the product reads (speed.py, 1 thread, loaded: LSTM-LN 1,1,256 single step 0.65 -> 0.98 ms
// packed). 1-3 rows take few_rows_strips (few_rows.h: several strips per tile, 8+ accumulators),
// as fused_rnn.cpp's RecW::panels: in-process A/B against brgemm, 1 thread, CPU time, min of
// 200, loaded: LSTM-LN forward 200,1,64 0.35 -> 0.32 ms, 200,3,256 11.6 -> 6.6, 100,1,256 5.7
// -> 2.6; GRU-LN 200,1,64 0.27 -> 0.23, 100,1,256 2.3 -> 1.75. Otherwise (one step, float64,
// brgemm) gemm_rm as stored.
template <typename T>
struct StepB {
  const T* b;  // B as stored, leading dimension N
  int64_t K, N;
  Tensor strips;  // (undefined: gemm_rm on b)
  const T* w_rows = nullptr;  // (set: B = W^T with W (N, K) as stored, leading dimension ldw,
  int64_t ldw = 0;            // gemv_rows; see rows_of)

  // B = W^T for W (N, K) rows of leading dimension ldw read as stored (gemv_rows): no copy
  static StepB rows_of(const T* w, int64_t K, int64_t N, int64_t ldw) {
    StepB s(nullptr, K, N, 1, at::TensorOptions());
    s.w_rows = w;
    s.ldw = ldw;
    return s;
  }

  StepB(const T* b_, int64_t K_, int64_t N_, int64_t steps, const at::TensorOptions& opts)
      : b(b_), K(K_), N(N_) {
#ifdef RNNKIT_OWN_GEMM
    if constexpr (std::is_same<T, float>::value) {
      if (use_own_gemm() && steps > 1 && K > 0 && N > 0) {
        constexpr int64_t S = rnnkit::kOwnCols;
        const int64_t ns = (N + S - 1) / S;
        strips = at::zeros({ns, K, S}, opts);  // (torch's allocator: 64-byte aligned)
        float* d = strips.data_ptr<float>();
        for (int64_t s = 0; s < ns; ++s) {
          const int64_t n0 = s * S, n = std::min(S, N - n0);
          for (int64_t k = 0; k < K; ++k)
            std::copy(b + k * N + n0, b + k * N + n0 + n, d + (s * K + k) * S);
        }
      }
    }
#endif
  }

  // C(M, n) = A(M, Ks) B[k0 : k0 + Ks, 0 : n], n <= N
  void mul(int64_t M, int64_t n, int64_t Ks, const T* A, int64_t lda, int64_t k0, T* C,
           int64_t ldc) const {
    if (w_rows) return gemv_rows(M, n, Ks, A, lda, w_rows + k0, ldw, C, ldc, false);
#ifdef RNNKIT_OWN_GEMM
    if constexpr (std::is_same<T, float>::value) {
      if (strips.defined() && use_own_gemm()) {
        if (M <= 0 || n <= 0 || Ks <= 0) return gemm_rm(M, n, Ks, A, lda, b + k0 * N, N, C, ldc);
        constexpr int64_t S = rnnkit::kOwnCols;
        const float* d = strips.data_ptr<float>() + k0 * S;
        int64_t n0 = 0;
        if (M <= kFewRows) {  // 1-3 rows: the whole strips at once (few_rows_strips)
          const int64_t whole = n / S;
          few_rows_strips(M, whole, Ks, A, lda, d, K * S, C, ldc, false);
          n0 = whole * S;
        }
        for (; n0 < n; n0 += S)
          own_mm(M, std::min(S, n - n0), Ks, A, lda, d + n0 * K, S, C + n0, ldc);
        return;
      }
    }
#endif
    gemm_rm(M, n, Ks, A, lda, b + k0 * N, N, C, ldc);
  }
};

// A fresh buffer of the layer's outputs or saved activations (0 where `zero`: rows past a length
// must read 0). One of several MiB is a fresh mapping on every call (glibc maps large blocks,
// and unmaps them when freed), whose first write faults once per 4 KiB page: page faults, page
// clearing and unmapping were ~10 % of the samples of an LSTM-LN 50,64,512 training forward
// (perf, 1 thread; 72 MiB of acts, ahat and cells per call). Asking for transparent huge pages
// over its 2 MiB-aligned interior (MADV_HUGEPAGE, where the kernel leaves THP to madvise) makes
// that one fault per 2 MiB. A hint only: where it fails or THP is off, nothing changes.
Tensor loop_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts, bool zero) {
  Tensor t = at::empty(sizes, opts);
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr()), bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const uintptr_t first = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
    if (end > first) madvise(reinterpret_cast<void*>(first), end - first, MADV_HUGEPAGE);
  }
#endif
  if (zero) t.zero_();
  return t;
}

// C(M, N) = A(M, K) B(K, N), row-major float, in tiles of 256 x 256 through the micro-kernel
// (fast_sgemm_rm: gemm_own or brgemm), the tiles split over threads (as fused_rnn.cpp's pgemm). The layer's whole-
// sequence products (x W_ih^T, and in the backward dx, dW_ih, dW_hh) ran ~15 % slower through
// torch.mm (MKL's generic path on this AMD CPU) than oneDNN's in nn.LSTM (perf, T,B,H =
// 50,64,512, 1 thread). Plain reference: torch.mm(a, b).
Tensor tiled_matmul(const Tensor& a, const Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
              "rnnkit_ln::matmul: shapes ", a.sizes(), " and ", b.sizes(), " do not multiply");
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || !fast_sgemm() ||
      a.size(1) == 0)
    return at::mm(a, b);
  const Tensor A = a.contiguous(), B = b.contiguous();
  const int64_t M = A.size(0), K = A.size(1), N = B.size(1);
  Tensor C = loop_buffer({M, N}, A.options(), false);  // (the projection: (T*B, G*H))
  constexpr int64_t MB = 256, NB = 256, KB = 256;
  const int64_t mt = (M + MB - 1) / MB, ntile = (N + NB - 1) / NB;
  const float* ap = A.data_ptr<float>();
  const float* bp = B.data_ptr<float>();
  float* cp = C.data_ptr<float>();
  at::parallel_for(0, mt * ntile, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m0 = (i / ntile) * MB, n0 = (i % ntile) * NB;
      const int64_t mm = std::min(MB, M - m0), nn = std::min(NB, N - n0);
#ifdef RNNKIT_OWN_GEMM
      if (use_own_gemm()) {  // (chunks K itself, and packs B's chunk for this tile's rows)
        own_mm(mm, nn, K, ap + m0 * K, K, bp + n0, N, cp + m0 * N + n0, N);
        continue;
      }
#endif
      // (brgemm: else fast_sgemm() is false and at::mm ran above; nn <= NB, one column block)
      rnnkit::brgemm_rm(mm, nn, K, ap + m0 * K, K, bp + n0, N, cp + m0 * N + n0, N, false, NB,
                        KB);
    }
  });
  return C;
}

// acc[0:n] += dy * a_hat, acc[n:2n] += dy: one row's share of an LN's gain and bias gradients
template <typename T>
inline void accumulate_ln(const T* dy, const T* a_hat, int64_t n, T* acc) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] += dy[j] * a_hat[j];
    acc[n + j] += dy[j];
  }
}

template <typename T>
inline T sg(T y) { return y * (1 - y); }  // sigmoid'(x) from y = sigmoid(x)
template <typename T>
inline T tg(T y) { return 1 - y * y; }  // tanh'(x) from y = tanh(x)

// Where step t's rows lie in the step-major arrays the loops read and write per row (gx, the
// saved acts, ahat, stats and cells, and the backward's d_gx and d_a): row b of step t at
// Packed::row(t, b) (packed.h). Padded: every row of every step. Packed (a ragged batch from
// the eager layers, gx (Σ bs, G*H)): only the bs[t] rows that run, one step after another.
// Then the sequence-wide products around the loop (x W_ih^T, dx, dW_ih, dW_hh, in
// engine/fused/_layer_norm.py) run over the Σ bs rows that run, not over all T*B, and no row
// of those arrays is padding (nothing to zero, and x's padding is never read). The outputs y
// and their gradient stay padded (T, B, H).
//
// The layout of gx (T, B, G*H) padded or (Σ bs, G*H) packed for T = bs.size() steps of B rows;
// checks batch_sizes, which the loops trust (T entries, in [0, B], non-increasing: a row that
// has ended stays ended, and a block's loop stops at its first step without rows).
Packed step_rows(const Tensor& gx, int64_t batch, at::IntArrayRef bs) {
  const bool packed = gx.dim() == 2;
  TORCH_CHECK(!packed || !bs.empty(), "rnnkit_ln: a packed gx (2-D) needs batch_sizes");
  const int64_t steps = packed ? static_cast<int64_t>(bs.size()) : gx.size(0);
  if (!bs.empty()) rnnkit::check_batch_sizes(bs, steps, batch);
  const Packed r = packed ? packed_rows(bs) : padded_rows(steps, batch);
  TORCH_CHECK(!packed || gx.size(0) == r.rows(),
              "rnnkit_ln: a packed gx must have sum(batch_sizes) rows");
  return r;
}

// Runs fn(first_row, end_row) for contiguous row blocks, one per thread.
template <typename F>
void for_row_blocks(int64_t batch, int64_t threads, const F& fn) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(
      threads > 0 ? threads : at::get_num_threads(), batch));
  at::parallel_for(0, nt, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(batch * c / nt, batch * (c + 1) / nt);
  });
}

template <typename T>
void forward_impl(const Variant& v, const Tensor& gx, Tensor& h, Tensor& c, const Tensor& w_hh,
                  const Tensor& ln_w, const Tensor& ln_b, const Tensor& cell_w,
                  const Tensor& cell_b, const Tensor& peep, at::IntArrayRef bs, Tensor& y,
                  bool training, Tensor& acts, Tensor& ahat, Tensor& stats, Tensor& cells,
                  const Tensor& in_w, const Tensor& in_b, const Packed& rows_at,
                  int64_t threads) {
  const int64_t steps = rows_at.steps(), batch = h.size(0), H = h.size(1), G = v.gates(),
                GH = G * H;
  const bool lstm = v.kind == kLSTM;
  // the input LN's gain and bias when gx is the raw projection x W_ih^T (else gx is normalised)
  const T* iw = in_w.defined() ? in_w.data_ptr<T>() : nullptr;
  const T* ib = in_w.defined() ? in_b.data_ptr<T>() : nullptr;
  // One step of a few rows (a streaming cell step): W_hh read as stored (gemv_rows). Else W^T
  // blocks, contiguous, so each step is one product per block
  const bool as_stored = steps == 1 && batch <= kGemvRowsMax;
  const Tensor w_t = as_stored ? Tensor()
                     : v.before ? w_hh.narrow(0, 0, 2 * H).t().contiguous()
                                : w_hh.t().contiguous();
  const Tensor wn_t = v.before && !as_stored ? w_hh.narrow(0, 2 * H, H).t().contiguous() : Tensor();
  const T* lw = ln_w.data_ptr<T>();
  const T* lb = ln_b.data_ptr<T>();
  const T* cw = lstm ? cell_w.data_ptr<T>() : nullptr;
  const T* cb = lstm ? cell_b.data_ptr<T>() : nullptr;
  const T* pp = v.peephole ? peep.data_ptr<T>() : nullptr;  // rows ci, (cf,) co
  const T* w_ci = pp;
  const T* w_cf = (pp && !v.coupled) ? pp + H : nullptr;
  const T* w_co = pp ? pp + (v.coupled ? H : 2 * H) : nullptr;
  const T* gxp = gx.data_ptr<T>();
  T* hp = h.data_ptr<T>();
  T* cp = lstm ? c.data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  T* actp = training ? acts.data_ptr<T>() : nullptr;
  T* ahp = training ? ahat.data_ptr<T>() : nullptr;
  T* stp = training ? stats.data_ptr<T>() : nullptr;
  T* celp = training && lstm ? cells.data_ptr<T>() : nullptr;

  const T* w = w_hh.data_ptr<T>();  // (G*H, H) as stored; GRU-before: rows r, z then n
  const StepB<T> w_step =
      as_stored ? StepB<T>::rows_of(w, H, v.before ? 2 * H : GH, H)
                : StepB<T>(w_t.data_ptr<T>(), H, v.before ? 2 * H : GH, steps, gx.options());
  const StepB<T> wn_step =
      as_stored ? StepB<T>::rows_of(v.before ? w + 2 * H * H : nullptr, v.before ? H : 0, H, H)
                : StepB<T>(v.before ? wn_t.data_ptr<T>() : nullptr, v.before ? H : 0, H, steps,
                           gx.options());
  for_row_blocks(batch, threads, [&](int64_t b0, int64_t b1) {
    const int64_t rows = b1 - b0;
    Tensor a = at::empty({rows, v.before ? 2 * H : GH}, gx.options());
    Tensor u = v.before ? at::empty({rows, H}, gx.options()) : Tensor();   // r * h_{t-1}
    Tensor an = v.before ? at::empty({rows, H}, gx.options()) : Tensor();  // W_hn (r * h)
    const int64_t width = v.before ? 2 * H : GH;  // columns of the first product
    T* abuf = a.data_ptr<T>();
    T* ubuf = v.before ? u.data_ptr<T>() : nullptr;
    T* anbuf = v.before ? an.data_ptr<T>() : nullptr;
    // xnorm: the normalised input row (GRU-before: of every row of the block, whose n block
    // the second half reads after the W_hn product)
    std::vector<T> gh(GH), ah(GH), gate(v.before ? rows * GH : GH), cn(H), chat(H),
        xnorm(iw ? (v.before ? rows * GH : GH) : 0);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t n_act = std::min(active_rows(bs, t, batch), b1) - b0;
      if (n_act <= 0) break;  // (sorted: later steps have no more rows of this block)
      w_step.mul(n_act, width, H, hp + b0 * H, H, 0, abuf, width);
      const T* ap = abuf;
      for (int64_t r = 0; r < n_act; ++r) {
        const int64_t b = b0 + r;
        const int64_t row = rows_at.row(t, b), out = t * batch + b;  // (packed, padded)
        const T* gxr = gxp + row * GH;
        T* hr = hp + b * H;
        T rstd = 0;
        // Training writes the gates and the recurrent LN's a_hat straight into the saved
        // activations (acts, ahat) rather than into row buffers copied there afterwards: two
        // G*H copies per row (memmove ~3 % of an LSTM-LN 50,64,512 forward, perf, 1 thread)
        T* gate_r = training ? actp + row * GH : gate.data() + (v.before ? r * GH : 0);
        T* ahat_r = training ? ahp + row * GH : ah.data();
        if (iw) {  // the input LN of this row, where the row is in cache anyway
          T mean_x, rstd_x;
          ln_stats(gxr, GH, &mean_x, &rstd_x);
          T* xn = xnorm.data() + (v.before ? r * GH : 0);
          for (int64_t j = 0; j < GH; ++j) xn[j] = (gxr[j] - mean_x) * rstd_x * iw[j] + ib[j];
          gxr = xn;
          if (training) {
            stp[row * kStats + 2] = mean_x;
            stp[row * kStats + 3] = rstd_x;
          }
        }
        if (lstm) {
          T* cr = cp + b * H;
          ln_row(ap + r * GH, lw, lb, GH, gh.data(), ahat_r, &rstd);
          // blocks i, f, g, o (coupled: i, g, o). One simple loop per function, so that each
          // vectorises (a loop mixing sigm, tanh and variant branches does not).
          const int64_t oi = 0, of = H, og = v.coupled ? H : 2 * H, oo = v.coupled ? 2 * H : 3 * H;
          T* pre = gate_r;
          for (int64_t j = 0; j < GH; ++j) pre[j] = gxr[j] + gh[j];
          if (v.peephole) {
            for (int64_t j = 0; j < H; ++j) pre[oi + j] = pre[oi + j] + w_ci[j] * cr[j];
            if (!v.coupled)
              for (int64_t j = 0; j < H; ++j) pre[of + j] = pre[of + j] + w_cf[j] * cr[j];
          }
          const int64_t sig_end = v.coupled ? H : 2 * H;  // i (and f) are contiguous
          for (int64_t j = 0; j < sig_end; ++j) pre[j] = rnnkit::sigm(pre[j]);
          for (int64_t j = 0; j < H; ++j) pre[og + j] = rnnkit::tanh_(pre[og + j]);
          if (v.coupled) {
            for (int64_t j = 0; j < H; ++j)
              cr[j] = (1 - pre[oi + j]) * cr[j] + pre[oi + j] * pre[og + j];
          } else {
            for (int64_t j = 0; j < H; ++j)
              cr[j] = pre[of + j] * cr[j] + pre[oi + j] * pre[og + j];
          }
          if (v.peephole)
            for (int64_t j = 0; j < H; ++j) pre[oo + j] = pre[oo + j] + w_co[j] * cr[j];
          for (int64_t j = 0; j < H; ++j) pre[oo + j] = rnnkit::sigm(pre[oo + j]);
          T crstd = 0;
          // (training: c_hat and tanh(LN(c)) straight into the saved cells, beside c)
          T* cl = training ? celp + row * 3 * H : nullptr;
          T* chat_r = training ? cl + H : chat.data();
          T* cn_r = training ? cl + 2 * H : cn.data();
          ln_row(cr, cw, cb, H, cn_r, chat_r, &crstd);
          T* yr = yp + out * H;
          for (int64_t j = 0; j < H; ++j) cn_r[j] = rnnkit::tanh_(cn_r[j]);  // (kept: the backward)
          for (int64_t j = 0; j < H; ++j) {
            hr[j] = pre[oo + j] * cn_r[j];
            yr[j] = hr[j];
          }
          if (training) {
            std::copy(cr, cr + H, cl);
            stp[row * kStats + 1] = crstd;
          }
        } else if (!v.before) {
          ln_row(ap + r * GH, lw, lb, GH, gh.data(), ahat_r, &rstd);
          T* gt = gate_r;
          for (int64_t j = 0; j < 2 * H; ++j) gt[j] = rnnkit::sigm(gxr[j] + gh[j]);  // r, z
          for (int64_t j = 0; j < H; ++j)
            gt[2 * H + j] = rnnkit::tanh_(gxr[2 * H + j] + gt[j] * gh[2 * H + j]);
          for (int64_t j = 0; j < H; ++j)
            hr[j] = (1 - gt[H + j]) * gt[2 * H + j] + gt[H + j] * hr[j];
          std::copy(hr, hr + H, yp + out * H);
        } else {  // reset before, first half: r, z and r * h_{t-1}
          ln_row(ap + r * 2 * H, lw, lb, 2 * H, gh.data(), ahat_r, &rstd);
          T* ur = ubuf + r * H;
          T* gr = gate_r;
          for (int64_t j = 0; j < 2 * H; ++j) gr[j] = rnnkit::sigm(gxr[j] + gh[j]);  // r, z
          for (int64_t j = 0; j < H; ++j) ur[j] = gr[j] * hr[j];
        }
        if (training) stp[row * kStats] = rstd;
      }
      if (!v.before) continue;
      // reset before, second half: n = tanh(gx_n + LN(W_hn (r * h_{t-1}))), the new h
      wn_step.mul(n_act, H, H, ubuf, H, 0, anbuf, H);
      const T* anp = anbuf;
      for (int64_t r = 0; r < n_act; ++r) {
        const int64_t b = b0 + r;
        const int64_t row = rows_at.row(t, b), out = t * batch + b;
        const T* gxr = iw ? xnorm.data() + r * GH : gxp + row * GH;  // (normalised)
        const T* gr = training ? actp + row * GH : gate.data() + r * GH;  // (as gate_r)
        T* hr = hp + b * H;
        T nrstd = 0;
        ln_row(anp + r * H, lw + 2 * H, lb + 2 * H, H, gh.data(),
               training ? ahp + row * GH + 2 * H : ah.data(), &nrstd);
        T* yr = yp + out * H;
        for (int64_t j = 0; j < H; ++j) gh[j] = rnnkit::tanh_(gxr[2 * H + j] + gh[j]);  // n
        if (training) std::copy(gh.begin(), gh.begin() + H, actp + row * GH + 2 * H);
        for (int64_t j = 0; j < H; ++j) {
          hr[j] = (1 - gr[H + j]) * gh[j] + gr[H + j] * hr[j];
          yr[j] = hr[j];
        }
        if (training) stp[row * kStats + 1] = nrstd;
      }
    }
  });
}

// Reverse time. In: the saved forward (acts, ahat, stats, cells), y (h_t of the active rows),
// grad_y and the final-state gradients. Out (written): d_gx, d_a (the gradient before the
// recurrent LN, per row), dh (-> dh0), dc (-> dc0), and per row block (in the slot of its first
// row; the others stay 0) the sums over its rows and steps of the LN gain and bias gradients:
// g_ln (B, 2, G*H), LSTM g_cell (B, 2, H), with the input LN g_in (B, 2, G*H), with peepholes
// g_peep (B, 2 or 3, H) (a block is one thread's, so no two threads add to the same place; the
// caller sums over B). One slot per block, not per row: 32 rows' slots of g_ln and g_in at
// 100,32,256 were 512 KiB, half the L2, walked through at every step.
template <typename T>
void backward_impl(const Variant& v, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                   const Tensor& ln_w, const Tensor& ln_b, const Tensor& cell_w,
                   const Tensor& peep, at::IntArrayRef bs, const Tensor& y, const Tensor& acts,
                   const Tensor& ahat, const Tensor& stats, const Tensor& cells,
                   const Tensor& grad_y, const Tensor& proj, const Tensor& in_w, Tensor& dh,
                   Tensor& dc, Tensor& d_gx, Tensor& d_a, Tensor& g_ln, Tensor& g_cell,
                   Tensor& g_in, Tensor& g_peep, const Packed& rows_at, int64_t threads) {
  const int64_t steps = y.size(0), batch = y.size(1), H = h0.size(1), G = v.gates(), GH = G * H;
  const bool lstm = v.kind == kLSTM;
  // the input LN (in_w defined: the forward normalised the raw projection proj itself)
  const T* iw = in_w.defined() ? in_w.data_ptr<T>() : nullptr;
  const T* prp = iw ? proj.data_ptr<T>() : nullptr;
  T* gip = iw ? g_in.data_ptr<T>() : nullptr;
  const int64_t n_peep = v.coupled ? 2 : 3;  // rows of g_peep: ci, (cf,) co
  T* gpp = v.peephole ? g_peep.data_ptr<T>() : nullptr;
  // (GH, H) as stored: d_a W_hh needs no transpose
  const StepB<T> w_back(w_hh.data_ptr<T>(), GH, H, steps, y.options());
  const T* lw = ln_w.data_ptr<T>();
  const T* lb = ln_b.data_ptr<T>();
  const T* cw = lstm ? cell_w.data_ptr<T>() : nullptr;
  const T* pp = v.peephole ? peep.data_ptr<T>() : nullptr;
  const T* w_ci = pp;
  const T* w_cf = (pp && !v.coupled) ? pp + H : nullptr;
  const T* w_co = pp ? pp + (v.coupled ? H : 2 * H) : nullptr;
  const T* h0p = h0.data_ptr<T>();
  const T* c0p = lstm ? c0.data_ptr<T>() : nullptr;
  const T* yp = y.data_ptr<T>();
  const T* actp = acts.data_ptr<T>();
  const T* ahp = ahat.data_ptr<T>();
  const T* stp = stats.data_ptr<T>();
  const T* celp = lstm ? cells.data_ptr<T>() : nullptr;
  const T* gyp = grad_y.data_ptr<T>();
  T* dhp = dh.data_ptr<T>();
  T* dcp = lstm ? dc.data_ptr<T>() : nullptr;
  T* dgxp = d_gx.data_ptr<T>();
  T* dap = d_a.data_ptr<T>();
  T* glp = g_ln.data_ptr<T>();
  T* gcp = lstm ? g_cell.data_ptr<T>() : nullptr;

  for_row_blocks(batch, threads, [&](int64_t b0, int64_t b1) {
    const int64_t rows = b1 - b0;
    Tensor dprev = at::empty({rows, H}, y.options());  // d_a W_hh (and GRU-before: d_n W_hn)
    Tensor dreset = v.before ? at::empty({rows, H}, y.options()) : Tensor();
    T* dpbuf = dprev.data_ptr<T>();
    T* drbuf = v.before ? dreset.data_ptr<T>() : nullptr;
    std::vector<T> dpost(GH), tmp(H), dzh(v.before ? rows * H : 0), dcn_buf(H),
        xhat(iw ? GH : 0);
    // through the input LN: d(gx) -> d(x W_ih^T) of one row, in place; x_hat recomputed from the
    // raw projection and the saved mean and 1/sigma
    const auto input_ln_backward = [&](int64_t row, T* dgx) {
      const T* pr = prp + row * GH;
      const T mean_x = stp[row * kStats + 2], rstd_x = stp[row * kStats + 3];
      T* xh = xhat.data();
      for (int64_t j = 0; j < GH; ++j) xh[j] = (pr[j] - mean_x) * rstd_x;
      ln_row_backward_acc(dgx, xh, rstd_x, iw, GH, dgx, gip + b0 * 2 * GH);
    };
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t n_act = std::min(active_rows(bs, t, batch), b1) - b0;
      if (n_act <= 0) continue;
      for (int64_t r = 0; r < n_act; ++r) {
        const int64_t b = b0 + r;
        const int64_t row = rows_at.row(t, b), out = t * batch + b;  // (packed, padded)
        const T* hprev = t > 0 ? yp + ((t - 1) * batch + b) * H : h0p + b * H;
        const T* ac = actp + row * GH;
        T* dhr = dhp + b * H;
        T* dgx = dgxp + row * GH;
        const T* gy = gyp + out * H;
        if (lstm) {
          const T* cprev = t > 0 ? celp + rows_at.row(t - 1, b) * 3 * H : c0p + b * H;
          const T* cl = celp + row * 3 * H;  // c, c_hat, tanh(LN(c))
          T* dcr = dcp + b * H;
          T* dcn = dcn_buf.data();
          const int64_t oi = 0, of = H, og = v.coupled ? H : 2 * H, oo = v.coupled ? 2 * H : 3 * H;
          for (int64_t j = 0; j < H; ++j) {
            const T dh_ = dhr[j] + gy[j];
            dcn[j] = dh_ * ac[oo + j] * tg(cl[2 * H + j]);
            dgx[oo + j] = dh_ * cl[2 * H + j] * sg(ac[oo + j]);
          }
          ln_row_backward_acc(dcn, cl + H, stp[row * kStats + 1], cw, H, tmp.data(),
                              gcp + b0 * 2 * H);
          for (int64_t j = 0; j < H; ++j) {
            const T i = ac[oi + j], g = ac[og + j];
            const T f = v.coupled ? 1 - i : ac[of + j];
            T dc_ = dcr[j] + tmp[j];
            if (v.peephole) dc_ = dc_ + dgx[oo + j] * w_co[j];
            T d_i = dc_ * g;
            const T d_f = dc_ * cprev[j];
            if (v.coupled) d_i = d_i - d_f;
            const T d_pre_i = d_i * sg(i);
            dgx[oi + j] = d_pre_i;
            dgx[og + j] = dc_ * i * tg(g);
            T dcp_ = dc_ * f;
            if (!v.coupled) dgx[of + j] = d_f * sg(f);
            if (v.peephole) {
              dcp_ = dcp_ + d_pre_i * w_ci[j];
              if (!v.coupled) dcp_ = dcp_ + dgx[of + j] * w_cf[j];
            }
            dcr[j] = dcp_;
          }
          if (v.peephole) {  // their gradients (i, f read c_{t-1}, o c_t); a loop of its own:
            // in the loop above, three more stores kept GCC from vectorising it (backward 27 %
            // slower at 100,32,256, plain LSTM too)
            T* gp = gpp + b0 * n_peep * H;
            for (int64_t j = 0; j < H; ++j) gp[j] += dgx[oi + j] * cprev[j];
            if (!v.coupled)
              for (int64_t j = 0; j < H; ++j) gp[H + j] += dgx[of + j] * cprev[j];
            for (int64_t j = 0; j < H; ++j) gp[(n_peep - 1) * H + j] += dgx[oo + j] * cl[j];
          }
          ln_row_backward_acc(dgx, ahp + row * GH, stp[row * kStats], lw, GH, dap + row * GH,
                              glp + b0 * 2 * GH);
        } else {
          for (int64_t j = 0; j < H; ++j) {
            const T dh_ = dhr[j] + gy[j];
            const T z = ac[H + j], n = ac[2 * H + j];
            dgx[2 * H + j] = dh_ * (1 - z) * tg(n);
            dgx[H + j] = (dh_ * hprev[j] - dh_ * n) * sg(z);
            tmp[j] = dh_;
          }
          if (!v.before) {
            const T* a_hat = ahp + row * GH;
            for (int64_t j = 0; j < H; ++j) {
              const T gh_n = a_hat[2 * H + j] * lw[2 * H + j] + lb[2 * H + j];
              const T rg = ac[j];
              dgx[j] = dgx[2 * H + j] * gh_n * sg(rg);
              dpost[j] = dgx[j];
              dpost[H + j] = dgx[H + j];
              dpost[2 * H + j] = dgx[2 * H + j] * rg;
              dhr[j] = tmp[j] * ac[H + j];  // dh * z (the GEMM part is added below)
            }
            ln_row_backward_acc(dpost.data(), a_hat, stp[row * kStats], lw, GH, dap + row * GH,
                                glp + b0 * 2 * GH);
          } else {
            ln_row_backward(dgx + 2 * H, ahp + row * GH + 2 * H, stp[row * kStats + 1], lw + 2 * H,
                            H, dap + row * GH + 2 * H);
            for (int64_t j = 0; j < H; ++j) dzh[r * H + j] = tmp[j] * ac[H + j];  // dh * z
          }
        }
        // (GRU-before: its d(gx_r) is formed after the n block's product, below)
        if (iw && !v.before) input_ln_backward(row, dgx);
      }
      if (lstm || !v.before) {
        // dh_{t-1} = d_a W_hh (+ dh z for the GRU, already in dh)
        w_back.mul(n_act, H, GH, dap + rows_at.row(t, b0) * GH, GH, 0, dpbuf, H);
        const T* dpp = dpbuf;
        for (int64_t r = 0; r < n_act; ++r) {
          T* dhr = dhp + (b0 + r) * H;
          for (int64_t j = 0; j < H; ++j) dhr[j] = lstm ? dpp[r * H + j] : dhr[j] + dpp[r * H + j];
        }
        continue;
      }
      // GRU reset before: d(r * h) = d_n W_hn, then the r gate, the rz LN and dh_{t-1}
      w_back.mul(n_act, H, H, dap + rows_at.row(t, b0) * GH + 2 * H, GH, 2 * H, drbuf, H);
      const T* drp = drbuf;
      for (int64_t r = 0; r < n_act; ++r) {
        const int64_t b = b0 + r;
        const int64_t row = rows_at.row(t, b);
        const T* hprev = t > 0 ? yp + ((t - 1) * batch + b) * H : h0p + b * H;
        const T* ac = actp + row * GH;
        T* dgx = dgxp + row * GH;
        for (int64_t j = 0; j < H; ++j) dgx[j] = drp[r * H + j] * hprev[j] * sg(ac[j]);
        ln_row_backward(dgx, ahp + row * GH, stp[row * kStats], lw, 2 * H, dap + row * GH);
        accumulate_ln(dgx, ahp + row * GH, GH, glp + b0 * 2 * GH);  // (the whole row: rz and n)
        if (iw) input_ln_backward(row, dgx);  // (d(gx) complete only now)
      }
      w_back.mul(n_act, H, 2 * H, dap + rows_at.row(t, b0) * GH, GH, 0, dpbuf, H);
      const T* dpp = dpbuf;
      for (int64_t r = 0; r < n_act; ++r) {
        const int64_t b = b0 + r;
        const T* ac = actp + rows_at.row(t, b) * GH;
        T* dhr = dhp + b * H;
        for (int64_t j = 0; j < H; ++j)
          dhr[j] = dzh[r * H + j] + drp[r * H + j] * ac[j] + dpp[r * H + j];
      }
    }
  });
}

Variant variant_of(int64_t kind, bool peephole, bool coupled, bool before) {
  TORCH_CHECK(kind == kLSTM || kind == kGRU, "rnnkit_ln: kind must be 1 (lstm) or 2 (gru)");
  // (the loops read v.before and v.coupled without asking the kind: an LSTM with before=True
  // ran the GRU-before's buffer widths and returned numbers that changed from call to call)
  TORCH_CHECK(kind == kLSTM || (!peephole && !coupled),
              "rnnkit_ln: peephole and coupled are for kind 1 (lstm), not a GRU");
  TORCH_CHECK(kind == kGRU || !before, "rnnkit_ln: before (reset before) is for kind 2 (gru), "
              "not an LSTM");
  return Variant{kind, peephole, coupled, before};
}

Tensor empty_like_none(const Tensor& like) { return at::empty({0}, like.options()); }

// The kernels read every LN gain and bias, W_hh and the peepholes through raw pointers at the
// sizes H and G*H imply: a shorter tensor would be read past its end (a wrong answer, no
// error), so the operators check them (the layers pass their own parameters; a direct call may
// not). Each optional one is checked where the variant uses it.
void check_parameters(const Variant& v, int64_t H, at::ScalarType dtype, const Tensor& w_hh,
                      const Tensor& ln_weight, const Tensor& ln_bias,
                      const std::optional<Tensor>& cell_weight,
                      const std::optional<Tensor>& cell_bias, const std::optional<Tensor>& peep,
                      const std::optional<Tensor>& ln_ih_weight,
                      const std::optional<Tensor>& ln_ih_bias) {
  const int64_t GH = v.gates() * H;
  const auto is = [&](const Tensor& t, at::IntArrayRef sizes) {
    return t.sizes() == sizes && t.scalar_type() == dtype;
  };
  TORCH_CHECK(is(w_hh, {GH, H}), "rnnkit_ln: w_hh must be (G*H, H) = (", GH, ", ", H,
              ") of the input's dtype");
  TORCH_CHECK(is(ln_weight, {GH}) && is(ln_bias, {GH}),
              "rnnkit_ln: ln_weight and ln_bias must be (G*H,) = (", GH, ",) of the input's dtype");
  for (const auto* t : {&ln_ih_weight, &ln_ih_bias})
    TORCH_CHECK(!t->has_value() || is(**t, {GH}),
                "rnnkit_ln: ln_ih_weight and ln_ih_bias must be (G*H,) = (", GH,
                ",) of the input's dtype");
  if (v.kind == kLSTM)
    for (const auto* t : {&cell_weight, &cell_bias})
      TORCH_CHECK(!t->has_value() || is(**t, {H}),
                  "rnnkit_ln: the cell LN's weight and bias must be (H,) = (", H,
                  ",) of the input's dtype");
  const int64_t rows = v.coupled ? 2 : 3;
  TORCH_CHECK(!v.peephole || !peep || is(*peep, {rows, H}),
              "rnnkit_ln: the peephole weights must be (", rows, ", H) = (", rows, ", ", H,
              ") of the input's dtype");
}

// (engine/csrc/checks.h: a c0 or saved activations of another batch, read or written through
// raw pointers, crashed the process or corrupted the heap: the fuzzer of session 15)
using rnnkit::check_given;
using rnnkit::check_rank;
using rnnkit::check_tensor;

// An LSTM's c0 (or a step's c) and cell LN, each named when missing.
void check_lstm_given(const std::optional<Tensor>& c, const char* c_name,
                      const std::optional<Tensor>& cell_weight,
                      const std::optional<Tensor>& cell_bias, bool need_cell_bias) {
  TORCH_CHECK(c.has_value(), "rnnkit_ln: ", c_name, " is None; an LSTM needs it");
  TORCH_CHECK(cell_weight.has_value() && (!need_cell_bias || cell_bias.has_value()),
              "rnnkit_ln: cell_weight", need_cell_bias ? " or cell_bias" : "",
              " is None; an LSTM needs its cell LN");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_layer_forward(
    int64_t kind, bool peephole, bool coupled, bool before, const Tensor& gx, const Tensor& h0,
    const std::optional<Tensor>& c0, const Tensor& w_hh, const Tensor& ln_weight,
    const Tensor& ln_bias, const std::optional<Tensor>& cell_weight,
    const std::optional<Tensor>& cell_bias, const std::optional<Tensor>& peep,
    const std::optional<Tensor>& ln_ih_weight, const std::optional<Tensor>& ln_ih_bias,
    at::IntArrayRef batch_sizes, bool training, int64_t threads) {
  const Variant v = variant_of(kind, peephole, coupled, before);
  const bool lstm = kind == kLSTM;
  // With the input LN's gain and bias, gx is the raw projection x W_ih^T and the kernel
  // normalises each row where it reads it: F.layer_norm over all T*B rows beforehand cost two
  // extra passes over a (T, B, G*H) array in memory, and a fresh one each way, forward and
  // backward (every variant; session 13 for the GRU-before).
  TORCH_CHECK(ln_ih_weight.has_value() == ln_ih_bias.has_value(),
              "rnnkit_ln: the input LN's weight and bias come together");
  rnnkit::check_float_dtype(gx, "gx");
  check_rank(h0, 2, "h0", "(B, H)");
  TORCH_CHECK((gx.dim() == 3 || gx.dim() == 2) && gx.size(-1) == v.gates() * h0.size(1),
              "rnnkit_ln: gx must be (T, B, G*H), or packed (sum(batch_sizes), G*H)");
  if (lstm) check_lstm_given(c0, "c0", cell_weight, cell_bias, true);
  TORCH_CHECK(!peephole || peep, "rnnkit_ln: peephole_weights is None; peephole=True needs them");
  check_parameters(v, h0.size(1), gx.scalar_type(), w_hh, ln_weight, ln_bias, cell_weight,
                   cell_bias, peep, ln_ih_weight, ln_ih_bias);
  TORCH_CHECK((gx.dim() == 2 || h0.size(0) == gx.size(1)) && h0.scalar_type() == gx.scalar_type() &&
                  (!lstm || (c0->sizes() == h0.sizes() && c0->scalar_type() == gx.scalar_type())),
              "rnnkit_ln: h0 (and c0) must be (B, H) of gx's dtype");
  const Tensor g = gx.contiguous();
  const Packed rows_at = step_rows(g, h0.size(0), batch_sizes);
  const int64_t steps = rows_at.steps(), batch = h0.size(0), H = h0.size(1),
                GH = v.gates() * H;
  Tensor h = h0.contiguous().clone();
  Tensor c = lstm ? c0->contiguous().clone() : empty_like_none(g);
  // The saved activations, one row per row of gx. Packed, every row is one that runs and is
  // written. Padded with lengths (a traced graph: layer_forward_lengths), the rows past a length
  // must be 0: the padded backward's products in _layer_norm.py read every row, and a saved
  // value that a 0 gradient multiplies must not be NaN garbage.
  const bool zero_saved = g.dim() == 3 && !batch_sizes.empty();
  const auto saved = [&](int64_t width) {
    return g.dim() == 2 ? loop_buffer({rows_at.rows(), width}, g.options(), false)
                        : loop_buffer({steps, batch, width}, g.options(), zero_saved);
  };
  Tensor y = zero_padded(loop_buffer({steps, batch, H}, g.options(), false),
                         batch_sizes);  // (an output: padding 0)
  Tensor acts = training ? saved(GH) : empty_like_none(g);
  Tensor ahat = training ? saved(GH) : empty_like_none(g);
  Tensor stats = training ? (g.dim() == 2 ? at::zeros({rows_at.rows(), kStats}, g.options())
                                          : at::zeros({steps, batch, kStats}, g.options()))
                          : empty_like_none(g);
  Tensor cells = training && lstm ? saved(3 * H) : empty_like_none(g);
  const Tensor w = w_hh.contiguous(), lw = ln_weight.contiguous(), lb = ln_bias.contiguous();
  const Tensor cw = lstm ? cell_weight->contiguous() : Tensor();
  const Tensor cb = lstm ? cell_bias->contiguous() : Tensor();
  const Tensor pp = peephole ? peep->contiguous() : Tensor();
  const Tensor iw = ln_ih_weight ? ln_ih_weight->contiguous() : Tensor();
  const Tensor ib = ln_ih_bias ? ln_ih_bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "rnnkit_ln_forward", [&] {
    forward_impl<scalar_t>(v, g, h, c, w, lw, lb, cw, cb, pp, batch_sizes, y, training, acts,
                           ahat, stats, cells, iw, ib, rows_at, threads);
  });
  return {y, h, c, acts, ahat, stats, cells};
}

// Returns d_gx (with ln_ih_weight: the gradient of the raw projection, through the input LN),
// d_a, dh0, dc0 and the sums over all rows of the recurrent LN's, the cell LN's, the input LN's
// (gain, bias) gradients and the peepholes' gradients (rows ci, (cf,) co).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_layer_backward(
    int64_t kind, bool peephole, bool coupled, bool before, const Tensor& h0,
    const std::optional<Tensor>& c0, const Tensor& w_hh, const Tensor& ln_weight,
    const Tensor& ln_bias, const std::optional<Tensor>& cell_weight,
    const std::optional<Tensor>& peep, const std::optional<Tensor>& ln_ih_weight,
    at::IntArrayRef batch_sizes, const Tensor& y, const Tensor& acts, const Tensor& ahat,
    const Tensor& stats, const Tensor& cells, const std::optional<Tensor>& projection,
    const Tensor& grad_y, const std::optional<Tensor>& grad_h_n,
    const std::optional<Tensor>& grad_c_n, int64_t threads) {
  const Variant v = variant_of(kind, peephole, coupled, before);
  const bool lstm = kind == kLSTM;
  TORCH_CHECK(ln_ih_weight.has_value() == projection.has_value(),
              "rnnkit_ln: the input LN's weight and the projection come together");
  if (lstm) check_lstm_given(c0, "c0", cell_weight, std::nullopt, false);
  TORCH_CHECK(!peephole || peep, "rnnkit_ln: peephole_weights is None; peephole=True needs them");
  rnnkit::check_float_dtype(y, "y");
  check_rank(y, 3, "y", "(T, B, H)");
  check_rank(h0, 2, "h0", "(B, H)");
  TORCH_CHECK(y.size(2) == h0.size(1), "rnnkit_ln: y must be (T, B, H) and h0 (B, H) of one H, "
              "got ", y.sizes(), " and ", h0.sizes());
  const at::ScalarType dtype = y.scalar_type();
  check_parameters(v, h0.size(1), dtype, w_hh, ln_weight, ln_bias, cell_weight,
                   std::nullopt, peep, ln_ih_weight, std::nullopt);
  const int64_t steps = y.size(0), batch = y.size(1), H = h0.size(1), GH = v.gates() * H;
  check_tensor(grad_y, y.sizes(), dtype, "grad_y");
  check_tensor(h0, {batch, H}, dtype, "h0");
  if (lstm) check_tensor(*c0, {batch, H}, dtype, "c0");
  if (grad_h_n) check_tensor(*grad_h_n, {batch, H}, dtype, "grad_h_n");
  if (lstm && grad_c_n) check_tensor(*grad_c_n, {batch, H}, dtype, "grad_c_n");
  // acts (and d_gx, d_a) packed (Σ bs, G*H) where the forward's gx was (see step_rows)
  TORCH_CHECK(acts.defined() && (acts.dim() == 2 || acts.dim() == 3),
              "rnnkit_ln: acts must be the forward's saved activations, (T, B, G*H) or packed "
              "(sum(batch_sizes), G*H), got ", rnnkit::described(acts));
  const Packed rows_at = step_rows(acts, batch, batch_sizes);
  TORCH_CHECK(rows_at.steps() == steps,
              "rnnkit_ln: acts must be the forward's saved activations of y's ", steps, " steps");
  // every saved tensor in the forward's layout: one row per row of gx
  const auto saved = [&](const Tensor& t, int64_t width, const char* name) {
    if (acts.dim() == 2) check_tensor(t, {rows_at.rows(), width}, dtype, name);
    else check_tensor(t, {steps, batch, width}, dtype, name);
  };
  saved(acts, GH, "acts");
  saved(ahat, GH, "ahat");
  saved(stats, kStats, "stats");
  if (lstm) saved(cells, 3 * H, "cells");
  if (projection) saved(*projection, GH, "projection");
  Tensor dh = grad_h_n ? grad_h_n->contiguous().clone() : at::zeros({batch, H}, y.options());
  Tensor dc = lstm ? (grad_c_n ? grad_c_n->contiguous().clone()
                               : at::zeros({batch, H}, y.options()))
                   : empty_like_none(y);
  // (as in the forward: packed, every row is written; padded with lengths, 0 past the lengths)
  const auto alloc = [&]() {
    return acts.dim() == 2
               ? loop_buffer({rows_at.rows(), GH}, y.options(), false)
               : loop_buffer({steps, batch, GH}, y.options(), !batch_sizes.empty());
  };
  Tensor d_gx = alloc();
  Tensor d_a = alloc();
  Tensor g_ln = at::zeros({batch, 2, GH}, y.options());
  Tensor g_cell = lstm ? at::zeros({batch, 2, H}, y.options()) : empty_like_none(y);
  Tensor g_in = ln_ih_weight ? at::zeros({batch, 2, GH}, y.options()) : empty_like_none(y);
  Tensor g_peep = peephole ? at::zeros({batch, coupled ? 2 : 3, H}, y.options())
                           : empty_like_none(y);
  const Tensor iw = ln_ih_weight ? ln_ih_weight->contiguous() : Tensor();
  const Tensor pr = projection ? projection->contiguous() : Tensor();
  const Tensor h0c = h0.contiguous(), w = w_hh.contiguous(), lw = ln_weight.contiguous(),
               lb = ln_bias.contiguous(), gy = grad_y.contiguous();
  const Tensor c0c = lstm ? c0->contiguous() : Tensor();
  const Tensor cw = lstm ? cell_weight->contiguous() : Tensor();
  const Tensor pp = peephole ? peep->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rnnkit_ln_backward", [&] {
    backward_impl<scalar_t>(v, h0c, c0c, w, lw, lb, cw, pp, batch_sizes, y, acts, ahat, stats,
                            cells, gy, pr, iw, dh, dc, d_gx, d_a, g_ln, g_cell, g_in, g_peep,
                            rows_at, threads);
  });
  return {d_gx, d_a, dh, dc, g_ln.sum(0), lstm ? g_cell.sum(0) : g_cell,
          ln_ih_weight ? g_in.sum(0) : g_in, peephole ? g_peep.sum(0) : g_peep};
}

// rnnkit_ln::step: one step of a layer-normalised cell without autograd (the cell call under
// no_grad, a streaming step): h, c = the cell of cells/layer_norm.py at (x, h, c). The input
// projection x W_ih^T and the input LN per row here, then forward_impl's one step (the same row
// math as the layer: one place), both products reading the weights as stored at a few rows
// (gemv_rows). The Python step it replaces was ~25 small torch ops per call.
std::tuple<Tensor, Tensor> ln_step(int64_t kind, bool peephole, bool coupled, bool before,
                                   const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
                                   const Tensor& w_ih, const Tensor& w_hh,
                                   const Tensor& ln_ih_weight, const Tensor& ln_ih_bias,
                                   const Tensor& ln_weight, const Tensor& ln_bias,
                                   const std::optional<Tensor>& cell_weight,
                                   const std::optional<Tensor>& cell_bias,
                                   const std::optional<Tensor>& peep, int64_t threads) {
  const Variant v = variant_of(kind, peephole, coupled, before);
  const bool lstm = kind == kLSTM;
  check_rank(x, 2, "x", "(B, I)");
  check_rank(h, 2, "h", "(B, H)");
  check_given(w_ih, "w_ih");
  check_given(w_hh, "w_hh");
  const int64_t batch = x.size(0), I = x.size(1), H = h.size(1), GH = v.gates() * H;
  TORCH_CHECK(h.size(0) == batch && w_ih.sizes() == at::IntArrayRef({GH, I}) &&
                  w_hh.sizes() == at::IntArrayRef({GH, H}),
              "rnnkit_ln::step: x (B, I), h (B, H), w_ih (G*H, I), w_hh (G*H, H)");
  if (lstm) check_lstm_given(c, "c", cell_weight, cell_bias, true);
  TORCH_CHECK(!peephole || peep, "rnnkit_ln: peephole_weights is None; peephole=True needs them");
  TORCH_CHECK(w_ih.scalar_type() == x.scalar_type() && h.scalar_type() == x.scalar_type() &&
                  (!lstm || (c->sizes() == h.sizes() && c->scalar_type() == x.scalar_type())),
              "rnnkit_ln::step: h, c and w_ih must have x's dtype, c h's shape");
  check_parameters(v, H, x.scalar_type(), w_hh, ln_weight, ln_bias, cell_weight, cell_bias, peep,
                   ln_ih_weight, ln_ih_bias);
  const Tensor xc = x.contiguous(), wi = w_ih.contiguous();
  Tensor gx = at::empty({1, batch, GH}, xc.options());  // x W_ih^T, then LN(x W_ih^T)
  const Tensor iw = ln_ih_weight.contiguous(), ib = ln_ih_bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "rnnkit_ln_step_input", [&] {
    scalar_t* g = gx.data_ptr<scalar_t>();
    if (batch <= kGemvRowsMax) {
      gemv_rows<scalar_t>(batch, GH, I, xc.data_ptr<scalar_t>(), I, wi.data_ptr<scalar_t>(), I,
                          g, GH, false);
    } else {
      Tensor out = gx.view({batch, GH});
      at::mm_out(out, xc, wi.t());
    }
    const scalar_t* lw = iw.data_ptr<scalar_t>();
    const scalar_t* lb = ib.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) {  // the input LN (as ln_layer_forward's in the loop)
      scalar_t* row = g + b * GH;
      scalar_t mean, rstd;
      ln_stats(row, GH, &mean, &rstd);
      for (int64_t j = 0; j < GH; ++j) row[j] = (row[j] - mean) * rstd * lw[j] + lb[j];
    }
  });
  Tensor h1 = h.contiguous().clone();
  Tensor c1 = lstm ? c->contiguous().clone() : empty_like_none(gx);
  Tensor y = at::empty({1, batch, H}, gx.options());
  Tensor none = empty_like_none(gx);  // (acts, ahat, stats, cells: nothing saved)
  const Tensor w = w_hh.contiguous(), lw = ln_weight.contiguous(), lb = ln_bias.contiguous();
  const Tensor cw = lstm ? cell_weight->contiguous() : Tensor();
  const Tensor cb = lstm ? cell_bias->contiguous() : Tensor();
  const Tensor pp = peephole ? peep->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "rnnkit_ln_step", [&] {
    forward_impl<scalar_t>(v, gx, h1, c1, w, lw, lb, cw, cb, pp, {}, y, false, none, none, none,
                           none, Tensor(), Tensor(), step_rows(gx, batch, {}), threads);
  });
  return {h1, c1};
}

// The float32 GEMM this extension's products run ("own", "brgemm", "blas" or "loop"): the same
// rule as the fused kernels' (rnnkit::choose_gemm), which tests/test_gemm.py checks against
// rnnkit_fused::set_gemm("auto").
std::string gemm_op() { return rnnkit::gemm_name(float_gemm()); }

}  // namespace

TORCH_LIBRARY(rnnkit_ln, m) {
  m.def("layer_forward(int kind, bool peephole, bool coupled, bool before, Tensor gx, Tensor h0, "
        "Tensor? c0, Tensor w_hh, Tensor ln_weight, Tensor ln_bias, Tensor? cell_weight, "
        "Tensor? cell_bias, Tensor? peephole_weights, Tensor? ln_ih_weight, Tensor? ln_ih_bias, "
        "int[] batch_sizes, bool training, int threads) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_backward(int kind, bool peephole, bool coupled, bool before, Tensor h0, "
        "Tensor? c0, Tensor w_hh, Tensor ln_weight, Tensor ln_bias, Tensor? cell_weight, "
        "Tensor? peephole_weights, Tensor? ln_ih_weight, int[] batch_sizes, Tensor y, "
        "Tensor acts, Tensor ahat, Tensor stats, Tensor cells, Tensor? projection, "
        "Tensor grad_y, Tensor? grad_h_n, Tensor? grad_c_n, int threads) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("matmul(Tensor a, Tensor b) -> Tensor");
  m.def("step(int kind, bool peephole, bool coupled, bool before, Tensor x, Tensor h, Tensor? c, "
        "Tensor w_ih, Tensor w_hh, Tensor ln_ih_weight, Tensor ln_ih_bias, Tensor ln_weight, "
        "Tensor ln_bias, Tensor? cell_weight, Tensor? cell_bias, Tensor? peephole_weights, "
        "int threads) -> (Tensor, Tensor)");
  m.impl("layer_forward", c10::DispatchKey::CPU, TORCH_FN(ln_layer_forward));
  m.impl("matmul", c10::DispatchKey::CPU, TORCH_FN(tiled_matmul));
  m.impl("step", c10::DispatchKey::CPU, TORCH_FN(ln_step));
  m.impl("layer_backward", c10::DispatchKey::CPU, TORCH_FN(ln_layer_backward));
  m.def("gemm() -> str");
  m.impl("gemm", c10::DispatchKey::CatchAll, TORCH_FN(gemm_op));
}
