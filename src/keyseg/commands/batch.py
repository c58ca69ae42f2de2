"""``keyseg batch``: segment many (image, query) items; resumable, bad items skipped."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from keyseg.commands.segment import (
    add_max_pixels_argument,
    add_model_arguments,
    check_max_pixels,
    load_pipeline,
)

HELP = "segment a JSONL list of {image, query, id} or a folder of images; resumable"
EXAMPLE = ("keyseg batch queries.jsonl --out outputs/run1   |   "
           'keyseg batch photos/ --query "the largest dog" --out outputs/dogs')

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class Item:
    """One unit of work; ``error`` is set when the input line itself is unusable."""

    id: str
    image: Path | None
    query: str | None
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path,
                        help='JSONL file (lines {"image": path, "query": text, "id"?}; relative '
                             "paths are relative to the file) or a folder of images")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: one sub-folder per item")
    parser.add_argument("--query", default=None,
                        help="the question for every image (required for a folder input)")
    add_max_pixels_argument(parser)
    add_model_arguments(parser)


def _safe_id(text: str) -> str:
    """A file-system-safe folder name for an item id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "item"


def read_items(source: Path, query: str | None) -> list[Item]:
    """Items of a JSONL file or an image folder (sorted by name)."""
    from keyseg.errors import KeySegConfigError, KeySegDataError

    if source.is_dir():
        if not query:
            raise KeySegConfigError(f"{source} is a folder: give --query for its images")
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        stems = [p.stem for p in files]
        return [Item(_safe_id(p.stem if stems.count(p.stem) == 1 else p.name), p, query)
                for p in files]
    if not source.is_file():
        raise KeySegDataError(f"{source}: input not found (a .jsonl file or a folder)")
    items: list[Item] = []
    lines = source.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        name = f"line_{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            items.append(Item(name, None, None, f"{source}:{number}: not JSON ({error.msg})"))
            continue
        if not isinstance(entry, dict) or not entry.get("image"):
            items.append(Item(name, None, None, f"{source}:{number}: 'image' missing"))
            continue
        text = entry.get("query") or query
        if not text:
            items.append(Item(name, None, None, f"{source}:{number}: 'query' missing"))
            continue
        image = Path(entry["image"])
        if not image.is_absolute():
            image = source.parent / image
        item_id = str(entry.get("id") or f"{number:06d}_{image.stem}")
        items.append(Item(_safe_id(item_id), image, str(text)))
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            item.error = f"duplicate id {item.id!r}"
        seen.add(item.id)
    return items


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from keyseg.data.images import load_image
    from keyseg.errors import KeySegError
    from keyseg.visualize import save_result

    max_pixels = check_max_pixels(args)
    items = read_items(args.input, args.query)
    todo = [it for it in items if not (args.out / it.id / "result.json").is_file()]
    done_before = len(items) - len(todo)
    pipeline = load_pipeline(args) if todo else None
    ok, failed = 0, []
    for item in tqdm(todo, desc="segment", unit="item", file=sys.stderr, dynamic_ncols=True):
        try:
            if item.error:
                raise KeySegError(item.error)
            image = load_image(item.image, max_pixels=max_pixels)
            result = pipeline(image, item.query)
            save_result(args.out / item.id, image, result,
                        extra={"id": item.id, "image": str(item.image)})
            ok += 1
        except KeySegError as error:
            # A bad item is reported and skipped; the run goes on.
            failed.append((item.id, str(error)))
            tqdm.write(f"skipped {item.id}: {error}", file=sys.stderr)
    from keyseg.io import atomic_write_json

    failures = args.out / "failures.json"
    if failed:
        atomic_write_json(failures, [{"id": i, "error": e} for i, e in failed])
    else:
        failures.unlink(missing_ok=True)  # left by an earlier run whose failures are now done
    print(f"{len(items)} items: {ok} segmented, {done_before} already done (skipped), "
          f"{len(failed)} failed" + (f" (see {args.out / 'failures.json'})" if failed else ""))
    return 1 if failed else 0
