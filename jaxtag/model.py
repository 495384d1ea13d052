"""The self-attention music tagger (MTSA) of Won, Chun & Serra (2019) as Flax Linen modules.

Shape of the computation (`tests/torch_reference.py` is the same network in PyTorch):

    log-mel (B, 96, T) -> input BatchNorm
      -> 6 vertical branches (filter heights 86/38 x widths 7/3/1, max over the remaining rows)
      -> 4 horizontal branches (lengths 165/129/65/33 on the frequency mean)
      -> concat (29*C channels) -> 1x1 conv + BN + ReLU -> (B, T, width)
      -> prepend the fixed CLS vector -> positions -> post-LN BERT encoder layers
      -> tanh pooler on token 0 -> dropout -> classifier logits (B, num_tags)

This file is the readable definition. `ModelConfig.front_end` may swap the front end for the
fused kernels of `jaxtag/kernels.py` (same parameters, same function; faster on a CPU).

The parameter tree mirrors the PyTorch key names (``front_end/layers_3/conv/kernel`` for
``front_end.layers.3.conv.weight``) so that the converter, checkpoints and tests speak one tree.
Attention probabilities are sown into the ``intermediates`` collection (`attention_maps`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Vertical branches: (filter height as a fraction of the mel bins, width, channel multiplier).
# The list order is the original `front_end.layers.0..5` order, which fixes the concat order.
VERTICAL_BRANCHES = ((0.9, 7, 1), (0.9, 3, 2), (0.9, 1, 4), (0.4, 7, 1), (0.4, 3, 2), (0.4, 1, 4))
# Horizontal branches `front_end.layers.6..9`: (filter length, channel multiplier).
HORIZONTAL_BRANCHES = ((165, 1), (129, 2), (65, 4), (33, 8))
# The channel multipliers above sum to 29: conv1x1 sees 29 * conv_channels channels.

BN_EPS = 1e-5  # PyTorch BatchNorm default
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch
LN_EPS = 1e-12  # BERT LayerNorm
PRECISIONS = {
    "highest": jax.lax.Precision.HIGHEST,
    "high": jax.lax.Precision.HIGH,
    "default": None,  # the backend's default: TF32 on NVIDIA GPUs, bf16 passes on TPU
}


# ModelConfig fields that a run may change freely (speed, regularisation): they change neither
# the parameter tree nor what converted weights compute in float32.
RUNTIME_FIELDS = frozenset(
    {"attention_dropout", "hidden_dropout", "classifier_dropout", "dtype", "precision", "front_end"}
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; shared by converter, training and checkpoints.

    The defaults are the released `ponswon.pth` architecture.
    """

    conv_channels: int = 8
    n_mels: int = 96
    width: int = 512
    num_layers: int = 2
    num_heads: int = 8
    ffn_size: int = 2048
    positions: str = "learned"  # "learned" (table + LayerNorm + dropout) or "sinusoidal"
    positions_length: int = 271  # table rows; must cover the sequence (frames + CLS)
    num_tags: int = 50
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    classifier_dropout: float = 0.5
    dtype: str = "float32"  # compute dtype; parameters always stay float32
    # Matrix-product / convolution precision for float32 compute: "highest" is true float32 on
    # every backend (GPUs would otherwise use TF32); "high" (bf16x3) and "default" (TF32 on
    # NVIDIA GPUs, bf16 passes on TPU) are opt-in faster modes.
    precision: str = "highest"
    # Front-end kernels: "reference" (readable convolutions), "banded" (the fast CPU kernels of
    # jaxtag/kernels.py) or "auto" (chosen per backend). Same parameters and results either way.
    front_end: str = "auto"

    def __post_init__(self) -> None:
        if self.positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', got {self.positions!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.precision not in ("highest", "high", "default"):
            raise ValueError(f"precision must be highest, high or default, got {self.precision!r}")
        if self.front_end not in ("auto", "reference", "banded"):
            raise ValueError(f"front_end must be auto, reference or banded, got {self.front_end!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        """The fields that shape the parameters and the function; RUNTIME_FIELDS left out."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a dict (or ml_collections ConfigDict), rejecting unknown fields."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def lax_precision(self) -> jax.lax.Precision | None:
        """The `precision` of every matrix product and convolution of the model."""
        return PRECISIONS[self.precision]

    def front_end_kernels(self) -> str:
        """ "reference" or "banded"; "auto" picks banded on the CPU backend, where its fused
        matrix products beat XLA's convolutions (README, Benchmarks), and the plain
        convolutions elsewhere (cuDNN / TPU convolutions)."""
        if self.front_end != "auto":
            return self.front_end
        return "banded" if jax.default_backend() == "cpu" else "reference"


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


def torch_uniform_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv/Linear init: U(+-1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features: int, fan_in: int, config: ModelConfig, name: str | None) -> nn.Dense:
    """A Linear layer initialised like PyTorch's, at the configured dtype and precision."""
    init = torch_uniform_init(fan_in)
    return nn.Dense(
        features,
        dtype=jnp.dtype(config.dtype),
        precision=config.lax_precision,
        kernel_init=init,
        bias_init=init,
        name=name,
    )


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics, over the last axis.

    Flax's BatchNorm keeps the *biased* batch variance in its running average; PyTorch keeps the
    unbiased one (n / (n - 1)). The released weights' running statistics and the parity tests
    follow PyTorch, so this module does too. Under pmap, `axis_name` averages the batch moments
    across devices, which gives the statistics of the global batch.
    """

    axis_name: str | None = None
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS

    @nn.compact
    def statistics(
        self, features: int, train: bool, moments: tuple[Array, Array, Any] | None = None
    ) -> tuple[Array, Array, Array, Array]:
        """(mean, 1 / std, scale, bias) with BN(x) = scale * (x - mean) / std + bias per channel.

        In training `moments` are the batch's (mean, var, count) from `batch_moments`, which
        also update the running statistics; otherwise the running statistics are used.
        """
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if train:
            mean, var, count = moments
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        return mean, jax.lax.rsqrt(var + self.epsilon), scale, bias

    def batch_moments(self, x: Array, weights: np.ndarray | None = None) -> tuple[Array, Any, Any]:
        """`batch_moments` of x over this device's batch and, under pmap, all devices' (the
        statistics of the global batch; not at init, where no axis is bound)."""
        return batch_moments(x, None if self.is_initializing() else self.axis_name, weights)

    def coefficients(
        self, features: int, train: bool, moments: tuple[Array, Array, Any] | None = None
    ) -> tuple[Array, Array]:
        """(a, c) with BN(x) = a * x + c per channel (see `statistics`)."""
        mean, inv_std, scale, bias = self.statistics(features, train, moments)
        a = scale * inv_std
        return a, bias - mean * a

    def __call__(self, x: Array, train: bool) -> Array:
        moments = self.batch_moments(x) if train else None
        a, c = self.coefficients(x.shape[-1], train, moments)
        return (x.astype(jnp.float32) * a + c).astype(x.dtype)


def batch_moments(
    x: Array, axis_name: str | None, weights: np.ndarray | None = None
) -> tuple[Array, Array, Any]:
    """Per-channel (last axis) mean, biased variance and count over all other axes, and over
    the devices of `axis_name`: the global batch's statistics under pmap.

    Two passes (mean, then mean squared deviation), as PyTorch: E[x^2] - E[x]^2 loses digits in
    float32 when the mean is large next to the spread (dB inputs, conv maps). `weights`
    (broadcastable to x without its channel axis, plus a trailing 1) counts some positions
    0 or 1 times (the blocked convolutions of jaxtag/kernels.py compute some rows twice).
    """
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    local_count = math.prod(x.shape[:-1])
    if weights is not None:
        local_count = local_count // math.prod(weights.shape[:-1]) * int(weights.sum())

    def local_mean(values: Array) -> Array:
        return (values if weights is None else values * weights).sum(axes) / local_count

    mean, count = local_mean(x32), local_count
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
        count = count * jax.lax.psum(1, axis_name)
    var = local_mean(jnp.square(x32 - mean))
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return mean, var, count


def conv(features: int, kernel_size: tuple[int, ...], config: ModelConfig, name: str) -> nn.Conv:
    """A convolution initialised like PyTorch's, valid in frequency and same in time: the
    time axis (second to last) is zero-padded by half the kernel width on both sides."""
    init = torch_uniform_init(math.prod(kernel_size))  # one input channel
    padding = [(0, 0)] * (len(kernel_size) - 1) + [(kernel_size[-1] // 2,) * 2]
    return nn.Conv(
        features,
        kernel_size,
        padding=padding,
        dtype=jnp.dtype(config.dtype),
        precision=config.lax_precision,
        kernel_init=init,
        bias_init=init,
        name=name,
    )


def vertical_branches(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(filter height, width, channels) of `front_end.layers.0..5`, in concat order."""
    c, n_mels = config.conv_channels, config.n_mels
    return [(int(frac * n_mels), w, m * c) for frac, w, m in VERTICAL_BRANCHES]


def horizontal_branches(config: ModelConfig) -> list[tuple[int, int]]:
    """(filter length, channels) of `front_end.layers.6..9`, in concat order."""
    return [(k, m * config.conv_channels) for k, m in HORIZONTAL_BRANCHES]


class VerticalBranch(nn.Module):
    """Conv over (frequency, time), BN, ReLU, max over the remaining frequency rows."""

    config: ModelConfig
    height: int
    width: int
    channels: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:  # (B, F, T, 1) -> (B, T, C)
        y = conv(self.channels, (self.height, self.width), self.config, "conv")(x)
        y = nn.relu(BatchNorm(self.axis_name, name="bn")(y, train))  # (B, F - h + 1, T, C)
        return y.max(axis=1)


class HorizontalBranch(nn.Module):
    """Conv over time on the frequency mean, BN, ReLU."""

    config: ModelConfig
    length: int
    channels: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:  # (B, T, 1) -> (B, T, C)
        y = conv(self.channels, (self.length,), self.config, "conv")(x)
        return nn.relu(BatchNorm(self.axis_name, name="bn")(y, train))


def mix_branches(
    branch_outputs: list[Array], config: ModelConfig, axis_name: str | None, train: bool
) -> Array:
    """Concat (B, T, 29 * C) -> 1x1 conv + BN + ReLU -> (B, T, width). Called from a front
    end's compact method, whose `conv1x1` and `bn` these layers become."""
    x = jnp.concatenate(branch_outputs, axis=-1)
    init = torch_uniform_init(x.shape[-1])
    x = nn.Conv(
        config.width,
        (1,),
        dtype=jnp.dtype(config.dtype),
        precision=config.lax_precision,
        kernel_init=init,
        bias_init=init,
        name="conv1x1",
    )(x)
    x = BatchNorm(axis_name, name="bn")(x, train)
    return nn.relu(x)


class FrontEnd(nn.Module):
    """Pons-style musically motivated convolutions: (B, n_mels, T) -> (B, T, width)."""

    config: ModelConfig
    axis_name: str | None = None

    @nn.compact
    def __call__(self, mel: Array, train: bool) -> Array:
        cfg = self.config
        x = BatchNorm(self.axis_name, name="input_bn")(mel[..., None], train)  # (B, F, T, 1)
        x = x.astype(jnp.dtype(cfg.dtype))
        freq_mean = x.mean(axis=1)  # (B, T, 1)
        outputs = []
        for i, (h, w, c) in enumerate(vertical_branches(cfg)):
            outputs.append(
                VerticalBranch(cfg, h, w, c, self.axis_name, name=f"layers_{i}")(x, train)
            )
        for i, (k, c) in enumerate(horizontal_branches(cfg), start=len(outputs)):
            branch = HorizontalBranch(cfg, k, c, self.axis_name, name=f"layers_{i}")
            outputs.append(branch(freq_mean, train))
        return mix_branches(outputs, cfg, self.axis_name, train)


def front_end(config: ModelConfig, axis_name: str | None) -> nn.Module:
    """The front end `config.front_end_kernels()` names, as the submodule `front_end`."""
    if config.front_end_kernels() == "banded":
        from jaxtag.kernels import BandedFrontEnd  # builds on this module's layers

        return BandedFrontEnd(config, axis_name, name="front_end")
    return FrontEnd(config, axis_name, name="front_end")


def layer_norm(x: Array) -> Array:
    """BERT LayerNorm (eps 1e-12) under the key `LayerNorm`, computed in float32."""
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="LayerNorm")(x.astype(jnp.float32))
    return y.astype(x.dtype)


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

    def setup(self) -> None:
        cfg = self.config
        self.front_end = front_end(cfg, self.axis_name)
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


def init_variables(config: ModelConfig, rng: Array, frames: int = 256) -> dict[str, Any]:
    """Fresh {'params', 'batch_stats'} as plain nested dicts."""
    model = MTSA(config)
    mel = jnp.zeros((1, config.n_mels, frames), jnp.float32)
    init = jax.jit(lambda r: model.init(r, mel, train=False))
    if isinstance(rng, jax.core.Tracer) or jax.default_backend() != "cpu":  # e.g. eval_shape
        variables = init(rng)
    else:
        # The program is ~140 small random-number generators (a key fold-in per module path
        # level, a draw per parameter), each compiled on its own; it runs once, so a lighter
        # LLVM optimisation level roughly halves its CPU compile time, same values (tested).
        compiled = init.lower(rng).compile({"xla_backend_optimization_level": 1})
        variables = compiled(rng)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def count_params(params: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
