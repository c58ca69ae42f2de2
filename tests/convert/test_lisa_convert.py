"""``keyseg convert lisa``: synthetic LISA checkpoints with the real key names at tiny sizes.

The checkpoint is generated from the LISA module structure: a LLaMA ``LlamaForCausalLM``
(``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``), LLaVA-v1's single
``model.mm_projector``, SAM in the official layout under ``model.visual_model.*``, and
``model.text_hidden_fcs.0.{0,2}``; the CLIP tower is a separate HF directory named by
``mm_vision_tower`` (LISA's export drops it) or stored under ``model.vision_tower.*``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_sam_convert import _hf_to_official
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from helpers import make_record
from keyseg import tokens
from keyseg.cli import main as cli_main
from keyseg.convert.lisa import FRESH_TARGETS, convert_lisa
from keyseg.data.collate import Collator, record_to_example
from keyseg.errors import KeySegCheckpointError
from keyseg.model.keyseg import KeySegModel
from keyseg.model.sam import SamSegmenter

HIDDEN, VISION_HIDDEN, SPARE_ROWS = 64, 32, 3


def lisa_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaMA-like tokenizer as LISA saves it: <im_start>, <im_end>, [SEG]; no [KEY], and no
    <image> (LLaVA-v1 splices the image in by a -200 id, never a vocabulary token)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["A chat between a curious user and an assistant. USER: ASSISTANT:"
                             " Sure, it is. What is the red circle? spoon"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<unk>")
    wrapped.add_tokens(["<im_start>", "<im_end>", tokens.SEG_TOKEN])
    return wrapped


def clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=32, patch_size=8,
                            projection_dim=VISION_HIDDEN)


def write_tower(directory: Path) -> dict[str, torch.Tensor]:
    """A CLIP directory in the hub layout of openai/clip-vit-*: ``vision_model.*`` plus the
    contrastive extras LLaVA does not use."""
    torch.manual_seed(1)
    tower = CLIPVisionModel(clip_config())
    state = {"vision_model." + k: v.clone() for k, v in tower.state_dict().items()}
    extras = {"logit_scale": torch.tensor(2.0),
              "visual_projection.weight": torch.randn(VISION_HIDDEN, VISION_HIDDEN),
              "text_model.embeddings.token_embedding.weight": torch.randn(10, VISION_HIDDEN)}
    directory.mkdir(parents=True)
    save_file({**state, **extras}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"vision_config": clip_config().to_dict()}))
    CLIPImageProcessorPil(size={"shortest_edge": 32},
                          crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return state


def lisa_tensors(vocab_rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a tiny LISA model under LISA's names (no vision tower)."""
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_rows, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    for layer in range(2):  # old transformers saved the rotary table
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    state["model.mm_projector.weight"] = torch.randn(HIDDEN, VISION_HIDDEN)
    state["model.mm_projector.bias"] = torch.randn(HIDDEN)
    sam = SamSegmenter.from_preset("tiny")
    with torch.no_grad():
        for param in sam.parameters():
            param.copy_(torch.randn_like(param))
    for name, tensor in sam.sam.state_dict().items():
        official = _hf_to_official(name)
        if official is not None:
            state["model.visual_model." + official] = tensor.clone()
    state["model.text_hidden_fcs.0.0.weight"] = torch.randn(HIDDEN, HIDDEN)
    state["model.text_hidden_fcs.0.0.bias"] = torch.randn(HIDDEN)
    state["model.text_hidden_fcs.0.2.weight"] = torch.randn(256, HIDDEN)
    state["model.text_hidden_fcs.0.2.bias"] = torch.randn(256)
    return state


