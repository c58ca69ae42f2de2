"""ReasonSeg writer: records -> ``NAME.jpg`` + ``NAME.json`` pairs and a keyword file, the
on-disk format :mod:`keyseg.data.reason_seg` reads (SPEC §5).

Masks become polygons that the reader's rasteriser
(:func:`~keyseg.data.reason_seg.rasterize_shapes`, LISA's) paints back into exactly the same
pixels, so procedural data (``keyseg data shapes-export``) exercises the real reader end to
end.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from keyseg.data.sample import SegRecord
from keyseg.errors import KeySegConfigError
from keyseg.io import atomic_write_json


def mask_to_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Polygons whose ReasonSeg rasterisation reproduces ``mask`` exactly.

    The rasteriser is the ReasonSeg reader's (:func:`keyseg.data.reason_seg.rasterize_shapes`,
    LISA's: integer vertices, a 1-pixel outline plus fill). Boundaries are traced along pixel
    edges (4-connected foreground), then moved half a pixel inwards so vertices sit on the
    centres of boundary pixels, where the outline is drawn; the fill covers the inside. Holes
    are joined to their enclosing outline by a zero-width bridge (the fill's even-odd rule
    leaves them empty), since the ReasonSeg format has no holes.

    Args:
        mask: ``(H, W)`` bool/uint8, foreground non-zero.

    Returns:
        one polygon ``[[x, y], ...]`` per connected outer boundary (holes merged in).
    """
    m = np.pad(np.asarray(mask) != 0, 1)
    fg = m[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # Directed pixel-edge segments with the foreground on a fixed side; corner (X, Y) is
    # the top-left corner of pixel (row Y, col X).
    rows, cols = np.nonzero(fg & ~m[:-2, 1:-1])  # top edges, walk -x
    segs = [((c + 1, r), (c, r)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    rows, cols = np.nonzero(fg & ~m[2:, 1:-1])  # bottom edges, walk +x
    segs += [
        ((c, r + 1), (c + 1, r + 1)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
    ]
    rows, cols = np.nonzero(fg & ~m[1:-1, :-2])  # left edges, walk +y
    segs += [((c, r), (c, r + 1)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    rows, cols = np.nonzero(fg & ~m[1:-1, 2:])  # right edges, walk -y
    segs += [
        ((c + 1, r + 1), (c + 1, r)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
    ]
    for a, b in segs:
        edges.setdefault(a, []).append(b)

    loops: list[list[tuple[int, int]]] = []
    while edges:
        start = next(iter(edges))
        loop = [start]
        cur, prev_dir = start, None
        while True:
            outs = edges[cur]
            if len(outs) == 1 or prev_dir is None:
                nxt = outs.pop(0)
            else:
                # Saddle vertex: turn towards the interior, keeping diagonal pixels apart.
                inward = (prev_dir[1], -prev_dir[0])
                nxt = min(outs, key=lambda p: 0 if (p[0] - cur[0], p[1] - cur[1]) == inward else 1)
                outs.remove(nxt)
            if not outs:
                del edges[cur]
            prev_dir = (nxt[0] - cur[0], nxt[1] - cur[1])
            cur = nxt
            if cur == start:
                break
            loop.append(cur)
        loops.append(loop)

    def corners(loop: list[tuple[int, int]]) -> np.ndarray:
        """Direction-change vertices moved half a pixel inwards -> pixel centres (x, y)."""
        pts = np.array(loop)
        d_in = pts - np.roll(pts, 1, axis=0)
        d_out = np.roll(pts, -1, axis=0) - pts
        keep = np.any(d_in != d_out, axis=1)
        n_in = np.stack([d_in[:, 1], -d_in[:, 0]], axis=1)
        n_out = np.stack([d_out[:, 1], -d_out[:, 0]], axis=1)
        shifted = pts * 2 - 1 + n_in + n_out  # doubled coordinates: stay integer
        return (shifted[keep] // 2).astype(int)

    def signed_area(loop: list[tuple[int, int]]) -> float:
        p = np.array(loop, dtype=float)
        return 0.5 * float(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))

    def contains(loop: list[tuple[int, int]], x: float, y: float) -> bool:
        p = np.array(loop, dtype=float)
        q = np.roll(p, -1, axis=0)
        crosses = (p[:, 1] > y) != (q[:, 1] > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = p[:, 0] + (y - p[:, 1]) * (q[:, 0] - p[:, 0]) / (q[:, 1] - p[:, 1])
        return bool(np.count_nonzero(crosses & (xs > x)) % 2)

    areas = [signed_area(lp) for lp in loops]
    # Outer loops run one way round, holes the other; the outer sign is that of the biggest.
    outer_sign = np.sign(areas[int(np.argmax(np.abs(areas)))]) if loops else 1.0
    outers = [i for i, a in enumerate(areas) if np.sign(a) == outer_sign]
    polys = {i: corners(loops[i]) for i in outers}
    for h, a in enumerate(areas):
        if np.sign(a) == outer_sign:
            continue
        # A point strictly inside the hole: the centre of the background pixel next to
        # the hole's first edge (pixel centres never lie on pixel edges).
        (x0, y0), (x1, y1) = loops[h][0], loops[h][1]
        dx, dy = x1 - x0, y1 - y0
        px, py = (x0 + x1) / 2 - dy * 0.5, (y0 + y1) / 2 + dx * 0.5  # corner coordinates
        holders = [i for i in outers if contains(loops[i], px, py)]
        if not holders:
            continue
        owner = min(holders, key=lambda i: abs(areas[i]))
        hole = corners(loops[h])
        outer = polys[owner]
        dist = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
        # outer[..i] -> hole[j..] -> hole[..j] -> outer[i..]: a zero-width bridge.
        polys[owner] = np.concatenate([outer[: i + 1], hole[j:], hole[: j + 1], outer[i:]], axis=0)
    return [polys[i].tolist() for i in outers]


def export_reason_seg(
    dataset: Sequence[SegRecord],
    out_dir: str | Path,
    keyword_file: str | Path | None = None,
    limit: int | None = None,
) -> list[str]:
    """Write records in the ReasonSeg on-disk format (SPEC §5) plus a keyword file.

    For each referent: ``NAME.jpg`` (JPEG quality 95) and ``NAME.json`` with ``shapes``
    (one ``{"label": "target", "points": [[x, y], ...]}`` per traced polygon of the union of
    its masks; none for a negative), ``text`` (``[query]``) and ``is_sentence``. ReasonSeg
    has one mask per file, so a multi-target referent is exported as the union of its
    masks. The keyword file (``keyword_outputs.json`` format: a list of ``{query, outputs,
    image, json, keyword}``) goes to ``keyword_file`` (default ``out_dir /
    "keyword_outputs.json"``).

    Returns:
        the exported NAMEs, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    names: list[str] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for idx in range(n):
        record = dataset[idx]
        if record.image is None:
            raise KeySegConfigError(f"{record.sample_id}: export needs records with .image set")
        queries = record.meta.get("queries", [{}] * len(record.referents))
        for j, (ref, qmeta) in enumerate(zip(record.referents, queries, strict=True)):
            name = record.sample_id if len(record.referents) == 1 else f"{record.sample_id}_{j}"
            union = np.any((ref.masks != 0) & (ref.masks != 255), axis=0)
            shapes = [
                {"label": "target", "points": poly, "shape_type": "polygon"}
                for poly in mask_to_polygons(union)
            ]
            record.image.convert("RGB").save(out / f"{name}.jpg", quality=95)
            doc = {"shapes": shapes, "text": [ref.text], "is_sentence": ref.is_sentence}
            atomic_write_json(out / f"{name}.json", doc, indent=1)
            entries.append(
                {
                    "query": ref.text,
                    "outputs": qmeta.get("explanation", ref.answer or ""),
                    "image": f"{name}.jpg",
                    "json": f"{name}.json",
                    "keyword": ref.keyword,
                }
            )
            names.append(name)
    atomic_write_json(
        Path(keyword_file) if keyword_file else out / "keyword_outputs.json", entries, indent=1
    )
    return names
