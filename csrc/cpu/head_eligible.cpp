// The CPU logits head for the programs a head takes (make_cpu_head, head.h;
// csrc/core/device_head.cpp: head_chain_end), for the parameter's dtype.
#include "head.h"

#include <ATen/ATen.h>

#include <memory>

#include "../core/device_head.h"
#include "head_impl.h"

namespace rso {
namespace fused {

std::unique_ptr<Head> make_cpu_head(const Sweep& s) {
  const int64_t end = head_chain_end(s);
  if (end < 0) {
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
