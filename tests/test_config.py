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


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_strictly(path, tmp_path):
    """Every config in configs/ parses with unknown keys rejected and survives a round trip."""
    cfg = load_config(path)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_shipped_configs_exist():
    assert {"keyseg-7b.yaml", "tiny-shapes.yaml", "tiny-test.yaml"} <= {p.name for p in CONFIGS}


# ---------------------------------------------------------------------------------------
# Values out of range fail at load, naming the dotted key and the value's source.

# (override, key named in the error): one bad value per ranged field, written by hand.
BAD_VALUES = [
    ("model.sam.preset=vit_q", "model.sam.preset"),
    ("model.sam.preset=hiera_large", "model.sam.preset"),  # a sam2 preset for family sam
    ("model.backbone.preset=huge", "model.backbone.preset"),
    ("model.backbone.image_token=", "model.backbone.image_token"),
    ("model.fusion.dim=0", "model.fusion.dim"),
    ("model.fusion.dim=100", "model.fusion.dim"),  # not a multiple of 8
    ("model.fusion.num_queries=0", "model.fusion.num_queries"),
    ("model.fusion.mlp_ratio=0", "model.fusion.mlp_ratio"),
    ("model.fusion.dropout=1.0", "model.fusion.dropout"),
    ("model.fusion.gate_init=1.0", "model.fusion.gate_init"),  # atanh(1) is infinite
    ("model.fusion.inner_dim=-8", "model.fusion.inner_dim"),
    ("model.loss.ce_weight=-0.1", "model.loss.ce_weight"),
    ("model.loss.bce_weight=-1", "model.loss.bce_weight"),
    ("model.loss.dice_weight=-1", "model.loss.dice_weight"),
    ("model.loss.key_weight=-1", "model.loss.key_weight"),
    ("model.loss.key_temperature=0", "model.loss.key_temperature"),
    ("model.loss.dice_scale=0", "model.loss.dice_scale"),
    ("model.loss.dice_eps=0", "model.loss.dice_eps"),
    ("model.loss.ignore_index=256", "model.loss.ignore_index"),
    ("model.lora.r=0", "model.lora.r"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=-0.1", "model.lora.dropout"),
    ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ("model.trainable=[lora,everything]", "model.trainable"),
    ("data.datasets=[imagenet]", "data.datasets"),
    ("data.datasets=[]", "data.datasets"),
    ("data.datasets=[shapes,shapes]", "data.datasets"),
    ("data.sample_rates=[1.0,2.0]", "data.sample_rates"),  # tiny-test has one dataset
    ("data.sample_rates=[-1.0]", "data.sample_rates[0]"),
    ("data.sample_rates=[0.0]", "data.sample_rates"),
    ("data.refer_seg_data=[refcoco,refclef]", "data.refer_seg_data"),
    ("data.reason_seg_split=dev", "data.reason_seg_split"),
    ("data.max_referents_per_image=0", "data.max_referents_per_image"),
    ("data.explanatory=1.5", "data.explanatory"),
    ("data.val_dataset=imagenet:val", "data.val_dataset"),
    ("data.max_image_pixels=0", "data.max_image_pixels"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.shapes.image_size=32", "data.shapes.image_size"),
    ("data.shapes.min_objects=0", "data.shapes.min_objects"),
    ("data.shapes.max_objects=9", "data.shapes.max_objects"),
    ("data.shapes.min_objects=5", "data.shapes.min_objects"),  # > max_objects (4 here)
    ("data.shapes.min_radius=0", "data.shapes.min_radius"),
    ("data.shapes.max_radius=0.5", "data.shapes.max_radius"),
    ("data.shapes.min_visible=1.5", "data.shapes.min_visible"),
    ("data.shapes.train_size=0", "data.shapes.train_size"),
    ("data.shapes.val_size=-1", "data.shapes.val_size"),
    ("data.shapes.test_size=-1", "data.shapes.test_size"),
    ("data.shapes.queries_per_image=0", "data.shapes.queries_per_image"),
    ("data.shapes.difficulty_weights={easy: 1.0}", "data.shapes.difficulty_weights"),
    ("data.shapes.difficulty_weights={direct: -1.0}", "data.shapes.difficulty_weights[0][1]"),
    ("data.shapes.difficulty_weights={direct: 0.0}", "data.shapes.difficulty_weights"),
    ("data.shapes.train_difficulty_weights={hard: 1.0}",
     "data.shapes.train_difficulty_weights"),
    ("data.shapes.train_difficulty_weights={negative: -1.0}",
     "data.shapes.train_difficulty_weights[0][1]"),
    ("data.shapes.answer_style=short", "data.shapes.answer_style"),
    ("data.shapes.seed=-1", "data.shapes.seed"),
    ("train.output_dir=", "train.output_dir"),
    ("train.seed=-1", "train.seed"),
    ("train.val_mode=sampled", "train.val_mode"),
    ("train.epochs=0", "train.epochs"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch"),
    ("train.batch_size=-1", "train.batch_size"),
    ("train.grad_accumulation=0", "train.grad_accumulation"),
    ("train.lr=-1", "train.lr"),
    ("train.betas=[0.9,1.0]", "train.betas[1]"),
    ("train.betas=[-0.1,0.9]", "train.betas[0]"),
    ("train.lr_scale={fusion: 0}", "train.lr_scale[0][1]"),
    ("train.lr_scale={vision_tower: 0.1}", "train.lr_scale"),  # not in model.trainable
    ("train.weight_decay=-0.01", "train.weight_decay"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.precision=auto", "train.precision"),
    ("train.save_every=0", "train.save_every"),
    ("train.keep_last=-1", "train.keep_last"),
    ("train.log_every=0", "train.log_every"),
    ("train.val_limit=0", "train.val_limit"),
    ("train.early_stopping_patience=0", "train.early_stopping_patience"),
    ("train.max_consecutive_nonfinite=0", "train.max_consecutive_nonfinite"),
    ("train.image_embedding_cache_gb=-1", "train.image_embedding_cache_gb"),
]
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-test.yaml"


@pytest.mark.parametrize(("override", "key"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_fails_at_load_naming_key_and_command_line(override, key):
    overrides = [override]
    if override.startswith("data.shapes.min_objects=5"):
        overrides.insert(0, "data.shapes.max_objects=4")
    with pytest.raises(KeySegConfigError) as info:
        load_config(TINY, overrides)
    lines = info.value.lines  # one line per problem (a second may follow from the first)
    assert any(line.startswith(f"command line: {key}: ") for line in lines), lines


@pytest.mark.parametrize(("override", "key"), BAD_VALUES[:3] + BAD_VALUES[-12:],
                         ids=[o for o, _ in BAD_VALUES[:3] + BAD_VALUES[-12:]])
def test_bad_value_in_the_file_names_the_file(override, key, tmp_path):
    dotted, _, raw = override.partition("=")
    *sections, leaf = dotted.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
    path = tmp_path / "bad.yaml"
    path.write_text(text + f"{'  ' * len(sections)}{leaf}: {raw or repr('')}\n")
    with pytest.raises(KeySegConfigError) as info:
        load_config(path)
    assert any(line.startswith(f"{path}: {key}: ") for line in info.value.lines), str(info.value)


def test_every_ranged_field_has_a_bad_value_test():
    """A field typed with a Range (PositiveInt, Probability, ...) must appear above."""
    import dataclasses
    import typing

    from keyseg.config import Range

    def ranged(hint):
        if typing.get_origin(hint) is typing.Annotated:
            return any(isinstance(m, Range) for m in typing.get_args(hint)[1:])
        return any(ranged(a) for a in typing.get_args(hint))

    def walk(cls, path):
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{path}{f.name}.")
            elif ranged(hints[f.name]):
                yield f"{path}{f.name}"

    tested = {key.split("[")[0] for _, key in BAD_VALUES}
    missing = sorted(set(walk(KeySegConfig, "")) - tested)
    assert not missing, missing


def test_all_problems_are_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: -1\n  lr: fast\ndata:\n  datasets: [shapes]\n"
                    "  sample_rates: [1.0, 2.0]\n  shapes:\n    image_size: 8\n")
    with pytest.raises(KeySegConfigError) as info:
        load_config(path, ["train.save_every=0", "model.sam.preset=vit_q"])
    lines = str(info.value).splitlines()
    assert lines[0] == "6 config problems:"
    body = sorted(line.strip() for line in lines[1:])
    assert body == sorted([
        f"{path}: train.batch_size: must be >= 1, got -1",
        f"{path}: train.lr: expected float, got str ('fast')",
        f"{path}: data.sample_rates: 2 rates for 1 datasets (shapes)",
        f"{path}: data.shapes.image_size: must be in [64, 1024], got 8",
        "command line: train.save_every: must be >= 1, got 0",
        "command line: model.sam.preset: unknown SAM preset 'vit_q' (known for family sam: "
        "vit_h, vit_l, vit_b, tiny, shapes, shapes192)",
    ])


def test_override_type_error_names_the_command_line_not_the_file():
    with pytest.raises(KeySegConfigError) as info:
        load_config(TINY, ["train.lr=fast"])
    assert str(info.value) == "command line: train.lr: expected float, got str ('fast')"


def test_cross_field_problem_blames_the_override_that_caused_it():
    # tiny-test.yaml has one dataset and one rate; the override adds a second dataset.
    with pytest.raises(KeySegConfigError, match=r"^command line: data\.sample_rates: 1 rates "
                                                r"for 2 datasets"):
        load_config(TINY, ["data.datasets=[shapes,reason_seg]"])


def test_sam_preset_is_checked_against_the_chosen_family():
    assert load_config(None, ["model.sam.family=sam2",
                              "model.sam.preset=hiera_large"]).model.sam.preset == "hiera_large"
    with pytest.raises(KeySegConfigError, match=r"model\.sam\.preset: unknown SAM2 preset 'vit_h'"):
        load_config(None, ["model.sam.family=sam2"])


def test_backbone_preset_is_not_checked_when_weights_come_from_elsewhere():
    assert load_config(None, ["model.backbone.preset=anything",
                              "train.init_from=some/dir"]).model.backbone.preset == "anything"
    assert load_config(None, ["model.backbone.preset=anything",
                              "model.backbone.name_or_path=some/dir"])


def test_python_construction_runs_the_same_checks():
    from keyseg.config import FusionConfig, TrainConfig

    with pytest.raises(KeySegConfigError, match=r"^train\.save_every: must be >= 1, got 0$"):
        TrainConfig(save_every=0)
    with pytest.raises(KeySegConfigError, match=r"model\.fusion\.dim: must be a multiple of 8"):
        FusionConfig(dim=12)


def test_cli_train_with_a_bad_override_prints_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "keyseg.cli", "train", "--config", str(TINY),
                           f"train.output_dir={out}", "train.save_every=0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "keyseg train: error: command line: train.save_every: must be >= 1, got 0"]
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# Lists, old "a||b" strings, one shapes config, dtypes


def test_name_lists_are_yaml_lists_and_old_strings_still_load(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text('data:\n  datasets: "refer_seg||reason_seg"\n'
                   '  refer_seg_data: "refcoco||refcocog"\n')
    cfg = load_config(old)
    assert cfg.data.datasets == ("refer_seg", "reason_seg")
    assert cfg.data.refer_seg_data == ("refcoco", "refcocog")
    save_config(cfg, tmp_path / "new.yaml")
    written = (tmp_path / "new.yaml").read_text()
    assert "||" not in written
    assert to_dict(load_config(tmp_path / "new.yaml"))["data"]["datasets"] == [
        "refer_seg", "reason_seg"]
    listed = tmp_path / "list.yaml"
    listed.write_text("data:\n  datasets: [shapes]\n  sample_rates: [1.0]\n")
    assert load_config(listed).data.datasets == ("shapes",)


def test_the_generator_uses_the_config_class_and_yaml_sets_every_option(tmp_path):
    import dataclasses

    from keyseg.config import ShapesConfig
    from keyseg.data import shapes
    from keyseg.data.datasets import build_dataset

    assert shapes.ShapesConfig is ShapesConfig
    path = tmp_path / "shapes.yaml"
    path.write_text(
        "data:\n  datasets: [shapes]\n  sample_rates: [1.0]\n  shapes:\n"
        "    image_size: 96\n    min_objects: 3\n    max_objects: 4\n    min_radius: 0.1\n"
        "    max_radius: 0.12\n    min_visible: 0.5\n    train_size: 7\n    val_size: 3\n"
        "    test_size: 2\n    queries_per_image: 2\n"
        "    difficulty_weights: {multi: 1.0}\n    train_difficulty_weights: {negative: 2}\n"
        "    answer_style: restate\n    qa_types: [count, list]\n"
        "    qa_restate_existence: true\n    seed: 5\n")
    cfg = load_config(path)
    expected = dict(image_size=96, min_objects=3, max_objects=4, min_radius=0.1,
                    max_radius=0.12, min_visible=0.5, train_size=7, val_size=3, test_size=2,
                    queries_per_image=2, difficulty_weights=(("multi", 1.0),),
                    train_difficulty_weights=(("negative", 2.0),), answer_style="restate",
                    qa_types=("count", "list"), qa_restate_existence=True, seed=5)
    assert {f.name for f in dataclasses.fields(ShapesConfig)} == set(expected)
    assert {k: getattr(cfg.data.shapes, k) for k in expected} == expected
    records = build_dataset("shapes", cfg.data, "val")
    assert len(records) == 3
    sample = records[0]
    assert sample.image.size == (96, 96)
    assert all(ref.difficulty == "multi" for ref in sample.referents)
    assert len(sample.referents) == 2


@pytest.mark.parametrize(("spelling", "canonical"), [
    ("fp32", "fp32"), ("float32", "fp32"), ("torch.float32", "fp32"), ("bf16", "bf16"),
    ("bfloat16", "bf16"), ("BF16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"),
    ("auto", "auto"),
])
def test_one_dtype_spelling_accepts_short_and_torch_names(spelling, canonical):
    from keyseg.config import dtype_name

    assert dtype_name(spelling) == canonical


def test_unknown_dtype_is_a_config_error():
    from keyseg.config import dtype_name

    with pytest.raises(KeySegConfigError, match="unknown dtype 'fp8'"):
        dtype_name("fp8")


def test_train_precision_reads_torch_names_and_saves_the_short_one(tmp_path):
    cfg = load_config(TINY, ["train.precision=bfloat16"])
    assert cfg.train.precision == "bf16"
    save_config(cfg, tmp_path / "c.yaml")
    assert "precision: bf16" in (tmp_path / "c.yaml").read_text()


def test_name_tables_match_the_modules_that_implement_them():
    from keyseg.config import (
        DATASET_NAMES,
        LOCAL_VLM_PRESETS,
        REFER_NAMES,
        SAM_PRESET_NAMES,
        SHAPES_DIFFICULTIES,
        TRAINABLE_COMPONENTS,
    )
    from keyseg.data.refer import REFER_DATASETS
    from keyseg.data.shapes import DIFFICULTIES
    from keyseg.model import qwen, sam, sam2, tiny, trainable

    assert set(SAM_PRESET_NAMES["sam"]) == set(sam.SAM_PRESETS)
    assert set(SAM_PRESET_NAMES["sam2"]) == set(sam2.SAM2_PRESETS)
    assert set(LOCAL_VLM_PRESETS["llava"]) == set(tiny.VLM_PRESETS)
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        assert set(LOCAL_VLM_PRESETS[family]) == set(qwen.QWEN_PRESETS)
    assert set(TRAINABLE_COMPONENTS) == set(trainable.COMPONENTS)
    assert set(REFER_NAMES) == set(REFER_DATASETS)
    assert set(DIFFICULTIES) == set(SHAPES_DIFFICULTIES)
    assert set(DATASET_NAMES) == {"reason_seg", "refer_seg", "shapes", "shapes_qa"}


@pytest.mark.parametrize("module", ["keyseg.config", "keyseg.schema"])
def test_config_modules_import_no_torch(module):
    import ast
    import importlib

    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"torch", "transformers", "numpy"}, imported


def test_every_config_field_has_a_docstring():
    import ast
    import dataclasses
    import itertools

    import keyseg.config as config

    tree = ast.parse(Path(config.__file__).read_text())
    documented = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            documented[node.name] = {
                stmt.target.id for stmt, nxt in itertools.pairwise(body)
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)}
    classes = [c for c in vars(config).values() if isinstance(c, type)
               and dataclasses.is_dataclass(c) and issubclass(c, config.Checked)]
    assert len(classes) >= 10
    for cls in classes:
        missing = {f.name for f in dataclasses.fields(cls)} - documented[cls.__name__]
        assert not missing, (cls.__name__, missing)
