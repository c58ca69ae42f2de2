"""``keyseg convert keyseg-ref``: the KeySeg reference layout (LISA + keyword_fusion.*,
embedding_table_proj.*, keyword_text_proj.*), as an HF directory or a zero_to_fp32 file."""

from __future__ import annotations

import json

import pytest
import torch
from test_lisa_convert import HIDDEN, write_lisa, write_weights

from keyseg import tokens
from keyseg.cli import main as cli_main
from keyseg.convert.keyseg_ref import convert_keyseg_ref
from keyseg.errors import KeySegCheckpointError
from keyseg.model.keyseg import KeySegModel


def reference_extras(dim: int = 256) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    out = {}
    for name in ("query_proj", "key_proj", "value_proj", "out_proj",
                 "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
        out[f"keyword_fusion.{name}.weight"] = torch.randn(dim, dim)
        out[f"keyword_fusion.{name}.bias"] = torch.randn(dim)
    for norm in ("norm1", "norm2"):
        out[f"keyword_fusion.{norm}.weight"] = torch.randn(dim)
        out[f"keyword_fusion.{norm}.bias"] = torch.randn(dim)
    out["keyword_fusion.mlp.0.weight"] = torch.randn(2 * dim, dim)
    out["keyword_fusion.mlp.0.bias"] = torch.randn(2 * dim)
    out["keyword_fusion.mlp.2.weight"] = torch.randn(dim, 2 * dim)
    out["keyword_fusion.mlp.2.bias"] = torch.randn(dim)
    out["keyword_text_proj.weight"] = torch.randn(dim, HIDDEN)
    out["keyword_text_proj.bias"] = torch.randn(dim)
    out["embedding_table_proj.weight"] = torch.randn(dim, HIDDEN)
    out["embedding_table_proj.bias"] = torch.randn(dim)
    return out


def write_reference(tmp_path):
    src, state, _ = write_lisa(tmp_path, "safetensors", 2)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens([tokens.KEY_TOKEN])  # the reference tokenizer knows [KEY]
    tokenizer.save_pretrained(src)
    state = {**state, **reference_extras()}
    for file in src.glob("model*.safetensors*"):
        file.unlink()
    write_weights(src, state, "safetensors", 2)
    return src, state


def test_reference_directory_maps_fusion_and_table_projection(tmp_path):
    src, state = write_reference(tmp_path)
    model, report = convert_keyseg_ref(src)
    assert report.ok, report.summary()
    assert set(state) <= set(report.mapped) | set(report.ignored)
    assert report.fresh == []  # every KeySeg tensor comes from the reference
    assert set(report.new_token_rows) == {"<image>"}  # [KEY] kept its trained row
    own = model.state_dict()
    pairs = {"keyword_fusion.query_proj.weight": "keyword_fusion.cross_attn.q_proj.weight",
             "keyword_fusion.value_proj.bias": "keyword_fusion.cross_attn.v_proj.bias",
             "keyword_fusion.out_proj.weight": "keyword_fusion.cross_attn.out_proj.weight",
             "keyword_fusion.self_attn.k_proj.weight": "keyword_fusion.self_attn.k_proj.weight",
             "embedding_table_proj.weight": "embedding_table_proj.weight"}
    for source_name, target_name in pairs.items():
        torch.testing.assert_close(own[target_name], state[source_name])
    for ignored in ("keyword_fusion.norm1.weight", "keyword_fusion.mlp.2.bias",
                    "keyword_text_proj.weight"):
        assert ignored in report.ignored
    key = model.processor.ids.key
    lm = "backbone.vlm.model.language_model.embed_tokens.weight"
    torch.testing.assert_close(own[lm][key], state["model.embed_tokens.weight"][key])


def test_zero_to_fp32_file_with_module_prefix_and_lora_is_merged(tmp_path):
    src, state = write_reference(tmp_path)
    q = "model.layers.0.self_attn.q_proj"
    lora_a, lora_b = torch.randn(8, HIDDEN), torch.randn(HIDDEN, 8)
    peft = {}
    for name, tensor in state.items():
        if name == f"{q}.weight":
            peft[f"module.base_model.model.{q}.base_layer.weight"] = tensor
        else:
            peft[f"module.base_model.model.{name}"] = tensor
    peft[f"module.base_model.model.{q}.lora_A.default.weight"] = lora_a
    peft[f"module.base_model.model.{q}.lora_B.default.weight"] = lora_b
    file = tmp_path / "zero" / "pytorch_model.bin"
    file.parent.mkdir()
    torch.save(peft, file)
    dst = tmp_path / "out"
    assert cli_main(["convert", "keyseg-ref", str(file), str(dst), "--base", str(src)]) == 0
    model = KeySegModel.from_pretrained(dst)
    merged = model.state_dict()["backbone.vlm.model.language_model.layers.0.self_attn."
                                "q_proj.weight"]
    torch.testing.assert_close(merged, state[f"{q}.weight"] + 2.0 * lora_b @ lora_a)


def test_single_file_without_config_asks_for_base(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"module.keyword_fusion.query_proj.weight": torch.zeros(2, 2)}, file)
    with pytest.raises(KeySegCheckpointError, match="pass --base DIR"):
        convert_keyseg_ref(file)


def test_lisa_checkpoint_is_not_taken_for_a_reference_one(tmp_path):
    src, _, _ = write_lisa(tmp_path, "safetensors", 1)
    with pytest.raises(KeySegCheckpointError, match="no keyword_fusion"):
        convert_keyseg_ref(src)


