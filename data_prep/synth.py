"""Procedural music-like clips with audible, learnable tags (numpy only, deterministic by seed).

Used by the ``synthetic_tags`` builder (the CPU demo and the tests): no download, a few hundred
clips in well under a minute, and ground truth for *where* each tag is audible, so attention heat
maps can be checked against it.

Tags (``TAG_NAMES`` order):

- six instrument timbres, each played in **one span of 2-4 s** of the clip (its "evidence"):
  ``plucked`` (Karplus-Strong string, high register, quick decaying single notes),
  ``bowed`` (band-limited sawtooth, low register, 0.25 s attack, 5.5 Hz vibrato, long notes),
  ``piano`` (three-note chords of inharmonic partials decaying faster with frequency),
  ``flute`` (near-sinusoid in a high register plus band-passed breath noise),
  ``drums`` (pitch-swept kick and noise snare, alternating),
  ``synth`` (bright square-wave arpeggio, 8 gated notes per second);
  a clip has 1-3 of them, possibly overlapping;
- tempo, over the whole clip: ``fast`` (a hi-hat tick 4 times a second) or ``slow`` (once a
  second) or neither (no tick);
- loudness, over the whole clip: ``loud`` (RMS 0.25) or ``quiet`` (RMS 0.012) or neither (0.06);
  the front end keeps absolute level, and ``amplitude_to_db`` on power doubles dB gaps, so these
  are 25-28 dB apart in the mel.

The timbres differ in register, harmonic pattern, envelope and note rate, so a small CNN separates
them from a 4 s crop. Everything is drawn from ``numpy.random.default_rng([seed, index, ...])``,
so the same seed gives the same audio, bit for bit.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from scipy import signal

from jaxtag import audio
from jaxtag.fileio import atomic_write

SR = audio.SAMPLE_RATE
INSTRUMENTS: tuple[str, ...] = ("plucked", "bowed", "piano", "flute", "drums", "synth")
TAG_NAMES: tuple[str, ...] = (*INSTRUMENTS, "fast", "slow", "loud", "quiet")
VERSION = "3"
"""Bump when the audio recipe changes (it is part of the builder's mel cache key)."""

_PENTATONIC = np.array([0, 2, 4, 7, 9])
_TICK_RATE = {"fast": 4.0, "slow": 1.0}
_TARGET_RMS = {"loud": 0.25, None: 0.06, "quiet": 0.012}
_NOISE_FLOOR_RMS = 3e-4


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip (hashable and picklable: it is also the cache key).

    ``spans`` holds ``(instrument, start_s, end_s)``; ``tempo`` is 'fast', 'slow' or None;
    ``loudness`` is 'loud', 'quiet' or None.
    """

    seed: int
    index: int
    seconds: float
    spans: tuple[tuple[str, float, float], ...]
    tempo: str | None
    loudness: str | None

    def tags(self) -> np.ndarray:
        """Multi-hot float32 vector in ``TAG_NAMES`` order."""
        present = {name for name, _, _ in self.spans} | {self.tempo, self.loudness}
        return np.array([name in present for name in TAG_NAMES], dtype=np.float32)

    def evidence(self) -> np.ndarray:
        """``(len(TAG_NAMES), 2)`` float32 start/end seconds of each tag's evidence; -1 if absent.

        Instruments: their span. Tempo and loudness: the whole clip.
        """
        ev = np.full((len(TAG_NAMES), 2), -1.0, dtype=np.float32)
        for name, start, end in self.spans:
            ev[TAG_NAMES.index(name)] = (start, end)
        for name in (self.tempo, self.loudness):
            if name is not None:
                ev[TAG_NAMES.index(name)] = (0.0, self.seconds)
        return ev


def make_specs(num_clips: int, seconds: float, seed: int) -> list[ClipSpec]:
    """Draws ``num_clips`` clip descriptions: 1-3 instruments with their spans, tempo, loudness."""
    if seconds < 2.0:
        raise ValueError(f"clips must be at least 2 s long, got {seconds}")
    specs = []
    for index in range(num_clips):
        rng = np.random.default_rng([seed, index, 0])
        k = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        names = rng.choice(len(INSTRUMENTS), size=k, replace=False)
        spans = []
        for i in sorted(names):
            length = float(rng.uniform(2.0, min(4.0, seconds)))
            start = float(rng.uniform(0.0, seconds - length))
            spans.append((INSTRUMENTS[i], round(start, 3), round(start + length, 3)))
        tempo = [None, "fast", "slow"][int(rng.choice(3, p=[0.2, 0.4, 0.4]))]
        loudness = [None, "loud", "quiet"][int(rng.choice(3, p=[0.3, 0.35, 0.35]))]
        specs.append(ClipSpec(seed, index, float(seconds), tuple(spans), tempo, loudness))
    return specs


def render(spec: ClipSpec) -> np.ndarray:
    """The clip's audio: float32 mono at ``SR``, in [-1, 1]."""
    n = int(round(spec.seconds * SR))
    mix = np.zeros(n)
    for j, (name, start, end) in enumerate(spec.spans):
        rng = np.random.default_rng([spec.seed, spec.index, 1, j])
        a, b = int(start * SR), min(int(end * SR), n)
        part = _INSTRUMENT_FN[name](b - a, rng)
        mix[a:b] += _fade(_unit_rms(part))
    if spec.tempo is not None:
        rng = np.random.default_rng([spec.seed, spec.index, 2])
        mix += 0.4 * _ticks(n, _TICK_RATE[spec.tempo], rng)
    rng = np.random.default_rng([spec.seed, spec.index, 3])
    mix *= _TARGET_RMS[spec.loudness] / max(_rms(mix), 1e-9)
    mix += _NOISE_FLOOR_RMS * _pink_noise(n, rng)
    return np.clip(mix, -1.0, 1.0).astype(np.float32)


def clip_mel(spec: ClipSpec) -> np.ndarray:
    """``audio.log_mel(render(spec))``: the builder's per-clip job (runs in pool workers)."""
    return audio.log_mel(render(spec))


# ---------------------------------------------------------------------------------------------
# Instruments: fn(num_samples, rng) -> float64 signal of that length.


def _notes(n: int, rng: np.random.Generator, low_hz: float, octaves: int, dur: tuple[float, float]):
    """Yields (start_sample, length, f0) of consecutive notes on a pentatonic scale."""
    pos = 0
    while pos < n:
        length = min(int(rng.uniform(*dur) * SR), n - pos)
        step = rng.choice(_PENTATONIC) + 12 * rng.integers(0, octaves)
        yield pos, length, low_hz * 2 ** (step / 12)
        pos += length


def _plucked(n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    dur = rng.uniform(0.22, 0.32)
    for pos, length, f0 in _notes(n, rng, 392.0, 2, (dur, dur)):
        period = max(int(round(SR / f0)), 2)
        excitation = np.zeros(length)
        excitation[: min(period, length)] = rng.uniform(-1, 1, min(period, length))
        a = np.zeros(period + 2)
        a[0], a[period], a[period + 1] = 1.0, -0.497, -0.497
        out[pos : pos + length] = signal.lfilter([1.0], a, excitation)
    return out


def _bowed(n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    for pos, length, f0 in _notes(n, rng, 110.0, 2, (0.8, 1.3)):
        t = np.arange(length) / SR
        vib = 1.0 + 0.012 * np.sin(2 * np.pi * 5.5 * t + rng.uniform(0, 2 * np.pi))
        phase = 2 * np.pi * np.cumsum(f0 * vib) / SR
        k = np.arange(1, int(4000 / f0) + 1)
        wave = (np.sin(np.outer(phase, k)) / k**1.2).sum(axis=1)
        env = np.minimum(t / 0.25, 1.0) * np.minimum((t[::-1] + 1 / SR) / 0.08, 1.0)
        out[pos : pos + length] = wave * env
    return out


def _piano(n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    for pos, length, f0 in _notes(n, rng, 130.8, 2, (0.6, 0.9)):
        t = np.arange(length) / SR
        chord = np.zeros(length)
        for interval in (0, 4, 7):
            f = f0 * 2 ** (interval / 12)
            for k in range(1, 11):
                fk = k * f * np.sqrt(1 + 4e-4 * k * k)
                if fk > 7000:
                    break
                chord += np.sin(2 * np.pi * fk * t) * np.exp(-t * (1.5 + 0.8 * k)) / k
        out[pos : pos + length] = chord
    return out


def _flute(n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    for pos, length, f0 in _notes(n, rng, 523.3, 2, (0.4, 0.8)):
        t = np.arange(length) / SR
        phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.005 * np.sin(2 * np.pi * 5 * t))) / SR
        tone = np.sin(phase) + 0.15 * np.sin(2 * phase)
        b, a = signal.butter(2, [0.8 * f0, min(1.25 * f0, 0.45 * SR)], btype="band", fs=SR)
        breath = signal.lfilter(b, a, rng.standard_normal(length))
        breath *= 0.3 / max(_rms(breath), 1e-9)
        env = np.minimum(t / 0.08, 1.0) * np.minimum((t[::-1] + 1 / SR) / 0.05, 1.0)
        out[pos : pos + length] = (tone + breath) * env
    return out


def _drums(n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    beat = int(rng.uniform(0.38, 0.5) * SR)
    t = np.arange(int(0.3 * SR)) / SR
    kick = np.sin(2 * np.pi * np.cumsum(45 + 75 * np.exp(-t * 30)) / SR) * np.exp(-t * 12)
    b, a = signal.butter(2, [1000, 5000], btype="band", fs=SR)
    for i, pos in enumerate(range(0, n, beat)):
        if i % 2 == 0:
            hit = 1.5 * kick
        else:
            noise = signal.lfilter(b, a, rng.standard_normal(t.size))
            hit = (2.0 * noise + 0.3 * np.sin(2 * np.pi * 180 * t)) * np.exp(-t * 25)
        m = min(hit.size, n - pos)
        out[pos : pos + m] += hit[:m]
    return out


def _synth(n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    for pos, length, f0 in _notes(n, rng, 220.0, 2, (0.125, 0.125)):
        t = np.arange(length) / SR
        k = np.arange(1, int(7000 / f0) + 1, 2)
        wave = (np.sin(2 * np.pi * f0 * np.outer(t, k)) / k).sum(axis=1)
        out[pos : pos + length] = wave * (t < 0.8 * 0.125)
    return out


_INSTRUMENT_FN = {
    "plucked": _plucked,
    "bowed": _bowed,
    "piano": _piano,
    "flute": _flute,
    "drums": _drums,
    "synth": _synth,
}


def _ticks(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """A hi-hat-like tick (60 ms of noise above 2.5 kHz) every ``1/rate`` s from a random phase.

    Long and broad enough to stand out across the upper mel bands over any instrument, so the
    tempo tags are learnable from a 4 s crop (4 ticks per second against 1).
    """
    out = np.zeros(n)
    length = int(0.06 * SR)
    b, a = signal.butter(4, 2500, btype="high", fs=SR)
    env = np.exp(-np.arange(length) / SR * 50)
    period = int(SR / rate)
    for pos in range(int(rng.integers(0, period)), n, period):
        m = min(length, n - pos)
        out[pos : pos + m] += (signal.lfilter(b, a, rng.standard_normal(length)) * env)[:m]
    return 12.0 * out


def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with a 1/f spectrum (a quiet room tone under everything)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1.0))
    return _unit_rms(np.fft.irfft(spectrum, n))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / max(_rms(x), 1e-9)


def _fade(x: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    """10 ms linear fade in and out, so span edges do not click."""
    m = min(int(seconds * SR), x.size // 2)
    if m:
        ramp = np.linspace(0.0, 1.0, m)
        x[:m] *= ramp
        x[-m:] *= ramp[::-1]
    return x


def main(argv: list[str] | None = None) -> int:
    """`python -m jaxtag.data_prep.synth OUT.wav [--seed S] [--index I] [--seconds T]`."""
    import argparse

    import soundfile as sf

    parser = argparse.ArgumentParser(
        prog=f"python -m {__package__}.synth",
        description="Write one synthetic clip (as the synthetic_tags builder makes them) to a file "
        "and print its tags and where their evidence is.",
    )
    parser.add_argument("out", help="audio file to write (.wav, .flac, .ogg)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, default=0, help="which clip of that seed")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    spec = make_specs(args.index + 1, args.seconds, args.seed)[args.index]
    extension = os.path.splitext(args.out)[1].lstrip(".").upper()
    if extension not in sf.available_formats():
        parser.error(f"{args.out}: unknown audio format {extension!r} (use .wav, .flac or .ogg)")
    with atomic_write(args.out, "wb") as f:
        sf.write(f, render(spec), SR, format=extension)
    print(f"wrote {args.out}: {args.seconds:.1f} s")
    for name, (start, end) in zip(TAG_NAMES, spec.evidence(), strict=True):
        if start >= 0:
            print(f"  {name:<8} {start:5.2f}-{end:5.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
