"""The front end's blocked banded convolution and post-convolution input BatchNorm equal the
plain definitions: BatchNorm on the input, then a direct 2D convolution (XLA's, independent of
the code under test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtag.model import BLOCK_ROWS, batch_moments, inside_tap_sums, vertical_conv


def direct_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(B, F, T) * (h, w, 1, C) -> (B, F - h + 1, T, C): valid in frequency, same in time."""
    w = kernel.shape[1]
    return jax.lax.conv_general_dilated(
        x[..., None],
        kernel,
        window_strides=(1, 1),
        padding=((0, 0), (w // 2, w // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def rows_in_order(y: jax.Array, weights: np.ndarray | None) -> jax.Array:
    """vertical_conv's (B, blocks, T, block, C) output as (B, rows, T, C), each row once."""
    blocks, block = y.shape[1], y.shape[3]
    keep = np.ones((blocks, block), bool) if weights is None else weights[:, 0, :, 0] > 0
    return jnp.moveaxis(y, 2, 3)[:, keep]


@pytest.mark.parametrize(
    ("height", "width", "n_freq"),
    [
        (38, 7, 96),  # 59 rows: the last block overlaps the one before it
        (86, 3, 96),  # 11 rows: a single block
        (5, 1, 5 + 2 * BLOCK_ROWS - 1),  # rows an exact multiple of the block
    ],
)
def test_blocked_banded_conv_equals_direct_conv(height, width, n_freq):
    rng = np.random.RandomState(height)
    x = jnp.asarray(rng.normal(size=(3, n_freq, 40)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(height, width, 1, 6)).astype(np.float32))
    y, weights = vertical_conv(x, kernel)
    np.testing.assert_allclose(
        rows_in_order(y, weights), direct_conv(x, kernel), rtol=1e-5, atol=1e-4
    )
    rows = n_freq - height + 1
    assert (weights is None) == (rows % min(rows, BLOCK_ROWS) == 0)


def test_weighted_moments_count_each_row_once():
    rng = np.random.RandomState(0)
    x = jnp.asarray((3 + 2 * rng.normal(size=(2, 96, 30))).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(38, 7, 1, 4)).astype(np.float32))
    y, weights = vertical_conv(x, kernel)
    assert weights is not None and weights.sum() < weights.size  # some rows appear twice
    mean, var, count = batch_moments(y, None, weights)
    rows = np.asarray(direct_conv(x, kernel)).reshape(-1, 4)
    assert count == rows.shape[0]
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(var, rows.var(0), rtol=1e-4)


def test_post_conv_affine_equals_conv_of_affine_input_with_gradients():
    """conv(s * x + b) = s * conv(x) + b * (taps inside the signal): values and the gradients
    with respect to kernel, s and b (the training front end relies on this)."""
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.normal(size=(2, 96, 20)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(38, 3, 1, 4)).astype(np.float32))
    probe = jnp.asarray(rng.normal(size=(2, 59, 20, 4)).astype(np.float32))

    def plain(kernel, scale, shift):
        return jnp.sum(direct_conv(scale * x + shift, kernel) * probe)

    def post_conv(kernel, scale, shift):
        y, weights = vertical_conv(x, kernel)
        y = scale * y + shift * inside_tap_sums(kernel, 20)[:, None]
        return jnp.sum(rows_in_order(y, weights) * probe)

    args = (kernel, 1.3, 0.4)
    np.testing.assert_allclose(post_conv(*args), plain(*args), rtol=1e-5)
    want = jax.grad(plain, argnums=(0, 1, 2))(*args)
    got = jax.grad(post_conv, argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
