// minGRU and minLSTM over all time steps: gates and the linear recurrence in one pass, on the CPU.
//
// The gates read x_t only, so with gx = W_ih x + b_ih computed for every step by one GEMM, each of
// the B·H state columns is an independent first-order recurrence h_t = a_t ⊙ h_{t−1} + b_t:
//
//   minGRU  (gx blocks k, v):      z = σ(k)                 a = 1 − z        b = z · g(v)
//   minLSTM (gx blocks k_f, k_i, v): f = σ(k_f), i = σ(k_i), s = f + i
//                                                           a = f / s        b = (i / s) · g(v)
//   g(v) = v + ½ (v ≥ 0), σ(v) (v < 0)
//
// Plain reference: rnnkit.cells.minimal (MinGRUMath / MinLSTMMath .step) in a loop over t — and
// the paper's log-space scan, rnnkit.engine.scan.log_space_scan. Steps at or past a row's length
// keep its state (a = 1, b = 0) and get no gradient.
//
// Backward, with G the gradient reaching h_t (from the output at t and from h_{t+1}):
//   dL/da = G · h_{t−1}     dL/db = G     and G_{t−1} += a · G
//   minGRU:  dk = G (g − h_{t−1}) z (1 − z)              dv = G z g'(v)
//   minLSTM: df = (i / s²) G (h_{t−1} − g)  dk_f = df f (1 − f)
//            di = (f / s²) G (g − h_{t−1})  dk_i = di i (1 − i)       dv = G (i / s) g'(v)
//   g'(v) = 1 (v ≥ 0), σ(v)(1 − σ(v)) (v < 0)
// A thread owns whole batch rows and walks time inside them: no barrier, no shared writes.
//
// minimal_scan_projected: the same with the input projection fused in, for layers whose input is
// narrow (copy memory's 10 symbols one-hot, adding's 2 channels). There a GEMM x W_ih^T with
// K = I ≤ 16 runs at a small fraction of the BLAS's speed and writes a (T, B, G·H) tensor the
// scan then reads back; here each row's gates g = b_ih + Σ_i x_i W_ih[:, i] are formed in a
// G·H buffer and used at once, in the forward and again (recomputed, not stored) in the
// backward, which also accumulates dW_ih^T += x ⊗ d, db_ih += d and dx = W_ih d per row.
// Plain reference: F.linear(x, W_ih, b_ih) followed by minimal_scan.
//
// One-hot inputs (each row of x a single 1, the rest 0: copy memory's symbols) need no projection
// at all: the gates depend on the symbol alone, so both passes make a per-symbol table of what a
// step needs (coefficients(): keep, add, ... below) once per call and each step reads its
// symbol's row: the copy row's forward 1.6 ms instead of 3.8, backward 4.0 instead of 6.5.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "pointwise.h"

