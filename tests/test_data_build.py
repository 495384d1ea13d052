"""data_prep: the synthetic demo set's builder and audio, the resumable mel cache and the build
command (tests/test_data_prep.py holds the MTAT, MSD and audio-folder builders)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import build, common, synth, synthetic_tags
from jaxtag import audio
from tests.data_fixtures import reference_log_mel, write_audio, write_corrupt
from tests.test_data_prep import F16_ATOL, make_folder, prepare, read_split

# ----------------------------------------------------------------------------------------------
# synthetic_tags


def test_synth_is_deterministic_by_seed():
    a, b, c = (synth.make_specs(6, 3.0, seed) for seed in (1, 1, 2))
    assert a == b and a != c
    for sa, sb in zip(a, b, strict=True):
        np.testing.assert_array_equal(synth.render(sa), synth.render(sb))
    assert not np.allclose(synth.render(a[0])[:1000], synth.render(c[0])[:1000])
    y = synth.render(a[0])
    assert y.dtype == np.float32 and y.shape == (48000,) and np.abs(y).max() <= 1.0


def test_synthetic_builds_identical_for_a_seed_and_different_across_seeds(tmp_path):
    def build_seed(seed: int, workers: int, name: str):
        config = synthetic_tags.SyntheticTagsConfig(name=name, num_clips=10, seconds=3.0, seed=seed)
        builder = synthetic_tags.SyntheticTags(
            data_dir=str(tmp_path / name), config=config, num_workers=workers
        )
        prepare(builder)
        return {k: v for s in builder.info.splits.keys() for k, v in read_split(builder, s).items()}

    first, again, other = build_seed(3, 2, "a"), build_seed(3, 1, "b"), build_seed(4, 1, "c")
    assert sorted(first) == sorted(again) == [f"seed3-{i:05d}" for i in range(10)]
    for clip_id, ex in first.items():
        for key in ("mel", "tags", "evidence"):
            np.testing.assert_array_equal(ex[key], again[clip_id][key])
    assert not any(
        np.array_equal(ex["mel"], other[cid.replace("seed3", "seed4")]["mel"])
        for cid, ex in first.items()
    )
    spec = synth.make_specs(10, 3.0, 3)[8]
    stored = first["seed3-00008"]
    np.testing.assert_allclose(
        stored["mel"].astype(np.float32), reference_log_mel(synth.render(spec)), atol=F16_ATOL
    )
    np.testing.assert_array_equal(stored["tags"], spec.tags())


def test_synthetic_evidence_spans_are_sane_and_audible():
    seconds = 8.0
    checked = 0
    for spec in synth.make_specs(60, seconds, seed=0):
        ev, tags = spec.evidence(), spec.tags()
        assert ev.shape == (len(synth.TAG_NAMES), 2)
        np.testing.assert_array_equal(ev[tags == 0], -1.0)
        for j, name in enumerate(synth.TAG_NAMES):
            if not tags[j]:
                continue
            start, end = ev[j]
            if name in synth.INSTRUMENTS:
                assert 0 <= start and end <= seconds and 2.0 <= end - start <= 4.0 + 1e-3
            else:
                assert (start, end) == (0.0, seconds)
        if spec.tempo is None:  # without the tick, sound outside the spans is the noise floor
            y = synth.render(spec).astype(np.float64)
            inside = np.zeros(y.size, bool)
            for _, start, end in spec.spans:
                inside[int(start * 16000) : int(end * 16000)] = True
            if (~inside).sum() > 16000:
                ratio = np.mean(y[inside] ** 2) / np.mean(y[~inside] ** 2)
                assert ratio > 100, (spec, ratio)
                checked += 1
    assert checked >= 3


def test_synthetic_tags_are_learnable_from_a_crop():
    """A linear model on per-band statistics of one 256-frame crop separates every tag: the
    timbres, tempi and loudness are clearly distinct in the mel domain."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    specs = synth.make_specs(150, 5.0, seed=11)
    mels = [synth.clip_mel(s) for s in specs]
    labels = np.stack([s.tags() for s in specs])

    def features(mel):
        crop = audio.crop(mel, (mel.shape[1] - 256) // 2)
        return np.concatenate([crop.mean(1), crop.std(1), np.abs(np.diff(crop, axis=1)).mean(1)])

    x = np.stack([features(m) for m in mels])
    x = (x - x[:110].mean(0)) / (x[:110].std(0) + 1e-6)
    aucs = []
    for j in range(labels.shape[1]):
        model = LogisticRegression(C=0.1, max_iter=2000).fit(x[:110], labels[:110, j])
        aucs.append(roc_auc_score(labels[110:, j], model.predict_proba(x[110:])[:, 1]))
    assert np.mean(aucs) >= 0.9 and min(aucs) >= 0.75, dict(zip(synth.TAG_NAMES, aucs, strict=True))


# ----------------------------------------------------------------------------------------------
# mel cache and the build command

CALLS: list[str] = []


def counting_log_mel(path: str) -> np.ndarray:
    CALLS.append(os.path.basename(path))
    return audio.load_log_mel(path)


def test_compute_mels_resumes_without_redoing_finished_work(tmp_path):
    files = [write_audio(str(tmp_path / f"{i}.wav"), 1.0, seed=i) for i in range(3)]
    files.append(write_corrupt(str(tmp_path / "bad.mp3")))
    jobs = [
        common.MelJob(os.path.basename(f), common.file_job(f).key, counting_log_mel, f)
        for f in files
    ]
    cache = str(tmp_path / "cache")
    CALLS.clear()
    common.compute_mels(jobs[:2], cache, num_workers=1)  # a run interrupted after two files
    assert CALLS == ["0.wav", "1.wav"]
    results = common.compute_mels(jobs, cache, num_workers=1)
    assert CALLS == ["0.wav", "1.wav", "2.wav", "bad.mp3"]
    assert common.compute_mels(jobs, cache, num_workers=1) == results
    assert len(CALLS) == 4  # the third run decoded nothing, the broken file included
    bad = results[jobs[3].key]
    assert not bad.ok and "bad.mp3: cannot decode" in bad.error
    for job, f in zip(jobs[:3], files, strict=False):
        r = results[job.key]
        mel = np.load(r.path)
        assert r.ok and mel.dtype == np.float16 and r.frames == mel.shape[1] == 63
        np.testing.assert_allclose(mel.astype(np.float32), audio.load_log_mel(f), atol=F16_ATOL)
    leftovers = [n for _, _, names in os.walk(cache) for n in names if ".tmp" in n]
    assert leftovers == []


def test_interrupted_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    calls = []
    real_clip_mel = synth.clip_mel

    def killed_after_four(spec):
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the build was killed during the fifth clip
        calls.append(spec.index)
        return real_clip_mel(spec)

    config = synthetic_tags.SyntheticTagsConfig(name="r", num_clips=10, seconds=2.0, seed=0)

    def builder():
        return synthetic_tags.SyntheticTags(data_dir=str(tmp_path), config=config, num_workers=1)

    monkeypatch.setattr(synth, "clip_mel", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        prepare(builder())
    assert len(calls) == 4
    monkeypatch.setattr(
        synth, "clip_mel", lambda spec: calls.append(spec.index) or real_clip_mel(spec)
    )
    done = prepare(builder())
    assert sorted(calls) == list(range(10))  # the first four were not computed again
    assert sum(done.info.splits[s].num_examples for s in done.info.splits.keys()) == 10


def test_file_job_key_follows_the_file(tmp_path):
    path = write_audio(str(tmp_path / "x.wav"), 1.0, seed=0)
    key = common.file_job(path).key
    assert common.file_job(path).key == key
    os.utime(path, ns=(1, 1))
    assert common.file_job(path).key != key


def test_build_command_help_and_summary(tmp_path, capsys):
    out = subprocess.run(
        [sys.executable, "-m", "data_prep.build", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    ).stdout
    assert "--manual_dir" in out and "magnatagatune" in out and "tags.csv" in out
    manual = make_folder(tmp_path / "music")
    argv = ["audio_folder", "--data_dir", str(tmp_path / "d"), "--manual_dir", manual]
    leftover = tmp_path / "d" / "audio_folder" / "top50" / "incomplete.AB12CD_1.0.0"
    leftover.mkdir(parents=True)  # what a killed TFDS write leaves behind
    assert build.main([*argv, "--num_workers", "1"]) == 0
    assert not leftover.exists()
    out = capsys.readouterr().out
    assert "leftovers of an interrupted build" in out
    assert "clips written: 6" in out and "skipped (unusable audio): 2" in out  # top50: all tags
    assert "broken.mp3" in out and "wall time" in out and "dropped by design: 0" not in out
    assert not os.path.exists(tmp_path / "d" / "downloads" / "mel_cache" / "audio_folder")
    assert build.main(argv) == 0
    assert "already built" in capsys.readouterr().out
    assert build.main(["audio_folder", "--data_dir", "x", "--config", "nope"]) == 2
