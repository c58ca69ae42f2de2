"""The lab's stage 3 (issue #16): KeySeg fine-tuning initialised from a pretrained VLM
directory (``model.backbone.name_or_path``) and a pretrained SAM directory
(``model.sam.checkpoint``), image and prompt encoders frozen, embeddings cached; a few steps
on CPU with tiny parts."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import SamModel

from keyseg.build import build_vlm
from keyseg.config import BackboneConfig, load_config
from keyseg.model.sam import SamSegmenter

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-test.yaml"
STAGE3 = ROOT / "configs" / "tiny-shapes.yaml"


def _pretrained_parts(tmp_path: Path, prompt_dim: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    vlm, image_processor, tokenizer = build_vlm(BackboneConfig(preset="tiny"))
    vlm_dir = tmp_path / "vlm"
    for part in (vlm, image_processor, tokenizer):
        part.save_pretrained(vlm_dir)
    sam = SamSegmenter.from_preset("tiny", prompt_dim=prompt_dim)
    sam.sam.save_pretrained(tmp_path / "sam")
    return vlm_dir, tmp_path / "sam"


def test_stage3_starts_from_both_pretrained_parts_and_keeps_the_encoders(tmp_path, capsys):
    from keyseg.model.keyseg import KeySegModel
    from keyseg.train import main

    dim = load_config(TINY).model.fusion.dim
    vlm_dir, sam_dir = _pretrained_parts(tmp_path, dim)
    stage3 = load_config(STAGE3)
    cfg = load_config(TINY, [
        f"train.output_dir={tmp_path / 'run'}", "train.epochs=1", "train.steps_per_epoch=3",
        "train.validate_every_epoch=false", "train.image_embedding_cache_gb=0.1",
        f"model.backbone.name_or_path={vlm_dir}", f"model.sam.checkpoint={sam_dir}",
        # stage 3's own trainable set, read from the shipped config
        f"model.trainable=[{','.join(stage3.model.trainable)}]",
    ])
    main(cfg)
    out = capsys.readouterr().out
    assert "image embedding cache:" in out
    trained = KeySegModel.from_pretrained(tmp_path / "run" / "final")
    pretrained = SamModel.from_pretrained(sam_dir)
    for name in ("vision_encoder", "prompt_encoder"):
        before = getattr(pretrained, name).state_dict()
        after = getattr(trained.sam.sam, name).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name  # frozen
    moved = any(not torch.equal(a, b) for a, b in zip(
        pretrained.mask_decoder.state_dict().values(),
        trained.sam.sam.mask_decoder.state_dict().values(), strict=True))
    assert moved  # the mask decoder trained


def test_the_shipped_stage3_config_freezes_sams_encoders_and_caches():
    cfg = load_config(STAGE3)
    assert "sam_image_encoder" not in cfg.model.trainable
    assert "sam_prompt_encoder" not in cfg.model.trainable
    assert cfg.train.image_embedding_cache_gb > 0
    for path in (cfg.model.backbone.name_or_path, cfg.model.sam.checkpoint):
        assert (ROOT / path / "config.json").is_file(), path
