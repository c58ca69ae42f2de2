"""The shapes world's visual QA as training records: the ``shapes_qa`` dataset.

LISA and KeySeg fine-tune on a mixture that includes LLaVA's visual-QA conversations, so the
language model keeps answering about images while it learns to segment. ``shapes_qa`` is that
share of the lab's mixture: the train images of the shapes world, each with text-only
referents (:attr:`keyseg.data.sample.Referent.text_only`) asking the questions of
:mod:`keyseg.data.shapes.qa`, the same questions the stage 2 VLM was pretrained on
(``experiments/pretrain_vlm.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keyseg.data.sample import Referent, SegRecord
from keyseg.data.shapes.dataset import ShapesDataset
from keyseg.data.shapes.qa import record_qa
from keyseg.data.shapes.world import ShapesConfig

SOURCE = "shapes_qa"


class ShapesQADataset(Sequence[SegRecord]):
    """One split of the shapes world, each record's referents questions about its image.

    ``dataset[i]`` has the image of ``ShapesDataset(split)[i]`` and one text-only referent
    per question type of ``config.qa_types`` that the scene can answer clearly (in that
    order); deterministic, generated on demand.
    """

    def __init__(self, split: str, config: ShapesConfig | None = None) -> None:
        self.images = ShapesDataset(split, config)
        self.config = self.images.config

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> SegRecord:  # type: ignore[override]
        record = self.images[index]
        size = self.config.image_size
        no_masks = np.zeros((0, size, size), dtype=np.uint8)
        pairs = record_qa(record, types=self.config.qa_types,
                          restate=self.config.qa_restate_existence)
        referents = [
            Referent(text=pair.question, is_sentence=True, masks=no_masks, answer=pair.answer,
                     difficulty=f"qa:{pair.qtype}", text_only=True)
            for pair in pairs
        ]
        meta = {**record.meta, "queries": [{"template_id": p.template_id} for p in pairs]}
        return SegRecord(sample_id=record.sample_id.replace("shapes_", "shapes_qa_", 1),
                         source=SOURCE, referents=referents, image=record.image, meta=meta)