namespace {

using rnnkit::sigm;

template <typename T>
inline T sigmoid(T x) {
  return sigm(x);
}

enum Kind : int64_t { kMinGRU = 0, kMinLSTM = 1 };

// g(v) and g'(v), both branches computed and one selected so the loop vectorises; NaN takes the
// σ branch, which keeps it NaN
template <typename T>
inline void positive_activation(T v, T& value, T& slope) {
  const T s = sigmoid(v);
  const bool linear = v >= T(0);
  value = linear ? v + T(0.5) : s;
  slope = linear ? T(1) : s * (T(1) - s);
}

struct Shape {
  int64_t steps, batch, hidden, gates;
};

Shape check(const at::Tensor& gx, const at::Tensor& h0, const at::Tensor& lengths, int64_t kind) {
  TORCH_CHECK(kind == kMinGRU || kind == kMinLSTM, "minimal_scan: kind must be 0 (minGRU) or 1 (minLSTM)");
  const int64_t gates = kind == kMinGRU ? 2 : 3;
  TORCH_CHECK(gx.dim() == 3 && gx.is_contiguous(), "minimal_scan: gx must be a contiguous (T, B, G·H) tensor");
  TORCH_CHECK(h0.dim() == 2 && h0.is_contiguous() && h0.scalar_type() == gx.scalar_type(),
              "minimal_scan: h0 must be a contiguous (B, H) tensor of gx's dtype");
  const int64_t batch = gx.size(1), hidden = h0.size(1);
  TORCH_CHECK(h0.size(0) == batch && gx.size(2) == gates * hidden,
              "minimal_scan: gx must be (T, B, ", gates, "·H) for h0 of shape (B, H)");
  TORCH_CHECK(lengths.numel() == 0 || (lengths.dim() == 1 && lengths.size(0) == batch &&
                                       lengths.scalar_type() == at::kLong && lengths.is_contiguous()),
              "minimal_scan: lengths must be empty or a contiguous int64 (B,) tensor");
  return {gx.size(0), batch, hidden, gates};
}

// What one state column's step needs from its gates, forward and backward (the one-hot tables
// are made of these; forward_row / backward_row below compute the same inline):
//   h_t = keep · h_{t−1} + add
//   d k_m = grad · (h_{t−1} − candidate) · gate_m   (minGRU: m = 0; minLSTM: m = 0 f, 1 i)
//   d v = grad · value          dL/dh_{t−1} = grad · keep
// Scalars, not a struct: GCC vectorises the callers' loops only then.
template <typename T, int64_t K>
inline void coefficients(const T* g, int64_t j, int64_t H, T& keep, T& add, T& candidate,
                         T& gate0, T& gate1, T& value) {
  constexpr int64_t candidate_block = K == kMinGRU ? 1 : 2;
  T slope;
  positive_activation(g[candidate_block * H + j], candidate, slope);
  if constexpr (K == kMinGRU) {
    const T z = sigmoid(g[j]);
    keep = T(1) - z;
    add = z * candidate;
    gate0 = -(z * (T(1) - z));
    gate1 = T(0);
    value = z * slope;
  } else {
    const T f = sigmoid(g[j]), i = sigmoid(g[H + j]), total = f + i;
    const T squared = total * total;
    keep = f / total;
    add = i / total * candidate;
    gate0 = i / squared * f * (T(1) - f);
    gate1 = -f / squared * i * (T(1) - i);
    value = (i / total) * slope;
  }
}

// One column's step backwards: d (the row's G·H gate gradients) at column j from grad = the
// gradient reaching h_t; returns the gradient carried on to h_{t−1}.
template <typename T, int64_t K>
inline T backward_column(T keep, T candidate, T gate0, T gate1, T value, T grad, T previous,
                         T* d, int64_t j, int64_t H) {
  constexpr int64_t candidate_block = K == kMinGRU ? 1 : 2;
  const T towards_old = grad * (previous - candidate);
  d[j] = towards_old * gate0;
  if constexpr (K == kMinLSTM) d[H + j] = towards_old * gate1;
  d[candidate_block * H + j] = grad * value;
  return grad * keep;
}

// One step of one batch row: h_t from the row's gates g (G·H) and h_{t−1}. The same math as
// coefficients() + backward_column() written out per row, because GCC vectorises these loops
// only in this form (through the helpers minLSTM's backward ran ~1.8× slower, scalar); the
// tests hold the row path and the table path to the same step-by-step reference.
template <typename T, int64_t K>
inline void forward_row(const T* __restrict__ g, const T* __restrict__ previous, T* __restrict__ now,
                        int64_t H) {
  constexpr int64_t candidate_block = K == kMinGRU ? 1 : 2;
  for (int64_t j = 0; j < H; ++j) {
    T candidate, slope;
    positive_activation(g[candidate_block * H + j], candidate, slope);
    T keep, add;
    if constexpr (K == kMinGRU) {
      const T z = sigmoid(g[j]);
      keep = T(1) - z;
      add = z * candidate;
    } else {
      const T f = sigmoid(g[j]), i = sigmoid(g[H + j]), total = f + i;
      keep = f / total;
      add = i / total * candidate;
    }
    now[j] = keep * previous[j] + add;
  }
}

// The same step backwards: d (G·H) from G (in: the gradient carried from later steps; out: the
// gradient passed on to h_{t−1}) plus the gradient of this step's output.
template <typename T, int64_t K>
inline void backward_row(const T* __restrict__ g, const T* __restrict__ previous, const T* __restrict__ up,
                         T* __restrict__ G, T* __restrict__ d, int64_t H) {
  constexpr int64_t candidate_block = K == kMinGRU ? 1 : 2;
  for (int64_t j = 0; j < H; ++j) {
    const T grad = G[j] + up[j];
    T candidate, slope;
    positive_activation(g[candidate_block * H + j], candidate, slope);
    if constexpr (K == kMinGRU) {
      const T z = sigmoid(g[j]);
      d[j] = grad * (candidate - previous[j]) * z * (T(1) - z);
      d[H + j] = grad * z * slope;
      G[j] = grad * (T(1) - z);
    } else {
      const T f = sigmoid(g[j]), i = sigmoid(g[H + j]), total = f + i;
      const T squared = total * total;
      const T towards_old = grad * (previous[j] - candidate);
      d[j] = i / squared * towards_old * f * (T(1) - f);
      d[H + j] = -f / squared * towards_old * i * (T(1) - i);
      d[2 * H + j] = grad * (i / total) * slope;
      G[j] = grad * (f / total);
    }
  }
}

template <typename T, int64_t K>
void forward_rows(const Shape& s, const T* pre, const T* initial, const int64_t* length, T* h) {
  const int64_t H = s.hidden, row_in = s.gates * H;
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = 0; t < s.steps; ++t) {
      for (int64_t b = first; b < last; ++b) {
        const T* previous = t == 0 ? initial + b * H : h + ((t - 1) * s.batch + b) * H;
        T* now = h + (t * s.batch + b) * H;
        if (length != nullptr && t >= length[b]) {
          std::copy(previous, previous + H, now);  // past its length a row keeps its state
        } else {
          forward_row<T, K>(pre + (t * s.batch + b) * row_in, previous, now, H);
        }
      }
    }
  });
}

