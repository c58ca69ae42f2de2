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
    model = KeySegModel.from_config(config)
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
