"""`jaxtag export`: the ONNX graph run with onnxruntime against jaxtag, and its bad inputs."""

import dataclasses
import os

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from jaxtag import cli, export
from jaxtag.checkpoint import load_model, save_model
from jaxtag.model import MTSA, ModelConfig, init_variables
from tests.conftest import log_mel_like

SMALL = ModelConfig(conv_channels=2, width=64, num_heads=8, ffn_size=128, num_tags=12)


def _perturbed(config: ModelConfig, seed: int) -> dict:
    """Random weights with BatchNorm statistics away from 0/1 (a dropped one would show)."""
    variables = jax.tree_util.tree_map(np.array, init_variables(config, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]:
        if path[-1].key == "var":
            leaf[...] = rng.uniform(0.5, 2.0, leaf.shape)
        else:
            leaf[...] = rng.normal(0.0, 0.3, leaf.shape)
    variables["batch_stats"]["front_end"]["input_bn"]["mean"][...] = -25.0
    variables["batch_stats"]["front_end"]["input_bn"]["var"][...] = 18.0**2
    return variables


@pytest.fixture(scope="module", params=["learned", "sinusoidal"])
def small_checkpoint(request, tmp_path_factory):
    positions = request.param
    config = dataclasses.replace(
        SMALL, positions=positions, positions_length=271 if positions == "learned" else 257
    )
    directory = tmp_path_factory.mktemp(f"small_{positions}") / "ckpt"
    tags = [f"tag{i}" for i in range(config.num_tags)]
    return save_model(directory, _perturbed(config, 3), config, tags)


def _jaxtag(checkpoint, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and pooled embedding straight from the Flax model."""
    loaded = load_model(checkpoint)
    model = MTSA(loaded.config)
    logits = jax.jit(model.apply)(loaded.variables, mel)
    pooled = jax.jit(lambda v, x: model.apply(v, x, method=MTSA.features))(loaded.variables, mel)
    return np.asarray(jax.nn.sigmoid(logits)), np.asarray(pooled)


def _check_file(checkpoint, path) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["log_mel"]
    assert session.get_inputs()[0].shape == ["batch", 96, 256]  # batch dimension dynamic
    for batch in (1, 7):
        mel = log_mel_like(batch, seed=batch)
        probs, embedding = session.run(["probabilities", "embedding"], {"log_mel": mel})
        want_probs, want_embedding = _jaxtag(checkpoint, mel)
        assert probs.shape == want_probs.shape and embedding.shape == want_embedding.shape
        np.testing.assert_allclose(probs, want_probs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(embedding, want_embedding, atol=1e-5, rtol=0)
        assert probs.std() > 1e-3  # inputs differ, so must the outputs


def test_small_model_runs_in_onnxruntime_like_jaxtag(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "models" / "small.onnx"  # the missing folder is created
    assert cli.main(["export", str(small_checkpoint), str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    _check_file(small_checkpoint, out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file, not 0600
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["tags"].split(",") == load_model(small_checkpoint).tags


@pytest.mark.torch  # converted from the PyTorch reference
def test_released_layout_runs_in_onnxruntime_like_jaxtag(converted_factory, tmp_path):
    checkpoint = converted_factory("released", "legacy")
    out = tmp_path / "released.onnx"
    assert cli.main(["export", str(checkpoint), str(out), "--no-check"]) == 0
    _check_file(checkpoint, out)


def test_bad_checkpoint_or_output_is_one_line_and_keeps_old_file(
    small_checkpoint, tmp_path, capsys
):
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(tmp_path / "missing"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # An existing file is replaced only with --overwrite, and only if it is an ONNX model.
    out.write_bytes(b"previous export")
    for extra, words in [([], "already exists"), (["--overwrite"], "not an ONNX model")]:
        assert cli.main(["export", str(small_checkpoint), str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
        assert out.read_bytes() == b"previous export"

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["export", str(small_checkpoint), str(blocker / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert "a_file" in err and len(err.strip().splitlines()) == 1

    assert cli.main(["export", str(small_checkpoint), str(tmp_path / "model.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err


def test_a_graph_that_disagrees_with_jaxtag_is_not_written(
    small_checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # any difference is too large
    out = tmp_path / "model.onnx"
    assert cli.main(["export", str(small_checkpoint), str(out)]) == 2
    assert "differs from jaxtag" in capsys.readouterr().err
    assert not out.exists()