// The backward walks time downwards, which the hardware prefetcher follows poorly: a row's
// loads of gx stalled for most of the backward's time. Each row asks for its row of the step
// before (B rows, so several KB, ahead of its use).
inline void prefetch(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

template <typename T, int64_t K>
void backward_rows(const Shape& s, const T* upstream, const T* pre, const T* state, const T* initial,
                   const int64_t* length, T* d_pre, T* carry) {
  const int64_t H = s.hidden, row_in = s.gates * H;
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    std::fill(carry + first * H, carry + last * H, T(0));
    for (int64_t t = s.steps - 1; t >= 0; --t) {
      for (int64_t b = first; b < last; ++b) {
        const T* previous = t == 0 ? initial + b * H : state + ((t - 1) * s.batch + b) * H;
        const T* up = upstream + (t * s.batch + b) * H;
        T* d = d_pre + (t * s.batch + b) * row_in;
        if (t > 0) {
          prefetch(pre + ((t - 1) * s.batch + b) * row_in, row_in * sizeof(T));
          prefetch(upstream + ((t - 1) * s.batch + b) * H, H * sizeof(T));
          if (t > 1) prefetch(state + ((t - 2) * s.batch + b) * H, H * sizeof(T));
        }
        if (length != nullptr && t >= length[b]) {
          // the state was passed through, and so is its gradient; the gates had no effect
          for (int64_t j = 0; j < H; ++j) carry[b * H + j] += up[j];
          std::fill(d, d + row_in, T(0));
        } else {
          backward_row<T, K>(pre + (t * s.batch + b) * row_in, previous, up, carry + b * H, d, H);
        }
      }
    }
  });
}

