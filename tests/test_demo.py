"""The demo's request handler without a browser: upload limits, and a new image starting a
new conversation (the browser test drives the same app end to end)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import answer_ids, forced
from keyseg.pipeline import KeySegPipeline

gr = pytest.importorskip("gradio")


class Scripted(KeySegPipeline):
    """Answers ' Sure, [SEG]. [KEY] spoon' and records the history it was given."""

    def __call__(self, *args, **kwargs):
        self.histories = [*getattr(self, "histories", []), list(kwargs.get("history") or [])]
        kwargs["logits_processor"] = forced(answer_ids(self.processor, " Sure,", 1, "spoon"))
        return super().__call__(*args, **kwargs)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from keyseg.build import build_tiny_model
    from keyseg.demo import build_demo

    pipe = Scripted(build_tiny_model(seed=4).eval(), max_new_tokens=12)
    demo = build_demo(pipe, examples_dir=tmp_path_factory.mktemp("examples"), max_pixels=2_000_000)
    handlers = {f.fn.__name__: f.fn for f in demo.fns.values() if f.fn is not None}
    return pipe, handlers["respond"], handlers["clear"]


def _png(path, height, width, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_upload_over_the_pixel_limit_is_refused_politely(app, tmp_path):
    _, respond, _ = app
    big = tmp_path / "big.png"
    Image.new("RGB", (1500, 1500)).save(big)  # 2.25 MP > 2 MP
    big = str(big)
    with pytest.raises(gr.Error, match="too large: please upload one under 2 megapixels"):
        respond(big, "where?", [], None)


def test_unreadable_upload_and_missing_inputs_are_refused(app, tmp_path):
    _, respond, _ = app
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(gr.Error, match="could not be read as an image"):
        respond(str(broken), "where?", [], None)
    with pytest.raises(gr.Error, match="upload an image first"):
        respond(None, "where?", [], None)
    with pytest.raises(gr.Error, match="type a question"):
        respond(_png(tmp_path / "a.png", 30, 50), "   ", [], None)


def test_follow_up_keeps_the_conversation_and_a_new_image_starts_a_new_one(app, tmp_path):
    pipe, respond, clear = app
    pipe.histories = []
    first = _png(tmp_path / "a.png", 30, 50)
    overlay, answer, keyword, chat, session, query = respond(first, "the cup", [], None)
    assert query == "" and "[SEG]" not in answer and "spoon" in keyword
    assert isinstance(overlay, Image.Image) and overlay.size == (50, 30)
    assert [m["role"] for m in chat] == ["user", "assistant"]
    _, _, _, chat, session, _ = respond(first, "and now?", chat, session)
    assert len(chat) == 4 and len(session["turns"]) == 2
    assert [len(h) for h in pipe.histories] == [0, 1]
    assert pipe.histories[1][0].question == "the cup Please output segmentation mask."
    # a different image: the history and the chat start again
    other = _png(tmp_path / "b.png", 30, 50, seed=1)
    _, _, _, chat, session, _ = respond(other, "the cup", chat, session)
    assert len(chat) == 2 and len(session["turns"]) == 1
    assert pipe.histories[-1] == []
    # the same pixels in another file are the same image: the conversation goes on
    again = _png(tmp_path / "b_copy.png", 30, 50, seed=1)
    _, _, _, chat, session, _ = respond(again, "more?", chat, session)
    assert len(chat) == 4 and len(pipe.histories[-1]) == 1
    assert clear() == (None, "", "", [], None, "")


def test_launch_passes_the_file_size_limit_and_queues_one_request_at_a_time(monkeypatch):
    from keyseg import demo as demo_module

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(launch=kw))
    original_queue = gr.Blocks.queue

    def queue(self, **kw):
        seen["queue"] = kw
        return original_queue(self, **kw)

    monkeypatch.setattr(gr.Blocks, "queue", queue)
    from keyseg.build import build_tiny_model

    demo_module.launch(KeySegPipeline(build_tiny_model(seed=4)), port=7999,
                       max_file_size="3mb")
    assert seen["launch"]["max_file_size"] == "3mb"
    assert seen["launch"]["server_port"] == 7999 and seen["launch"]["share"] is False
    assert seen["queue"]["default_concurrency_limit"] == 1
    assert demo_module.DEFAULT_MAX_FILE_SIZE == "20mb"


def test_demo_examples_show_one_query_per_family(tmp_path):
    from keyseg.data.shapes import ShapesDataset
    from keyseg.demo import example_inputs

    examples = example_inputs(tmp_path, count=4)
    assert len(examples) == 4
    dataset = ShapesDataset("val")
    difficulties = []
    for path, query in examples:
        index = int(Path(path).stem.rsplit("_", 1)[1])
        assert Path(path).is_file()
        matches = [r.difficulty for r in dataset[index].referents if r.text == query]
        assert matches, query
        difficulties.append(matches[0])
    assert difficulties == ["indirect", "multi", "relational", "attribute"]
