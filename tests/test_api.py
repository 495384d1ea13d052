"""The Python API (`jaxtag.load -> Tagger`): the same numbers as the commands and as the PyTorch
reference, a file and its decoded waveform alike, `.pth` files and "ponswon" as sources, and one
exception type whose messages are the commands' own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import jaxtag
from jaxtag import audio, cli
from jaxtag.tags import MTAT_TOP50
from tests.tag_fixtures import SMALL, TAGS, make_checkpoint, write_library

REPO = Path(__file__).resolve().parents[1]
LENGTHS = [12.0, 40.0, 3.0]  # a protocol clip, a long track (adjacent windows), a short clip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("api_ckpt") / "ckpt")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> list[str]:
    return write_library(tmp_path_factory.mktemp("api_library"), LENGTHS)


@pytest.fixture(scope="module")
def tagger(checkpoint) -> jaxtag.Tagger:
    return jaxtag.load(checkpoint, engine="jax")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_import_jaxtag_loads_no_jax_until_a_model_is_used():
    code = (
        "import sys, jaxtag\n"
        "names = dir(jaxtag)\n"
        "assert {'load', 'Tagger', 'JaxtagError', 'convert_weights'} <= set(names), names\n"
        "jaxtag.Tagger, jaxtag.load\n"  # the face itself is light too
        "print(','.join(m for m in ('jax', 'flax', 'orbax') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_load_keeps_compiled_programs_in_the_cache_unless_one_is_set(checkpoint, library, tmp_path):
    code = (
        "import sys, jax, jaxtag\n"
        "if sys.argv[1] == 'own':\n"
        "    jax.config.update('jax_compilation_cache_dir', sys.argv[2] + '/own')\n"
        f"jaxtag.load({str(checkpoint)!r}, engine='jax').predict({library[2]!r})\n"
        "print(jax.config.jax_compilation_cache_dir)\n"
    )
    for mode in ("default", "own"):
        env = {**os.environ, "JAXTAG_CACHE_DIR": str(tmp_path / "jaxtag")}
        result = subprocess.run([sys.executable, "-c", code, mode, str(tmp_path)], env=env,
                                capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        used = Path(result.stdout.strip().splitlines()[-1])
        assert used == tmp_path / ("jaxtag" if mode == "default" else "own")
        if mode == "default":  # (the program's own cache keeps JAX's own thresholds)
            assert any(used.iterdir())  # the compiled programs are there


def test_tagger_describes_its_model(tagger, checkpoint):
    assert tagger.tags == TAGS and tagger.config == SMALL
    assert tagger.path == Path(checkpoint).absolute()
    assert tagger.layers == ["front_end", "layer_0", "layer_1", "pooled"]
    assert tagger.num_params > 10_000 and tagger.engine == "jax"
    assert "Tagger(" in repr(tagger) and "6 tags" in repr(tagger)


def test_tag_equals_the_command_line(tagger, checkpoint, library, capsys):
    code, out, _ = run_cli(capsys, "tag", *library, "--checkpoint", checkpoint, "--json",
                           "--top", "3", "--engine", "jax")  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    results = tagger.tag(library, top_k=3)
    assert len(results) == len(records) == 3
    for record, result in zip(records, results, strict=True):
        assert [t["label"] for t in record["tags"]] == [t["label"] for t in result]
        for t, r in zip(record["tags"], result, strict=True):
            assert t["score"] == pytest.approx(r["score"], abs=1e-4)
        scores = [r["score"] for r in result]
        assert scores == sorted(scores, reverse=True) and isinstance(scores[0], float)
    # One input: one list; predict agrees with tag and with the list form.
    single = tagger.tag(library[0], top_k=len(TAGS))
    probs = tagger.predict(library[0])
    assert probs.shape == (len(TAGS),) and probs.dtype == np.float32
    assert [t["label"] for t in single] == [TAGS[i] for i in np.argsort(-probs, kind="stable")]
    np.testing.assert_allclose(tagger.predict(library)[0], probs, atol=1e-6)
    assert tagger.predict(library).shape == (3, len(TAGS))


def test_taggram_and_embed_equal_the_command_line(tagger, checkpoint, library, tmp_path, capsys):
    taggram, emb = tmp_path / "taggram.npz", tmp_path / "emb.npz"
    common = ["--checkpoint", checkpoint, "--engine", "jax"]
    assert run_cli(capsys, "tag", *library, *common, "--taggram", taggram)[0] == 0
    assert run_cli(capsys, "embed", *library, *common, "--out", emb, "--layer", "layer_1")[0] == 0
    with np.load(taggram) as saved:
        rows, index = saved["taggram"], saved["window_file_index"]
        starts = saved["window_starts"]
    for i, (got_starts, got) in enumerate(tagger.taggram(library)):
        np.testing.assert_allclose(got, rows[index == i], atol=1e-6)
        np.testing.assert_allclose(got_starts, starts[index == i], atol=1e-9)
    long_starts, long_probs = tagger.taggram(library[1])
    assert long_probs.shape == (len(long_starts), len(TAGS)) and len(long_starts) >= 9
    with np.load(emb) as saved:
        np.testing.assert_allclose(tagger.embed(library, layer="layer_1"), saved["embeddings"],
                                   atol=1e-6)  # fmt: skip
    pooled = tagger.embed(library[0])
    assert pooled.shape == (SMALL.width,) and pooled.dtype == np.float32


def test_a_file_and_its_decoded_waveform_give_the_same_numbers(tagger, tmp_path):
    path = tmp_path / "stereo.wav"
    rng = np.random.default_rng(3)
    t = np.arange(int(7.3 * 44_100)) / 44_100
    left = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)
    samples = np.stack([left, 0.5 * left[::-1]], axis=1)
    sf.write(path, samples, 44_100, subtype="PCM_16")
    decoded, rate = sf.read(path, dtype="float32")  # (samples, 2), as a user would read it
    as_int, _ = sf.read(path, dtype="int16")  # PCM as integers: scaled as soundfile does
    for waveform in (decoded, decoded.astype(np.float64), as_int):
        np.testing.assert_allclose(
            tagger.predict(waveform, sr=rate), tagger.predict(path), atol=1e-6
        )
    np.testing.assert_allclose(tagger.embed(decoded, sr=rate), tagger.embed(path), atol=1e-6)
    np.testing.assert_allclose(
        tagger.taggram(decoded, sr=rate)[1], tagger.taggram(path)[1], atol=1e-6
    )
    mono = decoded.mean(axis=1)  # a mono waveform is the channel average
    np.testing.assert_allclose(tagger.predict(mono, sr=rate), tagger.predict(path), atol=1e-6)
    file_maps = tagger.explain(path, start=2.0).maps
    wave_maps = tagger.explain(decoded, start=2.0, sr=rate).maps
    for name in ("mel", "probs", "contributions", "last_layer_cls_heads"):
        np.testing.assert_allclose(wave_maps[name], file_maps[name], atol=1e-5, err_msg=name)


def test_explain_equals_the_command_line_and_draws_its_figure(tagger, checkpoint, library,
                                                              tmp_path, capsys):  # fmt: skip
    npz, fig = tmp_path / "maps.npz", tmp_path / "fig.png"
    argv = ["explain", library[1], "--checkpoint", checkpoint, "--out", fig, "--start", "20",
            "--tags", "piano,drums", "--save-npz", npz]  # fmt: skip
    assert run_cli(capsys, *argv)[0] == 0
    explanation = tagger.explain(library[1], start=20, tags=["piano", "drums"])
    assert explanation.chosen == ["piano", "drums"] and explanation.source == library[1]
    assert explanation.start == pytest.approx(20.0, abs=0.01)
    with np.load(npz) as saved:
        for name, value in explanation.maps.items():
            np.testing.assert_allclose(value, saved[name], atol=1e-6, err_msg=name)
    assert explanation.contributions.shape == (audio.CHUNK_FRAMES, 2)
    assert set(explanation.probabilities) == set(TAGS)
    out = explanation.plot(tmp_path / "again.svg")
    assert out.read_bytes()[:400].count(b"<svg") == 1
    default = tagger.explain(library[1])  # the chunk's top 3 tags by default
    top = sorted(TAGS, key=lambda t: -default.probabilities[t])[:3]
    assert default.chosen == top


def test_export_writes_the_onnx_file(tagger, tmp_path):
    import onnx  # the export extra is part of both test installs

    out = tagger.export(tmp_path / "model.onnx")
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["probabilities", "embedding"]


@pytest.mark.parametrize(
    "call, argv",
    [
        (lambda t, d: t.tag(str(d / "missing.wav")), ["tag", "{d}/missing.wav"]),
        (lambda t, d: t.explain(str(d / "short.wav"), start=60), ["explain", "{d}/short.wav",
                                                                  "--start", "60"]),
        (lambda t, d: t.explain(str(d / "short.wav"), tags=["banjo"]), ["explain",
         "{d}/short.wav", "--tags", "banjo"]),
        (lambda t, d: t.embed(str(d / "short.wav"), layer="layer_7"), ["embed", "{d}/short.wav",
                                                                        "--layer", "layer_7"]),
        (lambda t, d: t.explain(str(d / "short.wav"), start=-1), ["explain", "{d}/short.wav",
                                                                  "--start", "-1"]),
    ],
)  # fmt: skip
def test_bad_input_raises_one_type_with_the_commands_message(
    tagger, checkpoint, tmp_path, capsys, call, argv
):
    sf.write(tmp_path / "short.wav", np.zeros(16_000 * 3, np.float32), 16_000)
    with pytest.raises(jaxtag.JaxtagError) as raised:
        call(tagger, tmp_path)
    message = str(raised.value)
    assert message and "\n" not in message
    argv = [a.format(d=tmp_path) for a in argv]
    extra = {
        "tag": ["--engine", "jax"],
        "embed": ["--engine", "jax", "--out", tmp_path / "e.npz"],
        "explain": ["--out", tmp_path / "f.png"],
    }[argv[0]]
    code, _, err = run_cli(capsys, *argv, "--checkpoint", checkpoint, *extra)
    assert code in (1, 2)
    assert message in err.strip().splitlines()[-1] or message in err


@pytest.mark.parametrize(
    "audio_input, sr, words",
    [
        (np.zeros((2, 3, 4), np.float32), 16_000, "(samples,) or (samples, channels)"),
        (np.zeros((2, 44_100), np.float32), 44_100, "transpose"),
        (np.zeros(1000, np.float32), None, "sr="),
        (np.zeros(1000, np.float32), -5, "positive sample rate"),
        (np.array(["a", "b"]), 16_000, "float or integer"),
        (np.full(1000, np.nan, np.float32), 16_000, "NaN"),
        (np.zeros(0, np.float32), 16_000, "no audio samples"),
        (42, None, "a path, a numpy waveform"),
        ([], None, "empty list"),
    ],
)
def test_bad_waveforms_are_one_line_errors(tagger, audio_input, sr, words):
    with pytest.raises(jaxtag.JaxtagError) as raised:
        tagger.predict(audio_input, sr=sr)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_bad_arguments(tagger, library):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(jaxtag.JaxtagError, match="top_k"):
            tagger.tag(library[0], top_k=bad)
    with pytest.raises(jaxtag.JaxtagError, match="engine must be one of"):
        jaxtag.Tagger(tagger.model, engine="torch")
    with pytest.raises(jaxtag.JaxtagError, match="batch_size"):
        jaxtag.Tagger(tagger.model, batch_size=0)
    with pytest.raises(jaxtag.JaxtagError, match="one audio input"):
        tagger.explain(library)
    with pytest.raises(jaxtag.JaxtagError, match="no such checkpoint"):
        jaxtag.load(Path(library[0]).parent / "nothing-here")
    assert len(tagger.tag(library[0], top_k=99)) == len(TAGS)  # more than there are: all


@pytest.mark.torch
def test_api_matches_the_pytorch_reference_on_a_converted_pth(reference_factory, tmp_path):
    """A `.pth` loaded in memory (nothing written) predicts what the torch model predicts on the
    same windows, within 1e-5 in float32."""
    import torch

    case = reference_factory("released")
    before = set(tmp_path.iterdir())
    tagger = jaxtag.load(case.files["legacy"], engine="jax")
    assert tagger.path == case.files["legacy"].absolute() and tagger.tags == list(MTAT_TOP50)
    assert set(tmp_path.iterdir()) == before
    path = Path(write_library(tmp_path / "audio", [9.0])[0])
    windows = audio.eval_chunks(audio.load_log_mel(path))
    with torch.no_grad():
        want, _ = case.model(torch.from_numpy(windows))
    want = want.numpy()
    assert want.std() > 0.05  # spread outputs: the comparison means something
    np.testing.assert_allclose(tagger.predict(path), want.mean(axis=0), atol=1e-5)
    chunk = tagger.explain(path, start=2.0)
    start = audio.seconds_to_frames(2.0)
    full = audio.crop(audio.load_log_mel(path), start)
    floor = max(full.min(), chunk.maps["mel"].min()) + 1.0
    above = (full > floor) & (chunk.maps["mel"] > floor)
    np.testing.assert_allclose(chunk.maps["mel"][above], full[above], atol=1e-3)
    with torch.no_grad():
        chunk_want, _ = case.model(torch.from_numpy(chunk.maps["mel"][None]))
    np.testing.assert_allclose(chunk.maps["probs"], chunk_want.numpy()[0], atol=1e-5)


def test_ponswon_is_downloaded_once_converted_and_cached(
    released_cache,
    released_server,
    released_pth,
    tmp_path,
    capsys,
):
    tagger = jaxtag.load("ponswon", engine="jax")
    assert tagger.tags == list(MTAT_TOP50)
    assert tagger.path == released_cache / "ponswon"
    assert tagger.meta["source_sha256"]
    path = write_library(tmp_path / "audio", [5.0])[0]
    first = tagger.predict(path)
    released_server.stop()  # no network from here on
    again = jaxtag.load("ponswon", engine="jax")
    np.testing.assert_array_equal(again.predict(path), first)
    # The command line: convert the released weights to a folder of one's own, and tag with it.
    code, out, err = run_cli(capsys, "convert", "ponswon", tmp_path / "mine")
    assert code == 0, err
    assert "converted ponswon" in out
    assert jaxtag.load(tmp_path / "mine").tags == list(MTAT_TOP50)
    code, out, err = run_cli(capsys, "tag", path, "--checkpoint", "ponswon", "--json")
    assert code == 0, err
    assert json.loads(out)["tags"][0]["label"] == tagger.tag(path, top_k=1)[0]["label"]


def test_a_failed_download_is_one_line_for_the_api_and_the_command(
    released_cache,
    released_server,
    tmp_path,
    capsys,
):
    released_server.mode = 404
    with pytest.raises(jaxtag.JaxtagError) as raised:
        jaxtag.load("ponswon")
    message = str(raised.value)
    assert "\n" not in message and "404" in message
    code, _, err = run_cli(capsys, "convert", "ponswon", tmp_path / "out")
    assert code == 2 and err.strip() == f"jaxtag convert: {message}"
    assert not (tmp_path / "out").exists()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "jaxtag", "info", "ponswon"], capture_output=True, text=True,
        cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip() == f"jaxtag info: {message}"


def test_the_api_writers_refuse_foreign_files_as_the_commands_do(tagger, library, tmp_path):
    explanation = tagger.explain(library[0])
    notes = tmp_path / "fig.png"
    notes.write_text("my notes")
    with pytest.raises(jaxtag.JaxtagError, match="is not a .png figure"):
        explanation.plot(notes)
    with pytest.raises(jaxtag.JaxtagError, match="not an .npz of explain's maps"):
        explanation.save_npz(notes)
    assert notes.read_text() == "my notes"  # untouched
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("not a model")
    with pytest.raises(jaxtag.JaxtagError, match="is not an ONNX model"):
        tagger.export(foreign, overwrite=True)
    assert foreign.read_text() == "not a model"
    out = tagger.export(tmp_path / "m.onnx", check=False)
    with pytest.raises(jaxtag.JaxtagError, match="already exists"):
        tagger.export(out, check=False)
    assert tagger.export(out, check=False, overwrite=True) == out
