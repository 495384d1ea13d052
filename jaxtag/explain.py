"""Why did the model choose a tag? Attention and tag-wise contribution heat maps.

`jaxtag explain FILE --checkpoint DIR --out fig.png` draws, for one 256-frame chunk of FILE:
the log-mel, the first layer's attention received by each frame (summed over queries, averaged
over heads), the last layer's CLS-row attention per head and averaged, and the tag-wise
contribution maps of the paper: in a chosen layer the attention probabilities are replaced by a
one-hot on position t, for every t, and each tag's output is read. All positions are computed in
one vectorised, jitted call; the layers before the chosen one run once.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtag import audio
from jaxtag.checkpoint import CheckpointError, LoadedModel, load_model
from jaxtag.model import MTSA, attention_maps


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
    model = MTSA(loaded.config)
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


def _normalise(x: np.ndarray) -> np.ndarray:
    """Per-row min-max scaling so each tag's map uses the full colour range."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def plot(
    maps: dict[str, np.ndarray],
    tags: list[str],
    chosen: list[str],
    start: float,
    title: str,
    out: str | Path,
) -> None:
    """Writes the figure: mel, first-layer attention, last-layer CLS attention, tag maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="an audio file (wav, flac, ogg, mp3)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or workdir")
    parser.add_argument("--out", required=True, help="figure path (.png)")
    parser.add_argument(
        "--tags", default=None, help="comma-separated tags to map (default: the top 3 predicted)"
    )
    parser.add_argument(
        "--start", type=float, default=0.0, help="chunk start in seconds (default 0)"
    )
    parser.add_argument(
        "--layer", type=int, default=-1, help="encoder layer for the tag-wise maps (default: last)"
    )
    parser.add_argument("--save-npz", default=None, help="also write the raw maps to this .npz")


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load_model(args.checkpoint)
        mel = audio.load_log_mel(args.file)
    except (CheckpointError, audio.AudioError) as err:
        print(f"jaxtag explain: {err}", file=sys.stderr)
        return 2
    n_frames = mel.shape[-1]
    start_frame = audio.seconds_to_frames(args.start)
    last_start = max(n_frames - audio.CHUNK_FRAMES, 0)
    if start_frame > last_start:
        print(
            f"jaxtag explain: {args.file}: --start {args.start} is past the last chunk start "
            f"({audio.frames_to_seconds(last_start):.2f} s)",
            file=sys.stderr,
        )
        return 2
    chunk = audio.crop(mel, start_frame)
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
    maps = explain_chunk(loaded, chunk, args.layer)
    order = np.argsort(-maps["probs"])
    if chosen is None:
        chosen = [loaded.tags[i] for i in order[:3]]
    start = float(audio.frames_to_seconds(start_frame))
    top = ", ".join(f"{loaded.tags[i]} {maps['probs'][i]:.2f}" for i in order[:5])
    plot(
        maps,
        loaded.tags,
        chosen,
        start,
        f"{Path(args.file).name} @ {start:.1f} s — {top}",
        args.out,
    )
    print(f"figure written to {args.out}")
    if args.save_npz:
        npz = Path(args.save_npz)
        tmp = npz.with_name(npz.name + ".tmp.npz")  # written whole, then renamed
        np.savez_compressed(tmp, tags=np.array(loaded.tags), start_seconds=start, **maps)
        tmp.replace(npz)
        print(f"maps written to {args.save_npz}")
    return 0
