// The recurrent regularisers' Bernoulli masks from a counter-based hash, vectorised.
//
// torch.rand on the CPU draws ~2.8 ns per element (a Mersenne twister, one element at a time):
// 0.4 ms for a (T, B, H) = (35, 20, 200) zoneout mask on a 3.5 ms training step. A counter-based
// generator is a pure function of (key, element index), so it vectorises (~0.1 ns per element
// here) and needs no state between calls: the key — two 32-bit words drawn once per mask from
// torch's generator — is what torch.manual_seed makes reproducible.
//
//   mix(x)  = lowbias32 (C. Wellons, hash-prospector): x ^= x >> 16; x *= 0x7feb352d;
//             x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16            (uint32 arithmetic)
//   u_i     = mix(mix(i ^ key0) ^ key1)                               (i: flat element index)
//   mask_i  = value if u_i < threshold else 0                         (P = threshold / 2^32)
//
// Plain reference: rnnkit.engine.regularise.keep_mask_reference, the same hash in torch integer
// ops (every engine takes its masks from rnnkit.engine.regularise.keep_mask, which runs this op
// when it is built and the reference otherwise: both give the same bits).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

template <typename T>
void fill(T* out, int64_t begin, int64_t end, uint32_t key0, uint32_t key1, uint64_t threshold,
          T value) {
  if (threshold > UINT32_MAX) {  // P = 1: every element kept (no compare can say so in uint32)
    for (int64_t i = begin; i < end; ++i) out[i] = value;
    return;
  }
  const uint32_t below = static_cast<uint32_t>(threshold);
  // (a plain loop over uint32 lanes: the compiler vectorises the hash, the compare and the select)
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t u = mix(mix(static_cast<uint32_t>(i) ^ key0) ^ key1);
    out[i] = u < below ? value : T(0);
  }
}

at::Tensor keep_mask(at::IntArrayRef shape, int64_t key0, int64_t key1, int64_t threshold,
                     double value, at::ScalarType dtype) {
  TORCH_CHECK(key0 >= 0 && key0 <= UINT32_MAX && key1 >= 0 && key1 <= UINT32_MAX,
              "keep_mask: the key words must be in [0, 2^32)");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 32),
              "keep_mask: the threshold must be in [0, 2^32]");
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  const int64_t n = out.numel();
  TORCH_CHECK(n <= (int64_t(1) << 32), "keep_mask: at most 2^32 elements (the counter is 32-bit)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "keep_mask", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    const scalar_t v = static_cast<scalar_t>(value);
    at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
      fill<scalar_t>(p, begin, end, static_cast<uint32_t>(key0), static_cast<uint32_t>(key1),
                     static_cast<uint64_t>(threshold), v);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(rnnkit_masks, m) {
  m.def("keep_mask(int[] shape, int key0, int key1, int threshold, float value, ScalarType dtype)"
        " -> Tensor");
  m.impl("keep_mask", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(keep_mask));
}
