"""Keyword files: reading, validating, writing, and extracting keywords with a seq2seq model.

A keyword file (``keyword_outputs.json``, SPEC §5) is a JSON list of
``{"query", "outputs", "image", "json", "keyword"}``: ReasonSeg's explanatory entries plus
the query's core concept ("spoon"). The released file has 239 entries (208 one-word, 31
two-word keywords).

Extraction (:class:`KeywordExtractor`) follows the reference's idea (ask an instruction-tuned
model such as FLAN-T5-XL for the core concept) but *constrains* the answer to a contiguous
phrase of the query or answer text of at most ``max_words`` words: every such n-gram is a
candidate, each is scored by the model's length-normalised log-likelihood given the prompt,
and the best one wins. The output is therefore always a phrase of the input (the
reference's free generation produced words such as "wooden" or "baked" that name no object,
and occasionally words that are in neither text).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyseg.data.reason_seg import read_json_text
from keyseg.errors import KeySegDataError
from keyseg.io import atomic_write_json

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch

DEFAULT_KEYWORD_MODEL = "google/flan-t5-xl"
DEFAULT_MAX_WORDS = 2
DEFAULT_PROMPT = (
    "Read the question and its answer, then name the object the question is about, "
    "in at most {max_words} words.\nQuestion: {query}\nAnswer: {answer}\nObject:"
)

# Words: letters/digits with inner apostrophes or hyphens ("o'clock", "t-shirt").
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
# Candidates may not start or end with these (they are never the core concept on their own).
_STOPWORD_TEXT = (
    "a an the this that these those it its it's is are was were be been being am do does did "
    "of in on at to for from by with without into onto over under about as and or but if "
    "then so than too very can could would should will shall may might must not no yes "
    "what which who whom whose where when why how there here i you he she we they me him her "
    "us them my your his our their one ones some any each every all both most more such "
    "other another image picture photo"
)
STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())


def words_of(text: str) -> list[str]:
    """Lower-cased words of ``text`` (the unit of the phrase checks)."""
    return [w.lower() for w in _WORD.findall(text)]


def is_phrase_of(keyword: str, *texts: str) -> bool:
    """True when ``keyword``'s words occur contiguously (case-insensitive, whole words) in
    one of ``texts``; an empty keyword is never a phrase."""
    target = words_of(keyword)
    if not target:
        return False
    n = len(target)
    for text in texts:
        words = words_of(text)
        if any(words[i:i + n] == target for i in range(len(words) - n + 1)):
            return True
    return False


# --------------------------------------------------------------------------- file I/O


@dataclass
class KeywordEntry:
    """One keyword-file entry (``keyword`` is ``None`` before extraction)."""

    query: str
    outputs: str
    image: str
    json: str
    keyword: str | None = None


_FIELDS = ("query", "outputs", "image", "json")


def load_keyword_file(path: str | Path, require_keyword: bool = True) -> list[KeywordEntry]:
    """Read a keyword (or explanatory) file.

    Args:
        path: JSON list of ``{query, outputs, image, json[, keyword]}``.
        require_keyword: every entry must have a string ``keyword`` (possibly empty).

    Raises:
        KeySegDataError: not a list, or an entry lacking a field; names the file and index.
    """
    path = Path(path)
    if not path.is_file():
        raise KeySegDataError(f"{path}: keyword file not found")
    data = read_json_text(path)
    if not isinstance(data, list):
        raise KeySegDataError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    entries: list[KeywordEntry] = []
    needed = (*_FIELDS, "keyword") if require_keyword else _FIELDS
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise KeySegDataError(f"{path}: entry {index} is not an object")
        bad = [k for k in needed if not isinstance(item.get(k), str)]
        if bad:
            raise KeySegDataError(f"{path}: entry {index} lacks string field(s) {bad}")
        keyword = item.get("keyword")
        entries.append(KeywordEntry(
            query=item["query"], outputs=item["outputs"], image=item["image"],
            json=item["json"], keyword=keyword if isinstance(keyword, str) else None,
        ))
    return entries


def save_keyword_file(entries: Iterable[KeywordEntry], path: str | Path) -> Path:
    """Write entries as a keyword file atomically (temp file + ``os.replace``)."""
    path = Path(path)
    atomic_write_json(path, [asdict(e) for e in entries], indent=None)
    return path


@dataclass
class KeywordFileReport:
    """Result of :func:`validate_keyword_file`.

    Problems (make :attr:`ok` False): empty keywords, missing image/JSON files. Warnings:
    keywords that are not a phrase of the query or outputs, duplicate images.
    """

    path: str
    entries: int = 0
    one_word: int = 0
    two_word: int = 0
    longer: int = 0
    empty: list[int] = field(default_factory=list)  # entry indices
    not_phrase: list[tuple[int, str, str]] = field(default_factory=list)  # (index, image, kw)
    duplicate_images: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    missing_json: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.empty or self.missing_images or self.missing_json)

    def summary_lines(self, limit: int = 10) -> list[str]:
        """Human-readable report, first line ``N entries; A one-word, B two-word, C longer``."""
        lines = [f"{self.path}: {self.entries} entries; {self.one_word} one-word, "
                 f"{self.two_word} two-word, {self.longer} longer"]

        def listing(title: str, items: Sequence[Any], level: str) -> None:
            if items:
                lines.append(f"{level}: {len(items)} {title}")
                lines.extend(f"  {item}" for item in items[:limit])
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")

        listing("empty keyword(s) (entry index)", self.empty, "problem")
        listing("missing image file(s)", self.missing_images, "problem")
        listing("missing JSON file(s)", self.missing_json, "problem")
        listing("keyword(s) not a phrase of the query/outputs (index, image, keyword)",
                self.not_phrase, "warning")
        listing("image(s) with more than one entry", self.duplicate_images, "warning")
        lines.append("OK" if self.ok else "PROBLEMS FOUND")
        return lines


def validate_keyword_file(path: str | Path, image_dir: str | Path | None = None
                          ) -> KeywordFileReport:
    """Count and check a keyword file (see :class:`KeywordFileReport`).

    Args:
        path: the keyword file.
        image_dir: when given, each entry's ``image`` and ``json`` must exist in it.

    Raises:
        KeySegDataError: the file is unreadable or structurally wrong.
    """
    entries = load_keyword_file(path)
    report = KeywordFileReport(path=str(path), entries=len(entries))
    for index, entry in enumerate(entries):
        keyword = (entry.keyword or "").strip()
        n_words = len(keyword.split())
        if n_words == 0:
            report.empty.append(index)
        elif n_words == 1:
            report.one_word += 1
        elif n_words == 2:
            report.two_word += 1
        else:
            report.longer += 1
        if keyword and not is_phrase_of(keyword, entry.query, entry.outputs):
            report.not_phrase.append((index, entry.image, keyword))
        if image_dir is not None:
            if not (Path(image_dir) / entry.image).is_file():
                report.missing_images.append(entry.image)
            if not (Path(image_dir) / entry.json).is_file():
                report.missing_json.append(entry.json)
    counts = Counter(Path(e.image).name for e in entries)
    report.duplicate_images = sorted(name for name, n in counts.items() if n > 1)
    return report


# --------------------------------------------------------------------------- extraction


def candidate_phrases(texts: Sequence[str], max_words: int = DEFAULT_MAX_WORDS) -> list[str]:
    """Every contiguous n-gram (``1 <= n <= max_words``) of the texts, lower-cased, deduplicated
    in order of first appearance; n-grams starting or ending with a stop word are dropped
    unless that leaves nothing.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    all_grams: list[str] = []
    seen: set[str] = set()
    for text in texts:
        words = words_of(text)
        for n in range(1, max_words + 1):
            for i in range(len(words) - n + 1):
                gram = " ".join(words[i:i + n])
                if gram not in seen:
                    seen.add(gram)
                    all_grams.append(gram)
    content = [g for g in all_grams
               if g.split()[0] not in STOPWORDS and g.split()[-1] not in STOPWORDS
               and not g.replace(" ", "").isdigit()]
    return content or all_grams


