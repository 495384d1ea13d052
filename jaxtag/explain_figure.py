"""The figure of `jaxtag explain`: one chunk's maps drawn so that a newcomer can read them.

`draw_explanation(explanation)` returns a matplotlib Figure with five panels on one time axis
(seconds in the file), each with a one-line caption saying what it shows:

1. the log-mel of the chunk, colour bar in dB (`librosa.amplitude_to_db` of mel power);
2. the attention each frame receives in the first layer (summed over queries, averaged over
   heads), in units of a uniform share (1.0, dashed: every frame receives the same);
3. the last layer's CLS-row attention, one row per head, colour bar "attention weight";
4. that attention averaged over heads, with the uniform share 1/tokens dashed;
5. the tag-wise contribution maps, each row min-max scaled on its own (the colour bar says so)
   and labelled with its tag and the raw output range the scaling hides.

The title names the file, the chunk's span, the file's top tags (when the explanation has them)
and the chunk's, wrapped to the figure's width. Line panels get an empty colour-bar slot, so all
panels share the same x extent.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from jaxtag import audio

WIDTH_INCHES = 10.0
TITLE_FONTSIZE = 10.0
CAPTION_FONTSIZE = 8.0
TOP_TAGS = 5
# Average glyph width of the default sans-serif font, as a fraction of the font size (DejaVu
# Sans is ~0.55-0.6 em for lower case): the title is wrapped to what fits the figure's width.
_EM_FRACTION = 0.62


def title_width(width_inches: float = WIDTH_INCHES, fontsize: float = TITLE_FONTSIZE) -> int:
    """Characters of title text that fit on one line of a figure `width_inches` wide."""
    return int(width_inches * 72 * 0.95 / (fontsize * _EM_FRACTION))


def _top(probs: np.ndarray, tags: list[str], k: int = TOP_TAGS) -> str:
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return ", ".join(f"{tags[i]} {float(probs[i]):.2f}" for i in order)


def chunk_span(explanation: Any) -> tuple[float, float]:
    """(first, end) seconds in the file of the chunk's frames."""
    frames = explanation.maps["mel"].shape[-1]
    return explanation.start, explanation.start + float(audio.frames_to_seconds(frames))


def title(explanation: Any, width: int | None = None) -> str:
    """The figure's title, lines of at most `width` characters (default: what fits the figure):
    the file and the chunk's span, the file's top tags (if known) and the chunk's."""
    width = title_width() if width is None else width
    first, end = chunk_span(explanation)
    parts = [f"{Path(explanation.source).name} — chunk {first:.1f}–{end:.1f} s"]
    file_probs = getattr(explanation, "file_probs", None)
    if file_probs is not None:
        parts.append(f"top tags of the whole file: {_top(file_probs, explanation.tags)}")
    parts.append(f"top tags of this chunk: {_top(explanation.maps['probs'], explanation.tags)}")
    return "\n".join(textwrap.fill(p, width, break_on_hyphens=False) for p in parts)


def scaled_per_row(x: np.ndarray) -> np.ndarray:
    """Per-row min-max scaling so each tag's map uses the full colour range."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def tag_row_label(tag: str, values: np.ndarray, width: int = 22) -> str:
    """A tag-wise row's tick label: the tag and its raw output range, e.g. "guitar 0.12–0.87";
    a tag name longer than `width` characters is wrapped, the range then on a line of its own
    if it does not fit after the name's last line."""
    lines = textwrap.wrap(tag, width, break_on_hyphens=False) or [tag]
    span = f"{float(values.min()):.2f}–{float(values.max()):.2f}"
    if len(lines[-1]) + 1 + len(span) <= width:
        lines[-1] += f" {span}"
    else:
        lines.append(span)
    return "\n".join(lines)


def _caption(ax: Any, text: str) -> None:
    ax.set_title(text, loc="left", fontsize=CAPTION_FONTSIZE)


def _colorbar(fig: Any, image: Any, ax: Any, label: str) -> Any:
    bar = fig.colorbar(image, ax=ax, pad=0.015, fraction=0.05, aspect=8)
    bar.set_label(label, fontsize=CAPTION_FONTSIZE)
    bar.ax.tick_params(labelsize=CAPTION_FONTSIZE)
    return bar


def _blank_slot(fig: Any, ax: Any) -> None:
    """An invisible colour bar beside a line panel: its x axis lines up with the others'."""
    import matplotlib.cm
    import matplotlib.colors

    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1))
    bar = fig.colorbar(mappable, ax=ax, pad=0.015, fraction=0.05, aspect=8)
    bar.ax.set_visible(False)


