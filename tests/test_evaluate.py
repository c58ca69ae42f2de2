"""Evaluation: protocols, reports consistent with their JSONL, skipped / no-[SEG] counting."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import answer_ids, forced, make_record
from keyseg.cli import main as cli_main
from keyseg.data.collate import Collator, Conversation, ImageExample
from keyseg.data.eval_sets import parse_spec, resolve_eval_set
from keyseg.data.sample import Referent, SegRecord
from keyseg.data.shapes import ShapesConfig, ShapesDataset, export_reason_seg
from keyseg.errors import KeySegConfigError
from keyseg.evaluate import (
    eval_question,
    eval_referents,
    recompute_from_jsonl,
    run_evaluation,
    teacher_answer,
)
from keyseg.tokens import Turn

SMALL = ShapesConfig(image_size=64, val_size=4, test_size=5)


@pytest.fixture(scope="module")
def reason_seg_root(tmp_path_factory) -> Path:
    """A tiny ReasonSeg-format val split exported from the shapes world (4 samples)."""
    root = tmp_path_factory.mktemp("dataset")
    base = root / "reason_seg" / "ReasonSeg"
    export_reason_seg(ShapesDataset("val", SMALL), base / "val",
                      keyword_file=root / "reason_seg" / "explanatory_key" / "keyword_outputs.json")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from keyseg.build import build_tiny_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_model(seed=0).save_pretrained(path)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _by_hand(rows: list[dict]) -> tuple[float, float, int]:
    """gIoU, cIoU and mask count of per-sample rows: mean of I/(U+1e-5) (1 when U = 0) and
    sum I / (sum U + 1e-10)."""
    scores, inter, union = [], 0, 0
    for row in rows:
        for i, u in zip(row["I"], row["U"], strict=True):
            scores.append(1.0 if u == 0 else i / (u + 1e-5))
            inter, union = inter + i, union + u
    return sum(scores) / len(scores), inter / (union + 1e-10), len(scores)


# --------------------------------------------------------------------------- prompts


def test_teacher_answer_feeds_seg_per_target_and_key_even_without_keyword():
    assert teacher_answer(1, "spoon") == "[SEG]. [KEY] spoon"
    assert teacher_answer(1, None) == "[SEG]. [KEY]"
    assert teacher_answer(1, None, use_keyword=False) == "[SEG]."
    assert teacher_answer(3, "circle", use_keyword=False) == "[SEG], [SEG] and [SEG]."
    assert teacher_answer(2, "") == "[SEG] and [SEG]. [KEY]"
    # the dataset's own [SEG] answer is fed when it matches the target count
    assert teacher_answer(1, "ring", reference="Sure, [SEG].") == "Sure, [SEG]. [KEY] ring"
    assert teacher_answer(2, None, use_keyword=False, reference="Sure, [SEG].") == (
        "[SEG] and [SEG].")
    assert teacher_answer(1, None, use_keyword=False, reference="A spoon.") == "[SEG]."


def test_questions_are_lisa_validation_templates_without_randomness():
    sentence = Referent(" What could hold soup?", True, np.zeros((1, 2, 2), np.uint8))
    phrase = Referent("Man In Red ", False, np.zeros((1, 2, 2), np.uint8))
    # LISA's validation sets: a space after "<image>\n"; refCOCO lower-cased, ReasonSeg not.
    assert eval_question(sentence, "reason_seg") == (
        " What could hold soup? Please output segmentation mask.")
    assert eval_question(phrase, "reason_seg") == (
        " What is Man In Red in this image? Please output segmentation mask.")
    assert eval_question(phrase, "refcoco+") == (
        " What is man in red in this image? Please output segmentation mask.")
    # Other sources (the procedural world): the training wording.
    assert eval_question(sentence, "shapes") == (
        "What could hold soup? Please output segmentation mask.")
    assert eval_question(phrase) == (
        "What is man in red in this image? Please output segmentation mask.")


def test_reason_seg_scores_first_text_unless_all_texts_and_refer_scores_all():
    mask = np.zeros((1, 4, 4), np.uint8)
    refs = [Referent(t, True, mask) for t in ("a?", "b?", "c?")]
    reason = SegRecord("x", "reason_seg", refs)
    refer = SegRecord("y", "refcoco", refs)
    assert [i for i, _ in eval_referents(reason)] == [0]
    assert [i for i, _ in eval_referents(reason, all_texts=True)] == [0, 1, 2]
    assert [i for i, _ in eval_referents(refer)] == [0, 1, 2]


def test_eval_specs_parse_refer_split_names_and_reject_unknown():
    assert parse_spec("refcoco+:testB") == ("refcoco+", "testB")
    assert parse_spec("reason_seg:val") == ("reason_seg", "val")
    for bad in ("refcocog:testA", "reasonseg:val", "refcoco", "refcoco:testa"):
        with pytest.raises(KeySegConfigError):
            parse_spec(bad)
    assert len(resolve_eval_set("shapes:test").records) == ShapesConfig().test_size


def test_teacher_masks_do_not_depend_on_the_keyword_text_after_key(tiny_model_factory):
    # Why feeding a bare " [KEY]" for an unknown keyword is exact: causal attention.
    model = tiny_model_factory(seed=3).eval()
    record = make_record()
    masks = []
    for answer in ("[SEG]. [KEY] spoon", "[SEG]. [KEY]"):
        conv = Conversation([Turn(eval_question(record.referents[0]), answer)],
                            record.referents[0].masks, "s")
        batch = Collator(model.processor)([ImageExample(record.image, [conv])])
        masks.append(model.predict(batch)[0])
    torch.testing.assert_close(masks[0], masks[1])


# --------------------------------------------------------------------------- end to end


def test_cli_report_matches_jsonl_in_both_modes_and_honours_limit(
        reason_seg_root, checkpoint, tmp_path):
    out = tmp_path / "out"
    code = cli_main(["eval", "--checkpoint", str(checkpoint), "--dataset", "reason_seg:val",
                     "--mode", "teacher", "generate", "--dataset-dir", str(reason_seg_root),
                     "--out", str(out), "--limit", "3", "--batch-size", "2",
                     "--max-new-tokens", "4", "--save-overlays", "1", "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for mode in ("teacher", "generate"):
        entry = report["results"]["reason_seg:val"][mode]
        lines = _lines(out / entry["jsonl"])
        assert entry["samples"] == len(lines) == 3  # --limit 3 of 4 records, text[0] each
        assert entry["skipped"] == 0
        recomputed = recompute_from_jsonl(out / entry["jsonl"])
        assert recomputed["n"] == entry["n"]
        assert recomputed["giou"] == pytest.approx(entry["giou"], abs=1e-12)
        assert recomputed["ciou"] == pytest.approx(entry["ciou"], abs=1e-12)
        # and by hand from the per-mask counts (SPEC §6), not through SegMetrics
        giou, ciou, n = _by_hand(lines)
        assert n == entry["n"] > 0
        assert entry["giou"] == pytest.approx(giou, abs=1e-12)
        assert entry["ciou"] == pytest.approx(ciou, abs=1e-12)
        assert sum(sum(row["I"]) for row in lines) == entry["intersection"]
        assert sum(sum(row["U"]) for row in lines) == entry["union"]
        assert entry["no_seg"] == sum(row["no_seg"] for row in lines)
        pngs = sorted((out / entry["overlays"]).glob("*.png"))
        assert [p.name.split("_")[0] for p in pngs] == ["best", "worst"]
    teacher = _lines(out / report["results"]["reason_seg:val"]["teacher"]["jsonl"])
    assert all(row["answer"].startswith("[SEG]. [KEY]") for row in teacher)
    assert all(row["question"].endswith("Please output segmentation mask.") for row in teacher)
    weights = sorted(p for p in checkpoint.iterdir() if p.name.endswith(".safetensors"))
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weights}
    assert report["checkpoint"]["files"] == files and report["checkpoint"]["sha256"]
    assert report["versions"]["torch"] and report["device"]["device"] == "cpu"
    assert report["config"]["eval"]["limit"] == 3


def test_corrupt_image_is_skipped_counted_and_the_run_completes(reason_seg_root, tmp_path,
                                                                tiny_model_factory):
    import shutil

    root = tmp_path / "dataset"
    shutil.copytree(reason_seg_root, root)
    val = root / "reason_seg" / "ReasonSeg" / "val"
    images = sorted(val.glob("*.jpg"))
    data = images[1].read_bytes()
    images[1].write_bytes(data[: len(data) // 2])  # truncated: header fine, pixels cut
    eval_set = resolve_eval_set("reason_seg:val", root)
    jsonl = tmp_path / "samples.jsonl"
    result = run_evaluation(tiny_model_factory(seed=0), eval_set.records, limit=3,
                            jsonl_path=jsonl, progress=False)
    assert result.metrics["skipped"] == 1
    assert result.metrics["samples"] == result.metrics["records"] == 2
    assert images[1].name in result.skipped_messages[0]
    assert len(_lines(jsonl)) == 2
    assert images[1].stem not in jsonl.read_text()


def test_generated_answer_without_seg_scores_empty_predictions_and_counts_no_seg(
        tiny_model_factory):
    model = tiny_model_factory(seed=2).train()
    record = make_record()  # referents: 1 mask (with an ignore region), 2 masks
    script = answer_ids(model.processor, " No.")
    result = run_evaluation(
        model, [record], mode="generate", max_new_tokens=8, progress=False,
        keep_per_sample=True, batch_size=2,
        generate_kwargs={"logits_processor": forced(script)})
    m = result.metrics
    assert m["no_seg"] == m["samples"] == 2 and m["n"] == 3
    for row, ref in zip(result.per_sample, record.referents, strict=True):
        assert row["answer"] == "No." and row["n_pred"] == 0
        foreground = [int(((mask != 0) & (mask != 255)).sum()) for mask in ref.masks]
        assert row["I"] == [0] * len(foreground) and row["U"] == foreground
    assert m["giou"] == 0.0 and m["intersection"] == 0
    assert model.training  # evaluation restores the caller's mode (the trainer validates)


def test_generated_seg_count_mismatch_is_counted_and_missing_targets_score_empty(
        tiny_model_factory):
    model = tiny_model_factory(seed=2)
    ids = model.processor.ids
    record = make_record()
    second = record.referents[1].masks  # two targets, one [SEG] generated
    script = answer_ids(model.processor, " It is", segs=1)
    result = run_evaluation(
        model, [record], mode="generate", max_new_tokens=8, progress=False,
        keep_per_sample=True, batch_size=2,
        generate_kwargs={"logits_processor": forced(script)})
    assert result.metrics["fewer_seg"] == 1 and result.metrics["no_seg"] == 0
    row = result.per_sample[1]
    assert row["n_pred"] == 1 and row["I"][1] == 0 and row["U"][1] == int(second[1].sum())

    script = [ids.seg, ids.seg, ids.seg, ids.eos]
    result = run_evaluation(
        model, [record], mode="generate", max_new_tokens=8, progress=False, batch_size=2,
        generate_kwargs={"logits_processor": forced(script)})
    assert result.metrics["extra_seg"] == 2 and result.metrics["n"] == 3


def test_keyword_accuracy_counts_decoded_keywords_equal_to_the_referents(tiny_model_factory):
    """The record's referents have keywords "spoon" and "circle": an answer whose [KEY] decodes
    to " Spoon " is right for the first only; teacher mode reports no keyword accuracy."""
    model = tiny_model_factory(seed=2)
    record = make_record()
    script = answer_ids(model.processor, " It is", segs=1, keyword="Spoon")
    result = run_evaluation(
        model, [record], mode="generate", max_new_tokens=12, progress=False,
        keep_per_sample=True, batch_size=2,
        generate_kwargs={"logits_processor": forced(script)})
    assert [row["keyword"].strip().lower() for row in result.per_sample] == ["spoon", "spoon"]
    assert result.metrics["keyword_scored"] == 2
    assert result.metrics["keyword_accuracy"] == 0.5
    teacher = run_evaluation(model, [record], progress=False, batch_size=2)
    assert "keyword_accuracy" not in teacher.metrics


def test_per_difficulty_breakdown_sums_to_the_whole(tiny_model_factory):
    """Each difficulty's gIoU/cIoU are those of its own masks (recomputed by hand from the
    per-sample rows), and the parts add up to the whole."""
    result = run_evaluation(tiny_model_factory(seed=0), ShapesDataset("test", SMALL), limit=3,
                            progress=False, batch_size=2, keep_per_sample=True)
    parts = result.metrics["by_difficulty"]
    assert sum(p["n"] for p in parts.values()) == result.metrics["n"]
    assert result.metrics["records"] == 3
    groups: dict[str, list[dict]] = {}
    for row in result.per_sample:
        groups.setdefault(row["difficulty"], []).append(row)
    assert set(parts) == set(groups) and len(groups) > 1
    for label, rows in groups.items():
        giou, ciou, n = _by_hand(rows)
        assert parts[label]["n"] == n
        assert parts[label]["giou"] == pytest.approx(giou, abs=1e-12)
        assert parts[label]["ciou"] == pytest.approx(ciou, abs=1e-12)
    overall = _by_hand(result.per_sample)
    assert result.metrics["giou"] == pytest.approx(overall[0], abs=1e-12)


# --------------------------------------------------------------------------- distributed


WORKER = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from keyseg.data.shapes import ShapesConfig, ShapesDataset
    from keyseg.evaluate import run_evaluation
    from keyseg.build import build_tiny_model

    acc = Accelerator(cpu=True)
    records = ShapesDataset("test", ShapesConfig(image_size=64, test_size=5))
    result = run_evaluation(build_tiny_model(seed=0), records, accelerator=acc, batch_size=2,
                            jsonl_path=sys.argv[1], progress=False)
    print("RESULT " + json.dumps(result.metrics))
""")


