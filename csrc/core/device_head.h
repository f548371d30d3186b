// The device logits head: the shorter evaluation of a head program (head_chain_end) in a few
// kernels per weight, with no ATen call between them, for the CUDA backend
// (csrc/cuda/fused_backend.cpp) and, under the device-generic test switch, for CPU tensors
// (csrc/cpu/device_head_loops.cpp), so that the CPU tests run its orchestration and formulas.
//
// Per weight: the moments of the C current channels and of the K candidates' channel o over
// the minibatch (math::head_row_moments), the chain's ops on them (BatchNorm with per-row
// batch statistics from deterministic row sums, global pooling, ReLU), then every sample's
// loss from the output Linear with channel o taken from the candidate (math::head_sample_loss)
// and the K sums. The formulas are csrc/common/head_math.h; `Kernels` runs them on a device:
//
//   struct Kernels {
//     template <typename T> static void moments(const math::HeadGeom&, const T* z, const T* x,
//         const T* vals, const T* entry, const int64_t* idx, double* m, double* q);
//     static void row_sums(const math::HeadGeom&, const double* a, int64_t rows, double* out);
//     template <typename T> static void batch_norm(const math::HeadGeom&,
//         const math::HeadBatchNorm<T>&, double* m, double* q);
//     static void one_number(const math::HeadGeom&, bool relu, double* m, double* q);
//     template <typename T> static void losses(const math::HeadGeom&, const T* w_out,
//         const T* b_out, const double* m, const int64_t* target, const int64_t* idx,
//         double* per);
//   };
//
// (every array [R = C + K][B] or [K][B] of doubles on the caches' device; row_sums sums the
// rows of `a` [rows][B] into out [rows] in math::head_chunk_sum's order). The sweep keeps Z_d
// exact with the backend's own step (a move per accepted weight: no lazy channel).
#pragma once

#include <ATen/ATen.h>

#include <memory>

#include "../common/head_math.h"
#include "fused.h"

namespace rso {
namespace fused {

// The first op after the channel-local chain of a head program (the output Linear, or the
// op count when the chain's outputs are the logits), or -1 when `s` is not one: the swept
// conv/linear layer, then BatchNorm (batch or fixed statistics), global average pooling, and
// ReLU / Flatten once a channel is one number per sample, then at most one Linear giving the
// logits; contiguous tensors of the parameter's dtype and sizes, a target and 2+ classes.
// Defined in device_head.cpp.
int64_t head_chain_end(const Sweep& s);

template <typename T, typename Kernels>
class DeviceHead final : public Head {
 public:
  DeviceHead(const Sweep& s, int64_t chain_end, const Backend& be)
      : s_(s), chain_end_(chain_end), be_(be) {
    s_.lazy_z = false;  // the backend's step moves Z_d with every accepted weight
    const int64_t n_ops = static_cast<int64_t>(s_.prog.ops.size());
    out_ = chain_end < n_ops ? &s_.prog.ops[chain_end] : nullptr;
  }

