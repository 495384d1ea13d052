"""``mtg_jamendo``: MTG-Jamendo auto-tagging subsets with their official splits (manual download).

The manual dir holds the dataset repository's ``data/`` folder (a clone of
https://github.com/MTG/mtg-jamendo-dataset is a manual dir) and the audio. A config is a subset
and a split: for subset ``S`` (``top50tags``, ``genre``, ``instrument``, ``moodtheme``) and split
``N`` (0-4) the builder reads ``data/splits/split-N/autotagging_S-{train,validation,test}.tsv``,
whose rows are the split's tracks. Config ``S`` is split 0 (the default of the dataset's own
scripts), ``S-splitN`` split N.

The split files are tab separated, with the header ``TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION
TAGS``; a row's tags are the rest of its fields, each ``CATEGORY---TAG`` with the categories
``genre``, ``instrument`` and ``mood/theme`` (``genre---rock``, ``mood/theme---happy``). A
malformed file stops the build before any audio is decoded, the message naming file and line;
so does a track listed twice (the clip would land in two splits).

Vocabulary: the tags of the split's three files, by name (code point order, so the categories
come grouped: genre, instrument, mood/theme), kept as the dataset writes them. Not the subset's
``autotagging_S.tsv``: it holds a few tags that the split files leave out (the splits keep only
tags that every split has), which no training or test track would carry.

Audio: ``PATH`` (``14/214.mp3``) is relative to the audio folder, the first folder of the config's
``audio_dirs`` (default ``AUDIO_DIRS``) that the manual dir holds: ``raw_30s/audio`` (the full
tracks of every subset), ``raw_30s/audio-low``, then the mood/theme subset's own download
``autotagging_moodtheme/audio`` and ``.../audio-low``. A track's file is ``PATH`` or its low-quality
twin ``14/214.low.mp3`` (the name in the ``audio-low`` archives). Missing and broken files are
reported and skipped. A ``PATH`` that is absolute or leads outside the manual dir (links
followed) is refused, listed in the build's summary and never read (``common.confine``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import posixpath

import numpy as np
import tensorflow_datasets as tfds

from . import base, common

SUBSETS = ("top50tags", "genre", "instrument", "moodtheme")
CATEGORY_OF_SUBSET = {"genre": "genre", "instrument": "instrument", "moodtheme": "mood/theme"}
"""The one category a subset's tags have (``top50tags`` mixes all three)."""
CATEGORIES = ("genre", "instrument", "mood/theme")
NUM_SPLITS = 5
DATA_FOLDER = "data"
AUDIO_DIRS = (
    "raw_30s/audio",
    "raw_30s/audio-low",
    "autotagging_moodtheme/audio",
    "autotagging_moodtheme/audio-low",
)
HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")
LOW_SUFFIX = ".low.mp3"


@dataclasses.dataclass(frozen=True)
class Track:
    """One row of a split file: the listed ``path`` is relative to the audio folder."""

    track_id: str
    path: str
    tags: tuple[str, ...]
    line: int


def split_file(subset: str, split: str, number: int) -> str:
    """A split file's path relative to the manual dir."""
    name = f"autotagging_{subset}-{split}.tsv"  # the dataset's split words are TFDS's
    return posixpath.join(DATA_FOLDER, "splits", f"split-{number}", name)


