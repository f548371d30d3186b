// The device logits head (csrc/core/device_head.h) on CPU tensors: its kernels as plain loops
// over the same per-element formulas (csrc/common/head_math.h) the CUDA kernels run
// (csrc/cuda/head.cu). The CPU backend takes it under the device-generic test switch only
// (the CPU head, head.h, is faster), so that the CPU tests run the device head's
// orchestration and formulas.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <memory>
#include <vector>

#include "../common/head_math.h"
#include "../core/device_head.h"
#include "head.h"

namespace rso {
namespace fused {
namespace {

// Every (row, sample) of rows x B, as a CUDA kernel's threads would take them.
template <typename F>
void for_each_row_sample(int64_t rows, int64_t B, const F& f) {
  at::parallel_for(0, rows * B, 1024, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      f(e / B, e % B);
    }
  });
}

struct CpuHeadLoops {
  template <typename T>
  static void moments(const math::HeadGeom& g, const T* z, const T* x, const T* vals,
                      const T* entry, const int64_t* idx, double* m, double* q) {
    for_each_row_sample(g.C + g.K, g.B, [&](int64_t r, int64_t b) {
      math::head_row_moments(g, z, x, vals, entry, idx, r, b, m, q);
    });
  }

  static void row_sums(const math::HeadGeom& g, const double* a, int64_t rows, double* out) {
    const int64_t chunks = math::head_sum_chunks(g.B);
    std::vector<double> partial(static_cast<size_t>(rows * chunks));
    for_each_row_sample(rows, chunks, [&](int64_t r, int64_t c) {
      math::head_chunk_sum(a, g.B, r, c, partial.data());
    });
    for (int64_t r = 0; r < rows; ++r) {
      math::head_row_total(partial.data(), chunks, r, out);
    }
  }

  template <typename T>
  static void batch_norm(const math::HeadGeom& g, const math::HeadBatchNorm<T>& bn, double* m,
                         double* q) {
    for_each_row_sample(g.C + g.K, g.B, [&](int64_t r, int64_t b) {
      math::head_batch_norm(g, bn, r, b, m, q);
    });
  }

  static void one_number(const math::HeadGeom& g, bool relu, double* m, double* q) {
    for_each_row_sample(g.C + g.K, g.B, [&](int64_t r, int64_t b) {
      math::one_number_moments(relu, m[r * g.B + b], q[r * g.B + b]);
    });
  }

  template <typename T>
  static void losses(const math::HeadGeom& g, const T* w_out, const T* b_out, const double* m,
                     const int64_t* target, const int64_t* idx, double* per) {
    for_each_row_sample(g.K, g.B, [&](int64_t j, int64_t b) {
      math::head_sample_loss(g, w_out, b_out, m, target, idx, j, b, per);
    });
  }
};

}  // namespace

std::unique_ptr<Head> make_device_head_cpu(const Sweep& s, const Backend& be) {
  return make_device_head<CpuHeadLoops>(s, be);
}

}  // namespace fused
}  // namespace rso
