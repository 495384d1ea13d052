"""data_prep: the MTG-Jamendo builder on a generated tree in the dataset's layout.

The tree is a clone's: ``data/autotagging*.tsv``, ``data/splits/split-N/autotagging_S-*.tsv``
(written as the dataset's own scripts write them: ``csv.writer`` with a tab, so CRLF line ends,
as the real files have) and real mp3 files at ``raw_30s/audio/NN/ID.mp3``. libsndfile writes
MP3 (``tests/data_fixtures.write_audio``, as the MSD and MTAT stand-ins do), so the PATHs are
the dataset's own ``14/214.mp3`` and the builder decodes mp3 as it would the real audio. Ten tracks
of 1.5 s: one low-quality twin ``NN/ID.low.mp3``, one corrupt, one missing, one listed outside
the manual dir.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import pytest

from data_prep import build, common, mtg_jamendo
from jaxtag import audio, input_pipeline
from tests.data_fixtures import write_audio, write_corrupt
from tests.test_data_prep import F16_ATOL, prepare, read_split

SPLITS = ("train", "validation", "test")
ROCK, AMBIENT, ELECTRONIC, JAZZ = (
    f"genre---{t}" for t in ("rock", "ambient", "electronic", "jazz")
)
PIANO, GUITAR = "instrument---piano", "instrument---guitar"
HAPPY, DARK = "mood/theme---happy", "mood/theme---dark"
TOP = {ROCK, ELECTRONIC, PIANO, HAPPY}  # the stand-in's "top 50" tags


@dataclasses.dataclass(frozen=True)
class FakeTrack:
    number: int
    tags: tuple[str, ...]
    splits: tuple[str, str]  # its split in split-0 and split-1
    status: str = "ok"  # ok | low (only the .low.mp3 twin) | corrupt | missing | outside

    @property
    def track_id(self) -> str:
        return f"track_{self.number:07d}"

    @property
    def listed(self) -> str:
        if self.status == "outside":
            return f"../../../outside/{self.number}.mp3"
        return f"{self.number % 100:02d}/{self.number}.mp3"

    @property
    def stored(self) -> str:
        """Its path in the dataset (relative to the manual dir)."""
        rel = f"raw_30s/audio/{self.listed}"
        return rel[: -len(".mp3")] + ".low.mp3" if self.status == "low" else rel

    def subset_tags(self, subset: str) -> tuple[str, ...]:
        if subset == "top50tags":
            return tuple(t for t in self.tags if t in TOP)
        category = mtg_jamendo.CATEGORY_OF_SUBSET[subset]
        return tuple(t for t in self.tags if t.startswith(category + "---"))


TRACKS = [
    FakeTrack(214, (ROCK, PIANO, HAPPY), ("train", "test")),
    FakeTrack(1376256, (ELECTRONIC, AMBIENT, GUITAR, DARK), ("train", "train")),
    FakeTrack(3100, (AMBIENT, HAPPY, PIANO), ("validation", "train")),
    FakeTrack(4201, (ROCK, GUITAR, DARK), ("test", "validation")),
    FakeTrack(5302, (ELECTRONIC, PIANO, DARK), ("train", "train")),
    FakeTrack(6403, (ROCK, GUITAR, HAPPY), ("validation", "test"), "low"),
    FakeTrack(7504, (AMBIENT, PIANO), ("train", "validation"), "corrupt"),
    FakeTrack(8605, (ELECTRONIC, GUITAR, HAPPY), ("test", "train"), "missing"),
    FakeTrack(9706, (ROCK, DARK), ("train", "train"), "outside"),
    FakeTrack(10807, (AMBIENT, PIANO, DARK), ("test", "validation")),
]
# In autotagging*.tsv only: its jazz tag is in no split file, as a few real tags are not.
UNSPLIT = FakeTrack(12009, (JAZZ, PIANO), ("", ""))
UNTAGGED_ROW = ["track_0099999", "artist_000001", "album_000001", "99/99999.mp3", "200.0"]
USABLE = ("ok", "low")


def listed(subset: str, number: int, split: str) -> list[FakeTrack]:
    """The tracks of a split file (a track without a tag of the subset is not in its files)."""
    return [t for t in TRACKS if t.splits[number] == split and t.subset_tags(subset)]


def vocabulary(subset: str) -> list[str]:
    return sorted({tag for t in TRACKS for tag in t.subset_tags(subset)})


def write_tsv(path: str, rows: list[list[str]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:  # as the dataset's scripts write them (CRLF line ends)
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(mtg_jamendo.HEADER)
        writer.writerows(rows)


def row(track: FakeTrack, tags: tuple[str, ...]) -> list[str]:
    artist, album = f"artist_{track.number % 97:06d}", f"album_{track.number % 89:06d}"
    return [track.track_id, artist, album, track.listed, "183.4", *tags]


def make_fake_jamendo(root: str) -> str:
    for i, track in enumerate(TRACKS):
        path = os.path.join(root, track.stored)
        if track.status == "corrupt":
            write_corrupt(path)
        elif track.status in USABLE:
            write_audio(path, seconds=1.5, freq=150.0 + 40 * i, seed=i)
    write_tsv(os.path.join(root, "data", "autotagging.tsv"), [row(t, t.tags) for t in TRACKS])
    for subset in mtg_jamendo.SUBSETS:
        everything = [*TRACKS, UNSPLIT]
        rows = [row(t, t.subset_tags(subset)) for t in everything if t.subset_tags(subset)]
        write_tsv(os.path.join(root, "data", f"autotagging_{subset}.tsv"), rows)
        for number in (0, 1):
            for split in SPLITS:
                rows = [row(t, t.subset_tags(subset)) for t in listed(subset, number, split)]
                if (subset, number, split) == ("top50tags", 0, "train"):
                    rows.append(UNTAGGED_ROW)
                rel = mtg_jamendo.split_file(subset, split, number)
                write_tsv(os.path.join(root, rel), rows)
    return root


@pytest.fixture(scope="module")
def jamendo(tmp_path_factory):
    root = tmp_path_factory.mktemp("jamendo")
    manual = make_fake_jamendo(str(root / "manual"))
    data_dir = str(root / "tfds")
    builders = {}

    def built(config: str):
        if config not in builders:
            builder = mtg_jamendo.MtgJamendo(data_dir=data_dir, config=config, num_workers=1)
            builders[config] = prepare(builder, manual)
        return builders[config]

    return manual, data_dir, built


@pytest.mark.parametrize("subset", mtg_jamendo.SUBSETS)
def test_each_subset_has_its_split_files_tracks_and_tags(jamendo, subset):
    _, _, built = jamendo
    builder = built(subset)
    names = input_pipeline.tag_names(builder)
    assert names == vocabulary(subset) and JAZZ not in names  # the split files' tags, sorted
    for split in SPLITS:
        usable = {t.track_id: t for t in listed(subset, 0, split) if t.status in USABLE}
        examples = read_split(builder, split)
        assert sorted(examples) == sorted(usable)
        assert builder.info.splits[split].num_examples == len(usable) > 0
        for track_id, ex in examples.items():
            track = usable[track_id]
            want = [float(t in track.subset_tags(subset)) for t in names]
            np.testing.assert_array_equal(ex["tags"], want)
            assert ex["path"].decode() == track.stored and ex["mel"].shape[0] == audio.N_MELS
    refused = {t.listed for t in TRACKS if t.status == "outside" and t.subset_tags(subset)}
    assert set(builder.report.refused) == refused


def test_specific_tracks_carry_their_tsv_tags(jamendo):
    _, _, built = jamendo
    top = built("top50tags")
    assert input_pipeline.tag_names(top) == [ELECTRONIC, ROCK, PIANO, HAPPY]
    np.testing.assert_array_equal(read_split(top, "train")["track_0000214"]["tags"], [0, 1, 1, 1])
    np.testing.assert_array_equal(read_split(top, "test")["track_0010807"]["tags"], [0, 0, 1, 0])
    assert top.report.dropped == {"no tag": 1}  # the row without tags
    mood = built("moodtheme")
    assert input_pipeline.tag_names(mood) == [DARK, HAPPY]
    np.testing.assert_array_equal(read_split(mood, "train")["track_1376256"]["tags"], [1, 0])
    genre = built("genre")
    assert input_pipeline.tag_names(genre) == [AMBIENT, ELECTRONIC, ROCK]
    ex = read_split(genre, "validation")["track_0006403"]
    assert ex["path"].decode() == "raw_30s/audio/03/6403.low.mp3"  # the low-quality twin
    np.testing.assert_array_equal(ex["tags"], [0, 0, 1])


def test_spectrograms_are_jaxtag_audio_log_mels_of_the_files(jamendo):
    manual, _, built = jamendo
    builder = built("top50tags")
    checked = 0
    for split in SPLITS:
        for ex in read_split(builder, split).values():
            mel = ex["mel"]
            ref = audio.load_log_mel(os.path.join(manual, ex["path"].decode()))
            assert mel.dtype == np.float16 and mel.shape == ref.shape
            assert 90 < mel.shape[1] < 100  # 1.5 s: 1 + 24000 // 256 = 94 frames (+ mp3 padding)
            np.testing.assert_allclose(mel.astype(np.float32), ref, atol=F16_ATOL, rtol=0)
            checked += 1
    assert checked == 7


def test_broken_and_missing_audio_is_skipped_and_reported(jamendo):
    _, data_dir, built = jamendo
    builder = built("instrument")
    skipped = builder.report.skipped
    assert sorted(skipped) == [
        "track_0007504 (raw_30s/audio/04/7504.mp3)",
        "track_0008605 (raw_30s/audio/05/8605.mp3)",
    ]
    assert "7504.mp3: cannot decode audio" in skipped["track_0007504 (raw_30s/audio/04/7504.mp3)"]
    assert "8605.mp3: no such audio file" in skipped["track_0008605 (raw_30s/audio/05/8605.mp3)"]
    summary = builder.report.summary()
    assert "skipped (unusable audio): 2" in summary and all(name in summary for name in skipped)
    reread = input_pipeline.get_builder("mtg_jamendo/instrument", data_dir)
    assert reread.info.metadata["num_skipped"] == 2
    assert set(reread.info.metadata["skipped"]) == set(skipped)
    refused = built("moodtheme").report.refused  # listed outside the manual dir: never read
    assert list(refused) == ["../../../outside/9706.mp3"]
    reason = refused["../../../outside/9706.mp3"]
    assert "leads outside the manual directory" in reason
    assert "(data/splits/split-0/autotagging_moodtheme-train.tsv line 5)" in reason


def test_jaxtag_build_mtg_jamendo_with_another_split(jamendo, capsys):
    manual, data_dir, _ = jamendo
    argv = ["mtg_jamendo", "--data_dir", data_dir, "--manual_dir", manual, "--config"]
    assert build.main([*argv, "genre-split1", "--num_workers", "1", "--keep_cache"]) == 0
    out = capsys.readouterr().out
    assert "mtg_jamendo/genre-split1 written to" in out and "clips written: 7" in out
    builder = input_pipeline.get_builder("mtg_jamendo/genre-split1", data_dir)
    assert builder.data_dir.endswith(os.path.join("mtg_jamendo", "genre-split1", "1.0.0"))
    for split in SPLITS:
        usable = [t.track_id for t in listed("genre", 1, split) if t.status in USABLE]
        assert sorted(read_split(builder, split)) == sorted(usable)
    assert build.main([*argv, "genre-split5"]) == 2
    assert "has no config 'genre-split5'" in capsys.readouterr().err


def test_config_names_select_subset_and_split():
    configs = {c.name: c for c in mtg_jamendo.MtgJamendo.BUILDER_CONFIGS}
    assert len(configs) == 20 and mtg_jamendo.MtgJamendo.DEFAULT_CONFIG_NAME == "top50tags"
    chosen = [(configs[n].subset, configs[n].split) for n in ("genre", "moodtheme-split4")]
    assert chosen == [("genre", 0), ("moodtheme", 4)]
    assert mtg_jamendo.split_file("instrument", "validation", 2) == (
        "data/splits/split-2/autotagging_instrument-validation.tsv"
    )


H = "\t".join(mtg_jamendo.HEADER)


@pytest.mark.parametrize(
    "lines, message",
    [
        (["TRACK_ID\tPATH\tTAGS"], r"autotagging_genre-train.tsv: header must be TRACK_ID"),
        ([], r"autotagging_genre-train.tsv: header must be .*found 'an empty file'"),
        ([H, "t1\ta1\tb1\t14/214.mp3"], r"autotagging_genre-train.tsv:2: 4 fields, expected"),
        ([H, "t1\ta1\tb1\t14/214.mp3\tlong\tgenre---rock"], r"-train.tsv:2: DURATION 'long'"),
        ([H, "t1\ta1\tb1\t1/1.mp3\t1.0\trock"], r"-train.tsv:2: tag 'rock' is not CATEGORY---"),
        ([H, "t1\ta1\tb1\t1/1.mp3\t1.0\tgenre---pop", "t2\ta1\tb1\t2/2.mp3\t1\tmood/theme---sad"],
         r"-train.tsv:3: tag 'mood/theme---sad' in a file of the genre subset"),
        ([H, "t1\ta1\tb1\t1/1.mp3\t1.0\tgenre---pop", "t1\ta1\tb1\t1/1.mp3\t1\tgenre---pop"],
         r"-train.tsv:3: t1 is listed twice \(line 2\)"),
    ],
)  # fmt: skip
def test_malformed_split_files_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "autotagging_genre-train.tsv"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(common.DataError, match=message):
        mtg_jamendo.read_split_file(str(path), "genre")


def test_the_build_stops_on_a_malformed_or_missing_file(tmp_path, capsys):
    manual = make_fake_jamendo(str(tmp_path / "manual"))
    argv = ["mtg_jamendo", "--data_dir", str(tmp_path / "d"), "--manual_dir", manual]
    test_file = os.path.join(manual, mtg_jamendo.split_file("genre", "test", 0))
    with open(test_file, "a") as f:
        f.write("track_0000214\tartist_1\talbum_1\t14/214.mp3\t1.0\tgenre---rock\n")
    also = (
        r"genre-test.tsv:\d+: track_0000214 is also in data/splits/split-0/autotagging_genre-train"
    )
    with pytest.raises(common.DataError, match=also):
        prepare(mtg_jamendo.MtgJamendo(data_dir=str(tmp_path / "d"), config="genre"), manual)
    assert not os.path.exists(tmp_path / "d" / "downloads" / "mel_cache")  # nothing decoded
    with open(test_file, "a") as f:
        f.write("track_1\tartist_1\talbum_1\t1/1.mp3\t1.0\tgenre\n")
    assert build.main([*argv, "--config", "genre", "--num_workers", "1"]) == 1
    assert f"error: {test_file}:6: tag 'genre' is not CATEGORY---TAG" in capsys.readouterr().err
    os.remove(os.path.join(manual, mtg_jamendo.split_file("moodtheme", "validation", 0)))
    assert build.main([*argv, "--config", "moodtheme"]) == 2
    err = capsys.readouterr().err
    assert "lacks required file(s): data/splits/split-0/autotagging_moodtheme-validation.tsv" in err
    os.rename(os.path.join(manual, "raw_30s"), os.path.join(manual, "elsewhere"))
    with pytest.raises(common.ManualDirError, match="none of the audio folders raw_30s/audio, "):
        prepare(mtg_jamendo.MtgJamendo(data_dir=str(tmp_path / "d"), config="instrument"), manual)
    config = mtg_jamendo.MtgJamendoConfig(
        name="mine", subset="instrument", audio_dirs=("elsewhere/audio",)
    )
    builder = mtg_jamendo.MtgJamendo(data_dir=str(tmp_path / "d"), config=config, num_workers=1)
    paths = [ex["path"].decode() for ex in read_split(prepare(builder, manual), "train").values()]
    assert len(paths) == 3 and all(p.startswith("elsewhere/audio/") for p in paths)


def test_locate_takes_the_low_quality_twin_and_refuses_absolute_paths(tmp_path):
    manual = str(tmp_path)
    write_audio(os.path.join(manual, "raw_30s/audio-low/14/214.low.mp3"), seconds=1.0)
    found = mtg_jamendo.locate(manual, "raw_30s/audio-low", "14/214.mp3")
    assert found.name == "raw_30s/audio-low/14/214.low.mp3"
    missing = mtg_jamendo.locate(manual, "raw_30s/audio-low", "./15/215.mp3")
    assert missing.name == "raw_30s/audio-low/15/215.mp3"  # reported missing under its own name
    with pytest.raises(common.UnsafePathError, match="an absolute path"):
        mtg_jamendo.locate(manual, "raw_30s/audio-low", "/etc/14/214.mp3")
    assert mtg_jamendo.find_audio_dir(manual, mtg_jamendo.AUDIO_DIRS) == "raw_30s/audio-low"
