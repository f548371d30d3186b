// CUDA backend of the fused candidate evaluation and its operator registration. Only
// compiled when the extension is built WITH_CUDA (setup.py / CMakeLists.txt); the kernels
// are in fused.cu, the device-generic implementation in csrc/core/fused.cpp (fused.h).
//
// No host synchronisation per weight: the entry's value, the losses, the decision, the
// weight write and the Z_d update stay on the device, in the order of the current stream.
// The only read-back of a call is check_batches (the indices and their labels, validated
// once for the whole call); a non-finite loss of the current weights sets a device flag
// that turns the remaining steps of the call into no-ops (chosen -1 then -2, as on CPU).
#include "../core/fused.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <memory>
#include <vector>

#include "../core/cross_entropy.h"
#include "../core/device_head.h"
#include "kernels.h"

namespace rso {
namespace fused {
namespace {

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "fused: ", what, " = ", v,
              " is too large for the CUDA kernel (max ", std::numeric_limits<int>::max(), ")");
  return static_cast<int>(v);
}

cuda::ChannelSite channel_site(const Sweep& s, const Site& st) {
  cuda::ChannelSite c;
  c.n = s.x.size(0);
  c.cin = s.cin;
  c.h = s.h;
  c.w = s.w;
  c.cout = s.cout;
  c.ho = s.ho;
  c.wo = s.wo;
  c.sh = s.sh;
  c.sw = s.sw;
  c.ph = s.ph;
  c.pw = s.pw;
  c.o = st.o;
  c.c = st.c;
  c.ky = st.ky;
  c.kx = st.kx;
  if (s.kind == UnitKind::Weight) {
    c.move = s.conv ? cuda::ChannelMove::kConvWeight : cuda::ChannelMove::kLinearWeight;
  } else if (s.kind == UnitKind::Bias) {
    c.move = cuda::ChannelMove::kBias;
  } else {
    c.move = cuda::ChannelMove::kNone;
  }
  return c;
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  if (t == at::kFloat) {
    f(float{});
  } else {
    TORCH_CHECK(t == at::kDouble, "fused: CUDA kernels take float32 or float64, got ", t);
    f(double{});
  }
}

// The device head's kernels (csrc/core/device_head.h) on the current stream.
struct CudaHeadKernels {
  template <typename T>
  static void moments(const math::HeadGeom& g, const T* z, const T* x, const T* vals,
                      const T* entry, const int64_t* idx, double* m, double* q) {
    cuda::launch_head_moments(g, z, x, vals, entry, idx, m, q, at::cuda::getCurrentCUDAStream());
  }

  static void row_sums(const math::HeadGeom& g, const double* a, int64_t rows, double* out) {
    const at::Tensor scratch =
        at::empty({cuda::head_row_sums_scratch(rows, g.B)},
                  at::TensorOptions().dtype(at::kDouble).device(at::kCUDA, c10::cuda::current_device()));
    cuda::launch_head_row_sums(a, rows, g.B, out, scratch.mutable_data_ptr<double>(),
                               at::cuda::getCurrentCUDAStream());
  }

  template <typename T>
  static void batch_norm(const math::HeadGeom& g, const math::HeadBatchNorm<T>& bn, double* m,
                         double* q) {
    cuda::launch_head_batch_norm(g, bn, m, q, at::cuda::getCurrentCUDAStream());
  }

  static void one_number(const math::HeadGeom& g, bool relu, double* m, double* q) {
    cuda::launch_head_one_number((g.C + g.K) * g.B, relu, m, q, at::cuda::getCurrentCUDAStream());
  }

  template <typename T>
  static void losses(const math::HeadGeom& g, const T* w_out, const T* b_out, const double* m,
                     const int64_t* target, const int64_t* idx, double* per) {
    cuda::launch_head_losses(g, w_out, b_out, m, target, idx, per,
                             at::cuda::getCurrentCUDAStream());
  }
};

class CudaBackend final : public Backend {
 public:
  void check_batches(const Sweep& s, const at::Tensor& idx, const char* what) const override {
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.device() == s.x.device(), "fused: ", what,
                " must be int64 indices on the caches' device, got ", idx.scalar_type(), " on ",
                idx.device());
    if (idx.numel() == 0) {
      return;
    }
    const int64_t N = s.x.size(0);
    const at::Tensor flat = idx.reshape({-1});
    const auto [lo, hi] = at::aminmax(flat);
    std::vector<at::Tensor> parts = {lo.reshape({1}), hi.reshape({1})};
    const bool labels = s.target.defined() && N > 0;
    if (labels) {
      // The labels the loss kernels will read (clamped indices: an index outside the pool
      // is reported below and never reaches a kernel).
      const at::Tensor y = s.target.index_select(0, flat.clamp(0, N - 1));
      const at::Tensor bad = at::logical_or(y < 0, y >= s.classes).to(at::kInt);
      const at::Tensor first = bad.argmax().reshape({1});  // first invalid position, if any
      parts.push_back(bad.max().to(at::kLong).reshape({1}));
      parts.push_back(first);
      parts.push_back(y.index_select(0, first));
    }
    const at::Tensor summary = at::cat(parts).to(at::kCPU);  // the call's one read-back
    const int64_t* v = summary.const_data_ptr<int64_t>();
    TORCH_CHECK(v[0] >= 0 && v[1] < N, "fused: ", what, " holds sample index ",
                v[0] < 0 ? v[0] : v[1], " outside the pool [0, ", N, ")");
    if (labels && v[2] != 0) {
      TORCH_CHECK(false, invalid_target_message(v[3] % idx.size(-1), v[4], s.classes));
    }
  }

