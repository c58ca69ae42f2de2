"""Mutation testing of KeySeg's core modules with mutmut (``make mutation``).

Each group mutates one module (or, for ``model/keyseg.py``, only its special-token and
decoding methods; for the converters, only the functions that apply their key tables) and
runs only that module's own test files, in its own folder ``mutants-work/<group>/`` (a
copy of ``pyproject.toml`` whose ``[tool.mutmut]`` names the group's file and tests, and
links to ``src/`` and ``tests/``; mutmut then copies them into ``mutants/`` there). One
worker, niced: a measurement for docs/BENCHMARKS.md, not a CI gate. Reruns are
incremental (mutmut keeps its results per group); delete ``mutants-work/`` to start over.

Usage::

    python benchmarks/mutation.py                 # every group, then the score table
    python benchmarks/mutation.py losses fusion   # some groups
    python benchmarks/mutation.py --report        # the table from the results so far
    python benchmarks/mutation.py --survivors     # retest the survivors (after new tests)
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "mutants-work"

# group -> (file to mutate, mutant-name patterns, test files)
GROUPS: dict[str, tuple[str, list[str], list[str]]] = {
    "losses": ("src/keyseg/model/losses.py", ["keyseg.model.losses.*"],
               ["tests/model/test_losses.py"]),
    "fusion": ("src/keyseg/model/fusion.py", ["keyseg.model.fusion.*"],
               ["tests/model/test_fusion.py"]),
    "metrics": ("src/keyseg/metrics.py", ["keyseg.metrics.*"], ["tests/test_metrics.py"]),
    "tokens": ("src/keyseg/tokens.py", ["keyseg.tokens.*"], ["tests/test_tokens.py"]),
    "processor": ("src/keyseg/processor.py", ["keyseg.processor.*"],
                  ["tests/test_processor.py", "tests/test_tokens.py"]),
    "keyseg": ("src/keyseg/model/keyseg.py",
               [f"keyseg.model.keyseg.*ǁ{m}__mutmut_*" for m in
                ("special_embeddings", "masks_from_hidden", "decode_rows", "projected_table")],
               ["tests/model/test_keyseg.py"]),
    "convert_lisa": ("src/keyseg/convert/lisa.py",
                     [f"keyseg.convert.lisa.x_{f}__mutmut_*" for f in
                      ("_compile", "rename", "_ignored", "map_state")],
                     ["tests/convert/test_lisa_convert.py",
                      "tests/convert/test_reference_fixtures.py"]),
    "convert_keyseg_ref": ("src/keyseg/convert/keyseg_ref.py",
                           [f"keyseg.convert.keyseg_ref.x_{f}__mutmut_*" for f in
                            ("_normalise_names", "merge_lora_tensors")],
                           ["tests/convert/test_keyseg_ref_convert.py",
                            "tests/convert/test_reference_fixtures.py"]),
    "convert_sam": ("src/keyseg/convert/sam.py",
                    [f"keyseg.convert.sam.x_{f}__mutmut_*" for f in
                     ("official_to_hf_key", "convert_sam_state_dict")],
                    ["tests/convert/test_sam_convert.py"]),
}

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
LINE = re.compile(r"^\s*(?P<name>keyseg\.\S+__mutmut_\d+): (?P<status>.+?)\s*$")


def _mutmut() -> str:
    return str(Path(sys.executable).with_name("mutmut"))


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def prepare(group: str) -> Path:
    """``mutants-work/<group>/`` with links to src/ and tests/ and the group's config."""
    file, _, tests = GROUPS[group]
    folder = WORK / group
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests"):
        link = folder / name
        if not link.exists():
            link.symlink_to(ROOT / name, target_is_directory=True)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = text.split("\n[tool.mutmut]")[0].rstrip() + "\n"  # the group's own section below
    text += (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {_toml_list([file])}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider"]\n'
    )
    config = folder / "pyproject.toml"
    if not config.is_file() or config.read_text(encoding="utf-8") != text:
        config.write_text(text, encoding="utf-8")
    return folder


def run(group: str, survivors_only: bool = False) -> None:
    folder = prepare(group)
    _, patterns, _ = GROUPS[group]
    if survivors_only:  # after adding tests: retest just the mutants that survived
        patterns = results(group)[1]
        if not patterns:
            return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # mutmut puts its mutated copy first on the path
    print(f"== {group}: mutmut run {' '.join(patterns[:4])}"
          + (f" (+{len(patterns) - 4})" if len(patterns) > 4 else ""), flush=True)
    with open(folder / "mutmut.log", "w", encoding="utf-8") as log:
        subprocess.run(["nice", "-n", "10", _mutmut(), "run", "--max-children", "1",
                        *patterns], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=False)


def results(group: str) -> tuple[Counter, list[str]]:
    folder = WORK / group
    _, patterns, _ = GROUPS[group]
    if not (folder / "mutants").is_dir():
        return Counter(), []
    listing = subprocess.run([_mutmut(), "results", "--all", "true"], cwd=folder,
                             capture_output=True, text=True, check=False).stdout
    counts: Counter = Counter()
    survivors = []
    for line in listing.splitlines():
        match = LINE.match(line)
        if match and any(fnmatch.fnmatch(match["name"], p) for p in patterns):
            counts[match["status"]] += 1
            if match["status"] in ("survived", "no tests"):
                survivors.append(match["name"])
    return counts, survivors


def report(groups: list[str]) -> None:
    print("| group | mutated | mutants | killed | survived | no tests | not run | score |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    all_survivors = {}
    for group in groups:
        counts, survivors = results(group)
        killed = sum(counts[s] for s in KILLED)
        tested = killed + counts["survived"] + counts["no tests"]
        score = f"{100 * killed / tested:.1f}%" if tested else "-"
        print(f"| {group} | `{GROUPS[group][0].removeprefix('src/keyseg/')}` | "
              f"{sum(counts.values())} | {killed} | {counts['survived']} | "
              f"{counts['no tests']} | {counts['not checked']} | {score} |")
        all_survivors[group] = survivors
    for group, names in all_survivors.items():
        if names:
            print(f"\nsurvived in {group} (`mutmut show NAME` in mutants-work/{group}): "
                  + ", ".join(n.rsplit(".", 1)[-1] for n in names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", metavar="GROUP",
                        help=f"groups to run (default: all of {', '.join(GROUPS)})")
    parser.add_argument("--report", action="store_true", help="only print the table")
    parser.add_argument("--survivors", action="store_true",
                        help="retest only the mutants that survived the last run")
    args = parser.parse_args(argv)
    groups = args.groups or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    if not args.report:
        for group in groups:
            run(group, survivors_only=args.survivors)
    report(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
