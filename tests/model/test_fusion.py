"""KeywordFusion against an independent re-statement of SPEC §2.4."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from keyseg.build import build_tiny_model
from keyseg.config import FusionConfig
from keyseg.model.fusion import KeywordFusion
from keyseg.model.tiny import tiny_model_config


def linear_resample(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Half-pixel-centred linear interpolation along rows, written out by hand."""
    n = x.shape[0]
    out = []
    for i in range(rows):
        src = (i + 0.5) * n / rows - 0.5
        src = min(max(src, 0.0), n - 1)
        lo = math.floor(src)
        hi = min(lo + 1, n - 1)
        w = src - lo
        out.append((1 - w) * x[lo] + w * x[hi])
    return torch.stack(out)


def attend(att, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
    """Single-head attention with the module's projections, written out."""
    q = q_in @ att.q_proj.weight.T + att.q_proj.bias
    k = kv_in @ att.k_proj.weight.T + att.k_proj.bias
    v = kv_in @ att.v_proj.weight.T + att.v_proj.bias
    a = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1)
    return (a @ v) @ att.out_proj.weight.T + att.out_proj.bias


def layer_norm(layer, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * layer.weight + layer.bias


def gelu_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    first, _, _, second = mlp
    h = x @ first.weight.T + first.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ second.weight.T + second.bias


def randomise_norms(fusion: KeywordFusion) -> None:
    """LayerNorm weights and biases that are not the identity."""
    with torch.no_grad():
        for norm in (fusion.norm_cross, fusion.norm_self, fusion.norm_mlp):
            norm.weight.copy_(torch.rand(norm.weight.shape[0]) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape[0]))


def spec_reference(module: KeywordFusion, seg: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    x = linear_resample(seg, 12)
    x = attend(module.cross_attn, x, key)
    x = attend(module.self_attn, x, x)
    return linear_resample(x, seg.shape[0])


@pytest.mark.parametrize(("n_seg", "n_key"), [(1, 2), (3, 4), (12, 3), (20, 5)])
def test_reference_equals_spec_restatement(n_seg, n_key):
    torch.manual_seed(0)
    fusion = KeywordFusion(FusionConfig(dim=32, variant="reference"))
    seg, key = torch.randn(n_seg, 32), torch.randn(n_key, 32)
    torch.testing.assert_close(fusion(seg, key), spec_reference(fusion, seg, key),
                               rtol=1e-5, atol=1e-5)


def test_reference_ignores_seg_with_single_key_but_residual_does_not():
    torch.manual_seed(0)
    key = torch.randn(1, 32)
    seg_a, seg_b = torch.randn(3, 32), torch.randn(3, 32)
    reference = KeywordFusion(FusionConfig(dim=32, variant="reference"))
    torch.testing.assert_close(reference(seg_a, key), reference(seg_b, key))
    residual = KeywordFusion(FusionConfig(dim=32, variant="residual"))
    assert not torch.allclose(residual(seg_a, key), residual(seg_b, key), atol=1e-3)


@pytest.mark.parametrize("variant", ["reference", "residual", "none"])
def test_zero_key_rows_pass_seg_through(variant):
    fusion = KeywordFusion(FusionConfig(dim=16, variant=variant))
    seg = torch.randn(2, 16)
    assert torch.equal(fusion(seg, torch.zeros(0, 16)), seg)
    assert fusion(torch.zeros(0, 16), torch.randn(2, 16)).shape == (0, 16)


def test_none_variant_has_no_parameters_and_is_identity():
    fusion = KeywordFusion(FusionConfig(dim=16, variant="none"))
    seg = torch.randn(4, 16)
    assert list(fusion.parameters()) == []
    assert torch.equal(fusion(seg, torch.randn(2, 16)), seg)


@pytest.mark.parametrize("variant", ["reference", "residual"])
def test_low_precision_input_is_computed_in_fp32_and_returned_in_its_dtype(variant):
    """bf16 weights and inputs: the result is the fp32 computation on the same (bf16-valued)
    numbers, rounded once at the end — not a chain of bf16 roundings."""
    import copy

    torch.manual_seed(0)
    fusion = KeywordFusion(FusionConfig(dim=64, variant=variant, num_queries=12)).eval()
    half = fusion.to(torch.bfloat16)
    seg, key = torch.randn(5, 64).bfloat16(), torch.randn(3, 64).bfloat16()
    full = copy.deepcopy(half).float()  # the same bf16 values, held in fp32
    with torch.no_grad():
        got = half(seg, key)
        expected = full(seg.float(), key.float())
    assert got.dtype == torch.bfloat16
    # one rounding of the fp32 result: at most half a bf16 ulp (2**-9 relative) away
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=1e-6)
    assert float((got.float() - expected).abs().max()) <= float(
        (expected.abs() * 2**-8).max())


@pytest.mark.parametrize("variant", ["reference", "residual"])
def test_autocast_does_not_lower_the_fusion_precision(variant):
    torch.manual_seed(0)
    fusion = KeywordFusion(FusionConfig(dim=64, variant=variant)).eval()
    seg, key = torch.randn(5, 64), torch.randn(3, 64)
    plain = fusion(seg, key)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fusion(seg, key)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=1e-6)


