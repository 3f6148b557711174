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

#include "../../csrc/blas.h"  // (and own_gemm.h)
#include "../../csrc/checks.h"
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

// The parts, one translation unit (the compiler inlines the GEMM tiles into every loop):
//   time_loop.h  Cfg, Reg, the thread team, what every time loop shares
//   gemm.h       the matrix products and packed weight layouts
//   bf16.h       bfloat16 mixed precision
//   elman.h, lstm.h, gru.h   the time loops of each cell family, forward and backward
//   layer.h      one layer over time: forward_impl, backward_impl
//   inference.h  the batch-1 inference paths (lean, packed, streaming step)
//   this file    the operators' argument checks, start-up (BLAS, GEMM choice) and the
//                torch.library registration
#include "time_loop.h"
#include "few_rows.h"
#include "gemm.h"
#include "bf16.h"
#include "elman.h"
#include "lstm.h"
#include "gru.h"
#include "packed.h"
#include "layer.h"

namespace {

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
// The loops read G*H values of each bias and H of each peephole row through raw pointers:
// anything shorter would be read past its end (a wrong answer, no error), so the operators
// check them here (the layers always pass their own parameters; a direct call may not).
void check_bias_and_peepholes(const Cfg& cf, const at::Tensor& x, const at::Tensor& b_ih,
                              const at::Tensor& b_hh, const at::Tensor& pw) {
  TORCH_CHECK(b_ih.defined() == b_hh.defined(), "b_ih and b_hh: both or neither");
  for (const at::Tensor* b : {&b_ih, &b_hh})
    TORCH_CHECK(!b->defined() || (b->dim() == 1 && b->size(0) == cf.G * cf.H &&
                                  b->scalar_type() == x.scalar_type()),
                "b_ih and b_hh must be (G*H,) = (", cf.G * cf.H, ",) of x's dtype");
  const int64_t rows = cf.kind == LSTM && cf.peep ? (cf.coupled ? 2 : 3) : 0;
  TORCH_CHECK(rows == 0 || (pw.defined() && pw.dim() == 2 && pw.size(0) == rows &&
                            pw.size(1) == cf.H && pw.scalar_type() == x.scalar_type()),
              "the peephole weights must be (", rows, ", H) = (", rows, ", ", cf.H,
              ") of x's dtype");
}

using rnnkit::check_given;
using rnnkit::check_threads;
using rnnkit::described;

// A (B, H) state or state gradient of x's dtype. The loops read and write B*H values of each
// through raw pointers: a state of another batch or width was read or written past its end
// (measured: h0 of batch 1 with x of batch 4 corrupted the heap). The layers always pass their
// own states; a direct operator call may not.
void check_state(const Cfg& cf, const at::Tensor& x, const at::Tensor& state, const char* name) {
  TORCH_CHECK(state.defined() && state.dim() == 2 && state.size(0) == cf.B &&
                  state.size(1) == cf.H && state.scalar_type() == x.scalar_type(),
              name, " must be (B, H) = (", cf.B, ", ", cf.H, ") of x's dtype (", x.scalar_type(),
              "), got ", described(state));
}

// A saved (T, B, H) tensor that layer_backward reads (y, the LSTM's cells, the extra products).
void check_saved(const Cfg& cf, const at::Tensor& x, const at::Tensor& saved, const char* name) {
  TORCH_CHECK(saved.defined() && saved.dim() == 3 && saved.size(0) == cf.T &&
                  saved.size(1) == cf.B && saved.size(2) == cf.H &&
                  saved.scalar_type() == x.scalar_type(),
              name, " must be (T, B, H) = (", cf.T, ", ", cf.B, ", ", cf.H, ") of x's dtype (",
              x.scalar_type(), ") as layer_forward(training=True) returns it, got ",
              described(saved));
}

// A (G*H, K) weight of x's dtype.
void check_weight(const Cfg& cf, const at::Tensor& x, const at::Tensor& w, int64_t K,
                  const char* name) {
  TORCH_CHECK(w.defined() && w.dim() == 2 && w.size(0) == cf.G * cf.H && w.size(1) == K &&
                  w.scalar_type() == x.scalar_type(),
              name, " must be (G*H, ", K, ") = (", cf.G * cf.H, ", ", K, ") of x's dtype (",
              x.scalar_type(), "), got ", described(w));
}

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
  rnnkit::check_rank(x, 3, "x", "(T, B, I)");
  rnnkit::check_rank(h0, 2, "h0", "(B, H)");
  const int64_t H = h0.size(1);
  Cfg cf = make_cfg(v.kind, v.act, v.peep, v.coupled, v.before, x, H, batch_sizes);
  // (a weight of another dtype or rank raised "expected scalar type Double but found Float" or
  // "Dimension out of range", naming no argument)
  check_weight(cf, x, w_ih, cf.I, "w_ih");
  check_weight(cf, x, w_hh, H, "w_hh");
  check_bias_and_peepholes(cf, x, b_ih, b_hh, pw);
  check_state(cf, x, h0, "h0");
  if (cf.kind == LSTM) check_state(cf, x, c0, "c0");
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
  check_threads(nthreads);
  rnnkit::check_rank(x, 3, "x", "(T, B, I)");
  rnnkit::check_rank(h0, 2, "h0", "(B, H)");
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
  TORCH_CHECK(w_ih.defined() && w_hh.defined() && w_ih.dim() == 2 && w_hh.dim() == 2 &&
                  w_ih.size(0) == w_hh.size(0) && w_ih.scalar_type() == w_hh.scalar_type(),
              "pack_weights: w_ih (G*H, I) and w_hh (G*H, H) of one dtype, got ",
              described(w_ih), " and ", described(w_hh));
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
  check_threads(nthreads);
  rnnkit::check_rank(w_ih, 2, "w_ih", "(G*H, I)");
  rnnkit::check_rank(w_hh, 2, "w_hh", "(G*H, H)");
  TORCH_CHECK(w_ih_t.defined() && w_ih_t.dim() == 2 && w_ih_t.size(0) == w_ih.size(1) &&
                  w_ih_t.size(1) == w_ih.size(0) && w_ih_t.is_contiguous() &&
                  w_ih_t.scalar_type() == w_ih.scalar_type(),
              "w_ih_t must be pack_weights' W_ih^T, ", described(w_ih.t()), ", got ",
              described(w_ih_t));
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

}  // namespace

