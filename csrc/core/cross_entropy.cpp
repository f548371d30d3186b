// The device-free part of rso_ext::candidate_cross_entropy (cross_entropy.h): the argument
// checks and the label error both kernels report (CPU: csrc/cpu/cross_entropy.cpp; CUDA:
// csrc/cuda/cross_entropy_op.cpp).
#include "cross_entropy.h"

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace rso {

void check_candidate_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 3,
              "candidate_cross_entropy: logits must be a 3-D tensor [K, B, C] "
              "(K candidates, B samples, C classes), got a ",
              logits.dim(), "-D tensor of shape ", logits.sizes());
  const int64_t K = logits.size(0);
  const int64_t B = logits.size(1);
  const int64_t C = logits.size(2);
  TORCH_CHECK(K >= 1, "candidate_cross_entropy: logits must have K >= 1 candidates, got shape ",
              logits.sizes());
  TORCH_CHECK(B >= 1, "candidate_cross_entropy: logits must have B >= 1 samples, got shape ",
              logits.sizes());
  TORCH_CHECK(C >= 2, "candidate_cross_entropy: logits must have C >= 2 classes, got shape ",
              logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "candidate_cross_entropy: logits must be float32 or float64, got ",
              logits.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong,
              "candidate_cross_entropy: target must be int64 (torch.long) class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == B,
              "candidate_cross_entropy: target must be a 1-D tensor of length B = ", B,
              " (logits.shape[1]), got shape ", target.sizes());
  TORCH_CHECK(logits.device() == target.device(),
              "candidate_cross_entropy: logits and target must be on the same device, "
              "got logits on ",
              logits.device(), " and target on ", target.device());
}

std::string invalid_target_message(int64_t position, int64_t value, int64_t num_classes) {
  std::ostringstream msg;
  msg << "candidate_cross_entropy: target values must be class indices in [0, C) with C = "
      << num_classes << ", got target[" << position << "] = " << value;
  return msg.str();
}

}  // namespace rso
