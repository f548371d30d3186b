// A lowered network suffix: the swept layer (op 0) and every op after it, as the
// Python planner (rso_ext/fused/) encodes it, and the dense/single-channel passes the
// fused candidate evaluation runs over it.
//
// Encoding (one entry per op, 4 integer params and 4 optional tensors per op):
//   kind 0 Conv2d      p = {stride_h, stride_w, pad_h, pad_w}   t = {weight, bias?}
//   kind 1 Linear      p = {}                                   t = {weight, bias?}
//   kind 2 BatchNorm   p = {batch_stats (1) or running (0)}     t = {gamma, beta, mean?, var?}, eps
//   kind 3 ReLU
//   kind 4 AvgPool2d   p = {kernel, stride, padding}   (count_include_pad, floor mode)
//   kind 5 MaxPool2d   p = {kernel, stride, padding}
//   kind 6 global average pool to [N, C, 1, 1]
//   kind 7 Flatten     to [N, -1]
//
// Residual networks (any module the planner traces, not only nn.Sequential) add four kinds
// that move values between the "current" tensor and numbered slots, so that a program in
// execution order can branch and join:
//   kind 8  Save       p = {slot}          slot <- current (current unchanged)
//   kind 9  Load       p = {slot}          current <- slot
//   kind 10 Input      t = {side [N, ...]}  current <- side[idx]: a tensor cached over the pool
//                                           that does not depend on the swept layer
//   kind 11 Add        p = {slot, from_side}, t = {side [N, ...] when from_side}
//                                           current <- current + slot (or + side[idx])
// A program holding any of them is a "dag" program; the fused evaluation runs it with
// evaluate_dag (fused_dag.cpp). Sequential programs never hold them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <optional>
#include <string>
#include <vector>

