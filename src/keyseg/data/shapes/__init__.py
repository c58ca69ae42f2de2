"""A seeded procedural reasoning-segmentation world: the embedded default's training data.

Each image shows 2-6 coloured shapes (circle, square, triangle, star, ring, cross, diamond,
octagon in six colours) over a textured background, with overlaps. Masks are exact: every
instance is rasterised once (PIL ``ImageDraw`` on a binary canvas at the image's own
resolution, no anti-aliasing) and the image is *painted from* those rasters in z-order, so
an instance's mask is exactly the set of pixels that show its colour layer.

Queries come in graded difficulty and their *core concept* (the keyword) often differs from
the literal words:

================  ===========================================  ===========================
difficulty        example query                                keyword
================  ===========================================  ===========================
``direct``        "red triangle", "Where is the blue star?"   "red triangle", "blue star"
``attribute``     "the shape with a hole", "the green shape    "ring", the target's
                  with straight sides"                         "colour kind"
``relational``    "the largest shape", "the shape left of the  the target's "colour kind"
                  green ring"
``indirect``      "Which one looks like a stop sign?",         "octagon", "yellow"
                  "Which shape is the colour of a banana?"
``multi``         "all the circles" -> k masks, k ``[SEG]``,  "circle"
                  each after its target's name
``negative``      "purple cross" (none in the image)           "purple cross"
================  ===========================================  ===========================

A negative referent has **one all-zero mask** and an answer such as
"There is no such shape, [SEG]." - it still holds one ``[SEG]`` so every training sample has
the same structure (the mask decoder learns to output an empty mask), matching how
``Referent`` documents an all-zero target.

Keywords are 1-2 words from :data:`KEYWORD_VOCAB` (kinds, colours, "colour kind").

Splits: image seeds are ``split_code * 2**32 + index`` (:func:`image_seed`), so train / val /
test never share an image; and query templates in :data:`HELDOUT_TEMPLATE_IDS` are used only
in val and test, so the test split measures generalisation to unseen wordings.

Modules: :mod:`~keyseg.data.shapes.world` (vocabulary, :class:`ShapesConfig`, splits),
:mod:`~keyseg.data.shapes.geometry` (polygons, masks, scene layout),
:mod:`~keyseg.data.shapes.painting`, :mod:`~keyseg.data.shapes.queries` (templates, realisation,
answers), :mod:`~keyseg.data.shapes.dataset` (records, :class:`ShapesDataset`) and
:mod:`~keyseg.data.shapes.qa` (visual questions and answers about a scene, which pretrain the
tiny VLM).
:func:`~keyseg.data.reason_seg_export.export_reason_seg` (re-exported here) writes a split in
the ReasonSeg on-disk format (SPEC §5) plus a keyword file, so the real readers can be
exercised on it.
"""

from keyseg.data.reason_seg_export import export_reason_seg
from keyseg.data.shapes.dataset import ShapesDataset, generate_sample, objects_from_meta
from keyseg.data.shapes.geometry import (
    Scene,
    ShapeObject,
    cell_labels,
    render_object_mask,
    scene_from_objects,
    shape_polygons,
)
from keyseg.data.shapes.qa import (
    ALL_QUESTION_TYPES,
    OPTIONAL_QUESTION_TYPES,
    QA_HELDOUT_TEMPLATE_IDS,
    QA_SLOTS,
    QA_TEMPLATES,
    QUESTION_TYPES,
    REGIONS,
    QAPair,
    QATemplate,
    SceneView,
    answer,
    normalise_answer,
    qa_template_ids,
    record_qa,
    scene_from_record,
    scene_qa,
    view_scene,
)
from keyseg.data.shapes.queries import (
    COLOUR_CLUES,
    HELDOUT_TEMPLATE_IDS,
    KIND_CLUES,
    TEMPLATES,
    Query,
    Template,
    template_ids,
)
from keyseg.data.shapes.vqa import ShapesQADataset
from keyseg.data.shapes.world import (
    COLOURS,
    DIFFICULTIES,
    KEYWORD_VOCAB,
    KINDS,
    PLURALS,
    SOURCE,
    SPLIT_CODES,
    ShapesConfig,
    Split,
    image_seed,
)

__all__ = [
    "ALL_QUESTION_TYPES",
    "COLOURS",
    "COLOUR_CLUES",
    "DIFFICULTIES",
    "HELDOUT_TEMPLATE_IDS",
    "KEYWORD_VOCAB",
    "KINDS",
    "KIND_CLUES",
    "OPTIONAL_QUESTION_TYPES",
    "PLURALS",
    "QA_HELDOUT_TEMPLATE_IDS",
    "QA_SLOTS",
    "QA_TEMPLATES",
    "QUESTION_TYPES",
    "REGIONS",
    "SOURCE",
    "SPLIT_CODES",
    "TEMPLATES",
    "QAPair",
    "QATemplate",
    "Query",
    "Scene",
    "SceneView",
    "ShapeObject",
    "ShapesConfig",
    "ShapesDataset",
    "ShapesQADataset",
    "Split",
    "Template",
    "answer",
    "cell_labels",
    "export_reason_seg",
    "generate_sample",
    "image_seed",
    "normalise_answer",
    "objects_from_meta",
    "qa_template_ids",
    "record_qa",
    "render_object_mask",
    "scene_from_objects",
    "scene_from_record",
    "scene_qa",
    "shape_polygons",
    "template_ids",
    "view_scene",
]
