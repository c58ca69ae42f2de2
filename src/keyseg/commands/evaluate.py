"""``keyseg eval``: gIoU / cIoU per split and protocol, a JSON report, per-sample JSONL, overlays.

Output layout (``--out DIR``)::

    DIR/run.json                                 the arguments the rows were made with
    DIR/report.json                              metrics per split and mode, counts, config,
                                                 checkpoint hash, versions, device, wall time
    DIR/samples/<name>_<split>_<mode>.jsonl      one line per scored query
    DIR/samples/.<that name>.part<R>             rows being streamed by process R
    DIR/overlays/<name>_<split>_<mode>/*.png     --save-overlays N: N worst and N best

Runs on one device, or on many with ``accelerate launch -m keyseg.cli eval ...`` (records
sharded by process, counts summed exactly, JSONL merged by the main process).

Resume: rerun the same command after a crash or kill; every split and mode continues from
the rows on disk and the report equals an uninterrupted run's. Other arguments with an
existing ``--out`` are refused (one line naming the first differences) unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keyseg.config import EvalConfig

from keyseg.commands import DTYPE_METAVAR, dtype_argument

HELP = "evaluate a checkpoint: gIoU/cIoU per split (teacher-forced or generated answers)"
EXAMPLE = ("keyseg eval --checkpoint checkpoints/keyseg-7b --dataset reason_seg:val "
           "--dataset refcoco:testA --mode teacher --dataset-dir ./dataset --out eval/run1")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="KeySeg model directory (default: the packaged default model)")
    parser.add_argument("--dataset", action="append", required=True, metavar="SPEC",
                        help="NAME:SPLIT, repeatable: reason_seg:val|test, refcoco:val|testA|"
                             "testB, refcoco+:..., refcocog:val|test, shapes:val|test")
    parser.add_argument("--mode", nargs="+", choices=["teacher", "generate"],
                        default=["teacher"],
                        help="protocol(s): teacher = LISA's fed '[SEG].' answer; generate = "
                             "the model answers (default: teacher)")
    parser.add_argument("--protocol", choices=["lisa", "lisa-bugs"], default="lisa",
                        help="lisa (default): LISA's validation inputs, LISA's bugs fixed; "
                             "lisa-bugs: also reproduce them (blank queries, a bare-string "
                             "text indexed by character, overlapping polygons summed and "
                             "dropped by the metric); see docs/EVALUATION.md")
    parser.add_argument("--shapes-answer-style",
                        choices=["lisa", "restate", "verdict", "asked", "asked_only"],
                        default="lisa",
                        help="shapes: the wording of the reference answers fed in teacher "
                             "mode, as the model was trained with data.shapes.answer_style "
                             "(default: lisa); generated answers are scored the same way "
                             "under every style")
    parser.add_argument("--dataset-dir", type=Path, default=Path("./dataset"),
                        help="dataset root holding reason_seg/ and refer_seg/ (default: "
                             "./dataset)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N records (images) of each split")
    parser.add_argument("--out", type=Path, default=Path("eval"),
                        help="output directory (default: ./eval)")
    parser.add_argument("--save-overlays", type=int, default=0, metavar="N",
                        help="save the N worst and N best overlays per split and mode")
    parser.add_argument("--all-texts", action="store_true",
                        help="ReasonSeg: score every text of a sample, not only text[0]")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="queries per forward pass (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="generation budget in generate mode (default: 64)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1, mps or auto (default; ignored under "
                             "accelerate launch)")
    parser.add_argument("--dtype", default="auto", type=dtype_argument, metavar=DTYPE_METAVAR,
                        help="weights dtype (auto: bf16 on CUDA, fp16 on a GPU without bf16 "
                             "support, else fp32)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="skip images larger than this (width*height, default 64 MP)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out that holds a run with other arguments "
                             "(default: same arguments resume it, others are refused)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from keyseg.data.check import totals_lines
    from keyseg.data.eval_sets import parse_spec, resolve_eval_set
    from keyseg.evaluate import format_issues, format_metrics, run_evaluation, save_overlays
    from keyseg.io import atomic_write_json
    from keyseg.runtime import resolve_device, resolve_dtype

    for spec in args.dataset:
        parse_spec(spec)  # fail fast on a typo, before opening anything
    settings = eval_config(args)  # checks the values, before opening anything

    started = time.perf_counter()
    # Open every split before loading the model: a missing folder fails in seconds.
    eval_sets = [resolve_eval_set(spec, args.dataset_dir, protocol=args.protocol,
                                  data_config=_data_config(args))
                 for spec in args.dataset]
    accelerator = _accelerator()
    device = accelerator.device if accelerator is not None else resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    is_main = accelerator is None or accelerator.is_main_process
    if is_main:
        for eval_set in eval_sets:
            for line in totals_lines(eval_set.records):
                print(f"data: {line}")
    folder = None
    if args.checkpoint is not None:
        from keyseg.hub import resolve_model_dir

        folder = resolve_model_dir(args.checkpoint)  # a Hub id -> its cached folder
    known = checkpoint_hash(folder) if folder is not None else None
    if known is not None:  # refuse a mismatched --out before loading a large model
        resume = prepare_out(args.out, run_fingerprint(args, settings, dtype, known["sha256"],
                                                       eval_sets), args.overwrite, accelerator)
    model, checkpoint = _load_model(folder, dtype, known, device)
    if known is None:
        resume = prepare_out(args.out, run_fingerprint(args, settings, dtype,
                                                       checkpoint["sha256"], eval_sets),
                             args.overwrite, accelerator)
    model.to(device)
    if resume and is_main:
        print(f"{args.out}: resuming (same arguments); rows already on disk are not scored "
              "again")
    resumed: dict[str, dict[str, int]] = {}

    results: dict[str, dict[str, Any]] = {}
    for eval_set in eval_sets:
        results[eval_set.spec] = {}
        for mode in args.mode:
            stem = f"{eval_set.name}_{eval_set.split}_{mode}".replace("+", "plus")
            jsonl = args.out / "samples" / f"{stem}.jsonl"
            result = run_evaluation(model, eval_set.records,
                                    dataclasses.replace(settings, mode=mode),
                                    accelerator=accelerator, jsonl_path=jsonl, resume=resume)
            resumed.setdefault(eval_set.spec, {})[mode] = result.resumed_rows
            entry = dict(result.metrics)
            entry["reader_skipped"] = eval_set.reader_skipped()
            entry["reader"] = eval_set.reader_counts()
            entry["skipped_messages"] = result.skipped_messages
            entry["jsonl"] = str(jsonl.relative_to(args.out))
            entry["wall_time_s"] = round(result.wall_time, 3)
            if args.save_overlays and is_main:
                folder = args.out / "overlays" / stem
                paths = save_overlays(result.overlays, eval_set.records, folder)
                entry["overlays"] = str(folder.relative_to(args.out)) if paths else None
            results[eval_set.spec][mode] = entry
            if is_main:
                note = (f"  ({result.resumed_rows} rows read back)" if result.resumed_rows
                        else "")
                print(f"{eval_set.spec} [{mode}]: {format_metrics(result.metrics)}{note}")
                data_line = format_issues(result.metrics["issues"], entry["reader"])
                if data_line:
                    print(f"  {data_line}")

    if is_main:
        report = {
            "results": results,
            "checkpoint": checkpoint,
            "config": {
                "model": _model_config(model),
                "eval": {
                    "datasets": args.dataset, "modes": args.mode,
                    "dataset_dir": str(args.dataset_dir),
                    **{k: v for k, v in settings.row_settings().items() if k != "mode"},
                    "dtype": str(dtype),
                },
            },
            "versions": _versions(),
            "device": _device_description(device, accelerator),
            "wall_time_s": round(time.perf_counter() - started, 3),
            "resumed_rows": resumed,
        }
        atomic_write_json(args.out / "report.json", report)
        print(f"report: {args.out / 'report.json'}")
    return 0


# --------------------------------------------------------------------------- settings

#: ``keyseg eval`` argument -> the :class:`~keyseg.config.EvalConfig` field it sets (besides
#: ``mode``: one config per ``--mode``, and ``progress``: ``not --no-progress``).
CONFIG_ARGUMENTS: dict[str, str] = {
    "limit": "limit", "batch_size": "batch_size", "all_texts": "all_texts",
    "max_new_tokens": "max_new_tokens", "protocol": "protocol", "max_pixels": "max_pixels",
    "save_overlays": "keep_overlays",
}
#: Arguments that decide the rows besides the config's (:func:`run_fingerprint`).
RUN_ARGUMENTS = frozenset({"checkpoint", "dataset", "dataset_dir", "dtype", "mode",
                           "shapes_answer_style"})
#: Arguments that do not change a row, so a resume may change them.
NOT_FINGERPRINTED = frozenset({"out", "overwrite", "no_progress", "device", "debug",
                               "command"})


def eval_config(args: argparse.Namespace, mode: str | None = None) -> EvalConfig:
    """The :class:`~keyseg.config.EvalConfig` of the parsed arguments, in ``mode`` (default:
    the first ``--mode``).

    Raises:
        KeySegConfigError: a value out of range (naming the field).
    """
    from keyseg.config import EvalConfig

    return EvalConfig(mode=mode or args.mode[0], progress=not args.no_progress,
                      **{name: getattr(args, arg) for arg, name in CONFIG_ARGUMENTS.items()})


# --------------------------------------------------------------------------- resume

RUN_FILE = "run.json"
#: What ``keyseg eval`` writes under ``--out`` (all that ``--overwrite`` removes).
OUTPUTS = (RUN_FILE, "report.json", "samples", "overlays")


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _data_config(args: argparse.Namespace):
    """The :class:`~keyseg.config.DataConfig` the eval sets are read with: the default one,
    with the shapes world's answers worded as ``--shapes-answer-style`` says."""
    from keyseg.config import DataConfig, ShapesConfig

    return DataConfig(shapes=ShapesConfig(answer_style=args.shapes_answer_style))


