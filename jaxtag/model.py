"""The self-attention music tagger (MTSA) of Won, Chun & Serra (2019) as Flax Linen modules.

Shape of the computation (NOTES-layout.md in the design references):

    log-mel (B, 96, T) -> input BatchNorm
      -> 6 vertical branches (filter heights 86/38 x widths 7/3/1, max over the remaining rows)
      -> 4 horizontal branches (lengths 165/129/65/33 on the frequency mean)
      -> concat (29*C channels) -> 1x1 conv + BN + ReLU -> (B, T, width)
      -> prepend the fixed CLS vector -> positions -> post-LN BERT encoder layers
      -> tanh pooler on token 0 -> dropout -> classifier logits (B, num_tags)

The parameter tree mirrors the PyTorch key names (``front_end/layers_3/conv/kernel`` for
``front_end.layers.3.conv.weight``) so that the converter, checkpoints and tests speak one tree.
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
# 29: the sum of all channel multipliers above; conv1x1 sees 29 * conv_channels channels.
FRONT_END_MULTIPLIER = sum(m for *_, m in VERTICAL_BRANCHES) + sum(
    m for _, m in HORIZONTAL_BRANCHES
)

BN_EPS = 1e-5  # PyTorch BatchNorm default
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch
LN_EPS = 1e-12  # BERT LayerNorm
# Output rows per block of the banded vertical convolution (see `vertical_conv`): the
# 38-row filters' 59 rows run as 5 blocks reading 49 input rows each, not 59 reading all 96.
# 6 to 20 measured alike on a 2-core CPU.
BLOCK_ROWS = 12


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


def dense(features: int, fan_in: int, dtype: Any, name: str | None) -> nn.Dense:
    """A Linear layer initialised like PyTorch's."""
    init = torch_uniform_init(fan_in)
    return nn.Dense(features, dtype=dtype, kernel_init=init, bias_init=init, name=name)


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

        In training `moments` are the batch's (mean, var, count), which also update the running
        statistics; otherwise the running statistics are used.
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

    def coefficients(
        self, features: int, train: bool, moments: tuple[Array, Array, Any] | None = None
    ) -> tuple[Array, Array]:
        """(a, c) with BN(x) = a * x + c per channel (see `statistics`)."""
        mean, inv_std, scale, bias = self.statistics(features, train, moments)
        a = scale * inv_std
        return a, bias - mean * a

    def __call__(self, x: Array, train: bool) -> Array:
        moments = None
        if train:
            moments = batch_moments(x, self.axis_name if not self.is_initializing() else None)
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
    0 or 1 times: rows that a blocked convolution computed twice.
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


class ConvWeights(nn.Module):
    """Holds one branch's conv kernel and bias; the front end fuses several branches' kernels."""

    kernel_shape: tuple[int, ...]  # Flax layout: spatial dims..., in, out

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        fan_in = math.prod(self.kernel_shape[:-1])
        init = torch_uniform_init(fan_in)
        kernel = self.param("kernel", init, self.kernel_shape, jnp.float32)
        bias = self.param("bias", init, (self.kernel_shape[-1],), jnp.float32)
        return kernel, bias


class Branch(nn.Module):
    """One front-end branch's parameters: `conv` weights and its `bn` (ReLU follows)."""

    kernel_shape: tuple[int, ...]
    axis_name: str | None = None

    def setup(self) -> None:
        self.conv = ConvWeights(self.kernel_shape)
        self.bn = BatchNorm(axis_name=self.axis_name)

    def weights(self) -> tuple[Array, Array]:
        return self.conv()

    def bn_coefficients(
        self, features: int, train: bool, moments: tuple[Array, Array, Any] | None
    ) -> tuple[Array, Array]:
        return self.bn.coefficients(features, train, moments)


