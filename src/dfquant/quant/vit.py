"""Vision transformers: quantized attention for timm ViT/DeiT/Swin and RepQ-ViT.

Current timm runs attention through fused SDPA, where the q@k and attn@v operands are
invisible. :class:`QuantAttention` replaces each supported attention module with the
unfused computation and quantizers on q, k, v and the softmax output (log-sqrt2).
An attention class it does not know is an error naming the module — never a silent
full-precision pass-through.

RepQ-ViT (Li et al. 2023) then:
  * quantizes post-LayerNorm activations per channel, and reparameterizes those scales
    into a per-tensor quantizer by folding ``r1 = s / mean(s)`` and ``r2 = z - mean(z)``
    into the LayerNorm affine and the next linear layer (the FP function is unchanged);
  * quantizes post-softmax values with the log-sqrt2 quantizer (levels 2^(-k/2));
  * initializes the other activation ranges by percentile search, on 32 images, with
    no gradient steps — optionally followed by block reconstruction
    (:func:`dfquant.quant.api.quantize` with ``algo="repq-vit"`` runs these steps).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dfquant.errors import DfqError
from dfquant.quant.modules import QuantConfig, QuantLayer, set_quant_state
from dfquant.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

# the timm attention classes dfquant quantizes (class name -> kind); the one list every module reads
SUPPORTED = {"Attention": "vit", "WindowAttention": "swin"}
ATTENTION_CLASSES: frozenset[str] = frozenset(SUPPORTED)
# (LayerNorm, linear consuming its output) name pairs inside a parent module
LN_PAIRS = (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"), ("norm", "reduction"))
FP_KINDS = ("LayerNorm", "GELU", "Softmax", "residual additions", "position embedding")


class QuantAttention(nn.Module):
    """Unfused multi-head attention with quantized q, k, v and softmax output."""

    def __init__(self, attn: nn.Module, abits: float, kind: str, clamp_first: bool = False,
                 softmax_bits: float | None = None):
        """``softmax_bits``: a uniform grid of that many bits for the softmax output (a deployment target's:
        integer attention-times-value MatMul) instead of RepQ-ViT's log-sqrt2 grid at ``abits``."""
        super().__init__()
        self.attn = attn
        self.kind = kind
        # the run's STE convention (QuantConfig.act_clamp_first) holds here too when a preset reconstructs a ViT
        self.q_q, self.k_q, self.v_q = (UniformQuantizer(abits, symmetric=True, learn_scale=True, clamp_first=clamp_first)
                                        for _ in range(3))
        for q in (self.q_q, self.k_q, self.v_q):
            q.init_method = "psearch"
        if softmax_bits is None:
            self.softmax_q = LogSqrt2Quantizer(abits)
        else:  # probabilities in [0, 1]: an unsigned grid whose top is the largest one seen
            self.softmax_q = UniformQuantizer(softmax_bits, symmetric=True, signed=False, learn_scale=True,
                                              clamp_first=clamp_first)
            self.softmax_q.init_method = "minmax"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        a = self.attn
        B, N, C = x.shape
        qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.kind == "vit":
            q, k = a.q_norm(q), a.k_norm(k)
        attn = self.q_q(q * a.scale) @ self.k_q(k).transpose(-2, -1)
        if self.kind == "swin":
            attn = attn + a._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, a.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, a.num_heads, N, N)
        elif attn_mask is not None:
            attn = attn + attn_mask
        attn = a.attn_drop(self.softmax_q(attn.softmax(dim=-1)))
        out = (attn @ self.v_q(v)).transpose(1, 2).reshape(B, N, -1)
        if self.kind == "vit":
            out = a.norm(out)
        return a.proj_drop(a.proj(out))


def has_attention(model: nn.Module) -> bool:
    """True for models with (timm) attention modules (:data:`ATTENTION_CLASSES`), which get quantized attention."""
    return any(type(m).__name__ in ATTENTION_CLASSES for m in model.modules())


def default_vit_options(model: nn.Module) -> dict:
    return {"quant_attention": True, "reparam_layernorm": True, "softmax": "log-sqrt2"}


