// The moment chain of the CPU logits head (head_impl.h): the channels of a minibatch as the
// mean m and mean square q of their values over the spatial positions, carried through the
// chain's ops (BatchNorm with batch or fixed statistics, global average pooling, ReLU,
// Flatten) to one number per channel and sample: every channel of the current state, and
// channel o of each of the K candidates.
#include "head_impl.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../common/math.h"
#include "fused_steps.h"
#include "program_passes.h"

namespace rso {
namespace fused {

template <typename T>
template <typename ZRow>
void HeadCpu<T>::candidate_moments(const Site& st, int64_t b0, int64_t b1, const int64_t* idx,
                                   const ZRow& zo, const double* d, int64_t K, int64_t B) {
  double* m = bm_.data() + st.o * B;
  double* q = bq_.data() + st.o * B;
  if (s_.conv) {
    for (int64_t b = b0; b < b1; ++b) {
      row_moments(zo(b), hw_, m[b], q[b]);
    }
  }
  if (s_.kind == UnitKind::Weight && s_.conv) {
    const double inv = 1.0 / static_cast<double>(hw_);
    for (int64_t b = b0; b < b1; ++b) {
      const T* xp = x_ + (idx[b] * s_.cin + st.c) * s_.h * s_.w;
      const T* zr = zo(b);
      double t = 0.0, u = 0.0, v = 0.0;
      for_each_tap_input(s_, st, xp, [&](int64_t j, T x) {
        const double sv = static_cast<double>(x);
        t += sv;
        u += static_cast<double>(zr[j]) * sv;
        v += sv * sv;
      });
      for (int64_t k = 0; k < K; ++k) {
        cm_[k * B + b] = m[b] + d[k] * t * inv;
        cq_[k * B + b] = q[b] + 2.0 * d[k] * u * inv + d[k] * d[k] * v * inv;
      }
    }
  } else if (s_.kind == UnitKind::Weight) {  // linear: z_o + d * x[n, c], rounded as Z_d is
    for (int64_t k = 0; k < K; ++k) {
      const T dk = static_cast<T>(d[k]);
      for (int64_t b = b0; b < b1; ++b) {
        const double mk = static_cast<double>(
            math::add_product(static_cast<T>(m[b]), dk, x_[idx[b] * s_.cin + st.c]));
        cm_[k * B + b] = mk;
        cq_[k * B + b] = mk * mk;
      }
    }
  } else if (s_.kind == UnitKind::Bias) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t b = b0; b < b1; ++b) {
        const double mk = s_.conv ? m[b] + d[k]
                                  : static_cast<double>(static_cast<T>(m[b]) + static_cast<T>(d[k]));
        cm_[k * B + b] = mk;
        cq_[k * B + b] = s_.conv ? q[b] + 2.0 * d[k] * m[b] + d[k] * d[k] : mk * mk;
      }
    }
  } else {  // a BatchNorm parameter moves: the layer's output does not
    for (int64_t k = 0; k < K; ++k) {
      std::copy(m + b0, m + b1, cm_.data() + k * B + b0);
      std::copy(q + b0, q + b1, cq_.data() + k * B + b0);
    }
  }
}

template <typename T>
void HeadCpu<T>::run_chain(double* m, double* q, int64_t G, int64_t rows, int64_t B, int64_t o,
                           bool single, const T* cand) const {
  const double inv_b = 1.0 / static_cast<double>(B);
  for (int64_t i = 1; i < chain_end_; ++i) {
    const Op& op = s_.prog.ops[i];
    switch (op.kind) {
      case OpKind::BatchNorm: {
        const T* gamma = op.t[0].const_data_ptr<T>();
        const T* beta = op.t[1].const_data_ptr<T>();
        const bool swept = single && i == s_.unit_op &&
                           (s_.kind == UnitKind::Gamma || s_.kind == UnitKind::Beta);
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t ch = single ? o : r;
            double* mr = m + (g * rows + r) * B;
            double* qr = q + (g * rows + r) * B;
            double mean, var;
            if (op.p[0] != 0) {
              double s1 = 0.0, s2 = 0.0;
              for (int64_t b = 0; b < B; ++b) {
                s1 += mr[b];
                s2 += qr[b];
              }
              mean = s1 * inv_b;
              var = std::max(0.0, s2 * inv_b - mean * mean);
            } else {
              mean = static_cast<double>(op.t[2].const_data_ptr<T>()[ch]);
              var = static_cast<double>(op.t[3].const_data_ptr<T>()[ch]);
            }
            double ga = static_cast<double>(gamma[ch]);
            double be = static_cast<double>(beta[ch]);
            if (swept && s_.kind == UnitKind::Gamma) {
              ga = static_cast<double>(cand[g]);
            } else if (swept) {
              be = static_cast<double>(cand[g]);
            }
            const double a = ga / std::sqrt(var + op.eps);
            const double sh = be - a * mean;
            for (int64_t b = 0; b < B; ++b) {
              const double mv = mr[b];
              mr[b] = a * mv + sh;
              qr[b] = a * a * qr[b] + 2.0 * a * sh * mv + sh * sh;
            }
          }
        }
        break;
      }
      case OpKind::ReLU:
        for (int64_t i = 0; i < G * rows * B; ++i) {
          const double v = m[i];
          m[i] = v > 0.0 ? v : (v == v ? 0.0 : v);
          q[i] = m[i] * m[i];
        }
        break;
      case OpKind::GlobalAvgPool:
        for (int64_t i = 0; i < G * rows * B; ++i) {
          q[i] = m[i] * m[i];
        }
        break;
      default:  // Flatten of one number per channel
        break;
    }
  }
}

