"""Keyword files (I/O, validation, the real file) and constrained keyword extraction."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from keyseg.cli import main
from keyseg.data.keywords import (
    KeywordEntry,
    KeywordExtractor,
    candidate_phrases,
    extract_keywords,
    is_phrase_of,
    load_keyword_file,
    save_keyword_file,
    validate_keyword_file,
)
from keyseg.errors import KeySegDataError

REAL_KEYWORD_FILE = (Path(__file__).parents[2].parent
                     / "shared/data/reason_seg_key/keyword_outputs.json")

QUERIES = [
    ("When eating soup, what kitchen tool would you use to scoop it?",
     "A spoon would be used to scoop the soup."),
    ("What could protect you from the rain?", "The umbrella held by the man."),
    ("Which object shows the time on the wall?", "The round clock above the door."),
    ("Where would a cat sleep?", ""),
    ("What would you sit on while reading?", "The red armchair near the window."),
]


def entry(keyword: str | None, query: str = "What tool eats soup?", outputs: str = "A spoon.",
          image: str = "a.jpg") -> dict:
    return {"query": query, "outputs": outputs, "image": image,
            "json": image.replace(".jpg", ".json"), "keyword": keyword}


# --------------------------------------------------------------------------- the real file


@pytest.mark.skipif(not REAL_KEYWORD_FILE.is_file(), reason="shared/ data not beside the repo")
def test_real_keyword_file_counts():
    report = validate_keyword_file(REAL_KEYWORD_FILE)
    assert (report.entries, report.one_word, report.two_word, report.longer) == (239, 208, 31, 0)
    assert report.ok and report.empty == []
    # Non-phrase keywords are warnings; the released file has only a few of them.
    assert len(report.not_phrase) < 10


@pytest.mark.skipif(not REAL_KEYWORD_FILE.is_file(), reason="shared/ data not beside the repo")
def test_cli_validate_real_file_prints_counts_and_exits_zero(capsys):
    assert main(["keywords", "--validate", str(REAL_KEYWORD_FILE)]) == 0
    out = capsys.readouterr().out
    assert "239 entries; 208 one-word, 31 two-word" in out


# --------------------------------------------------------------------------- I/O, validation


def test_is_phrase_of_is_case_insensitive_and_word_bounded():
    assert is_phrase_of("Baseball Bat", "He swings the baseball bat.")
    assert is_phrase_of("bat", "no", "a bat!")
    assert not is_phrase_of("bat", "a batter")
    assert not is_phrase_of("bat baseball", "baseball bat")
    assert not is_phrase_of("", "anything")


def test_validate_counts_and_flags_problems(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps([
        entry("spoon"), entry("eats soup", image="b.jpg"), entry("wooden", image="c.jpg"),
        entry("", image="d.jpg"), entry("a very long one", image="a.jpg"),
    ]))
    report = validate_keyword_file(path)
    assert (report.entries, report.one_word, report.two_word, report.longer) == (5, 2, 1, 1)
    assert report.empty == [3]
    assert [kw for _, _, kw in report.not_phrase] == ["wooden", "a very long one"]
    assert report.duplicate_images == ["a.jpg"]
    assert not report.ok
    assert main(["keywords", "--validate", str(path)]) == 1


def test_validate_with_image_dir_reports_missing_files(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    (tmp_path / "imgs" / "a.json").write_text("{}")
    (tmp_path / "imgs" / "b.jpg").write_bytes(b"x")
    path = tmp_path / "k.json"
    path.write_text(json.dumps([entry("spoon"), entry("spoon", image="b.jpg")]))
    report = validate_keyword_file(path, image_dir=tmp_path / "imgs")
    assert report.missing_images == [] and report.missing_json == ["b.json"]
    assert main(["keywords", "--validate", str(path), "--image-dir",
                 str(tmp_path / "imgs")]) == 1
    assert "b.json" in capsys.readouterr().out


def test_load_rejects_malformed_entries_naming_the_index(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps([entry("spoon"), {"query": "q", "image": "x.jpg"}]))
    with pytest.raises(KeySegDataError, match=r"k\.json: entry 1 lacks .*outputs"):
        load_keyword_file(path)
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(KeySegDataError, match="expected a JSON list"):
        load_keyword_file(path)


def test_save_roundtrip_is_atomic(tmp_path):
    entries = [KeywordEntry("q", "o", "a.jpg", "a.json", "spoon")]
    path = save_keyword_file(entries, tmp_path / "out" / "k.json")
    assert load_keyword_file(path) == entries
    assert [p.name for p in path.parent.iterdir()] == ["k.json"]  # no temp file left


def test_candidate_phrases_are_contiguous_and_skip_stopword_edges():
    candidates = candidate_phrases(["Use the big spoon, please."], max_words=2)
    assert "big spoon" in candidates and "spoon" in candidates
    assert "the big" not in candidates and "the" not in candidates
    assert all(is_phrase_of(c, "Use the big spoon, please.") for c in candidates)
    assert all(len(c.split()) <= 2 for c in candidates)
    assert candidate_phrases(["the of"], max_words=1) == ["the", "of"]  # nothing else left


# --------------------------------------------------------------------------- extraction


def _tiny_t5(path: Path) -> Path:
    """A random 1-layer T5 + a word-level tokenizer, saved like a hub model (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    from keyseg.data.keywords import DEFAULT_PROMPT

    words = set()
    for text in [DEFAULT_PROMPT, *[q + " " + a for q, a in QUERIES]]:
        words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in sorted(words):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                      num_decoder_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return _tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def extractor(tiny_model_dir) -> KeywordExtractor:
    return KeywordExtractor.from_pretrained(tiny_model_dir, local_files_only=True, max_words=2,
                                            batch_size=7)


def test_extracted_keywords_are_always_phrases_of_the_input(extractor):
    keywords = extractor.extract_batch(QUERIES)
    assert len(keywords) == len(QUERIES)
    for (query, answer), keyword in zip(QUERIES, keywords, strict=True):
        assert 1 <= len(keyword.split()) <= 2
        assert is_phrase_of(keyword, query, answer)


def test_max_words_one_gives_single_words(tiny_model_dir):
    one = KeywordExtractor.from_pretrained(tiny_model_dir, local_files_only=True, max_words=1)
    for query, answer in QUERIES:
        keyword = one.extract(query, answer)
        assert len(keyword.split()) == 1 and is_phrase_of(keyword, query, answer)


def test_batched_scores_equal_one_by_one_scores(extractor):
    query, answer = QUERIES[0]
    candidates = candidate_phrases([query, answer], 2)
    batched = extractor.score(query, answer, candidates)
    single = [extractor.score(query, answer, [c])[0] for c in candidates[:6]]
    assert batched[:6] == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1  # scores depend on the candidate


def test_extraction_picks_the_most_likely_candidate(tiny_model_dir):
    extractor = KeywordExtractor.from_pretrained(tiny_model_dir, local_files_only=True)
    vocab = extractor.tokenizer.get_vocab()
    head = torch.nn.Linear(16, len(vocab), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[vocab["umbrella"]] = 10.0
        head.bias[vocab["</s>"]] = 10.0
    extractor.model.lm_head = head  # now only "umbrella" then end-of-sequence is likely
    assert extractor.extract(*QUERIES[1]) == "umbrella"
    query, answer = QUERIES[0]  # "umbrella" is not in this text, so it cannot be chosen
    assert is_phrase_of(extractor.extract(query, answer), query, answer)


def test_extract_keywords_and_cli_write_a_valid_file(tmp_path, tiny_model_dir, extractor):
    entries = [KeywordEntry(q, a, f"{i}.jpg", f"{i}.json") for i, (q, a) in enumerate(QUERIES)]
    filled = extract_keywords(entries, extractor, chunk=2)
    assert [e.image for e in filled] == [e.image for e in entries]
    assert all(e.keyword and is_phrase_of(e.keyword, e.query, e.outputs) for e in filled)

    source = tmp_path / "train.json"
    source.write_text(json.dumps([{"query": q, "outputs": a, "image": f"{i}.jpg",
                                   "json": f"{i}.json"} for i, (q, a) in enumerate(QUERIES)]))
    out = tmp_path / "keywords.json"
    assert main(["keywords", str(source), "--out", str(out), "--model", str(tiny_model_dir),
                 "--local-files-only", "--max-words", "1"]) == 0
    report = validate_keyword_file(out)
    assert report.entries == len(QUERIES) and report.one_word == len(QUERIES)
    assert report.not_phrase == [] and report.ok


def test_cli_needs_input_and_out(capsys):
    assert main(["keywords"]) == 2
    assert "--validate" in capsys.readouterr().err
