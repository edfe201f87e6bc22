"""The quantization plan of a model, read off its data-flow graph (:mod:`dfquant.quant.graph`).

A plan says, before anything is quantized:

* **units** — what block reconstruction optimizes jointly, in execution order:
  ``residual``: the module that holds a residual merge, i.e. the subgraph between a tensor and
  the ``add`` that merges it back (found by dominators: the add's immediate dominator is the
  tensor both branches start from, whatever modules the branches are made of — identity, a
  padding lambda, a 1x1 conv + BN);
  ``stack``: a module that runs a layer straight on its input and is either a chain of
  several layers (an inverted residual without skip) or one layer with its norm/activation
  (conv-norm-act); ``layer``: any other Conv2d/Linear on its own.
* **where each activation is quantized** — a residual or multi-layer unit whose input feeds
  quantized layers directly quantizes that input once (``QuantBlock``), so the shortcut
  branch and every entry layer read the same quantized tensor; other layers quantize their
  own input, and layers that read the same tensor share one quantizer. First and last layer
  and the second layer's input follow the algorithm's conventions (:class:`QuantConfig`).
* **BN folding** — a Conv2d whose only consumer is a BatchNorm2d (data flow, not names: a
  pre-activation block's BN, which precedes its conv, is not folded); timm's BatchNormAct2d
  folds its BN and keeps its activation.
* **what stays float** — ``keep_fp`` globs, layer types QuantLayer does not implement
  (Conv1d/3d, transposed convs, subclasses with their own forward), layers the forward never
  calls; a warning names them, and any residual merge that could not be grouped.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.graph import ROOT, Graph, trace_graph
from dfquant.quant.modules import QuantConfig
from dfquant.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

ADD = "add"
POOL_FUNCTIONS = {"adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d", "mean"}
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
# what may follow a single layer inside a conv-norm-act stack
POINTWISE_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.Identity,
                     nn.Dropout, nn.Hardsigmoid, nn.Sigmoid, nn.LeakyReLU, nn.Tanh, nn.Mish, nn.PReLU, nn.ELU)
POINTWISE_FUNCTIONS = {"relu", "relu6", "hardtanh", "silu", "gelu", "hardswish", "sigmoid", "hardsigmoid", "batch_norm",
                       "dropout", "leaky_relu", "tanh", "mish", "elu"}


# BatchNorm subclasses that are BN -> drop -> act (timm's norm-act layers): their BN folds, drop and act stay
BN_ACT_CLASSES = {"timm.layers.norm_act.BatchNormAct2d"}


def foldable_bn(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d or f"{type(m).__module__}.{type(m).__name__}" in BN_ACT_CLASSES


# Linear subclasses whose forward is F.linear (checked hints; other subclasses with their own forward stay float)
PLAIN_LINEAR_SUBCLASSES = {"timm.layers.linear.Linear"}


def is_quantizable(m: nn.Module) -> bool:
    """Conv2d/Linear whose forward is torch's own (QuantLayer re-implements exactly that forward)."""
    if isinstance(m, nn.Linear) and f"{type(m).__module__}.{type(m).__name__}" in PLAIN_LINEAR_SUBCLASSES:
        return True
    return (isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward) or \
           (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward)


def _layer_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


@dataclass
class LayerPlan:
    name: str
    unit: str
    role: str                 # first | second | last | entry | body
    wbits: float
    abits: float | None       # bits of the layer's own input quantizer (None: none of its own)
    input: str                # own | block <unit> | shared <layer> | unquantized


@dataclass
class UnitPlan:
    name: str
    kind: str                 # residual | stack | layer | user
    layers: list[str]
    input_bits: float | None = None  # the unit quantizes its input once (QuantBlock) at these bits


