"""Packaging and entry points: one installed namespace, the commands a wheel user runs, the
commands without TensorFlow, and the one-line errors and quiet output of the entry points."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
BUILD_LEFTOVERS = ("build", "dist", ".git", ".venv*", "*.egg-info", "__pycache__", "*_cache",
                   "demo_workdir", "workdir*")  # fmt: skip


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("cwd", REPO)
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """The project's wheel, installed (without dependencies) into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    # From a copy of the sources: a build/ folder left in the clone would leak into the wheel.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-q", "-w", str(root / "dist"), str(source)])  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("jaxtag-*.whl")
    target = root / "site"
    installed = run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                     "--target", str(target), str(wheel)])  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    return target


def wheel_env(target: Path) -> dict[str, str]:
    # Only the installed wheel on the path (not the clone), run from a directory of its own.
    return dict(os.environ, PYTHONPATH=str(target), JAXTAG_CACHE_DIR="off")


@pytest.mark.slow  # a wheel build and install / subprocess runs
def test_wheel_installs_one_namespace(wheel_install):
    top_level = sorted(p.name for p in wheel_install.iterdir() if p.name != "bin")
    assert top_level == ["jaxtag", "jaxtag-0.1.0.dist-info"]
    package = wheel_install / "jaxtag"
    for folder, installed in (("jaxtag", package), ("data_prep", package / "data_prep"),
                              ("configs", package / "configs")):  # fmt: skip
        sources = {p.relative_to(REPO / folder) for p in (REPO / folder).rglob("*.py")}
        sources = {s for s in sources if s.parts[0] not in ("data_prep", "configs")}
        assert sources <= {p.relative_to(installed) for p in installed.rglob("*.py")}, folder
    with zipfile.ZipFile(next((wheel_install.parent / "dist").glob("*.whl"))) as whl:
        assert not [n for n in whl.namelist() if n.startswith(("configs/", "data_prep/"))]


@pytest.mark.slow  # a wheel build and install / subprocess runs
def test_wheel_commands_run(wheel_install, tmp_path):
    env = wheel_env(wheel_install)
    build = run([sys.executable, "-m", "jaxtag.data_prep.build", "--help"], env=env, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "python -m jaxtag.data_prep.build" in build.stdout and "synthetic_tags" in build.stdout
    scripts = {"jaxtag": "explain", "jaxtag-build": "--manual_dir", "jaxtag-train": "--config",
               "jaxtag-eval": "--checkpoint"}  # fmt: skip
    for script, expected in scripts.items():
        result = run([str(wheel_install / "bin" / script), "--help"], env=env, cwd=tmp_path)
        assert expected in result.stdout, (script, result.stdout, result.stderr[-2000:])
    # A bundled config by name, loaded from the installed package.
    code = (
        "from jaxtag.cli.train import configs_dir, load_config; "
        "print(configs_dir()); print(load_config('mtat:readme').model.conv_channels)"
    )
    result = run([sys.executable, "-c", code], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(wheel_install / "jaxtag" / "configs"), "16"]


def test_config_flag_takes_bundled_names_and_files(tmp_path):
    from jaxtag.cli.train import bundled_configs, load_config

    assert {"demo", "mtat", "msd"} <= set(bundled_configs())
    assert load_config("demo").model.width == 64
    assert load_config("mtat").model.conv_channels == 8
    assert load_config("mtat:readme").model.conv_channels == 16
    # A file inside the configs folder imports its siblings relatively, by path too.
    assert load_config(str(REPO / "configs" / "mtat.py") + ":readme").model.positions == (
        "sinusoidal"
    )
    own = tmp_path / "mine.py"
    own.write_text(
        "from jaxtag.cli.train import load_config\n\n\n"
        "def get_config():\n    config = load_config('demo')\n"
        "    config.num_epochs = 3\n    return config\n"
    )
    assert load_config(str(own)).num_epochs == 3
    with pytest.raises(ValueError, match="unknown config 'dmeo': bundled configs are .*demo"):
        load_config("dmeo")
    with pytest.raises(FileNotFoundError, match="config file nope/x.py does not exist"):
        load_config("nope/x.py")


def tiny_checkpoint(directory: Path) -> Path:
    import jax

    from jaxtag.checkpoint import save_model
    from jaxtag.model import ModelConfig, init_variables

    config = ModelConfig(conv_channels=1, width=16, num_layers=1, num_heads=2, ffn_size=32,
                         num_tags=3)  # fmt: skip
    variables = init_variables(config, jax.random.PRNGKey(0))
    return save_model(directory, variables, config, ["low", "mid", "high"])


@pytest.mark.slow  # a wheel build and install / subprocess runs
def test_tag_runs_without_tensorflow(tmp_path):
    """`pip install jaxtag` (no train extra) has no TensorFlow: tag must not need it."""
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    song = tmp_path / "song.wav"
    t = np.arange(3 * 22050) / 22050
    sf.write(song, 0.3 * np.sin(2 * np.pi * 440 * t).astype(np.float32), 22050)
    code = (
        "import sys\n"
        "for name in ('tensorflow', 'tensorflow_datasets', 'ml_collections', 'clu'):\n"
        "    sys.modules[name] = None  # `import name` raises ImportError\n"
        "from jaxtag.cli import main\n"
        f"sys.exit(main(['tag', {str(song)!r}, '--checkpoint', {str(checkpoint)!r}, '--json']))\n"
    )
    result = run([sys.executable, "-c", code], env=dict(os.environ, JAXTAG_CACHE_DIR="off"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"low"' in result.stdout and song.name in result.stdout


TRAIN_COMMANDS = {
    "jaxtag.cli.train": "jaxtag-train",
    "jaxtag.cli.evaluate": "jaxtag-eval",
    "data_prep.build": "jaxtag-build",
}


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_train_commands_without_the_train_extra_say_what_to_install(command, tmp_path):
    code = (
        "import runpy, sys\n"
        "sys.modules['tensorflow'] = sys.modules['ml_collections'] = None  # a core install\n"
        f"sys.argv = ['x', 'synthetic_tags', '--data_dir', {str(tmp_path)!r}]\n"
        f"runpy.run_module({command!r}, run_name='__main__')\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"{TRAIN_COMMANDS[command]}: "
        "tensorflow, ml_collections not installed; training, evaluation and dataset building "
        "need the train extra: pip install 'jaxtag[train]'"
    ]
