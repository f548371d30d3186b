"""Python entry points of the compiled operators in ``rso_ext._C``.

The kernels are registered with the PyTorch dispatcher as ``torch.ops.rso_ext.*``
(schemas in ``csrc/ops.cpp``, device-free code in ``csrc/core``, CPU kernels in
``csrc/cpu``, CUDA kernels in ``csrc/cuda``); the functions here are typed, documented wrappers around them, plus
pure-PyTorch references used by the tests.

The fused operators take a lowered network as a :class:`Program` (the encoding of
``csrc/core/program.h``: op kinds :data:`CONV` ... :data:`ADD`, four integers, an epsilon and
four optional tensors per op), which :mod:`rso_ext.fused` builds from a model, and the unit
they sweep as ``unit_kind`` (:data:`UNIT_WEIGHT` ... :data:`UNIT_BETA`) of op ``unit_op``.
Every operator has a fake (meta) kernel for tracing under ``FakeTensorMode`` (registered here,
except ``program_forward``, whose composite C++ kernel runs on meta tensors as it is).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from rso_ext import _C
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "rso_ext._C (the compiled extension) could not be imported: "
        f"{exc}. Build it from the repository root with:\n"
        "    pip install torch==2.13.0 numpy pybind11 ninja && pip install --no-build-isolation -e .\n"
        "(the extension must be rebuilt whenever torch is upgraded)."
    ) from exc

__all__ = [
    "candidate_cross_entropy",
    "candidate_cross_entropy_reference",
    "cuda_built",
    "Program",
    "OP_KINDS",
    "program_forward",
    "fused_candidate_losses",
    "fused_sweep",
    "fused_set_weight",
]

# -- the program encoding (csrc/core/program.h) -----------------------------------------------
#: op kinds (enum rso::OpKind): chain ops ...
CONV, LINEAR, BN, RELU, AVGPOOL, MAXPOOL, GAP, FLATTEN = range(8)
#: ... and the slot ops of residual networks ("dag" programs, rso_ext/fused/lower_graph.py)
SAVE, LOAD, INPUT, ADD = range(8, 12)
#: the op kinds by their C++ enumerator names, as ``rso_ext._C.op_kinds()`` reports them
OP_KINDS = {"Conv": CONV, "Linear": LINEAR, "BatchNorm": BN, "ReLU": RELU, "AvgPool": AVGPOOL,
            "MaxPool": MAXPOOL, "GlobalAvgPool": GAP, "Flatten": FLATTEN, "Save": SAVE,
            "Load": LOAD, "Input": INPUT, "Add": ADD}
#: which parameter of op ``unit_op`` a sweep visits (``unit_kind`` of the fused operators)
UNIT_WEIGHT, UNIT_BIAS, UNIT_GAMMA, UNIT_BETA = range(4)


@dataclass(frozen=True, eq=False)
class Program:
    """A lowered network (suffix) in the encoding of ``csrc/core/program.h``.

    Op ``i`` is ``kinds[i]`` with integers ``params[4*i : 4*i+4]``, epsilon ``eps[i]`` and
    tensors ``tensors[4*i : 4*i+4]`` (unused entries 0, 0.0 and None):

    * :data:`CONV`: params stride_h, stride_w, pad_h, pad_w; tensors weight, bias?
    * :data:`LINEAR`: tensors weight, bias?
    * :data:`BN`: params 1 (batch statistics) or 0 (running ones); tensors gamma, beta,
      mean?, var?; ``eps``
    * :data:`RELU`, :data:`GAP` (to ``[N, C, 1, 1]``), :data:`FLATTEN` (to ``[N, -1]``)
    * :data:`AVGPOOL`, :data:`MAXPOOL`: params kernel, stride, padding
    * :data:`SAVE` / :data:`LOAD`: params slot (slot <- current / current <- slot)
    * :data:`INPUT`: tensors side input ``[N, ...]`` (current <- its rows of the minibatch)
    * :data:`ADD`: params slot, from_side; tensors side input when from_side (current <-
      current + slot or side input)

    The tensors are the model's own (live views of its parameters and buffers, not copies),
    so a program stays exact while the model changes in place. The compiled operators check
    the encoding and name the op at fault; nothing is checked here.
    """

    kinds: tuple[int, ...] = ()
    params: tuple[int, ...] = ()
    eps: tuple[float, ...] = ()
    tensors: tuple[Optional[Tensor], ...] = ()

    def __post_init__(self) -> None:
        for name in ("kinds", "params", "eps", "tensors"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def __len__(self) -> int:
        """Number of ops."""
        return len(self.kinds)

    def with_tensor(self, index: int, tensor: Tensor) -> "Program":
        """The program with ``tensors[index]`` replaced (e.g. a side input: ``4 * op``)."""
        tensors = list(self.tensors)
        tensors[index] = tensor
        return Program(self.kinds, self.params, self.eps, tensors)


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this build of ``rso_ext._C``.

    ``False`` means CUDA tensors cannot be passed to the operators even if a GPU is
    present; rebuild with a CUDA build of torch and a CUDA toolkit (``RSO_EXT_CUDA=1``
    makes the build fail instead of silently leaving CUDA out).
    """
    return bool(_C.cuda_built())