class KeywordExtractor:
    """Pick the core concept of a query as a phrase of the query/answer, scored by a model.

    Args:
        model: an encoder-decoder LM (``AutoModelForSeq2SeqLM``), e.g. FLAN-T5.
        tokenizer: its tokenizer (must append EOS, as T5's does, so scores of phrases of
            different lengths include "and then stop").
        max_words: the longest keyword allowed.
        prompt: template with ``{query}``, ``{answer}``, ``{max_words}``.
        batch_size: (query, candidate) pairs per decoder forward.
        max_prompt_tokens: prompts are truncated to this many tokens.
    """

    def __init__(self, model: Any, tokenizer: Any, max_words: int = DEFAULT_MAX_WORDS,
                 prompt: str = DEFAULT_PROMPT, batch_size: int = 64,
                 max_prompt_tokens: int = 512) -> None:
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.prompt = prompt
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_KEYWORD_MODEL,
                        device: str | None = None, local_files_only: bool = False,
                        **kwargs: Any) -> KeywordExtractor:
        """Load model + tokenizer with transformers' ``Auto*`` classes (any seq2seq path)."""
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path),
                                                      local_files_only=local_files_only)
            model = AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path),
                                                          local_files_only=local_files_only)
        except OSError as error:
            raise KeySegDataError(f"cannot load keyword model {name_or_path!s}: {error}") from error
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, **kwargs)

    def build_prompt(self, query: str, answer: str = "") -> str:
        return self.prompt.format(query=query.strip(), answer=answer.strip(),
                                  max_words=self.max_words)

    def score(self, query: str, answer: str, candidates: Sequence[str]) -> list[float]:
        """Length-normalised log-likelihood of each candidate given the prompt."""
        return self._score_many([(self.build_prompt(query, answer), list(candidates))])[0]

    def extract(self, query: str, answer: str = "") -> str:
        """The best-scoring phrase of ``query``/``answer`` ("" when they hold no word)."""
        return self.extract_batch([(query, answer)])[0]

    def extract_batch(self, items: Sequence[tuple[str, str]]) -> list[str]:
        """Keywords for ``[(query, answer), ...]`` (the encoder runs once per query)."""
        jobs = []
        for query, answer in items:
            candidates = candidate_phrases([query, answer], self.max_words)
            jobs.append((self.build_prompt(query, answer), candidates))
        scores = self._score_many(jobs)
        results = []
        for (_, candidates), cand_scores in zip(jobs, scores, strict=True):
            if not candidates:
                results.append("")
                continue
            # max() keeps the first best on ties: earlier (query) phrases win.
            best = max(range(len(candidates)), key=lambda i: cand_scores[i])
            results.append(candidates[best])
        return results

    def _score_many(self, jobs: Sequence[tuple[str, list[str]]]) -> list[list[float]]:
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        device = next(self.model.parameters()).device
        prompts = [prompt for prompt, _ in jobs]
        scores: list[list[float]] = [[0.0] * len(c) for _, c in jobs]
        pairs = [(j, k, cand) for j, (_, cands) in enumerate(jobs) for k, cand in enumerate(cands)]
        if not pairs:
            return scores
        with torch.inference_mode():
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_prompt_tokens).to(device)
            hidden = self.model.get_encoder()(input_ids=enc["input_ids"],
                                              attention_mask=enc["attention_mask"])[0]
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                rows = torch.tensor([j for j, _, _ in chunk], device=device)
                labels = self.tokenizer([c for _, _, c in chunk], return_tensors="pt",
                                        padding=True).input_ids.to(device)
                values = self._sequence_logprob(hidden[rows], enc["attention_mask"][rows], labels,
                                                BaseModelOutput)
                for (j, k, _), value in zip(chunk, values.tolist(), strict=True):
                    scores[j][k] = value
        return scores

    def _sequence_logprob(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor, output_cls: type) -> torch.Tensor:
        """Mean token log-prob of ``labels`` ``(B, T)`` given encoder ``hidden`` ``(B, S, D)``.

        Returns ``(B,)``; padding positions are excluded from the mean.
        """
        import torch

        pad_id = self.tokenizer.pad_token_id
        valid = labels != pad_id
        masked = labels.masked_fill(~valid, -100)
        out = self.model(encoder_outputs=output_cls(last_hidden_state=hidden),
                         attention_mask=attention_mask, labels=masked)
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        token_lp = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * valid
        return token_lp.sum(-1) / valid.sum(-1).clamp(min=1)


def extract_keywords(entries: Sequence[KeywordEntry], extractor: KeywordExtractor,
                     chunk: int = 8, progress: bool = False) -> list[KeywordEntry]:
    """New entries with ``keyword`` filled in by ``extractor`` (query + outputs as texts)."""
    iterator: Iterable[int] = range(0, len(entries), chunk)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=(len(entries) + chunk - 1) // chunk, unit="batch")
    result: list[KeywordEntry] = []
    for start in iterator:
        part = entries[start:start + chunk]
        keywords = extractor.extract_batch([(e.query, e.outputs) for e in part])
        result.extend(KeywordEntry(e.query, e.outputs, e.image, e.json, k)
                      for e, k in zip(part, keywords, strict=True))
    return result
