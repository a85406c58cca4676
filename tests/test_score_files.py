"""Scoring folders of files: one output per input, resumed by a rerun; the same on a local Ray; the file split."""

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import predict_sentiment as pst
from conftest import make_reviews
from helpers import fails_with

ROOT = Path(pst.__file__).parent


def reviews_folder(folder: Path) -> dict[str, pd.DataFrame]:
    """A folder of review files of four types (one in a subfolder), plus files that are not reviews."""
    texts = [t for t, _ in make_reviews(40, seed=31)]
    frames = {"a.csv": pd.DataFrame({"id": [f"a{i:03d}" for i in range(12)], "text": texts[:12], "stars": range(12)}),
              "sub/b.jsonl": pd.DataFrame({"id": [f"b{i:03d}" for i in range(10)], "text": texts[12:22]}),
              "c.txt": pd.DataFrame({"text": texts[22:30]}),
              "d.parquet": pd.DataFrame({"id": [f"d{i}" for i in range(10)], "text": texts[30:], "n": range(10)})}
    (folder / "sub").mkdir(parents=True)
    frames["a.csv"].to_csv(folder / "a.csv", index=False)
    frames["sub/b.jsonl"].to_json(folder / "sub" / "b.jsonl", orient="records", lines=True)
    (folder / "c.txt").write_text("\n".join(frames["c.txt"].text) + "\n")
    frames["d.parquet"].to_parquet(folder / "d.parquet", index=False)
    (folder / "notes.xml").write_text("<not a review/>")
    (folder / ".hidden.csv").write_text("text\nskipped\n")
    return frames


READ = {".csv": lambda p: pd.read_csv(p, dtype={"id": str}), ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
        ".parquet": pd.read_parquet}
OUTPUT = {"a.csv": "a.csv", "sub/b.jsonl": "sub/b.jsonl", "c.txt": "c.csv", "d.parquet": "d.parquet"}


def test_a_folder_gets_one_output_per_file_every_column_kept_and_a_rerun_resumes(exported, tmp_path, capsys):
    frames = reviews_folder(tmp_path / "in")
    base = ["--output-dir", str(exported), "--runtime", "onnx-int8", "--predict-file", str(tmp_path / "in"),
            "--predictions", str(tmp_path / "out")]
    assert pst.main(base) == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == sorted(list(OUTPUT.values()) + [  # each with a hidden record of what scored it
        str(Path(v).with_name(f".{Path(v).name}.record.json")) for v in OUTPUT.values()])
    for name, frame in frames.items():
        result = READ[Path(OUTPUT[name]).suffix](tmp_path / "out" / OUTPUT[name])
        assert list(result.columns) == list(frame.columns) + ["predicted_label", "predicted_score"], name
        assert result[frame.columns].astype(str).values.tolist() == frame.astype(str).values.tolist(), name
        alone = tmp_path / f"alone{Path(OUTPUT[name]).suffix}"  # the same file scored on its own
        assert pst.main(["--output-dir", str(exported), "--runtime", "onnx-int8", "--predict-file",
                         str(tmp_path / "in" / name), "--predictions", str(alone), "--quiet"]) == 0
        assert result["predicted_score"].tolist() == READ[alone.suffix](alone)["predicted_score"].tolist(), name
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    assert pst.main(base) == 0  # the rerun finds every output newer than its input: nothing to do
    assert "4 of 4 files were scored before" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == stamps
    time.sleep(0.01)
    (tmp_path / "in" / "a.csv").touch()  # an input changed since: scored again, alone
    assert pst.main(base) == 0
    assert "3 of 4 files were scored before; scoring the other 1" in capsys.readouterr().err
    changed = sorted(p.name for p in stamps if p.stat().st_mtime_ns != stamps[p])
    assert changed == [".a.csv.record.json", "a.csv"]


