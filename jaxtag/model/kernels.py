"""The front end's fast kernels as pure array functions (no Flax): `jaxtag/model/front_end.py`
builds `BandedFrontEnd` from them, beside the readable `FrontEnd` they reproduce.

They are written for XLA's CPU backend, where convolutions with one input channel are slow
(README.md, Benchmarks):

- branches sharing a filter height run as one convolution with zero-padded kernels
  (`fuse_kernels`);
- the vertical convolutions are banded 1D convolutions over time (`vertical_conv`): forward and
  backward passes are dense matrix products; output rows run in blocks, so the 38-row filters
  read only the input rows each block needs;
- the one-channel input BatchNorm's scale and shift are applied after the convolutions (they are
  linear; `inside_tap_sums`), so the backward pass needs no gradient for the convolution input;
- the horizontal convolutions of the single-channel frequency mean are one matrix product
  (`horizontal_conv`).

`tests/test_front_end.py` holds each function equal to the plain convolution it replaces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Precision = jax.lax.Precision | None

# Output rows per block of `vertical_conv` when nothing was measured: the 38-row filters' 59 rows
# run as 5 blocks reading 49 input rows each, not 59 reading all 96. Training on a CPU measures
# the best block size for the machine (jaxtag/model/tuning.py).
BLOCK_ROWS = 12


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
    x: Array, kernel: Array, precision: Precision = None, block_rows: int = BLOCK_ROWS
) -> tuple[Array, np.ndarray | None]:
    """Valid-in-frequency, same-in-time conv of (B, F, T) with an (h, w, 1, C) kernel.

    Returns `(y, row_weights)`: y is (B, blocks, T, block, C), the F - h + 1 output rows split
    into blocks of `block_rows` (one block when there are fewer rows); `row_weights`
    (blocks, 1, block, 1) counts each output row once (blocks may overlap), or None when every
    row appears once.

    The sum is written as a 1D convolution over time: each block of output rows reads a span of
    input rows as channels through a banded (Toeplitz) kernel shared by all blocks, so forward
    and backward passes are dense matrix products; blocks keep the band's zero fill small for
    short filters.
    """
    n_freq, n_time = x.shape[1], x.shape[2]
    h, w, _, c = kernel.shape
    rows = n_freq - h + 1
    block = min(rows, block_rows)
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
