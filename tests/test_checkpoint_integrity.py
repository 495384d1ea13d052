"""The checkpoint digest covers the metadata that changes outputs, cannot be switched off by the
file, and bad metadata or hollow step folders are one-line errors or warnings (issue 17, item 4
and the hollow `best/N` of item 2)."""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtag import checkpoint
from jaxtag.model import ModelConfig
from jaxtag.model import config as model_config
from tests import test_checkpoint as base

TINY, TAGS = base.TINY, base.TAGS
variables = base.variables  # the same module-scoped fixture


@pytest.fixture(scope="module")
def saved(variables, tmp_path_factory):
    return checkpoint.save_model(tmp_path_factory.mktemp("saved") / "ckpt", variables, TINY, TAGS)


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of a format-2 model checkpoint, free to edit."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def meta_file(directory: Path) -> Path:
    """The JSON file orbax writes for the meta item (`meta/metadata`)."""
    (path,) = [
        p for p in (directory / "meta").iterdir() if p.is_file() and p.name != "commit_success.txt"
    ]
    return path


def edit_meta(directory: Path, change) -> None:
    path = meta_file(directory)
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def refused(directory: Path) -> str:
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_model(directory)
    message = str(err.value)
    assert message.startswith(str(directory)) and "\n" not in message, message
    return message


def test_save_writes_the_format_and_a_digest_of_the_metadata(ckpt):
    meta = json.loads(meta_file(ckpt).read_text())
    assert meta["format"] == checkpoint.FORMAT == 2
    assert sorted(meta["sha256"]) == ["meta", "variables"]
    assert meta["sha256"]["meta"] == checkpoint.meta_digest(meta)
    loaded = checkpoint.load_model(ckpt)
    assert loaded.tags == TAGS and loaded.config == TINY


def _reverse_tags(meta):
    meta["tags"] = meta["tags"][::-1]


def _more_layers(meta):
    meta["model"]["num_layers"] = 2


def _other_positions(meta):
    meta["model"]["positions"] = "sinusoidal"


def _other_precision(meta):
    meta["model"]["precision"] = "default"


@pytest.mark.parametrize(
    "change", [_reverse_tags, _more_layers, _other_positions, _other_precision]
)
def test_edited_metadata_with_the_old_digest_is_refused(ckpt, change):
    edit_meta(ckpt, change)
    assert "metadata (model config, tags, format) does not match its digest" in refused(ckpt)


@pytest.mark.parametrize(
    "digests, words",
    [
        ({}, "no digest for its variables, meta item"),
        ("x", "digests are malformed ('sha256' is a str)"),
        (None, "digests are malformed ('sha256' is a NoneType)"),
        ({"meta": "0" * 64}, "no digest for its variables item"),
    ],
)
def test_digest_that_is_missing_or_malformed_is_refused(ckpt, digests, words):
    def change(meta):
        meta["sha256"] = digests
        meta["tags"] = meta["tags"][::-1]  # what the digest would have caught

    edit_meta(ckpt, change)
    assert words in refused(ckpt)


def test_digest_missing_under_the_current_format_is_refused(ckpt):
    edit_meta(ckpt, lambda meta: meta.pop("sha256"))
    assert "malformed ('sha256' is a NoneType)" in refused(ckpt)


@pytest.mark.parametrize("version", [3, "2", 1, None])
def test_unknown_format_is_refused(ckpt, version):
    edit_meta(ckpt, lambda meta: meta.update(format=version))
    assert f"unknown checkpoint format {str(version)!r}" in refused(ckpt)


def _previous_format(meta):
    """A checkpoint as converted before the meta digest: array digests, no 'format'."""
    del meta["format"], meta["sha256"]["meta"]