@dataclass
class QuantPlan:
    """Units, per-layer bits and input quantization, BN folds and float parts of one model."""

    units: list[UnitPlan]
    layers: dict[str, LayerPlan]
    folds: dict[str, str] = field(default_factory=dict)          # conv -> the BatchNorm folded into it
    float_layers: dict[str, str] = field(default_factory=dict)   # layer -> why it stays float
    warnings: list[str] = field(default_factory=list)
    tracer: str = "fx"
    target: str | None = None                                 # deployment target (dfquant.quant.target)
    outputs: dict[str, float] = field(default_factory=dict)   # module -> bits of the output quantizer the target adds
    # target: integer conv -> the quantizer that writes its output integers ("layer L" / "block U": their input
    # quantizer, "output M": the output quantizer of M, "module Q": a quantizer module)
    kernels: dict[str, str] = field(default_factory=dict)
    # target: integer additions and global average poolings, {"op": "add" | "pool", "inputs": [writer of each
    # operand], "output": writer of the result} (dfquant.quant.integer)
    int_ops: list[dict] = field(default_factory=list)

    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def blocks(self) -> dict[str, float]:
        """Units that quantize their input once (wrapped in ``QuantBlock``) and the bits they use."""
        return {u.name: u.input_bits for u in self.units if u.input_bits is not None}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPlan":
        return cls(units=[UnitPlan(**u) for u in d["units"]], layers={k: LayerPlan(**v) for k, v in d["layers"].items()},
                   folds=dict(d.get("folds", {})), float_layers=dict(d.get("float_layers", {})),
                   warnings=list(d.get("warnings", [])), tracer=d.get("tracer", "fx"), target=d.get("target"),
                   outputs=dict(d.get("outputs", {})), kernels=dict(d.get("kernels", {})),
                   int_ops=list(d.get("int_ops", [])))

    def __str__(self) -> str:
        bits = lambda b: "-" if b is None else f"{b:g}"  # noqa: E731
        rows = [("unit", "kind", "layer", "role", "W", "A", "input quantized by", "BN folded")]
        for u in self.units:
            for i, name in enumerate(u.layers):
                lp = self.layers[name]
                inp = {"own": f"own A{bits(lp.abits)}", "unquantized": "unquantized (model input)"}.get(lp.input, lp.input)
                if lp.input.startswith("block"):
                    inp = f"{lp.input} A{bits(u.input_bits)}"
                rows.append((u.name if i == 0 else "", u.kind if i == 0 else "", name, lp.role, bits(lp.wbits),
                             bits(lp.abits), inp, self.folds.get(name, "")))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_res = sum(u.kind == "residual" for u in self.units)
        lines.append(f"\n{len(self.units)} units ({n_res} residual), {len(self.layers)} quantized layers, "
                     f"{len(self.folds)} BN folded, graph from {self.tracer}")
        if self.float_layers:
            lines.append("float: " + ", ".join(f"{k} ({v})" for k, v in self.float_layers.items()))
        if self.target is not None:
            from dfquant.quant.target import get_target

            lines.append(f"\ntarget {self.target}: " + get_target(self.target).summary)
            lines += [f"  + {r}" for r in get_target(self.target).rules]
            lines.append(f"  output quantizers added ({len(self.outputs)}): "
                         + (", ".join(f"{k} A{v:g}" for k, v in self.outputs.items()) or "none"))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _matches(name: str, globs: list[str] | tuple[str, ...]) -> bool:
    return any(name == g or fnmatch.fnmatchcase(name, g) or name.startswith(g + ".") for g in globs)


