"""Audio in, one vector per input out: windows -> batched model -> mean, for many inputs at once.

A prediction is the mean of the input's windows' outputs: the 16-chunk evaluation protocol for
clips up to `PROTOCOL_MAX_SECONDS` (what the models are scored with), adjacent 256-frame windows
(the last one flush with the end) for longer tracks. With `windows=True` the adjacent windows of
every input are reported *in addition* (taggrams, `--segments`); the input's own prediction does
not change. Windows of several inputs share one batch; decoding runs in a thread pool ahead of
the model and long files are decoded block by block (`streaming.stream_log_mel`), so memory
stays bounded however long the files are. An input that cannot be read, or whose outputs are
not finite, comes back with its error; the others go on.

What runs the model is an *engine* (jaxtag/engines.py): `jax`, `onnx` or `openvino` (the graph
of jaxtag/export.py in onnxruntime or OpenVINO, on the CPU); `auto` is the measured fastest on a
CPU-only JAX backend, jax on an accelerator. The *precision* is float32 (exact) or bfloat16 (the
chip's native bf16, refused on a CPU without it). The Python API and the commands stand on this.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxtag import audio, engines, streaming
from jaxtag.engines import onnx_runtime_missing
from jaxtag.errors import JaxtagError
from jaxtag.result_files import Record

if TYPE_CHECKING:  # jax, flax and orbax load inside functions: `--help` needs none of them
    from jaxtag.checkpoint import LoadedModel

PROTOCOL_MAX_SECONDS = 31.0  # MTAT clips are 29.1 s, MSD previews 30 s
WINDOW_SECONDS = float(audio.frames_to_seconds(audio.CHUNK_FRAMES))
ENGINES = ("auto", "jax", "onnx", "openvino")
PRECISIONS = ("float32", "bfloat16")
# `auto`'s rule where nothing is measured (JAXTAG_AUTOTUNE=off) on a CPU-only JAX backend when
# onnxruntime is installed (on an accelerator it is always jax): onnx was faster end to end and
# at start-up on the 2-core CPU of README.md, Benchmarks (bench/bench_inference.py).
AUTO_ENGINE = "onnx"
ONNX_OUTPUTS = engines.GRAPH_OUTPUTS  # the WindowScorer outputs the exported graph has


class InputError(JaxtagError):
    """Inputs that name no usable audio (a missing --files-from list, an empty folder...)."""


# ----------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(
    items: Iterable[str], files_from: str | None = None, skipped: list[str] | None = None
) -> list[str]:
    """Files to process: each item as given, directories replaced by the audio files under them
    (recursively, sorted, `audio.AUDIO_EXTENSIONS`), then the lines of `files_from` ("-" reads
    stdin). A path named twice is processed once. The files of a directory that are not audio
    are appended to `skipped` when given (the commands say how many and of which kinds).

    `files_from` is split on newlines only and every other character kept (a name may hold
    spaces at either end, a form feed or U+2028); names that are not UTF-8 come back with
    surrogate escapes (`os.fsdecode`), as the file system has them.

    Raises:
      InputError: `files_from` cannot be read, or a directory holds no audio file.
    """
    paths: list[str] = []
    for item in items:
        if os.path.isdir(item):
            names = sorted(os.path.join(root, n) for root, _, ns in os.walk(item) for n in ns)
            found = [n for n in names if n.lower().endswith(audio.AUDIO_EXTENSIONS)]
            if skipped is not None:
                skipped += [n for n in names if not n.lower().endswith(audio.AUDIO_EXTENSIONS)]
            if not found:
                raise InputError(
                    f"{item}: no audio files ({', '.join(audio.AUDIO_EXTENSIONS)}) in this "
                    "directory or below"
                )
            paths += found
        else:
            paths.append(item)
    if files_from is not None:
        try:
            if files_from == "-":
                data = sys.stdin.buffer.read()
            else:
                data = Path(files_from).read_bytes()
        except OSError as err:
            raise InputError(f"{files_from}: cannot read the file list ({err})") from err
        paths += [os.fsdecode(line) for line in data.split(b"\n") if line]
    return list(dict.fromkeys(paths))


def skipped_summary(skipped: list[str]) -> str | None:
    """'N files that are not audio skipped (.txt 2, .jpg 1)', or None when there are none."""
    if not skipped:
        return None
    kinds: dict[str, int] = {}
    for name in skipped:
        suffix = os.path.splitext(name)[1].lower() or "no extension"
        kinds[suffix] = kinds.get(suffix, 0) + 1
    counts = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return f"{len(skipped)} files in the folders are not audio and were skipped ({counts})"


def choose_engine(
    engine: str,
    output: str = "probabilities",
    backend: str | None = None,
    precision: str = "float32",
) -> str:
    """The engine that runs `output` when `engine` is asked for, by the rule (`engine_for`
    measures `auto`): on the CPU of JAX's `backend` (default: its default backend) `auto` runs
    `AUTO_ENGINE` in float32, openvino in bfloat16, where it is among the `candidates`; else jax.

    Raises:
      InputError: an engine asked for explicitly that cannot run here (not installed, an output
        the ONNX graph does not have, onnx in bfloat16), or bfloat16 on a CPU without it.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    on_cpu = engine in ("onnx", "openvino")  # they run on the CPU whatever JAX has
    if on_cpu:
        if output not in ONNX_OUTPUTS:
            raise InputError(
                f"the {engine} engine: the ONNX graph outputs only the tag probabilities and the "
                f"pooled embedding, not {output!r}; use the jax engine"
            )
        problem = onnx_runtime_missing() if engine == "onnx" else engines.openvino_missing()
        if problem:
            raise InputError(problem)
        if engine == "onnx" and precision != "float32":
            raise InputError("the onnx engine runs float32 only; use --engine openvino or jax")
    else:
        if backend is None:
            import jax

            backend = jax.default_backend()
        on_cpu = backend == "cpu"
    problem = engines.bf16_problem() if precision == "bfloat16" and on_cpu else None
    if problem:
        raise InputError(problem)
    if engine != "auto":
        return engine
    preferred = AUTO_ENGINE if precision == "float32" else "openvino"
    return preferred if preferred in candidates(output, precision, backend) else "jax"