@pytest.mark.slow
def test_two_process_evaluation_equals_single_process_exactly(tmp_path, tiny_model_factory):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    jsonl = tmp_path / "dist.jsonl"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 500),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(jsonl)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    dist = [json.loads(line[7:]) for out in outputs for line in out.splitlines()
            if line.startswith("RESULT ")]
    assert len(dist) == 2 and dist[0] == dist[1]  # every process gets the reduced numbers
    single = run_evaluation(tiny_model_factory(seed=0), ShapesDataset("test", SMALL),
                            progress=False).metrics
    for key in ("n", "intersection", "union", "samples", "records"):
        assert dist[0][key] == single[key]
    assert dist[0]["giou"] == pytest.approx(single["giou"], abs=1e-12)
    lines = _lines(jsonl)
    assert sorted(row["id"] for row in lines) == sorted(
        f"shapes/{ShapesDataset('test', SMALL)[i].sample_id}#0" for i in range(5))
    assert not list(tmp_path.glob(".dist.jsonl.part*"))


def test_max_pairwise_iou_of_an_answers_masks():
    from keyseg.evaluate.scoring import max_pairwise_iou

    pred = torch.full((3, 4, 4), -1.0)
    pred[0, :2, :2] = 1  # 4 px
    pred[1, :2, :] = 1   # 8 px, holds all of mask 0: IoU 4/8
    pred[2, 3, 3] = 1    # 1 px, apart
    assert max_pairwise_iou(pred) == pytest.approx(0.5)
    assert max_pairwise_iou(pred[:1]) is None
    assert max_pairwise_iou(torch.full((2, 4, 4), -1.0)) == 0.0  # two empty masks
    assert max_pairwise_iou(pred[[0, 0]]) == pytest.approx(1.0)  # one object drawn twice