def test_reference_fusion_of_wrong_width_names_the_tensor(tmp_path):
    src, state = write_reference(tmp_path)
    state["keyword_fusion.key_proj.weight"] = torch.zeros(128, 256)
    for file in src.glob("model*.safetensors*"):
        file.unlink()
    write_weights(src, state, "safetensors", 1)
    with pytest.raises(KeySegCheckpointError,
                       match=r"model\.safetensors: keyword_fusion\.key_proj\.weight: shape "
                             r"\[128, 256\]"):
        convert_keyseg_ref(src)
    assert json.loads((src / "config.json").read_text())["hidden_size"] == HIDDEN


def test_reference_fusion_with_an_inner_width_other_than_its_width(tmp_path):
    """The reference's cross-attention is 256 wide inside whatever its fusion width (its
    q/k/v: dim -> 256, out: 256 -> dim). A checkpoint of that layout converts, and the fused
    embedding is the reference formula with those weights."""
    import math

    import torch.nn.functional as F

    src, state = write_reference(tmp_path)
    dim, inner = 256, 128
    torch.manual_seed(7)
    for name in ("query_proj", "key_proj", "value_proj"):
        state[f"keyword_fusion.{name}.weight"] = torch.randn(inner, dim) / dim ** 0.5
        state[f"keyword_fusion.{name}.bias"] = torch.randn(inner) * 0.1
    state["keyword_fusion.out_proj.weight"] = torch.randn(dim, inner) / inner ** 0.5
    for file in src.glob("model*.safetensors*"):
        file.unlink()
    write_weights(src, state, "safetensors", 1)
    model, report = convert_keyseg_ref(src)
    assert report.ok, report.summary()
    assert model.settings.fusion.inner_dim == inner and model.settings.fusion.dim == dim

    seg, key = torch.randn(2, dim), torch.randn(1, dim)

    def linear(name, x):
        return F.linear(x, state[f"keyword_fusion.{name}.weight"],
                        state[f"keyword_fusion.{name}.bias"])

    rows = F.interpolate(seg.t()[None], size=12, mode="linear", align_corners=False)[0].t()
    q, k, v = linear("query_proj", rows), linear("key_proj", key), linear("value_proj", key)
    x = linear("out_proj", torch.softmax(q @ k.t() / math.sqrt(inner), -1) @ v)
    q, k, v = (linear(f"self_attn.{p}_proj", x) for p in "qkv")
    x = linear("self_attn.out_proj", torch.softmax(q @ k.t() / math.sqrt(dim), -1) @ v)
    expected = F.interpolate(x.t()[None], size=2, mode="linear", align_corners=False)[0].t()
    with torch.no_grad():
        torch.testing.assert_close(model.keyword_fusion(seg, key), expected,
                                   rtol=1e-4, atol=1e-4)


def test_lora_merge_keeps_the_base_dtype_and_refuses_incomplete_factors():
    from keyseg.convert.keyseg_ref import merge_lora_tensors
    from keyseg.errors import KeySegCheckpointError

    torch.manual_seed(0)
    base = torch.randn(3, 4).bfloat16()
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    state = {"m.q.base_layer.weight": base, "m.q.lora_A.default.weight": a,
             "m.q.lora_B.default.weight": b, "m.q.bias": torch.zeros(3)}
    out, merged = merge_lora_tensors(state, alpha=4.0, source="ckpt.bin")
    assert merged == 1 and set(out) == {"m.q.weight", "m.q.bias"}
    assert out["m.q.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(out["m.q.weight"], (base.float() + 2.0 * b @ a).bfloat16())
    message = (r"ckpt\.bin: m\.q: incomplete LoRA factors \(need lora_A, lora_B and the base "
               r"weight\)")
    for missing in ("m.q.lora_B.default.weight", "m.q.lora_A.default.weight",
                    "m.q.base_layer.weight"):
        with pytest.raises(KeySegCheckpointError, match=message):
            merge_lora_tensors({k: v for k, v in state.items() if k != missing}, 4.0,
                               "ckpt.bin")


def test_normalised_names_keep_the_file_each_tensor_came_from():
    from pathlib import Path

    from keyseg.convert.checkpoint_io import Checkpoint
    from keyseg.convert.keyseg_ref import _normalise_names
    from keyseg.errors import KeySegCheckpointError

    z = torch.zeros
    checkpoint = Checkpoint(
        {"module.base_model.model.m.q.base_layer.weight": z(3, 4),
         "module.base_model.model.m.q.base_layer.bias": z(3),
         "module.base_model.model.m.q.lora_A.default.weight": z(2, 4),
         "module.base_model.model.m.q.lora_B.default.weight": z(3, 2),
         "module.head.weight": z(1), "loose.bias": z(1)},
        origin={"module.base_model.model.m.q.base_layer.weight": Path("shard-1.bin"),
                "module.base_model.model.m.q.base_layer.bias": Path("shard-3.bin"),
                "module.head.weight": Path("shard-2.bin")},
        source=Path("run/ckpt"))
    normalised, merged = _normalise_names(checkpoint, lora_alpha=2.0)
    assert merged == 1 and normalised.source == Path("run/ckpt")
    assert normalised.origin == {"m.q.weight": Path("shard-1.bin"),
                                 "m.q.bias": Path("shard-3.bin"),
                                 "head.weight": Path("shard-2.bin"),
                                 "loose.bias": Path("run/ckpt")}
    assert normalised.where("m.q.weight") == "shard-1.bin: m.q.weight"
    broken = Checkpoint({"module.m.q.lora_A.default.weight": z(2, 4)}, source=Path("run/x"))
    with pytest.raises(KeySegCheckpointError, match=r"^run/x: m\.q: incomplete LoRA"):
        _normalise_names(broken, 2.0)
