"""Audio front end: decode → 16 kHz mono → log-mel (96 × T) → 256-frame chunks.

Everything the released weights expect of their input lives here, as module-level constants, so
that the dataset builders (`data_prep/`), the input pipeline, inference and the tests all share one
definition. The recipe (the README's "log-mel recipe" gives it in plain numbers) is:

1. decode with soundfile (wav, flac, ogg, mp3), average the channels to mono, resample to
   ``SAMPLE_RATE`` with soxr (librosa's default resampler, the same as ``librosa.load``);
2. a Slaney-scale, Slaney-normalised mel *power* spectrogram (librosa defaults) with
   ``N_FFT``/``HOP``/``N_MELS``, a Hann window and centred frames padded with ``PAD_MODE='reflect'``
   (older librosa's default; librosa >= 0.10 pads with zeros, so it is passed explicitly);
3. ``librosa.amplitude_to_db`` (``20*log10``, ref ``DB_REF``, floor ``AMIN``, ``TOP_DB`` below
   the clip's maximum) applied to that *power* spectrogram. ``power_to_db`` would be the textbook
   choice, but the original code used ``amplitude_to_db`` and the released weights were trained
   on it, so values are twice the usual dB figures. Do not "fix" this without retraining.

The result is float32 of shape ``(N_MELS, T)`` with ``T = 1 + n_samples // HOP``.

Chunking (all on the mel, in frames):

- training takes one random ``CHUNK_FRAMES`` crop per clip (:func:`random_crop`);
- evaluation cuts each clip into ``EVAL_CHUNKS`` chunks at ``i * hop`` with
  ``hop = (T - CHUNK_FRAMES) // EVAL_CHUNKS`` (:func:`eval_chunks`), as the original protocol;
- long tracks are tagged with overlapping or adjacent windows (:func:`sliding_windows`).

A clip shorter than one chunk is padded **at the end with its own minimum value** (:func:`pad_to`).
After ``TOP_DB`` clipping the minimum is the clip's floor (``max - 80`` dB, or ``MIN_DB`` for
silence), i.e. what silence looks like at that clip's level, so padding reads as "the clip ended".
Zero would be a loud-ish value in this dB scale (a full-scale sine peaks near +54) and ``MIN_DB``
would be lower than anything a non-silent clip contains after clipping.
"""

from __future__ import annotations

import os

import numpy as np

SAMPLE_RATE: int = 16_000
"""Sample rate (Hz) of everything the model sees."""
N_FFT: int = 512
"""STFT size (32 ms at 16 kHz)."""
HOP: int = 256
"""STFT hop (16 ms): one mel frame."""
N_MELS: int = 96
"""Mel bands (Slaney scale, Slaney area normalisation: librosa's defaults)."""
WINDOW: str = "hann"
PAD_MODE: str = "reflect"
"""Padding of the centred STFT frames: the original's (librosa < 0.10 default; now 'constant')."""
POWER: float = 2.0
"""Magnitude exponent of the mel spectrogram: a *power* spectrogram."""
DB_REF: float = 1.0
AMIN: float = 1e-5
TOP_DB: float = 80.0
MIN_DB: float = float(20.0 * np.log10(AMIN))
"""-100 dB: the value of digital silence (``amplitude_to_db`` uses 20*log10 on power values)."""
CHUNK_FRAMES: int = 256
"""Frames in one model input chunk (about 4.1 s)."""
EVAL_CHUNKS: int = 16
"""Chunks per clip in the evaluation protocol."""

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3")
"""File types that soundfile (libsndfile >= 1.1) decodes and the builders pick up."""


class AudioError(ValueError):
    """An audio file cannot be used: missing, undecodable, empty or not finite. Names the file."""


def _existing_file(path: str | os.PathLike) -> str:
    """``path`` as a str; AudioError if it is not a file or is empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: the file is empty (0 bytes)")
    return path


def _decode_error(path: str, error: Exception) -> AudioError:
    """The AudioError for a file libsndfile cannot open. For an existing file whose bytes no
    decoder accepts (e.g. an .mp3 without one valid frame) libsndfile says "does not exist ...
    (possibly a pipe?)": say what it is instead."""
    detail = f"{type(error).__name__}: {error}"
    if "possibly a pipe" in str(error) or "Format not recognised" in str(error):
        detail = "not an audio file, or its audio data is corrupt"
    return AudioError(f"{path}: cannot decode audio ({detail})")


