// Launch helpers shared by the .cu files of csrc/cuda/ (no torch headers: kernels.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace rso {
namespace cuda {

constexpr int kElementwiseThreads = 256;
constexpr int64_t kElementwiseMaxBlocks = 65536;  // grid-stride loops cover the rest

// Throws std::runtime_error naming the kernel when its launch failed.
inline void throw_if_launch_failed(const char* kernel_name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rso_ext: launching CUDA kernel ") + kernel_name +
                             " failed: " + cudaGetErrorString(err));
  }
}

// Blocks of kElementwiseThreads for a grid-stride loop over `total` elements.
inline int elementwise_blocks(int64_t total) {
  int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  if (blocks > kElementwiseMaxBlocks) {
    blocks = kElementwiseMaxBlocks;
  }
  return static_cast<int>(blocks);
}

#ifdef __CUDACC__
// A grid-stride loop: this thread's first element, and the step to its next.
__device__ inline int64_t first_element() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }
#endif

}  // namespace cuda
}  // namespace rso
