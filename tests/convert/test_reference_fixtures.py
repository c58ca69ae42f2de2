"""Parity with the reference codes on their own checkpoints (``../shared/fixtures``).

``lisa_tiny`` was written and run by LISA's code, ``keyseg_ref_tiny`` by the KeySeg
reference's (see their READMEs). Everything here starts from *our* side: the converted
directory, our processor's encoding of the recorded question and answer, our preprocessing
of the image; the expected values are what the reference codes recorded. Every test skips,
naming the missing path, when ``../shared`` is absent (``helpers.shared_path``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from helpers import shared_path
from keyseg import tokens
from keyseg.batch import Batch
from keyseg.cli import main as cli_main
from keyseg.data.images import load_image
from keyseg.generation import generate
from keyseg.model.keyseg import KeySegModel
from keyseg.model.losses import dice_loss, keyword_alignment_loss, sigmoid_ce_loss

REFERENCE_IMAGE_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX in the recorded ids


def relative(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """max |ours - expected| / max |expected| (the fixtures' READMEs' measure)."""
    ours, expected = ours.detach().float().reshape(expected.shape), expected.float()
    return float((ours - expected).abs().max() / expected.abs().max())


def expand(recorded: list[int], image_id: int, count: int, fill: int | None = None) -> list[int]:
    """Recorded ids/labels with the -200 image slot expanded as our ids hold it."""
    where = recorded.index(REFERENCE_IMAGE_ID) if fill is None else None
    out = []
    for i, value in enumerate(recorded):
        if (fill is None and i == where) or (fill is not None and value == REFERENCE_IMAGE_ID):
            out += [image_id if fill is None else fill] * count
        else:
            out.append(value)
    return out


def expand_labels(labels: list[int], ids: list[int], count: int) -> list[int]:
    where = ids.index(REFERENCE_IMAGE_ID)
    return labels[:where] + [tokens.IGNORE_INDEX] * count + labels[where + 1:]


def split_conversation(text: str) -> tuple[str, str]:
    """(question, answer) of a recorded one-turn llava_v1 conversation."""
    match = re.search(r"<image>(?:<im_end>)?\n(.*) ASSISTANT: (.*)</s>$", text, re.S)
    assert match, text
    return match.group(1), match.group(2)


def teacher_forced(model: KeySegModel, image, question: str, answer: str) -> dict:
    """Our ids and every intermediate the references recorded, for one conversation."""
    processor = model.processor
    prepared = processor.prepare_image(image)
    encoded = processor.encode([tokens.Turn(question, answer)])
    ids = encoded.input_ids[None]
    with torch.no_grad():
        out = model.backbone(ids, torch.ones_like(ids), prepared.vision_inputs)
        seg, key = model.special_embeddings(ids[0], out.last_hidden[0])
        fused = model.keyword_fusion(seg, key)
        embedding = model.encode_images(prepared.sam.pixel_values[None])
        low_res, _ = model.sam.decode_many(embedding, torch.zeros(len(fused), dtype=torch.long),
                                           fused)
        masks = model.sam.postprocess_masks(low_res, prepared.sam.resized_size,
                                            prepared.sam.original_size)
    choice = model.settings.backbone.hidden_state
    return {"encoded": encoded, "logits": out.logits[0], "seg": seg, "key": key,
            "fused": fused, "low_res": low_res, "masks": masks, "prepared": prepared,
            "seg_index": tokens.special_positions(encoded.input_ids, processor.ids.seg, choice),
            "key_index": tokens.special_positions(encoded.input_ids, processor.ids.key, choice)}


def generate_from_question(model: KeySegModel, image, question: str, max_new_tokens: int):
    processor = model.processor
    prepared = processor.prepare_image(image)
    prompt = processor.encode([tokens.Turn(question)]).input_ids
    batch = Batch(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None],
                  vision_inputs=prepared.vision_inputs,
                  sam_pixel_values=prepared.sam.pixel_values[None],
                  image_index=torch.zeros(1, dtype=torch.long),
                  resized_sizes=[prepared.sam.resized_size],
                  original_sizes=[prepared.sam.original_size])
    (result,) = generate(model, batch, max_new_tokens=max_new_tokens)
    return prompt, result


# --- LISA -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lisa(tmp_path_factory):
    root = shared_path("fixtures/lisa_tiny")
    dst = tmp_path_factory.mktemp("lisa") / "converted"
    assert cli_main(["convert", "lisa", str(root / "lisa_hf"), str(dst),
                     "--vision-tower", str(root / "clip_tiny")]) == 0
    model = KeySegModel.from_pretrained(dst).eval()
    expected = json.loads((root / "expected.json").read_text())
    return model, expected, load_file(str(root / "expected.safetensors")), \
        load_image(root / "image.png")


def test_converted_lisa_keeps_lisa_ids_and_classes(lisa):
    model, expected, _, _ = lisa
    ids = model.processor.ids
    assert ids.seg == expected["seg_token_id"] == 600
    assert (ids.im_start, ids.im_end) == (601, 602)
    assert model.settings.backbone.convention == "lisa"
    # [KEY] is added as the KeySeg reference adds it to LISA's tokenizer (603); <image> gets a
    # row for HF LLaVA's splice but is not a class (LISA never had it as a token)
    assert ids.key == 603
    assert ids.image == 604 and model.non_output_ids == (604,)


@pytest.mark.parametrize("case", ["A", "B"])
def test_lisa_ids_labels_embedding_and_masks_from_our_own_encoding(lisa, case):
    model, expected, tensors, image = lisa
    record = expected["cases"][case]
    got = teacher_forced(model, image, record["question"], record["answer"])
    count = expected["num_image_features"]
    image_id = model.processor.ids.image
    assert got["encoded"].input_ids.tolist() == expand(record["input_ids"], image_id, count)
    assert got["encoded"].labels.tolist() == expand_labels(record["labels"],
                                                           record["input_ids"], count)
    assert got["seg_index"].tolist() == [record["seg_hidden_index_expanded"]] \
        or got["seg_index"].tolist() == record["seg_hidden_index_expanded"]
    # our own preprocessing gives LISA's pixels
    torch.testing.assert_close(got["prepared"].vision_inputs["pixel_values"],
                               tensors["case_A.clip_pixels"], rtol=0, atol=1e-5)
    assert relative(got["seg"], tensors[f"case_{case}.seg_embedding"]) < 1e-4
    assert relative(got["low_res"], tensors[f"case_{case}.low_res_masks"]) < 1e-4
    assert relative(got["masks"], tensors[f"case_{case}.pred_masks"]) < 1e-4


def test_lisa_training_losses_from_our_own_encoding(lisa):
    model, expected, _, image = lisa
    record = expected["cases"]["A"]
    want = record["training_losses_gt_rectangle_rows30_90_cols20_70"]
    got = teacher_forced(model, image, record["question"], record["answer"])
    labels = got["encoded"].labels
    logits = got["logits"].float()
    logits[:, list(model.non_output_ids)] = float("-inf")
    ce = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    target = torch.zeros(1, *expected["original_size"])
    target[0, 30:90, 20:70] = 1
    bce = sigmoid_ce_loss(got["masks"].float(), target, 1)
    dice = dice_loss(got["masks"].float(), target, 1)
    assert float(ce) == pytest.approx(want["ce_loss"], rel=1e-3)
    # LISA records its mask terms already weighted (bce 2.0, dice 0.5)
    assert 2.0 * float(bce) == pytest.approx(want["mask_bce_loss"], rel=1e-4)
    assert 0.5 * float(dice) == pytest.approx(want["mask_dice_loss"], rel=1e-4)


def test_lisa_greedy_generation_from_our_prompt(lisa):
    model, expected, tensors, image = lisa
    record = expected["cases"]["C"]
    question, _ = split_conversation(expected["cases"]["A"]["conversation_text"])
    prompt, result = generate_from_question(model, image, question, 12)
    assert prompt.tolist() == expand(record["prompt_ids"], model.processor.ids.image,
                                     expected["num_image_features"])
    assert result.output_ids.tolist() == record["generated_ids"]
    assert result.answer == "Sure, it is [SEG]."
    assert relative(result.masks, tensors["case_C.pred_masks"]) < 1e-4


# --- KeySeg reference -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyseg_ref(tmp_path_factory):
    root = shared_path("fixtures/keyseg_ref_tiny")
    tower = shared_path("fixtures/lisa_tiny/clip_tiny")
    dst = tmp_path_factory.mktemp("ref") / "converted"
    assert cli_main(["convert", "keyseg-ref", str(root / "ref_hf"), str(dst),
                     "--vision-tower", str(tower)]) == 0
    model = KeySegModel.from_pretrained(dst).eval()
    expected = json.loads((root / "expected.json").read_text())
    return (model, expected, load_file(str(root / "expected.safetensors")),
            load_image(shared_path("fixtures/lisa_tiny/image.png")))


def test_converted_reference_has_the_reference_vocabulary_and_fusion(keyseg_ref):
    model, expected, _, _ = keyseg_ref
    ids = model.processor.ids
    assert (ids.seg, ids.key) == (expected["seg_token_id"], expected["key_token_id"])
    assert model.settings.fusion.variant == "reference" and model.settings.fusion.num_queries == 12
    assert model.settings.loss.key_temperature == expected["temperature"]
    # 604 reference classes; the extra <image> row is excluded from every softmax
    assert model.non_output_ids == (expected["vocab_size"],)
    assert model.settings.fusion.generation_keys == "all"  # ours; "first" is the switch


@pytest.mark.parametrize("case", ["A", "B"])
def test_reference_ids_states_keyword_target_and_tensors(keyseg_ref, case):
    model, expected, tensors, image = keyseg_ref
    record = expected["cases"][case]
    question, answer = split_conversation(record["conversation"])
    assert answer == f"[SEG].[KEY] {record['keyword']}"
    ours = tokens.with_keyword("[SEG].", record["keyword"])  # our own answer builder
    got = teacher_forced(model, image, question, ours)
    count, image_id = expected["num_image_features"], model.processor.ids.image
    assert got["encoded"].input_ids.tolist() == expand(record["input_ids"], image_id, count)
    assert got["encoded"].labels.tolist() == expand_labels(record["labels"],
                                                           record["input_ids"], count)
    assert got["seg_index"].tolist() == record["seg_hidden_index_expanded"]
    assert got["key_index"].tolist() == record["key_hidden_index_expanded"]
    keyword = tokens.keyword_token_ids(got["encoded"].input_ids, model.processor.ids)
    assert keyword[0].tolist() == record["keyword_ids"]
    assert int(keyword[0][0]) == record["keyword_target_id"]

    assert relative(got["seg"], tensors[f"case_{case}.seg_embedding"]) < 1e-5
    assert relative(got["key"], tensors[f"case_{case}.key_embedding"]) < 1e-5
    assert relative(got["fused"], tensors[f"case_{case}.fused_seg_embedding"]) < 1e-5
    assert relative(got["low_res"], tensors[f"case_{case}.low_res_masks"]) < 1e-4
    assert relative(got["masks"], tensors[f"case_{case}.pred_masks"]) < 1e-4

    # keyword loss over the reference's 604 classes, as the model computes it
    table = model.projected_table()
    loss = keyword_alignment_loss(got["key"], table, keyword,
                                  temperature=model.settings.loss.key_temperature,
                                  ignore_ids=(model.processor.ids.pad,),
                                  exclude_ids=model.non_output_ids)
    assert float(loss) == pytest.approx(record["losses"]["keyword_loss"], rel=1e-4)
    # CE of the answer over the reference's classes
    logits = got["logits"].float()
    logits[:, list(model.non_output_ids)] = float("-inf")
    labels = got["encoded"].labels
    ce = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    weight = expected["loss_weights"]["ce"]
    assert float(ce) * weight == pytest.approx(record["losses"]["ce_loss"], rel=1e-4)


def test_reference_model_forward_reproduces_the_recorded_losses(keyseg_ref):
    """The full training forward (our collated batch) gives the reference's loss terms."""
    model, expected, tensors, image = keyseg_ref
    record = expected["cases"]["A"]
    question, _ = split_conversation(record["conversation"])
    processor = model.processor
    prepared = processor.prepare_image(image)
    encoded = processor.encode([tokens.Turn(question, tokens.with_keyword("[SEG].", "dress"))])
    gt = tensors["case_A.gt_mask"].to(torch.uint8)
    batch = Batch(input_ids=encoded.input_ids[None],
                  attention_mask=torch.ones_like(encoded.input_ids)[None],
                  vision_inputs=prepared.vision_inputs,
                  sam_pixel_values=prepared.sam.pixel_values[None],
                  image_index=torch.zeros(1, dtype=torch.long),
                  resized_sizes=[prepared.sam.resized_size],
                  original_sizes=[prepared.sam.original_size],
                  labels=encoded.labels[None], target_masks=[gt])
    with torch.no_grad():
        out = model(batch)
    want = record["losses"]
    weights = expected["loss_weights"]
    assert model.settings.loss.ce_weight == weights["ce"]
    assert float(out.ce) * weights["ce"] == pytest.approx(want["ce_loss"], rel=1e-4)
    assert float(out.bce) == pytest.approx(want["mask_bce_loss"], rel=1e-4)
    assert float(out.dice) == pytest.approx(want["mask_dice_loss"], rel=1e-4)
    assert float(out.key) == pytest.approx(want["keyword_loss"], rel=1e-4)
    assert float(out.loss) == pytest.approx(want["loss"], rel=1e-4)