def test_inner_width_shapes_and_scale():
    """``inner_dim``: q/k/v map dim -> inner, out inner -> dim, scores scaled by
    1/sqrt(inner) (the reference's cross-attention at fusion_dim != 256)."""
    import math

    fusion = KeywordFusion(FusionConfig(dim=8, inner_dim=16, num_queries=3))
    attn = fusion.cross_attn
    assert tuple(attn.q_proj.weight.shape) == (16, 8)
    assert tuple(attn.out_proj.weight.shape) == (8, 16)
    assert tuple(fusion.self_attn.q_proj.weight.shape) == (8, 8)
    torch.manual_seed(0)
    queries, context = torch.randn(3, 8), torch.randn(2, 8)
    q, k, v = attn.q_proj(queries), attn.k_proj(context), attn.v_proj(context)
    by_hand = attn.out_proj(torch.softmax(q @ k.t() / math.sqrt(16), -1) @ v)
    torch.testing.assert_close(attn(queries, context), by_hand)


def test_residual_equals_spec_restatement():
    """``residual``: x = LN(x + cross(x, key)); x = LN(x + self(x, x)); x = LN(x + MLP(x)),
    with LayerNorms whose weights and biases are not the identity."""
    torch.manual_seed(0)
    fusion = KeywordFusion(FusionConfig(dim=16, variant="residual", mlp_ratio=2.0,
                                        num_queries=12)).eval()
    randomise_norms(fusion)
    first, _, _, second = fusion.mlp
    assert tuple(first.weight.shape) == (32, 16) and tuple(second.weight.shape) == (16, 32)
    seg, key = torch.randn(5, 16), torch.randn(3, 16)
    x = linear_resample(seg, 12)
    x = layer_norm(fusion.norm_cross, x + attend(fusion.cross_attn, x, key))
    x = layer_norm(fusion.norm_self, x + attend(fusion.self_attn, x, x))
    x = layer_norm(fusion.norm_mlp, x + gelu_mlp(fusion.mlp, x))
    with torch.no_grad():
        torch.testing.assert_close(fusion(seg, key), linear_resample(x, 5), rtol=1e-5,
                                   atol=1e-5)


def test_gated_starts_as_the_identity():
    torch.manual_seed(0)
    fusion = KeywordFusion(FusionConfig(dim=16, variant="gated"))
    seg = torch.randn(4, 16)
    torch.testing.assert_close(fusion(seg, torch.randn(2, 16)), seg, rtol=0, atol=0)


@pytest.mark.parametrize("n_seg", [1, 2, 5, 13])
def test_gated_equals_spec_restatement(n_seg):
    """``gated``: x += tanh(g1) cross(LN(x), key); x += tanh(g2) self(LN(x), LN(x));
    x += tanh(g3) MLP(LN(x)), on the n rows themselves (no resampling)."""
    torch.manual_seed(0)
    fusion = KeywordFusion(FusionConfig(dim=16, variant="gated", mlp_ratio=2.0)).eval()
    randomise_norms(fusion)
    with torch.no_grad():
        fusion.gates.copy_(torch.tensor([0.7, -0.4, 1.3]))
    g1, g2, g3 = (math.tanh(g) for g in (0.7, -0.4, 1.3))
    seg, key = torch.randn(n_seg, 16), torch.randn(3, 16)
    x = seg + g1 * attend(fusion.cross_attn, layer_norm(fusion.norm_cross, seg), key)
    h = layer_norm(fusion.norm_self, x)
    x = x + g2 * attend(fusion.self_attn, h, h)
    x = x + g3 * gelu_mlp(fusion.mlp, layer_norm(fusion.norm_mlp, x))
    with torch.no_grad():
        torch.testing.assert_close(fusion(seg, key), x, rtol=1e-5, atol=1e-5)


def test_gated_keeps_seg_rows_apart_with_one_key():
    """One [KEY] (a multi-target answer): its cross-attention adds one vector to every row,
    so the rows' differences pass unchanged."""
    torch.manual_seed(0)
    key = torch.randn(1, 32)
    seg = torch.randn(1, 32) * 4 + 0.3 * torch.randn(3, 32)  # nearly parallel, as an LM gives
    gated = KeywordFusion(FusionConfig(dim=32, variant="gated"))
    with torch.no_grad():
        gated.gates.copy_(torch.tensor([5.0, 0.0, 0.0]))  # cross-attention only
        out = gated(seg, key)
    shift = out - seg
    torch.testing.assert_close(shift, shift[:1].expand_as(shift), rtol=1e-5, atol=1e-5)
    assert float(shift.norm(dim=-1).min()) > 0.1  # the key did move the rows


@pytest.mark.parametrize(("n", "rows"), [(5, 12), (12, 5), (3, 3)])
def test_resample_rows_is_half_pixel_linear_interpolation(n, rows):
    """Width equal to the row count (12 x 12) must not be mistaken for 'already resampled'."""
    from keyseg.model.fusion import resample_rows

    torch.manual_seed(0)
    x = torch.randn(n, 12)
    got = resample_rows(x, rows)
    assert got.shape == (rows, 12)
    torch.testing.assert_close(got, linear_resample(x, rows), rtol=1e-6, atol=1e-6)


def test_gated_gate_init_opens_every_block():
    """``gate_init`` is the starting value of each tanh(gate): the blocks act from step 0,
    and the built KeySeg model keeps that start (construction skips weight init)."""
    fusion = KeywordFusion(FusionConfig(dim=16, variant="gated", gate_init=0.5))
    torch.testing.assert_close(torch.tanh(fusion.gates.detach()), torch.full((3,), 0.5))
    seg = torch.randn(4, 16)
    assert not torch.allclose(fusion(seg, torch.randn(2, 16)), seg, atol=1e-3)

    config = tiny_model_config()
    config = dataclasses.replace(config, fusion=dataclasses.replace(
        config.fusion, variant="gated", gate_init=0.25))
    model = build_tiny_model(seed=0, config=config)
    torch.testing.assert_close(torch.tanh(model.keyword_fusion.gates.detach()),
                               torch.full((3,), 0.25))

