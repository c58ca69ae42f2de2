"""The Hugging Face Hub: model ids wherever a model directory is taken, publishing, model cards.

Everything goes through ``huggingface_hub``: ``snapshot_download`` resolves an id (with
``revision``, the HF cache, ``HF_HUB_OFFLINE`` and ``local_files_only``) to a local folder,
``HfApi`` creates repositories and uploads folders, ``ModelCard`` writes the card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from keyseg.errors import KeySegCheckpointError

LICENSE = "apache-2.0"
PIPELINE_TAG = "image-segmentation"
CARD_FILE = "README.md"
# What a KeySeg model folder holds; nothing else is fetched from a repository.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "README.md")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id ``org/name``: absolute, relative with ``./``/``../``,
    more than one ``/``, or a home path."""
    return (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def resolve_model_dir(name_or_path: str | os.PathLike, *, revision: str | None = None,
                      local_files_only: bool | None = None) -> Path:
    """A local folder holding the model ``name_or_path`` names.

    An existing directory is returned as it is; anything else that is not a path is a Hub id,
    downloaded into (or read from) the HF cache.

    Raises:
        KeySegCheckpointError: one line — a missing directory, an id not on the Hub, or an
            id not cached while offline.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if looks_like_path(name) or path.exists():
        raise KeySegCheckpointError(f"{name}: model directory not found")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = bool(local_files_only) or _offline()
    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=offline,
                                      allow_patterns=list(MODEL_FILES)))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "local_files_only is set"
        if not offline:
            why = "the Hub cannot be reached"
        raise KeySegCheckpointError(
            f"{name}: not in the Hugging Face cache and {why}: download it once with a "
            "network connection, or pass a local model directory") from None
    except RevisionNotFoundError:
        raise KeySegCheckpointError(f"{name}: revision {revision!r} not found on the Hub"
                                    ) from None
    except RepositoryNotFoundError:
        raise KeySegCheckpointError(
            f"{name}: no such model on the Hugging Face Hub (a private one needs "
            "`hf auth login`), and no such local directory") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise KeySegCheckpointError(
            f"{name}: cannot fetch from the Hub ({type(error).__name__}: {error})"
            .splitlines()[0]) from None


# --- model cards ----------------------------------------------------------------------------


def _base_models(settings) -> list[str]:
    name = settings.backbone.name_or_path
    return [name] if name and not looks_like_path(name) and not Path(name).exists() else []


def write_model_card(
    directory: str | os.PathLike,
    settings,
    *,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    report: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``README.md`` with Hub metadata (library_name, license, base models, datasets,
    pipeline tag, metrics from an evaluation report) and the training config.

    Args:
        directory: the model folder.
        settings: its :class:`~keyseg.config.ModelConfig`.
        report: a ``keyseg eval`` ``report.json`` (its splits' gIoU/cIoU become metrics).
        train_config: the run's config (``to_dict`` of :class:`~keyseg.config.KeySegConfig`).
    """
    import yaml
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    directory = Path(directory)
    results = _metrics(report) if report else []
    eval_results = [
        EvalResult(task_type=PIPELINE_TAG, dataset_type=r["split"].split(":")[0],
                   dataset_name=r["split"], dataset_split=r["split"].partition(":")[2] or None,
                   metric_type=metric, metric_value=round(r[metric], 4),
                   metric_name=f"{metric} ({r['mode']})")
        for r in results for metric in ("giou", "ciou")
    ]
    data = ModelCardData(
        library_name="keyseg", license=LICENSE, pipeline_tag=PIPELINE_TAG,
        base_model=(base_models if base_models is not None else _base_models(settings)) or None,
        datasets=datasets or None, tags=["reasoning-segmentation", "keyseg", "lisa", "sam"],
        metrics=["giou", "ciou"] if results else None,
        eval_results=eval_results or None, model_name=title or directory.name,
    )
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title or directory.name}", "",
        "A KeySeg model: a multimodal LLM that answers a question about an image and emits "
        "`[SEG]` (whose state prompts a SAM mask decoder) and `[KEY]` (the query's core concept, "
        "fused into `[SEG]`).", "",
        "```python",
        "from keyseg.pipeline import KeySegPipeline",
        "",
        f'pipe = KeySegPipeline.from_pretrained("{directory.name}")',
        'result = pipe("image.jpg", "What would you use to eat soup?")',
        "```", "",
        "## Architecture", "",
        f"- backbone: `{settings.backbone.family}` "
        f"({settings.backbone.name_or_path or settings.backbone.preset})",
        f"- SAM: `{settings.sam.preset}`; fusion: `{settings.fusion.variant}`; "
        f"[SEG]/[KEY] state: `{settings.backbone.hidden_state}`; "
        f"tokenisation convention: `{settings.backbone.convention}`",
    ]
    if results:
        lines += ["", "## Evaluation", "", "| split | mode | gIoU | cIoU | samples |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['split']} | {r['mode']} | {r['giou']:.4f} | {r['ciou']:.4f} | "
                  f"{r['count']} |" for r in results]
    if train_config:
        lines += ["", "## Training config", "", "```yaml",
                  yaml.safe_dump(train_config, sort_keys=False).rstrip(), "```"]
    card = ModelCard("\n".join(lines) + "\n")
    from keyseg.io import atomic_write_text

    atomic_write_text(directory / CARD_FILE, str(card))
    return directory / CARD_FILE


def _metrics(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{split, mode, giou, ciou, count}`` of a ``keyseg eval`` report."""
    rows = []
    for split, modes in (report.get("results") or {}).items():
        for mode, result in (modes or {}).items():
            if isinstance(result, dict) and "giou" in result and "ciou" in result:
                rows.append({"split": split, "mode": mode, "giou": float(result["giou"]),
                             "ciou": float(result["ciou"]),
                             "count": result.get("samples", result.get("n", ""))})
    return rows


def read_report(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The latest ``keyseg eval`` report saved in ``directory`` (``eval/report.json`` or
    ``report.json``), or None."""
    for candidate in (Path(directory) / "eval" / "report.json", Path(directory) / "report.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except ValueError:
                return None
    return None


# --- publishing -----------------------------------------------------------------------------


def push_folder(directory: str | os.PathLike, repo_id: str, *, private: bool = False,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload the model folder; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                                 repo_type="model", revision=revision,
                                 allow_patterns=list(MODEL_FILES),
                                 commit_message=commit_message or "Upload KeySeg model")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise KeySegCheckpointError(
            f"{repo_id}: upload failed ({type(error).__name__}: {error})".splitlines()[0]
        ) from None
    return str(getattr(info, "commit_url", info))
