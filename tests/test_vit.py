import pytest
import timm
import torch

from dfquant.errors import DfqError
from dfquant.quant.api import build_quantized, make_quant_config, quantize
from dfquant.quant.modules import QuantLayer, set_quant_state
from dfquant.quant.vit import QuantAttention, reparameterize_layernorms


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=10).eval()


def test_quantized_attention_equals_fused_when_disabled():
    m = _tiny_vit()
    q = build_quantized(m, make_quant_config("repq-vit", 4, 4), vit={"quant_attention": True})
    assert sum(isinstance(x, QuantAttention) for x in q.modules()) == 2
    set_quant_state(q, False, False)
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(q(x), m(x), atol=1e-5)


def test_reparameterization_keeps_fp_function():
    m = _tiny_vit()
    q = build_quantized(m, make_quant_config("repq-vit", 4, 4), vit={"quant_attention": True})
    x = torch.randn(8, 3, 32, 32)
    names = reparameterize_layernorms(q, x)
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    set_quant_state(q, False, False)
    assert torch.allclose(q(x), m(x), atol=1e-5)
    qkv = q.blocks[0].attn.attn.qkv
    assert qkv.aq.channel_axis is None and qkv.aq.symmetric is False  # per-tensor after reparameterization


def test_attention_and_reparameterized_quantizers_follow_the_presets_ste():
    """genie-m's STE (round_ste(clamp(x/s))) reaches every activation quantizer of a ViT, including q/k/v and the
    per-tensor quantizers that replace the per-channel ones after LayerNorm reparameterization."""
    from dfquant.quant.modules import act_quantizers
    from dfquant.quant.quantizers import UniformQuantizer

    for algo, expected in (("genie-m", True), ("repq-vit", False)):
        q = build_quantized(_tiny_vit(), make_quant_config(algo, 4, 4), vit={"quant_attention": True})
        reparameterize_layernorms(q, torch.randn(8, 3, 32, 32))
        uniform = [a for a in act_quantizers(q) if isinstance(a, UniformQuantizer)]
        assert len(uniform) > 6 and {a.clamp_first for a in uniform} == {expected}, algo


def test_swin_attention_quantizable():
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16, depths=(1, 1),
                          num_heads=(1, 2), num_classes=5).eval()
    q = build_quantized(m, make_quant_config("repq-vit", 8, 8), vit={"quant_attention": True})
    x = torch.randn(2, 3, 56, 56)
    set_quant_state(q, False, False)
    assert torch.allclose(q(x), m(x), atol=1e-4)
    assert "layers.1.downsample.reduction" in reparameterize_layernorms(q, x)


def test_unknown_attention_is_an_error():
    m = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, num_classes=3).eval()
    with pytest.raises(DfqError, match="cannot be quantized"):
        build_quantized(m, make_quant_config("repq-vit", 4, 4), vit={"quant_attention": True})


def test_repq_vit_quantizes_everything_and_reports_fp_parts():
    m = _tiny_vit()
    x = torch.randn(32, 3, 32, 32)
    q8, info = quantize(m, x, "repq-vit", 8, 8, iters=0, progress=False)
    q4, _ = quantize(m, x, "repq-vit", 4, 4, iters=0, progress=False)
    ref = m(x)
    err8, err4 = (q8(x) - ref).abs().mean(), (q4(x) - ref).abs().mean()
    assert 0 < err8 < err4
    assert "LayerNorm" in info["full_precision_layers"]
    assert all(ql.wq.initialized for ql in q8.modules() if isinstance(ql, QuantLayer))
    assert q8.patch_embed.proj.aq.bits == 8 and q8.head.wq.bits == 8


def test_zoo_vit_w8a8_within_one_point():
    from dfquant.data import fmnist
    from dfquant.models.evaluate import evaluate
    from dfquant.models.registry import get_model

    spec = get_model("fmnist/vit")
    x, _ = fmnist.load_split("A", limit=32, seed=0)
    q, info = quantize(spec.model, spec.normalize(x), "repq-vit", 8, 8, iters=0, progress=False)
    fp = evaluate(spec, limit=2000, progress=False)
    assert abs(fp - evaluate(spec, q, limit=2000, progress=False)) <= 1.0
    assert len(info["reparameterized"]) == 12  # qkv and fc1 of all 6 blocks