class _Analysis:
    """The graph facts the plan is made of (kept apart from the bit conventions)."""

    def __init__(self, model: nn.Module, g: Graph, keep_fp: list[str] | tuple[str, ...]):
        self.model, self.g = model, g
        self.mods = dict(model.named_modules())
        self.leaf_calls: dict[str, list[int]] = {}
        for op in g.ops:
            if op.kind == "module":
                self.leaf_calls.setdefault(op.target, []).append(op.index)
        self.calls_by_path: dict[str, list[str]] = {}
        for key, c in g.calls.items():
            self.calls_by_path.setdefault(c.path, []).append(key)
        self.float_layers: dict[str, str] = {}
        self.layers: list[str] = []
        for name in self.leaf_calls:  # execution order of first calls (dicts keep insertion order)
            m = self.mods[name]
            if isinstance(m, nn.MultiheadAttention):
                self.float_layers[name] = "MultiheadAttention is not quantized"
            if not _layer_like(m):
                continue
            if _matches(name, keep_fp):
                self.float_layers[name] = "keep_fp"
            elif not is_quantizable(m):
                own = type(m).forward not in (nn.Conv2d.forward, nn.Linear.forward) and isinstance(m, (nn.Conv2d, nn.Linear))
                self.float_layers[name] = f"{type(m).__name__} " + ("has its own forward" if own else "is not quantized")
            else:
                self.layers.append(name)
        for name, m in self.mods.items():
            if _layer_like(m) and name not in self.leaf_calls and not _inside_layer(name, self.mods):
                self.float_layers[name] = "not called by forward"
        self.layer_set = set(self.layers)
        self.idom = g.dominators()

    def called_once(self, path: str) -> bool:
        return len(self.calls_by_path.get(path, [])) + len(self.leaf_calls.get(path, [])) == 1

    def single_io(self, path: str) -> tuple[int, list[int]] | None:
        """(input value, ops) of a module called once with one data input and one output, else None."""
        if not self.called_once(path) or path not in self.calls_by_path:
            return None
        call = self.g.calls[self.calls_by_path[path][0]]
        ins, outs = self.g.call_inputs(call), self.g.call_outputs(call)
        if len(ins) != 1 or len(outs) != 1:
            return None
        return ins[0], call.ops

    def folds(self) -> dict[str, str]:
        """Conv2d -> BatchNorm2d pairs where the BN is the conv output's only consumer."""
        pairs = {}
        for name, calls in self.leaf_calls.items():
            if len(calls) != 1 or not isinstance(self.mods[name], nn.Conv2d):
                continue
            op = self.g.ops[calls[0]]
            cons = self.g.consumers.get(op.outputs[0], []) if len(op.outputs) == 1 else []
            if len(cons) != 1 or self.g.ops[cons[0]].kind != "module":
                continue
            bn = self.g.ops[cons[0]].target
            if foldable_bn(self.mods[bn]) and len(self.leaf_calls[bn]) == 1 and op.outputs[0] not in self.g.outputs:
                pairs[name] = bn
        return pairs

    def residual_owners(self) -> tuple[list[str], list[str]]:
        """Modules holding a residual merge (innermost), and descriptions of merges no module holds."""
        owners: list[str] = []
        loose: list[str] = []
        for op in self.g.ops:
            if op.kind != "function" or op.target != ADD or len(op.inputs) < 2:
                continue
            dom = self.idom[op.index]
            region = self._region(op.index, dom)
            common = _common_prefix([self.g.ops[i].scope for i in region])
            owner = None
            for key in reversed(common):
                path = self.g.calls[key].path
                if self.single_io(path) is not None:
                    owner = path
                    break
            if owner is None:
                layers = sorted({self.g.ops[i].target for i in region if self.g.ops[i].target in self.layer_set})
                where = self.g.calls[common[-1]].path if common else "the model's forward"
                loose.append(f"a residual add in {where} (branches: {', '.join(layers) or 'no layers'})")
            elif owner not in owners:
                owners.append(owner)
        inner = [o for o in owners if not any(p != o and p.startswith(o + ".") for p in owners)]
        for o in owners:
            if o not in inner:
                loose.append(f"the residual add of {o}, which holds smaller residual units (its shortcut stays float)")
        return inner, loose

    def _region(self, end: int, dom: int) -> set[int]:
        seen = {end}
        todo = [end]
        while todo:
            i = todo.pop()
            for p in self.g.preds(i):
                if p != dom and p != ROOT and p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen

    def unit_layers(self, ops: list[int]) -> list[str]:
        return list(dict.fromkeys(self.g.ops[i].target for i in ops if self.g.ops[i].target in self.layer_set))

    def entries(self, x_in: int, ops: list[int]) -> list[str]:
        inside = set(ops)
        return list(dict.fromkeys(self.g.ops[c].target for c in self.g.consumers.get(x_in, [])
                                  if c in inside and self.g.ops[c].target in self.layer_set))

    def stackable(self, path: str, residual: list[str]) -> bool:
        """A module that runs a quantized layer straight on its input and is a conv-norm-act or a chain."""
        io = self.single_io(path)
        if io is None or any(r == path or r.startswith(path + ".") for r in residual):
            return False
        x_in, ops = io
        inside = set(ops)
        consumers = [c for c in self.g.consumers.get(x_in, []) if c in inside]
        if not consumers or any(self.g.ops[c].target not in self.layer_set for c in consumers):
            return False
        key = self.calls_by_path[path][0]
        own = [self.g.ops[i] for i in ops if self.g.ops[i].scope and self.g.ops[i].scope[-1] == key]
        if any((o.kind == "module" and isinstance(self.mods[o.target], POOL_MODULES)) or
               (o.kind == "function" and o.target in POOL_FUNCTIONS) for o in own):
            return False
        layers = self.unit_layers(ops)
        if len(layers) >= 2:
            return True
        rest = [self.g.ops[i] for i in ops if self.g.ops[i].target not in self.layer_set]
        return all((o.kind == "module" and isinstance(self.mods[o.target], POINTWISE_MODULES)) or
                   (o.kind == "function" and o.target in POINTWISE_FUNCTIONS) for o in rest)

    def first_op(self, path: str) -> int:
        if path in self.leaf_calls:
            return self.leaf_calls[path][0]
        return self.g.calls[self.calls_by_path[path][0]].ops[0]


