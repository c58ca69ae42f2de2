"""``keyseg data``: prepare datasets (convert REFER pickles) and check a dataset folder."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "prepare and check datasets (convert-refer: refs pickle -> JSON; check: what is present)"
EXAMPLE = "keyseg data convert-refer ./dataset --name refcoco refcoco+ refcocog"


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
    check = sub.add_parser("check", help="report which datasets/files are present")
    check.add_argument("dataset_dir", type=Path, help="dataset root (the --dataset-dir)")


def run(args: argparse.Namespace) -> int:
    from keyseg.errors import KeySegConfigError

    if args.data_command == "convert-refer":
        return _convert(args)
    if args.data_command == "check":
        return _check(args.dataset_dir)
    raise KeySegConfigError("choose an action: convert-refer or check (see keyseg data --help)")


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