at::Tensor minimal_scan(const at::Tensor& gx, const at::Tensor& h0, const at::Tensor& lengths,
                        int64_t kind) {
  const Shape s = check(gx, h0, lengths, kind);
  at::Tensor out = at::empty({s.steps, s.batch, s.hidden}, gx.options());
  const int64_t* length = lengths.numel() ? lengths.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "minimal_scan", [&] {
    auto run = kind == kMinGRU ? forward_rows<scalar_t, kMinGRU> : forward_rows<scalar_t, kMinLSTM>;
    run(s, gx.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), length, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> minimal_scan_backward(const at::Tensor& grad_out, const at::Tensor& gx,
                                                         const at::Tensor& h, const at::Tensor& h0,
                                                         const at::Tensor& lengths, int64_t kind) {
  const Shape s = check(gx, h0, lengths, kind);
  // (h's shape too: the loops read T*B*H values of it, and h of another shape was read past its end)
  TORCH_CHECK(grad_out.sizes() == h.sizes() && h.sizes() == at::IntArrayRef({s.steps, s.batch, s.hidden}) &&
                  grad_out.is_contiguous() && h.is_contiguous() && grad_out.scalar_type() == gx.scalar_type() &&
                  h.scalar_type() == gx.scalar_type(),
              "minimal_scan_backward: grad_out and h must be contiguous (T, B, H) = (", s.steps, ", ", s.batch,
              ", ", s.hidden, ") tensors of gx's dtype, got ", grad_out.sizes(), " and ", h.sizes());
  at::Tensor grad_gx = at::empty_like(gx);
  at::Tensor grad_h0 = at::empty_like(h0);  // carries G while time runs back; ends as dL/dh0
  const int64_t* length = lengths.numel() ? lengths.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "minimal_scan_backward", [&] {
    auto run = kind == kMinGRU ? backward_rows<scalar_t, kMinGRU> : backward_rows<scalar_t, kMinLSTM>;
    run(s, grad_out.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        h0.data_ptr<scalar_t>(), length, grad_gx.data_ptr<scalar_t>(), grad_h0.data_ptr<scalar_t>());
  });
  return {grad_gx, grad_h0};
}

// g (G·H) = bias + Σ_i x_i · W^T[i, :], with W^T (I, G·H) so that every term is a contiguous axpy.
// With every weight finite a term with x_i = 0 adds exactly ±0 and is skipped: one-hot inputs
// (copy memory, a character LM without embedding) cost one axpy instead of I. A non-finite
// weight keeps every term, so 0 · inf = NaN reaches g as it does through a GEMM.
template <typename T>
inline void project_row(const T* __restrict__ x, const T* __restrict__ weight_t, const T* __restrict__ bias,
                        T* __restrict__ g, int64_t inputs, int64_t width, bool weights_finite) {
  std::copy(bias, bias + width, g);
  for (int64_t i = 0; i < inputs; ++i) {
    const T xi = x[i];
    if (weights_finite && xi == T(0)) continue;
    const T* w = weight_t + i * width;
    for (int64_t j = 0; j < width; ++j) g[j] += xi * w[j];
  }
}

// NaN iff some value is NaN or ±inf (0 · inf = NaN), else 0: whether x_i = 0 may skip a term
template <typename T>
inline T non_finite_probe(const T* values, int64_t n) {
  T probe = T(0);
#pragma omp simd reduction(+ : probe)
  for (int64_t j = 0; j < n; ++j) probe += values[j] * T(0);
  return probe;
}

struct Projection {
  const at::Tensor& x;         // (T, B, I)
  const at::Tensor& weight_t;  // (I, G·H): W_ih transposed
  const at::Tensor& bias;      // (G·H,)
};

Shape check_projected(const Projection& p, const at::Tensor& h0, const at::Tensor& lengths, int64_t kind) {
  TORCH_CHECK(kind == kMinGRU || kind == kMinLSTM, "minimal_scan_projected: kind must be 0 (minGRU) or 1 (minLSTM)");
  const int64_t gates = kind == kMinGRU ? 2 : 3;
  TORCH_CHECK(p.x.dim() == 3 && p.x.is_contiguous(), "minimal_scan_projected: x must be a contiguous (T, B, I) tensor");
  TORCH_CHECK(h0.dim() == 2 && h0.is_contiguous() && h0.scalar_type() == p.x.scalar_type() &&
                  h0.size(0) == p.x.size(1),
              "minimal_scan_projected: h0 must be a contiguous (B, H) tensor of x's dtype");
  const int64_t hidden = h0.size(1), width = gates * hidden;
  TORCH_CHECK(p.weight_t.dim() == 2 && p.weight_t.is_contiguous() && p.weight_t.size(0) == p.x.size(2) &&
                  p.weight_t.size(1) == width && p.weight_t.scalar_type() == p.x.scalar_type(),
              "minimal_scan_projected: weight_t must be a contiguous (I, ", gates, "·H) tensor of x's dtype");
  TORCH_CHECK(p.bias.dim() == 1 && p.bias.is_contiguous() && p.bias.size(0) == width &&
                  p.bias.scalar_type() == p.x.scalar_type(),
              "minimal_scan_projected: bias must be a contiguous (", gates, "·H,) tensor of x's dtype");
  TORCH_CHECK(lengths.numel() == 0 || (lengths.dim() == 1 && lengths.size(0) == p.x.size(1) &&
                                       lengths.scalar_type() == at::kLong && lengths.is_contiguous()),
              "minimal_scan_projected: lengths must be empty or a contiguous int64 (B,) tensor");
  return {p.x.size(0), p.x.size(1), hidden, gates};
}

// One-hot inputs (every row of x a single 1 and zeros: copy memory's symbols, a character LM
// without embedding): the gates then depend on the symbol alone, so each symbol's Coefficients are
// made once per call, from project_row of that unit vector exactly as the row path forms them, and
// a step only reads its symbol's row of the table: no projection and no exp per step. Any other
// input (another value, a NaN, a row of zeros) takes the row path.
constexpr int64_t kFields = 6;  // keep, add, candidate, gate0, gate1, value; H of each

template <typename T, int64_t K>
bool symbol_table(const T* x, int64_t rows, int64_t inputs, const T* weight_t, const T* bias, int64_t H,
                  int64_t width, bool finite, std::vector<int32_t>& symbol, std::vector<T>& table) {
  // every entry 0 or 1 (a NaN is neither), in one vectorised pass; then, per row, a count of
  // ones and the position of the one, branch-free (this check runs twice per training step)
  const int64_t entries = rows * inputs;
  int other = 0;
#pragma omp simd reduction(| : other)
  for (int64_t k = 0; k < entries; ++k) other |= static_cast<int>((x[k] != T(0)) & (x[k] != T(1)));
  if (other) return false;
  symbol.resize(rows);
  bool single = true;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * inputs;
    T ones = T(0), at = T(0);
    for (int64_t i = 0; i < inputs; ++i) {
      ones += row[i];
      at += row[i] * static_cast<T>(i);
    }
    single &= ones == T(1);
    symbol[r] = static_cast<int32_t>(at);  // a small integer, exact; used only if every row has one 1
  }
  if (!single) return false;
  table.resize(inputs * kFields * H);
  std::vector<T> unit(inputs, T(0)), g(width);
  for (int64_t i = 0; i < inputs; ++i) {
    unit[i] = T(1);
    project_row(unit.data(), weight_t, bias, g.data(), inputs, width, finite);
    unit[i] = T(0);
    T* f = table.data() + i * kFields * H;
    for (int64_t j = 0; j < H; ++j) {
      coefficients<T, K>(g.data(), j, H, f[j], f[H + j], f[2 * H + j], f[3 * H + j], f[4 * H + j], f[5 * H + j]);
    }
  }
  return true;
}

