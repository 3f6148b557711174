// Pointwise math shared by rnnkit's C++ kernels (fused_rnn.cpp, scan.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rnnkit {

// Pointwise math. float: branch-free, auto-vectorisable exp (Cephes polynomial, ~1 ulp);
// double: libm (the float64 path is for exactness, not speed).
// NaN and +-inf behave as torch's: every select below is written so that a NaN operand takes the
// branch that passes it on (a `x > 0 ? x : 0` would turn NaN into 0), and exp is an exact 0 at
// -inf (sigmoid(-inf) = 0, so that 0 * inf makes the same NaN as in torch).
inline float fexp(float x) {  // for x <= 0 (every caller passes -|.|)
  // std::max returns its first argument when the comparison is false: NaN stays NaN (and p with
  // it). Below -87, where exp is denormal, the result is 0 (so exp(-inf) = 0 exactly; denormal
  // gate values would slow every later step several times).
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);  // in [-126, 0] or NaN
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from the bits of n + 1.5 * 2^23 (exact for integral |n| < 2^22), not a float-to-int
  // conversion, which is undefined for NaN
  const float magic = n + 12582912.0f;
  uint32_t e;
  std::memcpy(&e, &magic, sizeof(e));
  e = (e - 0x4B400000u + 127u) << 23;
  float s;
  std::memcpy(&s, &e, sizeof(s));
  return x < -87.0f ? 0.0f : p * s;
}
inline float sigm(float x) {
  const float e = fexp(-std::fabs(x));  // in (0, 1]
  const float q = 1.0f / (1.0f + e);
  return x >= 0.0f ? q : e * q;
}
inline float tanh_(float x) {
  const float e = fexp(-2.0f * std::fabs(x));
  const float t = (1.0f - e) / (1.0f + e);
  return std::copysign(t, x);
}
inline double sigm(double x) {
  const double e = std::exp(-std::fabs(x));
  const double q = 1.0 / (1.0 + e);
  return x >= 0.0 ? q : e * q;
}
inline double tanh_(double x) { return std::tanh(x); }

}  // namespace rnnkit
