"""``keyseg data``: prepare datasets (convert REFER pickles), check a dataset folder (what is
present; ``--deep``: read every file), write the shapes world in ReasonSeg format."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HELP = ("prepare and check datasets (convert-refer: refs pickle -> JSON; check [--deep]: what "
        "is present / readable; shapes-export: a ReasonSeg-format dataset to try things on)")
EXAMPLE = ("keyseg data convert-refer ./dataset --name refcoco refcoco+ refcocog\n"
           "  keyseg data check --deep ./dataset --split val\n"
           "  keyseg data shapes-export ./shapes-dataset --split val test --size 50")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    convert = sub.add_parser(
        "convert-refer",
        help="convert trusted REFER refs(<splitBy>).p pickles to refs(<splitBy>).json (once)",
    )
    convert.add_argument("dataset_dir", type=Path, help="dataset root holding refer_seg/")
    convert.add_argument("--name", nargs="+", default=None,
                         help="datasets to convert (default: every one whose pickle exists)")
    convert.add_argument("--force", action="store_true", help="overwrite existing JSON files")
    check = sub.add_parser("check", help="report which datasets/files are present; --deep: "
                                         "read every annotation and image, list bad files")
    check.add_argument("dataset_dir", type=Path, help="dataset root (the --dataset-dir)")
    check.add_argument("--deep", action="store_true",
                       help="read every annotation and image of the splits (ReasonSeg, REFER) "
                            "and the keyword file; print each bad file with its reason; exit "
                            "status 1 when any is bad")
    check.add_argument("--split", nargs="+", default=None, metavar="SPLIT",
                       help="with --deep: NAME:SPLIT (reason_seg:val, refcoco:testA) or a "
                            "split name for every dataset that has it (default: every split "
                            "present)")
    check.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    export = sub.add_parser(
        "shapes-export",
        help="write the procedural shapes world in ReasonSeg format (+ a keyword file)",
    )
    export.add_argument("out", type=Path,
                        help="dataset root to write: OUT/reason_seg/ReasonSeg/<split>/ and "
                             "OUT/reason_seg/ReasonSeg/explanatory_key/keyword_outputs.json")
    export.add_argument("--split", nargs="+", default=["val", "test"],
                        choices=["train", "val", "test"], help="splits (default: val test)")
    export.add_argument("--size", type=int, default=None, metavar="N",
                        help="images per split (default: the world's split size: train "
                             "20000, val 200, test 500)")
    export.add_argument("--image-size", type=int, default=192,
                        help="side of the square images in pixels (default: 192)")
    export.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace split folders that already exist")
    export.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from keyseg.errors import KeySegConfigError

    if args.data_command == "convert-refer":
        return _convert(args)
    if args.data_command == "check":
        if args.deep:
            return _deep_check(args.dataset_dir, args.split, progress=not args.no_progress)
        if args.split:
            raise KeySegConfigError("--split is only used with --deep")
        return _check(args.dataset_dir)
    if args.data_command == "shapes-export":
        return _shapes_export(args)
    raise KeySegConfigError("choose an action: convert-refer, check or shapes-export (see "
                            "keyseg data --help)")


def _convert(args: argparse.Namespace) -> int:
    from keyseg.data.refer import REFER_DATASETS, convert_refs_pickle_to_json, refs_path
    from keyseg.errors import KeySegConfigError, KeySegDataError

    names = args.name or list(REFER_DATASETS)
    unknown = [n for n in names if n not in REFER_DATASETS]
    if unknown:
        raise KeySegConfigError(
            f"unknown REFER dataset(s) {unknown}; known: {list(REFER_DATASETS)}"
        )
    converted = 0
    for name in names:
        folder = args.dataset_dir / "refer_seg" / name
        src = refs_path(folder, REFER_DATASETS[name], ".p")
        dst = refs_path(folder, REFER_DATASETS[name])
        if not src.is_file():
            if args.name:  # explicitly asked for: a missing pickle is an error
                raise KeySegDataError(f"{src}: refs pickle not found")
            continue
        if dst.is_file() and not args.force:
            print(f"{dst}: exists, skipped (use --force to overwrite)")
            continue
        convert_refs_pickle_to_json(src, dst)
        print(f"{src} -> {dst}")
        converted += 1
    if converted == 0 and not args.name:
        print(f"no refs pickle found under {args.dataset_dir / 'refer_seg'}")
    return 0


def _check(root: Path) -> int:
    from keyseg.data.reason_seg import REASON_SEG_SPLITS, find_keyword_file
    from keyseg.data.refer import IMAGE_SUBDIR, refer_status

    def mark(ok: bool) -> str:
        return "ok     " if ok else "missing"

    print(f"dataset root: {root}")
    sam = root / "sam_vit_h_4b8939.pth"
    print(f"  {mark(sam.is_file())} {sam.name}")
    for split in REASON_SEG_SPLITS:
        folder = root / "reason_seg" / "ReasonSeg" / split
        n = len(list(folder.glob("*.json"))) if folder.is_dir() else 0
        print(f"  {mark(n > 0)} reason_seg/ReasonSeg/{split} ({n} JSON files)")
    explanatory = root / "reason_seg" / "ReasonSeg" / "explanatory" / "train.json"
    print(f"  {mark(explanatory.is_file())} reason_seg/ReasonSeg/explanatory/train.json")
    keyword_file = find_keyword_file(root)
    print(f"  {mark(keyword_file is not None)} keyword file"
          + (f" ({keyword_file.relative_to(root)})" if keyword_file else ""))
    for name, files in refer_status(root).items():
        for file, present in files.items():
            note = ""
            if file.endswith(".p") and present and not files[file[:-2] + ".json"]:
                note = "  -> run: keyseg data convert-refer " + f"{root} --name {name}"
            print(f"  {mark(present)} refer_seg/{name}/{file}{note}")
    images = root / IMAGE_SUBDIR
    print(f"  {mark(images.is_dir())} {IMAGE_SUBDIR}")
    return 0


def _deep_check(root: Path, splits: list[str] | None, progress: bool) -> int:
    from keyseg.data.check import deep_check, parse_check_splits
    from keyseg.errors import KeySegDataError

    if not root.is_dir():
        raise KeySegDataError(f"{root}: dataset folder not found")
    pairs = parse_check_splits(splits, root)
    if not pairs:
        raise KeySegDataError(f"{root}: no split to check (no reason_seg/ReasonSeg/<split>/ nor "
                              "refer_seg/<name>/ folder; see docs/DATA.md for the layout)")
    report = deep_check(root, pairs, progress=progress)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


class _Counted(Sequence):
    """A sequence that advances a progress bar as items are read (wraps the exporter's
    input, so the exporter itself stays as it is)."""

    def __init__(self, items: Sequence, bar: Any) -> None:
        self.items, self.bar = items, bar

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        item = self.items[index]
        self.bar.update(1)
        return item


def _shapes_export(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from dataclasses import replace

    from tqdm.auto import tqdm

    from keyseg.data.reason_seg import KEYWORD_FILE_CANDIDATES
    from keyseg.data.reason_seg_export import export_reason_seg
    from keyseg.data.shapes import ShapesConfig, ShapesDataset
    from keyseg.errors import KeySegConfigError
    from keyseg.io import atomic_directory, atomic_write_json

    if args.size is not None and args.size < 1:
        raise KeySegConfigError(f"--size must be >= 1, got {args.size}")
    config = ShapesConfig(image_size=args.image_size, seed=args.seed)
    if args.size is not None:
        config = replace(config, train_size=args.size, val_size=args.size,
                         test_size=args.size)
    base = args.out / "reason_seg" / "ReasonSeg"
    splits = list(dict.fromkeys(args.split))
    for split in splits:
        folder = base / split
        if folder.exists() and any(folder.iterdir()) and not args.overwrite:
            raise KeySegConfigError(f"{folder}: exists and is not empty; pass --overwrite to "
                                    "replace it")
    keyword_path = args.out / KEYWORD_FILE_CANDIDATES[0]
    entries: list[dict] = []
    names: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="keyseg-shapes-") as scratch:
        for split in splits:
            dataset = ShapesDataset(split, config)
            bar = tqdm(total=len(dataset), desc=f"shapes {split}", unit="img",
                       disable=args.no_progress, dynamic_ncols=True)
            part = Path(scratch) / f"{split}.json"
            with atomic_directory(base / split) as tmp:  # a kill leaves no half split
                exported = export_reason_seg(_Counted(dataset, bar), tmp, keyword_file=part)
            bar.close()
            names.update(f"{name}.jpg" for name in exported)
            entries.extend(json.loads(part.read_text(encoding="utf-8")))
            print(f"{base / split}: {len(exported)} samples")
    if keyword_path.is_file():  # keep the entries of splits exported before
        from keyseg.data.reason_seg import read_json_text

        old = read_json_text(keyword_path)
        if isinstance(old, list):
            entries = [e for e in old if isinstance(e, dict) and e.get("image") not in names
                       ] + entries
    atomic_write_json(keyword_path, entries, indent=1)
    print(f"{keyword_path}: {len(entries)} keyword entries")
    print(f"try it: keyseg data check --deep {args.out}; keyseg eval --dataset-dir {args.out} "
          f"--dataset reason_seg:{splits[0]}")
    return 0
