"""The lab's acceptance numbers (issue #16) from `keyseg eval --mode generate` sample rows.

    keyseg eval --checkpoint DIR --dataset shapes:test --mode generate --out runs/eval-native
    python experiments/lab_report.py runs/eval-native/samples/shapes_test_generate.jsonl \\
        [--compare runs/eval-rs/samples/reason_seg_val_generate.jsonl] \\
        [--teacher runs/eval-native/samples/shapes_test_teacher.jsonl] [--out report.json]

Prints, for the generated answers: gIoU (mean per-sample IoU, LISA's) overall and per
difficulty; the share of negative queries *answered* as negatives (the answer says there is
no such shape; and, separately, the share whose masks are empty) and the share of positive
queries answered so (a shape that is there denied), and both over the wordings that negative
and direct queries share (does the answer follow the image or the wording?), and by what the
query names (a kind, a colour or both); the IoU of direct and attribute queries by what they
name (on teacher-forced rows, which this reads the same way: the mask side under the right
words); for multi-target answers the largest IoU between two of an answer's masks
(``max_pred_overlap``: one object drawn twice gives 1.0); and each acceptance check of the
issue with PASS/FAIL. ``--compare`` adds the same numbers for a second file (the
ReasonSeg-format export) and their difference; multi-target queries are also split by
whether their shapes share a kind or a colour; ``--teacher`` (the same model's
teacher-forced rows) splits generated IoU by whether the answer is worded as the
teacher-forced one, and splits the teacher-forced multi-target queries by group as well.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from keyseg.io import atomic_write_json

#: How the shapes world's negative answers begin ("There is no such shape", "Nothing in the
#: image matches", "No shape fits that description").
NEGATIVE_ANSWER = re.compile(r"\b(no such|nothing in the image|no shape)\b", re.IGNORECASE)
#: The issue's thresholds. "The masks of one answer overlap with IoU < 0.5" is read as: at
#: least ``multi_share`` of the multi-target answers have every pair of masks below it.
TARGETS = {"giou": 0.70, "difficulty_giou": 0.50, "negatives_answered": 0.80,
           "multi_overlap": 0.5, "multi_share": 0.9, "export_gap": 0.03}


def read_rows(path: Path) -> list[dict]:
    """The scored rows of a samples JSONL (batch markers and torn lines skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "iou" in row:
            rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no scored rows")
    return rows


def said_no(row: dict) -> bool:
    """Whether a generated answer says there is no such shape."""
    return bool(NEGATIVE_ANSWER.search(row["answer"]))


def by_wording(rows: list[dict]) -> dict | None:
    """How often "no such shape" is said for a shape that is absent vs one that is present,
    over the query wordings that both negative and direct queries use ("Where is the
    {colour} {kind}?" asked with and without such a shape in the image). Equal shares mean
    the answer follows the wording, not the image. Needs shapes rows (their records are
    regenerated to read each query's template); ``None`` otherwise."""
    from keyseg.data.shapes import ShapesDataset

    shapes = [r for r in rows if r.get("source") == "shapes" and "index" in r]
    if not shapes:
        return None
    datasets: dict[str, ShapesDataset] = {}
    said: dict[str, dict[str, list[bool]]] = {}
    for row in shapes:
        split = row["record"].split("_")[1]
        dataset = datasets.setdefault(split, ShapesDataset(split))
        record = dataset[row["index"]]
        if record.sample_id != row["record"]:
            raise SystemExit(f"row {row.get('id')}: record {row['record']} is not "
                             f"shapes:{split}[{row['index']}] of the default world")
        difficulty, wording = record.meta["queries"][row["ref"]]["template_id"].split(".", 1)
        if difficulty in ("negative", "direct"):
            said.setdefault(wording, {}).setdefault(difficulty, []).append(said_no(row))
    shared = sorted(w for w, v in said.items() if len(v) == 2)
    absent = [x for w in shared for x in said[w]["negative"]]
    present = [x for w in shared for x in said[w]["direct"]]
    if not absent or not present:
        return None
    return {"wordings": shared, "absent": sum(absent) / len(absent), "n_absent": len(absent),
            "present": sum(present) / len(present), "n_present": len(present)}


def query_names(keyword: str) -> str | None:
    """What a shapes query's keyword names: ``"kind"`` ("circle"), ``"colour"`` ("red"),
    ``"colour kind"`` ("red star"), or ``None`` for anything else."""
    from keyseg.data.shapes import COLOURS, KINDS

    words = keyword.split()
    if words in ([k] for k in KINDS):
        return "kind"
    if words in ([c] for c in COLOURS):
        return "colour"
    if len(words) == 2 and words[0] in COLOURS and words[1] in KINDS:
        return "colour kind"
    return None


def by_concept(rows: list[dict]) -> dict | None:
    """How often "no such shape" is said for absent (negative) and present (direct) shapes,
    by what the query names (:func:`query_names`). Under a
    named answer style a present shape asked by its kind alone is named with its colour,
    an absent one is not, so this shows whether that split decides the verdict. ``None``
    without direct or negative rows that carry their ``target_keyword``."""
    said: dict[str, dict[str, list[bool]]] = {}
    for row in rows:
        side = {"negative": "absent", "direct": "present"}.get(row.get("difficulty"))
        named = query_names(row.get("target_keyword") or "")
        if side and named:
            said.setdefault(named, {}).setdefault(side, []).append(said_no(row))
    if not said:
        return None
    return {named: {side: {"said_no": sum(v) / len(v), "n": len(v)}
                    for side, v in sorted(sides.items())}
            for named, sides in sorted(said.items())}


#: Words an answer may open with that name nothing ("Sure, it is the red star").
_FILLER = re.compile(r"^(sure|it is|it.s)\b[ ,]*", re.IGNORECASE)


def answer_words(answer: str) -> str:
    """What an answer says about its target before the mask is read, for comparing two
    wordings of one target: lower case, up to ``[KEY]`` (the keyword after it comes after
    ``[SEG]`` and is scored as keyword accuracy), without ``[SEG]``, punctuation or opening
    filler ("Sure, it is the red star, [SEG]. [KEY] red star" -> "the red star")."""
    said = answer.lower().split("[key]")[0].replace("[seg]", " ")
    words = re.sub(r"[^a-z0-9 ]+", " ", said).split()
    text = " ".join(words)
    while (stripped := _FILLER.sub("", text)) != text:
        text = stripped
    return text


def by_naming(generated: list[dict], teacher: list[dict]) -> dict:
    """Per difficulty, for the generated rows that have a teacher-forced row of the same id:
    the share whose answer says what the teacher-forced answer says (:func:`answer_words`),
    the generated IoU of those that do and of those that do not, and the teacher-forced IoU
    of the latter (what a right wording would have scored). A large gap between the first
    two with a high third means the masks follow the generated words, and the words are
    what fails."""
    forced = {row["id"]: row for row in teacher if "id" in row}
    split: dict[str, dict[str, list[float]]] = {}
    for row in generated:
        ref = forced.get(row.get("id"))
        if ref is None:
            continue
        same = answer_words(row["answer"]) == answer_words(ref["answer"])
        cell = split.setdefault(row.get("difficulty") or "none",
                                {"same": [], "different": [], "teacher_on_different": []})
        cell["same" if same else "different"].append(row["iou"])
        if not same:
            cell["teacher_on_different"].append(ref["iou"])
    if not split:
        raise SystemExit("--teacher: no row id in common with the generated rows")

    def mean(values: list[float]) -> float | None:
        return statistics.mean(values) if values else None

    return {d: {"n": len(c["same"]) + len(c["different"]),
                "same_share": len(c["same"]) / (len(c["same"]) + len(c["different"])),
                "iou_same": mean(c["same"]), "iou_different": mean(c["different"]),
                "teacher_iou_on_different": mean(c["teacher_on_different"])}
            for d, c in sorted(split.items())}


def iou_by_concept(rows: list[dict]) -> dict | None:
    """Mean IoU of direct and attribute queries by what the query names
    (:func:`query_names`): can the mask be found from a kind alone, or only through a
    colour? Run on teacher-forced rows it measures the mask side under the right words."""
    ious: dict[str, list[float]] = {}
    for row in rows:
        named = query_names(row.get("target_keyword") or "")
        if row.get("difficulty") in ("direct", "attribute") and named:
            ious.setdefault(f"{row['difficulty']}, {named}", []).append(row["iou"])
    return {cell: {"iou": statistics.mean(v), "n": len(v)}
            for cell, v in sorted(ious.items())} or None


def share_distinct(overlaps: list[float]) -> float | None:
    """The share of multi-target answers whose masks all overlap below the target."""
    if not overlaps:
        return None
    return sum(o < TARGETS["multi_overlap"] for o in overlaps) / len(overlaps)


def multi_by_group(rows: list[dict]) -> dict | None:
    """Multi-target queries split by what their group shares (:func:`query_names` of the
    keyword: every shape of one ``"kind"``, which differ in colour, or of one ``"colour"``,
    which differ only in kind): the number, the share whose masks are distinct (every pair
    below the overlap target) and the mean IoU of their masks. On teacher-forced rows it
    asks whether the mask side can tell apart objects of one colour by their kind."""
    groups: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        named = query_names(row.get("target_keyword") or "")
        if row.get("difficulty") != "multi" or named not in ("kind", "colour"):
            continue
        cell = groups.setdefault(named, {"overlap": [], "iou": []})
        cell["iou"].append(row["iou"])
        if row.get("max_pred_overlap") is not None:
            cell["overlap"].append(row["max_pred_overlap"])
    return {named: {"n": len(c["iou"]), "giou": statistics.mean(c["iou"]),
                    "share_distinct": share_distinct(c["overlap"])}
            for named, c in sorted(groups.items())} or None


def summarise(rows: list[dict]) -> dict:
    """gIoU overall and by difficulty, negatives answered, multi-target overlaps."""
    by_difficulty: dict[str, list[float]] = {}
    for row in rows:
        by_difficulty.setdefault(row.get("difficulty") or "none", []).append(row["iou"])
    negatives = [r for r in rows if r.get("difficulty") == "negative"]
    # Shapes rows only: an export row has no difficulty, so it cannot say it was a positive.
    positives = [r for r in rows if r.get("difficulty") not in (None, "negative")]
    multi = [r["max_pred_overlap"] for r in rows
             if r.get("difficulty") == "multi" and r.get("max_pred_overlap") is not None]
    return {
        "samples": len(rows),
        "giou": statistics.mean(r["iou"] for r in rows),
        "by_difficulty": {d: {"giou": statistics.mean(v), "n": len(v)}
                          for d, v in sorted(by_difficulty.items())},
        "negatives_answered": (sum(map(said_no, negatives)) / len(negatives)
                               if negatives else None),
        "negatives_empty_mask": (sum(all(u == 0 for u in r["U"]) for r in negatives)
                                 / len(negatives)) if negatives else None,
        # The other side of answering negatives: "no such shape" about a shape that is there.
        "positives_denied": (sum(map(said_no, positives)) / len(positives)
                             if positives else None),
        "said_no_by_wording": by_wording(rows),
        "said_no_by_concept": by_concept(rows),
        "iou_by_concept": iou_by_concept(rows),
        "multi_answers": len(multi),
        "multi_mean_overlap": statistics.mean(multi) if multi else None,
        "multi_share_distinct": share_distinct(multi),
        "multi_by_group": multi_by_group(rows),
    }


def checks(native: dict, export: dict | None) -> list[tuple[str, bool]]:
    """The issue's acceptance points as (description, passed)."""
    out = [(f"gIoU {native['giou']:.3f} >= {TARGETS['giou']}", native["giou"] >= TARGETS["giou"])]
    for name, d in native["by_difficulty"].items():
        out.append((f"{name} gIoU {d['giou']:.3f} >= {TARGETS['difficulty_giou']}",
                    d["giou"] >= TARGETS["difficulty_giou"]))
    if native["negatives_answered"] is not None:
        out.append((f"negatives answered as negatives {native['negatives_answered']:.1%} >= "
                    f"{TARGETS['negatives_answered']:.0%}",
                    native["negatives_answered"] >= TARGETS["negatives_answered"]))
    if native["multi_share_distinct"] is not None:
        out.append((f"multi-target answers with masks overlapping < {TARGETS['multi_overlap']}: "
                    f"{native['multi_share_distinct']:.1%} (mean max-IoU "
                    f"{native['multi_mean_overlap']:.3f}) >= {TARGETS['multi_share']:.0%}",
                    native["multi_share_distinct"] >= TARGETS["multi_share"]))
    if export is not None:
        gap = abs(export["giou"] - native["giou"])
        out.append((f"ReasonSeg-format export gIoU {export['giou']:.3f}, |difference| "
                    f"{gap:.3f} <= {TARGETS['export_gap']}", gap <= TARGETS["export_gap"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, help="samples JSONL of a generate-mode eval")
    parser.add_argument("--compare", type=Path, default=None,
                        help="the same for the ReasonSeg-format export")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="the same model's teacher-forced rows: split generated IoU by "
                             "whether the answer is worded as the teacher's")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args()
    generated = read_rows(args.samples)
    native = summarise(generated)
    if args.teacher:
        teacher = read_rows(args.teacher)
        native["by_naming"] = by_naming(generated, teacher)
        native["teacher_multi_by_group"] = multi_by_group(teacher)
    export = summarise(read_rows(args.compare)) if args.compare else None
    for name, d in native["by_difficulty"].items():
        extra = ""
        if export and name in export["by_difficulty"]:
            extra = f"  (export {export['by_difficulty'][name]['giou']:.3f})"
        print(f"{name:>10}: gIoU {d['giou']:.3f} (n={d['n']}){extra}")
    if native["positives_denied"] is not None:
        print(f"negatives answered {native['negatives_answered']:.1%}; positive queries "
              f"answered as negatives {native['positives_denied']:.1%}")
    wording = native["said_no_by_wording"]
    if wording is not None:
        print(f"same wordings ({len(wording['wordings'])}): 'no such shape' for "
              f"{wording['absent']:.0%} of {wording['n_absent']} absent shapes, "
              f"{wording['present']:.0%} of {wording['n_present']} present ones")
    for named, sides in (native["said_no_by_concept"] or {}).items():
        print(f"queries naming a {named}: 'no such shape' for " + ", ".join(
            f"{d['said_no']:.0%} of {d['n']} {side} shapes" for side, d in sides.items()))
    for cell, d in (native["iou_by_concept"] or {}).items():
        print(f"{cell:>22}: IoU {d['iou']:.3f} (n={d['n']})")
    for key, label in (("multi_by_group", "generated"), ("teacher_multi_by_group", "teacher")):
        for named, d in (native.get(key) or {}).items():
            distinct = "–" if d["share_distinct"] is None else f"{d['share_distinct']:.0%}"
            print(f"multi-target, one {named} ({label}): gIoU {d['giou']:.3f}, masks distinct "
                  f"in {distinct} of {d['n']}")

    def fmt(value: float | None) -> str:
        return "  –  " if value is None else f"{value:.3f}"

    for name, d in (native.get("by_naming") or {}).items():
        print(f"{name:>10}: worded as the teacher {d['same_share']:.0%} of {d['n']}; IoU "
              f"{fmt(d['iou_same'])} when so, {fmt(d['iou_different'])} when not "
              f"(teacher-forced on those {fmt(d['teacher_iou_on_different'])})")
    results = checks(native, export)
    for text, passed in results:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")
    if args.out:
        atomic_write_json(args.out, {"native": native, "export": export,
                                     "checks": [{"check": t, "passed": p} for t, p in results]})


if __name__ == "__main__":
    main()
