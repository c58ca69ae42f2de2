from __future__ import annotations

import pytest
import torch

from keyseg import tokens
from keyseg.errors import KeySegInputError
from keyseg.model.tiny import build_tiny_tokenizer

SYSTEM = "A chat."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokens.special_token_ids(tokenizer)


def test_special_tokens_are_added_once_and_atomic(tokenizer):
    size = len(tokenizer)
    assert tokens.add_special_tokens(tokenizer) == []  # idempotent
    assert len(tokenizer) == size
    seg = tokenizer.convert_tokens_to_ids(tokens.SEG_TOKEN)
    assert tokenizer("x [SEG] y", add_special_tokens=False)["input_ids"].count(seg) == 1


@pytest.mark.parametrize("num_image_tokens", [1, 16, 100])
def test_labels_cover_only_the_assistant_answer(tokenizer, ids, num_image_tokens):
    turns = [tokens.Turn("What is red?", tokens.with_keyword("Sure, [SEG].", "apple"))]
    enc = tokens.encode_conversation(tokenizer, turns, ids, num_image_tokens, SYSTEM)
    supervised = enc.labels[enc.labels != tokens.IGNORE_INDEX]
    assert tokens.tidy_spacing(tokenizer.decode(supervised)) == "Sure, [SEG]. [KEY] apple</s>"
    assert int((enc.input_ids == ids.image).sum()) == num_image_tokens
    # label positions hold the input ids themselves (shift happens in the loss)
    mask = enc.labels != tokens.IGNORE_INDEX
    assert torch.equal(enc.labels[mask], enc.input_ids[mask])


def test_multi_turn_supervises_every_answer_and_no_question(tokenizer, ids):
    turns = [tokens.Turn("first?", "It is [SEG]."), tokens.Turn("second?", "Sure, [SEG].")]
    enc = tokens.encode_conversation(tokenizer, turns, ids, 4, SYSTEM)
    text = tokens.tidy_spacing(tokenizer.decode(enc.labels[enc.labels != tokens.IGNORE_INDEX]))
    assert "It is [SEG].</s>" in text and "Sure, [SEG].</s>" in text
    assert "first" not in text and "second" not in text and "USER" not in text


def test_first_answer_token_after_the_prompt_is_supervised(tokenizer, ids):
    """Whatever token follows "ASSISTANT:" (a lone space piece in byte-level BPE) is what
    generation must produce first, so it must carry a label."""
    turns = [tokens.Turn("q?", "Sure, [SEG].")]
    full = tokens.encode_conversation(tokenizer, turns, ids, 4, SYSTEM)
    prompt = tokens.encode_conversation(tokenizer, [tokens.Turn("q?")], ids, 4, SYSTEM)
    first = len(prompt.input_ids)
    assert torch.equal(full.input_ids[:first], prompt.input_ids)
    assert int(full.labels[first]) == int(full.input_ids[first])
    assert bool((full.labels[:first] == tokens.IGNORE_INDEX).all())


def test_generation_prompt_ends_at_assistant(tokenizer, ids):
    enc = tokens.encode_conversation(tokenizer, [tokens.Turn("q?")], ids, 4, SYSTEM)
    assert tokenizer.decode(enc.input_ids).endswith("ASSISTANT:")
    assert bool((enc.labels == tokens.IGNORE_INDEX).all())


@pytest.mark.parametrize("num_image_tokens", [7, 16, 576])
def test_special_positions_follow_expanded_ids(tokenizer, ids, num_image_tokens):
    turns = [tokens.Turn("q?", tokens.with_keyword("It is [SEG] and [SEG].", "red cup"))]
    enc = tokens.encode_conversation(tokenizer, turns, ids, num_image_tokens, SYSTEM)
    at = tokens.special_positions(enc.input_ids, ids.seg, "at")
    assert len(at) == 2 and all(int(enc.input_ids[p]) == ids.seg for p in at)
    before = tokens.special_positions(enc.input_ids, ids.seg, "before")
    assert torch.equal(before, at - 1)
    key_at = tokens.special_positions(enc.input_ids, ids.key, "at")
    image_end = int((enc.input_ids == ids.image).nonzero().max())
    assert int(key_at[0]) > image_end + 1
    keyword = tokens.keyword_token_ids(enc.input_ids, ids)
    assert tokenizer.decode(keyword[0]).strip() == "red cup"


