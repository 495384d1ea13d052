"""Why did the model choose a tag? Attention and tag-wise contribution maps of one chunk.

`explain_chunk` computes, for one 256-frame chunk: the first layer's attention received by each
frame (summed over queries, averaged over heads), the last layer's CLS-row attention per head and
averaged, and the tag-wise contribution maps of the paper: in a chosen layer the attention
probabilities are replaced by a one-hot on position t, for every t, and each tag's output is
read. All positions are computed in one vectorised, jitted call; the layers before the chosen one
run once. `jaxtag explain` (jaxtag/explain_cli.py) draws them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtag.checkpoint import LoadedModel
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
