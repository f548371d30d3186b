// The CPU logits head of the fused evaluation (docs/design.md §2): programs in which
// the swept layer reaches the logits through one number per channel and sample. The head
// itself is HeadCpu (head_impl.h, which maps the files that define it).
#pragma once

#include <memory>

#include "../core/fused.h"

namespace rso {
namespace fused {

// The head for the program of `s`, or null when it is not a head program
// (csrc/core/device_head.h: head_chain_end). Defined in head_eligible.cpp.
std::unique_ptr<Head> make_cpu_head(const Sweep& s);

// The device head (csrc/core/device_head.h) over CPU loops of its kernels' formulas, or null
// as make_device_head: what the CPU backend takes under the device-generic test switch.
// Defined in device_head_loops.cpp.
std::unique_ptr<Head> make_device_head_cpu(const Sweep& s, const Backend& be);

}  // namespace fused
}  // namespace rso
