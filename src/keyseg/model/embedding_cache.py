"""A cache of SAM image embeddings for training with a frozen image encoder.

When SAM's image encoder is frozen (the reference recipe, SPEC section 4) its output for an
image never changes during a run, yet every epoch recomputes it. :class:`ImageEmbeddingCache`
keys each image by a hash of its SAM input pixels (no cooperation from the data pipeline
needed, and two identical inputs are the same image by construction) and returns the stored
embedding; only images it has not seen go through the encoder. Stored embeddings are exactly
the encoder's outputs (same dtype and device), so a cached run computes what an uncached one
does. Insertion stops when the byte budget is full (with shuffled data an LRU would evict
at random too, and never inserting avoids churn).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor


class ImageEmbeddingCache:
    """Image pixels -> SAM image embedding, up to ``max_bytes`` of stored embeddings.

    Valid only while the encoder's weights do not change: attach it to a model whose SAM
    image encoder is frozen (``KeySegModel.image_embedding_cache``).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stored_bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[bytes, Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def key(pixels: Tensor) -> bytes:
        """A 16-byte digest of one image's ``(3, S, S)`` input, its shape and dtype."""
        data = pixels.detach().contiguous().cpu()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.dtype == torch.bfloat16
                      else data.numpy().tobytes())
        return digest.digest()

    def __call__(self, pixels: Tensor, encode: Callable[[Tensor], Tensor]) -> Tensor:
        """``(N, 3, S, S)`` -> ``(N, C, h, w)``: stored embeddings where there are, ``encode``
        (one call, on the unseen images only) for the rest."""
        keys = [self.key(image) for image in pixels]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, Tensor] = {}
        if missing:
            encoded = encode(pixels[missing])
            for row, index in enumerate(missing):
                fresh[index] = encoded[row]
                size = encoded[row].numel() * encoded[row].element_size()
                if keys[index] not in self._store and self.stored_bytes + size <= self.max_bytes:
                    self._store[keys[index]] = encoded[row].detach().clone()
                    self.stored_bytes += size
        return torch.stack([fresh[i] if i in fresh else self._store[k]
                            for i, k in enumerate(keys)])

    def summary(self) -> str:
        """One line: entries, size, hit rate."""
        total = self.hits + self.misses
        rate = self.hits / total if total else 0.0
        return (f"image embedding cache: {len(self)} images, {self.stored_bytes / 2**30:.2f} "
                f"GiB, {self.hits}/{total} hits ({rate:.0%})")