def read_split_file(path: str, subset: str) -> list[Track]:
    """Parses one split file; ``common.DataError`` naming the file and line if it is malformed."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or tuple(rows[0][: len(HEADER)]) != HEADER:
        found = "\t".join(rows[0]) if rows else "an empty file"
        raise common.DataError(
            f"{path}: header must be {' '.join(HEADER)} (tab separated); found {found!r}"
        )
    category = CATEGORY_OF_SUBSET.get(subset)
    tracks, seen = [], {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(row):
            continue
        if len(row) < len(HEADER) - 1:
            raise common.DataError(
                f"{path}:{line}: {len(row)} fields, expected {' '.join(HEADER[:-1])} and the tags"
            )
        track_id, listed = row[0].strip(), row[3].strip()
        if not track_id or not listed:
            raise common.DataError(f"{path}:{line}: empty TRACK_ID or PATH")
        try:
            float(row[4])
        except ValueError:
            raise common.DataError(f"{path}:{line}: DURATION {row[4]!r} is not a number") from None
        tags = tuple(dict.fromkeys(t.strip() for t in row[5:] if t.strip()))
        for tag in tags:
            kind, sep, name = tag.partition("---")
            if not sep or not name or kind not in CATEGORIES:
                raise common.DataError(
                    f"{path}:{line}: tag {tag!r} is not CATEGORY---TAG with a category of "
                    f"{', '.join(CATEGORIES)}"
                )
            if category and kind != category:
                raise common.DataError(
                    f"{path}:{line}: tag {tag!r} in a file of the {subset} subset (only "
                    f"{category} tags)"
                )
        if track_id in seen:
            raise common.DataError(
                f"{path}:{line}: {track_id} is listed twice (line {seen[track_id]})"
            )
        seen[track_id] = line
        tracks.append(Track(track_id, listed.replace("\\", "/"), tags, line))
    return tracks


def find_audio_dir(manual: str, audio_dirs: tuple[str, ...]) -> str:
    """The first of ``audio_dirs`` that is a folder of ``manual``; ``ManualDirError`` if none."""
    for audio_dir in audio_dirs:
        if os.path.isdir(os.path.join(manual, audio_dir)):
            return audio_dir
    raise common.ManualDirError(
        f"mtg_jamendo: manual directory {manual} has none of the audio folders "
        f"{', '.join(audio_dirs)}"
    )


def locate(manual: str, audio_dir: str, listed: str) -> common.ConfinedPath:
    """The file of a track listed as ``listed``: itself, or its ``.low.mp3`` twin when only that
    exists. ``common.UnsafePathError`` when it is absolute or leads outside the manual dir."""
    rel = posixpath.join(audio_dir, listed)  # an absolute ``listed`` stays absolute: refused
    candidates = [rel]
    if rel.endswith(".mp3") and not rel.endswith(LOW_SUFFIX):
        candidates.append(rel[: -len(".mp3")] + LOW_SUFFIX)
    confined = [common.confine(manual, c) for c in candidates]
    # A missing track keeps its listed name: it is reported as missing audio under that name.
    return next((c for c in confined if os.path.isfile(c.real)), confined[0])


@dataclasses.dataclass
class MtgJamendoConfig(tfds.core.BuilderConfig):
    """``subset``: one of ``SUBSETS``; ``split``: the official split number (0-4);
    ``audio_dirs``: where the audio may be, relative to the manual dir (the first that exists)."""

    subset: str = "top50tags"
    split: int = 0
    audio_dirs: tuple[str, ...] = AUDIO_DIRS


_DESCRIPTIONS = {
    "top50tags": "the 50 most frequent tags of all categories",
    "genre": "genre tags",
    "instrument": "instrument tags",
    "moodtheme": "mood/theme tags",
}


def config_name(subset: str, split: int) -> str:
    """``top50tags`` for split 0, ``top50tags-split3`` for split 3."""
    return subset if split == 0 else f"{subset}-split{split}"


class MtgJamendo(base.MelDatasetBuilder):
    """MTG-Jamendo: full-length Jamendo tracks, auto-tagging subsets, official splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: official splits 0-4, float16 log-mel."}
    BUILDER_CONFIGS = [
        MtgJamendoConfig(
            name=config_name(subset, n),
            description=f"MTG-Jamendo {_DESCRIPTIONS[subset]}, official split-{n}.",
            subset=subset,
            split=n,
        )
        for subset in SUBSETS
        for n in range(NUM_SPLITS)
    ]
    DEFAULT_CONFIG_NAME = "top50tags"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Clone https://github.com/MTG/mtg-jamendo-dataset (its data/ folder holds the split files
    data/splits/split-N/autotagging_SUBSET-{train,validation,test}.tsv) and download the audio
    into its raw_30s/audio folder with the repository's scripts/download/download.py
    (--dataset raw_30s --type audio, --unpack), so that tracks lie at raw_30s/audio/14/214.mp3.
    Pass the clone as --manual_dir. raw_30s/audio-low, autotagging_moodtheme/audio and
    autotagging_moodtheme/audio-low are also looked for, in this order.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        # The vocabulary is the split files' tags, so the tag vector's length is not known here.
        return self._mel_info(
            description=__doc__,
            num_tags=None,
            homepage="https://mtg.github.io/mtg-jamendo-dataset/",
            citation=(
                "@inproceedings{bogdanov2019mtg, title={The MTG-Jamendo Dataset for Automatic "
                "Music Tagging}, author={Bogdanov, Dmitry and Won, Minz and Tovstogan, Philip and "
                "Porter, Alastair and Serra, Xavier}, booktitle={Machine Learning for Music "
                "Discovery Workshop, International Conference on Machine Learning (ICML 2019)}, "
                "year={2019}}"
            ),
        )

    def _collect(self, dl_manager: tfds.download.DownloadManager) -> base.Collection:
        manual = os.fspath(dl_manager.manual_dir)
        cfg = self.builder_config
        if cfg.subset not in SUBSETS or not 0 <= cfg.split < NUM_SPLITS:
            raise ValueError(
                f"mtg_jamendo: no subset {cfg.subset!r} split {cfg.split} (subsets "
                f"{', '.join(SUBSETS)}; splits 0-{NUM_SPLITS - 1})"
            )
        files = {split: split_file(cfg.subset, split, cfg.split) for split in base.SPLITS}
        base.require_files(manual, list(files.values()), "mtg_jamendo")
        audio_dir = find_audio_dir(manual, tuple(cfg.audio_dirs))
        listed: dict[str, list[Track]] = {}
        where_listed: dict[str, str] = {}
        for split, rel in files.items():
            listed[split] = read_split_file(os.path.join(manual, rel), cfg.subset)
            for track in listed[split]:
                if track.track_id in where_listed:
                    raise common.DataError(
                        f"{os.path.join(manual, rel)}:{track.line}: {track.track_id} is also in "
                        f"{where_listed[track.track_id]}: one track, one split"
                    )
                where_listed[track.track_id] = rel
        tag_names = sorted(
            {t for tracks in listed.values() for track in tracks for t in track.tags}
        )
        index = {t: i for i, t in enumerate(tag_names)}
        clips, dropped, refused = [], {}, {}
        for split, tracks in listed.items():
            for track in tracks:
                if not track.tags:
                    dropped["no tag"] = dropped.get("no tag", 0) + 1
                    continue
                try:
                    where = locate(manual, audio_dir, track.path)
                except common.UnsafePathError as e:
                    refused[track.path] = f"{e.reason} ({files[split]} line {track.line})"
                    continue
                tags = np.zeros(len(tag_names), dtype=np.float32)
                tags[[index[t] for t in track.tags]] = 1.0
                job = common.file_job(where.real, name=f"{track.track_id} ({where.name})")
                clips.append(base.Clip(split, track.track_id, job, tags, path=where.name))
        return base.Collection(clips=clips, tag_names=tag_names, dropped=dropped, refused=refused)
