"""`jaxtag tag`: validated options, no non-finite answers, quiet broken pipes, the file prediction
independent of --segments, directories and --files-from, resumable CSV/JSONL/taggram outputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxtag import audio, cli, scoring
from jaxtag.checkpoint import load_model
from jaxtag.cli import common
from jaxtag.result_files import NpzFile
from tests.data_fixtures import write_corrupt
from tests.tag_fixtures import TAGS, make_checkpoint, small_variables, write_library

REPO = Path(__file__).resolve().parents[1]
LENGTHS = [3.0, 12.0, 40.0, 6.0, 2.5]  # one track past the protocol limit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tag_ckpt") / "ckpt")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> list[str]:
    return write_library(tmp_path_factory.mktemp("library"), LENGTHS)


def tag(*argv: str) -> int:
    return cli.main(["tag", *map(str, argv)])


@pytest.mark.parametrize(
    "option,value", [("--batch-size", "-4"), ("--batch-size", "0"), ("--top", "0"),
                     ("--batch-size", "x")],
)  # fmt: skip
def test_numeric_options_are_validated_at_parse_time(checkpoint, library, option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tag(library[0], "--checkpoint", checkpoint, option, value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ("at least 1" in err or "integer" in err)


def test_non_finite_weights_are_refused_naming_the_checkpoint(tmp_path, library, capsys):
    variables = small_variables()
    variables["params"]["classifier"]["kernel"][0, 0] = np.nan
    broken = make_checkpoint(tmp_path / "broken", variables)
    assert tag(library[0], "--checkpoint", broken, "--json") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(broken) in captured.err and "NaN" in captured.err and "classifier" in captured.err


def test_non_finite_outputs_are_errors_never_printed(checkpoint, library, monkeypatch, capsys):
    def nan_outputs(self, windows):
        return np.full((len(windows), len(TAGS)), np.nan, np.float32)

    monkeypatch.setattr(scoring.WindowScorer, "predict_windows", nan_outputs)
    assert tag(*library[:2], "--checkpoint", checkpoint, "--json") == 1
    captured = capsys.readouterr()

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the JSON output")

    records = [json.loads(line, parse_constant=refuse) for line in captured.out.splitlines()]
    assert [r["file"] for r in records] == library[:2]
    assert all("tags" not in r and "not finite" in r["error"] for r in records)
    assert "not finite" in captured.err and str(checkpoint) in captured.err

    assert tag(library[0], "--checkpoint", checkpoint) == 1
    assert "nan" not in capsys.readouterr().out.lower()


def test_broken_pipe_exits_quietly(checkpoint, library):
    # The reader is gone before jaxtag prints its first line (`jaxtag tag ... | head -0`).
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxtag", "tag", *library[:2], "--checkpoint", str(checkpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == common.EXIT_BROKEN_PIPE
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_segments_do_not_change_the_file_prediction(checkpoint, library, capsys):
    clip, track = library[1], library[2]  # 12 s: the 16-chunk protocol; 40 s: windows
    scorer = scoring.WindowScorer(load_model(checkpoint), batch_size=8)
    plain = list(scoring.score_files(scorer, [clip, track], windows=False, progress=False))
    windowed = list(scoring.score_files(scorer, [clip, track], windows=True, progress=False))
    for a, b in zip(plain, windowed, strict=True):
        np.testing.assert_allclose(a.output, b.output, atol=1e-6)
    # The clip's prediction is the 16-chunk protocol, its windows are reported besides.
    mel = audio.load_log_mel(clip)
    np.testing.assert_allclose(
        plain[0].output, scorer.predict_windows(audio.eval_chunks(mel)).mean(0), atol=1e-6
    )
    windows, starts = audio.sliding_windows(mel)
    np.testing.assert_allclose(
        windowed[0].window_outputs, scorer.predict_windows(windows), atol=1e-6
    )
    np.testing.assert_allclose(windowed[0].window_starts, audio.frames_to_seconds(starts))

    # And on the command line: the file line reads the same with and without --segments.
    assert tag(clip, "--checkpoint", checkpoint, "--json") == 0
    without = json.loads(capsys.readouterr().out)
    assert tag(clip, "--checkpoint", checkpoint, "--json", "--segments") == 0
    with_segments = json.loads(capsys.readouterr().out)
    assert with_segments["tags"] == without["tags"]
    assert len(with_segments["segments"]) == len(starts)


def test_directories_and_files_from(checkpoint, library, tmp_path, capsys):
    root = Path(library[0]).parents[1]
    (root / "notes.txt").write_text("not audio")
    expected = sorted(library, key=lambda p: (Path(p).parent.name, Path(p).name))
    assert scoring.expand_inputs([str(root)]) == expected
    listing = tmp_path / "list.txt"
    listing.write_text(f"{library[3]}\n\n{library[0]}\n{library[3]}\n")  # blank lines dropped
    assert scoring.expand_inputs([library[1]], str(listing)) == [
        library[1],
        library[3],
        library[0],
    ]

    assert tag(root, "--files-from", listing, "--checkpoint", checkpoint, "--json") == 0
    files = [json.loads(line)["file"] for line in capsys.readouterr().out.splitlines()]
    assert files == expected  # each once, although the list names two of them again

    assert tag("--files-from", tmp_path / "missing.txt", "--checkpoint", checkpoint) == 2
    assert "missing.txt: cannot read the file list" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert tag(tmp_path / "empty", "--checkpoint", checkpoint) == 2
    assert "no audio files" in capsys.readouterr().err


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def assert_same_table(path: Path, expected: Path) -> None:
    """Same header and files in the same order, each once; values equal to the printed precision
    (batches are composed differently in a resumed run, so the last digit may differ)."""
    rows, want = read_csv(path), read_csv(expected)
    assert rows[0] == want[0] and [r[0] for r in rows] == [r[0] for r in want]
    np.testing.assert_allclose(
        np.float64([r[1:] for r in rows[1:]]), np.float64([r[1:] for r in want[1:]]), atol=2e-6
    )


def assert_same_jsonl(path: Path, expected: Path) -> None:
    items = [json.loads(line) for line in path.read_text().splitlines()]
    want = [json.loads(line) for line in expected.read_text().splitlines()]
    assert [i["path"] for i in items] == [w["path"] for w in want]
    for item, wanted in zip(items, want, strict=True):
        assert list(item["probabilities"]) == list(wanted["probabilities"])
        np.testing.assert_allclose(
            list(item["probabilities"].values()), list(wanted["probabilities"].values()), atol=2e-6
        )


def test_csv_and_jsonl_resume_after_a_torn_write(checkpoint, library, tmp_path, capsys):
    full_csv, full_jsonl = tmp_path / "full.csv", tmp_path / "full.jsonl"
    assert tag(*library, "--checkpoint", checkpoint, "--csv", full_csv, "--jsonl", full_jsonl) == 0
    assert capsys.readouterr().out == ""  # results go to the files only
    rows = read_csv(full_csv)
    assert rows[0] == ["path", "duration", *TAGS]
    assert [r[0] for r in rows[1:]] == library
    scorer = scoring.WindowScorer(load_model(checkpoint), batch_size=32)
    for row, result in zip(
        rows[1:], scoring.score_files(scorer, library, progress=False), strict=True
    ):
        np.testing.assert_allclose(np.float64(row[2:]), result.output, atol=1e-6)
        assert float(row[1]) == pytest.approx(result.duration, abs=1e-3)
    jsonl = [json.loads(line) for line in full_jsonl.read_text().splitlines()]
    assert [r["path"] for r in jsonl] == library and list(jsonl[0]["probabilities"]) == TAGS

    # A run killed while writing its third row: two whole rows and half of the third.
    for full, part in [(full_csv, tmp_path / "part.csv"), (full_jsonl, tmp_path / "part.jsonl")]:
        lines = full.read_text().splitlines(keepends=True)
        keep = 3 if full.suffix == ".csv" else 2  # (+ header)
        part.write_text("".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])
    code = tag(
        *library, "--checkpoint", checkpoint,
        "--csv", tmp_path / "part.csv", "--jsonl", tmp_path / "part.jsonl",
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "3 files written" in err and "2 already there" in err
    assert_same_table(tmp_path / "part.csv", full_csv)
    assert_same_jsonl(tmp_path / "part.jsonl", full_jsonl)

    # A finished output is left alone: nothing to do, nothing appended.
    before = full_csv.read_bytes()
    assert tag(*library, "--checkpoint", checkpoint, "--csv", full_csv) == 0
    assert "5 already there" in capsys.readouterr().err
    assert full_csv.read_bytes() == before


def test_bad_file_in_the_middle_is_listed_and_retried(checkpoint, library, tmp_path, capsys):
    bad = write_corrupt(str(tmp_path / "broken.mp3"))
    missing = str(tmp_path / "gone.wav")
    out = tmp_path / "out.csv"
    paths = [library[0], bad, library[1], missing, library[3]]
    assert tag(*paths, "--checkpoint", checkpoint, "--csv", out) == 1
    err = capsys.readouterr().err
    assert "broken.mp3: cannot decode audio" in err and "gone.wav: no such audio file" in err
    assert "2 files could not be processed" in err
    assert [r[0] for r in read_csv(out)[1:]] == [library[0], library[1], library[3]]
    assert tag(*paths, "--checkpoint", checkpoint, "--csv", out) == 1  # retries only the bad two
    assert "0 files written" in capsys.readouterr().err
    assert [r[0] for r in read_csv(out)[1:]] == [library[0], library[1], library[3]]


def test_csv_of_another_model_is_refused(checkpoint, library, tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("path,duration,rock,pop\nx.wav,1.0,0.5,0.5\n")
    assert tag(library[0], "--checkpoint", checkpoint, "--csv", out) == 2
    assert "other.csv: its header is not this run's" in capsys.readouterr().err
    assert out.read_text() == "path,duration,rock,pop\nx.wav,1.0,0.5,0.5\n"


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def test_taggram_holds_every_window_and_resumes(checkpoint, library, tmp_path, monkeypatch):
    full = tmp_path / "full.npz"
    assert tag(*library, "--checkpoint", checkpoint, "--taggram", full) == 0
    taggram = load_npz(full)
    assert list(taggram["paths"]) == library and list(taggram["tags"]) == TAGS
    scorer = scoring.WindowScorer(load_model(checkpoint), batch_size=32)
    results = list(scoring.score_files(scorer, library, windows=True, progress=False))
    for i, result in enumerate(results):
        rows = taggram["window_file_index"] == i
        np.testing.assert_allclose(taggram["taggram"][rows], result.window_outputs, atol=1e-6)
        np.testing.assert_allclose(taggram["window_starts"][rows], result.window_starts)
        np.testing.assert_allclose(taggram["probabilities"][i], result.output, atol=1e-6)
    assert taggram["window_seconds"] == pytest.approx(256 * 256 / 16000)

    # Killed after three files: the sidecar holds them, the last frame torn; no .npz yet.
    part = tmp_path / "part.npz"
    with monkeypatch.context() as patch:
        patch.setattr(NpzFile, "finish", lambda self: None)
        assert tag(*library[:3], "--checkpoint", checkpoint, "--taggram", part) == 0
    sidecar = tmp_path / "part.npz.partial"
    assert not part.exists() and sidecar.exists()
    data = sidecar.read_bytes()
    sidecar.write_bytes(data[: len(data) - 100])
    assert tag(*library[:4], "--checkpoint", checkpoint, "--taggram", part) == 0
    assert not sidecar.exists()
    # A later run adds the last file to the finished .npz.
    assert tag(*library, "--checkpoint", checkpoint, "--taggram", part) == 0
    resumed = load_npz(part)
    assert list(resumed["paths"]) == library  # each file once
    for name in ["probabilities", "taggram", "window_starts", "window_file_index", "durations"]:
        np.testing.assert_allclose(resumed[name], taggram[name], atol=1e-6)


def test_interrupted_run_keeps_its_rows_and_resumes(checkpoint, library, tmp_path, monkeypatch):
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    assert tag(*library, "--checkpoint", checkpoint, "--csv", full, "--batch-size", "8") == 0
    predict = scoring.WindowScorer.predict_windows
    calls = []

    def interrupted_on_third_batch(self, windows):
        calls.append(len(windows))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict(self, windows)

    with monkeypatch.context() as patch:
        patch.setattr(scoring.WindowScorer, "predict_windows", interrupted_on_third_batch)
        assert tag(*library, "--checkpoint", checkpoint, "--csv", part, "--batch-size", "8") == 130
    written = read_csv(part)[1:]
    assert 1 <= len(written) < len(library)
    assert tag(*library, "--checkpoint", checkpoint, "--csv", part, "--batch-size", "8") == 0
    assert_same_table(part, full)


def test_progress_bar_shows_files_and_audio_minutes_per_second(checkpoint, library, capsys):
    scorer = scoring.WindowScorer(load_model(checkpoint), batch_size=16)
    assert len(list(scoring.score_files(scorer, library[:3], progress=True))) == 3
    bar = capsys.readouterr().err
    assert "3/3" in bar and "audio min/s" in bar and ("file/s" in bar or "s/file" in bar)


def test_onnx_engine_tags_like_jax(checkpoint, library, tmp_path, monkeypatch):
    from jaxtag import export

    built = []
    predictor = export.onnx_predictor
    monkeypatch.setattr(
        export, "onnx_predictor", lambda *a, **k: built.append(k) or predictor(*a, **k)
    )
    jax_csv, onnx_csv = tmp_path / "jax.csv", tmp_path / "onnx.csv"
    # Batch 7: the onnx engine's last batch of a file list is not padded, jax's is.
    common = [*library, "--checkpoint", checkpoint, "--batch-size", "7"]
    assert tag(*common, "--engine", "jax", "--csv", jax_csv) == 0
    assert built == []
    assert tag(*common, "--engine", "onnx", "--csv", onnx_csv) == 0
    assert built == [{"output": "probabilities"}]
    rows, want = read_csv(onnx_csv), read_csv(jax_csv)
    assert rows[0] == want[0] and [r[:2] for r in rows] == [r[:2] for r in want]
    got, expected = np.float64([r[2:] for r in rows[1:]]), np.float64([r[2:] for r in want[1:]])
    assert got.shape == (len(library), len(TAGS))
    np.testing.assert_allclose(got, expected, atol=1e-5)


MISSING_ONNXRUNTIME = """
import runpy, sys
sys.modules["onnxruntime"] = None  # `import onnxruntime` raises ImportError
import jaxtag.scoring
jaxtag.scoring.AUTO_ENGINE = "onnx"  # so that auto would take onnx if it could
sys.argv = ["jaxtag", *sys.argv[1:]]
runpy.run_module("jaxtag", run_name="__main__")
"""


def test_without_onnxruntime_onnx_is_refused_and_auto_falls_back(checkpoint, library, tmp_path):
    def run(engine: str, out: Path) -> subprocess.CompletedProcess:
        argv = [library[0], "--checkpoint", str(checkpoint), "--csv", str(out)]
        return subprocess.run(
            [sys.executable, "-c", MISSING_ONNXRUNTIME, "tag", *argv, "--engine", engine],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), JAXTAG_CACHE_DIR="off"),
            timeout=300,
        )

    refused = run("onnx", tmp_path / "onnx.csv")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("jaxtag tag: the onnx engine needs onnx and onnxruntime")
    assert "pip install 'jaxtag[export]'" in lines[0]
    assert not (tmp_path / "onnx.csv").exists()

    fallback = run("auto", tmp_path / "auto.csv")
    assert fallback.returncode == 0, fallback.stderr
    assert [r[0] for r in read_csv(tmp_path / "auto.csv")[1:]] == [library[0]]


def test_choose_engine(monkeypatch):
    assert scoring.choose_engine("jax") == "jax"
    assert scoring.choose_engine("onnx") == "onnx"  # the test extra installs onnxruntime
    assert scoring.choose_engine("auto") == scoring.AUTO_ENGINE
    monkeypatch.setattr(scoring, "AUTO_ENGINE", "onnx")
    assert scoring.choose_engine("auto", backend="cpu") == "onnx"
    assert scoring.choose_engine("auto", backend="gpu") == "jax"  # accelerators: always jax
    assert scoring.choose_engine("auto", "pooled", backend="cpu") == "onnx"
    assert scoring.choose_engine("auto", "layer_0", backend="cpu") == "jax"  # not in the graph
    with pytest.raises(scoring.InputError, match="only the tag probabilities and the pooled"):
        scoring.choose_engine("onnx", "front_end")
    monkeypatch.setattr(scoring, "onnx_runtime_missing", lambda: "missing")
    assert scoring.choose_engine("auto", backend="cpu") == "jax"
    with pytest.raises(scoring.InputError, match="missing"):
        scoring.choose_engine("onnx")
