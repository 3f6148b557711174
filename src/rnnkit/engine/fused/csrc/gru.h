// GRU time loops, both forms, forward and backward:
//   r = s(x_r + h_r); z = s(x_z + h_z);
//   after (torch's):  n = tanh(x_n + r (W_hn h + b_hn));
//   before (Cho's):   n = tanh(x_n + W_hn (r h) + b_hn);  h' = (1 - z) n + z h
// Plain reference: rnnkit.cells.gru.GRUMath, run over time by rnnkit.engine.reference;
// torch.nn.GRU (after), onnxruntime's GRU operator (linear_before_reset=0: before).
// Part of fused_rnn.cpp's one translation unit (included there, in order; not a
// stand-alone header).
#pragma once

namespace {

// ----------------------------------------------------------------------------------------------
// Forward time loops.
// gates: (T, B, G*H) holds x W_ih^T + folded biases on entry, activations on exit (training).
// ----------------------------------------------------------------------------------------------

// The GRU forward loops' buffers (rows as in LstmFwdBuffers); a field of the other form is null.
template <typename T>
struct GruFwdBuffers {
  T* gates;      // (T, B, 3H) in: the x-part (+ b_ih + b_hh for r, z; reset before: all biases
                 // folded); out (save): the activations r, z, n
  T* y;          // (T, B, H) out: the outputs h_t (the next step's h_{t-1})
  T* hst;        // (B, H) in: a copy of h_{-1}; out: each row's final h
  const T* h0;   // (B, H) h_{-1}
  T* rec;        // (B, 3H) scratch for one product over all 3H columns per step, or null
  T* gh;         // reset after: (B, H) scratch for W_hn h
  T* ghn;        // reset after: (T, B, H) out: W_hn h + b_hn for the backward, or null
  const T* bhn;  // reset after: (H) b_hn, or null (no bias)
  T* rh;         // reset before: r ⊙ h, (T, B, H) when save (for the backward), else (B, H)
  GruFwdBuffers at_row(int64_t m0, int64_t H) const {
    return {from_row(gates, m0, 3 * H), from_row(y, m0, H),   from_row(hst, m0, H),
            from_row(h0, m0, H),        from_row(rec, m0, 3 * H), from_row(gh, m0, H),
            from_row(ghn, m0, H),       bhn,                  from_row(rh, m0, H)};
  }
};

// GRU, reset after: gates hold x-part (+ b_ih + b_hh for r, z); gh is a (B, H) scratch;
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
void gru_after_fwd_loop(const Cfg& cf, const GruFwdBuffers<T>& buf, const RecW<T>& W,
                        const Reg<T>& R, int nt, bool save) {
  const int64_t H = cf.H, B = cf.B, GH = 3 * H;
  T *gates = buf.gates, *y = buf.y, *hst = buf.hst, *gh = buf.gh, *ghn = buf.ghn, *rec = buf.rec;
  const T *h0 = buf.h0, *bhn = buf.bhn;
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

// GRU, reset before: all biases folded into gates; rh (T, B, H) (save; else (B, H)) = r h.
// rec (B, 3H) scratch or null: as gru_after_fwd_loop's, with W_hh^T packed as two panel-packed
// parts (pack_recurrent): the r, z columns (2H) and the n columns (H), one product each per
// step into rec; z waits in rec between the two halves of the step. save: as there.
template <typename T>
void gru_before_fwd_loop(const Cfg& cf, const GruFwdBuffers<T>& buf, const RecW<T>& W,
                         const Reg<T>& R, int nt, bool save) {
  const int64_t H = cf.H, B = cf.B, GH = 3 * H;
  T *gates = buf.gates, *y = buf.y, *hst = buf.hst, *rh = buf.rh, *rec = buf.rec;
  const T* h0 = buf.h0;
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
      T* rht = save ? rh + t * B * H : rh;
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

// ----------------------------------------------------------------------------------------------
// Backward time loops. dg: (T, B, G*H) pre-activation gradients (rows >= bs[t] neither written
// nor read). dhs / dcs: (B, H) running state gradients, in place.
// ----------------------------------------------------------------------------------------------

// The buffers of the GRU backward loops, built once by backward_impl (layer.h): (T, B, .) ones
// point at step 0's row 0, (B, .) ones at row 0; at_row moves them to a row block of the batch
// split. Reset after reads ghn and writes dgh; reset before uses drh.
template <typename T>
struct GruBwdBuffers {
  const T* acts;  // (T, B, 3H) the forward's activations r, z, n
  const T* ghn;   // reset after: (T, B, H) W_hn h + b_hn; before: null
  const T* y;     // (T, B, H) the outputs (the next step's h_{t-1})
  const T* h0;    // (B, H) h_{-1}
  const T* gy;    // (T, B, H) the outputs' gradient
  T* dg;          // (T, B, 3H) out: the pre-activation gradients (reset after: of the x-part)
  T* dgh;         // reset after: (T, B, 3H) out: d(W_hh h + b_hh); before: null
  T* drh;         // reset before: (B, H) scratch for d(r ⊙ h); after: null
  T* dhs;         // (B, H) in/out: the running dh
  T* sc;          // (B, H) scratch (regularisers: see each loop), or null
  GruBwdBuffers at_row(int64_t m0, int64_t H) const {
    return {from_row(acts, m0, 3 * H), from_row(ghn, m0, H),    from_row(y, m0, H),
            from_row(h0, m0, H),       from_row(gy, m0, H),     from_row(dg, m0, 3 * H),
            from_row(dgh, m0, 3 * H),  from_row(drh, m0, H),    from_row(dhs, m0, H),
            from_row(sc, m0, H)};
  }
};

// GRU reset after. dg: d(x-part) (T,B,3H); dgh: d(W_hh h + b_hh) (T,B,3H).
// REG: sc (B, H) scratch holds the direct gradient (z dh, + k_h dh) while the GEMM's product is
// masked.
template <typename T>
void gru_after_bwd_loop(const Cfg& cf, const GruBwdBuffers<T>& buf, const BwdW<T>& Whh,
                        const Reg<T>& R, int nt) {
  const bool reg = R.any();
  const int64_t H = cf.H, B = cf.B, GH = 3 * H;
  const T *acts = buf.acts, *ghn = buf.ghn, *y = buf.y, *h0 = buf.h0, *gy = buf.gy;
  T *dg = buf.dg, *dgh = buf.dgh, *dhs = buf.dhs, *sc = buf.sc;
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
void gru_before_bwd_loop(const Cfg& cf, const GruBwdBuffers<T>& buf, const BwdW<T>& Whh,
                         const Reg<T>& R, int nt) {
  const bool reg = R.any();
  const int64_t H = cf.H, B = cf.B, GH = 3 * H;
  const T *acts = buf.acts, *y = buf.y, *h0 = buf.h0, *gy = buf.gy;
  T *dg = buf.dg, *drh = buf.drh, *dhs = buf.dhs, *sc = buf.sc;
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

}  // namespace