def test_previous_format_loads_with_arrays_verified_and_one_warning(ckpt, variables, caplog):
    edit_meta(ckpt, _previous_format)
    with caplog.at_level(logging.WARNING, logger="jaxtag.checkpoint"):
        loaded = checkpoint.load_model(ckpt)
        checkpoint.load_model(ckpt)
    assert loaded.tags == TAGS
    warned = [r.getMessage() for r in caplog.records if "previous format" in r.getMessage()]
    assert warned == [
        f"{ckpt}: checkpoint of the previous format: arrays verified, model config and tags not "
        "(convert or save it again to cover them)"
    ]
    changed = jax.tree_util.tree_map(np.array, loaded.variables)
    changed["params"]["classifier"]["bias"][0] += 1.0  # arrays are still checked
    with pytest.raises(checkpoint.CheckpointError, match="'variables' arrays do not match"):
        checkpoint.verify(ckpt, {"variables": changed}, loaded.meta)


def test_config_values_are_checked_field_by_field():
    with pytest.raises(ValueError) as err:
        ModelConfig.from_saved({**TINY.to_dict(), "num_heads": 0, "num_layers": 1e12})
    assert str(err.value) == (
        "num_layers: 1000000000000.0 (must be an integer <= 64); num_heads: 0 (must be >= 1)"
    )
    bad = {
        "width": [16],
        "n_mels": 2,
        "ffn_size": True,
        "positions_length": 1,
        "num_tags": 0,
        "conv_channels": 2.5,
        "hidden_dropout": 1.0,
        "attention_dropout": -0.1,
        "classifier_dropout": "0.5",
        "positions": "fixed",
        "dtype": {},
        "precision": None,
        "bogus": 1,
    }
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict(bad)
    parts = str(err.value).split(" (known fields:")[0].split("; ")
    assert parts == [
        "bogus: unknown field",
        "conv_channels: 2.5 (must be an integer)",
        "n_mels: 2 (must be >= 3)",
        "width: [16] (must be an integer from 1 to 16384)",
        "ffn_size: True (must be an integer from 1 to 65536)",
        "positions_length: 1 (must be >= 2)",
        "num_tags: 0 (must be >= 1)",
        "attention_dropout: -0.1 (must be a number in [0, 1))",
        "hidden_dropout: 1.0 (must be a number in [0, 1))",
        "classifier_dropout: '0.5' (must be a number in [0, 1))",
        "positions: 'fixed' (must be one of 'learned', 'sinusoidal')",
        "dtype: {} (must be one of 'float32', 'bfloat16', 'float16')",
        "precision: None (must be one of 'highest', 'high', 'default')",
    ]
    with pytest.raises(ValueError, match=r"^num_heads: 3 \(width 16 is not divisible by num_heads"):
        ModelConfig.from_dict({**TINY.to_dict(), "num_heads": 3})
    with pytest.raises(ValueError, match="^the model config is a list, not a mapping"):
        ModelConfig.from_saved([["width", 16]])
    made = ModelConfig.from_dict({**TINY.to_dict(), "width": np.int64(16), "hidden_dropout": 0})
    assert type(made.width) is int and made.hidden_dropout == 0.0
    assert json.loads(json.dumps(made.to_dict()))["width"] == 16


def test_tags_are_distinct_non_empty_strings_one_per_output():
    config = TINY.to_dict()
    assert model_config.saved_model(config, TAGS) == (TINY, TAGS)
    cases = {
        "tags: 2 tag names for a model with 3 outputs": ["a", "b"],
        "tags: 'a' given more than once": ["a", "b", "a"],
        "tags: entries 1: '', 2: 7 (must be non-empty printable strings)": ["a", "", 7],
        "tags: a dict (must be a list of tag names)": {"a": 1},
        "no tags": None,
    }
    for words, tags in cases.items():
        with pytest.raises(ValueError) as err:
            model_config.saved_model(config, tags)
        assert str(err.value) == words
    with pytest.raises(ValueError, match="'b' given more than once"):
        checkpoint.make_meta(TINY, ["a", "b", "b"])


