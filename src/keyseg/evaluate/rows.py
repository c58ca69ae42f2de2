"""The rows of an evaluation on disk: streamed per-process part files, resume, merge.

Each process appends its rows to ``.<name>.part<rank>`` next to the final JSONL, one
flushed write per row, and a :data:`BATCH_END` line (fsynced) closes each batch, so a kill
loses at most the batch in flight: its rows and a torn last line are dropped on resume. At
the end the main process merges the previous merged file and every part into the final
file, rows in record order (``index``, ``ref``), each once, and removes the parts.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keyseg.errors import KeySegDataError

#: The line that closes a batch in a part file (never in the merged file).
BATCH_END = b'{"batch_end": true}\n'

#: ``{record index: (referent indices done, queries of the record)}``.
DoneMap = dict[int, tuple[set[int], int]]


class RowWriter:
    """Appends JSONL rows to a part file: each row one ``write`` of a whole line, flushed;
    :meth:`end_batch` appends :data:`BATCH_END` and fsyncs. Rows after the last
    ``BATCH_END`` (the batch a kill interrupted) are dropped on resume, so a resumed run
    batches exactly the conversations an uninterrupted one does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view):]

    def write(self, row: dict) -> None:
        """Append ``row`` as one JSON line."""
        self._write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    def end_batch(self) -> None:
        """Close the batch: its rows count on resume from now on."""
        self._write(BATCH_END)
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class RowStore:
    """The rows of one split and mode: ``final`` (the merged JSONL) and its part files.

    Args:
        final: the merged file's path (its folder is created).
        rank / world: this process's index and the number of processes.
        accelerator: the ``accelerate.Accelerator`` that synchronises them (``world > 1``).
    """

    def __init__(self, final: str | os.PathLike, rank: int = 0, world: int = 1,
                 accelerator: Any | None = None) -> None:
        self.final = Path(final)
        self.rank, self.world, self.accelerator = rank, world, accelerator
        self.final.parent.mkdir(parents=True, exist_ok=True)

    @property
    def part(self) -> Path:
        """This process's part file."""
        return self.final.with_name(f".{self.final.name}.part{self.rank}")

    def part_files(self) -> list[Path]:
        """Every part file of :attr:`final` on disk (any process count), in rank order."""
        prefix = f".{self.final.name}.part"
        found = [p for p in self.final.parent.glob(f"{glob.escape(prefix)}*")
                 if p.name[len(prefix):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(prefix):]))

    def _sources(self) -> list[Path]:
        return ([self.final] if self.final.is_file() else []) + self.part_files()

    def _wait(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def rows_to_resume(self, total: int) -> list[dict]:
        """The rows of this process's shard (``index % world == rank``, ``index < total``)
        on disk, in the merged file and every part file (of any earlier process count),
        each ``(index, ref)`` once, in record order. This process's part file is first cut
        after its last :data:`BATCH_END` (the interrupted batch goes).

        Raises:
            KeySegDataError: a complete line that is not a row of this format.
        """
        _trim_to_last_batch(self.part)
        self._wait()
        found: dict[tuple[int, int], dict] = {}
        for path in self._sources():
            for index, ref, row, _, _ in iter_rows(path, batched=path != self.final):
                if index < total and index % self.world == self.rank:
                    found.setdefault((index, ref), row)
        return [found[key] for key in sorted(found)]

    def discard(self) -> None:
        """Start over: empty this process's part; the main process also removes the merged
        file and parts of ranks this run does not have."""
        self.part.unlink(missing_ok=True)
        if self.rank == 0:
            self.final.unlink(missing_ok=True)
            for path in self.part_files():
                if int(path.name.rsplit("part", 1)[1]) >= self.world:
                    path.unlink(missing_ok=True)
        self._wait()

    def writer(self) -> RowWriter:
        """A writer appending to this process's part file."""
        return RowWriter(self.part)

    def merge(self) -> None:
        """Merge the previous merged file and every part into :attr:`final` on the main
        process: rows in record order (``index``, ``ref``), each once; then remove the
        parts. Only ``(index, ref)`` keys and file offsets are held in memory, not rows."""
        self._wait()
        if self.rank == 0:
            sources = self._sources()
            where: dict[tuple[int, int], tuple[int, int, int]] = {}
            for number, path in enumerate(sources):
                for index, ref, _, offset, length in iter_rows(path,
                                                               batched=path != self.final):
                    where.setdefault((index, ref), (number, offset, length))
            tmp = self.final.with_name(f".{self.final.name}.tmp")
            handles = [open(path, "rb") for path in sources]  # noqa: SIM115 (closed below)
            try:
                with open(tmp, "wb") as out:
                    for key in sorted(where):
                        number, offset, length = where[key]
                        handles[number].seek(offset)
                        out.write(handles[number].read(length))
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                for handle in handles:
                    handle.close()
            os.replace(tmp, self.final)
            for path in self.part_files():
                path.unlink(missing_ok=True)
        self._wait()


def iter_rows(path: Path, batched: bool = False) -> Iterator[tuple[int, int, dict, int, int]]:
    """``(index, ref, row, offset, length)`` of every complete row of a JSONL file; a torn
    last line (no newline: a kill mid-write) is skipped. ``batched`` (part files): only rows
    followed by a :data:`BATCH_END` line count.

    Raises:
        KeySegDataError: a complete line that is not a row of this format (names the file
            and line).
    """
    offset = 0
    held: list[tuple[int, int, dict, int, int]] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                return  # torn last line
            if line == BATCH_END:
                yield from held
                held = []
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (int(row["index"]), int(row["ref"]))
                int(row["queries"])
            except (ValueError, KeyError, TypeError) as error:
                raise KeySegDataError(
                    f"{path}:{number}: not an evaluation row of this keyseg version ({error}); "
                    "start over with --overwrite (or another --out)"
                ) from error
            held.append((key[0], key[1], row, start, len(line)))
            if not batched:
                yield from held
                held = []


def done_map(rows: list[dict]) -> tuple[DoneMap, int]:
    """``{record index: (referent indices done, queries of the record)}`` and the number
    of records whose every query is done."""
    done: DoneMap = {}
    for row in rows:
        refs, _ = done.setdefault(int(row["index"]), (set(), int(row["queries"])))
        refs.add(int(row["ref"]))
    complete = sum(1 for refs, queries in done.values() if len(refs) >= queries)
    return done, complete


def _trim_to_last_batch(path: Path) -> None:
    """Cut ``path`` after its last :data:`BATCH_END` line: the rows of an interrupted batch
    and a torn last line go."""
    if not path.is_file():
        return
    keep = 0
    with open(path, "rb") as handle:
        offset = 0
        for line in handle:
            offset += len(line)
            if line == BATCH_END:
                keep = offset
    if keep != path.stat().st_size:
        os.truncate(path, keep)
