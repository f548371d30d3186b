// The K losses of one weight on the CPU logits head (head_impl.h): the current logits and the
// candidates' channel o, from the moment chain (head_moments.cpp) or, for a linear layer
// without BatchNorm, straight from Z_d; the losses from them through the vectorised loss loops
// (head_loss_loops.h), or math.h's exact cross-entropy where a value is not finite. The
// logits layer on a small pool takes the other logits' log-sum-exp kept per neuron.
#include "head_impl.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/math.h"
#include "clones.h"
#include "head_loss_loops.h"
#include "program_passes.h"

namespace rso {
namespace fused {
namespace {

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

}  // namespace

template <typename T>
at::Tensor HeadCpu<T>::losses(int64_t k, const at::Tensor& vals, const at::Tensor& idx) {
  at::Tensor out = at::empty({vals.numel()}, at::TensorOptions().dtype(at::kDouble));
  evaluate(k, vals.const_data_ptr<T>(), vals.numel(), idx.const_data_ptr<int64_t>(),
           idx.numel(), out.mutable_data_ptr<double>());
  return out;
}

template <typename T>
void HeadCpu<T>::output_logits(int64_t B) {
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

template <typename T>
void HeadCpu<T>::layer_logits(const Site& st, const double* d, int64_t K, const int64_t* idx,
                              int64_t B) {
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

template <typename T>
bool HeadCpu<T>::pool_rest_losses(const Site& st, const double* d, int64_t K, const int64_t* idx,
                                  int64_t B, double* res) {
  const int64_t o = st.o, N = s_.x.size(0), C = C_;
  if (rest_o_ != o) {
    rest_.resize(static_cast<size_t>(N));
    constexpr int64_t kBlock = 256;
    // one block's exps are a few thousand operations; a pool of a few thousand samples stays
    // on this thread (waking the others costs about what they would save)
    at::parallel_for(0, (N + kBlock - 1) / kBlock, cpu::grain_for(kBlock * C / 8),
                     [&](int64_t i0, int64_t i1) {
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
  const T* zo = col_o_ == o ? col_.data() : nullptr;
  const int64_t* target = s_.target.const_data_ptr<int64_t>();
  ly_.resize(static_cast<size_t>(B));
  aux_.resize(static_cast<size_t>(B));
  rest_b_.resize(static_cast<size_t>(B));
  dt_.resize(static_cast<size_t>(K * B));
  at_.resize(static_cast<size_t>(B));   // logit o now
  // the input the entry multiplies, per sample (1 for a bias: at + dk * 1 is at + dk exactly)
  xin_.resize(static_cast<size_t>(B));
  const bool weight = s_.kind == UnitKind::Weight;
  const T* xc = x_cols_.empty() ? x_ + st.c : x_cols_.data() + st.c * N;
  const int64_t xstep = x_cols_.empty() ? s_.cin : 1;
  {  // raw pointers: through the vectors the compiler reloads every base after each store
    const T* __restrict rest = rest_.data();
    const T* __restrict fresh = fresh_.data();
    const T* __restrict z = z_;
    T* __restrict rest_b = rest_b_.data();
    T* __restrict at = at_.data();
    T* __restrict ly = ly_.data();
    T* __restrict aux = aux_.data();
    T* __restrict xin = xin_.data();
    const bool lazy = lazy_;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = idx[b], y = target[n];
      rest_b[b] = rest[n];
      at[b] = lazy ? fresh[b] : (zo != nullptr ? zo[n] : z[n * C + o]);
      ly[b] = y == o ? T(0) : z[n * C + y];
      aux[b] = y == o ? T(1) : T(0);
      xin[b] = weight ? xc[n * xstep] : T(1);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T dk = static_cast<T>(d[k]);
    T* out = dt_.data() + k * B;
    for (int64_t b = 0; b < B; ++b) {
      out[b] = math::add_product(at_[b], dk, xin_[b]);
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
    res[k] = sum_as_double(ce_.data() + k * B, B);
  }
  return true;
}

template <typename T>
void HeadCpu<T>::evaluate(int64_t k, const T* vals, int64_t K, const int64_t* idx, int64_t B,
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
  if (col_o_ >= 0 && !s_.conv) {  // the linear paths below read Z_d: give it the column back
    store_column();
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
    res[j] = sum_as_double(ce_.data() + j * B, B);
  }
}

template <typename T>
void HeadCpu<T>::exact_losses(int64_t o, const int64_t* idx, int64_t K, int64_t B,
                              double* res) const {
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

// make_cpu_head's dtypes
template at::Tensor HeadCpu<float>::losses(int64_t, const at::Tensor&, const at::Tensor&);
template void HeadCpu<float>::output_logits(int64_t);
template void HeadCpu<float>::layer_logits(const Site&, const double*, int64_t, const int64_t*,
                                           int64_t);
template bool HeadCpu<float>::pool_rest_losses(const Site&, const double*, int64_t, const int64_t*,
                                               int64_t, double*);
template void HeadCpu<float>::evaluate(int64_t, const float*, int64_t, const int64_t*, int64_t,
                                       double*);
template void HeadCpu<float>::exact_losses(int64_t, const int64_t*, int64_t, int64_t,
                                           double*) const;
template at::Tensor HeadCpu<double>::losses(int64_t, const at::Tensor&, const at::Tensor&);
template void HeadCpu<double>::output_logits(int64_t);
template void HeadCpu<double>::layer_logits(const Site&, const double*, int64_t, const int64_t*,
                                            int64_t);
template bool HeadCpu<double>::pool_rest_losses(const Site&, const double*, int64_t, const int64_t*,
                                                int64_t, double*);
template void HeadCpu<double>::evaluate(int64_t, const double*, int64_t, const int64_t*, int64_t,
                                        double*);
template void HeadCpu<double>::exact_losses(int64_t, const int64_t*, int64_t, int64_t,
                                            double*) const;

}  // namespace fused
}  // namespace rso
