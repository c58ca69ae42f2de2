"""``KeySegPipeline``: image + question -> answer, keyword (+ its nearest words) and masks.

The expensive step is separated from the cheap one, as segment-anything's predictor does:
an image is prepared and SAM-encoded once (cached by content hash), then any number of
queries or chat turns reuse that embedding; answers come from HF ``generate`` with the KV
cache (greedy by default), masks from the states generation already computed
(:mod:`keyseg.generation`).

    >>> pipe = KeySegPipeline.from_pretrained("path/to/model")      # doctest: +SKIP
    >>> result = pipe("kitchen.jpg", "What would you use to eat soup?")  # doctest: +SKIP
    >>> result.keyword, result.masks.shape                            # doctest: +SKIP
    ('spoon', (1, 480, 640))
    >>> pipe.set_image("kitchen.jpg"); pipe.ask("and to cut bread?")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from keyseg import tokens
from keyseg.batch import Batch
from keyseg.config import torch_dtype_name
from keyseg.data.images import DEFAULT_MAX_PIXELS, as_rgb_image, load_image
from keyseg.errors import KeySegConfigError, KeySegError, KeySegInputError
from keyseg.processor import PreparedImage

ImageLike = str | os.PathLike | Image.Image | np.ndarray

#: Where the embedded default model (a ``save_pretrained`` directory) ships in the package.
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"

#: The question wrapper used in training (SPEC §1 sentence template); applied unless the
#: query already asks for a segmentation itself.
DEFAULT_QUESTION_TEMPLATE = "{query} Please output segmentation mask."

UNTRAINED_WARNING = (
    "keyseg: warning: no checkpoint given and no embedded default model installed; using an "
    "UNTRAINED random tiny model, so answers and masks are meaningless (pass --checkpoint DIR)"
)
NO_SEG_MESSAGE = f"the answer contains no {tokens.SEG_TOKEN} token, so no mask was produced"


def default_checkpoint() -> Path | None:
    """The checkpoint used when none is given: the embedded default if it is installed.

    Returns None while the package ships no default model (callers then build the random
    tiny model and say so).
    """
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given (checked to exist here), else the best available: CUDA > MPS > CPU.

    Raises:
        KeySegConfigError: the name is not a device, or this machine / torch build has no
            such device (one line naming it and what is available).
    """
    if device is not None and str(device) != "auto":
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise KeySegConfigError(
                f"--device {device!r}: not a torch device name (use cpu, cuda, cuda:N or mps)"
            ) from error
        _check_device_available(target)
        return target
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_device_available(device: torch.device) -> None:
    """Refuse a CUDA / MPS device this process cannot use, in one line."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
            raise KeySegConfigError(
                f"--device {device}: CUDA is not available ({build}, torch "
                f"{torch.__version__}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise KeySegConfigError(
                f"--device {device}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise KeySegConfigError(
                f"--device {device}: MPS (Apple GPU) is not available on this machine; "
                "use --device cpu"
            )


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as given (a torch dtype, or a name :func:`keyseg.config.dtype_name` reads:
    fp32/bf16/fp16 or float32/bfloat16/float16), else (None or "auto") bf16 on CUDA (fp16
    where bf16 is unsupported) and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = torch_dtype_name(dtype) if dtype is not None else None
    if name is not None:
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class Result:
    """The answer to one query about one image.

    Attributes:
        query: the user's query as given.
        answer: the decoded answer, ``[SEG]``/``[KEY]`` kept (see :attr:`text` for display).
        keyword: the text after the first ``[KEY]``, or None.
        keyword_neighbours: per ``[KEY]`` in the answer, the ``k`` vocabulary tokens nearest
            to its embedding under the keyword projection, as ``(token, cosine)`` pairs,
            best first: the concept that actually conditioned the masks.
        masks: ``(n, H, W)`` bool at the original image size, one per ``[SEG]`` (``n`` may
            be 0).
        scores: ``(n,)`` float32, SAM's predicted IoU per mask.
        mask_logits: ``(n, H, W)`` float32 logits on the CPU when requested, else None.
        message: a note for the user (e.g. why there is no mask), else None.
        timings: seconds per stage (``encode``, ``generate``, ``post``).
    """

    query: str
    answer: str
    keyword: str | None
    keyword_neighbours: list[list[tuple[str, float]]]
    masks: np.ndarray
    scores: np.ndarray
    mask_logits: torch.Tensor | None = None
    message: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The answer without ``[SEG]``/``[KEY] keyword`` markup, for display."""
        head = self.answer.split(tokens.KEY_TOKEN)[0]
        return " ".join(head.replace(tokens.SEG_TOKEN, "").split()).replace(" .", ".").replace(
            " ,", ","
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (masks as pixel counts; the PNGs hold the masks)."""
        return {
            "query": self.query,
            "answer": self.answer,
            "text": self.text,
            "keyword": self.keyword,
            "keyword_neighbours": [
                [{"token": t, "cosine": round(s, 4)} for t, s in row]
                for row in self.keyword_neighbours
            ],
            "num_masks": int(self.masks.shape[0]),
            "mask_pixels": [int(m.sum()) for m in self.masks],
            "scores": [round(float(s), 4) for s in self.scores],
            "image_size": list(self.masks.shape[1:]),
            "message": self.message,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


@dataclass
class _CachedImage:
    """A prepared image and its SAM embedding ``(1, C, h, w)`` on the model's device."""

    prepared: PreparedImage
    embedding: torch.Tensor


class KeySegPipeline:
    """Answer questions about images with masks; see the module docstring.

    Args:
        model: a :class:`~keyseg.model.keyseg.KeySegModel` (moved to ``device``/``dtype``
            when given, put in eval mode).
        device, dtype: where to run (default: the model's own).
        max_new_tokens: default generation budget.
        question_template: wraps a query as in training (``{query}`` placeholder); a query
            that already mentions "segment" is used as is. None: always as is.
        num_neighbours: words listed per ``[KEY]``.
        cache_size: images whose SAM embeddings are kept.
        max_pixels: refuse larger images (width * height).
    """

    def __init__(
        self,
        model,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        max_new_tokens: int = 64,
        question_template: str | None = DEFAULT_QUESTION_TEMPLATE,
        num_neighbours: int = 5,
        cache_size: int = 4,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if device is not None or dtype is not None:
            target = torch.device(device) if device is not None else model.device
            model = model.to(device=target, dtype=resolve_dtype(dtype, target) if dtype else None)
        self.model = model.eval()
        self.processor = model.processor
        self.max_new_tokens = max_new_tokens
        self.question_template = question_template
        self.num_neighbours = num_neighbours
        self.cache_size = cache_size
        self.max_pixels = max_pixels
        self._cache: OrderedDict[str, _CachedImage] = OrderedDict()
        self._table: torch.Tensor | None = None
        self._image: tuple[str, Image.Image] | None = None
        self.history: list[tokens.Turn] = []

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        load_in: Literal["4bit", "8bit"] | None = None,
        **pipeline_kwargs: Any,
    ) -> KeySegPipeline:
        """Load a ``save_pretrained`` directory or a Hub id (``org/name``, from the HF cache
        when offline).

        Args:
            path: the model directory or Hub id; None or ``"default"`` ->
                :func:`default_checkpoint`,
                and while no default is installed, the random tiny model (with a warning).
            device: default CUDA > MPS > CPU.
            dtype: default bf16 on CUDA, fp32 elsewhere.
            load_in: quantise the language model's linear layers with bitsandbytes
                (CUDA only).
        """
        target = resolve_device(device)
        precision = resolve_dtype(dtype, target)
        if load_in is not None:
            _check_quantization(load_in, target)
        if path is None or str(path) == "default":
            path = default_checkpoint()
        if path is None and load_in is not None:
            raise KeySegError(f"{load_in} loading needs a model directory or Hub id "
                              "(--checkpoint); the untrained fallback is not quantised")
        if path is None:
            from keyseg.model.tiny import build_tiny_model

            print(UNTRAINED_WARNING, file=sys.stderr)
            model = build_tiny_model(seed=0)
        else:
            from keyseg.model.keyseg import KeySegModel

            # Built on the meta device and loaded straight in the target dtype (and onto the
            # accelerator): host memory stays about the size of the weights.
            options: dict[str, Any] = {"dtype": precision}
            if target.type != "cpu":
                options["device_map"] = str(target)
            if load_in is not None:
                options["quantization_config"] = quantization_config(load_in, precision)
            model = KeySegModel.from_pretrained(path, **options)
        if load_in is not None:
            return cls(model, **pipeline_kwargs)  # quantised weights stay where they loaded
        model = model.to(dtype=precision)
        model = model.to(target)
        return cls(model, **pipeline_kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # --- images ---------------------------------------------------------------------------
    def load(self, image: ImageLike) -> Image.Image:
        """Any accepted image form -> RGB PIL, with the pixel limit enforced."""
        if isinstance(image, (str, os.PathLike)):
            return load_image(Path(image), max_pixels=self.max_pixels)
        rgb = as_rgb_image(image)
        width, height = rgb.size
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise KeySegInputError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{self.max_pixels} (raise it with max_pixels=, or --max-pixels on the command "
                "line, if the image is trusted)"
            )
        return rgb

    @staticmethod
    def image_key(image: Image.Image) -> str:
        """Content hash of an RGB image (size + pixels): the embedding cache key."""
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{image.size}".encode())
        return digest.hexdigest()

    def _encoded(self, images: Sequence[Image.Image]) -> list[_CachedImage]:
        """Cached entries for ``images``; uncached ones are SAM-encoded in one call."""
        keys = [self.image_key(image) for image in images]
        todo = {k: image for k, image in zip(keys, images, strict=True) if k not in self._cache}
        if todo:
            prepared = [self.processor.prepare_image(image) for image in todo.values()]
            pixels = torch.stack([p.sam.pixel_values for p in prepared])
            with torch.inference_mode():
                embeddings = self.model.encode_images(
                    pixels.to(device=self.device, dtype=self.dtype)
                )
            for i, (key, item) in enumerate(zip(todo, prepared, strict=True)):
                self._cache[key] = _CachedImage(item, embeddings[i : i + 1])
        entries = []
        for key in keys:
            self._cache.move_to_end(key)
            entries.append(self._cache[key])
        while len(self._cache) > max(self.cache_size, len(set(keys))):
            self._cache.popitem(last=False)
        return entries

    def set_image(self, image: ImageLike) -> str:
        """Prepare and SAM-encode ``image`` now (cached); later :meth:`ask` calls reuse it.

        Starts a new conversation (clears :attr:`history`). Returns the image's cache key.
        """
        rgb = self.load(image)
        self._encoded([rgb])
        key = self.image_key(rgb)
        self._image = (key, rgb)
        self.history = []
        return key

    def reset(self) -> None:
        """Forget the conversation about the current image (its embedding stays cached)."""
        self.history = []

    def ask(self, query: str, *, remember: bool = True, **kwargs: Any) -> Result:
        """Ask about the image given to :meth:`set_image`, continuing :attr:`history`.

        With ``remember`` the turn is appended to the history (multi-turn chat).
        ``kwargs`` are those of :meth:`__call__`.
        """
        if self._image is None:
            raise KeySegInputError("call set_image(image) before ask(query)")
        result = self(self._image[1], query, history=list(self.history), **kwargs)
        if remember:
            self.history.append(tokens.Turn(self.format_question(query), result.answer))
        return result

    # --- queries --------------------------------------------------------------------------
    def format_question(self, query: str) -> str:
        query = query.strip()
        if not query:
            raise KeySegInputError("the query is empty")
        if self.question_template is None or "segment" in query.lower():
            return query
        return self.question_template.format(query=query)

    def __call__(
        self,
        image: ImageLike | Sequence[ImageLike],
        query: str | Sequence[str],
        history: Sequence[tokens.Turn] | Sequence[Sequence[tokens.Turn]] | None = None,
        max_new_tokens: int | None = None,
        *,
        return_logits: bool = False,
        **generate_kwargs: Any,
    ) -> Result | list[Result]:
        """Answer ``query`` about ``image``.

        Args:
            image: a path, PIL image or ``(H, W, 3)`` uint8 array, or a list of them.
            query: a question, or a list (one per image; or several about one image).
            history: earlier turns (:class:`keyseg.tokens.Turn` with answers) of one
                conversation, or one such list per row for batched calls.
            max_new_tokens: generation budget (default: the pipeline's).
            return_logits: also return the mask logits.
            generate_kwargs: passed to HF ``generate`` (greedy by default, e.g.
                ``do_sample=True, temperature=0.7`` or ``use_cache=False``).

        Returns:
            One :class:`Result`, or a list when ``image`` or ``query`` is a list.
        """
        many_images = isinstance(image, (list, tuple))
        many_queries = not isinstance(query, str)
        images = list(image) if many_images else [image]
        queries = list(query) if many_queries else [query]
        if many_images and many_queries and len(images) != len(queries):
            raise KeySegInputError(f"{len(images)} images but {len(queries)} queries")
        rows = max(len(images), len(queries))
        if not rows:
            raise KeySegInputError("no image/query given")
        if len(images) == 1:
            images = images * rows
        if len(queries) == 1:
            queries = queries * rows
        histories = self._histories(history, rows)
        start = time.perf_counter()
        rgb = self._load_unique(images)
        entries = self._encoded(rgb)
        encoded = time.perf_counter()
        batch, embeddings = self._prompt_batch(entries, queries, histories)
        from keyseg.generation import generate

        with torch.inference_mode():
            generated = generate(
                self.model, batch, image_embeddings=embeddings,
                max_new_tokens=max_new_tokens or self.max_new_tokens, answer_only=True,
                **generate_kwargs,
            )
        done = time.perf_counter()
        results = [
            self._result(q, g, return_logits) for q, g in zip(queries, generated, strict=True)
        ]
        post = time.perf_counter()
        for result in results:
            result.timings = {"encode": encoded - start, "generate": done - encoded,
                              "post": post - done}
        return results if (many_images or many_queries) else results[0]

    def _load_unique(self, images: list[ImageLike]) -> list[Image.Image]:
        """Load each distinct input object once (a repeated object is not re-read)."""
        loaded: dict[int, Image.Image] = {}
        out = []
        for image in images:
            if id(image) not in loaded:
                loaded[id(image)] = self.load(image)
            out.append(loaded[id(image)])
        return out

    @staticmethod
    def _histories(history, rows: int) -> list[list[tokens.Turn]]:
        if not history:
            return [[] for _ in range(rows)]
        if isinstance(history[0], tokens.Turn):
            return [list(history) for _ in range(rows)]
        if len(history) != rows:
            raise KeySegInputError(f"{len(history)} histories for {rows} queries")
        return [list(h or []) for h in history]

    def _prompt_batch(
        self,
        entries: list[_CachedImage],
        queries: list[str],
        histories: list[list[tokens.Turn]],
    ) -> tuple[Batch, torch.Tensor]:
        """A left-padded prompt batch (rows end at ``ASSISTANT:``) and the ``(N_img, C, h,
        w)`` embeddings of its distinct images."""
        unique: dict[int, int] = {}
        for entry in entries:
            unique.setdefault(id(entry), len(unique))
        images = list({id(e): e for e in entries}.values())
        rows = []
        for entry, query, history in zip(entries, queries, histories, strict=True):
            for turn in history:
                if turn.answer is None:
                    raise KeySegInputError("every history turn needs its answer")
            turns = [*history, tokens.Turn(self.format_question(query), None)]
            # The image's own token count: fixed for LLaVA, per image for Qwen's dynamic
            # resolution (the ids must hold exactly as many image tokens as it has features).
            count = entry.prepared.num_image_tokens
            rows.append(self.processor.encode(turns, count).input_ids)
        length = max(row.shape[0] for row in rows)
        input_ids = torch.full((len(rows), length), self.processor.ids.pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, length - row.shape[0]:] = row
            attention[i, length - row.shape[0]:] = 1
        vision = {
            key: torch.cat([e.prepared.vision_inputs[key] for e in entries])
            for key in entries[0].prepared.vision_inputs
        }
        batch = Batch(
            input_ids=input_ids,
            attention_mask=attention,
            vision_inputs=vision,
            # Embeddings are passed precomputed, so the SAM pixels need not travel.
            sam_pixel_values=torch.empty(len(images), 3, 0, 0),
            image_index=torch.tensor([unique[id(e)] for e in entries], dtype=torch.long),
            resized_sizes=[e.prepared.sam.resized_size for e in images],
            original_sizes=[e.prepared.sam.original_size for e in images],
        ).to(self.device, self.dtype)
        return batch, torch.cat([e.embedding for e in images])

    # --- results --------------------------------------------------------------------------
    def _result(self, query: str, generated, return_logits: bool) -> Result:
        logits = generated.masks.float().cpu()
        masks = (logits > 0).numpy()
        message = None
        if masks.shape[0] == 0:
            message = NO_SEG_MESSAGE
        elif not masks.any():
            message = "the mask is empty: the model found nothing matching the query"
        return Result(
            query=query,
            answer=generated.answer,
            keyword=generated.keyword,
            keyword_neighbours=self.keyword_neighbours(generated.key_embeddings),
            masks=masks,
            scores=generated.scores.float().cpu().numpy().reshape(-1),
            mask_logits=logits if return_logits else None,
            message=message,
        )

    def projected_table(self) -> torch.Tensor:
        """``(V, d)`` L2-normalised keyword projection of the vocabulary (computed once)."""
        if self._table is None:
            with torch.inference_mode():
                table = self.model.projected_table().float()
            self._table = torch.nn.functional.normalize(table, dim=-1)
        return self._table

    def keyword_neighbours(self, key: torch.Tensor, k: int | None = None
                           ) -> list[list[tuple[str, float]]]:
        """For each row of ``key: (m, d)``, the ``k`` vocabulary tokens of highest cosine
        under the keyword projection (the alignment loss's space), special tokens excluded.
        """
        if key.numel() == 0:
            return []
        k = k or self.num_neighbours
        table = self.projected_table()
        key = torch.nn.functional.normalize(key.float().to(table.device), dim=-1)
        cosine = key @ table.T
        ids = self.processor.ids
        banned = {ids.seg, ids.key, ids.image, ids.eos, ids.pad,
                  *self.processor.tokenizer.all_special_ids}
        banned.discard(None)
        cosine[:, [i for i in banned if 0 <= i < cosine.shape[1]]] = -2.0
        # Over-fetch: byte pieces that decode to nothing readable are skipped.
        top = cosine.topk(min(4 * k, cosine.shape[1]), dim=-1)
        decode = self.processor.tokenizer.decode
        rows = []
        for vals, idx in zip(top.values.cpu(), top.indices.cpu(), strict=True):
            row = []
            for score, token in zip(vals.tolist(), idx.tolist(), strict=True):
                text = decode([token]).strip()
                if text and "\ufffd" not in text and score > -2.0:
                    row.append((text, score))
                if len(row) == k:
                    break
            rows.append(row)
        return rows


# --- quantisation -------------------------------------------------------------------------
def _check_quantization(load_in: str, device: torch.device) -> None:
    if load_in not in ("4bit", "8bit"):
        raise KeySegConfigError(f"load_in={load_in!r}: use '4bit' or '8bit'")
    if device.type != "cuda":
        raise KeySegError(
            f"{load_in} loading needs a CUDA device (bitsandbytes), but the device is "
            f"{device}; drop --load-in to run in full precision"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise KeySegError(
            f"{load_in} loading needs the bitsandbytes package: pip install bitsandbytes"
        ) from error


# Modules left in full precision under 4/8-bit loading: everything but the language model's
# linear layers (transformers matches these patterns from the start of a module's name).
UNQUANTISED_MODULES = ("backbone.*lm_head", "backbone.*vision_tower",
                       "backbone.*multi_modal_projector", "backbone.*visual", "sam",
                       "text_hidden_fcs", "keyword_fusion", "keyword_text_proj",
                       "embedding_table_proj")


def quantization_config(load_in: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` quantising only the language model's linear
    layers (NF4 with ``compute_dtype`` for 4 bit, LLM.int8 for 8 bit); the vision tower, SAM
    and the KeySeg heads stay in ``compute_dtype`` (small and precision-sensitive)."""
    from transformers import BitsAndBytesConfig

    if load_in == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=list(UNQUANTISED_MODULES))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(UNQUANTISED_MODULES))
