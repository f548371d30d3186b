// The vectorised loss loops of the CPU logits head (head_loss_loops.h).
#include "head_loss_loops.h"

#include <limits>

#include "clones.h"
#include "fast_math.h"

namespace rso {
namespace fused {

template <typename T>
RSO_CPU_CLONES int all_finite(const T* p, int64_t n) {
  int ok = 1;
  for (int64_t i = 0; i < n; ++i) {
    ok &= static_cast<int>(p[i] - p[i] == T(0));
  }
  return ok;
}

template <typename T>
RSO_CPU_CLONES void moved_column_ce(const T* Lt, int64_t ld, int64_t classes, const T* w,
                                    const T* del, const T* ly, const T* wy, int64_t n, T* mx,
                                    T* sum, T* ce) {
  for (int64_t b = 0; b < n; ++b) {
    mx[b] = Lt[b] + del[b] * w[0];
    sum[b] = T(0);
  }
  for (int64_t c = 1; c < classes; ++c) {
    const T* row = Lt + c * ld;
    const T wc = w[c];
    for (int64_t b = 0; b < n; ++b) {
      const T v = row[b] + del[b] * wc;
      mx[b] = v > mx[b] ? v : mx[b];
    }
  }
  for (int64_t c = 0; c < classes; ++c) {
    const T* row = Lt + c * ld;
    const T wc = w[c];
    for (int64_t b = 0; b < n; ++b) {
      sum[b] += cpu::exp_t(row[b] + del[b] * wc - mx[b]);
    }
  }
  for (int64_t b = 0; b < n; ++b) {
    ce[b] = (mx[b] - (ly[b] + del[b] * wy[b])) + cpu::log_t(sum[b]);
  }
}

template <typename T>
RSO_CPU_CLONES void log_sum_exp_except(const T* Lt, int64_t ld, int64_t classes, int64_t skip,
                                       int64_t n, T* mx, T* sum, T* rest) {
  for (int64_t b = 0; b < n; ++b) {
    mx[b] = -std::numeric_limits<T>::infinity();
    sum[b] = T(0);
  }
  for (int64_t c = 0; c < classes; ++c) {
    if (c == skip) {
      continue;
    }
    const T* row = Lt + c * ld;
    for (int64_t b = 0; b < n; ++b) {
      mx[b] = row[b] > mx[b] ? row[b] : mx[b];
    }
  }
  for (int64_t c = 0; c < classes; ++c) {
    if (c == skip) {
      continue;
    }
    const T* row = Lt + c * ld;
    for (int64_t b = 0; b < n; ++b) {
      sum[b] += cpu::exp_t(row[b] - mx[b]);
    }
  }
  for (int64_t b = 0; b < n; ++b) {
    rest[b] = mx[b] + cpu::log_t(sum[b]);
  }
}

template <typename T>
RSO_CPU_CLONES void moved_logit_ce(const T* rest, const T* t, const T* ly, const T* is_moved,
                                   int64_t n, T* ce) {
  for (int64_t b = 0; b < n; ++b) {
    const T hi = rest[b] > t[b] ? rest[b] : t[b];
    const T lo = rest[b] > t[b] ? t[b] : rest[b];
    const T label = is_moved[b] * t[b] + (T(1) - is_moved[b]) * ly[b];
    ce[b] = (hi - label) + cpu::log_t(T(1) + cpu::exp_t(lo - hi));
  }
}

template <typename T>
RSO_CPU_CLONES double sum_as_double(const T* v, int64_t n) {
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      acc[l] += static_cast<double>(v[i + l]);
    }
  }
  for (; i < n; ++i) {
    acc[0] += static_cast<double>(v[i]);
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// make_cpu_head's dtypes
template int all_finite<float>(const float*, int64_t);
template void moved_column_ce<float>(const float*, int64_t, int64_t, const float*, const float*,
                                     const float*, const float*, int64_t, float*, float*, float*);
template void log_sum_exp_except<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                        float*, float*);
template void moved_logit_ce<float>(const float*, const float*, const float*, const float*, int64_t,
                                    float*);
template double sum_as_double<float>(const float*, int64_t);
template int all_finite<double>(const double*, int64_t);
template double sum_as_double<double>(const double*, int64_t);
template void moved_column_ce<double>(const double*, int64_t, int64_t, const double*, const double*,
                                      const double*, const double*, int64_t, double*, double*,
                                      double*);
template void log_sum_exp_except<double>(const double*, int64_t, int64_t, int64_t, int64_t, double*,
                                         double*, double*);
template void moved_logit_ce<double>(const double*, const double*, const double*, const double*,
                                     int64_t, double*);

}  // namespace fused
}  // namespace rso
