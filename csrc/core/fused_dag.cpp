// The fused candidate evaluation of a residual network: programs with Save/Load/Input/Add ops
// (program.h), which the planner emits for models that are not a plain chain (rso_ext/fused/lower_graph.py,
// GraphPlan). Device-generic: ATen calls and the program passes of program.cpp, so the CPU
// and CUDA backends share it; Sequential programs never come here (fused.cpp, evaluate).
//
// The K candidates of a weight differ in channel o of the swept layer's output only. A value
// of the program is held in one of three forms, the cheapest that is exact:
//   Const  [B, ...]       the same for every candidate: a side input (cached over the pool,
//                         independent of the swept layer) and what is computed from it alone;
//   Local  base [B, ...]  the shared state, plus channel o per candidate `a` [K*B, 1, ...]
//                         (and channel o of the shared state, `cur`, computed the way `a` is):
//                         the swept layer's output until a mixing op, through the channel-local
//                         ops (BatchNorm with per-candidate statistics, ReLU, pooling, Flatten)
//                         and through adds of Const or Local values;
//   Dense  [K*B, ...]     everything after a mixing op (one dense pass over the shared state plus
//                         a single-channel correction per candidate, as in the chain case).
// An add materialises K*B samples only where one operand is Dense already; a Local operand
// saved for a later add (a residual branch that starts at the swept layer's chain) is joined
// as base + its candidates' channel o.
#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "fused.h"
#include "program.h"

