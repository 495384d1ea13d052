"""The Transformer half: the fixed CLS vector, positions and the post-LN BERT encoder.

The module and parameter names follow the original's BERT code (`attention/self/query`,
`output/LayerNorm`, ...) so that the converter maps every key one to one.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtag.model.config import ModelConfig
from jaxtag.model.layers import dense, layer_norm

Array = jax.Array


def cls_vector(width: int) -> np.ndarray:
    """The fixed CLS token of the original: seed 0, uniform [0, 1) float64, cast to float32.

    It is neither learned nor stored in the weights file, so it is rebuilt here. A private
    RandomState is used so that, unlike the original, numpy's global RNG is left alone.
    """
    return np.random.RandomState(0).random_sample((1, width)).astype(np.float32)[0]


def sinusoidal_table(length: int, width: int) -> np.ndarray:
    """The original's sinusoidal positions: row 0 zero (the CLS token gets none), float64 -> f32."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    j = np.arange(width)
    angle = pos / np.power(10000.0, 2 * (j // 2) / width)
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    table[0] = 0.0
    return table.astype(np.float32)


class SelfAttention(nn.Module):
    """BERT self-attention. The attention probabilities (B, heads, queries, S) are sown into
    `intermediates` as `attention` (see `attention_maps`).

    With `cls_only`, only token 0 (CLS) queries: the last layer's other outputs never reach the
    pooler, so skipping them is exact and saves most of that layer's work. `probs_override`, if
    given, replaces the softmax output (broadcast to (B, heads, queries, S)): the paper's tag-wise
    contribution maps swap one-hot attention into a layer this way.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool,
        probs_override: Array | None = None,
        cls_only: bool = False,
    ) -> Array:
        cfg = self.config
        head_dim = cfg.width // cfg.num_heads

        def heads(name: str, inputs: Array) -> Array:
            y = dense(cfg.width, cfg.width, cfg, name)(inputs)
            return y.reshape(*y.shape[:-1], cfg.num_heads, head_dim)

        q = heads("query", x[:, :1] if cls_only else x)
        k, v = heads("key", x), heads("value", x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=cfg.lax_precision)
        probs = jax.nn.softmax((scores / math.sqrt(head_dim)).astype(jnp.float32), axis=-1)
        if probs_override is not None:
            probs = jnp.broadcast_to(probs_override.astype(jnp.float32), probs.shape)
        self.sow("intermediates", "attention", probs)
        dropped = nn.Dropout(cfg.attention_dropout, deterministic=not train)(probs)
        context = jnp.einsum(
            "bhqk,bkhd->bqhd", dropped.astype(v.dtype), v, precision=cfg.lax_precision
        )
        return context.reshape(*context.shape[:-2], cfg.width)


class ResidualOutput(nn.Module):
    """BERT's `output` blocks: dense -> dropout -> LayerNorm(h + residual)."""

    config: ModelConfig
    fan_in: int

    @nn.compact
    def __call__(self, h: Array, residual: Array, train: bool) -> Array:
        cfg = self.config
        h = dense(cfg.width, self.fan_in, cfg, "dense")(h)
        h = nn.Dropout(cfg.hidden_dropout, deterministic=not train)(h)
        return layer_norm(h + residual)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool,
        probs_override: Array | None = None,
        cls_only: bool = False,
    ) -> Array:
        context = SelfAttention(self.config, name="self")(x, train, probs_override, cls_only)
        residual = x[:, :1] if cls_only else x
        return ResidualOutput(self.config, self.config.width, name="output")(
            context, residual, train
        )


class Intermediate(nn.Module):
    """BERT's feed-forward expansion with the exact (erf) GELU."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.config.ffn_size, self.config.width, self.config, "dense")(x)
        return nn.gelu(h, approximate=False)


class EncoderLayer(nn.Module):
    """A post-LN BERT layer. With `cls_only` it returns only token 0's output (B, 1, width)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        train: bool,
        probs_override: Array | None = None,
        cls_only: bool = False,
    ) -> Array:
        cfg = self.config
        attended = Attention(cfg, name="attention")(x, train, probs_override, cls_only)
        hidden = Intermediate(cfg, name="intermediate")(attended)
        return ResidualOutput(cfg, cfg.ffn_size, name="output")(hidden, attended, train)


class Embedding(nn.Module):
    """Learned positions (released weights): add the table, LayerNorm, dropout."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        cfg = self.config
        table = self.param(
            "position_embeddings",
            nn.initializers.normal(1.0),  # nn.Embedding's N(0, 1)
            (cfg.positions_length, cfg.width),
            jnp.float32,
        )
        x = x + table[: x.shape[1]].astype(x.dtype)
        x = layer_norm(x)
        return nn.Dropout(cfg.hidden_dropout, deterministic=not train)(x)


class Encoder(nn.Module):
    """The stack of encoder layers, runnable from any layer (see `MTSA.logits_with_attention`)."""

    config: ModelConfig

    def setup(self) -> None:
        self.layer = [EncoderLayer(self.config) for _ in range(self.config.num_layers)]

    def __call__(
        self,
        x: Array,
        train: bool,
        first_layer: int = 0,
        attention_override: tuple[int, Array] | None = None,
    ) -> Array:
        """Runs layers first_layer.. on x; returns the CLS states (B, width).

        The last layer computes only the CLS query, unless the attention maps are collected
        (`intermediates` mutable) or overridden: then its full map is computed.
        """
        full_last_layer = attention_override is not None or self.is_mutable_collection(
            "intermediates"
        )
        last = self.config.num_layers - 1
        for i in range(first_layer, self.config.num_layers):
            override = None
            if attention_override is not None and attention_override[0] == i:
                override = attention_override[1]
            x = self.layer[i](x, train, override, i == last and not full_last_layer)
        return x[:, 0]

    def prefix(self, x: Array, stop_layer: int) -> Array:
        """Hidden states after layers 0..stop_layer-1 (eval mode), all tokens."""
        for i in range(stop_layer):
            x = self.layer[i](x, False)
        return x
