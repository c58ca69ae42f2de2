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

def test_question_templates_wrap_the_query_as_given_or_as_a_class_name():
    import random

    rng = random.Random(0)
    for _ in range(20):
        sentence = tokens.format_question("  Where would you sit?  ", True, rng)
        assert sentence in {t.format(sent="Where would you sit?") for t in tokens.LONG_QUESTIONS}
        short = tokens.format_question(" Red Cup ", False, rng)
        assert short in {t.format(class_name="red cup") for t in tokens.SHORT_QUESTIONS}


def test_answer_templates_list_the_segs_with_commas_and_and():
    import random

    rng = random.Random(0)
    assert {tokens.format_answer(1, rng) for _ in range(30)} <= set(tokens.ANSWERS)
    three = tokens.format_answer(3, rng)
    assert "[SEG], [SEG] and [SEG]" in three
    assert three in {t.format(segs="[SEG], [SEG] and [SEG]") for t in tokens.MULTI_ANSWERS}


def test_tidy_spacing_collapses_runs_of_spaces():
    assert tokens.tidy_spacing("It is   [SEG]  .") == tokens.tidy_spacing("It is [SEG] .")
    assert "  " not in tokens.tidy_spacing("a    b   c")
    assert tokens.tidy_spacing("a    b") == "a b"


def test_chatml_rendering_matches_the_qwen_format():
    turns = [tokens.Turn("q1", "a1"), tokens.Turn("q2", "a2"), tokens.Turn("q3")]
    text, spans = tokens.render_chatml_conversation(turns, "SYS")
    assert text == (
        "<|im_start|>system\nSYS<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>q1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n"
        "<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\n")
    assert [text[s:e] for s, e in spans] == ["a1<|im_end|>", "a2<|im_end|>"]
    custom, _ = tokens.render_chatml_conversation([tokens.Turn("q", "a")], "S",
                                                  image_token="<img>", eos_token="<e>")
    assert custom == ("<|im_start|>system\nS<e>\n<|im_start|>user\n<|vision_start|><img>"
                      "<|vision_end|>q<e>\n<|im_start|>assistant\na<e>\n")


def test_llava_rendering_matches_the_llava_v1_format():
    turns = [tokens.Turn("q1", "a1"), tokens.Turn("q2")]
    text, spans = tokens.render_conversation(turns, "SYS")
    assert text == "SYS USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    assert [text[s:e] for s, e in spans] == [" a1</s>"]
    with pytest.raises(KeySegInputError, match="only the last turn"):
        tokens.render_conversation([tokens.Turn("q1"), tokens.Turn("q2", "a")], "S")


def test_keyword_ids_of_an_empty_keyword_are_an_empty_long_tensor(tokenizer, ids):
    encoded = tokens.encode_conversation(tokenizer, [tokens.Turn("q?", "It is [SEG]. [KEY]")],
                                         ids, num_image_tokens=2, system_prompt=SYSTEM)
    (keyword,) = tokens.keyword_token_ids(encoded.input_ids, ids)
    assert keyword.dtype == torch.long and keyword.numel() == 0
    encoded = tokens.encode_conversation(tokenizer, [tokens.Turn("q?", "It is [SEG]. [KEY] cup")],
                                         ids, num_image_tokens=2, system_prompt=SYSTEM)
    (keyword,) = tokens.keyword_token_ids(encoded.input_ids, ids)
    assert keyword.dtype == torch.long
    assert tokenizer.decode(keyword).strip() == "cup"


class _Sized:
    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


