// The CPU logits head (head.h): for a swept layer whose channels reach the logits through
// one number per channel and sample -- the last linear layer, a hidden linear layer followed
// by ReLU and the output layer, a conv layer followed by BatchNorm and global average pooling
// and the output layer -- the K candidates of a weight cost O(B * classes) after the shared
// part, with no ATen call per weight.
//
// Each channel c of a sample is carried through the chain as the mean m and mean square q of
// its values over the spatial positions. BatchNorm is an affine map per channel, so
// (m, q) -> (a m + b, a^2 q + 2 a b m + b^2) stays exact, and its batch statistics are
// mean(m) and mean(q) - mean(m)^2 over the minibatch; global pooling keeps m (q = m^2 after
// it), and a ReLU acts on m once a channel is one number. A candidate moves channel o only:
// z_o + d * s (s the input the entry multiplies) has moments m + d mean(s) and
// q + 2 d mean(z_o s) + d^2 mean(s^2). The output layer then adds (a'_o - a_o) * W[:, o] to
// the current logits, or the chain's output is logit o itself.
//
// A conv sweep keeps m and q of every pool sample and channel next to Z_d (built once per
// call, updated with every move); a linear weight sweep on a large pool recomputes feature o
// per minibatch and refreshes it per neuron (as csrc/core/fused.cpp does for conv layers);
// the logits layer keeps the other logits' log-sum-exp per neuron over a small pool. The loss
// loops vectorise over samples (fast_math.h); a state with a non-finite logit takes the exact
// per-sample cross-entropy of math.h.
//
// HeadCpu<T> below holds one call's state; its members are defined by idea, each file for
// T = float and double (make_cpu_head's dtypes, instantiated at the end of the file):
//   head_sweep.cpp       the sweep loop, and the pool state it keeps exact between weights
//   head_evaluate.cpp    the K losses of one weight, from the logits
//   head_moments.cpp     the moment chain: (m, q) of every channel through the chain's ops
//   head_loss_loops.cpp  the vectorised loss loops (head_loss_loops.h)
//   head_eligible.cpp    make_cpu_head: the programs the head takes
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../core/fused.h"
#include "program_passes.h"

namespace rso {
namespace fused {

// Mean and mean square of n values (cpu::sums; every caller takes this one function, so the
// moments of a row are the same bits wherever they are computed).
template <typename T>
inline void row_moments(const T* r, int64_t n, double& m, double& q) {
  double s1 = 0.0, s2 = 0.0;
  cpu::sums(r, n, s1, s2);
  m = s1 / static_cast<double>(n);
  q = s2 / static_cast<double>(n);
}

template <typename T>
class HeadCpu final : public Head {
 public:
  // chain_end: the first op after the channel-local chain (the output Linear, or the end)
  HeadCpu(const Sweep& s, int64_t chain_end)
      : s_(s), chain_end_(chain_end), C_(s.cout), hw_(s.ho * s.wo), classes_(s.classes),
        x_(s.x.const_data_ptr<T>()), z_(s.z.const_data_ptr<T>()) {
    out_ = chain_end < static_cast<int64_t>(s_.prog.ops.size()) ? &s_.prog.ops[chain_end] : nullptr;
    for (int64_t i = 1; i < chain_end; ++i) {
      chain_has_batch_norm_ = chain_has_batch_norm_ || s_.prog.ops[i].kind == OpKind::BatchNorm;
    }
  }

  at::Tensor losses(int64_t k, const at::Tensor& vals, const at::Tensor& idx) override;

  void sweep(Backend::SweepCall& call, int64_t k0, const at::Tensor& vals,
             const at::Tensor& idx) override;

 private:
  // -- the sweep's pool state (head_sweep.cpp) ----------------------------------------------------
  // Z_d[:, o] += d * input over the pool, and the pool moments of channel o with it.
  void move(const Site& st, T d);

  // Channel o of the swept layer for pool samples rows[0..n) (all when null) into
  // out + i * stride, from X_d and the current weights.
  void recompute(int64_t o, const int64_t* rows, int64_t n, T* out, int64_t stride) const;

  // A lazy sweep's channel o over the pool, recomputed once neuron o is done.
  void refresh(int64_t o);