def test_a_bad_file_is_named_and_the_others_are_scored(exported, tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    out.mkdir()
    (out / "two.jsonl").write_text("an earlier run's output\n")  # of an older two.jsonl
    time.sleep(0.01)
    folder.mkdir()
    for name in ("one.csv", "three.csv"):
        pd.DataFrame({"text": ["great film", "awful film"]}).to_csv(folder / name, index=False)
    (folder / "two.jsonl").write_text('{"text": "great"}\n{"text": "awf\n')  # changed since, and broken
    args = ["--output-dir", str(exported), "--runtime", "onnx", "--predict-file", str(folder), "--predictions", str(out)]
    assert pst.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("error: could not read ") and "two.jsonl' after row 0" in line for line in err), err
    assert err[-1].startswith("error: 1 of 3 files could not be scored") and "a rerun scores only" in err[-1]
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".record.json")) == [
        "one.csv", "three.csv", "two.jsonl"]  # no temporary files
    assert (out / "two.jsonl").read_text() == "an earlier run's output\n"
    (folder / "two.jsonl").write_text('{"text": "great"}\n{"text": "awful"}\n')  # fixed: the rerun scores it alone
    assert pst.main(args) == 0
    assert "2 of 3 files were scored before; scoring the other 1" in capsys.readouterr().err
    assert list(READ[".jsonl"](out / "two.jsonl")["predicted_label"]) == ["POSITIVE", "NEGATIVE"]


