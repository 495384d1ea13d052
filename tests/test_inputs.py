"""What `jaxtag tag`/`embed` and the API take in: every extension the decoder reads, `--files-from`
names as the file system has them, clips too short to tag reported as the builders report them,
batches no larger than the windows waiting, and very long files read without holding their mel."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

import jaxtag
from jaxtag import audio, scoring, streaming
from tests.tag_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> jaxtag.Tagger:
    return jaxtag.load(make_checkpoint(tmp_path_factory.mktemp("inputs") / "ckpt"), engine="jax")


def _tone(seconds: float, sr: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def test_directories_take_opus_and_report_what_they_skip(tmp_path, tagger):
    sf.write(tmp_path / "a.opus", _tone(3.0, 48_000), 48_000, format="OGG", subtype="OPUS")
    sf.write(tmp_path / "b.aiff", _tone(3.0), 16_000)
    sf.write(tmp_path / "c.wav", _tone(3.0), 16_000)
    for name in ("cover.jpg", "notes.txt", "more.txt"):
        (tmp_path / name).write_text("x")
    skipped: list[str] = []
    found = scoring.expand_inputs([str(tmp_path)], skipped=skipped)
    assert [os.path.basename(p) for p in found] == ["a.opus", "b.aiff", "c.wav"]
    assert sorted(os.path.basename(p) for p in skipped) == ["cover.jpg", "more.txt", "notes.txt"]
    assert scoring.skipped_summary(skipped) == (
        "3 files in the folders are not audio and were skipped (.txt 2, .jpg 1)"
    )
    assert scoring.skipped_summary([]) is None
    probs = tagger.predict(found)  # the .opus decodes and tags like the others
    assert probs.shape == (3, len(tagger.tags)) and np.all(np.isfinite(probs))


def test_files_from_splits_on_newlines_only_and_keeps_every_other_character(tmp_path, tagger):
    names = ["  padded name .wav", "form\x0cfeed.wav", "line\u2028sep.wav", "nel\x85.wav",
             os.fsdecode(b"caf\xe9.wav")]  # fmt: skip
    odd = [os.path.join(tmp_path, n) for n in names]
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\n".join(os.fsencode(n) for n in odd) + b"\n\n")
    assert scoring.expand_inputs([], str(listing)) == odd
    # A name that is not UTF-8 opens, and tags, as the file system has it.
    name = scoring.expand_inputs([], str(listing))[-1]
    sf.write(os.fsencode(name), _tone(2.0), 16_000)
    assert os.path.exists(name)
    assert tagger.predict(name).shape == (len(tagger.tags),)


def test_clips_under_a_second_are_reported_as_the_builders_report_them(tmp_path, tagger):
    path = tmp_path / "blip.wav"
    sf.write(path, _tone(0.015), 16_000)
    (result,) = tagger.score([str(path)])
    # 240 samples pad to one 512-sample STFT frame: 3 mel frames, as the builders count them.
    assert result.error == f"{path}: {audio.too_short(3)}"
    assert result.error.endswith("only 0.05 s of audio (clips under 1 s are skipped)")
    with pytest.raises(jaxtag.JaxtagError, match="clips under 1 s"):
        tagger.predict(_tone(0.5), sr=16_000)
    from data_prep import common

    assert common.too_short is audio.too_short  # one rule for tag and the builders


def test_the_jax_batch_follows_the_windows_waiting(monkeypatch, tagger):
    scorer = tagger.window_scorer("probabilities")
    seen = []
    predict = scorer._predict
    monkeypatch.setattr(scorer, "_predict", lambda w: (seen.append(len(w)), predict(w))[1])
    monkeypatch.setattr(scorer, "batch_size", 5000)
    windows = np.random.default_rng(0).uniform(-80, 0, (16, 96, 256)).astype(np.float32)
    out = scorer.predict_windows(windows)
    assert out.shape == (16, len(tagger.tags)) and seen == [16]  # not 5000
    scorer.predict_windows(windows[:5])
    assert seen[-1] == 8  # the next power of two: a few compiled sizes serve every call
    assert [scoring.padded_batch(n, 16) for n in (1, 2, 3, 9, 16, 40)] == [1, 2, 4, 16, 16, 16]


def test_a_long_file_spills_its_mel_and_reads_the_same_numbers(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(1)
    y = _tone(130.0, 22_050) * (0.5 + 0.5 * rng.random(int(130.0 * 22_050)).astype(np.float32))
    sf.write(path, y, 22_050)
    whole, seconds = streaming.stream_log_mel(path)
    spilled, spilled_seconds = streaming.open_log_mel(path, spill_seconds=100.0)
    assert isinstance(spilled, streaming.SpilledLogMel) and spilled_seconds == seconds
    assert spilled.shape == whole.shape
    for start in (0, 1000, whole.shape[1] - 256):
        np.testing.assert_allclose(spilled[:, start : start + 256], whole[:, start : start + 256],
                                   atol=1e-4)  # fmt: skip
    assert spilled.min() == pytest.approx(float(whole.min()), abs=1e-4)  # the same dB floor
    # Through the scorer: the same predictions as from the mel in memory.
    monkeypatch.setattr(streaming, "SPILL_SECONDS", 100.0)
    reads = []
    getitem = streaming.SpilledLogMel.__getitem__
    monkeypatch.setattr(
        streaming.SpilledLogMel, "__getitem__", lambda m, k: reads.append(k) or getitem(m, k)
    )
    tagger = jaxtag.load(make_checkpoint(tmp_path / "ckpt"), engine="jax")
    got = tagger.taggram(str(path))[1]
    windows, _ = audio.sliding_windows(whole)
    np.testing.assert_allclose(got, tagger.predict_windows(windows), atol=1e-5)
    assert len(reads) == len(windows)  # every window was read from the spilled mel


def test_explain_refuses_an_overflowing_start_in_one_line(tmp_path, tagger):
    path = tmp_path / "clip.wav"
    sf.write(path, _tone(6.0), 16_000)
    with pytest.raises(jaxtag.JaxtagError, match="past the last chunk start") as raised:
        tagger.explain(str(path), start=1e308)
    assert "\n" not in str(raised.value)


def test_the_commands_say_how_many_files_they_skipped(tmp_path, capsys):
    from jaxtag import cli

    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "a.wav", _tone(2.0), 16_000)
    (music / "cover.jpg").write_text("x")
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    assert cli.main(["tag", str(music / "a.wav"), str(music), "--checkpoint",
                     str(checkpoint), "--engine", "jax"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "jaxtag tag: 1 files in the folders are not audio and were skipped (.jpg 1)" in err


def _damaged_mp3(path) -> None:
    """An mp3 with garbage over parts of some frames: it decodes, and libmpg123 complains."""
    sf.write(path, _tone(5.0), 16_000)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in range(2000, len(data), 700):
        data[i : i + 40] = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.slow  # jaxtag tag in a subprocess (the filter works on the real descriptor 2)
def test_the_decoders_chatter_stays_off_the_terminal(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    song = tmp_path / "damaged.mp3"
    _damaged_mp3(song)
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    argv = [sys.executable, "-m", "jaxtag", "tag", str(song), str(tmp_path / "missing.wav"),
            "--checkpoint", str(checkpoint), "--engine", "jax"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(argv, capture_output=True, text=True, cwd=repo, env=env, timeout=300)
    assert done.returncode == 1  # the missing file; the damaged one is tagged
    assert done.stdout.startswith(f"{song} (4.8 s): ")  # frames lost to the damage
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"jaxtag tag: error: {tmp_path / 'missing.wav'}: no such audio file",
        "jaxtag tag: 1 of 2 files could not be tagged",
    ], done.stderr
    # The same decode without the filter prints libmpg123's notices (so the test means it).
    decode = f"from jaxtag import audio; audio.load_audio({str(song)!r})"
    raw = subprocess.run([sys.executable, "-c", decode], capture_output=True, text=True,
                         cwd=repo, env=env, timeout=120)  # fmt: skip
    assert "Trying to resync" in raw.stderr
