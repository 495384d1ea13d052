"""Dataset builds and the input pipeline on bad input (issue 17, items 5 and 8): listed paths
confined to the manual directory and normalised, the build's --data_dir checked before work,
Ctrl-C and failed writes in one line, a damaged TFRecord shard named."""

from __future__ import annotations

import csv
import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

from data_prep import audio_folder, build, common, magnatagatune, msd, synthetic_tags
from jaxtag import input_pipeline as ip
from jaxtag.errors import JaxtagError
from jaxtag.tags import MTAT_TOP50
from tests.data_fixtures import make_fake_msd, py2_pickle, write_audio
from tests.test_data_prep import read_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tags_csv(root, rows) -> str:
    path = os.path.join(str(root), "tags.csv")
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "tags", "split"), *rows])
    return path


def manual_dir(dl_root) -> types.SimpleNamespace:
    """What a builder's ``_collect`` reads of TFDS's download manager."""
    return types.SimpleNamespace(manual_dir=str(dl_root))


# ----------------------------------------------------------------------------------------------
# Item 5: listed paths stay inside the manual directory, normalised


def test_confine_normalises_and_refuses_absolute_and_escaping_paths(tmp_path):
    root = tmp_path / "music"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside.wav").write_bytes(b"x")
    (root / "a.wav").write_bytes(b"x")
    os.symlink(tmp_path / "outside.wav", root / "link.wav")  # a link leading out
    os.symlink("../a.wav", root / "sub" / "inner.wav")  # a link that stays inside
    real_a = os.path.realpath(root / "a.wav")
    assert common.confine(str(root), "./a.wav") == common.ConfinedPath("a.wav", real_a)
    assert common.confine(str(root), "sub//./x/../a.wav").name == "sub/a.wav"
    assert common.confine(str(root), "sub/inner.wav") == common.ConfinedPath(
        "sub/inner.wav", real_a
    )
    assert common.confine(str(root), "missing.wav").real == os.path.join(
        os.path.realpath(root), "missing.wav"
    )  # inside: reported later as missing audio
    refused = {
        "/etc/passwd": "an absolute path",
        str(tmp_path / "outside.wav"): "an absolute path",
        "C:/music/a.wav": "an absolute path",
        "../outside.wav": f"leads outside the manual directory {root}",
        "sub/../../outside.wav": "leads outside the manual directory",
        "../../../etc/passwd": "leads outside the manual directory",
        "link.wav": f"resolves to {os.path.realpath(tmp_path / 'outside.wav')}, outside",
    }
    for listed, reason in refused.items():
        with pytest.raises(common.UnsafePathError) as err:
            common.confine(str(root), listed)
        assert err.value.listed == listed and reason in err.value.reason, listed
        assert str(err.value).startswith(f"{listed}: ") and "\n" not in str(err.value)
        assert isinstance(err.value, JaxtagError) and isinstance(err.value, common.DataError)


def test_tags_csv_duplicates_are_found_after_normalisation_and_through_links(tmp_path):
    root = tmp_path / "music"
    root.mkdir()
    (root / "a.wav").write_bytes(b"x")
    os.symlink("a.wav", root / "alias.wav")
    for rows, message in [
        ([("a.wav", "rock", ""), ("./a.wav", "rock", "")], "./a.wav is the same file as a.wav"),
        ([("sub/../a.wav", "rock", ""), ("a.wav", "rock", "")], "a.wav is the same file as sub"),
        ([("a.wav", "rock", ""), ("alias.wav", "rock", "")], "alias.wav is the same file as a"),
        ([("b.wav", "rock", ""), (".//b.wav", "rock", "")], ".//b.wav is the same file as b"),
        ([("a.wav", "rock", ""), ("a.wav", "jazz", "")], "a.wav is listed twice"),
    ]:
        path = write_tags_csv(root, rows)
        with pytest.raises(common.DataError) as err:
            audio_folder.read_tags_csv(path)
        assert f"tags.csv:3: {message}" in str(err.value) and "(line 2)" in str(err.value)
    # A single spelling is stored normalised, and split by the normalised path.
    path = write_tags_csv(root, [("./a.wav", "rock", ""), ("sub//x/../b.wav", "jazz", "test")])
    rows = audio_folder.read_tags_csv(path)
    assert rows == [
        audio_folder.Row("a.wav", ("rock",), audio_folder.hash_split("a.wav")),
        audio_folder.Row("sub/b.wav", ("jazz",), "test"),
    ]
    assert rows[0].real == os.path.realpath(root / "a.wav")


