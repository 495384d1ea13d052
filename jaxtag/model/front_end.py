"""The Pons-style front end: (B, n_mels, T) log-mel -> (B, T, width) frames, two ways.

`FrontEnd` is the readable definition: six vertical branches (filter heights 86/38 x widths
7/3/1, max over the remaining rows) and four horizontal ones (lengths 165/129/65/33 on the
frequency mean), concatenated, then a 1x1 conv + BN + ReLU. `BandedFrontEnd` computes the same
function with the same parameter and batch_stats trees (`layers_i/conv/kernel`, `layers_i/bn/...`,
`input_bn`, `conv1x1`, `bn`) through the fused kernels of `jaxtag/model/kernels.py`, faster on a
CPU; `tests/test_front_end.py` holds the two equal in values, gradients and BatchNorm statistics.
Which one runs is chosen where the model is built (`jaxtag.model.build_model`).
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtag.model.config import ModelConfig, horizontal_branches, vertical_branches
from jaxtag.model.kernels import (
    BLOCK_ROWS,
    fuse_kernels,
    horizontal_conv,
    inside_tap_sums,
    vertical_conv,
)
from jaxtag.model.layers import BatchNorm, conv, torch_uniform_init

Array = jax.Array


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


# ----------------------------------------------------------------------------------------------
# The same function through the kernels of jaxtag/model/kernels.py


class ConvWeights(nn.Module):
    """One branch's conv kernel and bias, initialised as `model.conv` initialises them."""

    kernel_shape: tuple[int, ...]  # Flax layout: spatial dims..., in, out

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        init = torch_uniform_init(math.prod(self.kernel_shape[:-1]))
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


def normalize_group(
    group: list[Branch], y: Array, train: bool, weights: np.ndarray | None = None
) -> Array:
    """ReLU(BN(y)) for the concatenated channels of a group of branches, in one pass.

    Each branch keeps its own BatchNorm parameters and statistics; the per-channel affine maps
    are concatenated and applied to the fused tensor, since slicing that large tensor per branch
    costs more than the convolution's own output pass.
    """
    sizes = [b.kernel_shape[-1] for b in group]
    moments = group[0].bn.batch_moments(y, weights) if train else None  # one axis for all
    coefficients = []
    for branch, lo, hi in zip(group, np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True):
        part = None if moments is None else (moments[0][lo:hi], moments[1][lo:hi], moments[2])
        coefficients.append(branch.bn.coefficients(int(hi - lo), train, part))
    a = jnp.concatenate([a for a, _ in coefficients]).astype(y.dtype)
    c = jnp.concatenate([c for _, c in coefficients]).astype(y.dtype)
    return nn.relu(y * a + c)


class BandedFrontEnd(nn.Module):
    """`model.FrontEnd` through the kernels above: (B, n_mels, T) -> (B, T, width).
    `block_rows` is `kernels.vertical_conv`'s block size (speed only)."""

    config: ModelConfig
    axis_name: str | None = None
    block_rows: int = BLOCK_ROWS

    @nn.compact
    def __call__(self, mel: Array, train: bool) -> Array:
        cfg = self.config
        dtype, precision = jnp.dtype(cfg.dtype), cfg.lax_precision
        # The input BatchNorm has one channel: scale * x_hat + shift with x_hat the standardised
        # mel, which depends on the data only; scale and shift are applied after the vertical
        # convolutions (shift through the taps inside the signal).
        input_bn = BatchNorm(self.axis_name, name="input_bn")
        moments = input_bn.batch_moments(mel[..., None]) if train else None
        mean, inv_std, scale, shift = (
            v.astype(dtype) for v in input_bn.statistics(1, train, moments)
        )
        x_hat = (mel.astype(dtype) - mean) * inv_std  # (B, F, T)

        vertical = [
            Branch((h, w, 1, c), self.axis_name, name=f"layers_{i}")
            for i, (h, w, c) in enumerate(vertical_branches(cfg))
        ]
        horizontal = [
            Branch((k, 1, c), self.axis_name, name=f"layers_{i}")
            for i, (k, c) in enumerate(horizontal_branches(cfg), start=len(vertical))
        ]
        outputs = []
        # Consecutive branches sharing a filter height run as one convolution (widths padded to
        # the widest); consecutive, so that the concat order stays the branches' order.
        for _, same_height in itertools.groupby(vertical, key=lambda b: b.kernel_shape[0]):
            group = list(same_height)
            kernel, bias = fuse_kernels([b.conv() for b in group], axis=1)
            kernel = kernel.astype(dtype)
            y, row_weights = vertical_conv(x_hat, kernel, precision, self.block_rows)
            taps = inside_tap_sums(kernel, x_hat.shape[2], precision)
            y = scale * y + (shift * taps + bias.astype(dtype))[:, None]  # (T, C) offset
            # BN + ReLU per frequency row, then the max over all remaining rows.
            y = normalize_group(group, y, train, row_weights)
            outputs.append(y.max(axis=(1, 3)))  # (B, T, sum of the group's channels)

        # Horizontal branches on the frequency mean, also fused into one zero-padded conv.
        kernel, bias = fuse_kernels([b.conv() for b in horizontal], axis=0)
        freq_mean = scale * x_hat.mean(axis=1) + shift
        y = horizontal_conv(freq_mean, kernel[:, 0].astype(dtype), precision) + bias.astype(dtype)
        outputs.append(normalize_group(horizontal, y, train))
        return mix_branches(outputs, cfg, self.axis_name, train)
