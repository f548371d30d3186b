// The fused candidate evaluation (schemas in csrc/ops.cpp; docs/design.md §2): the
// device-generic implementation (fused.h); the backends are in csrc/cpu/fused_backend.cpp and
// csrc/cuda/fused_backend.cpp.
//
// For one weight of the swept layer d, every candidate value changes channel o of the
// layer's pre-activation only: Z_d[I, o] + (v_k - w) * shift(X_d[I, c]). The channel-local
// ops after layer d (BatchNorm with per-candidate batch statistics, ReLU, pooling, global
// pooling, Flatten) run on channel o alone; the next conv/linear layer runs once densely on
// the shared state plus one single-channel correction per candidate; only the ops after it
// run densely on K*B samples. When layer d produces the logits, the losses reduce to O(B*C)
// with the other classes' log-sum-exp shared by the candidates.
//
// The caches X_d (layer input) and Z_d (pre-activation) cover the sweep's pool; Z_d is exact
// at the end of every call, the weight-decay steps included: updated per accepted move, or,
// for a conv layer on a pool large next to a minibatch (lazy_z_pays), channel o recomputed
// for each minibatch and refreshed over the pool when neuron o (or the call) ends.
//
// The program passes (program.cpp) run on the caches' device: ATen calls, hand-written loops
// on the CPU (csrc/cpu/program_passes.cpp); the per-weight steps are the Backend's
// (csrc/cpu/fused_backend.cpp; csrc/cuda/fused_backend.cpp + csrc/cuda/fused.cu).
#include "fused.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <unordered_map>
#include <vector>

#include "../common/math.h"
#include "program.h"