def test_resize_embeddings_grows_to_the_tokenizer_with_mean_rows_and_never_shrinks():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         tie_word_embeddings=False))
    inputs = model.get_input_embeddings().weight.detach().clone()
    outputs = model.get_output_embeddings().weight.detach().clone()
    tokens.resize_embeddings(model, _Sized(13))
    grown_in = model.get_input_embeddings().weight
    grown_out = model.get_output_embeddings().weight
    assert grown_in.shape == (13, 8) and grown_out.shape == (13, 8)
    torch.testing.assert_close(grown_in[:10], inputs, rtol=0, atol=0)
    torch.testing.assert_close(grown_out[:10], outputs, rtol=0, atol=0)
    for row in range(10, 13):
        torch.testing.assert_close(grown_in[row], inputs.mean(0))
        torch.testing.assert_close(grown_out[row], outputs.mean(0))
    tokens.resize_embeddings(model, _Sized(11))  # fewer tokens than rows: kept as is
    assert model.get_input_embeddings().weight.shape == (13, 8)
    tokens.resize_embeddings(model, _Sized(15), init_from_mean=False)
    assert model.get_input_embeddings().weight.shape == (15, 8)
    assert not torch.allclose(model.get_input_embeddings().weight[14], inputs.mean(0))


def _raw_tokenizer(pad: str | None = "<pad>", unk: str | None = "<unk>"):
    """The tiny byte-level BPE without KeySeg's tokens (what a fresh LLaMA tokenizer is)."""
    from transformers import PreTrainedTokenizerFast

    from keyseg.model.tiny import BASE_SPECIAL_TOKENS, train_byte_level_bpe

    raw = train_byte_level_bpe(None, 600, BASE_SPECIAL_TOKENS, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   unk_token=unk, pad_token=pad)


def test_added_tokens_and_their_ids():
    raw = _raw_tokenizer()
    new = tokens.add_special_tokens(raw)
    assert new == ["[SEG]", "[KEY]", "<image>"]  # no <im_start>/<im_end> unless asked
    vocab = raw.get_vocab()
    assert "<im_start>" not in vocab
    ids = tokens.special_token_ids(raw)
    assert ids == tokens.SpecialTokenIds(seg=vocab["[SEG]"], key=vocab["[KEY]"],
                                         image=vocab["<image>"], eos=raw.eos_token_id,
                                         pad=vocab["<pad>"], im_start=None, im_end=None)
    marked = _raw_tokenizer()
    assert tokens.add_special_tokens(marked, use_im_start_end=True) == [
        "[SEG]", "[KEY]", "<image>", "<im_start>", "<im_end>"]
    vocab = marked.get_vocab()
    with_markers = tokens.special_token_ids(marked, use_im_start_end=True)
    assert (with_markers.im_start, with_markers.im_end) == (vocab["<im_start>"],
                                                            vocab["<im_end>"])
    without = tokens.special_token_ids(marked)
    assert (without.im_start, without.im_end) == (None, None)
    assert tokens.add_special_tokens(marked, use_im_start_end=True) == []  # already there


def test_missing_tokens_are_named():
    with pytest.raises(KeySegInputError, match=r"^tokenizer lacks \[SEG\], \[KEY\], <image>; "
                                               r"call keyseg.tokens.add_special_tokens first$"):
        tokens.special_token_ids(_raw_tokenizer())


def test_whitespace_handling_of_the_added_tokens_follows_the_convention():
    def flags(tokenizer):
        return {str(t): (t.lstrip, t.rstrip, t.normalized, t.special)
                for t in tokenizer.added_tokens_decoder.values()
                if str(t) in ("[SEG]", "[KEY]", "<image>", "<im_start>")}

    lisa, v0 = _raw_tokenizer(), _raw_tokenizer()
    tokens.add_special_tokens(lisa, use_im_start_end=True)  # strip_spaces by default
    tokens.add_special_tokens(v0, use_im_start_end=True, strip_spaces=False)
    assert flags(lisa) == {"[SEG]": (True, True, False, False), "[KEY]": (True, True, False,
                                                                           False),
                           "<im_start>": (True, True, False, False),
                           "<image>": (False, False, False, False)}
    assert flags(v0) == {t: (False, False, True, False)
                         for t in ("[SEG]", "[KEY]", "<image>", "<im_start>")}


