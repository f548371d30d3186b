// The fused candidate evaluation, shared by the CPU (csrc/cpu/fused_backend.cpp) and CUDA
// (csrc/cuda/fused_backend.cpp) kernels of rso_ext::fused_candidate_losses / fused_sweep /
// fused_set_weight (schemas in csrc/ops.cpp; docs/design.md §2).
//
// One device-generic implementation: argument checks, the program passes (ATen, which run on
// any device) and the sweep loop live in fused.cpp; a `Backend` supplies the few steps that
// are hand-written per device: the perturbed channel of the K candidates, the Z_d update,
// the O(B) logits-layer losses, the loss reduction, and choose-and-update. On CUDA none of
// them synchronises with the host: the only read-backs are the argument checks, once per call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <memory>
#include <optional>
#include <tuple>

#include "program.h"

namespace rso {
namespace fused {

enum class UnitKind : int64_t { Weight = 0, Bias = 1, Gamma = 2, Beta = 3 };

// One call's view of the sweep: the caches, the swept parameter and the layer geometry.
struct Sweep {
  at::Tensor x, z, param, target;
  Program prog;
  UnitKind kind;
  int64_t unit_op;
  bool conv;                   // the swept layer is a Conv2d (else Linear)
  int64_t cin, h, w;           // input channels (features for Linear) and spatial size
  int64_t cout, ho, wo;        // output channels and spatial size
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0;
  int64_t classes = 0;         // width of the program's output (the logits)
  // Inside a fused_sweep call over a conv weight unit whose pool is large next to the work of
  // recomputing one channel for a minibatch (lazy_z_pays): a move leaves z[:, o] of the
  // neuron being swept stale (every evaluation recomputes that channel for its minibatch)
  // and the call refreshes the channel over the pool once the neuron is done.
  bool lazy_z = false;
};

// Where flat index k of the unit's parameter sits: output unit o, input channel c, tap.
struct Site {
  int64_t o, c = 0, ky = 0, kx = 0;
};

Site site_of(const Sweep& s, int64_t k);

// Whether the swept layer's weight and bias are contiguous (the hand loops and the logits
// heads index them).
inline bool layer_contiguous(const Sweep& s) {
  const Op& layer = s.prog.ops[0];
  return layer.t[0].is_contiguous() && (!layer.t[1].defined() || layer.t[1].is_contiguous());
}

// Whether a weight sweep of `s` with minibatches of B samples should recompute channel o of
// the swept layer per minibatch and refresh it over the pool once neuron o is done, rather
// than update it over the pool with every move. The generic sweep does so for conv layers;
// the CPU logits head for linear layers too.
bool lazy_z_pays(const Sweep& s, int64_t B);

// Most bytes of per-neuron states (the next layer's output with the neuron's channel left
// out, one per recurring minibatch) a fused_sweep call keeps at once; rso_ext/fused/sweeper.py
// counts them in its memory estimate.
constexpr int64_t kLeftOutBudget = int64_t{1} << 30;

class Head;

// The device-specific steps. Tensors are on the caches' device; `idx` is a contiguous int64
// vector of pool indices already checked by check_batches.
class Backend {
 public:
  virtual ~Backend() = default;

  // Checks a call's minibatch indices `idx` (any shape; `what` names the argument): int64,
  // on the caches' device, inside the pool. The CUDA backend also checks their labels here
  // (its loss kernels do not), with one read-back per call.
  virtual void check_batches(const Sweep& s, const at::Tensor& idx, const char* what) const = 0;

  // out [K*B, 1, ho, wo] (contiguous): channel st.o of z[idx] (or of `base` [B, 1, ho, wo]
  // when defined) as it would be with entry k of the unit's parameter set to vals[j], j < K;
  // the entry's current value is read where it lives (on the device for CUDA).
  virtual void channel_candidates(const Sweep& s, const Site& st, int64_t k,
                                  const at::Tensor& vals, int64_t K, const at::Tensor& idx,
                                  const at::Tensor& base, const at::Tensor& out) const = 0;

  // [B, 1, ho, wo]: channel o of the swept conv layer for the pool samples idx, recomputed
  // from x and the layer's current weights (a lazy sweep's exact channel). Default: ATen.
  virtual at::Tensor fresh_channel(const Sweep& s, int64_t o, const at::Tensor& idx) const;

  // z[:, o] = channel o of the swept conv layer over the whole pool, from its current
  // weights (a lazy sweep's refresh once neuron o is done). Default: ATen, chunked.
  virtual void refresh_channel(const Sweep& s, int64_t o) const;

  // float64 [K]: the summed losses when the swept layer gives the logits and only logit o
  // moves, to cand [K*B] (contiguous).
  virtual at::Tensor logits_layer_losses(const Sweep& s, int64_t o, const at::Tensor& cand,
                                         int64_t K, const at::Tensor& idx) const = 0;

