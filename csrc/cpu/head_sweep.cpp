// The CPU logits head's sweep loop (head_impl.h): the weights of a fused_sweep call in order
// (evaluate, choose, write), and the state it keeps exact between weights: Z_d and, in a conv
// sweep, the moments of every pool sample and channel; in a lazy sweep, channel o recomputed
// from X_d once neuron o is done.
#include "head_impl.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../common/math.h"
#include "clones.h"
#include "fused_steps.h"
#include "program_passes.h"

namespace rso {
namespace fused {
namespace {

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

// dst[0..n) = src[0..n): a memmove call per run of values costs more than the copy where the
// runs are one value long (a linear layer's X_d and Z_d, whose planes are 1 x 1)
template <typename T>
inline void copy_run(const T* src, int64_t n, T* dst) {
  if (n == 1) {
    *dst = *src;
  } else {
    std::copy(src, src + n, dst);
  }
}

// z[0..n) += d * x[0..n), each value rounded as math::add_product rounds it
template <typename T>
RSO_CPU_CLONES void add_scaled(T* __restrict z, T d, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    z[i] = math::add_product(z[i], d, x[i]);
  }
}

}  // namespace

template <typename T>
void HeadCpu<T>::sweep(Backend::SweepCall& call, int64_t k0, const at::Tensor& vals,
                       const at::Tensor& idx) {
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
  // Moves of a neuron's weights update a contiguous copy of Z_d[:, o] (load_column) read
  // from X_d transposed, instead of planes strided through both caches; the transpose
  // costs about what a neuron's strided moves do, so calls of fewer weights skip it.
  col_o_ = -1;
  x_cols_.clear();
  const int64_t fan_in = s_.cin * s_.kh * s_.kw;
  if ((pool_rest_ || s_.conv) && !lazy_ && s_.kind == UnitKind::Weight && m >= fan_in) {
    const int64_t N = s_.x.size(0), cin = s_.cin, plane = s_.h * s_.w;
    x_cols_.resize(static_cast<size_t>(cin * N * plane));
    // a copy is a fraction of an operation: a linear layer's few columns stay on this thread
    at::parallel_for(0, cin, cpu::grain_for(N * plane / 8), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t n = 0; n < N; ++n) {
          copy_run(x_ + (n * cin + c) * plane, plane, x_cols_.data() + (c * N + n) * plane);
        }
      }
    });
  }
  const bool columns = (pool_rest_ || s_.conv) && !lazy_ &&
                       (s_.kind == UnitKind::Bias || !x_cols_.empty());
  const T* v = vals.const_data_ptr<T>();
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  double* losses = call.losses.mutable_data_ptr<double>();
  int64_t* chosen = call.chosen.mutable_data_ptr<int64_t>();
  T* param = s_.param.mutable_data_ptr<T>();
  for (int64_t i = 0; i < m; ++i) {
    const int64_t k = k0 + i;
    const Site st = site_of(s_, k);
    if (columns && col_o_ != st.o) {
      load_column(st.o);
    }
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
    const bool neuron_ends = j < 0 || i == m - 1 || site_of(s_, k + 1).o != st.o;
    if (lazy_ && neuron_ends) {
      refresh(st.o);
    }
    if (col_o_ >= 0 && neuron_ends) {
      store_column();
    }
    if (j < 0) {
      return;
    }
  }
}

template <typename T>
void HeadCpu<T>::load_column(int64_t o) {
  const int64_t N = s_.x.size(0);
  col_.resize(static_cast<size_t>(N * hw_));
  for (int64_t n = 0; n < N; ++n) {
    copy_run(z_ + (n * C_ + o) * hw_, hw_, col_.data() + n * hw_);
  }
  col_o_ = o;
}

template <typename T>
void HeadCpu<T>::store_column() {
  T* z = s_.z.mutable_data_ptr<T>();
  const int64_t N = s_.x.size(0);
  for (int64_t n = 0; n < N; ++n) {
    copy_run(col_.data() + n * hw_, hw_, z + (n * C_ + col_o_) * hw_);
  }
  col_o_ = -1;
}

template <typename T>
void HeadCpu<T>::move(const Site& st, T d) {
  // while the neuron's column is out (load_column), the move updates it, reading X_d
  // transposed where a weight's move reads an input
  if (!s_.conv && s_.kind == UnitKind::Weight && col_o_ == st.o && !x_cols_.empty()) {
    // a linear layer's column and input feature are both contiguous: one vector loop
    if (d != T(0)) {
      const int64_t N = s_.x.size(0);
      add_scaled(col_.data(), d, x_cols_.data() + st.c * N, N);
    }
    return;
  }
  MoveRows<T> rows = cache_rows<T>(s_, st);
  if (col_o_ == st.o) {
    rows.z = col_.data();
    rows.z_step = hw_;
    if (!x_cols_.empty()) {
      const int64_t plane = s_.h * s_.w;
      rows.x = x_cols_.data() + st.c * s_.x.size(0) * plane;
      rows.x_step = plane;
    }
  }
  apply_move_cpu<T>(s_, st, d, rows, [&](int64_t n, const T* zrow) {
    if (!pool_m_.empty()) {
      row_moments(zrow, hw_, pool_m_[n * C_ + st.o], pool_q_[n * C_ + st.o]);
    }
  });
}

template <typename T>
void HeadCpu<T>::recompute(int64_t o, const int64_t* rows, int64_t n, T* out,
                           int64_t stride) const {
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

template <typename T>
void HeadCpu<T>::refresh(int64_t o) {
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

template <typename T>
void HeadCpu<T>::build_pool_moments() {
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

// make_cpu_head's dtypes
template void HeadCpu<float>::sweep(Backend::SweepCall&, int64_t, const at::Tensor&,
                                    const at::Tensor&);
template void HeadCpu<float>::move(const Site&, float);
template void HeadCpu<float>::recompute(int64_t, const int64_t*, int64_t, float*, int64_t) const;
template void HeadCpu<float>::refresh(int64_t);
template void HeadCpu<float>::build_pool_moments();
template void HeadCpu<float>::store_column();
template void HeadCpu<float>::load_column(int64_t);
template void HeadCpu<double>::sweep(Backend::SweepCall&, int64_t, const at::Tensor&,
                                     const at::Tensor&);
template void HeadCpu<double>::move(const Site&, double);
template void HeadCpu<double>::recompute(int64_t, const int64_t*, int64_t, double*, int64_t) const;
template void HeadCpu<double>::refresh(int64_t);
template void HeadCpu<double>::build_pool_moments();
template void HeadCpu<double>::store_column();
template void HeadCpu<double>::load_column(int64_t);

}  // namespace fused
}  // namespace rso
