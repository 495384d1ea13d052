"""``audio_folder``: your own folder of audio files plus a CSV of their tags.

The manual dir holds the audio (any format ``jaxtag.audio`` decodes: wav, flac, ogg, opus, mp3,
aiff...; in any sub-folders) and ``tags.csv`` with a header and the columns:

- ``path``: the audio file, relative to the manual dir (``/`` separated; ``\\`` is read as ``/``).
  Paths are normalised (``./a.wav`` is ``a.wav``) and must stay inside the manual dir once links
  are resolved: an absolute path or one that leads outside is refused, listed in the build's
  summary and never read (``common.confine``). Two rows naming the same file (after
  normalisation, or through a link) are an error: the clip would land in two splits;
- ``tags``: the clip's tags separated by ``;`` or ``|`` (both are accepted, so tag names cannot
  contain either), surrounding spaces ignored; e.g. ``rock; guitar|male vocal``;
- ``split`` (optional): ``train``, ``validation`` (or ``valid``/``val``) or ``test``. Rows without
  one are split by a hash of their path: the first 8 hex digits of md5(path) modulo 100 gives
  < 80 train, < 90 validation, else test (80/10/10, stable when rows are added or removed);
  the normalised path is hashed.

Vocabulary: the most frequent tags first (ties alphabetical), at most ``max_tags`` of them
(config ``top50``, the default: 50; config ``all``: every tag). Clips with none of the vocabulary's
tags are dropped (as MagnaTagATune's are), and counted in the build report. The tag names are in
``info.metadata['tag_names']``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from . import base, common

CSV_NAME = "tags.csv"
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One usable row: ``path`` normalised relative to the manual dir, ``real`` the file read."""

    path: str
    tags: tuple[str, ...]
    split: str
    real: str = dataclasses.field(default="", compare=False)


def hash_split(path: str) -> str:
    """80/10/10 train/validation/test from md5 of the relative path (deterministic)."""
    bucket = int(hashlib.md5(path.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def split_tags(text: str) -> tuple[str, ...]:
    """``'a; b|c'`` -> ``('a', 'b', 'c')``: split on ``;``/``|``, strip, drop empties, repeats."""
    return tuple(dict.fromkeys(t.strip() for t in re.split(r"[;|]", text) if t.strip()))


def read_tags_csv(path: str, refused: dict[str, str] | None = None) -> list[Row]:
    """Parses the CSV; errors name the file and line.

    Paths are confined to the CSV's folder (``common.confine``): a refused path raises
    ``common.UnsafePathError``, or, when ``refused`` is given, its row is left out and put there
    (listed path -> reason and line). A spreadsheet's "CSV UTF-8" export is read as written: its
    byte-order mark is dropped (``utf-8-sig``) and CRLF line ends are the csv module's own
    (``newline=''``).
    """
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
        columns = reader.fieldnames
        missing = [c for c in ("path", "tags") if c not in columns]
        if missing:
            raise common.DataError(f"{path}: missing column(s) {missing}; found {columns}")
        rows, seen = [], {}
        for line, rec in enumerate(reader, start=2):
            rel = (rec["path"] or "").strip().replace("\\", "/")
            if not rel:
                raise common.DataError(f"{path}:{line}: empty path")
            try:
                where = common.confine(root, rel)
            except common.UnsafePathError as e:
                if refused is None:
                    raise common.UnsafePathError(f"{path}:{line}: {rel}", e.reason) from None
                refused[rel] = f"{e.reason} ({CSV_NAME} line {line})"
                continue
            if where.real in seen:
                first_line, first = seen[where.real]
                same = "is listed twice" if first == rel else f"is the same file as {first}"
                raise common.DataError(
                    f"{path}:{line}: {rel} {same} (line {first_line}): one clip, one row"
                )
            seen[where.real] = line, rel
            rel = where.name
            split_text = (rec.get("split") or "").strip().lower()
            if split_text and split_text not in _SPLIT_ALIASES:
                raise common.DataError(
                    f"{path}:{line}: unknown split {split_text!r} (use train/validation/test)"
                )
            split = _SPLIT_ALIASES[split_text] if split_text else hash_split(rel)
            rows.append(Row(rel, split_tags(rec["tags"] or ""), split, where.real))
    return rows


def vocabulary(rows: list[Row], max_tags: int | None) -> list[str]:
    """Tags by descending count, ties alphabetical, at most ``max_tags``."""
    counts = collections.Counter(t for r in rows for t in r.tags)
    ordered = sorted(counts, key=lambda t: (-counts[t], t))
    return ordered if max_tags is None else ordered[:max_tags]


@dataclasses.dataclass
class AudioFolderConfig(tfds.core.BuilderConfig):
    """``max_tags``: vocabulary size limit (None: all tags)."""

    max_tags: int | None = 50


class AudioFolder(base.MelDatasetBuilder):
    """A folder of audio files with a ``tags.csv`` (see the module doc)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        AudioFolderConfig(name="top50", description="The 50 most frequent tags.", max_tags=50),
        AudioFolderConfig(name="all", description="Every tag in the CSV.", max_tags=None),
    ]
    DEFAULT_CONFIG_NAME = "top50"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Pass your folder of audio files as --manual_dir. It must contain {CSV_NAME} with the columns
    path,tags[,split]: path relative to the folder, tags separated by ';' or '|', split one of
    train/validation/test (rows without one are split 80/10/10 by a hash of the path).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        # The vocabulary comes from the CSV, so the tag vector's length is not known here.
        return self._mel_info(description=__doc__, num_tags=None)

    def _collect(self, dl_manager: tfds.download.DownloadManager) -> base.Collection:
        manual = os.fspath(dl_manager.manual_dir)
        base.require_files(manual, [CSV_NAME], "audio_folder")
        refused: dict[str, str] = {}
        rows = read_tags_csv(os.path.join(manual, CSV_NAME), refused)
        tag_names = vocabulary(rows, self.builder_config.max_tags)
        index = {t: i for i, t in enumerate(tag_names)}
        clips, dropped = [], 0
        for row in rows:
            tags = np.zeros(len(tag_names), dtype=np.float32)
            tags[[index[t] for t in row.tags if t in index]] = 1.0
            if not tags.any():
                dropped += 1
                continue
            job = common.file_job(row.real, name=row.path)
            clips.append(base.Clip(row.split, row.path, job, tags, path=row.path))
        return base.Collection(
            clips=clips,
            tag_names=tag_names,
            dropped={"no tag in the vocabulary": dropped} if dropped else {},
            refused=refused,
        )
