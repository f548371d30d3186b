// Hand-written CPU passes of the channel-local program ops (program_passes.h).
#include "program_passes.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#include "../core/program.h"
#include "clones.h"


namespace rso {
namespace cpu {

template <typename T>
RSO_CPU_CLONES void sums(const T* p, int64_t n, double& s1, double& s2) {
  // explicit vectors of 4 doubles (one AVX2 register; GCC leaves the plain loop scalar, and
  // 8-double vectors spill on AVX2), four of each sum; value 16 i + 4 r + j goes to lane j of
  // vector r. At the end the partial sums of values m and m + 8 (mod 16) are added for
  // m = 0..7 in turn: the order of the former 8-double vectors, so the sums are unchanged.
  typedef double d4 __attribute__((vector_size(32)));
  typedef T t4 __attribute__((vector_size(4 * sizeof(T))));
  d4 a0 = {}, a1 = {}, a2 = {}, a3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    t4 x0, x1, x2, x3;
    std::memcpy(&x0, p + i, sizeof(t4));
    std::memcpy(&x1, p + i + 4, sizeof(t4));
    std::memcpy(&x2, p + i + 8, sizeof(t4));
    std::memcpy(&x3, p + i + 12, sizeof(t4));
    const d4 v0 = __builtin_convertvector(x0, d4);
    const d4 v1 = __builtin_convertvector(x1, d4);
    const d4 v2 = __builtin_convertvector(x2, d4);
    const d4 v3 = __builtin_convertvector(x3, d4);
    a0 += v0;
    q0 += v0 * v0;
    a1 += v1;
    q1 += v1 * v1;
    a2 += v2;
    q2 += v2 * v2;
    a3 += v3;
    q3 += v3 * v3;
  }
  double t1 = 0.0, t2 = 0.0;
  for (int j = 0; j < 4; ++j) {
    t1 += a0[j] + a2[j];
    t2 += q0[j] + q2[j];
  }
  for (int j = 0; j < 4; ++j) {
    t1 += a1[j] + a3[j];
    t2 += q1[j] + q3[j];
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(p[i]);
    t1 += v;
    t2 += v * v;
  }
  s1 += t1;
  s2 += t2;
}

template void sums<float>(const float*, int64_t, double&, double&);
template void sums<double>(const double*, int64_t, double&, double&);

namespace {

// out = (x - center) * scale + shift (then max(., 0) when relu), elementwise over n values.
template <typename T>
RSO_CPU_CLONES void affine(const T* x, T* out, int64_t n, T center, T scale, T shift, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = (x[i] - center) * scale + shift;
      out[i] = v > T(0) ? v : (v == v ? T(0) : v);  // NaN passes, as at::relu
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = (x[i] - center) * scale + shift;
    }
  }
}

template <typename T>
RSO_CPU_CLONES void relu_range(const T* x, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    out[i] = v > T(0) ? v : (v == v ? T(0) : v);
  }
}

// 2x2 windows, stride 2, no padding: the paper nets' pooling.
template <typename T>
RSO_CPU_CLONES void pool2x2_plane(const T* x, T* out, int64_t W, int64_t Ho, int64_t Wo,
                                  bool avg) {
  for (int64_t oy = 0; oy < Ho; ++oy) {
    const T* r0 = x + 2 * oy * W;
    const T* r1 = r0 + W;
    T* o = out + oy * Wo;
    if (avg) {
      for (int64_t ox = 0; ox < Wo; ++ox) {
        o[ox] = ((r0[2 * ox] + r0[2 * ox + 1]) + (r1[2 * ox] + r1[2 * ox + 1])) / T(4);
      }
    } else {
      for (int64_t ox = 0; ox < Wo; ++ox) {
        T m = -std::numeric_limits<T>::infinity();
        for (const T v : {r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]}) {
          m = (v > m || v != v) ? v : m;
        }
        o[ox] = m;
      }
    }
  }
}

template <typename T>
RSO_CPU_CLONES void pool_plane(const T* x, T* out, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                               int64_t k, int64_t s, int64_t p, bool avg) {
  for (int64_t oy = 0; oy < Ho; ++oy) {
    for (int64_t ox = 0; ox < Wo; ++ox) {
      int64_t y0 = oy * s - p, x0 = ox * s - p;
      int64_t y1 = std::min(y0 + k, H + p), x1 = std::min(x0 + k, W + p);
      const int64_t pool_size = (y1 - y0) * (x1 - x0);
      y0 = std::max<int64_t>(y0, 0);
      x0 = std::max<int64_t>(x0, 0);
      y1 = std::min(y1, H);
      x1 = std::min(x1, W);
      if (avg) {
        T sum = 0;
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t xx = x0; xx < x1; ++xx) {
            sum += x[y * W + xx];
          }
        }
        out[oy * Wo + ox] = sum / static_cast<T>(pool_size);
      } else {
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t xx = x0; xx < x1; ++xx) {
            const T v = x[y * W + xx];
            if (v > m || v != v) {
              m = v;
            }
          }
        }
        out[oy * Wo + ox] = m;
      }
    }
  }
}

}  // namespace

