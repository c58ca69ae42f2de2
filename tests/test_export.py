"""``keyseg export``: LoRA merge round trip and self-contained directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from keyseg.cli import main as cli_main
from keyseg.errors import KeySegCheckpointError
from keyseg.export import export_model
from keyseg.model.keyseg import KeySegModel


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA model after a few AdamW steps (its LoRA B matrices are no longer zero, so
    an export that dropped the adapters would change the outputs), and a run directory."""
    import random

    from helpers import make_record
    from keyseg.build import build_tiny_model
    from keyseg.data.collate import Collator, record_to_example

    model = build_tiny_model(seed=3, lora=True)
    example = record_to_example(make_record(seed=0), random.Random(0),
                                use_keyword=model.settings.use_keyword)
    batch = Collator(model.processor, mode="train")([example])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    model.eval()
    return model, tmp_path_factory.mktemp("run")


def _lora_b(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model.backbone(batch.input_ids, batch.attention_mask, batch.vision_inputs)
        masks = model.predict(batch)
    return out.logits, masks


@pytest.mark.slow
def test_merged_export_reproduces_the_unmerged_model(trained, make_batch):
    model, run_dir = trained
    batch = make_batch(model)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # LoRA really trained
    logits, masks = _outputs(model, batch)
    model.save_pretrained(run_dir / "final")

    dst = run_dir.parent / "exported"
    assert cli_main(["export", str(run_dir), str(dst), "--merge-lora",
                     "--max-shard-size", "0.0005"]) == 0
    # self-contained: move it away from the run and load it with nothing else around
    moved = run_dir.parent / "elsewhere" / "model"
    shutil.copytree(dst, moved)
    shutil.rmtree(dst)
    index = json.loads((moved / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    meta = json.loads((moved / "config.json").read_text())
    assert meta["lora_applied"] is False
    assert json.loads((moved / "export.json").read_text())["merged_lora_layers"] == 4

    loaded = KeySegModel.from_pretrained(moved)
    assert not hasattr(loaded.backbone.vlm, "peft_config")
    assert not any("lora_" in n for n in loaded.state_dict())
    logits2, masks2 = _outputs(loaded, batch)
    # (W + s·BA)x and Wx + s·B(Ax) round differently in fp32: a few ulps, relative to the
    # values (mask logits reach ~16, where 1e-5 absolute is 5 ulps)
    torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(masks2, masks, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unmerged_export_keeps_adapters_and_loads(trained, make_batch, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "m")
    result = export_model(tmp_path / "m", tmp_path / "out")
    assert result.merged_lora == 0 and result.shards == 1
    loaded = KeySegModel.from_pretrained(tmp_path / "out")
    assert hasattr(loaded.backbone.vlm, "peft_config")
    original, again = _lora_b(model), _lora_b(loaded)
    assert original and any(float(t.abs().max()) > 0 for t in original.values())
    assert set(again) == set(original)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
    batch = make_batch(model)
    for a, b in zip(_outputs(loaded, batch)[1], _outputs(model, batch)[1], strict=True):
        torch.testing.assert_close(a, b)


def test_export_of_a_directory_that_is_no_model_is_a_clear_error(tmp_path):
    with pytest.raises(KeySegCheckpointError, match="neither a KeySeg model directory"):
        export_model(tmp_path, tmp_path / "out")


def test_single_file_model_directory_still_loads(trained, make_batch, tmp_path):
    """Directories written before sharding (one model.safetensors) keep loading."""
    from safetensors.torch import load_file, save_file

    model, _ = trained
    model.save_pretrained(tmp_path / "m", max_shard_bytes=1_000_000)
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1
    state = {}
    for shard in shards:
        state.update(load_file(str(shard)))
        shard.unlink()
    (tmp_path / "m" / "model.safetensors.index.json").unlink()
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    loaded = KeySegModel.from_pretrained(tmp_path / "m")
    batch = make_batch(model)
    for a, b in zip(_outputs(loaded, batch)[1], _outputs(model, batch)[1], strict=True):
        torch.testing.assert_close(a, b)


def _run_with_weights(model, run_dir):
    """A run directory: final/ plus best/ and two step checkpoints whose trainable weights
    differ from final/ by a known constant each."""
    from safetensors.torch import save_file

    model.save_pretrained(run_dir / "final")
    name = "embedding_table_proj.weight"
    base = model.state_dict()[name]
    files = {"best": run_dir / "best", "step-0000009": run_dir / "checkpoints" / "step-0000009",
             "step-0000010": run_dir / "checkpoints" / "step-0000010",
             "file": run_dir / "elsewhere"}
    shifts = {"best": 1.0, "step-0000009": 2.0, "step-0000010": 3.0, "file": 4.0}
    for key, folder in files.items():
        folder.mkdir(parents=True)
        save_file({name: (base + shifts[key]).contiguous()},
                  str(folder / "trainable.safetensors"))
    return name, base, shifts


@pytest.mark.parametrize(("weights", "shift"),
                         [(None, 0.0), ("best", 1.0), ("latest", 3.0), ("file", 4.0)])
def test_export_weights_choice_lays_those_weights_over_final(trained, tmp_path, weights,
                                                             shift):
    from safetensors.torch import load_file

    model, _ = trained
    run = tmp_path / "run"
    name, base, _ = _run_with_weights(model, run)
    argv = ["export", str(run), str(tmp_path / "out")]
    if weights == "file":
        argv += ["--weights", str(run / "elsewhere" / "trainable.safetensors")]
    elif weights is not None:
        argv += ["--weights", weights]
    assert cli_main(argv) == 0
    state = {}
    for shard in (tmp_path / "out").glob("model*.safetensors"):
        state.update(load_file(str(shard)))
    torch.testing.assert_close(state[name], base + shift, rtol=0, atol=0)
    assert json.loads((tmp_path / "out" / "export.json").read_text())["weights"] == (
        str(run / "elsewhere" / "trainable.safetensors") if weights == "file" else weights)


def test_export_weights_errors_name_what_is_missing(trained, tmp_path, capsys):
    model, _ = trained
    run = tmp_path / "run"
    model.save_pretrained(run / "final")
    assert cli_main(["export", str(run), str(tmp_path / "o1"), "--weights", "best"]) == 2
    assert "best/trainable.safetensors: trainable weights not found" in capsys.readouterr().err
    assert cli_main(["export", str(run), str(tmp_path / "o2"), "--weights", "latest"]) == 2
    assert "no step checkpoint" in capsys.readouterr().err
    (run / "bad.safetensors").write_text("garbage")
    assert cli_main(["export", str(run), str(tmp_path / "o3"), "--weights",
                     str(run / "bad.safetensors")]) == 2
    assert "bad.safetensors: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("fp32", torch.float32)])
def test_export_dtype_casts_the_written_weights(trained, tmp_path, flag, dtype):
    from safetensors.torch import load_file

    model, _ = trained
    model.save_pretrained(tmp_path / "m")
    assert cli_main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--dtype",
                     flag]) == 0
    floats = {t.dtype for shard in (tmp_path / "out").glob("model*.safetensors")
              for t in load_file(str(shard)).values() if t.is_floating_point()}
    assert floats == {dtype}
    assert json.loads((tmp_path / "out" / "export.json").read_text())["dtype"] == (
        str(dtype).removeprefix("torch."))
    loaded = KeySegModel.from_pretrained(tmp_path / "out")
    name = "embedding_table_proj.weight"
    torch.testing.assert_close(loaded.state_dict()[name].to(dtype),
                               model.state_dict()[name].to(dtype), rtol=0, atol=0)
