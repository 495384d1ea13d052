"""data_prep: the MagnaTagATune, MSD and audio-folder builders on generated data (the synthetic
set and the build command: tests/test_data_build.py)."""

from __future__ import annotations

import csv
import os
import pickle
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import audio_folder, build, common, magnatagatune, msd
from jaxtag import audio, input_pipeline
from jaxtag.tags import MSD_TOP50, MTAT_TOP50
from tests.data_fixtures import (
    make_fake_msd,
    make_fake_mtat,
    py2_pickle,
    reference_log_mel_of_file,
    write_audio,
    write_corrupt,
)

# float16 storage: spacing <= 0.0625 for |dB| < 128, so rounding error <= 0.031.
F16_ATOL = 0.035


def prepare(builder, manual_dir: str | None = None):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def read_split(builder, split: str) -> dict[str, dict]:
    return {ex["clip_id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


# ----------------------------------------------------------------------------------------------
# MagnaTagATune


@pytest.fixture(scope="module")
def mtat(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtat")
    fake = make_fake_mtat(str(root / "manual"))
    data_dir = str(root / "tfds")
    builder = magnatagatune.Magnatagatune(data_dir=data_dir, config="released_order", num_workers=2)
    return fake, data_dir, prepare(builder, fake.root)


def test_mtat_split_membership_and_tag_vectors(mtat):
    fake, _, builder = mtat
    assert set(builder.info.splits.keys()) == {"train", "validation", "test"}
    for split in ("train", "validation", "test"):
        expected = {c.clip_id: c for c in fake.written(split)}
        examples = read_split(builder, split)
        assert sorted(examples) == sorted(expected)
        assert builder.info.splits[split].num_examples == len(expected)
        for clip_id, ex in examples.items():
            clip = expected[clip_id]
            want = np.array([t in clip.tags for t in MTAT_TOP50], np.float32)
            np.testing.assert_array_equal(ex["tags"], want)
            assert ex["path"].decode() == clip.mp3_path
    # 5 train (folders 0, 5, b), 3 validation (c), 3 test (d, f): 11 of the 14 listed clips.
    assert [builder.info.splits[s].num_examples for s in ("train", "validation", "test")] == [
        5,
        3,
        3,
    ]


def test_mtat_spectrograms_match_librosa(mtat):
    fake, _, builder = mtat
    examples = read_split(builder, "validation")
    for clip in fake.written("validation"):
        mel = examples[clip.clip_id]["mel"]
        ref = reference_log_mel_of_file(os.path.join(fake.root, clip.mp3_path))
        assert mel.dtype == np.float16 and mel.shape == ref.shape == (96, mel.shape[1])
        assert 120 < mel.shape[1] < 130  # 2 s: 1 + 32000 // 256 = 126 frames (+ mp3 padding)
        np.testing.assert_allclose(mel.astype(np.float32), ref, atol=F16_ATOL, rtol=0)


def test_mtat_skip_report(mtat):
    fake, data_dir, builder = mtat
    bad = {c.mp3_path: c.status for c in fake.clips if c.status in ("corrupt", "missing")}
    assert set(builder.report.skipped) == set(bad)
    for path, reason in builder.report.skipped.items():
        assert os.path.basename(path) in reason
        assert ("no such audio file" in reason) == (bad[path] == "missing")
    assert builder.report.dropped == {"none of the top-50 tags": 1}
    summary = builder.report.summary()
    assert "clips written: 11" in summary and "skipped (unusable audio): 2" in summary
    assert all(path in summary for path in bad)
    # The same report and the tag order come back from the built files alone.
    reread = input_pipeline.get_builder("magnatagatune", data_dir)
    assert input_pipeline.tag_names(reread) == list(MTAT_TOP50)
    assert reread.info.metadata["num_skipped"] == 2
    assert set(reread.info.metadata["skipped"]) == set(bad)
    assert reread.info.metadata["dropped"] == {"none of the top-50 tags": 1}


def test_mtat_by_count_config_reuses_the_mel_cache(mtat, monkeypatch):
    fake, data_dir, _ = mtat

    decoded = []
    real_load_log_mel = audio.load_log_mel

    def counting(path):
        decoded.append(os.path.relpath(path, fake.root))
        return real_load_log_mel(path)

    monkeypatch.setattr(audio, "load_log_mel", counting)
    builder = prepare(
        magnatagatune.Magnatagatune(data_dir=data_dir, config="by_count", num_workers=1),
        fake.root,
    )
    counts = {t: sum(t in c.tags for c in fake.clips) for t in fake.header_tags}
    expected = sorted(counts, key=lambda t: (-counts[t], t))[:50]
    names = input_pipeline.tag_names(builder)
    assert names == expected and names != list(MTAT_TOP50)
    # Only the clip that had no top-50 tag before ("zz rare" is in this top 50) is new work.
    assert "zz rare" in names
    assert decoded == [c.mp3_path for c in fake.clips if c.status == "dropped"]
    clips = {c.clip_id: c for c in fake.clips}
    for clip_id, ex in read_split(builder, "train").items():
        np.testing.assert_array_equal(ex["tags"], [t in clips[clip_id].tags for t in names])


def test_top_tags_by_count_breaks_ties_alphabetically():
    labels = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]])
    names = ["b", "a", "c", "d"]  # counts 2, 2, 3, 2
    assert magnatagatune.top_tags_by_count(names, labels, 3) == ["c", "a", "b"]


