// The per-element formulas of the device logits head (csrc/core/device_head.h): one function
// per kernel body, each computing the elements of one index, so that the CUDA kernels
// (csrc/cuda/head.cu) and the CPU loops that stand in for them (csrc/cpu/device_head_loops.cpp,
// under the device-generic test switch) run the same formulas in the same order. Their last bits
// may still differ: nvcc contracts multiply-adds into FMAs and the device's exp/log are not
// glibc's. Free of torch headers (math.h).
//
// A head program: the swept conv/linear layer, then channel-local ops (BatchNorm, global
// average pooling, ReLU / Flatten once a channel is one number per sample), then at most one
// output Linear (csrc/core/device_head.h). Each channel of a sample is carried through the
// chain as the mean m and mean square q of its values over the spatial positions; BatchNorm
// maps (m, q) exactly, its batch statistics are mean(m) and mean(q) - mean(m)^2 over the
// minibatch, global pooling keeps m (q = m^2 after it), a ReLU acts on m once a channel is one
// number. The rows of the state are the C current channels (rows 0..C-1) and channel o as
// each of the K candidates moves it (rows C..C+K-1): [R = C + K][B] doubles for m and for q.
#pragma once

#include "math.h"

namespace rso {
namespace math {

// What the moved entry does to channel o of the swept layer's output.
enum HeadMove : int { kHeadConvWeight = 0, kHeadLinearWeight = 1, kHeadBias = 2, kHeadNone = 3 };

// One weight of a head sweep: the caches x [N, cin, h, w] (Linear: h = w = 1) and
// z [N, C, ho, wo] (contiguous), the moved entry (output channel o, input channel c, tap
// ky, kx), the K candidates and the B samples of the minibatch.
struct HeadGeom {
  int64_t cin, h, w;
  int64_t C, ho, wo;
  int64_t sh, sw, ph, pw;
  int64_t o, c, ky, kx;
  int move;
  int64_t K, B;
  int64_t classes;  // width of the logits
};

// Channel ch of the chain for row r: the current channel r, or channel o for a candidate.
RSO_HD inline int64_t head_channel(const HeadGeom& g, int64_t r) { return r < g.C ? r : g.o; }

// Moments of row r, sample b (idx[b] in the pool) of the swept layer's output: channel r's
// values, or channel o's moved by d = vals[r - C] - *entry, rounded to T as every backend's
// candidate channel is (add_product). A candidate equal to the current value (d = 0) gives
// the current row's bits exactly.
template <typename T>
RSO_HD inline void head_row_moments(const HeadGeom& g, const T* z, const T* x, const T* vals,
                                    const T* entry, const int64_t* idx, int64_t r, int64_t b,
                                    double* m, double* q) {
  const int64_t n = idx[b];
  const int64_t hw = g.ho * g.wo;
  const T* zr = z + (n * g.C + head_channel(g, r)) * hw;
  const bool moved = r >= g.C && g.move != kHeadNone;
  const T d = moved ? static_cast<T>(vals[r - g.C] - *entry) : T(0);
  double s1 = 0.0, s2 = 0.0;
  for (int64_t j = 0; j < hw; ++j) {
    T v = zr[j];
    if (moved) {
      if (g.move == kHeadConvWeight) {
        const int64_t iy = conv_input_coord(j / g.wo, g.ky, g.sh, g.ph);
        const int64_t ix = conv_input_coord(j % g.wo, g.kx, g.sw, g.pw);
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) {
          v = add_product(v, d, x[((n * g.cin + g.c) * g.h + iy) * g.w + ix]);
        }
      } else if (g.move == kHeadLinearWeight) {
        v = add_product(v, d, x[n * g.cin + g.c]);
      } else {
        v = v + d;
      }
    }
    const double vd = static_cast<double>(v);
    s1 += vd;
    s2 += vd * vd;
  }
  m[r * g.B + b] = s1 / static_cast<double>(hw);
  q[r * g.B + b] = s2 / static_cast<double>(hw);
}

// A BatchNorm's per-channel affine map a * v + sh applied to the moments of one row and sample.
RSO_HD inline void batch_norm_moments(double a, double sh, double& m, double& q) {
  const double mv = m;
  m = a * mv + sh;
  q = a * a * q + 2.0 * a * sh * mv + sh * sh;
}

// The scale and shift of a BatchNorm channel from its statistics (mean, biased variance).
RSO_HD inline void batch_norm_affine(double mean, double var, double gamma, double beta,
                                     double eps, double& a, double& sh) {
  a = gamma / ::sqrt(var + eps);
  sh = beta - a * mean;
}

// Batch statistics from the sums of m and q over B samples (the variance clamped at 0).
RSO_HD inline void batch_stats(double sum_m, double sum_q, int64_t B, double& mean,
                               double& var) {
  const double inv_b = 1.0 / static_cast<double>(B);
  mean = sum_m * inv_b;
  const double v = sum_q * inv_b - mean * mean;
  var = v > 0.0 ? v : 0.0;
}

// The BatchNorm of the chain (channel ch = head_channel(g, r)): gamma, beta (and running
// mean, var when the statistics are fixed) in the model's dtype; a candidate row of a swept
// BatchNorm parameter takes vals[r - C] as its gamma (swept == 1) or beta (swept == 2).
template <typename T>
struct HeadBatchNorm {
  const T* gamma;
  const T* beta;
  const T* running_mean;  // null: batch statistics from sum_m, sum_q [R]
  const T* running_var;
  const double* sum_m;
  const double* sum_q;
  double eps;
  int swept;
  const T* vals;
};

template <typename T>
RSO_HD inline void head_batch_norm(const HeadGeom& g, const HeadBatchNorm<T>& bn, int64_t r,
                                   int64_t b, double* m, double* q) {
  const int64_t ch = head_channel(g, r);
  double mean, var;
  if (bn.running_mean == nullptr) {
    batch_stats(bn.sum_m[r], bn.sum_q[r], g.B, mean, var);
  } else {
    mean = static_cast<double>(bn.running_mean[ch]);
    var = static_cast<double>(bn.running_var[ch]);
  }
  double gamma = static_cast<double>(bn.gamma[ch]);
  double beta = static_cast<double>(bn.beta[ch]);
  if (r >= g.C && bn.swept == 1) {
    gamma = static_cast<double>(bn.vals[r - g.C]);
  } else if (r >= g.C && bn.swept == 2) {
    beta = static_cast<double>(bn.vals[r - g.C]);
  }
  double a, sh;
  batch_norm_affine(mean, var, gamma, beta, bn.eps, a, sh);
  batch_norm_moments(a, sh, m[r * g.B + b], q[r * g.B + b]);
}

// A channel that is one number per sample: after a ReLU (NaN kept) or global pooling, q = m^2.
RSO_HD inline void one_number_moments(bool relu, double& m, double& q) {
  if (relu) {
    const double v = m;
    m = v > 0.0 ? v : (is_nan(v) ? v : 0.0);
  }
  q = m * m;
}

// Logit `cl` of candidate j (row C + j), sample b: the output Linear (w_out [classes, C],
// bias optional) over the chain's outputs m with channel o taken from the candidate's row;
// without an output layer the chain's outputs are the logits.
template <typename T>
RSO_HD inline double head_logit(const HeadGeom& g, const T* w_out, const T* b_out,
                                const double* m, int64_t j, int64_t b, int64_t cl) {
  const double cand = m[(g.C + j) * g.B + b];
  if (w_out == nullptr) {
    return cl == g.o ? cand : m[cl * g.B + b];
  }
  const T* wr = w_out + cl * g.C;
  double v = b_out != nullptr ? static_cast<double>(b_out[cl]) : 0.0;
  for (int64_t c = 0; c < g.C; ++c) {
    v += static_cast<double>(wr[c]) * (c == g.o ? cand : m[c * g.B + b]);
  }
  return v;
}

// The cross-entropy of candidate j on sample b (label target[idx[b]]) into per[j * B + b],
// as sample_cross_entropy computes it (max first, NaN and infinities kept); a label outside
// [0, classes) gives NaN and is never used as an index.
template <typename T>
RSO_HD inline void head_sample_loss(const HeadGeom& g, const T* w_out, const T* b_out,
                                    const double* m, const int64_t* target, const int64_t* idx,
                                    int64_t j, int64_t b, double* per) {
  const int64_t y = target[idx[b]];
  if (y < 0 || y >= g.classes) {
    per[j * g.B + b] = NAN;
    return;
  }
  double mx = -INFINITY;
  for (int64_t cl = 0; cl < g.classes; ++cl) {
    const double v = head_logit(g, w_out, b_out, m, j, b, cl);
    if (v > mx || is_nan(v)) {
      mx = v;
      if (is_nan(v)) {
        break;
      }
    }
  }
  const double xt = head_logit(g, w_out, b_out, m, j, b, y);
  if (!is_finite(mx)) {
    per[j * g.B + b] = mx - xt;
    return;
  }
  double s = 0.0;
  for (int64_t cl = 0; cl < g.classes; ++cl) {
    s += ::exp(head_logit(g, w_out, b_out, m, j, b, cl) - mx);
  }
  per[j * g.B + b] = (mx - xt) + ::log(s);
}

// Deterministic sums of the rows of a [R][B]: each row in chunks of kHeadSumChunk samples
// added in order (partial [R][chunks]), then the chunks in order. Both backends take this
// order, so a sum does not depend on the device.
constexpr int64_t kHeadSumChunk = 256;
RSO_HD inline int64_t head_sum_chunks(int64_t B) { return (B + kHeadSumChunk - 1) / kHeadSumChunk; }

RSO_HD inline void head_chunk_sum(const double* a, int64_t B, int64_t r, int64_t chunk,
                                  double* partial) {
  const int64_t b0 = chunk * kHeadSumChunk;
  const int64_t b1 = b0 + kHeadSumChunk < B ? b0 + kHeadSumChunk : B;
  double s = 0.0;
  for (int64_t b = b0; b < b1; ++b) {
    s += a[r * B + b];
  }
  partial[r * head_sum_chunks(B) + chunk] = s;
}

RSO_HD inline void head_row_total(const double* partial, int64_t chunks, int64_t r,
                                  double* out) {
  double s = 0.0;
  for (int64_t i = 0; i < chunks; ++i) {
    s += partial[r * chunks + i];
  }
  out[r] = s;
}

}  // namespace math
}  // namespace rso
