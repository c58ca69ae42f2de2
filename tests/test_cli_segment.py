"""keyseg segment / chat / batch: files written, history kept, bad images refused in one line."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import answer_ids, forced
from keyseg import cli
from keyseg.pipeline import KeySegPipeline


class ScriptedPipeline(KeySegPipeline):
    """Answers 'Sure, [SEG] [SEG]. [KEY] spoon' whatever the random weights say."""

    def __call__(self, *args, **kwargs):
        script = answer_ids(self.processor, " Sure,", segs=2, keyword="spoon")
        kwargs["logits_processor"] = forced(script)
        return super().__call__(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    from keyseg.build import build_tiny_model

    return build_tiny_model(seed=4).eval()


@pytest.fixture
def scripted(monkeypatch, tiny):
    """Route every command's model loading to a scripted tiny pipeline (no 6 s rebuild)."""
    made = []

    def fake(cls, path=None, device=None, dtype=None, *, load_in=None, **kwargs):
        made.append(ScriptedPipeline(tiny, **kwargs))
        return made[-1]

    monkeypatch.setattr(KeySegPipeline, "from_pretrained", classmethod(fake))
    return made


def write_image(path: Path, height: int = 30, width: int = 50, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def huge_png_header(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A small PNG file whose header claims ``width x height`` (100 MP by default)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width/height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    path.write_bytes(bytes(data))
    return path


def test_segment_writes_binary_masks_overlay_and_json(tmp_path, scripted, capsys):
    picture = write_image(tmp_path / "wide.png")
    out = tmp_path / "out"
    assert cli.main(["segment", str(picture), "What would you use to eat soup?",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "keyword: spoon" in printed and f"overlay: {out / 'overlay.png'}" in printed
    for k in (0, 1):
        mask = np.asarray(Image.open(out / f"mask_{k}.png"))
        assert mask.shape == (30, 50) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(out / "overlay.png").size == (50, 30)
    summary = json.loads((out / "result.json").read_text())
    assert summary["keyword"] == "spoon" and summary["num_masks"] == 2
    assert summary["mask_files"] == ["mask_0.png", "mask_1.png"]
    assert len(summary["keyword_neighbours"][0]) == 5
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def bad_images(tmp_path: Path) -> dict[str, Path]:
    good = write_image(tmp_path / "good.jpg", 64, 64)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is a text file, not a JPEG\n")
    return {"truncated": truncated, "text": text,
            "huge": huge_png_header(tmp_path / "huge.png")}


@pytest.mark.parametrize("kind, words", [("truncated", "cannot decode"),
                                         ("text", "not a readable image"),
                                         ("huge", "100000000 pixels")])
def test_segment_bad_image_exits_nonzero_with_one_line_error(tmp_path, capsys, kind, words):
    path = bad_images(tmp_path)[kind]
    # No model is loaded: the image is checked first (from_pretrained is not patched here).
    assert cli.main(["segment", str(path), "q", "--out", str(tmp_path / "o")]) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyseg segment: error: ")
    assert str(path) in lines[0] and words in lines[0]
    assert not (tmp_path / "o").exists()


def test_segment_process_exit_status_and_stderr_for_renamed_text_file(tmp_path):
    path = bad_images(tmp_path)["text"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "keyseg.cli", "segment", str(path), "q"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"keyseg segment: error: {path}: not a readable image file"


def test_chat_keeps_history_and_writes_each_turn(tmp_path, scripted, monkeypatch, capsys):
    picture = write_image(tmp_path / "a.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO("first?\n\nsecond?\nexit\nnever asked\n"))
    assert cli.main(["chat", str(picture), "--out", str(tmp_path / "chat")]) == 0
    (pipe,) = scripted
    assert [t.question.split(" Please")[0] for t in pipe.history] == ["first?", "second?"]
    for turn in (1, 2):
        assert (tmp_path / "chat" / f"turn_{turn}" / "mask_1.png").is_file()
    assert not (tmp_path / "chat" / "turn_3").exists()
    assert "2 turn(s)" in capsys.readouterr().out


def test_batch_skips_bad_items_and_resumes(tmp_path, scripted, capsys):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", 20, 40, seed=1)
    (tmp_path / "bad.jpg").write_text("not an image")
    lines = [{"image": "a.png", "query": "q1", "id": "first"},
             {"image": "bad.jpg", "query": "q2"},
             {"image": "b.png", "query": "q3"}]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert cli.main(["batch", str(source), "--out", str(out)]) == 1  # one failure
    summary = capsys.readouterr()
    assert "3 items: 2 segmented, 0 already done (skipped), 1 failed" in summary.out
    assert "bad.jpg: not a readable image file" in summary.err
    assert json.loads((out / "first" / "result.json").read_text())["query"] == "q1"
    assert (out / "000003_b" / "mask_0.png").is_file()
    (tmp_path / "bad.jpg").unlink()
    write_image(tmp_path / "bad.jpg", seed=2)  # fixed: the rerun does only this item
    assert cli.main(["batch", str(source), "--out", str(out)]) == 0
    assert "3 items: 1 segmented, 2 already done (skipped), 0 failed" in capsys.readouterr().out
    assert not (out / "failures.json").exists()


def test_batch_folder_needs_query(tmp_path, capsys):
    write_image(tmp_path / "a.png")
    assert cli.main(["batch", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--query" in capsys.readouterr().err


def test_the_shapes_world_note_is_for_the_embedded_default_only(tmp_path):
    import argparse

    from keyseg.commands.segment import uses_embedded_default

    assert uses_embedded_default(argparse.Namespace(checkpoint=None))
    assert not uses_embedded_default(argparse.Namespace(checkpoint=tmp_path))
    assert not uses_embedded_default(argparse.Namespace(checkpoint="org/name"))

def test_batch_folder_with_query_segments_every_image_and_lists_failures(tmp_path, scripted,
                                                                       capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_image(folder / "b.png")
    write_image(folder / "a.jpg", 20, 40, seed=1)
    (folder / "a.png").write_text("not an image")  # same stem as a.jpg: named a.png
    (folder / "notes.txt").write_text("not an image suffix: not an item")
    out = tmp_path / "out"
    assert cli.main(["batch", str(folder), "--query", "the red shape", "--out", str(out)]) == 1
    summary = capsys.readouterr()
    assert "3 items: 2 segmented, 0 already done (skipped), 1 failed" in summary.out
    assert str(out / "failures.json") in summary.out
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b", "failures.json"]
    for item in ("a.jpg", "b"):
        result = json.loads((out / item / "result.json").read_text())
        assert result["query"] == "the red shape" and result["id"] == item
        assert result["image"] == str(folder / ("a.jpg" if item == "a.jpg" else "b.png"))
    (failure,) = json.loads((out / "failures.json").read_text())
    assert failure["id"] == "a.png"
    assert "a.png" in failure["error"] and "not a readable image file" in failure["error"]
    assert set(failure) == {"id", "error"}


def test_batch_jsonl_line_errors_are_listed_in_failures_json(tmp_path, scripted, capsys):
    write_image(tmp_path / "a.png")
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([
        "{not json",
        json.dumps({"query": "no image"}),
        json.dumps({"image": "a.png"}),
        json.dumps({"image": "a.png", "query": "q", "id": "x"}),
        json.dumps({"image": "a.png", "query": "q again", "id": "x"}),
    ]) + "\n")
    out = tmp_path / "out"
    assert cli.main(["batch", str(source), "--out", str(out)]) == 1
    failures = {f["id"]: f["error"] for f in json.loads((out / "failures.json").read_text())}
    assert set(failures) == {"line_1", "line_2", "line_3", "x"}
    assert failures["line_1"].startswith(f"{source}:1: not JSON")
    assert failures["line_2"] == f"{source}:2: 'image' missing"
    assert failures["line_3"] == f"{source}:3: 'query' missing"
    assert failures["x"] == "duplicate id 'x'"
    assert json.loads((out / "x" / "result.json").read_text())["query"] == "q"
    # --query fills in lines without one
    again = tmp_path / "again"
    assert cli.main(["batch", str(source), "--out", str(again), "--query", "default q"]) == 1
    assert "line_3" not in {f["id"] for f in json.loads((again / "failures.json").read_text())}
    capsys.readouterr()


def _raising_command(monkeypatch, error):
    from keyseg.commands import segment

    def run(args):
        raise error

    monkeypatch.setattr(segment, "run", run)


def test_errors_are_one_line_unless_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from keyseg.errors import KeySegInputError

    _raising_command(monkeypatch, KeySegInputError("the query is empty"))
    argv = ["segment", str(tmp_path / "a.png"), "q"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "keyseg segment: error: the query is empty\n"
    with pytest.raises(KeySegInputError, match="the query is empty"):
        cli.main(["--debug", *argv])


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    _raising_command(monkeypatch, KeyboardInterrupt())
    assert cli.main(["segment", str(tmp_path / "a.png"), "q"]) == 130
    assert capsys.readouterr().err == "keyseg segment: interrupted\n"


def test_unexpected_errors_are_not_swallowed(tmp_path, monkeypatch):
    _raising_command(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["segment", str(tmp_path / "a.png"), "q"])


def test_debug_traceback_and_interrupt_status_of_the_real_process(tmp_path):
    """The installed entry point: --debug prints the traceback; SIGINT gives status 130."""
    import textwrap

    missing = tmp_path / "missing.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "-m", "keyseg.cli", "segment", str(missing), "q"],
                           capture_output=True, text=True, env=env)
    debug = subprocess.run([sys.executable, "-m", "keyseg.cli", "--debug", "segment",
                            str(missing), "q"], capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and "missing.png" in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "missing.png" in debug.stderr.strip().splitlines()[-1]
    script = textwrap.dedent("""
        import os, signal, sys
        # as in a terminal: a job started in the background inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from keyseg import cli
        from keyseg.commands import segment
        segment.run = lambda args: os.kill(os.getpid(), signal.SIGINT)
        sys.exit(cli.main(["segment", "x.png", "q"]))
    """)
    interrupted = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                 text=True, env=env)
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.strip() == "keyseg segment: interrupted"