def fuse_kernels(weights: list[tuple[Array, Array]], axis: int) -> tuple[Array, Array]:
    """One convolution for several branches: each (kernel, bias) kernel zero-padded on `axis`
    to the longest (odd sizes, same centre, so the result is exact), then kernels and biases
    concatenated on the output-channel axis."""
    size = max(k.shape[axis] for k, _ in weights)

    def pad(kernel: Array) -> Array:
        widths = [(0, 0)] * kernel.ndim
        widths[axis] = ((size - kernel.shape[axis]) // 2,) * 2
        return jnp.pad(kernel, widths)

    return (
        jnp.concatenate([pad(k) for k, _ in weights], axis=-1),
        jnp.concatenate([b for _, b in weights]),
    )


def vertical_conv(x: Array, kernel: Array) -> tuple[Array, np.ndarray | None]:
    """Valid-in-frequency, same-in-time conv of (B, F, T) with an (h, w, 1, C) kernel.

    Returns `(y, row_weights)`: y is (B, blocks, T, block_rows, C), the F - h + 1 output rows
    split into blocks; `row_weights` (blocks, 1, block_rows, 1) counts each output row once
    (blocks may overlap), or None when every row appears once.

    The sum is written as a 1D convolution over time: each block of output rows reads a span of
    input rows as channels through a banded (Toeplitz) kernel shared by all blocks, so forward
    and backward passes are dense matrix products. On CPU, XLA's direct convolution of a
    1-channel input is no faster in the forward pass (1.6x slower for narrow models) and its
    kernel gradient for an 86-row filter ~4x slower; blocks keep the band's zero fill small
    for short filters.
    """
    n_freq, n_time = x.shape[1], x.shape[2]
    h, w, _, c = kernel.shape
    rows = n_freq - h + 1
    block = min(rows, BLOCK_ROWS)
    blocks = -(-rows // block)
    span = block + h - 1
    # The last block starts early enough to stay inside the input; rows it repeats get weight 0.
    starts = np.minimum(np.arange(blocks) * block, rows - block)
    first = np.arange(blocks)[:, None] * block <= starts[:, None] + np.arange(block)[None, :]
    spans = jnp.swapaxes(x, 1, 2)[:, :, starts[:, None] + np.arange(span)[None, :]]
    spans = jnp.swapaxes(spans, 1, 2).reshape(-1, n_time, span)  # (B * blocks, T, span)
    offset = np.arange(span)[:, None] - np.arange(block)[None, :]  # (span, block): filter row
    inside = (offset >= 0) & (offset < h)
    banded = jnp.where(inside[:, :, None, None], kernel[np.clip(offset, 0, h - 1), :, 0, :], 0)
    banded = jnp.transpose(banded, (2, 0, 1, 3)).reshape(w, span, block * c)
    y = jax.lax.conv_general_dilated(
        spans,
        banded,
        window_strides=(1,),
        padding=((w // 2, w // 2),),
        dimension_numbers=("NWC", "WIO", "NWC"),
    )
    y = y.reshape(x.shape[0], blocks, n_time, block, c)
    weights = None if first.all() else first[:, None, :, None].astype(np.float32)
    return y, weights


def inside_tap_sums(kernel: Array, n_time: int) -> Array:
    """`vertical_conv` of an all-ones input, (T, C): the sum of the taps inside the signal
    (fewer at the edges, where the time padding is zero)."""
    w = kernel.shape[1]
    taps = np.arange(n_time)[:, None] + np.arange(w)[None, :] - w // 2
    inside = jnp.asarray((taps >= 0) & (taps < n_time), kernel.dtype)  # keeps bf16 as bf16
    return inside @ kernel.sum(axis=0)[:, 0, :]


def horizontal_conv(x: Array, kernel: Array) -> Array:
    """Same-padded 1D conv of (B, T) with a (k, C) kernel (odd k) -> (B, T, C), as a matmul.

    The k shifted copies of a single-channel signal are small, and as a matrix product both the
    forward pass and the kernel gradient are fast on every backend.
    """
    k = kernel.shape[0]
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2)))
    windows = padded[:, np.arange(x.shape[1])[:, None] + np.arange(k)[None, :]]  # (B, T, k)
    return jnp.einsum("btk,kc->btc", windows, kernel)


class FrontEnd(nn.Module):
    """Pons-style musically motivated convolutions: (B, n_mels, T) -> (B, T, width)."""

    config: ModelConfig
    axis_name: str | None = None

    @nn.compact
    def __call__(self, mel: Array, train: bool) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        c = cfg.conv_channels
        # The input BatchNorm has one channel: scale * x_hat + shift with x_hat the standardised
        # mel, which depends on the data only. Since convolution is linear, scale and shift are
        # applied after the vertical convolutions (shift through the taps inside the signal), so
        # the backward pass needs no gradient for the large convolution input.
        moments = self.synced_moments(mel[..., None]) if train else None
        mean, inv_std, scale, shift = (
            v.astype(dtype)
            for v in BatchNorm(self.axis_name, name="input_bn").statistics(1, train, moments)
        )
        x_hat = (mel.astype(dtype) - mean) * inv_std  # (B, F, T)

        branches = []
        for i, (frac, w, m) in enumerate(VERTICAL_BRANCHES):
            h = int(frac * cfg.n_mels)
            branches.append(Branch((h, w, 1, m * c), self.axis_name, name=f"layers_{i}"))
        for i, (k, m) in enumerate(HORIZONTAL_BRANCHES, start=len(VERTICAL_BRANCHES)):
            branches.append(Branch((k, 1, m * c), self.axis_name, name=f"layers_{i}"))

        outputs = []
        # Branches sharing a filter height run as one convolution (widths padded to the widest).
        for group in (branches[0:3], branches[3:6]):
            kernel, bias = fuse_kernels([b.weights() for b in group], axis=1)
            kernel = kernel.astype(dtype)
            y, row_weights = vertical_conv(x_hat, kernel)
            offset = shift * inside_tap_sums(kernel, x_hat.shape[2]) + bias.astype(dtype)
            y = scale * y + offset[:, None]  # offset: (T, C)
            # BN + ReLU per frequency row, then the max over all remaining rows.
            y = self.normalize_group(group, y, train, row_weights)
            outputs.append(y.max(axis=(1, 3)))  # (B, T, sum c_i)

        # Horizontal branches on the frequency mean, also fused into one zero-padded conv.
        group = branches[6:]
        kernel, bias = fuse_kernels([b.weights() for b in group], axis=0)
        freq_mean = scale * x_hat.mean(axis=1) + shift
        y = horizontal_conv(freq_mean, kernel[:, 0].astype(dtype)) + bias.astype(dtype)
        outputs.append(self.normalize_group(group, y, train))

        x = jnp.concatenate(outputs, axis=-1)  # (B, T, 29 * C)
        fan_in = FRONT_END_MULTIPLIER * c
        x = nn.Conv(
            cfg.width,
            (1,),
            dtype=dtype,
            kernel_init=torch_uniform_init(fan_in),
            bias_init=torch_uniform_init(fan_in),
            name="conv1x1",
        )(x)
        x = BatchNorm(self.axis_name, name="bn")(x, train)
        return nn.relu(x)

    def synced_moments(
        self, x: Array, weights: np.ndarray | None = None
    ) -> tuple[Array, Array, Any]:
        """`batch_moments` over this device's batch and, under pmap, all devices' (not at init)."""
        sync = self.axis_name if not self.is_initializing() else None
        return batch_moments(x, sync, weights)

    def normalize_group(
        self, group: list[Branch], y: Array, train: bool, weights: np.ndarray | None = None
    ) -> Array:
        """ReLU(BN(y)) for the concatenated channels of a group of branches, in one pass.

        Each branch keeps its own BatchNorm parameters and statistics; the per-channel affine
        maps are concatenated and applied to the fused tensor, since slicing that large tensor
        per branch costs more than the convolution's own output pass.
        """
        sizes = [b.kernel_shape[-1] for b in group]
        moments = self.synced_moments(y, weights) if train else None
        coefficients = []
        for branch, lo, hi in zip(
            group, np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True
        ):
            part = None if moments is None else (moments[0][lo:hi], moments[1][lo:hi], moments[2])
            coefficients.append(branch.bn_coefficients(hi - lo, train, part))
        a = jnp.concatenate([a for a, _ in coefficients]).astype(y.dtype)
        c = jnp.concatenate([c for _, c in coefficients]).astype(y.dtype)
        return nn.relu(y * a + c)


def layer_norm(x: Array) -> Array:
    """BERT LayerNorm (eps 1e-12) under the key `LayerNorm`, computed in float32."""
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="LayerNorm")(x.astype(jnp.float32))
    return y.astype(x.dtype)


