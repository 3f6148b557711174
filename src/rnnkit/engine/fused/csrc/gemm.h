// The fused kernels' matrix products: BLAS resolved from torch's library, rnnkit's own
// AVX2 GEMM (engine/csrc/own_gemm.h) and oneDNN's brgemm micro-kernel (engine/csrc/blas.h,
// shared with layer_norm_rnn.cpp) behind one single-thread gemm_rm, the packed weight layouts
// (panels, packed GEMV) and the parallel GEMMs over all T*B rows. Reference: torch.mm /
// torch.addmm. The products of a few rows (gemv_rows, few_rows_strips) are few_rows.h's,
// shared with layer_norm_rnn.cpp.
// Part of fused_rnn.cpp's one translation unit (included there, in order; not a
// stand-alone header).
#pragma once

namespace {

// ----------------------------------------------------------------------------------------------
// GEMM: row-major C(M, N) (+)= A(M, K) B(K, N), single-threaded (called from inside a parallel
// region, or from one tile of a parallel GEMM).
// ----------------------------------------------------------------------------------------------
// The BLAS, brgemm and GEMM-choice pieces are engine/csrc/blas.h's (shared with
// layer_norm_rnn.cpp); gemm_own is engine/csrc/own_gemm.h's.
using rnnkit::blas_gemm;
using rnnkit::brgemm_rm;
using rnnkit::brgemm_works;
using rnnkit::dgemm_t;
using rnnkit::dgemv_t;
using rnnkit::Gemm;
using rnnkit::loop_gemm;
using rnnkit::own_gemm_fits_cpu;
using rnnkit::sgemm_t;
using rnnkit::sgemv_t;
#ifdef RNNKIT_OWN_GEMM
using rnnkit::g_own_kc;
using rnnkit::g_own_pack_rows;
using rnnkit::gemm_own;
using rnnkit::kOwnCols;
#endif

// Which single-thread float32 GEMM gemm_rm runs (init: rnnkit::choose_gemm; set_gemm for
// benchmarks/tests).
Gemm g_gemm = Gemm::LOOP;

// The BLAS entry points gemm_rm and blas_gemv call, resolved at init (rnnkit::resolve_blas;
// set_gemm("loop") clears them): the plain loop GEMM where there is none. gemv: for float64
// one-row products (float ones use gemv_rows below): at batch 1 every recurrent product is a
// vector times the weight, a GEMM with one column.
sgemm_t g_sgemm = nullptr;
dgemm_t g_dgemm = nullptr;
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
  // Long reductions (the backward's K = G*H) in chunks that keep the B panel in cache:
  // 1.4-1.7x faster at K = 2048 than one call; one column block.
  if (g_gemm == Gemm::BRGEMM) return brgemm_rm(M, N, K, A, lda, B, ldb, C, ldc, acc, N,
                                               K > 512 ? 256 : K);
#endif
  if (g_sgemm) return blas_gemm(g_sgemm, M, N, K, A, lda, B, ldb, C, ldc, acc);
  loop_gemm(M, N, K, A, lda, B, ldb, C, ldc, acc);
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
    if constexpr (std::is_same_v<T, float>) return gemv_rows(1, N, K, A, lda, Bt, ldbt, C, ldc, acc);
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

#ifdef RNNKIT_OWN_GEMM
// Whether the per-step product of M rows takes few_rows_strips: gemm_own (set_gemm may change
// it), 1..kFewRows rows, K > 0 (gemm_rm's K = 0 case zeroes C).
inline bool few_rows(int64_t M, int64_t K) {
  return g_gemm == Gemm::OWN && M >= 1 && M <= kFewRows && K > 0;
}
#endif

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
    int64_t c0 = col0, i = 0;
#ifdef RNNKIT_OWN_GEMM
    if constexpr (std::is_same_v<T, float>) {
      if (panel == kOwnCols && few_rows(M, K)) {
        // the whole 16-column panels at once (few_rows_strips); a narrower last one below
        const int64_t whole = (std::min(width, col0 + n) - col0) / kOwnCols;
        if (ahead && whole > 0)
          for (; i < whole; ++i) prefetch_ahead(ahead, ahead_bytes, i, count);
        few_rows_strips(M, whole, K, A, lda, p + col0 * K, kOwnCols * K, C, ldc, acc);
        c0 += whole * kOwnCols;
      }
    }
#endif
    for (; c0 < col0 + n; c0 += panel, ++i) {
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
        int64_t c0 = col0;
        if (few_rows(M, K)) {  // the whole strips at once (few_rows_strips)
          const int64_t whole = (std::min(H, col0 + n) - col0) / kOwnCols;
          few_rows_strips(M, whole, K, A, lda, strips + col0 * rows + k0 * kOwnCols,
                          kOwnCols * rows, C, ldc, acc);
          c0 += whole * kOwnCols;
        }
        for (; c0 < col0 + n; c0 += kOwnCols) {
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

}  // namespace
