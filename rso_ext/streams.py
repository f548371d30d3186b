"""The random streams of one parameter sweep, drawn up front (docs/design.md §3).

For a sweep over a parameter with ``n`` entries the driver draws, from one CPU ``torch.Generator``
and in this order:

1. ``deltas = torch.randn(n) * sigma``  (float32; entry k is the step of the k-th visited weight);
2. the minibatches: for ``sampler="shuffle"`` one permutation of the ``N`` pool indices, weight k
   taking chunk ``k mod floor(N / B)``; for ``sampler="random"`` one 63-bit seed, weight k taking
   ``B`` indices drawn independently with replacement from a generator seeded ``seed + k``.

Every backend consumes these arrays in this order, so they make the same decisions. The
multiples of the step tried on each side (``steps``, default ``(1.0,)``: the paper's
``{w', w' + delta, w' - delta}``) travel with them (:func:`rso_ext.sweep.candidate_values`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SAMPLERS = ("shuffle", "random")


@dataclass
class SweepStreams:
    """Steps and minibatch indices of one parameter sweep."""

    deltas: torch.Tensor          # float32 [n], already scaled by the annealed sigma
    pool_size: int
    batch_size: int
    sampler: str
    perm: torch.Tensor | None = None   # int64 [N] for "shuffle"
    seed: int | None = None            # for "random"
    steps: tuple[float, ...] = (1.0,)  # candidates w' +- s * delta for s in steps (nothing drawn)

    @classmethod
    def draw(cls, generator: torch.Generator, n: int, sigma: float, pool_size: int,
             batch_size: int, sampler: str = "shuffle",
             steps: tuple[float, ...] = (1.0,)) -> "SweepStreams":
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 1 <= batch_size <= pool_size:
            raise ValueError(f"batch_size={batch_size} must be between 1 and the number of "
                             f"training samples ({pool_size})")
        deltas = torch.randn(n, generator=generator, dtype=torch.float32) * sigma
        if sampler == "shuffle":
            perm = torch.randperm(pool_size, generator=generator)
            return cls(deltas, pool_size, batch_size, sampler, perm=perm, steps=tuple(steps))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return cls(deltas, pool_size, batch_size, sampler, seed=seed, steps=tuple(steps))

    def batch(self, k: int) -> torch.Tensor:
        """int64 indices [B] into the pool for the k-th visited weight of the sweep."""
        if self.sampler == "shuffle":
            chunk = k % (self.pool_size // self.batch_size)
            return self.perm[chunk * self.batch_size:(chunk + 1) * self.batch_size]
        g = torch.Generator().manual_seed(self.seed + k)
        return torch.randint(0, self.pool_size, (self.batch_size,), generator=g)

    def batches(self, start: int, stop: int) -> torch.Tensor:
        """int64 indices [stop - start, B] for weights ``start .. stop-1`` (row i is
        ``batch(start + i)``)."""
        if self.sampler == "shuffle":   # the chunks of the permutation, in one index op (numpy's:
            n = self.pool_size // self.batch_size   # a few microseconds less per call)
            chunks = self.perm[:n * self.batch_size].numpy().reshape(n, self.batch_size)
            return torch.from_numpy(chunks[np.arange(start, stop) % n])
        return torch.stack([self.batch(k) for k in range(start, stop)])