def test_tags_csv_rows_leading_outside_are_refused_with_their_line(tmp_path):
    root = tmp_path / "music"
    root.mkdir()
    path = write_tags_csv(
        root, [("a.wav", "rock", ""), ("../secret.wav", "rock", ""), ("/etc/passwd", "x", "")]
    )
    with pytest.raises(common.UnsafePathError, match=r"tags.csv:3: \.\./secret.wav: leads outside"):
        audio_folder.read_tags_csv(path)
    refused: dict[str, str] = {}
    rows = audio_folder.read_tags_csv(path, refused)
    assert [r.path for r in rows] == ["a.wav"]
    assert refused == {
        "../secret.wav": f"leads outside the manual directory {root} (tags.csv line 3)",
        "/etc/passwd": "an absolute path (paths are relative to the manual directory) "
        "(tags.csv line 4)",
    }


def test_audio_folder_build_reads_nothing_outside_and_lists_the_refused_paths(tmp_path, capsys):
    manual = tmp_path / "music"
    for i, name in enumerate(["a.wav", "sub/b.wav"]):
        write_audio(str(manual / name), seconds=1.5, seed=i)
    secret = write_audio(str(tmp_path / "secret.wav"), seconds=1.5, freq=880.0)
    os.symlink(secret, manual / "link.wav")
    refused = ["../secret.wav", secret, "link.wav", "../../../../../../etc/passwd"]
    write_tags_csv(manual, [("a.wav", "rock", "train"), ("./sub/b.wav", "rock", "test")])
    with open(manual / "tags.csv", "a", newline="") as f:
        csv.writer(f).writerows([(p, "rock", "train") for p in refused])
    data_dir = str(tmp_path / "tfds")
    argv = ["audio_folder", "--data_dir", data_dir, "--manual_dir", str(manual)]
    assert build.main([*argv, "--num_workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "clips written: 2 (test 1, train 1" in out and "skipped (unusable audio): 0" in out
    assert "error: paths refused (absolute or outside the manual directory), not read: 4" in out
    for path in refused:
        assert f"\n  {path}: " in out
    assert f"resolves to {os.path.realpath(secret)}, outside the manual directory" in out
    built = ip.get_builder("audio_folder", data_dir)
    assert sorted(read_split(built, "train")) == ["a.wav"]
    assert {k: v["path"] for k, v in read_split(built, "test").items()} == {
        "sub/b.wav": b"sub/b.wav"
    }
    assert built.info.metadata["num_refused"] == 4
    assert sorted(built.info.metadata["refused"]) == sorted(refused)
    assert built.info.metadata["num_skipped"] == 0


def write_mtat_annotations(root, rows: list[tuple[str, str, str]]) -> None:
    """``annotations_final.csv`` with the 50 released tags: rows of (clip_id, tag, mp3_path)."""
    with open(os.path.join(str(root), magnatagatune.ANNOTATIONS), "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(["clip_id", *MTAT_TOP50, "mp3_path"])
        for clip_id, tag, mp3 in rows:
            writer.writerow([clip_id, *(int(t == tag) for t in MTAT_TOP50), mp3])


def test_mtat_mp3_paths_are_confined_and_normalised(tmp_path):
    root = tmp_path / "mtat"
    (root / "0").mkdir(parents=True)
    outside = write_audio(str(tmp_path / "outside.mp3"), seconds=1.5)
    os.symlink(outside, root / "0" / "link.mp3")
    escaping = {"2": "0/../../outside.mp3", "3": outside, "5": "0/link.mp3"}
    write_mtat_annotations(
        root,
        [("1", "guitar", "0/good.mp3"), ("4", "rock", "c/../0/moved.mp3"), ("6", "piano", "")]
        + [(clip_id, "rock", mp3) for clip_id, mp3 in escaping.items()],
    )
    builder = magnatagatune.Magnatagatune(data_dir=str(tmp_path / "d"), num_workers=1)
    collection = builder._collect(manual_dir(root))
    assert [(c.clip_id, c.path, c.split) for c in collection.clips] == [
        ("1", "0/good.mp3", "train"),
        ("4", "0/moved.mp3", "train"),  # its folder is 0, not c (validation)
    ]
    assert collection.clips[1].job.arg == os.path.realpath(root / "0" / "moved.mp3")
    assert sorted(collection.refused) == sorted(escaping.values())
    assert collection.refused["0/../../outside.mp3"] == (
        f"leads outside the manual directory {root} (annotations_final.csv, clip 2)"
    )
    assert "an absolute path" in collection.refused[outside]
    assert "outside the manual directory" in collection.refused["0/link.mp3"]
    assert collection.dropped == {"mp3_path not in folders 0-f": 1}


def test_msd_paths_from_the_pickles_are_confined(tmp_path):
    fake = make_fake_msd(str(tmp_path / "msd"))
    outside = write_audio(str(tmp_path / "outside.mp3"), seconds=1.5)
    to_7d = msd.load_pickle(os.path.join(fake.root, msd.MSD_TO_7D))
    to_path = msd.load_pickle(os.path.join(fake.root, msd.SEVEN_D_TO_PATH))
    ids = fake.train_ids + fake.test_ids
    to_path[to_7d[ids[0]]] = "../outside.mp3"  # the file exists: today it is read
    to_path[to_7d[ids[2]]] = outside
    with open(os.path.join(fake.root, msd.SEVEN_D_TO_PATH), "wb") as f:
        f.write(py2_pickle(to_path))
    collection = msd.Msd(data_dir=str(tmp_path / "d"), num_workers=1)._collect(
        manual_dir(fake.root)
    )
    assert sorted(collection.refused) == sorted([ids[0], ids[2]])
    assert collection.refused[ids[0]] == (
        f"../outside.mp3: leads outside the manual directory {fake.root}"
    )
    assert collection.refused[ids[2]].startswith(f"{outside}: an absolute path")
    written = {c.clip_id: c.path for c in collection.clips}
    expected = {i: fake.paths[i] for i in ids if i not in (ids[0], ids[2], *fake.missing_ids)}
    assert written == expected
    assert set(collection.skipped) == set(fake.missing_ids)


# ----------------------------------------------------------------------------------------------
# Item 8: the build command's --data_dir, failed writes and Ctrl-C in one line


def small_folder(root) -> str:
    write_audio(os.path.join(str(root), "a.wav"), seconds=1.5)
    write_tags_csv(root, [("a.wav", "rock", "train")])
    return str(root)


def test_build_refuses_an_unusable_data_dir_before_any_work(tmp_path, capsys, monkeypatch):
    manual = small_folder(tmp_path / "music")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "readonly").mkdir()
    real_access = os.access
    monkeypatch.setattr(  # a read-only folder, also for root
        os, "access", lambda p, mode, **kw: "readonly" not in str(p) and real_access(p, mode, **kw)
    )

    def no_work(*args, **kwargs):
        raise AssertionError("the build started")

    monkeypatch.setattr(common, "compute_mels", no_work)
    cases = {
        "file": f"error: --data_dir {tmp_path / 'file'} is not a directory",
        "file/tfds": f"{tmp_path / 'file'} is not a directory",
        "readonly": f"error: --data_dir: {tmp_path / 'readonly'} is not writable",
        "readonly/tfds": f"{tmp_path / 'readonly'} is not writable",
    }
    for name, expected in cases.items():
        argv = ["audio_folder", "--data_dir", str(tmp_path / name), "--manual_dir", manual]
        assert build.main(argv) == 2, name
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (name, err)
    assert (tmp_path / "file").read_text() == "mine"
    assert os.listdir(tmp_path / "readonly") == []


def test_build_failed_write_and_ctrl_c_end_in_one_line(tmp_path, capsys, monkeypatch):
    manual = small_folder(tmp_path / "music")
    argv = ["audio_folder", "--data_dir", str(tmp_path / "d"), "--manual_dir", manual]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "d" / "x.npy"))

    monkeypatch.setattr(common, "compute_mels", disk_full)
    assert build.main(argv) == 2
    assert (
        capsys.readouterr().err == f"error: {tmp_path / 'd' / 'x.npy'}: No space left on device\n"
    )

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "compute_mels", ctrl_c)
    assert build.main(argv) == 130
    assert capsys.readouterr().err == (
        "\njaxtag-build: interrupted; rerun the same command to continue\n"
    )