def draw_explanation(explanation: Any) -> Any:
    """The matplotlib Figure of an `jaxtag.explain.Explanation` (or anything with its `source`,
    `start`, `tags`, `chosen`, `maps`, `contributions`, `times` and optional `file_probs`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps, chosen = explanation.maps, list(explanation.chosen)
    frames = maps["mel"].shape[-1]
    span = chunk_span(explanation)
    times = explanation.times
    heads = maps["last_layer_cls_heads"].shape[0]
    layer = int(maps["contribution_layer"]) + 1
    contributions = np.asarray(explanation.contributions).T  # (tags, frames), raw outputs
    ratios = [2.6, 1.2, 0.45 + 0.28 * max(heads, 2), 1.2, 0.5 + 0.45 * max(len(chosen), 3)]
    fig, axes = plt.subplots(
        5,
        1,
        figsize=(WIDTH_INCHES, 2.0 + 1.1 * sum(ratios)),
        sharex=True,
        gridspec_kw={"height_ratios": ratios},
        layout="constrained",
    )
    mel_ax, first_ax, heads_ax, mean_ax, tag_ax = axes

    image = mel_ax.imshow(
        maps["mel"],
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(*span, 0, maps["mel"].shape[0]),
    )
    mel_ax.set_ylabel("mel band")
    _colorbar(fig, image, mel_ax, "power (dB)")
    _caption(mel_ax, f"Log-mel spectrogram of the chunk: {maps['mel'].shape[0]} mel bands, dB")

    first_ax.plot(times, maps["first_layer_received"], color="tab:blue", lw=1)
    first_ax.axhline(1.0, color="0.4", ls="--", lw=0.8)
    first_ax.set_ylim(0, 1.1 * max(float(np.max(maps["first_layer_received"])), 1.0))
    first_ax.set_ylabel("× uniform\nshare")
    _blank_slot(fig, first_ax)
    _caption(
        first_ax,
        "Layer 1: attention each frame receives (summed over queries, mean of heads); "
        "dashed = uniform share",
    )

    image = heads_ax.imshow(
        maps["last_layer_cls_heads"],
        aspect="auto",
        cmap="viridis",
        extent=(*span, heads, 0),
        interpolation="nearest",
    )
    heads_ax.set_yticks(np.arange(heads) + 0.5, [f"head {h + 1}" for h in range(heads)])
    heads_ax.tick_params(axis="y", labelsize=CAPTION_FONTSIZE)
    heads_ax.set_ylabel("last layer")
    _colorbar(fig, image, heads_ax, "attention weight")
    _caption(
        heads_ax,
        "Last layer: attention of the CLS token (what the tags are read from) on each frame, "
        "per head",
    )

    uniform = 1.0 / (frames + 1)  # the CLS token attends to itself too
    mean_ax.plot(times, maps["last_layer_cls_mean"], color="tab:green", lw=1)
    mean_ax.axhline(uniform, color="0.4", ls="--", lw=0.8)
    mean_ax.set_ylim(0, 1.1 * max(float(np.max(maps["last_layer_cls_mean"])), uniform))
    mean_ax.set_ylabel("attention\nweight")
    _blank_slot(fig, mean_ax)
    _caption(
        mean_ax,
        f"Last layer: CLS attention averaged over heads; dashed = uniform share (1/{frames + 1})",
    )

    image = tag_ax.imshow(
        scaled_per_row(contributions),
        aspect="auto",
        cmap="inferno",
        extent=(*span, len(chosen), 0),
        interpolation="nearest",
        vmin=0.0,
        vmax=1.0,
    )
    labels = [tag_row_label(t, row) for t, row in zip(chosen, contributions, strict=True)]
    tag_ax.set_yticks(np.arange(len(chosen)) + 0.5, labels)
    tag_ax.tick_params(axis="y", labelsize=CAPTION_FONTSIZE)
    tag_ax.set_ylabel("tag, output range")
    bar = _colorbar(fig, image, tag_ax, "scaled per tag:\n0 = its min, 1 = its max")
    bar.set_ticks([0.0, 0.5, 1.0])
    _caption(
        tag_ax,
        f"Tag-wise maps: each tag's output when layer {layer} attends only to that frame; "
        "rows scaled per tag",
    )
    tag_ax.set_xlabel("time in the file (s)")
    tag_ax.set_xlim(*span)
    fig.suptitle(title(explanation), fontsize=TITLE_FONTSIZE)
    return fig
