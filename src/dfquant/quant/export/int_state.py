"""Integer state dict export: the safetensors alternative to ONNX (``--format int-state``).

Writes the integer weights with their scales and zero points, the activation quantizers and the
remaining float tensors; it shares the integer view of :mod:`~dfquant.quant.export.qdq` and needs
no ONNX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.io import save_tensors
from dfquant.quant.export.qdq import _act_params, _check_supported, _container, _key, clean_names, integer_weight
from dfquant.quant.modules import QuantLayer
from dfquant.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer


# ----------------------------------------------------------------------------------------
# integer state dict
# ----------------------------------------------------------------------------------------
def export_int_state(qmodel: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write integer weights, quantizer parameters and the remaining float tensors as safetensors.

    Keys use the module names of the original float model (dfquant's wrapper hops
    ``.layer``, ``.block`` and ``.attn`` removed; BN-folded models have no BN tensors and
    carry the folded bias):

    * quantized Conv2d/Linear ``P``:
      ``P.weight_int`` — the integer weight q, int8 for signed grids (symmetric, ternary)
      and uint8 for unsigned/asymmetric ones (b-bit grids sit in the 8-bit container);
      ``P.weight_scale`` float32 ``[C_out]`` (``[1]`` if per-tensor);
      ``P.weight_zero_point`` int32, same shape; ``P.weight_bits`` float32 scalar (1.58 =
      ternary); ``P.weight_qrange`` int32 ``[qmin, qmax]``. The float weight is
      ``(weight_int - weight_zero_point) * weight_scale`` along axis 0.
      ``P.bias`` float32 if the layer has one. A layer whose weight quantizer is disabled
      keeps ``P.weight`` in float32.
    * activation quantizer ``A`` (``P.aq`` = input of layer ``P``; ``B.aq`` = input of
      residual block ``B``, shared by its identity branch; ``...attn.q_q``/``k_q``/``v_q`` in
      ViTs): ``A.act_scale`` float32 ``[1]``, ``A.act_zero_point`` int32 ``[1]``,
      ``A.act_bits`` float32 scalar, ``A.act_qrange`` int32 ``[qmin, qmax]``; the quantized
      value is ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``. Disabled quantizers are absent.
    * log-sqrt2 softmax quantizer ``A``: ``A.logsqrt2_scale`` float32 ``[1]``, ``A.logsqrt2_bits``.
    * every other tensor of the model (BatchNorm affine and running stats, LayerNorm,
      embeddings, ...) under its original name, float32.

    The safetensors metadata holds ``format`` = ``dfquant-int-state/1``, ``layers`` and
    ``activations`` (JSON summaries) and whatever ``metadata`` adds.
    """
    _check_supported(qmodel)
    clean = clean_names(qmodel)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    acts: dict[str, dict] = {}
    skip_prefixes: list[str] = []   # qmodel module names whose tensors are exported in integer form
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            P = clean[name]
            skip_prefixes += [f"{name}.wq.", f"{name}.soft."]
            if m.wq.enabled:
                iw = integer_weight(m, name)
                dtype = _container(*iw["qrange"])
                tensors[_key(P, "weight_int")] = iw["q"].to(dtype)
                tensors[_key(P, "weight_scale")] = iw["scale"]
                tensors[_key(P, "weight_zero_point")] = iw["zero_point"].to(torch.int32)
                tensors[_key(P, "weight_bits")] = torch.tensor(float(iw["bits"]))
                tensors[_key(P, "weight_qrange")] = torch.tensor(iw["qrange"], dtype=torch.int32)
                skip_prefixes.append(f"{name}.layer.weight")
                layers[P] = {"type": type(m.layer).__name__, "bits": iw["bits"], "qrange": list(iw["qrange"]),
                             "axis": iw["axis"], "dtype": str(dtype).replace("torch.", "")}
            else:
                layers[P] = {"type": type(m.layer).__name__, "bits": None}
        elif isinstance(m, UniformQuantizer) and not any(f"{name}.".startswith(p) for p in skip_prefixes):
            skip_prefixes.append(f"{name}.")
            if not m.enabled:
                continue
            p = _act_params(m, name)
            A = clean[name]
            tensors[_key(A, "act_scale")] = p["scale"]
            tensors[_key(A, "act_zero_point")] = p["zero_point"].to(torch.int32)
            tensors[_key(A, "act_bits")] = torch.tensor(float(p["bits"]))
            tensors[_key(A, "act_qrange")] = torch.tensor(p["qrange"], dtype=torch.int32)
            acts[A] = {"bits": p["bits"], "qrange": list(p["qrange"]), "zero_point": int(p["zero_point"].item())}
        elif isinstance(m, LogSqrt2Quantizer):
            skip_prefixes.append(f"{name}.")
            if not m.enabled:
                continue
            A = clean[name]
            tensors[_key(A, "logsqrt2_scale")] = m.scale.detach().float().flatten().clone()
            tensors[_key(A, "logsqrt2_bits")] = torch.tensor(float(m.bits))
            acts[A] = {"bits": m.bits, "kind": "log-sqrt2"}
    for key, value in qmodel.state_dict().items():
        if any(key.startswith(p) or key == p for p in skip_prefixes):
            continue
        mod, _, leaf = key.rpartition(".")
        out_key = _key(clean.get(mod, mod), leaf)
        if out_key in tensors:
            raise DfqError(f"int-state key clash on {out_key}; rename the module")
        tensors[out_key] = value.detach().clone()
    meta = {"format": "dfquant-int-state/1", "layers": json.dumps(layers), "activations": json.dumps(acts),
            **{str(k): str(v) for k, v in (metadata or {}).items()}}
    save_tensors(path, tensors, metadata=meta)
    return {"path": str(path), "layers": len(layers), "activation_quantizers": len(acts), "tensors": len(tensors),
            "bytes": Path(path).stat().st_size}
