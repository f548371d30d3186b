"""Candidate evaluation in pure PyTorch (``backend="torch"``): the reference every faster path is
checked against.

For one weight, the K candidate values are written into the parameter one after another and the
network is run on the weight's minibatch; the K logit sets go to the loss (``loss=``, the
signature of :mod:`rso_ext.losses`; by default the compiled summed float64 cross-entropy op). The
evaluators compute the same losses:

* :class:`FullForward` runs the whole model per candidate (any ``nn.Module``);
* :class:`CachedInput` (``nn.Sequential`` models whose visited module is a direct child) caches the
  input of that module for the whole pool once per sweep and runs only the suffix per candidate,
  as the authors do. The cache is exact because every layer before the swept one is fixed during
  the sweep, BatchNorm included (see :mod:`rso_ext.batchnorm`);
* :class:`BatchedCandidates` (same models) stacks the K candidates into one K·B forward from that
  cache (the "torch-batched" baseline of docs/design.md §5), BatchNorm statistics kept per
  candidate.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .losses import Loss, resolve
from .visit import MIXING, NORM, Unit


class FullForward:
    """Whole-model forward per candidate."""

    def __init__(self, model: nn.Module, loss: Optional[Loss] = None) -> None:
        self.model = model
        self.loss = resolve(loss)

    def begin(self, unit: Unit, x: torch.Tensor) -> None:
        self.unit, self.x = unit, x

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.model(inp)

    @torch.no_grad()
    def losses(self, k: int, values: torch.Tensor, idx: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        """float64 [K]: the summed loss on minibatch ``idx`` with weight ``k`` of the unit set
        to each of ``values``. The weight is left at the last value: the caller writes the winner
        with :meth:`set`."""
        flat = self.unit.param.data.view(-1)
        inp = self.inputs(idx)
        logits = []
        for v in values:
            flat[k] = v
            logits.append(self.forward(inp))
        return self.loss(torch.stack(logits), target)

    def set(self, k: int, value: torch.Tensor) -> None:
        """Write ``value`` as weight ``k`` of the unit (and keep any cache in step)."""
        self.unit.param.data.view(-1)[k] = value

    def set_many(self, ks: torch.Tensor, values: torch.Tensor) -> None:
        """:meth:`set` for the weights ``ks`` (int64 [m]) at once."""
        flat = self.unit.param.data.view(-1)
        flat[ks.to(flat.device)] = values.to(flat)

    def end(self) -> None:
        self.x = None


class CachedInput(FullForward):
    """Suffix forward from the cached input of the swept module (``nn.Sequential`` only)."""

    def __init__(self, model: nn.Sequential, chunk: int = 1000,
                 loss: Optional[Loss] = None) -> None:
        super().__init__(model, loss)
        self.children = list(model.children())
        self.chunk = chunk

    @staticmethod
    def supports(model: nn.Module, unit: Unit) -> bool:
        return isinstance(model, nn.Sequential) and any(c is unit.module for c in model.children())

    @torch.no_grad()
    def begin(self, unit: Unit, x: torch.Tensor) -> None:
        self.unit = unit
        i = next(j for j, c in enumerate(self.children) if c is unit.module)
        prefix = nn.Sequential(*self.children[:i])
        self.suffix = nn.Sequential(*self.children[i:])
        self.x = torch.cat([prefix(x[s:s + self.chunk]) for s in range(0, len(x), self.chunk)])

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.suffix(inp)


class BatchedCandidates(CachedInput):
    """The K candidates stacked into one K·B forward from the cached input of the swept module
    (``nn.Sequential`` only; the "torch-batched" baseline).

    Computes the same losses as :class:`CachedInput`:

    * the swept conv/linear runs once: for a weight, with the K weight variants concatenated along
      the output channels (then rearranged to ``[K·B, ...]``); for a bias, once without bias plus
      the K bias variants; a swept BatchNorm normalises the batch once and applies each
      candidate's gamma/beta;
    * every later BatchNorm that uses batch statistics normalises each candidate's B samples with
      that group's own statistics (biased variance, as ``F.batch_norm`` in training), so the
      candidates never share statistics; BatchNorms on running statistics apply them as usual;
    * the other suffix modules must act sample by sample (ReLU, pooling, flatten, conv, linear,
      Dropout in eval mode). Running statistics are never updated.
    """

    @staticmethod
    def supports(model: nn.Module, unit: Unit) -> bool:
        if not CachedInput.supports(model, unit) or not isinstance(unit.module, MIXING + NORM):
            return False
        children = list(model.children())
        i = next(j for j, c in enumerate(children) if c is unit.module)
        # a BatchNorm nested inside a later child could not be given per-candidate statistics
        return not any(isinstance(m, NORM) and m is not c
                       for c in children[i + 1:] for m in c.modules())

    @torch.no_grad()
    def begin(self, unit: Unit, x: torch.Tensor) -> None:
        if not self.supports(self.model, unit):
            raise TypeError(f"BatchedCandidates cannot sweep {unit.name!r}: it needs an "
                            "nn.Sequential whose swept conv/linear/BatchNorm is a direct child and "
                            "whose later BatchNorms are direct children too")
        super().begin(unit, x)
        self.rest = list(self.suffix.children())[1:]

    @torch.no_grad()
    def losses(self, k: int, values: torch.Tensor, idx: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        """float64 [K]: as :meth:`FullForward.losses`; the parameter itself is not touched."""
        inp = self.x[idx]
        K, B = len(values), inp.shape[0]
        h = self._swept(inp, values.to(self.unit.param.dtype), k)      # [K*B, ...]
        for m in self.rest:
            h = _grouped_batch_norm(m, h, K) if isinstance(m, NORM) else m(h)
        return self.loss(h.unflatten(0, (K, B)), target)

    def _swept(self, inp: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
        m, p = self.unit.module, self.unit.param.data
        K, B = len(values), inp.shape[0]
        if isinstance(m, NORM):
            if m.training or m.running_mean is None:
                dims = [0] + list(range(2, inp.dim()))
                var, mean = torch.var_mean(inp, dim=dims, correction=0)
            else:
                mean, var = m.running_mean, m.running_var
            invstd = torch.rsqrt(var + m.eps)
            variants = p.unsqueeze(0).repeat(K, 1)
            variants[:, k] = values
            gamma = variants if self.unit.param_name == "weight" else m.weight.data.expand(K, -1)
            beta = variants if self.unit.param_name == "bias" else m.bias.data.expand(K, -1)
            scale = gamma * invstd                                        # [K, C]
            shift = beta - mean * scale
            shape = (K, 1, -1) + (1,) * (inp.dim() - 2)
            out = torch.addcmul(shift.view(shape), inp.unsqueeze(0), scale.view(shape))
            return out.flatten(0, 1)
        conv = isinstance(m, nn.Conv2d)
        ch = 1 if conv else inp.dim() - 1                 # output-channel dim of m's output
        if self.unit.param_name == "weight":
            w = p.unsqueeze(0).repeat(K, *([1] * p.dim()))
            w.view(K, -1)[:, k] = values
            bias = None if m.bias is None else m.bias.data.repeat(K)
            out = _mix(m, inp, w.flatten(0, 1), bias)     # [..., K*O, ...]
            out = out.unflatten(ch, (K, -1)).movedim(ch, 0)
        else:
            b = p.unsqueeze(0).repeat(K, 1)
            b[:, k] = values
            out = _mix(m, inp, m.weight.data, None).unsqueeze(0)
            shape = [K] + [1] * (out.dim() - 1)
            shape[ch + 1] = -1
            out = out + b.view(shape)
        return out.reshape(K * B, *out.shape[2:])


def _mix(m: nn.Module, inp: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    if isinstance(m, nn.Conv2d):
        return m._conv_forward(inp, weight, bias)
    return F.linear(inp, weight, bias)


def _grouped_batch_norm(bn: nn.Module, h: torch.Tensor, groups: int) -> torch.Tensor:
    """``bn`` applied to ``h`` = ``groups`` stacked batches: batch statistics per group."""
    if not (bn.training or bn.running_mean is None):
        return bn(h)                                      # running statistics: per sample anyway
    g = h.unflatten(0, (groups, -1))                      # [G, B, C, *S]
    dims = [1] + list(range(3, g.dim()))
    var, mean = torch.var_mean(g, dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + bn.eps)
    shape = (-1,) + (1,) * (g.dim() - 3)
    if bn.weight is not None:
        scale = scale * bn.weight.view(shape)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.view(shape)
    return torch.addcmul(shift, g, scale).flatten(0, 1)


def make_evaluator(model: nn.Module, unit: Unit, loss: Optional[Loss] = None) -> FullForward:
    """The cheapest exact torch evaluator for sweeping ``unit`` (``loss``: see
    :mod:`rso_ext.losses`; default cross-entropy)."""
    if CachedInput.supports(model, unit):
        return CachedInput(model, loss=loss)
    return FullForward(model, loss)
