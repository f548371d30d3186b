// CUDA kernels for the summed softmax cross-entropy of K candidate logit sets.
// No torch headers here: see kernels.h.
#include "kernels.h"

#include <cub/cub.cuh>

#include <stdexcept>
#include <string>

#include "../common/math.h"

namespace rso {
namespace cuda {
namespace {

constexpr int kCrossEntropyThreads = 256;
constexpr int kTargetCheckThreads = 256;
constexpr int kTargetCheckMaxBlocks = 1024;

void throw_if_launch_failed(const char* kernel_name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rso_ext: launching CUDA kernel ") +
                             kernel_name + " failed: " + cudaGetErrorString(err));
  }
}

// Block k sums the per-sample cross-entropies of candidate k. Thread t handles
// samples t, t + kThreads, ... in order; the block then reduces the per-thread
// partials with a fixed-shape CUB tree, so the result is bitwise reproducible.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    candidate_cross_entropy_sum_kernel(const T* __restrict__ logits,
                                       const int64_t* __restrict__ target, int B, int C,
                                       double* __restrict__ out) {
  const int k = blockIdx.x;
  const T* candidate = logits + static_cast<int64_t>(k) * B * C;

  double partial = 0.0;
  for (int b = threadIdx.x; b < B; b += kThreads) {
    const int64_t t = target[b];
    partial += (t >= 0 && t < C)
                   ? math::sample_cross_entropy(candidate + static_cast<int64_t>(b) * C,
                                                C, t)
                   : static_cast<double>(NAN);
  }

  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp_storage;
  const double total = BlockReduce(temp_storage).Sum(partial);
  if (threadIdx.x == 0) {
    out[k] = total;
  }
}

// Records the smallest index whose class label lies outside [0, C).
__global__ void find_first_invalid_target_kernel(const int64_t* __restrict__ target,
                                                 int B, int C, int* first_invalid) {
  for (int b = blockIdx.x * blockDim.x + threadIdx.x; b < B;
       b += gridDim.x * blockDim.x) {
    const int64_t t = target[b];
    if (t < 0 || t >= C) {
      atomicMin(first_invalid, b);
    }
  }
}

template <typename T>
void launch_candidate_cross_entropy(const T* logits, const int64_t* target, int K, int B,
                                    int C, double* out, cudaStream_t stream) {
  if (K <= 0) {
    return;
  }
  candidate_cross_entropy_sum_kernel<T, kCrossEntropyThreads>
      <<<K, kCrossEntropyThreads, 0, stream>>>(logits, target, B, C, out);
  throw_if_launch_failed("candidate_cross_entropy_sum_kernel");
}

}  // namespace

void launch_candidate_cross_entropy_f32(const float* logits, const int64_t* target,
                                        int K, int B, int C, double* out,
                                        cudaStream_t stream) {
  launch_candidate_cross_entropy<float>(logits, target, K, B, C, out, stream);
}

void launch_candidate_cross_entropy_f64(const double* logits, const int64_t* target,
                                        int K, int B, int C, double* out,
                                        cudaStream_t stream) {
  launch_candidate_cross_entropy<double>(logits, target, K, B, C, out, stream);
}

void launch_find_first_invalid_target(const int64_t* target, int B, int C,
                                      int* first_invalid, cudaStream_t stream) {
  if (B <= 0) {
    return;
  }
  int blocks = (B + kTargetCheckThreads - 1) / kTargetCheckThreads;
  if (blocks > kTargetCheckMaxBlocks) {
    blocks = kTargetCheckMaxBlocks;
  }
  find_first_invalid_target_kernel<<<blocks, kTargetCheckThreads, 0, stream>>>(
      target, B, C, first_invalid);
  throw_if_launch_failed("find_first_invalid_target_kernel");
}

}  // namespace cuda
}  // namespace rso
