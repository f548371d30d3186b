// CUDA kernels of the fused candidate evaluation (docs/design.md §2): the perturbed
// channel of the K candidates, the Z_d update of an accepted move, the O(B) losses of the
// logits layer and the device-side choose-and-write of a sweep step. No torch headers here:
// see kernels.h; the glue is fused_backend.cpp.
//
// The per-element formulas are the CPU backend's (csrc/cpu/fused_backend.cpp), through the
// shared helpers of csrc/common/math.h; math::add_product keeps z + d * x uncontracted so both
// backends move Z_d by bitwise the same amounts.
#include "kernels.h"

#include <cub/cub.cuh>

#include "../common/math.h"
#include "launch.cuh"

namespace rso {
namespace cuda {
namespace {

constexpr int kLossThreads = 256;

// Offset in x of the input that output element j of channel o reads through the swept
// convolution tap (ky, kx) for sample n, or -1 where the tap falls into the zero padding.
__device__ inline int64_t conv_tap_offset(const ChannelSite& s, int64_t n, int64_t j) {
  const int64_t iy = math::conv_input_coord(j / s.wo, s.ky, s.sh, s.ph);
  const int64_t ix = math::conv_input_coord(j % s.wo, s.kx, s.sw, s.pw);
  if (iy < 0 || iy >= s.h || ix < 0 || ix >= s.w) {
    return -1;
  }
  return ((n * s.cin + s.c) * s.h + iy) * s.w + ix;
}

// One thread per element of out [K, B, ho*wo].
template <typename T>
__global__ void channel_candidates_kernel(ChannelSite s, const T* __restrict__ z,
                                          const T* __restrict__ x, const T* __restrict__ vals,
                                          int64_t K, const T* __restrict__ entry,
                                          const int64_t* __restrict__ idx, int64_t B,
                                          T* __restrict__ out) {
  const int64_t hwo = s.ho * s.wo;
  const int64_t total = K * B * hwo;
  const T w = *entry;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % hwo;
    const int64_t r = e / hwo;
    const int64_t b = r % B;
    const int64_t k = r / B;
    const int64_t n = idx[b];
    const T zv = z[(n * s.cout + s.o) * hwo + j];
    const T d = vals[k] - w;
    T v;
    if (s.move == ChannelMove::kConvWeight) {
      const int64_t at = conv_tap_offset(s, n, j);
      v = at >= 0 ? math::add_product(zv, d, x[at]) : zv + T(0);
    } else if (s.move == ChannelMove::kLinearWeight) {
      v = math::add_product(zv, d, x[n * s.cin + s.c]);
    } else if (s.move == ChannelMove::kBias) {
      v = zv + d;
    } else {
      v = zv + T(0);
    }
    out[e] = v;
  }
}

// One thread per element of channel o of z over the pool [N, ho*wo].
template <typename T>
__global__ void move_channel_kernel(ChannelSite s, T* __restrict__ z, const T* __restrict__ x,
                                    const T* __restrict__ delta) {
  const T d = *delta;
  if (d == T(0)) {
    return;
  }
  const int64_t hwo = s.ho * s.wo;
  const int64_t total = s.n * hwo;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % hwo;
    const int64_t n = e / hwo;
    T* zp = z + (n * s.cout + s.o) * hwo + j;
    if (s.move == ChannelMove::kConvWeight) {
      const int64_t at = conv_tap_offset(s, n, j);
      if (at >= 0) {
        *zp = math::add_product(*zp, d, x[at]);
      }
    } else if (s.move == ChannelMove::kLinearWeight) {
      *zp = math::add_product(*zp, d, x[n * s.cin + s.c]);
    } else if (s.move == ChannelMove::kBias) {
      *zp = *zp + d;
    }
  }
}

// Block (c, k) sums candidate k's per-sample losses over samples [c * kLossChunk,
// (c + 1) * kLossChunk) into partial[k * gridDim.x + c]: thread t takes the chunk's samples t,
// t + kThreads, ... in order, then a fixed-shape CUB tree reduces them (bitwise reproducible).
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    logits_layer_losses_kernel(const T* __restrict__ z, const int64_t* __restrict__ target,
                               int64_t C, int64_t o, const T* __restrict__ cand,
                               const int64_t* __restrict__ idx, int B,
                               double* __restrict__ out) {
  const int k = blockIdx.y;
  const int b1 = min(B, static_cast<int>(blockIdx.x + 1) * kLossChunk);
  double partial = 0.0;
  for (int b = blockIdx.x * kLossChunk + threadIdx.x; b < b1; b += kThreads) {
    const int64_t n = idx[b];
    const T* row = z + n * C;
    const int64_t y = target[n];
    const double t = static_cast<double>(cand[static_cast<int64_t>(k) * B + b]);
    partial += (y >= 0 && y < C)
                   ? math::moved_logit_cross_entropy(row, math::log_sum_exp_except(row, C, o),
                                                     o, y, t)
                   : static_cast<double>(NAN);
  }
  using BlockReduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp_storage;
  const double total = BlockReduce(temp_storage).Sum(partial);
  if (threadIdx.x == 0) {
    out[static_cast<int64_t>(k) * gridDim.x + blockIdx.x] = total;
  }
}

// A single thread: the sweep step's decision and the weight write (see kernels.h).
template <typename T>
__global__ void choose_and_write_kernel(const double* __restrict__ losses, int64_t K,
                                        const T* __restrict__ vals, T* entry, T* delta,
                                        int64_t* chosen, double* __restrict__ losses_out,
                                        int* stopped) {
  if (*stopped != 0) {
    *delta = T(0);
    return;
  }
  for (int64_t j = 0; j < K; ++j) {
    losses_out[j] = losses[j];
  }
  const int64_t j = math::sweep_decision(losses, K);
  *chosen = j;
  if (j < 0) {
    *stopped = 1;
    *delta = T(0);
    return;
  }
  const T v = vals[j];
  const T old = *entry;
  *entry = v;
  *delta = v - old;
}

template <typename T>
__global__ void set_entry_kernel(T* entry, T value, T* delta) {
  const T old = *entry;
  *entry = value;
  *delta = value - old;
}

template <typename T>
void channel_candidates(const ChannelSite& site, const T* z, const T* x, const T* vals,
                        int64_t K, const T* entry, const int64_t* idx, int64_t B, T* out,
                        cudaStream_t stream) {
  const int64_t total = K * B * site.ho * site.wo;
  if (total <= 0) {
    return;
  }
  channel_candidates_kernel<T><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
      site, z, x, vals, K, entry, idx, B, out);
  throw_if_launch_failed("channel_candidates_kernel");
}

