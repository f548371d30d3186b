// The CPU logits head of the fused evaluation (docs/design.md §2): programs in which
// the swept layer reaches the logits through one number per channel and sample. The head
// itself is HeadCpu (head_impl.h, which maps the files that define it).
#pragma once

#include <memory>

#include "../core/fused.h"

namespace rso {
namespace fused {

// The head for the program of `s`, or null when the program has another shape: the swept
// conv/linear layer, then BatchNorm (batch or fixed statistics), global average pooling, and
// ReLU / Flatten once a channel is one number per sample, then at most one Linear giving the
// logits (without it the chain's output are the logits). Defined in head_eligible.cpp.
std::unique_ptr<Head> make_cpu_head(const Sweep& s);

}  // namespace fused
}  // namespace rso
