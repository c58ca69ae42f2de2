"""Choose the bundled example for ``make demo`` from the shapes *test* split.

Runs the shipped model on indirect (reasoning) test queries through the same pipeline users
call, and writes the first sample it segments with IoU >= ``--min-iou`` to
``src/keyseg/assets/examples/``: ``example.png``, ``example_mask.png`` (ground truth) and
``example.json`` (query, expected keyword, measured IoU). The regression test
``tests/test_default_model.py`` re-checks that IoU on every CI run.

    python experiments/pick_example.py --checkpoint src/keyseg/assets/default_model
    python experiments/pick_example.py --checkpoint ... --index 68   # re-measure the current one
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from keyseg.data.shapes import ShapesConfig, ShapesDataset
from keyseg.io import atomic_write_json
from keyseg.metrics import intersection_union, iou_score
from keyseg.pipeline import KeySegPipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "src/keyseg/assets/examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--min-iou", type=float, default=0.8)
    parser.add_argument("--difficulty", default="indirect")
    parser.add_argument("--search", type=int, default=200, help="test records to try")
    parser.add_argument("--index", type=int, default=None,
                        help="re-measure this test record only (keeps README's query when a "
                             "new model is shipped)")
    parser.add_argument("--any-answer", action="store_true",
                        help="accept a bare 'Sure, it is [SEG].' (default: the answer must name "
                             "the shape, so the demo shows the model talking about what it saw)")
    args = parser.parse_args()
    pipe = KeySegPipeline.from_pretrained(args.checkpoint)
    test = ShapesDataset("test", ShapesConfig())
    indices = [args.index] if args.index is not None else range(min(args.search, len(test)))
    for index in indices:
        record = test[index]
        ref = record.referents[0]
        if ref.difficulty != args.difficulty or ref.masks.shape[0] != 1 or not ref.masks.any():
            continue
        result = pipe(record.image, ref.text)
        if len(result.masks) != 1:
            continue
        if not args.any_answer and (ref.keyword or "") not in result.answer.split("[KEY]")[0]:
            continue  # the answer does not name what it segments
        logits = np.where(result.masks[0], 1.0, -1.0)
        inter, union = intersection_union(logits, ref.masks[0])
        iou = iou_score(inter, union)
        print(f"test[{index}] {ref.text!r} -> {result.answer!r} iou={iou:.3f}")
        if iou >= args.min_iou:
            EXAMPLES.mkdir(parents=True, exist_ok=True)
            record.image.save(EXAMPLES / "example.png")
            Image.fromarray((ref.masks[0] == 1).astype(np.uint8) * 255).save(
                EXAMPLES / "example_mask.png")
            atomic_write_json(EXAMPLES / "example.json", {
                "query": ref.text, "keyword": ref.keyword, "difficulty": ref.difficulty,
                "source": f"shapes:test[{index}]", "answer": result.answer, "iou": iou,
            })
            print(f"wrote {EXAMPLES}/example.png")
            return
    raise SystemExit(f"no {args.difficulty} test sample reached IoU {args.min_iou}")


if __name__ == "__main__":
    main()