  // pool_m_, pool_q_: the moments of Z_d for every pool sample and channel (a conv sweep's start).
  void build_pool_moments();

  // -- the moment chain (head_moments.cpp) --------------------------------------------------------
  // Samples b0..b1 of the minibatch: the current moments of channel o into bm/bq (a conv
  // channel recomputed from its values `zo(b)`), and those of the K candidates' into cm/cq.
  template <typename ZRow>
  void candidate_moments(const Site& st, int64_t b0, int64_t b1, const int64_t* idx,
                         const ZRow& zo, const double* d, int64_t K, int64_t B);

  // The chain over G groups of rows [G][rows][B] of moments m, q, each group with its own
  // batch statistics per row: every channel (rows == C, G == 1), or channel o alone per
  // candidate (`single`, rows == 1), where the swept BatchNorm takes gamma/beta[g].
  void run_chain(double* m, double* q, int64_t G, int64_t rows, int64_t B, int64_t o,
                 bool single, const T* cand) const;

  // The current logits lt_ [classes][B] and the candidates' outputs of channel o dt_ [K][B]
  // through the chain (the output layer's inputs at_ [C][B] too).
  void chain_logits(const Site& st, const T* vals, const double* d, int64_t K,
                    const int64_t* idx, int64_t B);

  // -- the losses of one weight (head_evaluate.cpp) -----------------------------------------------
  // The current logits lt_ [classes][B] from the chain's outputs at_ [C][B].
  void output_logits(int64_t B);

  // The same for a linear layer whose chain holds no BatchNorm: z and the chain's ReLUs in
  // the model's dtype, straight from Z_d.
  void layer_logits(const Site& st, const double* d, int64_t K, const int64_t* idx, int64_t B);

  // The losses of the logits layer from the log-sum-exp of the other logits kept over the
  // pool for neuron o (computed when the sweep reaches the neuron: they do not move while its
  // weights do); false (nothing written) where a value is not finite.
  bool pool_rest_losses(const Site& st, const double* d, int64_t K, const int64_t* idx,
                        int64_t B, double* res);

  // res [K]: the losses of entry k set to each of vals [K] on the pool samples idx [B] (losses
  // above, and every weight of sweep).
  void evaluate(int64_t k, const T* vals, int64_t K, const int64_t* idx, int64_t B,
                double* res);

  // The losses from the logits one sample and candidate at a time, in double (math.h's
  // cross-entropy, which keeps NaN and infinities as they are).
  void exact_losses(int64_t o, const int64_t* idx, int64_t K, int64_t B, double* res) const;

  const Sweep s_;
  const int64_t chain_end_;
  const Op* out_;  // the output Linear in s_.prog, or null (the chain's outputs are the logits)
  bool chain_has_batch_norm_ = false;
  const int64_t C_, hw_, classes_;
  const T* x_;  // the caches' data (z_ is written through s_.z by moves)
  const T* z_;
  std::vector<double> pool_m_, pool_q_;  // [N][C]: moments of Z_d over a conv sweep's pool
  std::vector<double> bm_, bq_, cm_, cq_;  // moments: current [C][B], candidates' [K][B]
  std::vector<T> fresh_, at_, dt_, lt_, ly_, aux_, del_, ce_;
  bool lazy_ = false;  // z[:, o] recomputed per minibatch and refreshed per neuron
  bool pool_rest_ = false;          // pool_rest_losses
  int64_t rest_o_ = -1;             // the neuron rest_ holds
  std::vector<T> rest_;             // [N]: log-sum-exp of the logits but rest_o_
  std::vector<T> rest_b_;           // [B]: rest_ of the minibatch
  std::vector<T> xin_;              // [B]: the input the swept entry multiplies
  // X_d transposed [cin][N][h*w] (an input channel over the pool in one run of memory), and
  // Z_d[:, col_o_] [N][ho*wo], which moves update in place of Z_d's strided channel while
  // neuron col_o_ is swept: load_column copies it out, store_column writes it back when the
  // neuron (or the call) ends
  std::vector<T> x_cols_, col_;
  int64_t col_o_ = -1;
  void load_column(int64_t o);
  void store_column();
};

}  // namespace fused
}  // namespace rso
