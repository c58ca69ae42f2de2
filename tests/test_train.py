"""keyseg.train on the tiny config and the shapes data (CPU, fp32, seconds per run)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_record
from keyseg.config import ConfigProblems, load_config
from keyseg.data.mixture import MixtureSampler
from keyseg.data.sample import Referent
from keyseg.errors import KeySegConfigError, KeySegDataError, KeySegError
from keyseg.train import (
    WEIGHTS,
    Hooks,
    MicroBatches,
    build_model,
    build_optimizer,
    build_scheduler,
    list_checkpoints,
    lr_factor,
    main,
    trainable_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-test.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spinning costs ~3x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(output_dir: Path, *overrides: str):
    return load_config(TINY, [f"train.output_dir={output_dir}", *overrides])


# Run A: 2 epochs x 3 steps, a checkpoint every 3 steps, validation each epoch.
RUN_A = ("train.epochs=2", "train.steps_per_epoch=3", "train.save_every=3", "train.val_limit=2")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("train") / "a", *RUN_A)
    return main(cfg)


def test_tiny_run_lowers_loss_and_ends_with_checkpoint(run_a):
    losses = [h["loss"] for h in run_a.history]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2
    assert run_a.stopped == "finished" and run_a.state.step == 6
    last = run_a.last_checkpoint
    assert last.name == "step-0000006" and list_checkpoints(run_a.run_dir)[-1] == last
    for name in (WEIGHTS, "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        assert (last / name).is_file(), name
    state = json.loads((last / "state.json").read_text())
    assert state["state"]["step"] == 6 and state["data"]["next_step"] == 6
    # Run directory: resolved config, environment, logs, validation, export.
    run_dir = run_a.run_dir
    assert load_config(run_dir / "config.yaml") == tiny_config(run_dir, *RUN_A)
    assert json.loads((run_dir / "environment.json").read_text())["device"] == "cpu"
    assert list((run_dir / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("val" in r for r in rows) == 2 and sum("loss" in r for r in rows) == 6
    assert run_a.state.best_giou is not None and (run_dir / "best" / WEIGHTS).is_file()
    assert (run_dir / "final" / "config.json").is_file()


def test_checkpoint_pickles_load_with_weights_only(run_a):
    last = run_a.last_checkpoint
    rng = torch.load(last / "rng.pt", weights_only=True)
    assert isinstance(rng[0]["torch"], torch.Tensor) and "numpy" in rng[0]
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)
    assert optimizer["state"]  # AdamW moments exist


@pytest.mark.slow  # a fresh interpreter + two partial runs: ~25 s on a loaded 2-core machine
def test_resume_after_sigkill_matches_uninterrupted_run(run_a, tmp_path):
    """Run B is SIGKILLed right after its step-3 checkpoint, then resumed to step 6."""
    script = tmp_path / "killed_run.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from keyseg.config import load_config
        from keyseg.train import Hooks, main

        def kill(path, state):
            if state.step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        main(load_config(sys.argv[1], sys.argv[2:]), hooks=Hooks(after_checkpoint=kill))
    """))
    out = tmp_path / "b"
    args = [f"train.output_dir={out}", *RUN_A]
    proc = subprocess.run([sys.executable, str(script), str(TINY), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["step-0000003"]

    resumed = main(tiny_config(out, *RUN_A), resume="latest")
    assert resumed.state.step == 6 and len(resumed.history) == 3
    a = load_file(str(run_a.last_checkpoint / WEIGHTS))
    b = load_file(str(resumed.last_checkpoint / WEIGHTS))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in run_a.history[3:]], abs=1e-6)
    assert resumed.state.best_giou == pytest.approx(run_a.state.best_giou)


def test_existing_run_needs_resume_flag(run_a):
    cfg = tiny_config(run_a.run_dir, *RUN_A)
    with pytest.raises(KeySegConfigError, match="--resume latest"):
        main(cfg)


