// One layer over time: the call's configuration, the thread split (units or batch
// rows), forward_impl (input projection, then the cell's forward loop) and
// backward_impl (the cell's backward loop in time chunks, then the weight gradients).
// Part of fused_rnn.cpp's one translation unit (included there, in order; not a
// stand-alone header).
#pragma once

namespace {

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
    rnnkit::check_batch_sizes(batch_sizes, c.T, c.B);
    c.bs = batch_sizes;
  }
  return c;
}

bool partial(const Cfg& c) {
  for (auto b : c.bs)
    if (b != c.B) return true;
  return false;
}

// The ragged layout (Packed, packed_rows, pack_steps, unpack_steps, zero_padded) is packed.h's,
// shared with layer_norm_rnn.cpp.

// A (T, B, width) tensor whose rows past each length are 0 (packed.h's zero_padded).
at::Tensor zero_padded(const Cfg& c, int64_t width, const at::TensorOptions& opts) {
  return zero_padded(at::empty({c.T, c.B, width}, opts), c.bs);
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
// (input projection, dx, dW_ih, dW_hh) stay multi-threaded GEMMs over the rows that run (all
// T*B, or a ragged batch's packed rows: Packed) either way.
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
      ctil = part ? zero_padded(cf, H, opts) : at::empty({T_, B, H}, opts);
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
    // A ragged batch: the rows that run only (Packed). The leading steps where every row runs
    // are the same rows in both layouts (one product in place); the later steps' running rows
    // are packed, projected as one product and put back. Rows past their length are never read
    // (NaN in x's padding stays out); in training their gates are 0 (an output).
    const int64_t full = part ? full_steps(cf.bs, B) : T_;
    input_projection<T>(full * B, GH, I, x.data_ptr<T>(), WihT.data_ptr<T>(), gates.data_ptr<T>(),
                        bias, nt_all);
    if (full < T_) {
      const std::vector<int64_t> tail(cf.bs.begin() + full, cf.bs.end());
      const Packed pk = packed_rows(tail);
      const T* xs = x.data_ptr<T>() + full * B * I;
      T* gs = gates.data_ptr<T>() + full * B * GH;
      if (pk.rows() > 0) {
        std::unique_ptr<T[]> xp(new T[pk.rows() * I]), gp(new T[pk.rows() * GH]);
        pack_steps<T>(tail, pk, I, [&](int64_t k) { return xs + k * B * I; }, nullptr, xp.get());
        input_projection<T>(pk.rows(), GH, I, xp.get(), WihT.data_ptr<T>(), gp.get(), bias,
                            nt_all);
        unpack_steps<T>(tail, pk, B, GH, gp.get(), gs, training);
      } else if (training) {
        std::memset(gs, 0, (T_ - full) * B * GH * sizeof(T));
      }
    }
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
  at::Tensor y = part ? zero_padded(cf, H, opts) : at::empty({T_, B, H}, opts);
  at::Tensor hst = h0.clone();
  at::Tensor cst, cs, extra;
  if (cf.kind == LSTM) {
    cst = c0.clone();
    if (training) cs = part ? zero_padded(cf, H, opts) : at::empty({T_, B, H}, opts);
    const T* p = cf.peep ? pw.data_ptr<T>() : nullptr;
    T* csp = training ? cs.data_ptr<T>() : nullptr;
    // (the recurrent product's scratch, never returned: plain memory, not an ATen op per call)
    std::unique_ptr<T[]> rec(new T[B * GH]);
    const LstmFwdBuffers<T> buf{gates.data_ptr<T>(), rec.get(),          y.data_ptr<T>(),
                                csp,                 hst.data_ptr<T>(),  cst.data_ptr<T>(),
                                h0.data_ptr<T>(),    p};
    auto run = [&](auto peep, auto coupled, auto save, auto reg) {
      run_time_loop(cf, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
        lstm_fwd_loop<T, decltype(peep)::value, decltype(coupled)::value, decltype(save)::value,
                      decltype(reg)::value>(c, buf.at_row(m0, H, GH), W, R.from_row(m0, H), nt);
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
    const ElmanFwdBuffers<T> buf{gates.data_ptr<T>(), y.data_ptr<T>(), hst.data_ptr<T>(),
                                 h0.data_ptr<T>()};
    run_time_loop(cf, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
      rnn_fwd_loop<T>(c, buf.at_row(m0, H), W, R.from_row(m0, H), nt);
    });
  } else if (!cf.before) {
    at::Tensor gh = at::empty({B, H}, opts);
    at::Tensor rec = W.panel > 0 ? at::empty({B, GH}, opts) : at::Tensor();
    // (zeros past each length: an operator's outputs must not depend on uninitialised memory)
    if (training) extra = part ? zero_padded(cf, H, opts) : at::empty({T_, B, H}, opts);
    at::Tensor bhn;
    if (has_bias) bhn = b_hh.narrow(0, 2 * H, H).contiguous();
    const GruFwdBuffers<T> buf{gates.data_ptr<T>(),
                               y.data_ptr<T>(),
                               hst.data_ptr<T>(),
                               h0.data_ptr<T>(),
                               rec.defined() ? rec.data_ptr<T>() : nullptr,
                               gh.data_ptr<T>(),
                               training ? extra.data_ptr<T>() : nullptr,
                               has_bias ? bhn.data_ptr<T>() : nullptr,
                               nullptr};
    run_time_loop(cf, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
      gru_after_fwd_loop<T>(c, buf.at_row(m0, H), W, R.from_row(m0, H), nt, training);
    });
  } else {
    // Rows past their length multiply zero gradients in dW_hn: they must not hold NaN garbage.
    extra = training ? (part ? zero_padded(cf, H, opts) : at::empty({T_, B, H}, opts))
                     : at::empty({B, H}, opts);
    at::Tensor rec = W.panel > 0 ? at::empty({B, GH}, opts) : at::Tensor();
    const GruFwdBuffers<T> buf{gates.data_ptr<T>(),
                               y.data_ptr<T>(),
                               hst.data_ptr<T>(),
                               h0.data_ptr<T>(),
                               rec.defined() ? rec.data_ptr<T>() : nullptr,
                               nullptr,
                               nullptr,
                               nullptr,
                               extra.data_ptr<T>()};
    run_time_loop(cf, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
      gru_before_fwd_loop<T>(c, buf.at_row(m0, H), W, R.from_row(m0, H), nt, training);
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
  // One chunk's gate gradients, reused by every chunk (bf16 mode: rows >= bs[t] zeroed per
  // chunk).
  // bf16 mode forms its GEMMs over all T*B rows at once (bf16_input_and_weight_grads): one chunk
  const int64_t CS =
      bf16 ? T_ : std::max<int64_t>(1, std::min(backward_chunk_steps(cf), T_));
  const bool gru_after = cf.kind == GRU && !cf.before;
  // (the rows past each length are zeroed chunk by chunk, below)
  at::Tensor dg = at::empty({CS, B, GH}, opts);
  at::Tensor dgh;  // GRU reset after: d(W_hh h + b_hh)
  if (gru_after) dgh = at::empty({CS, B, GH}, opts);
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
  // Whether a chunk has written the weight gradients yet: the first chunk with rows overwrites
  // them, later ones add. (Not "the first chunk": in a ragged batch the last chunks may have no
  // row that runs, and own_weight_grads writes nothing over 0 rows, leaving at::empty's memory.)
  bool dw_begun = false;
  for (int64_t t1 = T_;;) {
    const int64_t t0 = std::max<int64_t>(0, t1 - CS), n = t1 - t0, nB = n * B;
    Cfg cc = cf;
    cc.T = n;
    cc.bs.assign(cf.bs.begin() + t0, cf.bs.begin() + t1);
    Reg<T> Rc = R;
    if (R.kh) Rc.kh = R.kh + t0 * B * H;
    if (R.kc) Rc.kc = R.kc + t0 * B * H;
    if (R.ctil) Rc.ctil = R.ctil + t0 * B * H;
    // Rows past their length: the loops write and read rows < bs[t] only, and the products
    // below read the packed rows that ran, so only bf16 mode, whose products run over all T*B
    // rows, needs their gradients zeroed. (Zeroing them in every mode, through three ATen calls
    // per step, was 5 % of a skewed LSTM 400,16,128 forward+backward: perf, 1 thread.)
    if (part && bf16) {
      for (int64_t k = 0; k < n; ++k) {
        const int64_t M = cc.bs[k];
        const size_t bytes = static_cast<size_t>((B - M) * GH) * sizeof(T);
        std::memset(dg.data_ptr<T>() + (k * B + M) * GH, 0, bytes);
        if (gru_after) std::memset(dgh.data_ptr<T>() + (k * B + M) * GH, 0, bytes);
      }
    }
    // a grad_y that is not contiguous (the expanded ones of y.sum()) is made so a chunk at a time
    at::Tensor gyc = gy.narrow(0, t0, n).contiguous();
    const T* gyp = gyc.data_ptr<T>();
    const T* hp0 = t0 == 0 ? h0.data_ptr<T>() : yp + (t0 - 1) * B * H;
    T* dgp = dg.data_ptr<T>();
    // the chunk's buffers, built once: each loop call moves them to its row block (at_row)
    if (cf.kind == LSTM) {
      const T* csp = cs.data_ptr<T>();
      const LstmBwdBuffers<T> buf{acts.data_ptr<T>() + t0 * B * GH,
                                  csp + t0 * B * H,
                                  t0 == 0 ? c0.data_ptr<T>() : csp + (t0 - 1) * B * H,
                                  gyp,
                                  dgp,
                                  dhs.data_ptr<T>(),
                                  dcs.data_ptr<T>(),
                                  p,
                                  nullptr,
                                  sc};
#define LSTM_BWD(P, C, REG)                                                             \
  run_time_loop(cc, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int k) {     \
    LstmBwdBuffers<T> b = buf.at_row(m0, H, GH);                                        \
    b.dpw = P ? dpw_block[k].data_ptr<T>() : nullptr;                                   \
    lstm_bwd_loop<T, P, C, REG>(c, b, whh, Rc.from_row(m0, H), nt);                     \
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
      const ElmanBwdBuffers<T> buf{h_new.template data_ptr<T>() + t0 * B * H, gyp, dgp,
                                   dhs.data_ptr<T>(), sc};
      run_time_loop(cc, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
        rnn_bwd_loop<T>(c, buf.at_row(m0, H), whh, Rc.from_row(m0, H), nt);
      });
    } else {
      const GruBwdBuffers<T> buf{acts.data_ptr<T>() + t0 * B * GH,
                                 gru_after ? ep + t0 * B * H : nullptr,
                                 yp + t0 * B * H,
                                 hp0,
                                 gyp,
                                 dgp,
                                 gru_after ? dgh.data_ptr<T>() : nullptr,
                                 gru_after ? nullptr : drh.data_ptr<T>(),
                                 dhs.data_ptr<T>(),
                                 sc};
      run_time_loop(cc, nt_loop, nt_rows, [&](const Cfg& c, int64_t m0, int nt, int) {
        if (gru_after) gru_after_bwd_loop<T>(c, buf.at_row(m0, H), whh, Rc.from_row(m0, H), nt);
        else gru_before_bwd_loop<T>(c, buf.at_row(m0, H), whh, Rc.from_row(m0, H), nt);
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
    // The rows the chunk's products run over: all n*B, or in a ragged chunk only the rows that
    // ran, packed (Packed: dG, x, h_{t-1} (⊙ m), the reset-before GRU's r ⊙ h and the
    // reset-after GRU's d(W_hh h + b_hh), each gathered once), so that each product is one
    // GEMM over Σ bs rows. The rows past their length are never read: their dx is 0 and NaN in
    // x's padding stays out of dW_ih.
    const bool ragged =
        part && std::any_of(cc.bs.begin(), cc.bs.end(), [&](int64_t b) { return b != B; });
    const Packed pk = ragged ? packed_rows(cc.bs) : Packed{};
    const int64_t nR = ragged ? pk.rows() : nB;
    const T* dG = dgp;                                      // (nR, GH)
    const T* dGh = gru_after ? dgh.data_ptr<T>() : nullptr;  // (nR, GH)
    const T* X = x.data_ptr<T>() + t0 * B * I;              // (nR, I)
    const T* RH = cf.kind == GRU && cf.before ? ep + t0 * B * H : nullptr;  // (nR, H)
    // h_{t-1} of rows [0, B) from h_first (h0 / y[t0 - 1]), of the later rows from h_rest
    // (y[t0 ...]); one (nR, H) block when h_rest = h_first + B H (packed, masked, or t0 > 0)
    const T* h_first = hp0;
    const T* h_rest = yp + t0 * B * H;
    at::Tensor dgc, dghc, xc, hc, rhc;
    if (ragged) {
      dgc = at::empty({nR, GH}, opts);
      pack_steps<T>(cc.bs, pk, GH, [&](int64_t k) { return dgp + k * B * GH; }, nullptr,
                    dgc.data_ptr<T>());
      dG = dgc.data_ptr<T>();
      if (need_dw) {
        if (gru_after) {
          dghc = at::empty({nR, GH}, opts);
          pack_steps<T>(cc.bs, pk, GH, [&](int64_t k) { return dgh.data_ptr<T>() + k * B * GH; },
                        nullptr, dghc.data_ptr<T>());
          dGh = dghc.data_ptr<T>();
        }
        xc = at::empty({nR, I}, opts);
        pack_steps<T>(cc.bs, pk, I, [&](int64_t k) { return X + k * B * I; }, nullptr,
                      xc.data_ptr<T>());
        X = xc.data_ptr<T>();
        hc = at::empty({nR, H}, opts);
        pack_steps<T>(cc.bs, pk, H,
                      [&](int64_t k) { return k == 0 ? hp0 : yp + (t0 + k - 1) * B * H; },
                      rmask.defined() ? rmask.data_ptr<T>() : nullptr, hc.data_ptr<T>());
        h_first = hc.data_ptr<T>();
        h_rest = h_first + B * H;
        if (RH) {
          rhc = at::empty({nR, H}, opts);
          pack_steps<T>(cc.bs, pk, H, [&](int64_t k) { return RH + k * B * H; }, nullptr,
                        rhc.data_ptr<T>());
          RH = rhc.data_ptr<T>();
        }
      }
    } else if (need_dw && rmask.defined()) {  // W_hh multiplied h ⊙ m: one mask every step
      hc = at::empty({n, B, H}, opts);
      hc[0].copy_(t0 == 0 ? h0 : y[t0 - 1]);
      if (n > 1) hc.narrow(0, 1, n - 1).copy_(y.narrow(0, t0, n - 1));
      hc.mul_(rmask);
      h_first = hc.data_ptr<T>();
      h_rest = h_first + B * H;
    }
    // (nR, width) rows at p as a tensor (no copy)
    auto rows_of = [&](const T* p, int64_t width) {
      return at::from_blob(const_cast<T*>(p), {nR, width}, opts);
    };
    if (need_dx) {
      T* dxs = dx.data_ptr<T>() + t0 * B * I;
      if (!ragged) {
        pgemm<T>(nB, I, GH, dG, GH, w_ih.data_ptr<T>(), I, dxs, I, false, nullptr, nt_all);
      } else {
        at::Tensor dxc = at::empty({nR, I}, opts);
        pgemm<T>(nR, I, GH, dG, GH, w_ih.data_ptr<T>(), I, dxc.data_ptr<T>(), I, false, nullptr,
                 nt_all);
        unpack_steps<T>(cc.bs, pk, B, I, dxc.data_ptr<T>(), dxs, true);  // padding's dx: 0
      }
    }
#ifdef RNNKIT_OWN_GEMM
    if constexpr (std::is_same_v<T, float>) if (need_dw && own_dw) {
      const bool acc = dw_begun;
      const float* xs = (const float*)X;
      const float* hf = (const float*)h_first;
      const float* hr = (const float*)h_rest;
      // C rows [r0, r1) (+)= At Z over chunk rows [k0, k0 + kk), Z's rows split where the
      // previous states move from h_first to h_rest (row B)
      auto prev_states = [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                             int64_t kk, float* C, int64_t ldc) {
        const int64_t ks = std::clamp<int64_t>(B - k0, 0, kk);  // rows from h_first
        if (ks > 0)
          gemm_cols(r1 - r0, H, ks, At, ldat, hf + k0 * H, H, C + r0 * ldc, ldc, acc || k0 > 0);
        if (kk > ks)
          gemm_cols(r1 - r0, H, kk - ks, At + ks, ldat, hr + (k0 + ks - B) * H, H, C + r0 * ldc,
                    ldc, acc || k0 + ks > 0);
      };
      float* dwi = dwih.data_ptr<float>();
      float* dwh = dwhh.data_ptr<float>();
      auto input = [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                       int64_t kk) {
        gemm_cols(r1 - r0, I, kk, At, ldat, xs + k0 * I, I, dwi + r0 * I, I, acc || k0 > 0);
      };
      if (gru_after) {  // dW_hh from d(W_hh h + b_hh), dW_ih from d(x-part)
        own_weight_grads(nR, GH, (const float*)dG, GH, nt_all, input);
        own_weight_grads(nR, GH, (const float*)dGh, GH, nt_all,
                         [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                             int64_t kk) { prev_states(At, ldat, r0, r1, k0, kk, dwh, H); });
      } else if (cf.kind == GRU) {  // reset before: W_hn multiplied r ⊙ h (extra), not h
        const float* rh = (const float*)RH;
        own_weight_grads(nR, GH, (const float*)dG, GH, nt_all,
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
        own_weight_grads(nR, GH, (const float*)dG, GH, nt_all,
                         [&](const float* At, int64_t ldat, int64_t r0, int64_t r1, int64_t k0,
                             int64_t kk) {
          input(At, ldat, r0, r1, k0, kk);
          prev_states(At, ldat, r0, r1, k0, kk, dwh, H);
        });
      }
    }
#endif
    if (need_dw && !own_dw) {
      const bool acc = dw_begun;  // later chunks add to the first one's weight gradients
      // dW_ih^T (I, GH) = X^T (I, nR) dG (nR, GH), stored transposed tile by tile (no pass)
      at::Tensor xT = rows_of(X, I).t().contiguous();
      pgemm_tout<T>(I, GH, nR, xT.data_ptr<T>(), nR, dG, GH, dwih.data_ptr<T>(), I, nt_all, acc);
      // previous hidden states of the chunk, transposed (H, nR): one block, or h0 and y's rows
      // gathered first (in row order and transposed in one pass: faster than copying y into a
      // strided (H, nB) view, measured 1.7x at T,B,H = 100,32,256)
      at::Tensor hprev;
      if (h_rest == h_first + B * H) {
        hprev = rows_of(h_first, H);
      } else {
        hprev = at::empty({nR, H}, opts);
        std::memcpy(hprev.data_ptr<T>(), h_first, std::min(B, nR) * H * sizeof(T));
        if (nR > B)
          std::memcpy(hprev.data_ptr<T>() + B * H, h_rest, (nR - B) * H * sizeof(T));
      }
      at::Tensor hT = hprev.t().contiguous();
      const T* dhp = gru_after ? dGh : dG;
      if (cf.kind == GRU && cf.before) {
        pgemm<T>(H, 2 * H, nR, hT.data_ptr<T>(), nR, dG, GH, dwhhT.data_ptr<T>(), GH, acc,
                 nullptr, nt_all);
        at::Tensor rhT = rows_of(RH, H).t().contiguous();
        pgemm<T>(H, H, nR, rhT.data_ptr<T>(), nR, dG + 2 * H, GH, dwhhT.data_ptr<T>() + 2 * H,
                 GH, acc, nullptr, nt_all);
      } else {
        pgemm_tout<T>(H, GH, nR, hT.data_ptr<T>(), nR, dhp, GH, dwhh.data_ptr<T>(), H, nt_all,
                      acc);
      }
    }
    if (need_dw && nR > 0) dw_begun = true;
    if (need_dw && has_bias) {
      const bool acc = t1 < T_;
      at::Tensor s = rows_of(dG, GH).sum(0);
      dbih = acc ? dbih.add_(s) : s;
      if (gru_after) {
        at::Tensor sh = rows_of(dGh, GH).sum(0);
        dbhh = acc ? dbhh.add_(sh) : sh;
      }
    }
    if (t0 == 0) break;
    t1 = t0;
  }
  sum_dpw_blocks();
  if (need_dw) {
    if (!dw_begun) {  // no row ran in any chunk (a batch of 0 rows)
      dwih.zero_();
      (dwhhT.defined() ? dwhhT : dwhh).zero_();
    }
    if (cf.kind == GRU && cf.before && !own_dw) dwhh = dwhhT.t().contiguous();
    if (has_bias && !gru_after) dbhh = dbih;
  }
  return {dx, dhs, dcs, dwih, dwhh, dbih, dbhh, dpw};
}

}  // namespace
