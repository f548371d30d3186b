// CPU steps of the fused sweep shared by the CPU backend (fused_backend.cpp) and the CPU logits
// head (head_impl.h): the Z_d update of one move and the recomputation of one channel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../common/math.h"
#include "../core/fused.h"
#include "program_passes.h"

namespace rso {
namespace fused {

// Channel o of the conv layer for pool samples rows[0..n) (all of them when rows is null)
// into out + i * out_stride.
template <typename T>
void one_channel_cpu(const Sweep& s, int64_t o, const int64_t* rows, int64_t n, T* out,
                     int64_t out_stride) {
  const Op& layer = s.prog.ops[0];
  const T* x = s.x.const_data_ptr<T>();
  const T* w = layer.t[0].const_data_ptr<T>() + o * s.cin * s.kh * s.kw;
  const T bias = layer.t[1].defined() ? layer.t[1].const_data_ptr<T>()[o] : T(0);
  const cpu::ConvGeom g{s.h, s.w, s.ho, s.wo, s.kh, s.kw, s.sh, s.sw, s.ph, s.pw};
  cpu::conv_one_output_rows<T>(g, s.cin, x, rows, n, w, bias, out, out_stride);
}

// fn(j, v) for every output position j of the swept conv layer whose input under the tap of
// `st` lies inside the input plane xp [h, w], v being that input (padding contributes 0).
template <typename T, typename Fn>
inline void for_each_tap_input(const Sweep& s, const Site& st, const T* xp, const Fn& fn) {
  for (int64_t y = 0; y < s.ho; ++y) {
    const int64_t iy = math::conv_input_coord(y, st.ky, s.sh, s.ph);
    if (iy < 0 || iy >= s.h) {
      continue;
    }
    for (int64_t xx = 0; xx < s.wo; ++xx) {
      const int64_t ix = math::conv_input_coord(xx, st.kx, s.sw, s.pw);
      if (ix >= 0 && ix < s.w) {
        fn(y * s.wo + xx, xp[iy * s.w + ix]);
      }
    }
  }
}

// Where a move finds each pool sample n's channel o of Z_d (z + n * z_step: ho*wo values) and
// the input channel c it multiplies (x + n * x_step: h*w values, one for a linear layer):
// in the caches themselves (cache_rows), or in copies laid out by channel (the CPU head's).
template <typename T>
struct MoveRows {
  T* z;
  int64_t z_step;
  const T* x;
  int64_t x_step;
};

template <typename T>
MoveRows<T> cache_rows(const Sweep& s, const Site& st) {
  return {s.z.mutable_data_ptr<T>() + st.o * s.ho * s.wo, s.cout * s.ho * s.wo,
          s.x.const_data_ptr<T>() + st.c * s.h * s.w, s.cin * s.h * s.w};
}

// Z[:, o] += d * (the input the moved entry multiplies), over the whole pool, in `rows`; then
// after_row(n, zrow) for every sample n whose channel o was visited (zrow: its ho*wo values).
template <typename T, typename AfterRow>
void apply_move_cpu(const Sweep& s, const Site& st, T d, const MoveRows<T>& rows,
                    const AfterRow& after_row) {
  if (s.kind == UnitKind::Gamma || s.kind == UnitKind::Beta || d == T(0)) {
    return;
  }
  const int64_t hwo = s.ho * s.wo;
  const int64_t N = s.x.size(0);
  at::parallel_for(0, N, cpu::grain_for(hwo), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* zrow = rows.z + n * rows.z_step;
      const T* xrow = rows.x + n * rows.x_step;
      if (s.kind == UnitKind::Bias) {
        for (int64_t j = 0; j < hwo; ++j) {
          zrow[j] += d;
        }
      } else if (!s.conv) {
        zrow[0] = math::add_product(zrow[0], d, xrow[0]);
      } else {
        for_each_tap_input(s, st, xrow, [&](int64_t j, T v) {
          zrow[j] = math::add_product(zrow[j], d, v);
        });
      }
      after_row(n, zrow);
    }
  });
}

template <typename T>
void apply_move_cpu(const Sweep& s, const Site& st, T d) {
  apply_move_cpu<T>(s, st, d, cache_rows<T>(s, st), [](int64_t, const T*) {});
}

}  // namespace fused
}  // namespace rso
