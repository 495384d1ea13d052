"""Measured choices between interchangeable implementations, made once per machine and kept.

    winner = autotune.fastest("engine", {"jax": run_jax, "onnx": run_onnx}, key, default="onnx")

Each candidate is a callable doing one representative unit of work. `fastest` calls each once
to warm it up (a first call may build, compile or page in: not timed), then times them in
interleaved rounds (so a machine getting busier mid-measurement penalises none of them) and
takes each one's best time; the fastest wins. A candidate that raises is dropped from the
choice (its error is recorded). The winner is stored in a JSON file, `autotune.json` in the
user cache directory (`runtime.user_cache_dir()`), under a key made of jaxtag's version, this
CPU's identity (`cpu_identity`), the task, the candidates' names and the caller's `key` (model
shape, precision, batch size...): a new jaxtag version, another CPU or another set of installed
candidates measures again; anything else reuses the stored winner without calling any
candidate. `$JAXTAG_AUTOTUNE` relocates the file, or, set to `off`, turns measuring off: then
`fastest` returns the caller's documented `default` rule without calling anything.

Nothing here knows what the candidates are: the inference engines (jaxtag/engines.py) use it,
and any other choice between equivalent implementations may.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jaxtag import version
from jaxtag.fileio import atomic_write

AUTOTUNE_ENV = "JAXTAG_AUTOTUNE"  # the cache file's path, or "off"
OFF = ("off", "none", "0", "")
ROUNDS = 3  # timed calls per candidate at most (after the warm-up), best one counts
BUDGET_SECONDS = 1.0  # timed rounds stop once this is spent (at least one round always runs)
# /proc/cpuinfo flags that change which implementation is fastest (vector width, bf16, int8).
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx512_fp16",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "asimd",
    "sve",
)


def cache_file() -> Path | None:
    """Where the measured winners are kept: `$JAXTAG_AUTOTUNE`, else
    `user_cache_dir()/autotune.json`; None when `$JAXTAG_AUTOTUNE` is `off`."""
    from jaxtag.runtime import user_cache_dir

    chosen = os.environ.get(AUTOTUNE_ENV)
    if chosen is None:
        return user_cache_dir() / "autotune.json"
    if chosen.strip().lower() in OFF:
        return None
    return Path(os.path.expanduser(chosen))


def cpu_identity() -> dict[str, Any]:
    """This machine's CPU as far as speed goes: its model name, the `CPU_FLAGS` it has, the
    number of cores this process may use and the architecture (Linux: /proc/cpuinfo)."""
    name, flags = "", set()  # not platform.processor(): it forks `uname -p`, unsafe beside JAX
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                field, _, value = line.partition(":")
                field = field.strip()
                if field == "model name" and not name.strip():
                    name = value.strip()
                elif field in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the model name and core count still tell machines apart
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return {
        "model": name.strip(),
        "machine": platform.machine(),
        "cores": cores,
        "flags": sorted(f for f in CPU_FLAGS if f in flags),
    }


def cache_key(task: str, names: list[str], key: Mapping[str, Any]) -> str:
    """The stored entry's key: version, CPU identity, task, candidates and the caller's key."""
    return json.dumps(
        {
            "version": version.__version__,
            "cpu": cpu_identity(),
            "task": task,
            "candidates": sorted(names),
            "key": dict(key),
        },
        sort_keys=True,
        default=str,
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or damaged: measure again, rewrite it whole
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, entries: dict[str, Any]) -> None:
    """Replaces the file in one rename (a reader sees the old or the new file, never half)."""
    try:
        with atomic_write(path, encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
    except OSError:  # a read-only cache costs a measurement next time, never the run
        pass


def lookup(task: str, names: list[str], key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored entry (`winner`, `seconds`, `failed`) for this machine, or None."""
    path = cache_file()
    if path is None:
        return None
    entry = _read(path).get(cache_key(task, names, key))
    return entry if isinstance(entry, dict) and entry.get("winner") in names else None


def measure(
    candidates: Mapping[str, Callable[[], None]],
    rounds: int = ROUNDS,
    budget_seconds: float = BUDGET_SECONDS,
) -> tuple[dict[str, float], dict[str, str]]:
    """Each candidate's best time in seconds, and the errors of those that raised."""
    failed: dict[str, str] = {}
    for name, run in candidates.items():  # the warm-ups
        try:
            run()
        except Exception as err:
            failed[name] = f"{type(err).__name__}: {err}"
    best = {name: math.inf for name in candidates if name not in failed}
    started = time.perf_counter()
    for done in range(rounds):
        if done and time.perf_counter() - started > budget_seconds:
            break
        for name in list(best):
            try:
                t = time.perf_counter()
                candidates[name]()
                best[name] = min(best[name], time.perf_counter() - t)
            except Exception as err:
                failed[name] = f"{type(err).__name__}: {err}"
                del best[name]
    return best, failed


def fastest(
    task: str,
    candidates: Mapping[str, Callable[[], None]],
    key: Mapping[str, Any],
    default: str | None = None,
) -> str:
    """The name of the fastest candidate for `task` on this machine (see the module doc):
    stored, or measured now and stored. With measuring off, `default` (the first candidate
    when None) without calling any.

    Raises:
      RuntimeError: every candidate raised (the message lists their errors).
    """
    names = list(candidates)
    if not names:
        raise ValueError("fastest needs at least one candidate")
    default = names[0] if default is None else default
    path = cache_file()
    if path is None:
        return default
    if len(names) == 1:
        return names[0]
    stored = lookup(task, names, key)
    if stored is not None:
        return stored["winner"]
    seconds, failed = measure(candidates)
    if not seconds:
        raise RuntimeError(
            f"{task}: every candidate failed: " + "; ".join(f"{n}: {e}" for n, e in failed.items())
        )
    winner = min(seconds, key=seconds.__getitem__)
    entries = _read(path)
    entries[cache_key(task, names, key)] = {
        "winner": winner,
        "seconds": seconds,
        "failed": failed,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write(path, entries)
    return winner
