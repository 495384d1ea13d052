"""The training-time forms of the front end's convolution equal the direct ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtag.model import BLOCK_ROWS, batch_moments, inside_tap_sums, vertical_conv


def _direct_rows(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(B, rows, T, C) by XLA's convolution (the inference form)."""
    y, weights = vertical_conv(jnp.asarray(x), jnp.asarray(kernel), train=False)
    assert weights is None and y.shape[3] == 1
    return np.asarray(y[:, :, :, 0])


def _blocked_rows(x: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training form's rows in order, each once, and the raw blocked output's weights."""
    y, weights = vertical_conv(jnp.asarray(x), jnp.asarray(kernel), train=True)
    batch, blocks, time, block, channels = y.shape
    rows = x.shape[1] - kernel.shape[0] + 1
    keep = np.ones((blocks, block), bool) if weights is None else weights[:, 0, :, 0] > 0
    y = np.moveaxis(np.asarray(y), 2, 3)[:, keep]  # (B, rows, T, C) in block order
    assert y.shape == (batch, rows, time, channels)
    return y, weights


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
    x = rng.normal(size=(3, n_freq, 40)).astype(np.float32)
    kernel = rng.normal(size=(height, width, 1, 6)).astype(np.float32)
    blocked, weights = _blocked_rows(x, kernel)
    np.testing.assert_allclose(blocked, _direct_rows(x, kernel), rtol=1e-5, atol=1e-4)
    rows = n_freq - height + 1
    assert (weights is None) == (rows % min(rows, BLOCK_ROWS) == 0)


def test_weighted_moments_count_each_row_once():
    rng = np.random.RandomState(0)
    x = (3 + 2 * rng.normal(size=(2, 96, 30))).astype(np.float32)
    kernel = rng.normal(size=(38, 7, 1, 4)).astype(np.float32)
    y, weights = vertical_conv(jnp.asarray(x), jnp.asarray(kernel), train=True)
    assert weights is not None and weights.sum() < weights.size  # some rows appear twice
    mean, var, count = batch_moments(y, None, weights)
    rows = _direct_rows(x, kernel).reshape(-1, 4)
    assert count == rows.shape[0]
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(var, rows.var(0), rtol=1e-4)


def test_conv_of_an_affine_input_is_the_affine_map_of_the_conv():
    """What the training front end relies on: conv(s * x + b) = s * conv(x) + b * taps inside."""
    rng = np.random.RandomState(1)
    x = rng.normal(size=(2, 50, 24)).astype(np.float32)
    kernel = jnp.asarray(rng.normal(size=(20, 7, 1, 3)).astype(np.float32))
    scale, shift = 1.7, -0.6
    want = _direct_rows(scale * x + shift, kernel)
    got = scale * _direct_rows(x, kernel) + shift * np.asarray(inside_tap_sums(kernel, 24))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_train_mode_front_end_gradient_equals_direct_form():
    """Kernel and input-BN gradients through the blocked, post-conv-affine training form equal
    those of the plain definition (BN on the input, then the direct convolution)."""
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.normal(size=(2, 96, 20)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(38, 3, 1, 4)).astype(np.float32))
    probe = jnp.asarray(rng.normal(size=(2, 59, 20, 4)).astype(np.float32))

    def direct(kernel, scale, shift):
        y, _ = vertical_conv(scale * x + shift, kernel, train=False)
        return jnp.sum(y[:, :, :, 0] * probe)

    def training_form(kernel, scale, shift):
        y, weights = vertical_conv(x, kernel, train=True)
        y = scale * y + shift * inside_tap_sums(kernel, 20)[:, None]
        blocks, block = y.shape[1], y.shape[3]
        keep = np.ones((blocks, block), bool) if weights is None else weights[:, 0, :, 0] > 0
        return jnp.sum(jnp.moveaxis(y, 2, 3)[:, keep] * probe)

    want = jax.grad(direct, argnums=(0, 1, 2))(kernel, 1.3, 0.4)
    got = jax.grad(training_form, argnums=(0, 1, 2))(kernel, 1.3, 0.4)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
