"""Why did the model choose a tag? Attention and tag-wise contribution maps of one chunk.

`explain_chunk` computes, for one 256-frame chunk: the first layer's attention received by each
frame (summed over queries, averaged over heads), the last layer's CLS-row attention per head and
averaged, and the tag-wise contribution maps of the paper: in a chosen layer the attention
probabilities are replaced by a one-hot on position t, for every t, and each tag's output is
read. All positions are computed in one vectorised, jitted call; the layers before the chosen one
run once. `Explanation.plot` draws them (the figure of `jaxtag explain`, drawn by
`jaxtag.explain_figure`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtag import audio
from jaxtag.checkpoint import LoadedModel
from jaxtag.errors import JaxtagError
from jaxtag.model import MTSA, attention_maps, build_model

FIGURE_DPI = 100
_PYPLOT = threading.Lock()


@functools.partial(jax.jit, static_argnums=(0, 3))
def tag_contributions(model: MTSA, variables: Any, mel: jax.Array, layer: int) -> jax.Array:
    """Sigmoid outputs (B, S, tags) when layer `layer` attends only to position t, for every t.

    Every query of every head in that layer gets a one-hot attention row on t; the layers before
    it are computed once and shared by all positions.
    """
    hidden = model.apply(variables, mel, layer, method=MTSA.hidden_before)  # (B, S, width)
    seq_len = hidden.shape[1]

    def at(t: jax.Array) -> jax.Array:
        one_hot = jax.nn.one_hot(t, seq_len)[None, None, None, :]  # -> (B, heads, queries, S)
        logits = model.apply(variables, hidden, layer, one_hot, method=MTSA.logits_with_attention)
        return jax.nn.sigmoid(logits)

    return jnp.moveaxis(jax.vmap(at)(jnp.arange(seq_len)), 0, 1)


@functools.partial(jax.jit, static_argnums=(0,))
def predict_with_attention(model: MTSA, variables: Any, mel: jax.Array) -> tuple[jax.Array, list]:
    """Sigmoid outputs (B, tags) and every layer's attention (B, heads, S, S)."""
    logits, state = model.apply(variables, mel, mutable=["intermediates"])
    return jax.nn.sigmoid(logits), attention_maps(state["intermediates"])


def explain_chunk(loaded: LoadedModel, chunk: np.ndarray, layer: int = -1) -> dict[str, np.ndarray]:
    """All maps for one (n_mels, frames) chunk; time-indexed arrays drop the CLS token."""
    model = build_model(loaded.config)
    layer = layer % loaded.config.num_layers
    mel = jnp.asarray(chunk[None], jnp.float32)
    probs, attentions = predict_with_attention(model, loaded.variables, mel)
    contributions = tag_contributions(model, loaded.variables, mel, layer)
    first = np.asarray(attentions[0][0])  # (heads, S, S)
    last = np.asarray(attentions[-1][0])
    return {
        "mel": np.asarray(chunk),
        "probs": np.asarray(probs[0]),
        "first_layer_received": first.sum(axis=1).mean(axis=0)[1:],  # (frames,)
        "last_layer_cls_heads": last[:, 0, 1:],  # (heads, frames)
        "last_layer_cls_mean": last[:, 0, 1:].mean(axis=0),
        "contributions": np.asarray(contributions[0, 1:]),  # (frames, tags)
        "contribution_layer": np.array(layer),
    }


