"""KeySegPipeline on a random tiny model: shapes, sizes, caching, cache==no-cache, history."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import answer_ids, forced
from keyseg import pipeline as pipeline_module
from keyseg.errors import KeySegError, KeySegInputError
from keyseg.pipeline import NO_SEG_MESSAGE, KeySegPipeline, Result
from keyseg.tokens import Turn


@pytest.fixture(scope="module")
def model():
    from keyseg.build import build_tiny_model

    return build_tiny_model(seed=3).eval()


@pytest.fixture
def pipe(model):
    return KeySegPipeline(model, max_new_tokens=12)


def scripted(pipe, text="Sure, they are", segs=1, keyword="spoon"):
    return forced(answer_ids(pipe.processor, text, segs, keyword))


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_result_types_and_shapes_with_two_seg_answer(pipe):
    result = pipe(image(30, 50), "What would you use to eat soup?",
                  logits_processor=scripted(pipe, segs=2), return_logits=True)
    assert isinstance(result, Result)
    assert result.answer.count("[SEG]") == 2 and result.keyword == "spoon"
    assert result.masks.dtype == np.bool_ and result.masks.shape == (2, 30, 50)
    assert result.scores.shape == (2,) and result.scores.dtype == np.float32
    assert result.mask_logits.shape == (2, 30, 50)
    assert np.array_equal(result.masks, (result.mask_logits > 0).numpy())
    # a note exactly when no pixel is selected (the empty-mask cases are tested below)
    assert (result.message is None) == bool(result.masks.any())
    (neighbours,) = result.keyword_neighbours
    assert len(neighbours) == pipe.num_neighbours
    cosines = [c for _, c in neighbours]
    assert all(isinstance(t, str) and t for t, _ in neighbours)
    assert cosines == sorted(cosines, reverse=True)
    assert "[SEG]" not in result.text and "spoon" not in result.text


def _neighbours_by_hand(pipe, key, k):
    """Brute force: cosine of ``key`` with every projected row, special tokens and pieces
    that decode to nothing readable skipped, best first."""
    tokenizer = pipe.processor.tokenizer
    ids = pipe.processor.ids
    with torch.no_grad():
        table = pipe.model.projected_table().float()
    special = {ids.seg, ids.key, ids.image, ids.eos, ids.pad, *tokenizer.all_special_ids}
    scored = []
    for token in range(table.shape[0]):
        if token in special:
            continue
        cosine = float(torch.dot(key, table[token]) / (key.norm() * table[token].norm()))
        text = tokenizer.decode([token]).strip()
        if text and "\ufffd" not in text:
            scored.append((cosine, text))
    scored.sort(key=lambda item: -item[0])
    return [(text, cosine) for cosine, text in scored[:k]]


def test_keyword_neighbours_are_the_best_cosines_of_the_whole_vocabulary(pipe, monkeypatch):
    seen = []
    original = pipe.keyword_neighbours

    def recording(key, k=None):
        seen.append(key.detach().clone())
        return original(key, k)

    monkeypatch.setattr(pipe, "keyword_neighbours", recording)
    result = pipe(image(30, 50), "What would you use to eat soup?",
                  logits_processor=scripted(pipe, segs=1))
    (key,) = seen
    assert key.shape[0] == 1
    (got,) = result.keyword_neighbours
    expected = _neighbours_by_hand(pipe, key[0].float(), pipe.num_neighbours)
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_keyword_neighbours_never_list_special_tokens(pipe):
    ids = pipe.processor.ids
    with torch.no_grad():
        table = pipe.model.projected_table()
    # a [KEY] equal to the [SEG] row: [SEG] itself is not a word to show
    (row,) = pipe.keyword_neighbours(table[ids.seg][None], k=4)
    texts = [t for t, _ in row]
    assert "[SEG]" not in texts and "[KEY]" not in texts
    assert texts == [t for t, _ in _neighbours_by_hand(pipe, table[ids.seg].float(), 4)]


def _fixed_masks(monkeypatch, model, value):
    """Make SAM's post-processing return logits of one sign everywhere."""
    original = model.sam.postprocess_masks

    def fixed(low, resized, original_size):
        out = original(low, resized, original_size)
        return torch.full_like(out, value)

    monkeypatch.setattr(model.sam, "postprocess_masks", fixed)


