// Parsing of the lowered program and the passes over it (see program.h).
#include "program.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "../cpu/program_passes.h"

namespace rso {

namespace {

const char* kind_name(OpKind k) {
  switch (k) {
    case OpKind::Conv: return "Conv2d";
    case OpKind::Linear: return "Linear";
    case OpKind::BatchNorm: return "BatchNorm";
    case OpKind::ReLU: return "ReLU";
    case OpKind::AvgPool: return "AvgPool2d";
    case OpKind::MaxPool: return "MaxPool2d";
    case OpKind::GlobalAvgPool: return "global average pool";
    case OpKind::Flatten: return "Flatten";
    case OpKind::Save: return "Save";
    case OpKind::Load: return "Load";
    case OpKind::Input: return "Input";
    case OpKind::Add: return "Add";
  }
  return "?";
}

}  // namespace

Program parse_program(at::IntArrayRef kinds, at::IntArrayRef params, at::ArrayRef<double> eps,
                      const c10::List<std::optional<at::Tensor>>& tensors,
                      bool swept_first) {
  const int64_t n = static_cast<int64_t>(kinds.size());
  TORCH_CHECK(n >= 1 || !swept_first, "fused program: needs at least the swept layer, got no ops");
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 4 * n,
              "fused program: op_params must hold 4 integers per op (", 4 * n, "), got ",
              params.size());
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == n,
              "fused program: op_eps must hold one float per op (", n, "), got ", eps.size());
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == 4 * n,
              "fused program: op_tensors must hold 4 entries per op (", 4 * n, "), got ",
              tensors.size());
  Program prog;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(kinds[i] >= 0 && kinds[i] <= 11, "fused program: op ", i, " has unknown kind ",
                kinds[i]);
    Op op;
    op.kind = static_cast<OpKind>(kinds[i]);
    for (int j = 0; j < 4; ++j) {
      op.p[j] = params[4 * i + j];
      std::optional<at::Tensor> t = tensors.get(4 * i + j);
      if (t.has_value()) {
        op.t[j] = *t;
      }
    }
    op.eps = eps[i];
    if (op.mixing()) {
      TORCH_CHECK(op.t[0].defined(), "fused program: op ", i, " (", kind_name(op.kind),
                  ") has no weight");
      TORCH_CHECK(op.t[0].dim() == (op.kind == OpKind::Conv ? 4 : 2), "fused program: op ", i,
                  " (", kind_name(op.kind), ") weight has shape ", op.t[0].sizes());
      if (op.kind == OpKind::Conv) {
        TORCH_CHECK(op.p[0] >= 1 && op.p[1] >= 1 && op.p[2] >= 0 && op.p[3] >= 0,
                    "fused program: op ", i, " (Conv2d) needs stride >= 1 and padding >= 0");
      }
      if (prog.next < 0 && i > 0) {
        prog.next = i;
      }
    } else if (op.kind == OpKind::BatchNorm) {
      TORCH_CHECK(op.t[0].defined() && op.t[1].defined(), "fused program: op ", i,
                  " (BatchNorm) needs gamma and beta (affine=True)");
      TORCH_CHECK(op.p[0] == 1 || (op.t[2].defined() && op.t[3].defined()),
                  "fused program: op ", i,
                  " (BatchNorm) uses running statistics but has none");
    } else if (op.kind == OpKind::AvgPool || op.kind == OpKind::MaxPool) {
      TORCH_CHECK(op.p[0] >= 1 && op.p[1] >= 1 && op.p[2] >= 0, "fused program: op ", i, " (",
                  kind_name(op.kind), ") needs kernel >= 1, stride >= 1, padding >= 0");
    } else if (op.kind == OpKind::Save || op.kind == OpKind::Load || op.kind == OpKind::Add ||
               op.kind == OpKind::Input) {
      prog.dag = true;
      const bool side = op.kind == OpKind::Input || (op.kind == OpKind::Add && op.p[1] != 0);
      if (side) {
        TORCH_CHECK(op.t[0].defined() && op.t[0].dim() >= 2, "fused program: op ", i, " (",
                    kind_name(op.kind), ") needs its side tensor [N, ...] as tensor 0");
      } else {
        TORCH_CHECK(op.p[0] >= 0 && op.p[0] < kMaxSlots, "fused program: op ", i, " (",
                    kind_name(op.kind), ") names slot ", op.p[0], ", outside [0, ", kMaxSlots,
                    ")");
        prog.slots = std::max(prog.slots, op.p[0] + 1);
      }
      TORCH_CHECK(op.kind != OpKind::Add || op.p[1] == 0 || op.p[1] == 1, "fused program: op ",
                  i, " (Add) needs p[1] = 0 (a slot) or 1 (a side tensor)");
    }
    TORCH_CHECK(i > 0 || op.mixing() || !swept_first,
                "fused program: op 0 must be the swept Conv2d or Linear, got ", kind_name(op.kind));
    prog.ops.push_back(std::move(op));
  }
  return prog;
}

