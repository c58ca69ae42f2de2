"""Shared fixtures: tiny random models built through the same factory users call."""

from __future__ import annotations

import random

import pytest

from helpers import make_record
from keyseg.data.collate import Collator, ImageExample, record_to_example


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests skip where no CUDA device is present (``make test-cuda``
    runs just them on a GPU machine)."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_factory():
    from keyseg.build import build_tiny_model

    return build_tiny_model


@pytest.fixture
def tiny_model(tiny_model_factory):
    return tiny_model_factory(seed=0, lora=True)


@pytest.fixture
def make_batch():
    def build(model, mode: str = "train", seed: int = 0, records=None):
        records = records or [make_record(seed=seed)]
        examples: list[ImageExample] = [
            record_to_example(r, random.Random(seed), use_keyword=model.settings.use_keyword)
            for r in records
        ]
        return Collator(model.processor, mode=mode)(examples)

    return build
