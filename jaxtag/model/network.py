"""The self-attention music tagger (MTSA) of Won, Chun & Serra (2019) as one Flax Linen module.

Shape of the computation (`tests/torch_reference.py` is the same network in PyTorch):

    log-mel (B, 96, T) -> front end (jaxtag/model/front_end.py)          -> (B, T, width)
      -> prepend the fixed CLS vector -> positions -> post-LN BERT encoder layers
         (jaxtag/model/encoder.py)
      -> tanh pooler on token 0 -> dropout -> classifier logits (B, num_tags)

The parameter tree mirrors the PyTorch key names (``front_end/layers_3/conv/kernel`` for
``front_end.layers.3.conv.weight``) so that the converter, checkpoints and tests speak one tree.
Attention probabilities are sown into the ``intermediates`` collection (`attention_maps`).
Build a model for a backend with `build_model`: it picks the front end's kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtag.model.config import ModelConfig
from jaxtag.model.encoder import Embedding, Encoder, cls_vector, sinusoidal_table
from jaxtag.model.front_end import BandedFrontEnd, FrontEnd
from jaxtag.model.kernels import BLOCK_ROWS
from jaxtag.model.layers import dense

Array = jax.Array
# The front end's implementations (same parameters, same function): "reference" (the readable
# convolutions) and "banded" (the fused kernels, faster on a CPU). "auto" picks one per backend.
FRONT_ENDS = ("reference", "banded")


def choose_front_end(front_end: str, backend: str) -> str:
    """The front end that `front_end` ("auto", "reference" or "banded") means on `backend`.

    "auto" is banded on the CPU, where its fused matrix products beat XLA's convolutions
    (README.md, Benchmarks), and the plain convolutions elsewhere (cuDNN / TPU convolutions).
    """
    if front_end == "auto":
        return "banded" if backend == "cpu" else "reference"
    if front_end not in FRONT_ENDS:
        raise ValueError(f"front_end must be auto, reference or banded, got {front_end!r}")
    return front_end


class MTSA(nn.Module):
    """The full tagger: log-mel (B, n_mels, T) -> tag logits (B, num_tags).

    Sigmoid is left to callers (the loss works on logits for stability). Every layer's attention
    probabilities, (B, heads, S, S) with S = T + 1, are sown: apply with
    `mutable=["intermediates"]` and read them with `attention_maps`.
    `attention_override=(layer, probs)` replaces that layer's attention probabilities (broadcast
    to (B, heads, S, S)). There is no batch-size limit (the original tiles its CLS vector to 32
    rows).
    """

    config: ModelConfig
    axis_name: str | None = None
    kernels: str = "reference"  # the front end's implementation, one of FRONT_ENDS
    block_rows: int = BLOCK_ROWS  # the banded front end's block size (speed only)

    def setup(self) -> None:
        cfg = self.config
        if self.kernels not in FRONT_ENDS:
            raise ValueError(f"kernels must be one of {FRONT_ENDS}, got {self.kernels!r}")
        if self.kernels == "banded":
            self.front_end = BandedFrontEnd(cfg, self.axis_name, self.block_rows, name="front_end")
        else:
            self.front_end = FrontEnd(cfg, self.axis_name, name="front_end")
        if cfg.positions == "learned":
            self.embedding = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = dense(cfg.width, cfg.width, cfg, None)
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.classifier = dense(cfg.num_tags, cfg.width, cfg, None)

    def __call__(
        self,
        mel: Array,
        train: bool = False,
        attention_override: tuple[int, Array] | None = None,
    ) -> Array:
        cls = self.encoder(self.embed(mel, train), train, 0, attention_override)
        return self.classify(cls, train)

    def embed(self, mel: Array, train: bool = False) -> Array:
        """Front end, CLS token and positions: (B, n_mels, T) -> (B, T + 1, width)."""
        return self.tokens(self.front_end(mel, train), train)

    def tokens(self, frames: Array, train: bool = False) -> Array:
        """The CLS token prepended to the front end's frames (B, T, width), and positions."""
        cfg = self.config
        cls = jnp.asarray(cls_vector(cfg.width), frames.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (frames.shape[0], 1, cfg.width)), frames], 1)
        seq_len = x.shape[1]
        if seq_len > cfg.positions_length:
            raise ValueError(
                f"sequence of {seq_len} tokens (frames + CLS) exceeds positions_length "
                f"{cfg.positions_length}"
            )
        if cfg.positions == "learned":
            return self.embedding(x, train)
        table = sinusoidal_table(cfg.positions_length, cfg.width)[:seq_len]
        return x + jnp.asarray(table, x.dtype)

    def classify(self, cls: Array, train: bool = False) -> Array:
        """Pooler (tanh) on the CLS state, dropout, classifier: (B, width) -> logits (B, tags)."""
        return self.head(jnp.tanh(self.pooler(cls)), train)

    def head(self, pooled: Array, train: bool = False) -> Array:
        """Dropout and the classifier on the pooled output: (B, width) -> logits (B, tags)."""
        pooled = self.dropout(pooled, deterministic=not train)
        return self.classifier(pooled).astype(jnp.float32)

    def features(self, mel: Array, train: bool = False) -> Array:
        """The pooled output the classifier reads (tanh pooler on CLS): (B, F, T) -> (B, width).

        `head(features(mel))` equals `__call__(mel)`; fine-tuning a head on a frozen backbone
        and `jaxtag embed` use the two halves.
        """
        return jnp.tanh(self.pooler(self.encoder(self.embed(mel, train), train)))

    def representations(self, mel: Array) -> dict[str, Array]:
        """Eval-mode representations by name, each (B, width): `front_end` (mean over frames),
        `layer_<i>` (mean over the tokens leaving encoder layer i) and `pooled` (`features`)."""
        frames = self.front_end(mel, False)
        out = {"front_end": frames.mean(axis=1)}
        x = self.tokens(frames)
        for i in range(self.config.num_layers):
            x = self.encoder.layer[i](x, False)
            out[f"layer_{i}"] = x.mean(axis=1)
        out["pooled"] = jnp.tanh(self.pooler(x[:, 0]))
        return out

    def hidden_before(self, mel: Array, layer: int) -> Array:
        """Eval-mode hidden states entering encoder layer `layer` (B, S, width)."""
        return self.encoder.prefix(self.embed(mel), layer)

    def logits_with_attention(self, hidden: Array, layer: int, probs: Array) -> Array:
        """Eval-mode logits when layer `layer`, fed `hidden`, uses attention `probs`."""
        return self.classify(self.encoder(hidden, False, layer, (layer, probs)))


