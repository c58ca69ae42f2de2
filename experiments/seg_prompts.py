"""Where the ``[SEG]`` prompts of one multi-target answer stop differing (issue #16).

A multi-target answer names each target before its ``[SEG]`` ("the red star [SEG] and the
orange star [SEG]"), so its masks can only differ if the prompts that reach SAM differ. This
feeds each multi-target query of the shapes test split its own reference answer
(teacher-forced, as ``keyseg eval --mode teacher`` does) and measures, per answer, the mean
cosine similarity between its ``[SEG]`` rows at three points of the path, and the overlap of
the masks they give:

- ``lm``: the language model's last hidden states that stand for the ``[SEG]`` tokens
  (``model.backbone.hidden_state``: the state before ``[SEG]``, or at it);
- ``projected``: after ``text_hidden_fcs``;
- ``fused``: after the keyword fusion (what SAM's decoder receives);
- ``mask_overlap``: the largest IoU between two of the answer's masks (1.0: one object, or
  one union, drawn twice).

    python experiments/seg_prompts.py src/keyseg/assets/default_model --records 300

The means are also split by what the answer's shapes share (``by_group``: one ``kind``,
"every star", or one ``colour``, "all blue shapes", from the query's keyword).

Prints the means and writes ``--out`` (JSON, with every answer's numbers) when given.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_report import query_names

from keyseg import tokens
from keyseg.build import build_keyseg
from keyseg.config import load_config
from keyseg.data.collate import Collator
from keyseg.data.shapes import ShapesDataset
from keyseg.evaluate.batches import group_examples, record_items
from keyseg.evaluate.scoring import max_pairwise_iou
from keyseg.io import atomic_write_json
from keyseg.model.keyseg import KeySegModel

STAGES = ("lm", "projected", "fused")


def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    """Mean cosine similarity over the pairs of ``rows: (n, d)``, n >= 2."""
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    pairs = itertools.combinations(range(rows.shape[0]), 2)
    return statistics.mean(float(unit[i] @ unit[j]) for i, j in pairs)


def multi_target_items(split: str, records: int, use_keyword: bool) -> list:
    """The teacher-forced eval items of the first ``records`` records of ``split`` whose
    query has two or more targets (each fed its reference answer)."""
    dataset, items = ShapesDataset(split), []
    for index in range(min(records, len(dataset))):
        record = dataset[index]
        for item in record_items(record, index, record.image, use_keyword, all_texts=False,
                                 protocol="fixed", issues={}):
            if item.referent.masks.shape[0] >= 2:
                items.append(item)
    return items


@torch.no_grad()
def measure(model: KeySegModel, items: list, batch_size: int = 8) -> list[dict]:
    """Per item: the query, the fed answer, the mean pairwise cosine of its ``[SEG]`` rows
    at each of :data:`STAGES`, and ``mask_overlap``."""
    model.eval()
    collate = Collator(model.processor, mode="train")
    choice, seg_id = model.settings.backbone.hidden_state, model.processor.ids.seg
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collate(group_examples(chunk)).to(model.device, dtype=model.dtype)
        image_embeddings = model.encode_images(batch.sam_pixel_values)
        out = model.backbone(batch.input_ids, batch.attention_mask, batch.vision_inputs)
        decoded = model.decode_rows(batch.input_ids, out.last_hidden, image_embeddings,
                                    batch.image_index, batch.resized_sizes,
                                    batch.original_sizes)
        for row, (item, (masks, _, _)) in enumerate(zip(chunk, decoded, strict=True)):
            ids, hidden = batch.input_ids[row], out.last_hidden[row]
            seg, key = model.special_embeddings(ids, hidden)
            stages = {
                "lm": hidden[tokens.special_positions(ids, seg_id, choice)],
                "projected": seg,
                "fused": model.keyword_fusion(seg, key),
            }
            results.append({
                "query": item.referent.text, "answer": item.fed_answer,
                "keyword": item.referent.keyword,
                **{name: mean_pairwise_cosine(rows) for name, rows in stages.items()},
                "mask_overlap": max_pairwise_iou(masks),
            })
    return results


def group_of(keyword: str | None) -> str | None:
    """What the shapes of a multi-target answer share: ``"kind"``, ``"colour"`` or None
    (lab_report's :func:`query_names` of its keyword)."""
    named = query_names(keyword or "")
    return named if named in ("kind", "colour") else None


def summary(results: list[dict]) -> dict:
    """Means over answers of every stage's cosine and of the mask overlap, overall and by
    :func:`group_of` the answer's keyword."""
    keys = (*STAGES, "mask_overlap")

    def means(rows: list[dict]) -> dict:
        return {"answers": len(rows), **{k: statistics.mean(r[k] for r in rows) for k in keys}}

    groups: dict[str, list[dict]] = {}
    for row in results:
        if (group := group_of(row.get("keyword"))) is not None:
            groups.setdefault(group, []).append(row)
    return {**means(results), "by_group": {g: means(v) for g, v in sorted(groups.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="a KeySeg model directory")
    parser.add_argument("--config", type=Path, default=None,
                        help="instead of a checkpoint: a fresh KeySeg built from this config's "
                             "model section (its stage 2 VLM and stage 1 SAM, heads untrained), "
                             "so the lm column shows the pretrained VLM before fine-tuning")
    parser.add_argument("--split", default="test")
    parser.add_argument("--records", type=int, default=300,
                        help="records of the split scanned for multi-target queries")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if (args.checkpoint is None) == (args.config is None):
        parser.error("give exactly one of a checkpoint directory and --config")
    if args.config is not None:
        torch.manual_seed(0)
        model = build_keyseg(load_config(args.config).model)
    else:
        model = KeySegModel.from_pretrained(args.checkpoint)
    items = multi_target_items(args.split, args.records, bool(model.settings.use_keyword))
    if not items:
        raise SystemExit(f"no multi-target query in the first {args.records} records of "
                         f"shapes:{args.split}")
    results = measure(model, items)
    means = summary(results)
    print(f"{means['answers']} multi-target answers ({model.settings.fusion.variant} fusion, "
          f"hidden_state {model.settings.backbone.hidden_state}): mean cosine between "
          + ", ".join(f"{s} {means[s]:.3f}" for s in STAGES)
          + f"; mask overlap {means['mask_overlap']:.3f}")
    for group, m in means["by_group"].items():
        print(f"  {m['answers']} answers whose shapes share a {group}: "
              + ", ".join(f"{s} {m[s]:.3f}" for s in STAGES)
              + f"; mask overlap {m['mask_overlap']:.3f}")
    if args.out is not None:
        atomic_write_json(args.out, {"checkpoint": args.checkpoint,
                                     "config": str(args.config) if args.config else None,
                                     "summary": means,
                                     "answers": results})


if __name__ == "__main__":
    main()
