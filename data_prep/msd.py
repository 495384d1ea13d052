"""``msd``: Million Song Dataset, Last.fm top-50 tags, the standard split (manual download).

The 30 s 7digital previews can no longer be downloaded, so this builder works from audio you
hold. The manual dir holds the split and tag files of the original preprocessing (Python-2
pickles, read with ``encoding='latin1'`` and a restricted unpickler, see :func:`load_pickle`):

- ``filtered_list_train.cP``: MSD ids; the first ``TRAIN_SIZE`` (201,680) are training, the rest
  (11,774) validation;
- ``filtered_list_test.cP``: the 28,435 test ids;
- ``msd_id_to_tag_vector.cP``: MSD id -> 50-dim 0/1 vector in ``MSD_TOP50`` order;
- ``MSD_id_to_7D_id.pkl``: MSD id -> 7digital id; ``7D_id_to_path.pkl``: 7digital id -> relative
  path like ``8/9/8947470.clip.mp3``;

and the audio, found (first match wins) at ``<root>/<7digital path>`` or in the MSD-id layout
``<root>/<id[2]>/<id[3]>/<id[4]>/<id>.mp3``, where ``<root>`` is the manual dir or its ``audio``
sub-folder. Tracks without audio are reported as skipped (most collections are incomplete). A
track whose path (from the pickles) is absolute or leads outside the manual dir, links followed,
is refused, listed in the build's summary and never read (``common.confine``).
"""

from __future__ import annotations

import importlib
import os
import pickle
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxtag.tags import MSD_TOP50

from . import base, common

TRAIN_LIST = "filtered_list_train.cP"
TEST_LIST = "filtered_list_test.cP"
TAG_VECTORS = "msd_id_to_tag_vector.cP"
MSD_TO_7D = "MSD_id_to_7D_id.pkl"
SEVEN_D_TO_PATH = "7D_id_to_path.pkl"
REQUIRED_FILES = (TRAIN_LIST, TEST_LIST, TAG_VECTORS, MSD_TO_7D, SEVEN_D_TO_PATH)
TRAIN_SIZE = 201_680
"""Ids of ``filtered_list_train.cP`` before this index are training, the rest validation."""

# Globals a pickle of lists, dicts, strings and numpy arrays may reference: numpy's array and
# scalar reconstruction (old ``numpy.core`` names as written by Python 2 / numpy 1, and numpy 2's),
# ``_frombuffer`` (protocol 5 arrays) and ``_codecs.encode``, which Python 3 writes for the raw
# bytes of an array at protocol <= 2.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class UnsafePickleError(common.DataError, pickle.UnpicklingError):
    """A pickle references something other than lists, dicts, strings and numpy arrays."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global but ``_ALLOWED_GLOBALS`` (lists, dicts and strings need none)."""

    def __init__(self, file: Any, path: str):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.path}: refusing to unpickle {module}.{name}; only lists, dicts, strings "
                "and numpy arrays are allowed"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 name, no warning
        return getattr(importlib.import_module(module), name)


def load_pickle(path: str) -> Any:
    """Loads a (Python 2 era) pickle of lists/dicts/strings/numpy arrays, refusing anything else.

    ``encoding='latin1'`` decodes Python 2 ``str`` objects (and numpy's raw array bytes) the way
    they were written. Raises ``UnsafePickleError`` or ``common.DataError`` naming the file.
    """
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise common.DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e


def _expect(obj: Any, kind: type, path: str) -> Any:
    if not isinstance(obj, kind):
        raise common.DataError(f"{path}: expected a {kind.__name__}, found {type(obj).__name__}")
    return obj


def relative_candidates(msd_id: str, seven_d_path: str | None) -> list[str]:
    """Where a track's audio may be, relative to the manual dir, in the order they are tried."""
    rels = [seven_d_path] if seven_d_path else []
    if len(msd_id) >= 5:
        rels.append("/".join((msd_id[2], msd_id[3], msd_id[4], msd_id + ".mp3")))
    return [f"{prefix}{rel}" for rel in rels for prefix in ("", "audio/")]


