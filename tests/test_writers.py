"""The writers of the `jaxtag` commands never destroy an input or another program's file (checked
before any work, recognised before any repair), one writer per output (an exclusive lock), and
file names as the file system has them (CSV read with the csv module, non-UTF-8 names kept)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

import jaxtag
from jaxtag import cli, scoring
from jaxtag.fileio import exclusive_lock
from jaxtag.result_files import CsvFile, Record, sidecar_path
from tests.pth_writer import random_state_dict, write_pth
from tests.tag_fixtures import make_checkpoint, write_library


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("writers_ckpt") / "ckpt")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> list[str]:
    return write_library(tmp_path_factory.mktemp("writers_library"), [3.0, 2.0])


@pytest.fixture
def song(tmp_path, library) -> Path:
    path = tmp_path / "song.wav"
    shutil.copy(library[0], path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or converting weights fails the test: the refusal must come first."""

    def work(*args, **kwargs):
        raise AssertionError("the command started its work before refusing its output")

    from jaxtag import convert, released

    monkeypatch.setattr(jaxtag, "load", work)
    monkeypatch.setattr(convert, "load_weights", work)  # convert_weights checks before this
    monkeypatch.setattr(released, "fetch", work)


def main(*argv) -> int:
    return cli.main([str(a) for a in argv])