  // float64 [K]: sum_b cross_entropy(logits[k, b], target[b]) for logits [K, B, classes].
  virtual at::Tensor cross_entropy(const Sweep& s, const at::Tensor& logits,
                                   const at::Tensor& target) const = 0;

  // The state of one fused_sweep call. chosen [m] int64 (-2 = not visited) and losses
  // [m, K] float64 (NaN where not visited) on the caches' device; scratch is the
  // backend's own (CUDA: the device-side move and stop flag).
  struct SweepCall {
    at::Tensor chosen, losses;
    at::Tensor delta, stopped;
  };
  virtual void begin_sweep(const Sweep& s, SweepCall& call) const = 0;

  // Step i of the call (weight k) after its losses l [K] were evaluated: record the losses,
  // choose (math::sweep_decision), write entry k and keep z exact. Returns false when the
  // host knows the call must stop here (CPU: candidate 0's loss was not finite); the CUDA
  // backend never stops the host loop: it turns the remaining steps into no-ops on the device.
  virtual bool step(const Sweep& s, SweepCall& call, int64_t i, int64_t k, const at::Tensor& l,
                    const at::Tensor& vals_row) const = 0;

  // Writes entry k of the unit's parameter and keeps z exact.
  virtual void set_weight(const Sweep& s, int64_t k, double value) const = 0;

  // The backend's shorter evaluation of the whole program of `s`, when it has one (the CPU's
  // for programs that reach the logits through one number per channel and sample,
  // csrc/cpu/head_impl.h); null otherwise, and the steps above run the generic evaluation.
  virtual std::unique_ptr<Head> head(const Sweep& s) const { return nullptr; }
};

// A backend's own evaluation of one call's program: the same losses, decisions and writes as
// the generic evaluation over the Backend steps, in fewer passes.
class Head {
 public:
  virtual ~Head() = default;

  // float64 [K]: the losses of entry k set to each of vals [K] on the pool samples idx [B]
  // (contiguous, checked); changes nothing.
  virtual at::Tensor losses(int64_t k, const at::Tensor& vals, const at::Tensor& idx) = 0;

  // The loop of a fused_sweep call over weights k0 .. k0+m-1 (vals [m, K], idx [m, B],
  // contiguous, checked): evaluate, record in `call`, choose (math::sweep_decision), write,
  // keep z exact; stops after a weight whose candidate 0 is not finite.
  virtual void sweep(Backend::SweepCall& call, int64_t k0, const at::Tensor& vals,
                     const at::Tensor& idx) = 0;
};

// channel_candidates of a conv weight from `base` [B, 1, ho, wo], in ATen calls (any device).
void channel_candidates_aten(const Sweep& s, const Site& st, int64_t k, const at::Tensor& vals,
                             int64_t K, const at::Tensor& idx, const at::Tensor& base,
                             const at::Tensor& out);

// The losses of a dag program (program.h: Save/Load/Input/Add; fused_dag.cpp): evaluate()'s
// work once `zo` [K*B, 1, ho, wo] (conv) or [K*B, 1] (linear), channel st.o of the swept
// layer's output per candidate, is known; `fresh_o` is that channel recomputed for the
// minibatch in a lazy sweep (undefined otherwise). ATen calls only, any device.
at::Tensor evaluate_dag(const Backend& be, const Sweep& s, const Site& st, int64_t K,
                        const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& zo,
                        const at::Tensor& fresh_o);

// The three operators over a backend (fused.cpp).
at::Tensor candidate_losses(const Backend& be, const at::Tensor& x, const at::Tensor& z,
                            const at::Tensor& param, const at::Tensor& target,
                            at::IntArrayRef kinds, at::IntArrayRef params,
                            at::ArrayRef<double> eps,
                            const c10::List<std::optional<at::Tensor>>& tensors,
                            int64_t unit_kind, int64_t unit_op, int64_t k,
                            const at::Tensor& values, const at::Tensor& batch);

std::tuple<at::Tensor, at::Tensor> sweep(
    const Backend& be, const at::Tensor& x, at::Tensor& z, at::Tensor& param,
    const at::Tensor& target, at::IntArrayRef kinds, at::IntArrayRef params,
    at::ArrayRef<double> eps, const c10::List<std::optional<at::Tensor>>& tensors,
    int64_t unit_kind, int64_t unit_op, int64_t k0, const at::Tensor& values,
    const at::Tensor& batches);

void set_weight(const Backend& be, const at::Tensor& x, at::Tensor& z, at::Tensor& param,
                at::IntArrayRef kinds, at::IntArrayRef params, at::ArrayRef<double> eps,
                const c10::List<std::optional<at::Tensor>>& tensors, int64_t unit_kind,
                int64_t unit_op, int64_t k, double value);

}  // namespace fused
}  // namespace rso
