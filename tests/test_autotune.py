"""jaxtag/autotune.py: the fastest candidate measured once, kept per version, CPU and key, and
measured again when any of them changes; failures dropped; `off` follows the default rule.

The candidates here are plain functions (a no-op beats a short sleep), so nothing compiles."""

from __future__ import annotations

import json
import time

import pytest

from jaxtag import autotune, version

KEY = {"model": "small", "batch_size": 16}


@pytest.fixture
def tune_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, str(path))
    return path


def counted(calls: list[str], name: str, seconds: float = 0.0):
    def run() -> None:
        calls.append(name)
        if seconds:
            time.sleep(seconds)

    return run


def candidates(calls: list[str]) -> dict:
    return {"slow": counted(calls, "slow", 0.02), "fast": counted(calls, "fast")}


def test_the_fastest_wins_and_is_reused_without_measuring(tune_file):
    calls: list[str] = []
    assert autotune.fastest("task", candidates(calls), KEY, default="slow") == "fast"
    # a warm-up each, then up to ROUNDS timed rounds within the budget
    assert 2 <= calls.count("fast") == calls.count("slow") <= 1 + autotune.ROUNDS
    entry = autotune.lookup("task", ["slow", "fast"], KEY)
    assert entry["winner"] == "fast" and entry["failed"] == {}
    assert entry["seconds"]["slow"] >= 0.02 > entry["seconds"]["fast"]
    assert [p.name for p in tune_file.parent.iterdir()] == ["autotune.json"]  # no temporary left

    calls.clear()
    assert autotune.fastest("task", candidates(calls), KEY) == "fast"
    assert calls == []  # stored: nothing was called


@pytest.mark.parametrize("change", ["version", "cpu", "key", "task", "candidates"])
def test_another_version_cpu_key_or_candidate_set_measures_again(tune_file, monkeypatch, change):
    calls: list[str] = []
    assert autotune.fastest("task", candidates(calls), KEY) == "fast"
    calls.clear()
    task, key, names = "task", KEY, candidates(calls)
    if change == "version":
        monkeypatch.setattr(version, "__version__", version.__version__ + ".post1")
    elif change == "cpu":
        other = {**autotune.cpu_identity(), "model": "Another CPU", "flags": ["amx_bf16"]}
        monkeypatch.setattr(autotune, "cpu_identity", lambda: other)
    elif change == "key":
        key = {**KEY, "batch_size": 32}
    elif change == "task":
        task = "front_end_kernel"
    else:
        names["third"] = counted(calls, "third", 0.01)
    assert autotune.fastest(task, names, key) == "fast"
    assert "slow" in calls and "fast" in calls  # measured again
    assert len(json.loads(tune_file.read_text())) == 2  # the first entry is kept beside it


def test_a_failing_candidate_is_dropped_and_recorded(tune_file):
    def broken() -> None:
        raise RuntimeError("no such device")

    calls: list[str] = []
    names = {"broken": broken, "slow": counted(calls, "slow", 0.01)}
    assert autotune.fastest("task", names, KEY, default="broken") == "slow"
    entry = autotune.lookup("task", list(names), KEY)
    assert entry["failed"] == {"broken": "RuntimeError: no such device"}
    assert list(entry["seconds"]) == ["slow"]

    with pytest.raises(RuntimeError, match="every candidate failed: a: RuntimeError"):
        autotune.fastest("task", {"a": broken, "b": broken}, KEY)


def test_off_follows_the_default_rule_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "off")
    assert autotune.cache_file() is None
    calls: list[str] = []
    assert autotune.fastest("task", candidates(calls), KEY, default="slow") == "slow"
    assert autotune.fastest("task", candidates(calls), KEY) == "slow"  # the first one
    assert calls == []


def test_the_default_file_is_in_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.AUTOTUNE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_file() == tmp_path / "jaxtag" / "autotune.json"


def test_a_damaged_or_unwritable_cache_costs_a_measurement_only(tune_file, tmp_path, monkeypatch):
    tune_file.parent.mkdir()
    tune_file.write_text("{not json")
    calls: list[str] = []
    assert autotune.fastest("task", candidates(calls), KEY) == "fast"
    assert autotune.lookup("task", ["slow", "fast"], KEY)["winner"] == "fast"  # rewritten

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, str(blocker / "autotune.json"))  # no such folder
    assert autotune.fastest("task", candidates(calls), KEY) == "fast"


def test_cpu_identity_names_the_model_cores_and_speed_flags():
    identity = autotune.cpu_identity()
    assert set(identity) == {"model", "machine", "cores", "flags"}
    assert identity["cores"] >= 1 and identity["machine"]
    assert set(identity["flags"]) <= set(autotune.CPU_FLAGS)
    with open("/proc/cpuinfo") as f:  # the test machines are Linux
        text = f.read()
    assert identity["model"] and identity["model"] in text
    assert all(f" {flag}" in text for flag in identity["flags"])
