// What every cell's time loop shares: the layer's configuration (Cfg), the regularisers'
// tensors (Reg), the thread team and its split of the hidden units, and the end of a
// backward step (finish_dh).
// Part of fused_rnn.cpp's one translation unit (included there, in order; not a
// stand-alone header).
#pragma once

namespace {

enum Kind { RNN = 0, LSTM = 1, GRU = 2 };
enum Act { TANH = 0, RELU = 1, SIGMOID = 2, IDENTITY = 3 };  // IDENTITY: the linear Elman RNN

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

}  // namespace
