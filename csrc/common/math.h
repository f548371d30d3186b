// Numerical helpers shared by the CPU (csrc/core, csrc/cpu) and CUDA (csrc/cuda) paths.
//
// Everything here is header-only, free of torch headers and marked RSO_HD so that
// nvcc compiles it for the device and the host compiler for the CPU. Both backends
// call exactly these functions, so they evaluate the same formulas in the same
// order per sample (they may still differ in the last bits of a *sum over samples*,
// because the CPU and GPU reductions are different, each deterministic, trees).
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define RSO_HD __host__ __device__
#else
#define RSO_HD
#endif

namespace rso {
namespace math {

// Portable classification that works identically in host and device code and does
// not depend on <cmath> overloads being device-callable (needs IEEE semantics, i.e.
// no -ffast-math / --use_fast_math).
RSO_HD inline bool is_nan(double x) { return x != x; }
RSO_HD inline bool is_finite(double x) { return x - x == 0.0; }

// Maximum over `n` values `row[0], row[stride], ...`, upcast to double.
// NaN propagates: once a NaN is seen the result is NaN. Returns -inf for n == 0.
template <typename T>
RSO_HD inline double max_upcast(const T* row, int64_t n, int64_t stride = 1) {
  double m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(row[i * stride]);
    if (x > m || is_nan(x)) {
      m = x;
      if (is_nan(m)) {
        return m;
      }
    }
  }
  return m;
}

// sum_i exp(row[i] - m) in double, for a finite shift `m` (normally the maximum, so
// that no term overflows and the largest term contributes exactly 1). A -inf entry
// contributes exp(-inf) = 0; a NaN entry makes the sum NaN.
template <typename T>
RSO_HD inline double sum_exp_shifted(const T* row, int64_t n, double m, int64_t stride = 1) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    s += ::exp(static_cast<double>(row[i * stride]) - m);
  }
  return s;
}

// Numerically stable log(sum_i exp(row[i])) in double (two passes: max, then the
// shifted sum). Non-finite inputs are not hidden:
//   any NaN              -> NaN
//   some +inf (no NaN)   -> +inf
//   all -inf             -> -inf
//   some -inf otherwise  -> those terms contribute exp(-inf) = 0.
template <typename T>
RSO_HD inline double log_sum_exp(const T* row, int64_t n, int64_t stride = 1) {
  const double m = max_upcast(row, n, stride);
  if (!is_finite(m)) {
    return m;
  }
  return m + ::log(sum_exp_shifted(row, n, m, stride));
}

// Softmax cross-entropy of one contiguous sample, log_sum_exp(row) - row[target], in
// double, evaluated as (max - row[target]) + log(sum_exp_shifted) so that a small
// loss next to large logits keeps its precision. `target` must already be validated
// to lie in [0, n). Non-finite logits give NaN or +inf as the formula does (e.g. a
// +inf target logit gives NaN, a -inf non-target logit is harmless).
template <typename T>
RSO_HD inline double sample_cross_entropy(const T* row, int64_t n, int64_t target) {
  const double m = max_upcast(row, n);
  const double x_target = static_cast<double>(row[target]);
  if (!is_finite(m)) {
    return m - x_target;
  }
  return (m - x_target) + ::log(sum_exp_shifted(row, n, m));
}

}  // namespace math
}  // namespace rso

namespace rso {
namespace math {

// Input coordinate read by output coordinate `out` of a convolution tap at kernel
// offset `k` (stride `s`, zero padding `p`); outside [0, n) the input is zero padding.
RSO_HD inline int64_t conv_input_coord(int64_t out, int64_t k, int64_t s, int64_t p) {
  return out * s + k - p;
}

// log(exp(a) + exp(b)) in double, stable; NaN in either gives NaN.
RSO_HD inline double log_add_exp(double a, double b) {
  if (is_nan(a) || is_nan(b)) {
    return a + b;
  }
  const double m = a > b ? a : b;
  if (!is_finite(m)) {
    return m;
  }
  const double d = a > b ? b - a : a - b;
  return m + ::log1p(::exp(d));
}

// Index of the lowest of `n` losses: ties keep the earliest and a non-finite loss is
// never chosen over candidate 0 (the RSO choice rule; candidate 0 is the current weight).
RSO_HD inline int64_t choose_candidate(const double* loss, int64_t n) {
  int64_t best = 0;
  for (int64_t j = 1; j < n; ++j) {
    if (is_finite(loss[j]) && loss[j] < loss[best]) {
      best = j;
    }
  }
  return best;
}

}  // namespace math
}  // namespace rso

// -- the fused candidate evaluation (csrc/cpu/fused_backend.cpp, csrc/cuda/fused.cu) ----------
namespace rso {
namespace math {

// z + d * x rounded twice (a product, then a sum), never contracted into one fused
// multiply-add: the host compiler does not contract on plain x86-64, and on the device the
// explicitly rounded intrinsics forbid it, so both backends keep Z_d bitwise equal.
RSO_HD inline float add_product(float z, float d, float x) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(z, __fmul_rn(d, x));
#else
  return z + d * x;
#endif
}
RSO_HD inline double add_product(double z, double d, double x) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(z, __dmul_rn(d, x));
#else
  return z + d * x;
#endif
}

// log(sum over c != skip of exp(row[c])) in double: the log-sum-exp of the classes whose
// logits do not move when only logit `skip` does. NaN anywhere (but in `skip`) gives NaN.
template <typename T>
RSO_HD inline double log_sum_exp_except(const T* row, int64_t n, int64_t skip) {
  double m = -INFINITY;
  for (int64_t c = 0; c < n; ++c) {
    if (c != skip && (static_cast<double>(row[c]) > m || is_nan(static_cast<double>(row[c])))) {
      m = static_cast<double>(row[c]);
    }
  }
  if (!is_finite(m)) {
    return m;
  }
  double sum = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    if (c != skip) {
      sum += ::exp(static_cast<double>(row[c]) - m);
    }
  }
  return m + ::log(sum);
}

// Cross-entropy of one sample whose logit `moved` takes the value `t`, the others being
// `row`, given rest = log_sum_exp_except(row, n, moved) and the sample's label y.
template <typename T>
RSO_HD inline double moved_logit_cross_entropy(const T* row, double rest, int64_t moved,
                                               int64_t y, double t) {
  return log_add_exp(rest, t) - (y == moved ? t : static_cast<double>(row[y]));
}

// The decision of one sweep step: -1 when candidate 0's loss (the current weight) is not
// finite (the sweep stops and nothing is written), else choose_candidate.
RSO_HD inline int64_t sweep_decision(const double* loss, int64_t n) {
  return is_finite(loss[0]) ? choose_candidate(loss, n) : -1;
}

}  // namespace math
}  // namespace rso
