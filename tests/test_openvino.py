"""The openvino engine, `--precision`, and `auto`'s measured choice (jaxtag/engines.py).

jax, onnx and openvino agree within 1e-5 in float32 on a small random-weight model. bfloat16
on the CPU is refused with one line where the chip has no native bf16 and, where it has, stays
within 5e-3 of float32; the bf16 model math itself is checked here through jax (XLA emulates
bf16 on any CPU). `auto` measures once per machine and model shape, then reuses the winner.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxtag
from jaxtag import audio, autotune, cli, engines, scoring
from jaxtag.checkpoint import LoadedModel
from jaxtag.export import jaxtag_outputs
from jaxtag.model import MTSA, build_model
from jaxtag.runtime import enable_compilation_cache
from tests.conftest import log_mel_like
from tests.data_fixtures import tone
from tests.tag_fixtures import SMALL, TAGS, make_checkpoint

BATCH = 16  # one batch size everywhere: jax compiles the small model once for the module
FLOAT32_TOLERANCE = 1e-5
BF16_TOLERANCE = 5e-3  # tag probabilities, bfloat16 vs float32 (docs/tagging.md, Precision)
BF16_EMBEDDING_TOLERANCE = 5e-2  # the pooled tanh vector, in [-1, 1]


def random_variables(config=SMALL, seed: int = 3) -> dict:
    """Random weights of every parameter's shape (jax.eval_shape: no init to compile), scaled
    like an initialisation; BatchNorm statistics away from 0 and 1; the input BatchNorm
    normalising dB values, so that the outputs are not saturated."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> np.ndarray:
        name, shape = jax.tree_util.keystr(path), leaf.shape
        if name.endswith("['kernel']"):
            return rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        if name.endswith("['scale']"):
            return 1 + rng.normal(0, 0.1, shape)
        if name.endswith("['var']"):
            return rng.uniform(0.5, 2.0, shape)
        return rng.normal(0, 0.1, shape)  # biases, means, position embeddings

    model = MTSA(config)
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0), np.zeros((1, config.n_mels, 256), np.float32), train=False
        )
    )
    variables = jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x).astype(np.float32), shapes)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    variables["batch_stats"]["front_end"]["input_bn"]["mean"][:] = -30.0
    variables["batch_stats"]["front_end"]["input_bn"]["var"][:] = 20.0**2
    return jax.tree_util.tree_map(np.asarray, variables)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    enable_compilation_cache(keep_existing=True)  # the session's cache (tests/conftest.py)
    return LoadedModel(SMALL, TAGS, random_variables(), {}, Path("random"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, loaded) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ov") / "ckpt", loaded.variables)


def tonal_windows(count: int = 4) -> np.ndarray:
    """Log-mel windows of harmonic tones through the audio pipeline (jaxtag.audio)."""
    windows = []
    for seed in range(count):
        freqs = np.random.default_rng(seed).uniform(100, 2000, 3)
        y = sum(tone(5.0, f, sr=16_000, seed=seed)[:, 0] for f in freqs)
        mel = audio.log_mel(audio.load_waveform(y, 16_000))
        windows.append(mel[:, : audio.CHUNK_FRAMES])
    return np.stack(windows).astype(np.float32)


@pytest.fixture(scope="module")
def mel() -> np.ndarray:
    """One batch of windows: log-mel-range noise and tones."""
    return np.concatenate([log_mel_like(BATCH - 4, seed=5), tonal_windows()])


@pytest.fixture(scope="module")
def reference(loaded, mel) -> dict[str, np.ndarray]:
    """The jax model's float32 outputs (one jitted program for both)."""
    probabilities, pooled = jaxtag_outputs(SMALL, loaded.variables, mel)
    return {"probabilities": probabilities, "pooled": pooled}


@pytest.mark.parametrize("output", ["probabilities", "pooled"])
def test_jax_onnx_and_openvino_agree_in_float32(loaded, mel, reference, output):
    want = reference[output]
    assert want.shape == (BATCH, len(TAGS) if output == "probabilities" else SMALL.width)
    assert want.std(axis=0).min() > 1e-3  # outputs that differ between windows
    for engine in ("onnx", "openvino"):
        got = scoring.WindowScorer(loaded, BATCH, output, engine).predict_windows(mel)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=FLOAT32_TOLERANCE, rtol=0)
        ragged = scoring.WindowScorer(loaded, 4, output, engine).predict_windows(mel[:5])
        np.testing.assert_allclose(ragged, want[:5], atol=FLOAT32_TOLERANCE, rtol=0)  # 4 + 1


