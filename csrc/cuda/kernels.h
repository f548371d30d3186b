// Raw-pointer CUDA launchers. This header is deliberately free of torch headers so
// that csrc/cuda/*.cu compile with plain nvcc on any machine (see
// tools/check_cuda_compile.sh); the torch glue is csrc/cuda/*.cpp.
//
// Every launcher enqueues work on `stream` and returns without synchronising. A
// failed launch throws std::runtime_error naming the kernel and the CUDA error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/head_math.h"

namespace rso {
namespace cuda {

// out[k] = sum_b ( logsumexp(logits[k, b, :]) - logits[k, b, target[b]] ), k < K,
// accumulated in double. `logits` is contiguous [K, B, C], `target` contiguous [B],
// `out` has K doubles, `scratch` candidate_cross_entropy_scratch(K, B) doubles on the device.
// K x ceil(B / 1024) blocks each sum a chunk of samples, then one block per k adds its chunks:
// deterministic (fixed per-thread orders, fixed-shape block reductions, fixed chunks). A
// target outside [0, C) yields NaN for every k (and is never used as an index); validate with
// launch_find_first_invalid_target.
int candidate_cross_entropy_scratch(int K, int B);

// The loss kernels' chunking: a block sums kLossChunk samples of one candidate into
// partial[k * chunks + c]; launch_sum_loss_chunks adds candidate k's chunks in a fixed order.
constexpr int kLossChunk = 1024;
inline int loss_chunks(int B) { return (B + kLossChunk - 1) / kLossChunk; }
void launch_sum_loss_chunks(const double* partial, int K, int chunks, double* out,
                            cudaStream_t stream);
void launch_candidate_cross_entropy_f32(const float* logits, const int64_t* target,
                                        int K, int B, int C, double* out, double* scratch,
                                        cudaStream_t stream);
void launch_candidate_cross_entropy_f64(const double* logits, const int64_t* target,
                                        int K, int B, int C, double* out, double* scratch,
                                        cudaStream_t stream);

// *first_invalid = min(*first_invalid, smallest b with target[b] outside [0, C)).
// The caller initialises *first_invalid to B, so B afterwards means "all valid".
void launch_find_first_invalid_target(const int64_t* target, int B, int C,
                                      int* first_invalid, cudaStream_t stream);

// -- the fused candidate evaluation (fused.cu; glue in fused_backend.cpp) ---------------------
//
// The swept layer's caches: x [N, cin, h, w] (Linear: [N, cin], h = w = 1) and its
// pre-activation z [N, cout, ho, wo] (Linear: [N, cout]), both contiguous; the moved entry
// of the swept parameter sits at output channel o (input channel c, tap ky, kx for a weight).
enum class ChannelMove : int {
  kConvWeight = 0,    // z[:, o] += d * shift(x[:, c], ky, kx)
  kLinearWeight = 1,  // z[:, o] += d * x[:, c]
  kBias = 2,          // z[:, o] += d
  kNone = 3,          // a BatchNorm parameter: z does not move
};

struct ChannelSite {
  int64_t n;                      // samples in the caches (N)
  int64_t cin, h, w;              // x: channels (features) and spatial size
  int64_t cout, ho, wo;           // z: channels and spatial size
  int64_t sh, sw, ph, pw;         // the swept convolution's stride and zero padding
  int64_t o, c, ky, kx;           // the moved entry
  ChannelMove move;
};

// out[(k * B + b) * ho*wo + j] = z[idx[b], o, j] moved by d_k = vals[k] - *entry, k < K
// (the candidate's change of channel o; kNone copies channel o). `entry` is the current
// value of the moved parameter entry, read on the device.
void launch_channel_candidates(const ChannelSite& site, const float* z, const float* x,
                               const float* vals, int64_t K, const float* entry,
                               const int64_t* idx, int64_t B, float* out, cudaStream_t stream);
void launch_channel_candidates(const ChannelSite& site, const double* z, const double* x,
                               const double* vals, int64_t K, const double* entry,
                               const int64_t* idx, int64_t B, double* out, cudaStream_t stream);

// z[:, o] += *delta * (what the moved entry multiplies), over the whole pool; nothing when
// *delta == 0 (e.g. a stopped sweep). site.move must not be kNone.
void launch_move_channel(const ChannelSite& site, float* z, const float* x, const float* delta,
                         cudaStream_t stream);
void launch_move_channel(const ChannelSite& site, double* z, const double* x,
                         const double* delta, cudaStream_t stream);

// The swept layer gives the logits z [N, C] and only logit o moves, to cand[k * B + b]:
// out[k] = sum_b cross_entropy(z[idx[b]] with logit o = cand[k * B + b], target[idx[b]]),
// in double. Deterministic, chunked as launch_candidate_cross_entropy_* (`scratch`:
// candidate_cross_entropy_scratch(K, B) doubles). A label outside [0, C) yields NaN and is
// never used as an index.
void launch_logits_layer_losses(const float* z, const int64_t* target, int64_t C, int64_t o,
                                const float* cand, int K, const int64_t* idx, int B,
                                double* out, double* scratch, cudaStream_t stream);
void launch_logits_layer_losses(const double* z, const int64_t* target, int64_t C, int64_t o,
                                const double* cand, int K, const int64_t* idx, int B,
                                double* out, double* scratch, cudaStream_t stream);

// One sweep step on the device (a single thread). Unless *stopped: copies the K losses to
// losses_out, writes the decision (math::sweep_decision) to *chosen and, for a candidate j,
// sets *entry = vals[j] and *delta = vals[j] - old; a non-finite loss of candidate 0 writes
// -1, sets *stopped and leaves the entry. *delta is 0 whenever nothing moves, so the
// following launch_move_channel is a no-op; once *stopped, chosen and losses_out keep their
// initial values (-2 and NaN).
void launch_choose_and_write(const double* losses, int64_t K, const float* vals, float* entry,
                             float* delta, int64_t* chosen, double* losses_out, int* stopped,
                             cudaStream_t stream);
void launch_choose_and_write(const double* losses, int64_t K, const double* vals,
                             double* entry, double* delta, int64_t* chosen, double* losses_out,
                             int* stopped, cudaStream_t stream);

// *delta = value - *entry; *entry = value (a single thread).
void launch_set_entry(float* entry, float value, float* delta, cudaStream_t stream);
void launch_set_entry(double* entry, double value, double* delta, cudaStream_t stream);

// -- the device logits head (head.cu; glue in fused_backend.cpp, csrc/core/device_head.h) -----
//
// Each launcher runs one per-element formula of csrc/common/head_math.h over its elements:
// head_row_moments over [C + K][B], head_batch_norm over [C + K][B], one_number_moments over
// `total` (m, q of that many elements), head_sample_loss over [K][B].
void launch_head_moments(const math::HeadGeom& g, const float* z, const float* x,
                         const float* vals, const float* entry, const int64_t* idx, double* m,
                         double* q, cudaStream_t stream);
void launch_head_moments(const math::HeadGeom& g, const double* z, const double* x,
                         const double* vals, const double* entry, const int64_t* idx,
                         double* m, double* q, cudaStream_t stream);
void launch_head_batch_norm(const math::HeadGeom& g, const math::HeadBatchNorm<float>& bn,
                            double* m, double* q, cudaStream_t stream);
void launch_head_batch_norm(const math::HeadGeom& g, const math::HeadBatchNorm<double>& bn,
                            double* m, double* q, cudaStream_t stream);
void launch_head_one_number(int64_t total, bool relu, double* m, double* q,
                            cudaStream_t stream);
void launch_head_losses(const math::HeadGeom& g, const float* w_out, const float* b_out,
                        const double* m, const int64_t* target, const int64_t* idx,
                        double* per, cudaStream_t stream);
void launch_head_losses(const math::HeadGeom& g, const double* w_out, const double* b_out,
                        const double* m, const int64_t* target, const int64_t* idx,
                        double* per, cudaStream_t stream);

// out[r] = sum of row r of a [rows][B], r < rows, in math::head_chunk_sum's order (the CPU
// loops' too): `scratch` holds head_row_sums_scratch(rows, B) doubles on the device.
int64_t head_row_sums_scratch(int64_t rows, int64_t B);
void launch_head_row_sums(const double* a, int64_t rows, int64_t B, double* out,
                          double* scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace rso
