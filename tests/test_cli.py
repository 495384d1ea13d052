"""The `jaxtag` command itself: help without JAX, --version, the compilation cache switch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import jaxtag
from jaxtag import cli

REPO = Path(__file__).resolve().parents[1]
# Runs `jaxtag ARGS...` and reports at exit which of JAX, Flax and orbax were imported.
PROBE = """
import atexit, runpy, sys
heavy = ("jax", "jaxlib", "flax", "orbax", "tensorflow")
atexit.register(lambda: print("LOADED:" + ",".join(m for m in heavy if m in sys.modules),
                              file=sys.stderr))
sys.argv = ["jaxtag", *sys.argv[1:]]
runpy.run_module("jaxtag", run_name="__main__")
"""


def _jaxtag(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def _loaded(result: subprocess.CompletedProcess) -> list[str]:
    line = [x for x in result.stderr.splitlines() if x.startswith("LOADED:")][-1]
    return [m for m in line[len("LOADED:") :].split(",") if m]


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_imports_no_jax(command):
    args = ["--help"] if command is None else [command, "--help"]
    result = _jaxtag(*args)
    assert result.returncode == 0, result.stderr
    assert "usage: jaxtag" in result.stdout
    if command is None:
        assert all(name in result.stdout for name in cli.COMMANDS)
    assert _loaded(result) == []


def test_version():
    result = _jaxtag("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"jaxtag {jaxtag.__version__}"
    assert _loaded(result) == []


def test_commands_turn_on_the_compilation_cache_where_told(tmp_path):
    cache = tmp_path / "cache"
    result = _jaxtag("info", str(tmp_path / "missing"), env={"JAXTAG_CACHE_DIR": str(cache)})
    assert result.returncode == 2 and "no such checkpoint" in result.stderr
    assert cache.is_dir()

    xdg = tmp_path / "xdg"  # the default cache lives under $XDG_CACHE_HOME
    result = _jaxtag(
        "info",
        str(tmp_path / "missing"),
        env={"JAXTAG_CACHE_DIR": "off", "XDG_CACHE_HOME": str(xdg)},
    )
    assert result.returncode == 2 and not xdg.exists()


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tga", "song.mp3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tga'" in capsys.readouterr().err


@pytest.fixture
def small_checkpoint(tmp_path):
    import jax

    from jaxtag.checkpoint import save_model
    from jaxtag.model import ModelConfig, init_variables

    config = ModelConfig(conv_channels=1, width=16, num_heads=2, ffn_size=32, num_tags=3)
    variables = init_variables(config, jax.random.key(0))
    return save_model(tmp_path / "ckpt", variables, config, ["a", "b", "c"])


def test_info_prints_config_and_tags(small_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("JAXTAG_CACHE_DIR", "off")
    assert cli.main(["info", str(small_checkpoint), "--json"]) == 0
    import json

    record = json.loads(capsys.readouterr().out)
    assert record["tags"] == ["a", "b", "c"] and record["model"]["width"] == 16
    assert record["num_params"] > 0


def test_info_on_broken_checkpoints_is_one_line_and_exit_2(
    small_checkpoint, tmp_path, capsys, monkeypatch
):
    import shutil

    monkeypatch.setenv("JAXTAG_CACHE_DIR", "off")
    a_file = tmp_path / "file"
    a_file.write_text("not a checkpoint")
    no_meta = tmp_path / "no_meta"
    shutil.copytree(small_checkpoint, no_meta)
    shutil.rmtree(no_meta / "meta")
    bad_meta = tmp_path / "bad_meta"
    shutil.copytree(small_checkpoint, bad_meta)
    for path in (bad_meta / "meta").rglob("*"):
        if path.is_file() and path.name != "commit_success.txt":
            path.write_text('{"model": {"bogus_field": 1}, "tags": []}')
    for broken in (tmp_path / "missing", a_file, tmp_path, no_meta, bad_meta):
        assert cli.main(["info", str(broken)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and str(broken) in lines[0], captured.err