def test_empty_mask_gets_the_empty_mask_message(pipe, model, monkeypatch):
    _fixed_masks(monkeypatch, model, -5.0)
    result = pipe(image(30, 50), "the dog", logits_processor=scripted(pipe, segs=1))
    assert result.masks.shape == (1, 30, 50) and not result.masks.any()
    assert result.message is not None and "empty" in result.message
    assert result.message != NO_SEG_MESSAGE


def test_non_empty_mask_has_no_message(pipe, model, monkeypatch):
    _fixed_masks(monkeypatch, model, 5.0)
    result = pipe(image(30, 50), "the dog", logits_processor=scripted(pipe, segs=1))
    assert result.masks.all() and result.message is None


def test_masks_have_original_size_for_non_square_inputs_of_every_form(pipe, tmp_path):
    path = tmp_path / "tall.png"
    Image.fromarray(image(90, 20, seed=1)).save(path)
    inputs = [image(37, 91), Image.fromarray(image(64, 48, seed=2)), str(path)]
    results = pipe(inputs, ["a", "b", "c"], logits_processor=scripted(pipe))
    assert [r.masks.shape for r in results] == [(1, 37, 91), (1, 64, 48), (1, 90, 20)]


def test_answer_without_seg_gives_empty_mask_list_and_message(pipe):
    result = pipe(image(30, 50), "Is there a dog?",
                  logits_processor=scripted(pipe, text=" No.", segs=0, keyword=None))
    assert result.masks.shape == (0, 30, 50) and len(result.masks) == 0
    assert result.scores.shape == (0,) and result.keyword is None
    assert result.keyword_neighbours == [] and result.message == NO_SEG_MESSAGE