def test_trainable_set_receives_gradients(tmp_path):
    from accelerate import Accelerator

    from keyseg.model.trainable import parameter_components

    cfg = tiny_config(tmp_path, "train.gradient_checkpointing=true")
    model = build_model(cfg, Accelerator(cpu=True))
    model.train()
    batches = MicroBatches(_mixture(cfg), model.processor, cfg)
    model(batches.build(0).batch).loss.backward()
    owners = parameter_components(model)
    got: dict[str, bool] = {}
    for name, param in model.named_parameters():
        has_grad = param.grad is not None and bool(param.grad.abs().sum() > 0)
        got[owners[name]] = got.get(owners[name], False) or has_grad
    learning = ("fusion", "table_projection", "text_hidden_fcs", "sam_mask_decoder", "lora",
                "lm_head", "embed_tokens")
    frozen = ("sam_image_encoder", "sam_prompt_encoder", "vision_tower", "mm_projector",
              "language_model")
    assert all(got[c] for c in learning), got
    assert not any(got[c] for c in frozen), got
    assert {n for n, _ in trainable_parameters(model)} == {
        n for n, c in owners.items() if c in learning}


def test_lr_scale_trains_a_component_at_its_own_rate(tmp_path):
    """train.lr_scale: the scaled component's parameters sit in their own group at lr x
    scale, on the same schedule; AdamW's first step moves each parameter by about its
    group's lr, so the scaled component moves ~10x less than the rest."""
    from accelerate import Accelerator

    from keyseg.model.trainable import parameter_components

    cfg = tiny_config(tmp_path, "train.lr_scale={lora: 0.1}", "train.warmup_steps=0",
                      "train.weight_decay=0")
    model = build_model(cfg, Accelerator(cpu=True))
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    owners = parameter_components(model)
    named = dict(trainable_parameters(model))
    ids = {id(p): n for n, p in named.items()}
    groups = [(g["lr"], {owners[ids[id(p)]] for p in g["params"]})
              for g in optimizer.param_groups]
    assert groups[0][0] == pytest.approx(1e-3) and "lora" not in groups[0][1]
    assert groups[1] == (pytest.approx(1e-4), {"lora"})
    before = {n: p.detach().clone() for n, p in named.items()}
    model.train()
    batches = MicroBatches(_mixture(cfg), model.processor, cfg)
    model(batches.build(0).batch).loss.backward()
    optimizer.step()
    scheduler.step()
    moved: dict[str, list[float]] = {}
    for name, param in named.items():
        delta = (param.detach() - before[name]).abs()
        moved.setdefault(owners[name], []).append(float(delta.max()))
    assert 0.05e-3 < max(moved["lora"]) <= 1.01e-4
    assert max(moved["fusion"]) > 0.5e-3
    total = cfg.train.epochs * cfg.train.steps_per_epoch
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [1e-3 * lr_factor(1, 0, total, cfg.train.lr_schedule) * s for s in (1.0, 0.1)])


def test_lr_scale_names_trainable_components_once(tmp_path):
    with pytest.raises(ConfigProblems, match=r"train\.lr_scale: 'vision_tower' is not in "
                                             r"model\.trainable"):
        tiny_config(tmp_path, "train.lr_scale={vision_tower: 0.1}")
    with pytest.raises(ConfigProblems, match="'lora' is named twice"):
        tiny_config(tmp_path, "train.lr_scale=[[lora, 0.1], [lora, 0.2]]")
    with pytest.raises(ConfigProblems, match=r"train\.lr_scale\[0\]\[1\]"):
        tiny_config(tmp_path, "train.lr_scale={lora: 0}")


def _mixture(cfg, datasets=None):
    from keyseg.data.datasets import build_mixture

    if datasets is None:
        return build_mixture(cfg.data, seed=cfg.train.seed)
    return MixtureSampler(datasets, dict.fromkeys(datasets, 1.0), seed=0, max_referents=None)


class _Flaky(list):
    """Records; index 1 fails to load (as an unreadable image would)."""

    def __getitem__(self, index):
        if index == 1:
            raise KeySegDataError("broken.jpg: cannot decode image")
        return super().__getitem__(index)


def test_bad_samples_are_skipped_and_counted(tiny_model):
    good = make_record(seed=1)
    bad = make_record(seed=2)  # answer with two [SEG] for one mask -> collate error
    bad.referents = [Referent("x", False, bad.referents[0].masks, keyword="x",
                              answer="[SEG] and [SEG].")]
    cfg = tiny_config(Path("unused"), "train.batch_size=4")
    batches = MicroBatches(_mixture(cfg, {"d": _Flaky([good, bad, good])}),
                           tiny_model.processor, cfg)
    seen_bad = seen_rows = 0
    for index in range(6):
        micro = batches.build(index)
        seen_bad += micro.bad_samples
        seen_rows += len(micro.batch)
        assert all(sid.startswith("fixture/img1") for sid in micro.batch.sample_ids)
    assert seen_bad > 0 and seen_rows + seen_bad >= 6 * 4


