"""Whether a checkpoint read back is intact: digests of its arrays and of the metadata that
changes what the model computes, and the metadata's own validity (format 2; jaxtag/checkpoint.py
says which formats load and how). Nothing here speaks orbax: jaxtag/checkpoint.py reads and
writes, this module judges what it read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtag.errors import JaxtagError
from jaxtag.model import ModelConfig
from jaxtag.model.config import saved_model

META = "meta"
DIGESTS = "sha256"  # meta[DIGESTS][item name] = array_digest(item); [META] = meta_digest(meta)
FORMAT_KEY, FORMAT = "format", 2  # written by this version; no key: format 1 or 0

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()  # (what, path): each warning once per process


def _warn_once(what: str, path: Path, message: str) -> None:
    if (what, str(path)) not in _warned:
        _warned.add((what, str(path)))
        log.warning("%s: %s", path, message)


class CheckpointError(JaxtagError):
    """A path that is not a readable, intact jaxtag checkpoint."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def array_digest(tree: Any) -> str:
    """SHA-256 over a pytree's arrays: each leaf's path, dtype, shape and bytes, sorted by path.

    Paths are spelled from key names only, so a dict and the NamedTuple it was restored from (an
    optimizer state) give the same digest.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = sorted(("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves)
    digest = hashlib.sha256()
    for name, leaf in named:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def meta_digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 over canonical JSON of the outputs-changing metadata: the stored model config,
    the tags, the format number and the array items' digests (which binds them together)."""
    digests = meta.get(DIGESTS)
    arrays = {k: v for k, v in digests.items() if k != META} if isinstance(digests, dict) else None
    covered = {"arrays": arrays, **{k: meta.get(k) for k in (FORMAT_KEY, "model", "tags")}}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def verify(directory: Path, items: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Raises CheckpointError unless the meta holds well-formed digests for itself and for every
    restored item in `items` (may be empty), and they match; warns for the older formats."""
    if FORMAT_KEY not in meta and DIGESTS not in meta:  # format 0: before digests existed
        _warn_once("format0", directory, "checkpoint written without digests; not verified")
        return
    version, digests, problem = meta.get(FORMAT_KEY, 1), meta.get(DIGESTS), None
    needed = (*items, META) if version == FORMAT else tuple(items)
    if FORMAT_KEY in meta and (type(version) is not int or version != FORMAT):
        problem = f"unknown checkpoint format {str(version)[:40]!r} (this jaxtag writes {FORMAT})"
    elif not isinstance(digests, dict):
        problem = f"checkpoint digests are malformed ('{DIGESTS}' is a {type(digests).__name__})"
    elif missing := [name for name in needed if not isinstance(digests.get(name), str)]:
        problem = f"checkpoint has no digest for its {', '.join(missing)} item"
    elif version == FORMAT and meta_digest(meta) != digests[META]:
        problem = "checkpoint metadata (model config, tags, format) does not match its digest"
    elif bad := [name for name, tree in items.items() if array_digest(tree) != digests[name]]:
        problem = f"checkpoint data is corrupt (the '{bad[0]}' arrays do not match their digest)"
    if problem:
        raise CheckpointError(
            f"{directory}: {problem}; restore it from a copy or convert/train it again"
        )
    if version != FORMAT:  # format 1: what `jaxtag convert` wrote before the meta digest
        old = "checkpoint of the previous format: arrays verified, model config and tags not"
        _warn_once("format1", directory, f"{old} (convert or save it again to cover them)")


def checked_metadata(directory: Path, meta: Mapping[str, Any]) -> tuple[ModelConfig, list[str]]:
    """The model config and tags of a meta item, every bad field named in one CheckpointError."""
    try:
        return saved_model(meta.get("model"), meta.get("tags"))
    except ValueError as err:
        raise CheckpointError(f"{directory}: bad checkpoint metadata: {err}") from err