def test_sam_embedding_computed_once_for_two_queries_on_one_image(pipe, model, monkeypatch):
    calls = []
    original = model.encode_images

    def counting(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    monkeypatch.setattr(model, "encode_images", counting)
    picture = image(40, 60)
    pipe.set_image(picture)
    pipe.ask("first question", logits_processor=scripted(pipe))
    pipe.ask("second question", logits_processor=scripted(pipe))
    pipe(picture.copy(), "same pixels, new array")  # cache is keyed by content
    assert calls == [1]
    pipe(image(40, 60, seed=9), "another image")
    assert calls == [1, 1]


def test_generation_with_kv_cache_gives_same_tokens_and_masks_as_without(pipe):
    picture = image(30, 50)
    # A forced prefix with [SEG]/[KEY], then free greedy tokens after it.
    runs = []
    for use_cache in (True, False):
        ids = pipe.processor.ids
        prefix = [*answer_ids(pipe.processor, "It is", 1)[:-1], ids.key]
        runs.append(pipe(picture, "what is it", max_new_tokens=10, use_cache=use_cache,
                         return_logits=True,
                         logits_processor=forced(prefix)))
    cached, naive = runs
    assert cached.answer == naive.answer
    assert cached.masks.shape == naive.masks.shape == (1, 30, 50)
    torch.testing.assert_close(cached.mask_logits, naive.mask_logits, rtol=1e-4, atol=1e-4)


def test_chat_history_masks_come_from_the_new_answer_only(pipe):
    pipe.set_image(image(30, 50))
    first = pipe.ask("all the circles", logits_processor=scripted(pipe, segs=2))
    second = pipe.ask("and the largest one?", logits_processor=scripted(pipe, segs=1))
    assert first.masks.shape[0] == 2 and second.masks.shape[0] == 1
    assert [t.answer for t in pipe.history] == [first.answer, second.answer]
    pipe.set_image(image(30, 50, seed=5))
    assert pipe.history == []


def test_history_changes_the_prompt(pipe):
    picture = image(30, 50)
    plain = pipe(picture, "what now?", return_logits=True,
                 logits_processor=scripted(pipe, segs=1, keyword=None))
    history = [Turn("Where is the cup? Please output segmentation mask.", "It is [SEG].")]
    follow = pipe(picture, "what now?", history=history, return_logits=True,
                  logits_processor=scripted(pipe, segs=1, keyword=None))
    assert not torch.allclose(plain.mask_logits, follow.mask_logits)


def test_keyword_neighbours_of_a_projected_token_rank_that_token_first(pipe):
    """A key near (not at) a word's projected row lists that word first, and the rest in
    the order a brute-force search gives."""
    tokenizer = pipe.processor.tokenizer
    token = tokenizer(" spoon", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        table = pipe.model.projected_table()
    torch.manual_seed(0)
    direction = torch.randn_like(table[token])
    key = table[token] + 0.05 * table[token].norm() * direction / direction.norm()
    (row,) = pipe.keyword_neighbours(key[None], k=3)
    assert row[0][0] == tokenizer.decode([token]).strip()
    assert 0.9 < row[0][1] < 1.0
    expected = _neighbours_by_hand(pipe, key.float(), 3)
    assert [t for t, _ in row] == [t for t, _ in expected]


def test_from_pretrained_without_default_builds_random_model_with_warning(monkeypatch, capsys,
                                                                         tmp_path, model):
    monkeypatch.setattr(pipeline_module, "default_checkpoint", lambda: None)
    pipe = KeySegPipeline.from_pretrained(None, device="cpu")
    assert "UNTRAINED" in capsys.readouterr().err
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    model.save_pretrained(tmp_path / "ckpt")
    loaded = KeySegPipeline.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert "UNTRAINED" not in capsys.readouterr().err
    picture = image(30, 50)
    a = KeySegPipeline(model)(picture, "q", return_logits=True, logits_processor=scripted(pipe))
    b = loaded(picture, "q", return_logits=True, logits_processor=scripted(loaded))
    assert a.answer == b.answer
    torch.testing.assert_close(a.mask_logits, b.mask_logits)


def test_quantized_loading_without_cuda_is_a_clear_error():
    with pytest.raises(KeySegError, match="CUDA"):
        KeySegPipeline.from_pretrained(None, device="cpu", load_in="4bit")


def test_oversized_array_is_refused(pipe):
    small = KeySegPipeline(pipe.model, max_pixels=100)
    with pytest.raises(KeySegError, match="over the limit"):
        small(image(20, 20), "q")


@pytest.mark.parametrize("load_in", ["4bit", "8bit"])
def test_quantisation_config_covers_only_the_language_model(model, load_in):
    """What transformers' bitsandbytes integration would convert with our config: every
    Linear of the language model's layers, and none of the vision tower, projector, lm_head,
    SAM or KeySeg heads."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from keyseg.pipeline import quantization_config

    config = quantization_config(load_in, torch.bfloat16)
    assert getattr(config, f"load_in_{load_in}")
    skip = config.llm_int8_skip_modules
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    language = [n for n in linears if ".language_model." in n]
    others = [n for n in linears if ".language_model." not in n]
    assert language and others
    assert all(should_convert_module(n, skip) for n in language)
    assert not any(should_convert_module(n, skip) for n in others)


@pytest.mark.parametrize(("answer", "shown"), [
    ("It is the green octagon, [SEG].", "It is the green octagon."),
    ("Sure, [SEG].", "Sure."),
    ("They are [SEG], [SEG] and [SEG].", "They are."),
    ("Sure, it is [SEG]. [KEY] spoon", "Sure, it is."),
    ("There is no such shape.", "There is no such shape."),
    ("It is [SEG] because it is round.", "It is because it is round."),
    ("[SEG].", ""),
])
def test_display_text_leaves_no_dangling_glue_where_seg_stood(answer, shown):
    from keyseg.pipeline import display_text

    assert display_text(answer) == shown
# --- question wrapping, reset, device / dtype choice, quantisation ---------------------------


def test_question_is_wrapped_unless_it_asks_for_a_segmentation_itself(model):
    pipe = KeySegPipeline(model)
    assert pipe.format_question("  Where is the cup?  ") == (
        "Where is the cup? Please output segmentation mask.")
    assert pipe.format_question("Please SEGMENT the cup.") == "Please SEGMENT the cup."
    assert pipe.format_question("segmentation of the dog") == "segmentation of the dog"
    custom = KeySegPipeline(model, question_template="Q: {query} (mask)")
    assert custom.format_question("the cup") == "Q: the cup (mask)"
    plain = KeySegPipeline(model, question_template=None)
    assert plain.format_question(" the cup ") == "the cup"
    for empty in ("", "   \n"):
        with pytest.raises(KeySegInputError, match="empty"):
            pipe.format_question(empty)


def test_the_wrapped_question_is_what_the_model_reads(pipe, monkeypatch):
    seen = []
    original = pipe.processor.encode

    def recording(turns, *args, **kwargs):
        seen.append([t.question for t in turns])
        return original(turns, *args, **kwargs)

    monkeypatch.setattr(pipe.processor, "encode", recording)
    pipe(image(30, 50), "the cup", max_new_tokens=2)
    assert seen == [["the cup Please output segmentation mask."]]


def test_reset_forgets_the_conversation_but_keeps_the_image(pipe, model, monkeypatch):
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images",
                        lambda pixels: calls.append(1) or original(pixels))
    pipe.set_image(image(30, 50, seed=4))
    pipe.ask("first", logits_processor=scripted(pipe))
    assert len(pipe.history) == 1
    assert pipe.history[0].question == "first Please output segmentation mask."
    pipe.reset()
    assert pipe.history == []
    fresh = pipe.ask("first", logits_processor=scripted(pipe), return_logits=True)
    again = KeySegPipeline(model, max_new_tokens=12)(image(30, 50, seed=4), "first",
                                                     logits_processor=scripted(pipe),
                                                     return_logits=True)
    torch.testing.assert_close(fresh.mask_logits, again.mask_logits)  # no history left
    assert len(calls) == 2  # set_image once; the second pipeline has its own cache
    pipe.ask("not remembered", remember=False, logits_processor=scripted(pipe))
    assert len(pipe.history) == 1


def test_ask_before_set_image_is_a_clear_error(model):
    with pytest.raises(KeySegInputError, match="set_image"):
        KeySegPipeline(model).ask("where?")


def test_device_and_dtype_choice(monkeypatch):
    from keyseg.errors import KeySegConfigError
    from keyseg.pipeline import resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype(None, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype(None, cuda) == torch.float16
    assert resolve_dtype("BF16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype(torch.float64, cpu) == torch.float64
    with pytest.raises(KeySegConfigError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)


def test_pipeline_moves_the_model_to_the_dtype_it_is_given(tmp_path):
    from keyseg.build import build_tiny_model

    build_tiny_model(seed=1).save_pretrained(tmp_path / "m")
    pipe = KeySegPipeline.from_pretrained(tmp_path / "m", device="cpu", dtype="bf16",
                                          max_new_tokens=12)
    assert pipe.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    assert all(p.dtype == torch.bfloat16 for p in pipe.model.parameters())
    result = pipe(image(30, 50), "q", logits_processor=scripted(pipe, segs=1))
    assert result.masks.shape == (1, 30, 50) and result.scores.dtype == np.float32
    as_float = KeySegPipeline(pipe.model, dtype=torch.float32)
    assert as_float.dtype == torch.float32


def test_quantised_loading_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    import sys

    from keyseg.errors import KeySegConfigError
    from keyseg.pipeline import _check_quantization

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(KeySegError, match="pip install bitsandbytes"):
        _check_quantization("4bit", torch.device("cuda"))
    with pytest.raises(KeySegError, match="CUDA"):
        _check_quantization("8bit", torch.device("cpu"))
    with pytest.raises(KeySegConfigError, match="'4bit' or '8bit'"):
        _check_quantization("2bit", torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("load_in", ["4bit", "8bit"])
def test_quantised_pipeline_runs_on_cuda(load_in, tmp_path):
    pytest.importorskip("bitsandbytes")
    from keyseg.build import build_tiny_model

    build_tiny_model(seed=1).save_pretrained(tmp_path / "m")
    pipe = KeySegPipeline.from_pretrained(tmp_path / "m", load_in=load_in, max_new_tokens=12)
    assert pipe.device.type == "cuda"
    result = pipe(image(30, 50), "q", logits_processor=scripted(pipe, segs=1))
    assert result.masks.shape == (1, 30, 50)


@pytest.mark.cuda
def test_default_device_and_dtype_on_cuda(tmp_path):
    from keyseg.build import build_tiny_model

    build_tiny_model(seed=1).save_pretrained(tmp_path / "m")
    pipe = KeySegPipeline.from_pretrained(tmp_path / "m", max_new_tokens=12)
    assert pipe.device.type == "cuda"
    assert pipe.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    result = pipe(image(30, 50), "q", logits_processor=scripted(pipe, segs=1))
    assert result.masks.shape == (1, 30, 50) and result.scores.dtype == np.float32