template <typename T>
void move_channel(const ChannelSite& site, T* z, const T* x, const T* delta,
                  cudaStream_t stream) {
  const int64_t total = site.n * site.ho * site.wo;
  if (total <= 0 || site.move == ChannelMove::kNone) {
    return;
  }
  move_channel_kernel<T><<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
      site, z, x, delta);
  throw_if_launch_failed("move_channel_kernel");
}

template <typename T>
void logits_layer_losses(const T* z, const int64_t* target, int64_t C, int64_t o, const T* cand,
                         int K, const int64_t* idx, int B, double* out, double* scratch,
                         cudaStream_t stream) {
  if (K <= 0) {
    return;
  }
  const int chunks = loss_chunks(B);
  logits_layer_losses_kernel<T, kLossThreads><<<dim3(chunks, K), kLossThreads, 0, stream>>>(
      z, target, C, o, cand, idx, B, chunks > 1 ? scratch : out);
  throw_if_launch_failed("logits_layer_losses_kernel");
  if (chunks > 1) {
    launch_sum_loss_chunks(scratch, K, chunks, out, stream);
  }
}

template <typename T>
void choose_and_write(const double* losses, int64_t K, const T* vals, T* entry, T* delta,
                      int64_t* chosen, double* losses_out, int* stopped, cudaStream_t stream) {
  choose_and_write_kernel<T>
      <<<1, 1, 0, stream>>>(losses, K, vals, entry, delta, chosen, losses_out, stopped);
  throw_if_launch_failed("choose_and_write_kernel");
}

template <typename T>
void set_entry(T* entry, T value, T* delta, cudaStream_t stream) {
  set_entry_kernel<T><<<1, 1, 0, stream>>>(entry, value, delta);
  throw_if_launch_failed("set_entry_kernel");
}

}  // namespace

void launch_channel_candidates(const ChannelSite& site, const float* z, const float* x,
                               const float* vals, int64_t K, const float* entry,
                               const int64_t* idx, int64_t B, float* out, cudaStream_t stream) {
  channel_candidates<float>(site, z, x, vals, K, entry, idx, B, out, stream);
}
void launch_channel_candidates(const ChannelSite& site, const double* z, const double* x,
                               const double* vals, int64_t K, const double* entry,
                               const int64_t* idx, int64_t B, double* out, cudaStream_t stream) {
  channel_candidates<double>(site, z, x, vals, K, entry, idx, B, out, stream);
}

void launch_move_channel(const ChannelSite& site, float* z, const float* x, const float* delta,
                         cudaStream_t stream) {
  move_channel<float>(site, z, x, delta, stream);
}
void launch_move_channel(const ChannelSite& site, double* z, const double* x,
                         const double* delta, cudaStream_t stream) {
  move_channel<double>(site, z, x, delta, stream);
}

void launch_logits_layer_losses(const float* z, const int64_t* target, int64_t C, int64_t o,
                                const float* cand, int K, const int64_t* idx, int B,
                                double* out, double* scratch, cudaStream_t stream) {
  logits_layer_losses<float>(z, target, C, o, cand, K, idx, B, out, scratch, stream);
}
void launch_logits_layer_losses(const double* z, const int64_t* target, int64_t C, int64_t o,
                                const double* cand, int K, const int64_t* idx, int B,
                                double* out, double* scratch, cudaStream_t stream) {
  logits_layer_losses<double>(z, target, C, o, cand, K, idx, B, out, scratch, stream);
}

void launch_choose_and_write(const double* losses, int64_t K, const float* vals, float* entry,
                             float* delta, int64_t* chosen, double* losses_out, int* stopped,
                             cudaStream_t stream) {
  choose_and_write<float>(losses, K, vals, entry, delta, chosen, losses_out, stopped, stream);
}
void launch_choose_and_write(const double* losses, int64_t K, const double* vals,
                             double* entry, double* delta, int64_t* chosen, double* losses_out,
                             int* stopped, cudaStream_t stream) {
  choose_and_write<double>(losses, K, vals, entry, delta, chosen, losses_out, stopped, stream);
}

void launch_set_entry(float* entry, float value, float* delta, cudaStream_t stream) {
  set_entry<float>(entry, value, delta, stream);
}
void launch_set_entry(double* entry, double value, double* delta, cudaStream_t stream) {
  set_entry<double>(entry, value, delta, stream);
}

}  // namespace cuda
}  // namespace rso
