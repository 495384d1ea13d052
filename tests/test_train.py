"""Training pieces: metrics, optimizer recipe, checkpoints, pmap parity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from configs.common import get_base_config
from jaxtag import checkpoint, evaluate, optim
from jaxtag.model import ModelConfig, init_variables

REPO = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(
    conv_channels=2,
    width=32,
    num_layers=1,
    num_heads=2,
    ffn_size=64,
    positions_length=65,
    num_tags=4,
)


def test_metrics_match_sklearn_and_skip_tags_without_both_classes():
    rng = np.random.RandomState(0)
    labels = (rng.uniform(size=(50, 4)) > 0.6).astype(np.float32)
    labels[:, 2] = 0  # no positives: ROC-AUC undefined
    labels[:, 3] = 1  # no negatives
    labels[0, 3] = 0
    probs = np.clip(labels * 0.3 + rng.uniform(size=labels.shape) * 0.7, 0, 1)
    metrics = evaluate.compute_metrics(probs, labels, ["a", "b", "c", "d"])
    expect_roc = [roc_auc_score(labels[:, i], probs[:, i]) for i in (0, 1, 3)]
    expect_pr = [average_precision_score(labels[:, i], probs[:, i]) for i in (0, 1, 3)]
    assert metrics["excluded_tags"] == ["c"]
    assert metrics["per_tag"]["c"]["roc_auc"] is None
    assert metrics["per_tag"]["a"]["roc_auc"] == pytest.approx(expect_roc[0], abs=1e-12)
    assert metrics["roc_auc"] == pytest.approx(np.mean(expect_roc), abs=1e-12)
    assert metrics["pr_auc"] == pytest.approx(np.mean(expect_pr), abs=1e-12)
    assert metrics["num_tags_scored"] == 3
    table = evaluate.format_table(metrics)
    assert "left out of the macro average" in table and f"{metrics['roc_auc']:.4f}" in table


def test_original_schedule_follows_the_recipe():
    config = get_base_config()
    schedule = optim.original_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(599)) == pytest.approx(1e-4)
    assert float(schedule(600)) == pytest.approx(1e-3)  # epoch 60: SGD at 1e-3
    assert float(schedule(799)) == pytest.approx(1e-3)
    assert float(schedule(800)) == pytest.approx(1e-4)
    assert float(schedule(1000)) == pytest.approx(1e-5)
    assert float(schedule(5000)) == pytest.approx(1e-5)


def test_original_optimizer_is_adam_then_nesterov_sgd():
    config = get_base_config()
    config.switch_epoch = 1
    config.sgd_epochs_per_rate = 1
    steps_per_epoch = 2
    tx, _ = optim.create_optimizer(config, steps_per_epoch, total_steps=8)
    params = {"w": np.array([1.0, -2.0, 3.0], np.float32)}
    grads = [
        {"w": np.array(g, np.float32)}
        for g in ([0.5, -1, 2], [1, 1, -1], [0.1, 0.2, 0.3], [-1, 0.5, 0.5], [2, 2, 2])
    ]
    state = tx.init(params)
    p = params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)

    # By hand: two Adam steps, then torch-style SGD (coupled decay, Nesterov) at 1e-3, 1e-3, 1e-4.
    adam = optax.adam(1e-4)
    q, s = params, adam.init(params)
    for g in grads[:2]:
        u, s = adam.update(g, s, q)
        q = optax.apply_updates(q, u)
    w, buf = np.asarray(q["w"], np.float64), None
    for g, lr in zip(grads[2:], [1e-3, 1e-3, 1e-4], strict=True):
        d = np.asarray(g["w"], np.float64) + 1e-4 * w
        buf = d if buf is None else 0.9 * buf + d
        w = w - lr * (d + 0.9 * buf)
    np.testing.assert_allclose(np.asarray(p["w"]), w, rtol=1e-6, atol=1e-7)


def test_model_checkpoint_round_trip_and_errors(tmp_path):
    variables = init_variables(SMALL, jax.random.PRNGKey(0), frames=64)
    tags = ["w", "x", "y", "z"]
    out = checkpoint.save_model(tmp_path / "ckpt", variables, SMALL, tags, source="test")
    loaded = checkpoint.load_model(out)
    assert loaded.config == SMALL and loaded.tags == tags and loaded.meta["source"] == "test"
    for a, b in zip(
        jax.tree_util.tree_leaves(variables),
        jax.tree_util.tree_leaves(loaded.variables),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(FileExistsError):
        checkpoint.save_model(out, variables, SMALL, tags)
    with pytest.raises(ValueError, match="4 outputs"):
        checkpoint.make_meta(SMALL, ["only-one"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a jaxtag checkpoint"):
        checkpoint.load_model(tmp_path / "empty")
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.load_model(tmp_path / "missing")


@pytest.mark.slow  # a subprocess with two host devices
@pytest.mark.parametrize("front_end", ["banded", "reference"])
def test_pmap_over_two_devices_matches_one_device(front_end):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "pmap_parity_script.py"), front_end],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["input_bn_mean"] > 1.0  # BatchNorm statistics really moved
    assert numbers["max_param_diff"] < 1e-6
    assert numbers["max_batch_stats_diff"] < 1e-5
    assert numbers["loss_diff"] < 1e-6


def test_bfloat16_compute_keeps_float32_parameters_and_close_outputs():
    import dataclasses

    import jax.numpy as jnp

    from jaxtag.model import MTSA

    variables = init_variables(SMALL, jax.random.PRNGKey(1), frames=64)
    mel = np.random.RandomState(2).uniform(-80, 40, (4, 96, 64)).astype(np.float32)
    f32 = jax.nn.sigmoid(jax.jit(MTSA(SMALL).apply)(variables, mel))
    bf16_config = dataclasses.replace(SMALL, dtype="bfloat16")
    bf16_vars = init_variables(bf16_config, jax.random.PRNGKey(1), frames=64)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bf16_vars))
    bf16 = jax.nn.sigmoid(jax.jit(MTSA(bf16_config).apply)(variables, mel))
    assert bf16.dtype == jnp.float32  # logits come back in float32
    # bf16 has 8 bits of mantissa: outputs agree to about 1e-2, and differ (it really ran in bf16).
    assert 0 < float(jnp.max(jnp.abs(bf16 - f32))) < 3e-2
