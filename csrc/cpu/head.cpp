// The CPU logits head (head.h): for a swept layer whose channels reach the logits through
// one number per channel and sample -- the last linear layer, a hidden linear layer followed
// by ReLU and the output layer, a conv layer followed by BatchNorm and global average pooling
// and the output layer -- the K candidates of a weight cost O(B * classes) after the shared
// part, with no ATen call per weight.
//
// Each channel c of a sample is carried through the chain as the mean m and mean square q of
// its values over the spatial positions. BatchNorm is an affine map per channel, so
// (m, q) -> (a m + b, a^2 q + 2 a b m + b^2) stays exact, and its batch statistics are
// mean(m) and mean(q) - mean(m)^2 over the minibatch; global pooling keeps m (q = m^2 after
// it), and a ReLU acts on m once a channel is one number. A candidate moves channel o only:
// z_o + d * s (s the input the entry multiplies) has moments m + d mean(s) and
// q + 2 d mean(z_o s) + d^2 mean(s^2). The output layer then adds (a'_o - a_o) * W[:, o] to
// the current logits, or the chain's output is logit o itself.
//
// A conv sweep keeps m and q of every pool sample and channel next to Z_d (built once per
// call, updated with every move); a linear weight sweep on a large pool recomputes feature o
// per minibatch and refreshes it per neuron (as csrc/core/fused.cpp does for conv layers);
// the logits layer keeps the other logits' log-sum-exp per neuron over a small pool. The loss
// loops vectorise over samples (fast_math.h); a state with a non-finite logit takes the exact
// per-sample cross-entropy of math.h.
#include "head.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/math.h"
#include "clones.h"
#include "fast_math.h"
#include "fused_steps.h"
#include "program_passes.h"

namespace rso {
namespace fused {
namespace {

// Mean and mean square of n values (cpu::sums; every caller takes this one function, so the
// moments of a row are the same bits wherever they are computed).
template <typename T>
inline void row_moments(const T* r, int64_t n, double& m, double& q) {
  double s1 = 0.0, s2 = 0.0;
  cpu::sums(r, n, s1, s2);
  m = s1 / static_cast<double>(n);
  q = s2 / static_cast<double>(n);
}

// 1 when every value is finite, else 0.
template <typename T>
RSO_CPU_CLONES int all_finite(const T* p, int64_t n) {
  int ok = 1;
  for (int64_t i = 0; i < n; ++i) {
    ok &= static_cast<int>(p[i] - p[i] == T(0));
  }
  return ok;
}

// ce[b] = cross-entropy of logits Lt[:, b] + del[b] * w (Lt [classes][ld] transposed, label
// logit ly[b] + del[b] * wy[b]) for b < n; mx and sum are scratch of n.
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

// rest[b] = log-sum-exp of the logits Lt[c][b], c != skip, for b < n; mx, sum: scratch.
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

// ce[b] = cross-entropy when logit `moved` takes t[b] and the others' log-sum-exp is rest[b];
// the label's logit is t[b] where is_moved[b] is 1, else ly[b].
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

// out[i * stride] = bias + w . x[rows[i]] (x [N, cin]; row i when rows is null), i < n: one
// output feature of a linear layer, in eight partial sums.
template <typename T>
RSO_CPU_CLONES void linear_one_output(const T* x, int64_t cin, const int64_t* rows, int64_t n,
                                      const T* w, T bias, T* out, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = x + (rows != nullptr ? rows[i] : i) * cin;
    T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
    int64_t j = 0;
    for (; j + 8 <= cin; j += 8) {
      for (int l = 0; l < 8; ++l) {
        acc[l] += w[j + l] * xr[j + l];
      }
    }
    for (; j < cin; ++j) {
      acc[0] += w[j] * xr[j];
    }
    out[i * stride] = bias + (((acc[0] + acc[1]) + (acc[2] + acc[3])) +
                              ((acc[4] + acc[5]) + (acc[6] + acc[7])));
  }
}

// ReLU in place (NaN stays NaN, as torch.relu).
template <typename T>
RSO_CPU_CLONES void relu_in_place(T* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = p[i];
    p[i] = v > T(0) ? v : (v == v ? T(0) : v);
  }
}

// Lt[cls][b] (+)= sum_c W[cls][c] * At[c][b] for cls in [c0, c1): the output layer over the
// chain's outputs At [C][B], in a fixed order (the same bits on any number of threads).
template <typename T>
RSO_CPU_CLONES void output_layer(const T* W, int64_t C, const T* At, int64_t B, int64_t c0,
                                 int64_t c1, T* Lt) {
  for (int64_t cls = c0; cls < c1; ++cls) {
    T* out = Lt + cls * B;
    const T* w = W + cls * C;
    for (int64_t c = 0; c < C; ++c) {
      const T wc = w[c];
      const T* a = At + c * B;
      for (int64_t b = 0; b < B; ++b) {
        out[b] += wc * a[b];
      }
    }
  }
}

template <typename T>
class HeadCpu final : public Head {
 public:
  // chain_end: the first op after the channel-local chain (the output Linear, or the end)
  HeadCpu(const Sweep& s, int64_t chain_end)
      : s_(s), chain_end_(chain_end), C_(s.cout), hw_(s.ho * s.wo), classes_(s.classes),
        x_(s.x.const_data_ptr<T>()), z_(s.z.const_data_ptr<T>()) {
    out_ = chain_end < static_cast<int64_t>(s_.prog.ops.size()) ? &s_.prog.ops[chain_end] : nullptr;
    for (int64_t i = 1; i < chain_end; ++i) {
      chain_has_batch_norm_ = chain_has_batch_norm_ || s_.prog.ops[i].kind == OpKind::BatchNorm;
    }
  }

