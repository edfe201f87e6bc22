"""What onnxruntime's integer kernels compute, for a deployment target's simulation (evaluation only).

A target's plan (:attr:`~dfquant.quant.plan.QuantPlan.kernels`, :attr:`~dfquant.quant.plan.QuantPlan.int_ops`)
says which quantizer writes the output integers of every integer conv, residual addition and global average
pooling. Without autograd the simulation then computes those integers as the kernels do, rather than rounding a
float result that sums in another order (which moves about one output in a million by a grid step, a step the
logits then carry):

* QLinearConv (:meth:`~dfquant.quant.modules.QuantLayer._kernel_forward`): the exact integer accumulator plus
  the int32 bias, ``round(float32(acc + B) * float32(s_x s_w / s_y))``.
* QLinearAdd (:func:`qlinear_add`): onnxruntime's x86 kernel (AVX2 and later, with FMA) on the uint8 codes,
  ``round(fma(a, s_a/s_c, fma(b, s_b/s_c, z_c - fma(s_a/s_c, z_a, s_b/s_c z_b))))`` in float32. Its ARM (fixed
  point) and SSE2-only kernels round a few of the half-way sums the other way.
* QLinearGlobalAveragePool (:func:`qlinear_global_avgpool`): the integer sum ``sum(x) - z_x N`` requantized
  with ``float32(s_x / (s_y N))``.

The operands of an addition or pooling are the outputs of the quantizers the plan names; :func:`mark` hands
them on as :class:`OnGrid` tensors (a plain tensor for every other operation), whose ``__torch_function__``
computes the integer kernel when the model's own forward adds or pools them. Each value is returned on the
writing quantizer's grid (its integer times its step), so the ReLU the kernel folds into its clip and the
quantizer itself leave it exact. With autograd, or a quantizer switched off, nothing is marked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfquant.quant.quantizers import UniformQuantizer

# one entry per quantizer that takes part: {"add": {second operand's quantizer: the sum's}, "pool": the pooled
# value's quantizer}; a plain attribute (module dicts are not registered), copied along with the model
INT_OPS = "_dfq_int_ops"


def _shift(q) -> int:
    """onnxruntime's container offset of a grid: signed grids are written in uint8, shifted by 128."""
    return 128 if q.qrange[0] < 0 else 0


def _codes(t: torch.Tensor, q) -> torch.Tensor:
    """The uint8 codes of ``t`` (a value on ``q``'s grid), as float64."""
    s, z = q.scale.detach().reshape(()), q.zero_point.reshape(())
    return (torch.round(t / s) + z).double() + _shift(q)


def _value_of(k: torch.Tensor, q) -> torch.Tensor:
    """The value of uint8 code ``k`` (float64, unclamped to ``q``'s grid) on ``q``'s grid, in float32."""
    z = q.zero_point.reshape(()).double() + _shift(q)
    return ((k - z).float()) * q.scale.detach().reshape(())


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """float32 ``x * y + z`` rounded once (the product of a float32 and a uint8 code is exact in float64)."""
    return (x.double() * y.double() + z.double()).float()


def qlinear_add(a: torch.Tensor, qa, b: torch.Tensor, qb, qc) -> torch.Tensor:
    """QLinearAdd of ``a`` (on ``qa``'s grid) and ``b`` (on ``qb``'s), written on ``qc``'s grid."""
    sa, sb, sc = (q.scale.detach().reshape(()).float() for q in (qa, qb, qc))
    za, zb, zc = (q.zero_point.reshape(()).float() + _shift(q) for q in (qa, qb, qc))
    ra, rb = sa / sc, sb / sc
    fixed = zc - _fma(ra, za, rb * zb)
    v = _fma(_codes(a, qa), ra, _fma(_codes(b, qb), rb, fixed))
    return _value_of(torch.round(v).clamp(0, 255).double(), qc)


