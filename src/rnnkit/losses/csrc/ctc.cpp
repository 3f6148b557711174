// CTC loss and its gradient w.r.t. log_probs, on the CPU, one sample per task.
//
// The math is the one written in rnnkit/losses/ctc.py (the pure-torch reference); this file only
// makes it fast. Per sample n (T_n frames, L = 2 S_n + 1 blank-extended states l'):
//
//   E[t][s]  = log_probs[t, n, l'_s]             gathered once, (T_n, L) padded to whole vectors
//   alpha    = log-space forward recursion over t, states s <= 2t+1 (others can't be reached)
//   nll      = -logsumexp(alpha[T_n-1][L-1], alpha[T_n-1][L-2])
//   beta     = log-space backward recursion, two rolling rows, states s >= L - 2(T_n - t)
//   grad[t, n, k] = exp(lp_t(k)) - sum_{s: l'_s = k} exp(alpha_t(s) + beta_t(s) + nll - lp_t(k))
//
// which is torch's gradient convention. Each term of the sum is a posterior state occupancy, in
// [0, 1], so it is summed directly in linear space: no max shift, no log-add per state.
//
// Speed: the recursions are data-parallel over s at fixed t. For float32 the log-sum-exp of the
// (up to) three predecessors uses branch-free polynomial exp / log (Cephes, ~1 ulp) that the
// compiler vectorises; float64 uses libm (that path is for exactness, not speed).
//
// NaN and inf: the fast recursions assume finite log-probabilities. A sample whose frames hold a
// NaN or an infinity runs ctc_sample_exact instead, torch's CPU arithmetic step for step, so
// that the loss and every gradient entry are NaN or infinite exactly where torch's are.
//
// Determinism: a sample is computed by one thread, start to end, in a fixed order; the batch is
// split with at::parallel_for. No atomics, no reductions across threads, and fused multiply-adds
// only where written (std::fma, with -ffp-contract=off), so the vectorised loop body and its
// scalar remainder round identically: results are bit-identical for any thread count and run.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// The exp / log / log-add helpers must be inlined into the row loops for those to vectorise, and
// gcc's heuristics otherwise decline to inline exp_ (it has several call sites).
#define RNNKIT_INLINE inline __attribute__((always_inline))

#ifdef __FMA__
RNNKIT_INLINE float mul_add(float a, float b, float c) { return std::fma(a, b, c); }
#else
// Without hardware FMA std::fma is a slow libm call; plain arithmetic is as deterministic.
RNNKIT_INLINE float mul_add(float a, float b, float c) { return a * b + c; }
#endif