namespace rso {
namespace fused {
namespace {

enum class Rep { Const = 0, Local = 1, Dense = 2 };

struct Val {
  Rep rep = Rep::Const;
  at::Tensor base;     // Const, Local: [B, C, ...] or [B, F]
  at::Tensor a;        // Local: channel o per candidate, [K*B, 1, ...] or [K*B, w]
  at::Tensor cur;      // Local: channel o of base, [B, 1, ...] or [B, w]
  at::Tensor dense;    // Dense: [K*B, C, ...]
  bool owned = false;  // Dense: no slot holds the tensor, so passes may write over it
  bool defined() const { return base.defined() || dense.defined(); }
};

bool is_dag_kind(OpKind k) {
  return k == OpKind::Save || k == OpKind::Load || k == OpKind::Input || k == OpKind::Add;
}

// [G*n, ...] -> [G, n, ...]
at::Tensor grouped(const at::Tensor& t, int64_t G) {
  std::vector<int64_t> shape = t.sizes().vec();
  shape[0] /= G;
  shape.insert(shape.begin(), G);
  return t.reshape(shape);
}

// Channel o's block along dimension `dim` of a tensor laid out as a full value: one channel of
// a map, or the w features of channel o after Flatten (w = the width of the Local part `like`).
at::Tensor block(const at::Tensor& t, int64_t dim, int64_t o, const at::Tensor& like) {
  if (like.dim() == 2) {
    const int64_t w = like.size(1);
    return t.narrow(dim, o * w, w);
  }
  return t.narrow(dim, o, 1);
}

Val make_const(at::Tensor t) {
  Val v;
  v.rep = Rep::Const;
  v.base = std::move(t);
  return v;
}

Val make_dense(at::Tensor t) {
  Val v;
  v.rep = Rep::Dense;
  v.dense = std::move(t);
  v.owned = true;
  return v;
}

// x + y for candidates of channel o.
Val add(Val x, Val y, int64_t o, int64_t K) {
  if (static_cast<int>(y.rep) > static_cast<int>(x.rep)) {
    std::swap(x, y);
  }
  if (x.rep == Rep::Const) {
    return make_const(x.base + y.base);
  }
  if (x.rep == Rep::Local) {
    Val v;
    v.rep = Rep::Local;
    v.base = x.base + y.base;
    if (y.rep == Rep::Local) {
      v.a = x.a + y.a;
      v.cur = x.cur + y.cur;
    } else {
      const at::Tensor c = block(y.base, 1, o, x.a);  // [B, 1, ...]: the constant's channel o
      v.a = (grouped(x.a, K) + c.unsqueeze(0)).reshape(x.a.sizes());
      v.cur = x.cur + c;
    }
    return v;
  }
  at::Tensor d = grouped(x.dense, K);  // [K, B, ...]
  const bool inplace = x.owned && d.is_contiguous();
  at::Tensor out;
  if (y.rep == Rep::Dense) {
    out = inplace ? d.add_(grouped(y.dense, K)) : d + grouped(y.dense, K);
  } else {
    // channel o of a Local operand is each candidate's own: computed before d is written
    const at::Tensor fix =
        y.rep == Rep::Local ? block(d, 2, o, y.a) + grouped(y.a, K) : at::Tensor();
    out = inplace ? d.add_(y.base.unsqueeze(0)) : d + y.base.unsqueeze(0);
    if (fix.defined()) {
      block(out, 2, o, y.a).copy_(fix);
    }
  }
  return make_dense(out.reshape(x.dense.sizes()));
}

}  // namespace

at::Tensor evaluate_dag(const Backend& be, const Sweep& s, const Site& st, int64_t K,
                        const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& zo,
                        const at::Tensor& fresh_o) {
  const Program& prog = s.prog;
  const int64_t n_ops = static_cast<int64_t>(prog.ops.size());
  const int64_t B = idx.numel();
  const int64_t o = st.o;
  for (int64_t i = 1; i < n_ops; ++i) {
    const Op& op = prog.ops[i];
    if (op.kind == OpKind::Input || (op.kind == OpKind::Add && op.p[1] != 0)) {
      TORCH_CHECK(op.t[0].size(0) == s.x.size(0) && op.t[0].scalar_type() == s.x.scalar_type(),
                  "fused program: op ", i, " has a side tensor of ", op.t[0].scalar_type(), " ",
                  op.t[0].sizes(), "; it must cover the pool (", s.x.size(0),
                  " samples) in the caches' dtype ", s.x.scalar_type());
    }
  }
  const bool channel_moves = s.kind == UnitKind::Weight || s.kind == UnitKind::Bias;
  const at::Tensor zb = s.z.index_select(0, idx);
  if (fresh_o.defined()) {
    zb.narrow(1, o, 1).copy_(fresh_o);
  }
  Val v;
  v.rep = Rep::Local;
  v.base = zb;
  v.a = zo;
  v.cur = zb.narrow(1, o, 1);
  std::vector<Val> slots(static_cast<size_t>(prog.slots));
  bool swept_done = channel_moves;
  for (int64_t i = 1; i < n_ops;) {
    const Op& op = prog.ops[i];
    if (is_dag_kind(op.kind)) {
      if (op.kind == OpKind::Save) {
        v.owned = false;  // the slot and the current value share tensors from here on
        slots[op.p[0]] = v;
      } else if (op.kind == OpKind::Load) {
        TORCH_CHECK(slots[op.p[0]].defined(), "fused program: op ", i, " loads slot ", op.p[0],
                    " before any op saved it");
        v = slots[op.p[0]];
      } else if (op.kind == OpKind::Input) {
        v = make_const(op.t[0].index_select(0, idx));
      } else {
        Val y;
        if (op.p[1] != 0) {
          y = make_const(op.t[0].index_select(0, idx));
        } else {
          TORCH_CHECK(slots[op.p[0]].defined(), "fused program: op ", i, " adds slot ",
                      op.p[0], " before any op saved it");
          y = slots[op.p[0]];
          y.owned = false;
        }
        v = add(std::move(v), std::move(y), o, K);
      }
      ++i;
      continue;
    }
    const bool swept = i == s.unit_op && !channel_moves;
    TORCH_CHECK(!swept || v.rep == Rep::Local, "fused program: the swept BatchNorm (op ", i,
                ") is not in the channel-local chain of the swept layer");
    switch (v.rep) {
      case Rep::Const:
        v.base = apply_dense(op, v.base, 1);
        break;
      case Rep::Local:
        if (op.mixing()) {
          const at::Tensor base = apply_dense(op, v.base, 1);  // [B, Cn, ...]
          const at::Tensor d =
              (v.a.reshape({K, B, -1}) - v.cur.reshape({1, B, -1})).reshape(v.a.sizes());
          v = make_dense(mixing_single_add(op, base, d, o, K));
        } else {
          v.a = apply_single(op, v.a, o, K,
                             swept && s.kind == UnitKind::Gamma ? vals : at::Tensor(),
                             swept && s.kind == UnitKind::Beta ? vals : at::Tensor());
          v.cur = apply_single(op, v.cur, o, 1, at::Tensor(), at::Tensor());
          v.base = apply_dense(op, v.base, 1);
          swept_done = swept_done || swept;
        }
        break;
      case Rep::Dense:
        if (v.owned) {  // a run of plain ops, written in place where the passes can
          int64_t j = i + 1;
          while (j < n_ops && !is_dag_kind(prog.ops[j].kind)) {
            ++j;
          }
          v.dense = run_dense(prog, i, j, v.dense, K);
          i = j;
          continue;
        }
        v.dense = apply_dense(op, v.dense, K);
        v.owned = op.kind != OpKind::Flatten;  // Flatten gives a view of the saved tensor
        break;
    }
    ++i;
  }
  TORCH_CHECK(swept_done, "fused program: the swept BatchNorm (op ", s.unit_op,
              ") was not met in the channel-local chain of the swept layer");
  at::Tensor logits;
  if (v.rep == Rep::Dense) {
    logits = v.dense.reshape({K, B, -1});
  } else {
    logits = v.base.reshape({1, B, -1}).repeat({K, 1, 1});
    if (v.rep == Rep::Local) {
      const int64_t w = v.a.numel() / (K * B);
      logits.narrow(2, o * w, w).copy_(v.a.reshape({K, B, w}));
    }
  }
  TORCH_CHECK(logits.size(2) == s.classes, "fused: the program produced logits of shape ",
              logits.sizes(), ", expected [K, B, ", s.classes, "]");
  return be.cross_entropy(s, logits, s.target.index_select(0, idx));
}

}  // namespace fused
}  // namespace rso