@pytest.mark.parametrize("keys", ["first", "all"])
def test_reference_generation_from_our_prompt(keyseg_ref, keys):
    import dataclasses

    model, expected, tensors, image = keyseg_ref
    record = expected["cases"]["C"]
    model.settings = dataclasses.replace(
        model.settings, fusion=dataclasses.replace(model.settings.fusion, generation_keys=keys))
    try:
        prompt, result = generate_from_question(model, image, record["user_input"], 32)
    finally:
        model.settings = dataclasses.replace(
            model.settings, fusion=dataclasses.replace(model.settings.fusion,
                                                     generation_keys="all"))
    assert prompt.tolist() == expand(record["prompt_ids"], model.processor.ids.image,
                                     expected["num_image_features"])
    assert result.output_ids.tolist() == record["generated_ids"]
    assert result.keyword == "dress"
    # one [KEY] here, so both switches fuse the same row; the mask is the reference's
    assert relative(result.masks, tensors["case_C.pred_masks"]) < 1e-4


def test_sentencepiece_tokenizer_without_sentencepiece_is_one_line(tmp_path, monkeypatch):
    """LISA-7B-v1 ships tokenizer.model only: a missing sentencepiece is named, not a raw
    transformers error about tiktoken."""
    import shutil

    import keyseg.convert.lisa as lisa_convert

    root = shared_path("fixtures/lisa_tiny")
    src = tmp_path / "lisa_hf"
    shutil.copytree(root / "lisa_hf", src)
    real = lisa_convert.find_spec
    monkeypatch.setattr(lisa_convert, "find_spec",
                        lambda name: None if name == "sentencepiece" else real(name))
    code = cli_main(["convert", "lisa", str(src), str(tmp_path / "out"),
                     "--vision-tower", str(root / "clip_tiny")])
    assert code != 0
    assert not (tmp_path / "out").exists()


def test_missing_sentencepiece_message_names_file_and_package(tmp_path, monkeypatch):
    import shutil

    import keyseg.convert.lisa as lisa_convert
    from keyseg.errors import KeySegCheckpointError

    src = tmp_path / "lisa_hf"
    shutil.copytree(shared_path("fixtures/lisa_tiny/lisa_hf"), src)
    monkeypatch.setattr(lisa_convert, "find_spec", lambda name: None)
    with pytest.raises(KeySegCheckpointError) as error:
        lisa_convert.load_saved_tokenizer(src)
    message = str(error.value)
    assert "tokenizer.model" in message and "sentencepiece" in message
    assert "\n" not in message
