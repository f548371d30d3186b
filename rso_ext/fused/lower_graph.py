"""Lowering of a model that is not an ``nn.Sequential`` (residual networks such as
``paper_cifar``) for the fused backend (docs/design.md §4).

``torch.fx`` traces ``forward`` (Python control flow with constant conditions, such as
PaperCifar's loop, is unrolled) into a graph of nodes in execution order. Supported nodes: the
modules of :func:`rso_ext.fused.program.lower_module` (Conv2d, Linear, BatchNorm, ReLU,
Max/AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Dropout/Identity, a final LogSoftmax), the
functions and methods ``+`` / ``torch.add`` / ``.add`` of two tensors of one shape (the residual
add), ``torch.relu`` / ``F.relu`` / ``.relu()``, ``torch.flatten(x, 1)`` / ``.flatten(1)`` and
``.mean((2, 3))`` (global average pool), ``F.max_pool2d`` / ``F.avg_pool2d`` (as the modules of
the same arguments), ``F.dropout`` (off during search, as ``nn.Dropout``) and a final
``F.log_softmax`` over the classes (so a net written for ``F.nll_loss``, as the PyTorch MNIST
example is, lowers: its loss is the cross-entropy of the logits). Anything else -- ``torch.cat``, a multiplication, a
parameter read directly, a conv/linear/BatchNorm called twice -- is refused with a
:class:`~rso_ext.fused.program.PlanError` naming the module (and the fx node) where it happens.

For each unit the plan emits the program of its layer's sweep (csrc/core/program.h): op 0 the
swept layer, then every node that depends on it, in execution order, joined by the Save / Load /
Input / Add ops. Adds whose other operand does not depend on the swept layer read a **side
input**: the value of that operand over the whole pool, cached once per unit sweep like the
layer's input ``X_d`` (it is a constant of the sweep). Where such an operand passes through a
BatchNorm that uses minibatch statistics during this sweep (rso_ext/batchnorm.py: every BN at or
after the swept unit in execution order, e.g. paper_cifar's ``shortcut_bn`` while ``conv4``
(``convs.3``) is swept), the side input is cached before that BatchNorm and the rest of its
branch runs per minibatch, shared by the candidates.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..ops import ADD, BN, CONV, FLATTEN, GAP, INPUT, LINEAR, LOAD, RELU, SAVE, Program
from ..visit import Unit
from .program import PlanError, Step, UnitProgram, lower_module, owning_layer, unit_kind

#: index of the model's input among node indices
INPUT_NODE = -1
MAX_SLOTS = 64     # csrc/core/program.h kMaxSlots

_ADD_FNS = (operator.add, torch.add)
_RELU_FNS = (torch.relu, F.relu)
#: pooling functions, lowered as the module of the same arguments
_POOL_FNS = {F.max_pool2d: nn.MaxPool2d, torch.max_pool2d: nn.MaxPool2d,
             F.avg_pool2d: nn.AvgPool2d}
#: identities during search: dropout (off, as nn.Dropout is) and a final log-softmax (the
#: cross-entropy of log-probabilities is the cross-entropy of the logits)
_DROPOUT_FNS = (F.dropout, torch.dropout)
_LOG_SOFTMAX_FNS = (F.log_softmax, torch.log_softmax)
_OP_SET = ("Conv2d, Linear, BatchNorm, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), "
           "Flatten, Dropout and the add of two tensors of one shape")


@dataclass
class Node(Step):
    """One op of the traced graph: a lowered :class:`~rso_ext.fused.program.Step` with its inputs
    (node indices, :data:`INPUT_NODE` for the model's input) and its output shape on the
    sample batch. ``kind`` ADD: the sum of its two inputs."""

    inputs: list[int] = field(default_factory=list)
    shape: torch.Size = field(default_factory=torch.Size)


@dataclass
class _Analysis:
    """What the sweep of one unit needs: its layer ``d``, the nodes to run per minibatch
    (``order``, op 0 first), the cached values (``x_node`` = X_d, ``sides``) and which
    BatchNorms use batch statistics."""

    d: int
    unit_node: int
    order: list[int]
    x_node: int
    sides: list[int]
    batch: Callable[[int], bool]


def _fn_name(target) -> str:
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch._C._nn"):
        return f"torch.nn.functional.{name}"
    return f"{mod}.{name}" if mod else name


def _where(node: torch.fx.Node, model: nn.Module) -> str:
    """'module PATH (Class)' of the module whose forward runs ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls = getattr(cls, "__name__", str(cls))
        if node.op == "call_module" and path == node.target and len(stack) > 1:
            path, cls = list(stack.values())[-2]
            cls = getattr(cls, "__name__", str(cls))
        return f"module {path!r} ({cls})"
    return f"module '<root>' ({type(model).__name__})"


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "cannot lower"
        raise PlanError(f"module '<root>' ({type(model).__name__}): torch.fx cannot trace its "
                        f"forward for the fused backend ({type(e).__name__}: {e}); use "
                        "backend='torch' for this model") from None


def _run(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    """The node's op in PyTorch (modules in their current modes)."""
    k = node.kind
    if k == ADD:
        return args[0] + args[1]
    if k == RELU:
        return torch.relu(args[0])
    if k == FLATTEN:
        return args[0].flatten(1)
    if k == GAP:
        return args[0].mean((2, 3), keepdim=True)
    return node.module(args[0])


class GraphPlan:
    """A traced model lowered node by node, with the fused program of each unit."""

    dag = True

    def __init__(self, model: nn.Module, sample: torch.Tensor) -> None:
        self.model = model
        gm = _trace(model)
        self.steps: list[Node] = []
        self._value: dict[int, torch.Tensor] = {}
        env: dict[torch.fx.Node, int] = {}
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        called: set[int] = set()
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for node in gm.graph.nodes:
                    if node.op == "placeholder":
                        if INPUT_NODE in self._value:
                            raise PlanError(f"module '<root>' ({type(model).__name__}): forward "
                                            "takes more than one input; the fused backend "
                                            "lowers models of one image batch")
                        env[node] = INPUT_NODE
                        self._value[INPUT_NODE] = sample
                    elif node.op == "output":
                        arg = node.args[0]
                        if not isinstance(arg, torch.fx.Node) or arg not in env:
                            raise PlanError(f"module '<root>' ({type(model).__name__}): forward "
                                            "must return one tensor (the logits)")
                        self.output = env[arg]
                    else:
                        env[node] = self._lower(node, env, model, out_node, called)
        finally:
            model.train(was)
        if self.output == INPUT_NODE:
            raise PlanError(f"module '<root>' ({type(model).__name__}) returns its input")
        self._value.clear()
        self.needed = self._ancestors([self.output]) | {self.output}
        self._check_channel_locality()
        self._index = {id(s.module): i for i, s in enumerate(self.steps) if s.module is not None
                       and any(True for _ in s.module.parameters(recurse=False))}

    # -- lowering ---------------------------------------------------------------------------
    def _add(self, node: Node) -> int:
        try:
            self._value[len(self.steps)] = _run(node, [self._value[i] for i in node.inputs])
        except Exception as e:  # noqa: BLE001 - the lowered op does not run as traced
            what = type(node.module).__name__ if node.module is not None else "function"
            raise PlanError(f"node {node.name!r} ({what}) does not run as lowered on the sample "
                            f"batch ({type(e).__name__}: {e}); use backend='torch' for this "
                            "model") from None
        node.shape = self._value[len(self.steps)].shape
        self.steps.append(node)
        return len(self.steps) - 1

    def _lower(self, node: torch.fx.Node, env: dict, model: nn.Module,
               out_node: torch.fx.Node, called: set[int]) -> int:
        where = _where(node, model)

        def refuse(what: str) -> PlanError:
            return PlanError(f"{where}: {what} (fx node {node.name!r}) is outside the fused op "
                             f"set ({_OP_SET}); use backend='torch' for this model")

        def tensor_args(n: int) -> list[int]:
            args = [a for a in node.args if isinstance(a, torch.fx.Node)]
            if len(args) != n or any(a not in env for a in args):
                raise refuse(f"{node.op} {node.target!r} with arguments {node.args}")
            return [env[a] for a in args]

        def shape(i: int) -> torch.Size:
            return self._value[i].shape

        if node.op == "call_module":
            m = model.get_submodule(node.target)
            if node.kwargs or len(node.args) != 1:
                raise refuse(f"a call of {node.target!r} with {len(node.args)} arguments")
            (i,) = tensor_args(1)
            if any(True for _ in m.parameters(recurse=False)):
                if id(m) in called:
                    raise PlanError(f"module {node.target!r} ({type(m).__name__}) is called more "
                                    "than once in forward; the fused backend sweeps layers that "
                                    "run once (use backend='torch' for shared weights)")
                called.add(id(m))
            last = list(node.users) == [out_node]
            step = lower_module(node.target, m, shape(i), last)
            if step.kind is None:
                return i                                   # identity during search
            return self._add(Node(step.name, m, step.kind, step.params, step.eps, inputs=[i]))
        if node.op == "call_function":
            t = node.target
            if t in _ADD_FNS and not node.kwargs and len(node.args) == 2:
                a, b = tensor_args(2)
                return self._lower_add(node, a, b, refuse)
            if t in _RELU_FNS and not node.kwargs.get("inplace", False) and len(node.args) == 1:
                (i,) = tensor_args(1)
                return self._add(Node(node.name, None, RELU, inputs=[i]))
            if t is torch.flatten:
                return self._lower_flatten(node, tensor_args(1)[0], shape, refuse)
            if t in _POOL_FNS:
                (i,) = tensor_args(1)
                try:
                    m = _POOL_FNS[t](*node.args[1:], **node.kwargs)
                except TypeError as e:
                    raise refuse(f"{_fn_name(t)} with arguments {node.args[1:]} "
                                 f"{node.kwargs} ({e})") from None
                step = lower_module(node.name, m, shape(i), False)
                return self._add(Node(node.name, m, step.kind, step.params, inputs=[i]))
            if t in _DROPOUT_FNS:
                return tensor_args(1)[0]                   # identity during search
            if t in _LOG_SOFTMAX_FNS:
                return self._lower_log_softmax(node, tensor_args(1)[0], out_node, refuse)
            raise refuse(f"the function {_fn_name(t)}")
        if node.op == "call_method":
            t = node.target
            if t == "add" and not node.kwargs and len(node.args) == 2:
                a, b = tensor_args(2)
                return self._lower_add(node, a, b, refuse)
            if t == "relu" and not node.kwargs and len(node.args) == 1:
                (i,) = tensor_args(1)
                return self._add(Node(node.name, None, RELU, inputs=[i]))
            if t == "flatten":
                return self._lower_flatten(node, tensor_args(1)[0], shape, refuse)
            if t == "log_softmax":
                return self._lower_log_softmax(node, tensor_args(1)[0], out_node, refuse)
            if t == "mean":
                (i,) = tensor_args(1)
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
                dims = [dims] if isinstance(dims, int) else list(dims or [])
                if len(shape(i)) == 4 and sorted(d % 4 for d in dims) == [2, 3]:
                    g = self._add(Node(node.name, None, GAP, inputs=[i]))
                    if keep:
                        return g
                    return self._add(Node(node.name + ".flatten", None, FLATTEN, inputs=[g]))
            raise refuse(f"the method Tensor.{t}")
        if node.op == "get_attr":
            raise refuse(f"a direct read of the attribute {node.target!r}")
        raise refuse(f"{node.op} {node.target!r}")

    def _lower_add(self, node: torch.fx.Node, a: int, b: int, refuse) -> int:
        sa, sb = self._value[a].shape, self._value[b].shape
        if sa != sb:
            raise refuse(f"an add of tensors of shapes {tuple(sa)} and {tuple(sb)} (broadcasting)")
        return self._add(Node(node.name, None, ADD, inputs=[a, b]))

    def _lower_log_softmax(self, node: torch.fx.Node, i: int, out_node: torch.fx.Node,
                           refuse) -> int:
        """A log-softmax over the classes that forward returns: the identity (the cross-entropy
        of log-probabilities is that of the logits, and an NLL loss of them is that
        cross-entropy). Anywhere else it changes what the next op sees: refused."""
        args = list(node.args[1:]) + [node.kwargs.get("dim")]
        dim = next((a for a in args if a is not None), None)
        if (list(node.users) != [out_node] or dim not in (1, -1) or len(self._value[i].shape) != 2
                or node.kwargs.get("dtype") is not None):
            raise refuse(f"log_softmax(dim={dim}) that is not the last op over the classes")
        return i

    def _lower_flatten(self, node: torch.fx.Node, i: int, shape, refuse) -> int:
        args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim")
                                      if k in node.kwargs]
        start = args[0] if args else 0
        end = args[1] if len(args) > 1 else -1
        if start != 1 or end not in (-1, len(shape(i)) - 1):
            raise refuse(f"flatten(start_dim={start}, end_dim={end}) (only flatten(x, 1))")
        return self._add(Node(node.name, None, FLATTEN, inputs=[i]))

    def _check_channel_locality(self) -> None:
        """As :meth:`rso_ext.fused.lower_sequential.Plan._check_channel_locality`: a BatchNorm
        after flattening a spatial map normalises each pixel of a channel separately; refuse
        it."""
        flat: dict[int, bool] = {INPUT_NODE: False}
        for i, s in enumerate(self.steps):
            if s.kind in (CONV, LINEAR):
                flat[i] = False
            elif s.kind == FLATTEN:
                src = self.steps[s.inputs[0]].shape if s.inputs[0] != INPUT_NODE else None
                flat[i] = src is not None and len(src) == 4 and src[2] * src[3] > 1
            else:
                flat[i] = any(flat[j] for j in s.inputs)
                if s.kind == BN and flat[i]:
                    raise PlanError(f"module {s.name!r}: BatchNorm after flattening a spatial "
                                    "map is not supported by the fused backend")

    # -- graph queries ------------------------------------------------------------------------
    def _ancestors(self, nodes) -> set[int]:
        seen: set[int] = set()
        stack = [j for n in nodes if n != INPUT_NODE for j in self.steps[n].inputs]
        while stack:
            n = stack.pop()
            if n in seen or n == INPUT_NODE:
                continue
            seen.add(n)
            stack.extend(self.steps[n].inputs)
        return seen

    def _descendants(self, d: int) -> set[int]:
        out = {d}
        for i in range(d + 1, len(self.steps)):
            if any(j in out for j in self.steps[i].inputs):
                out.add(i)
        return out

    def _node_of(self, unit: Unit) -> int:
        idx = self._index.get(id(unit.module))
        if idx is None:
            raise PlanError(f"unit {unit.name!r} is not called by the model's forward")
        return idx

    def owner(self, unit: Unit) -> int:
        """Index of the conv/linear node whose output the unit changes (for a BatchNorm: the
        last conv/linear before it in execution order, as rso_ext.visit groups them)."""
        return owning_layer(self.steps, self._node_of(unit), unit)

    def stash_points(self, start: int) -> list[int]:
        """No inputs are stashed for shallower layers of a traced graph (each unit sweep
        builds its caches from the data)."""
        return []

    def dependencies(self, nodes) -> list[nn.Module]:
        """The modules whose parameters and buffers the values of ``nodes`` depend on."""
        anc = self._ancestors(nodes) | {n for n in nodes if n != INPUT_NODE}
        return [self.steps[i].module for i in sorted(anc) if self.steps[i].module is not None]

    def check_units(self, units: list[Unit]) -> None:
        """Raise the :class:`PlanError` :meth:`program` would raise for any of ``units`` (a
        unit not called by forward, a BatchNorm outside its layer's channel-local chain, a
        layer that does not reach the output), before a run starts."""
        for unit in units:
            self._analyse(unit)

    # -- the sweep of a unit ------------------------------------------------------------------
    def _analyse(self, unit: Unit) -> _Analysis:
        d = self.owner(unit)
        unit_node = self._node_of(unit)
        down = self._descendants(d) & self.needed
        if self.output not in down:
            raise PlanError(f"layer {self.steps[d].name!r} does not reach the model's output")
        local: dict[int, bool] = {d: True}
        for i in sorted(down - {d}):
            s = self.steps[i]
            local[i] = s.kind not in (CONV, LINEAR) and all(local[j] for j in s.inputs
                                                           if j in down)
        if unit_node != d and not local.get(unit_node, False):
            raise PlanError(f"BatchNorm {unit.name!r} is not in the channel-local chain of its "
                            f"layer {self.steps[d].name!r}")

        def batch(i: int) -> bool:   # rso_ext.batchnorm.search_mode: at or after the unit
            s = self.steps[i]
            return s.kind == BN and (i >= unit_node or s.module.running_mean is None)

        fixed: dict[int, bool] = {INPUT_NODE: True}

        def is_fixed(i: int) -> bool:
            if i not in fixed:
                fixed[i] = not batch(i) and all(is_fixed(j) for j in self.steps[i].inputs)
            return fixed[i]

        run, cached = set(down) - {d}, set()
        stack = [j for i in run for j in self.steps[i].inputs if j not in down]
        while stack:
            c = stack.pop()
            if c in run or c in cached:
                continue
            if is_fixed(c):
                cached.add(c)
            else:                  # depends on the minibatch only: run per minibatch
                run.add(c)
                stack.extend(j for j in self.steps[c].inputs if j not in down)
        x_node = self.steps[d].inputs[0]
        if not is_fixed(x_node):
            raise PlanError(f"the input of layer {self.steps[d].name!r} depends on minibatch "
                            "statistics during its sweep; the fused backend caches it")
        return _Analysis(d, unit_node, [d] + sorted(run), x_node, sorted(cached), batch)

    def program(self, unit: Unit) -> UnitProgram:
        """The program of the fused ops for sweeping ``unit`` (live views of the parameters),
        with ``start`` (the layer's node), ``x_node`` (the node whose value is ``X_d``) and
        ``sides`` ((op index, node) pairs: ``program.tensors[4 * op]`` must be set to that
        node's value over the pool before the program runs, :meth:`UnitProgram.with_sides`)."""
        return self._emit(unit)[0]

    def _emit(self, unit: Unit) -> tuple[UnitProgram, list[int]]:
        """The program of :meth:`program` and the nodes it keeps in slots."""
        an = self._analyse(unit)
        steps, order = self.steps, an.order
        kinds, params, eps, tensors = [], [], [], []
        sides: list[tuple[int, int]] = []
        slot: dict[int, int] = {}

        def emit(kind, p=(0, 0, 0, 0), e=0.0, t=(None,) * 4) -> int:
            kinds.append(kind)
            params.extend(p)
            eps.append(e)
            tensors.extend(t)
            return len(kinds) - 1

        cached = set(an.sides)
        uses = Counter(j for n in order[1:] for j in steps[n].inputs if j not in cached)
        uses[self.output] += 1                   # the logits are read at the end

        def make_current(i: int) -> None:
            if i in cached:
                sides.append((emit(INPUT), i))
            else:
                emit(LOAD, (slot[i], 0, 0, 0))

        unit_op = 0
        last = None
        for pos, n in enumerate(order):
            s = steps[n]
            if s.kind == ADD:
                a, b = s.inputs
                if b == last and a != last:
                    a, b = b, a
                if a != last:
                    make_current(a)
                if b in cached:
                    sides.append((emit(ADD, (0, 1, 0, 0)), b))
                else:
                    emit(ADD, (slot[b], 0, 0, 0))
            else:
                if pos > 0 and s.inputs[0] != last:
                    make_current(s.inputs[0])
                p = list(s.params)
                if s.kind == BN:
                    p[0] = int(an.batch(n))
                k = emit(s.kind, p, s.eps, s.tensors())
                if n == an.unit_node:
                    unit_op = k
            last = n
            # a value read later by another op than the next one waits in a slot
            nxt = order[pos + 1] if pos + 1 < len(order) else None
            taken = int(n in steps[nxt].inputs) if nxt is not None else int(n == self.output)
            if uses[n] > taken:
                if len(slot) == MAX_SLOTS:
                    raise PlanError(f"the sweep of {unit.name!r} needs more than {MAX_SLOTS} "
                                    "saved tensors")
                slot[n] = len(slot)
                emit(SAVE, (slot[n], 0, 0, 0))
        if last != self.output:
            make_current(self.output)
        prog = UnitProgram(Program(kinds, params, eps, tensors), unit_kind(unit), unit_op,
                           start=an.d, x_node=an.x_node, sides=tuple(sides))
        return prog, list(slot)

    def side_widths(self, unit: Unit) -> tuple[int, int]:
        """(numbers per sample cached besides ``X_d`` and ``Z_d`` for the sweep of ``unit``:
        its side inputs; numbers per sample of the values its program keeps in slots while a
        minibatch is evaluated)."""
        an = self._analyse(unit)
        side = sum(self.steps[i].shape[1:].numel() for i in an.sides if i != INPUT_NODE)
        saved = sum(self.steps[n].shape[1:].numel() for n in self._emit(unit)[1])
        return side, saved

    # -- the caches ---------------------------------------------------------------------------
    @torch.no_grad()
    def values(self, x: torch.Tensor, nodes: list[int]) -> dict[int, torch.Tensor]:
        """The values of ``nodes`` for the input batch ``x``, by the modules in their current
        modes (run inside rso_ext.batchnorm.search_mode for the sweep's caches)."""
        want = set(nodes)
        need = self._ancestors(nodes) | (want - {INPUT_NODE})
        last_use: dict[int, int] = {}
        for i in sorted(need):
            for j in self.steps[i].inputs:
                last_use[j] = i
        env = {INPUT_NODE: x}
        for i in sorted(need):
            env[i] = _run(self.steps[i], [env[j] for j in self.steps[i].inputs])
            for j in set(self.steps[i].inputs):
                if last_use.get(j) == i and j not in want:
                    del env[j]
        return {n: env[n] for n in nodes}