def prepare_vit(model: nn.Module, cfg: QuantConfig, options: dict) -> nn.Module:
    """Copy ``model`` with every attention module replaced by :class:`QuantAttention`."""
    model = copy.deepcopy(model)
    if not options.get("quant_attention", True):
        return model
    targets = [(n, m) for n, m in model.named_modules() if "Attention" in type(m).__name__ and not isinstance(m, QuantAttention)]
    for name, m in targets:
        kind = SUPPORTED.get(type(m).__name__)
        if kind is None:
            raise DfqError(f"attention module {name} ({type(m).__module__}.{type(m).__name__}) cannot be quantized yet; "
                           f"supported: timm {', '.join(SUPPORTED)}. Pass a model built from those, or add its forward to dfquant.quant.vit")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, QuantAttention(m, cfg.abits, kind, cfg.act_clamp_first,
                                                                                   _softmax_bits(cfg)))
    return model


def _softmax_bits(cfg: QuantConfig) -> float | None:
    """A deployment target's uniform softmax grid (its extra bits), or None for RepQ-ViT's log-sqrt2."""
    from dfquant.quant.target import get_target

    target = get_target(cfg.target)
    return None if target is None else target.extra_bits


def _ln_pairs(qmodel: nn.Module) -> list[tuple[nn.LayerNorm, QuantLayer, str]]:
    pairs = []
    for pname, parent in qmodel.named_modules():
        for ln_name, lin_name in LN_PAIRS:
            ln = getattr(parent, ln_name, None)
            try:
                lin = parent.get_submodule(lin_name.replace("attn.", "attn.attn.") if isinstance(getattr(parent, "attn", None), QuantAttention) else lin_name)
            except AttributeError:
                continue
            if isinstance(ln, nn.LayerNorm) and isinstance(lin, QuantLayer) and lin.aq is not None:
                pairs.append((ln, lin, f"{pname}.{lin_name}".lstrip(".")))
    return pairs


@torch.no_grad()
def reparameterize_layernorms(qmodel: nn.Module, calib: torch.Tensor, weight_init: str = "mse") -> list[str]:
    """RepQ-ViT scale reparameterization of every (LayerNorm -> Linear) pair; returns their names.

    The FP function is unchanged; afterwards the linear's input quantizer is per-tensor.
    """
    pairs = _ln_pairs(qmodel)
    store: dict[int, torch.Tensor] = {}
    hooks = [ln.register_forward_hook(lambda m, a, out, i=i: store.__setitem__(i, out)) for i, (ln, _, _) in enumerate(pairs)]
    set_quant_state(qmodel, weights=False, acts=False)
    try:
        qmodel(calib)
    finally:
        for h in hooks:
            h.remove()
    for i, (ln, lin, _) in enumerate(pairs):
        y = store[i].reshape(-1, store[i].shape[-1])
        pc = UniformQuantizer(lin.aq.bits, channel_axis=1, symmetric=False)
        pc.init_range(y, method="psearch")
        s, z = pc.scale, pc.zero_point
        s_t, z_t = s.mean(), torch.round(z.mean())
        r1, r2 = s / s_t, z - z_t
        ln.bias.data = (ln.bias.data + s * r2) / r1
        ln.weight.data = ln.weight.data / r1
        w = lin.layer.weight.data
        if lin.layer.bias is None:
            lin.layer.bias = nn.Parameter(torch.zeros(w.shape[0]))
        lin.layer.bias.data = lin.layer.bias.data - w @ (s * r2)
        lin.layer.weight.data = w * r1.view(1, -1)
        lin.wq.init_range(lin.layer.weight, method=weight_init)
        aq = UniformQuantizer(lin.aq.bits, symmetric=False, learn_scale=True, clamp_first=lin.aq.clamp_first)
        aq.set_params(s_t.view(1), z_t.view(1))
        lin.aq = aq
    return [name for _, _, name in pairs]


def full_precision_report(qmodel: nn.Module) -> list[str]:
    """What stays in floating point in a quantized ViT (reported in every run summary)."""
    kinds = sorted({type(m).__name__ for m in qmodel.modules() if type(m).__name__ in ("LayerNorm", "GELU", "Softmax")})
    plain = [n for n, m in qmodel.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and not isinstance(dict(qmodel.named_modules()).get(n.rpartition(".")[0]), QuantLayer)]
    return kinds + ["residual additions", "softmax/GELU arithmetic"] + [f"layer {p}" for p in plain]
