"""The data-flow graph of a model's forward pass, as the quantization plan needs it.

:func:`trace_graph` records every leaf-module call and tensor function of one forward pass
in execution order, with the tensors each consumes and produces and the module calls that
enclose it. It first traces symbolically with ``torch.fx`` (no data needed); a forward that
fx cannot trace (shape-dependent control flow, tensor unpacking) is instead *executed* once
on an example input under a ``TorchFunctionMode`` plus module hooks, which records the same
graph. Only data-dependent values are recorded: parameters, buffers and tensors computed
from them alone (position embeddings, relative-position biases) are constants, so an ``add``
with two recorded inputs is a real merge of two branches of the data flow.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from dfquant.errors import DfqError
from dfquant.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

ROOT = -1  # the producer "op" of the graph inputs


@dataclass
class Op:
    """One recorded operation: a leaf-module call (``kind="module"``, ``target`` its path) or a
    tensor function/method (``kind="function"``, ``target`` its normalized name, e.g. ``add``)."""

    index: int
    kind: str
    target: str
    inputs: list[int]
    outputs: list[int]
    scope: tuple[str, ...]  # enclosing (non-leaf) module-call keys, outermost first


@dataclass
class Call:
    """One call of a non-leaf module: its path and the ops it ran (directly or nested)."""

    key: str
    path: str
    ops: list[int] = field(default_factory=list)


@dataclass
class Graph:
    ops: list[Op]
    calls: dict[str, Call]
    inputs: list[int]
    outputs: list[int]
    tracer: str
    producer: dict[int, int] = field(default_factory=dict)
    consumers: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for v in self.inputs:
            self.producer[v] = ROOT
        for op in self.ops:
            for v in op.inputs:
                self.consumers.setdefault(v, []).append(op.index)
            for v in op.outputs:
                self.producer[v] = op.index

    def preds(self, i: int) -> list[int]:
        """Producer ops of op ``i``'s inputs (``ROOT`` for graph inputs), without repeats."""
        return list(dict.fromkeys(self.producer[v] for v in self.ops[i].inputs))

    def call_inputs(self, call: Call) -> list[int]:
        """Values a call consumes that it did not produce (its data inputs)."""
        inside = set(call.ops)
        made = {v for i in call.ops for v in self.ops[i].outputs}
        return list(dict.fromkeys(v for i in call.ops for v in self.ops[i].inputs if v not in made and i in inside))

    def call_outputs(self, call: Call) -> list[int]:
        """Values a call produced that something outside it (or the graph output) reads."""
        inside = set(call.ops)
        out = []
        for i in call.ops:
            for v in self.ops[i].outputs:
                if v in self.outputs or any(c not in inside for c in self.consumers.get(v, [])):
                    out.append(v)
        return out

    def dominators(self) -> dict[int, int]:
        """Immediate dominator of every op (the latest op every path from the input to it passes);
        the ops are in execution order, which is a topological order (Cooper-Harvey-Kennedy on a DAG)."""
        idom: dict[int, int] = {ROOT: ROOT}

        def meet(a: int, b: int) -> int:
            while a != b:
                while a > b:
                    a = idom[a]
                while b > a:
                    b = idom[b]
            return a

        for op in self.ops:
            ps = self.preds(op.index)
            d = ps[0]
            for p in ps[1:]:
                d = meet(d, p)
            idom[op.index] = d
        return idom


def is_leaf(m: nn.Module) -> bool:
    """Modules recorded as one op: torch.nn's own layers (fx's default), every Conv/Linear/BatchNorm
    subclass (so a library's conv or norm-act layer stays one op) and dfquant's quantizers."""
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return (m.__module__.startswith("torch.nn") or isinstance(m, (UniformQuantizer, LogSqrt2Quantizer))
            or isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm))
            or type(m) is nn.LayerNorm)


def _fn_name(target: Any) -> str:
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    name = name.strip("_")
    return {"iadd": "add", "radd": "add", "imul": "mul", "rmul": "mul"}.get(name, name)


