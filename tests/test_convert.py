"""The converter: key mapping, config inference, wrappers, torch-free runs, errors, info."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from jaxtag import cli
from jaxtag.checkpoint import load_model
from jaxtag.convert import ConversionError, convert_state_dict, infer_config, unwrap
from jaxtag.model import ModelConfig, count_params, init_variables
from jaxtag.tags import MTAT_TOP50
from tests.conftest import CONFIGS, LAYOUTS

pytestmark = pytest.mark.torch  # the PyTorch reference (tests/conftest.py TORCH_MODULES)

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"released": 6_878_308, "conv16": 6_882_452}
EXPECTED_CONFIG = {
    "released": {"conv_channels": 8, "positions": "learned", "positions_length": 271},
    "conv16": {"conv_channels": 16, "positions": "sinusoidal", "positions_length": 257},
}


def _layout_state(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A random numpy state dict with exactly the keys, shapes and dtypes of a layout JSON."""
    rng = np.random.RandomState(seed)
    return {
        entry["key"]: rng.standard_normal(entry["shape"]).astype(entry["dtype"])
        for entry in json.loads(LAYOUTS[name].read_text())
    }


def _paths(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in leaves}


@pytest.mark.parametrize("name", CONFIGS)
def test_layout_fills_every_flax_variable(name):
    """All keys of the original layout are consumed and every Flax leaf is filled."""
    state = unwrap(_layout_state(name), "layout")
    config = infer_config(state)
    assert {k: getattr(config, k) for k in EXPECTED_CONFIG[name]} == EXPECTED_CONFIG[name]
    defaults = ModelConfig()
    for field in ("width", "num_layers", "num_heads", "ffn_size", "num_tags", "n_mels"):
        assert getattr(config, field) == getattr(defaults, field)
    for field in ("attention_dropout", "hidden_dropout", "classifier_dropout"):
        assert getattr(config, field) == getattr(defaults, field)

    variables = convert_state_dict(state, config)
    fresh = jax.eval_shape(functools.partial(init_variables, config), jax.random.key(0))
    assert _paths(variables) == _paths(fresh)
    assert count_params(variables["params"]) == PARAMS[name]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_layouts_map_elementwise():
    """Spot-check that each torch layout lands where the Flax model reads it."""
    state = unwrap(_layout_state("released", seed=1), "layout")
    variables = convert_state_dict(state, infer_config(state))
    p, s = variables["params"], variables["batch_stats"]
    conv2d = state["front_end.layers.1.conv.weight"]  # (out, in, h, w) -> (h, w, in, out)
    assert conv2d[5, 0, 40, 2] == p["front_end"]["layers_1"]["conv"]["kernel"][40, 2, 0, 5]
    conv1d = state["front_end.layers.7.conv.weight"]  # (out, in, k) -> (k, in, out)
    assert conv1d[9, 0, 100] == p["front_end"]["layers_7"]["conv"]["kernel"][100, 0, 9]
    conv1x1 = state["front_end.conv1x1.weight"]
    assert conv1x1[300, 200, 0] == p["front_end"]["conv1x1"]["kernel"][0, 200, 300]
    linear = state["back_end.encoder.layer.1.intermediate.dense.weight"]  # (out, in) -> (in, out)
    got = p["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"]
    np.testing.assert_array_equal(got, linear.T)
    np.testing.assert_array_equal(p["pooler"]["kernel"], state["back_end.pooler.dense.weight"].T)
    np.testing.assert_array_equal(p["classifier"]["bias"], state["classifier.bias"])
    np.testing.assert_array_equal(
        p["embedding"]["position_embeddings"],
        state["back_end.embedding.position_embeddings.weight"],
    )
    ln = p["encoder"]["layer_0"]["attention"]["output"]["LayerNorm"]
    np.testing.assert_array_equal(
        ln["scale"], state["back_end.encoder.layer.0.attention.output.LayerNorm.weight"]
    )
    bn = "front_end.layers.9.bn."
    np.testing.assert_array_equal(p["front_end"]["layers_9"]["bn"]["scale"], state[bn + "weight"])
    np.testing.assert_array_equal(p["front_end"]["layers_9"]["bn"]["bias"], state[bn + "bias"])
    np.testing.assert_array_equal(
        s["front_end"]["layers_9"]["bn"]["mean"], state[bn + "running_mean"]
    )
    np.testing.assert_array_equal(
        s["front_end"]["layers_9"]["bn"]["var"], state[bn + "running_var"]
    )