def load_audio(
    path: str | os.PathLike,
    sr: int = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """Decodes ``path`` (or ``duration`` s of it from ``offset``) to mono float32 at ``sr`` Hz.

    Channels are averaged and the signal resampled with soxr ('soxr_hq'), which is exactly what
    ``librosa.load(path, sr=sr)`` does, so results match the original preprocessing. With
    ``offset``/``duration`` only that part of the file is decoded (a seek), so a few seconds of
    an hour-long file cost a few seconds of memory.

    Raises:
      AudioError: the file is missing, cannot be decoded, holds no samples or non-finite samples.
    """
    import soundfile as sf

    path = _existing_file(path)
    if offset < 0 or (duration is not None and duration <= 0):
        raise ValueError(f"offset must be >= 0 and duration > 0, got {offset}, {duration}")
    try:
        with sf.SoundFile(path) as f:
            file_sr = f.samplerate
            start = min(int(round(offset * file_sr)), f.frames)
            if start:
                f.seek(start)
            count = -1 if duration is None else int(round(duration * file_sr))
            data = f.read(count, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types (LibsndfileError, RuntimeError...).
        raise _decode_error(path, e) from e
    if data.size == 0:
        where = f" after {offset:g} s" if offset else ""
        raise AudioError(f"{path}: the file holds no audio samples{where}")
    y = to_mono(data)
    if not np.all(np.isfinite(y)):
        raise AudioError(f"{path}: decoded audio contains NaN or infinite samples")
    if file_sr != sr:
        import librosa

        y = librosa.resample(y, orig_sr=file_sr, target_sr=sr, res_type="soxr_hq")
    return np.ascontiguousarray(y, dtype=np.float32)


def to_mono(data: np.ndarray) -> np.ndarray:
    """The channel average of ``(samples, channels)`` float32 audio, ``(samples,)``.

    Bit-identical to ``data.mean(axis=1)`` for up to 8 channels (numpy sums so few values in
    order), and several times faster: numpy's reduction along the short axis is slow.
    """
    if data.shape[1] == 1:
        return data[:, 0]
    y = data[:, 0].copy()
    for channel in range(1, data.shape[1]):
        y += data[:, channel]
    y /= np.float32(data.shape[1])
    return y


def mel_power(y: np.ndarray, center: bool = True) -> np.ndarray:
    """The mel *power* spectrogram (float32, ``(N_MELS, frames)``) of a mono ``SAMPLE_RATE`` signal.

    ``center=True`` pads the signal by ``N_FFT // 2`` (``PAD_MODE``) so that ``1 + len // HOP``
    frames come out; ``center=False`` gives the frames lying wholly inside ``y`` (how
    :func:`stream_log_mel` computes a block of an already padded signal).
    """
    import librosa

    return librosa.feature.melspectrogram(
        y=y,
        sr=SAMPLE_RATE,
        n_fft=N_FFT,
        hop_length=HOP,
        n_mels=N_MELS,
        window=WINDOW,
        center=center,
        pad_mode=PAD_MODE,
        power=POWER,
    )


def power_to_log_mel(power: np.ndarray) -> np.ndarray:
    """dB conversion of a whole signal's mel power (``TOP_DB`` below *its* maximum): float32."""
    import librosa

    # amplitude_to_db on a *power* spectrogram: the original's quirk, kept on purpose (see top).
    db = librosa.amplitude_to_db(power, ref=DB_REF, amin=AMIN, top_db=TOP_DB)
    return db.astype(np.float32, copy=False)


def log_mel(y: np.ndarray) -> np.ndarray:
    """Log-mel spectrogram (float32, ``(N_MELS, T)``) of a mono signal at ``SAMPLE_RATE``.

    Signals shorter than ``N_FFT`` samples are zero-padded to ``N_FFT`` first (reflect padding of
    the centred frames needs at least that much signal); longer signals are used as they are.
    """
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1:
        raise ValueError(f"log_mel expects a mono 1-D signal, got shape {y.shape}")
    if y.size < N_FFT:
        y = np.pad(y, (0, N_FFT - y.size))
    return power_to_log_mel(mel_power(y))


def load_log_mel(path: str | os.PathLike) -> np.ndarray:
    """``log_mel(load_audio(path))``: the model's input representation of an audio file."""
    return log_mel(load_audio(path))


STREAM_BLOCK_SECONDS: float = 60.0
"""Seconds of the file that :func:`stream_log_mel` decodes at a time."""


def stream_log_mel(
    path: str | os.PathLike, block_seconds: float = STREAM_BLOCK_SECONDS
) -> tuple[np.ndarray, float]:
    """``load_log_mel(path)`` holding at most about one block of decoded audio, and the duration.

    Long files are decoded ``block_seconds`` at a time, resampled with soxr's streaming resampler
    (the same filter as the one-shot call ``load_audio`` makes) and turned into mel *power*
    frames, each computed once the samples under its window have arrived, with the same reflect
    padding at both ends as the whole-file STFT. Only the power mel (96 floats a frame, 1.4 MB a
    minute) is kept: the dB conversion clips at ``TOP_DB`` below the *whole file's* maximum, so it
    runs once at the end. A file of at most one block goes through ``load_log_mel`` unchanged.

    Returns:
      ``(mel, seconds)``: the ``(N_MELS, T)`` log-mel and the duration of the 16 kHz signal.

    Raises:
      AudioError: as :func:`load_audio`.
    """
    import soundfile as sf

    path = _existing_file(path)
    try:
        with sf.SoundFile(path) as f:
            if f.frames <= block_seconds * f.samplerate:
                y = load_audio(path)
                return log_mel(y), y.size / SAMPLE_RATE
            return _stream_log_mel(f, path, int(block_seconds * f.samplerate))
    except AudioError:
        raise
    except Exception as e:  # libsndfile raises several types (LibsndfileError, RuntimeError...).
        raise _decode_error(path, e) from e


def _stream_log_mel(f, path: str, block_frames: int) -> tuple[np.ndarray, float]:
    """The streaming loop of :func:`stream_log_mel` on an open, longer-than-one-block file."""
    half = N_FFT // 2
    # Keep this many decoded samples unframed until the end: the end's reflect padding reads the
    # last `half + 1` samples, and the length fix below may cut a few.
    margin = N_FFT
    resampler = None
    if f.samplerate != SAMPLE_RATE:
        import soxr

        resampler = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, "float32", quality="HQ")
    padded = np.zeros(0, np.float32)  # the centred signal from padded sample `base` on
    base = 0
    decoded = 0  # input samples read
    produced = 0  # samples at SAMPLE_RATE so far
    frames: list[np.ndarray] = []
    done = 0  # frames computed
    started = False  # start padding applied

    def frame_until(stop: int) -> None:  # computes frames done..stop-1 of the padded signal
        nonlocal padded, base, done
        if stop <= done:
            return
        lo = done * HOP - base
        frames.append(mel_power(padded[lo : (stop - 1) * HOP + N_FFT - base], center=False))
        done = stop
        padded = padded[done * HOP - base :]
        base = done * HOP

    for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
        y = to_mono(block)
        if not np.all(np.isfinite(y)):
            raise AudioError(f"{path}: decoded audio contains NaN or infinite samples")
        decoded += y.size
        if resampler is not None:
            y = resampler.resample_chunk(y, last=False)
        produced += y.size
        padded = np.concatenate([padded, y])
        if not started:
            if padded.size <= half:
                continue  # the resampler's first output can be short
            padded = np.concatenate([padded[half:0:-1], padded])  # reflect padding at the start
            started = True
        available = base + padded.size - margin  # padded samples safe to frame
        frame_until(max(done, (available - N_FFT) // HOP + 1))
    if resampler is not None:
        tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        padded = np.concatenate([padded, tail])
        produced += tail.size
    if decoded == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    # librosa.resample's length (what load_audio returns): ceil(n * ratio), cut or zero-padded.
    n = int(np.ceil(decoded * SAMPLE_RATE / f.samplerate)) if resampler is not None else decoded
    end = half + n - base  # index in `padded` just past the last signal sample
    if end > padded.size:
        padded = np.concatenate([padded, np.zeros(end - padded.size, np.float32)])
    padded = np.concatenate([padded[:end], padded[end - 2 : end - 2 - half : -1]])
    frame_until(1 + n // HOP)
    return power_to_log_mel(np.concatenate(frames, axis=1)), n / SAMPLE_RATE


def frames_to_seconds(frames: float | np.ndarray) -> float | np.ndarray:
    """Start time (s) of mel frame index ``frames`` (frames are centred, one every ``HOP``)."""
    return frames * HOP / SAMPLE_RATE


def seconds_to_frames(seconds: float) -> int:
    """Index of the mel frame centred nearest to ``seconds``."""
    return int(round(seconds * SAMPLE_RATE / HOP))


def pad_to(mel: np.ndarray, frames: int = CHUNK_FRAMES) -> np.ndarray:
    """Pads ``mel`` at the end of the time axis with its own minimum up to ``frames`` frames.

    Returns ``mel`` unchanged when it is already long enough. Why the minimum: see the module doc.
    """
    n = mel.shape[-1]
    if n >= frames:
        return mel
    if n == 0:
        raise ValueError("cannot pad an empty spectrogram")
    pad = [(0, 0)] * (mel.ndim - 1) + [(0, frames - n)]
    return np.pad(mel, pad, mode="constant", constant_values=mel.min())


def crop(mel: np.ndarray, start: int, frames: int = CHUNK_FRAMES) -> np.ndarray:
    """``frames`` frames of ``pad_to(mel)`` from ``start`` (must fit)."""
    mel = pad_to(mel, frames)
    if not 0 <= start <= mel.shape[-1] - frames:
        raise ValueError(f"crop start {start} outside [0, {mel.shape[-1] - frames}]")
    return mel[..., start : start + frames]


def random_crop(
    mel: np.ndarray, rng: np.random.Generator, frames: int = CHUNK_FRAMES
) -> np.ndarray:
    """One uniformly random ``frames``-frame crop (the training input); short clips are padded."""
    n = max(mel.shape[-1], frames)
    start = int(rng.integers(0, n - frames + 1))
    return crop(mel, start, frames)


def eval_chunk_starts(
    n_frames: int, n_chunks: int = EVAL_CHUNKS, frames: int = CHUNK_FRAMES
) -> np.ndarray:
    """Start frames of the evaluation chunks: ``i * ((n - frames) // n_chunks)`` for i < n_chunks.

    ``n`` is the padded length ``max(n_frames, frames)``, so a short clip gives ``n_chunks`` copies
    of its padded self. Like the original protocol the last chunk does not reach the clip's end.
    """
    n = max(n_frames, frames)
    hop = (n - frames) // n_chunks
    return np.arange(n_chunks, dtype=np.int64) * hop


def eval_chunks(
    mel: np.ndarray, n_chunks: int = EVAL_CHUNKS, frames: int = CHUNK_FRAMES
) -> np.ndarray:
    """The evaluation protocol's chunks, ``(n_chunks, N_MELS, frames)``; the model's sigmoid
    outputs over them are averaged into the clip's prediction."""
    mel = pad_to(mel, frames)
    starts = eval_chunk_starts(mel.shape[-1], n_chunks, frames)
    return np.stack([mel[:, s : s + frames] for s in starts])


def sliding_window_starts(
    n_frames: int, frames: int = CHUNK_FRAMES, hop: int | None = None
) -> np.ndarray:
    """Start frames of windows every ``hop`` frames, plus one flush with the end if the regular grid
    leaves a tail uncovered, so every frame of the track lies in at least one window."""
    hop = frames if hop is None else hop
    if hop <= 0:
        raise ValueError(f"hop must be positive, got {hop}")
    n = max(n_frames, frames)
    starts = list(range(0, n - frames + 1, hop))
    if starts[-1] + frames < n:
        starts.append(n - frames)
    return np.asarray(starts, dtype=np.int64)


def sliding_windows(
    mel: np.ndarray, frames: int = CHUNK_FRAMES, hop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Windows over a track of any length, for tagging long audio.

    Args:
      mel: ``(N_MELS, T)`` log-mel.
      frames: window length in frames.
      hop: frames between window starts; default ``frames`` (adjacent windows). The last window is
        aligned to the end of the track so nothing is left out (it may overlap its neighbour).

    Returns:
      ``(windows, starts)``: ``(N, N_MELS, frames)`` float32 and the ``(N,)`` start frames (use
      :func:`frames_to_seconds` for times). Tracks shorter than ``frames`` give one padded window.
    """
    mel = pad_to(mel, frames)
    starts = sliding_window_starts(mel.shape[-1], frames, hop)
    return np.stack([mel[:, s : s + frames] for s in starts]), starts
