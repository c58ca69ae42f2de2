"""keyseg.runtime: one resolution of device and dtype names."""

from __future__ import annotations

import pytest
import torch

from keyseg.errors import KeySegConfigError
from keyseg.runtime import resolve_dtype


@pytest.mark.parametrize(("name", "dtype"), [
    ("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
    ("BFloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16),
    (torch.float16, torch.float16),
])
def test_both_spellings_of_a_dtype_resolve_to_it(name, dtype):
    assert resolve_dtype(name, torch.device("cpu")) == dtype


def test_auto_and_none_mean_fp32_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == resolve_dtype("auto", cpu) == torch.float32


def test_unknown_dtype_is_one_config_error_listing_the_names():
    with pytest.raises(KeySegConfigError, match=r"unknown dtype 'int4'.*fp32.*bfloat16"):
        resolve_dtype("int4", torch.device("cpu"))