def test_image_placeholder_must_appear_once(tokenizer, ids):
    with pytest.raises(KeySegInputError, match="exactly one"):
        tokens.encode_conversation(tokenizer, [tokens.Turn("<image> again", "x")], ids, 4, SYSTEM)


def test_answer_templates_hold_one_seg_per_mask():
    import random

    rng = random.Random(0)
    for k in (1, 2, 5):
        for _ in range(10):
            assert tokens.format_answer(k, rng).count(tokens.SEG_TOKEN) == k
    assert tokens.with_keyword("It is [SEG].", None) == "It is [SEG]."
    assert tokens.with_keyword("It is [SEG]. ", "spoon") == "It is [SEG]. [KEY] spoon"


def _pieces(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


@pytest.mark.parametrize("strip", [True, False])
def test_lisa_convention_leaves_no_lone_space_piece_next_to_added_tokens(strip):
    """"lisa": [SEG]/[KEY] absorb the spaces around them, so the state before [SEG] is that
    of the last word and the keyword starts with its own first piece; "v0" keeps the space
    (a lone piece before each added token), as directories written before the change did."""
    tokenizer = build_tiny_tokenizer()
    tokens.add_special_tokens(tokenizer, strip_spaces=strip)
    ids = tokens.special_token_ids(tokenizer)
    turns = [tokens.Turn("q?", tokens.with_keyword("Sure, it is [SEG].", "apple"))]
    enc = tokens.encode_conversation(tokenizer, turns, ids, 4, SYSTEM,
                                     convention="lisa" if strip else "v0")
    pieces = _pieces(tokenizer, enc.input_ids)
    seg, key = pieces.index(tokens.SEG_TOKEN), pieces.index(tokens.KEY_TOKEN)
    lone = {"Ġ", "▁", " "}
    standalone = _pieces(tokenizer, tokenizer("apple", add_special_tokens=False)["input_ids"])
    keyword = _pieces(tokenizer, tokens.keyword_token_ids(enc.input_ids, ids)[0])
    if strip:
        assert pieces[seg - 1] not in lone and pieces[key - 1] not in lone
        assert pieces[seg - 1].lstrip("Ġ") == "is"
        assert keyword == standalone  # the keyword target is the keyword's own first piece
    else:
        assert pieces[seg - 1] in lone and pieces[key - 1] in lone
        assert keyword != standalone


def test_tidy_spacing_gives_readable_text_that_encodes_to_the_same_ids(tokenizer, ids):
    assert tokens.tidy_spacing("Sure,[SEG].[KEY]apple") == "Sure, [SEG]. [KEY] apple"
    assert tokens.tidy_spacing("it is [SEG] . [KEY] red cup") == "it is [SEG]. [KEY] red cup"
    raw = "Sure,[SEG].[KEY]apple"
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert encode(tokens.tidy_spacing(raw)) == encode(raw)


def test_new_tokens_in_spare_rows_start_at_the_mean_row():
    """A checkpoint whose table has spare rows (Qwen's) gives new tokens ids inside it:
    those rows, untrained, are set to the mean of the trained rows; other rows keep theirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    size = len(tokenizer)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=size + 8, hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=False))
    before = model.get_input_embeddings().weight.detach().clone()
    tokenizer.add_tokens(["[NEW1]", "[NEW2]"])
    new_ids = tokenizer.convert_tokens_to_ids(["[NEW1]", "[NEW2]"])
    assert all(i < size + 8 for i in new_ids)  # inside the spare rows: no resize happens
    tokens.resize_embeddings(model, tokenizer, new_token_ids=new_ids)
    after = model.get_input_embeddings().weight
    mean = before[: min(new_ids)].mean(0)
    for i in new_ids:
        torch.testing.assert_close(after[i], mean)
        torch.testing.assert_close(model.get_output_embeddings().weight[i],
                                   model.get_output_embeddings().weight[: min(new_ids)].mean(0))
    untouched = [i for i in range(size + 8) if i not in new_ids]
    torch.testing.assert_close(after[untouched], before[untouched])
