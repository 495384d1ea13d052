"""`jaxtag embed`: per-file vectors equal to the model's representations averaged like the tag
predictions, other layers, per-window vectors, bad files and a bad --layer."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import jaxtag
from jaxtag import audio, cli
from jaxtag.checkpoint import load_model
from jaxtag.model import MTSA
from tests.data_fixtures import write_corrupt
from tests.tag_fixtures import SMALL, make_checkpoint, write_library

LENGTHS = [12.0, 40.0, 3.0]  # protocol clip, long track (windows), short clip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("embed_ckpt") / "ckpt")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> list[str]:
    return write_library(tmp_path_factory.mktemp("embed_library"), LENGTHS)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def direct(checkpoint: Path, windows: np.ndarray, layer: str) -> np.ndarray:
    """The representation of each window, straight from the model (one batch)."""
    loaded = load_model(checkpoint)
    model = MTSA(loaded.config)
    if layer == "pooled":
        fn = lambda v, x: model.apply(v, x, method=MTSA.features)  # noqa: E731
    else:
        fn = lambda v, x: model.apply(v, x, method=MTSA.representations)[layer]  # noqa: E731
    out = jax.jit(fn)(loaded.variables, windows)
    return np.asarray(jax.device_get(out))


def protocol_windows(path: str) -> np.ndarray:
    mel = audio.load_log_mel(path)
    if mel.shape[1] * audio.HOP / audio.SAMPLE_RATE > 31.0:
        return audio.sliding_windows(mel)[0]
    return audio.eval_chunks(mel)


@pytest.mark.parametrize("layer", ["pooled", "layer_0", "front_end"])
def test_embeddings_are_the_mean_over_the_protocol_windows(checkpoint, library, tmp_path, layer):
    out = tmp_path / "emb.npz"
    argv = ["embed", *library, "--checkpoint", str(checkpoint), "--out", str(out)]
    assert cli.main([*argv, "--layer", layer, "--batch-size", "7"]) == 0
    result = load_npz(out)
    assert list(result["paths"]) == library and str(result["layer"]) == layer
    assert result["embeddings"].shape == (3, SMALL.width)
    assert result["embeddings"].dtype == np.float32
    for path, vector in zip(library, result["embeddings"], strict=True):
        expected = direct(checkpoint, protocol_windows(path), layer).mean(axis=0)
        np.testing.assert_allclose(vector, expected, atol=2e-5)
    np.testing.assert_allclose(result["durations"], LENGTHS, atol=0.01)
    assert not (tmp_path / "emb.npz.partial").exists()


def test_per_window_vectors_with_start_times(checkpoint, library, tmp_path):
    out = tmp_path / "windows.npz"
    argv = ["embed", *library, "--checkpoint", str(checkpoint), "--out", str(out), "--per-window"]
    assert cli.main(argv) == 0
    result = load_npz(out)
    for i, path in enumerate(library):
        windows, starts = audio.sliding_windows(audio.load_log_mel(path))
        rows = result["window_file_index"] == i
        np.testing.assert_allclose(result["window_starts"][rows], audio.frames_to_seconds(starts))
        np.testing.assert_allclose(
            result["window_embeddings"][rows], direct(checkpoint, windows, "pooled"), atol=2e-5
        )
    # The file vectors stay the protocol mean, whatever windows are kept besides.
    expected = direct(checkpoint, protocol_windows(library[0]), "pooled").mean(axis=0)
    np.testing.assert_allclose(result["embeddings"][0], expected, atol=2e-5)


def test_bad_file_in_the_list_and_bad_layer(checkpoint, library, tmp_path, capsys):
    bad = write_corrupt(str(tmp_path / "broken.mp3"))
    out = tmp_path / "emb.npz"
    argv = ["embed", library[0], bad, library[2], "--checkpoint", str(checkpoint)]
    assert cli.main([*argv, "--out", str(out)]) == 1
    assert "broken.mp3: cannot decode audio" in capsys.readouterr().err
    assert list(load_npz(out)["paths"]) == [library[0], library[2]]

    assert cli.main([*argv, "--out", str(tmp_path / "x.npz"), "--layer", "layer_9"]) == 2
    err = capsys.readouterr().err
    assert "layer_9" in err and "front_end, layer_0, layer_1, pooled" in err
    assert not (tmp_path / "x.npz").exists()
    # Resuming with another representation would mix two kinds of vectors: refused.
    assert cli.main([*argv, "--out", str(out), "--layer", "front_end"]) == 2
    assert "layer differs" in capsys.readouterr().err


def test_representation_names_follow_the_model(checkpoint):
    tagger = jaxtag.load(checkpoint)
    assert tagger.config.num_layers == 2
    assert tagger.layers == ["front_end", "layer_0", "layer_1", "pooled"]


def test_onnx_engine_embeds_like_jax(checkpoint, library, tmp_path, capsys):
    argv = ["embed", *library, "--checkpoint", str(checkpoint), "--per-window"]
    outs = {}
    for engine in ["jax", "onnx"]:
        outs[engine] = tmp_path / f"{engine}.npz"
        assert cli.main([*argv, "--out", str(outs[engine]), "--engine", engine]) == 0
    got, want = load_npz(outs["onnx"]), load_npz(outs["jax"])
    assert list(got["paths"]) == library and got["embeddings"].shape == (3, SMALL.width)
    for name in ["embeddings", "window_embeddings", "window_starts", "durations"]:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5)

    # Other layers are not in the ONNX graph: refused with --engine onnx, jax under auto.
    layer_argv = [*argv, "--layer", "layer_0", "--out", str(tmp_path / "layer.npz")]
    assert cli.main([*layer_argv, "--engine", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "onnx engine" in err and "'layer_0'" in err and "jax engine" in err
    assert not (tmp_path / "layer.npz").exists()


def test_auto_engine_runs_other_layers_with_jax(checkpoint, library, tmp_path, monkeypatch):
    from jaxtag import scoring

    monkeypatch.setattr(scoring, "AUTO_ENGINE", "onnx")
    out = tmp_path / "layer.npz"
    argv = ["embed", library[0], "--checkpoint", str(checkpoint), "--layer", "layer_0"]
    assert cli.main([*argv, "--out", str(out), "--engine", "auto"]) == 0
    expected = direct(checkpoint, protocol_windows(library[0]), "layer_0").mean(axis=0)
    np.testing.assert_allclose(load_npz(out)["embeddings"][0], expected, atol=2e-5)
