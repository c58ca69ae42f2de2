"""EvalConfig: every ranged setting checked with its name, the rows it decides, and
run_evaluation / `keyseg eval` built from it."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import make_record
from keyseg.cli import build_parser
from keyseg.cli import main as cli_main
from keyseg.commands import evaluate as command
from keyseg.config import EvalConfig, from_dict, to_dict
from keyseg.errors import KeySegConfigError
from keyseg.evaluate import run_evaluation


@pytest.mark.parametrize(("name", "bad", "fragment"), [
    ("mode", "sample", "evaluation mode 'sample'"),
    ("protocol", "lisa2", "evaluation protocol 'lisa2'"),
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("limit", -1, "limit must be >= 0, got -1"),
    ("max_new_tokens", -1, "max_new_tokens must be >= 0, got -1"),
    ("max_pixels", 0, "max_pixels must be >= 1, got 0"),
    ("keep_overlays", -2, "keep_overlays must be >= 0, got -2"),
])
def test_each_ranged_setting_refuses_a_bad_value_naming_it(name, bad, fragment):
    with pytest.raises(KeySegConfigError, match=fragment):
        EvalConfig(**{name: bad})


def test_every_problem_is_named_at_once():
    with pytest.raises(KeySegConfigError) as info:
        EvalConfig(batch_size=0, limit=-1, mode="x")
    message = str(info.value)
    assert "batch_size" in message and "limit" in message and "evaluation mode" in message


def test_yaml_round_trip_preserves_every_setting():
    config = EvalConfig(mode="generate", limit=3, protocol="lisa-bugs", max_pixels=10,
                        keep_overlays=2, progress=False)
    assert from_dict(EvalConfig, to_dict(config)) == config


def test_row_settings_are_every_field_but_the_presentation_ones():
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    rows = set(EvalConfig().row_settings())
    assert fields - rows == {"keep_overlays", "keep_per_sample", "progress"}
    assert EvalConfig(keep_overlays=3, progress=False).row_settings() == \
        EvalConfig().row_settings()


def test_keywords_replace_the_config_fields_and_unknown_ones_are_refused(tiny_model_factory):
    model = tiny_model_factory(seed=0)
    records = [make_record(seed=s) for s in range(3)]
    config = EvalConfig(limit=2, batch_size=2, progress=False)
    by_config = run_evaluation(model, records, config)
    by_keywords = run_evaluation(model, records, limit=2, batch_size=2, progress=False)
    overridden = run_evaluation(model, records, dataclasses.replace(config, batch_size=1),
                                batch_size=2)
    assert by_config.metrics == by_keywords.metrics == overridden.metrics
    assert by_config.metrics["records"] == 2
    with pytest.raises(TypeError, match="limits"):
        run_evaluation(model, records, limits=2)
    with pytest.raises(KeySegConfigError, match="batch_size"):
        run_evaluation(model, records, config, batch_size=0)


def test_every_eval_argument_is_placed_for_the_resume_fingerprint():
    args = build_parser().parse_args(["eval", "--dataset", "shapes:val"])
    parsed = {k for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}
    placed = set(command.CONFIG_ARGUMENTS) | command.RUN_ARGUMENTS | command.NOT_FINGERPRINTED
    assert parsed <= placed
    assert set(command.CONFIG_ARGUMENTS.values()) <= {f.name for f in
                                                       dataclasses.fields(EvalConfig)}


def test_eval_arguments_become_the_config_and_bad_ones_fail_before_opening_data(
        tmp_path, capsys):
    args = build_parser().parse_args(
        ["eval", "--dataset", "shapes:val", "--mode", "generate", "teacher", "--limit", "3",
         "--batch-size", "2", "--save-overlays", "1", "--no-progress", "--protocol",
         "lisa-bugs", "--max-pixels", "100", "--all-texts", "--max-new-tokens", "5"])
    assert command.eval_config(args) == EvalConfig(
        mode="generate", limit=3, batch_size=2, all_texts=True, max_new_tokens=5,
        protocol="lisa-bugs", max_pixels=100, keep_overlays=1, progress=False)
    assert command.eval_config(args, "teacher").mode == "teacher"

    out = tmp_path / "out"
    assert cli_main(["eval", "--dataset", "reason_seg:val", "--dataset-dir",
                     str(tmp_path / "missing"), "--limit", "-1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "limit must be >= 0, got -1" in err
    assert not out.exists()


def test_shapes_answer_style_feeds_restated_references_and_is_fingerprinted():
    """A model trained with data.shapes.answer_style restate is teacher-forced on its own
    wording (the reference answer is fed when its [SEG] count matches)."""
    from keyseg.data.eval_sets import resolve_eval_set

    parser = build_parser()
    plain = parser.parse_args(["eval", "--dataset", "shapes:test"])
    restated = parser.parse_args(["eval", "--dataset", "shapes:test",
                                  "--shapes-answer-style", "restate"])
    answers = {}
    for name, args in (("lisa", plain), ("restate", restated)):
        records = resolve_eval_set("shapes:test", data_config=command._data_config(args)).records
        answers[name] = [ref.answer for i in range(20) for ref in records[i].referents]
    assert len(answers["lisa"]) == len(answers["restate"]) >= 20
    singles = [(a, b) for a, b in zip(answers["lisa"], answers["restate"], strict=True)
               if a.count("[SEG]") == 1]
    assert singles and all(b.startswith(("The ", "Sure, the ")) for _, b in singles)
    assert any(a != b for a, b in singles)
    assert all(not a.startswith("The ") for a, _ in singles)

    def fingerprint(args):
        return command.run_fingerprint(args, command.eval_config(args), "float32", None, [])

    assert "shapes_answer_style" not in fingerprint(plain)  # older runs still resume
    assert fingerprint(restated)["shapes_answer_style"] == "restate"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--dataset", "shapes:test", "--shapes-answer-style", "x"])
    from keyseg.data.shapes.queries import ANSWER_STYLES

    for style in ANSWER_STYLES:  # every style the world writes can be evaluated
        assert parser.parse_args(["eval", "--dataset", "shapes:test", "--shapes-answer-style",
                                  style]).shapes_answer_style == style