template <typename T>
void HeadCpu<T>::chain_logits(const Site& st, const T* vals, const double* d, int64_t K,
                              const int64_t* idx, int64_t B) {
  const int64_t o = st.o;
  bm_.resize(static_cast<size_t>(C_ * B));
  bq_.resize(static_cast<size_t>(C_ * B));
  cm_.resize(static_cast<size_t>(K * B));
  cq_.resize(static_cast<size_t>(K * B));
  const bool pool = !pool_m_.empty();
  // the current moments of every channel, transposed to [C][B] a block of samples at a
  // time (whole cache lines per channel row), and the candidates'
  constexpr int64_t kBlock = 16;
  const int64_t per_sample = C_ * (pool || !s_.conv ? 1 : hw_) + K * hw_ * 4;
  at::parallel_for(0, (B + kBlock - 1) / kBlock, cpu::grain_for(kBlock * per_sample),
                   [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b0 = i * kBlock, b1 = std::min(B, b0 + kBlock);
      for (int64_t c = 0; c < C_; ++c) {
        double* mr = bm_.data() + c * B;
        double* qr = bq_.data() + c * B;
        if (pool) {
          for (int64_t b = b0; b < b1; ++b) {
            mr[b] = pool_m_[idx[b] * C_ + c];
            qr[b] = pool_q_[idx[b] * C_ + c];
          }
        } else if (s_.conv) {
          for (int64_t b = b0; b < b1; ++b) {
            row_moments(z_ + (idx[b] * C_ + c) * hw_, hw_, mr[b], qr[b]);
          }
        } else {
          for (int64_t b = b0; b < b1; ++b) {
            const double v = static_cast<double>(z_[idx[b] * C_ + c]);
            mr[b] = v;
            qr[b] = v * v;
          }
        }
      }
      if (lazy_ && !s_.conv) {  // feature o as recomputed
        for (int64_t b = b0; b < b1; ++b) {
          const double v = static_cast<double>(fresh_[b]);
          bm_[o * B + b] = v;
          bq_[o * B + b] = v * v;
        }
      }
      if (lazy_ && s_.conv) {
        candidate_moments(st, b0, b1, idx, [&](int64_t b) { return fresh_.data() + b * hw_; },
                          d, K, B);
      } else {
        const T* col = col_o_ == o ? col_.data() : nullptr;  // the neuron's column, if moved
        candidate_moments(st, b0, b1, idx,
                          [&](int64_t b) {
                            return col != nullptr ? col + idx[b] * hw_
                                                  : z_ + (idx[b] * C_ + o) * hw_;
                          },
                          d, K, B);
      }
    }
  });
  run_chain(bm_.data(), bq_.data(), 1, C_, B, o, false, nullptr);
  run_chain(cm_.data(), cq_.data(), K, 1, B, o, true, vals);
  // the chain's outputs (the output layer's inputs) in the model's dtype
  at_.resize(static_cast<size_t>(C_ * B));
  dt_.resize(static_cast<size_t>(K * B));
  for (int64_t i = 0; i < C_ * B; ++i) {
    at_[i] = static_cast<T>(bm_[i]);
  }
  for (int64_t i = 0; i < K * B; ++i) {
    dt_[i] = static_cast<T>(cm_[i]);
  }
  output_logits(B);
}

// make_cpu_head's dtypes
template void HeadCpu<float>::run_chain(double*, double*, int64_t, int64_t, int64_t, int64_t, bool,
                                        const float*) const;
template void HeadCpu<float>::chain_logits(const Site&, const float*, const double*, int64_t,
                                           const int64_t*, int64_t);
template void HeadCpu<double>::run_chain(double*, double*, int64_t, int64_t, int64_t, int64_t, bool,
                                         const double*) const;
template void HeadCpu<double>::chain_logits(const Site&, const double*, const double*, int64_t,
                                            const int64_t*, int64_t);

}  // namespace fused
}  // namespace rso
