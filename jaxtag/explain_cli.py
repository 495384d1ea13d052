"""Draw attention and tag-wise contribution maps for one chunk of an audio file.

`jaxtag explain FILE --checkpoint DIR --out fig.png` draws, for the 256-frame chunk of FILE that
starts at `--start`: the log-mel, the first layer's attention received by each frame, the last
layer's CLS-row attention per head and averaged, and the tag-wise contribution maps (computed by
jaxtag/explain.py). The figure format follows the suffix of `--out` (png, pdf, svg, ...).

Only the chunk and `MARGIN_SECONDS` on either side are decoded, so a chunk of an hour-long file
costs seconds of audio in memory. The log-mel is then the whole file's, frame for frame, except
for the dB floor: `TOP_DB` below the loudest bin of the decoded window instead of the file's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from jaxtag import audio

# Audio decoded before and after the chunk: whole STFT frames for the edge frames and room for
# the resampler's edge transients. A multiple of the hop, so frames stay on the file's grid.
MARGIN_SECONDS = 32 * audio.HOP / audio.SAMPLE_RATE  # 0.512 s


class ChunkError(ValueError):
    """A chunk that the file cannot provide (e.g. --start past the end). Names the file."""


def _file_info(path: str | Path) -> tuple[int, int]:
    """(mel frames of the whole file at `audio.SAMPLE_RATE`, the file's sample rate), from its
    header: nothing is decoded."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as err:  # libsndfile raises several types
        raise audio.AudioError(
            f"{path}: cannot decode audio ({type(err).__name__}: {err})"
        ) from err
    samples = int(np.ceil(info.frames * audio.SAMPLE_RATE / info.samplerate))  # as resampled
    return 1 + max(samples, audio.N_FFT) // audio.HOP, info.samplerate


def chunk_log_mel(path: str | Path, start_frame: int) -> np.ndarray:
    """The (N_MELS, CHUNK_FRAMES) log-mel chunk of `path` from `start_frame`, decoding only it
    and a margin (short files are padded as `audio.crop` does).

    Raises:
      audio.AudioError: the file cannot be decoded.
      ChunkError: `start_frame` is past the last chunk start.
    """
    if not Path(path).is_file():
        raise audio.AudioError(f"{path}: no such audio file")
    n_frames, file_rate = _file_info(path)
    last_start = max(n_frames - audio.CHUNK_FRAMES, 0)
    if not 0 <= start_frame <= last_start:
        raise ChunkError(
            f"{path}: --start {audio.frames_to_seconds(start_frame):.2f} s is past the last chunk "
            f"start ({audio.frames_to_seconds(last_start):.2f} s)"
        )
    margin = audio.seconds_to_frames(MARGIN_SECONDS)
    # The decoded window's first frame in the file, on a whole sample of the file's rate too
    # (every 5 frames at 44.1 kHz), so resampling the window matches resampling the file.
    step = audio.SAMPLE_RATE // math.gcd(audio.HOP * file_rate, audio.SAMPLE_RATE)
    first = max(start_frame - margin, 0) // step * step
    seconds = audio.frames_to_seconds(start_frame + audio.CHUNK_FRAMES + margin - first)
    y = audio.load_audio(path, offset=audio.frames_to_seconds(first), duration=seconds)
    mel = audio.log_mel(y)
    start = min(start_frame - first, max(mel.shape[-1] - audio.CHUNK_FRAMES, 0))
    return audio.crop(mel, start)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Per-row min-max scaling so each tag's map uses the full colour range."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def figure_formats() -> set[str]:
    """The file suffixes (without the dot) that matplotlib can write."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def plot(
    maps: dict[str, np.ndarray],
    tags: list[str],
    chosen: list[str],
    start: float,
    title: str,
    out: str | Path,
) -> None:
    """Writes the figure (atomically, in the format of out's suffix): mel, first-layer
    attention, last-layer CLS attention, tag maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxtag.fileio import atomic_write

    frames = maps["mel"].shape[-1]
    t0, t1 = start, start + float(audio.frames_to_seconds(frames))
    extent_t = (t0, t1)
    times = start + np.asarray(audio.frames_to_seconds(np.arange(frames)))
    heads = maps["last_layer_cls_heads"].shape[0]
    fig, axes = plt.subplots(
        5,
        1,
        figsize=(10, 11),
        sharex=True,
        gridspec_kw={
            "height_ratios": [3, 1.2, max(heads, 2) * 0.35, 1.2, max(len(chosen), 1) * 0.5 + 0.5]
        },
    )
    axes[0].imshow(
        maps["mel"],
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(*extent_t, 0, maps["mel"].shape[0]),
    )
    axes[0].set_ylabel("mel bin")
    axes[0].set_title(title, fontsize=10)
    axes[1].plot(times, maps["first_layer_received"], color="tab:blue")
    axes[1].set_ylabel("layer 1\nreceived")
    axes[2].imshow(
        maps["last_layer_cls_heads"], aspect="auto", cmap="viridis", extent=(*extent_t, heads, 0)
    )
    axes[2].set_ylabel("last layer\nCLS, per head")
    axes[3].plot(times, maps["last_layer_cls_mean"], color="tab:green")
    axes[3].set_ylabel("last layer\nCLS, mean")
    idx = [tags.index(t) for t in chosen]
    tag_maps = _normalise(maps["contributions"][:, idx].T)
    axes[4].imshow(
        tag_maps,
        aspect="auto",
        cmap="inferno",
        extent=(*extent_t, len(idx), 0),
        interpolation="nearest",
    )
    axes[4].set_yticks(np.arange(len(idx)) + 0.5, chosen)
    axes[4].set_ylabel(f"tag-wise (layer {int(maps['contribution_layer']) + 1})")
    axes[4].set_xlabel("time (s)")
    fig.tight_layout()
    try:
        with atomic_write(out, "wb") as f:
            fig.savefig(f, format=Path(out).suffix[1:].lower(), dpi=80)
    finally:
        plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="an audio file (wav, flac, ogg, mp3)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or workdir")
    parser.add_argument(
        "--out", required=True, help="figure path; the suffix picks the format (.png, .pdf, .svg)"
    )
    parser.add_argument(
        "--tags", default=None, help="comma-separated tags to map (default: the top 3 predicted)"
    )
    parser.add_argument(
        "--start", type=float, default=0.0, help="chunk start in seconds (>= 0, default 0)"
    )
    parser.add_argument(
        "--layer", type=int, default=-1, help="encoder layer for the tag-wise maps (default: last)"
    )
    parser.add_argument("--save-npz", default=None, help="also write the raw maps to this .npz")


def _output_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line's output paths and start, before any work."""
    from jaxtag.fileio import unwritable_reason

    if not (math.isfinite(args.start) and args.start >= 0):
        return f"--start must be a number of seconds >= 0, got {args.start:g}"
    suffix = Path(args.out).suffix[1:].lower()
    if suffix not in figure_formats():
        known = ", ".join(sorted(figure_formats()))
        return f"{args.out}: unknown figure format {suffix!r} (the suffix picks one of: {known})"
    for path in (args.out, args.save_npz):
        problem = path and unwritable_reason(path)
        if problem:
            return problem
    return None


def run(args: argparse.Namespace) -> int:
    from jaxtag import explain
    from jaxtag.checkpoint import CheckpointError, load_model
    from jaxtag.fileio import atomic_write

    problem = _output_problem(args)
    if problem:
        print(f"jaxtag explain: {problem}", file=sys.stderr)
        return 2
    start_frame = audio.seconds_to_frames(args.start)
    try:
        loaded = load_model(args.checkpoint)
        chunk = chunk_log_mel(args.file, start_frame)
    except (CheckpointError, audio.AudioError, ChunkError) as err:
        print(f"jaxtag explain: {err}", file=sys.stderr)
        return 2
    if args.tags:
        chosen = [t.strip() for t in args.tags.split(",") if t.strip()]
        unknown = [t for t in chosen if t not in loaded.tags]
        if unknown:
            print(
                f"jaxtag explain: unknown tags {unknown}; the model knows {loaded.tags}",
                file=sys.stderr,
            )
            return 2
    else:
        chosen = None
    n_layers = loaded.config.num_layers
    if not -n_layers <= args.layer < n_layers:
        print(
            f"jaxtag explain: --layer must be in [-{n_layers}, {n_layers - 1}]",
            file=sys.stderr,
        )
        return 2
    maps = explain.explain_chunk(loaded, chunk, args.layer)
    order = np.argsort(-maps["probs"])
    if chosen is None:
        chosen = [loaded.tags[i] for i in order[:3]]
    start = float(audio.frames_to_seconds(start_frame))
    top = ", ".join(f"{loaded.tags[i]} {maps['probs'][i]:.2f}" for i in order[:5])
    title = f"{Path(args.file).name} @ {start:.1f} s — {top}"
    try:
        plot(maps, loaded.tags, chosen, start, title, args.out)
        print(f"figure written to {args.out}")
        if args.save_npz:
            with atomic_write(args.save_npz, "wb") as f:
                np.savez_compressed(f, tags=np.array(loaded.tags), start_seconds=start, **maps)
            print(f"maps written to {args.save_npz}")
    except OSError as err:
        print(f"jaxtag explain: cannot write: {err}", file=sys.stderr)
        return 2
    return 0
