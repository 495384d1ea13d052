"""The two front ends agree: `FrontEnd` (plain convolutions, the readable definition) and
`BandedFrontEnd` (jaxtag/model/front_end.py, built from the pure functions of
jaxtag/model/kernels.py: fused, blocked banded kernels), in values, parameter gradients and
BatchNorm statistics, in training and evaluation, float32 and bfloat16. The banded kernels are
also checked one by one against XLA's direct 2D convolution, at every block size the training
autotune may pick (jaxtag/model/tuning.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtag.model import (
    MTSA,
    ModelConfig,
    batch_moments,
    build_model,
    choose_front_end,
    init_variables,
    tuning,
)
from jaxtag.model.kernels import BLOCK_ROWS, inside_tap_sums, vertical_conv
from jaxtag.model.tuning import BLOCK_CANDIDATES, FrontEndKernels
from tests.conftest import log_mel_like

HIGHEST = jax.lax.Precision.HIGHEST
SMALL = ModelConfig(
    conv_channels=4,
    width=64,
    num_layers=1,
    num_heads=4,
    ffn_size=128,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    classifier_dropout=0.0,
)
FRAMES = 64
# Largest |banded - reference| measured on this CPU (2-core AMD EPYC), max over the leaves;
# gradients relative to the largest gradient:
#   float32:  logits 3.0e-7, gradients 2.4e-7, statistics 1.2e-7 (float32 rounding only);
#   bfloat16: logits 3.9e-3 (one bf16 step near |logit| 1), gradients 2.4e-2, statistics 1.5e-3.
# In bfloat16 each path is itself that far from the float32 result (logits 4.2e-3, gradients
# 2.3e-2 for the reference, 0.9e-2 for the banded path): the paths agree as well as bfloat16
# allows. The tolerances leave about 4x margin.
TOLERANCES = {
    "float32": {"logits": 2e-6, "grads": 2e-6, "stats": 1e-6},
    "bfloat16": {"logits": 1.6e-2, "grads": 1e-1, "stats": 6e-3},
}


def direct_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(B, F, T) * (h, w, 1, C) -> (B, F - h + 1, T, C): valid in frequency, same in time."""
    w = kernel.shape[1]
    return jax.lax.conv_general_dilated(
        x[..., None],
        kernel,
        window_strides=(1, 1),
        padding=((0, 0), (w // 2, w // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST,
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
@pytest.mark.parametrize("block_rows", sorted({BLOCK_ROWS, 5, *BLOCK_CANDIDATES}))
def test_blocked_banded_conv_equals_direct_conv(height, width, n_freq, block_rows):
    rng = np.random.RandomState(height)
    x = jnp.asarray(rng.normal(size=(3, n_freq, 40)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(height, width, 1, 6)).astype(np.float32))
    y, weights = vertical_conv(x, kernel, HIGHEST, block_rows)
    np.testing.assert_allclose(
        rows_in_order(y, weights), direct_conv(x, kernel), rtol=1e-5, atol=1e-4
    )
    rows = n_freq - height + 1
    assert y.shape[3] == min(rows, block_rows)
    assert (weights is None) == (rows % min(rows, block_rows) == 0)


def test_weighted_moments_count_each_row_once():
    rng = np.random.RandomState(0)
    x = jnp.asarray((3 + 2 * rng.normal(size=(2, 96, 30))).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(38, 7, 1, 4)).astype(np.float32))
    y, weights = vertical_conv(x, kernel, HIGHEST)
    assert weights is not None and weights.sum() < weights.size  # some rows appear twice
    mean, var, count = batch_moments(y, None, weights)
    rows = np.asarray(direct_conv(x, kernel)).reshape(-1, 4)
    assert count == rows.shape[0]
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(var, rows.var(0), rtol=1e-4)


def test_post_conv_affine_equals_conv_of_affine_input_with_gradients():
    """conv(s * x + b) = s * conv(x) + b * (taps inside the signal): values and the gradients
    with respect to kernel, s and b (the banded front end relies on this)."""
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.normal(size=(2, 96, 20)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(38, 3, 1, 4)).astype(np.float32))
    probe = jnp.asarray(rng.normal(size=(2, 59, 20, 4)).astype(np.float32))

    def plain(kernel, scale, shift):
        return jnp.sum(direct_conv(scale * x + shift, kernel) * probe)

    def post_conv(kernel, scale, shift):
        y, weights = vertical_conv(x, kernel, HIGHEST)
        y = scale * y + shift * inside_tap_sums(kernel, 20, HIGHEST)[:, None]
        return jnp.sum(rows_in_order(y, weights) * probe)

    args = (kernel, 1.3, 0.4)
    np.testing.assert_allclose(post_conv(*args), plain(*args), rtol=1e-5)
    want = jax.grad(plain, argnums=(0, 1, 2))(*args)
    got = jax.grad(post_conv, argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)


def _variables(config: ModelConfig) -> dict:
    """Fresh parameters with running statistics away from their 0/1 defaults (dB input)."""
    variables = init_variables(config, jax.random.PRNGKey(1), FRAMES)
    rng = np.random.RandomState(0)

    def statistic(path, x):
        if path[-1].key == "var":
            return (0.2 + np.abs(rng.normal(1.0, 0.3, x.shape))).astype(np.float32)
        return rng.normal(0.0, 0.3, x.shape).astype(np.float32)

    stats = jax.tree_util.tree_map_with_path(statistic, variables["batch_stats"])
    stats["front_end"]["input_bn"] = {"mean": np.float32([-25.0]), "var": np.float32([18.0**2])}
    return {"params": variables["params"], "batch_stats": stats}


def _loss_grads_stats(
    config: ModelConfig,
    front_end: str | FrontEndKernels,
    variables: dict,
    mel: np.ndarray,
    train: bool,
):
    """(logits, parameter gradients of a BCE loss, batch_stats after the call)."""
    model = FrontEndKernels.of(front_end).model(config)
    tags = np.random.RandomState(5).uniform(size=(mel.shape[0], config.num_tags)) > 0.7

    def loss(params):
        inputs = {"params": params, "batch_stats": variables["batch_stats"]}
        if train:
            logits, updates = model.apply(inputs, mel, train=True, mutable=["batch_stats"])
            stats = updates["batch_stats"]
        else:
            logits, stats = model.apply(inputs, mel), variables["batch_stats"]
        return optax.sigmoid_binary_cross_entropy(logits, tags).mean(), (logits, stats)

    (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"]
    )
    return logits, grads, stats


def _max_diff(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.float32(x) - np.float32(y)))) for x, y in pairs)


