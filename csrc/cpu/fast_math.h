// exp and log for the CPU loss loops, written so that GCC vectorises a loop calling them
// (branch-free float arithmetic and bit casts, no library call): Cephes' single-precision
// polynomials, within 2 ulp of expf/logf on the ranges the callers use. A double model keeps
// the library's exp/log (exact, not vectorised).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace rso {
namespace cpu {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) for x <= 88 (larger x is clamped; the callers pass shifted arguments <= 0); below
// -87.3 the result is clamped to 2^-126 instead of flushing to 0. NaN gives NaN.
inline float exp_approx(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.33654f ? -87.33654f : x;
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(fx) + 127) << 23);
}

// log(x) for a positive normal x (the callers pass sums of exponentials >= 1).
inline float log_approx(float x) {
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // x = m * 2^e, m in [0.5, 1)
  const float small = static_cast<float>(m < 0.707106781186547524f);  // 1 or 0, no branch
  e = e - small;
  m = m + m * small - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y - 2.12194440e-4f * e;
  y = y - 0.5f * z;
  return (m + y) + 0.693359375f * e;
}

// The loss loops' exp and log in the model's precision.
inline float exp_t(float x) { return exp_approx(x); }
inline double exp_t(double x) { return std::exp(x); }
inline float log_t(float x) { return log_approx(x); }
inline double log_t(double x) { return std::log(x); }

}  // namespace cpu
}  // namespace rso
