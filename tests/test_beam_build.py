"""Beam builds (`jaxtag-build NAME --beam_pipeline_options`, data_prep/base.py) write the
pool's dataset: the same splits, examples, metadata and serialized records, every mel's bytes.

Built both ways: the synthetic set (generated clips) and an audio_folder tree of decoded files
(tests/test_data_prep.make_folder: a broken and a missing file, so the skip report too). The
runner is Beam's FnApiRunner with two SDK worker processes (direct_running_mode=multi_processing:
local subprocesses on gRPC over localhost, so offline; the DirectRunner would try the Prism
runner first, whose binary is downloaded on first use).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_prep import build, common, synthetic_tags
from jaxtag import input_pipeline
from tests.test_data_prep import make_folder

BEAM = "runner=FnApiRunner,direct_num_workers=2,direct_running_mode=multi_processing"
needs_beam = pytest.mark.skipif(
    importlib.util.find_spec("apache_beam") is None, reason="apache-beam: the beam extra"
)


@contextlib.contextmanager
def beam_workers() -> Iterator[list[str]]:
    """Records the ids of the SDK worker processes the runner starts, and fails a mel computed
    in this process (the workers import their own ``common``)."""
    from apache_beam.runners.portability import local_job_service

    started: list[str] = []
    run = local_job_service.SubprocessSdkWorker.run

    def recording_run(worker):
        started.append(worker._worker_id)
        return run(worker)

    def not_here(job):
        raise AssertionError(f"{job.name}: a mel computed in the launching process")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_job_service.SubprocessSdkWorker, "run", recording_run)
        patch.setattr(common, "compute_mel", not_here)
        yield started


def read_built(version_dir: str) -> tuple[dict, dict, dict[str, list[bytes]]]:
    """Examples by split and clip id, the metadata, and each split's records (their protos)."""
    builder = input_pipeline.get_builder(version_dir, None)
    examples, records = {}, {}
    for split in builder.info.splits.keys():
        dataset = tfds.as_numpy(builder.as_dataset(split=split))
        examples[split] = {ex["clip_id"].decode(): ex for ex in dataset}
        assert len(examples[split]) == builder.info.splits[split].num_examples
        files = builder.info.splits[split].filepaths
        protos = (tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files))
        # Canonical bytes: a writer may serialize the feature map in any order.
        records[split] = sorted(p.SerializeToString(deterministic=True) for p in protos)
    return examples, dict(builder.info.metadata), records


def assert_same_dataset(pool_dir: str, beam_dir: str) -> int:
    """The two builds hold the same dataset; returns the number of examples."""
    pool, beam = read_built(pool_dir), read_built(beam_dir)
    (pool_examples, pool_metadata, pool_records) = pool
    (beam_examples, beam_metadata, beam_records) = beam
    assert sorted(beam_examples) == sorted(pool_examples)
    for split, expected in pool_examples.items():
        assert sorted(beam_examples[split]) == sorted(expected), split
        for clip_id, ex in expected.items():
            got = beam_examples[split][clip_id]
            assert sorted(got) == sorted(ex)
            for key, value in ex.items():
                value, other = np.asarray(value), np.asarray(got[key])
                assert (other.dtype, other.shape) == (value.dtype, value.shape), (clip_id, key)
                assert other.tobytes() == value.tobytes(), (clip_id, key)
    assert beam_metadata == pool_metadata
    assert beam_records == pool_records  # the stored tf.train.Examples, byte for byte
    return sum(len(v) for v in pool_examples.values())


def report(out: str) -> list[str]:
    """The closing summary's lines from "clips written" on, but the wall time."""
    lines = out[out.index("clips written") :].splitlines()
    return [line for line in lines if not line.startswith("wall time")]


@needs_beam
@pytest.mark.slow  # a Beam pipeline with two worker processes
def test_synthetic_set_built_by_beam_equals_the_pool_build(tmp_path):
    config = synthetic_tags.SyntheticTagsConfig(name="tiny", num_clips=10, seconds=2.0, seed=3)

    def prepare(data_dir: str, **download_config) -> str:
        builder = synthetic_tags.SyntheticTags(data_dir=data_dir, config=config, num_workers=1)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(**download_config)
        )
        return builder.data_dir

    pool_dir = prepare(str(tmp_path / "pool"))
    with beam_workers() as started:
        beam_dir = prepare(str(tmp_path / "beam"), beam_options=build.beam_options(BEAM))
    assert len(set(started)) == 2
    assert assert_same_dataset(pool_dir, beam_dir) == 10
    assert sorted(os.listdir(beam_dir)) == sorted(os.listdir(pool_dir))  # no outcome files left


@needs_beam
@pytest.mark.slow  # a Beam pipeline with two worker processes
def test_build_command_with_beam_equals_the_pool_build(tmp_path, capsys):
    """A manual-dir builder through `jaxtag-build --beam_pipeline_options`: decoded audio files,
    one broken and one missing (the same skip report)."""
    manual = make_folder(tmp_path / "music")
    argv = ["audio_folder", "--manual_dir", manual, "--data_dir"]
    assert build.main([*argv, str(tmp_path / "pool"), "--num_workers", "1"]) == 0
    pool_summary = capsys.readouterr().out
    with beam_workers() as started:
        assert build.main([*argv, str(tmp_path / "beam"), "--beam_pipeline_options", BEAM]) == 0
    assert len(set(started)) == 2
    summary = capsys.readouterr().out
    version_dir = os.path.join("audio_folder", "top50", "1.0.0")
    pool_dir, beam_dir = (str(tmp_path / d / version_dir) for d in ("pool", "beam"))
    assert assert_same_dataset(pool_dir, beam_dir) == 6
    assert report(summary) == report(pool_summary)
    assert "clips written: 6" in summary and "broken.mp3" in summary and "seven.wav" in summary
    assert not os.path.exists(
        tmp_path / "beam" / "downloads" / "mel_cache"
    )  # a Beam build has none


@needs_beam
def test_a_split_without_usable_clips_stops_a_beam_build_in_one_line(tmp_path, monkeypatch, capsys):
    """TFDS's Beam writer refuses an empty split (the pool leaves it out); the runner's error
    carries the writer's message (as FnApiRunner's does when a split's only clip is broken)."""

    def empty_test_split(builder, dl_manager, download_config):
        raise RuntimeError(
            "The total number of generated examples is 0 for split test. This should be >0! "
            "[while running 'test_write/CheckValidNumExamples']"
        )

    monkeypatch.setattr(tfds.core.GeneratorBasedBuilder, "_download_and_prepare", empty_test_split)
    argv = ["synthetic_tags", "--data_dir", str(tmp_path), "--beam_pipeline_options", BEAM]
    assert build.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: synthetic_tags: no usable clip in split test; a Beam build")
    with pytest.raises(RuntimeError, match="generated examples is 0"):  # not a Beam build
        build.main(argv[:3])


def test_beam_options_without_apache_beam_name_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "apache_beam"] + ["apache_beam"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (imported or not)
    with pytest.raises(
        SystemExit, match=r"apache-beam not installed.*pip install 'jaxtag\[beam\]'"
    ):
        build.main(["synthetic_tags", "--data_dir", str(tmp_path), "--beam_pipeline_options", BEAM])
    assert build.beam_options(None) is None