def test_mtat_annotations_errors_name_the_problem(tmp_path):
    path = tmp_path / "annotations_final.csv"
    path.write_text('"clip_id"\t"guitar"\t"mp3_path"\n"2"\t"1"\t"0/a.mp3"\n')
    ann = magnatagatune.read_annotations(str(path))
    assert ann.tag_names == ["guitar"] and ann.labels.tolist() == [[1]]
    builder = magnatagatune.Magnatagatune(data_dir=str(tmp_path / "d"))
    with pytest.raises(common.DataError, match="lacks tag columns.*classical"):
        builder._tag_names(ann, str(path))
    path.write_text('"clip_id"\t"guitar"\t"mp3_path"\n"2"\t"1"\n')
    with pytest.raises(common.DataError, match="annotations_final.csv:2: 2 columns"):
        magnatagatune.read_annotations(str(path))


def test_missing_manual_files_fail_clearly(tmp_path, capsys):
    manual = tmp_path / "manual"
    (manual / "0").mkdir(parents=True)
    builder = magnatagatune.Magnatagatune(data_dir=str(tmp_path / "d"), num_workers=1)
    with pytest.raises(common.ManualDirError, match="annotations_final.csv"):
        prepare(builder, str(manual))
    argv = ["msd", "--data_dir", str(tmp_path / "d"), "--manual_dir", str(manual)]
    assert build.main(argv) == 2
    err = capsys.readouterr().err
    assert "lacks required file(s)" in err and "7D_id_to_path.pkl" in err
    assert build.main(["msd", "--data_dir", str(tmp_path / "d"), "--manual_dir", "/nope"]) == 2
    assert "/nope does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# audio_folder