  at::Tensor losses(int64_t k, const at::Tensor& vals, const at::Tensor& idx) override {
    const int64_t K = vals.numel();
    const int64_t B = idx.numel();
    const math::HeadGeom g = geom(site_of(s_, k), K, B);
    const int64_t R = g.C + K;
    const at::TensorOptions f64 = s_.z.options().dtype(at::kDouble);
    at::Tensor mq = at::empty({2, R, B}, f64);
    double* m = mq.mutable_data_ptr<double>();
    double* q = m + R * B;
    const T* v = vals.const_data_ptr<T>();
    Kernels::moments(g, s_.z.const_data_ptr<T>(), s_.x.const_data_ptr<T>(), v,
                     s_.param.const_data_ptr<T>() + k, idx.const_data_ptr<int64_t>(), m, q);
    at::Tensor sums;
    for (int64_t i = 1; i < chain_end_; ++i) {
      const Op& op = s_.prog.ops[i];
      if (op.kind == OpKind::BatchNorm) {
        math::HeadBatchNorm<T> bn{op.t[0].const_data_ptr<T>(), op.t[1].const_data_ptr<T>(),
                                  nullptr, nullptr, nullptr, nullptr, op.eps, 0, v};
        if (op.p[0] != 0) {
          if (!sums.defined()) {
            sums = at::empty({2, R}, f64);
          }
          bn.sum_m = sums.mutable_data_ptr<double>();
          bn.sum_q = bn.sum_m + R;
          Kernels::row_sums(g, m, R, sums.mutable_data_ptr<double>());
          Kernels::row_sums(g, q, R, sums.mutable_data_ptr<double>() + R);
        } else {
          bn.running_mean = op.t[2].const_data_ptr<T>();
          bn.running_var = op.t[3].const_data_ptr<T>();
        }
        if (i == s_.unit_op && (s_.kind == UnitKind::Gamma || s_.kind == UnitKind::Beta)) {
          bn.swept = s_.kind == UnitKind::Gamma ? 1 : 2;
        }
        Kernels::batch_norm(g, bn, m, q);
      } else if (op.kind == OpKind::ReLU || op.kind == OpKind::GlobalAvgPool) {
        Kernels::one_number(g, op.kind == OpKind::ReLU, m, q);
      }  // Flatten of one number per channel: nothing
    }
    at::Tensor per = at::empty({K, B}, f64);
    Kernels::losses(g, out_ != nullptr ? out_->t[0].const_data_ptr<T>() : nullptr,
                    out_ != nullptr && out_->t[1].defined() ? out_->t[1].const_data_ptr<T>()
                                                            : nullptr,
                    m, s_.target.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(),
                    per.mutable_data_ptr<double>());
    at::Tensor res = at::empty({K}, f64);
    Kernels::row_sums(g, per.const_data_ptr<double>(), K, res.mutable_data_ptr<double>());
    return res;
  }

  void sweep(Backend::SweepCall& call, int64_t k0, const at::Tensor& vals,
             const at::Tensor& idx) override {
    for (int64_t i = 0; i < vals.size(0); ++i) {
      const at::Tensor row = vals[i];
      const at::Tensor l = losses(k0 + i, row, idx[i]);
      if (!be_.step(s_, call, i, k0 + i, l, row)) {
        break;
      }
    }
  }

 private:
  math::HeadGeom geom(const Site& st, int64_t K, int64_t B) const {
    math::HeadGeom g;
    g.cin = s_.cin;
    g.h = s_.h;
    g.w = s_.w;
    g.C = s_.cout;
    g.ho = s_.ho;
    g.wo = s_.wo;
    g.sh = s_.sh;
    g.sw = s_.sw;
    g.ph = s_.ph;
    g.pw = s_.pw;
    g.o = st.o;
    g.c = st.c;
    g.ky = st.ky;
    g.kx = st.kx;
    if (s_.kind == UnitKind::Weight) {
      g.move = s_.conv ? math::kHeadConvWeight : math::kHeadLinearWeight;
    } else {
      g.move = s_.kind == UnitKind::Bias ? math::kHeadBias : math::kHeadNone;
    }
    g.K = K;
    g.B = B;
    g.classes = s_.classes;
    return g;
  }

  Sweep s_;
  const int64_t chain_end_;
  const Backend& be_;
  const Op* out_;  // the output Linear in s_.prog, or null (the chain's outputs are the logits)
};

// The device head of `s` over `Kernels` for the parameter's dtype (float32 or float64), or
// null when `s` is not a head program or a reduce group is set (the statistics and losses of
// a shard are the generic evaluation's to add across ranks).
template <typename Kernels>
std::unique_ptr<Head> make_device_head(const Sweep& s, const Backend& be) {
  if (!reduce_group().empty()) {
    return nullptr;
  }
  const int64_t end = head_chain_end(s);
  if (end < 0) {
    return nullptr;
  }
  if (s.param.scalar_type() == at::kFloat) {
    return std::make_unique<DeviceHead<float, Kernels>>(s, end, be);
  }
  if (s.param.scalar_type() == at::kDouble) {
    return std::make_unique<DeviceHead<double, Kernels>>(s, end, be);
  }
  return nullptr;
}

}  // namespace fused
}  // namespace rso