template <typename T>
RSO_CPU_CLONES void add_taps(const ConvGeom& g, const T* in, const T* taps, int64_t tap_stride,
                             T* out) {
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const T wv = taps[(ky * g.kw + kx) * tap_stride];
      // output columns whose input column xx * sw - pw + kx lies inside [0, w)
      const int64_t x0 = std::max<int64_t>(0, (g.pw - kx + g.sw - 1) / g.sw);
      const int64_t x1 = std::min<int64_t>(g.wo, (g.w + g.pw - kx + g.sw - 1) / g.sw);
      for (int64_t y = 0; y < g.ho; ++y) {
        const int64_t iy = y * g.sh - g.ph + ky;
        if (iy < 0 || iy >= g.h) {
          continue;
        }
        const T* row = in + iy * g.w + kx - g.pw;
        T* orow = out + y * g.wo;
        if (g.sw == 1) {
          for (int64_t xx = x0; xx < x1; ++xx) {
            orow[xx] += wv * row[xx];
          }
        } else {
          for (int64_t xx = x0; xx < x1; ++xx) {
            orow[xx] += wv * row[xx * g.sw];
          }
        }
      }
    }
  }
}

namespace {

// dst[i][j] = src[i][j] + sum over taps t of wt[t * Cn + i] * in[toff[t] + j] for 8 channels
// i (rows `cstride` apart) x 8 columns j: the accumulators stay in registers.
template <typename T>
__attribute__((always_inline)) inline void block8x8(const T* in, const int64_t* toff,
                                                    int64_t taps, const T* wt, int64_t Cn,
                                                    const T* src, T* dst, int64_t cstride) {
  // one explicit vector per channel: GCC kept a T[8][8] array in memory, a load and a store
  // around every multiply-add
  typedef T v8 __attribute__((vector_size(8 * sizeof(T))));
  v8 acc[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&acc[i], src + i * cstride, sizeof(v8));
  }
  for (int64_t t = 0; t < taps; ++t) {
    v8 x;
    std::memcpy(&x, in + toff[t], sizeof(v8));
    const T* w = wt + t * Cn;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      acc[i] += w[i] * x;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    std::memcpy(dst + i * cstride, &acc[i], sizeof(v8));
  }
}

