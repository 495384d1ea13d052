"""Reading audio with bounded memory: a whole long file block by block (`stream_log_mel`; with
`open_log_mel` a very long one spills its mel to a temporary file), or one chunk of a file or
waveform with a margin around it (`chunk_log_mel`, for explanations).

Both give what `jaxtag.audio.log_mel` of the whole decoded signal gives (the chunk up to the dB
floor, see `chunk_log_mel`), without holding the whole signal.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxtag import audio
from jaxtag.audio import CHUNK_FRAMES, HOP, N_FFT, SAMPLE_RATE
from jaxtag.errors import JaxtagError

STREAM_BLOCK_SECONDS: float = 60.0
"""Seconds of the file that :func:`stream_log_mel` decodes at a time."""


SPILL_SECONDS: float = 600.0
"""Files longer than this keep their mel in a temporary file (:func:`open_log_mel`)."""


def stream_log_mel(
    path: str | os.PathLike, block_seconds: float = STREAM_BLOCK_SECONDS
) -> tuple[np.ndarray, float]:
    """``load_log_mel(path)`` holding at most about one block of decoded audio, and the duration.

    Long files are decoded ``block_seconds`` at a time, resampled with soxr's streaming resampler
    (the same filter as the one-shot call ``audio.load_audio`` makes) and turned into mel *power*
    frames, each computed once the samples under its window have arrived, with the same reflect
    padding at both ends as the whole-file STFT. Only the power mel (96 floats a frame, 1.4 MB a
    minute) is kept: the dB conversion clips at ``TOP_DB`` below the *whole file's* maximum, so it
    runs once at the end. A file of at most one block goes through ``load_log_mel`` unchanged.

    Returns:
      ``(mel, seconds)``: the ``(N_MELS, T)`` log-mel and the duration of the 16 kHz signal.

    Raises:
      audio.AudioError: as :func:`audio.load_audio`.
    """
    mel, seconds = _read(path, block_seconds, spill_seconds=None)
    return mel, seconds


def open_log_mel(
    path: str | os.PathLike,
    spill_seconds: float | None = None,
    block_seconds: float = STREAM_BLOCK_SECONDS,
) -> tuple[np.ndarray | SpilledLogMel, float]:
    """:func:`stream_log_mel`, except that a file longer than ``spill_seconds`` (default
    ``SPILL_SECONDS``, read at the call) comes back as a
    :class:`SpilledLogMel`: its power frames in a temporary file, windows converted to dB as
    they are read, so that memory does not grow with the file's length (tagging an hour and
    three hours cost the same)."""
    spill = SPILL_SECONDS if spill_seconds is None else spill_seconds
    return _read(path, block_seconds, spill)


class SpilledLogMel:
    """A long file's ``(N_MELS, T)`` log-mel kept as power frames in an unnamed temporary file.

    ``mel[:, a:b]`` reads frames a..b-1 and converts them as :func:`audio.power_to_log_mel`
    converts the whole (the same dB floor: ``TOP_DB`` below the whole file's maximum). The file
    goes away with the object (or at exit).
    """

    def __init__(self, file: Any, frames: int, max_power: float):
        self.file, self.frames = file, frames
        self.floor = float(audio.unclipped_db(np.float32(max_power))) - audio.TOP_DB
        self.shape = (audio.N_MELS, frames)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        if rows != slice(None) or not isinstance(cols, slice) or cols.step not in (None, 1):
            raise TypeError("SpilledLogMel takes mel[:, start:stop] only")
        start, stop, _ = cols.indices(self.frames)
        count = max(stop - start, 0)
        row = audio.N_MELS * 4  # one frame of float32
        data = os.pread(self.file.fileno(), count * row, start * row)
        power = np.frombuffer(data, np.float32).reshape(count, audio.N_MELS).T
        return np.maximum(audio.unclipped_db(power), np.float32(self.floor))

    def min(self) -> float:
        """The smallest value (what `audio.pad_to` pads with): the dB floor, or above it."""
        return self.floor


class _InMemory:
    """Collects power blocks; converts the whole at the end (exactly `audio.power_to_log_mel`)."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []

    def add(self, power: np.ndarray) -> None:
        self.blocks.append(power)

    def result(self) -> np.ndarray:
        return audio.power_to_log_mel(np.concatenate(self.blocks, axis=1))


class _Spilled:
    """Writes power blocks frame by frame to a temporary file and tracks their maximum."""

    def __init__(self) -> None:
        import tempfile

        self.file = tempfile.TemporaryFile(prefix="jaxtag-mel-")
        self.frames, self.max_power = 0, 0.0

    def add(self, power: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(power.T, np.float32).tobytes())
        self.frames += power.shape[1]
        self.max_power = max(self.max_power, float(power.max(initial=0.0)))

    def result(self) -> SpilledLogMel:
        self.file.flush()
        return SpilledLogMel(self.file, self.frames, self.max_power)


def _read(
    path: str | os.PathLike, block_seconds: float, spill_seconds: float | None
) -> tuple[Any, float]:
    import soundfile as sf

    path = audio.existing_file(path)
    try:
        with sf.SoundFile(audio.native_path(path)) as f:
            if f.frames <= block_seconds * f.samplerate:
                y = audio.load_audio(path)
                return audio.log_mel(y), y.size / SAMPLE_RATE
            spill = spill_seconds is not None and f.frames > spill_seconds * f.samplerate
            sink = _Spilled() if spill else _InMemory()
            seconds = _stream_power(f, path, int(block_seconds * f.samplerate), sink.add)
            return sink.result(), seconds
    except audio.AudioError:
        raise
    except Exception as e:  # libsndfile raises several types (LibsndfileError, RuntimeError...).
        raise audio.decode_error(path, e) from e


def _stream_power(f: Any, path: str, block_frames: int, add: Callable[[np.ndarray], None]) -> float:
    """The streaming loop of :func:`stream_log_mel` on an open, longer-than-one-block file: hands
    the power mel to `add` block by block; returns the duration."""
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
    done = 0  # frames computed
    started = False  # start padding applied

    def frame_until(stop: int) -> None:  # computes frames done..stop-1 of the padded signal
        nonlocal padded, base, done
        if stop <= done:
            return
        lo = done * HOP - base
        add(audio.mel_power(padded[lo : (stop - 1) * HOP + N_FFT - base], center=False))
        done = stop
        padded = padded[done * HOP - base :]
        base = done * HOP

    for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
        y = audio.to_mono(block)
        if not np.all(np.isfinite(y)):
            raise audio.AudioError(f"{path}: decoded audio contains NaN or infinite samples")
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
        raise audio.AudioError(f"{path}: the file holds no audio samples")
    # librosa.resample's length (what load_audio returns): ceil(n * ratio), cut or zero-padded.
    n = int(np.ceil(decoded * SAMPLE_RATE / f.samplerate)) if resampler is not None else decoded
    end = half + n - base  # index in `padded` just past the last signal sample
    if end > padded.size:
        padded = np.concatenate([padded, np.zeros(end - padded.size, np.float32)])
    padded = np.concatenate([padded[:end], padded[end - 2 : end - 2 - half : -1]])
    frame_until(1 + n // HOP)
    return n / SAMPLE_RATE


# Audio decoded before and after the chunk: whole STFT frames for the edge frames and room for
# the resampler's edge transients. A multiple of the hop, so frames stay on the file's grid.
MARGIN_SECONDS = 32 * HOP / SAMPLE_RATE  # 0.512 s


class ChunkError(JaxtagError):
    """A chunk that the audio cannot provide (a start past the end). Names the file."""


def _frames_and_rate(source: str | os.PathLike | np.ndarray, sr: int | None) -> tuple[int, int]:
    """(mel frames of the whole signal at `SAMPLE_RATE`, its own sample rate), from a
    file's header (nothing is decoded) or a waveform's length."""
    if isinstance(source, np.ndarray):
        count, rate = len(audio.waveform_samples(source, sr)), int(sr)
    else:
        import soundfile as sf

        path = audio.existing_file(source)
        try:
            info = sf.info(audio.native_path(path))
        except Exception as err:  # libsndfile raises several types
            raise audio.decode_error(path, err) from err
        count, rate = info.frames, info.samplerate
    samples = int(np.ceil(count * SAMPLE_RATE / rate))  # as resampled
    return 1 + max(samples, N_FFT) // HOP, rate


def chunk_log_mel(
    source: str | os.PathLike | np.ndarray, start_frame: int, sr: int | None = None
) -> np.ndarray:
    """The (N_MELS, CHUNK_FRAMES) log-mel chunk of a file (or of a waveform at `sr` Hz) from
    `start_frame`, decoding only the chunk and a margin (short audio is padded as `audio.crop`
    does). It is the whole signal's log-mel frame for frame, except for the dB floor: `TOP_DB`
    below the loudest bin of the decoded window instead of the whole signal's.

    Raises:
      audio.AudioError: the audio cannot be decoded.
      ChunkError: `start_frame` is past the last chunk start.
    """
    name = audio.WAVEFORM if isinstance(source, np.ndarray) else os.fspath(source)
    n_frames, rate = _frames_and_rate(source, sr)
    last_start = max(n_frames - CHUNK_FRAMES, 0)
    if not 0 <= start_frame <= last_start:
        raise ChunkError(
            f"{name}: start {audio.frames_to_seconds(start_frame):.2f} s is past the last chunk "
            f"start ({audio.frames_to_seconds(last_start):.2f} s)"
        )
    margin = audio.seconds_to_frames(MARGIN_SECONDS)
    # The decoded window's first frame, on a whole sample of the source's rate too (every 5
    # frames at 44.1 kHz), so resampling the window matches resampling the whole signal.
    step = SAMPLE_RATE // math.gcd(HOP * rate, SAMPLE_RATE)
    first = max(start_frame - margin, 0) // step * step
    offset = audio.frames_to_seconds(first)
    seconds = audio.frames_to_seconds(start_frame + CHUNK_FRAMES + margin - first)
    if isinstance(source, np.ndarray):
        y = audio.load_waveform(source, rate, offset=offset, duration=seconds)
    else:
        y = audio.load_audio(source, offset=offset, duration=seconds)
    mel = audio.log_mel(y)
    start = min(start_frame - first, max(mel.shape[-1] - CHUNK_FRAMES, 0))
    return audio.crop(mel, start)