def _inside_layer(name: str, mods: dict[str, nn.Module]) -> bool:
    """A layer nested in another layer-like module (e.g. MultiheadAttention.out_proj) is its parent's business."""
    parts = name.split(".")
    return any(_layer_like(mods[".".join(parts[:i])]) or type(mods[".".join(parts[:i])]).__module__.startswith("torch.nn.modules.activation")
               for i in range(1, len(parts)))


def _common_prefix(scopes: list[tuple[str, ...]]) -> tuple[str, ...]:
    if not scopes:
        return ()
    prefix = scopes[0]
    for s in scopes[1:]:
        n = 0
        while n < min(len(prefix), len(s)) and prefix[n] == s[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def make_plan(model: nn.Module, cfg: QuantConfig, example_input: torch.Tensor | None = None,
              units: list[str] | tuple[str, ...] | None = None) -> QuantPlan:
    """The quantization plan of ``model`` under ``cfg`` (see the module doc). ``units`` (module
    names) replaces the units found from the graph; layers they leave out become their own units."""
    g = trace_graph(model, example_input)
    a = _Analysis(model, g, cfg.keep_fp)
    if not a.layers:
        raise DfqError(f"{type(model).__name__} has no Conv2d/Linear layer to quantize "
                       f"({len(a.float_layers)} kept float)")
    warn: list[str] = []
    residual, loose = a.residual_owners()
    chosen: list[tuple[str, str]] = []  # (path, kind)
    if units is not None:
        for u in units:
            if u not in a.mods:
                raise DfqError(f"unit {u!r} is not a module of {type(model).__name__}; pass names from model.named_modules()")
            if u not in a.layer_set and a.single_io(u) is None:
                raise DfqError(f"unit {u!r} must be a module called once with one input and one output")
        for u in units:
            if any(o != u and (o.startswith(u + ".") or u.startswith(o + ".")) for o in units):
                raise DfqError(f"units {u!r} overlaps another unit; pass non-nested module names")
            chosen.append((u, "user" if u not in a.layer_set else "layer"))
        covered = {la for u, _ in chosen for la in ([u] if u in a.layer_set else a.unit_layers(a.single_io(u)[1]))}
        chosen += [(la, "layer") for la in a.layers if la not in covered]
    else:
        def visit(path: str, module: nn.Module) -> None:
            if path in residual:
                chosen.append((path, "residual"))
            elif path and path in a.layer_set:
                chosen.append((path, "layer"))
            elif path and a.stackable(path, residual):
                chosen.append((path, "stack"))
            else:
                for child, m in module.named_children():
                    visit(f"{path}.{child}" if path else child, m)

        visit("", model)
        if loose:
            warn.append("could not group " + "; ".join(loose) + ": their layers fall back to smaller units and "
                        "the shortcut reads an unquantized tensor")
    chosen = [c for c in chosen if c[0] in a.layer_set or a.unit_layers(a.single_io(c[0])[1])]
    chosen.sort(key=lambda c: a.first_op(c[0]))
    unasked = {k: v for k, v in a.float_layers.items() if v != "keep_fp"}
    if unasked:
        warn.append("kept in float: " + ", ".join(f"{k} ({v})" for k, v in unasked.items()))
    return _assign_bits(a, chosen, cfg, warn)


def bn_folds(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, str]:
    """Every Conv2d -> BatchNorm2d pair of ``model`` that folds (the BN is the conv output's only
    consumer), whether or not a config folds BN: what ``fold_bn=True`` plans, and what the ONNX
    exporter folds in a model quantized with its BatchNorms kept."""
    return _Analysis(model, trace_graph(model, example_input), ()).folds()


def _assign_bits(a: _Analysis, chosen: list[tuple[str, str]], cfg: QuantConfig, warn: list[str]) -> QuantPlan:
    layers = a.layers
    first, last = layers[0], layers[-1]
    second = layers[1] if len(layers) > 1 else None
    model_inputs = set(a.g.inputs)
    units: list[UnitPlan] = []
    block_of: dict[str, str] = {}
    for path, kind in chosen:
        if path in a.layer_set:
            units.append(UnitPlan(path, kind, [path]))
            continue
        x_in, ops = a.single_io(path)
        members = a.unit_layers(ops)
        unit = UnitPlan(path, kind, members)
        entries = [e for e in a.entries(x_in, ops) if e not in (first, last)]
        if len(members) >= 2 and entries and x_in not in model_inputs:
            unit.input_bits = cfg.second_input_bits if (second in entries and cfg.second_input_bits) else cfg.abits
            block_of.update({e: path for e in entries})
        units.append(unit)
    unit_of = {la: u.name for u in units for la in u.layers}
    plans: dict[str, LayerPlan] = {}
    readers: dict[int, str] = {}  # input value -> the layer that owns its quantizer
    for name in layers:
        wbits = cfg.first_last_bits if name in (first, last) else cfg.wbits
        if name == first:
            abits = cfg.first_last_bits if cfg.quantize_first_input else None
            lp = LayerPlan(name, unit_of[name], "first", wbits, abits, "own" if abits else "unquantized")
        elif name == last:
            lp = LayerPlan(name, unit_of[name], "last", wbits, cfg.first_last_bits, "own")
        elif name in block_of:
            lp = LayerPlan(name, unit_of[name], "second" if name == second else "entry", wbits, None, f"block {block_of[name]}")
        else:
            abits = cfg.second_input_bits if (name == second and cfg.second_input_bits) else cfg.abits
            lp = LayerPlan(name, unit_of[name], "second" if name == second else "body", wbits, abits, "own")
            x = a.g.ops[a.leaf_calls[name][0]].inputs[0]
            if x in readers:  # another layer reads the same tensor: one quantizer for both
                lp.abits, lp.input = None, f"shared {readers[x]}"
            else:
                readers[x] = name
        plans[name] = lp
    folds = a.folds() if cfg.fold_bn else {}
    plan = QuantPlan(units, plans, folds, a.float_layers, warn, a.g.tracer)
    if cfg.target is not None:
        from dfquant.quant.target import get_target

        plan.target = cfg.target
        plan.outputs, plan.kernels, plan.int_ops = _target_outputs(a, units, plans, folds, get_target(cfg.target).extra_bits, warn)
    return plan


# what an integer kernel fuses into its requantization (the clip after QuantizeLinear), after a folded BN
FUSED_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout)
FUSED_FUNCTIONS = {"relu", "relu6", "hardtanh", "dropout"}


