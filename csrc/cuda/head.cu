// CUDA kernels of the device logits head (csrc/core/device_head.h; glue in fused_backend.cpp):
// one thread per element, each running the per-element formula of csrc/common/head_math.h
// that the CPU loops (csrc/cpu/device_head_loops.cpp) run too. No torch headers (kernels.h).
#include "kernels.h"

#include "../common/head_math.h"
#include "launch.cuh"

namespace rso {
namespace cuda {
namespace {

template <typename T>
__global__ void head_moments_kernel(math::HeadGeom g, const T* __restrict__ z,
                                    const T* __restrict__ x, const T* __restrict__ vals,
                                    const T* __restrict__ entry,
                                    const int64_t* __restrict__ idx, double* __restrict__ m,
                                    double* __restrict__ q) {
  for (int64_t e = first_element(); e < (g.C + g.K) * g.B; e += grid_stride()) {
    math::head_row_moments(g, z, x, vals, entry, idx, e / g.B, e % g.B, m, q);
  }
}

__global__ void head_chunk_sums_kernel(const double* __restrict__ a, int64_t B, int64_t rows,
                                       double* __restrict__ partial) {
  const int64_t chunks = math::head_sum_chunks(B);
  for (int64_t e = first_element(); e < rows * chunks; e += grid_stride()) {
    math::head_chunk_sum(a, B, e / chunks, e % chunks, partial);
  }
}

__global__ void head_row_totals_kernel(const double* __restrict__ partial, int64_t chunks,
                                       int64_t rows, double* __restrict__ out) {
  for (int64_t r = first_element(); r < rows; r += grid_stride()) {
    math::head_row_total(partial, chunks, r, out);
  }
}

template <typename T>
__global__ void head_batch_norm_kernel(math::HeadGeom g, math::HeadBatchNorm<T> bn,
                                       double* __restrict__ m, double* __restrict__ q) {
  for (int64_t e = first_element(); e < (g.C + g.K) * g.B; e += grid_stride()) {
    math::head_batch_norm(g, bn, e / g.B, e % g.B, m, q);
  }
}

__global__ void head_one_number_kernel(int64_t total, bool relu, double* __restrict__ m,
                                       double* __restrict__ q) {
  for (int64_t e = first_element(); e < total; e += grid_stride()) {
    math::one_number_moments(relu, m[e], q[e]);
  }
}

template <typename T>
__global__ void head_losses_kernel(math::HeadGeom g, const T* __restrict__ w_out,
                                   const T* __restrict__ b_out, const double* __restrict__ m,
                                   const int64_t* __restrict__ target,
                                   const int64_t* __restrict__ idx, double* __restrict__ per) {
  for (int64_t e = first_element(); e < g.K * g.B; e += grid_stride()) {
    math::head_sample_loss(g, w_out, b_out, m, target, idx, e / g.B, e % g.B, per);
  }
}

template <typename T>
void head_moments(const math::HeadGeom& g, const T* z, const T* x, const T* vals,
                  const T* entry, const int64_t* idx, double* m, double* q,
                  cudaStream_t stream) {
  const int64_t total = (g.C + g.K) * g.B;
  if (total <= 0) {
    return;
  }
  head_moments_kernel<T><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(g, z, x, vals, entry,
                                                                          idx, m, q);
  throw_if_launch_failed("head_moments_kernel");
}

template <typename T>
void head_batch_norm(const math::HeadGeom& g, const math::HeadBatchNorm<T>& bn, double* m,
                     double* q, cudaStream_t stream) {
  const int64_t total = (g.C + g.K) * g.B;
  if (total <= 0) {
    return;
  }
  head_batch_norm_kernel<T><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(g, bn, m, q);
  throw_if_launch_failed("head_batch_norm_kernel");
}

template <typename T>
void head_losses(const math::HeadGeom& g, const T* w_out, const T* b_out, const double* m,
                 const int64_t* target, const int64_t* idx, double* per, cudaStream_t stream) {
  const int64_t total = g.K * g.B;
  if (total <= 0) {
    return;
  }
  head_losses_kernel<T><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(g, w_out, b_out, m,
                                                                         target, idx, per);
  throw_if_launch_failed("head_losses_kernel");
}

}  // namespace

int64_t head_row_sums_scratch(int64_t rows, int64_t B) { return rows * math::head_sum_chunks(B); }

void launch_head_row_sums(const double* a, int64_t rows, int64_t B, double* out,
                          double* scratch, cudaStream_t stream) {
  const int64_t chunks = math::head_sum_chunks(B);
  if (rows <= 0 || chunks <= 0) {
    return;
  }
  head_chunk_sums_kernel<<<elementwise_blocks(rows * chunks), kElementwiseThreads, 0, stream>>>(a, B, rows,
                                                                                  scratch);
  throw_if_launch_failed("head_chunk_sums_kernel");
  head_row_totals_kernel<<<elementwise_blocks(rows), kElementwiseThreads, 0, stream>>>(scratch, chunks, rows,
                                                                         out);
  throw_if_launch_failed("head_row_totals_kernel");
}

void launch_head_one_number(int64_t total, bool relu, double* m, double* q,
                            cudaStream_t stream) {
  if (total <= 0) {
    return;
  }
  head_one_number_kernel<<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(total, relu, m, q);
  throw_if_launch_failed("head_one_number_kernel");
}

void launch_head_moments(const math::HeadGeom& g, const float* z, const float* x,
                         const float* vals, const float* entry, const int64_t* idx, double* m,
                         double* q, cudaStream_t stream) {
  head_moments<float>(g, z, x, vals, entry, idx, m, q, stream);
}
void launch_head_moments(const math::HeadGeom& g, const double* z, const double* x,
                         const double* vals, const double* entry, const int64_t* idx,
                         double* m, double* q, cudaStream_t stream) {
  head_moments<double>(g, z, x, vals, entry, idx, m, q, stream);
}

void launch_head_batch_norm(const math::HeadGeom& g, const math::HeadBatchNorm<float>& bn,
                            double* m, double* q, cudaStream_t stream) {
  head_batch_norm<float>(g, bn, m, q, stream);
}
void launch_head_batch_norm(const math::HeadGeom& g, const math::HeadBatchNorm<double>& bn,
                            double* m, double* q, cudaStream_t stream) {
  head_batch_norm<double>(g, bn, m, q, stream);
}

void launch_head_losses(const math::HeadGeom& g, const float* w_out, const float* b_out,
                        const double* m, const int64_t* target, const int64_t* idx,
                        double* per, cudaStream_t stream) {
  head_losses<float>(g, w_out, b_out, m, target, idx, per, stream);
}
void launch_head_losses(const math::HeadGeom& g, const double* w_out, const double* b_out,
                        const double* m, const int64_t* target, const int64_t* idx,
                        double* per, cudaStream_t stream) {
  head_losses<double>(g, w_out, b_out, m, target, idx, per, stream);
}

}  // namespace cuda
}  // namespace rso