class SelfAttention(nn.Module):
    """BERT self-attention; returns the context and the attention probabilities.

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
    ) -> tuple[Array, Array]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        head_dim = cfg.width // cfg.num_heads

        def heads(name: str, inputs: Array) -> Array:
            y = dense(cfg.width, cfg.width, dtype, name)(inputs)
            return y.reshape(*y.shape[:-1], cfg.num_heads, head_dim)

        q = heads("query", x[:, :1] if cls_only else x)
        k, v = heads("key", x), heads("value", x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        if probs_override is not None:
            probs = jnp.broadcast_to(probs_override.astype(jnp.float32), probs.shape)
        dropped = nn.Dropout(cfg.attention_dropout, deterministic=not train)(probs)
        context = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(dtype), v)
        return context.reshape(*context.shape[:-2], cfg.width), probs


class ResidualOutput(nn.Module):
    """BERT's `output` blocks: dense -> dropout -> LayerNorm(h + residual)."""

    config: ModelConfig
    fan_in: int

    @nn.compact
    def __call__(self, h: Array, residual: Array, train: bool) -> Array:
        cfg = self.config
        h = dense(cfg.width, self.fan_in, jnp.dtype(cfg.dtype), "dense")(h)
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
    ) -> tuple[Array, Array]:
        context, probs = SelfAttention(self.config, name="self")(x, train, probs_override, cls_only)
        residual = x[:, :1] if cls_only else x
        output = ResidualOutput(self.config, self.config.width, name="output")
        return output(context, residual, train), probs