// One sample of a single-input-channel convolution to Cn (a multiple of 8) output channels,
// added to `base`: out[c] = base[c] + sum_taps wt[tap][c] * in at the tap. `pad` holds the
// input as sh * sw phase planes (phase_planes), rows `pw_` apart, and toff[t] is tap t's
// offset there, so that output (y, x) reads pad[y * pw_ + x + toff[t]] whatever the stride.
// Rows of at least 8 columns are covered by 8-wide blocks, the last one overlapping its
// neighbour (both write the same values); narrower rows go through `tmp` ([Cn, ho, 8]) so that
// the blocks never write past a row.
template <typename T>
RSO_CPU_CLONES void conv1ch_add_sample(const ConvGeom& g, int64_t Cn, const T* pad, int64_t pw_,
                                       const int64_t* toff, const T* wt, const T* base, T* tmp,
                                       T* out) {
  const int64_t taps = g.kh * g.kw;
  const int64_t plane = g.ho * g.wo;
  if (g.wo >= 8) {
    for (int64_t cb = 0; cb < Cn; cb += 8) {
      for (int64_t y = 0; y < g.ho; ++y) {
        for (int64_t xb = 0; xb < g.wo; xb += 8) {
          const int64_t x = std::min(xb, g.wo - 8);
          const int64_t off = cb * plane + y * g.wo + x;
          block8x8(pad + y * pw_ + x, toff, taps, wt + cb, Cn, base + off, out + off, plane);
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < Cn; ++c) {
    for (int64_t y = 0; y < g.ho; ++y) {
      T* dst = tmp + (c * g.ho + y) * 8;
      std::copy(base + c * plane + y * g.wo, base + c * plane + (y + 1) * g.wo, dst);
      std::fill(dst + g.wo, dst + 8, T(0));
    }
  }
  for (int64_t cb = 0; cb < Cn; cb += 8) {
    for (int64_t y = 0; y < g.ho; ++y) {
      T* t = tmp + (cb * g.ho + y) * 8;
      block8x8(pad + y * pw_, toff, taps, wt + cb, Cn, t, t, g.ho * 8);
    }
  }
  for (int64_t c = 0; c < Cn; ++c) {
    for (int64_t y = 0; y < g.ho; ++y) {
      const T* src = tmp + (c * g.ho + y) * 8;
      std::copy(src, src + g.wo, out + c * plane + y * g.wo);
    }
  }
}

}  // namespace

namespace {

// Columns a stride-1 register block reads past the output's: the padded plane's width.
int64_t padded_width(const ConvGeom& g) {
  return std::max(g.w + 2 * g.pw, std::max<int64_t>(g.wo, 8) + g.kw - 1);
}

template <typename T>
RSO_CPU_CLONES void conv_one_output_channel_s1(const ConvGeom& g, int64_t cin, const T* xs,
                                               const T* w, T bias, T* pad, T* out) {
  const int64_t hp = g.h + 2 * g.ph, wp = padded_width(g);
  for (int64_t c = 0; c < cin; ++c) {  // the interior only: the margins stay zero
    for (int64_t y = 0; y < g.h; ++y) {
      const T* src = xs + (c * g.h + y) * g.w;
      std::copy(src, src + g.w, pad + (c * hp + y + g.ph) * wp + g.pw);
    }
  }
  typedef T v8 __attribute__((vector_size(8 * sizeof(T))));
  const int64_t taps = g.kh * g.kw;
  int64_t toff[64];  // each tap's offset in a padded plane (taps <= 64, checked by the caller)
  for (int64_t t = 0; t < taps; ++t) {
    toff[t] = (t / g.kw) * wp + t % g.kw;
  }
  for (int64_t y = 0; y < g.ho; ++y) {
    for (int64_t xb = 0; xb < std::max<int64_t>(g.wo, 1); xb += 8) {
      const int64_t x = g.wo >= 8 ? std::min(xb, g.wo - 8) : 0;
      // four independent sums (input channels c mod 4, each in its own registers) so that
      // the FMA latency overlaps
      // (explicit vectors: GCC kept T[8] arrays in memory)
      v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
      const T* base = pad + y * wp + x;
      int64_t c = 0;
      for (; c + 4 <= cin; c += 4) {
        for (int64_t t = 0; t < taps; ++t) {
          const T* i0 = base + c * hp * wp + toff[t];
          v8 x0, x1, x2, x3;
          std::memcpy(&x0, i0, sizeof(v8));
          std::memcpy(&x1, i0 + hp * wp, sizeof(v8));
          std::memcpy(&x2, i0 + 2 * hp * wp, sizeof(v8));
          std::memcpy(&x3, i0 + 3 * hp * wp, sizeof(v8));
          a0 += w[c * taps + t] * x0;
          a1 += w[(c + 1) * taps + t] * x1;
          a2 += w[(c + 2) * taps + t] * x2;
          a3 += w[(c + 3) * taps + t] * x3;
        }
      }
      for (; c < cin; ++c) {
        for (int64_t t = 0; t < taps; ++t) {
          v8 x0;
          std::memcpy(&x0, base + c * hp * wp + toff[t], sizeof(v8));
          a0 += w[c * taps + t] * x0;
        }
      }
      const v8 sum = bias + ((a0 + a1) + (a2 + a3));
      T res[8];
      std::memcpy(res, &sum, sizeof(v8));
      const int64_t n = std::min<int64_t>(8, g.wo);
      std::copy(res, res + n, out + y * g.wo + x);
    }
  }
}

// out [ho, wo] = bias + one output channel of a convolution of one sample xs [cin, h, w]:
// stride 1 through the padded-plane kernel (`pad`: the zero-padded input planes, zero before the
// first call; only its interior is written), other strides through add_taps.
template <typename T>
void conv_one_output_channel(const ConvGeom& g, int64_t cin, const T* xs, const T* w, T bias,
                             T* pad, T* out) {
  if (g.sh == 1 && g.sw == 1 && g.kh * g.kw <= 64) {
    conv_one_output_channel_s1(g, cin, xs, w, bias, pad, out);
    return;
  }
  std::fill(out, out + g.ho * g.wo, bias);
  for (int64_t c = 0; c < cin; ++c) {
    add_taps<T>(g, xs + c * g.h * g.w, w + c * g.kh * g.kw, 1, out);
  }
}

}  // namespace

template <typename T>
void conv_one_output_rows(const ConvGeom& g, int64_t cin, const T* x, const int64_t* rows,
                          int64_t n, const T* w, T bias, T* out, int64_t out_stride) {
  const int64_t scratch = cin * (g.h + 2 * g.ph) * padded_width(g);
  at::parallel_for(0, n, 8, [&](int64_t a, int64_t e) {
    std::vector<T> pad(scratch);
    for (int64_t i = a; i < e; ++i) {
      const int64_t row = rows != nullptr ? rows[i] : i;
      conv_one_output_channel<T>(g, cin, x + row * cin * g.h * g.w, w, bias, pad.data(),
                                 out + i * out_stride);
    }
  });
}

template void conv_one_output_rows<float>(const ConvGeom&, int64_t, const float*,
                                          const int64_t*, int64_t, const float*, float, float*,
                                          int64_t);
template void conv_one_output_rows<double>(const ConvGeom&, int64_t, const double*,
                                           const int64_t*, int64_t, const double*, double,
                                           double*, int64_t);

template void add_taps<float>(const ConvGeom&, const float*, const float*, int64_t, float*);
template void add_taps<double>(const ConvGeom&, const double*, const double*, int64_t, double*);

at::Tensor mixing_single_add(const Op& op, const at::Tensor& base, const at::Tensor& dx,
                             int64_t o, int64_t groups, at::Tensor* plane_sums) {
  const int64_t B = base.size(0);
  if (op.kind == OpKind::Linear) {  // out[n, :] = base[n % B, :] + W[:, o*w : o*w+w] dx[n, :]
    const int64_t w = dx.size(1);
    const at::Tensor W = op.t[0].contiguous();
    const at::Tensor d = dx.contiguous();
    const at::Tensor bs = base.contiguous();
    const int64_t Cn = W.size(0), F = W.size(1);
    at::Tensor out = at::empty({groups * B, Cn}, base.options());
    AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "rso mixing_single_add", [&] {
      const scalar_t* dp = d.const_data_ptr<scalar_t>();
      const scalar_t* bp = bs.const_data_ptr<scalar_t>();
      const scalar_t* wp = W.const_data_ptr<scalar_t>() + o * w;
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, groups * B, grain_for(Cn * w), [&](int64_t a, int64_t e) {
        for (int64_t n = a; n < e; ++n) {
          const scalar_t* dn = dp + n * w;
          const scalar_t* src = bp + (n % B) * Cn;
          for (int64_t c = 0; c < Cn; ++c) {
            scalar_t acc = src[c];
            for (int64_t j = 0; j < w; ++j) {
              acc += wp[c * F + j] * dn[j];
            }
            yp[n * Cn + c] = acc;
          }
        }
      });
    });
    return out;
  }
  const at::Tensor W = op.t[0].contiguous();
  const int64_t Cn = W.size(0), Cin = W.size(1), kh = W.size(2), kw = W.size(3);
  const ConvGeom g{dx.size(2), dx.size(3), base.size(2), base.size(3), kh, kw,
                   op.p[0], op.p[1], op.p[2], op.p[3]};
  const at::Tensor d = dx.contiguous();
  const at::Tensor bs = base.contiguous();
  at::Tensor out = at::empty({groups * B, Cn, g.ho, g.wo}, base.options());
  if (Cn % 8 == 0 && kh * kw <= 64) {
    // register-blocked over phase planes: plane (a, b) holds the zero-padded input at rows
    // a, a + sh, ... and columns b, b + sw, ..., so that every tap reads 8 consecutive values
    // of one plane for 8 consecutive output columns (stride 1: one plane, the padded input)
    const int64_t hq = g.ho + (kh - 1) / g.sh;                       // rows a plane needs
    const int64_t wq = std::max<int64_t>(g.wo, 8) + (kw - 1) / g.sw;  // columns the blocks read
    const int64_t phases = g.sh * g.sw;
    int64_t toff[64];
    for (int64_t t = 0; t < kh * kw; ++t) {
      const int64_t ky = t / kw, kx = t % kw;
      toff[t] = ((ky % g.sh) * g.sw + kx % g.sw) * hq * wq + (ky / g.sh) * wq + kx / g.sw;
    }
    const at::Tensor wt = W.select(1, o).reshape({Cn, kh * kw}).t().contiguous();  // [taps, Cn]
    double* ps = nullptr;
    if (plane_sums != nullptr) {
      *plane_sums = at::empty({groups * B, Cn, 2}, base.options().dtype(at::kDouble));
      ps = plane_sums->mutable_data_ptr<double>();
    }
    AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "rso mixing_single_add", [&] {
      const scalar_t* dp = d.const_data_ptr<scalar_t>();
      const scalar_t* bp = bs.const_data_ptr<scalar_t>();
      const scalar_t* wtp = wt.const_data_ptr<scalar_t>();
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      const int64_t hw = g.ho * g.wo;
      const int64_t plane = Cn * hw;
      // the K samples g * B + b that share base sample b one after another, so that its planes
      // are read from cache K - 1 times out of K
      at::parallel_for(0, groups * B, 4, [&](int64_t a, int64_t e) {
        std::vector<scalar_t> pad(phases * hq * wq), tmp(g.wo < 8 ? Cn * g.ho * 8 : 0);
        for (int64_t i = a; i < e; ++i) {
          const int64_t n = (i % groups) * B + i / groups;
          const scalar_t* src = dp + n * g.h * g.w;
          // padded input (r, c) = src (r - ph, c - pw) goes to plane (r % sh, c % sw) at
          // (r / sh, c / sw); the cells no input value reaches stay zero
          for (int64_t y = 0; y < g.h; ++y) {
            const int64_t r = y + g.ph;
            if (r / g.sh >= hq) {
              break;
            }
            scalar_t* rowp = pad.data() + (r % g.sh) * g.sw * hq * wq + (r / g.sh) * wq;
            if (g.sw == 1) {
              const int64_t n_cols = std::min(g.w, wq - g.pw);
              std::copy(src + y * g.w, src + y * g.w + n_cols, rowp + g.pw);
              continue;
            }
            for (int64_t x = 0; x < g.w; ++x) {
              const int64_t c = x + g.pw;
              if (c / g.sw < wq) {
                rowp[(c % g.sw) * hq * wq + c / g.sw] = src[y * g.w + x];
              }
            }
          }
          conv1ch_add_sample<scalar_t>(g, Cn, pad.data(), wq, toff, wtp, bp + (n % B) * plane,
                                       tmp.data(), yp + n * plane);
          if (ps != nullptr) {  // the sample's planes, still in cache: their moments
            for (int64_t c = 0; c < Cn; ++c) {
              double s1 = 0.0, s2 = 0.0;
              sums(yp + n * plane + c * hw, hw, s1, s2);
              ps[(n * Cn + c) * 2] = s1;
              ps[(n * Cn + c) * 2 + 1] = s2;
            }
          }
        }
      });
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "rso mixing_single_add", [&] {
    const scalar_t* dp = d.const_data_ptr<scalar_t>();
    const scalar_t* bp = bs.const_data_ptr<scalar_t>();
    const scalar_t* wp = W.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const int64_t plane = g.ho * g.wo;
    at::parallel_for(0, groups * B * Cn, 16, [&](int64_t a, int64_t e) {
      for (int64_t t = a; t < e; ++t) {
        const int64_t n = t / Cn, c = t % Cn;  // sample of the K*B batch, output channel
        scalar_t* dst = yp + t * plane;
        const scalar_t* src = bp + ((n % B) * Cn + c) * plane;
        std::copy(src, src + plane, dst);
        add_taps<scalar_t>(g, dp + n * g.h * g.w, wp + (c * Cin + o) * kh * kw, 1, dst);
      }
    });
  });
  return out;
}

at::Tensor conv2d_one_output(const Op& op, const at::Tensor& x) {
  const at::Tensor W = op.t[0].contiguous();
  const ConvGeom g{x.size(2), x.size(3), (x.size(2) + 2 * op.p[2] - W.size(2)) / op.p[0] + 1,
                   (x.size(3) + 2 * op.p[3] - W.size(3)) / op.p[1] + 1, W.size(2), W.size(3),
                   op.p[0], op.p[1], op.p[2], op.p[3]};
  TORCH_CHECK(g.ho >= 1 && g.wo >= 1, "fused program: a Conv2d kernel ", W.sizes(),
              " does not fit the input ", x.sizes());
  const int64_t cin = x.size(1);
  at::Tensor out = at::empty({x.size(0), 1, g.ho, g.wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rso conv2d_one_output", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = W.const_data_ptr<scalar_t>();
    const scalar_t bias = op.t[1].defined() ? op.t[1].item<scalar_t>() : scalar_t(0);
    conv_one_output_rows<scalar_t>(g, cin, xp, nullptr, x.size(0), wp, bias,
                                   out.mutable_data_ptr<scalar_t>(), g.ho * g.wo);
  });
  return out;
}

at::Tensor conv2d_one_channel(const Op& op, const at::Tensor& x) {
  const at::Tensor& W = op.t[0];
  const int64_t ho = (x.size(2) + 2 * op.p[2] - W.size(2)) / op.p[0] + 1;
  const int64_t wo = (x.size(3) + 2 * op.p[3] - W.size(3)) / op.p[1] + 1;
  TORCH_CHECK(ho >= 1 && wo >= 1, "fused program: a Conv2d kernel ", W.sizes(),
              " does not fit the input ", x.sizes());
  // one sample's output for a zero input, [1, Cn, ho, wo]: every sample of x is a "group"
  const at::Tensor base = (op.t[1].defined() ? op.t[1].view({1, -1, 1, 1})
                                             : at::zeros({1, W.size(0), 1, 1}, x.options()))
                              .expand({1, W.size(0), ho, wo})
                              .contiguous();
  return cpu::mixing_single_add(op, base, x, /*o=*/0, x.size(0));
}

namespace {

// Row i of a tile, after the BatchNorm of a row-per-channel matrix when `center` is given:
// (v - center[i]) * scale[i] + shift[i], then max(., 0) when `relu` (NaN passes, as affine).
struct RowAffine {
  const float* center = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
  bool relu = false;
};

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

// The 8 floats of the 16 in a ++ b at indices m0..m7 (GCC's __builtin_shuffle; clang and
// GCC 12+ spell it __builtin_shufflevector, which older GCC lacks).
#if defined(__clang__)
#define RSO_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define RSO_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, i8{__VA_ARGS__})
#endif

// out[j * rows + i] = f_i(in[i * cols + j]): a [rows, cols] float matrix transposed, with
// row i mapped by the RowAffine f_i (identity by default). Whole tiles of 8 rows x 8 columns
// are transposed in registers (eight 8-float vectors, the unpack / shuffle / 128-bit permute
// sequence), the rows and columns past them one by one.
RSO_CPU_CLONES void transpose_matrix(const float* in, float* out, int64_t rows, int64_t cols,
                                     RowAffine f) {
  const f8 zero = {};
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t j0 = 0; j0 < cols8; j0 += 8) {
    for (int64_t i0 = 0; i0 < rows8; i0 += 8) {
      f8 r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        std::memcpy(&r[i], in + (i0 + i) * cols + j0, sizeof(f8));
        if (f.center != nullptr) {
          r[i] = (r[i] - f.center[i0 + i]) * f.scale[i0 + i] + f.shift[i0 + i];
          if (f.relu) {
            r[i] = r[i] > zero ? r[i] : (r[i] == r[i] ? zero : r[i]);
          }
        }
      }
      f8 t[8], u[8];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = RSO_SHUFFLE8(r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[2 * i + 1] = RSO_SHUFFLE8(r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {  // rows 0-3 (h = 0) and 4-7 (h = 1)
        const f8 a = t[4 * h], b = t[4 * h + 1], c = t[4 * h + 2], d = t[4 * h + 3];
        u[4 * h] = RSO_SHUFFLE8(a, c, 0, 1, 8, 9, 4, 5, 12, 13);
        u[4 * h + 1] = RSO_SHUFFLE8(a, c, 2, 3, 10, 11, 6, 7, 14, 15);
        u[4 * h + 2] = RSO_SHUFFLE8(b, d, 0, 1, 8, 9, 4, 5, 12, 13);
        u[4 * h + 3] = RSO_SHUFFLE8(b, d, 2, 3, 10, 11, 6, 7, 14, 15);
      }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {  // columns j and j + 4 of the tile
        const f8 lo = RSO_SHUFFLE8(u[j], u[4 + j], 0, 1, 2, 3, 8, 9, 10, 11);
        const f8 hi = RSO_SHUFFLE8(u[j], u[4 + j], 4, 5, 6, 7, 12, 13, 14, 15);
        std::memcpy(out + (j0 + j) * rows + i0, &lo, sizeof(f8));
        std::memcpy(out + (j0 + j + 4) * rows + i0, &hi, sizeof(f8));
      }
    }
  }
  auto one = [&](int64_t i, int64_t j) {
    float v = in[i * cols + j];
    if (f.center != nullptr) {
      v = (v - f.center[i]) * f.scale[i] + f.shift[i];
      if (f.relu) {
        v = v > 0.0f ? v : (v == v ? 0.0f : v);
      }
    }
    out[j * rows + i] = v;
  };
  for (int64_t i = rows8; i < rows; ++i) {
    for (int64_t j = 0; j < cols8; ++j) {
      one(i, j);
    }
  }
  for (int64_t j = cols8; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) {
      one(i, j);
    }
  }
}

// Every sample's [rows, cols] block of `in` transposed into `out`, parallel over samples;
// sample n's rows mapped by affine(n) (a RowAffine).
template <typename F>
void transpose_samples(const float* in, float* out, int64_t n, int64_t rows, int64_t cols,
                       const F& affine) {
  at::parallel_for(0, n, grain_for(rows * cols), [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      transpose_matrix(in + i * rows * cols, out + i * rows * cols, rows, cols, affine(i));
    }
  });
}