def _target_outputs(a: _Analysis, units: list[UnitPlan], plans: dict[str, LayerPlan], folds: dict[str, str],
                    bits: float, warn: list[str]) -> tuple[dict[str, float], dict[str, str], list[dict]]:
    """The output quantizers a deployment target needs (module -> bits), read off the data flow; which
    quantizer writes the output integers of each conv (:attr:`QuantPlan.kernels`), and of each integer
    addition and global average pooling (:attr:`QuantPlan.int_ops`).

    An integer conv writes integers: its output, after the ReLU/ReLU6 the kernel fuses, must be
    quantized for every reader. Where no layer or block input quantizer reads it (a residual sum,
    pooling, a concat, a non-fusable activation), an output quantizer is added on the module that
    produces that tensor alone. A residual addition with a conv branch becomes an integer addition:
    its other inputs and its sum are quantized the same way."""
    g, mods = a.g, a.mods
    folded = set(folds.values())
    block_in: dict[int, dict[int, str]] = {}  # value -> {op reading it inside a block that quantizes it: the block}
    for u in units:
        if u.input_bits is not None:
            x_in, ops = a.single_io(u.name)
            block_in.setdefault(x_in, {}).update(dict.fromkeys(ops, u.name))

    def reader(v: int, c: int) -> str | None:
        """The quantizer through which op ``c`` reads ``v`` (a block's, a layer's, a quantizer module), or None."""
        op = g.ops[c]
        if c in block_in.get(v, {}):
            return f"block {block_in[v][c]}"
        if op.kind != "module":
            return None
        if op.target in plans:
            lp = plans[op.target]
            if lp.abits is not None:
                return f"layer {op.target}"
            return f"layer {lp.input.split(' ', 1)[1]}" if lp.input.startswith("shared") else \
                (f"block {lp.input.split(' ', 1)[1]}" if lp.input.startswith("block") else None)
        return f"module {op.target}" if isinstance(mods[op.target], (UniformQuantizer, LogSqrt2Quantizer)) else None

    def quantizes(v: int, c: int) -> bool:
        return reader(v, c) is not None

    def fused(c: int) -> bool:
        op = g.ops[c]
        if op.kind == "function":
            return op.target in FUSED_FUNCTIONS
        m = mods[op.target]
        if op.target in folded:  # a folded BN (or norm-act: its activation must be fusable too)
            return type(m) is nn.BatchNorm2d or isinstance(getattr(m, "act", None), FUSED_MODULES)
        return isinstance(m, FUSED_MODULES)  # stateless: a ReLU module used twice is still fused at each use

    def chain(v: int) -> list[int]:
        out = [v]
        while v not in g.outputs:
            cons = g.consumers.get(v, [])
            if len(cons) != 1 or not fused(cons[0]) or len(g.ops[cons[0]].outputs) != 1:
                break
            v = g.ops[cons[0]].outputs[0]
            out.append(v)
        return out

    def wrap_point(values: list[int]) -> str | None:
        for v in reversed(values):
            p = g.producer[v]
            if p == ROOT:
                return None
            op = g.ops[p]
            if op.kind == "module" and a.called_once(op.target) and len(op.outputs) == 1:
                return op.target
            for key in reversed(op.scope):
                call = g.calls[key]
                if a.single_io(call.path) is not None and g.call_outputs(call) == [v]:
                    return call.path
        return None

    outputs: dict[str, float] = {}
    unplaced: list[str] = []
    writer_of: dict[int, str] = {}  # value -> the quantizer that writes it (as QuantPlan.kernels names them)

    def need(values: list[int], what: str) -> str | None:
        """Quantize the end of ``values`` for its readers; returns the quantizer that does (None: it stays float)."""
        t = values[-1]
        if t in g.outputs:
            return None
        readers = {reader(t, c) for c in g.consumers.get(t, [])}
        if None not in readers and len(readers) == 1:
            writer_of[t] = readers.pop()  # one quantizer reads it: the kernel requantizes onto that grid
            return writer_of[t]
        path = wrap_point(values)
        if path is None:
            unplaced.append(what)
            return None
        outputs.setdefault(path, bits)
        writer_of[t] = f"output {path}"
        return writer_of[t]

    conv_ends: set[int] = set()
    kernels: dict[str, str] = {}
    for name in a.layers:
        if isinstance(mods[name], nn.Conv2d) and name in plans:
            values = chain(g.ops[a.leaf_calls[name][0]].outputs[0])
            conv_ends.add(values[-1])
            writer = need(values, f"the output of {name}")
            if writer is not None:
                kernels[name] = writer
    int_ops: list[dict] = []
    for op in g.ops:
        if op.kind == "function" and op.target == ADD and len(op.inputs) >= 2 and any(v in conv_ends for v in op.inputs):
            for v in op.inputs:
                if v in conv_ends:
                    continue
                if quantizes(v, op.index):
                    writer_of.setdefault(v, reader(v, op.index))
                    continue
                path = wrap_point([v])
                if path is None:
                    where = g.calls[op.scope[-1]].path if op.scope else "the model's own forward"
                    unplaced.append(f"an input of the residual addition in {where or 'the model'}")
                else:
                    outputs.setdefault(path, bits)
                    writer_of[v] = f"output {path}"
            out = need(chain(op.outputs[0]), "a residual sum")
            ins = [writer_of.get(v) for v in op.inputs]
            if len(ins) == 2 and out is not None and None not in ins:  # QLinearAdd
                int_ops.append({"op": "add", "inputs": ins, "output": out})
    for op in g.ops:  # a global average pooling of an integer tensor whose (flattened) value one quantizer reads
        pool = (op.kind == "function" and op.target == "adaptive_avg_pool2d") or \
            (op.kind == "module" and isinstance(mods[op.target], nn.AdaptiveAvgPool2d) and mods[op.target].output_size in (1, (1, 1)))
        if not pool or writer_of.get(op.inputs[0]) is None:
            continue
        t = op.outputs[0]
        while len(g.consumers.get(t, [])) == 1 and t not in g.outputs and _reshapes(g.ops[g.consumers[t][0]], mods):
            t = g.ops[g.consumers[t][0]].outputs[0]
        readers = {reader(t, c) for c in g.consumers.get(t, [])}
        if t not in g.outputs and len(readers) == 1 and None not in readers:  # QLinearGlobalAveragePool
            int_ops.append({"op": "pool", "inputs": [writer_of[op.inputs[0]]], "output": readers.pop()})
    for what in dict.fromkeys(unplaced):  # one warning per part, naming it
        warn.append(f"target: no single module produces {what}, so it stays float and the kernels around it run in "
                    "float")
    return outputs, kernels, int_ops


RESHAPE_FUNCTIONS = {"flatten", "view", "reshape", "squeeze", "dropout"}


def _reshapes(op, mods: dict[str, nn.Module]) -> bool:
    """An op that only moves values (the exporter puts a QuantizeLinear before it, see onnx_passes)."""
    if op.kind == "function":
        return op.target in RESHAPE_FUNCTIONS
    return isinstance(mods[op.target], (nn.Flatten, nn.Dropout, nn.Identity))


def warn_plan(plan: QuantPlan) -> None:
    """Show the plan's warnings once, as Python warnings (the CLI prints them as ``warning:`` lines)."""
    for w in plan.warnings:
        warnings.warn(f"quantization plan: {w}", UserWarning, stacklevel=3)