def _is_shape_query(node: fx.Node) -> bool:
    """Sizes read off a tensor are not data (an ``add`` of two sizes is no residual merge)."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D102
        return is_leaf(m)


def _trace_fx(model: nn.Module) -> Graph:
    # only the image is symbolic: optional arguments (timm's attn_mask=None) keep their defaults,
    # so the traced branches are the ones ``model(x)`` runs
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    gm = _Tracer().trace(model, concrete_args=concrete or None)
    vid: dict[fx.Node, int] = {}
    ops: list[Op] = []
    calls: dict[str, Call] = {}
    inputs: list[int] = []
    outputs: list[int] = []
    for node in gm.nodes:
        if node.op == "placeholder":
            vid[node] = len(vid)
            inputs.append(vid[node])
            continue
        if node.op == "output":
            outputs = [vid[n] for n in node.all_input_nodes if n in vid]
            continue
        if node.op == "get_attr" or _is_shape_query(node):
            continue
        ins = [vid[n] for n in node.all_input_nodes if n in vid]
        if not ins:  # computed from constants only
            continue
        stack = list(node.meta.get("nn_module_stack", {}).items())
        if node.op == "call_module":
            stack = stack[:-1]  # the leaf's own entry
            kind, target = "module", str(node.target)
        else:
            kind, target = "function", _fn_name(node.target if node.target is not operator.getitem else "getitem")
        scope = tuple(k for k, _ in stack)
        for k, (path, _) in stack:
            calls.setdefault(k, Call(k, path)).ops.append(len(ops))
        vid[node] = len(vid)
        ops.append(Op(len(ops), kind, target, list(dict.fromkeys(ins)), [vid[node]], scope))
    return Graph(ops, calls, inputs, outputs, "fx")


class _Recorder(TorchFunctionMode):
    """Executes the forward pass and records leaf-module calls (by hooks) and tensor functions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.ops: list[Op] = []
        self.calls: dict[str, Call] = {}
        self.ids: dict[int, tuple[torch.Tensor, int]] = {}
        self.n_values = 0
        self.scope: list[str] = []
        self.leaf: nn.Module | None = None  # the leaf module running now (its inner calls are not recorded)
        self.count: dict[str, int] = {}
        self.names = {m: n for n, m in model.named_modules()}

    def value(self, t: torch.Tensor) -> int | None:
        got = self.ids.get(id(t))
        return got[1] if got is not None and got[0] is t else None

    def new_value(self, t: torch.Tensor) -> int:
        self.ids[id(t)] = (t, self.n_values)  # keeps t alive, so id(t) is not reused
        self.n_values += 1
        return self.n_values - 1

    def record(self, kind: str, target: str, args: Any, out: Any) -> None:
        ins = [v for v in (self.value(t) for t in _tensors(args)) if v is not None]
        if not ins:
            return
        outs = [self.new_value(t) for t in _tensors(out)]
        if not outs:  # sizes, dims, comparisons: not data flow
            return
        for k in self.scope:
            self.calls[k].ops.append(len(self.ops))
        self.ops.append(Op(len(self.ops), kind, target, list(dict.fromkeys(ins)), outs, tuple(self.scope)))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        if self.leaf is None:
            self.record("function", _fn_name(func), (args, kwargs), out)
        return out

    def pre(self, m: nn.Module, args: Any) -> None:
        if self.leaf is not None:
            return
        path = self.names[m]
        if is_leaf(m):
            self.leaf = m
            return
        n = self.count.get(path, 0)
        self.count[path] = n + 1
        key = path if n == 0 else f"{path}@{n}"
        self.calls[key] = Call(key, path)
        self.scope.append(key)

    def post(self, m: nn.Module, args: Any, out: Any) -> None:
        if self.leaf is not None:
            if m is self.leaf:
                self.leaf = None
                self.record("module", self.names[m], args, out)
            return
        self.scope.pop()


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    return []


def _trace_hooks(model: nn.Module, example_input: torch.Tensor) -> Graph:
    rec = _Recorder(model)
    handles = []
    for m in model.modules():
        if m is model and is_leaf(m):
            continue
        handles.append(m.register_forward_pre_hook(rec.pre))
        handles.append(m.register_forward_hook(rec.post))
    quantizers = [(q, q.enabled) for q in model.modules() if isinstance(q, (UniformQuantizer, LogSqrt2Quantizer))]
    x = example_input.detach().clone()
    x_id = rec.new_value(x)
    try:
        for q, _ in quantizers:  # the trace must not initialize a quantizer's range
            q.enabled = False
        with torch.no_grad(), rec:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        for q, state in quantizers:
            q.enabled = state
    outputs = [v for v in (rec.value(t) for t in _tensors(out)) if v is not None]
    calls = {k: c for k, c in rec.calls.items() if k != ""}
    ops = [Op(o.index, o.kind, o.target, o.inputs, o.outputs, tuple(s for s in o.scope if s != "")) for o in rec.ops]
    return Graph(ops, calls, [x_id], outputs, "hooks")


def trace_graph(model: nn.Module, example_input: torch.Tensor | None = None, method: str = "auto") -> Graph:
    """The model's data-flow graph: torch.fx when the forward traces symbolically, else one
    recorded execution on ``example_input`` (``method="hooks"`` forces the recorded execution)."""
    was_training = model.training
    model.eval()
    try:
        try:
            if method == "hooks":
                raise RuntimeError("the forward-hook trace was requested")
            return _trace_fx(model)
        except Exception as fx_error:  # noqa: BLE001 - any fx failure means "trace by running it"
            if example_input is None:
                raise DfqError(f"torch.fx cannot trace {type(model).__name__} ({type(fx_error).__name__}: "
                               f"{str(fx_error).splitlines()[0] if str(fx_error) else ''}); pass an example input "
                               "so the plan can be recorded from one forward pass") from None
        try:
            return _trace_hooks(model, example_input)
        except DfqError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's forward failed on the example input
            raise DfqError(f"{type(model).__name__}.forward failed on an example input of shape "
                           f"{tuple(example_input.shape)}: {type(exc).__name__}: {exc}; pass an input the model accepts") from None
    finally:
        model.train(was_training)