def test_both_front_ends_have_the_same_variables():
    trees = [
        init_variables(SMALL, jax.random.PRNGKey(3), FRAMES, front_end=name)
        for name in ("reference", "banded")
    ]
    paths = [[p for p, _ in jax.tree_util.tree_leaves_with_path(t)] for t in trees]
    assert paths[0] == paths[1]
    for a, b in zip(*(jax.tree_util.tree_leaves(t) for t in trees), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # same initialisers under the same names


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_banded_front_end_equals_reference(dtype, train):
    config = dataclasses.replace(SMALL, dtype=dtype)
    variables = _variables(config)
    mel = log_mel_like(6, seed=3, frames=FRAMES)
    ref = _loss_grads_stats(config, "reference", variables, mel, train)
    fast = _loss_grads_stats(config, "banded", variables, mel, train)
    tol = TOLERANCES[dtype]
    grad_scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(ref[1]))
    assert grad_scale > 1e-3 and np.std(ref[0]) > 0.1  # something to compare
    assert _max_diff(fast[0], ref[0]) < tol["logits"]
    assert _max_diff(fast[1], ref[1]) < tol["grads"] * grad_scale
    assert _max_diff(fast[2], ref[2]) < tol["stats"]
    if train:  # the statistics moved, and the same way
        assert _max_diff(ref[2], variables["batch_stats"]) > 1e-2


@pytest.mark.parametrize("choice", tuning.candidates()[1:], ids=lambda c: c.name)
def test_every_measured_block_size_trains_like_the_reference(choice):
    """The autotune's banded candidates (jaxtag/model/tuning.py): float32 training equal."""
    variables = _variables(SMALL)
    mel = log_mel_like(4, seed=6, frames=FRAMES)
    ref = _loss_grads_stats(SMALL, "reference", variables, mel, True)
    fast = _loss_grads_stats(SMALL, choice, variables, mel, True)
    tol = TOLERANCES["float32"]
    grad_scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(ref[1]))
    assert _max_diff(fast[0], ref[0]) < tol["logits"]
    assert _max_diff(fast[1], ref[1]) < tol["grads"] * grad_scale
    assert _max_diff(fast[2], ref[2]) < tol["stats"]


def test_branch_groups_follow_the_filter_heights():
    """Another mel size changes both filter heights (43 and 19 rows of 48): still equal."""
    config = dataclasses.replace(SMALL, n_mels=48)
    variables = _variables(config)
    mel = log_mel_like(3, seed=4, n_mels=48, frames=FRAMES)
    outputs = [
        jax.jit(MTSA(config, kernels=name).apply)(variables, mel)
        for name in ("reference", "banded")
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-6)


def test_auto_picks_banded_on_cpu_and_reference_elsewhere():
    assert choose_front_end("auto", "cpu") == "banded"
    assert choose_front_end("auto", "gpu") == "reference"
    assert choose_front_end("auto", "tpu") == "reference"
    assert choose_front_end("banded", "gpu") == "banded"
    assert choose_front_end("reference", "cpu") == "reference"
    with pytest.raises(ValueError, match="front_end must be"):
        choose_front_end("fast", "cpu")


def test_build_model_resolves_the_front_end_for_the_backend():
    assert build_model(SMALL, backend="cpu").kernels == "banded"
    assert build_model(SMALL, backend="gpu").kernels == "reference"
    assert build_model(SMALL, backend="gpu", front_end="banded").kernels == "banded"
    # Without a backend it reads JAX's default one, at the build site.
    assert build_model(SMALL).kernels == choose_front_end("auto", jax.default_backend())
