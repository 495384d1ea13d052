"""Fast kernels for the front end of `jaxtag/model.py`, chosen by `ModelConfig.front_end`.

`BandedFrontEnd` computes exactly what `model.FrontEnd` computes, with the same parameter and
batch_stats trees (`layers_i/conv/kernel`, `layers_i/bn/...`, `input_bn`, `conv1x1`, `bn`), so
checkpoints and the converter do not care which one ran; `tests/test_front_end.py` holds the two
equal in values, gradients and BatchNorm statistics. It is written for XLA's CPU backend, where
convolutions with one input channel are slow (README, Benchmarks):

- branches sharing a filter height run as one convolution with zero-padded kernels
  (`fuse_kernels`), and their BatchNorm + ReLU is one pass over the fused output
  (`normalize_group`);
- the vertical convolutions are banded 1D convolutions over time (`vertical_conv`): forward and
  backward passes are dense matrix products; output rows run in blocks, so the 38-row filters
  read only the input rows each block needs;
- the one-channel input BatchNorm's scale and shift are applied after the convolutions (they are
  linear; `inside_tap_sums`), so the backward pass needs no gradient for the convolution input;
- the horizontal convolutions of the single-channel frequency mean are one matrix product
  (`horizontal_conv`).
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtag.model import (
    BatchNorm,
    ModelConfig,
    horizontal_branches,
    mix_branches,
    torch_uniform_init,
    vertical_branches,
)

Array = jax.Array
Precision = jax.lax.Precision | None

# Output rows per block of `vertical_conv`: the 38-row filters' 59 rows run as 5 blocks reading
# 49 input rows each, not 59 reading all 96 (6 to 20 measured alike on a 2-core CPU).
BLOCK_ROWS = 12


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


def vertical_conv(
    x: Array, kernel: Array, precision: Precision = None
) -> tuple[Array, np.ndarray | None]:
    """Valid-in-frequency, same-in-time conv of (B, F, T) with an (h, w, 1, C) kernel.

    Returns `(y, row_weights)`: y is (B, blocks, T, block_rows, C), the F - h + 1 output rows
    split into blocks; `row_weights` (blocks, 1, block_rows, 1) counts each output row once
    (blocks may overlap), or None when every row appears once.

    The sum is written as a 1D convolution over time: each block of output rows reads a span of
    input rows as channels through a banded (Toeplitz) kernel shared by all blocks, so forward
    and backward passes are dense matrix products; blocks keep the band's zero fill small for
    short filters.
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
        precision=precision,
    )
    y = y.reshape(x.shape[0], blocks, n_time, block, c)
    weights = None if first.all() else first[:, None, :, None].astype(np.float32)
    return y, weights


def inside_tap_sums(kernel: Array, n_time: int, precision: Precision = None) -> Array:
    """`vertical_conv` of an all-ones input, (T, C): the sum of the taps inside the signal
    (fewer at the edges, where the time padding is zero)."""
    w = kernel.shape[1]
    taps = np.arange(n_time)[:, None] + np.arange(w)[None, :] - w // 2
    inside = jnp.asarray((taps >= 0) & (taps < n_time), kernel.dtype)  # keeps bf16 as bf16
    return jnp.matmul(inside, kernel.sum(axis=0)[:, 0, :], precision=precision)


def horizontal_conv(x: Array, kernel: Array, precision: Precision = None) -> Array:
    """Same-padded 1D conv of (B, T) with a (k, C) kernel (odd k) -> (B, T, C), as a matmul.

    The k shifted copies of a single-channel signal are small, and as a matrix product both the
    forward pass and the kernel gradient are fast on every backend.
    """
    k = kernel.shape[0]
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2)))
    windows = padded[:, np.arange(x.shape[1])[:, None] + np.arange(k)[None, :]]  # (B, T, k)
    return jnp.einsum("btk,kc->btc", windows, kernel, precision=precision)


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
    """`model.FrontEnd` through the kernels above: (B, n_mels, T) -> (B, T, width)."""

    config: ModelConfig
    axis_name: str | None = None

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
            y, row_weights = vertical_conv(x_hat, kernel, precision)
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