def test_wrappers_prefixes_and_counters_are_optional():
    raw = _layout_state("released")
    plain = {k.removeprefix("module."): v for k, v in raw.items()}
    no_counters = {k: v for k, v in plain.items() if not k.endswith("num_batches_tracked")}
    assert len(no_counters) == len(plain) - 12
    want = convert_state_dict(unwrap(raw, "x"), infer_config(unwrap(raw, "x")))
    for obj in (plain, {"model": raw, "epoch": 3}, {"state_dict": plain}, no_counters):
        state = unwrap(obj, "x")
        got = convert_state_dict(state, infer_config(state))
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_impossible_models_are_refused():
    state = unwrap(_layout_state("released"), "x")
    assert infer_config(state, num_heads=4).num_heads == 4
    with pytest.raises(ConversionError, match="not divisible by num_heads 7"):
        infer_config(state, num_heads=7)
    key = "back_end.embedding.position_embeddings.weight"
    state[key] = state[key][:200]  # too short for 256 frames + CLS
    with pytest.raises(ConversionError, match="257 tokens .* exceeds positions_length 200"):
        convert_state_dict(state, infer_config(state))


def test_all_problems_are_listed_at_once():
    state = unwrap(_layout_state("released"), "x")
    state["front_end.extra.weight"] = np.zeros(3, np.float32)
    state["back_end.encoder.layer.0.attention.self.gate.weight"] = np.zeros(3, np.float32)
    for key in ("front_end.bn.running_var", "back_end.pooler.dense.bias"):
        del state[key]
    state["front_end.layers.4.bn.weight"] = np.zeros(15, np.float32)
    state["back_end.encoder.layer.1.attention.self.key.weight"] = np.zeros((512, 500), np.float32)
    state["front_end.layers.2.conv.bias"] = np.zeros(32, np.int64)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(state, infer_config(state))
    message = str(info.value)
    for expected in (
        "2 unexpected keys",
        "front_end.extra.weight",
        "back_end.encoder.layer.0.attention.self.gate.weight",
        "2 missing keys",
        "front_end.bn.running_var",
        "back_end.pooler.dense.bias",
        "2 wrong shapes",
        "front_end.layers.4.bn.weight: [15], expected [16]",
        "back_end.encoder.layer.1.attention.self.key.weight: [512, 500], expected [512, 512]",
        "1 non-float tensors",
        "front_end.layers.2.conv.bias: int64",
    ):
        assert expected in message, (expected, message)


@pytest.mark.parametrize("name", CONFIGS)
def test_info_prints_config_tags_and_parameter_count(name, converted_factory, capsys):
    path = converted_factory(name, "legacy")
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {PARAMS[name]:,}" in out
    for field, value in EXPECTED_CONFIG[name].items():
        assert f"  {field}: {value}\n" in out
    assert f'source: "converted from {name}_legacy.pth"' in out
    assert "tags (50):" in out and "   23 loud\n" in out and "   24 quiet\n" in out
    loaded = load_model(path)
    assert loaded.tags == list(MTAT_TOP50)
    assert loaded.config.num_heads == 8


BLOCK_TORCH = """
import importlib.abc, runpy, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")

sys.meta_path.insert(0, BlockTorch())
try:
    import torch
    sys.exit("torch was importable")
except ImportError:
    pass
sys.argv = ["jaxtag", "convert", *sys.argv[1:]]
try:
    runpy.run_module("jaxtag", run_name="__main__")
except SystemExit as done:
    code = done.code
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
sys.exit(code)
"""


