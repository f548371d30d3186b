// CUDA kernel registration of rso_ext::candidate_cross_entropy. Only compiled when
// the extension is built WITH_CUDA (setup.py / CMakeLists.txt); the kernels
// themselves are in cross_entropy.cu.
#include "../core/cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "kernels.h"

namespace rso {
namespace {

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "candidate_cross_entropy: ", what, " = ",
              v, " is too large for the CUDA kernel (max ", std::numeric_limits<int>::max(),
              ")");
  return static_cast<int>(v);
}

at::Tensor candidate_cross_entropy_cuda(const at::Tensor& logits_in,
                                        const at::Tensor& target_in) {
  check_candidate_cross_entropy_args(logits_in, target_in);
  TORCH_CHECK(logits_in.is_cuda(), "candidate_cross_entropy: the CUDA kernel got logits on ",
              logits_in.device());
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int K = checked_int(logits.size(0), "K (logits.shape[0])");
  const int B = checked_int(logits.size(1), "B (logits.shape[1])");
  const int C = checked_int(logits.size(2), "C (logits.shape[2])");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Range check of the labels on the device; the compute kernel never indexes with
  // an invalid label (it yields NaN instead), so both are enqueued before the single
  // read-back of the flag.
  at::Tensor first_invalid = at::full({1}, B, target.options().dtype(at::kInt));
  cuda::launch_find_first_invalid_target(target.const_data_ptr<int64_t>(), B, C,
                                         first_invalid.mutable_data_ptr<int>(), stream);

  at::Tensor out = at::empty({K}, logits.options().dtype(at::kDouble));
  at::Tensor scratch = at::empty({cuda::candidate_cross_entropy_scratch(K, B)}, out.options());
  if (logits.scalar_type() == at::kFloat) {
    cuda::launch_candidate_cross_entropy_f32(logits.const_data_ptr<float>(),
                                             target.const_data_ptr<int64_t>(), K, B, C,
                                             out.mutable_data_ptr<double>(),
                                             scratch.mutable_data_ptr<double>(), stream);
  } else {
    cuda::launch_candidate_cross_entropy_f64(logits.const_data_ptr<double>(),
                                             target.const_data_ptr<int64_t>(), K, B, C,
                                             out.mutable_data_ptr<double>(),
                                             scratch.mutable_data_ptr<double>(), stream);
  }

  const int bad = first_invalid.item<int>();  // synchronises with the stream
  if (bad < B) {
    TORCH_CHECK(false, invalid_target_message(bad, target[bad].item<int64_t>(), C));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rso_ext, CUDA, m) {
  m.impl("candidate_cross_entropy", &candidate_cross_entropy_cuda);
}

}  // namespace rso