class Intermediate(nn.Module):
    """BERT's feed-forward expansion with the exact (erf) GELU."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = dense(cfg.ffn_size, cfg.width, jnp.dtype(cfg.dtype), "dense")(x)
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
    ) -> tuple[Array, Array]:
        cfg = self.config
        attended, probs = Attention(cfg, name="attention")(x, train, probs_override, cls_only)
        hidden = Intermediate(cfg, name="intermediate")(attended)
        return ResidualOutput(cfg, cfg.ffn_size, name="output")(hidden, attended, train), probs


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
    """The stack of encoder layers, runnable from any layer (see `MTSA.tag_contributions`)."""

    config: ModelConfig

    def setup(self) -> None:
        self.layer = [EncoderLayer(self.config) for _ in range(self.config.num_layers)]

    def __call__(
        self,
        x: Array,
        train: bool,
        first_layer: int = 0,
        attention_override: tuple[int, Array] | None = None,
        full_last_layer: bool = False,
    ) -> tuple[Array, list[Array]]:
        """Runs layers first_layer.. on x; returns CLS states (B, width) and the attentions.

        The last layer computes only the CLS query unless `full_last_layer` (for its full map).
        """
        attentions = []
        last = self.config.num_layers - 1
        for i in range(first_layer, self.config.num_layers):
            override = None
            if attention_override is not None and attention_override[0] == i:
                override = attention_override[1]
            cls_only = i == last and not full_last_layer
            x, probs = self.layer[i](x, train, override, cls_only)
            attentions.append(probs)
        return x[:, 0], attentions

    def prefix(self, x: Array, stop_layer: int) -> Array:
        """Hidden states after layers 0..stop_layer-1 (eval mode), all tokens."""
        for i in range(stop_layer):
            x, _ = self.layer[i](x, False)
        return x


class MTSA(nn.Module):
    """The full tagger: log-mel (B, n_mels, T) -> tag logits (B, num_tags).

    Sigmoid is left to callers (the loss works on logits for stability). With
    `return_attention=True` it also returns every layer's attention probabilities, a list of
    (B, heads, S, S) arrays with S = T + 1. `attention_override=(layer, probs)` replaces that
    layer's attention probabilities (broadcast to (B, heads, S, S)). There is no batch-size
    limit (the original tiles its CLS vector to 32 rows).
    """

    config: ModelConfig
    axis_name: str | None = None

    def setup(self) -> None:
        cfg = self.config
        self.front_end = FrontEnd(cfg, self.axis_name)
        if cfg.positions == "learned":
            self.embedding = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = dense(cfg.width, cfg.width, jnp.dtype(cfg.dtype), None)
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.classifier = dense(cfg.num_tags, cfg.width, jnp.dtype(cfg.dtype), None)

    def __call__(
        self,
        mel: Array,
        train: bool = False,
        return_attention: bool = False,
        attention_override: tuple[int, Array] | None = None,
    ) -> Array | tuple[Array, list[Array]]:
        x = self.embed(mel, train)
        full = return_attention or attention_override is not None
        cls, attentions = self.encoder(x, train, 0, attention_override, full_last_layer=full)
        logits = self.classify(cls, train)
        return (logits, attentions) if return_attention else logits

    def embed(self, mel: Array, train: bool = False) -> Array:
        """Front end, CLS token and positions: (B, n_mels, T) -> (B, T + 1, width)."""
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = self.front_end(mel, train)  # (B, T, width)
        cls = jnp.broadcast_to(
            jnp.asarray(cls_vector(cfg.width), dtype), (x.shape[0], 1, cfg.width)
        )
        x = jnp.concatenate([cls, x], axis=1)
        seq_len = x.shape[1]
        if seq_len > cfg.positions_length:
            raise ValueError(
                f"sequence of {seq_len} tokens (frames + CLS) exceeds positions_length "
                f"{cfg.positions_length}"
            )
        if cfg.positions == "learned":
            return self.embedding(x, train)
        return x + jnp.asarray(sinusoidal_table(cfg.positions_length, cfg.width)[:seq_len], dtype)

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
        cls, _ = self.encoder(self.embed(mel, train), train)
        return jnp.tanh(self.pooler(cls))

    def representations(self, mel: Array) -> dict[str, Array]:
        """Eval-mode representations by name, each (B, width): `front_end` (mean over frames),
        `layer_<i>` (mean over the tokens leaving encoder layer i) and `pooled` (`features`)."""
        front = self.front_end(mel, False)
        out = {"front_end": front.mean(axis=1)}
        x = self.embed(mel)
        for i in range(self.config.num_layers):
            x, _ = self.encoder.layer[i](x, False)
            out[f"layer_{i}"] = x.mean(axis=1)
        out["pooled"] = jnp.tanh(self.pooler(x[:, 0]))
        return out

    def hidden_before(self, mel: Array, layer: int) -> Array:
        """Eval-mode hidden states entering encoder layer `layer` (B, S, width)."""
        return self.encoder.prefix(self.embed(mel), layer)

    def logits_with_attention(self, hidden: Array, layer: int, probs: Array) -> Array:
        """Eval-mode logits when layer `layer`, fed `hidden`, uses attention `probs`."""
        cls, _ = self.encoder(hidden, False, layer, (layer, probs))
        return self.classify(cls)


def init_variables(config: ModelConfig, rng: Array, frames: int = 256) -> dict[str, Any]:
    """Fresh {'params', 'batch_stats'} as plain nested dicts."""
    model = MTSA(config)
    mel = jnp.zeros((1, config.n_mels, frames), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, mel, train=False))(rng)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def count_params(params: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