void fold_avg_pools(Program& prog) {
  if (prog.dag) {  // a slot may hold the conv's output: keep every op as it is
    return;
  }
  for (size_t i = 1; i + 1 < prog.ops.size(); ++i) {
    Op& conv = prog.ops[i];
    Op& pool = prog.ops[i + 1];
    const int64_t P = pool.p[0];
    if (conv.kind != OpKind::Conv || pool.kind != OpKind::AvgPool || conv.p[0] != 1 ||
        conv.p[1] != 1 || P < 2 || pool.p[1] != P || pool.p[2] != 0) {
      continue;
    }
    const at::Tensor& W = conv.t[0];
    const int64_t kh = W.size(2), kw = W.size(3);
    at::Tensor folded = at::zeros({W.size(0), W.size(1), kh + P - 1, kw + P - 1}, W.options());
    for (int64_t a = 0; a < P; ++a) {
      for (int64_t b = 0; b < P; ++b) {
        folded.narrow(2, a, kh).narrow(3, b, kw).add_(W);
      }
    }
    conv.t[0] = folded.div_(static_cast<double>(P * P));
    conv.p[0] = conv.p[1] = P;
    pool.p[0] = pool.p[1] = 1;
  }
}

namespace {

bool is_identity_pool(const Op& op) { return op.p[0] == 1 && op.p[1] == 1 && op.p[2] == 0; }

std::atomic<bool> g_device_generic{false};
std::string g_reduce_group;  // set and read by the one Python thread that drives a sweep

// BatchNorm of x [G*b, C, ...] on the batch statistics of each of its G groups of samples over
// the whole minibatch spread across the ranks: per (group, channel) float64 sums and sums of
// squares of this rank's samples, added across ranks (biased variance, as BatchNorm trains).
// gamma, beta: broadcastable to [G, C].
at::Tensor batch_norm_across_ranks(const at::Tensor& x, const at::Tensor& gamma,
                                   const at::Tensor& beta, double eps, int64_t groups) {
  const int64_t C = x.size(1);
  const at::Tensor v = x.reshape({groups, x.size(0) / groups, C, -1}).to(at::kDouble);
  const at::Tensor count = at::full({1}, static_cast<double>(v.size(1) * v.size(3)),
                                    v.options());
  const at::Tensor stats =
      all_reduce_sum(at::cat({v.sum({1, 3}).flatten(), (v * v).sum({1, 3}).flatten(), count}));
  const at::Tensor n = stats.narrow(0, 2 * groups * C, 1);
  const at::Tensor mean = stats.narrow(0, 0, groups * C).view({groups, C}) / n;
  const at::Tensor var =
      (stats.narrow(0, groups * C, groups * C).view({groups, C}) / n - mean * mean).clamp_min(0);
  const at::Tensor scale = at::rsqrt(var + eps) * gamma.to(at::kDouble);
  const at::Tensor shift = beta.to(at::kDouble) - mean * scale;
  const at::Tensor out = v * scale.view({groups, 1, C, 1}) + shift.view({groups, 1, C, 1});
  return out.to(x.scalar_type()).view(x.sizes());
}
}  // namespace

