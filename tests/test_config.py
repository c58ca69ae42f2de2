from __future__ import annotations

from pathlib import Path

import pytest

from keyseg.config import KeySegConfig, load_config, save_config, to_dict
from keyseg.errors import KeySegConfigError


def test_defaults_follow_reference_recipe():
    cfg = KeySegConfig()
    assert cfg.model.loss.ce_weight == 1e-4 and cfg.model.loss.bce_weight == 2.0
    assert cfg.model.loss.dice_weight == 0.5 and cfg.model.loss.key_weight == 1.0
    assert cfg.model.lora.r == 8 and cfg.model.lora.alpha == 16
    assert cfg.model.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.train.lr == 3e-4 and cfg.train.betas == (0.9, 0.95)
    assert cfg.model.fusion.num_queries == 12 and cfg.model.fusion.dim == 256


def test_yaml_round_trip_preserves_every_value(tmp_path):
    cfg = load_config(None, ["train.lr=1e-5", "model.fusion.variant=residual",
                             "model.lora.target_modules=[q_proj,k_proj,v_proj]"])
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert to_dict(again)["model"]["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(KeySegConfigError) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value) and "train.learning_rate" in str(info.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lr=fast", "train.lr: expected float"),
        ("train.epochs=2.5", "train.epochs: expected int"),
        ("model.fusion.variant=big", "model.fusion.variant"),
        ("train.betas=[0.9]", "expected 2 values"),
        ("model=3", "model: expected a mapping"),
    ],
)
def test_wrong_types_are_rejected(override, fragment):
    with pytest.raises(KeySegConfigError, match=fragment.replace("[", r"\[")):
        load_config(None, [override])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(KeySegConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shapes_settings_defaults_match_the_generator():
    """config.ShapesSettings mirrors keyseg.data.shapes.ShapesConfig; keep them in step."""
    import dataclasses

    from keyseg.config import ShapesSettings
    from keyseg.data.shapes import ShapesConfig

    generator = ShapesConfig()
    for field in dataclasses.fields(ShapesSettings):
        assert getattr(ShapesSettings(), field.name) == getattr(generator, field.name), field.name


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_strictly(path, tmp_path):
    """Every config in configs/ parses with unknown keys rejected and survives a round trip."""
    cfg = load_config(path)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_shipped_configs_exist():
    assert {"keyseg-7b.yaml", "tiny-shapes.yaml", "tiny-test.yaml"} <= {p.name for p in CONFIGS}