def candidates(output: str, precision: str, backend: str) -> list[str]:
    """The engines `auto` chooses among: jax on an accelerator; on the CPU also onnx (float32)
    and openvino where installed and the ONNX graph has `output`."""
    names = ["jax"]
    if backend == "cpu" and output in ONNX_OUTPUTS:
        if precision == "float32" and onnx_runtime_missing() is None:
            names.append("onnx")
        if engines.openvino_missing() is None:
            names.append("openvino")
    return names


def engine_for(
    loaded: LoadedModel,
    engine: str,
    output: str,
    precision: str,
    batch_size: int,
    backend: str | None = None,
) -> tuple[str, engines.Predictor]:
    """The engine that runs `output` (the one asked for, or `auto`'s measured choice among
    `candidates`: jaxtag/engines.py) and its predictor, built. Raises as `choose_engine`."""
    import jax

    backend = backend or jax.default_backend()
    rule = choose_engine(engine, output, backend, precision)
    names = candidates(output, precision, backend) if engine == "auto" else [rule]
    return engines.choose(loaded, names, rule, output, precision, batch_size, backend)


# ----------------------------------------------------------------------------------------------
# The model on fixed-size batches of windows


def padded_batch(windows: int, batch_size: int) -> int:
    """The batch a jitted call of `windows` windows runs at: the next power of two, at most
    `batch_size`. Each size compiles once, so a few sizes serve every call, and the memory a
    call takes follows the windows waiting, not `--batch-size` (a short clip with a batch size
    of 5000 would otherwise compute 5000 windows)."""
    return min(batch_size, 1 << max(windows - 1, 0).bit_length())