def test_openvino_engine_tags_files_like_onnx(checkpoint, tmp_path, capsys):
    from tests.data_fixtures import write_audio

    song = write_audio(str(tmp_path / "song.wav"), seconds=6.0, freq=330.0)
    tagger = jaxtag.load(checkpoint, engine="openvino", batch_size=BATCH)
    assert tagger.engine == "openvino" and "precision='float32'" in repr(tagger)
    # onnx: agrees with jax (above) and compiles nothing
    want = jaxtag.load(checkpoint, engine="onnx", batch_size=BATCH).predict(song)
    np.testing.assert_allclose(tagger.predict(song), want, atol=FLOAT32_TOLERANCE, rtol=0)

    out = tmp_path / "tags.jsonl"
    argv = ["tag", song, "--checkpoint", str(checkpoint), "--engine", "openvino"]
    assert cli.main([*argv, "--jsonl", str(out), "--batch-size", str(BATCH)]) == 0
    assert str(out) in capsys.readouterr().err
    with pytest.raises(scoring.InputError, match="the openvino engine: .* not 'layer_0'"):
        tagger.window_scorer("layer_0")


def test_without_openvino_the_engine_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    problem = engines.openvino_missing()
    assert problem.startswith("the openvino engine needs openvino and onnx")
    assert problem.endswith("pip install 'jaxtag[openvino]'") and "\n" not in problem
    with pytest.raises(scoring.InputError, match=r"pip install 'jaxtag\[openvino\]'"):
        scoring.choose_engine("openvino")
    assert scoring.candidates("probabilities", "float32", "cpu") == ["jax", "onnx"]


def test_openvino_is_imported_without_its_telemetry():
    engines.import_openvino()
    import openvino.tools.ovc

    # OpenVINO's stand-in when openvino_telemetry cannot be imported: it sends nothing.
    assert type(openvino.tools.ovc.telemetry).__module__ == "openvino.tools.ovc.telemetry_stub"


# ----------------------------------------------------------------------------------------------
# Precision


def test_bfloat16_on_this_cpu_is_refused_or_within_tolerance(
    checkpoint, loaded, mel, reference, capsys
):
    if not engines.native_bf16():  # e.g. AMD Zen 3, Intel before Cooper Lake
        with pytest.raises(jaxtag.JaxtagError) as refused:
            jaxtag.load(checkpoint, precision="bfloat16")
        message = str(refused.value)
        assert "no native bfloat16" in message and "--precision float32" in message
        assert "\n" not in message
        for engine in ("jax", "openvino", "auto"):
            argv = ["tag", "x.wav", "--checkpoint", str(checkpoint), "--engine", engine]
            assert cli.main([*argv, "--json", "--precision", "bfloat16"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0] == f"jaxtag tag: {message}"
        return
    want = reference["probabilities"]
    for engine in ("openvino", "jax", "auto"):
        scorer = scoring.WindowScorer(loaded, BATCH, "probabilities", engine, "bfloat16")
        got = scorer.predict_windows(mel)
        assert got.dtype == np.float32 and scorer.engine in ("openvino", "jax")
        np.testing.assert_allclose(got, want, atol=BF16_TOLERANCE, rtol=0)


def test_precision_rules(monkeypatch):
    monkeypatch.setattr(engines, "native_bf16", lambda: False)
    for engine in ("jax", "openvino", "auto"):
        with pytest.raises(scoring.InputError, match="no native bfloat16"):
            scoring.choose_engine(engine, backend="cpu", precision="bfloat16")
    # On an accelerator jax computes bf16 itself; onnx has float32 only, on any chip.
    assert scoring.choose_engine("auto", backend="gpu", precision="bfloat16") == "jax"
    assert scoring.choose_engine("jax", backend="gpu", precision="bfloat16") == "jax"
    with pytest.raises(scoring.InputError, match="the onnx engine runs float32 only"):
        scoring.choose_engine("onnx", precision="bfloat16")
    with pytest.raises(jaxtag.JaxtagError, match="precision must be one of float32, bfloat16"):
        jaxtag.Tagger(None, precision="float16")

    monkeypatch.setattr(engines, "native_bf16", lambda: True)  # a chip with AMX / AVX512-BF16
    assert scoring.choose_engine("auto", backend="cpu", precision="bfloat16") == "openvino"
    assert scoring.candidates("probabilities", "bfloat16", "cpu") == ["jax", "openvino"]
    assert scoring.candidates("layer_0", "bfloat16", "cpu") == ["jax"]
    assert scoring.candidates("probabilities", "bfloat16", "gpu") == ["jax"]


def test_native_bf16_reads_the_cpu_flags_and_openvino(monkeypatch):
    identity = autotune.cpu_identity()
    capabilities = engines.import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    has = bool({"avx512_bf16", "amx_bf16"} & set(identity["flags"])) or "BF16" in capabilities
    assert engines.native_bf16() is has
    monkeypatch.setattr(autotune, "cpu_identity", lambda: {**identity, "flags": ["amx_bf16"]})
    assert engines.native_bf16() is True


def test_bfloat16_model_math_through_jax_stays_within_tolerance(loaded, mel, reference):
    """XLA emulates bf16 on this CPU: the numbers, not the speed, of the bf16 path."""
    model = build_model(dataclasses.replace(SMALL, dtype="bfloat16"))

    @jax.jit
    def forward(v, x):
        pooled = model.apply(v, x, method=MTSA.features)
        logits = model.apply(v, pooled, method=MTSA.head)
        return jax.nn.sigmoid(logits.astype("float32")), pooled.astype("float32")

    probabilities, pooled = (np.asarray(a) for a in forward(loaded.variables, mel))
    prob_diff = np.abs(probabilities - reference["probabilities"]).max()
    emb_diff = np.abs(pooled - reference["pooled"]).max()
    print(f"bf16 vs float32 through jax: probabilities {prob_diff:.2e}, pooled {emb_diff:.2e}")
    assert 0 < prob_diff <= BF16_TOLERANCE  # > 0: it did compute in bf16
    assert 0 < emb_diff <= BF16_EMBEDDING_TOLERANCE


# ----------------------------------------------------------------------------------------------
# auto: measured once, reused, measured again for another machine or version


@dataclasses.dataclass
class FakeEngines:
    built: list[str] = dataclasses.field(default_factory=list)  # each build, in order
    broken: set[str] = dataclasses.field(default_factory=set)  # these fail to build


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeEngines:
    """Engines that only sleep (openvino fastest, then onnx, then jax); a fresh cache."""
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, str(tmp_path / "autotune.json"))
    delays = {"jax": 0.012, "onnx": 0.006, "openvino": 0.0}
    state = FakeEngines()

    def predictor(loaded, engine, output, precision):
        state.built.append(engine)
        if engine in state.broken:
            raise RuntimeError(f"{engine} cannot compile this")
        return lambda windows: time.sleep(delays[engine]) or np.zeros((len(windows), 6))

    monkeypatch.setattr(engines, "predictor", predictor)
    return state


