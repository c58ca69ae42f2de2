"""KeySegModel on tiny random configs: what trains, what stays frozen, positions, errors."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import make_record
from keyseg import tokens
from keyseg.build import build_tiny_model
from keyseg.data.collate import Collator, Conversation, ImageExample
from keyseg.errors import KeySegConfigError, KeySegInputError
from keyseg.model.keyseg import KeySegModel
from keyseg.model.tiny import tiny_model_config
from keyseg.model.trainable import configure_trainable, parameter_components


def snapshot(model, component):
    owners = parameter_components(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if owners[n] == component}


def test_one_step_updates_trainable_and_leaves_frozen_bit_identical(tiny_model, make_batch):
    model = tiny_model
    batch = make_batch(model)
    learn = ["fusion", "table_projection", "lora", "sam_mask_decoder", "text_hidden_fcs",
             "lm_head", "embed_tokens"]
    frozen = ["sam_image_encoder", "sam_prompt_encoder", "vision_tower", "mm_projector",
              "language_model"]
    before = {c: snapshot(model, c) for c in learn + frozen}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    # LoRA's B starts at zero, so A gets no gradient on the first step: take two.
    for _ in range(2):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    for component in learn:
        changed = [n for n, p in snapshot(model, component).items()
                   if not torch.equal(p, before[component][n])]
        assert changed, f"{component} did not change"
    for component in frozen:
        for name, value in snapshot(model, component).items():
            assert torch.equal(value, before[component][name]), f"{name} changed"


def test_every_parameter_belongs_to_a_component(tiny_model):
    owners = parameter_components(tiny_model)
    assert set(owners) == {n for n, _ in tiny_model.named_parameters()}
    assert any(c == "lora" for c in owners.values())
    lora_names = [n for n, c in owners.items() if c == "lora"]
    assert all("language_model" in n for n in lora_names)
    assert not any("keyword_fusion" in n or "vision_tower" in n for n in lora_names)


def test_trainable_component_without_parameters_is_refused(tiny_model_factory):
    model = tiny_model_factory(seed=0, lora=False)  # LoRA not applied
    with pytest.raises(KeySegConfigError, match="lora"):
        configure_trainable(model, ["lora", "fusion"])
    with pytest.raises(KeySegConfigError, match="unknown component"):
        configure_trainable(model, ["fusoin"])


def test_seg_embedding_is_read_at_the_expanded_position(tiny_model, make_batch):
    model = tiny_model.eval()
    batch = make_batch(model)
    assert model.processor.num_image_tokens == 16  # not LLaVA's 256
    out = model.backbone(batch.input_ids, batch.attention_mask, batch.vision_inputs)
    ids = batch.input_ids[0]
    seg_index = int((ids == model.processor.ids.seg).nonzero()[0])
    seg, key = model.special_embeddings(ids, out.last_hidden[0])
    expected = model.text_hidden_fcs(out.last_hidden[0, seg_index - 1])  # "before" (reference)
    torch.testing.assert_close(seg[0], expected)
    assert key.shape == (1, model.settings.fusion.dim)


def test_hidden_state_at_choice_reads_the_token_itself(tiny_model_factory, make_batch):
    config = tiny_model_config()
    config = replace(config, backbone=replace(config.backbone, hidden_state="at"))
    model = build_tiny_model(config=config).eval()
    batch = make_batch(model)
    out = model.backbone(batch.input_ids, batch.attention_mask, batch.vision_inputs)
    ids = batch.input_ids[0]
    seg_index = int((ids == model.processor.ids.seg).nonzero()[0])
    seg, _ = model.special_embeddings(ids, out.last_hidden[0])
    torch.testing.assert_close(seg[0], model.text_hidden_fcs(out.last_hidden[0, seg_index]))


def test_predict_gives_one_mask_per_seg_at_original_size(tiny_model, make_batch):
    batch = make_batch(tiny_model, records=[make_record(height=37, width=81)])
    masks = tiny_model.predict(batch)
    assert [tuple(m.shape) for m in masks] == [(1, 37, 81), (2, 37, 81)]


def _no_seg_example(model):
    record = make_record()
    return ImageExample(
        image=record.image,
        conversations=[Conversation([tokens.Turn("what is it?", "I cannot tell.")],
                                    np.zeros((0, 40, 60), np.uint8), "fixture/no-seg")],
    )


def test_answer_without_seg_is_a_clear_training_error(tiny_model):
    with pytest.raises(KeySegInputError, match=r"fixture/no-seg.*no \[SEG\]"):
        Collator(tiny_model.processor, mode="train")([_no_seg_example(tiny_model)])


def test_answer_without_seg_gives_empty_mask_list_in_prediction(tiny_model):
    """``predict`` on a teacher-forced row whose answer has no [SEG] (and a row that has
    one): an empty ``(0, H, W)`` tensor for the first, a mask for the second."""
    from keyseg.batch import Batch

    processor = tiny_model.processor
    example = _no_seg_example(tiny_model)
    prepared = processor.prepare_image(example.image)
    rows = [processor.encode(example.conversations[0].turns, prepared.num_image_tokens),
            processor.encode([tokens.Turn("where?", "It is [SEG].")],
                             prepared.num_image_tokens)]
    assert int((rows[0].input_ids == processor.ids.seg).sum()) == 0
    answer = processor.decode(rows[0].input_ids[rows[0].labels != tokens.IGNORE_INDEX])
    assert "I cannot tell." in answer  # the answer really is in the row
    length = max(r.input_ids.shape[0] for r in rows)
    input_ids = torch.full((2, length), processor.ids.pad, dtype=torch.long)
    attention = torch.zeros((2, length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : r.input_ids.shape[0]] = r.input_ids
        attention[i, : r.input_ids.shape[0]] = 1
    batch = Batch(
        input_ids=input_ids, attention_mask=attention,
        vision_inputs={k: torch.cat([v, v]) for k, v in prepared.vision_inputs.items()},
        sam_pixel_values=prepared.sam.pixel_values[None],
        image_index=torch.zeros(2, dtype=torch.long),
        resized_sizes=[prepared.sam.resized_size], original_sizes=[prepared.sam.original_size],
    )
    masks = tiny_model.eval().predict(batch)
    assert [tuple(m.shape) for m in masks] == [(0, 40, 60), (1, 40, 60)]


def _text_only_record(answer: str = "There are two circles."):
    from keyseg.data.sample import Referent

    record = make_record(seed=1)
    record.referents = [Referent("How many circles are there?", True,
                                 np.zeros((0, 40, 60), np.uint8), answer=answer,
                                 text_only=True)]
    return record


def test_text_only_rows_train_the_text_loss_only(tiny_model, make_batch):
    """A visual-QA row (Referent.text_only) beside segmentation rows: its question and
    answer verbatim, no [SEG] or [KEY]; the mask losses are those of the segmentation rows
    alone, the text loss changes; a batch of QA rows alone has no mask or keyword loss."""
    model = tiny_model.eval()  # no dropout: the two forwards must agree
    seg_only = make_batch(model, records=[make_record()])
    mixed = make_batch(model, records=[make_record(), _text_only_record()])
    qa_row = mixed.input_ids[-1]
    ids = model.processor.ids
    assert int((qa_row == ids.seg).sum()) == 0 and int((qa_row == ids.key).sum()) == 0
    answer = model.processor.decode(qa_row[mixed.labels[-1] != tokens.IGNORE_INDEX])
    assert "There are two circles." in answer
    prompt = model.processor.decode(qa_row[mixed.labels[-1] == tokens.IGNORE_INDEX])
    assert "How many circles are there?" in prompt
    assert tuple(mixed.target_masks[-1].shape) == (0, 40, 60)
    alone, together = model(seg_only), model(mixed)
    torch.testing.assert_close(together.bce, alone.bce)
    torch.testing.assert_close(together.dice, alone.dice)
    torch.testing.assert_close(together.key, alone.key)
    assert not torch.allclose(together.ce, alone.ce)
    assert [tuple(m.shape[:1]) for m in together.pred_masks] == [(1,), (2,), (0,)]

    qa_only = make_batch(model, records=[_text_only_record()])
    out = model(qa_only)
    assert float(out.bce) == float(out.dice) == float(out.key) == 0.0
    out.loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad()


def test_text_only_answer_with_seg_is_a_clear_training_error(tiny_model, make_batch):
    with pytest.raises(KeySegInputError, match=r"img1.*text-only.*1 \[SEG\]"):
        make_batch(tiny_model, records=[_text_only_record("It is [SEG].")])


def test_model_forward_rejects_seg_mask_count_mismatch(tiny_model, make_batch):
    batch = make_batch(tiny_model)
    batch.target_masks[1] = batch.target_masks[1][:1]
    with pytest.raises(KeySegInputError, match="2 \\[SEG\\] in the answer but 1 target"):
        tiny_model(batch)


def test_save_and_load_round_trip_reproduces_outputs(tiny_model, make_batch, tmp_path):
    model = tiny_model.eval()
    batch = make_batch(model)
    expected = model.predict(batch)
    model.save_pretrained(tmp_path / "m")
    loaded = KeySegModel.from_pretrained(tmp_path / "m").eval()
    sam = loaded.sam.sam  # the tied positional matrix stays one parameter
    assert sam.prompt_encoder.shared_embedding.positional_embedding is (
        sam.shared_image_embedding.positional_embedding)
    again = loaded.predict(make_batch(loaded))
    for a, b in zip(expected, again, strict=True):
        torch.testing.assert_close(a, b)


def test_keyword_loss_off_without_keyword(make_batch):
    config = replace(tiny_model_config(), use_keyword=False)
    model = build_tiny_model(config=config)
    batch = make_batch(model)
    assert int((batch.input_ids == model.processor.ids.key).sum()) == 0
    out = model(batch)
    assert float(out.key) == 0.0 and torch.isfinite(out.loss)


def test_record_to_example_samples_at_most_max_referents():
    from keyseg.data.collate import record_to_example

    example = record_to_example(make_record(), random.Random(0), max_referents=1)
    assert len(example.conversations) == 1


def test_first_key_switch_fuses_only_the_first_key_of_a_row(tiny_model_factory):
    """``fusion.generation_keys="first"`` (the reference's evaluate) hands the fusion the
    first [KEY] row alone; "all" (ours) hands it every [KEY] of the row."""
    model = tiny_model_factory(seed=0).eval()
    processor = model.processor
    prepared = processor.prepare_image(make_record().image)
    ids = processor.encode([tokens.Turn("q?", "It is [SEG]. [KEY] red cup [KEY] blue")]).input_ids
    received = []
    model.keyword_fusion.register_forward_pre_hook(lambda _, args: received.append(args[1]))
    with torch.no_grad():
        embedding = model.encode_images(prepared.sam.pixel_values[None])
        hidden = model.backbone(ids[None], torch.ones_like(ids)[None],
                                prepared.vision_inputs).last_hidden[0]
        _, every = model.special_embeddings(ids, hidden)
        for keys in ("first", "all"):
            model.masks_from_hidden(ids, hidden, embedding[0], prepared.sam.resized_size,
                                    prepared.sam.original_size, keys=keys)
    assert every.shape[0] == 2
    torch.testing.assert_close(received[0], every[:1])
    torch.testing.assert_close(received[1], every)


def test_image_placeholder_is_not_a_class_of_the_text_loss(tiny_model_factory, make_batch):
    """CE ignores the <image> column: raising its logit changes nothing."""
    model = tiny_model_factory(seed=0)
    batch = make_batch(model)
    image = model.processor.ids.image
    base = model(batch).ce
    with torch.no_grad():
        model.backbone.output_embeddings().weight[image] *= 50.0
        model.backbone.output_embeddings().weight[image] += 3.0
    torch.testing.assert_close(model(batch).ce, base)
    assert image in model.non_output_ids


def test_without_keyword_there_are_no_key_rows_to_fuse(tiny_model_factory, make_batch):
    config = replace(tiny_model_config(), use_keyword=False)
    model = build_tiny_model(config=config).eval()
    ids = model.processor.encode([tokens.Turn("q?", "It is [SEG] [SEG]. [KEY] cup")]).input_ids
    hidden = torch.randn(ids.shape[0], model.text_hidden_fcs[0].in_features)
    with torch.no_grad():
        seg, key = model.special_embeddings(ids, hidden)
    assert seg.shape == (2, model.settings.fusion.dim)
    assert key.shape == (0, model.settings.fusion.dim)


def test_hidden_state_at_choice_reads_the_key_token_itself_too(tiny_model_factory):
    config = tiny_model_config()
    model = build_tiny_model(config=replace(config, backbone=replace(config.backbone,
                                                                     hidden_state="at")))
    ids = model.processor.encode([tokens.Turn("q?", "It is [SEG]. [KEY] red cup")]).input_ids
    hidden = torch.randn(ids.shape[0], model.text_hidden_fcs[0].in_features)
    key_at = int((ids == model.processor.ids.key).nonzero()[0])
    with torch.no_grad():
        _, key = model.special_embeddings(ids, hidden)
        head = model.keyword_text_proj or model.text_hidden_fcs
        torch.testing.assert_close(key[0], head(hidden[key_at]))


@pytest.mark.cuda
def test_predict_on_cuda_matches_cpu(tiny_model_factory, make_batch):
    """Row -> image indices, per-row [SEG] counts and the fused prompts all follow the
    embeddings onto the GPU; the masks equal the CPU ones."""
    model = tiny_model_factory(seed=0).eval()
    batch = make_batch(model, records=[make_record(seed=0), make_record(seed=1)])
    expected = model.predict(batch)
    gpu = model.cuda()
    got = gpu.predict(batch.to(torch.device("cuda"), torch.float32))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)


def test_key_embedding_is_read_before_the_key_token_by_default(tiny_model_factory):
    model = tiny_model_factory(seed=0)
    assert model.settings.backbone.hidden_state == "before"
    ids = model.processor.encode([tokens.Turn("q?", "It is [SEG]. [KEY] red cup")]).input_ids
    hidden = torch.randn(ids.shape[0], model.text_hidden_fcs[0].in_features)
    key_at = int((ids == model.processor.ids.key).nonzero()[0])
    with torch.no_grad():
        _, key = model.special_embeddings(ids, hidden)
        head = model.keyword_text_proj or model.text_hidden_fcs
        torch.testing.assert_close(key[0], head(hidden[key_at - 1]))
