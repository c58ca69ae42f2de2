"""The SAM image-embedding cache: same embeddings as the encoder, encoder skipped on a hit,
refused with a trainable encoder, and a cached training step equal to an uncached one."""

from __future__ import annotations

import pytest
import torch

from keyseg.model.embedding_cache import ImageEmbeddingCache


class CountingEncoder:
    def __init__(self):
        self.images = 0
        torch.manual_seed(0)
        self.weight = torch.randn(4, 3)

    def __call__(self, pixels):
        self.images += len(pixels)
        return torch.einsum("oc,nchw->nohw", self.weight, pixels)


def test_hits_return_the_encoders_output_without_calling_it():
    encoder, cache = CountingEncoder(), ImageEmbeddingCache(max_bytes=10**6)
    a, b, c = (torch.rand(1, 3, 8, 8) for _ in range(3))
    first = cache(torch.cat([a, b]), encoder)
    assert encoder.images == 2
    second = cache(torch.cat([b, c, a]), encoder)  # only c is new
    assert encoder.images == 3
    assert torch.equal(second, encoder(torch.cat([b, c, a])))
    assert torch.equal(first[1], second[0])
    assert (cache.hits, cache.misses, len(cache)) == (2, 3, 3)
    assert "2/5 hits" in cache.summary()


def test_the_budget_stops_insertion_but_not_answers():
    encoder = CountingEncoder()
    one = 4 * 8 * 8 * 4  # bytes of one (4, 8, 8) float32 embedding
    cache = ImageEmbeddingCache(max_bytes=one)
    a, b = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    cache(torch.cat([a, b]), encoder)
    assert len(cache) == 1 and cache.stored_bytes == one
    out = cache(torch.cat([a, b]), encoder)
    assert torch.equal(out, encoder(torch.cat([a, b])))
    with pytest.raises(ValueError):
        ImageEmbeddingCache(0)


def test_a_different_image_is_a_miss():
    a = torch.rand(3, 8, 8)
    b = a.clone()
    b[0, 0, 0] += 1e-6
    assert ImageEmbeddingCache.key(a) != ImageEmbeddingCache.key(b)
    assert ImageEmbeddingCache.key(a) == ImageEmbeddingCache.key(a.clone())
    assert ImageEmbeddingCache.key(a) != ImageEmbeddingCache.key(a.to(torch.bfloat16))


def test_config_refuses_a_cache_with_a_trainable_image_encoder():
    from keyseg.config import load_config
    from keyseg.errors import KeySegConfigError

    with pytest.raises(KeySegConfigError, match=r"train\.image_embedding_cache_gb"):
        load_config(None, ["train.image_embedding_cache_gb=1.0",
                           "model.trainable=[sam_image_encoder,sam_mask_decoder]"])
    load_config(None, ["train.image_embedding_cache_gb=1.0",
                       "model.trainable=[sam_mask_decoder]"])


def test_a_cached_model_computes_what_an_uncached_one_does():
    from keyseg.build import build_tiny_model
    from keyseg.model.trainable import configure_trainable

    model = build_tiny_model(seed=0)
    configure_trainable(model, ["sam_mask_decoder", "text_hidden_fcs"])
    pixels = torch.rand(2, 3, model.sam.image_size, model.sam.image_size)
    plain = model.encode_images(pixels)
    model.image_embedding_cache = ImageEmbeddingCache(10**8)
    cold, warm = model.encode_images(pixels), model.encode_images(pixels)
    assert torch.allclose(cold, plain, atol=1e-6) and torch.equal(cold, warm)
    assert model.image_embedding_cache.hits == 2
    configure_trainable(model, ["sam_image_encoder"])  # a trainable encoder bypasses it
    model.encode_images(pixels)
    assert model.image_embedding_cache.hits == 2
