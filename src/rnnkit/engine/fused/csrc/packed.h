// A ragged batch's row layouts, shared by the fused kernels' time loops (layer.h, in
// fused_rnn.cpp's translation unit) and the layer-normalised ones (layer_norm_rnn.cpp).
//
// Rows are sorted longest first, so step t runs the first bs[t] rows of the batch. Packed, the
// rows that run are stored one step after another — the data layout of torch's PackedSequence:
// step t's row b at off[t] + b, off[t] = Σ_{k<t} bs[k]. The sequence-wide products (input
// projection, dx, dW_ih, dW_hh) then run over these Σ bs rows as one GEMM each, instead of over
// all T*B rows of the padded layout, where the rows that have ended cost as much as the ones
// that run (session 12: ~35 % of the work of U(0.3T, T) lengths). Padded, off[t] = t*B: every
// row of every step.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <vector>

namespace {

struct Packed {
  std::vector<int64_t> off;  // off[k]: the row of step k's row 0 (size steps + 1)
  int64_t row(int64_t t, int64_t b) const { return off[t] + b; }
  int64_t rows() const { return off.back(); }
  int64_t steps() const { return static_cast<int64_t>(off.size()) - 1; }
};

// The packed layout of steps with bs[k] running rows.
inline Packed packed_rows(at::IntArrayRef bs) {
  Packed p;
  p.off.assign(bs.size() + 1, 0);
  for (size_t k = 0; k < bs.size(); ++k) p.off[k + 1] = p.off[k] + bs[k];
  return p;
}

// The padded layout of `steps` steps of `batch` rows (every row of every step).
inline Packed padded_rows(int64_t steps, int64_t batch) {
  Packed p;
  p.off.assign(steps + 1, 0);
  for (int64_t k = 0; k < steps; ++k) p.off[k + 1] = p.off[k] + batch;
  return p;
}

// The rows that run at step t: bs[t], or all `batch` where bs is empty (no lengths).
inline int64_t active_rows(at::IntArrayRef bs, int64_t t, int64_t batch) {
  return bs.empty() ? batch : bs[t];
}

// Leading steps where every row runs: their rows lie in the same order in both layouts.
inline int64_t full_steps(at::IntArrayRef bs, int64_t B) {
  int64_t k = 0;
  while (k < static_cast<int64_t>(bs.size()) && bs[k] == B) ++k;
  return k;
}

// dst (packed rows, width) = the running rows of steps k (row 0 of step k at step(k), rows
// width apart), times mask row m (width) when mask is not null.
template <typename T, typename Step>
void pack_steps(at::IntArrayRef bs, const Packed& p, int64_t width, Step step, const T* mask,
                T* dst) {
  for (size_t k = 0; k < bs.size(); ++k) {
    const T* s = step(static_cast<int64_t>(k));
    T* d = dst + p.off[k] * width;
    if (!mask) {
      std::memcpy(d, s, bs[k] * width * sizeof(T));
      continue;
    }
    for (int64_t m = 0; m < bs[k]; ++m)
      for (int64_t j = 0; j < width; ++j) d[m * width + j] = s[m * width + j] * mask[m * width + j];
  }
}

// The padded (n, B, width) dst from the packed src: step k's running rows copied, and with
// zero_rest the rows past their length set to 0 (an output's padding).
template <typename T>
void unpack_steps(at::IntArrayRef bs, const Packed& p, int64_t B, int64_t width, const T* src,
                  T* dst, bool zero_rest) {
  for (size_t k = 0; k < bs.size(); ++k) {
    T* d = dst + static_cast<int64_t>(k) * B * width;
    std::memcpy(d, src + p.off[k] * width, bs[k] * width * sizeof(T));
    if (zero_rest) std::memset(d + bs[k] * width, 0, (B - bs[k]) * width * sizeof(T));
  }
}

// out, a fresh (T, B, width) tensor, with its rows past each length set to 0 (the loops write
// only the rows that run): only those rows are zeroed, not the whole tensor first. bs empty:
// every row runs, nothing to zero.
inline at::Tensor zero_padded(at::Tensor out, at::IntArrayRef bs) {
  if (bs.empty()) return out;
  const int64_t batch = out.size(1), width = out.size(2);
  const size_t item = out.element_size();
  char* base = static_cast<char*>(out.data_ptr());
  for (int64_t t = 0; t < out.size(0); ++t)
    std::memset(base + ((t * batch + bs[t]) * width) * item, 0,
                static_cast<size_t>((batch - bs[t]) * width) * item);
  return out;
}

}  // namespace