class WindowScorer:
    """A loaded model as a function of its windows, batch by batch: with the jax engine a jitted,
    fixed-batch-size function (one compilation per padded size), with the onnx and openvino
    engines the exported graph (any batch size, so the last batch is not padded).

    `output` is "probabilities" (the tags' sigmoid outputs) or a name of
    `MTSA.representations` ("pooled", the classifier's input, is `MTSA.features`); `engine` is
    one of `ENGINES` (`engine` then holds the one chosen: see `engine_for`) and `precision`
    one of `PRECISIONS`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        batch_size: int = 16,
        output: str = "probabilities",
        engine: str = "jax",
        precision: str = "float32",
    ):
        import jax

        from jaxtag.checkpoint import CheckpointError

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for name, leaf in jax.tree_util.tree_leaves_with_path(loaded.variables):
            if not np.all(np.isfinite(leaf)):
                raise CheckpointError(
                    f"{loaded.path}: the weights hold NaN or infinite values "
                    f"({jax.tree_util.keystr(name)}); the checkpoint is damaged"
                )
        self.loaded = loaded
        self.tags = loaded.tags
        self.batch_size = batch_size
        self.output = output
        self.precision = precision
        self.engine, self._predict = engine_for(loaded, engine, output, precision, batch_size)

    def predict_windows(self, windows: np.ndarray) -> np.ndarray:
        """(N, n_mels, frames) -> (N, D) outputs, in batches of at most `batch_size`."""
        out = []
        for i in range(0, len(windows), self.batch_size):
            chunk = windows[i : i + self.batch_size]
            pad = (
                padded_batch(len(chunk), self.batch_size) - len(chunk)
                if self.engine == "jax"
                else 0
            )
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(self._predict(chunk))[: len(chunk) - pad])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------------------------
# Inputs -> windows -> one vector per input


@dataclasses.dataclass(frozen=True, eq=False)
class Waveform:
    """Audio already in memory: `samples` (samples,) or (samples, channels) at `sr` Hz."""

    samples: np.ndarray
    sr: int
    name: str = audio.WAVEFORM


Source = str | os.PathLike | Waveform


def file_window_starts(n_frames: int) -> np.ndarray:
    """Start frames of the windows a file's own prediction averages (see the module doc)."""
    if audio.frames_to_seconds(n_frames) > PROTOCOL_MAX_SECONDS:
        return audio.sliding_window_starts(n_frames)
    return audio.eval_chunk_starts(n_frames)


def file_windows(mel: np.ndarray, segments: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The windows of the file's own prediction (or, with `segments`, the adjacent windows that
    `--segments` reports) and their start frames."""
    mel = audio.pad_to(mel)
    n = mel.shape[-1]
    starts = audio.sliding_window_starts(n) if segments else file_window_starts(n)
    return np.stack([mel[:, s : s + audio.CHUNK_FRAMES] for s in starts]), starts


@dataclasses.dataclass
class Scored:
    """One file's result: `output` (D,) averages its file windows; `window_outputs` (W, D) are
    the adjacent windows starting at `window_starts` seconds (when windows were asked for)."""

    path: str
    duration: float = 0.0  # seconds
    output: np.ndarray | None = None
    window_starts: np.ndarray | None = None
    window_outputs: np.ndarray | None = None
    error: str | None = None

    def record(self) -> Record:
        return Record(
            self.path, self.duration, self.output, self.window_starts, self.window_outputs
        )


@dataclasses.dataclass
class Decoded:
    """A decoded input waiting for the model (`decode`; jaxtag/serving.py scores it too): its
    windows are `mel[:, s:s+256]` for s in `starts` (each distinct start once);
    `file_rows`/`window_rows` index `starts`."""

    path: str
    duration: float = 0.0
    mel: np.ndarray | None = None
    starts: np.ndarray | None = None
    file_rows: np.ndarray | None = None
    window_rows: np.ndarray | None = None
    outputs: np.ndarray | None = None
    scored: int = 0
    error: str | None = None

    def window(self, row: int) -> np.ndarray:
        """The (n_mels, 256) window that starts at `starts[row]`."""
        return self.mel[:, self.starts[row] : self.starts[row] + audio.CHUNK_FRAMES]


def source_name(source: Source) -> str:
    return source.name if isinstance(source, Waveform) else os.fspath(source)


def log_mel_of(source: Source) -> tuple[np.ndarray | streaming.SpilledLogMel, float]:
    """(the whole log-mel, seconds) of a file or a waveform: the same numbers for a file and
    for its decoded samples. A very long file's mel is read from a temporary file window by
    window (`streaming.open_log_mel`), so memory does not grow with the file's length."""
    if isinstance(source, Waveform):
        y = audio.load_waveform(source.samples, source.sr)
        return audio.log_mel(y), y.size / audio.SAMPLE_RATE
    return streaming.open_log_mel(source)


