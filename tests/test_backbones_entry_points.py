"""Every backbone family x both mask decoders through every entry point, with tiny models:
train, eval (teacher + generate), segment, chat (multi-turn), batch, demo, export.

Families: LLaVA-v1 (LISA's layout: linear projector, <im_start>/<im_end>), LLaVA-1.5 (HF
layout: MLP projector), Qwen2-VL, Qwen2.5-VL, Qwen3-VL; decoders: SAM and SAM 2. Commands run
in-process through ``keyseg.cli.main`` on ``save_pretrained`` directories, so loading, prompt
encoding (per-image token counts for Qwen), generation and mask decoding are the real code;
only the answer is scripted (random weights would rarely say ``[SEG]``).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import answer_ids, forced
from keyseg import cli
from keyseg.config import BackboneConfig, ModelConfig, SamSettings
from keyseg.pipeline import KeySegPipeline

QWEN = {"image_token": "<|image_pad|>", "system_prompt": "You are a helpful assistant."}
FAMILIES: dict[str, dict] = {
    "llava_v1": {"family": "llava", "projector": "linear", "use_im_start_end": True},
    "llava_hf": {"family": "llava"},
    "qwen2_vl": {"family": "qwen2_vl", **QWEN},
    "qwen2_5_vl": {"family": "qwen2_5_vl", **QWEN},
    "qwen3_vl": {"family": "qwen3_vl", **QWEN},
}
DECODERS = ("sam", "sam2")
COMBOS = [pytest.param(f, d, id=f"{f}-{d}") for f in FAMILIES for d in DECODERS]
TINY_CONFIG = Path(__file__).parents[1] / "configs" / "tiny-test.yaml"


def model_config(family: str, decoder: str) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig(preset="tiny", **FAMILIES[family]),
                       sam=SamSettings(family=decoder, preset="tiny"))


def overrides(family: str, decoder: str) -> list[str]:
    """The same model as ``section.key=value`` overrides of the tiny training config."""
    out = [f"model.sam.family={decoder}"]
    for key, value in FAMILIES[family].items():
        out.append(f"model.backbone.{key}={json.dumps(value)}")
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``(family, decoder) -> model directory`` of a random tiny model with LoRA applied,
    built once per combination."""
    from keyseg.build import build_keyseg
    from keyseg.model.trainable import apply_lora, configure_trainable

    built: dict[tuple[str, str], Path] = {}

    def get(family: str, decoder: str) -> Path:
        if (family, decoder) not in built:
            torch.manual_seed(0)
            config = model_config(family, decoder)
            model = build_keyseg(config)
            apply_lora(model, config.lora)
            configure_trainable(model, config.trainable)
            path = tmp_path_factory.mktemp("ckpt") / f"{family}-{decoder}"
            model.save_pretrained(path)
            built[family, decoder] = path
        return built[family, decoder]

    return get


