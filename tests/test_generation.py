"""generate(): masks from the generation pass equal teacher-forced masks on the same ids."""

from __future__ import annotations

import random

import torch

from helpers import answer_ids, forced, make_record
from keyseg.batch import Batch
from keyseg.data.collate import Collator, record_to_example
from keyseg.generation import generate


def test_generated_masks_equal_teacher_forced_masks(tiny_model_factory):
    model = tiny_model_factory(seed=1).eval()
    processor = model.processor
    example = record_to_example(make_record(height=30, width=50), random.Random(0))
    example.conversations = example.conversations[:1]
    batch = Collator(processor, mode="prompt")([example])
    script = answer_ids(processor, " It is", segs=1, keyword="spoon")
    results = generate(model, batch, max_new_tokens=20,
                       logits_processor=forced(script, batch.input_ids.shape[1]))
    (result,) = results
    assert result.output_ids.tolist() == script
    assert "[SEG]" in result.answer and result.keyword == "spoon"
    assert result.masks.shape == (1, 30, 50)
    teacher = Batch(
        input_ids=torch.cat([batch.input_ids[0], result.output_ids])[None],
        attention_mask=torch.ones(1, batch.input_ids.shape[1] + len(script), dtype=torch.long),
        vision_inputs=batch.vision_inputs,
        sam_pixel_values=batch.sam_pixel_values,
        image_index=batch.image_index,
        resized_sizes=batch.resized_sizes,
        original_sizes=batch.original_sizes,
    )
    torch.testing.assert_close(result.masks, model.predict(teacher)[0], rtol=1e-4, atol=1e-4)


def test_answer_without_seg_gives_no_masks_and_stops_at_eos(tiny_model_factory):
    model = tiny_model_factory(seed=2).eval()
    processor = model.processor
    example = record_to_example(make_record(), random.Random(0))
    batch = Collator(processor, mode="prompt")([example])
    script = answer_ids(processor, " No.")
    results = generate(model, batch, max_new_tokens=10,
                       logits_processor=forced(script, batch.input_ids.shape[1]))
    assert len(results) == 2  # two conversations about one image, left-padded together
    for result in results:
        assert result.output_ids.tolist() == script
        assert result.masks.shape == (0, 40, 60) and result.keyword is None
