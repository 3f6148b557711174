// The output layer and the mean cross-entropy, forward and gradients in one pass over the rows,
// for few classes (V <= 16) at many positions (copy memory: N = 32,640 rows of H = 66, V = 10).
//
// For each row n of hidden (N, H), with W (V, H), b (V,) and target t_n:
//   z = W h_n + b,  m = max_v z_v,  s = Σ_v exp(z_v − m),  p = exp(z − m) / s
//   loss_n = log s + m − z_{t_n}                     loss = (1/N) Σ_n loss_n
//   c = (p − onehot(t_n)) / N                         (d loss / d z, the rows' scores)
//   d hidden_n = Wᵀ c      d W += c h_nᵀ      d b += c
// Plain reference: F.cross_entropy(F.linear(hidden, W, b), targets) (mean reduction) and its
// autograd; rnnkit.losses.cross_entropy's class-major torch composition does the same math.
//
// Why one pass: torch's composition reads hidden (8.6 MB at the copy row) in the forward, again
// in the backward, and runs three GEMMs whose second dimension is V = 10, far below the BLAS's
// efficient shapes. Here the loss's gradient is formed while each row's logits are in registers
// (the loss is a scalar, so d loss / d hidden needs only the upstream factor, applied after):
// hidden is read once, its gradient written once, and nothing of size (N, V) is stored.
// Register blocking: kRows rows at a time; W is held transposed and padded to kLanes classes so
// that a row's logits are kLanes/8 vector accumulators and every multiply-add is a full vector.
//
// NaN/inf propagate as in torch: a non-finite h_n (or a logit of +inf) makes z − m NaN in that
// row, so loss, that row's d hidden and all of d W, d b are NaN, and no other row's d hidden.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "../../engine/csrc/pointwise.h"