@contextlib.contextmanager
def _switched(get: Callable[[], object], set_: Callable[[object], None],
              value: object) -> Iterator[None]:
    """A process-wide switch of ``rso_ext._C`` set to ``value`` within the block, then restored."""
    before = get()
    set_(value)
    try:
        yield
    finally:
        set_(before)


def device_generic_paths(on: bool = True) -> ContextManager[None]:
    """Test switch: within the block, CPU tensors take the device-generic code the CUDA backend
    runs (ATen passes, ``channel_candidates_aten``, the default recompute and refresh of a lazy
    channel, the device logits head's kernels as CPU loops instead of the CPU logits head)
    instead of the hand-written CPU passes, so that CPU tests
    cover that code (docs/design.md §7). Not for training: it is slower, not more exact."""
    return _switched(_C._device_generic_paths, _C._set_device_generic_paths, bool(on))


def reduce_across(group_name: str) -> ContextManager[None]:
    """Within the block the fused operators evaluate this process's shard of each minibatch and
    add what depends on the whole minibatch across the ranks of the process group named
    ``group_name`` (``torch.distributed`` group's ``group_name``): the BatchNorm batch
    statistics (float64 sums and sums of squares) and the candidates' summed losses, so every
    rank makes the same choice. They take the device-generic paths meanwhile (docs/design.md
    §8). ``""``: one process, as outside the block."""
    return _switched(_C._reduce_group, _C._set_reduce_group, str(group_name))


def left_out_budget() -> int:
    """Most bytes of per-neuron states one ``fused_sweep`` call keeps at once: the next
    layer's output with the swept neuron's channel left out, one per minibatch that recurs
    within the neuron (docs/design.md §2)."""
    return int(_C.left_out_budget())


