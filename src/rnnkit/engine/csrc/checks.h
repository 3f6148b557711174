// The argument checks every compiled operator of rnnkit shares (fused_rnn.cpp's rnnkit_fused::*,
// layer_norm_rnn.cpp's rnnkit_ln::*), with one wording.
//
// The operators are public (torch.compile / export graphs and users call torch.ops.<ns>.<name>
// directly) and their loops read and write through raw pointers at the sizes the other arguments
// imply: a tensor of another shape or dtype was read or written past its end (the fuzzers of
// sessions 15 and 16). Each check raises one line that names the argument, what it must be and
// what it got (described(): its sizes and dtype, or None).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace rnnkit {

// What an argument check says it got: the tensor's sizes and dtype, or None (a required tensor
// passed as None arrives as an undefined tensor).
inline std::string described(const at::Tensor& t) {
  return t.defined() ? c10::str(t.sizes(), " of ", t.scalar_type()) : std::string("None");
}

// A required tensor argument: None gives "<name> is None" rather than an "undefined tensor"
// error from deep inside, or a read through a null pointer.
inline void check_given(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is None; a tensor is required");
}

// A tensor of exactly these sizes and this dtype.
inline void check_tensor(const at::Tensor& t, at::IntArrayRef want, at::ScalarType dtype,
                         const char* name) {
  TORCH_CHECK(t.defined() && t.sizes() == want && t.scalar_type() == dtype, name, " must be ",
              want, " of ", dtype, ", got ", described(t));
}

// The dtype every tensor of a call shares: the kernels exist for float32 and float64.
inline void check_float_dtype(const at::Tensor& t, const char* name) {
  check_given(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", described(t));
}

// A tensor of this rank (what its sizes mean, e.g. "(T, B, I)", for the message).
inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* meaning) {
  TORCH_CHECK(t.defined() && t.dim() == rank, name, " must be ", meaning, ", got ",
              described(t));
}

// The loop thread count an operator is given (0: automatic). It is cast to int and divides the
// work: threads = 2^40 became 0 threads and the backward divided by it (SIGFPE, the fuzzer of
// session 15); a negative count was taken as automatic without a word.
constexpr int64_t kMaxThreads = 1024;
inline void check_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0 && threads <= kMaxThreads, "threads must be in [0, ", kMaxThreads,
              "] (0: automatic), got ", threads);
}

// A ragged batch's rows per step, which the loops trust: one entry per step (of `steps`), each in
// [0, batch], non-increasing (step t runs the first bs[t] rows, sorted longest first: a row that
// has ended cannot run again; an increase corrupted the heap, session 15).
inline void check_batch_sizes(at::IntArrayRef bs, int64_t steps, int64_t batch) {
  TORCH_CHECK(static_cast<int64_t>(bs.size()) == steps, "batch_sizes must have one entry per step (",
              steps, "), got ", bs.size());
  for (size_t t = 0; t < bs.size(); ++t)
    TORCH_CHECK(bs[t] >= 0 && bs[t] <= batch && (t == 0 || bs[t] <= bs[t - 1]),
                "batch_sizes must be non-increasing (rows longest first), each in [0, B] = [0, ",
                batch, "], got ", bs);
}

}  // namespace rnnkit