template <typename T>
inline void forward_from_table(const T* __restrict__ f, const T* __restrict__ previous, T* __restrict__ now,
                               int64_t H) {
  for (int64_t j = 0; j < H; ++j) now[j] = f[j] * previous[j] + f[H + j];
}

template <typename T, int64_t K>
inline void backward_from_table(const T* __restrict__ f, const T* __restrict__ previous, const T* __restrict__ up,
                                T* __restrict__ G, T* __restrict__ d, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    G[j] = backward_column<T, K>(f[j], f[2 * H + j], f[3 * H + j], f[4 * H + j], f[5 * H + j], G[j] + up[j],
                                 previous[j], d, j, H);
  }
}

template <typename T, int64_t K>
void forward_projected(const Shape& s, int64_t inputs, const T* x, const T* weight_t, const T* bias,
                       const T* initial, const int64_t* length, T* h) {
  const int64_t H = s.hidden, width = s.gates * H;
  const bool finite = non_finite_probe(weight_t, inputs * width) == T(0);
  std::vector<int32_t> symbol;
  std::vector<T> table;
  const bool one_hot = symbol_table<T, K>(x, s.steps * s.batch, inputs, weight_t, bias, H, width, finite,
                                          symbol, table);
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    std::vector<T> g(width);
    for (int64_t t = 0; t < s.steps; ++t) {
      for (int64_t b = first; b < last; ++b) {
        const T* previous = t == 0 ? initial + b * H : h + ((t - 1) * s.batch + b) * H;
        T* now = h + (t * s.batch + b) * H;
        if (length != nullptr && t >= length[b]) {
          std::copy(previous, previous + H, now);
        } else if (one_hot) {
          forward_from_table(table.data() + symbol[t * s.batch + b] * kFields * H, previous, now, H);
        } else {
          project_row(x + (t * s.batch + b) * inputs, weight_t, bias, g.data(), inputs, width, finite);
          forward_row<T, K>(g.data(), previous, now, H);
        }
      }
    }
  });
}

