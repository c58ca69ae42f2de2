"""One record of the shapes world from its seed, and a split as a deterministic
sequence of records."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from keyseg.data.sample import Referent, SegRecord
from keyseg.data.shapes.geometry import ShapeObject, make_scene
from keyseg.data.shapes.painting import paint_scene
from keyseg.data.shapes.queries import choose_query, write_answer
from keyseg.data.shapes.world import SOURCE, ShapesConfig, check_split, image_seed


def generate_sample(seed: int, split: str, config: ShapesConfig | None = None) -> SegRecord:
    """Generate one record (image + ``config.queries_per_image`` referents).

    Args:
        seed: the image seed (see :func:`image_seed`); with ``config.seed`` it fixes
            everything, so the same arguments always give the same record.
        split: "train", "val" or "test"; decides which query templates may be used.
        config: world settings (defaults: :class:`ShapesConfig`).

    Returns:
        a :class:`SegRecord` with ``image`` set (RGB, ``S x S``); each referent's ``masks``
        is ``(k, S, S)`` uint8 in {0, 1}. ``meta`` holds the objects (kind, colour,
        geometry, z), each referent's template id and target object ids, and explanations.
    """
    cfg = config or ShapesConfig()
    check_split(split)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, seed]))
    split_weights = cfg.weights_for(split)
    weights_by_name = dict(split_weights)
    names = [n for n, w in split_weights if w > 0]
    weights = np.array([w for _, w in split_weights if w > 0], dtype=float)
    wanted = [
        names[int(i)]
        for i in rng.choice(len(names), cfg.queries_per_image, p=weights / weights.sum())
    ]
    # Multi-target queries need a duplicated kind/colour: ask the layout for one.
    same = None
    if "multi" in wanted:
        same = "kind" if rng.random() < 0.7 else "colour"
    scene = make_scene(rng, cfg, same)
    image = paint_scene(rng, scene, cfg.image_size)

    referents: list[Referent] = []
    queries_meta: list[dict] = []
    for difficulty in wanted:
        enabled = [d for d in ("indirect", "direct") if weights_by_name.get(d, 0) > 0]
        # Fall back when the scene cannot support the wanted difficulty; a negative on an
        # absent colour+kind always exists, so the last resort never fails.
        query = None
        for d in dict.fromkeys([difficulty, *enabled, "negative"]):
            query = choose_query(rng, scene, split, d, cfg.image_size)
            if query is not None:
                break
        assert query is not None
        answer, explanation = write_answer(query, rng, scene, cfg.answer_style)
        if query.targets:
            masks = scene.visible[list(query.targets)].astype(np.uint8)
        else:
            masks = np.zeros((1, cfg.image_size, cfg.image_size), dtype=np.uint8)
        referents.append(
            Referent(
                text=query.text,
                is_sentence=query.template.is_sentence,
                masks=masks,
                keyword=query.keyword,
                answer=answer,
                difficulty=query.template.difficulty,
            )
        )
        queries_meta.append(
            {
                "template_id": query.template.id,
                "targets": list(query.targets),
                "explanation": explanation,
            }
        )
    meta = {
        "split": split,
        "image_seed": int(seed),
        "world_seed": cfg.seed,
        "objects": [
            {
                "kind": o.kind,
                "colour": o.colour,
                "cx": o.cx,
                "cy": o.cy,
                "radius": o.radius,
                "angle": o.angle,
                "z": o.z,
                "visible_area": int(a),
            }
            for o, a in zip(scene.objects, scene.areas, strict=True)
        ],
        "queries": queries_meta,
    }
    return SegRecord(
        sample_id=f"shapes_{split}_{seed:x}",
        source=SOURCE,
        referents=referents,
        image=image,
        meta=meta,
    )


def objects_from_meta(meta: dict) -> list[ShapeObject]:
    """Rebuild the :class:`ShapeObject` list (z-order) stored in a record's ``meta``."""
    return [
        ShapeObject(o["kind"], o["colour"], o["cx"], o["cy"], o["radius"], o["angle"], o["z"])
        for o in meta["objects"]
    ]


class ShapesDataset(Sequence[SegRecord]):
    """One split of the shapes world as a deterministic sequence of :class:`SegRecord`.

    ``dataset[i]`` is generated on demand (a few ms) and is the same on every call and
    machine; nothing is cached, so memory stays flat for any split size.
    """

    def __init__(self, split: str, config: ShapesConfig | None = None) -> None:
        check_split(split)
        self.split = split
        self.config = config or ShapesConfig()

    def __len__(self) -> int:
        return self.config.split_size(self.split)

    def __getitem__(self, index: int) -> SegRecord:  # type: ignore[override]
        if not isinstance(index, int | np.integer):
            raise TypeError("ShapesDataset indices must be integers")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"shapes {self.split} index {index} out of range (size {n})")
        return generate_sample(image_seed(self.split, int(index)), self.split, self.config)

    def __iter__(self) -> Iterator[SegRecord]:
        for i in range(len(self)):
            yield self[i]

    def image_seeds(self) -> list[int]:
        """The image seed of every record, in order."""
        return [image_seed(self.split, i) for i in range(len(self))]
