"""Process-wide JAX settings shared by every entry point (`run_train.py`, `run_eval.py`, `jaxtag`),
and how one-off programs are compiled.

The persistent compilation cache makes a rerun, a resume or a second `jaxtag tag` load compiled
programs from disk instead of compiling them again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV = "JAXTAG_CACHE_DIR"  # a directory, or "off" to disable the cache


def user_cache_dir() -> Path:
    """jaxtag's folder in the user cache directory: `$XDG_CACHE_HOME/jaxtag` (`~/.cache/jaxtag`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxtag"


def default_cache_dir() -> Path:
    """Where compiled programs are cached unless `$JAXTAG_CACHE_DIR` says otherwise."""
    return user_cache_dir() / "jax"


def enable_compilation_cache(
    directory: str | os.PathLike | None = None, keep_existing: bool = False
) -> Path | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None when off).

    `directory` wins over `$JAXTAG_CACHE_DIR`, which wins over `default_cache_dir()`. Every
    program is cached, however quick its compile: a cached load is always cheaper. With
    `keep_existing` (the Python API), a cache the program set up itself is left as it is.
    """
    import jax

    if keep_existing and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)

    chosen = directory if directory is not None else os.environ.get(CACHE_ENV)
    if chosen is not None and str(chosen).lower() in ("off", "none", "0", ""):
        return None
    path = Path(os.path.expanduser(str(chosen))) if chosen is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home must not stop tagging; it only costs compile time
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compile_once(fn: Callable[..., Any], *args: Any) -> Any:
    """`jax.jit(fn)(*args)` for a program that runs once (e.g. a model's init).

    On the CPU it compiles at LLVM optimisation level 1: an init is ~140 small random-number
    generators (a key fold-in per module path level, a draw per parameter), each compiled on its
    own, and a lighter level roughly halves that compile time with the same values
    (tests/test_model.py). Under a trace (e.g. `jax.eval_shape`) it is a plain jit call.
    """
    import jax

    jitted = jax.jit(fn)
    if any(isinstance(a, jax.core.Tracer) for a in args) or jax.default_backend() != "cpu":
        return jitted(*args)
    return jitted.lower(*args).compile({"xla_backend_optimization_level": 1})(*args)