def test_bad_metadata_is_one_line_naming_every_field(ckpt):
    def change(meta):
        meta["model"].update(num_heads=0, num_layers=1e12)
        meta["tags"] = ["a", "a"]

    edit_meta(ckpt, change)
    assert refused(ckpt) == (
        f"{ckpt}: bad checkpoint metadata: model config: num_layers: 1000000000000.0 (must be an "
        "integer <= 64); num_heads: 0 (must be >= 1); tags: 'a' given more than once"
    )
    edit_meta(ckpt, lambda meta: meta.update(model=[1, 2]))
    assert "bad checkpoint metadata: model config: the model config is a list" in refused(ckpt)


def save_steps(variables, workdir: Path, scores) -> checkpoint.CheckpointStore:
    store = checkpoint.CheckpointStore(workdir, keep_best=2)
    for step, score in scores:
        meta = checkpoint.make_meta(TINY, TAGS, step=step, metrics={"roc_auc": score})
        train_item = {"step": np.asarray(step, np.int32), "rng": np.arange(2, dtype=np.uint32)}
        store.save(step, variables, train_item, meta, score=score)
    store.wait()
    return store


def test_hollow_step_folders_are_ignored_with_a_warning(variables, tmp_path, caplog):
    save_steps(variables, tmp_path, ((1, 0.7), (2, 0.6))).close()
    steps = tmp_path / "checkpoints"
    for hollow in (steps / "best" / "5", steps / "latest" / "9"):  # e.g. an eval report's folder
        hollow.mkdir()
        (hollow / "report.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="jaxtag.checkpoint"):
        assert checkpoint.resolve(tmp_path) == steps / "best" / "1"
        assert checkpoint.resolve(tmp_path, prefer="latest") == steps / "latest" / "2"
        assert checkpoint.load_model(tmp_path).meta["step"] == 1
        store = checkpoint.CheckpointStore(tmp_path, keep_best=2)
        assert store.latest_step() == 2 and store.latest_meta()["step"] == 2
        train_item = {"step": np.asarray(0, np.int32), "rng": np.zeros(2, np.uint32)}
        _, restored, meta = store.restore(variables, train_item)
        store.close()
    assert int(restored["step"]) == 2 and meta["step"] == 2
    for hollow in ("best/5", "latest/9"):
        warned = f"{steps / hollow}: not a complete checkpoint; ignored"
        assert [r.getMessage() for r in caplog.records].count(warned) == 1


def test_only_hollow_best_steps_fall_back_to_latest(variables, tmp_path, caplog):
    save_steps(variables, tmp_path, ((1, None),)).close()
    (tmp_path / "checkpoints" / "best" / "3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "best" / "3" / "report.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="jaxtag.checkpoint"):
        assert checkpoint.load_model(tmp_path).path == tmp_path / "checkpoints" / "latest" / "1"
    assert "best/3: not a complete checkpoint; ignored" in caplog.text


def test_resume_refuses_edited_metadata(variables, tmp_path):
    save_steps(variables, tmp_path, ((1, 0.5),)).close()
    latest = tmp_path / "checkpoints" / "latest" / "1"
    edit_meta(latest, _reverse_tags)
    store = checkpoint.CheckpointStore(tmp_path)
    train_item = {"step": np.asarray(0, np.int32), "rng": np.zeros(2, np.uint32)}
    try:
        for call in (store.latest_meta, lambda: store.restore(variables, train_item)):
            with pytest.raises(checkpoint.CheckpointError, match="does not match its digest"):
                call()
        edit_meta(latest, lambda meta: meta["model"].update(num_heads=0))
        with pytest.raises(checkpoint.CheckpointError, match=r"num_heads: 0 \(must be >= 1\)"):
            store.latest_meta()
    finally:
        store.close()


def test_info_on_a_workdir_with_a_hollow_best_step(variables, tmp_path, capsys, monkeypatch):
    from jaxtag import cli

    monkeypatch.setenv("JAXTAG_CACHE_DIR", "off")
    save_steps(variables, tmp_path, ((1, 0.7),)).close()
    hollow = tmp_path / "checkpoints" / "best" / "4"
    hollow.mkdir()
    (hollow / "report.json").write_text("{}")
    assert cli.main(["info", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tags"] == TAGS and record["model"]["num_layers"] == 1