template <typename T, int64_t K>
void backward_projected(const Shape& s, int64_t inputs, const T* upstream, const T* x, const T* weight_t,
                        const T* bias, const T* state, const T* initial, const int64_t* length,
                        T* d_x, T* d_weight_t, T* d_bias, T* carry) {
  const int64_t H = s.hidden, width = s.gates * H;
  const int64_t slots = at::get_num_threads();
  const bool finite = non_finite_probe(weight_t, inputs * width) == T(0);
  std::vector<int32_t> symbol;
  std::vector<T> table;
  const bool one_hot = symbol_table<T, K>(x, s.steps * s.batch, inputs, weight_t, bias, H, width, finite,
                                          symbol, table);
  // each thread sums its rows' dW^T and db into its own slot; the slots are added at the end
  std::vector<T> partial(static_cast<size_t>(slots * (inputs + 1) * width), T(0));
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    T* own = partial.data() + at::get_thread_num() * (inputs + 1) * width;  // dW^T (I, G·H), db
    std::vector<T> g(width), d(width);
    std::fill(carry + first * H, carry + last * H, T(0));
    for (int64_t t = s.steps - 1; t >= 0; --t) {
      for (int64_t b = first; b < last; ++b) {
        const T* previous = t == 0 ? initial + b * H : state + ((t - 1) * s.batch + b) * H;
        const T* up = upstream + (t * s.batch + b) * H;
        const T* x_row = x + (t * s.batch + b) * inputs;
        T* dx_row = d_x == nullptr ? nullptr : d_x + (t * s.batch + b) * inputs;
        if (t > 0) {  // as in backward_rows
          prefetch(x + ((t - 1) * s.batch + b) * inputs, inputs * sizeof(T));
          prefetch(upstream + ((t - 1) * s.batch + b) * H, H * sizeof(T));
          if (t > 1) prefetch(state + ((t - 2) * s.batch + b) * H, H * sizeof(T));
        }
        if (length != nullptr && t >= length[b]) {
          for (int64_t j = 0; j < H; ++j) carry[b * H + j] += up[j];
          if (dx_row != nullptr) std::fill(dx_row, dx_row + inputs, T(0));
          continue;
        }
        if (one_hot) {
          backward_from_table<T, K>(table.data() + symbol[t * s.batch + b] * kFields * H, previous, up,
                                    carry + b * H, d.data(), H);
        } else {
          project_row(x_row, weight_t, bias, g.data(), inputs, width, finite);
          backward_row<T, K>(g.data(), previous, up, carry + b * H, d.data(), H);
        }
        // x_i = 0 adds nothing to dW^T[i, :] unless d holds a NaN or inf (0 · inf = NaN, as in x^T d)
        const bool d_finite = non_finite_probe(d.data(), width) == T(0);
        for (int64_t i = 0; i < inputs; ++i) {
          const T xi = x_row[i];
          if (d_finite && xi == T(0)) continue;
          T* row = own + i * width;
          for (int64_t j = 0; j < width; ++j) row[j] += xi * d[j];
        }
        T* bias_sum = own + inputs * width;
        for (int64_t j = 0; j < width; ++j) bias_sum[j] += d[j];
        if (dx_row != nullptr) {
          for (int64_t i = 0; i < inputs; ++i) {
            const T* w = weight_t + i * width;
            T total = T(0);
            for (int64_t j = 0; j < width; ++j) total += w[j] * d[j];
            dx_row[i] = total;
          }
        }
      }
    }
  });
  std::fill(d_weight_t, d_weight_t + inputs * width, T(0));
  std::fill(d_bias, d_bias + width, T(0));
  for (int64_t slot = 0; slot < slots; ++slot) {
    const T* own = partial.data() + slot * (inputs + 1) * width;
    for (int64_t k = 0; k < inputs * width; ++k) d_weight_t[k] += own[k];
    for (int64_t j = 0; j < width; ++j) d_bias[j] += own[inputs * width + j];
  }
}

