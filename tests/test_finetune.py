"""Fine-tuning a checkpoint with other tags on synthetic_tags: rebuilt classifier, linear probe."""

import jax
import numpy as np
import pytest

from jaxtag import checkpoint, train
from jaxtag.model import ModelConfig, init_variables
from tests.conftest import small_train_config

pytestmark = pytest.mark.slow  # builds a dataset and fine-tunes

SOURCE_TAGS = ["rock", "loud", "jazz", "quiet", "ambient"]  # two shared with synthetic_tags


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    """A converted-format checkpoint of a tiny model with random weights and other tags."""
    model = ModelConfig(
        conv_channels=1, width=32, num_layers=1, num_heads=2, ffn_size=64,
        positions_length=257, num_tags=len(SOURCE_TAGS),
    )  # fmt: skip
    variables = init_variables(model, jax.random.PRNGKey(7))
    directory = tmp_path_factory.mktemp("source") / "ckpt"
    return checkpoint.save_model(directory, variables, model, SOURCE_TAGS, source="test")


def probe_config(dataset_dir: str, init: str):
    from configs.finetune import get_config

    config = get_config("probe")
    base = small_train_config(dataset_dir)
    config.dataset, config.eval_batch_size = base.dataset, base.eval_batch_size
    config.init_checkpoint = str(init)
    config.global_batch_size = 16
    config.num_epochs = 3
    config.learning_rate = 3e-2
    config.log_every_steps = 2
    return config


def leaves(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def test_classifier_rows_of_shared_tags_come_from_the_checkpoint(source_checkpoint, synthetic_data):
    from data_prep import synth

    tags = list(synth.TAG_NAMES)
    config = probe_config(synthetic_data, source_checkpoint)
    model, variables = train.initial_variables(
        str(source_checkpoint), dict(config.model), tags, config
    )
    source = checkpoint.load_model(source_checkpoint)
    assert model.num_tags == len(tags) and model.width == source.config.width
    head, source_head = variables["params"]["classifier"], source.variables["params"]["classifier"]
    for tag in ("loud", "quiet"):
        i, j = tags.index(tag), SOURCE_TAGS.index(tag)
        np.testing.assert_array_equal(head["kernel"][:, i], source_head["kernel"][:, j])
        assert head["bias"][i] == source_head["bias"][j]
    other = [tags.index(t) for t in tags if t not in SOURCE_TAGS]
    assert not np.any(np.isin(head["kernel"][:, other], source_head["kernel"]))
    backbone = leaves({k: v for k, v in variables["params"].items() if k != "classifier"})
    want = leaves({k: v for k, v in source.variables["params"].items() if k != "classifier"})
    assert backbone.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(backbone[key], want[key])


def test_linear_probe_keeps_the_backbone_and_learns(
    source_checkpoint, synthetic_data, tmp_path, capsys
):
    config = probe_config(synthetic_data, source_checkpoint)
    summary = train.train_and_evaluate(config, tmp_path)
    assert "2 rows kept (loud, quiet)" in capsys.readouterr().out
    source = checkpoint.load_model(source_checkpoint)
    trained = checkpoint.load_model(tmp_path, prefer="latest")
    assert trained.meta["step"] == summary["total_steps"] > 0
    before, after = leaves(source.variables), leaves(trained.variables)
    for key, value in before.items():
        if "classifier" not in key:  # every backbone weight and BatchNorm statistic, bit for bit
            np.testing.assert_array_equal(after[key], value, err_msg=key)
    tags = trained.tags
    for tag in ("loud", "quiet"):  # the head trained: shared rows moved away from the source
        i, j = tags.index(tag), SOURCE_TAGS.index(tag)
        column = after["['params']['classifier']['kernel']"][:, i]
        assert not np.array_equal(column, before["['params']['classifier']['kernel']"][:, j])
    assert summary["best_validation_roc_auc"] > 0.6  # chance is 0.5

    # Resume works as for any run: a longer schedule continues from the finished step.
    config.num_epochs = 4
    resumed = train.train_and_evaluate(config, tmp_path)
    assert resumed["step"] == resumed["total_steps"] > summary["total_steps"]
    assert "Resuming from" in capsys.readouterr().out