def test_micro_batches_are_a_pure_function_of_position(tmp_path):
    from keyseg.build import build_tiny_model

    cfg = tiny_config(tmp_path)
    model = build_tiny_model(0)
    first = MicroBatches(_mixture(cfg), model.processor, cfg)
    again = MicroBatches(_mixture(cfg), model.processor, cfg)
    a, b = first.build(5).batch, again.build(5).batch
    assert torch.equal(a.input_ids, b.input_ids) and a.sample_ids == b.sample_ids
    other = MicroBatches(_mixture(cfg), model.processor, cfg, rank=1, world=2)
    assert other.build(5).batch.sample_ids != a.sample_ids


def test_nonfinite_loss_skips_the_step_and_counts_it(tmp_path, monkeypatch):
    from keyseg.model.keyseg import KeySegModel

    original = KeySegModel.forward
    calls = {"n": 0}

    def forward(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(KeySegModel, "forward", forward)
    stepped = []
    cfg = tiny_config(tmp_path / "run", "train.epochs=1", "train.steps_per_epoch=3",
                      "train.validate_every_epoch=false")
    result = main(cfg, hooks=Hooks(before_optimizer_step=lambda m, s: stepped.append(s.step)))
    assert result.state.nonfinite_skipped == 1 and result.state.consecutive_nonfinite == 0
    assert [h["skipped"] for h in result.history] == [0.0, 1.0, 0.0]
    assert stepped == [0, 2]  # no optimizer step for the second step
    assert result.state.step == 3


def test_consecutive_nonfinite_losses_abort_with_clear_message(tmp_path):
    cfg = tiny_config(tmp_path / "run", "model.loss.ce_weight=nan",
                      "train.max_consecutive_nonfinite=2", "train.validate_every_epoch=false")
    with pytest.raises(KeySegError, match="2 consecutive steps with a non-finite loss"):
        main(cfg)


def test_learning_rate_schedule_warms_up_then_decays():
    assert lr_factor(0, 4, 20, "linear") == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, "linear") == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "linear") == 0.0
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(19, 4, 20, "constant") == 1.0


def test_unknown_validation_dataset_is_a_config_error(tmp_path):
    from keyseg.data.datasets import build_val_records

    with pytest.raises(KeySegConfigError, match=r"data\.val_dataset"):  # now at load
        build_val_records(tiny_config(tmp_path, "data.val_dataset=coco:val").data)
    assert build_val_records(tiny_config(tmp_path, "data.val_dataset=none").data) is None


def test_cli_train_runs_tiny_config(tmp_path, capsys):
    from keyseg.cli import main as cli_main

    out = tmp_path / "cli"
    code = cli_main(["train", "--config", str(TINY), f"train.output_dir={out}",
                     "train.epochs=1", "train.steps_per_epoch=1",
                     "train.validate_every_epoch=false"])
    assert code == 0
    assert "finished at step 1" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out)] == ["step-0000001"]


def test_training_starts_from_a_saved_model_directory(run_a, tmp_path):
    cfg = tiny_config(tmp_path / "run", f"train.init_from={run_a.run_dir / 'final'}",
                      "train.lr=0", "train.epochs=1", "train.steps_per_epoch=1",
                      "train.validate_every_epoch=false")
    result = main(cfg)
    start = load_file(str(run_a.last_checkpoint / WEIGHTS))
    after = load_file(str(result.last_checkpoint / WEIGHTS))
    assert start.keys() == after.keys()
    assert all(torch.equal(start[k], after[k]) for k in start)  # lr 0: the loaded weights