def test_a_tokenizer_without_padding_pads_with_unk_or_else_eos():
    with_unk = _raw_tokenizer(pad=None)
    tokens.add_special_tokens(with_unk)
    assert with_unk.pad_token == "<unk>"
    assert tokens.special_token_ids(with_unk).pad == with_unk.unk_token_id
    no_unk = _raw_tokenizer(pad=None, unk=None)
    tokens.add_special_tokens(no_unk)
    assert no_unk.pad_token == "</s>"
    kept = _raw_tokenizer()
    tokens.add_special_tokens(kept)
    assert kept.pad_token == "<pad>"


def test_pad_id_falls_back_to_zero():
    tokenizer = _raw_tokenizer()
    tokens.add_special_tokens(tokenizer)
    tokenizer.pad_token = None
    assert tokens.special_token_ids(tokenizer).pad == 0


def test_llava_encoding_is_the_documented_prompt_with_the_image_expanded(tokenizer, ids):
    turns = [tokens.Turn("what is it?", "It is [SEG].")]
    got = tokens.encode_conversation(tokenizer, turns, ids, num_image_tokens=3,
                                     system_prompt=SYSTEM)
    text = f"{SYSTEM} USER: <image>\nwhat is it? ASSISTANT: It is [SEG].</s>"
    expected = tokenizer(text)["input_ids"]  # with the BOS token
    assert expected[0] == tokenizer.bos_token_id
    at = expected.index(ids.image)
    expected = expected[:at] + [ids.image] * 3 + expected[at + 1:]
    assert got.input_ids.tolist() == expected
    assert got.input_ids.dtype == torch.long and got.labels.dtype == torch.long
    supervised = [t for t, label in zip(got.input_ids.tolist(), got.labels.tolist(),
                                        strict=True) if label != tokens.IGNORE_INDEX]
    # ([SEG] absorbs the space before it, so decode() writes "It is[SEG]")
    assert tokenizer.decode(supervised).replace(" ", "") == "Itis[SEG].</s>"
    assert got.labels.tolist()[-len(supervised):] == supervised  # the answer is the tail
    default = tokens.encode_conversation(tokenizer, turns, ids, num_image_tokens=3,
                                         system_prompt=SYSTEM, image_token="<image>")
    assert torch.equal(default.input_ids, got.input_ids)


@pytest.mark.parametrize("convention", ["lisa", "v0"])
def test_image_markers_surround_the_image_tokens(convention):
    tokenizer = _raw_tokenizer()
    tokens.add_special_tokens(tokenizer, use_im_start_end=True,
                              strip_spaces=convention == "lisa")
    ids = tokens.special_token_ids(tokenizer, use_im_start_end=True)
    turns = [tokens.Turn("what?", "It is [SEG].")]
    got = tokens.encode_conversation(tokenizer, turns, ids, num_image_tokens=2,
                                     system_prompt=SYSTEM, convention=convention).input_ids
    got = got.tolist()
    at = got.index(ids.im_start)
    assert got[at:at + 4] == [ids.im_start, ids.image, ids.image, ids.im_end]
    assert got.count(ids.im_start) == got.count(ids.im_end) == 1
    # LISA writes the markers into the prompt text, so <im_end> absorbs the newline after it
    after = tokenizer.decode(got[at + 4:at + 5])
    assert (after.startswith("\n")) is (convention == "v0")
    if convention == "lisa":  # the same tokenizer without markers in the text keeps "\n"
        v0 = tokens.encode_conversation(tokenizer, turns, ids, num_image_tokens=2,
                                        system_prompt=SYSTEM, convention="v0").input_ids
        assert not torch.equal(v0, torch.tensor(got))


