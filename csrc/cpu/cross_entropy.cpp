// CPU kernel of rso_ext::candidate_cross_entropy (schema in csrc/ops.cpp; its argument checks
// are csrc/core/cross_entropy.cpp's).
//
//   out[k] = sum_b ( logsumexp(logits[k, b, :]) - logits[k, b, target[b]] )
//
// for K candidate logit sets over the same B samples, accumulated in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/math.h"
#include "../core/cross_entropy.h"

namespace rso {

namespace {

void check_target_range_cpu(const at::Tensor& target, int64_t C) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t B = target.numel();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(t[b] >= 0 && t[b] < C, invalid_target_message(b, t[b], C));
  }
}

// Per-sample losses are computed in parallel into `losses` [K * B]; each k's row is
// then summed sequentially. Every double is produced by the same operations in the
// same order whatever the thread count, so the result is bitwise reproducible.
template <typename scalar_t>
void candidate_cross_entropy_cpu_kernel(const at::Tensor& logits, const at::Tensor& target,
                                        at::Tensor& out) {
  const int64_t K = logits.size(0);
  const int64_t B = logits.size(1);
  const int64_t C = logits.size(2);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  double* result = out.mutable_data_ptr<double>();

  std::vector<double> losses(static_cast<size_t>(K * B));
  double* loss = losses.data();
  // About 32k logits per task keeps scheduling overhead small for small C.
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, K * B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      loss[i] = math::sample_cross_entropy(x + i * C, C, t[i % B]);
    }
  });
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const double* row = loss + k * B;
      double sum = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        sum += row[b];
      }
      result[k] = sum;
    }
  });
}

at::Tensor candidate_cross_entropy_cpu(const at::Tensor& logits_in, const at::Tensor& target_in) {
  check_candidate_cross_entropy_args(logits_in, target_in);
  TORCH_CHECK(logits_in.device().is_cpu(),
              "candidate_cross_entropy: the CPU kernel got logits on ", logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t C = logits.size(2);
  check_target_range_cpu(target, C);

  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "candidate_cross_entropy_cpu", [&] {
    candidate_cross_entropy_cpu_kernel<scalar_t>(logits, target, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rso_ext, CPU, m) {
  m.impl("candidate_cross_entropy", &candidate_cross_entropy_cpu);
}

}  // namespace rso