at::Tensor minimal_scan_projected(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias,
                                  const at::Tensor& h0, const at::Tensor& lengths, int64_t kind) {
  const Shape s = check_projected({x, weight_t, bias}, h0, lengths, kind);
  at::Tensor out = at::empty({s.steps, s.batch, s.hidden}, x.options());
  const int64_t* length = lengths.numel() ? lengths.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "minimal_scan_projected", [&] {
    auto run = kind == kMinGRU ? forward_projected<scalar_t, kMinGRU> : forward_projected<scalar_t, kMinLSTM>;
    run(s, x.size(2), x.data_ptr<scalar_t>(), weight_t.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
        h0.data_ptr<scalar_t>(), length, out.data_ptr<scalar_t>());
  });
  return out;
}

// -> (dL/dx (empty unless input_grad), dL/dW^T, dL/db, dL/dh0)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> minimal_scan_projected_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias,
    const at::Tensor& h, const at::Tensor& h0, const at::Tensor& lengths, int64_t kind, bool input_grad) {
  const Shape s = check_projected({x, weight_t, bias}, h0, lengths, kind);
  TORCH_CHECK(grad_out.sizes() == h.sizes() && h.sizes() == at::IntArrayRef({s.steps, s.batch, s.hidden}) &&
                  grad_out.is_contiguous() && h.is_contiguous() && grad_out.scalar_type() == x.scalar_type() &&
                  h.scalar_type() == x.scalar_type(),
              "minimal_scan_projected_backward: grad_out and h must be contiguous (T, B, H) tensors of x's dtype");
  at::Tensor grad_x = input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_weight_t = at::empty_like(weight_t);
  at::Tensor grad_bias = at::empty_like(bias);
  at::Tensor grad_h0 = at::empty_like(h0);
  const int64_t* length = lengths.numel() ? lengths.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "minimal_scan_projected_backward", [&] {
    auto run = kind == kMinGRU ? backward_projected<scalar_t, kMinGRU> : backward_projected<scalar_t, kMinLSTM>;
    run(s, x.size(2), grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight_t.data_ptr<scalar_t>(),
        bias.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), length,
        input_grad ? grad_x.data_ptr<scalar_t>() : nullptr, grad_weight_t.data_ptr<scalar_t>(),
        grad_bias.data_ptr<scalar_t>(), grad_h0.data_ptr<scalar_t>());
  });
  return {grad_x, grad_weight_t, grad_bias, grad_h0};
}

}  // namespace

TORCH_LIBRARY(rnnkit_scan, m) {
  m.def("minimal_scan(Tensor gx, Tensor h0, Tensor lengths, int kind) -> Tensor");
  m.def("minimal_scan_backward(Tensor grad_out, Tensor gx, Tensor h, Tensor h0, Tensor lengths, int kind)"
        " -> (Tensor, Tensor)");
  m.def("minimal_scan_projected(Tensor x, Tensor weight_t, Tensor bias, Tensor h0, Tensor lengths, int kind)"
        " -> Tensor");
  m.def("minimal_scan_projected_backward(Tensor grad_out, Tensor x, Tensor weight_t, Tensor bias, Tensor h,"
        " Tensor h0, Tensor lengths, int kind, bool input_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("minimal_scan_projected", c10::DispatchKey::CPU, TORCH_FN(minimal_scan_projected));
  m.impl("minimal_scan_projected_backward", c10::DispatchKey::CPU, TORCH_FN(minimal_scan_projected_backward));
  m.impl("minimal_scan", c10::DispatchKey::CPU, TORCH_FN(minimal_scan));
  m.impl("minimal_scan_backward", c10::DispatchKey::CPU, TORCH_FN(minimal_scan_backward));
}