namespace rso {

enum class OpKind : int64_t {
  Conv = 0, Linear = 1, BatchNorm = 2, ReLU = 3, AvgPool = 4, MaxPool = 5, GlobalAvgPool = 6,
  Flatten = 7, Save = 8, Load = 9, Input = 10, Add = 11
};

constexpr int64_t kMaxSlots = 64;

struct Op {
  OpKind kind;
  int64_t p[4] = {0, 0, 0, 0};
  double eps = 0.0;
  at::Tensor t[4];
  bool mixing() const { return kind == OpKind::Conv || kind == OpKind::Linear; }
};

struct Program {
  std::vector<Op> ops;  // ops[0]: the swept conv/linear layer
  int64_t next = -1;    // index of the first conv/linear after ops[0], -1 if none
  bool dag = false;     // holds Save/Load/Input/Add ops
  int64_t slots = 0;    // 1 + the highest slot a Save/Load/Add names
};

// Test switch (rso_ext.ops.device_generic_paths): while on, CPU tensors take the
// device-generic code the CUDA backend runs (ATen passes, channel_candidates_aten, the default
// recompute and refresh of a lazy channel, the device logits head's kernels as CPU loops
// instead of the CPU logits head) instead of the hand-written CPU passes, so that the CPU tests
// exercise that code too. Off by default.
bool device_generic_paths();  // the switch, or a reduce group (below) is set
bool device_generic_switch();
void set_device_generic_paths(bool on);

// Data-parallel evaluation over torch.distributed (rso_ext.ops.reduce_across; docs/design.md
// §8): while a group name is set, each process evaluates its shard of every minibatch, and
// what depends on the whole minibatch is added across the group's ranks: the BatchNorm batch
// statistics (float64 sums and sums of squares, all_reduce_sum) and the candidates' summed
// losses (the fused operators' callers of evaluate). The device-generic paths run meanwhile
// (the hand-written CPU passes and heads compute their statistics locally). Empty: one process.
const std::string& reduce_group();
void set_reduce_group(const std::string& group_name);
// `t` summed over the ranks of reduce_group() (torch's functional all_reduce through the
// dispatcher, waited for); `t` itself when no group is set.
at::Tensor all_reduce_sum(const at::Tensor& t);

// Parses and checks the encoding above (TORCH_CHECK errors name the op and the problem).
// `swept_first`: op 0 must be the swept conv/linear layer (the fused evaluation's programs).
Program parse_program(at::IntArrayRef kinds, at::IntArrayRef params, at::ArrayRef<double> eps,
                      const c10::List<std::optional<at::Tensor>>& tensors,
                      bool swept_first = true);

// Folds every AvgPool2d (kernel = stride = P >= 2, no padding) that directly follows a
// stride-1 Conv2d at op 1 or later of a sequential program into that conv: a conv with the
// kernel averaged over the P x P window (kh + P - 1 taps a side) and stride P computes the
// pooled output (the same sums, in another order: rounding aside, and floor mode included)
// with a quarter of the outputs for P = 2 and without the full-resolution intermediate. The
// pool becomes a 1 x 1 pool of stride 1, which the passes skip. Op 0, the swept layer, keeps
// its weights (they change during a sweep); the others are fixed for a call.
void fold_avg_pools(Program& prog);

// One op over a batch made of `groups` equal groups of samples; BatchNorm with batch
// statistics normalises each group with its own statistics (one group per candidate).
at::Tensor apply_dense(const Op& op, const at::Tensor& x, int64_t groups);

// Ops [begin, end) of `prog` densely over `x`, as apply_dense one after the other; `x` is a
// temporary of the caller's, which the CPU passes may overwrite (a BatchNorm followed by a
// ReLU is then one pass in place). `plane_sums`, when defined (cpu::mixing_single_add's), are
// the per-plane sums of `x` that a BatchNorm at `begin` takes for its statistics on the CPU.
// On the CPU a float32 convolution of 8+ channels runs channels-last, its input written in
// that layout by the BatchNorm (+ ReLU) pass before it; what run_dense returns is contiguous.
at::Tensor run_dense(const Program& prog, int64_t begin, int64_t end, at::Tensor x,
                     int64_t groups, const at::Tensor& plane_sums = at::Tensor());

// run_dense(prog, 1, end, x, 1) with x = z[rows] [B, C, ...] whose channel o is replaced by
// channel_o [B, 1, ...] where o >= 0 and channel_o is defined: the ops after the swept layer
// (prog.ops[0]) over a minibatch of its cached output. On the CPU a pooling op first reads
// the rows where they lie, so the minibatch is never gathered at full resolution.
at::Tensor run_dense_rows(const Program& prog, int64_t end, const at::Tensor& z,
                          const at::Tensor& rows, int64_t o, const at::Tensor& channel_o);

// The same op on channel `o` alone: `x` is [G*B, 1, ...] (or [G*B, w] after Flatten), G
// groups. A BatchNorm takes channel o's parameters, or per-group `gamma`/`beta` [G] when
// given (the candidates of a swept BatchNorm parameter).
at::Tensor apply_single(const Op& op, const at::Tensor& x, int64_t o, int64_t groups,
                        const at::Tensor& gamma, const at::Tensor& beta);

// Contribution of channel `o`'s change `dx` to the output of mixing op `op` (a
// single-input-channel convolution, or a rank-w update for a linear layer whose input
// block of channel o is w features wide).
at::Tensor mixing_single(const Op& op, const at::Tensor& dx, int64_t o);

// The mixing op's output for `groups` changes of channel o: base [B, Cn, ...] (its output for
// the shared state) plus mixing_single(dx) [G*B, ...] for each group; [G*B, Cn, ...].
at::Tensor mixing_single_add(const Op& op, const at::Tensor& base, const at::Tensor& dx,
                             int64_t o, int64_t groups);

// mixing_single_add of the mixing op prog.ops[i], then ops i+1 .. end-1 densely (run_dense).
// On the CPU a batch-statistics BatchNorm right after the mixing op takes its statistics from
// the pass that writes the mixing op's output, which is then read once (normalised in place)
// instead of twice.
at::Tensor single_add_then_dense(const Program& prog, int64_t i, int64_t end,
                                 const at::Tensor& base, const at::Tensor& dx, int64_t o,
                                 int64_t groups);

}  // namespace rso
