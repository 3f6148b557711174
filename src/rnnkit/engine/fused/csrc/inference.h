// The no-grad single-step and batch-1 inference paths: one step at any batch (step), the lean
// no-grad call (forward_lean / step_lean), weights packed once per version (forward_packed,
// step_packed) and the streaming step over one packed tensor (pack_step, step_stream).
// Reference: the same layer through layer_forward (tests compare them bit for bit where the
// same loop runs).
// Part of fused_rnn.cpp's one translation unit (included there, in order; not a
// stand-alone header).
#pragma once

namespace {

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
    const LstmFwdBuffers<float> buf{gates, rec, y, nullptr, h_n, c_n, h0, p};
    auto run = [&](auto peep, auto coupled) {
      lstm_fwd_loop<float, decltype(peep)::value, decltype(coupled)::value, false, false>(
          cf, buf, W, R, 1);
    };
    if (cf.peep && cf.coupled) run(std::true_type{}, std::true_type{});
    else if (cf.peep) run(std::true_type{}, std::false_type{});
    else if (cf.coupled) run(std::false_type{}, std::true_type{});
    else run(std::false_type{}, std::false_type{});
  } else if (cf.kind == RNN) {
    rnn_fwd_loop<float>(cf, {gates, y, h_n, h0}, W, R, 1);
  } else if (!cf.before) {
    gru_after_fwd_loop<float>(cf, {gates, y, h_n, h0, nullptr, aux, nullptr, b_hn, nullptr}, W,
                              R, 1, false);
  } else {
    gru_before_fwd_loop<float>(cf, {gates, y, h_n, h0, nullptr, nullptr, nullptr, nullptr, aux},
                               W, R, 1, false);
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

// The step operators' state is the step's h and c, not a layer's h0 and c0 (as forward_op, which
// step and step_packed fall back to, names them): checked by their own names before either path
// runs.
void check_step_state(int64_t kind, const at::Tensor& x, const at::Tensor& h,
                      const std::optional<at::Tensor>& c) {
  rnnkit::check_rank(x, 2, "x", "(B, I)");
  TORCH_CHECK(h.defined() && h.dim() == 2 && h.size(0) == x.size(0) &&
                  h.scalar_type() == x.scalar_type(),
              "h must be (B, H) with x's B = ", x.size(0), " and dtype (", x.scalar_type(),
              "), got ", described(h));
  if (kind != LSTM) return;
  const at::Tensor cell = opt(c);
  TORCH_CHECK(cell.defined() && cell.sizes() == h.sizes() && cell.scalar_type() == x.scalar_type(),
              "c must be (B, H) = ", h.sizes(), " of x's dtype (", x.scalar_type(), "), got ",
              described(cell));
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
  check_threads(nthreads);
  check_step_state(kind, x, h, c);
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
  check_threads(nthreads);
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
  check_threads(nthreads);
  check_step_state(kind, x, h, c);
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
    TORCH_CHECK(t.defined() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == 1
                && t.size(1) == n, "rnnkit_fused::step_stream: ", name, " must be a float32 (1, ",
                n, ") tensor, got ", rnnkit::described(t));
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

}  // namespace