bool device_generic_paths() {
  return g_device_generic.load(std::memory_order_relaxed) || !g_reduce_group.empty();
}

bool device_generic_switch() { return g_device_generic.load(std::memory_order_relaxed); }

const std::string& reduce_group() { return g_reduce_group; }

void set_reduce_group(const std::string& group_name) { g_reduce_group = group_name; }

at::Tensor all_reduce_sum(const at::Tensor& t) {
  if (g_reduce_group.empty()) {
    return t;
  }
  // boxed calls: the group argument's declared type differs between torch versions (str, Any)
  static const c10::OperatorHandle reduce =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce", "");
  static const c10::OperatorHandle wait =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  std::vector<c10::IValue> stack{t.contiguous(), std::string("sum"), g_reduce_group};
  reduce.callBoxed(&stack);
  stack = {stack.at(0).toTensor()};
  wait.callBoxed(&stack);
  return stack.at(0).toTensor();
}

void set_device_generic_paths(bool on) { g_device_generic.store(on); }

at::Tensor apply_dense(const Op& op, const at::Tensor& x, int64_t groups) {
  switch (op.kind) {
    case OpKind::Conv:
      if (cpu::handles(x) && op.t[0].size(1) == 1) {  // oneDNN is slow on one input channel
        return cpu::conv2d_one_channel(op, x);
      }
      if (cpu::handles(x) && op.t[0].size(0) == 1) {  // ... and on one output channel
        return cpu::conv2d_one_output(op, x);
      }
      if (cpu::channels_last_conv(op, x)) {
        return cpu::conv2d_channels_last(op, x);
      }
      return at::conv2d(x, op.t[0], op.t[1], {op.p[0], op.p[1]}, {op.p[2], op.p[3]});
    case OpKind::Linear:
      return at::linear(x, op.t[0], op.t[1]);
    case OpKind::BatchNorm: {
      if (cpu::handles(x)) {
        return cpu::batch_norm(op, x, groups, -1, {}, {}, /*relu=*/false, /*inplace=*/false);
      }
      if (op.p[0] == 0) {
        return at::batch_norm(x, op.t[0], op.t[1], op.t[2], op.t[3], false, 0.0, op.eps, false);
      }
      if (!g_reduce_group.empty()) {
        return batch_norm_across_ranks(x, op.t[0].view({1, -1}), op.t[1].view({1, -1}), op.eps,
                                       groups);
      }
      if (groups == 1) {
        return at::batch_norm(x, op.t[0], op.t[1], {}, {}, true, 0.0, op.eps, false);
      }
      const int64_t b = x.size(0) / groups;
      at::Tensor out = at::empty_like(x);
      for (int64_t g = 0; g < groups; ++g) {
        out.narrow(0, g * b, b).copy_(at::batch_norm(x.narrow(0, g * b, b), op.t[0], op.t[1], {},
                                                     {}, true, 0.0, op.eps, false));
      }
      return out;
    }
    case OpKind::ReLU:
      return cpu::handles(x) ? cpu::relu(x, /*inplace=*/false) : at::relu(x);
    case OpKind::AvgPool:
      if (is_identity_pool(op)) {  // a pool fold_avg_pools moved into the conv before it
        return x;
      }
      return cpu::handles(x) ? cpu::pool2d(op, x)
                             : at::avg_pool2d(x, {op.p[0], op.p[0]}, {op.p[1], op.p[1]},
                                              {op.p[2], op.p[2]});
    case OpKind::MaxPool:
      return cpu::handles(x) ? cpu::pool2d(op, x)
                             : at::max_pool2d(x, {op.p[0], op.p[0]}, {op.p[1], op.p[1]},
                                              {op.p[2], op.p[2]});
    case OpKind::GlobalAvgPool:
      return cpu::handles(x) ? cpu::global_avg_pool(x) : x.mean({2, 3}, /*keepdim=*/true);
    case OpKind::Flatten:
      return x.reshape({x.size(0), -1});
    case OpKind::Save:
    case OpKind::Load:
    case OpKind::Input:
    case OpKind::Add:
      break;
  }
  TORCH_CHECK(false, "fused program: ", kind_name(op.kind), " is not a pass over one tensor "
              "(a program with Save/Load/Input/Add runs through evaluate_dag)");
}

