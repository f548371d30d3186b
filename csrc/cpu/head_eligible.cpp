// The programs the CPU logits head takes (make_cpu_head, head.h): the shape of the chain after
// the swept layer and the layout of its tensors; then the head for the parameter's dtype.
#include "head.h"

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "fused_steps.h"
#include "head_impl.h"

namespace rso {
namespace fused {

std::unique_ptr<Head> make_cpu_head(const Sweep& s) {
  const std::vector<Op>& ops = s.prog.ops;
  const int64_t n_ops = static_cast<int64_t>(ops.size());
  const int64_t end = s.prog.next < 0 ? n_ops : s.prog.next;
  if (s.prog.next >= 0 && (s.prog.next != n_ops - 1 || ops[s.prog.next].kind != OpKind::Linear)) {
    return nullptr;
  }
  if (!layer_contiguous(s) || !s.target.defined() || s.classes < 2) {
    return nullptr;
  }
  int64_t spatial = s.ho * s.wo;
  for (int64_t i = 1; i < end; ++i) {
    const Op& op = ops[i];
    switch (op.kind) {
      case OpKind::BatchNorm:
        for (int j = 0; j < 4; ++j) {
          if (op.t[j].defined() && !op.t[j].is_contiguous()) {
            return nullptr;
          }
        }
        break;
      case OpKind::GlobalAvgPool:
        spatial = 1;
        break;
      case OpKind::ReLU:
      case OpKind::Flatten:
        if (spatial != 1) {
          return nullptr;
        }
        break;
      default:
        return nullptr;
    }
  }
  if (spatial != 1) {
    return nullptr;
  }
  const Op* out = s.prog.next >= 0 ? &ops[s.prog.next] : nullptr;
  if (out != nullptr && (!out->t[0].is_contiguous() || out->t[0].size(1) != s.cout ||
                         (out->t[1].defined() && !out->t[1].is_contiguous()))) {
    return nullptr;
  }
  if (out == nullptr && s.classes != s.cout) {
    return nullptr;
  }
  std::unique_ptr<Head> head;
  AT_DISPATCH_FLOATING_TYPES(s.param.scalar_type(), "fused head", [&] {
    head = std::make_unique<HeadCpu<scalar_t>>(s, end);
  });
  return head;
}

}  // namespace fused
}  // namespace rso