def candidate_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Summed softmax cross-entropy of ``K`` candidate logit sets over one batch.

    Args:
        logits: ``[K, B, C]`` float32 or float64 tensor: the logits of ``K``
            candidates (e.g. perturbed weights) for the same ``B`` samples over ``C``
            classes (``K >= 1``, ``B >= 1``, ``C >= 2``).
        target: ``[B]`` int64 tensor of class indices in ``[0, C)``, on the same
            device as ``logits``.

    Returns:
        A float64 tensor ``[K]`` with
        ``out[k] = sum_b (logsumexp(logits[k, b]) - logits[k, b, target[b]])``,
        i.e. ``F.cross_entropy(logits[k], target, reduction="sum")``, computed with
        every logit upcast to float64 and float64 accumulation. The result is
        bitwise reproducible for a given device (independent of the number of CPU
        threads). Non-finite logits are not masked: the affected ``out[k]`` becomes
        NaN or inf.

    Raises:
        RuntimeError: for a wrong shape, dtype or device of either argument, or a
            target value outside ``[0, C)`` (the message names the argument, the
            offending position and value).
    """
    return torch.ops.rso_ext.candidate_cross_entropy(logits, target)


def candidate_cross_entropy_reference(logits: Tensor, target: Tensor) -> Tensor:
    """Pure-PyTorch reference of :func:`candidate_cross_entropy` (float64, ``[K]``)."""
    logits64 = logits.to(torch.float64)
    return torch.stack([F.cross_entropy(logits64[k], target, reduction="sum")
                        for k in range(logits64.shape[0])])


# -- the fused evaluation (csrc/core/fused.cpp, program.cpp) -----------------------------------
def program_forward(x: Tensor, program: Program) -> Tensor:
    """The ops of ``program`` densely over the batch ``x``: the forward of a chain of modules
    (e.g. the children before a swept layer, which build its cached input).

    Args:
        x: float32 or float64 input of the first op (e.g. ``[N, C, H, W]``), on the device and
            of the dtype of every tensor of the program.
        program: a chain program (any first op; no SAVE/LOAD/INPUT/ADD). A BatchNorm with
            ``params[4*i] == 0`` normalises with its running statistics, with 1 with the
            statistics of ``x``.

    Returns:
        The last op's output, a new tensor (``x`` is not changed): the same values as the
        modules' forward in the corresponding modes, up to float rounding (the CPU runs
        hand-written passes for BatchNorm, ReLU, pooling and one-channel convolutions).

    Raises:
        RuntimeError: for a malformed program, a slot op, or a tensor of another dtype or
            device than ``x`` (the message names the op).
    """
    return torch.ops.rso_ext.program_forward(x, program.kinds, program.params, program.eps,
                                             program.tensors)


def fused_candidate_losses(x: Tensor, z: Tensor, param: Tensor, target: Tensor,
                           program: Program, *, unit_kind: int, unit_op: int, k: int,
                           values: Tensor, batch: Tensor) -> Tensor:
    """Summed float64 cross-entropy of entry ``k`` of the swept parameter set to each of
    ``values``, on one minibatch of the pool. Changes nothing.

    Args:
        x: the swept layer's input over the pool, ``[N, ...]`` (contiguous; the layer is op 0
            of ``program``).
        z: that layer's output (pre-activation) for ``x`` and the current parameters,
            ``[N, ...]`` (contiguous); x, z and param share one dtype (float32 or float64)
            and device.
        param: the swept tensor itself (the program's tensor of the unit, same storage).
        target: int64 labels ``[N]`` of the pool.
        program: op 0 the swept conv/linear layer, then the rest of the network up to the
            logits (a dag program's side inputs hold values over the pool).
        unit_kind: :data:`UNIT_WEIGHT` or :data:`UNIT_BIAS` of op 0 (``unit_op`` 0), or
            :data:`UNIT_GAMMA` / :data:`UNIT_BETA` of the BatchNorm op ``unit_op``.
        unit_op: the op that holds the swept parameter.
        k: flat index of the swept entry in ``param``.
        values: ``[K]`` candidate values (``K >= 2``) of param's dtype.
        batch: int64 ``[B]`` indices of the minibatch's samples in the pool.

    Returns:
        float64 ``[K]`` on x's device: ``out[j] = sum_b cross_entropy(logits_j[b],
        target[batch[b]])`` with ``param[k] = values[j]``.

    Raises:
        RuntimeError: for arguments that do not fit one another (the message names the
            argument and the problem).
    """
    return torch.ops.rso_ext.fused_candidate_losses(
        x, z, param, target, program.kinds, program.params, program.eps, program.tensors,
        unit_kind, unit_op, k, values, batch)


def fused_sweep(x: Tensor, z: Tensor, param: Tensor, target: Tensor, program: Program, *,
                unit_kind: int, unit_op: int, k0: int, values: Tensor,
                batches: Tensor) -> tuple[Tensor, Tensor]:
    """Visit entries ``k0 .. k0+m-1`` of the swept parameter in order: for entry ``k0 + i``
    evaluate its candidates ``values[i]`` on minibatch ``batches[i]``, choose the lowest
    finite loss (ties keep candidate 0), write the winner into ``param`` and keep ``z``
    exact. ``z`` and ``param`` are changed in place.

    Args:
        x, z, param, target, program, unit_kind, unit_op: as :func:`fused_candidate_losses`.
        k0: flat index of the first entry visited.
        values: ``[m, K]`` candidates per entry (``K >= 2``; candidate 0 is the current
            state) of param's dtype.
        batches: int64 ``[m, B]`` pool indices of each entry's minibatch.

    Returns:
        ``(chosen, losses)`` on x's device: int64 ``[m]``, the winning candidate of each
        entry (-1 where candidate 0's loss was not finite and the sweep stopped there, -2
        for entries not visited after it), and float64 ``[m, K]``, every candidate's summed
        loss (NaN where not evaluated).

    Raises:
        RuntimeError: as :func:`fused_candidate_losses`.
    """
    return torch.ops.rso_ext.fused_sweep(
        x, z, param, target, program.kinds, program.params, program.eps, program.tensors,
        unit_kind, unit_op, k0, values, batches)


def fused_set_weight(x: Tensor, z: Tensor, param: Tensor, program: Program, *, unit_kind: int,
                     unit_op: int, k: int, value: float) -> None:
    """Write ``value`` as entry ``k`` of the swept parameter and update ``z`` (the swept
    layer's output over the pool) to match; ``z`` and ``param`` are changed in place.

    Args:
        x, z, param, program, unit_kind, unit_op: as :func:`fused_candidate_losses`.
        k: flat index of the entry.
        value: its new value.
    """
    torch.ops.rso_ext.fused_set_weight(
        x, z, param, program.kinds, program.params, program.eps, program.tensors, unit_kind,
        unit_op, k, float(value))


# -- fake kernels: output shapes for FakeTensor / meta tracing --------------------------------
# (the shapes of the C++ kernels: cross_entropy.cpp, fused.cpp; program_forward needs none)
@torch.library.register_fake("rso_ext::candidate_cross_entropy")
def _candidate_cross_entropy_fake(logits: Tensor, target: Tensor) -> Tensor:
    torch._check(logits.dim() == 3, lambda: f"candidate_cross_entropy: logits must be "
                 f"[K, B, C], got {tuple(logits.shape)}")
    return logits.new_empty((logits.shape[0],), dtype=torch.float64)


@torch.library.register_fake("rso_ext::fused_candidate_losses")
def _fused_candidate_losses_fake(x, z, param, target, op_kinds, op_params, op_eps, op_tensors,
                                 unit_kind, unit_op, k, values, batch) -> Tensor:
    torch._check(values.dim() == 1, lambda: f"fused_candidate_losses: values must be 1-D, got "
                 f"{tuple(values.shape)}")
    return x.new_empty((values.shape[0],), dtype=torch.float64)


@torch.library.register_fake("rso_ext::fused_sweep")
def _fused_sweep_fake(x, z, param, target, op_kinds, op_params, op_eps, op_tensors, unit_kind,
                      unit_op, k0, values, batches) -> tuple[Tensor, Tensor]:
    torch._check(values.dim() == 2, lambda: f"fused_sweep: values must be [m, K], got "
                 f"{tuple(values.shape)}")
    m, K = values.shape
    return x.new_empty((m,), dtype=torch.int64), x.new_empty((m, K), dtype=torch.float64)


@torch.library.register_fake("rso_ext::fused_set_weight")
def _fused_set_weight_fake(x, z, param, op_kinds, op_params, op_eps, op_tensors, unit_kind,
                           unit_op, k, value) -> None:
    return None
