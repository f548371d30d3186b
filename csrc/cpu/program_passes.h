// Hand-written CPU passes for the channel-local ops of a lowered program (csrc/core/program.h):
// BatchNorm with per-group batch statistics (or fixed statistics), ReLU, average / max
// pooling and global average pooling, on contiguous float32/float64 CPU tensors.
//
// They compute what the ATen calls in csrc/core/program.cpp compute (ATen's window and divisor
// rules for pooling, biased variance for BatchNorm, statistics accumulated in float64) in one
// or two passes over memory, parallel over planes, with an AVX2 clone of every inner loop. The
// fused evaluation runs these ops on K*B-sample batches once per weight, where ATen's
// generic kernels cost as much as the convolutions.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace rso {

struct Op;

namespace cpu {

// Grain for at::parallel_for over items of `work` element operations each: ranges below about
// 16k operations stay on the calling thread (waking the pool costs more than they do).
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, work));
}

// s1 += sum and s2 += sum of squares of p[0..n), in double (sixteen partial sums in four
// vectors of four each, so the loop vectorises without reassociating a single running sum).
template <typename T>
void sums(const T* p, int64_t n, double& s1, double& s2);

// True when the CPU passes below take `x`.
bool handles(const at::Tensor& x);

// BatchNorm of `x` [G*B, C, ...] over `groups` = G equal groups of samples (each group its
// own batch statistics, unless the op holds running statistics). Dense (`o` < 0): the op's
// C channels. Single channel (`o` >= 0, C == 1): channel o's parameters, or per-group
// `gamma` and/or `beta` [G] where defined (the candidates of a swept BatchNorm parameter).
// `relu` applies a ReLU to the result in the same pass; `inplace` writes it over x.
// `plane_sums`, when defined: float64 [G*B, C, 2], the sum and sum of squares of every plane
// of x (mixing_single_add's), added up in sample order instead of reading x for them.
// `channels_last` (dense float32 [N, C, H, W], not in place): the result is written in the
// channels-last layout, for a convolution next (conv2d_channels_last).
at::Tensor batch_norm(const Op& op, const at::Tensor& x, int64_t groups, int64_t o,
                      const at::Tensor& gamma, const at::Tensor& beta, bool relu, bool inplace,
                      const at::Tensor& plane_sums = at::Tensor(), bool channels_last = false);

at::Tensor relu(const at::Tensor& x, bool inplace);

// AvgPool2d (count_include_pad, floor mode) and MaxPool2d (NaN propagates) of [N, C, H, W].
at::Tensor pool2d(const Op& op, const at::Tensor& x);

// pool2d of the samples `rows` [B] (int64) of x [N, C, H, W], read where they lie (no
// gathered copy of x[rows] first), channel o of sample i read from channel_o [B, 1, H, W]
// instead where o >= 0 and channel_o is defined: the same values as pool2d of the gather.
at::Tensor pool2d_rows(const Op& op, const at::Tensor& x, const at::Tensor& rows, int64_t o,
                       const at::Tensor& channel_o);

// Mean over the spatial positions: [N, C, H, W] -> [N, C, 1, 1].
at::Tensor global_avg_pool(const at::Tensor& x);

// The geometry of one input plane -> output plane of a 2-D convolution.
struct ConvGeom {
  int64_t h, w, ho, wo, kh, kw, sh, sw, ph, pw;
};

// out [ho, wo] += sum over taps (ky, kx) of taps[(ky * kw + kx) * tap_stride] * the input
// plane `in` [h, w] at (y * sh - ph + ky, x * sw - pw + kx), zero outside: one input
// channel's share of one output channel of a convolution.
template <typename T>
void add_taps(const ConvGeom& g, const T* in, const T* taps, int64_t tap_stride, T* out);

// out + i * out_stride [ho, wo] = bias + one output channel (weights w [cin, kh, kw]) of a
// convolution of sample rows[i] of x [N, cin, h, w] (sample i when rows is null), i < n;
// stride 1 in 8-column register blocks over all input channels of a zero-padded plane.
template <typename T>
void conv_one_output_rows(const ConvGeom& g, int64_t cin, const T* x, const int64_t* rows,
                          int64_t n, const T* w, T bias, T* out, int64_t out_stride);

// The next mixing layer on the shared state plus one change of channel o per group:
// base [B, Cn, ...] is the layer's output for the shared state and dx [G*B, 1, h, w] (conv)
// or [G*B, w] (linear) the change of channel o (its w features after Flatten) per sample
// of each group; returns [G*B, Cn, ...] = base (for every group) + the change's share.
// `plane_sums`, when given, receives the float64 [G*B, Cn, 2] sums and sums of squares of
// the output's planes, taken while each sample's output is in cache, where the register-
// blocked conv path writes it (left undefined otherwise): a BatchNorm next need not read
// the output for its statistics.
at::Tensor mixing_single_add(const Op& op, const at::Tensor& base, const at::Tensor& dx,
                             int64_t o, int64_t groups, at::Tensor* plane_sums = nullptr);

// Whether conv2d_channels_last takes the Conv2d `op` over `x`: float32 CPU [N, C, H, W],
// contiguous or channels-last, at least 8 input and 8 output channels.
bool channels_last_conv(const Op& op, const at::Tensor& x);

// A float32 Conv2d of x [N, C, H, W] through oneDNN's channels-last kernels, returned as a
// contiguous [N, Cout, Ho, Wo]: x (unless it is channels-last already) is transposed to
// [N, H, W, C] and the output back, in one register-tiled pass each (ATen's own layout
// copies of these shapes cost about as much as the convolution gains). oneDNN runs the paper
// nets' 16-channel convolutions 1.5-2x faster in that layout on AVX2.
at::Tensor conv2d_channels_last(const Op& op, const at::Tensor& x);

// A Conv2d with one output channel over x [N, cin, h, w] (conv_one_output_rows;
// oneDNN runs this shape at a few GMAC/s).
at::Tensor conv2d_one_output(const Op& op, const at::Tensor& x);

// A Conv2d with one input channel over x [N, 1, h, w] (the register-blocked correction
// kernel with a zero base: oneDNN runs this shape at a few GMAC/s).
at::Tensor conv2d_one_channel(const Op& op, const at::Tensor& x);

}  // namespace cpu
}  // namespace rso
