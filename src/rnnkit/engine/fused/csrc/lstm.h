// LSTM time loops (plain, peephole, coupled input-forget gates, both), forward and
// backward:
//   i = s(W_i [x, h] + b_i + w_ci c); f = s(W_f [x, h] + b_f + w_cf c) (coupled: 1 - i);
//   g = tanh(W_g [x, h] + b_g); c' = f c + i g; o = s(W_o [x, h] + b_o + w_co c');
//   h' = o tanh(c')
// Plain reference: rnnkit.cells.lstm.LSTMMath, run over time by rnnkit.engine.reference;
// torch.nn.LSTM (plain), onnxruntime's LSTM operator (peephole P, input_forget).
// Part of fused_rnn.cpp's one translation unit (included there, in order; not a
// stand-alone header).
#pragma once

namespace {

// ----------------------------------------------------------------------------------------------
// Forward time loops.
// gates: (T, B, G*H) holds x W_ih^T + folded biases on entry, activations on exit (training).
// ----------------------------------------------------------------------------------------------

// The LSTM forward loop's buffers. Row m of a (., B, W) buffer starts at m W; at_row: the same
// buffers seen from batch row m0 on (a row block of the batch split).
template <typename T>
struct LstmFwdBuffers {
  T* gates;     // (T, B, G*H) in: x W_ih^T + folded biases; out (SAVE): the activations i, f, g, o
  T* rec;       // (B, G*H) scratch for the recurrent GEMM (stays in cache; the GEMM never
                // touches the cold gates rows)
  T* y;         // (T, B, H) out: the outputs h_t (the next step's h_{t-1})
  T* cs;        // (T, B, H) out: the cells c_t (training), or null
  T* hst;       // (B, H) in: a copy of h_{-1}; out: each row's final h (zoneout's h_{t-1})
  T* cst;       // (B, H) in: c_{-1}; out: each row's final c (the running cell state)
  const T* h0;  // (B, H) h_{-1}
  const T* pw;  // (P, H) peephole weights w_ci, w_cf, w_co (coupled: no w_cf), or null
  LstmFwdBuffers at_row(int64_t m0, int64_t H, int64_t GH) const {
    return {from_row(gates, m0, GH), from_row(rec, m0, GH), from_row(y, m0, H),
            from_row(cs, m0, H),     from_row(hst, m0, H),  from_row(cst, m0, H),
            from_row(h0, m0, H),     pw};
  }
};

// SAVE: write activations back into gates (training).
template <typename T, bool PEEP, bool COUPLED, bool SAVE, bool REG>
void lstm_fwd_loop(const Cfg& cf, const LstmFwdBuffers<T>& buf, const RecW<T>& W,
                   const Reg<T>& R, int nt) {
  const int64_t H = cf.H, B = cf.B, G = cf.G, GH = G * H;
  T *gates = buf.gates, *rec = buf.rec, *y = buf.y, *cs = buf.cs, *hst = buf.hst, *cst = buf.cst;
  const T *h0 = buf.h0, *pw = buf.pw;
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

// ----------------------------------------------------------------------------------------------
// Backward time loops. dg: (T, B, G*H) pre-activation gradients (rows >= bs[t] neither written
// nor read). dhs / dcs: (B, H) running state gradients, in place.
// ----------------------------------------------------------------------------------------------

// The buffers of lstm_bwd_loop, built once by backward_impl (layer.h): (T, B, .) ones point at
// step 0's row 0, (B, .) ones at row 0; at_row moves them to a row block of the batch split.
template <typename T>
struct LstmBwdBuffers {
  const T* acts;  // (T, B, G*H) the forward's gate activations (i, f, g, o; coupled: i, g, o)
  const T* cs;    // (T, B, H) the cells c_t (zoned: the next step's c_{t-1})
  const T* c0;    // (B, H) c_{-1}
  const T* gy;    // (T, B, H) the outputs' gradient
  T* dg;          // (T, B, G*H) out: the pre-activation gradients
  T* dhs;         // (B, H) in/out: the running dh
  T* dcs;         // (B, H) in/out: the running dc
  const T* pw;    // (P, H) peephole weights w_ci, w_cf, w_co (coupled: no w_cf), or null
  T* dpw;         // (P, H) their gradients, added to (one per row block), or null
  T* zh;          // (B, H) scratch for k_h dh (zoneout), or null
  LstmBwdBuffers at_row(int64_t m0, int64_t H, int64_t GH) const {
    return {from_row(acts, m0, GH), from_row(cs, m0, H), from_row(c0, m0, H),
            from_row(gy, m0, H),    from_row(dg, m0, GH), from_row(dhs, m0, H),
            from_row(dcs, m0, H),   pw,                   dpw,
            from_row(zh, m0, H)};
  }
};

// REG: zoneout / recurrent dropout; cs holds the zoned cells (the next step's c_{t-1}) and
// R.ctil the cells c~ before zoneout.
template <typename T, bool PEEP, bool COUPLED, bool REG>
void lstm_bwd_loop(const Cfg& cf, const LstmBwdBuffers<T>& buf, const BwdW<T>& Whh,
                   const Reg<T>& R, int nt) {
  const int64_t H = cf.H, B = cf.B, G = cf.G, GH = G * H;
  const T *acts = buf.acts, *cs = buf.cs, *c0 = buf.c0, *gy = buf.gy, *pw = buf.pw;
  T *dg = buf.dg, *dhs = buf.dhs, *dcs = buf.dcs, *dpw = buf.dpw, *zh = buf.zh;
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

}  // namespace
