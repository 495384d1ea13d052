"""``magnatagatune``: MagnaTagATune top-50 tags, the original folder split (manual download).

The manual dir holds ``annotations_final.csv`` (tab separated, quoted: ``clip_id``, 188 tag
columns, ``mp3_path``) and the mp3 folders ``0`` .. ``f``. The split is the original one by
folder: ``0``-``b`` train, ``c`` validation, ``d``-``f`` test; clips with none of the 50 tags
are dropped (expected result: 15,250 / 1,529 / 4,332 clips). The few broken mp3 files of MTAT are
reported and skipped. An ``mp3_path`` is normalised before its folder is read, and one that is
absolute or leads outside the manual dir (links followed) is refused, listed in the build's
summary and never read (``common.confine``).

Configs (the tag *set* is the 50 most frequent tags either way; they differ in order):

- ``released_order`` (default): the order of the released model's outputs (``MTAT_TOP50``);
- ``by_count``: descending tag count in the annotations, ties broken alphabetically.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from jaxtag.tags import MTAT_TOP50

from . import base, common

ANNOTATIONS = "annotations_final.csv"
FOLDERS = "0123456789abcdef"
SPLIT_OF_FOLDER = (
    {f: "train" for f in "0123456789ab"} | {"c": "validation"} | {f: "test" for f in "def"}
)


@dataclasses.dataclass(frozen=True)
class Annotations:
    """``annotations_final.csv``: tag names, clip ids, 0/1 labels ``(clips, tags)``, mp3 paths."""

    tag_names: list[str]
    clip_ids: list[str]
    labels: np.ndarray
    mp3_paths: list[str]


def read_annotations(path: str) -> Annotations:
    """Parses the tab-separated, quoted annotations file; errors name the file and line."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or len(rows[0]) < 3 or rows[0][0] != "clip_id" or rows[0][-1] != "mp3_path":
        raise common.DataError(
            f"{path}: header must be clip_id, <tags...>, mp3_path (tab separated)"
        )
    header = rows[0]
    ids, labels, paths = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise common.DataError(f"{path}:{line}: {len(row)} columns, header has {len(header)}")
        try:
            labels.append([int(v) for v in row[1:-1]])
        except ValueError as e:
            raise common.DataError(f"{path}:{line}: tag values must be 0 or 1 ({e})") from e
        ids.append(row[0])
        paths.append(row[-1])
    return Annotations(header[1:-1], ids, np.asarray(labels, dtype=np.int64), paths)


def top_tags_by_count(tag_names: list[str], labels: np.ndarray, k: int = 50) -> list[str]:
    """The ``k`` most frequent tags, by descending count, ties broken alphabetically."""
    counts = labels.sum(axis=0)
    order = sorted(range(len(tag_names)), key=lambda j: (-int(counts[j]), tag_names[j]))
    return [tag_names[j] for j in order[:k]]


def split_of(mp3_path: str) -> str | None:
    """'train' / 'validation' / 'test' from the mp3's folder, None if not in ``0``-``f``."""
    folder = mp3_path.replace("\\", "/").split("/", 1)[0]
    return SPLIT_OF_FOLDER.get(folder) if "/" in mp3_path else None


@dataclasses.dataclass
class MagnatagatuneConfig(tfds.core.BuilderConfig):
    """``tag_order``: 'released' (``MTAT_TOP50``) or 'by_count'."""

    tag_order: str = "released"


class Magnatagatune(base.MelDatasetBuilder):
    """MagnaTagATune: 25,863 clips of 29.1 s, top-50 tags, original split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: original split, float16 log-mel."}
    BUILDER_CONFIGS = [
        MagnatagatuneConfig(
            name="released_order",
            description="Top-50 tags in the released model's output order.",
            tag_order="released",
        ),
        MagnatagatuneConfig(
            name="by_count",
            description="Top-50 tags by descending count, ties alphabetical.",
            tag_order="by_count",
        ),
    ]
    DEFAULT_CONFIG_NAME = "released_order"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download MagnaTagATune from https://mirg.city.ac.uk/codeapps/the-magnatagatune-dataset:
    annotations_final.csv and mp3.zip.001-003 (cat mp3.zip.* > mp3.zip; unzip mp3.zip).
    Put annotations_final.csv and the folders 0 .. f side by side in the manual dir
    (default <data_dir>/downloads/manual/, or pass --manual_dir).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self._mel_info(
            description=__doc__,
            num_tags=len(MTAT_TOP50),
            homepage="https://mirg.city.ac.uk/codeapps/the-magnatagatune-dataset",
            citation=(
                "@inproceedings{law2009evaluation, title={Evaluation of Algorithms Using Games: "
                "The Case of Music Tagging}, author={Law, Edith and West, Kris and Mandel, Michael "
                "and Bay, Mert and Downie, J. Stephen}, booktitle={ISMIR}, year={2009}}"
            ),
        )

    def _collect(self, dl_manager: tfds.download.DownloadManager) -> base.Collection:
        manual = os.fspath(dl_manager.manual_dir)
        base.require_files(manual, [ANNOTATIONS], "magnatagatune")
        if not any(os.path.isdir(os.path.join(manual, f)) for f in FOLDERS):
            raise common.ManualDirError(
                f"magnatagatune: manual directory {manual} has none of the mp3 folders 0 .. f"
            )
        ann = read_annotations(os.path.join(manual, ANNOTATIONS))
        tag_names = self._tag_names(ann, os.path.join(manual, ANNOTATIONS))
        columns = [ann.tag_names.index(t) for t in tag_names]
        clips, dropped, refused = [], {}, {}
        for clip_id, row, listed in zip(ann.clip_ids, ann.labels, ann.mp3_paths, strict=True):
            try:
                where = common.confine(manual, listed.replace("\\", "/")) if listed else None
            except common.UnsafePathError as e:
                refused[listed] = f"{e.reason} ({ANNOTATIONS}, clip {clip_id})"
                continue
            mp3 = where.name if where else listed
            split, tags = split_of(mp3), row[columns].astype(np.float32)
            reason = None
            if split is None:
                reason = "mp3_path not in folders 0-f"
            elif not tags.any():
                reason = "none of the top-50 tags"
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            job = common.file_job(where.real, name=mp3)
            clips.append(base.Clip(split, clip_id, job, tags, path=mp3))
        return base.Collection(clips=clips, tag_names=tag_names, dropped=dropped, refused=refused)

    def _tag_names(self, ann: Annotations, path: str) -> list[str]:
        order = self.builder_config.tag_order
        if order == "by_count":
            return top_tags_by_count(ann.tag_names, ann.labels, len(MTAT_TOP50))
        if order != "released":
            raise common.DataError(f"magnatagatune: unknown tag_order {order!r}")
        missing = [t for t in MTAT_TOP50 if t not in ann.tag_names]
        if missing:
            raise common.DataError(f"{path}: lacks tag columns of the released order: {missing}")
        return list(MTAT_TOP50)