def one_line(capsys) -> str:
    """The command's one stderr line (log warnings of other modules aside), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert len(lines) == 1, err
    return lines[0]


def link(target: Path, path: Path, kind: str) -> Path:
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, path)
    else:
        return target
    return path


# ----------------------------------------------------------------------------------------------
# 1. No output destroys an input or a foreign file


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("option", ["--csv", "--jsonl", "--taggram"])
def test_tag_refuses_an_output_that_is_its_input(
    tmp_path, song, checkpoint, no_work, option, kind, capsys
):
    before = song.read_bytes()
    out = link(song, tmp_path / f"out{option[2:]}", kind)
    assert main("tag", song, "--checkpoint", checkpoint, option, out) == 2
    line = one_line(capsys)
    assert f"{out} is the input {song}" in line and "nothing was done" in line
    assert song.read_bytes() == before


def test_every_writer_refuses_an_input_as_its_output(tmp_path, song, checkpoint, no_work, capsys):
    before = song.read_bytes()
    pth = write_pth(tmp_path / "model.pth", random_state_dict())
    pth_bytes = pth.read_bytes()
    figure = link(song, tmp_path / "fig.png", "symlink")
    cases = [
        (["embed", song, "--checkpoint", checkpoint, "--out", song], song),
        (["explain", song, "--checkpoint", checkpoint, "--out", tmp_path / "f.png",
          "--save-npz", song], song),
        (["explain", song, "--checkpoint", checkpoint, "--out", figure], figure),
        (["tag", song, "--checkpoint", pth, "--csv", pth], pth),  # the checkpoint is an input
        (["export", pth, link(pth, tmp_path / "model.onnx", "hardlink")], tmp_path / "model.onnx"),
    ]  # fmt: skip
    for argv, out in cases:
        assert main(*argv) == 2, argv
        assert f"{out} is the input" in one_line(capsys), argv
    assert song.read_bytes() == before and pth.read_bytes() == pth_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "model.onnx", "model.pth",
                                                          "song.wav"]  # fmt: skip


@pytest.mark.parametrize("where", ["directory", "under a file", "device", "twice"])
def test_unwritable_outputs_are_refused_before_any_work(
    tmp_path, song, checkpoint, no_work, where, capsys
):
    (tmp_path / "folder").mkdir()
    out, extra, expected = {
        "directory": (tmp_path / "folder", [], "is a directory"),
        "under a file": (song / "x.csv", [], f"{song} is not a directory"),
        "device": (Path(os.devnull), [], "not a regular file"),
        "twice": (tmp_path / "a.csv", ["--jsonl", tmp_path / "sub" / ".." / "a.csv"], "same file"),
    }[where]
    assert main("tag", song, "--checkpoint", checkpoint, "--csv", out, *extra) == 2
    assert expected in one_line(capsys)
    if where != "twice":
        assert main("embed", song, "--checkpoint", checkpoint, "--out", out) == 2
        assert expected in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "song.wav"]


def test_foreign_files_are_refused_before_any_repair(tmp_path, library, checkpoint, capsys):
    notes = b"my notes\nthe last line has no newline"  # what a torn record looks like
    npz_of_others = tmp_path / "other.npz"
    np.savez(npz_of_others, weights=np.ones(3))
    junk_sidecar = tmp_path / "t.npz.partial"
    junk_sidecar.write_bytes(b"no frames here, and no newline")
    cases = [
        ("tag", "--csv", tmp_path / "notes.csv", notes, "not a jaxtag table"),
        ("tag", "--jsonl", tmp_path / "notes.jsonl", notes, "line 1 is no jaxtag record"),
        ("tag", "--taggram", tmp_path / "notes.npz", notes, "not a readable .npz"),
        ("tag", "--taggram", tmp_path / "t.npz", None, "t.npz.partial: not a jaxtag sidecar"),
        ("embed", "--out", npz_of_others, None, "not a jaxtag .npz (no durations, embeddings"),
    ]
    for command, option, out, content, expected in cases:
        if content is not None:
            out.write_bytes(content)
        files = {p: p.read_bytes() for p in tmp_path.iterdir()}
        assert main(command, *library, "--checkpoint", checkpoint, option, out) == 2, out
        line = one_line(capsys)
        assert expected in line and "left untouched" in line, line
        assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files  # byte-identical
    assert not (tmp_path / "t.npz").exists()


def test_explain_replaces_only_its_own_figure_and_maps(tmp_path, song, checkpoint, capsys):
    figure, maps = tmp_path / "fig.png", tmp_path / "maps.npz"
    new_figure, new_maps = tmp_path / "new.png", tmp_path / "new.npz"
    for foreign, out, save_npz in [(figure, figure, new_maps), (maps, new_figure, maps)]:
        foreign.write_bytes(b"PK a photo, not a figure or maps")
        argv = ["explain", song, "--checkpoint", checkpoint, "--out", out, "--save-npz", save_npz]
        assert main(*argv) == 2
        assert f"{foreign} exists and is not" in one_line(capsys)
        assert foreign.read_bytes() == b"PK a photo, not a figure or maps"
        assert not new_figure.exists() and not new_maps.exists()
        foreign.unlink()
    argv = ["explain", song, "--checkpoint", checkpoint, "--out", figure, "--save-npz", maps]
    for _ in range(2):  # a rerun replaces what the first run wrote
        assert main(*argv) == 0
        assert figure.read_bytes().startswith(b"\x89PNG") and "contributions" in np.load(maps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "maps.npz", "song.wav"]


def test_export_follows_converts_overwrite_rule(tmp_path, checkpoint, capsys):
    import onnx

    out, notes = tmp_path / "model.onnx", tmp_path / "notes.onnx"
    assert main("export", checkpoint, out, "--no-check") == 0
    first = out.read_bytes()
    assert main("export", checkpoint, out, "--no-check") == 2
    assert "already exists (pass --overwrite" in one_line(capsys)
    notes.write_bytes(b"\x08 my notes, not a model")
    assert main("export", checkpoint, notes, "--no-check", "--overwrite") == 2
    assert f"{notes} is not an ONNX model" in one_line(capsys)
    assert notes.read_bytes() == b"\x08 my notes, not a model" and out.read_bytes() == first
    model = onnx.load(str(out))
    model.doc_string = "an older export"
    onnx.save(model, str(out))
    assert out.read_bytes() != first
    assert main("export", checkpoint, out, "--no-check", "--overwrite") == 0
    assert out.read_bytes() == first and onnx.load(str(out)).graph.node


def test_convert_checks_its_out_dir_before_reading_the_weights(
    tmp_path, checkpoint, no_work, monkeypatch, capsys
):
    pth = write_pth(tmp_path / "model.pth", random_state_dict())
    link(pth, tmp_path / "linked", "symlink")
    assert main("convert", pth, tmp_path / "linked") == 2
    assert "already exists (pass --overwrite" in one_line(capsys)
    holder = tmp_path / "holder"
    shutil.copytree(checkpoint, holder)
    shutil.copy(pth, holder / "model.pth")
    assert main("convert", holder / "model.pth", holder, "--overwrite") == 2
    assert "holds the source" in one_line(capsys)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    assert main("convert", pth, tmp_path / "new") == 2
    assert "not enough free space (0.0 MB free" in one_line(capsys)
    assert (
        not (tmp_path / "new").exists() and (holder / "model.pth").read_bytes() == pth.read_bytes()
    )


# ----------------------------------------------------------------------------------------------
# 2. One writer per output


def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path, library, checkpoint, capsys):
    out, taggram = tmp_path / "out.csv", tmp_path / "t.npz"
    assert main("tag", library[0], "--checkpoint", checkpoint, "--csv", out) == 0
    capsys.readouterr()
    with out.open("ab") as f:
        f.write(b"a torn row that a writer would cut")
    before = out.read_bytes()
    with exclusive_lock(out):  # another run writing it (this process: the lock is per open)
        assert main("tag", *library, "--checkpoint", checkpoint, "--csv", out) == 2
    line = one_line(capsys)
    assert f"{out} is being written by another process (PID {os.getpid()})" in line
    assert out.read_bytes() == before
    with exclusive_lock(sidecar_path(taggram)):  # the sidecar is locked as well
        assert main("tag", *library, "--checkpoint", checkpoint, "--taggram", taggram) == 2
    assert f"PID {os.getpid()}" in one_line(capsys) and not taggram.exists()

    assert main("tag", *library, "--checkpoint", checkpoint, "--csv", out) == 0
    assert main("tag", *library, "--checkpoint", checkpoint, "--taggram", taggram) == 0
    assert [r[0] for r in list(csv.reader(out.open(newline="")))[1:]] == library
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")]


# ----------------------------------------------------------------------------------------------
# 9. Names as the file system has them


def test_odd_and_non_utf8_names_round_trip_in_every_result_file(tmp_path, checkpoint, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["new\nline.wav", "carriage\rreturn.wav", 'comma, "quoted".wav',
             os.fsdecode(b"caf\xe9.wav")]  # fmt: skip
    tone = (0.3 * np.sin(np.arange(32_000) * 0.05)).astype(np.float32)
    for name in names:
        sf.write(os.fsencode(os.path.join(folder, name)), tone, 16_000)
    paths = scoring.expand_inputs([str(folder)])
    assert sorted(os.path.basename(p) for p in paths) == sorted(names)
    outs = {"--csv": tmp_path / "t.csv", "--jsonl": tmp_path / "t.jsonl",
            "--taggram": tmp_path / "t.npz"}  # fmt: skip
    argv = ["tag", folder, "--checkpoint", checkpoint, *[a for kv in outs.items() for a in kv]]
    assert main(*argv) == 0
    capsys.readouterr()
    assert main(*argv) == 0  # a rerun finds every name again
    assert "0 files written" in capsys.readouterr().err

    raw = outs["--csv"].read_bytes()
    assert b"/caf\xe9.wav," in raw and b'\rreturn.wav",' in raw  # as given; the \r quoted
    with open(outs["--csv"], newline="", encoding="utf-8", errors="surrogateescape") as f:
        assert [row[0] for row in csv.reader(f)][1:] == paths
    lines = outs["--jsonl"].read_text(encoding="ascii").splitlines()
    assert [json.loads(line)["path"] for line in lines] == paths
    with np.load(outs["--taggram"]) as npz:
        assert list(npz["paths"]) == paths


def test_a_row_torn_inside_its_quotes_is_cut_off(tmp_path):
    out = tmp_path / "t.csv"
    table = CsvFile(out, ["a", "b"])
    assert table.done() == set()
    for name in ["x\ny.wav", "p,q.wav"]:
        table.write(Record(name, 1.0, np.array([0.25, 0.5])))
    whole = out.read_bytes()
    with out.open("ab") as f:
        f.write(b'"torn\nname.wav",1.0')  # killed inside the next row
    assert CsvFile(out, ["a", "b"]).done() == {"x\ny.wav", "p,q.wav"}
    assert out.read_bytes() == whole == b'path,duration,a,b\n"x\ny.wav",1.000,0.250000,0.500000\n' \
        b'"p,q.wav",1.000,0.250000,0.500000\n'  # fmt: skip