def make_folder(root) -> str:
    root = str(root)
    for name, sr, ch in [("a/one.wav", 44100, 2), ("a/two.flac", 16000, 1),
                         ("b/three.ogg", 22050, 1), ("b/four.mp3", 44100, 2),
                         ("five.wav", 8000, 1), ("six.wav", 16000, 1)]:  # fmt: skip
        write_audio(os.path.join(root, name), seconds=1.0 + len(name) / 10, sr=sr, channels=ch)
    write_corrupt(os.path.join(root, "broken.mp3"))
    rows = [
        ("a/one.wav", "rock;guitar", "train"),
        ("a/two.flac", "rock|piano", ""),
        ("b/three.ogg", " rock ; guitar | male vocal", "test"),
        ("b/four.mp3", "jazz", "valid"),
        ("five.wav", "guitar", ""),
        ("six.wav", "obscure", ""),
        ("seven.wav", "rock", ""),  # listed, not there
        ("broken.mp3", "rock", "train"),
    ]
    with open(os.path.join(root, "tags.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("path", "tags", "split"), *rows])
    return root


def test_audio_folder_vocabulary_splits_tags_and_skips(tmp_path):
    manual = make_folder(tmp_path / "music")
    config = audio_folder.AudioFolderConfig(name="top3", max_tags=3)
    builder = prepare(
        audio_folder.AudioFolder(data_dir=str(tmp_path / "tfds"), config=config, num_workers=1),
        manual,
    )
    # rock 5, guitar 3, then jazz / male vocal / obscure / piano tied at 1: alphabetical.
    assert input_pipeline.tag_names(builder) == ["rock", "guitar", "jazz"]
    expected = {
        "a/one.wav": ("train", [1, 1, 0]),
        "a/two.flac": (audio_folder.hash_split("a/two.flac"), [1, 0, 0]),
        "b/three.ogg": ("test", [1, 1, 0]),
        "b/four.mp3": ("validation", [0, 0, 1]),
        "five.wav": (audio_folder.hash_split("five.wav"), [0, 1, 0]),
    }
    found = {}
    for split in builder.info.splits.keys():
        for clip_id, ex in read_split(builder, split).items():
            found[clip_id] = (split, ex["tags"].tolist())
            assert ex["mel"].shape[0] == 96 and ex["path"].decode() == clip_id
    assert found == expected
    assert set(builder.report.skipped) == {"seven.wav", "broken.mp3"}
    assert builder.report.dropped == {"no tag in the vocabulary": 1}
    ex = read_split(builder, "test")["b/three.ogg"]
    ref = reference_log_mel_of_file(os.path.join(manual, "b/three.ogg"))
    np.testing.assert_allclose(ex["mel"].astype(np.float32), ref, atol=F16_ATOL, rtol=0)


def test_hash_split_is_stable_and_80_10_10():
    splits = [audio_folder.hash_split(f"dir/{i}.mp3") for i in range(3000)]
    fractions = [splits.count(s) / 3000 for s in ("train", "validation", "test")]
    assert abs(fractions[0] - 0.8) < 0.03 and abs(fractions[1] - 0.1) < 0.02
    assert splits == [audio_folder.hash_split(f"dir/{i}.mp3") for i in range(3000)]


def test_tags_csv_parsing_and_errors(tmp_path):
    assert audio_folder.split_tags(" a; b|a |; c ") == ("a", "b", "c")
    path = tmp_path / "tags.csv"
    path.write_text("file,tags\nx.wav,a\n")
    with pytest.raises(common.DataError, match=r"tags.csv: missing column\(s\) \['path'\]"):
        audio_folder.read_tags_csv(str(path))
    path.write_text("path,tags,split\nx.wav,a,train\ny.wav,b,dev\n")
    with pytest.raises(common.DataError, match="tags.csv:3: unknown split 'dev'"):
        audio_folder.read_tags_csv(str(path))


def test_tags_csv_from_a_spreadsheet_bom_and_crlf(tmp_path):
    """Excel's "CSV UTF-8": a byte-order mark before the header and CRLF line ends."""
    path = tmp_path / "tags.csv"
    path.write_bytes(
        "path,tags,split\r\nx.wav,rock;caf\u00e9,train\r\ny.wav,jazz,\r\n".encode("utf-8-sig")
    )
    assert path.read_bytes().startswith(b"\xef\xbb\xbfpath")
    rows = audio_folder.read_tags_csv(str(path))
    assert rows == [
        audio_folder.Row("x.wav", ("rock", "caf\u00e9"), "train"),
        audio_folder.Row("y.wav", ("jazz",), audio_folder.hash_split("y.wav")),
    ]


def test_short_empty_and_non_audio_clips_are_reported_by_what_they_are(tmp_path):
    manual = tmp_path / "music"
    write_audio(str(manual / "long.wav"), seconds=5.0)
    write_audio(str(manual / "short.wav"), seconds=2.0)  # under one chunk: kept, padded
    full = write_audio(str(manual / "full.mp3"), seconds=3.0, sr=44100)
    with open(full, "rb") as f:
        head = f.read(3000)  # a download cut short: decodes to ~0.18 s
    (manual / "truncated.mp3").write_bytes(head)
    (manual / "empty.wav").write_bytes(b"")
    (manual / "notes.mp3").write_text("not audio at all\n")
    names = ["long.wav", "short.wav", "truncated.mp3", "empty.wav", "notes.mp3"]
    (manual / "tags.csv").write_text(
        "path,tags,split\n" + "".join(f"{n},rock,train\n" for n in names)
    )
    builder = audio_folder.AudioFolder(data_dir=str(tmp_path / "tfds"), config="all", num_workers=1)
    prepare(builder, str(manual))
    skipped = builder.report.skipped
    assert sorted(skipped) == ["empty.wav", "notes.mp3", "truncated.mp3"]
    assert "the file is empty (0 bytes)" in skipped["empty.wav"]
    assert "not an audio file, or its audio data is corrupt" in skipped["notes.mp3"]
    assert re.search(
        r"only 0\.1\d s of audio \(clips under 1 s are skipped\)", skipped["truncated.mp3"]
    )
    assert not any("possibly a pipe" in reason for reason in skipped.values())
    assert sorted(read_split(builder, "train")) == ["long.wav", "short.wav"]
    assert builder.report.shorter_than_chunk == 1
    summary = builder.report.summary()
    assert "shorter than one 4.1 s chunk (kept, padded when read): 1" in summary
    assert "truncated.mp3: " + skipped["truncated.mp3"] in summary
    assert builder.info.metadata["shorter_than_chunk"] == 1


# ----------------------------------------------------------------------------------------------
# MSD


def test_msd_standard_split_from_py2_pickles(tmp_path, monkeypatch):
    fake = make_fake_msd(str(tmp_path / "msd"))
    monkeypatch.setattr(msd, "TRAIN_SIZE", 4)  # the real files: 201,680 train, then validation
    builder = prepare(msd.Msd(data_dir=str(tmp_path / "tfds"), num_workers=1), fake.root)
    splits = {
        "train": fake.train_ids[:4],
        "validation": fake.train_ids[4:],
        "test": fake.test_ids,
    }
    for split, ids in splits.items():
        examples = read_split(builder, split)
        assert sorted(examples) == sorted(i for i in ids if i not in fake.missing_ids)
        for msd_id, ex in examples.items():
            np.testing.assert_array_equal(ex["tags"], fake.vectors[msd_id].astype(np.float32))
            assert ex["path"].decode() == fake.paths[msd_id]
    assert set(builder.report.skipped) == set(fake.missing_ids)
    assert input_pipeline.tag_names(builder) == list(MSD_TOP50)
    assert input_pipeline.tag_names(builder)[17] == "Mellow"


def test_restricted_unpickler(tmp_path):
    arrays = {"TRA": np.array([0, 1, 200, 255], np.int64), "TRB": np.eye(2, dtype=np.float32)}
    for name, data in [
        ("py2.cP", py2_pickle(arrays)),  # Python 2 / numpy 1 names, byte strings
        ("py3.cP", pickle.dumps(arrays, protocol=2)),  # numpy 2 names, _codecs.encode
        ("py3p5.cP", pickle.dumps(arrays, protocol=5)),
    ]:
        (tmp_path / name).write_bytes(data)
        loaded = msd.load_pickle(str(tmp_path / name))
        assert loaded.keys() == arrays.keys()
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded[key], value)
    (tmp_path / "list.cP").write_bytes(py2_pickle(["TRA", "caf\xe9"]))
    assert msd.load_pickle(str(tmp_path / "list.cP")) == ["TRA", "caf\xe9"]
    (tmp_path / "evil.cP").write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(msd.UnsafePickleError, match=r"evil.cP: refusing to unpickle \w+\.system"):
        msd.load_pickle(str(tmp_path / "evil.cP"))
    (tmp_path / "junk.cP").write_bytes(b"not a pickle")
    with pytest.raises(common.DataError, match="junk.cP: cannot unpickle"):
        msd.load_pickle(str(tmp_path / "junk.cP"))


def test_msd_audio_candidates_follow_both_layouts():
    got = msd.audio_candidates("/r", "TRABCDE12903", "8/9/8947470.clip.mp3")
    assert got == [
        "/r/8/9/8947470.clip.mp3",
        "/r/audio/8/9/8947470.clip.mp3",
        "/r/A/B/C/TRABCDE12903.mp3",
        "/r/audio/A/B/C/TRABCDE12903.mp3",
    ]
