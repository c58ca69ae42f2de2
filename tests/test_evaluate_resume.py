"""Evaluation that survives a kill: streamed rows, resume to the uninterrupted report,
refusal of other arguments in an existing --out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import make_record
from keyseg.cli import main as cli_main
from keyseg.data.shapes import ShapesConfig, ShapesDataset
from keyseg.errors import KeySegConfigError
from keyseg.evaluate import run_evaluation

ROOT = Path(__file__).resolve().parents[1]
SMALL = ShapesConfig(image_size=64, val_size=4, test_size=5)

# Kills the process (SIGKILL: no cleanup, no flush) while it writes row KILL_AT: half of
# that row's bytes reach the file first, as when a kill lands inside write().
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import keyseg.evaluate as ev
    from keyseg.cli import main

    kill_at, calls = int(sys.argv[1]), [0]
    write = ev._RowWriter.write

    def dying_write(self, row):
        calls[0] += 1
        if calls[0] == kill_at:
            data = (json.dumps(row) + "\\n").encode()
            self._file.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, row)

    ev._RowWriter.write = dying_write
    sys.exit(main(sys.argv[2:]))
""")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A ReasonSeg-format tree written by the user-facing exporter (6 val images)."""
    root = tmp_path_factory.mktemp("shapes-dataset")
    assert cli_main(["data", "shapes-export", str(root), "--split", "val", "--size", "6",
                     "--image-size", "64", "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from keyseg.build import build_tiny_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_model(seed=0).save_pretrained(path)
    return path


def _eval_args(checkpoint: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--dataset", "reason_seg:val",
            "--mode", "teacher", "generate", "--dataset-dir", str(dataset), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "3", "--no-progress", *extra]


def _results(out: Path) -> dict:
    """The report's per-split results without the timings."""
    results = json.loads((out / "report.json").read_text())["results"]
    for modes in results.values():
        for entry in modes.values():
            entry.pop("wall_time_s")
    return results


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_sigkilled_eval_resumes_to_the_uninterrupted_report(dataset, checkpoint, tmp_path):
    full = tmp_path / "full"
    assert cli_main(_eval_args(checkpoint, dataset, full)) == 0

    out = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # Row 4 of the teacher split is the second of batch 2: batch 1 is on disk, then row 3
    # complete, then half of row 4 when the kill lands.
    proc = subprocess.run([sys.executable, str(script), "4",
                           *_eval_args(checkpoint, dataset, out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    samples = out / "samples"
    part = samples / ".reason_seg_val_teacher.jsonl.part0"
    lines = part.read_bytes().split(b"\n")
    assert len([x for x in lines[:-1] if x.startswith(b"{\"id\"")]) == 3  # streamed, flushed
    assert lines[-1] and not lines[-1].endswith(b"}")  # the torn row
    assert not (samples / "reason_seg_val_teacher.jsonl").exists()
    assert not (out / "report.json").exists()

    assert cli_main(_eval_args(checkpoint, dataset, out)) == 0
    assert _results(out) == _results(full)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_rows"] == {"reason_seg:val": {"teacher": 2, "generate": 0}}
    for mode in ("teacher", "generate"):
        name = f"reason_seg_val_{mode}.jsonl"
        ids = _ids(samples / name)
        assert len(ids) == len(set(ids)) == 6  # every sample exactly once
        assert (samples / name).read_bytes() == (full / "samples" / name).read_bytes()
    assert not list(samples.glob(".*part*"))

    # A finished run rerun with the same arguments is read back whole, not scored again.
    assert cli_main(_eval_args(checkpoint, dataset, out)) == 0
    assert _results(out) == _results(full)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_rows"] == {"reason_seg:val": {"teacher": 6, "generate": 6}}


def test_other_arguments_in_an_existing_out_are_refused_unless_overwrite(
        dataset, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(_eval_args(checkpoint, dataset, out, "--limit", "2")) == 0
    capsys.readouterr()
    assert cli_main(_eval_args(checkpoint, dataset, out, "--limit", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(out) in err and "limit: 2 -> 3" in err and "--overwrite" in err
    assert len(_ids(out / "samples" / "reason_seg_val_teacher.jsonl")) == 2  # untouched

    # Options that do not change a row may change on resume.
    assert cli_main(_eval_args(checkpoint, dataset, out, "--limit", "2",
                               "--save-overlays", "1")) == 0
    assert cli_main(_eval_args(checkpoint, dataset, out, "--limit", "3", "--overwrite")) == 0
    assert len(_ids(out / "samples" / "reason_seg_val_teacher.jsonl")) == 3
    assert not (out / "overlays").exists()  # --overwrite removed the earlier run's output


def test_output_without_run_file_is_refused(dataset, checkpoint, tmp_path, capsys):
    out = tmp_path / "old"
    (out / "samples").mkdir(parents=True)
    (out / "report.json").write_text("{}")
    assert cli_main(_eval_args(checkpoint, dataset, out)) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "--overwrite" in err


def _two_referent_records(n: int):
    """2 referents each (1 and 2 masks); data issues as a reader counts them per record."""
    records = [make_record(seed=s) for s in range(n)]
    for s, record in enumerate(records):
        record.meta["issues"] = {"empty_sentences": s + 1, "degenerate_polygons": s % 2}
    return records


@pytest.mark.parametrize("kept", [0, 3, 4])
def test_resume_after_a_partial_batch_equals_uninterrupted(tiny_model_factory, tmp_path, kept):
    """Batch 3 spans records: after kept=4 rows (batch 2 half written, a torn line), the
    resumed run drops the half batch and redoes it, with the same batches as before."""
    model = tiny_model_factory(seed=0)
    records = _two_referent_records(4)  # 8 conversations
    full = tmp_path / "full.jsonl"
    reference = run_evaluation(model, records, batch_size=3, jsonl_path=full,
                               keep_overlays=1, progress=False)
    rows = full.read_bytes().splitlines(keepends=True)
    assert len(rows) == 8

    jsonl = tmp_path / "resumed.jsonl"
    part = tmp_path / ".resumed.jsonl.part0"
    end = b'{"batch_end": true}\n'
    content = b"".join(rows[:3]) + end + b"".join(rows[3:kept]) + rows[kept][:25]
    part.write_bytes(content if kept else rows[0][:10])
    resumed = run_evaluation(model, records, batch_size=3, jsonl_path=jsonl, resume=True,
                             keep_overlays=1, keep_per_sample=True, progress=False)
    assert resumed.metrics == reference.metrics  # issues too: record 0 is not loaded again
    assert reference.metrics["issues"] == {"degenerate_polygons": 2, "empty_sentences": 10}
    assert resumed.resumed_rows == (3 if kept else 0)  # the half batch is scored again
    assert jsonl.read_bytes() == full.read_bytes()
    assert len(resumed.per_sample) == 8
    assert not part.exists()
    for kind in ("worst", "best"):
        (a,), (b,) = reference.overlays[kind], resumed.overlays[kind]
        assert (a.sample_id, a.score, a.shape) == (b.sample_id, b.score, b.shape)
        assert (a.target_bits == b.target_bits).all() and b.pred_bits is not None


def test_fresh_run_discards_rows_of_an_earlier_one(tiny_model_factory, tmp_path):
    model = tiny_model_factory(seed=0)
    jsonl = tmp_path / "rows.jsonl"
    run_evaluation(model, ShapesDataset("test", SMALL), jsonl_path=jsonl, progress=False)
    stale = tmp_path / ".rows.jsonl.part3"  # from a run with more processes
    stale.write_bytes(jsonl.read_bytes().splitlines(keepends=True)[0])
    result = run_evaluation(model, ShapesDataset("test", SMALL), limit=2, jsonl_path=jsonl,
                            progress=False)
    assert result.resumed_rows == 0 and len(_ids(jsonl)) == 2 and not stale.exists()


def test_resume_refuses_a_corrupt_row_naming_the_file_and_line(tiny_model_factory, tmp_path):
    from keyseg.errors import KeySegDataError

    jsonl = tmp_path / "rows.jsonl"
    (tmp_path / ".rows.jsonl.part0").write_text('{"id": "x"}\n{"batch_end": true}\n')
    with pytest.raises(KeySegDataError, match=r"part0:1: not an evaluation row"):
        run_evaluation(tiny_model_factory(seed=0), ShapesDataset("test", SMALL),
                       jsonl_path=jsonl, resume=True, progress=False)
    with pytest.raises(KeySegConfigError, match="jsonl_path"):
        run_evaluation(tiny_model_factory(seed=0), [], resume=True, progress=False)


WORKER = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from keyseg.data.shapes import ShapesConfig, ShapesDataset
    from keyseg.evaluate import run_evaluation
    from keyseg.build import build_tiny_model

    acc = Accelerator(cpu=True)
    records = ShapesDataset("test", ShapesConfig(image_size=64, test_size=5))
    result = run_evaluation(build_tiny_model(seed=0), records, accelerator=acc, batch_size=1,
                            jsonl_path=sys.argv[1], resume=True, progress=False)
    print("RESULT " + json.dumps([result.metrics, result.resumed_rows]))
""")


@pytest.mark.slow
def test_two_processes_resume_their_own_part_files(tmp_path, tiny_model_factory):
    records = ShapesDataset("test", SMALL)
    single = tmp_path / "single.jsonl"
    reference = run_evaluation(tiny_model_factory(seed=0), records, jsonl_path=single,
                               progress=False)
    rows = single.read_bytes().splitlines(keepends=True)  # record order: 0..4
    end = b'{"batch_end": true}\n'
    jsonl = tmp_path / "dist.jsonl"
    # Process 0 (records 0, 2, 4) had written record 0; process 1 (1, 3) record 1 and
    # half of record 3.
    (tmp_path / ".dist.jsonl.part0").write_bytes(rows[0] + end)
    (tmp_path / ".dist.jsonl.part1").write_bytes(rows[1] + end + rows[3][:30])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29000 + os.getpid() % 500), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(jsonl)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    results = [json.loads(line[7:]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == 2 and results[0] == results[1]
    metrics, resumed = results[0]
    assert resumed == 2
    for key in ("n", "intersection", "union", "samples", "records"):
        assert metrics[key] == reference.metrics[key]
    assert metrics["giou"] == pytest.approx(reference.metrics["giou"], abs=1e-12)
    assert jsonl.read_bytes() == single.read_bytes()


@pytest.mark.slow  # two 2-process runs of the CLI: ~40 s on a loaded 2-core machine
def test_killed_two_process_cli_run_resumes_per_process(dataset, checkpoint, tmp_path):
    """Both processes of a 2-process `keyseg eval` are SIGKILLed in their second row; the
    rerun resumes each process's part file and ends with the single-process numbers."""
    single = tmp_path / "single"
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", "reason_seg:val",
            "--dataset-dir", str(dataset), "--no-progress"]
    assert cli_main([*args, "--out", str(single)]) == 0
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "dist"
    port = 29700 + os.getpid() % 200

    def launch(*prefix: str) -> list[subprocess.Popen]:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        return [subprocess.Popen([sys.executable, *prefix, *args, "--out", str(out)],
                                 env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for r in range(2)]

    killed = launch(str(script), "2")
    outputs = [p.communicate(timeout=300)[0] for p in killed]
    assert [p.returncode for p in killed] == [-signal.SIGKILL] * 2, outputs
    parts = sorted((out / "samples").glob(".*part*"))
    assert [p.name[-5:] for p in parts] == ["part0", "part1"], outputs  # one per process

    port += 1
    resumed = launch("-m", "keyseg.cli")
    outputs = [p.communicate(timeout=300)[0] for p in resumed]
    assert all(p.returncode == 0 for p in resumed), outputs
    a, b = _results(single)["reason_seg:val"]["teacher"], _results(out)["reason_seg:val"][
        "teacher"]
    for key in ("n", "samples", "records", "skipped", "intersection", "union"):
        assert a[key] == b[key], key
    assert b["giou"] == pytest.approx(a["giou"], abs=1e-12)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_rows"] == {"reason_seg:val": {"teacher": 2}}  # 1 per process
    jsonl = out / "samples" / "reason_seg_val_teacher.jsonl"
    assert jsonl.read_bytes() == (single / "samples" / jsonl.name).read_bytes()