@pytest.fixture
def scripted(monkeypatch):
    """Every pipeline call answers 'Sure, [SEG] [KEY] spoon' (loading stays real)."""
    calls = []
    original = KeySegPipeline.__call__

    def call(self, *args, **kwargs):
        kwargs.setdefault("logits_processor",
                          forced(answer_ids(self.processor, " Sure,", segs=1, keyword="spoon")))
        calls.append((self, list(kwargs.get("history") or [])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KeySegPipeline, "__call__", call)
    return calls


def write_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def assert_masks(folder: Path, height: int, width: int) -> dict:
    summary = json.loads((folder / "result.json").read_text())
    assert summary["num_masks"] == 1 and summary["keyword"] == "spoon"
    mask = np.asarray(Image.open(folder / "mask_0.png"))
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
    return summary


@pytest.mark.parametrize("family, decoder", COMBOS)
def test_train_then_segment_with_the_trained_model(family, decoder, tmp_path, scripted):
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(TINY_CONFIG), f"train.output_dir={out}",
                     "train.epochs=1", "train.steps_per_epoch=1", "train.val_limit=1",
                     "train.save_every=1", *overrides(family, decoder)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(np.isfinite(losses))
    trained = json.loads((out / "final" / "config.json").read_text())["keyseg"]
    assert trained["backbone"]["family"] == FAMILIES[family]["family"]
    assert trained["sam"]["family"] == decoder
    picture = write_image(tmp_path / "wide.png", 30, 50)
    assert cli.main(["segment", str(picture), "What would you use to eat soup?",
                     "--checkpoint", str(out / "final"), "--out", str(tmp_path / "seg")]) == 0
    assert_masks(tmp_path / "seg", 30, 50)


@pytest.mark.parametrize("family, decoder", COMBOS)
def test_eval_in_both_modes(family, decoder, checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(checkpoint(family, decoder)),
                     "--dataset", "shapes:val", "--mode", "teacher", "generate",
                     "--limit", "2", "--batch-size", "2", "--max-new-tokens", "3",
                     "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())["results"]["shapes:val"]
    for mode in ("teacher", "generate"):
        assert report[mode]["records"] == 2 and report[mode]["skipped"] == 0
    # teacher forcing feeds one [SEG] per target: every target gets a predicted mask
    assert report["teacher"]["n"] >= 2 and report["teacher"]["no_seg"] == 0


@pytest.mark.parametrize("family, decoder", COMBOS)
def test_segment(family, decoder, checkpoint, tmp_path, scripted):
    picture = write_image(tmp_path / "tall.png", 44, 20)
    assert cli.main(["segment", str(picture), "What would you use to eat soup?",
                     "--checkpoint", str(checkpoint(family, decoder)),
                     "--out", str(tmp_path / "o")]) == 0
    assert_masks(tmp_path / "o", 44, 20)


@pytest.mark.parametrize("family, decoder", COMBOS)
def test_chat_multi_turn(family, decoder, checkpoint, tmp_path, scripted, monkeypatch):
    picture = write_image(tmp_path / "a.png", 30, 50)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question?\nand the second?\nexit\n"))
    assert cli.main(["chat", str(picture), "--checkpoint", str(checkpoint(family, decoder)),
                     "--out", str(tmp_path / "chat")]) == 0
    pipe, history = scripted[-1]
    assert len(scripted) == 2 and len(pipe.history) == 2
    # the second turn was asked with the first turn (and its [SEG] answer) as history
    assert [t.answer for t in history] == [pipe.history[0].answer]
    assert history[0].answer.count("[SEG]") == 1
    for turn in (1, 2):
        assert_masks(tmp_path / "chat" / f"turn_{turn}", 30, 50)


@pytest.mark.parametrize("family, decoder", COMBOS)
def test_batch(family, decoder, checkpoint, tmp_path, scripted):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "wide.png", 30, 50, seed=1)
    write_image(folder / "tall.png", 48, 24, seed=2)  # another Qwen token count
    out = tmp_path / "out"
    assert cli.main(["batch", str(folder), "--query", "the largest shape",
                     "--checkpoint", str(checkpoint(family, decoder)), "--out", str(out)]) == 0
    assert_masks(out / "wide", 30, 50)
    assert_masks(out / "tall", 48, 24)


@pytest.mark.parametrize("family, decoder", COMBOS)
def test_demo_answers_two_turns(family, decoder, checkpoint, tmp_path, scripted, monkeypatch):
    import keyseg.demo

    served = []
    monkeypatch.setattr(keyseg.demo, "launch", lambda pipeline, **kw: served.append(pipeline))
    assert cli.main(["demo", "--checkpoint", str(checkpoint(family, decoder))]) == 0
    (pipeline,) = served
    app = keyseg.demo.build_demo(pipeline, examples_dir=tmp_path / "examples")
    (respond,) = [f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "respond"][:1]
    picture = str(write_image(tmp_path / "a.png", 30, 50))
    _, first, _, chat, session, _ = respond(picture, "What is it?", [], None)
    overlay, second, keyword, chat, session, _ = respond(picture, "And now?", chat, session)
    assert overlay.size == (50, 30) and keyword.startswith("spoon")
    assert first and second and "[SEG]" not in second
    assert len(session["turns"]) == 2 and len(chat) == 4


@pytest.mark.parametrize("family, decoder", COMBOS)
def test_export_merged_lora_keeps_the_masks(family, decoder, checkpoint, tmp_path):
    import random

    from helpers import make_record
    from keyseg.data.collate import Collator, record_to_example
    from keyseg.model.keyseg import KeySegModel

    source = checkpoint(family, decoder)
    assert cli.main(["export", str(source), str(tmp_path / "exported"), "--merge-lora"]) == 0
    original = KeySegModel.from_pretrained(source).eval()
    exported = KeySegModel.from_pretrained(tmp_path / "exported").eval()
    assert not json.loads((tmp_path / "exported" / "config.json").read_text())["lora_applied"]
    assert not any("lora_" in name for name in exported.state_dict())
    # Make LoRA matter (its B matrices start at zero): the merge must fold this in.
    with torch.no_grad():
        for name, param in original.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    original.save_pretrained(tmp_path / "moved")
    assert cli.main(["export", str(tmp_path / "moved"), str(tmp_path / "merged"),
                     "--merge-lora"]) == 0
    merged = KeySegModel.from_pretrained(tmp_path / "merged").eval()
    example = record_to_example(make_record(36, 52), random.Random(0))
    batch = Collator(original.processor)([example])
    for a, b in zip(original.predict(batch), merged.predict(batch), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
