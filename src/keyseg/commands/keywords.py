"""``keyseg keywords``: extract keywords for a query file, or validate a keyword file."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "extract keywords (constrained to phrases of the query/answer) or validate a keyword file"
EXAMPLE = ("keyseg keywords explanatory/train.json --out keyword_outputs.json --max-words 2   |   "
           "keyseg keywords --validate keyword_outputs.json --image-dir ReasonSeg/train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", type=Path,
                        help="JSON list of {query, outputs, image, json} to annotate")
    parser.add_argument("--out", type=Path, help="keyword file to write (atomically)")
    parser.add_argument("--model", default=None,
                        help="seq2seq model name or local path (default google/flan-t5-xl)")
    parser.add_argument("--max-words", type=int, default=2, help="longest keyword (default 2)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="(query, candidate) pairs per forward (default 64)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default cpu)")
    parser.add_argument("--local-files-only", action="store_true",
                        help="never download the model; use the local cache/path only")
    parser.add_argument("--validate", type=Path, metavar="FILE",
                        help="check a keyword file: counts, empty/non-phrase keywords")
    parser.add_argument("--image-dir", type=Path,
                        help="with --validate: folder that must hold each entry's image and json")


def run(args: argparse.Namespace) -> int:
    from keyseg.errors import KeySegConfigError

    if args.validate is not None:
        from keyseg.data.keywords import validate_keyword_file

        report = validate_keyword_file(args.validate, image_dir=args.image_dir)
        print("\n".join(report.summary_lines()))
        return 0 if report.ok else 1

    if args.input is None or args.out is None:
        raise KeySegConfigError("give INPUT and --out to extract, or --validate FILE")
    if args.max_words < 1:
        raise KeySegConfigError(f"--max-words must be >= 1, got {args.max_words}")

    from keyseg.data.keywords import (
        DEFAULT_KEYWORD_MODEL,
        KeywordExtractor,
        extract_keywords,
        load_keyword_file,
        save_keyword_file,
        validate_keyword_file,
    )

    entries = load_keyword_file(args.input, require_keyword=False)
    extractor = KeywordExtractor.from_pretrained(
        args.model or DEFAULT_KEYWORD_MODEL, device=args.device,
        local_files_only=args.local_files_only, max_words=args.max_words,
        batch_size=args.batch_size,
    )
    annotated = extract_keywords(entries, extractor, progress=True)
    save_keyword_file(annotated, args.out)
    print("\n".join(validate_keyword_file(args.out).summary_lines()))
    return 0