def run_fingerprint(args: argparse.Namespace, settings: EvalConfig, dtype,
                    checkpoint_sha256: str | None, eval_sets) -> dict[str, Any]:
    """The settings that decide the rows: the config's
    (:meth:`~keyseg.config.EvalConfig.row_settings`, so fields added later count by
    default) but its one ``mode``, and the run's (:data:`RUN_ARGUMENTS`): the datasets and
    modes asked for, the resolved dataset folder and dtype, the weights' sha256 (the path
    when there are no weight files), plus the number of records of each split (a dataset
    that changed is not resumed).

    Every parsed argument must be one of :data:`CONFIG_ARGUMENTS`, :data:`RUN_ARGUMENTS`
    or :data:`NOT_FINGERPRINTED` (asserted: an argument added later is placed on purpose).
    """
    parsed = {key for key, value in vars(args).items()
              if not key.startswith("_") and not callable(value)}
    unplaced = parsed - set(CONFIG_ARGUMENTS) - RUN_ARGUMENTS - NOT_FINGERPRINTED
    assert not unplaced, f"place keyseg eval argument(s) {sorted(unplaced)} in a table above"
    values = {key: _plain(value) for key, value in settings.row_settings().items()
              if key != "mode"}
    values.update(
        dataset=_plain(args.dataset), mode=_plain(args.mode),
        dataset_dir=str(Path(args.dataset_dir).resolve()), dtype=str(dtype),
        checkpoint=checkpoint_sha256 or (str(args.checkpoint) if args.checkpoint else None),
        records={s.spec: len(s.records) for s in eval_sets},
    )
    if args.shapes_answer_style != "lisa":  # older runs keep resuming
        values["shapes_answer_style"] = args.shapes_answer_style
    return json.loads(json.dumps(dict(sorted(values.items()))))


