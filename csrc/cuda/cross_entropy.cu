// CUDA kernels for the summed softmax cross-entropy of K candidate logit sets.
// No torch headers here: see kernels.h.
#include "kernels.h"

#include <cub/cub.cuh>

#include "../common/math.h"
#include "launch.cuh"

namespace rso {
namespace cuda {
namespace {

constexpr int kCrossEntropyThreads = 256;
constexpr int kTargetCheckThreads = 256;
constexpr int kTargetCheckMaxBlocks = 1024;

// Stage 1: block (c, k) sums the per-sample cross-entropies of candidate k over samples
// [c * kLossChunk, (c + 1) * kLossChunk) into partial[k * gridDim.x + c]. Thread t
// handles the chunk's samples t, t + kThreads, ... in order and the block reduces the per-thread
// partials with a fixed-shape CUB tree, so every partial is bitwise reproducible.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_partials_kernel(const T* __restrict__ logits,
                                  const int64_t* __restrict__ target, int B, int C,
                                  double* __restrict__ partial) {
  const int k = blockIdx.y;
  const int b0 = blockIdx.x * kLossChunk;
  const int b1 = min(B, b0 + kLossChunk);
  const T* candidate = logits + static_cast<int64_t>(k) * B * C;

  double sum = 0.0;
  for (int b = b0 + threadIdx.x; b < b1; b += kThreads) {
    const int64_t t = target[b];
    sum += (t >= 0 && t < C)
               ? math::sample_cross_entropy(candidate + static_cast<int64_t>(b) * C, C, t)
               : static_cast<double>(NAN);
  }

  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp_storage;
  const double total = BlockReduce(temp_storage).Sum(sum);
  if (threadIdx.x == 0) {
    partial[static_cast<int64_t>(k) * gridDim.x + blockIdx.x] = total;
  }
}

// Stage 2: block k adds candidate k's `chunks` partials in the same fixed order.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const double* __restrict__ partial, int chunks,
                        double* __restrict__ out) {
  const int k = blockIdx.x;
  double sum = 0.0;
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    sum += partial[static_cast<int64_t>(k) * chunks + c];
  }
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp_storage;
  const double total = BlockReduce(temp_storage).Sum(sum);
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
                                    int C, double* out, double* scratch, cudaStream_t stream) {
  if (K <= 0) {
    return;
  }
  const int chunks = loss_chunks(B);
  if (chunks <= 1) {  // one block per candidate: its partial is the sum
    cross_entropy_partials_kernel<T, kCrossEntropyThreads>
        <<<dim3(1, K), kCrossEntropyThreads, 0, stream>>>(logits, target, B, C, out);
    throw_if_launch_failed("cross_entropy_partials_kernel");
    return;
  }
  cross_entropy_partials_kernel<T, kCrossEntropyThreads>
      <<<dim3(chunks, K), kCrossEntropyThreads, 0, stream>>>(logits, target, B, C, scratch);
  throw_if_launch_failed("cross_entropy_partials_kernel");
  launch_sum_loss_chunks(scratch, K, chunks, out, stream);
}

}  // namespace

int candidate_cross_entropy_scratch(int K, int B) { return K * loss_chunks(B); }

void launch_sum_loss_chunks(const double* partial, int K, int chunks, double* out,
                            cudaStream_t stream) {
  if (K <= 0) {
    return;
  }
  sum_partials_kernel<kCrossEntropyThreads><<<K, kCrossEntropyThreads, 0, stream>>>(
      partial, chunks, out);
  throw_if_launch_failed("sum_partials_kernel");
}

void launch_candidate_cross_entropy_f32(const float* logits, const int64_t* target,
                                        int K, int B, int C, double* out, double* scratch,
                                        cudaStream_t stream) {
  launch_candidate_cross_entropy<float>(logits, target, K, B, C, out, scratch, stream);
}

void launch_candidate_cross_entropy_f64(const double* logits, const int64_t* target,
                                        int K, int B, int C, double* out, double* scratch,
                                        cudaStream_t stream) {
  launch_candidate_cross_entropy<double>(logits, target, K, B, C, out, scratch, stream);
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
