"""Deployment targets: simulate what an integer runtime computes, so the evaluated model is the deployed one.

The papers' conventions (Genie, BRECQ, QDrop, RepQ-ViT) quantize the inputs of convolutions and
linear layers and keep everything else in float: residual sums, pooling inputs, the image, biases.
An integer kernel cannot run that: onnxruntime's QLinearConv reads *and writes* integers and adds
its bias as int32 on the step ``s_x * s_w``, so an export of such a model is either float (slow) or
another model (fast). A target changes the simulation before calibration, as deployment tools do
(onnxruntime's quantization tool, torchao's PT2E quantizers, TensorRT's QDQ rules), so that block
reconstruction learns away the cost of the runtime's constraints.

:data:`TARGETS` is the table; :class:`~dfquant.quant.modules.QuantConfig` names one
(``target="onnxruntime"``), :func:`~dfquant.quant.transform.make_quant_config` applies its
conventions and :func:`~dfquant.quant.plan.make_plan` adds the quantizers its kernels need,
read off the data-flow graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dfquant.errors import DfqError


@dataclass(frozen=True)
class Target:
    """One integer runtime: the conventions it forces and what its kernels need from the graph.

    ``extra_bits``: the bit-width of the quantizers the target adds (its integer tensors are 8-bit
    whatever grid they hold, so a narrower grid would cost accuracy and save nothing).
    ``conventions``: :class:`~dfquant.quant.modules.QuantConfig` fields the target fixes.
    ``rules``: what it adds, in words (``dfq plan --target`` lists them)."""

    name: str
    summary: str
    extra_bits: int = 8
    conventions: dict = field(default_factory=dict)
    rules: tuple[str, ...] = ()


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target(
        "onnxruntime",
        "onnxruntime CPU integer kernels (QLinearConv, QLinearAdd, MatMulIntegerToFloat) from a QDQ graph",
        conventions=dict(fold_bn=True, quantize_first_input=True, first_last_bits=8, weight_symmetric_8bit=True,
                         int32_bias=True),
        rules=(
            "image input of the first layer quantized (8 bit)",
            "BatchNorm folded into the conv weights and biases (all algorithms, Genie-M too)",
            "8-bit weights on symmetric int8 grids per channel (zero point 0); below 8 bits int8 with zero point 0",
            "conv biases rounded to int32 on the step s_x * s_w (what QLinearConv adds)",
            "every conv output quantized after its fused ReLU/ReLU6 (QLinearConv writes integers): "
            "residual-branch outputs, pooling and concat inputs (8 bit where no layer input quantizer reads it)",
            "residual additions read and write quantized tensors (QLinearAdd; 8 bit where no layer input quantizer reads the sum)",
            "ViTs: softmax output on a uniform 8-bit grid, so both attention MatMuls run as integer kernels "
            "(LayerNorm, GELU and softmax stay float)",
        )),
)}


def get_target(name: str | None) -> Target | None:
    """The table entry for ``name`` (None: the papers' conventions); a one-line error naming the choices otherwise."""
    if name is None:
        return None
    if name not in TARGETS:
        raise DfqError(f"target={name!r} is not a known deployment target; use one of {', '.join(TARGETS)} "
                       "(or none for the papers' conventions)", params=("target",))
    return TARGETS[name]