def prepare_out(out: Path, fingerprint: dict[str, Any], overwrite: bool,
                accelerator: Any | None = None) -> bool:
    """Check ``out`` against ``fingerprint``; returns whether to resume.

    Same arguments: resume. Nothing of ours in ``out``: a fresh run. Otherwise
    :class:`KeySegConfigError` (one line naming the first differences) unless
    ``overwrite``, which removes :data:`OUTPUTS`. The main process then writes
    ``run.json``; every process checks, so all refuse alike.
    """
    import shutil

    from keyseg.errors import KeySegConfigError
    from keyseg.io import atomic_write_json

    run_file = out / RUN_FILE
    present = [name for name in OUTPUTS if (out / name).exists()]
    resume = False
    if present and not overwrite:
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))["fingerprint"]
        except FileNotFoundError:
            raise KeySegConfigError(
                f"{out}: holds evaluation output ({', '.join(present)}) but no {RUN_FILE}; "
                "pass --overwrite to start over, or choose another --out") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise KeySegConfigError(f"{run_file}: unreadable ({error}); pass --overwrite to "
                                    "start over") from error
        if old != fingerprint:
            keys = [k for k in sorted(set(old) | set(fingerprint))
                    if old.get(k) != fingerprint.get(k)]
            diff = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in keys[:3])
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise KeySegConfigError(
                f"{out}: holds a run with other arguments ({diff}{more}); rerun with its "
                "arguments to resume it, pass --overwrite to start over, or choose another "
                "--out")
        resume = True
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has checked before anything moves
    if accelerator is None or accelerator.is_main_process:
        if overwrite:
            for name in present:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        atomic_write_json(run_file, {"fingerprint": fingerprint})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return resume