def write_weights(directory: Path, state: dict[str, torch.Tensor], fmt: str,
                  shards: int) -> list[Path]:
    """HF layout: one file, or ``shards`` files plus an index (``.bin`` or safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    groups = [names[i::shards] for i in range(shards)]
    files, weight_map = [], {}
    for number, group in enumerate(groups, start=1):
        file = (f"{stem}.{ext}" if shards == 1
                else f"{stem}-{number:05d}-of-{shards:05d}.{ext}")
        part = {n: state[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, str(directory / file))
        else:
            torch.save(part, directory / file)
        files.append(directory / file)
        weight_map.update(dict.fromkeys(group, file))
    if shards > 1:
        (directory / f"{stem}.{ext}.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def write_lisa(root: Path, fmt: str = "safetensors", shards: int = 2,
               tower_in_checkpoint: bool = False):
    """A LISA directory + a separate CLIP tower directory; returns (dir, state, tower)."""
    tokenizer = lisa_tokenizer()
    rows = len(tokenizer) + SPARE_ROWS  # spare rows: the vocabulary is read from the shape
    state = lisa_tensors(rows)
    tower = write_tower(root / "clip-vit-tiny")
    if tower_in_checkpoint:
        for name, tensor in tower.items():
            state["model.vision_tower.vision_tower." + name] = tensor
    src = root / "LISA-tiny"
    write_weights(src, state, fmt, shards)
    tokenizer.save_pretrained(src)
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LISAForCausalLM"], "model_type": "llava",
        "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 1024, "vocab_size": rows,
        "mm_vision_tower": str(root / "clip-vit-tiny"), "mm_vision_select_layer": -2,
        "mm_use_im_start_end": True, "mm_hidden_size": VISION_HIDDEN, "out_dim": 256,
    }))
    return src, state, tower


@pytest.mark.parametrize(("fmt", "shards"), [("safetensors", 2), ("bin", 3), ("bin", 1),
                                             ("safetensors", 1)])
def test_every_lisa_tensor_is_used_or_ignored_and_every_target_set(tmp_path, fmt, shards):
    src, state, _ = write_lisa(tmp_path, fmt, shards)
    model, report = convert_lisa(src)
    assert report.ok, report.summary()
    used = set(report.mapped) | set(report.ignored)
    assert set(state) <= used
    assert sorted(n for n in report.ignored if "inv_freq" in n) == [
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "model.layers.1.self_attn.rotary_emb.inv_freq"]
    # the CLIP tower's tensors arrive under LISA names too (they fill the vision tower)
    assert any(n.startswith("model.vision_tower.") for n in report.mapped)
    tied = {"sam.sam.prompt_encoder.shared_embedding.positional_embedding"}  # SAM derived
    assert set(model.state_dict()) == set(report.mapped.values()) | set(report.fresh) | tied
    assert {n for n in report.ignored if n.startswith("[clip-vit-tiny]")} == {
        "[clip-vit-tiny] logit_scale", "[clip-vit-tiny] visual_projection.weight",
        "[clip-vit-tiny] text_model.embeddings.token_embedding.weight"}
    assert report.fresh and all(n.startswith(FRESH_TARGETS) for n in report.fresh)


def test_lisa_values_land_where_they_should(tmp_path):
    src, state, tower = write_lisa(tmp_path, "safetensors", 2)
    model, report = convert_lisa(src)
    own = model.state_dict()
    lm = "backbone.vlm.model.language_model."
    torch.testing.assert_close(own[lm + "layers.1.mlp.down_proj.weight"],
                               state["model.layers.1.mlp.down_proj.weight"])
    torch.testing.assert_close(own["backbone.vlm.model.multi_modal_projector.linear.weight"],
                               state["model.mm_projector.weight"])
    torch.testing.assert_close(own["text_hidden_fcs.2.weight"],
                               state["model.text_hidden_fcs.0.2.weight"])
    torch.testing.assert_close(
        own["sam.sam.mask_decoder.iou_prediction_head.proj_out.weight"],
        state["model.visual_model.mask_decoder.iou_prediction_head.layers.2.weight"])
    torch.testing.assert_close(
        own["backbone.vlm.model.vision_tower.embeddings.patch_embedding.weight"],
        tower["vision_model.embeddings.patch_embedding.weight"])
    # [SEG] keeps its id and trained row; [KEY] and <image> get new (mean) rows
    tokenizer = model.processor.tokenizer
    seg = tokenizer.convert_tokens_to_ids(tokens.SEG_TOKEN)
    assert seg == len(lisa_tokenizer()) - 1
    source_embed = state["model.embed_tokens.weight"]
    torch.testing.assert_close(own[lm + "embed_tokens.weight"][seg], source_embed[seg])
    torch.testing.assert_close(own["backbone.vlm.lm_head.weight"][seg],
                               state["lm_head.weight"][seg])
    assert set(report.new_token_rows) == {tokens.KEY_TOKEN, "<image>"}
    key = model.processor.ids.key
    torch.testing.assert_close(own[lm + "embed_tokens.weight"][key], source_embed.mean(0))
    # vocabulary from the embedding shape (spare rows kept), not from the tokenizer
    assert own[lm + "embed_tokens.weight"].shape[0] == source_embed.shape[0]


def test_converted_lisa_reproduces_llava_v1_format_and_saves(tmp_path):
    src, _, _ = write_lisa(tmp_path, "bin", 2)
    dst = tmp_path / "keyseg-lisa"
    assert cli_main(["convert", "lisa", str(src), str(dst)]) == 0
    model = KeySegModel.from_pretrained(dst).eval()
    config = model.backbone.base.config
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"  # CLS dropped
    backbone = model.settings.backbone
    assert backbone.use_im_start_end and backbone.projector == "linear"
    encoded = model.processor.encode([tokens.Turn("What is it?", "It is [SEG].")])
    text = model.processor.tokenizer.decode(encoded.input_ids)
    # LISA's convention: the markers swallow the whitespace around them, "\n" included
    pieces = model.processor.tokenizer.convert_ids_to_tokens(encoded.input_ids)
    start = pieces.index("<im_start>")
    assert pieces[start:start + 18] == ["<im_start>", *["<image>"] * 16, "<im_end>"]
    assert pieces[start - 1] == ":" and pieces[start + 18] == "What"
    assert "<im_end>What is it? ASSISTANT:" in text
    assert text.startswith("<s>A chat between a curious human")
    record = make_record()
    batch = Collator(model.processor)([record_to_example(record, random.Random(0))])
    masks = model.predict(batch)
    assert [tuple(m.shape) for m in masks] == [(1, 40, 60), (2, 40, 60)]


def test_vision_tower_inside_the_checkpoint_is_used(tmp_path):
    src, _, tower = write_lisa(tmp_path, "safetensors", 1, tower_in_checkpoint=True)
    model, report = convert_lisa(src)
    assert report.ok
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight" \
        in report.mapped
    torch.testing.assert_close(
        model.state_dict()["backbone.vlm.model.vision_tower.encoder.layers.1.mlp.fc2.weight"],
        tower["vision_model.encoder.layers.1.mlp.fc2.weight"])


def test_missing_vision_tower_says_where_to_put_it(tmp_path):
    src, _, _ = write_lisa(tmp_path, "safetensors", 1)
    config = json.loads((src / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeySegCheckpointError, match=r"openai/clip-vit-large-patch14.*"
                       r"LISA-tiny/vision_tower.*--vision-tower"):
        convert_lisa(src)


def test_missing_shard_names_index_and_first_tensor(tmp_path):
    src, _, _ = write_lisa(tmp_path, "safetensors", 2)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KeySegCheckpointError,
                       match=r"model\.safetensors\.index\.json: shard "
                             r"model-00002-of-00002\.safetensors is missing \(first tensor"):
        convert_lisa(src)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    src, state, _ = write_lisa(tmp_path, "bin", 1)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, HIDDEN)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(KeySegCheckpointError,
                       match=r"pytorch_model\.bin: model\.layers\.1\.mlp\.up_proj\.weight: shape "
                             r"\[100, 64\]"):
        convert_lisa(src)


def test_unknown_tensor_and_unknown_layout_are_named(tmp_path):
    src, state, _ = write_lisa(tmp_path, "bin", 1)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.zeros(HIDDEN)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(KeySegCheckpointError,
                       match=r"pytorch_model\.bin: model\.layers\.0\.self_attn\.q_norm\.weight: "
                             "unexpected tensor"):
        convert_lisa(src)
    (src / "pytorch_model.bin").rename(src / "weights-a.bin")
    torch.save({}, src / "weights-b.bin")
    with pytest.raises(KeySegCheckpointError, match="unknown checkpoint layout"):
        convert_lisa(src)
    other = tmp_path / "not-lisa"
    write_weights(other, {"encoder.weight": torch.zeros(2)}, "safetensors", 1)
    (other / "config.json").write_text(json.dumps({"hidden_size": 4, "num_hidden_layers": 1}))
    with pytest.raises(KeySegCheckpointError, match=r"unknown layout: no model\.embed_tokens"):
        convert_lisa(other)


def test_bin_checkpoint_with_code_is_refused(tmp_path):
    src, _, _ = write_lisa(tmp_path, "bin", 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.norm.weight": Evil()}, src / "pytorch_model.bin")
    with pytest.raises(KeySegCheckpointError, match=r"pytorch_model\.bin: .*weights_only"):
        convert_lisa(src)


def test_converted_model_keeps_sam_positional_matrix_tied(tmp_path):
    src, _, _ = write_lisa(tmp_path, "safetensors", 1)
    model, _ = convert_lisa(src)
    sam = model.sam.sam
    assert (sam.prompt_encoder.shared_embedding.positional_embedding
            is sam.shared_image_embedding.positional_embedding)

def test_map_state_report_names_every_kind_of_problem():
    """``map_state`` on hand-made names: ignored with its reason, unused (no rule, or a rule
    to a name the model lacks; the loop goes on after either), fresh, unset, embedding rows
    fewer (fine) or more (a mismatch), and the SAM part renamed under its prefixes."""
    from keyseg.convert.lisa import (
        EMBEDDING_TARGETS,
        SAM_PREFIX,
        LisaConversionReport,
        SourceTensors,
        _compile,
        map_state,
    )
    from keyseg.convert.sam import DERIVED_TARGETS

    embed, lm_head = EMBEDDING_TARGETS
    rules = _compile(((r"emb", embed), (r"head", lm_head), (r"w\.(\d+)", r"layer.\1.w"),
                      (r"ghost", "not.in.model")))
    tied, fourier = next(iter(DERIVED_TARGETS.items()))
    z = torch.zeros
    source = SourceTensors(tensors={
        "nothing.matches": z(1), "ghost": z(1), "rope.0": z(3), "w.0": z(2, 2),
        "emb": z(5, 4), "head": z(7, 4), "w.1": z(3, 2),
        SAM_PREFIX + "image_encoder.neck.2.weight": z(4, 4),
        SAM_PREFIX + "image_encoder.neck.3.bias": z(9),
        SAM_PREFIX + "not_a_sam_tensor": z(1),
        SAM_PREFIX + "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": z(2, 8),
    })
    target = {"layer.0.w": z(2, 2), "layer.1.w": z(2, 2), embed: z(6, 4), lm_head: z(6, 4),
              "keyword_fusion.x": z(1), "never.set": z(1),
              "sam.sam.vision_encoder.neck.conv2.weight": z(4, 4),
              "sam.sam.vision_encoder.neck.layer_norm2.bias": z(8),
              "sam.sam.vision_encoder.neck.layer_norm2.weight": z(8),
              "sam.sam." + fourier: z(2, 16), "sam.sam." + tied: z(2, 16)}
    report = LisaConversionReport()
    converted = map_state(source, target, rules, {r"rope\.\d+": "recomputed"},
                          ("keyword_fusion.",), report)

    assert report.ignored == {"rope.0": "recomputed"}
    assert report.unused_source == ["nothing.matches", "ghost", SAM_PREFIX + "not_a_sam_tensor"]
    assert report.mapped == {
        "w.0": "layer.0.w", "emb": embed, "head": lm_head, "w.1": "layer.1.w",
        SAM_PREFIX + "image_encoder.neck.2.weight": "sam.sam.vision_encoder.neck.conv2.weight",
        SAM_PREFIX + "image_encoder.neck.3.bias": "sam.sam.vision_encoder.neck.layer_norm2.bias",
        SAM_PREFIX + "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            "sam.sam." + fourier,
    }
    assert report.fresh == ["keyword_fusion.x"]
    assert report.unset_target == ["never.set", "sam.sam.vision_encoder.neck.layer_norm2.weight"]
    assert sorted(report.shape_mismatches) == sorted([
        ("head", lm_head, (7, 4), (6, 4)),
        ("w.1", "layer.1.w", (3, 2), (2, 2)),
        (SAM_PREFIX + "image_encoder.neck.3.bias", "sam.sam.vision_encoder.neck.layer_norm2.bias",
         (9,), (8,)),
        (SAM_PREFIX + "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
         "sam.sam." + fourier, (2, 8), (2, 16)),
    ])
    assert converted[embed].shape == (5, 4)  # fewer rows than the model: new tokens
    assert converted["sam.sam." + tied] is converted["sam.sam." + fourier]
    assert set(converted) == {"layer.0.w", "layer.1.w", embed, lm_head,
                              "sam.sam.vision_encoder.neck.conv2.weight",
                              "sam.sam.vision_encoder.neck.layer_norm2.bias",
                              "sam.sam." + fourier, "sam.sam." + tied}
    assert not report.ok


def test_map_state_without_a_sam_part_reports_mismatches_too():
    from keyseg.convert.lisa import LisaConversionReport, SourceTensors, _compile, map_state

    report = LisaConversionReport()
    source = SourceTensors(tensors={"w": torch.zeros(3)})
    map_state(source, {"x.w": torch.zeros(2)}, _compile(((r"w", "x.w"),)), {}, (), report)
    assert report.shape_mismatches == [("w", "x.w", (3,), (2,))]
    assert report.mapped == {"w": "x.w"} and report.unused_source == []
