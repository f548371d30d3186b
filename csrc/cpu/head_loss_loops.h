// The vectorised loss loops of the CPU logits head (head_impl.h): the cross-entropy of a
// minibatch whose logits move along one column or in one logit, and the log-sum-exp of every
// logit but one, over samples side by side in memory, so that each loop vectorises (fast_math.h's
// exp and log, an AVX2 clone of every loop: clones.h); all_finite tells where a state must take
// the exact loss instead. Defined in head_loss_loops.cpp for T = float and double.
#pragma once

#include <cstdint>

namespace rso {
namespace fused {

// 1 when every value is finite, else 0.
template <typename T>
int all_finite(const T* p, int64_t n);

// ce[b] = cross-entropy of logits Lt[:, b] + del[b] * w (Lt [classes][ld] transposed, label
// logit ly[b] + del[b] * wy[b]) for b < n; mx and sum are scratch of n.
template <typename T>
void moved_column_ce(const T* Lt, int64_t ld, int64_t classes, const T* w, const T* del,
                     const T* ly, const T* wy, int64_t n, T* mx, T* sum, T* ce);

// rest[b] = log-sum-exp of the logits Lt[c][b], c != skip, for b < n; mx, sum: scratch.
template <typename T>
void log_sum_exp_except(const T* Lt, int64_t ld, int64_t classes, int64_t skip, int64_t n, T* mx,
                        T* sum, T* rest);

// ce[b] = cross-entropy when logit `moved` takes t[b] and the others' log-sum-exp is rest[b];
// the label's logit is t[b] where is_moved[b] is 1, else ly[b].
template <typename T>
void moved_logit_ce(const T* rest, const T* t, const T* ly, const T* is_moved, int64_t n, T* ce);

// The sum of v[0..n) in double, in eight interleaved partial sums (a single running sum is a
// chain of dependent adds: the head's loss of a weight spent more time there than in the exps).
template <typename T>
double sum_as_double(const T* v, int64_t n);

}  // namespace fused
}  // namespace rso
