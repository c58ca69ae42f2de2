"""Atomic writes: all-or-nothing, and entries as readable as plain open()/mkdir() would make."""

from __future__ import annotations

import os
import stat

import pytest

from keyseg.io import atomic_directory, atomic_write_json


@pytest.fixture
def umask_022(monkeypatch):
    """The process umask as 022 (keyseg.io reads it once, at import)."""
    import keyseg.io

    monkeypatch.setattr(keyseg.io, "_UMASK", 0o022)
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_directories_follow_the_umask(tmp_path, umask_022):
    """mkstemp/mkdtemp alone would leave 0600/0700 entries other users cannot read."""
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with atomic_directory(tmp_path / "model") as tmp:
        atomic_write_json(tmp / "config.json", {})
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "model") == 0o755
    assert _mode(tmp_path / "model" / "config.json") == 0o644


def test_failed_directory_write_keeps_the_previous_one(tmp_path):
    with atomic_directory(tmp_path / "model") as tmp:
        atomic_write_json(tmp / "config.json", {"version": 1})
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "model") as tmp:
        atomic_write_json(tmp / "config.json", {"version": 2})
        raise RuntimeError("crash while writing")
    assert (tmp_path / "model" / "config.json").read_text().count('"version": 1') == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp directory left
