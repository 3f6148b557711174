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

// One step of one batch row: h_t from the row's gates g (G·H) and h_{t−1}.
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
  TORCH_CHECK(grad_out.sizes() == h.sizes() && grad_out.is_contiguous() && h.is_contiguous() &&
                  grad_out.scalar_type() == gx.scalar_type(),
              "minimal_scan_backward: grad_out and h must be contiguous (T, B, H) tensors of gx's dtype");
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

}  // namespace

TORCH_LIBRARY(rnnkit_scan, m) {
  m.def("minimal_scan(Tensor gx, Tensor h0, Tensor lengths, int kind) -> Tensor");
  m.def("minimal_scan_backward(Tensor grad_out, Tensor gx, Tensor h, Tensor h0, Tensor lengths, int kind)"
        " -> (Tensor, Tensor)");
  m.impl("minimal_scan", c10::DispatchKey::CPU, TORCH_FN(minimal_scan));
  m.impl("minimal_scan_backward", c10::DispatchKey::CPU, TORCH_FN(minimal_scan_backward));
}