  void channel_candidates(const Sweep& s, const Site& st, int64_t k, const at::Tensor& vals,
                          int64_t K, const at::Tensor& idx, const at::Tensor& base,
                          const at::Tensor& out) const override {
    if (base.defined()) {
      channel_candidates_aten(s, st, k, vals, K, idx, base, out);
      return;
    }
    const cuda::ChannelSite site = channel_site(s, st);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_float(s.param.scalar_type(), [&](auto zero) {
      using T = decltype(zero);
      cuda::launch_channel_candidates(site, s.z.const_data_ptr<T>(), s.x.const_data_ptr<T>(),
                                      vals.const_data_ptr<T>(), K,
                                      s.param.const_data_ptr<T>() + k,
                                      idx.const_data_ptr<int64_t>(), idx.numel(),
                                      out.mutable_data_ptr<T>(), stream);
    });
  }

  at::Tensor logits_layer_losses(const Sweep& s, int64_t o, const at::Tensor& cand, int64_t K,
                                 const at::Tensor& idx) const override {
    at::Tensor out = at::empty({K}, s.z.options().dtype(at::kDouble));
    const int k_int = checked_int(K, "K (candidates)");
    const int b_int = checked_int(idx.numel(), "B (minibatch size)");
    at::Tensor scratch =
        at::empty({cuda::candidate_cross_entropy_scratch(k_int, b_int)}, out.options());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_float(s.param.scalar_type(), [&](auto zero) {
      using T = decltype(zero);
      cuda::launch_logits_layer_losses(s.z.const_data_ptr<T>(), s.target.const_data_ptr<int64_t>(),
                                       s.cout, o, cand.const_data_ptr<T>(), k_int,
                                       idx.const_data_ptr<int64_t>(), b_int,
                                       out.mutable_data_ptr<double>(),
                                       scratch.mutable_data_ptr<double>(), stream);
    });
    return out;
  }

  at::Tensor cross_entropy(const Sweep&, const at::Tensor& logits_in,
                           const at::Tensor& target_in) const override {
    // The labels were checked against s.classes by check_batches (evaluate checks that
    // this is the width the program produced), so the kernel needs no check of its own.
    const at::Tensor logits = logits_in.contiguous();
    const at::Tensor target = target_in.contiguous();
    const int K = checked_int(logits.size(0), "K (candidates)");
    const int B = checked_int(logits.size(1), "B (minibatch size)");
    const int C = checked_int(logits.size(2), "C (classes)");
    at::Tensor out = at::empty({K}, logits.options().dtype(at::kDouble));
    at::Tensor scratch = at::empty({cuda::candidate_cross_entropy_scratch(K, B)}, out.options());
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (logits.scalar_type() == at::kFloat) {
      cuda::launch_candidate_cross_entropy_f32(logits.const_data_ptr<float>(),
                                               target.const_data_ptr<int64_t>(), K, B, C,
                                               out.mutable_data_ptr<double>(),
                                               scratch.mutable_data_ptr<double>(), stream);
    } else {
      TORCH_CHECK(logits.scalar_type() == at::kDouble, "fused: logits must be float32 or "
                  "float64, got ", logits.scalar_type());
      cuda::launch_candidate_cross_entropy_f64(logits.const_data_ptr<double>(),
                                               target.const_data_ptr<int64_t>(), K, B, C,
                                               out.mutable_data_ptr<double>(),
                                               scratch.mutable_data_ptr<double>(), stream);
    }
    return out;
  }

  void begin_sweep(const Sweep& s, SweepCall& call) const override {
    call.delta = at::zeros({1}, s.param.options());
    call.stopped = at::zeros({1}, s.param.options().dtype(at::kInt));
  }

