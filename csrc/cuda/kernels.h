// Raw-pointer CUDA launchers. This header is deliberately free of torch headers so
// that csrc/cuda/*.cu compile with plain nvcc on any machine (see
// tools/check_cuda_compile.sh); the torch glue lives in csrc/core/*_cuda.cpp.
//
// Every launcher enqueues work on `stream` and returns without synchronising. A
// failed launch throws std::runtime_error naming the kernel and the CUDA error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rso {
namespace cuda {

// out[k] = sum_b ( logsumexp(logits[k, b, :]) - logits[k, b, target[b]] ), k < K,
// accumulated in double. `logits` is contiguous [K, B, C], `target` contiguous [B],
// `out` has K doubles. Deterministic: one block per k, a fixed per-thread order and
// a fixed-shape block reduction. A target outside [0, C) yields NaN for every k
// (and is never used as an index); validate with launch_find_first_invalid_target.
void launch_candidate_cross_entropy_f32(const float* logits, const int64_t* target,
                                        int K, int B, int C, double* out,
                                        cudaStream_t stream);
void launch_candidate_cross_entropy_f64(const double* logits, const int64_t* target,
                                        int K, int B, int C, double* out,
                                        cudaStream_t stream);

// *first_invalid = min(*first_invalid, smallest b with target[b] outside [0, C)).
// The caller initialises *first_invalid to B, so B afterwards means "all valid".
void launch_find_first_invalid_target(const int64_t* target, int B, int C,
                                      int* first_invalid, cudaStream_t stream);

}  // namespace cuda
}  // namespace rso
