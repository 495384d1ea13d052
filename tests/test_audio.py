"""jaxtag.audio: decoding, the log-mel recipe of the released weights, chunking."""

from __future__ import annotations

import os

import librosa
import numpy as np
import pytest

from jaxtag import audio, streaming
from tests.data_fixtures import reference_log_mel, tone, write_audio, write_corrupt


def test_constants_match_the_released_recipe():
    assert (audio.SAMPLE_RATE, audio.N_FFT, audio.HOP, audio.N_MELS) == (16000, 512, 256, 96)
    assert (audio.CHUNK_FRAMES, audio.EVAL_CHUNKS) == (256, 16)
    assert (audio.AMIN, audio.TOP_DB, audio.DB_REF, audio.PAD_MODE) == (1e-5, 80.0, 1.0, "reflect")
    assert audio.MIN_DB == pytest.approx(-100.0)


@pytest.mark.parametrize(
    "name,sr,channels", [("a.wav", 44100, 2), ("b.flac", 16000, 1), ("c.ogg", 22050, 1),
                         ("d.mp3", 44100, 2)],
)  # fmt: skip
def test_load_audio_matches_librosa_load(tmp_path, name, sr, channels):
    path = write_audio(str(tmp_path / name), seconds=1.3, sr=sr, channels=channels)
    y = audio.load_audio(path)
    expected, _ = librosa.load(path, sr=16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size - 1.3 * 16000) < 0.02 * 16000  # mp3 adds a little encoder padding
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_log_mel_equals_explicit_librosa_recipe():
    y = librosa.resample(tone(2.0, 330.0)[:, 0], orig_sr=22050, target_sr=16000)
    mel = audio.log_mel(y)
    assert mel.shape == (96, 1 + y.size // 256) and mel.dtype == np.float32
    np.testing.assert_allclose(mel, reference_log_mel(y), atol=1e-4)


def test_log_mel_is_amplitude_to_db_of_power_the_original_quirk():
    # A full-scale 1 kHz sine: power_to_db would peak near +27 dB; amplitude_to_db of the power
    # doubles it (about +54 dB), which is what the released weights were trained on.
    t = np.arange(16000 * 2) / 16000
    mel = audio.log_mel(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    assert 52.0 < mel.max() < 56.0
    assert mel.min() == pytest.approx(mel.max() - 80.0, abs=1e-3)  # top_db clipping


def test_silence_and_tiny_input_are_finite():
    silent = audio.log_mel(np.zeros(16000, np.float32))
    assert np.all(np.isfinite(silent)) and np.all(silent == pytest.approx(audio.MIN_DB, abs=1e-3))
    tiny = audio.log_mel(np.full(100, 0.1, np.float32))  # shorter than one FFT window
    assert tiny.shape == (96, 3) and np.all(np.isfinite(tiny))


def test_load_log_mel_of_stereo_mp3(tmp_path):
    path = write_audio(str(tmp_path / "x.mp3"), seconds=1.0, sr=44100, channels=2)
    y, _ = librosa.load(path, sr=16000, mono=True)
    np.testing.assert_allclose(audio.load_log_mel(path), reference_log_mel(y), atol=1e-3)


@pytest.mark.parametrize("kind", ["missing", "corrupt", "zero_bytes", "no_samples"])
def test_unusable_files_raise_audio_error_naming_the_file(tmp_path, kind):
    path = str(tmp_path / f"{kind}.wav")
    if kind == "corrupt":
        path = write_corrupt(str(tmp_path / "corrupt.mp3"))
    elif kind == "zero_bytes":
        open(path, "wb").close()
    elif kind == "no_samples":
        import soundfile as sf

        sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(audio.AudioError, match=os.path.basename(path)) as info:
        audio.load_log_mel(path)
    assert isinstance(info.value, ValueError)


# Measured largest differences (dB, on values from about -90 to +40): 1.5e-5 for wav, flac and
# ogg (float32 rounding of the per-block FFTs); 0.014 for mp3 at 2 s blocks, where libmpg123
# itself decodes a block-wise read up to 7e-7 differently (bins near the -80 dB floor move most).
@pytest.mark.parametrize(
    "name,sr,channels,seconds,atol",
    [("a.wav", 44100, 2, 9.3, 1e-4), ("b.flac", 16000, 1, 8.01, 1e-4),
     ("c.mp3", 22050, 1, 7.5, 0.05), ("d.ogg", 48000, 2, 6.2, 1e-4)],
)  # fmt: skip
def test_streamed_log_mel_equals_the_whole_file_one(tmp_path, name, sr, channels, seconds, atol):
    # Blocks of 1.3 s: several blocks, none aligned with the hop. The loudest part comes late, so
    # the TOP_DB clipping of the early blocks depends on audio decoded after them.
    path = str(tmp_path / name)
    y = tone(seconds, 330.0, sr, channels) * np.linspace(0.1, 1.0, int(seconds * sr))[:, None]
    import soundfile as sf

    sf.write(path, y, sr)
    whole = audio.load_log_mel(path)
    for block_seconds in (1.3, 2.0):
        streamed, duration = streaming.stream_log_mel(path, block_seconds=block_seconds)
        assert streamed.shape == whole.shape and streamed.dtype == np.float32
        np.testing.assert_allclose(streamed, whole, atol=atol)
        assert np.abs(streamed - whole).mean() < 1e-4
    assert duration == audio.load_audio(path).size / audio.SAMPLE_RATE
    one_block, _ = streaming.stream_log_mel(path, block_seconds=60.0)  # the whole-file path itself
    np.testing.assert_array_equal(one_block, whole)


def test_streamed_log_mel_refuses_non_finite_audio_in_a_late_block(tmp_path):
    import soundfile as sf

    y = tone(5.0, 330.0, 16000)
    y[4 * 16000] = np.nan
    path = str(tmp_path / "nan.wav")
    sf.write(path, y, 16000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match="nan.wav: decoded audio contains NaN"):
        streaming.stream_log_mel(path, block_seconds=1.0)


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_to_mono_is_the_channel_mean_bit_for_bit(channels):
    data = np.random.default_rng(channels).standard_normal((10_001, channels)).astype(np.float32)
    mono = audio.to_mono(data)
    assert mono.dtype == np.float32 and mono.shape == (10_001,)
    np.testing.assert_array_equal(mono, data.mean(axis=1))


def test_pad_to_pads_the_end_with_the_clip_minimum():
    mel = np.arange(96 * 10, dtype=np.float32).reshape(96, 10) - 50
    padded = audio.pad_to(mel, 256)
    assert padded.shape == (96, 256)
    np.testing.assert_array_equal(padded[:, :10], mel)
    assert np.all(padded[:, 10:] == -50)
    assert audio.pad_to(mel, 5) is mel


def test_eval_chunks_follow_the_protocol():
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((96, 1820)).astype(np.float32)  # a 29.1 s MTAT clip
    chunks = audio.eval_chunks(mel)
    hop = (1820 - 256) // 16
    assert hop == 97 and chunks.shape == (16, 96, 256)
    for i in range(16):
        np.testing.assert_array_equal(chunks[i], mel[:, i * hop : i * hop + 256])
    np.testing.assert_array_equal(audio.eval_chunk_starts(1820), np.arange(16) * 97)


def test_eval_chunks_of_a_short_clip_are_its_padded_copies():
    mel = np.linspace(-80, 0, 96 * 100, dtype=np.float32).reshape(96, 100)
    chunks = audio.eval_chunks(mel)
    assert chunks.shape == (16, 96, 256)
    for c in chunks:
        np.testing.assert_array_equal(c, audio.pad_to(mel, 256))


def test_random_crop_is_a_slice_and_reproducible():
    mel = np.random.default_rng(1).standard_normal((96, 400)).astype(np.float32)
    starts = set()
    for seed in range(30):
        crop = audio.random_crop(mel, np.random.default_rng(seed))
        (start,) = [s for s in range(400 - 256 + 1) if np.array_equal(mel[:, s : s + 256], crop)]
        starts.add(start)
        np.testing.assert_array_equal(crop, audio.random_crop(mel, np.random.default_rng(seed)))
    assert len(starts) > 20  # spread over the 145 possible starts
    short = audio.random_crop(mel[:, :50], np.random.default_rng(0))
    np.testing.assert_array_equal(short, audio.pad_to(mel[:, :50]))
    with pytest.raises(ValueError, match="outside"):
        audio.crop(mel, 145)


@pytest.mark.parametrize(
    "n,hop,expected",
    [(1000, None, [0, 256, 512, 744]), (512, 128, [0, 128, 256]), (100, None, [0])],
)
def test_sliding_windows_cover_the_whole_track(n, hop, expected):
    mel = np.random.default_rng(2).standard_normal((96, n)).astype(np.float32)
    windows, starts = audio.sliding_windows(mel, hop=hop)
    assert starts.tolist() == expected and windows.shape == (len(expected), 96, 256)
    padded = audio.pad_to(mel)
    covered = np.zeros(padded.shape[1], bool)
    for w, s in zip(windows, starts, strict=True):
        np.testing.assert_array_equal(w, padded[:, s : s + 256])
        covered[s : s + 256] = True
    assert covered.all()
    assert audio.frames_to_seconds(starts[-1]) == pytest.approx(expected[-1] * 0.016)
