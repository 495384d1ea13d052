"""End-to-end training on the synthetic set: resume equals an uninterrupted run; learning works."""

import json

import jax
import numpy as np
import pytest

from jaxtag import checkpoint, evaluate, train
from tests.conftest import small_train_config

pytestmark = pytest.mark.slow  # full training runs


def tiny_config(dataset_dir: str):
    config = small_train_config(dataset_dir)
    config.model.conv_channels = 1
    config.model.width = 32
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.ffn_size = 64
    config.global_batch_size = 8
    config.num_epochs = 2
    config.steps_per_epoch = 4
    config.checkpoint_every_steps = 3
    config.log_every_steps = 1
    return config


def losses(workdir) -> dict[int, float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d["train/loss"] for d in lines if "train/loss" in d}


def test_resume_repeats_the_uninterrupted_run(synthetic_data, tmp_path):
    config = tiny_config(synthetic_data)
    straight = train.train_and_evaluate(config, tmp_path / "straight")

    resumed_dir = tmp_path / "resumed"
    first = train.train_and_evaluate(config, resumed_dir, stop_after_step=5)
    assert first["step"] == 5
    # A run killed while saving leaves an unfinished temporary directory behind.
    junk = resumed_dir / "checkpoints" / "latest" / "7.orbax-checkpoint-tmp-123"
    junk.mkdir()
    (junk / "partial").write_text("half a checkpoint")
    second = train.train_and_evaluate(config, resumed_dir)
    assert second["step"] == 8

    a, b = losses(tmp_path / "straight"), losses(resumed_dir)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert second["best_step"] == straight["best_step"]

    end_a = checkpoint.load_model(tmp_path / "straight", prefer="latest")
    end_b = checkpoint.load_model(resumed_dir, prefer="latest")
    assert end_b.meta["step"] == 8
    for x, y in zip(
        jax.tree_util.tree_leaves(end_a.variables),
        jax.tree_util.tree_leaves(end_b.variables),
        strict=True,
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

    # The best checkpoint is the one with the highest validation ROC-AUC, and loadable.
    best = checkpoint.load_model(resumed_dir)
    assert best.meta["metrics"]["roc_auc"] == pytest.approx(
        straight["best_validation_roc_auc"], abs=1e-6
    )


def test_short_run_learns_well_above_chance(trained_synthetic, synthetic_data):
    summary = json.loads((trained_synthetic / "train_summary.json").read_text())
    report = evaluate.evaluate_checkpoint(
        str(trained_synthetic), synthetic_data, None, split="test", progress=False
    )
    # Chance is 0.5.
    assert summary["best_validation_roc_auc"] > 0.8
    assert report["roc_auc"] > 0.8
