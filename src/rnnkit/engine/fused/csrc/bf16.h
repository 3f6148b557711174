// bfloat16 mixed precision of the fused kernels (torch.autocast on CPUs with AVX-512
// BF16). Reference: the same layer in float32 on bf16-rounded operands.
// Part of fused_rnn.cpp's one translation unit (included there, in order; not a
// stand-alone header).
#pragma once

namespace {

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

}  // namespace