def test_auto_runs_the_measured_fastest_and_reuses_it(loaded, fake, monkeypatch):
    def choose(batch_size: int = BATCH) -> str:
        fake.built.clear()
        return scoring.engine_for(loaded, "auto", "probabilities", "float32", batch_size, "cpu")[0]

    assert choose() == "openvino" and sorted(fake.built) == ["jax", "onnx", "openvino"]
    key = engines.tuning_key(loaded, "float32", BATCH, "cpu")
    entry = autotune.lookup("engine", ["jax", "onnx", "openvino"], key)
    assert min(entry["seconds"], key=entry["seconds"].get) == "openvino"
    assert choose() == "openvino" and fake.built == ["openvino"]  # the winner only
    assert scoring.engine_for(loaded, "auto", "pooled", "float32", BATCH, "cpu")[0] == "openvino"

    other = {**autotune.cpu_identity(), "model": "Another CPU"}
    monkeypatch.setattr(autotune, "cpu_identity", lambda: other)
    assert choose() == "openvino" and sorted(fake.built) == ["jax", "onnx", "openvino"]
    monkeypatch.setattr(jaxtag.version, "__version__", "99.0")
    fake.broken.add("openvino")  # a candidate that fails is left out
    assert choose() == "onnx" and sorted(fake.built) == ["jax", "onnx", "openvino"]
    assert choose() == "onnx" and fake.built == ["onnx"]
    assert choose(batch_size=4) == "onnx" and len(fake.built) == 3  # another batch size


def test_auto_without_measuring(loaded, fake, monkeypatch):
    # An accelerator: always jax; a layer the graph lacks: jax; measuring off: the rule (onnx).
    assert scoring.engine_for(loaded, "auto", "probabilities", "float32", BATCH, "gpu")[0] == "jax"
    assert scoring.engine_for(loaded, "auto", "layer_0", "float32", BATCH, "cpu")[0] == "jax"
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "off")
    assert scoring.engine_for(loaded, "auto", "probabilities", "float32", BATCH, "cpu")[0] == "onnx"
    assert fake.built == ["jax", "jax", "onnx"]


def test_auto_on_real_engines_reports_its_choice(
    checkpoint, loaded, mel, reference, tmp_path, monkeypatch
):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, str(tmp_path / "autotune.json"))
    tagger = jaxtag.load(checkpoint, batch_size=BATCH)
    assert "engine='auto'" in repr(tagger)  # nothing measured for a repr
    chosen, backend = tagger.engine, jax.default_backend()
    names = scoring.candidates("probabilities", "float32", backend)
    entry = autotune.lookup("engine", names, engines.tuning_key(loaded, "float32", BATCH, backend))
    if backend == "cpu":
        print("auto measured", entry["seconds"])
        assert entry["winner"] == chosen == min(entry["seconds"], key=entry["seconds"].get)
        assert entry["failed"] == {} and set(entry["seconds"]) == {"jax", "onnx", "openvino"}
    else:  # an accelerator: jax, nothing measured
        assert chosen == "jax" and names == ["jax"] and entry is None
    got = tagger.predict_windows(mel)
    np.testing.assert_allclose(got, reference["probabilities"], atol=FLOAT32_TOLERANCE, rtol=0)

    from jaxtag.serving import Service

    service = Service(tagger)
    try:
        health = service.health()
    finally:
        service.close()
    assert health["engine"] == chosen and health["precision"] == "float32"