void transpose_samples(const float* in, float* out, int64_t n, int64_t rows, int64_t cols) {
  transpose_samples(in, out, n, rows, cols, [](int64_t) { return RowAffine{}; });
}

}  // namespace

bool channels_last_conv(const Op& op, const at::Tensor& x) {
  return !device_generic_paths() && op.kind == OpKind::Conv && x.device().is_cpu() &&
         x.scalar_type() == at::kFloat && x.dim() == 4 && op.t[0].size(0) >= 8 &&
         op.t[0].size(1) >= 8 &&
         (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast));
}

at::Tensor conv2d_channels_last(const Op& op, const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor xl = x;
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    xl = at::empty({N, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    transpose_samples(x.const_data_ptr<float>(), xl.mutable_data_ptr<float>(), N, C, H * W);
  }
  const at::Tensor y = at::conv2d(xl, op.t[0].contiguous(at::MemoryFormat::ChannelsLast), op.t[1],
                                  {op.p[0], op.p[1]}, {op.p[2], op.p[3]});
  if (!y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return y.contiguous();
  }
  const int64_t Co = y.size(1), P = y.size(2) * y.size(3);
  at::Tensor out = at::empty(y.sizes(), x.options());
  transpose_samples(y.const_data_ptr<float>(), out.mutable_data_ptr<float>(), N, P, Co);
  return out;
}

bool handles(const at::Tensor& x) {
  return !device_generic_paths() && x.device().is_cpu() && x.is_contiguous() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

at::Tensor batch_norm(const Op& op, const at::Tensor& x, int64_t groups, int64_t o,
                      const at::Tensor& gamma, const at::Tensor& beta, bool relu, bool inplace,
                      const at::Tensor& plane_sums, bool channels_last) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t B = N / groups;
  const int64_t HW = N * C == 0 ? 0 : x.numel() / (N * C);
  const bool batch_stats = op.p[0] == 1;
  const bool group_gamma = gamma.defined(), group_beta = beta.defined();
  TORCH_CHECK(!channels_last ||
                  (x.dim() == 4 && o < 0 && !inplace && x.scalar_type() == at::kFloat),
              "fused program: a channels-last BatchNorm output needs a dense float32 "
              "[N, C, H, W] input and a new output, got ", x.sizes());
  const auto layout = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = inplace ? x : at::empty(x.sizes(), x.options().memory_format(layout));
  // channels_last: every (group, channel)'s centre, scale and shift, applied afterwards
  // while each sample is transposed
  std::vector<float> coef(channels_last ? 3 * groups * C : 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rso batch_norm", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const at::Tensor g_t = (group_gamma ? gamma : op.t[0]).contiguous().to(x.scalar_type());
    const at::Tensor b_t = (group_beta ? beta : op.t[1]).contiguous().to(x.scalar_type());
    const scalar_t* gp = g_t.const_data_ptr<scalar_t>();
    const scalar_t* bp = b_t.const_data_ptr<scalar_t>();
    at::Tensor rm, rv;
    if (!batch_stats) {
      rm = op.t[2].contiguous().to(at::kDouble);
      rv = op.t[3].contiguous().to(at::kDouble);
    }
    const double* ps = plane_sums.defined() ? plane_sums.const_data_ptr<double>() : nullptr;
    const int64_t grain = grain_for(2 * B * HW);
    at::parallel_for(0, groups * C, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / C, c = t % C;
        const int64_t ch = o < 0 ? c : o;  // the channel of the op's parameters
        double mean, var;
        if (batch_stats) {
          double s1 = 0.0, s2 = 0.0;
          if (ps != nullptr) {  // the planes' moments from the pass that wrote x
            for (int64_t b = 0; b < B; ++b) {
              s1 += ps[((g * B + b) * C + c) * 2];
              s2 += ps[((g * B + b) * C + c) * 2 + 1];
            }
          } else {
            for (int64_t b = 0; b < B; ++b) {
              double p1 = 0.0, p2 = 0.0;
              sums(xp + ((g * B + b) * C + c) * HW, HW, p1, p2);
              s1 += p1;
              s2 += p2;
            }
          }
          const double n = static_cast<double>(B * HW);
          mean = s1 / n;
          var = std::max(s2 / n - mean * mean, 0.0);
        } else {
          mean = rm.const_data_ptr<double>()[ch];
          var = rv.const_data_ptr<double>()[ch];
        }
        const double gm = static_cast<double>(group_gamma ? gp[g] : gp[ch]);
        const double bt = static_cast<double>(group_beta ? bp[g] : bp[ch]);
        const scalar_t m = static_cast<scalar_t>(mean);
        const scalar_t sc = static_cast<scalar_t>(gm / std::sqrt(var + op.eps));
        const scalar_t sh = static_cast<scalar_t>(bt);
        if (channels_last) {
          coef[t] = static_cast<float>(m);
          coef[groups * C + t] = static_cast<float>(sc);
          coef[2 * groups * C + t] = static_cast<float>(sh);
          continue;
        }
        for (int64_t b = 0; b < B; ++b) {
          const int64_t off = ((g * B + b) * C + c) * HW;
          affine(xp + off, yp + off, HW, m, sc, sh, relu);
        }
      }
    });
  });
  if (channels_last) {
    const float* cp = coef.data();
    transpose_samples(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), N, C, HW,
                      [&](int64_t n) {
                        const int64_t first = n / B * C;  // sample n's group's channel 0
                        return RowAffine{cp + first, cp + groups * C + first,
                                         cp + 2 * groups * C + first, relu};
                      });
  }
  return out;
}

