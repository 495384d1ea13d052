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

from jaxtag.errors import JaxtagError

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

AUDIO_EXTENSIONS: tuple[str, ...] = (
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".caf", ".w64",
    ".rf64", ".au",
)  # fmt: skip
"""File types that soundfile (libsndfile >= 1.1) decodes: what directory inputs and the builders
pick up. libsndfile reads no AAC (.m4a, .aac): convert those first (e.g. with ffmpeg)."""
MIN_CLIP_SECONDS: float = 1.0
"""Clips with less audio are not tagged and not built into datasets (and are listed): under a
quarter of a chunk, most of every window would be padding; such clips are mostly truncated or
broken files (an mp3 cut off after its first frames decodes to a fraction of a second)."""


class AudioError(JaxtagError):
    """An audio file cannot be used: missing, undecodable, empty or not finite. Names the file."""


def existing_file(path: str | os.PathLike) -> str:
    """``path`` as a str; AudioError if it is not a file or is empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: the file is empty (0 bytes)")
    return path


def native_path(path: str) -> str | bytes:
    """`path` as libsndfile should get it: the file system's own bytes, so a name that is not
    UTF-8 (held as surrogate escapes, `os.fsdecode`) opens as it is (soundfile would encode a
    str strictly)."""
    return path if os.name == "nt" else os.fsencode(path)


def decode_error(path: str, error: Exception) -> AudioError:
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

    path = existing_file(path)
    if offset < 0 or (duration is not None and duration <= 0):
        raise ValueError(f"offset must be >= 0 and duration > 0, got {offset}, {duration}")
    try:
        with sf.SoundFile(native_path(path)) as f:
            file_sr = f.samplerate
            start = min(int(round(offset * file_sr)), f.frames)
            if start:
                f.seek(start)
            count = -1 if duration is None else int(round(duration * file_sr))
            data = f.read(count, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types (LibsndfileError, RuntimeError...).
        raise decode_error(path, e) from e
    return _to_model_rate(data, file_sr, sr, path, offset)


def _to_model_rate(data: np.ndarray, rate: int, sr: int, name: str, offset: float) -> np.ndarray:
    """Decoded ``(samples, channels)`` float32 at ``rate`` -> mono float32 at ``sr`` (soxr)."""
    if data.size == 0:
        where = f" after {offset:g} s" if offset else ""
        raise AudioError(f"{name}: holds no audio samples{where}")
    y = to_mono(data)
    if not np.all(np.isfinite(y)):
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    if rate != sr:
        import librosa

        y = librosa.resample(y, orig_sr=rate, target_sr=sr, res_type="soxr_hq")
    return np.ascontiguousarray(y, dtype=np.float32)


WAVEFORM = "waveform"  # how error messages name an array passed instead of a file


def waveform_samples(samples: np.ndarray, sr: int) -> np.ndarray:
    """A caller's waveform as soundfile would decode it: ``(samples, channels)`` float32.

    Takes ``(samples,)`` (mono) or ``(samples, channels)`` arrays of floats (-1..1) or integers
    (PCM, scaled by the type's range as soundfile scales them).

    Raises:
      AudioError: not a waveform (shape, type, sample rate).
    """
    if isinstance(sr, bool) or not isinstance(sr, int | np.integer) or sr <= 0:
        raise AudioError(f"{WAVEFORM}: sr must be a positive sample rate in Hz, got {sr!r}")
    data = np.asarray(samples)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise AudioError(
            f"{WAVEFORM}: expected (samples,) or (samples, channels), got shape {data.shape}"
        )
    if data.size == 0:
        raise AudioError(f"{WAVEFORM}: holds no audio samples")
    if data.shape[1] > data.shape[0]:
        raise AudioError(
            f"{WAVEFORM}: shape {data.shape} has more channels than samples; pass "
            "(samples, channels) (transpose a (channels, samples) array)"
        )
    if np.issubdtype(data.dtype, np.integer):
        return (data / np.float32(2.0 ** (8 * data.dtype.itemsize - 1))).astype(np.float32)
    if not np.issubdtype(data.dtype, np.floating):
        raise AudioError(f"{WAVEFORM}: expected float or integer samples, got {data.dtype}")
    return data.astype(np.float32, copy=False)


def load_waveform(
    samples: np.ndarray,
    sr: int,
    target_sr: int = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """:func:`load_audio` for a waveform in memory: the same samples come out for a file and for
    its decoded ``(samples, channels)`` array, ``offset``/``duration`` included.

    Raises:
      AudioError: as :func:`waveform_samples`, or no samples, or non-finite ones.
    """
    data = waveform_samples(samples, sr)
    start = min(int(round(offset * sr)), len(data))
    count = len(data) - start if duration is None else int(round(duration * sr))
    return _to_model_rate(data[start : start + count], int(sr), target_sr, WAVEFORM, offset)


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


def unclipped_db(power: np.ndarray) -> np.ndarray:
    """The element-wise part of ``power_to_log_mel``, before the ``TOP_DB`` floor: the same
    operations as ``librosa.amplitude_to_db`` (which squares its input, the quirk), in float32,
    for converting a long file's mel window by window (jaxtag/streaming.py)."""
    power = np.square(np.abs(np.asarray(power, np.float32)))
    db = 10.0 * np.log10(np.maximum(AMIN**2, power))
    db -= 10.0 * np.log10(np.maximum(AMIN**2, DB_REF**2))
    return db


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


def too_short(frames: int) -> str | None:
    """Why a clip of ``frames`` mel frames is too short to use (under ``MIN_CLIP_SECONDS``), or
    None; the same words for `jaxtag tag` and the dataset builders."""
    seconds = frames * HOP / SAMPLE_RATE  # frames are centred: +-16 ms
    if seconds >= MIN_CLIP_SECONDS:
        return None
    return f"only {seconds:.2f} s of audio (clips under {MIN_CLIP_SECONDS:g} s are skipped)"


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
