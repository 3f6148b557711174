// Elman time loops (tanh / relu / sigmoid / identity), forward and backward:
//   h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
// Plain reference: rnnkit.cells.elman.ElmanMath (step and its backward), run over time by
// rnnkit.engine.reference; torch.nn.RNN for tanh / relu.
// Part of fused_rnn.cpp's one translation unit (included there, in order; not a
// stand-alone header).
#pragma once

namespace {

// ----------------------------------------------------------------------------------------------
// Forward time loops.
// gates: (T, B, G*H) holds x W_ih^T + folded biases on entry, activations on exit (training).
// ----------------------------------------------------------------------------------------------

// The Elman forward loop's buffers (rows as in LstmFwdBuffers).
template <typename T>
struct ElmanFwdBuffers {
  T* gates;     // (T, B, H) in: x W_ih^T + folded biases; out, with regularisers: h~ = f(pre)
  T* y;         // (T, B, H) out: the outputs h_t (the next step's h_{t-1})
  T* hst;       // (B, H) in: a copy of h_{-1}; out: each row's final h (zoneout's h_{t-1})
  const T* h0;  // (B, H) h_{-1}
  ElmanFwdBuffers at_row(int64_t m0, int64_t H) const {
    return {from_row(gates, m0, H), from_row(y, m0, H), from_row(hst, m0, H), from_row(h0, m0, H)};
  }
};

template <typename T>
void rnn_fwd_loop(const Cfg& cf, const ElmanFwdBuffers<T>& buf, const RecW<T>& W,
                  const Reg<T>& R, int nt) {
  const bool reg = R.any();
  const int64_t H = cf.H, B = cf.B;
  T *gates = buf.gates, *y = buf.y, *hst = buf.hst;
  const T* h0 = buf.h0;
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

// ----------------------------------------------------------------------------------------------
// Backward time loops. dg: (T, B, G*H) pre-activation gradients (rows >= bs[t] neither written
// nor read). dhs / dcs: (B, H) running state gradients, in place.
// ----------------------------------------------------------------------------------------------

// The buffers of rnn_bwd_loop, built once by backward_impl (layer.h): (T, B, .) ones point at
// step 0's row 0, (B, .) ones at row 0; at_row moves them to a row block of the batch split.
template <typename T>
struct ElmanBwdBuffers {
  const T* y;   // (T, B, H) the activations f(pre) (y, or with zoneout the saved h~)
  const T* gy;  // (T, B, H) the outputs' gradient
  T* dg;        // (T, B, H) out: the pre-activation gradients
  T* dhs;       // (B, H) in/out: the running dh
  T* zh;        // (B, H) scratch for k_h dh (zoneout), or null
  ElmanBwdBuffers at_row(int64_t m0, int64_t H) const {
    return {from_row(y, m0, H), from_row(gy, m0, H), from_row(dg, m0, H), from_row(dhs, m0, H),
            from_row(zh, m0, H)};
  }
};

// With R.kh, buf.y is the saved h~ = f(pre) (not the zoned output).
template <typename T>
void rnn_bwd_loop(const Cfg& cf, const ElmanBwdBuffers<T>& buf, const BwdW<T>& Whh,
                  const Reg<T>& R, int nt) {
  const bool reg = R.any();
  const int64_t H = cf.H, B = cf.B;
  const T *y = buf.y, *gy = buf.gy;
  T *dg = buf.dg, *dhs = buf.dhs, *zh = buf.zh;
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

}  // namespace