  at::Tensor losses(int64_t k, const at::Tensor& vals, const at::Tensor& idx) override {
    at::Tensor out = at::empty({vals.numel()}, at::TensorOptions().dtype(at::kDouble));
    evaluate(k, vals.const_data_ptr<T>(), vals.numel(), idx.const_data_ptr<int64_t>(),
             idx.numel(), out.mutable_data_ptr<double>());
    return out;
  }

  void sweep(Backend::SweepCall& call, int64_t k0, const at::Tensor& vals,
             const at::Tensor& idx) override {
    const int64_t m = vals.size(0), K = vals.size(1), B = idx.size(1);
    // csrc/core/fused.cpp decides for conv layers; a linear layer's weight by the same rule (its
    // column of the pool is strided through memory, feature o is cin multiply-adds)
    lazy_ = s_.lazy_z || (!s_.conv && s_.kind == UnitKind::Weight && lazy_z_pays(s_, B));
    if (s_.conv) {
      build_pool_moments();
    }
    // the logits layer: the other logits' log-sum-exp once per neuron over the pool, where
    // the neuron's minibatches hold more samples than the pool
    const int64_t per_neuron = s_.kind == UnitKind::Weight ? s_.cin : 1;
    pool_rest_ = !s_.conv && chain_end_ == 1 && out_ == nullptr && s_.x.size(0) < B * per_neuron;
    rest_o_ = -1;
    const T* v = vals.const_data_ptr<T>();
    const int64_t* ix = idx.const_data_ptr<int64_t>();
    double* losses = call.losses.mutable_data_ptr<double>();
    int64_t* chosen = call.chosen.mutable_data_ptr<int64_t>();
    T* param = s_.param.mutable_data_ptr<T>();
    for (int64_t i = 0; i < m; ++i) {
      const int64_t k = k0 + i;
      const Site st = site_of(s_, k);
      double* l = losses + i * K;
      evaluate(k, v + i * K, K, ix + i * B, B, l);
      const int64_t j = math::sweep_decision(l, K);
      chosen[i] = j;
      if (j >= 0) {
        const T old = param[k];
        param[k] = v[i * K + j];
        if (!lazy_) {
          move(st, static_cast<T>(param[k] - old));
        }
      }
      if (lazy_ && (j < 0 || i == m - 1 || site_of(s_, k + 1).o != st.o)) {
        refresh(st.o);
      }
      if (j < 0) {
        return;
      }
    }
  }

 private:
  // Z_d[:, o] += d * input over the pool, and the pool moments of channel o with it.
  void move(const Site& st, T d) {
    if (pool_m_.empty()) {
      apply_move_cpu<T>(s_, st, d);
      return;
    }
    apply_move_cpu<T>(s_, st, d, [&](int64_t n, const T* zrow) {
      row_moments(zrow, hw_, pool_m_[n * C_ + st.o], pool_q_[n * C_ + st.o]);
    });
  }