at::Tensor relu(const at::Tensor& x, bool inplace) {
  at::Tensor out = inplace ? x : at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rso relu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t a, int64_t b) {
      relu_range(xp + a, yp + a, b - a);
    });
  });
  return out;
}

at::Tensor pool2d(const Op& op, const at::Tensor& x) {
  return pool2d_rows(op, x, at::Tensor(), -1, at::Tensor());
}

at::Tensor pool2d_rows(const Op& op, const at::Tensor& x, const at::Tensor& rows, int64_t o,
                       const at::Tensor& channel_o) {
  TORCH_CHECK(x.dim() == 4, "fused program: a pooling op needs a 4-D input, got ", x.sizes());
  const int64_t k = op.p[0], s = op.p[1], p = op.p[2];
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H + 2 * p >= k && W + 2 * p >= k && 2 * p <= k, "fused program: pooling kernel ",
              k, " with padding ", p, " does not fit the input ", x.sizes());
  const int64_t N = rows.defined() ? rows.numel() : x.size(0);
  const bool swap_o = o >= 0 && channel_o.defined();
  TORCH_CHECK(!rows.defined() || (rows.scalar_type() == at::kLong && rows.is_contiguous()),
              "fused program: pooling rows must be contiguous int64 indices");
  TORCH_CHECK(!swap_o || (channel_o.is_contiguous() && channel_o.numel() == N * H * W &&
                          channel_o.scalar_type() == x.scalar_type()),
              "fused program: the replacement channel ", channel_o.sizes(),
              " is not one contiguous [", N, ", 1, ", H, ", ", W, "] plane per row");
  const int64_t Ho = (H + 2 * p - k) / s + 1, Wo = (W + 2 * p - k) / s + 1;
  at::Tensor out = at::empty({N, C, Ho, Wo}, x.options());
  const bool avg = op.kind == OpKind::AvgPool;
  const int64_t* rp = rows.defined() ? rows.const_data_ptr<int64_t>() : nullptr;
  for (int64_t n = 0; rp != nullptr && n < N; ++n) {
    TORCH_CHECK(rp[n] >= 0 && rp[n] < x.size(0), "fused program: pooling row ", rp[n],
                " is outside the ", x.size(0), " samples");
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rso pool2d", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* cp = swap_o ? channel_o.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = grain_for(Ho * Wo * k * k);
    at::parallel_for(0, N * C, grain, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const int64_t n = i / C, c = i % C;
        const scalar_t* src = swap_o && c == o ? cp + n * H * W
                                               : xp + ((rp ? rp[n] : n) * C + c) * H * W;
        if (k == 2 && s == 2 && p == 0) {
          pool2x2_plane(src, yp + i * Ho * Wo, W, Ho, Wo, avg);
        } else {
          pool_plane(src, yp + i * Ho * Wo, H, W, Ho, Wo, k, s, p, avg);
        }
      }
    });
  });
  return out;
}

at::Tensor global_avg_pool(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fused program: global average pooling needs a 4-D input, got ",
              x.sizes());
  const int64_t planes = x.size(0) * x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor out = at::empty({x.size(0), x.size(1), 1, 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rso global_avg_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, grain_for(HW), [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        double s1 = 0.0, s2 = 0.0;
        sums(xp + i * HW, HW, s1, s2);
        yp[i] = static_cast<scalar_t>(s1 / static_cast<double>(HW));
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace rso
