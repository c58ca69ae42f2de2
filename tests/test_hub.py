"""Hub ids, the HF cache, offline mode, publishing and model cards, without a network.

The cache is laid out by hand in huggingface_hub's documented layout
(``models--ORG--NAME/{refs/main, snapshots/COMMIT/...}``); uploads go to a local stand-in
for ``HfApi`` that copies what would be sent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch

from keyseg.build import build_keyseg, build_tiny_model
from keyseg.cli import main as cli_main
from keyseg.errors import KeySegCheckpointError
from keyseg.hub import resolve_model_dir
from keyseg.model.keyseg import KeySegModel

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub") / "tiny"
    model = build_tiny_model(seed=0).eval()
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, saved):
    """An HF cache holding ``keyseg-test/tiny`` at :data:`COMMIT`, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--keyseg-test--tiny"
    shutil.copytree(saved[1], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cached_hub_id_loads_offline(hub_cache, saved, make_batch):
    model, _ = saved
    loaded = KeySegModel.from_pretrained("keyseg-test/tiny").eval()
    assert resolve_model_dir("keyseg-test/tiny") == hub_cache / (
        "models--keyseg-test--tiny/snapshots/" + COMMIT)
    batch = make_batch(model)
    for a, b in zip(model.predict(batch), loaded.predict(batch), strict=True):
        torch.testing.assert_close(a, b)


def test_segment_takes_a_hub_id(hub_cache, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    code = cli_main(["segment", str(image), "the red square", "--checkpoint",
                     "keyseg-test/tiny", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    assert (tmp_path / "out" / "result.json").is_file()


def test_an_absent_id_offline_is_one_line(hub_cache, tmp_path, capsys):
    from PIL import Image

    with pytest.raises(KeySegCheckpointError) as error:
        resolve_model_dir("keyseg-test/absent")
    message = str(error.value)
    assert "keyseg-test/absent" in message and "not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code = cli_main(["segment", str(tmp_path / "x.png"), "q", "--checkpoint",
                     "keyseg-test/absent", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(err) == 1 and "keyseg-test/absent" in err[0]


def test_a_missing_local_path_is_named_not_looked_up(tmp_path):
    with pytest.raises(KeySegCheckpointError, match="model directory not found"):
        resolve_model_dir(tmp_path / "nothing" / "here")
    with pytest.raises(KeySegCheckpointError, match="model directory not found"):
        resolve_model_dir("./not-here")


class LocalHub:
    """Stands in for ``huggingface_hub.HfApi``: records repositories, copies uploads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: list[dict] = []

    def create_repo(self, repo_id, *, private=False, exist_ok=False, repo_type=None, **_):
        self.created.append({"repo_id": repo_id, "private": private, "repo_type": repo_type})

    def upload_folder(self, *, folder_path, repo_id, allow_patterns=None, **_):
        target = self.root / repo_id
        for file in Path(folder_path).iterdir():
            if allow_patterns is None or any(fnmatch(file.name, p) for p in allow_patterns):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target / file.name)
        return f"https://hub.invalid/{repo_id}/commit/1"


def test_export_pushes_config_weights_processor_and_card(saved, tmp_path, monkeypatch):
    import huggingface_hub

    hub = LocalHub(tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: hub)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"results": {"reason_seg:val": {
        "teacher": {"giou": 0.5123, "ciou": 0.4567, "samples": 200, "n": 200}}}}))
    code = cli_main(["export", str(saved[1]), str(tmp_path / "out"), "--report", str(report),
                     "--push-to-hub", "my-org/keyseg-tiny", "--private"])
    assert code == 0
    assert hub.created == [{"repo_id": "my-org/keyseg-tiny", "private": True,
                            "repo_type": "model"}]
    sent = {p.name for p in (tmp_path / "remote" / "my-org" / "keyseg-tiny").iterdir()}
    assert {"config.json", "README.md", "keyseg_processor.json", "tokenizer.json",
            "preprocessor_config.json"} <= sent
    assert any(name.endswith(".safetensors") for name in sent)

    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "remote" / "my-org" / "keyseg-tiny" / "README.md")
    assert card.data.library_name == "keyseg" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-segmentation"
    values = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("reason_seg:val", "giou")] == pytest.approx(0.5123)
    assert values[("reason_seg:val", "ciou")] == pytest.approx(0.4567)


def test_private_without_push_is_refused(saved, tmp_path, capsys):
    code = cli_main(["export", str(saved[1]), str(tmp_path / "out"), "--private"])
    assert code == 2 and "--push-to-hub" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auto_classes_load_an_exported_directory_after_import_keyseg(saved):
    script = (
        "import sys, keyseg\n"
        "from transformers import AutoConfig, AutoModel\n"
        "config = AutoConfig.from_pretrained(sys.argv[1])\n"
        "model = AutoModel.from_pretrained(sys.argv[1])\n"
        "print(type(config).__name__, type(model).__name__, model.processor is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(saved[1])], capture_output=True,
                         text=True, check=True, timeout=300)
    assert out.stdout.split() == ["KeySegModelConfig", "KeySegModel", "True"]


def test_attn_implementation_in_the_config_reaches_the_language_model(tmp_path):
    from dataclasses import replace

    from keyseg.model.tiny import tiny_model_config

    base = tiny_model_config()
    config = replace(base, backbone=replace(base.backbone, attn_implementation="eager"))
    model = build_keyseg(config)
    language = model.backbone.language_model()
    assert language.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path / "m")
    loaded = KeySegModel.from_pretrained(tmp_path / "m")
    assert loaded.backbone.language_model().config._attn_implementation == "eager"
    assert loaded.sam.sam.config._attn_implementation != "eager"  # the VLM only
    chosen = KeySegModel.from_pretrained(tmp_path / "m", attn_implementation="sdpa")
    assert chosen.backbone.language_model().config._attn_implementation == "sdpa"


def test_a_directory_of_the_earlier_format_loads_as_it_was(saved, tmp_path, make_batch):
    """Before the transformers integration a directory's config.json was
    ``{"keyseg", "vlm", "sam", "lora_applied"}`` (no model_type), written with no
    tokenisation convention: it loads, as convention "v0"."""
    model, directory = saved
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    new = json.loads((old / "config.json").read_text())
    keyseg = dict(new["keyseg"])
    keyseg["backbone"] = {k: v for k, v in keyseg["backbone"].items()
                          if k not in ("convention", "attn_implementation")}
    (old / "config.json").write_text(json.dumps({
        "keyseg": keyseg, "vlm": new["vlm_config"], "sam": new["sam_config"],
        "lora_applied": False}))
    loaded = KeySegModel.from_pretrained(old).eval()
    assert loaded.settings.backbone.convention == "v0"
    assert loaded.config.model_type == "keyseg"
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in loaded.state_dict().items())