def test_a_glob_and_the_folder_errors(exported, tmp_path, capsys):
    reviews_folder(tmp_path / "in")
    base = ["--output-dir", str(exported), "--runtime", "onnx", "--predict-file"]
    assert pst.main(base + [str(tmp_path / "in" / "*.csv"), "--predictions", str(tmp_path / "out"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".a.csv.record.json", "a.csv"]
    (tmp_path / "in" / "a.txt").write_text("great\n")
    message = fails_with(base + [str(tmp_path / "in"), "--predictions", str(tmp_path / "o2")], capsys)
    assert "would both be scored into" in message and "a.txt" in message
    message = fails_with(base + [str(tmp_path / "in"), "--predictions", str(tmp_path / "out.csv")], capsys)
    assert "must be a folder when --predict-file names several files" in message
    before = (tmp_path / "in" / "sub" / "b.jsonl").read_bytes()
    for inside in (tmp_path / "in", tmp_path / "in" / "sub"):  # in/sub/b.jsonl would be written over by b.jsonl
        message = fails_with(base + [str(tmp_path / "in"), "--predictions", str(inside)], capsys)
        assert "is inside the input folder" in message and "could write over inputs" in message
    assert (tmp_path / "in" / "sub" / "b.jsonl").read_bytes() == before
    assert "no .csv, .tsv" in fails_with(base + [str(tmp_path / "in" / "*.xlsx")], capsys)


def test_inference_never_imports_the_training_script_or_torch(exported, tmp_path):
    tree = ast.parse((ROOT / "predict_sentiment.py").read_text())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "fine_tune_sentiment" not in imported
    reviews_folder(tmp_path / "in")
    code = ("import sys, predict_sentiment as p; code = p.main(sys.argv[1:]); "
            "p.build_app(len, ['NEGATIVE', 'POSITIVE'], {n: getattr(p, n) for n in p.SETTINGS}); "  # the server's too
            "print([m for m in ('torch', 'transformers', 'peft', 'fine_tune_sentiment') if m in sys.modules]); "
            "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, "--output-dir", str(exported), "--runtime", "onnx-int8",
                             "--predict-file", str(tmp_path / "in"), "--predictions", str(tmp_path / "out"), "--quiet"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_ray_scores_every_row_once_as_one_process_does(exported, tmp_path):
    pytest.importorskip("ray")
    rows = [t for t, _ in make_reviews(182, seed=32)]
    frames = [pd.DataFrame({"id": [f"{name}{i:03d}" for i in range(n)], "text": rows[start:start + n], "stars": range(n)})
              for name, start, n in (("a", 0, 12), ("b", 12, 150), ("c", 162, 20))]
    (tmp_path / "in" / "sub").mkdir(parents=True)
    frames[0].to_csv(tmp_path / "in" / "a.csv", index=False)
    frames[1].to_csv(tmp_path / "in" / "sub" / "b.csv", index=False)
    frames[2].to_json(tmp_path / "in" / "c.jsonl", orient="records", lines=True)
    (tmp_path / "in" / "notes.xml").write_text("<not a review/>")
    (tmp_path / "out.tmp").mkdir()  # a killed run's leftovers, under the name it used to reuse
    frames[0].to_parquet(tmp_path / "out.tmp" / "stale.parquet")
    copies = set(Path(tempfile.gettempdir()).glob("sentiment-onnx-*"))
    model = tmp_path / "model"  # with a saved threshold between two rows' scores: Ray must decide with it too
    shutil.copytree(exported / "onnx", model / "onnx")
    positive = np.sort(pst.softmax(pst.logits(*pst.load_exported(model / "onnx", "onnx"), rows))[:, 1])
    gaps = [i for i in range(len(positive) - 1) if positive[i] > 0.5 and positive[i + 1] - positive[i] > 1e-4]
    threshold = float(positive[gaps[len(gaps) // 2]] + positive[gaps[len(gaps) // 2] + 1]) / 2
    config = json.loads((model / "onnx" / "config.json").read_text())
    (model / "onnx" / "config.json").write_text(json.dumps(config | {"threshold": threshold}))
    result = ray_run(model, tmp_path / "in", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(Path(tempfile.gettempdir()).glob("sentiment-onnx-*")) == copies  # no model copy left behind
    scored = pd.read_parquet(tmp_path / "out")
    expected = pd.concat(frames)
    assert sorted(scored["id"]) == sorted(expected["id"])  # every row, once
    assert {"id", "text", "stars", "predicted_label", "predicted_score"} <= set(scored.columns)
    scored = scored.set_index("id").loc[list(expected["id"])]
    assert list(scored["text"]) == list(expected["text"])
    one = pst.predict(*pst.load_onnx(model / "onnx", int8=False), list(expected["text"]))
    assert list(scored["predicted_label"]) == [label for label, _ in one]
    flipped = [label == "NEGATIVE" and score < 0.5 for label, score in one]  # POSITIVE by argmax, not by threshold
    assert sum(flipped) >= 3
    assert scored["predicted_score"].tolist() == pytest.approx([score for _, score in one], abs=1e-5)


def ray_run(exported: Path, source: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return subprocess.run([sys.executable, "predict_sentiment.py", "--output-dir", str(exported), "--runtime", "onnx",
                           "--predict-file", str(source), "--ray", "--predictions", str(out), "--quiet", *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def test_ray_refuses_actors_that_leave_no_cpu_to_read(exported, tmp_path):
    pytest.importorskip("ray")
    reviews_folder(tmp_path / "in")
    started = time.monotonic()
    result = ray_run(exported, tmp_path / "in", tmp_path / "out", "--ray-actors", str(os.cpu_count() or 2))
    assert result.returncode == 2 and time.monotonic() - started < 200  # an answer, not a job that never starts
    assert "leaves no CPU to read the files on a Ray of" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_ray_errors(exported, tmp_path, capsys):
    reviews_folder(tmp_path / "in")
    base = ["--output-dir", str(exported), "--ray"]
    assert "pass --predict-file IN" in fails_with(base + ["--runtime", "onnx"], capsys)
    message = fails_with(base + ["--predict-file", str(tmp_path / "in")], capsys)
    assert "--ray runs the exported model: pass --runtime onnx-int8" in message
    (tmp_path / "out").mkdir()
    message = fails_with(base + ["--runtime", "onnx", "--predict-file", str(tmp_path / "in"), "--predictions",
                                 str(tmp_path / "out")], capsys)
    assert "exists; Ray writes a new folder" in message


def scored_files(exported: Path, source: Path, out: Path, *flags: str) -> list[str]:
    """Score source into out as a user would; return the lines it logged."""
    result = subprocess.run([sys.executable, str(ROOT / "predict_sentiment.py"), "--output-dir", str(exported),
                             "--predict-file", str(source), "--predictions", str(out), *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def test_a_rerun_rescores_what_another_model_setting_or_input_produced(exported, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b"):
        pd.DataFrame({"text": ["great film", "awful film"], "review": ["awful", "great"]}).to_csv(
            folder / f"{name}.csv", index=False)
    scored_files(exported, folder, out, "--runtime", "onnx")
    said = scored_files(exported, folder, out, "--runtime", "onnx-int8")
    assert any("0 of 2 files were scored before; scoring the other 2 (2: RUNTIME changed)" in s for s in said), said
    said = scored_files(exported, folder, out, "--runtime", "onnx-int8", "--text-column", "review")
    assert any("(2: TEXT_COLUMN changed)" in s for s in said), said
    assert list(pd.read_csv(out / "a.csv")["predicted_label"]) == ["NEGATIVE", "POSITIVE"]  # of the review column
    old = (folder / "a.csv").stat()
    pd.DataFrame({"text": ["awful film", "great film"], "review": ["great", "awful"]}).to_csv(
        tmp_path / "new.csv", index=False)  # as cp -p leaves it: other content, an old mtime
    os.replace(tmp_path / "new.csv", folder / "a.csv")
    os.utime(folder / "a.csv", ns=(old.st_atime_ns, old.st_mtime_ns - 10**9))
    said = scored_files(exported, folder, out, "--runtime", "onnx-int8", "--text-column", "review")
    assert any("1 of 2 files were scored before; scoring the other 1 (1: the input changed)" in s for s in said)
    assert list(pd.read_csv(out / "a.csv")["predicted_label"]) == ["POSITIVE", "NEGATIVE"]
    (exported / "onnx" / "config.json").touch()  # the same model: its files' bytes decide, not their dates
    said = scored_files(exported, folder, out, "--runtime", "onnx-int8", "--text-column", "review")
    assert any("2 of 2 files were scored before; scoring the other 0" in s for s in said), said


def test_two_scorers_on_one_folder_never_corrupt_an_output(exported, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    rows = [t for t, _ in make_reviews(3000, seed=50)]
    for name in ("a", "b", "c"):
        pd.DataFrame({"text": rows}).to_csv(folder / f"{name}.csv", index=False)
    command = [sys.executable, str(ROOT / "predict_sentiment.py"), "--output-dir", str(exported), "--runtime",
               "onnx-int8", "--predict-file", str(folder), "--predictions", str(out), "--quiet"]
    both = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    said = [p.communicate(timeout=180) for p in both]
    assert [p.returncode for p in both] == [0, 0] and "Traceback" not in str(said), said
    assert sum(out.count("Scored 3000 rows") for out, _ in said) == 3  # each file once: the lock, then its record
    for name in ("a", "b", "c"):
        assert len(pd.read_csv(out / f"{name}.csv")) == 3000  # whole, whoever wrote it
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".lock"))]


def test_a_planted_link_at_a_temporary_name_is_never_followed(exported, tmp_path):
    (tmp_path / "in.csv").write_text("text\ngreat film\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / ".a.csv.tmp")  # the old fixed temporary name
    assert pst.main(["--output-dir", str(exported), "--runtime", "onnx", "--predict-file", str(tmp_path / "in.csv"),
                     "--predictions", str(tmp_path / "out" / "a.csv"), "--quiet"]) == 0
    assert victim.read_text() == "keep me" and not (tmp_path / "out" / "a.csv").is_symlink()


def test_a_bom_and_a_link_loop_and_rows_that_cannot_be_encoded(exported, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    (folder / "deep").mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "great film"}\n{"text": "awful film"}\n')  # a BOM
    os.symlink(folder, folder / "deep" / "loop")  # a folder link back up: a loop
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jsonl").write_text('{"text": "not in the tree"}\n')
    os.symlink(tmp_path / "elsewhere", folder / "outside")  # a folder link out of the tree
    assert pst.main(["--output-dir", str(exported), "--runtime", "onnx", "--predict-file", str(folder / "**" / "*.jsonl"),
                     "--predictions", str(out), "--quiet"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jsonl")) == ["a.jsonl"]  # once, not once a loop
    assert pd.read_json(out / "a.jsonl", lines=True)["text"].tolist() == ["great film", "awful film"]
    assert pst.main(["--output-dir", str(exported), "--runtime", "onnx", "--predict-file", str(folder),
                     "--predictions", str(tmp_path / "out2"), "--quiet"]) == 0
    assert sorted(str(p.relative_to(tmp_path / "out2")) for p in (tmp_path / "out2").rglob("*.jsonl")) == ["a.jsonl"]
    model, tokenizer = pst.load_onnx(exported / "onnx", int8=False)
    frame = pd.DataFrame({"text": pd.Series(["great film", "bad \ud800 row", "\u200b", "awful film"], dtype=object)})
    scored, without = pst.predict_column((model, tokenizer, "onnx"), frame, "text", 8)  # no reader makes the 2nd
    assert without == 2 and scored["predicted_label"].isna().tolist() == [False, True, True, False]


def test_a_full_disk_ends_with_one_line_and_keeps_the_earlier_outputs(exported, tmp_path, monkeypatch, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b"):
        pd.DataFrame({"text": ["great film"]}).to_csv(folder / f"{name}.csv", index=False)
    base = ["--output-dir", str(exported), "--runtime", "onnx", "--predict-file", str(folder), "--predictions", str(out)]
    assert pst.main(base + ["--quiet"]) == 0
    before = (out / "a.csv").read_bytes()
    os.utime(folder / "a.csv", ns=(1, 1))  # changed: to be scored again
    real = os.replace

    def disk_full(src, dst):
        if str(dst).endswith("a.csv"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(pst.os, "replace", disk_full)
    message = fails_with(base, capsys)
    assert message == f"error: could not write '{out / 'a.csv'}': No space left on device; the earlier outputs are intact"
    assert (out / "a.csv").read_bytes() == before and not list(out.glob(".*.tmp"))