// Cephes expf's polynomial: exp(x) = p * 2^n for x in [-87, 89], returning p and n = round(x /
// ln 2). The callers build 2^n in the exponent bits. Branch-free so loops over it vectorise.
RNNKIT_INLINE float exp_mantissa(float x, float& n) {
  n = std::floor(mul_add(x, 1.44269504088896341f, 0.5f));
  float r = mul_add(n, -0.693359375f, x);
  r = mul_add(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = mul_add(p, r, 1.3981999507e-3f);
  p = mul_add(p, r, 8.3334519073e-3f);
  p = mul_add(p, r, 4.1665795894e-2f);
  p = mul_add(p, r, 1.6666665459e-1f);
  p = mul_add(p, r, 5.0000001201e-1f);
  return mul_add(p, r * r, r) + 1.0f;
}

// exp(x), float, for the recursions (finite arguments, at most about 0). Below -87 (where exp is
// denormal) it returns 0, so exp(-inf) == 0 exactly.
RNNKIT_INLINE float exp_(float x) {
  float n;
  const float p = exp_mantissa(std::min(std::max(x, -87.0f), 88.0f), n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// exp(x), float, for the exp(lp) term of the gradient, whose argument is any input: above
// ln FLT_MAX it overflows to +inf as expf does (an unnormalised input), NaN gives NaN, below -87
// it is 0 like exp_. One multiply more than exp_, which the recursions keep.
RNNKIT_INLINE float exp_full(float x) {
  float n;  // in [-126, 128] or NaN
  const float p = exp_mantissa(std::min(std::max(x, -87.0f), 89.0f), n);
  // 2^n as 2^(n/2) 2^(n - n/2): 2^128 has no float exponent, and the product overflows exactly
  // where exp does. The integers come from the bits of n + 1.5 * 2^23 (an exact sum for
  // |n| < 2^22), not from a float-to-int conversion, which would be undefined for NaN.
  const float half = std::floor(n * 0.5f);
  const float m1 = half + 12582912.0f, m2 = (n - half) + 12582912.0f;
  uint32_t e1, e2;
  std::memcpy(&e1, &m1, sizeof(e1));
  std::memcpy(&e2, &m2, sizeof(e2));
  e1 = (e1 - 0x4B400000u + 127u) << 23;
  e2 = (e2 - 0x4B400000u + 127u) << 23;
  float scale1, scale2;
  std::memcpy(&scale1, &e1, sizeof(scale1));
  std::memcpy(&scale2, &e2, sizeof(scale2));
  return x < -87.0f ? 0.0f : p * scale1 * scale2;
}

// log(x), float, for normal positive x (here always a sum in [1, 3]): Cephes logf.
RNNKIT_INLINE float log_(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t exponent = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;  // keep the reduced argument in [sqrt(.5)-1, sqrt(2)-1]
  const float e = static_cast<float>(exponent - (low ? 1 : 0));
  const float f = (low ? m + m : m) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = mul_add(y, f, -1.1514610310e-1f);
  y = mul_add(y, f, 1.1676998740e-1f);
  y = mul_add(y, f, -1.2420140846e-1f);
  y = mul_add(y, f, 1.4249322787e-1f);
  y = mul_add(y, f, -1.6668057665e-1f);
  y = mul_add(y, f, 2.0000714765e-1f);
  y = mul_add(y, f, -2.4999993993e-1f);
  y = mul_add(y, f, 3.3333331174e-1f);
  y = y * f * z;
  y = mul_add(e, -2.12194440e-4f, y);
  y = mul_add(z, -0.5f, y);
  return mul_add(e, 0.693359375f, f + y);
}

inline double exp_(double x) { return std::exp(x); }
inline double exp_full(double x) { return std::exp(x); }
inline double log_(double x) { return std::log(x); }

// log(e^a + e^b + e^c) + emit. The max term contributes exp(0) = 1, so the log's argument is in
// [1, 3]; when all three are -inf the shift is 0 (not -inf, which would give NaN) and the result
// is selected as -inf.
template <typename scalar_t>
RNNKIT_INLINE scalar_t log_add3(scalar_t a, scalar_t b, scalar_t c, scalar_t emit) {
  constexpr scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  const scalar_t m = std::max(a, std::max(b, c));
  const scalar_t shift = m == neg_inf ? scalar_t(0) : m;
  const scalar_t sum = exp_(a - shift) + exp_(b - shift) + exp_(c - shift);
  const scalar_t value = shift + log_(sum) + emit;
  return m == neg_inf ? neg_inf : value;
}

// Exact log(e^a + e^b) for the two end states (scalar, once per sample).
template <typename scalar_t>
scalar_t log_add2(scalar_t a, scalar_t b) {
  const scalar_t m = std::max(a, b);
  if (m == -std::numeric_limits<scalar_t>::infinity()) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// Rows of states are padded to whole vectors (8 float lanes) with -inf emissions, which keep the
// padding states at -inf, so the row loops below run whole vectors only. With the short label
// sequences of small vocabularies the scalar remainder of each row was most of the time.
template <typename scalar_t>
constexpr int64_t kLanes = 1;  // float64 runs libm's scalar exp / log: padding would only add work
template <>
constexpr int64_t kLanes<float> = 8;

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// One frame of each recursion over states [lo, hi). Small separate functions with restrict
// pointers, so that the compiler vectorises them without run-time alias checks.
// alpha: out[s] = log(e^prev[s] + e^prev[s-1] + [skip] e^prev[s-2]) + emit[s]
template <typename scalar_t>
__attribute__((noinline)) void alpha_row(const scalar_t* __restrict prev, const scalar_t* __restrict skip,
                                         const scalar_t* __restrict emit, scalar_t* __restrict out,
                                         int64_t hi) {
  for (int64_t s = 0; s < hi; ++s) out[s] = log_add3(prev[s], prev[s - 1], prev[s - 2] + skip[s], emit[s]);
}

// beta: out[s] = log(e^next[s] + e^next[s+1] + [skip] e^next[s+2]) + emit[s]; beta at s may read
// s+2 exactly when alpha at s+2 may read s, so it uses the same skip flag, two states on.
// Fused with occupancy[s] = exp(alpha[s] + beta[s] + nll - emit[s]), the posterior probability
// of state s at this frame (garbage where both are -inf; the caller reads only real states).
template <typename scalar_t>
__attribute__((noinline)) void beta_row(const scalar_t* __restrict next, const scalar_t* __restrict skip,
                                        const scalar_t* __restrict emit, const scalar_t* __restrict alpha,
                                        scalar_t nll, scalar_t* __restrict out,
                                        scalar_t* __restrict occupancy, int64_t lo, int64_t hi) {
  for (int64_t s = lo; s < hi; ++s) {
    const scalar_t beta = log_add3(next[s], next[s + 1], next[s + 2] + skip[s + 2], emit[s]);
    out[s] = beta;
    occupancy[s] = exp_(alpha[s] + beta + (nll - emit[s]));
  }
}

template <typename scalar_t>
__attribute__((noinline)) void exp_range(const scalar_t* __restrict in, scalar_t* __restrict out,
                                         int64_t size) {
  for (int64_t i = 0; i < size; ++i) out[i] = exp_full(in[i]);
}

// g[k] -= sub[k]; NaN where lp[k] = -inf, as torch's formula gives there (exp(lcab + nll - lp)
// with lcab = -inf, since alpha and beta of such a state include its -inf emission).
template <typename scalar_t>
__attribute__((noinline)) void subtract_row(const scalar_t* __restrict sub, const scalar_t* __restrict lp,
                                            scalar_t* __restrict g, int64_t size) {
  constexpr scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  constexpr scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  for (int64_t k = 0; k < size; ++k) g[k] = lp[k] == neg_inf ? nan : g[k] - sub[k];
}

struct Sample {
  const int64_t* labels;  // S_n labels
  int64_t steps;          // T_n
  int64_t length;         // S_n
};

// Per-thread scratch, reused across the samples of one at::parallel_for chunk. P is the padded
// row width round_up(L, kLanes).
template <typename scalar_t>
struct Scratch {
  std::vector<int64_t> ext;          // l', (L)
  std::vector<scalar_t> skip;        // (P + 2): 0 where alpha at s may come from s-2, else -inf
  std::vector<scalar_t> emit;        // E, (T_n, P), -inf in the padding
  std::vector<scalar_t> alpha;       // (T_n + 1, 2 + P): two leading -inf pads so s-1, s-2 load
  std::vector<scalar_t> beta;        // two rolling rows of (P + 2): two trailing -inf pads
  std::vector<scalar_t> occupancy;   // (P)
  std::vector<scalar_t> per_class;   // (C): sum of the occupancies of each class at one frame
  std::vector<scalar_t> log_grad;    // exact path: (T_n, C) log of the summed alpha * beta
};

// Whether frames [0, steps) of one sample hold a NaN or an infinity (x - x is NaN exactly then).
// An integer OR, so the loop vectorises.
template <typename scalar_t>
bool has_nonfinite(const scalar_t* log_probs, int64_t frame_stride, int64_t classes,
                   int64_t steps) {
  int bad = 0;
  for (int64_t t = 0; t < steps; ++t) {
    const scalar_t* lp = log_probs + t * frame_stride;
    for (int64_t k = 0; k < classes; ++k) {
      const scalar_t d = lp[k] - lp[k];
      bad |= d != d;
    }
  }
  return bad != 0;
}

// log(e^a + e^b [+ e^c]) + emit with the operations of torch's CPU kernel (LossCTC.cpp), in
// their order: the first operand starts the maximum and only a strictly greater one replaces
// it, so a NaN anywhere gives NaN, and +inf or -inf operands give what torch gives.
template <typename scalar_t>
scalar_t torch_log_add3(scalar_t a, scalar_t b, scalar_t c, scalar_t emit) {
  constexpr scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  scalar_t m = a;
  if (b > m) m = b;
  if (c > m) m = c;
  if (m == neg_inf) m = 0;
  return std::log(std::exp(a - m) + std::exp(b - m) + std::exp(c - m)) + m + emit;
}

// One sample with NaN or infinite log-probabilities: the same recursions as ctc_sample, but with
// torch's arithmetic step for step (full alpha and beta tables, libm, the gradient collected in
// log space), so that NaN and +-inf reach the loss and every gradient entry exactly where they
// reach torch's. Rare, so written for agreement, not speed. grad rows past steps are zeroed by
// the caller; the result here is the gradient of nll, before the caller's d(loss)/d(nll).
template <typename scalar_t>
void ctc_sample_exact(const scalar_t* log_probs, int64_t frame_stride, int64_t classes,
                      const Sample& x, int64_t blank, bool zero_infinity, bool need_grad,
                      scalar_t* nll_out, scalar_t* grad, Scratch<scalar_t>& w) {
  constexpr scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  const int64_t steps = x.steps, width = 2 * x.length + 1, last_state = 2 * x.length;
  w.ext.assign(width, blank);
  for (int64_t i = 0; i < x.length; ++i) w.ext[2 * i + 1] = x.labels[i];
  const int64_t* ext = w.ext.data();
  // skip from s - 2 to s: a label that differs from the one two states back (never the blank)
  auto skips = [&](int64_t s) { return s > 1 && ext[s - 2] != ext[s]; };
  auto lp = [&](int64_t t, int64_t k) { return log_probs[t * frame_stride + k]; };

  w.alpha.assign(steps * width, neg_inf);
  scalar_t* alpha = w.alpha.data();
  alpha[0] = lp(0, blank);
  if (x.length > 0) alpha[1] = lp(0, ext[1]);
  for (int64_t t = 1; t < steps; ++t) {
    const scalar_t* prev = alpha + (t - 1) * width;
    for (int64_t s = 0; s < width; ++s) {
      alpha[t * width + s] = torch_log_add3(prev[s], s > 0 ? prev[s - 1] : neg_inf,
                                            skips(s) ? prev[s - 2] : neg_inf, lp(t, ext[s]));
    }
  }
  const scalar_t* final_alpha = alpha + (steps - 1) * width;
  scalar_t nll;
  if (x.length == 0) {
    nll = -final_alpha[0];
  } else {
    const scalar_t l1 = final_alpha[last_state], l2 = final_alpha[last_state - 1];
    scalar_t m = std::max(l1, l2);
    m = m == neg_inf ? scalar_t(0) : m;
    nll = -(std::log(std::exp(l1 - m) + std::exp(l2 - m)) + m);
  }
  // torch's zero_infinity replaces +inf only (a NaN or a -inf loss stays visible)
  const bool zeroed = zero_infinity && nll == inf;
  *nll_out = zeroed ? scalar_t(0) : nll;
  if (!need_grad) return;
  if (zeroed) {
    for (int64_t t = 0; t < steps; ++t) std::fill_n(grad + t * frame_stride, classes, scalar_t(0));
    return;
  }

  // beta over the same table (alpha's storage is still needed: a second table), and the log of
  // sum_{s: l'_s = k} alpha_t(s) beta_t(s) per class, accumulated in the same order as torch
  w.emit.assign(steps * width, neg_inf);  // (reused as the beta table)
  scalar_t* beta = w.emit.data();
  w.log_grad.assign(steps * classes, neg_inf);
  scalar_t* log_grad = w.log_grad.data();
  const int64_t t_last = steps - 1;
  beta[t_last * width + last_state] = lp(t_last, blank);
  log_grad[t_last * classes + blank] =
      final_alpha[last_state] + beta[t_last * width + last_state];
  if (x.length > 0) {
    const int64_t k = ext[last_state - 1];
    beta[t_last * width + last_state - 1] = lp(t_last, k);
    log_grad[t_last * classes + k] =
        final_alpha[last_state - 1] + beta[t_last * width + last_state - 1];
  }
  for (int64_t t = steps - 2; t >= 0; --t) {
    const scalar_t* next = beta + (t + 1) * width;
    for (int64_t s = last_state; s >= 0; --s) {
      const bool skip = s < last_state - 1 && ext[s + 2] != ext[s];
      const scalar_t b = torch_log_add3(next[s], s < last_state ? next[s + 1] : neg_inf,
                                        skip ? next[s + 2] : neg_inf, lp(t, ext[s]));
      beta[t * width + s] = b;
      const scalar_t alpha_beta = alpha[t * width + s] + b;
      scalar_t& collected = log_grad[t * classes + ext[s]];
      if (collected == neg_inf) {
        collected = alpha_beta;
      } else {
        const scalar_t m = std::max(collected, alpha_beta);
        collected = std::log(std::exp(collected - m) + std::exp(alpha_beta - m)) + m;
      }
    }
  }
  for (int64_t t = 0; t < steps; ++t) {
    scalar_t* g = grad + t * frame_stride;
    for (int64_t k = 0; k < classes; ++k) {
      const scalar_t value = lp(t, k);
      g[k] = std::exp(value) - std::exp(log_grad[t * classes + k] + nll - value);
    }
  }
}

// One sample. log_probs and grad point at its (t = 0, n) row; frames are frame_stride apart.
// grad must already hold exp(log_probs) for its first T_n frames (see ctc()).
template <typename scalar_t>
void ctc_sample(const scalar_t* log_probs, int64_t frame_stride, int64_t classes, const Sample& x,
                int64_t blank, bool zero_infinity, bool need_grad, int64_t total_steps,
                scalar_t* nll_out, scalar_t* grad, Scratch<scalar_t>& w) {
  constexpr scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  constexpr int64_t lanes = kLanes<scalar_t>;
  const int64_t steps = x.steps, width = 2 * x.length + 1;
  const int64_t padded = round_up(width, lanes), row = padded + 2;

  // grad rows for frames past this input are zero whatever happens
  if (need_grad) {
    for (int64_t t = steps; t < total_steps; ++t) std::fill_n(grad + t * frame_stride, classes, scalar_t(0));
  }
  if (steps == 0) {  // no frames: only the empty target has an alignment (of probability 1)
    const bool possible = x.length == 0;
    *nll_out = possible || zero_infinity ? scalar_t(0) : std::numeric_limits<scalar_t>::infinity();
    return;
  }
  if (has_nonfinite(log_probs, frame_stride, classes, steps)) {
    // the fast recursions below assume finite emissions (their shifts, padding and skipped
    // states would hide or invent NaN): such a sample takes torch's own arithmetic
    ctc_sample_exact(log_probs, frame_stride, classes, x, blank, zero_infinity, need_grad,
                     nll_out, grad, w);
    return;
  }

  w.ext.assign(width, blank);
  w.skip.assign(padded + 2, neg_inf);
  for (int64_t i = 0; i < x.length; ++i) w.ext[2 * i + 1] = x.labels[i];
  for (int64_t s = 2; s < width; ++s) {
    if (w.ext[s] != blank && w.ext[s] != w.ext[s - 2]) w.skip[s] = scalar_t(0);
  }
  const int64_t* ext = w.ext.data();
  const scalar_t* skip = w.skip.data();

  w.emit.assign(steps * padded, neg_inf);
  for (int64_t t = 0; t < steps; ++t) {
    const scalar_t* lp = log_probs + t * frame_stride;
    scalar_t* e = w.emit.data() + t * padded;
    for (int64_t s = 0; s < width; ++s) e[s] = lp[ext[s]];
  }

  // alpha, frame t at alpha + t * row; frame -1 is a virtual one, 0 at s = 0 and -inf elsewhere,
  // so frame 0 needs no special case. States past 2t+1 are unreachable at t: left at -inf.
  w.alpha.assign((steps + 1) * row, neg_inf);
  scalar_t* alpha = w.alpha.data() + row + 2;
  alpha[-row] = scalar_t(0);
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t hi = std::min(padded, round_up(std::min(width, 2 * t + 2), lanes));
    alpha_row(alpha + (t - 1) * row, skip, w.emit.data() + t * padded, alpha + t * row, hi);
  }
  const scalar_t* last = alpha + (steps - 1) * row;
  scalar_t nll = -log_add2(last[width - 1], width > 1 ? last[width - 2] : neg_inf);
  // finite emissions: nll is finite or +inf (no alignment); torch's zero_infinity replaces +inf
  const bool infinite = nll == std::numeric_limits<scalar_t>::infinity();
  if (infinite && zero_infinity) nll = scalar_t(0);
  *nll_out = nll;
  if (!need_grad) return;
  if (infinite) {
    // no alignment has positive probability: zero_infinity asks for a zero gradient; otherwise
    // the gradient is undefined, and NaN (as torch returns) makes that visible
    const scalar_t fill = zero_infinity ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN();
    for (int64_t t = 0; t < steps; ++t) std::fill_n(grad + t * frame_stride, classes, fill);
    return;
  }

  // beta, backwards in time, and each frame's gradient as soon as its beta is known. States
  // before lo cannot reach the end in the frames left: their beta is -inf, and the recursion
  // keeps it so wherever a padded loop start computes a few of them.
  w.beta.assign(2 * row, neg_inf);
  w.occupancy.resize(padded);
  w.per_class.resize(classes);
  scalar_t* occupancy = w.occupancy.data();
  scalar_t* per_class = w.per_class.data();
  scalar_t* next = w.beta.data() + row;  // the virtual frame T_n: 0 at the two end states
  scalar_t* cur = w.beta.data();
  next[width - 1] = scalar_t(0);
  if (width > 1) next[width - 2] = scalar_t(0);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const scalar_t* e = w.emit.data() + t * padded;
    const int64_t lo = std::max<int64_t>(0, width - 2 * (steps - t));
    const int64_t lo_vec = lo / lanes * lanes;
    const scalar_t* a = alpha + t * row;
    if (t == steps - 1) {
      // from the virtual frame only the end states are entered, with no transition rule
      for (int64_t s = lo; s < width; ++s) {
        cur[s] = next[s] + e[s];
        occupancy[s] = exp_(a[s] + cur[s] + (nll - e[s]));
      }
    } else {
      beta_row(next, skip, e, a, nll, cur, occupancy, lo_vec, padded);
    }

    // grad[t] = exp(lp_t) - sum over states of each class of their occupancy
    const int64_t hi = std::min(width, 2 * t + 2);  // alpha is -inf past it
    if (lo < hi) {
      std::fill_n(per_class, classes, scalar_t(0));
      for (int64_t s = lo; s < hi; ++s) per_class[ext[s]] += occupancy[s];  // s order: deterministic
      subtract_row(per_class, log_probs + t * frame_stride, grad + t * frame_stride, classes);
    }
    std::swap(cur, next);
  }
}

// log_probs (T, N, C) float32 / float64; targets (N, S_max) padded or (sum S_n,) concatenated,
// int64; input_lengths, target_lengths (N,) int64. Returns nll (N,) and, if need_grad, the
// gradient of sum(nll) w.r.t. log_probs (T, N, C) (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> ctc(const at::Tensor& log_probs_in, const at::Tensor& targets_in,
                                       const at::Tensor& input_lengths_in,
                                       const at::Tensor& target_lengths_in, int64_t blank,
                                       bool zero_infinity, bool need_grad) {
  // (a None log_probs arrives undefined: its device() raised "tensor does not have a device")
  const auto given = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.defined(), "rnnkit ctc kernel: ", name, " is None; a tensor is required");
  };
  given(log_probs_in, "log_probs");
  given(targets_in, "targets");
  given(input_lengths_in, "input_lengths");
  given(target_lengths_in, "target_lengths");
  TORCH_CHECK(log_probs_in.device().is_cpu(), "rnnkit ctc kernel: log_probs must be on the CPU");
  TORCH_CHECK(log_probs_in.dim() == 3, "rnnkit ctc kernel: log_probs must be (T, N, C)");
  TORCH_CHECK(log_probs_in.scalar_type() == at::kFloat || log_probs_in.scalar_type() == at::kDouble,
              "rnnkit ctc kernel: log_probs must be float32 or float64");
  TORCH_CHECK(targets_in.scalar_type() == at::kLong && input_lengths_in.scalar_type() == at::kLong &&
                  target_lengths_in.scalar_type() == at::kLong,
              "rnnkit ctc kernel: targets and lengths must be int64");
  const at::Tensor log_probs = log_probs_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor input_lengths = input_lengths_in.contiguous();
  const at::Tensor target_lengths = target_lengths_in.contiguous();
  const int64_t steps = log_probs.size(0), batch = log_probs.size(1), classes = log_probs.size(2);
  TORCH_CHECK(input_lengths.numel() == batch && target_lengths.numel() == batch,
              "rnnkit ctc kernel: one input and one target length per sample");
  TORCH_CHECK(blank >= 0 && blank < classes, "rnnkit ctc kernel: blank outside the classes");
  const bool padded = targets.dim() == 2;
  TORCH_CHECK(padded || targets.dim() == 1, "rnnkit ctc kernel: targets must be 1-D or 2-D");
  TORCH_CHECK(!padded || targets.size(0) == batch, "rnnkit ctc kernel: one target row per sample");

  // Validate every length and label once, serially, before any thread reads memory with them.
  const int64_t* in_len = input_lengths.data_ptr<int64_t>();
  const int64_t* tg_len = target_lengths.data_ptr<int64_t>();
  const int64_t* labels = targets.data_ptr<int64_t>();
  std::vector<Sample> samples(batch);
  int64_t offset = 0, work = 0;
  for (int64_t n = 0; n < batch; ++n) {
    TORCH_CHECK_VALUE(in_len[n] >= 0 && in_len[n] <= steps, "rnnkit ctc kernel: input length ",
                      in_len[n], " of sample ", n, " is outside [0, ", steps, "]");
    TORCH_CHECK_VALUE(tg_len[n] >= 0 && (!padded || tg_len[n] <= targets.size(1)),
                      "rnnkit ctc kernel: target length ", tg_len[n], " of sample ", n,
                      " does not fit the targets");
    const int64_t* row = padded ? labels + n * targets.size(1) : labels + offset;
    TORCH_CHECK_VALUE(padded || offset + tg_len[n] <= targets.numel(),
                      "rnnkit ctc kernel: target lengths exceed the concatenated targets");
    for (int64_t i = 0; i < tg_len[n]; ++i) {
      TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < classes, "rnnkit ctc kernel: label ", row[i],
                        " of sample ", n, " is outside the ", classes, " classes");
    }
    samples[n] = Sample{row, in_len[n], tg_len[n]};
    offset += tg_len[n];
    work += in_len[n] * (2 * tg_len[n] + 1);
  }
  // Samples per task: at least ~16k state updates (~0.1 ms) each, so that small batches are not
  // split into tasks cheaper than waking a thread. (Results do not depend on the split.)
  const int64_t grain = std::max<int64_t>(1, 16384 * batch / std::max<int64_t>(1, work));

  at::Tensor nll = at::empty({batch}, log_probs.options());
  at::Tensor grad = need_grad ? at::empty({steps, batch, classes}, log_probs.options())
                              : at::empty({0}, log_probs.options());
  AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "rnnkit_ctc", [&] {
    const scalar_t* lp = log_probs.data_ptr<scalar_t>();
    scalar_t* nll_ptr = nll.data_ptr<scalar_t>();
    scalar_t* grad_ptr = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const int64_t frame_stride = batch * classes;
    if (need_grad) {
      // the exp(lp) term of every gradient entry, as one flat vectorised pass; each sample then
      // subtracts its occupancies and zeroes its frames past its input length
      at::parallel_for(0, steps * frame_stride, 1 << 16, [&](int64_t begin, int64_t end) {
        exp_range(lp + begin, grad_ptr + begin, end - begin);
      });
    }
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch;
      for (int64_t n = begin; n < end; ++n) {
        ctc_sample<scalar_t>(lp + n * classes, frame_stride, classes, samples[n], blank,
                             zero_infinity, need_grad, steps, nll_ptr + n,
                             need_grad ? grad_ptr + n * classes : nullptr, scratch);
      }
    });
  });
  return {nll, grad};
}

}  // namespace

TORCH_LIBRARY(rnnkit_ctc, m) {
  m.def("ctc(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
        "int blank, bool zero_infinity, bool need_grad) -> (Tensor, Tensor)");
  m.impl("ctc", c10::DispatchKey::CPU, TORCH_FN(ctc));
}