namespace {

constexpr int64_t kLanes = 16;  // classes padded to this (the operator takes V <= 16)
constexpr int64_t kRows = 4;    // rows per register block
constexpr int64_t kChunk = 256;  // rows whose d W, d b, loss are summed apart before the total:
                                 // keeps the float sums' rounding near torch's blocked GEMM's

// exp for x <= 0 (every caller passes z − m): the vectorisable polynomial for float, libm for
// double (the float64 path is for exactness, as in the rest of rnnkit's kernels)
inline float exp_nonpositive(float x) { return rnnkit::fexp(x); }
inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename T>
struct Sums {  // what one thread accumulates: d W (V, H), d b (kLanes), the loss
  std::vector<T> weight, bias;
  double loss = 0.0;
};

template <typename T>
struct Problem {
  const T* hidden;      // (N, H)
  const T* weight;      // (V, H)
  const T* weight_t;    // (H, kLanes): W transposed, zero-padded past V
  const T* bias;        // (kLanes,): zero-padded
  const int64_t* targets;
  int64_t rows, hidden_size, classes;
  T scale;              // 1 / N
  T* grad_hidden;       // (N, H) or nullptr
  bool grad_params;
};

// One machine vector of T (GCC/Clang vector extensions; 512 bits where the build has AVX-512,
// else 256): the loops below are written in whole vectors, since left to itself the compiler
// vectorised the logits across H with shuffles.
#ifdef __AVX512F__
constexpr int64_t kVectorBytes = 64;
#else
constexpr int64_t kVectorBytes = 32;
#endif
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t n = kVectorBytes / 4;
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t n = kVectorBytes / 8;
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// kRows (or fewer) rows from `first`: their loss added to `loss`, their gradients to grad_hidden
// and to the chunk's d W, d b
template <typename T, int64_t R>
inline void rows_block(const Problem<T>& p, int64_t first, T* d_weight, T* d_bias, double& loss) {
  using V = typename Lanes<T>::V;
  constexpr int64_t n = Lanes<T>::n, vectors = kLanes / n;
  const int64_t H = p.hidden_size, C = p.classes;
  const T* h = p.hidden + first * H;
  V zv[R][vectors];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < vectors; ++i) zv[r][i] = load<V>(p.bias + i * n);
  for (int64_t k = 0; k < H; ++k) {
    V w[vectors];
    for (int64_t i = 0; i < vectors; ++i) w[i] = load<V>(p.weight_t + k * kLanes + i * n);
    for (int64_t r = 0; r < R; ++r) {
      const T x = h[r * H + k];
      for (int64_t i = 0; i < vectors; ++i) zv[r][i] += x * w[i];
    }
  }
  T c[R][kLanes];  // the scores (p − onehot) / N, zero past V
  for (int64_t r = 0; r < R; ++r) {
    T z[kLanes];
    for (int64_t i = 0; i < vectors; ++i) store(z + i * n, zv[r][i]);
    // max over the V real classes; a NaN z leaves m as it is but makes z − m NaN below
    T m = z[0];
    for (int64_t v = 1; v < C; ++v) m = z[v] > m ? z[v] : m;
    T e[kLanes];
    for (int64_t v = 0; v < kLanes; ++v) e[v] = exp_nonpositive(z[v] - m);
    T sum = T(0);
    for (int64_t v = 0; v < kLanes; ++v) {
      e[v] = v < C ? e[v] : T(0);  // padded lanes hold h · 0 (NaN for an inf h): dropped here
      sum += e[v];
    }
    const int64_t t = p.targets[first + r];
    loss += static_cast<double>(std::log(sum) + m - z[t]);
    const T inverse = p.scale / sum;
    for (int64_t v = 0; v < kLanes; ++v) c[r][v] = e[v] * inverse;
    c[r][t] -= p.scale;
  }
  if (p.grad_hidden != nullptr) {
    // d hidden_n = Σ_v c_v W[v, :], one vector of columns at a time held in registers across v
    T* out = p.grad_hidden + first * H;
    int64_t k0 = 0;
    for (; k0 + n <= H; k0 += n) {
      V acc[R] = {};
      for (int64_t v = 0; v < C; ++v) {
        const V w = load<V>(p.weight + v * H + k0);
        for (int64_t r = 0; r < R; ++r) acc[r] += c[r][v] * w;
      }
      for (int64_t r = 0; r < R; ++r) store(out + r * H + k0, acc[r]);
    }
    for (int64_t k = k0; k < H; ++k) {
      for (int64_t r = 0; r < R; ++r) {
        T acc = T(0);
        for (int64_t v = 0; v < C; ++v) acc += c[r][v] * p.weight[v * H + k];
        out[r * H + k] = acc;
      }
    }
  }
  if (p.grad_params) {
    for (int64_t v = 0; v < C; ++v) {  // d W[v, :] += Σ_r c_rv h_r
      T* g = d_weight + v * H;
      int64_t k = 0;
      for (; k + n <= H; k += n) {
        V acc = load<V>(g + k);
        for (int64_t r = 0; r < R; ++r) acc += c[r][v] * load<V>(h + r * H + k);
        store(g + k, acc);
      }
      for (; k < H; ++k) {
        T acc = g[k];
        for (int64_t r = 0; r < R; ++r) acc += c[r][v] * h[r * H + k];
        g[k] = acc;
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < kLanes; ++v) d_bias[v] += c[r][v];
  }
}

template <typename T>
void run(const Problem<T>& p, std::vector<Sums<T>>& slots) {
  const int64_t H = p.hidden_size, V = p.classes;
  const int64_t chunks = (p.rows + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first_chunk, int64_t last_chunk) {
    Sums<T>& own = slots[at::get_thread_num()];
    std::vector<T> d_weight(p.grad_params ? V * H : 0), d_bias(kLanes);
    for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
      const int64_t first = chunk * kChunk, last = std::min(p.rows, first + kChunk);
      std::fill(d_weight.begin(), d_weight.end(), T(0));
      std::fill(d_bias.begin(), d_bias.end(), T(0));
      double loss = 0.0;
      int64_t n = first;
      for (; n + kRows <= last; n += kRows) rows_block<T, kRows>(p, n, d_weight.data(), d_bias.data(), loss);
      for (; n < last; ++n) rows_block<T, 1>(p, n, d_weight.data(), d_bias.data(), loss);
      own.loss += loss;
      if (p.grad_params) {
        for (int64_t i = 0; i < V * H; ++i) own.weight[i] += d_weight[i];
        for (int64_t v = 0; v < kLanes; ++v) own.bias[v] += d_bias[v];
      }
    }
  });
}