def test_special_token_right_after_the_first_token_is_allowed():
    ids = torch.tensor([5, 9, 7, 9])
    assert tokens.special_positions(ids, 9).tolist() == [0, 2]
    assert tokens.special_positions(ids, 9, "at").tolist() == [1, 3]
    with pytest.raises(KeySegInputError,
                       match=r"^a special token cannot be the first token of a sequence$"):
        tokens.special_positions(torch.tensor([9, 5]), 9)


def test_render_refuses_an_unanswered_turn_before_the_last():
    with pytest.raises(KeySegInputError,
                       match=r"^only the last turn of a conversation may lack an answer$"):
        tokens.render_chatml_conversation([tokens.Turn("q1"), tokens.Turn("q2", "a")], "S")


def test_keyword_ids_for_every_key_of_a_row(tokenizer, ids):
    encoded = tokens.encode_conversation(
        tokenizer, [tokens.Turn("q?", "It is [SEG]. [KEY] red cup [KEY] blue")], ids,
        num_image_tokens=2, system_prompt=SYSTEM)
    first, second = tokens.keyword_token_ids(encoded.input_ids, ids)
    assert tokenizer.decode(first).strip() == "red cup"
    assert tokenizer.decode(second).strip() == "blue"


def test_resize_without_mean_init_leaves_new_rows_far_from_the_mean():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         tie_word_embeddings=False))
    mean = model.get_input_embeddings().weight.detach().mean(0)
    tokens.resize_embeddings(model, _Sized(40), init_from_mean=False)
    new_rows = model.get_input_embeddings().weight.detach()[10:]
    # a fresh initialisation, not HF's mean resizing (rows within ~1e-3 of the mean)
    assert float((new_rows - mean).abs().max()) > 1e-2


def test_encoding_defaults_to_the_lisa_convention():
    tokenizer = _raw_tokenizer()
    tokens.add_special_tokens(tokenizer, use_im_start_end=True)
    ids = tokens.special_token_ids(tokenizer, use_im_start_end=True)
    turns = [tokens.Turn("what?", "It is [SEG].")]
    default = tokens.encode_conversation(tokenizer, turns, ids, 2, system_prompt=SYSTEM)
    lisa = tokens.encode_conversation(tokenizer, turns, ids, 2, system_prompt=SYSTEM,
                                      convention="lisa")
    assert torch.equal(default.input_ids, lisa.input_ids)


def test_answers_end_with_the_tokenizers_own_end_token():
    tokenizer = _raw_tokenizer()
    tokenizer.eos_token = "<pad>"  # not LLaMA's "</s>"
    tokens.add_special_tokens(tokenizer)
    ids = tokens.special_token_ids(tokenizer)
    encoded = tokens.encode_conversation(tokenizer, [tokens.Turn("q?", "It is [SEG].")], ids,
                                         2, system_prompt=SYSTEM)
    assert encoded.input_ids[-1] == tokenizer.convert_tokens_to_ids("<pad>")
    assert tokenizer.convert_tokens_to_ids("</s>") not in encoded.input_ids.tolist()


def test_two_image_placeholders_are_counted_in_the_error(tokenizer, ids):
    with pytest.raises(KeySegInputError, match=r"expected exactly one <image> in the prompt, "
                                               r"found 2$"):
        tokens.encode_conversation(tokenizer, [tokens.Turn("a <image> here?", "It is [SEG].")],
                                   ids, 2, system_prompt=SYSTEM)


def test_the_tokenizers_own_special_tokens_keep_their_flags():
    from tokenizers import AddedToken

    tokenizer = _raw_tokenizer()
    tokenizer.add_tokens([AddedToken("<|image_pad|>", special=True, normalized=False)],
                         special_tokens=True)
    tokens.add_special_tokens(tokenizer, image_token="<|image_pad|>")
    pad = next(t for t in tokenizer.added_tokens_decoder.values() if str(t) == "<|image_pad|>")
    assert pad.special is True
    assert tokenizer.decode(tokenizer("a<|image_pad|>b")["input_ids"],
                            skip_special_tokens=True).replace(" ", "") == "ab"
