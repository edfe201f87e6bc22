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

**Exact, not close.** In evaluation (no autograd) the simulation computes what the integer kernels
compute (:mod:`dfquant.quant.integer`): QLinearConv's exact int32 accumulator and float32
requantization, QLinearAdd's x86 float formula, QLinearGlobalAveragePool's integer sum. Rounding a
float result that sums in another order instead moves about one output in a million by a grid step
(a half-way value rounded the other way), and a W8A8 model carries that step to the logits. Measured
on 1000 Fashion-MNIST test images, ``minmax`` and ``genie-m`` (50 iterations), W8A8 and W4A4, on this
project's AMD EPYC (AVX2, no VNNI) with onnxruntime 1.32: argmax agreement 100% and max |logit
difference| at most 7.6e-6 (logits up to 22; the classifier's float Gemm) for fmnist/resnet20 and
fmnist/mobilenetv2, where the float form left up to 0.09 and the full int8 grid below changed the
class of 12-14% of the images. A ViT's LayerNorm, softmax and GELU stay float in both, so its export
agrees closely but not bit for bit (the export's ``inexact`` says where).

**8-bit weights on 7 bits (``weight_reduce_range``).** onnxruntime's u8s8 matrix kernels on AVX2
CPUs without VNNI multiply with VPMADDUBSW, which adds each pair of uint8 x int8 products in int16
with saturation; an activation code reaches 255 (int8 grids are shifted to uint8), so a weight
beyond 64 can saturate (:func:`~dfquant.quant.export.qdq._exact_int8_bound`). With the full int8
grid (-128..127) the W8A8 export of fmnist/resnet20 agreed with the simulation on 88.1% of the test
images with ``minmax`` (max |logit difference| 7.5, top-1 85.0% deployed against 93.8% simulated)
and 87.8% with ``genie-m``, fmnist/mobilenetv2 on 85.9% and 86.9%; emulating the int16 saturation of
pairs of neighbouring input channels reproduced onnxruntime's first convolution exactly (70,565 of
524,288 outputs moved). So, as onnxruntime's own quantizer does with ``reduce_range``, the target
puts 8-bit weights of every layer that runs as a matrix product on a 7-bit grid (-64..63):
``2 * 255 * 64 < 2^15``, exact on every x86 CPU (and on VNNI, AMX and ARM, which never saturate).
Depthwise convolutions keep the full int8 grid: their kernels widen to 16/32 bits before
multiplying (measured: no output moved with weights up to 127), and so do products of two
activations (a ViT's attention MatMuls: the export writes every activation grid in uint8, and
uint8 x uint8 kernels widen to 16 bits). Cost at W8A8 (top-1 on the 1000 images, simulated =
deployed with 7 bits): fmnist/resnet20 minmax 93.8% (int8, inexact on AVX2) -> 93.9%, genie-m 94.3%
-> 94.2%; fmnist/mobilenetv2 minmax 81.7% -> 82.8% (79.8% had the depthwise convolutions gone to 7
bits too), genie-m 85.1% -> 84.8%. A target option to keep int8 on VNNI machines would buy no
measurable accuracy and make the file CPU-specific, so there is none.

**What the target costs** is mostly the int32 bias: BatchNorm folding makes ``s_x s_w`` of some 4-bit
depthwise channels span several output steps, so fmnist/mobilenetv2 W4A4 ``minmax`` simulates 29.9%
with int32 biases against 60.4% with float ones (genie-m, 50 iterations per block: 76.0%). Weights
written as ``k (q - z)`` for a ``k`` times finer bias grid (k = 4, 8 for depthwise, at 4 bits) did not
help (genie-m 74.0%; fmnist/resnet20 93.4% against 93.2%), so the grid stays ``s_x s_w``.
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
                         int32_bias=True, weight_reduce_range=True),
        rules=(
            "image input of the first layer quantized (8 bit)",
            "BatchNorm folded into the conv weights and biases (all algorithms, Genie-M too)",
            "8-bit weights on symmetric int8 grids per channel (zero point 0), on 7 bits (-64..63) where the kernel "
            "is a matrix product (all but depthwise convs), so that no int16 pair sum saturates on AVX2 CPUs; "
            "below 8 bits int8 with zero point 0",
            "conv biases rounded to int32 on the step s_x * s_w (what QLinearConv adds)",
            "every conv output quantized after its fused ReLU/ReLU6 (QLinearConv writes integers): "
            "residual-branch outputs, pooling and concat inputs (8 bit where no layer input quantizer reads it)",
            "residual additions read and write quantized tensors (QLinearAdd; 8 bit where no layer input quantizer reads the sum)",
            "ViTs: softmax output on a uniform 8-bit grid, so both attention MatMuls run as integer kernels "
            "(LayerNorm, GELU and softmax stay float)",
            "evaluation computes the integer kernels' arithmetic (exact int32 accumulators, QLinearConv's float32 "
            "requantization, QLinearAdd, QLinearGlobalAveragePool): the export's logits equal the simulation's",
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
