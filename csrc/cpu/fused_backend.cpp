// CPU backend of the fused candidate evaluation and its operator registration; the
// device-generic implementation is in csrc/core/fused.cpp (fused.h), the CUDA backend in
// csrc/cuda/fused_backend.cpp. Every step is a hand loop over raw pointers on the caches,
// parallel over samples (at::parallel_for).
#include "../core/fused.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/math.h"
#include "../core/cross_entropy.h"
#include "fused_steps.h"
#include "head.h"
#include "program_passes.h"

namespace rso {
namespace fused {
// -- the CPU backend ----------------------------------------------------------------------------
namespace {

// out[k, b, :] = channel o of Z[idx[b]] (or of base[b]) as it would be with the unit's entry
// set to vals[k].
template <typename T>
void channel_candidates_cpu(const Sweep& s, const Site& st, const T* vals, int64_t K, T w,
                            const int64_t* idx, int64_t B, const T* base, T* out) {
  const T* z = s.z.const_data_ptr<T>();
  const T* x = s.x.const_data_ptr<T>();
  const int64_t hwo = s.ho * s.wo;
  const bool moves_weight = s.kind == UnitKind::Weight;
  const bool moves_bias = s.kind == UnitKind::Bias;
  at::parallel_for(0, B, cpu::grain_for(K * hwo), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = idx[b];
      const T* zrow = base != nullptr ? base + b * hwo : z + (n * s.cout + st.o) * hwo;
      for (int64_t k = 0; k < K; ++k) {
        T* dst = out + (k * B + b) * hwo;
        const T d = vals[k] - w;
        if (moves_weight && s.conv) {
          const T* xp = x + (n * s.cin + st.c) * s.h * s.w;
          for (int64_t y = 0; y < s.ho; ++y) {
            const int64_t iy = math::conv_input_coord(y, st.ky, s.sh, s.ph);
            for (int64_t xx = 0; xx < s.wo; ++xx) {
              const int64_t ix = math::conv_input_coord(xx, st.kx, s.sw, s.pw);
              const bool inside = iy >= 0 && iy < s.h && ix >= 0 && ix < s.w;
              dst[y * s.wo + xx] = inside ? math::add_product(zrow[y * s.wo + xx], d, xp[iy * s.w + ix])
                                          : zrow[y * s.wo + xx] + T(0);
            }
          }
        } else if (moves_weight) {
          dst[0] = math::add_product(zrow[0], d, x[n * s.cin + st.c]);
        } else {
          const T add = moves_bias ? d : T(0);
          for (int64_t j = 0; j < hwo; ++j) {
            dst[j] = zrow[j] + add;
          }
        }
      }
    }
  });
}

// The swept layer gives the logits: only logit o moves, so each sample's log-sum-exp
// over the other classes is shared by the K candidates.
template <typename T>
void logits_layer_losses_cpu(const Sweep& s, int64_t o, const T* cand, int64_t K,
                             const int64_t* idx, int64_t B, double* res) {
  const T* z = s.z.const_data_ptr<T>();
  const int64_t* target = s.target.const_data_ptr<int64_t>();
  const int64_t C = s.cout;
  std::vector<double> per(static_cast<size_t>(K * B));
  at::parallel_for(0, B, cpu::grain_for(C * (K + 2) * 8), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = idx[b];
      const T* row = z + n * C;
      const double rest = math::log_sum_exp_except(row, C, o);
      const int64_t y = target[n];
      for (int64_t k = 0; k < K; ++k) {
        per[k * B + b] = math::moved_logit_cross_entropy(row, rest, o, y,
                                                         static_cast<double>(cand[k * B + b]));
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    double sum = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      sum += per[k * B + b];
    }
    res[k] = sum;
  }
}

class CpuBackend final : public Backend {
 public:
  void check_batches(const Sweep& s, const at::Tensor& idx, const char* what) const override {
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.device() == s.x.device(), "fused: ", what,
                " must be int64 indices on the caches' device, got ", idx.scalar_type(), " on ",
                idx.device());
    if (idx.numel() > 0) {
      const at::Tensor c = idx.contiguous();
      const int64_t* p = c.const_data_ptr<int64_t>();
      const auto [lo_it, hi_it] = std::minmax_element(p, p + c.numel());
      const int64_t lo = *lo_it, hi = *hi_it;
      TORCH_CHECK(lo >= 0 && hi < s.x.size(0), "fused: ", what, " holds sample index ",
                  lo < 0 ? lo : hi, " outside the pool [0, ", s.x.size(0), ")");
      if (device_generic_switch() && s.target.defined()) {
        // as the CUDA backend does: its device head's loss kernel does not check the labels
        const at::Tensor labels = s.target.contiguous();
        const int64_t* y = labels.const_data_ptr<int64_t>();
        for (int64_t i = 0; i < c.numel(); ++i) {
          TORCH_CHECK(y[p[i]] >= 0 && y[p[i]] < s.classes,
                      invalid_target_message(i % c.size(-1), y[p[i]], s.classes));
        }
      }
    }
  }

