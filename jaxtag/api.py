"""jaxtag's Python API: `jaxtag.load(source) -> Tagger`, and what a Tagger does with audio.

    import jaxtag

    tagger = jaxtag.load("ponswon")          # the released weights (downloaded once, cached)
    tagger.tag("song.mp3", top_k=3)          # [{"label": "guitar", "score": 0.91}, ...]
    tagger.predict(["a.wav", "b.flac"])      # (2, 50) float32 probabilities
    starts, probs = tagger.taggram("song.mp3")
    vector = tagger.embed(samples, sr=44100)  # a numpy waveform works wherever a path does
    tagger.explain("song.mp3", start=30).plot("why.png")

Every command of the `jaxtag` CLI is a shell over this module (jaxtag/cli/). Bad input raises
`jaxtag.JaxtagError` with the one-line message the commands print.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtag import scoring
from jaxtag.errors import JaxtagError

if TYPE_CHECKING:  # loading a Tagger imports JAX; `import jaxtag` does not
    from jaxtag.checkpoint import LoadedModel
    from jaxtag.explain import Explanation
    from jaxtag.model import ModelConfig

MAX_START_SECONDS = 365 * 24 * 3600.0
AudioInput = str | os.PathLike | np.ndarray
"""A path to an audio file (wav, flac, ogg, mp3), or a waveform: a numpy array of shape
(samples,) or (samples, channels), with its sample rate given as `sr=`."""


def open_model(source: str | os.PathLike) -> LoadedModel:
    """The model that `source` names: a jaxtag checkpoint or training workdir (its best step), a
    PyTorch `.pth` state dict (converted in memory), or a released model's name ("ponswon": the
    paper's weights, downloaded and converted once into the user cache directory).

    Raises:
      JaxtagError: nothing usable there (the message says what and where).
    """
    from jaxtag import checkpoint, convert, released

    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists() and released.is_released_name(text):
        return checkpoint.load_model(released.converted_checkpoint(text))
    if path.is_file():
        return convert.load_weights(path)
    return checkpoint.load_model(path)


def load(
    source: str | os.PathLike,
    engine: str = "auto",
    batch_size: int = 16,
    precision: str = "float32",
) -> Tagger:
    """A Tagger for `source` (see `open_model`: a checkpoint, a workdir, a `.pth` or "ponswon").

    Args:
      source: where the model is.
      engine: what runs the model: "jax" (jitted, any device), "onnx" (onnxruntime on the CPU,
        needs `pip install 'jaxtag[export]'`), "openvino" (OpenVINO on the CPU, needs
        `pip install 'jaxtag[openvino]'`) or "auto": on a CPU-only machine the fastest of the
        installed engines, measured at first use and remembered for this machine, model shape,
        precision and batch size; on an accelerator jax.
      batch_size: windows (~4.1 s each) per model call.
      precision: "float32" (the default: exact) or "bfloat16": the chip's native bf16 (on the
        CPU: AVX512-BF16 or AMX, with jax or openvino; on an accelerator, jax). Refused with a
        `JaxtagError` on a CPU without native bf16. Tag probabilities stay within 5e-3 of
        float32 (docs/tagging.md, Precision).

    The compiled model is kept in JAX's persistent compilation cache (as for the commands:
    `~/.cache/jaxtag/jax`, `JAXTAG_CACHE_DIR=DIR|off`), unless the program set one up itself.
    """
    from jaxtag.runtime import enable_compilation_cache

    enable_compilation_cache(keep_existing=True)
    return Tagger(open_model(source), engine=engine, batch_size=batch_size, precision=precision)


def convert_weights(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_heads: int | None = None,
    tags: list[str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, ModelConfig]:
    """Converts a `.pth` file, or the released "ponswon" (downloaded), to a checkpoint at
    `out_dir`; returns its path and model config. `num_heads` defaults to 8 (the released
    model's; no tensor shape tells it) and `tags` to the MTAT top-50 for 50 outputs."""
    from jaxtag import convert, released

    text = os.fspath(source)
    if not Path(text).expanduser().exists() and released.is_released_name(text):
        entry = released.RELEASED[text]
        cached = released.weights_dir() / entry.filename
        convert.check_destination(Path(out_dir).absolute(), cached, overwrite)  # before fetching
        source = released.fetch(text)
        num_heads = entry.num_heads if num_heads is None else num_heads
        tags = list(entry.tags) if tags is None else tags
    heads = 8 if num_heads is None else num_heads
    return convert.convert_file(Path(source).expanduser(), out_dir, heads, tags, overwrite)


class Tagger:
    """A loaded music tagger: tags, taggrams, embeddings and explanations of audio.

    Wherever a method takes `audio`, it takes a path, a numpy waveform with `sr=` (mono
    `(samples,)` or `(samples, channels)`), or a list of either (then it returns one result per
    item, in order). A file and its decoded waveform give the same numbers. A track's prediction
    averages its ~4.1 s windows: the 16-chunk evaluation protocol for clips up to 31 s, adjacent
    windows for longer tracks.
    """

    def __init__(
        self,
        model: LoadedModel,
        engine: str = "auto",
        batch_size: int = 16,
        precision: str = "float32",
    ):
        if engine not in scoring.ENGINES:
            raise JaxtagError(f"engine must be one of {', '.join(scoring.ENGINES)}, got {engine!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise JaxtagError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if precision not in scoring.PRECISIONS:
            raise JaxtagError(
                f"precision must be one of {', '.join(scoring.PRECISIONS)}, got {precision!r}"
            )
        if engine != "auto" or precision != "float32":
            # refused here, before any work, where it cannot run (not installed, no native bf16)
            scoring.choose_engine(engine, precision=precision)
        self.model = model
        self.batch_size = batch_size
        self.requested_engine = engine
        self.precision = precision
        self._scorers: dict[str, scoring.WindowScorer] = {}

    def __repr__(self) -> str:
        built = self._scorers.get("probabilities")  # not measured for a repr
        engine = built.engine if built else self.requested_engine
        return (
            f"Tagger({str(self.path)!r}, {len(self.tags)} tags, engine={engine!r}, "
            f"precision={self.precision!r})"
        )

    @property
    def tags(self) -> list[str]:
        """The tag names, in the order of the model's outputs."""
        return list(self.model.tags)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def path(self) -> Path:
        """Where the model was loaded from (the checkpoint directory or the `.pth` file)."""
        return self.model.path

    @property
    def meta(self) -> dict[str, Any]:
        """The checkpoint's metadata (source, training step, metrics, ...)."""
        return dict(self.model.meta)

    @property
    def num_params(self) -> int:
        from jaxtag.model import count_params

        return count_params(self.model.variables["params"])

    @property
    def layers(self) -> list[str]:
        """The representations `embed` can return: `front_end`, `layer_<i>`..., `pooled`."""
        return ["front_end", *(f"layer_{i}" for i in range(self.config.num_layers)), "pooled"]

    @property
    def engine(self) -> str:
        """The engine ("jax", "onnx" or "openvino") that computes the tag probabilities: the
        one asked for, or what `auto` chose (its measurement, if any, runs on first use)."""
        return self.window_scorer("probabilities").engine

    # ------------------------------------------------------------------------------------------
    # Tags, taggrams, embeddings

    def predict(self, audio: AudioInput | Sequence[AudioInput], sr: int | None = None) -> Any:
        """Tag probabilities: float32 `(tags,)`, or `(N, tags)` for a list."""
        results, single = self._score(audio, sr, "probabilities", windows=False)
        outputs = np.stack([r.output for r in results]).astype(np.float32)
        return outputs[0] if single else outputs

    def tag(
        self, audio: AudioInput | Sequence[AudioInput], top_k: int = 5, sr: int | None = None
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """The `top_k` tags, best first, as `[{"label": str, "score": float}, ...]` (the
        transformers pipeline convention); a list of such lists for a list of inputs."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise JaxtagError(f"top_k must be an integer >= 1, got {top_k!r}")
        probs = self.predict(audio, sr)
        rows = [self.top_tags(p, top_k) for p in np.atleast_2d(probs)]
        return rows[0] if np.ndim(probs) == 1 else rows

    def top_tags(self, probabilities: np.ndarray, top_k: int = 5) -> list[dict[str, Any]]:
        """`[{"label", "score"}]` of the `top_k` highest of one `(tags,)` probability vector."""
        return [
            {"label": t, "score": p} for t, p in scoring.top_tags(probabilities, self.tags, top_k)
        ]

    def taggram(
        self, audio: AudioInput | Sequence[AudioInput], sr: int | None = None
    ) -> tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
        """Tags over time: the start seconds `(W,)` of adjacent ~4.1 s windows (the last one
        flush with the end) and their probabilities `(W, tags)`; a list of pairs for a list."""
        results, single = self._score(audio, sr, "probabilities", windows=True)
        pairs = [
            (np.asarray(r.window_starts, np.float64), r.window_outputs.astype(np.float32))
            for r in results
        ]
        return pairs[0] if single else pairs

    def embed(
        self,
        audio: AudioInput | Sequence[AudioInput],
        layer: str = "pooled",
        sr: int | None = None,
    ) -> np.ndarray:
        """One float32 vector `(D,)` per input (`(N, D)` for a list), averaged over the same
        windows as the tag prediction: `pooled` (the classifier's input), `front_end` or
        `layer_<i>` (the mean of encoder layer i's output tokens); see `layers`."""
        self._check_layer(layer)
        results, single = self._score(audio, sr, layer, windows=False)
        outputs = np.stack([r.output for r in results]).astype(np.float32)
        return outputs[0] if single else outputs

    def predict_windows(self, windows: np.ndarray, output: str = "probabilities") -> np.ndarray:
        """The model on log-mel windows `(N, n_mels, 256)` (`jaxtag.audio.log_mel` cut into
        chunks): `(N, tags)` probabilities, or `(N, D)` vectors of a layer (see `layers`)."""
        if output != "probabilities":
            self._check_layer(output)
        return self.window_scorer(output).predict_windows(np.asarray(windows, np.float32))

    def score(
        self,
        inputs: Iterable[AudioInput],
        output: str = "probabilities",
        windows: bool = False,
        progress: bool = False,
        sr: int | None = None,
    ) -> Iterator[scoring.Scored]:
        """Streams one `scoring.Scored` per input, in order, for any number of inputs: a file
        that cannot be read comes back with `error` set instead of stopping the others (what
        the commands use). `output` is "probabilities" or one of `layers`; `windows` adds each
        input's adjacent windows."""
        if output != "probabilities":
            self._check_layer(output)
        sources = (self._source(item, sr) for item in inputs)
        yield from scoring.score_files(self.window_scorer(output), sources, windows, progress)

    # ------------------------------------------------------------------------------------------
    # Explanations and export

    def explain(
        self,
        audio: AudioInput,
        start: float = 0.0,
        tags: Sequence[str] | None = None,
        layer: int = -1,
        sr: int | None = None,
        file_tags: bool = True,
    ) -> Explanation:
        """The attention and tag-wise contribution maps of the ~4.1 s chunk at `start` seconds
        (computed with JAX whatever the engine): an `Explanation` holding them as arrays, whose
        `plot(path)` draws the figure of `jaxtag explain`. `tags`: the tags to map (default:
        the chunk's top 3); `layer`: the encoder layer whose attention is swapped (default the
        last); `file_tags`: also score the whole input (`predict`) for the figure's title
        (`Explanation.file_probs`); False reads only the chunk and half a second around it."""
        from jaxtag import audio as audio_lib
        from jaxtag import explain, streaming

        if isinstance(audio, list | tuple):
            raise JaxtagError("explain takes one audio input (a path or a waveform), not a list")
        source = self._source(audio, sr)
        if not (isinstance(start, int | float) and math.isfinite(start) and start >= 0):
            raise JaxtagError(f"start must be a number of seconds >= 0, got {start!r}")
        chosen = None if tags is None else [str(t).strip() for t in tags if str(t).strip()]
        unknown = [t for t in chosen or [] if t not in self.tags]
        if unknown:
            raise JaxtagError(f"unknown tags {unknown}; the model knows {self.tags}")
        n_layers = self.config.num_layers
        if not -n_layers <= layer < n_layers:
            raise JaxtagError(f"layer must be in [-{n_layers}, {n_layers - 1}], got {layer}")
        # Any start past a year of audio is past the end: no frame index overflows (1e308).
        start_frame = audio_lib.seconds_to_frames(min(start, MAX_START_SECONDS))
        if isinstance(source, scoring.Waveform):
            chunk = streaming.chunk_log_mel(source.samples, start_frame, source.sr)
        else:
            chunk = streaming.chunk_log_mel(source, start_frame)
        maps = explain.explain_chunk(self.model, chunk, layer)
        if not chosen:
            chosen = [self.tags[i] for i in np.argsort(-maps["probs"], kind="stable")[:3]]
        start_seconds = float(audio_lib.frames_to_seconds(start_frame))
        name = scoring.source_name(source)
        file_probs = self.predict(audio, sr) if file_tags else None
        return explain.Explanation(name, start_seconds, self.tags, chosen, maps, file_probs)

    def export(self, out: str | os.PathLike, check: bool = True, overwrite: bool = False) -> Path:
        """Writes the model as an ONNX file (inputs: log-mel chunks; outputs: probabilities and
        the pooled embedding), checked against jaxtag with onnxruntime first unless `check` is
        False. An existing ONNX file is replaced only with `overwrite`; anything else there is
        refused. Needs `pip install 'jaxtag[export]'`."""
        from jaxtag import export

        return export.export(self.model, out, check, overwrite)

    # ------------------------------------------------------------------------------------------

    def window_scorer(self, output: str = "probabilities") -> scoring.WindowScorer:
        """The model as a function of its windows, for one output (built once, then kept)."""
        if output not in self._scorers:
            self._scorers[output] = scoring.WindowScorer(
                self.model, self.batch_size, output, self.requested_engine, self.precision
            )
        return self._scorers[output]

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise JaxtagError(f"layer {layer!r}: this model has {', '.join(self.layers)}")

    @staticmethod
    def _source(item: Any, sr: int | None) -> scoring.Source:
        if isinstance(item, np.ndarray):
            if sr is None:
                raise JaxtagError("a waveform needs its sample rate: pass sr= (in Hz)")
            return scoring.Waveform(item, sr)
        if isinstance(item, str | os.PathLike):
            return item
        raise JaxtagError(
            "audio must be a path, a numpy waveform (with sr=) or a list of these, got "
            f"{type(item).__name__}"
        )

    def _score(
        self, audio: Any, sr: int | None, output: str, windows: bool
    ) -> tuple[list[scoring.Scored], bool]:
        """Every input scored (the first that fails raises its error) and whether `audio` was
        a single input."""
        single = not isinstance(audio, list | tuple)
        items = [audio] if single else list(audio)
        if not items:
            raise JaxtagError("no audio given (an empty list)")
        results = []
        for result in self.score(items, output, windows, sr=sr):
            if result.error:
                raise JaxtagError(result.error)
            results.append(result)
        return results, single