#include "inference.h"

namespace {

// Registered for every dispatch key (CatchAll): with its one tensor argument None, a CPU-only
// registration never ran and the dispatcher said "There were no tensor arguments to this
// function"; so the device is checked here (a meta tensor's data would be read).
at::Tensor pack_gemv_op(const at::Tensor& w, int64_t gates) {
  check_given(w, "w");
  TORCH_CHECK(w.device().is_cpu(), "pack_gemv: w must be a CPU tensor, got one on ", w.device());
  return pack_gemv(w, gates);
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
  check_threads(nthreads);
  rnnkit::check_rank(x, 3, "x", "(T, B, I)");
  rnnkit::check_rank(h0, 2, "h0", "(B, H)");
  const int64_t H = h0.size(1);
  Cfg cf = make_cfg(kind, act, peep, coupled, before, x, H, batch_sizes.vec());
  const Masks masks = check_masks(cf, x, recurrent_mask, zoneout_h, zoneout_c);
  check_weight(cf, x, w_ih, cf.I, "w_ih");
  check_weight(cf, x, w_hh, H, "w_hh");
  check_bias_and_peepholes(cf, x, at::Tensor(), at::Tensor(), pw);
  // (an Elman layer without zoneout of h saves no activations: its backward reads them from y)
  const bool acts_in_y = cf.kind == RNN && !masks.keep_h.defined();
  // (acts and grad_y of another dtype raised "expected scalar type Float but found Double")
  TORCH_CHECK(acts.numel() == (acts_in_y ? 0 : cf.T * cf.B * cf.G * H) &&
                  (acts.numel() == 0 || acts.scalar_type() == x.scalar_type()),
              "acts must be the activations of layer_forward(training=True), ",
              acts_in_y ? 0 : cf.T * cf.B * cf.G * H, " values of x's dtype (", x.scalar_type(),
              "), got ", described(acts));
  TORCH_CHECK(gy.defined() && gy.dim() == 3 && gy.size(0) == cf.T && gy.size(1) == cf.B &&
                  gy.size(2) == H && gy.scalar_type() == x.scalar_type(),
              "grad_y must be (T, B, H) = (", cf.T, ", ", cf.B, ", ", H, ") of x's dtype (",
              x.scalar_type(), "), got ", described(gy));
  check_state(cf, x, h0, "h0");
  if (cf.kind == LSTM) check_state(cf, x, c0, "c0");
  if (gh.defined()) check_state(cf, x, gh, "grad_h_n");
  if (gc.defined()) check_state(cf, x, gc, "grad_c_n");
  TORCH_CHECK(!gc.defined() || cf.kind == LSTM, "grad_c_n is for an LSTM's cell state");
  check_saved(cf, x, y, "y");
  if (cf.kind == LSTM) check_saved(cf, x, cs, "cells");
  if (cf.kind == GRU || (cf.kind == LSTM && masks.keep_c.defined())) check_saved(cf, x, extra, "extra");
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

// The BLAS entry points (engine/csrc/blas.h's resolve_blas) into gemm.h's globals.
void resolve_blas() {
  const rnnkit::Blas b = rnnkit::resolve_blas();
  g_sgemm = b.sgemm;
  g_dgemm = b.dgemm;
  g_sgemv = b.sgemv;
  g_dgemv = b.dgemv;
}

// The float32 GEMM of gemm_rm for this CPU, decided once at start-up by the shared rule
// (engine/csrc/blas.h's choose_gemm: gemm_own on AVX2 without AVX-512, else brgemm, else BLAS).
Gemm choose_gemm() { return rnnkit::choose_gemm(g_sgemm != nullptr); }

// The recurrent weight's panel width for GEMM g (g_rec_panel).
int64_t rec_panel_for(Gemm g) {
#ifdef RNNKIT_OWN_GEMM
  if (g == Gemm::OWN) return kOwnCols;
#endif
  (void)g;
  return 128;
}

using rnnkit::gemm_name;

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
  if (which == "brgemm" && brgemm_works()) g_gemm = Gemm::BRGEMM;
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
  TORCH_CHECK(panel >= 0 || (panel == -16 && B.is_contiguous()),
              "gemm_run: panel < 0 (the input projection's tiles) must be -16, B contiguous");
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
    if (panel < 0) {  // C = A B in the input projection's tiles (pgemm_panels, B (K, N) holding
                      // pack_panels' layout of panels of -panel columns; acc is not read)
      pgemm_panels<float>(M, N, K, a, lda, b, -panel, c, ldc, nullptr, 1);
    } else if (panel > 0) {
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
  m.impl("pack_gemv", c10::DispatchKey::CatchAll, TORCH_FN(pack_gemv_op));
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