  bool step(const Sweep& s, SweepCall& call, int64_t i, int64_t k, const at::Tensor& l,
            const at::Tensor& vals_row) const override {
    const int64_t K = l.numel();
    TORCH_CHECK(l.is_contiguous() && l.scalar_type() == at::kDouble && vals_row.is_contiguous(),
                "fused: internal: losses and candidate values must be contiguous");
    const cuda::ChannelSite site = channel_site(s, site_of(s, k));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    dispatch_float(s.param.scalar_type(), [&](auto zero) {
      using T = decltype(zero);
      T* delta = call.delta.mutable_data_ptr<T>();
      cuda::launch_choose_and_write(l.const_data_ptr<double>(), K, vals_row.const_data_ptr<T>(),
                                    s.param.mutable_data_ptr<T>() + k, delta,
                                    call.chosen.mutable_data_ptr<int64_t>() + i,
                                    call.losses.mutable_data_ptr<double>() + i * K,
                                    call.stopped.mutable_data_ptr<int>(), stream);
      if (!s.lazy_z) {  // else the sweep refreshes the neuron's channel when it is done
        cuda::launch_move_channel(site, s.z.mutable_data_ptr<T>(), s.x.const_data_ptr<T>(),
                                  delta, stream);
      }
    });
    return true;  // a stop is the device's to enforce (call.stopped)
  }

  std::unique_ptr<Head> head(const Sweep& s) const override {
    return make_device_head<CudaHeadKernels>(s, *this);
  }

  void set_weight(const Sweep& s, int64_t k, double value) const override {
    const cuda::ChannelSite site = channel_site(s, site_of(s, k));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const at::Tensor delta = at::empty({1}, s.param.options());
    dispatch_float(s.param.scalar_type(), [&](auto zero) {
      using T = decltype(zero);
      cuda::launch_set_entry(s.param.mutable_data_ptr<T>() + k, static_cast<T>(value),
                             delta.mutable_data_ptr<T>(), stream);
      cuda::launch_move_channel(site, s.z.mutable_data_ptr<T>(), s.x.const_data_ptr<T>(),
                                delta.const_data_ptr<T>(), stream);
    });
  }
};

const CudaBackend kCuda;

void check_on_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel got x on ", x.device(),
              " (x, z, param, target, the batches and the program's tensors must all be on one "
              "CUDA device)");
}

at::Tensor fused_candidate_losses_cuda(const at::Tensor& x, const at::Tensor& z,
                                       const at::Tensor& param, const at::Tensor& target,
                                       at::IntArrayRef kinds, at::IntArrayRef params,
                                       at::ArrayRef<double> eps,
                                       const c10::List<std::optional<at::Tensor>>& tensors,
                                       int64_t unit_kind, int64_t unit_op, int64_t k,
                                       const at::Tensor& values, const at::Tensor& batch) {
  check_on_cuda(x, "fused_candidate_losses");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return candidate_losses(kCuda, x, z, param, target, kinds, params, eps, tensors, unit_kind,
                          unit_op, k, values, batch);
}

std::tuple<at::Tensor, at::Tensor> fused_sweep_cuda(
    const at::Tensor& x, at::Tensor& z, at::Tensor& param, const at::Tensor& target,
    at::IntArrayRef kinds, at::IntArrayRef params, at::ArrayRef<double> eps,
    const c10::List<std::optional<at::Tensor>>& tensors, int64_t unit_kind, int64_t unit_op,
    int64_t k0, const at::Tensor& values, const at::Tensor& batches) {
  check_on_cuda(x, "fused_sweep");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return sweep(kCuda, x, z, param, target, kinds, params, eps, tensors, unit_kind, unit_op, k0,
               values, batches);
}

void fused_set_weight_cuda(const at::Tensor& x, at::Tensor& z, at::Tensor& param,
                           at::IntArrayRef kinds, at::IntArrayRef params,
                           at::ArrayRef<double> eps,
                           const c10::List<std::optional<at::Tensor>>& tensors,
                           int64_t unit_kind, int64_t unit_op, int64_t k, double value) {
  check_on_cuda(x, "fused_set_weight");
  const c10::cuda::CUDAGuard device_guard(x.device());
  set_weight(kCuda, x, z, param, kinds, params, eps, tensors, unit_kind, unit_op, k, value);
}

}  // namespace

TORCH_LIBRARY_IMPL(rso_ext, CUDA, m) {
  m.impl("fused_candidate_losses", &fused_candidate_losses_cuda);
  m.impl("fused_sweep", &fused_sweep_cuda);
  m.impl("fused_set_weight", &fused_set_weight_cuda);
}

}  // namespace fused
}  // namespace rso
