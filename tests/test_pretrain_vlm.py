"""experiments/pretrain_vlm.py (issue #16, stage 2): QA pretraining of the tiny VLM runs a few
steps on CPU, supervises only the answers, and writes a directory that build_vlm and
build_keyseg load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import experiment_module
from keyseg import tokens
from keyseg.build import build_keyseg, build_vlm
from keyseg.config import BackboneConfig, ModelConfig, SamSettings
from keyseg.data.shapes import QUESTION_TYPES, QAPair, ShapesDataset

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "pretrain_vlm.py"
SYSTEM = "A chat between a user and an assistant."


def _module():
    return experiment_module("pretrain_vlm")


@pytest.fixture(scope="module")
def tiny_parts():
    torch.manual_seed(0)
    vlm, image_processor, tokenizer = build_vlm(BackboneConfig(preset="tiny"))
    return vlm, _module().QAEncoder(tokenizer, image_processor, vlm.config, SYSTEM)


def test_only_the_answers_are_supervised(tiny_parts) -> None:
    vlm, encoder = tiny_parts
    image = ShapesDataset("val")[0].image
    pairs = [QAPair("count", "count.k.0", "How many stars are there?", "two"),
             QAPair("colour", "colour.k.0", "What colour is the ring?", "green"),
             QAPair("existence", "existence.k.0", "Is there a cross?", "no")]
    batch = encoder.train_batch([(image, pairs), (image, pairs[:1])])
    tok = encoder.tokenizer
    labels = batch["labels"]
    assert tok.decode(labels[0][labels[0] != -100]) == " two</s> green</s> no</s>"
    assert tok.decode(labels[1][labels[1] != -100]) == " two</s>"
    ids = batch["input_ids"]
    assert int((ids[0] == encoder.ids.image).sum()) == vlm.config.image_seq_length
    # the shorter row is right-padded, and padding is neither attended nor supervised
    pad = batch["attention_mask"][1] == 0
    assert pad.any() and (ids[1][pad] == encoder.ids.pad).all() and (labels[1][pad] == -100).all()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.isfinite(vlm(**batch).loss)


def test_batched_generation_answers_as_one_prompt_at_a_time(tiny_parts) -> None:
    vlm, encoder = tiny_parts
    answer_all = _module().answer_all
    record = ShapesDataset("val")[1]
    questions = ["Is there a star?", "What colour is the shape in the top left part of the "
                 "image? Please answer briefly.", "How many shapes are there?"]
    items = [(record.image, QAPair("what", "x", q, "")) for q in questions]
    together = answer_all(vlm, encoder, items, batch_size=3, max_new_tokens=6)
    alone = [answer_all(vlm, encoder, [item], batch_size=1, max_new_tokens=6)[0]
             for item in items]
    assert together == alone
    assert any(together)  # a random model rambles: the check compares real text


def test_score_is_exact_match_after_normalisation() -> None:
    score = _module().score
    items = [(None, QAPair("count", "count.k.0", "q", "two")),
             (None, QAPair("count", "count.k.1", "q", "one", heldout=True)),
             (None, QAPair("size", "size.largest.0", "q", "red circle")),
             (None, QAPair("size", "size.largest.1", "q", "blue star"))]
    result = score(items, ["2", "two", "The red circle.", "blue"])
    assert result["accuracy"]["all"] == 0.5
    assert result["accuracy"]["count"] == 0.5 and result["accuracy"]["size"] == 0.5
    assert result["accuracy"]["heldout"] == 0.0
    assert result["accuracy"]["seen"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["questions"]["all"] == 4
    assert result["constant_baseline"] == {"count": 0.5, "size": 0.5}


def test_a_few_steps_write_a_directory_that_keyseg_loads(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "2", "--images-per-step",
         "2", "--turns-per-image", "3", "--eval-images", "2", "--val-every", "2",
         "--val-images", "2", "--log-every", "1", "--corpus-records", "10",
         "--patch-loss-weight", "1", "--kind-on-objects", "--existence-loss-weight", "1",
         "--tower-steps", "1", "--image-token-norm", "0.5", "--lm-probe-weight", "1",
         "--lookup-turn", "--restate-existence", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [(h["phase"], h["step"]) for h in metrics["history"]] == [
        ("tower", 1), ("qa", 1), ("qa", 2)]
    assert all(h["patch_loss"] > 0 for h in metrics["history"])  # the probes trained
    assert all(h["existence_loss"] > 0 for h in metrics["history"])
    assert metrics["args"]["kind_on_objects"] is True
    assert all(h["lookup_loss"] > 0 for h in metrics["history"] if h["phase"] == "qa")
    assert all(0.0 <= h["lookup_turn_balanced_accuracy"] <= 1.0
               for h in metrics["history"] if h["phase"] == "qa")
    assert 0.0 <= metrics["lookup_probe_test_balanced_accuracy"] <= 1.0
    assert [c["step"] for c in metrics["val_curve"]] == [0, 2]
    assert metrics["test"]["questions"]["all"] >= 8  # one question per type and image, or so
    assert all(0.0 <= v <= 1.0 for v in metrics["test"]["accuracy"].values())
    assert metrics["command"].startswith("python") and metrics["s_per_step"] > 0
    assert metrics["system_prompt"] == SYSTEM
    norms = metrics["norms"]  # --image-token-norm rescaled the image tokens before the QA steps
    assert norms["image_tokens_rescaled"] == pytest.approx(0.5, abs=1e-3)
    assert norms["image_tokens_start"] != pytest.approx(0.5, abs=0.05)
    assert norms["text_embedding"] > 0 and norms["image_tokens_end"] > 0

    vlm, image_processor, tokenizer = build_vlm(BackboneConfig(name_or_path=str(tmp_path)))
    assert type(image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision needed
    assert image_processor.crop_size["height"] == vlm.config.vision_config.image_size == 32
    vocab = tokenizer.get_vocab()
    assert {"<image>", tokens.SEG_TOKEN, tokens.KEY_TOKEN} <= set(vocab)
    assert vlm.config.image_token_index == vocab["<image>"]
    # [SEG]/[KEY] rows start neutral: the mean of the trained rows
    table = vlm.get_input_embeddings().weight
    seg, key = vocab[tokens.SEG_TOKEN], vocab[tokens.KEY_TOKEN]
    others = np.setdiff1d(np.arange(table.shape[0]), [seg, key])
    assert torch.allclose(table[seg], table[others].mean(0), atol=1e-6)
    assert torch.allclose(table[seg], table[key])

    model = build_keyseg(ModelConfig(
        backbone=BackboneConfig(name_or_path=str(tmp_path), system_prompt=SYSTEM),
        sam=SamSettings(preset="tiny")))
    assert model.processor.added_tokens == []  # the pretrained tokenizer already has them
    assert model.processor.ids.seg == seg and model.processor.ids.image == vocab["<image>"]
    encoded = model.processor.encode([tokens.Turn("What is red circle in this image?",
                                                  "It is [SEG]. [KEY] red circle")])
    assert int((encoded.input_ids == seg).sum()) == 1
    # the KeySeg model holds the pretrained VLM's weights
    assert torch.equal(model.backbone.input_embeddings().weight, table)


def test_the_shapes192_preset_sees_native_pixels_and_trains_every_clip_layer() -> None:
    from keyseg.model import tiny

    torch.manual_seed(0)
    vlm, image_processor, tokenizer = build_vlm(BackboneConfig(preset="shapes192"),
                                                tiny.build_tiny_tokenizer())
    encoder = _module().QAEncoder(tokenizer, image_processor, vlm.config, SYSTEM)
    record = ShapesDataset("val")[0]
    assert encoder.num_image_tokens == (192 // 16) ** 2
    batch = encoder.train_batch([(record.image, [QAPair("count", "c", "How many?", "two")])])
    # 192 px records go in unresized
    assert batch["pixel_values"].shape[-2:] == (192, 192)
    vlm(**batch).loss.backward()
    layers = vlm.model.vision_tower.encoder.layers
    for index, layer in enumerate(layers):
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), index


def test_patch_labels_name_the_object_covering_each_patch() -> None:
    from types import SimpleNamespace

    from PIL import Image

    from keyseg.data.shapes import COLOURS, KINDS

    # one axis-aligned square, circumradius 40 px at (96, 96) on 192 px: its side is
    # 40 * sqrt(2) ~ 56.6 px, so it spans x, y in [67.7, 124.3]; on a 12 x 12 grid of 16 px
    # patches, patches 5 and 6 (80..112 px) lie inside on both axes, 0..3 and 8..11 outside.
    meta = {"objects": [{"kind": "square", "colour": "blue", "cx": 96.0, "cy": 96.0,
                         "radius": 40.0, "angle": 0.0, "z": 0}]}
    record = SimpleNamespace(meta=meta, image=Image.new("RGB", (192, 192)))
    labels = _module().patch_labels(record, 12).reshape(2, 12, 12)
    colour, kind = list(COLOURS).index("blue") + 1, KINDS.index("square") + 1
    assert labels[0, 5:7, 5:7].eq(colour).all() and labels[1, 5:7, 5:7].eq(kind).all()
    for outside in (labels[:, :4], labels[:, 8:], labels[:, :, :4], labels[:, :, 8:]):
        assert outside.eq(0).all()


def test_existence_labels_mark_kinds_colours_and_pairs_present() -> None:
    from types import SimpleNamespace

    lab = _module()
    meta = {"objects": [{"kind": "star", "colour": "red"}, {"kind": "ring", "colour": "blue"}]}
    labels = lab.existence_labels(SimpleNamespace(meta=meta))
    on = {lab.EXISTENCE_CONCEPTS[i] for i in labels.nonzero().flatten().tolist()}
    assert on == {(None, "star"), (None, "ring"), ("red", None), ("blue", None),
                  ("red", "star"), ("blue", "ring")}  # not ("red", "ring"): no such object
    assert len(lab.EXISTENCE_CONCEPTS) == 8 + 6 + 48


def test_kind_lookup_probe_asks_every_kind_by_its_word_and_trains_the_lm() -> None:
    """``KindLookupProbe``: each prompt names the 8 kinds once, in its own order; the label
    at a word is whether that kind is in the image; its loss reaches the LM's layers."""
    from keyseg.data.shapes import KINDS
    from keyseg.model import tiny

    lab = _module()
    torch.manual_seed(0)
    vlm, image_processor, tokenizer = build_vlm(BackboneConfig(preset="shapes192"),
                                                tiny.build_tiny_tokenizer())
    encoder = lab.QAEncoder(tokenizer, image_processor, vlm.config, SYSTEM)
    probe = lab.KindLookupProbe(vlm.config.text_config.hidden_size, encoder)
    records = [ShapesDataset("val")[i] for i in range(3)]
    prompts, positions, labels = probe.prompts(records, np.random.default_rng(0))
    orders = set()
    for record, ids, where, label in zip(records, prompts, positions, labels, strict=True):
        prefixes = [tokenizer.decode(ids[: int(j) + 1]) for j in where]  # ends with the word
        words = [next(k for k in KINDS if text.endswith(" " + k)) for text in prefixes]
        assert sorted(words) == sorted(KINDS)
        orders.add(tuple(words))
        present = {o["kind"] for o in record.meta["objects"]}
        assert label.tolist() == [float(w in present) for w in words]
    assert len(orders) > 1  # shuffled per record
    loss, accuracy = probe(vlm, records, np.random.default_rng(0))
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= accuracy <= 1.0
    assert vlm.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_init_continues_a_saved_run_with_its_tokenizer(tmp_path) -> None:
    """``--init DIR`` starts from DIR's weights and tokenizer: at a vanishing learning rate
    the continuation saves (nearly) DIR's weights, where a fresh model would be random."""
    common = ["--preset", "tiny", "--images-per-step", "2", "--turns-per-image", "2",
              "--eval-images", "1", "--log-every", "1", "--corpus-records", "10"]
    first, second = tmp_path / "first", tmp_path / "second"
    for args in ([*common, "--steps", "2", "--out", str(first)],
                 [*common, "--steps", "1", "--lr", "1e-12", "--init", str(first),
                  "--out", str(second)]):
        out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                             text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((second / "metrics.json").read_text())["init"] == str(first)
    vlm_a, _, tok_a = build_vlm(BackboneConfig(name_or_path=str(first)))
    vlm_b, _, tok_b = build_vlm(BackboneConfig(name_or_path=str(second)))
    assert tok_a.get_vocab() == tok_b.get_vocab()
    state_b = vlm_b.state_dict()
    for name, tensor in vlm_a.state_dict().items():
        torch.testing.assert_close(state_b[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_tower_steps_train_the_vision_tower_alone() -> None:
    """``pretrain_tower`` moves the vision tower (and its probes), never the LM or projector."""
    lab = _module()
    torch.manual_seed(0)
    vlm, image_processor, _ = build_vlm(BackboneConfig(preset="tiny"))
    width = vlm.model.vision_tower.config.hidden_size
    probes = [(1.0, lab.PatchProbe(width)), (0.5, lab.ExistenceProbe(width))]
    for _, probe in probes:
        vlm.model.vision_tower.register_forward_hook(probe.capture)
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    history = lab.pretrain_tower(vlm.model.vision_tower, image_processor, probes,
                                 ShapesDataset("val"), np.random.default_rng(0), steps=3,
                                 images=2, lr=1e-2, warmup_steps=1, log_every=2)
    assert [(h["phase"], h["step"]) for h in history] == [("tower", 2), ("tower", 3)]
    assert all(h["patch_loss"] > 0 and h["existence_loss"] > 0 for h in history)
    after = vlm.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("model.vision_tower.") for k in moved), sorted(moved)[:5]
    assert any("patch_embedding" in k for k in moved)


def test_tower_steps_need_a_probe_loss(tmp_path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "1",
                          "--tower-steps", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert "--tower-steps" in out.stderr and "--patch-loss-weight" in out.stderr


def test_sampled_conversations_ask_only_the_chosen_types_several_times() -> None:
    lab = _module()
    rng = np.random.default_rng(0)
    conversations = lab.sample_conversations(ShapesDataset("train"), rng, images=6, turns=6,
                                             types=("existence", "what"), per_type=3)
    pairs = [p for _, ps in conversations for p in ps]
    assert {p.qtype for p in pairs} == {"existence", "what"}
    per_image = [sum(p.qtype == "existence" for p in ps) for _, ps in conversations]
    assert max(per_image) > 1  # per_type 3, not one question per type
    assert all(len(ps) <= 6 for _, ps in conversations)
    for _, ps in conversations:
        assert len({p.question for p in ps}) == len(ps)  # no question asked twice


def test_the_optional_list_type_is_trained_when_named_and_scored_apart(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "1", "--images-per-step",
         "2", "--turns-per-image", "2", "--eval-images", "3", "--log-every", "1",
         "--corpus-records", "10", "--qa-types", "count", "list", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    test = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert "list" in test["accuracy"] and test["questions"]["list"] >= 1
    # "all" stays the default types' score, comparable with runs that never asked lists
    assert test["questions"]["all"] == sum(test["questions"].get(t, 0) for t in QUESTION_TYPES)


def test_unknown_qa_type_is_a_parser_error(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--qa-types", "colours", "--steps", "1",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and "colours" in done.stderr and "existence" in done.stderr


def test_rescaling_the_projector_scales_every_image_token_and_nothing_else(tiny_parts) -> None:
    import copy

    lab = _module()
    vlm, encoder = tiny_parts
    vlm = copy.deepcopy(vlm).eval()
    pixels = encoder.pixels([ShapesDataset("val")[i].image for i in range(2)])
    before = lab.projected_image_tokens(vlm, pixels)
    assert before.shape == (2, encoder.num_image_tokens, vlm.config.text_config.hidden_size)
    embeddings = vlm.get_input_embeddings().weight.clone()
    lab.rescale_image_tokens(vlm, 0.25)
    assert torch.allclose(lab.projected_image_tokens(vlm, pixels), 0.25 * before, atol=1e-6)
    assert torch.equal(vlm.get_input_embeddings().weight, embeddings)
    assert lab.image_token_norm(vlm, pixels) == pytest.approx(
        0.25 * before.norm(dim=-1).mean().item(), rel=1e-5)


def test_image_token_norm_must_be_positive(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--image-token-norm", "0", "--steps", "1",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and "--image-token-norm" in done.stderr


def _shapes192_and(preset: str):
    """(a random ``shapes192`` VLM, a differently seeded random ``preset`` VLM), one tokenizer."""
    from keyseg.model import tiny

    tokenizer = tiny.build_tiny_tokenizer()
    torch.manual_seed(0)
    source, _, _ = build_vlm(BackboneConfig(preset="shapes192"), tokenizer)
    torch.manual_seed(1)
    target, _, _ = build_vlm(BackboneConfig(preset=preset), tokenizer)
    return source, target


def test_warm_start_fills_a_coarser_patch_preset_with_the_saved_weights() -> None:
    """``warm_start`` into the 32 px preset: the new patch kernel computes the old kernel on
    the 2x average-pooled image, a position is the mean of the 2x2 old positions it covers,
    and every other tensor (LM, projector, tower layers) is the source's."""
    source, target = _shapes192_and(preset="shapes192p32")
    assert target.config.image_seq_length == 36
    adapted = _module().warm_start(target, source)
    assert sorted(adapted) == ["model.vision_tower.embeddings.patch_embedding.weight",
                               "model.vision_tower.embeddings.position_embedding.weight"]
    old, new = source.model.vision_tower.embeddings, target.model.vision_tower.embeddings
    image = torch.randn(1, 3, 192, 192)
    with torch.no_grad():
        torch.testing.assert_close(new.patch_embedding(image),
                                   old.patch_embedding(torch.nn.functional.avg_pool2d(image, 2)),
                                   rtol=0, atol=1e-5)
        positions_old = old.position_embedding.weight
        positions_new = new.position_embedding.weight
        assert torch.equal(positions_new[0], positions_old[0])  # the class position
        # new cell (row 1, column 2) of the 6x6 grid covers old rows 2-3, columns 4-5 of 12x12
        block = [1 + 12 * r + c for r in (2, 3) for c in (4, 5)]
        torch.testing.assert_close(positions_new[1 + 6 * 1 + 2], positions_old[block].mean(0))
    state = target.state_dict()
    for name, tensor in source.state_dict().items():
        if name not in adapted and not name.endswith("position_ids"):
            assert torch.equal(state[name], tensor), name


def test_warm_start_into_a_deeper_lm_starts_the_new_layers_as_identities() -> None:
    """``warm_start`` into the 6-layer preset: layers 0-2 are the source's, layers 3-5 add
    nothing yet, so the deeper VLM's logits are the source's; the new layers still learn
    (their zeroed output projections get gradients)."""
    source, target = _shapes192_and(preset="shapes192deep")
    assert len(target.model.language_model.layers) == 6
    adapted = _module().warm_start(target, source)
    assert sorted(adapted) == sorted(
        f"model.language_model.layers.{i}.{proj}.weight"
        for i in (3, 4, 5) for proj in ("self_attn.o_proj", "mlp.down_proj"))
    source.eval(), target.eval()
    ids = torch.randint(3, 60, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    target.train()
    target(input_ids=ids).logits.square().mean().backward()
    assert target.model.language_model.layers[4].self_attn.o_proj.weight.grad.abs().sum() > 0


def test_init_and_warm_start_are_exclusive(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--init", str(tmp_path), "--warm-start",
                           str(tmp_path), "--steps", "1", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--warm-start" in done.stderr


@pytest.mark.parametrize("wording", ["--lookup-asks", "--lookup-bare"])
def test_the_lookup_wordings_need_the_lookup_turn(tmp_path, wording) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), wording, "--steps", "1",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and "--lookup-turn" in done.stderr


def test_lookup_turn_says_every_kind_and_colour_and_is_trained_on_its_verdicts_only(
        tiny_parts) -> None:
    """``lookup_turn``: every kind and colour once, and colour + kind pairs, each with the
    verdict the record's objects give, in a fresh order; ``train_batch`` with the verdict
    marks supervises the lookup turn on those verdicts alone, earlier answers as before."""
    from keyseg.data.shapes import COLOURS, KINDS

    lab = _module()
    _, encoder = tiny_parts
    tok = encoder.tokenizer
    rng = np.random.default_rng(0)
    orders = set()
    for index in range(6):
        record = ShapesDataset("val")[index]
        objects = {(o["colour"], o["kind"]) for o in record.meta["objects"]}
        turn = lab.lookup_turn(record, rng)
        said = dict(item.split(": ") for item in turn.answer.split(", "))
        singles = [name for name in said if " " not in name]
        assert sorted(singles) == sorted([*KINDS, *COLOURS])
        for name, verdict in said.items():
            colour, _, kind = name.rpartition(" ") if " " in name else (
                (name, "", None) if name in COLOURS else (None, "", name))
            truth = any((colour is None or colour == c) and (kind is None or kind == k)
                        for c, k in objects)
            assert verdict == ("yes" if truth else "no"), (name, objects)
        pairs = [name for name in said if " " in name]
        assert 2 <= len(pairs) <= 4 and any(said[p] == "yes" for p in pairs)
        orders.add(tuple(said))

        question = QAPair("colour", "colour.k.0", "What colour is the ring?", "green")
        colon = lab.single_token(tok, ":")
        batch = encoder.train_batch([(record.image, [question, turn])],
                                    lab.lookup_verdicts(tok))
        labels, ids = batch["labels"][0], batch["input_ids"][0]
        kept = tok.decode(labels[labels != -100]).split()
        assert kept[0] == "green</s>"  # the earlier answer untouched
        verdicts = [said[name] for name in said]
        # then the verdicts, nothing else but the end of the answer after the last one
        assert "".join(kept[1:]) == "".join(verdicts) + "</s>"
        first = batch["verdict_first"][0]
        assert int(first.sum()) == len(verdicts) and (ids[first.roll(-1)] == colon).all()
    assert len(orders) == 6


def test_a_bare_lookup_turn_is_trained_on_the_verdict_right_after_each_name(
        tiny_parts) -> None:
    """``lookup_turn(bare=True)``: "star yes, red no" (no colon); ``lookup_verdicts(bare=True)``
    keeps exactly the verdict words and the end of the answer, each verdict's first token
    right after the name's last token."""
    lab = _module()
    _, encoder = tiny_parts
    tok = encoder.tokenizer
    for index in range(4):
        record = ShapesDataset("val")[index]
        turn = lab.lookup_turn(record, np.random.default_rng(index), bare=True)
        colon_turn = lab.lookup_turn(record, np.random.default_rng(index))
        assert ":" not in turn.answer
        assert turn.answer == colon_turn.answer.replace(": ", " ")  # same items, same order
        said = [item.rsplit(" ", 1) for item in turn.answer.split(", ")]
        batch = encoder.train_batch([(record.image, [turn])],
                                    lab.lookup_verdicts(tok, bare=True))
        labels, ids = batch["labels"][0], batch["input_ids"][0]
        kept = tok.decode(labels[labels != -100]).split()
        assert "".join(kept) == "".join(verdict for _, verdict in said) + "</s>"
        first = batch["verdict_first"][0].nonzero().flatten()
        assert len(first) == len(said)
        for (name, _), at in zip(said, first.tolist(), strict=True):
            before = tok.decode(ids[:at]).rstrip()
            assert before.endswith(name), (before[-30:], name)


def test_the_asking_lookup_lists_its_items_in_the_answers_order_as_existence_questions_do(
        ) -> None:
    """``lookup_turn(asks=True)``: the question asks for each item with its article, in the
    order the answer gives the verdicts, and names colours as existence questions do
    ("red shape", not "red")."""
    from keyseg.data.shapes import COLOURS

    lab = _module()
    rng = np.random.default_rng(1)
    wordings = set()
    for index in range(8):
        record = ShapesDataset("val")[index]
        turn = lab.lookup_turn(record, rng, asks=True)
        said = [item.split(": ") for item in turn.answer.split(", ")]
        names = [name for name, _ in said]
        assert {f"{c} shape" for c in COLOURS} <= set(names)
        assert not set(COLOURS) & set(names)
        listed = [("an " if n[0] in "aeiou" else "a ") + n for n in names]
        assert ", ".join(listed[:-1]) + " or " + listed[-1] in turn.question
        plain = lab.lookup_turn(record, np.random.default_rng(index))
        truth = {(n if " " in n or n not in COLOURS else f"{n} shape"): v
                 for n, v in (i.split(": ") for i in plain.answer.split(", "))}
        assert all(truth[name] == verdict for name, verdict in said if name in truth)
        wordings.add(turn.question.split(" a")[0])
    assert len(wordings) >= 2