  // Channel o of the swept layer for pool samples rows[0..n) (all when null) into
  // out + i * stride, from X_d and the current weights.
  void recompute(int64_t o, const int64_t* rows, int64_t n, T* out, int64_t stride) const {
    if (s_.conv) {
      one_channel_cpu<T>(s_, o, rows, n, out, stride);
      return;
    }
    const Op& layer = s_.prog.ops[0];
    const T bias = layer.t[1].defined() ? layer.t[1].const_data_ptr<T>()[o] : T(0);
    const T* w = layer.t[0].const_data_ptr<T>() + o * s_.cin;
    at::parallel_for(0, n, cpu::grain_for(s_.cin), [&](int64_t i0, int64_t i1) {
      if (rows != nullptr) {
        linear_one_output<T>(x_, s_.cin, rows + i0, i1 - i0, w, bias, out + i0 * stride, stride);
      } else {
        linear_one_output<T>(x_ + i0 * s_.cin, s_.cin, nullptr, i1 - i0, w, bias,
                             out + i0 * stride, stride);
      }
    });
  }

  // A lazy sweep's channel o over the pool, recomputed once neuron o is done.
  void refresh(int64_t o) {
    T* z = s_.z.mutable_data_ptr<T>();
    recompute(o, nullptr, s_.x.size(0), z + o * hw_, C_ * hw_);
    if (!s_.conv) {
      return;
    }
    const int64_t N = s_.x.size(0);
    at::parallel_for(0, N, cpu::grain_for(hw_), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        row_moments(z + (n * C_ + o) * hw_, hw_, pool_m_[n * C_ + o], pool_q_[n * C_ + o]);
      }
    });
  }

  void build_pool_moments() {
    const int64_t N = s_.x.size(0);
    pool_m_.resize(static_cast<size_t>(N * C_));
    pool_q_.resize(static_cast<size_t>(N * C_));
    const T* z = s_.z.const_data_ptr<T>();
    at::parallel_for(0, N * C_, cpu::grain_for(hw_), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        row_moments(z + r * hw_, hw_, pool_m_[r], pool_q_[r]);
      }
    });
  }

  // Samples b0..b1 of the minibatch: the current moments of channel o into bm/bq (a conv
  // channel recomputed from its values `zo(b)`), and those of the K candidates' into cm/cq.
  template <typename ZRow>
  void candidate_moments(const Site& st, int64_t b0, int64_t b1, const int64_t* idx,
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

  // The chain over G groups of rows [G][rows][B] of moments m, q, each group with its own
  // batch statistics per row: every channel (rows == C, G == 1), or channel o alone per
  // candidate (`single`, rows == 1), where the swept BatchNorm takes gamma/beta[g].
  void run_chain(double* m, double* q, int64_t G, int64_t rows, int64_t B, int64_t o,
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

  // The current logits lt_ [classes][B] and the candidates' outputs of channel o dt_ [K][B]
  // through the chain (the output layer's inputs at_ [C][B] too).
  void chain_logits(const Site& st, const T* vals, const double* d, int64_t K,
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
          candidate_moments(st, b0, b1, idx,
                            [&](int64_t b) { return z_ + (idx[b] * C_ + o) * hw_; }, d,
                            K, B);
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

  // The current logits lt_ [classes][B] from the chain's outputs at_ [C][B].
  void output_logits(int64_t B) {
    const int64_t classes = classes_;
    if (out_ == nullptr) {
      lt_.assign(at_.begin(), at_.end());
      return;
    }
    lt_.assign(static_cast<size_t>(classes * B), T(0));
    const T* wp = out_->t[0].const_data_ptr<T>();
    at::parallel_for(0, classes, std::max<int64_t>(1, cpu::grain_for(C_ * B)),
                     [&](int64_t c0, int64_t c1) {
      output_layer<T>(wp, C_, at_.data(), B, c0, c1, lt_.data());
    });
    if (out_->t[1].defined()) {
      const T* bias = out_->t[1].const_data_ptr<T>();
      for (int64_t c = 0; c < classes; ++c) {
        for (int64_t b = 0; b < B; ++b) {
          lt_[c * B + b] += bias[c];
        }
      }
    }
  }

  // The same for a linear layer whose chain holds no BatchNorm: z and the chain's ReLUs in
  // the model's dtype, straight from Z_d.
  void layer_logits(const Site& st, const double* d, int64_t K, const int64_t* idx, int64_t B) {
    at_.resize(static_cast<size_t>(C_ * B));
    dt_.resize(static_cast<size_t>(K * B));
    constexpr int64_t kBlock = 16;
    for (int64_t b0 = 0; b0 < B; b0 += kBlock) {
      const int64_t b1 = std::min(B, b0 + kBlock);
      for (int64_t c = 0; c < C_; ++c) {
        for (int64_t b = b0; b < b1; ++b) {
          at_[c * B + b] = z_[idx[b] * C_ + c];
        }
      }
    }
    if (lazy_) {  // feature o as recomputed
      std::copy(fresh_.begin(), fresh_.begin() + B, at_.begin() + st.o * B);
    }
    const T* zo = at_.data() + st.o * B;
    for (int64_t k = 0; k < K; ++k) {
      const T dk = static_cast<T>(d[k]);
      T* out = dt_.data() + k * B;
      if (s_.kind == UnitKind::Weight) {
        for (int64_t b = 0; b < B; ++b) {
          out[b] = math::add_product(zo[b], dk, x_[idx[b] * s_.cin + st.c]);
        }
      } else {
        for (int64_t b = 0; b < B; ++b) {
          out[b] = zo[b] + dk;
        }
      }
    }
    for (int64_t i = 1; i < chain_end_; ++i) {
      if (s_.prog.ops[i].kind == OpKind::ReLU) {
        relu_in_place(at_.data(), C_ * B);
        relu_in_place(dt_.data(), K * B);
      }
    }
    output_logits(B);
  }

  // The losses of the logits layer from the log-sum-exp of the other logits kept over the
  // pool for neuron o (computed when the sweep reaches the neuron: they do not move while its
  // weights do); false (nothing written) where a value is not finite.
  bool pool_rest_losses(const Site& st, const double* d, int64_t K, const int64_t* idx,
                        int64_t B, double* res) {
    const int64_t o = st.o, N = s_.x.size(0), C = C_;
    if (rest_o_ != o) {
      rest_.resize(static_cast<size_t>(N));
      constexpr int64_t kBlock = 256;
      at::parallel_for(0, (N + kBlock - 1) / kBlock, 1, [&](int64_t i0, int64_t i1) {
        std::vector<T> t(static_cast<size_t>(C * kBlock)), mx(kBlock), sum(kBlock);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n0 = i * kBlock, n = std::min(kBlock, N - n0);
          for (int64_t c = 0; c < C; ++c) {
            for (int64_t j = 0; j < n; ++j) {
              t[c * n + j] = z_[(n0 + j) * C + c];
            }
          }
          log_sum_exp_except<T>(t.data(), n, C, o, n, mx.data(), sum.data(), rest_.data() + n0);
        }
      });
      rest_o_ = o;
    }
    const int64_t* target = s_.target.const_data_ptr<int64_t>();
    ly_.resize(static_cast<size_t>(B));
    aux_.resize(static_cast<size_t>(B));
    rest_b_.resize(static_cast<size_t>(B));
    dt_.resize(static_cast<size_t>(K * B));
    at_.resize(static_cast<size_t>(B));   // logit o now
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = idx[b], y = target[n];
      rest_b_[b] = rest_[n];
      at_[b] = lazy_ ? fresh_[b] : z_[n * C + o];
      ly_[b] = y == o ? T(0) : z_[n * C + y];
      aux_[b] = y == o ? T(1) : T(0);
    }
    for (int64_t k = 0; k < K; ++k) {
      const T dk = static_cast<T>(d[k]);
      T* out = dt_.data() + k * B;
      for (int64_t b = 0; b < B; ++b) {
        out[b] = s_.kind == UnitKind::Weight
                     ? math::add_product(at_[b], dk, x_[idx[b] * s_.cin + st.c])
                     : at_[b] + dk;
      }
    }
    if (!all_finite(rest_b_.data(), B) || !all_finite(ly_.data(), B) ||
        !all_finite(dt_.data(), K * B)) {
      return false;
    }
    ce_.resize(static_cast<size_t>(K * B));
    for (int64_t k = 0; k < K; ++k) {
      moved_logit_ce<T>(rest_b_.data(), dt_.data() + k * B, ly_.data(), aux_.data(), B,
                        ce_.data() + k * B);
      double sum = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        sum += static_cast<double>(ce_[k * B + b]);
      }
      res[k] = sum;
    }
    return true;
  }

  void evaluate(int64_t k, const T* vals, int64_t K, const int64_t* idx, int64_t B,
                double* res) {
    const Site st = site_of(s_, k);
    const int64_t o = st.o;
    const T w = s_.param.const_data_ptr<T>()[k];
    std::vector<double> d(static_cast<size_t>(K));
    for (int64_t j = 0; j < K; ++j) {
      d[j] = static_cast<double>(vals[j]) - static_cast<double>(w);
    }
    const int64_t classes = classes_;
    const int64_t* target = s_.target.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(target[idx[b]] >= 0 && target[idx[b]] < classes, "fused: label ",
                  target[idx[b]], " of pool sample ", idx[b], " is outside [0, ", classes,
                  ") (the program gives ", classes, " logits)");
    }
    if (lazy_) {
      fresh_.resize(static_cast<size_t>(B * hw_));
      recompute(o, idx, B, fresh_.data(), hw_);
    }
    if (pool_rest_ && pool_rest_losses(st, d.data(), K, idx, B, res)) {
      return;
    }
    if (!s_.conv && !chain_has_batch_norm_) {
      layer_logits(st, d.data(), K, idx, B);
    } else {
      chain_logits(st, vals, d.data(), K, idx, B);
    }
    if (!all_finite(lt_.data(), classes * B) || !all_finite(dt_.data(), K * B)) {
      exact_losses(o, idx, K, B, res);
      return;
    }
    ly_.resize(static_cast<size_t>(B));
    aux_.resize(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t y = target[idx[b]];
      ly_[b] = lt_[y * B + b];
    }
    ce_.resize(static_cast<size_t>(K * B));
    const int64_t grain = std::max<int64_t>(64, cpu::grain_for(classes * 8));
    if (out_ != nullptr) {
      // the output layer's column o and the candidates' change of its input o
      std::vector<T> wcol(static_cast<size_t>(classes));
      const T* wp = out_->t[0].const_data_ptr<T>();
      const int64_t stride = out_->t[0].size(1);
      for (int64_t c = 0; c < classes; ++c) {
        wcol[c] = wp[c * stride + o];
      }
      for (int64_t b = 0; b < B; ++b) {
        aux_[b] = wcol[target[idx[b]]];
      }
      del_.resize(static_cast<size_t>(K * B));
      for (int64_t j = 0; j < K; ++j) {
        for (int64_t b = 0; b < B; ++b) {
          del_[j * B + b] = dt_[j * B + b] - at_[o * B + b];
        }
      }
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        std::vector<T> mx(static_cast<size_t>(b1 - b0)), sum(static_cast<size_t>(b1 - b0));
        for (int64_t j = 0; j < K; ++j) {
          moved_column_ce<T>(lt_.data() + b0, B, classes, wcol.data(), del_.data() + j * B + b0,
                             ly_.data() + b0, aux_.data() + b0, b1 - b0, mx.data(), sum.data(),
                             ce_.data() + j * B + b0);
        }
      });
    } else {
      for (int64_t b = 0; b < B; ++b) {
        aux_[b] = target[idx[b]] == o ? T(1) : T(0);
      }
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        const int64_t n = b1 - b0;
        std::vector<T> mx(static_cast<size_t>(n)), sum(static_cast<size_t>(n)),
            rest(static_cast<size_t>(n));
        log_sum_exp_except<T>(lt_.data() + b0, B, classes, o, n, mx.data(), sum.data(),
                              rest.data());
        for (int64_t j = 0; j < K; ++j) {
          moved_logit_ce<T>(rest.data(), dt_.data() + j * B + b0, ly_.data() + b0,
                            aux_.data() + b0, n, ce_.data() + j * B + b0);
        }
      });
    }
    for (int64_t j = 0; j < K; ++j) {
      double sum = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        sum += static_cast<double>(ce_[j * B + b]);
      }
      res[j] = sum;
    }
  }

  // The losses from the logits one sample and candidate at a time, in double (math.h's
  // cross-entropy, which keeps NaN and infinities as they are).
  void exact_losses(int64_t o, const int64_t* idx, int64_t K, int64_t B, double* res) const {
    const int64_t classes = classes_;
    const int64_t* target = s_.target.const_data_ptr<int64_t>();
    std::vector<double> row(static_cast<size_t>(classes));
    const T* wp = out_ != nullptr ? out_->t[0].const_data_ptr<T>() : nullptr;
    const int64_t stride = out_ != nullptr ? out_->t[0].size(1) : 0;
    for (int64_t j = 0; j < K; ++j) {
      double sum = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < classes; ++c) {
          row[c] = static_cast<double>(lt_[c * B + b]);
        }
        const T a = dt_[j * B + b];
        if (wp != nullptr) {
          const T dl = a - at_[o * B + b];
          for (int64_t c = 0; c < classes; ++c) {
            row[c] = static_cast<double>(lt_[c * B + b] + dl * wp[c * stride + o]);
          }
        } else {
          row[o] = static_cast<double>(a);
        }
        sum += math::sample_cross_entropy(row.data(), classes, target[idx[b]]);
      }
      res[j] = sum;
    }
  }

  const Sweep s_;
  const int64_t chain_end_;
  const Op* out_;  // the output Linear in s_.prog, or null (the chain's outputs are the logits)
  bool chain_has_batch_norm_ = false;
  const int64_t C_, hw_, classes_;
  const T* x_;  // the caches' data (z_ is written through s_.z by moves)
  const T* z_;
  std::vector<double> pool_m_, pool_q_;  // [N][C]: moments of Z_d over a conv sweep's pool
  std::vector<double> bm_, bq_, cm_, cq_;  // moments: current [C][B], candidates' [K][B]
  std::vector<T> fresh_, at_, dt_, lt_, ly_, aux_, del_, ce_;
  bool lazy_ = false;  // z[:, o] recomputed per minibatch and refreshed per neuron
  bool pool_rest_ = false;          // pool_rest_losses
  int64_t rest_o_ = -1;             // the neuron rest_ holds
  std::vector<T> rest_;             // [N]: log-sum-exp of the logits but rest_o_
  std::vector<T> rest_b_;           // [B]: rest_ of the minibatch
};

}  // namespace

