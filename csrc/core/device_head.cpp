// The programs a logits head takes (head_chain_end, device_head.h): the shape of the chain
// after the swept layer and the layout of its tensors. The CPU head (csrc/cpu/head.h) and the
// device head take the same programs.
#include "device_head.h"

#include <vector>

namespace rso {
namespace fused {
namespace {

// A contiguous tensor of n entries of the parameter's dtype: what the head's loops index per
// channel or class with raw pointers of that type.
bool per_channel(const at::Tensor& t, int64_t n, const Sweep& s) {
  return t.is_contiguous() && t.numel() == n && t.scalar_type() == s.param.scalar_type();
}

}  // namespace

int64_t head_chain_end(const Sweep& s) {
  const std::vector<Op>& ops = s.prog.ops;
  const int64_t n_ops = static_cast<int64_t>(ops.size());
  const int64_t end = s.prog.next < 0 ? n_ops : s.prog.next;
  if (s.prog.next >= 0 && (s.prog.next != n_ops - 1 || ops[s.prog.next].kind != OpKind::Linear)) {
    return -1;
  }
  if (!layer_contiguous(s) || !s.target.defined() || !s.target.is_contiguous() ||
      s.classes < 2) {
    return -1;
  }
  int64_t spatial = s.ho * s.wo;
  for (int64_t i = 1; i < end; ++i) {
    const Op& op = ops[i];
    switch (op.kind) {
      case OpKind::BatchNorm:
        for (int j = 0; j < 4; ++j) {
          if (op.t[j].defined() && !per_channel(op.t[j], s.cout, s)) {
            return -1;
          }
        }
        break;
      case OpKind::GlobalAvgPool:
        spatial = 1;
        break;
      case OpKind::ReLU:
      case OpKind::Flatten:
        if (spatial != 1) {
          return -1;
        }
        break;
      default:
        return -1;
    }
  }
  if (spatial != 1) {
    return -1;
  }
  const Op* out = s.prog.next >= 0 ? &ops[s.prog.next] : nullptr;
  if (out != nullptr &&
      (!out->t[0].is_contiguous() || out->t[0].dim() != 2 || out->t[0].size(1) != s.cout ||
       out->t[0].size(0) != s.classes || out->t[0].scalar_type() != s.param.scalar_type() ||
       (out->t[1].defined() && !per_channel(out->t[1], s.classes, s)))) {
    return -1;
  }
  if (out == nullptr && s.classes != s.cout) {
    return -1;
  }
  return end;
}

}  // namespace fused
}  // namespace rso