def test_converts_without_torch(reference_factory, converted_factory, tmp_path):
    """`jaxtag convert` in a process where `import torch` fails."""
    out = tmp_path / "no_torch"
    source = reference_factory("released").files["legacy"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, str(source), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "converted" in result.stdout and "conv_channels=8" in result.stdout
    got = load_model(out).variables
    want = load_model(converted_factory("released", "legacy")).variables
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


# --- the CLI on bad input: exit 2, the message on stderr, nothing written -----------------------


@pytest.fixture(scope="module")
def released_state(reference_factory) -> dict[str, torch.Tensor]:
    return dict(reference_factory("released").model.state_dict())


def _run_cli(*args: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(source: Path, tmp_path: Path, capsys, *expected: str) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = _run_cli(source, out, capsys=capsys)
    assert code == 2 and stdout == ""
    assert stderr.startswith("jaxtag convert: ")
    for text in expected:
        assert text in stderr, (text, stderr)
    assert not out.exists()


def test_cli_refuses_unreadable_files(reference_factory, tmp_path, capsys):
    files = reference_factory("released").files
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    _refused(tmp_path / "notes.pth", tmp_path, capsys, "notes.pth", "not a PyTorch checkpoint")
    legacy = files["legacy"].read_bytes()
    (tmp_path / "cut_legacy.pth").write_bytes(legacy[: len(legacy) - 1000])
    _refused(tmp_path / "cut_legacy.pth", tmp_path, capsys, "cut_legacy.pth", "truncated file")
    zipped = files["zip"].read_bytes()
    (tmp_path / "cut_zip.pth").write_bytes(zipped[: len(zipped) // 2])
    _refused(tmp_path / "cut_zip.pth", tmp_path, capsys, "cut_zip.pth", "truncated or corrupt zip")
    _refused(tmp_path / "missing.pth", tmp_path, capsys, "missing.pth", "No such file")


def test_cli_lists_every_bad_key(released_state, tmp_path, capsys):
    state = dict(released_state)
    state["module.extra.weight"] = torch.zeros(2)
    state["module.back_end.encoder.layer.2.output.dense.bias"] = torch.zeros(2)  # 3rd layer
    del state["module.front_end.layers.5.bn.running_mean"]
    del state["module.back_end.embedding.LayerNorm.bias"]
    del state["module.classifier.bias"]
    state["module.front_end.conv1x1.weight"] = torch.zeros(512, 231, 1)
    state["module.back_end.encoder.layer.0.output.dense.weight"] = torch.zeros(2048, 512)
    torch.save(state, tmp_path / "bad.pth")
    # The stray layer.2 key makes a 3-layer model: all of layer 2's missing keys are listed too.
    _refused(
        tmp_path / "bad.pth",
        tmp_path,
        capsys,
        "bad.pth: the weights do not fit the inferred model",
        "extra.weight",
        "missing keys",
        "front_end.layers.5.bn.running_mean",
        "back_end.embedding.LayerNorm.bias",
        "classifier.bias",
        "back_end.encoder.layer.2.attention.self.query.weight",
        "front_end.conv1x1.weight: [512, 231, 1], expected [512, 232, 1]",
        "back_end.encoder.layer.0.output.dense.weight: [2048, 512], expected [512, 2048]",
    )


def test_cli_refuses_whole_model_files(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    torch.save(model, tmp_path / "model.pth")
    _refused(tmp_path / "model.pth", tmp_path, capsys, "refusing to load", "Linear")


def test_cli_tags_and_overwrite(released_state, tmp_path, capsys):
    state = dict(released_state)
    state["module.classifier.weight"] = state["module.classifier.weight"][:10].clone()
    state["module.classifier.bias"] = state["module.classifier.bias"][:10].clone()
    torch.save(state, tmp_path / "ten.pth", _use_new_zipfile_serialization=False)
    out = tmp_path / "ten"
    _refused(tmp_path / "ten.pth", tmp_path, capsys, "10 outputs", "--tags")

    names = [f"tag {i}" for i in range(10)]
    (tmp_path / "nine.txt").write_text("\n".join(names[:9]) + "\n")
    code, _, err = _run_cli(
        tmp_path / "ten.pth", out, "--tags", tmp_path / "nine.txt", capsys=capsys
    )
    assert code == 2 and "9 tag names for a model with 10 outputs" in err

    (tmp_path / "ten.txt").write_text("\n".join(names) + "\n\n")
    args = (tmp_path / "ten.pth", out, "--tags", tmp_path / "ten.txt", "--heads", "4")
    code, stdout, _ = _run_cli(*args, capsys=capsys)
    assert code == 0 and "tags=10" in stdout and "heads=4" in stdout
    loaded = load_model(out)
    assert loaded.tags == names and loaded.config.num_tags == 10 and loaded.config.num_heads == 4
    np.testing.assert_array_equal(
        loaded.variables["params"]["classifier"]["kernel"], state["module.classifier.weight"].T
    )

    code, _, err = _run_cli(*args, capsys=capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, _ = _run_cli(*args, "--overwrite", capsys=capsys)
    assert code == 0 and load_model(out).tags == names
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # --overwrite replaces a checkpoint, never a user's directory or file.
    user_dir, user_file = tmp_path / "thesis", tmp_path / "notes.txt"
    user_dir.mkdir()
    (user_dir / "chapter1.tex").write_text("precious")
    user_file.write_text("also precious")
    for target in (user_dir, user_file):
        code, stdout, err = _run_cli(args[0], target, *args[2:], "--overwrite", capsys=capsys)
        assert code == 2 and stdout == "" and "left untouched" in err and str(target) in err
    assert (user_dir / "chapter1.tex").read_text() == "precious"
    assert sorted(p.name for p in user_dir.iterdir()) == ["chapter1.tex"]
    assert user_file.read_text() == "also precious"
