"""The TFDS builder base class every jaxtag dataset derives from.

A subclass says *which* clips exist (:meth:`MelDatasetBuilder._collect`: split, mel job, tag
vector, extra features) and declares its ``_info``; this class does the rest the same way for
every dataset: parallel resumable mel computation (``common.compute_mels``), skip reporting, the
``tag_names`` metadata, and writing the examples.

Every dataset has these features (plus the subclass's extras):

- ``clip_id`` (str): the dataset's own id of the clip (MTAT clip id, MSD track id, file path...);
- ``mel`` (float16, ``(96, None)``): the log-mel of the whole clip, see ``jaxtag.audio``; float16
  because it halves disk and I/O at <= 0.03 dB rounding (``common.MEL_DTYPE`` explains);
- ``tags`` (float32 0/1, ``(num_tags,)``): multi-hot tag vector in ``tag_names`` order;
- ``path`` (str): the source audio relative to the manual dir, normalised ('' for generated
  audio). Listed paths are confined to the manual dir (``common.confine``).

``info.metadata`` holds ``tag_names`` (the order of ``tags``), so a reader needs nothing but the
built files (``jaxtag.input_pipeline.tag_names``), and the build's report: ``num_skipped`` and
``skipped`` (clip -> reason for unusable audio: missing, empty, undecodable, or under
``common.MIN_CLIP_SECONDS``), ``dropped`` (reason -> count of clips left out by the dataset's
definition), ``num_refused`` and ``refused`` (listed path -> reason, for paths that are absolute
or lead outside the manual dir: errors of the dataset's files, never read),
``shorter_than_chunk`` (clips kept that are shorter than one chunk) and ``audio_hours``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxtag import audio

from . import common

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Split names used by every builder (TFDS convention; MTAT's "valid" folder 'c' -> validation)."""

MAX_SKIPPED_IN_METADATA = 1000
"""Skipped clips named in ``info.metadata['skipped']`` (all are counted in ``num_skipped``), and
refused paths in ``['refused']``."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """One example to write, before its spectrogram exists."""

    split: str
    clip_id: str
    job: common.MelJob
    tags: np.ndarray
    path: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Collection:
    """What :meth:`MelDatasetBuilder._collect` returns."""

    clips: list[Clip]
    tag_names: list[str]
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


def mel_features(
    num_tags: int | None, **extra: tfds.features.FeatureConnector
) -> tfds.features.FeaturesDict:
    """The common feature dict; ``num_tags=None`` for datasets whose vocabulary is data-defined."""
    if num_tags is None:
        tags = tfds.features.Tensor(
            shape=(None,), dtype=np.float32, encoding=tfds.features.Encoding.BYTES
        )
    else:
        tags = tfds.features.Tensor(shape=(num_tags,), dtype=np.float32)
    return tfds.features.FeaturesDict(
        {
            "clip_id": tfds.features.Text(),
            # BYTES encoding stores the raw float16 buffer (one dynamic dim is allowed).
            "mel": tfds.features.Tensor(
                shape=(audio.N_MELS, None),
                dtype=common.MEL_DTYPE,
                encoding=tfds.features.Encoding.BYTES,
            ),
            "tags": tags,
            "path": tfds.features.Text(),
            **extra,
        }
    )


def require_files(manual_dir: os.PathLike | str, names: Sequence[str], dataset: str) -> None:
    """Raises ``ManualDirError`` listing every one of ``names`` missing from ``manual_dir``."""
    manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise common.ManualDirError(f"{dataset}: manual directory {manual_dir} does not exist")
    missing = [n for n in names if not os.path.exists(os.path.join(manual_dir, n))]
    if missing:
        raise common.ManualDirError(
            f"{dataset}: manual directory {manual_dir} lacks required file(s): {', '.join(missing)}"
        )


class MelDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base class: subclasses implement ``_info`` (via :func:`mel_features`) and ``_collect``."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This builder's source file.

        Overrides TFDS's lookup, which (tensorflow-datasets 4.9.10 on Python >= 3.9) imports the
        ``importlib_resources`` backport that its own requirements only install for Python < 3.9.
        The result is the same: TFDS's fallback is this very ``inspect.getfile``.
        """
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, num_workers: int | None = None, **kwargs: Any):
        """``num_workers``: processes for the mel computation (default: all cores)."""
        super().__init__(**kwargs)
        self.num_workers = num_workers
        self.report: common.BuildReport | None = None
        self.cache_dir: str | None = None

    # TFDS prints "Downloading and preparing dataset Unknown size ..." before and "... downloaded
    # and prepared" after a build; nothing is downloaded here and the build command prints its own
    # summary (build.py), so both stay silent.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _mel_info(
        self,
        *,
        description: str,
        num_tags: int | None,
        homepage: str | None = None,
        citation: str | None = None,
        **extra: tfds.features.FeatureConnector,
    ) -> tfds.core.DatasetInfo:
        """``DatasetInfo`` with the common features (+ ``extra``) and a metadata dict."""
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=mel_features(num_tags, **extra),
            homepage=homepage,
            citation=citation,
            metadata=tfds.core.MetadataDict(),
        )

    def _collect(self, dl_manager: tfds.download.DownloadManager) -> Collection:
        """Lists the clips to write. Raise ``common.ManualDirError`` if inputs are missing."""
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        report = common.BuildReport()
        collection = self._collect(dl_manager)
        # Under the data dir, per dataset (configs share it: same audio, same mels).
        self.cache_dir = os.path.join(os.fspath(dl_manager.download_dir), "mel_cache", self.name)
        results = common.compute_mels(
            [c.job for c in collection.clips],
            self.cache_dir,
            num_workers=self.num_workers,
            desc=f"{self.name} log-mel",
        )
        report.skipped.update(collection.skipped)
        report.dropped.update(collection.dropped)
        report.refused.update(collection.refused)
        ready: dict[str, list[tuple[Clip, common.MelResult]]] = {s: [] for s in SPLITS}
        for clip in collection.clips:
            result = results[clip.job.key]
            error = result.error if not result.ok else common.too_short(result.frames)
            if error:
                report.skipped[clip.job.name] = error
                continue
            ready[clip.split].append((clip, result))
            report.audio_seconds += common.frames_to_seconds(result.frames)
            report.shorter_than_chunk += result.frames < audio.CHUNK_FRAMES
        report.written = {s: len(v) for s, v in ready.items()}
        self.report = report
        self.info.metadata.update(
            tag_names=list(collection.tag_names),
            num_skipped=len(report.skipped),
            skipped=dict(sorted(report.skipped.items())[:MAX_SKIPPED_IN_METADATA]),
            dropped=dict(report.dropped),
            num_refused=len(report.refused),
            refused=dict(sorted(report.refused.items())[:MAX_SKIPPED_IN_METADATA]),
            shorter_than_chunk=report.shorter_than_chunk,
            audio_hours=round(report.audio_seconds / 3600, 4),
        )
        if not any(ready.values()):
            raise common.DataError(f"{self.name}: no usable clips (report:\n{report.summary()})")
        # TFDS cannot write an empty split: splits without clips are left out (and reported).
        return {split: self._generate_examples(items) for split, items in ready.items() if items}

    def _generate_examples(
        self, items: list[tuple[Clip, common.MelResult]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for clip, result in items:
            example = {
                "clip_id": clip.clip_id,
                "mel": np.load(result.path),
                "tags": np.asarray(clip.tags, dtype=np.float32),
                "path": clip.path,
                **clip.extra,
            }
            yield clip.clip_id, example