def test_init_from_with_a_fixed_key_changed_stops_before_training(run_a, tmp_path, capsys):
    from keyseg.cli import main as cli_main

    out = tmp_path / "conflict"
    code = cli_main(["train", "--config", str(TINY), f"train.output_dir={out}",
                     f"train.init_from={run_a.run_dir / 'final'}", "model.sam.preset=shapes",
                     "train.epochs=1", "train.steps_per_epoch=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if not line.startswith("Loading weights")]
    assert len(errors) == 1 and "model.sam.preset" in errors[0] and "'shapes'" in errors[0]
    assert not out.exists() or not list_checkpoints(out)


def test_init_from_with_an_adjustable_key_builds_the_requested_model(run_a, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", f"train.init_from={run_a.run_dir / 'final'}",
                      "model.fusion.variant=residual", "train.epochs=1",
                      "train.steps_per_epoch=1", "train.validate_every_epoch=false")
    result = main(cfg)
    assert "model.fusion.variant: 'reference'" in capsys.readouterr().out
    saved = load_file(str(result.last_checkpoint / WEIGHTS))
    assert any(name.startswith("keyword_fusion.norm_mlp.") for name in saved)


def test_sanity_validation_runs_two_batches_before_step_one(tmp_path, monkeypatch):
    from keyseg.train import loop

    events = []
    original = loop.run_evaluation

    def recorded(model, records, config, **kwargs):
        events.append(("validate", config.limit, config.mode, model.training))
        torch.rand(1)  # an evaluation path that draws from the global RNG (sampling, workers)
        return original(model, records, config, **kwargs)

    monkeypatch.setattr(loop, "run_evaluation", recorded)
    hooks = Hooks(before_optimizer_step=lambda model, state: events.append(("step", state.step)))
    common = ("train.epochs=1", "train.steps_per_epoch=2", "train.val_limit=3")
    checked = main(tiny_config(tmp_path / "checked", *common), hooks=hooks)
    assert events == [("validate", 2, "teacher", False), ("step", 0), ("step", 1),
                      ("validate", 3, "teacher", False)]

    # No validation set, no sanity check; and the check left training as it found it.
    events.clear()
    plain = main(tiny_config(tmp_path / "plain", *common, "train.validate_every_epoch=false"),
                 hooks=hooks)
    assert events == [("step", 0), ("step", 1)]
    a = load_file(str(checked.last_checkpoint / WEIGHTS))
    b = load_file(str(plain.last_checkpoint / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_mode_validation_scores_generated_answers(tmp_path, monkeypatch, capsys):
    from keyseg.train import loop

    modes = []
    original = loop.run_evaluation

    def recorded(model, records, config, **kwargs):
        modes.append((config.limit, config.mode))
        return original(model, records, config, **kwargs)

    monkeypatch.setattr(loop, "run_evaluation", recorded)
    result = main(tiny_config(tmp_path / "gen", "train.epochs=1", "train.steps_per_epoch=2",
                              "train.val_limit=2", "train.val_mode=generate"))
    # The sanity check and the epoch's validation both decode, as users' answers are made.
    assert modes == [(2, "generate"), (2, "generate")]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text()
            .splitlines()]
    val = [r for r in rows if "val" in r]
    assert len(val) == 1 and val[0]["val_mode"] == "generate"
    assert 0.0 <= val[0]["val"]["giou"] <= 1.0
    assert "step 2 (generate): gIoU" in capsys.readouterr().out


def test_loss_terms_are_logged_every_log_every_steps(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.epochs=1", "train.steps_per_epoch=5",
                      "train.log_every=2", "train.validate_every_epoch=false")
    result = main(cfg)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [row for row in map(json.loads, lines) if "loss" in row]
    assert [(r["step"], r["steps"]) for r in rows] == [(2, 2), (4, 2), (5, 1)]  # and the last
    assert len(result.history) == 5  # every step keeps its own terms
    windows = (result.history[0:2], result.history[2:4], result.history[4:])
    for row, window in zip(rows, windows, strict=True):
        for term in ("loss", "ce", "bce", "dice", "key"):
            assert row[term] == pytest.approx(np.mean([h[term] for h in window]), abs=1e-6)
        assert row["lr"] == window[-1]["lr"]


def test_a_logged_line_averages_the_finite_steps_and_counts_the_skipped():
    from keyseg.train.logger import summarise

    step = {"loss": 2.0, "ce": 1.0, "bce": 0.5, "dice": 0.5, "key": 0.0, "lr": 1e-3,
            "grad_norm": 3.0, "skipped": 0.0, "samples_per_s": 4.0, "tokens_per_s": 40.0}
    bad = {**step, "loss": float("nan"), "grad_norm": float("inf"), "skipped": 1.0, "lr": 2e-3}
    line = summarise([{**step, "loss": 4.0}, bad, step])
    assert line["loss"] == 3.0 and line["grad_norm"] == 3.0 and line["ce"] == 1.0
    assert line["skipped"] == 1.0 and line["lr"] == 1e-3
    assert np.isnan(summarise([bad])["loss"])

class _DeepSpeedAccelerator:
    """The Accelerator surface save/load_checkpoint use, with a DeepSpeed plugin set: ZeRO
    state is written by ``save_state`` (a shard file here) and read by ``load_state``."""

    num_processes, is_main_process, process_index, scaler = 1, True, 0, None

    def __init__(self):
        import types

        self.state = types.SimpleNamespace(deepspeed_plugin=object())
        self.saved, self.loaded = [], []

    def save_state(self, directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "zero_shard_0.pt").write_text("optimizer shard")
        self.saved.append(Path(directory))

    def load_state(self, directory):
        self.loaded.append(Path(directory))

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model

    def print(self, *args):
        pass


def test_deepspeed_checkpoint_keeps_the_sharded_state_and_resumes_from_it(tmp_path,
                                                                          monkeypatch):
    """The code up to DeepSpeed's engine: the sharded optimizer goes into step-N/deepspeed/
    (no optimizer.pt), and resuming hands that folder back to ``accelerator.load_state``
    while the trainable weights, scheduler and progress come from the checkpoint files."""
    from keyseg.build import build_tiny_model
    from keyseg.train import (
        TrainState,
        build_optimizer,
        build_scheduler,
        load_checkpoint,
        save_checkpoint,
    )

    cfg = tiny_config(tmp_path)
    model = build_tiny_model(0, lora=True)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    for _ in range(3):
        optimizer.step()  # no gradients: nothing moves, the schedule advances
        scheduler.step()
    batches = MicroBatches(_mixture(cfg), model.processor, cfg)
    accelerator = _DeepSpeedAccelerator()
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, step=3, epoch=1,
                       samples_seen=12)
    path = save_checkpoint(accelerator, state, batches, tmp_path, keep_last=2)
    assert path.name == "step-0000003"
    assert (path / "deepspeed" / "zero_shard_0.pt").read_text() == "optimizer shard"
    assert not (path / "optimizer.pt").exists()
    assert {p.name for p in path.iterdir()} >= {WEIGHTS, "scheduler.pt", "rng.pt",
                                                "state.json", "deepspeed"}
    assert not any(p.name.startswith(".deepspeed") for p in path.parent.iterdir())

    fresh = build_tiny_model(1, lora=True)
    fresh_optimizer = build_optimizer(fresh, cfg.train)
    fresh_scheduler = build_scheduler(fresh_optimizer, cfg.train)
    monkeypatch.setattr(fresh_optimizer, "load_state_dict",
                        lambda _: pytest.fail("the optimizer comes from the DeepSpeed state"))
    resumed = load_checkpoint(path, accelerator, TrainState(
        model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler), cfg)
    assert accelerator.loaded == [path / "deepspeed"]
    assert resumed.step == 3 and resumed.epoch == 1 and resumed.samples_seen == 12
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 3
    own = dict(trainable_parameters(model))
    for name, param in trainable_parameters(fresh):
        assert torch.equal(param, own[name]), name


def test_export_of_a_stopped_run_rebuilds_what_final_holds(run_a, tmp_path):
    """A run killed before ``final/`` still exports: the model is rebuilt from config.yaml
    (random frozen parts included) and the checkpoint laid over it; the result equals the
    final/ the finished run saved itself."""
    import shutil

    from keyseg.errors import KeySegCheckpointError
    from keyseg.export import export_model
    from keyseg.model.keyseg import KeySegModel

    stopped = tmp_path / "stopped"
    shutil.copytree(run_a.run_dir, stopped, ignore=shutil.ignore_patterns("final"))
    # The tiny config keeps SAM's random image encoder frozen: the rebuild's seed matters.
    assert "sam_image_encoder" not in load_config(stopped / "config.yaml").model.trainable
    with pytest.raises(KeySegCheckpointError, match="stopped before writing final/"):
        export_model(stopped, tmp_path / "none")
    export_model(stopped, tmp_path / "out", weights="latest")
    expected = KeySegModel.from_pretrained(run_a.run_dir / "final").state_dict()
    got = KeySegModel.from_pretrained(tmp_path / "out").state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