# --------------------------------------------------------------------------- helpers


def _accelerator():
    """An ``Accelerator`` under ``accelerate launch`` with several processes, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    from accelerate import Accelerator

    from keyseg.runtime import check_process_group

    accelerator = Accelerator()
    check_process_group(accelerator.num_processes)  # each process would think it is alone
    return accelerator


def _load_model(checkpoint: Path | None, dtype, known: dict[str, Any] | None = None,
                device=None) -> tuple[Any, dict[str, Any]]:
    """The model and the report's ``checkpoint`` entry (path, sha256 of its weights;
    ``known``: that hash, already computed). On an accelerator the weights load straight
    onto it (``device_map``), so host memory stays about one shard."""
    from keyseg.model.keyseg import KeySegModel

    placement = ({"device_map": str(device)}
                 if device is not None and device.type != "cpu" else {})

    if checkpoint is not None:
        model = KeySegModel.from_pretrained(checkpoint, dtype=dtype, **placement)
        return model, {"path": str(checkpoint), "default": False,
                       **(known or checkpoint_hash(checkpoint))}
    try:
        from keyseg.pipeline import default_checkpoint  # written by the pipeline work
    except ImportError:
        default_checkpoint = None
    if default_checkpoint is not None:
        found = default_checkpoint()
        if isinstance(found, (str, os.PathLike)):
            path = Path(found)
            model = KeySegModel.from_pretrained(path, dtype=dtype, **placement)
            return model, {"path": str(path), "default": True, **checkpoint_hash(path)}
        if found is not None:  # a ready model
            return found.to(dtype), {"path": None, "default": True, "sha256": None}
    warnings.warn("no --checkpoint and no packaged default model: evaluating a tiny RANDOM "
                  "model (numbers are meaningless)", stacklevel=2)
    from keyseg.build import build_tiny_model

    return build_tiny_model(seed=0).to(dtype), {"path": None, "default": True,
                                                "random_tiny": True, "sha256": None}


def checkpoint_hash(directory: str | os.PathLike) -> dict[str, Any]:
    """``{"sha256": combined, "files": {name: sha256}}`` over the weight files of a
    directory (``*.safetensors``, ``*.bin``, ``*.pth``, ``*.pt``; the combined hash is the
    sha256 of ``"name sha256\\n"`` lines in name order)."""
    directory = Path(directory)
    files: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            files[path.name] = digest.hexdigest()
    combined = hashlib.sha256("".join(f"{n} {h}\n" for n, h in files.items()).encode())
    return {"sha256": combined.hexdigest() if files else None, "files": files}


def _model_config(model) -> dict[str, Any]:
    from keyseg.config import to_dict

    return to_dict(model.settings)


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import keyseg

    found: dict[str, str | None] = {"keyseg": keyseg.__version__,
                                    "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "numpy", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _device_description(device, accelerator) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(),
                            "processes": accelerator.num_processes if accelerator else 1,
                            "argv": sys.argv[1:]}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info