def attention_maps(intermediates: Mapping[str, Any]) -> list[Array]:
    """Every encoder layer's sown attention probabilities, in layer order, from the
    `intermediates` collection of an apply with `mutable=["intermediates"]`."""
    layers = intermediates["encoder"]
    names = sorted(layers, key=lambda name: int(name.removeprefix("layer_")))
    return [layers[name]["attention"]["self"]["attention"][-1] for name in names]


def build_model(
    config: ModelConfig,
    backend: str | None = None,
    front_end: str = "auto",
    axis_name: str | None = None,
    block_rows: int = BLOCK_ROWS,
) -> MTSA:
    """The network of `config` for `backend` (default: JAX's default backend, read here).

    `front_end` ("auto", "reference", "banded") picks the front end's kernels
    (`choose_front_end`) and `block_rows` the banded kernels' block size; every choice computes
    the same function with the same parameters (`jaxtag.model.tuning` measures which is fastest).
    """
    backend = jax.default_backend() if backend is None else backend
    return MTSA(config, axis_name, choose_front_end(front_end, backend), block_rows)


def init_variables(
    config: ModelConfig, rng: Array, frames: int = 256, front_end: str = "reference"
) -> dict[str, Any]:
    """Fresh {'params', 'batch_stats'} as plain nested dicts; either front end creates the same
    names from the same initialisers, so `front_end` does not change them (tested)."""
    from jaxtag.runtime import compile_once

    model = MTSA(config, kernels=front_end)
    mel = jnp.zeros((1, config.n_mels, frames), jnp.float32)
    variables = compile_once(lambda r: model.init(r, mel, train=False), rng)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def count_params(params: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