at::Tensor run_dense(const Program& prog, int64_t begin, int64_t end, at::Tensor x,
                     int64_t groups, const at::Tensor& plane_sums) {
  for (int64_t i = begin; i < end; ++i) {
    const Op& op = prog.ops[i];
    if (cpu::handles(x) && (op.kind == OpKind::BatchNorm || op.kind == OpKind::ReLU)) {
      if (op.kind == OpKind::ReLU) {
        x = cpu::relu(x, /*inplace=*/true);
        continue;
      }
      const at::Tensor sums = i == begin ? plane_sums : at::Tensor();
      const bool relu = i + 1 < end && prog.ops[i + 1].kind == OpKind::ReLU;
      i += relu ? 1 : 0;
      // a convolution next that runs channels-last (cpu::conv2d_channels_last) reads the
      // result in that layout: written so directly, instead of transposed by the conv
      const bool to_conv = i + 1 < end && cpu::channels_last_conv(prog.ops[i + 1], x);
      x = cpu::batch_norm(op, x, groups, -1, {}, {}, relu, /*inplace=*/!to_conv,
                          sums, to_conv);
      continue;
    }
    x = apply_dense(op, x, groups);
  }
  return x;
}

at::Tensor run_dense_rows(const Program& prog, int64_t end, const at::Tensor& z,
                          const at::Tensor& rows, int64_t o, const at::Tensor& channel_o) {
  const bool swap_o = o >= 0 && channel_o.defined();
  if (end > 1 && z.dim() == 4 && cpu::handles(z) && (!swap_o || cpu::handles(channel_o))) {
    const Op& op = prog.ops[1];
    if ((op.kind == OpKind::AvgPool && !is_identity_pool(op)) || op.kind == OpKind::MaxPool) {
      return run_dense(prog, 2, end, cpu::pool2d_rows(op, z, rows.contiguous(), o, channel_o), 1);
    }
  }
  at::Tensor x = z.index_select(0, rows);
  if (swap_o) {
    x.narrow(1, o, 1).copy_(channel_o);
  }
  return run_dense(prog, 1, end, x, 1);
}

at::Tensor apply_single(const Op& op, const at::Tensor& x, int64_t o, int64_t groups,
                        const at::Tensor& gamma, const at::Tensor& beta) {
  if (op.kind != OpKind::BatchNorm) {
    TORCH_CHECK(!op.mixing(), "fused program: a channel-local pass met ", kind_name(op.kind));
    return apply_dense(op, x, groups);
  }
  if (cpu::handles(x)) {
    return cpu::batch_norm(op, x.reshape({x.size(0), 1, -1}), groups, o, gamma, beta,
                           /*relu=*/false, /*inplace=*/false)
        .view(x.sizes());
  }
  // [G, B*rest]: per-group statistics of channel o (biased variance, as BatchNorm trains).
  const at::Tensor flat = x.reshape({groups, -1});
  const at::Tensor g = gamma.defined() ? gamma.reshape({groups, 1}) : op.t[0].narrow(0, o, 1).reshape({1, 1});
  const at::Tensor b = beta.defined() ? beta.reshape({groups, 1}) : op.t[1].narrow(0, o, 1).reshape({1, 1});
  if (op.p[0] == 1 && !g_reduce_group.empty()) {
    return batch_norm_across_ranks(x.reshape({x.size(0), 1, -1}), g, b, op.eps, groups)
        .view(x.sizes());
  }
  at::Tensor mean, var;
  if (op.p[0] == 1) {
    std::tie(var, mean) = at::var_mean(flat, {1}, /*correction=*/0, /*keepdim=*/true);
  } else {
    mean = op.t[2].narrow(0, o, 1).reshape({1, 1});
    var = op.t[3].narrow(0, o, 1).reshape({1, 1});
  }
  const at::Tensor y = (flat - mean) * at::rsqrt(var + op.eps) * g + b;
  return y.reshape(x.sizes());
}

