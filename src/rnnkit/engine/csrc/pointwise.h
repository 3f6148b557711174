// Pointwise math shared by rnnkit's C++ kernels. float: branch-free, auto-vectorisable exp
// (Cephes polynomial, ~1 ulp); double: libm (the float64 path is for exactness, not speed).
// NaN and +-inf behave as torch's: every select is written so that a NaN operand takes the branch
// that passes it on (a `x > 0 ? x : 0` would turn NaN into 0), and exp underflows to an exact 0
// at -inf (sigmoid(-inf) = 0, so that 0 * inf makes the same NaN as in torch).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rnnkit {

inline float fast_exp(float x) {
  // std::max / std::min return their first argument when the comparison is false: NaN stays NaN.
  // Down to -104 (below which float exp is 0), so the denormal range is kept.
  x = std::min(std::max(x, -104.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);  // in [-150, 127] or NaN
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as two factors 2^(n/2) 2^(n - n/2), each a normal float for n >= -150; the NaN case
  // converts 0 (converting NaN to int is undefined) and p carries the NaN.
  const int32_t ni = static_cast<int32_t>(n == n ? n : 0.0f);
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const int32_t e1 = (n1 + 127) << 23, e2 = (n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &e1, sizeof(s1));
  std::memcpy(&s2, &e2, sizeof(s2));
  return p * s1 * s2;
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  const T e = fast_exp(-std::fabs(x));  // in (0, 1]: no overflow for either sign
  const T q = T(1) / (T(1) + e);
  return x >= T(0) ? q : e * q;
}

}  // namespace rnnkit