std::unique_ptr<Head> make_cpu_head(const Sweep& s) {
  const std::vector<Op>& ops = s.prog.ops;
  const int64_t n_ops = static_cast<int64_t>(ops.size());
  const int64_t end = s.prog.next < 0 ? n_ops : s.prog.next;
  if (s.prog.next >= 0 && (s.prog.next != n_ops - 1 || ops[s.prog.next].kind != OpKind::Linear)) {
    return nullptr;
  }
  if (!layer_contiguous(s) || !s.target.defined() || s.classes < 2) {
    return nullptr;
  }
  int64_t spatial = s.ho * s.wo;
  for (int64_t i = 1; i < end; ++i) {
    const Op& op = ops[i];
    switch (op.kind) {
      case OpKind::BatchNorm:
        for (int j = 0; j < 4; ++j) {
          if (op.t[j].defined() && !op.t[j].is_contiguous()) {
            return nullptr;
          }
        }
        break;
      case OpKind::GlobalAvgPool:
        spatial = 1;
        break;
      case OpKind::ReLU:
      case OpKind::Flatten:
        if (spatial != 1) {
          return nullptr;
        }
        break;
      default:
        return nullptr;
    }
  }
  if (spatial != 1) {
    return nullptr;
  }
  const Op* out = s.prog.next >= 0 ? &ops[s.prog.next] : nullptr;
  if (out != nullptr && (!out->t[0].is_contiguous() || out->t[0].size(1) != s.cout ||
                         (out->t[1].defined() && !out->t[1].is_contiguous()))) {
    return nullptr;
  }
  if (out == nullptr && s.classes != s.cout) {
    return nullptr;
  }
  std::unique_ptr<Head> head;
  AT_DISPATCH_FLOATING_TYPES(s.param.scalar_type(), "fused head", [&] {
    head = std::make_unique<HeadCpu<scalar_t>>(s, end);
  });
  return head;
}

}  // namespace fused
}  // namespace rso