namespace rso {
namespace fused {

Site site_of(const Sweep& s, int64_t k) {
  if (s.kind != UnitKind::Weight) {
    return Site{k};
  }
  if (!s.conv) {
    return Site{k / s.cin, k % s.cin};
  }
  const int64_t taps = s.kh * s.kw;
  const int64_t r = k % (s.cin * taps);
  return Site{k / (s.cin * taps), r / taps, (r % taps) / s.kw, r % s.kw};
}

// Whether a weight sweep with minibatches of B samples should leave z[:, o] stale while it
// sweeps neuron o (fused.h): an accepted move (nearly every weight moves: the weight-decay step)
// costs a pass over the pool's channel o, N * ho * wo multiply-adds through memory, while
// recomputing the channel for one minibatch costs B * ho * wo * cin * kh * kw in registers;
// a pass through memory is counted as 4.
bool lazy_z_pays(const Sweep& s, int64_t B) {
  return 4 * s.x.size(0) > B * s.cin * s.kh * s.kw;
}

namespace {

// Number of features per sample after the last op (the logits' width): the per-sample shape
// followed through the program as ATen computes it (floor-mode pooling, no dilation), and
// through the slots and side inputs of a dag program.
int64_t output_width(const Sweep& s) {
  const Program& prog = s.prog;
  if (prog.ops.size() == 1) {
    return s.cout;  // the swept layer gives the logits
  }
  std::vector<int64_t> shape = s.conv ? std::vector<int64_t>{s.cout, s.ho, s.wo}
                                      : std::vector<int64_t>{s.cout};
  std::vector<std::vector<int64_t>> slots(static_cast<size_t>(prog.slots));
  for (size_t i = 1; i < prog.ops.size(); ++i) {
    const Op& op = prog.ops[i];
    switch (op.kind) {
      case OpKind::Conv:
        if (shape.size() == 3) {
          shape = {op.t[0].size(0), (shape[1] + 2 * op.p[2] - op.t[0].size(2)) / op.p[0] + 1,
                   (shape[2] + 2 * op.p[3] - op.t[0].size(3)) / op.p[1] + 1};
        }
        break;
      case OpKind::Linear:
        shape = {op.t[0].size(0)};
        break;
      case OpKind::AvgPool:
      case OpKind::MaxPool:
        if (shape.size() == 3) {
          for (int j = 1; j < 3; ++j) {
            shape[j] = (shape[j] + 2 * op.p[2] - op.p[0]) / op.p[1] + 1;
          }
        }
        break;
      case OpKind::GlobalAvgPool:
        if (shape.size() == 3) {
          shape = {shape[0], 1, 1};
        }
        break;
      case OpKind::Save:
        slots[op.p[0]] = shape;
        break;
      case OpKind::Load:
        shape = slots[op.p[0]];
        break;
      case OpKind::Input:
        shape = std::vector<int64_t>(op.t[0].sizes().begin() + 1, op.t[0].sizes().end());
        break;
      case OpKind::Flatten:
      case OpKind::BatchNorm:
      case OpKind::ReLU:
      case OpKind::Add:
        break;
    }
  }
  int64_t width = 1;
  for (int64_t d : shape) {
    width *= d;
  }
  return width;
}

const at::Tensor& unit_tensor(const Program& prog, UnitKind kind, int64_t unit_op) {
  const Op& op = prog.ops[unit_op];
  return op.t[(kind == UnitKind::Weight || kind == UnitKind::Gamma) ? 0 : 1];
}

Sweep make_sweep(const at::Tensor& x, const at::Tensor& z, const at::Tensor& param,
                 const at::Tensor& target, at::IntArrayRef kinds, at::IntArrayRef params,
                 at::ArrayRef<double> eps, const c10::List<std::optional<at::Tensor>>& tensors,
                 int64_t unit_kind, int64_t unit_op) {
  Sweep s;
  s.prog = parse_program(kinds, params, eps, tensors);
  fold_avg_pools(s.prog);
  TORCH_CHECK(unit_kind >= 0 && unit_kind <= 3,
              "fused: unit_kind must be 0 (weight), 1 (bias), 2 (BatchNorm gamma) or 3 (beta), got ",
              unit_kind);
  s.kind = static_cast<UnitKind>(unit_kind);
  const int64_t n_ops = static_cast<int64_t>(s.prog.ops.size());
  const int64_t chain_end = s.prog.next < 0 ? n_ops : s.prog.next;
  if (s.kind == UnitKind::Weight || s.kind == UnitKind::Bias) {
    TORCH_CHECK(unit_op == 0, "fused: a weight or bias unit belongs to op 0, got unit_op=",
                unit_op);
  } else {
    // (a dag program's chain is followed by evaluate_dag, which checks it reaches unit_op)
    TORCH_CHECK(unit_op >= 1 && unit_op < (s.prog.dag ? n_ops : chain_end) &&
                    s.prog.ops[unit_op].kind == OpKind::BatchNorm,
                "fused: a BatchNorm unit must name a BatchNorm op between the swept layer and "
                "the next conv/linear, got unit_op=", unit_op);
  }
  const at::Tensor& owner = unit_tensor(s.prog, s.kind, unit_op);
  TORCH_CHECK(owner.defined(), "fused: the swept parameter is missing from the program (a "
              "bias unit of a layer without bias?)");
  TORCH_CHECK((param.defined() && param.is_same(owner)) ||
                  (param.data_ptr() == owner.data_ptr() && param.sizes() == owner.sizes()),
              "fused: param must be the program's tensor for this unit (same storage), got shape ",
              param.sizes(), " vs ", owner.sizes());
  TORCH_CHECK(param.is_contiguous(), "fused: param must be contiguous");
  TORCH_CHECK(x.scalar_type() == param.scalar_type() && z.scalar_type() == param.scalar_type() &&
                  (param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble),
              "fused: x, z and param must share one dtype, float32 or float64; got x ",
              x.scalar_type(), ", z ", z.scalar_type(), ", param ", param.scalar_type());
  TORCH_CHECK(x.device() == z.device() && x.device() == param.device(),
              "fused: x, z and param must be on one device, got x on ", x.device(), ", z on ",
              z.device(), ", param on ", param.device());
  TORCH_CHECK(x.is_contiguous() && z.is_contiguous(), "fused: the caches x and z must be contiguous");
  for (size_t i = 0; i < s.prog.ops.size(); ++i) {
    for (int j = 0; j < 4; ++j) {
      const at::Tensor& t = s.prog.ops[i].t[j];
      TORCH_CHECK(!t.defined() || t.device() == x.device(), "fused program: op ", i,
                  " has tensor ", j, " on ", t.device(), " but the caches are on ", x.device());
    }
  }
  const Op& layer = s.prog.ops[0];
  const at::Tensor& W = layer.t[0];
  s.conv = layer.kind == OpKind::Conv;
  s.cout = W.size(0);
  if (s.conv) {
    TORCH_CHECK(x.dim() == 4 && z.dim() == 4,
                "fused: for a Conv2d layer x and z must be 4-D [N, C, H, W], got x ", x.sizes(),
                " and z ", z.sizes());
    s.cin = W.size(1);
    s.kh = W.size(2);
    s.kw = W.size(3);
    s.sh = layer.p[0];
    s.sw = layer.p[1];
    s.ph = layer.p[2];
    s.pw = layer.p[3];
    s.h = x.size(2);
    s.w = x.size(3);
    s.ho = (s.h + 2 * s.ph - s.kh) / s.sh + 1;
    s.wo = (s.w + 2 * s.pw - s.kw) / s.sw + 1;
    TORCH_CHECK(x.size(1) == s.cin, "fused: x has ", x.size(1), " channels but the layer expects ",
                s.cin);
    TORCH_CHECK(z.size(0) == x.size(0) && z.size(1) == s.cout && z.size(2) == s.ho &&
                    z.size(3) == s.wo,
                "fused: z must be the layer's output [", x.size(0), ", ", s.cout, ", ", s.ho, ", ",
                s.wo, "], got ", z.sizes());
  } else {
    TORCH_CHECK(x.dim() == 2 && z.dim() == 2,
                "fused: for a Linear layer x and z must be 2-D [N, features], got x ", x.sizes(),
                " and z ", z.sizes());
    s.cin = W.size(1);
    s.h = s.w = s.ho = s.wo = 1;
    TORCH_CHECK(x.size(1) == s.cin && z.size(0) == x.size(0) && z.size(1) == s.cout,
                "fused: x [N, ", s.cin, "] and z [N, ", s.cout, "] expected, got x ", x.sizes(),
                " and z ", z.sizes());
  }
  if (target.defined()) {
    TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 &&
                    target.size(0) == x.size(0) && target.device() == x.device(),
                "fused: target must be an int64 vector of length N = ", x.size(0),
                " on the caches' device, got ", target.scalar_type(), " ", target.sizes(), " on ",
                target.device());
  }
  s.x = x;
  s.z = z;
  s.param = param;
  s.target = target;
  s.unit_op = unit_op;
  s.classes = output_width(s);
  return s;
}

}  // namespace

void Backend::refresh_channel(const Sweep& s, int64_t o) const {
  const Op& layer = s.prog.ops[0];
  const at::Tensor w = layer.t[0].narrow(0, o, 1);
  const at::Tensor bias = layer.t[1].defined() ? layer.t[1].narrow(0, o, 1) : at::Tensor();
  const int64_t n = s.x.size(0);
  constexpr int64_t kChunk = 8192;
  for (int64_t a = 0; a < n; a += kChunk) {
    const int64_t len = std::min(kChunk, n - a);
    s.z.narrow(0, a, len).narrow(1, o, 1).copy_(
        at::conv2d(s.x.narrow(0, a, len), w, bias, {s.sh, s.sw}, {s.ph, s.pw}));
  }
}

at::Tensor Backend::fresh_channel(const Sweep& s, int64_t o, const at::Tensor& idx) const {
  const Op& layer = s.prog.ops[0];
  const at::Tensor bias = layer.t[1].defined() ? layer.t[1].narrow(0, o, 1) : at::Tensor();
  return at::conv2d(s.x.index_select(0, idx), layer.t[0].narrow(0, o, 1), bias, {s.sh, s.sw},
                    {s.ph, s.pw});
}

void channel_candidates_aten(const Sweep& s, const Site& st, int64_t k, const at::Tensor& vals,
                             int64_t K, const at::Tensor& idx, const at::Tensor& base,
                             const at::Tensor& out) {
  TORCH_CHECK(s.kind == UnitKind::Weight && s.conv,
              "fused: candidates from a recomputed channel exist for conv weights only");
  const int64_t B = idx.numel();
  const at::Tensor d = vals.narrow(0, 0, K) - s.param.view(-1).narrow(0, k, 1);
  const at::Tensor moved =  // [B, 1, ho, wo]: the input the entry multiplies
      at::constant_pad_nd(s.x.index_select(0, idx).narrow(1, st.c, 1), {s.pw, s.pw, s.ph, s.ph})
          .slice(2, st.ky, st.ky + (s.ho - 1) * s.sh + 1, s.sh)
          .slice(3, st.kx, st.kx + (s.wo - 1) * s.sw + 1, s.sw);
  out.view({K, B, 1, s.ho, s.wo})
      .copy_(base.unsqueeze(0) + d.view({K, 1, 1, 1, 1}) * moved.unsqueeze(0));
}

namespace {

// logits [K, B, classes]: the next mixing layer (prog.next) on `base` [B, Cn, ...], its output
// for the shared state, plus the change `dx` [K*B, ...] of channel o per candidate, then the
// ops after it densely, each candidate with its own batch statistics.
at::Tensor dense_suffix(const Program& prog, const at::Tensor& base, const at::Tensor& dx,
                        int64_t o, int64_t K) {
  return single_add_then_dense(prog, prog.next, static_cast<int64_t>(prog.ops.size()), base,
                               dx, o, K)
      .reshape({K, base.size(0), -1});
}

// The K summed float64 losses of weight k with candidate values `values` [K] on the
// minibatch `idx` [B]. Reads the caches, changes nothing. `left_out`, when defined, is
// left_out_state(s, o, idx) for the weight's neuron o (per_neuron_applies).
at::Tensor evaluate(const Backend& be, const Sweep& s, int64_t k, const at::Tensor& values,
                    const at::Tensor& idx, const at::Tensor& left_out = at::Tensor()) {
  const Site st = site_of(s, k);
  const int64_t K = values.numel();
  const int64_t B = idx.numel();
  const at::Tensor vals = values.contiguous();
  at::Tensor fresh_o;  // lazy sweep: channel o of z[idx] recomputed from x[idx] and the weights
  const bool channel_moves = s.kind == UnitKind::Weight || s.kind == UnitKind::Bias;
  if (s.lazy_z) {
    fresh_o = be.fresh_channel(s, st.o, idx);
  }
  at::Tensor zo = at::empty({K * B, 1, s.ho, s.wo}, s.z.options());
  be.channel_candidates(s, st, k, vals, channel_moves ? K : 1, idx, fresh_o, zo);
  if (!channel_moves) {  // a BatchNorm parameter moves: the pre-activation is shared
    zo.narrow(0, B, (K - 1) * B).copy_(zo.narrow(0, 0, B).repeat({K - 1, 1, 1, 1}));
  }
  const Program& prog = s.prog;
  const int64_t n_ops = static_cast<int64_t>(prog.ops.size());
  if (n_ops == 1) {
    return be.logits_layer_losses(s, st.o, zo, K, idx);
  }
  if (!s.conv) {
    zo = zo.view({K * B, 1});
  }
  if (prog.dag) {
    return evaluate_dag(be, s, st, K, vals, idx, zo, fresh_o);
  }
  const at::Tensor target_b = s.target.index_select(0, idx);
  const int64_t chain_end = prog.next < 0 ? n_ops : prog.next;
  // Without a per-neuron state: channel o of the shared state z[idx] (recomputed in a lazy
  // sweep), whose chain the candidates' chains are taken against.
  at::Tensor cur_o;
  if (!left_out.defined()) {
    cur_o = fresh_o.defined() ? fresh_o : s.z.narrow(1, st.o, 1).index_select(0, idx);
  }
  at::Tensor a_o = zo;
  for (int64_t i = 1; i < chain_end; ++i) {
    const Op& op = prog.ops[i];
    const bool swept = i == s.unit_op && !channel_moves;
    a_o = apply_single(op, a_o, st.o, K, swept && s.kind == UnitKind::Gamma ? vals : at::Tensor(),
                       swept && s.kind == UnitKind::Beta ? vals : at::Tensor());
    if (cur_o.defined()) {
      cur_o = apply_single(op, cur_o, st.o, 1, at::Tensor(), at::Tensor());
    }
  }
  at::Tensor logits;
  if (left_out.defined()) {  // the other channels' share of the next layer is known
    logits = dense_suffix(prog, left_out, a_o, st.o, K);
  } else {
    const at::Tensor d_a = a_o.reshape({K, B, -1}) - cur_o.reshape({1, B, -1});  // [K, B, w]
    const at::Tensor a_cur = run_dense_rows(prog, chain_end, s.z, idx, st.o, fresh_o);
    if (prog.next < 0) {  // channel-local ops up to the logits
      const int64_t width = d_a.size(2);
      logits = a_cur.reshape({1, B, -1}).repeat({K, 1, 1});
      logits.narrow(2, st.o * width, width).add_(d_a);
    } else {
      const Op& mix = prog.ops[prog.next];
      const at::Tensor base = apply_dense(mix, a_cur, 1);  // [B, Cn, ...]
      logits = dense_suffix(prog, base, d_a.reshape(a_o.sizes()), st.o, K);
    }
  }
  // The CUDA backend checks the labels against s.classes up front: keep the shape walk
  // honest on every backend (a host-side check, no read-back).
  TORCH_CHECK(logits.size(2) == s.classes, "fused: the program produced logits of shape ",
              logits.sizes(), ", expected [K, B, ", s.classes, "]");
  return be.cross_entropy(s, logits, target_b);
}

// [B, Cn, ...]: the next mixing layer's output on the pool samples `idx` with channel o of
// the ops after the swept layer set to zero, h_{-o} (docs/design.md §2). While neuron o is
// swept only channel o of the swept layer moves, and the ops between it and the next layer
// are channel-local (a BatchNorm's batch statistics too: per channel and minibatch), so this
// stays exact for every weight of the neuron evaluated on this minibatch. Channel o of z may
// be stale (lazy_z): it is zeroed after the chain.
at::Tensor left_out_state(const Sweep& s, int64_t o, const at::Tensor& idx) {
  const Program& prog = s.prog;
  at::Tensor a = run_dense_rows(prog, prog.next, s.z, idx, -1, at::Tensor());
  if (a.dim() == 2) {  // [B, cout * w] after Flatten (w = 1 for a linear layer)
    const int64_t w = a.size(1) / s.cout;
    a.narrow(1, o * w, w).zero_();
  } else {
    a.narrow(1, o, 1).zero_();
  }
  return apply_dense(prog.ops[prog.next], a, 1);
}

// Whether the weights of a sweep of `s` may share per-neuron states (left_out_state): a
// weight unit of a sequential program with a mixing layer after the swept one.
bool per_neuron_applies(const Sweep& s) {
  return s.kind == UnitKind::Weight && !s.prog.dag && s.prog.next > 0;
}

// For each row i of the minibatches `idx` [m, B] of weights k0 .. k0+m-1: the first row of
// the same neuron holding the same indices, when that minibatch recurs in the neuron (the
// shuffle sampler cycles through floor(N / B) minibatches), else -1. A state costs what the
// plain evaluation of one weight spends on the other channels, so it pays from two uses on.
// One read-back of `idx` per call on CUDA.
std::vector<int64_t> recurring_rows(const Sweep& s, int64_t k0, const at::Tensor& idx) {
  const at::Tensor host = idx.to(at::kCPU).contiguous();
  const int64_t m = host.size(0), B = host.size(1);
  const int64_t* p = host.data_ptr<int64_t>();
  std::vector<int64_t> rep(m, -1), uses(m, 0);
  std::unordered_map<uint64_t, std::vector<int64_t>> seen;  // row hash -> first rows
  int64_t neuron = -1;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t o = site_of(s, k0 + i).o;
    if (o != neuron) {
      seen.clear();
      neuron = o;
    }
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the row's indices
    for (int64_t b = 0; b < B; ++b) {
      h = (h ^ static_cast<uint64_t>(p[i * B + b])) * 1099511628211ull;
    }
    std::vector<int64_t>& bucket = seen[h];
    int64_t first = i;
    for (const int64_t j : bucket) {
      if (std::equal(p + j * B, p + (j + 1) * B, p + i * B)) {
        first = j;
        break;
      }
    }
    if (first == i) {
      bucket.push_back(i);
    }
    rep[i] = first;
    ++uses[first];
  }
  for (int64_t i = 0; i < m; ++i) {
    if (uses[rep[i]] < 2) {
      rep[i] = -1;
    }
  }
  return rep;
}

}  // namespace

