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