def audio_candidates(root: str, msd_id: str, seven_d_path: str | None) -> list[str]:
    """Where a track's audio may be, in the order they are tried."""
    return [os.path.join(root, rel) for rel in relative_candidates(msd_id, seven_d_path)]


def find_audio(root: str, msd_id: str, seven_d_path: str | None) -> common.ConfinedPath | None:
    """The first candidate that is a file, or None; ``common.UnsafePathError`` when one of them
    is absolute or leads outside ``root`` (the track is then refused, whatever else exists)."""
    confined = [common.confine(root, rel) for rel in relative_candidates(msd_id, seven_d_path)]
    return next((c for c in confined if os.path.isfile(c.real)), None)


class Msd(base.MelDatasetBuilder):
    """Million Song Dataset 7digital previews with Last.fm top-50 tags."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: standard split, float16 log-mel."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put in the manual dir the split/tag pickles of the original preprocessing
    (filtered_list_train.cP, filtered_list_test.cP, msd_id_to_tag_vector.cP, MSD_id_to_7D_id.pkl,
    7D_id_to_path.pkl) and the 7digital mp3 previews, either at their 7digital paths
    (e.g. 8/9/8947470.clip.mp3) or as <id[2]>/<id[3]>/<id[4]>/<MSD id>.mp3, in the manual dir
    itself or in its audio/ sub-folder.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self._mel_info(
            description=__doc__,
            num_tags=len(MSD_TOP50),
            homepage="http://millionsongdataset.com/",
            citation=(
                "@inproceedings{bertin2011million, title={The Million Song Dataset}, "
                "author={Bertin-Mahieux, Thierry and Ellis, Daniel P.W. and Whitman, Brian and "
                "Lamere, Paul}, booktitle={ISMIR}, year={2011}}"
            ),
        )

    def _collect(self, dl_manager: tfds.download.DownloadManager) -> base.Collection:
        manual = os.fspath(dl_manager.manual_dir)
        base.require_files(manual, REQUIRED_FILES, "msd")
        p = {name: os.path.join(manual, name) for name in REQUIRED_FILES}
        train_ids = list(_expect(load_pickle(p[TRAIN_LIST]), list, p[TRAIN_LIST]))
        test_ids = list(_expect(load_pickle(p[TEST_LIST]), list, p[TEST_LIST]))
        vectors = _expect(load_pickle(p[TAG_VECTORS]), dict, p[TAG_VECTORS])
        to_7d = _expect(load_pickle(p[MSD_TO_7D]), dict, p[MSD_TO_7D])
        to_path = _expect(load_pickle(p[SEVEN_D_TO_PATH]), dict, p[SEVEN_D_TO_PATH])
        splits = [
            ("train", train_ids[:TRAIN_SIZE]),
            ("validation", train_ids[TRAIN_SIZE:]),
            ("test", test_ids),
        ]
        clips, skipped, dropped, refused = [], {}, {}, {}
        for split, ids in splits:
            for msd_id in ids:
                if msd_id not in vectors:
                    dropped["no tag vector"] = dropped.get("no tag vector", 0) + 1
                    continue
                tags = np.asarray(vectors[msd_id], dtype=np.float32).reshape(-1)
                if tags.size != len(MSD_TOP50):
                    raise common.DataError(
                        f"{p[TAG_VECTORS]}: {msd_id} has {tags.size} tags, expected 50"
                    )
                rel_7d = to_path.get(to_7d.get(msd_id))
                if rel_7d is not None and not isinstance(rel_7d, str):
                    raise common.DataError(
                        f"{p[SEVEN_D_TO_PATH]}: the path of {msd_id} is a "
                        f"{type(rel_7d).__name__}, not a string"
                    )
                try:
                    found = find_audio(manual, str(msd_id), rel_7d)
                except common.UnsafePathError as e:
                    refused[str(msd_id)] = str(e)
                    continue
                if found is None:
                    skipped[msd_id] = "no audio file (7digital path or MSD-id layout)"
                    continue
                job = common.file_job(found.real, name=f"{msd_id} ({found.name})")
                clips.append(base.Clip(split, msd_id, job, tags, path=found.name))
        return base.Collection(
            clips=clips,
            tag_names=list(MSD_TOP50),
            dropped=dropped,
            skipped=skipped,
            refused=refused,
        )