at::Tensor candidate_losses(const Backend& be, const at::Tensor& x, const at::Tensor& z,
                            const at::Tensor& param, const at::Tensor& target,
                            at::IntArrayRef kinds, at::IntArrayRef params,
                            at::ArrayRef<double> eps,
                            const c10::List<std::optional<at::Tensor>>& tensors,
                            int64_t unit_kind, int64_t unit_op, int64_t k,
                            const at::Tensor& values, const at::Tensor& batch) {
  const Sweep s = make_sweep(x, z, param, target, kinds, params, eps, tensors, unit_kind, unit_op);
  TORCH_CHECK(target.defined(), "fused_candidate_losses: target is required");
  TORCH_CHECK(k >= 0 && k < param.numel(), "fused_candidate_losses: weight index k=", k,
              " outside the parameter's ", param.numel(), " entries");
  TORCH_CHECK(values.dim() == 1 && values.numel() >= 2 && values.scalar_type() == param.scalar_type(),
              "fused_candidate_losses: values must be a 1-D tensor of K >= 2 candidates of the "
              "parameter's dtype, got ", values.scalar_type(), " ", values.sizes());
  TORCH_CHECK(batch.dim() == 1 && batch.numel() >= 1,
              "fused_candidate_losses: batch must be a non-empty 1-D index tensor, got ", batch.sizes());
  be.check_batches(s, batch, "batch");
  const at::Tensor vals = values.to(x.device()).contiguous();
  if (std::unique_ptr<Head> head = be.head(s)) {
    return head->losses(k, vals, batch.contiguous());
  }
  return all_reduce_sum(evaluate(be, s, k, vals, batch.contiguous()));
}