def decode(source: Source, windows: bool) -> Decoded:
    """An input's log-mel and the distinct window starts its prediction (and, with `windows`,
    its taggram) needs; an input that cannot be used comes back with `error` set."""
    path = source_name(source)
    try:
        mel, duration = log_mel_of(source)
    except (audio.AudioError, OSError, ValueError) as err:
        return Decoded(path, error=str(err))
    short = audio.too_short(mel.shape[-1])
    if short:
        return Decoded(path, error=f"{path}: {short}")
    mel = audio.pad_to(mel)
    file_starts = file_window_starts(mel.shape[-1])
    window_starts = audio.sliding_window_starts(mel.shape[-1]) if windows else file_starts[:0]
    starts = np.unique(np.concatenate([file_starts, window_starts]))
    return Decoded(
        path,
        duration,
        mel,
        starts,
        np.searchsorted(starts, file_starts),
        np.searchsorted(starts, window_starts) if windows else None,
    )


def _decoded_ahead(paths: list[Source], windows: bool, workers: int) -> Iterator[Decoded]:
    """Decoded files in order; a few files ahead of the consumer, not all of them (memory)."""
    ahead = 2 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(decode, p, windows) for p in paths[:ahead])
        for index in range(len(paths)):
            decoded = pending.popleft().result()
            if index + ahead < len(paths):
                pending.append(pool.submit(decode, paths[index + ahead], windows))
            yield decoded


def result_of(scorer: WindowScorer, item: Decoded) -> Scored:
    """The Scored of an input whose `outputs` are all in (or that failed to decode)."""
    if item.error:
        return Scored(item.path, error=item.error)
    result = Scored(item.path, item.duration, item.outputs[item.file_rows].mean(axis=0))
    if item.window_rows is not None:
        result.window_starts = np.asarray(audio.frames_to_seconds(item.starts[item.window_rows]))
        result.window_outputs = item.outputs[item.window_rows]
    if not np.all(np.isfinite(item.outputs)):
        return Scored(
            item.path,
            error=f"{item.path}: the model's outputs are not finite (NaN or inf); is the "
            f"checkpoint {scorer.loaded.path} damaged?",
        )
    return result


def score_files(
    scorer: WindowScorer,
    paths: Iterable[Source],
    windows: bool = False,
    progress: bool = True,
    workers: int = 2,
) -> Iterator[Scored]:
    """Yields one Scored per input (a path or a `Waveform`), in order, as soon as its last window
    is scored; unreadable inputs (and inputs with non-finite outputs) come back with `error`
    set. With `windows`, every input's adjacent windows are reported too. The progress bar
    shows files/s and minutes of audio per second."""
    from tqdm import tqdm

    paths = list(paths)
    bar = tqdm(total=len(paths), unit="file", desc="files", disable=not progress or len(paths) < 2)
    started, audio_seconds = time.perf_counter(), 0.0
    waiting: deque[Decoded] = deque()  # in input order, each until all its windows are scored
    batch: list[tuple[Decoded, int]] = []

    def run_batch() -> None:
        inputs = np.stack([item.window(row) for item, row in batch])
        outputs = scorer.predict_windows(inputs)
        for (item, row), output in zip(batch, outputs, strict=True):
            if item.outputs is None:
                item.outputs = np.zeros((len(item.starts), len(output)), np.float32)
            item.outputs[row] = output
            item.scored += 1
        batch.clear()

    def finished() -> Iterator[Scored]:
        nonlocal audio_seconds
        while waiting and (waiting[0].error or waiting[0].scored == len(waiting[0].starts)):
            item = waiting.popleft()
            audio_seconds += item.duration
            bar.update(1)
            rate = audio_seconds / 60 / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{rate:.1f} audio min/s", refresh=False)
            yield result_of(scorer, item)

    for item in _decoded_ahead(paths, windows, workers):
        waiting.append(item)
        for row in range(0 if item.error else len(item.starts)):
            batch.append((item, row))
            if len(batch) == scorer.batch_size:
                run_batch()
                yield from finished()
        yield from finished()
    if batch:
        run_batch()
    yield from finished()
    bar.close()


def top_tags(probs: np.ndarray, tags: list[str], k: int) -> list[tuple[str, float]]:
    """The `k` most probable (tag, probability), best first (ties keep the model's order)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(tags[i], float(probs[i])) for i in order]
