"""The TFDS builder base class every jaxtag dataset derives from.

A subclass says *which* clips exist (:meth:`MelDatasetBuilder._collect`: split, mel job, tag
vector, extra features) and declares its ``_info``; this class does the rest the same way for
every dataset: parallel resumable mel computation (``common.compute_mels``), skip reporting, the
``tag_names`` metadata, and writing the examples. Given Beam options (``jaxtag-build
--beam_pipeline_options``), the same per-clip work (``common.compute_mel``) and examples
(:func:`example`) run as a Beam pipeline instead, with the same report: TFDS's Beam datasets'
mechanism (see :meth:`MelDatasetBuilder._beam_split_generators`).

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
import functools
import inspect
import json
import os
import re
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
        self.cache_dir: str | None = None  # the pool's mel cache (a Beam build has none)
        self._beam = False
        self._collection: Collection | None = None

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

    def _download_and_prepare(
        self,
        dl_manager: tfds.download.DownloadManager,
        download_config: tfds.download.DownloadConfig,
    ) -> None:
        # TFDS gives the Beam options to its writer only; the examples choose their path here.
        beam = download_config.beam_options, download_config.beam_runner
        self._beam = any(b is not None for b in beam)
        try:
            super()._download_and_prepare(dl_manager, download_config)
        except Exception as e:  # a runner's error carries the message of TFDS's Beam writer
            empty = self._beam and re.search(r"generated examples is 0 for split (\w+)", str(e))
            if not empty:
                raise
            raise common.DataError(
                f"{self.name}: no usable clip in split {empty[1]}; a Beam build cannot leave an "
                "empty split out (TFDS's Beam writer), a build without --beam_pipeline_options "
                "does and lists the unusable clips"
            ) from None

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        collection = self._collect(dl_manager)
        if self._beam:
            self._collection = collection
            return self._beam_split_generators(collection.clips)
        # Under the data dir, per dataset (configs share it: same audio, same mels).
        self.cache_dir = os.path.join(os.fspath(dl_manager.download_dir), "mel_cache", self.name)
        results = common.compute_mels(
            [c.job for c in collection.clips],
            self.cache_dir,
            num_workers=self.num_workers,
            desc=f"{self.name} log-mel",
        )
        outcomes = {key: (r.error, r.frames) for key, r in results.items()}
        ready = self._report_outcomes(collection, outcomes)
        # TFDS cannot write an empty split: splits without clips are left out (and reported).
        return {
            split: self._generate_examples([(clip, results[clip.job.key]) for clip in clips])
            for split, clips in ready.items()
            if clips
        }

    def _beam_split_generators(self, clips: list[Clip]) -> dict[str, Any]:
        """A ``beam.PTransform`` per split that has clips: TFDS's way to a Beam dataset
        (https://www.tensorflow.org/datasets/beam_datasets), its writer ends the pipeline."""
        beam = tfds.core.lazy_imports.apache_beam  # the beam extra, only for Beam builds
        by_split = {s: [c for c in clips if c.split == s] for s in SPLITS}
        return {
            split: beam.ptransform_fn(_beam_examples)(clips, self._outcomes_path(split))
            for split, clips in by_split.items()
            if clips
        }

    def _outcomes_path(self, split: str) -> str:
        """Where a Beam build's workers leave a split's outcomes (in the build's temporary
        folder, so a failed build leaves none and :meth:`_process_pipeline_result` removes it)."""
        return os.fspath(epath.Path(self.data_dir) / f"{self.name}-{split}.outcomes.json")

    def _process_pipeline_result(self, pipeline_result: Any) -> None:
        # TFDS's hook after a Beam pipeline: the report from the clips' outcomes.
        outcomes = {}
        for split in SPLITS:
            path = epath.Path(self._outcomes_path(split))
            if path.exists():
                outcomes.update(
                    {key: (err, frames) for key, err, frames in json.loads(path.read_text())}
                )
                path.unlink()
        collection, self._collection = self._collection, None
        self._report_outcomes(collection, outcomes)

    def _report_outcomes(
        self, collection: Collection, outcomes: Mapping[str, tuple[str | None, int]]
    ) -> dict[str, list[Clip]]:
        """The build's report and ``info.metadata`` from every clip's outcome (``job.key`` ->
        error or None, frames), the same for the pool and Beam; returns the clips written, by
        split. Raises ``common.DataError`` when no clip is usable."""
        report = common.BuildReport()
        report.skipped.update(collection.skipped)
        report.dropped.update(collection.dropped)
        report.refused.update(collection.refused)
        ready: dict[str, list[Clip]] = {s: [] for s in SPLITS}
        for clip in collection.clips:
            error, frames = outcomes[clip.job.key]
            error = unusable(error, frames)
            if error:
                report.skipped[clip.job.name] = error
                continue
            ready[clip.split].append(clip)
            report.audio_seconds += common.frames_to_seconds(frames)
            report.shorter_than_chunk += frames < audio.CHUNK_FRAMES
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
        return ready

    def _generate_examples(
        self, items: list[tuple[Clip, common.MelResult]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for clip, result in items:
            yield clip.clip_id, example(clip, np.load(result.path))


def unusable(error: str | None, frames: int) -> str | None:
    """Why a clip is not written (its audio's error, or too short), or None: pool and Beam."""
    return error if error is not None else common.too_short(frames)


def example(clip: Clip, mel: np.ndarray) -> dict[str, Any]:
    """The example of ``clip`` with its log-mel (``MEL_DTYPE``): the pool's and Beam's."""
    return {
        "clip_id": clip.clip_id,
        "mel": mel,
        "tags": np.asarray(clip.tags, dtype=np.float32),
        "path": clip.path,
        **clip.extra,
    }


# ----------------------------------------------------------------------------------------------
# A Beam build's steps: module functions, so that the workers get them by reference (pickled as
# ``jaxtag.data_prep.base.NAME``, or ``data_prep.base.NAME`` from a clone), never the builder.


def _beam_examples(root: Any, clips: list[Clip], outcomes_path: str) -> Any:
    """One split's ``(clip_id, example)`` pairs, computed on the workers; the clips' outcomes
    (frames, or why a clip is unusable) written to ``outcomes_path`` for the report."""
    beam = tfds.core.lazy_imports.apache_beam
    computed = root | "Clips" >> beam.Create(clips) | "LogMel" >> beam.Map(_computed)
    _ = (
        computed
        | "Outcome" >> beam.Map(_outcome)
        | "Outcomes" >> beam.combiners.ToList()
        | "WriteOutcomes" >> beam.Map(_write_json, path=outcomes_path)
    )
    return computed | "Examples" >> beam.FlatMap(_examples)


Computed = tuple[Clip, np.ndarray | None, str | None]
"""A clip, its log-mel (or None) and why its audio is unusable (or None)."""


def _computed(clip: Clip) -> Computed:
    """``common.compute_mel`` of the clip, on one BLAS thread as in the pool's workers: the
    runner's processes are the parallelism, and the same kernels give the same bytes."""
    _one_blas_thread()
    mel, error = common.compute_mel(clip.job)
    return clip, mel, error


@functools.cache
def _one_blas_thread() -> Any:
    """Limits this worker process to one BLAS thread, for good (kept: not restored)."""
    from threadpoolctl import threadpool_limits  # ships with scikit-learn (the train extra)

    return threadpool_limits(1)


def _outcome(computed: Computed) -> tuple[str, str | None, int]:
    """``(job.key, error, frames)``: what the build's report needs of a clip."""
    clip, mel, error = computed
    return clip.job.key, error, 0 if mel is None else int(mel.shape[-1])


def _examples(computed: Computed) -> Iterator[tuple[str, dict[str, Any]]]:
    """The clip's example, keyed as the pool's, unless the clip is unusable."""
    clip, mel, error = computed
    if unusable(error, 0 if mel is None else mel.shape[-1]) is None:
        yield clip.clip_id, example(clip, mel)


def _write_json(value: Any, path: str) -> None:
    epath.Path(path).write_text(json.dumps(value))