  void channel_candidates(const Sweep& s, const Site& st, int64_t k, const at::Tensor& vals,
                          int64_t K, const at::Tensor& idx, const at::Tensor& base,
                          const at::Tensor& out) const override {
    if (device_generic_paths() && base.defined()) {  // as the CUDA backend does
      channel_candidates_aten(s, st, k, vals, K, idx, base, out);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(s.param.scalar_type(), "fused channel_candidates", [&] {
      channel_candidates_cpu<scalar_t>(
          s, st, vals.const_data_ptr<scalar_t>(), K, s.param.const_data_ptr<scalar_t>()[k],
          idx.const_data_ptr<int64_t>(), idx.numel(),
          base.defined() ? base.const_data_ptr<scalar_t>() : nullptr,
          out.mutable_data_ptr<scalar_t>());
    });
  }

  at::Tensor fresh_channel(const Sweep& s, int64_t o, const at::Tensor& idx) const override {
    if (!layer_contiguous(s) || device_generic_paths()) {
      return Backend::fresh_channel(s, o, idx);
    }
    at::Tensor out = at::empty({idx.numel(), 1, s.ho, s.wo}, s.z.options());
    AT_DISPATCH_FLOATING_TYPES(s.param.scalar_type(), "fused fresh_channel", [&] {
      one_channel_cpu<scalar_t>(s, o, idx.const_data_ptr<int64_t>(), idx.numel(),
                                out.mutable_data_ptr<scalar_t>(), s.ho * s.wo);
    });
    return out;
  }

  void refresh_channel(const Sweep& s, int64_t o) const override {
    if (!layer_contiguous(s) || device_generic_paths()) {
      Backend::refresh_channel(s, o);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(s.param.scalar_type(), "fused refresh_channel", [&] {
      one_channel_cpu<scalar_t>(s, o, nullptr, s.x.size(0),
                                s.z.mutable_data_ptr<scalar_t>() + o * s.ho * s.wo,
                                s.cout * s.ho * s.wo);
    });
  }

  at::Tensor logits_layer_losses(const Sweep& s, int64_t o, const at::Tensor& cand, int64_t K,
                                 const at::Tensor& idx) const override {
    at::Tensor out = at::empty({K}, at::TensorOptions().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(s.param.scalar_type(), "fused logits_layer_losses", [&] {
      logits_layer_losses_cpu<scalar_t>(s, o, cand.const_data_ptr<scalar_t>(), K,
                                        idx.const_data_ptr<int64_t>(), idx.numel(),
                                        out.mutable_data_ptr<double>());
    });
    return out;
  }

  at::Tensor cross_entropy(const Sweep&, const at::Tensor& logits,
                           const at::Tensor& target) const override {
    // Through the dispatcher: the operator checks the labels of every call.
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("rso_ext::candidate_cross_entropy", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    return op.call(logits, target);
  }

  void begin_sweep(const Sweep&, SweepCall&) const override {}

  bool step(const Sweep& s, SweepCall& call, int64_t i, int64_t k, const at::Tensor& l,
            const at::Tensor& vals_row) const override {
    const int64_t K = l.numel();
    const double* lp = l.const_data_ptr<double>();
    std::copy(lp, lp + K, call.losses.mutable_data_ptr<double>() + i * K);
    const int64_t j = math::sweep_decision(lp, K);
    call.chosen.mutable_data_ptr<int64_t>()[i] = j;
    if (j < 0) {
      return false;  // reported by the caller; nothing is written
    }
    AT_DISPATCH_FLOATING_TYPES(s.param.scalar_type(), "fused_sweep", [&] {
      write_entry<scalar_t>(s, k, vals_row.const_data_ptr<scalar_t>()[j]);
    });
    return true;
  }

  std::unique_ptr<Head> head(const Sweep& s) const override {
    if (device_generic_paths()) {
      return device_generic_switch() ? make_device_head_cpu(s, *this) : nullptr;
    }
    return make_cpu_head(s);
  }

  void set_weight(const Sweep& s, int64_t k, double value) const override {
    AT_DISPATCH_FLOATING_TYPES(s.param.scalar_type(), "fused_set_weight", [&] {
      write_entry<scalar_t>(s, k, static_cast<scalar_t>(value));
    });
  }

 private:
  template <typename T>
  static void write_entry(const Sweep& s, int64_t k, T v) {
    T* p = s.param.mutable_data_ptr<T>();
    const T old = p[k];
    p[k] = v;
    if (!s.lazy_z) {
      apply_move_cpu<T>(s, site_of(s, k), static_cast<T>(v - old));
    }
  }
};

const CpuBackend kCpu;

at::Tensor fused_candidate_losses_cpu(const at::Tensor& x, const at::Tensor& z,
                                      const at::Tensor& param, const at::Tensor& target,
                                      at::IntArrayRef kinds, at::IntArrayRef params,
                                      at::ArrayRef<double> eps,
                                      const c10::List<std::optional<at::Tensor>>& tensors,
                                      int64_t unit_kind, int64_t unit_op, int64_t k,
                                      const at::Tensor& values, const at::Tensor& batch) {
  return candidate_losses(kCpu, x, z, param, target, kinds, params, eps, tensors, unit_kind,
                          unit_op, k, values, batch);
}

std::tuple<at::Tensor, at::Tensor> fused_sweep_cpu(
    const at::Tensor& x, at::Tensor& z, at::Tensor& param, const at::Tensor& target,
    at::IntArrayRef kinds, at::IntArrayRef params, at::ArrayRef<double> eps,
    const c10::List<std::optional<at::Tensor>>& tensors, int64_t unit_kind, int64_t unit_op,
    int64_t k0, const at::Tensor& values, const at::Tensor& batches) {
  return sweep(kCpu, x, z, param, target, kinds, params, eps, tensors, unit_kind, unit_op, k0,
               values, batches);
}

void fused_set_weight_cpu(const at::Tensor& x, at::Tensor& z, at::Tensor& param,
                          at::IntArrayRef kinds, at::IntArrayRef params, at::ArrayRef<double> eps,
                          const c10::List<std::optional<at::Tensor>>& tensors, int64_t unit_kind,
                          int64_t unit_op, int64_t k, double value) {
  set_weight(kCpu, x, z, param, kinds, params, eps, tensors, unit_kind, unit_op, k, value);
}

}  // namespace

TORCH_LIBRARY_IMPL(rso_ext, CPU, m) {
  m.impl("fused_candidate_losses", &fused_candidate_losses_cpu);
  m.impl("fused_sweep", &fused_sweep_cpu);
  m.impl("fused_set_weight", &fused_set_weight_cpu);
}

}  // namespace fused
}  // namespace rso
