"""jaxtag.input_pipeline on small built synthetic datasets."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_prep import synthetic_tags
from jaxtag import audio
from jaxtag import input_pipeline as ip


def build_synthetic(data_dir: str, name: str, num_clips: int, seconds: float):
    config = synthetic_tags.SyntheticTagsConfig(
        name=name, num_clips=num_clips, seconds=seconds, seed=0
    )
    builder = synthetic_tags.SyntheticTags(data_dir=data_dir, config=config, num_workers=1)
    builder.download_and_prepare()
    return builder


def stored(builder, split: str) -> dict[bytes, dict]:
    return {ex["clip_id"]: ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """30 clips of 5 s (313 frames): 24 train, 3 validation, 3 test."""
    return build_synthetic(str(tmp_path_factory.mktemp("synth")), "t5", 30, 5.0)


@pytest.fixture(scope="module")
def short_ds(tmp_path_factory):
    """10 clips of 2 s (126 frames), shorter than one 256-frame chunk."""
    return build_synthetic(str(tmp_path_factory.mktemp("short")), "t2", 10, 2.0)


def locate(crop: np.ndarray, clips: dict[bytes, dict]) -> tuple[bytes, int]:
    """The (clip, start) whose padded mel holds ``crop`` exactly; fails if none or ambiguous."""
    hits = []
    for clip_id, ex in clips.items():
        mel = audio.pad_to(ex["mel"].astype(np.float32), crop.shape[1])
        for start in np.flatnonzero(
            (mel[:, : mel.shape[1] - crop.shape[1] + 1] == crop[:, :1]).all(0)
        ):
            if np.array_equal(mel[:, start : start + crop.shape[1]], crop):
                hits.append((clip_id, int(start)))
    assert len(hits) == 1, hits
    return hits[0]


def test_tensorflow_sees_no_gpu():
    assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.parametrize("n", [1, 100, 255, 256, 257, 313, 1820])
def test_tf_chunking_equals_numpy(n):
    mel = np.random.default_rng(n).uniform(-90, 40, (96, n)).astype(np.float16)
    np.testing.assert_array_equal(ip.tf_pad_to(tf.constant(mel)).numpy(), audio.pad_to(mel))
    np.testing.assert_array_equal(
        ip.tf_eval_chunks(tf.constant(mel)).numpy(), audio.eval_chunks(mel)
    )
    high = max(n, 256) - 256
    for start in {0, high // 2, high}:
        np.testing.assert_array_equal(
            ip.tf_crop(tf.constant(mel), tf.constant(start)).numpy(), audio.crop(mel, start)
        )
    starts = {
        int(ip.tf_random_crop_start(tf.constant(n), tf.constant([7, i], tf.int64), 256))
        for i in range(200)
    }
    assert min(starts) >= 0 and max(starts) <= high
    if high <= 60:  # small ranges: every start, both ends included, is drawn
        assert starts == set(range(high + 1))


def test_train_batches_have_the_promised_shapes_and_crops_are_slices(ds):
    it = ip.train_iterator(ds, "train", global_batch_size=8, seed=0, num_local_devices=2)
    clips = stored(ds, "train")
    seen = set()
    for _ in range(3):
        batch = next(it)
        assert batch["mel"].shape == (2, 4, 96, 256) and batch["mel"].dtype == np.float32
        assert batch["tags"].shape == (2, 4, 10) and batch["tags"].dtype == np.float32
        for crop, tags in zip(
            batch["mel"].reshape(-1, 96, 256), batch["tags"].reshape(-1, 10), strict=True
        ):
            clip_id, start = locate(crop, clips)
            assert 0 <= start <= 313 - 256
            np.testing.assert_array_equal(tags, clips[clip_id]["tags"])
            seen.add(clip_id)
    assert len(seen) >= 12  # shuffled over the 24 clips, not a fixed few


def test_short_clips_are_padded_with_their_minimum(short_ds):
    clips = stored(short_ds, "train")
    batch = next(
        ip.train_iterator(short_ds, "train", global_batch_size=4, seed=1, num_local_devices=1)
    )
    for crop in batch["mel"][0]:
        clip_id, start = locate(crop, clips)
        mel = clips[clip_id]["mel"].astype(np.float32)
        assert start == 0 and mel.shape[1] == 126
        np.testing.assert_array_equal(crop[:, 126:], mel.min())


def test_train_is_deterministic_for_a_seed(ds):
    def first(seed, n=4, **kw):
        it = ip.train_iterator(
            ds, "train", global_batch_size=6, seed=seed, num_local_devices=3, **kw
        )
        return [next(it) for _ in range(n)]

    a, b, c = first(5), first(5), first(6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["mel"], y["mel"])
        np.testing.assert_array_equal(x["tags"], y["tags"])
    assert not all(np.array_equal(x["mel"], z["mel"]) for x, z in zip(a, c, strict=True))
    # Without the in-memory cache the first pass is the same stream.
    for x, y in zip(a, first(5, cache=False), strict=True):
        np.testing.assert_array_equal(x["mel"], y["mel"])


def test_reading_only_mel_and_tags_keeps_the_stream(ds, monkeypatch):
    """Training parses only mel and tags (jaxtag/input_pipeline.py): the same crops, batch for
    batch, as the stream that decoded every feature, so resumed runs see the same batches."""

    def batches(n=6):
        it = ip.train_iterator(ds, "train", global_batch_size=8, seed=3, num_local_devices=2)
        return [next(it) for _ in range(n)]

    partial = batches()
    read = ip._read
    monkeypatch.setattr(ip, "_read", lambda *a, features=(), **kw: read(*a, **kw))
    for x, y in zip(partial, batches(), strict=True):
        np.testing.assert_array_equal(x["mel"], y["mel"])
        np.testing.assert_array_equal(x["tags"], y["tags"])
    assert np.std(partial[0]["mel"]) > 1  # real spectrogram crops, not zeros


def test_train_repeats_with_fresh_crops(ds):
    it = ip.train_iterator(ds, "train", global_batch_size=24, seed=0, num_local_devices=1)
    clips = stored(ds, "train")
    found = [locate(c, clips) for _ in range(8) for c in next(it)["mel"][0]]  # ~8 passes
    counts = {cid: sum(f[0] == cid for f in found) for cid in clips}
    assert min(counts.values()) >= 4 and max(counts.values()) <= 12  # the shuffle spans passes
    distinct_starts = [len({s for c, s in found if c == cid}) for cid in clips]
    assert np.median(distinct_starts) >= 4  # a new random crop of a clip on every pass


def test_batch_size_must_divide_over_devices(ds):
    with pytest.raises(ValueError, match="2 processes x 3 local devices"):
        next(
            ip.train_iterator(
                ds, "train", global_batch_size=8, seed=0, num_local_devices=3, process_count=2
            )
        )


def test_processes_read_disjoint_shares(ds):
    shares = [ip.process_split(ds, "train", i, 3) for i in range(3)]
    assert [s for s, _ in shares] == ["train[0:8]", "train[8:16]", "train[16:24]"]
    ids = [set(stored(ds, s)) for s, _ in shares]
    assert set.union(*ids) == set(stored(ds, "train")) and sum(map(len, ids)) == 24
    it = ip.train_iterator(
        ds, "train", global_batch_size=8, seed=0, num_local_devices=1, process_index=1,
        process_count=2,
    )  # fmt: skip
    share = stored(ds, ip.process_split(ds, "train", 1, 2)[0])
    for _ in range(3):
        for crop in next(it)["mel"][0]:
            locate(crop, share)  # every crop comes from this process's half


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_every_clip_exactly_once(ds, process_count):
    clips = stored(ds, "train")
    steps = ip.eval_num_batches(
        ds, "train", batch_size=4 * process_count, num_local_devices=2,
        process_count=process_count,
    )  # fmt: skip
    seen = []
    for index in range(process_count):
        batches = list(
            ip.eval_iterator(
                ds,
                "train",
                batch_size=4 * process_count,
                num_local_devices=2,
                process_index=index,
                process_count=process_count,
            )  # fmt: skip
        )
        assert len(batches) == steps  # the same on every process
        for b in batches:
            assert b["mel"].shape == (2, 2, 16, 96, 256) and b["mel"].dtype == np.float32
            assert b["tags"].shape == (2, 2, 10) and b["mask"].dtype == bool
            for mel, tags, mask, clip_id in zip(
                b["mel"].reshape(-1, 16, 96, 256), b["tags"].reshape(-1, 10),
                b["mask"].reshape(-1), b["clip_id"].reshape(-1), strict=True,
            ):  # fmt: skip
                if not mask:
                    assert clip_id == b"" and not mel.any() and not tags.any()
                    continue
                seen.append(clip_id)
                ex = clips[clip_id]
                np.testing.assert_array_equal(mel, audio.eval_chunks(ex["mel"].astype(np.float32)))
                np.testing.assert_array_equal(tags, ex["tags"])
    assert sorted(seen) == sorted(clips)  # each of the 24 exactly once
    assert steps == {1: 6, 2: 3, 3: 2}[process_count]


def test_eval_pads_the_last_batch(ds):
    batches = list(ip.eval_iterator(ds, "validation", batch_size=2, num_local_devices=1))
    assert [b["mask"].sum() for b in batches] == [2, 1]
    assert batches[-1]["mask"].tolist() == [[True, False]]


def test_builder_lookup(ds, tmp_path):
    again = ip.get_builder("synthetic_tags/t5", ds.data_dir.split("/synthetic_tags/")[0])
    assert ip.tag_names(again) == ["plucked", "bowed", "piano", "flute", "drums", "synth",
                                   "fast", "slow", "loud", "quiet"]  # fmt: skip
    assert [ip.num_examples(again, s) for s in ("train", "validation", "test")] == [24, 3, 3]
    from_files = ip.get_builder(str(ds.data_dir), None)
    assert ip.tag_names(from_files) == ip.tag_names(again)
    assert ip.num_examples(from_files, "train") == 24
    with pytest.raises(FileNotFoundError, match="python -m jaxtag.data_prep.build magnatagatune"):
        ip.get_builder("magnatagatune", str(tmp_path))
    with pytest.raises(KeyError, match="no split 'valid'; it has test, train, validation"):
        ip.num_examples(again, "valid")


def test_dataset_dir_picks_the_config_and_newest_version(tmp_path):
    def built(*parts: str) -> None:
        tmp_path.joinpath(*parts).mkdir(parents=True, exist_ok=True)
        (tmp_path.joinpath(*parts) / "dataset_info.json").write_text("{}")

    built("msd", "1.0.0")
    built("msd", "1.2.0")
    built("msd", "1.10.0")
    (tmp_path / "msd" / "incomplete.AB12_2.0.0").mkdir()  # a killed build: not a version
    built("audio_folder", "top50", "1.0.0")
    (tmp_path / "audio_folder" / "all" / "1.0.0").mkdir(parents=True)  # no dataset_info.json
    d = str(tmp_path)
    assert ip.dataset_dir("msd", d) == f"{d}/msd/1.10.0"
    assert ip.dataset_dir("msd:1.2.0", d) == f"{d}/msd/1.2.0"
    assert ip.dataset_dir("audio_folder", d) == f"{d}/audio_folder/top50/1.0.0"
    assert ip.built_datasets(d) == ["audio_folder/top50", "msd"]
    with pytest.raises(FileNotFoundError, match="audio_folder/all is not built .*--config all"):
        ip.dataset_dir("audio_folder/all", d)
    built("audio_folder", "all", "1.0.0")
    with pytest.raises(
        FileNotFoundError, match="several configs .*audio_folder/all, audio_folder/top50"
    ):
        ip.dataset_dir("audio_folder", d)
    with pytest.raises(FileNotFoundError, match="msd:3.0.0 is not built"):
        ip.dataset_dir("msd:3.0.0", d)
