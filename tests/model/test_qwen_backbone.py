"""A tiny Qwen2-VL-family KeySeg: ChatML template, dynamic image-token counts, training and
masks through the same model code as LLaVA."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_record
from keyseg import tokens
from keyseg.build import build_keyseg
from keyseg.config import BackboneConfig, ModelConfig, SamSettings
from keyseg.data.collate import Collator, record_to_example
from keyseg.model.keyseg import KeySegModel
from keyseg.model.qwen import QWEN_IMAGE_TOKEN, QWEN_SYSTEM_PROMPT
from keyseg.model.trainable import apply_lora, configure_trainable


def qwen_config() -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(family="qwen2_vl", preset="tiny", image_token=QWEN_IMAGE_TOKEN,
                                system_prompt=QWEN_SYSTEM_PROMPT),
        sam=SamSettings(preset="tiny"),
    )


@pytest.fixture(scope="module")
def qwen_model():
    torch.manual_seed(0)
    config = qwen_config()
    model = build_keyseg(config)
    apply_lora(model, config.lora)
    configure_trainable(model, config.trainable)
    return model


def _batch(model, sizes, seed=0):
    examples = [record_to_example(make_record(height=h, width=w, seed=seed + i),
                                  random.Random(seed), use_keyword=True)
                for i, (h, w) in enumerate(sizes)]
    return Collator(model.processor, mode="train")(examples)


def test_qwen_image_token_count_follows_image_size(qwen_model):
    processor = qwen_model.processor
    wide = processor.prepare_image(Image.new("RGB", (48, 16)))
    square = processor.prepare_image(Image.new("RGB", (40, 40)))
    # grid (t, h, w) in patches; merge 2x2 patches per token
    assert wide.num_image_tokens == int(wide.vision_inputs["image_grid_thw"].prod()) // 4
    assert square.num_image_tokens == int(square.vision_inputs["image_grid_thw"].prod()) // 4
    assert wide.num_image_tokens != square.num_image_tokens


def test_qwen_conversation_uses_chatml_and_supervises_only_the_answer(qwen_model):
    processor = qwen_model.processor
    turns = [tokens.Turn("What is it?", "It is [SEG]. [KEY] spoon")]
    encoded = processor.encode(turns, num_image_tokens=5)
    text = processor.tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert "<|vision_start|>" + QWEN_IMAGE_TOKEN * 5 + "<|vision_end|>What is it?" in text
    supervised = encoded.input_ids[encoded.labels != tokens.IGNORE_INDEX]
    assert processor.decode(supervised) == "It is [SEG]. [KEY] spoon"
    prompt = processor.encode([tokens.Turn("What is it?")], num_image_tokens=5)
    assert processor.tokenizer.decode(prompt.input_ids).endswith("<|im_start|>assistant\n")


def test_qwen_keyseg_trains_a_step_and_predicts_masks_under_two_image_sizes(qwen_model):
    model = qwen_model
    sizes = [(40, 60), (24, 72)]
    batch = _batch(model, sizes)
    ids = model.processor.ids
    counts = [int((row == ids.image).sum()) for row in batch.input_ids]
    # two referents per image, each row carries its own image's token count
    assert counts[0] == counts[1] and counts[2] == counts[3] and counts[0] != counts[2]
    assert batch.vision_inputs["image_grid_thw"].shape == (4, 3)

    # [SEG]/[KEY] states are read where the ids put them, whatever the image-token count
    model.eval()
    out = model.backbone(batch.input_ids, batch.attention_mask, batch.vision_inputs)
    for row in (0, 2):
        seg_at = int((batch.input_ids[row] == ids.seg).nonzero()[0])
        key_at = int((batch.input_ids[row] == ids.key).nonzero()[0])
        seg, key = model.special_embeddings(batch.input_ids[row], out.last_hidden[row])
        torch.testing.assert_close(seg[0], model.text_hidden_fcs(out.last_hidden[row, seg_at - 1]))
        torch.testing.assert_close(key[0], model.text_hidden_fcs(out.last_hidden[row, key_at - 1]))

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    output = model(batch)
    assert torch.isfinite(output.loss) and float(output.key) > 0
    output.loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if n in before
               and not torch.equal(p, before[n])]
    assert any("keyword_fusion" in n for n in changed)
    # LoRA sits on the Qwen language model, trains, and its B matrices (zero at start) move
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(".language_model." in n or "model.layers" in n for n in lora)
    assert all(n in before for n in lora)  # every LoRA tensor is trainable
    assert any("lora_B" in n for n in changed)
    assert any("lm_head" in n for n in changed)

    masks = model.eval().predict(batch)
    assert [tuple(m.shape) for m in masks] == [(1, 40, 60), (2, 40, 60), (1, 24, 72), (2, 24, 72)]


def test_qwen_keyseg_save_and_load_reproduces_masks(qwen_model, tmp_path):
    model = qwen_model.eval()
    batch = _batch(model, [(30, 50)])
    expected = model.predict(batch)
    model.save_pretrained(tmp_path / "qwen")
    loaded = KeySegModel.from_pretrained(tmp_path / "qwen").eval()
    assert loaded.backbone.family == "qwen2_vl"
    again = loaded.predict(_batch(loaded, [(30, 50)]))
    for a, b in zip(expected, again, strict=True):
        torch.testing.assert_close(a, b)


def test_llava_prepared_image_keeps_the_fixed_token_count(tiny_model):
    prepared = tiny_model.processor.prepare_image(Image.fromarray(
        np.zeros((20, 50, 3), np.uint8)))
    assert prepared.num_image_tokens == tiny_model.processor.num_image_tokens == 16


def test_trainable_components_split_qwen_vision_tower_and_merger(qwen_model):
    from keyseg.model.trainable import parameter_components

    owners = parameter_components(qwen_model)
    merger = [c for n, c in owners.items() if ".visual.merger." in n]
    blocks = [c for n, c in owners.items() if ".visual.blocks." in n]
    assert merger and set(merger) == {"mm_projector"}
    assert blocks and set(blocks) == {"vision_tower"}


QWEN_FAMILY_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


@pytest.mark.parametrize("family", list(QWEN_FAMILY_CLASSES))
def test_qwen_family_freezes_its_vision_tower_and_puts_lora_in_the_lm_only(family):
    from keyseg.config import load_config
    from keyseg.model.trainable import parameter_components

    # the family is accepted by the config loader (it used to be refused)
    cfg = load_config(None, [f"model.backbone.family={family}"]).model
    config = ModelConfig(backbone=BackboneConfig(family=cfg.backbone.family, preset="tiny",
                                                 image_token=QWEN_IMAGE_TOKEN,
                                                 system_prompt=QWEN_SYSTEM_PROMPT),
                         sam=SamSettings(preset="tiny"))
    torch.manual_seed(0)
    model = build_keyseg(config)
    assert type(model.backbone.base).__name__ == QWEN_FAMILY_CLASSES[family]
    assert model.backbone.family == family and model.processor.template == "chatml"
    apply_lora(model, config.lora)
    counts = configure_trainable(model, config.trainable)
    assert counts["vision_tower"].trainable == 0 and counts["vision_tower"].frozen > 0
    assert counts["mm_projector"].trainable == 0 and counts["mm_projector"].frozen > 0
    visual = [p for n, p in model.named_parameters() if ".visual." in n]
    assert visual and not any(p.requires_grad for p in visual)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"}
    owners = parameter_components(model)
    if family == "qwen3_vl":  # DeepStack mergers map vision features to the LM width too
        deepstack = {c for n, c in owners.items() if ".deepstack_merger_list." in n}
        assert deepstack == {"mm_projector"}
    # the image-token count is the grid's, whatever the family's patch layout
    wide = model.processor.prepare_image(Image.new("RGB", (48, 16)))
    grid = wide.vision_inputs["image_grid_thw"]
    assert wide.num_image_tokens == int(grid.prod()) // 4
    out = model.eval().backbone(
        *_prompt(model, wide.num_image_tokens), wide.vision_inputs)
    assert out.last_hidden.shape[-1] == model.backbone.hidden_size


def _prompt(model, count):
    encoded = model.processor.encode([tokens.Turn("What is it?")], count)
    ids = encoded.input_ids[None]
    return ids, torch.ones_like(ids)


def test_tied_lm_head_is_not_an_empty_trainable_component(monkeypatch):
    """Qwen2-VL-2B / Qwen2.5-VL-3B / Qwen3-VL-4B tie lm_head to embed_tokens: the default
    trainable set (which lists lm_head) must still be accepted, and the tied matrix train."""
    from keyseg.model import qwen

    build = qwen.tiny_qwen_config

    def tied(*args, **kwargs):
        config = build(*args, **kwargs)
        config.tie_word_embeddings = True
        return config

    monkeypatch.setattr(qwen, "tiny_qwen_config", tied)
    config = ModelConfig(backbone=BackboneConfig(family="qwen2_5_vl", preset="tiny",
                                                 image_token=QWEN_IMAGE_TOKEN),
                         sam=SamSettings(preset="tiny"))
    model = build_keyseg(config)
    assert model.backbone.output_embeddings().weight is model.backbone.input_embeddings().weight
    apply_lora(model, config.lora)
    counts = configure_trainable(model, config.trainable)
    assert counts["lm_head"].trainable == 0 and counts["embed_tokens"].trainable > 0
    assert model.backbone.output_embeddings().weight.requires_grad


def _image(height, width, seed):
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("family", list(QWEN_FAMILY_CLASSES))
def test_qwen_pipeline_batches_images_of_different_token_counts_like_single_calls(family):
    """Left-padded rows of different lengths (M-RoPE positions from the attention mask)
    give the masks each image gets alone."""
    from helpers import answer_ids, forced
    from keyseg.pipeline import KeySegPipeline

    base = qwen_config()
    config = ModelConfig(backbone=BackboneConfig(**{**base.backbone.__dict__, "family": family}),
                         sam=base.sam)
    torch.manual_seed(0)
    pipe = KeySegPipeline(build_keyseg(config).eval(), max_new_tokens=8)
    images = [_image(30, 50, 0), _image(44, 20, 1)]
    counts = [pipe.processor.prepare_image(Image.fromarray(i)).num_image_tokens for i in images]
    assert counts[0] != counts[1]
    script = answer_ids(pipe.processor, " Sure,", segs=1, keyword="spoon")
    both = pipe(images, ["What is it?", "What is that?"], logits_processor=forced(script),
                return_logits=True)
    alone = [pipe(i, q, logits_processor=forced(script), return_logits=True)
             for i, q in zip(images, ["What is it?", "What is that?"], strict=True)]
    for batched, single, (h, w) in zip(both, alone, [(30, 50), (44, 20)], strict=True):
        assert batched.masks.shape == (1, h, w) and batched.keyword == "spoon"
        torch.testing.assert_close(batched.mask_logits, single.mask_logits, atol=1e-3, rtol=1e-3)
    # multi-turn on one image: the second turn carries the first in its prompt
    pipe.set_image(images[1])
    first = pipe.ask("What is it?", logits_processor=forced(script))
    second = pipe.ask("And the other one?", logits_processor=forced(script))
    assert len(pipe.history) == 2 and first.masks.shape == second.masks.shape == (1, 44, 20)


def test_qwen_at_state_reruns_one_row_with_its_own_patches():
    """hidden_state='at' with [SEG] as the very last generated token needs one extra forward
    of that row alone: its own slice of the flattened patches, not the batch's first rows."""
    from helpers import answer_ids, forced
    from keyseg.pipeline import KeySegPipeline

    config = qwen_config()
    config = ModelConfig(backbone=BackboneConfig(**{**config.backbone.__dict__,
                                                    "hidden_state": "at"}),
                         sam=config.sam)
    torch.manual_seed(0)
    model = build_keyseg(config).eval()
    pipe = KeySegPipeline(model)
    script = answer_ids(pipe.processor, " Sure,", segs=1)[:-1]  # ends at [SEG], no EOS
    results = pipe([_image(30, 50, 0), _image(44, 20, 1)], ["a?", "b?"],
                   logits_processor=forced(script), max_new_tokens=len(script))
    assert [r.masks.shape for r in results] == [(1, 30, 50), (1, 44, 20)]


def test_empty_system_prompt_leaves_the_system_block_out_as_qwen3_vl_does(qwen_model):
    from dataclasses import replace

    processor = qwen_model.processor
    plain = replace(processor.backbone, system_prompt="")
    original, processor.backbone = processor.backbone, plain
    try:
        encoded = processor.encode([tokens.Turn("What is it?", "It is [SEG].")], 3)
    finally:
        processor.backbone = original
    text = processor.tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and "system" not in text
