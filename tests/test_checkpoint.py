"""Checkpoint integrity (array digests), the training CheckpointStore, and safe --overwrite."""

import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtag import checkpoint
from jaxtag.model import ModelConfig, init_variables

TINY = ModelConfig(
    conv_channels=1,
    width=16,
    num_layers=1,
    num_heads=2,
    ffn_size=32,
    positions_length=65,
    num_tags=3,
)
TAGS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def variables():
    return init_variables(TINY, jax.random.PRNGKey(0), frames=64)


def corrupt(directory: Path, array: np.ndarray) -> int:
    """Flips bytes inside `array`'s stored data wherever it lies under `directory` (uncompressed
    chunks under `variables/d/` and `variables/ocdbt.process_0/d/`); returns the files changed."""
    needle = np.ascontiguousarray(array).tobytes()
    changed = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        raw = bytearray(path.read_bytes())
        at = raw.find(needle)
        if at < 0:
            continue
        middle = at + len(needle) // 2
        raw[middle : middle + 4] = bytes(b ^ 0x5A for b in raw[middle : middle + 4])
        path.write_bytes(bytes(raw))
        changed += 1
    return changed


def test_flipped_bytes_in_array_data_are_refused(variables, tmp_path):
    out = checkpoint.save_model(tmp_path / "ckpt", variables, TINY, TAGS)
    assert checkpoint.load_model(out).meta[checkpoint.DIGESTS]["variables"]
    kernel = np.asarray(variables["params"]["classifier"]["kernel"])
    assert corrupt(out / "variables", kernel) >= 1
    with pytest.raises(checkpoint.CheckpointError, match=str(out)):
        checkpoint.load_model(out)


def test_truncated_array_file_is_one_line_error(variables, tmp_path):
    out = checkpoint.save_model(tmp_path / "ckpt", variables, TINY, TAGS)
    data = [p for p in (out / "variables").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert data
    for path in data:  # an interrupted copy: every array file cut short
        path.write_bytes(path.read_bytes()[:16])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_model(out)
    message = str(err.value)
    assert str(out) in message and "\n" not in message and len(message) < 600


def test_digest_sees_values_dtypes_shapes_and_names():
    base = {"w": np.arange(4, dtype=np.float32)}
    digest = checkpoint.array_digest(base)
    assert digest == checkpoint.array_digest({"w": np.arange(4, dtype=np.float32)})
    one_ulp = np.arange(4, dtype=np.float32)
    one_ulp[3] = np.nextafter(one_ulp[3], np.float32(9))
    changed = [
        {"w": one_ulp},
        {"w": np.arange(4, dtype=np.float64)},
        {"w": np.arange(4, dtype=np.float32).reshape(2, 2)},
        {"v": np.arange(4, dtype=np.float32)},
    ]
    assert all(checkpoint.array_digest(tree) != digest for tree in changed)


def test_checkpoint_without_digest_still_loads_with_a_warning(variables, tmp_path, caplog):
    old = tmp_path / "old"
    meta = checkpoint.make_meta(TINY, TAGS)  # as written before digests existed
    args = ocp.args.Composite(
        variables=ocp.args.StandardSave(checkpoint.model_variables(variables)),
        meta=ocp.args.JsonSave(meta),
    )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(old, args)
    with caplog.at_level(logging.WARNING, logger="jaxtag.checkpoint"):
        loaded = checkpoint.load_model(old)
    assert loaded.tags == TAGS and "not verified" in caplog.text


def test_overwrite_replaces_only_a_checkpoint(variables, tmp_path):
    out = checkpoint.save_model(tmp_path / "ckpt", variables, TINY, TAGS)
    other = [t.upper() for t in TAGS]
    checkpoint.save_model(out, variables, TINY, other, overwrite=True)
    assert checkpoint.load_model(out).tags == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left beside it

    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("precious")
    plain_file = tmp_path / "notes.txt"
    plain_file.write_text("also precious")
    for target in (user_dir, plain_file):
        with pytest.raises(FileExistsError, match="left untouched"):
            checkpoint.save_model(target, variables, TINY, TAGS, overwrite=True)
    assert (user_dir / "thesis.tex").read_text() == "precious"
    assert plain_file.read_text() == "also precious"


def test_failed_overwrite_keeps_the_old_checkpoint(variables, tmp_path, monkeypatch):
    out = checkpoint.save_model(tmp_path / "ckpt", variables, TINY, TAGS)
    with pytest.raises(ValueError, match="3 outputs"):
        checkpoint.save_model(out, variables, TINY, TAGS + ["d"], overwrite=True)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ocp.Checkpointer, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match="cannot write the checkpoint.*No space"):
        checkpoint.save_model(out, variables, TINY, ["x", "y", "z"], overwrite=True)
    monkeypatch.undo()
    assert checkpoint.load_model(out).tags == TAGS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_store_round_trip_best_and_corruption(variables, tmp_path):
    store = checkpoint.CheckpointStore(tmp_path, keep_best=1)
    train_item = {"step": np.asarray(0, np.int32), "rng": np.arange(2, dtype=np.uint32)}
    for step, score in ((1, 0.6), (2, None), (3, 0.5)):
        meta = checkpoint.make_meta(TINY, TAGS, step=step, metrics={"roc_auc": score})
        store.save(
            step, variables, {**train_item, "step": np.asarray(step, np.int32)}, meta, score=score
        )
    store.wait()
    assert store.latest_step() == 3 and store.latest_meta()["step"] == 3
    _, restored, meta = store.restore(variables, train_item)
    assert int(restored["step"]) == 3 and meta["step"] == 3
    assert checkpoint.load_model(tmp_path).meta["step"] == 1  # best by ROC-AUC
    store.close()

    kernel = np.asarray(variables["params"]["classifier"]["kernel"])
    assert corrupt(tmp_path / "checkpoints" / "latest" / "3", kernel) >= 1
    store = checkpoint.CheckpointStore(tmp_path, keep_best=1)
    with pytest.raises(checkpoint.CheckpointError, match="latest/3"):
        store.restore(variables, train_item)
    store.close()
    assert json.loads((tmp_path / "checkpoints" / "best" / "1" / "meta" / "metadata").read_text())