@pytest.mark.slow
def test_sigint_during_the_mel_computation_is_one_line_and_keeps_the_cache(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the pool's workers too."""
    data_dir = tmp_path / "tfds"
    command = [sys.executable, "-m", "data_prep.build", "synthetic_tags", "--data_dir"]
    proc = subprocess.Popen(
        [*command, str(data_dir), "--num_workers", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    cache = data_dir / "downloads" / "mel_cache" / "synthetic_tags"
    deadline = time.time() + 240
    while not glob.glob(str(cache / "*" / "*.npy")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # 400 clips of 8 s: far from done
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().splitlines()[-1] == build.INTERRUPTED
    assert 0 < len(glob.glob(str(cache / "*" / "*.npy"))) < 400
    with pytest.raises(ProcessLookupError):  # the workers are gone with their parent
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.1)


# ----------------------------------------------------------------------------------------------
# Item 8: a damaged shard, named by training and evaluation


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    """20 synthetic clips of 2 s (16 train, 2 validation, 2 test: a shard each); the version dir."""
    config = synthetic_tags.SyntheticTagsConfig(name="shards", num_clips=20, seconds=2.0, seed=0)
    data_dir = str(tmp_path_factory.mktemp("shards"))
    builder = synthetic_tags.SyntheticTags(data_dir=data_dir, config=config, num_workers=1)
    builder.download_and_prepare()
    return str(builder.data_dir)


def damaged_copy(built: str, target, split: str, how: str) -> tuple[str, str]:
    """A copy of the dataset with ``split``'s shard damaged; (its version dir, the shard)."""
    copy = shutil.copytree(built, str(target))
    (shard,) = glob.glob(os.path.join(copy, f"*-{split}.tfrecord-*"))
    data = bytearray(open(shard, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-100:]
    with open(shard, "wb") as f:
        f.write(bytes(data))
    return copy, shard


def test_a_damaged_shard_is_named_by_training_and_evaluation(built, tmp_path):
    copy, shard = damaged_copy(built, tmp_path / "flipped", "train", "flip")
    builder = ip.get_builder(copy, None)
    train = ip.train_iterator(builder, "train", global_batch_size=2, seed=0, num_local_devices=1)
    with pytest.raises(ip.DamagedShardError) as err:
        for _ in range(20):
            next(train)
    message = str(err.value)
    assert message.startswith(f"{shard}: damaged TFRecord shard of split train (corrupted record")
    assert f"delete {copy} and build the dataset again" in message and "\n" not in message
    assert "{{" not in message and "[Op:" not in message
    with pytest.raises(ip.DamagedShardError, match="corrupted record") as err:
        list(ip.eval_iterator(builder, "train", batch_size=2, num_local_devices=1))
    assert str(err.value).startswith(shard)
    assert len(list(ip.eval_iterator(builder, "test", batch_size=2, num_local_devices=1))) > 0

    copy, shard = damaged_copy(built, tmp_path / "cut", "test", "truncate")
    builder = ip.get_builder(copy, None)
    with pytest.raises(ip.DamagedShardError, match="truncated record") as err:
        list(ip.eval_iterator(builder, "test[0:2]", batch_size=2, num_local_devices=1))
    assert str(err.value).startswith(f"{shard}: damaged TFRecord shard of split test[0:2]")
    assert "train.tfrecord" not in str(err.value)


def test_a_damaged_shard_not_found_again_names_the_dataset_and_its_shards(
    built, tmp_path, monkeypatch
):
    copy, shard = damaged_copy(built, tmp_path / "flipped", "validation", "flip")
    builder = ip.get_builder(copy, None)
    monkeypatch.setattr(ip, "_damaged", lambda shard: False)  # e.g. a transient read error
    with pytest.raises(ip.DamagedShardError) as err:
        list(ip.eval_iterator(builder, "validation", batch_size=2, num_local_devices=1))
    assert str(err.value).startswith(
        f"{copy} (one of {os.path.basename(shard)}): damaged TFRecord shard of split validation"
    )
    assert isinstance(err.value, JaxtagError) and "\n" not in str(err.value)
