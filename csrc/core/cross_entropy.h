// Argument checks for rso_ext::candidate_cross_entropy (cross_entropy.cpp) shared by the CPU
// (csrc/cpu/cross_entropy.cpp) and CUDA (csrc/cuda/cross_entropy_op.cpp) kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace rso {

// Checks everything that does not need to read tensor data: logits is a 3-D
// float32/float64 tensor [K, B, C] with K >= 1, B >= 1, C >= 2; target is a 1-D
// int64 tensor of length B on the same device. Throws c10::Error (RuntimeError in
// Python) naming the offending argument. The range of the target values is checked
// by each backend (on the device for CUDA).
void check_candidate_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target);

// Message for a class label outside [0, C) at `position` (shared so both backends
// report it identically).
std::string invalid_target_message(int64_t position, int64_t value, int64_t num_classes);

}  // namespace rso