std::tuple<at::Tensor, at::Tensor> sweep(
    const Backend& be, const at::Tensor& x, at::Tensor& z, at::Tensor& param,
    const at::Tensor& target, at::IntArrayRef kinds, at::IntArrayRef params,
    at::ArrayRef<double> eps, const c10::List<std::optional<at::Tensor>>& tensors,
    int64_t unit_kind, int64_t unit_op, int64_t k0, const at::Tensor& values,
    const at::Tensor& batches) {
  const Sweep s = make_sweep(x, z, param, target, kinds, params, eps, tensors, unit_kind, unit_op);
  TORCH_CHECK(target.defined(), "fused_sweep: target is required");
  TORCH_CHECK(values.dim() == 2 && values.size(1) >= 2 && values.scalar_type() == param.scalar_type(),
              "fused_sweep: values must be [m, K] (K >= 2 candidates per weight) of the "
              "parameter's dtype, got ", values.scalar_type(), " ", values.sizes());
  const int64_t m = values.size(0);
  TORCH_CHECK(batches.dim() == 2 && batches.size(0) == m && batches.size(1) >= 1,
              "fused_sweep: batches must be [m, B] with m = ", m, " rows, got ", batches.sizes());
  TORCH_CHECK(k0 >= 0 && k0 + m <= param.numel(), "fused_sweep: weights ", k0, "..",
              k0 + m - 1, " outside the parameter's ", param.numel(), " entries");
  be.check_batches(s, batches, "batches");
  const int64_t K = values.size(1);
  const at::TensorOptions on_device = at::TensorOptions().device(x.device());
  Backend::SweepCall call;
  call.chosen = at::full({m}, -2, on_device.dtype(at::kLong));
  call.losses = at::full({m, K}, NAN, on_device.dtype(at::kDouble));
  be.begin_sweep(s, call);
  const at::Tensor vals = values.to(x.device()).contiguous();
  const at::Tensor idx = batches.contiguous();
  Sweep lazy = s;
  lazy.lazy_z = s.kind == UnitKind::Weight && s.conv && lazy_z_pays(s, idx.size(1));
  if (std::unique_ptr<Head> head = be.head(lazy)) {
    head->sweep(call, k0, vals, idx);
    return {call.chosen, call.losses};
  }
  // Per-neuron states of recurring minibatches (left_out_state), dropped when the neuron
  // ends; at most kLeftOutBudget bytes are kept, the rest evaluated plainly.
  const std::vector<int64_t> rep =
      per_neuron_applies(s) ? recurring_rows(s, k0, idx) : std::vector<int64_t>(m, -1);
  std::unordered_map<int64_t, at::Tensor> states;
  int64_t state_bytes = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t k = k0 + i;
    const int64_t o = site_of(s, k).o;
    const at::Tensor row = vals[i];
    at::Tensor left_out;
    if (rep[i] >= 0) {
      const auto it = states.find(rep[i]);
      if (it != states.end()) {
        left_out = it->second;
      } else {
        left_out = left_out_state(lazy, o, idx[i]);
        if (state_bytes + static_cast<int64_t>(left_out.nbytes()) <= kLeftOutBudget) {
          state_bytes += left_out.nbytes();
          states.emplace(rep[i], left_out);
        }
      }
    }
    // over several processes: this rank's shard of the minibatch, the losses summed across
    // ranks, so that every rank makes the same choice (program.h: reduce_group)
    const at::Tensor l = all_reduce_sum(evaluate(be, lazy, k, row, idx[i], left_out));
    const bool go_on = be.step(lazy, call, i, k, l, row);
    const bool neuron_ends = i == m - 1 || site_of(s, k + 1).o != o;
    if (lazy.lazy_z && (!go_on || neuron_ends)) {
      be.refresh_channel(lazy, o);
    }
    if (neuron_ends) {
      states.clear();
      state_bytes = 0;
    }
    if (!go_on) {
      break;
    }
  }
  return {call.chosen, call.losses};
}

void set_weight(const Backend& be, const at::Tensor& x, at::Tensor& z, at::Tensor& param,
                at::IntArrayRef kinds, at::IntArrayRef params, at::ArrayRef<double> eps,
                const c10::List<std::optional<at::Tensor>>& tensors, int64_t unit_kind,
                int64_t unit_op, int64_t k, double value) {
  const Sweep s = make_sweep(x, z, param, at::Tensor(), kinds, params, eps, tensors, unit_kind,
                             unit_op);
  TORCH_CHECK(k >= 0 && k < param.numel(), "fused_set_weight: weight index k=", k,
              " outside the parameter's ", param.numel(), " entries");
  be.set_weight(s, k, value);
}

}  // namespace fused
}  // namespace rso
