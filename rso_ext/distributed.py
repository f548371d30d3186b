"""Data-parallel search over ``torch.distributed`` (docs/design.md §8).

RSO visits weights one after another, so the exact way to spread a run over several processes
is over the **minibatch**: every rank holds the model, the training data and the same random
streams (the same seed), and evaluates each weight's candidates on its shard of the weight's
minibatch; the K summed float64 losses are added across ranks before the choice, which every
rank then makes alike, so the models stay equal without sending weights. BatchNorm layers that
use batch statistics during the search normalise with the statistics of the **whole** minibatch
(per-rank sums and sums of squares in float64, added across ranks). Population methods split
the population instead: each rank evaluates its share of the members on the whole minibatch and
the losses are gathered.

Nothing here acts unless a process group with more than one rank is initialised (by the caller,
or by ``python -m rso_ext train`` under ``torchrun``): single-process runs are unchanged.

What runs distributed: both backends of every per-weight method (``RSO``, SA, lottery ticket;
the fused one reduces inside its compiled sweep, :func:`rso_ext.ops.reduce_across`) and the
population methods ES and GA. Under a process group ``backend="auto"`` picks torch and says so.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["world", "active", "shard", "all_reduce_sum", "gather_shards", "ShardedEvaluator",
           "batch_norm_forward", "whole_batch_norm", "check_split", "check_same_data",
           "init_from_env",
           "is_writer", "barrier"]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return world()[1] > 1


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return world()[0] == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(n: int, what: str) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of ``n`` items; ``n`` must divide evenly
    (``what`` names them in the error)."""
    rank, size = world()
    if n % size:
        raise ValueError(f"{what} ({n}) must be a multiple of the number of processes "
                         f"({size}): each rank takes an equal share")
    per = n // size
    return rank * per, (rank + 1) * per


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place on a copy; ``t`` itself untouched)."""
    if not active():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_shards(t: torch.Tensor) -> torch.Tensor:
    """The ranks' equal-length shards of a vector, concatenated in rank order."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class ShardedEvaluator:
    """A candidate evaluator (``losses``/``set``) whose losses are those of the whole minibatch:
    the wrapped evaluator runs on this rank's shard of ``idx`` and the K summed losses are added
    across ranks. Everything else is the wrapped evaluator's."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def losses(self, k: int, values: torch.Tensor, idx: torch.Tensor,
               target: Optional[torch.Tensor] = None) -> torch.Tensor:
        a, b = shard(len(idx), "the minibatch size")
        part = self.inner.losses(k, values, idx[a:b], None if target is None else target[a:b])
        return all_reduce_sum(part.to(torch.float64))


def batch_norm_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn`` on batch statistics of the minibatch spread over the ranks: per-channel sums and
    sums of squares in float64 on each rank's shard, added across ranks; the biased variance, as
    ``F.batch_norm`` uses in training. Running statistics are not touched."""
    dims = [0] + list(range(2, x.dim()))
    xd = x.double()
    count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
    stats = all_reduce_sum(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
    c = x.shape[1]
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))


@contextlib.contextmanager
def whole_batch_norm(model: nn.Module) -> Iterator[None]:
    """Under a process group, the BatchNorms of ``model`` that are in training mode (those that use
    batch statistics during a sweep, rso_ext/batchnorm.py) normalise with
    :func:`batch_norm_forward` while the minibatch is sharded; without one, nothing changes."""
    patched = []
    try:
        if active():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    m.forward = lambda x, m=m: batch_norm_forward(m, x)
                    patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


def check_split(n: int, what: str, x: torch.Tensor, y: torch.Tensor, first: bool) -> None:
    """Over several processes: ``n`` items (the minibatch, or the population) split evenly across
    the ranks (``what`` names them), and, on a method's ``first`` data, every rank holds the same
    ``(x, y)``. Without a process group, nothing."""
    if not active():
        return
    shard(n, what)
    if first:
        check_same_data(x, y)


def check_same_data(x: torch.Tensor, y: torch.Tensor) -> None:
    """Every rank must search the same training data: a digest of ``(x, y)`` is compared across
    ranks, and every rank raises naming the ranks that differ."""
    if not active():
        return
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    mine = torch.tensor(list(h.digest()[:8]), dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.empty_like(mine) for _ in range(world()[1])]
    dist.all_gather(everyone, mine)
    differ = [r for r, d in enumerate(everyone) if not torch.equal(d.cpu(), everyone[0].cpu())]
    if differ:
        raise ValueError(f"the training data differs between processes: ranks {differ} hold "
                         "other images or labels than rank 0 (every rank must load the same "
                         "data, in the same order)")


def init_from_env(device: str) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), initialise the default process
    group: gloo on the CPU, NCCL on CUDA (each rank on GPU ``LOCAL_RANK``). Returns whether a
    group of several ranks is active."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return active()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torchrun's store outlives a restart of the worker group; under a prefix of its own per
    # restart, a restarted group does not read the addresses of the processes it replaced
    store, rank, size = next(dist.rendezvous("env://"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            store=dist.PrefixStore(f"rso_ext/restart{restart}", store),
                            rank=rank, world_size=size)
    return active()