// -> (loss (), d loss / d hidden (N, H) or empty, d loss / d W (V, H), d loss / d b (V,)); the
// gradients are of the mean loss (upstream factor 1), all zero-sized work skipped unless asked
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    bool grad_hidden, bool grad_params) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "linear_cross_entropy: hidden must be a contiguous (N, H) tensor");
  const int64_t N = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == H &&
                  weight.scalar_type() == hidden.scalar_type(),
              "linear_cross_entropy: weight must be a contiguous (V, H) tensor of hidden's dtype");
  const int64_t V = weight.size(0);
  TORCH_CHECK(V >= 1 && V <= kLanes, "linear_cross_entropy: the kernel takes 1 to ", kLanes, " classes, got ", V);
  TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 1 && bias.size(0) == V && bias.is_contiguous() &&
                                    bias.scalar_type() == hidden.scalar_type()),
              "linear_cross_entropy: bias must be empty or a contiguous (V,) tensor of hidden's dtype");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == N && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous(),
              "linear_cross_entropy: targets must be a contiguous int64 (N,) tensor");
  const int64_t* target = targets.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(target[n] >= 0 && target[n] < V, "linear_cross_entropy: target ", target[n], " is not in [0, ", V, ")");
  at::Tensor loss = at::empty({}, hidden.options());
  at::Tensor d_hidden = at::empty({grad_hidden ? N : 0, H}, hidden.options());
  at::Tensor d_weight = at::zeros({V, H}, hidden.options());
  at::Tensor d_bias = at::zeros({V}, hidden.options());
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "linear_cross_entropy", [&] {
    using T = scalar_t;
    std::vector<T> weight_t(H * kLanes, T(0)), padded_bias(kLanes, T(0));
    const T* w = weight.data_ptr<T>();
    for (int64_t v = 0; v < V; ++v)
      for (int64_t k = 0; k < H; ++k) weight_t[k * kLanes + v] = w[v * H + k];
    if (bias.numel()) std::copy(bias.data_ptr<T>(), bias.data_ptr<T>() + V, padded_bias.begin());
    const Problem<T> p{hidden.data_ptr<T>(), w, weight_t.data(), padded_bias.data(), target, N, H, V,
                       T(1) / static_cast<T>(N), grad_hidden ? d_hidden.data_ptr<T>() : nullptr, grad_params};
    std::vector<Sums<T>> slots(at::get_num_threads());
    for (Sums<T>& slot : slots) {
      slot.weight.assign(grad_params ? V * H : 0, T(0));
      slot.bias.assign(kLanes, T(0));
    }
    run(p, slots);
    double total = 0.0;
    T* dw = d_weight.data_ptr<T>();
    T* db = d_bias.data_ptr<T>();
    for (const Sums<T>& slot : slots) {
      total += slot.loss;
      if (!grad_params) continue;
      for (int64_t i = 0; i < V * H; ++i) dw[i] += slot.weight[i];
      for (int64_t v = 0; v < V; ++v) db[v] += slot.bias[v];
    }
    // the mean; 0 / 0 = NaN for no rows, as F.cross_entropy gives
    *loss.data_ptr<T>() = static_cast<T>(total / static_cast<double>(N));
  });
  return {loss, d_hidden, d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY(rnnkit_lce, m) {
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor bias, Tensor targets, bool grad_hidden,"
        " bool grad_params) -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("linear_cross_entropy", c10::DispatchKey::CPU, TORCH_FN(linear_cross_entropy));
}