@dataclasses.dataclass
class Explanation:
    """The maps of one chunk (`Tagger.explain`), as arrays, and the figure that shows them.

    `maps` holds `mel` (n_mels, frames), `probs` (tags,) the chunk's sigmoid outputs,
    `first_layer_received` (frames,), `last_layer_cls_heads` (heads, frames),
    `last_layer_cls_mean` (frames,), `contributions` (frames, tags) and `contribution_layer`
    (see `explain_chunk`). `chosen` are the tags the figure maps. `file_probs` are the whole
    file's tag probabilities (`Tagger.predict`), or None when only the chunk was read.
    """

    source: str  # the file, or "waveform"
    start: float  # seconds: the chunk's first frame
    tags: list[str]
    chosen: list[str]
    maps: dict[str, np.ndarray]
    file_probs: np.ndarray | None = None  # (tags,) the whole file's probabilities, if computed

    @property
    def probabilities(self) -> dict[str, float]:
        """The chunk's probability of every tag."""
        return {t: float(p) for t, p in zip(self.tags, self.maps["probs"], strict=True)}

    @property
    def contributions(self) -> np.ndarray:
        """(frames, len(chosen)): each chosen tag's output when the layer attends to one frame."""
        return self.maps["contributions"][:, [self.tags.index(t) for t in self.chosen]]

    @property
    def times(self) -> np.ndarray:
        """(frames,) the start time in seconds of each of the chunk's frames."""
        frames = self.maps["mel"].shape[-1]
        return self.start + np.asarray(audio.frames_to_seconds(np.arange(frames)))

    def title(self) -> str:
        """The figure's title: the file, the chunk's span, the file's and the chunk's top tags."""
        from jaxtag import explain_figure

        return explain_figure.title(self)

    def figure(self) -> Any:
        """The matplotlib Figure (`jaxtag.explain_figure.draw_explanation`): log-mel, first-layer
        attention received, last-layer CLS attention per head and averaged, tag-wise maps."""
        from jaxtag import explain_figure

        return explain_figure.draw_explanation(self)

    def plot(self, out: str | Path) -> Path:
        """Writes the figure to `out`, atomically, in the format its suffix names (png, pdf...)."""
        from jaxtag.fileio import atomic_write

        check_destinations(out)
        suffix = figure_format(out)
        with atomic_write(out, "wb") as f:
            self.write_figure(f, suffix)
        return Path(out)

    def write_figure(self, file: Any, format: str = "png") -> None:
        """Draws the figure into an open binary file (`plot` and `jaxtag serve` call this)."""
        import matplotlib.pyplot as plt

        with _PYPLOT:  # pyplot's figure registry is global: one figure at a time
            fig = self.figure()
            try:
                fig.savefig(file, format=format, dpi=FIGURE_DPI)
            finally:
                plt.close(fig)

    def save_npz(self, out: str | Path) -> Path:
        """Writes the raw maps, the tags, the start time and `file_probs` (when known) to an
        .npz, atomically."""
        from jaxtag.fileio import atomic_write

        check_destinations(None, out)
        extra = {} if self.file_probs is None else {"file_probs": np.asarray(self.file_probs)}
        with atomic_write(out, "wb") as f:
            np.savez_compressed(
                f, tags=np.array(self.tags), start_seconds=self.start, **self.maps, **extra
            )
        return Path(out)


# How a file of each figure format begins; an existing figure is replaced only if it matches.
# svg may start with an XML declaration, a comment or whitespace: looked for in its first bytes.
FIGURE_SIGNATURES = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "pdf": (b"%PDF",),
    "jpg": (b"\xff\xd8\xff",),
    "jpeg": (b"\xff\xd8\xff",),
    "tif": (b"II*\x00", b"MM\x00*"),
    "tiff": (b"II*\x00", b"MM\x00*"),
    "eps": (b"%!PS",),
    "ps": (b"%!PS",),
    "svgz": (b"\x1f\x8b",),
    "webp": (b"RIFF",),
}
EXPLAIN_NPZ_KEYS = {
    "tags",
    "start_seconds",
    "mel",
    "probs",
    "contributions",
}  # Explanation.save_npz (which may add file_probs: not required, older files lack it)


def is_figure(path: str, suffix: str) -> bool:
    """Whether the existing `path` looks like a figure of format `suffix` (False for formats
    without a signature: raw, rgba, pgf)."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if suffix == "svg":
        return b"<svg" in head or head.lstrip().startswith(b"<?xml")
    signatures = FIGURE_SIGNATURES.get(suffix)
    return bool(signatures) and head.startswith(signatures)


def is_explain_npz(path: str) -> bool:
    """Whether the existing `path` is an `.npz` of `jaxtag explain --save-npz`."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.removesuffix(".npy") for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError):
        return False
    return EXPLAIN_NPZ_KEYS <= names


def check_destinations(
    figure: str | os.PathLike | None,
    npz: str | os.PathLike | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> None:
    """Refuses, before any work, a figure or maps path that must not be written: a directory, an
    unwritable folder, one of `inputs` (the audio, the model), the two the same; an existing
    file that is not what would be written there (a figure of the format its suffix names, an
    `.npz` of explain's maps) is left untouched.

    Raises:
      JaxtagError: one line naming the path and what is wrong (OutputError, or an unknown
        figure format).
    """
    from jaxtag.fileio import OutputError, check_outputs

    check_outputs([p for p in (figure, npz) if p], inputs)
    if figure is not None:
        suffix = figure_format(figure)
        if os.path.exists(figure) and not is_figure(figure, suffix):
            raise OutputError(
                f"{figure} exists and is not a .{suffix} figure, so it was left untouched; "
                "choose another path"
            )
    if npz and os.path.exists(npz) and not is_explain_npz(npz):
        raise OutputError(
            f"{npz} exists and is not an .npz of explain's maps, so it was left untouched; "
            "choose another path"
        )


def figure_format(out: str | Path) -> str:
    """The figure format that `out`'s suffix names (png, pdf, svg, ...).

    Raises:
      JaxtagError: matplotlib cannot write that suffix.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    known = set(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(out).suffix[1:].lower()
    if suffix not in known:
        raise JaxtagError(
            f"{out}: unknown figure format {suffix!r} (the suffix picks one of: "
            f"{', '.join(sorted(known))})"
        )
    return suffix
