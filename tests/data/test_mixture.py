"""MixtureSampler: proportions, determinism, resume, referent sub-sampling, skips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from keyseg.data.mixture import MixtureSampler
from keyseg.data.sample import Referent, SegRecord
from keyseg.errors import KeySegConfigError, KeySegDataError


def make_records(source: str, n: int, referents: int = 1) -> list[SegRecord]:
    mask = np.zeros((1, 2, 2), dtype=np.uint8)
    return [
        SegRecord(sample_id=f"{source}{i}", source=source,
                  referents=[Referent(text=f"{source}{i}-{k}", is_sentence=False, masks=mask)
                             for k in range(referents)])
        for i in range(n)
    ]


class Flaky(list):
    """A dataset whose odd items fail to load."""

    def __getitem__(self, index):
        if index % 2:
            raise KeySegDataError(f"item {index} is broken")
        return super().__getitem__(index)


def signature(records: list[SegRecord]) -> list[tuple[str, tuple[str, ...]]]:
    return [(r.sample_id, tuple(x.text for x in r.referents)) for r in records]


def test_default_weights_give_refer_reason_nine_to_three():
    sampler = MixtureSampler({"refer": make_records("f", 50), "reason": make_records("r", 7)})
    draws = sampler.take(4000)
    share = sum(r.meta["dataset"] == "reason" for r in draws) / len(draws)
    assert abs(share - 0.25) < 0.025
    assert {r.sample_id for r in draws if r.source == "r"} == {f"r{i}" for i in range(7)}


def test_custom_weights_and_zero_weight():
    data = {"a": make_records("a", 5), "b": make_records("b", 5), "c": make_records("c", 5)}
    sampler = MixtureSampler(data, weights={"a": 1, "b": 4, "c": 0}, seed=3)
    counts = {"a": 0, "b": 0, "c": 0}
    for record in sampler.take(3000):
        counts[record.meta["dataset"]] += 1
    assert counts["c"] == 0
    assert abs(counts["b"] / 3000 - 0.8) < 0.03


def test_same_seed_same_sequence_and_different_seed_differs():
    data = {"refer": make_records("f", 30, 5), "reason": make_records("r", 30, 5)}
    first = signature(MixtureSampler(data, seed=7).take(200))
    assert first == signature(MixtureSampler(data, seed=7).take(200))
    assert first != signature(MixtureSampler(data, seed=8).take(200))


def test_resume_from_state_dict_continues_the_same_sequence():
    data = {"refer": make_records("f", 30, 5), "reason": make_records("r", 30, 5)}
    reference = signature(MixtureSampler(data, seed=11).take(300))
    sampler = MixtureSampler(data, seed=11)
    head = sampler.take(120)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a JSON checkpoint
    resumed = MixtureSampler(data, seed=0)
    resumed.load_state_dict(state)
    assert signature(head) + signature(resumed.take(180)) == reference


def test_at_most_n_referents_are_sampled_without_replacement():
    data = {"refer": make_records("f", 4, 6), "reason": make_records("r", 4, 2)}
    seen = set()
    for record in MixtureSampler(data, seed=1, max_referents=3).take(300):
        texts = [r.text for r in record.referents]
        expected = 3 if record.source == "f" else 2
        assert len(texts) == expected and len(set(texts)) == expected
        assert texts == sorted(texts)  # original order is kept
        seen.update(texts)
    assert len(seen) == 4 * 6 + 4 * 2  # every referent gets its turn
    assert len(data["refer"][0].referents) == 6  # the dataset's records are not mutated


def test_failed_loads_are_counted_and_redrawn():
    sampler = MixtureSampler({"x": Flaky(make_records("x", 10))}, seed=5)
    records = sampler.take(100)
    assert all(int(r.sample_id[1:]) % 2 == 0 for r in records)
    assert sampler.skipped["x"] > 0
    assert sampler.state_dict()["skipped"] == {"x": sampler.skipped["x"]}


def test_bad_configuration_is_rejected():
    data = {"refer": make_records("f", 3), "reason": make_records("r", 3)}
    with pytest.raises(KeySegConfigError, match="missing"):
        MixtureSampler(data, weights={"refer": 1})
    with pytest.raises(KeySegConfigError, match=">= 0"):
        MixtureSampler(data, weights={"refer": 1, "reason": -1})
    with pytest.raises(KeySegDataError, match="'reason' is empty"):
        MixtureSampler({"refer": data["refer"], "reason": []})
    sampler = MixtureSampler(data)
    with pytest.raises(KeySegConfigError, match="saved for datasets"):
        sampler.load_state_dict({"seed": 0, "step": 1, "names": ["other"]})
