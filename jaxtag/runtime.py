"""Process-wide JAX settings shared by every entry point (`run_train.py`, `run_eval.py`, `jaxtag`).

The persistent compilation cache makes a rerun, a resume or a second `jaxtag tag` load compiled
programs from disk instead of compiling them again.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "JAXTAG_CACHE_DIR"  # a directory, or "off" to disable the cache


def user_cache_dir() -> Path:
    """jaxtag's folder in the user cache directory: `$XDG_CACHE_HOME/jaxtag` (`~/.cache/jaxtag`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxtag"


def default_cache_dir() -> Path:
    """Where compiled programs are cached unless `$JAXTAG_CACHE_DIR` says otherwise."""
    return user_cache_dir() / "jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None when off).

    `directory` wins over `$JAXTAG_CACHE_DIR`, which wins over `default_cache_dir()`. Every
    program is cached, however quick its compile: a cached load is always cheaper.
    """
    import jax

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