at::Tensor mixing_single_add(const Op& op, const at::Tensor& base, const at::Tensor& dx,
                             int64_t o, int64_t groups) {
  if (cpu::handles(base) && cpu::handles(dx)) {
    return cpu::mixing_single_add(op, base, dx, o, groups);
  }
  const at::Tensor corr = mixing_single(op, dx, o);  // [G*B, Cn, ...]
  std::vector<int64_t> shape = {groups, base.size(0)};
  std::vector<int64_t> flat_shape = {groups * base.size(0)};
  for (int64_t j = 1; j < base.dim(); ++j) {
    shape.push_back(base.size(j));
    flat_shape.push_back(base.size(j));
  }
  return (corr.view(shape) + base.unsqueeze(0)).view(flat_shape);
}

at::Tensor single_add_then_dense(const Program& prog, int64_t i, int64_t end,
                                 const at::Tensor& base, const at::Tensor& dx, int64_t o,
                                 int64_t groups) {
  const bool bn_next = i + 1 < end && prog.ops[i + 1].kind == OpKind::BatchNorm &&
                       prog.ops[i + 1].p[0] == 1;
  if (!bn_next || !cpu::handles(base) || !cpu::handles(dx)) {
    return run_dense(prog, i + 1, end, mixing_single_add(prog.ops[i], base, dx, o, groups),
                     groups);
  }
  at::Tensor sums;  // stays undefined where the CPU pass does not take them
  at::Tensor h = cpu::mixing_single_add(prog.ops[i], base, dx, o, groups, &sums);
  return run_dense(prog, i + 1, end, h, groups, sums);
}

at::Tensor mixing_single(const Op& op, const at::Tensor& dx, int64_t o) {
  if (op.kind == OpKind::Conv) {
    // contiguous: a strided weight slice sends oneDNN down a slow reorder path every call
    return at::conv2d(dx, op.t[0].narrow(1, o, 1).contiguous(), {}, {op.p[0], op.p[1]},
                      {op.p[2], op.p[3]});
  }
  const int64_t w = dx.size(1);  // features of channel o after Flatten (1 for a linear input)
  return at::linear(dx, op.t[0].narrow(1, o * w, w));
}

namespace {

// rso_ext::program_forward: the ops of a program densely over x (any device).
at::Tensor program_forward(const at::Tensor& x, at::IntArrayRef kinds, at::IntArrayRef params,
                           at::ArrayRef<double> eps,
                           const c10::List<std::optional<at::Tensor>>& tensors) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "program_forward: x must be float32 or float64, got ", x.scalar_type());
  const Program prog = parse_program(kinds, params, eps, tensors, /*swept_first=*/false);
  TORCH_CHECK(!prog.dag, "program_forward: Save/Load/Input/Add ops are not supported (it runs "
              "a chain of ops)");
  for (size_t i = 0; i < prog.ops.size(); ++i) {
    for (int j = 0; j < 4; ++j) {
      const at::Tensor& t = prog.ops[i].t[j];
      TORCH_CHECK(!t.defined() || (t.device() == x.device() && t.scalar_type() == x.scalar_type()),
                  "program_forward: op ", i, " has tensor ", j, " of ", t.scalar_type(), " on ",
                  t.device(), " but x is ", x.scalar_type(), " on ", x.device());
    }
  }
  // run_dense overwrites its input in place: start from a copy when op 0 would
  at::Tensor h = x.contiguous();
  if (!prog.ops.empty() && (prog.ops[0].kind == OpKind::BatchNorm ||
                            prog.ops[0].kind == OpKind::ReLU) && h.is_same(x)) {
    h = x.clone();
  }
  return run_dense(prog, 0, static_cast<int64_t>(prog.ops.size()), h, 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(rso_ext, CompositeExplicitAutograd, m) {
  m.impl("program_forward", &program_forward);
}

}  // namespace rso