def qlinear_global_avgpool(x: torch.Tensor, qx, qy) -> torch.Tensor:
    """QLinearGlobalAveragePool of ``x`` (N, C, H, W on ``qx``'s grid), written on ``qy``'s grid, as (N, C, 1, 1)."""
    n = x.shape[-1] * x.shape[-2]
    acc = _codes(x, qx).sum((-1, -2), keepdim=True) - (qx.zero_point.reshape(()).double() + _shift(qx)) * n
    sx, sy = qx.scale.detach().reshape(()).float(), qy.scale.detach().reshape(()).float()
    scale = sx / (sy * float(n))
    zy = qy.zero_point.reshape(()).double() + _shift(qy)
    return _value_of((torch.round(acc.float() * scale).double() + zy).clamp(0, 255), qy)


def mark(t: torch.Tensor, q) -> torch.Tensor:
    """``t`` (the output of quantizer ``q``) as an :class:`OnGrid` tensor when ``q`` feeds an integer addition or
    pooling of the plan and no autograd runs; ``t`` itself otherwise."""
    if torch.is_grad_enabled() or INT_OPS not in q.__dict__ or not on_grid(q):
        return t
    g = t.as_subclass(OnGrid)
    g.dfq_q, g.dfq_version = q, g._version
    return g


def _operand(t) -> object | None:
    """The quantizer of an :class:`OnGrid` operand whose values it still holds (no in-place change since)."""
    if isinstance(t, OnGrid) and getattr(t, "dfq_version", None) == t._version:
        return t.dfq_q
    return None


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__iadd__, torch.Tensor.add_}
_POOLS = {F.adaptive_avg_pool2d}


def on_grid(q, per_tensor: bool = True) -> bool:
    """Whether ``q`` rounds onto its uniform grid now: a dfquant UniformQuantizer (or one frozen onto its grid, as
    NIPQ's after finalize), switched on and calibrated (a lazily initialized one calibrates on the float result
    first), per tensor for activations."""
    return (isinstance(q, UniformQuantizer) and (type(q).forward is UniformQuantizer.forward or getattr(q, "frozen", False))
            and q.enabled and q.initialized and (q.channel_axis is None or not per_tensor))



def _integer_op(func, args, kwargs) -> torch.Tensor | None:
    """The integer kernel's result of ``func(*args, **kwargs)``, or None when the plan has no kernel for it."""
    plain = lambda t: t.as_subclass(torch.Tensor)  # noqa: E731
    if func in _ADDS and len(args) == 2 and not kwargs:
        qa, qb = _operand(args[0]), _operand(args[1])
        qc = (qa.__dict__.get(INT_OPS) or {}).get("add", {}).get(qb) if qa is not None and qb is not None else None
        if on_grid(qc) and args[0].shape == args[1].shape:
            return qlinear_add(plain(args[0]), qa, plain(args[1]), qb, qc)
    if func in _POOLS:
        qx = _operand(args[0])
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        qy = (qx.__dict__.get(INT_OPS) or {}).get("pool") if qx is not None else None
        if on_grid(qy) and args[0].dim() == 4 and size in (1, (1, 1), [1, 1]):
            return qlinear_global_avgpool(plain(args[0]), qx, qy)
    return None


class OnGrid(torch.Tensor):
    """A quantizer's output on its way to an integer addition or pooling (see the module doc). Every other
    operation sees, and returns, a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _integer_op(func, args, kwargs)
        if out is not None:
            return out
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def link(ops: list[dict], resolve) -> None:
    """Record the plan's integer additions and poolings (``int_ops``) on the quantizers taking part; ``resolve``
    maps a writer name of the plan to its quantizer."""
    for op in ops:
        qs = [resolve(w) for w in op["inputs"]]
        out = resolve(op["output"])
        for q in qs:
            q.__dict__.setdefault(INT_OPS, {})
        if op["op"] == "add":
            qs[0].__dict__[INT_OPS].setdefault("add", {})[qs[1]] = out
        elif op["op"] == "pool":
            qs[0].__dict__[INT_OPS]["pool"] = out
