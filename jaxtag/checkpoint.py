"""One checkpoint format for converted weights and trained models, read by one loader.

A *model checkpoint* is an orbax composite directory with two items:

    <dir>/variables/   {'params': ..., 'batch_stats': ...}   (orbax StandardSave)
    <dir>/meta/        {'model': ModelConfig dict, 'tags': [...], 'sha256': {...}, ...}   (JSON)

`jaxtag convert` writes one such directory (`save_model`). Training writes the same two items
into every step it keeps, plus a `train_state` item (optimizer state, step, RNG), under
`<workdir>/checkpoints/latest/<step>/` and `<workdir>/checkpoints/best/<step>/`
(`CheckpointStore`). So `load_model` accepts a model checkpoint, a step directory, a store
directory or a workdir.

Integrity: `meta['sha256']` holds one digest per array item (`array_digest`), written at save time
and checked at every load and resume, so flipped bytes in the array data are a `CheckpointError`
naming the directory, never silently wrong numbers. Checkpoints written before digests existed
still load, with a warning that they were not verified.

This module is the only one that speaks orbax.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtag.errors import JaxtagError
from jaxtag.model import ModelConfig

VARIABLES = "variables"
META = "meta"
TRAIN_STATE = "train_state"
DIGESTS = "sha256"  # meta[DIGESTS][item name] = array_digest(item)
CHECKPOINTS_SUBDIR = "checkpoints"
LATEST, BEST = "latest", "best"  # the two step directories of a training workdir
BEST_METRIC = "roc_auc"  # meta['metrics'][BEST_METRIC] ranks the best checkpoints

log = logging.getLogger(__name__)


class CheckpointError(JaxtagError):
    """A path that is not a readable, intact jaxtag checkpoint."""


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    tags: list[str]
    variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...} of numpy arrays
    meta: dict[str, Any]
    path: Path


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


def model_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def make_meta(config: ModelConfig, tags: list[str], **extra: Any) -> dict[str, Any]:
    if len(tags) != config.num_tags:
        raise ValueError(f"{len(tags)} tag names for a model with {config.num_tags} outputs")
    return {"model": config.to_dict(), "tags": list(tags), **extra}


def _save_args(items: Mapping[str, Any], meta: Mapping[str, Any]) -> ocp.args.Composite:
    """Array items plus the meta item, which records each array item's digest."""
    digests = {name: array_digest(tree) for name, tree in items.items()}
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    return ocp.args.Composite(**args, **{META: ocp.args.JsonSave({**meta, DIGESTS: digests})})


def verify(directory: Path, items: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Raises CheckpointError unless every restored item matches the digest saved with it."""
    digests = meta.get(DIGESTS)
    if digests is None:
        log.warning(
            "%s: checkpoint written without array digests; its data is not verified", directory
        )
        return
    for name, tree in items.items():
        if name in digests and array_digest(tree) != digests[name]:
            raise CheckpointError(
                f"{directory}: checkpoint data is corrupt (the '{name}' arrays do not match the "
                "digest written with them); restore it from a copy or convert/train it again"
            )


def _replace_dir(directory: Path, write: Any) -> None:
    """Writes the new `directory` beside it with `write(path)`, then swaps it in by renames; the
    old one comes back if the swap fails."""
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.replacing-"))
    try:
        write(tmp / "new")
        os.replace(directory, tmp / "old")
        try:
            os.replace(tmp / "new", directory)
        except BaseException:
            os.replace(tmp / "old", directory)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(
    directory: str | Path,
    variables: dict[str, Any],
    config: ModelConfig,
    tags: list[str],
    overwrite: bool = False,
    **extra_meta: Any,
) -> Path:
    """Writes a standalone model checkpoint, atomically (orbax renames a finished temp dir).

    `overwrite=True` replaces an existing `directory` only if it is a jaxtag model checkpoint:
    the new one is written beside it and swapped in, so a failed write leaves the old one whole.
    Anything else at `directory` (a file, a directory of other files) raises FileExistsError and
    is left untouched.
    """
    directory = Path(directory).absolute()
    meta = make_meta(config, tags, **extra_meta)
    args = _save_args({VARIABLES: model_variables(variables)}, meta)

    def write(path: Path) -> None:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(path, args)

    if not directory.exists():
        write(directory)
    elif not overwrite:
        raise FileExistsError(f"{directory} already exists (pass overwrite=True / --overwrite)")
    elif directory.is_dir() and is_model_dir(directory):
        _replace_dir(directory, write)
    elif directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        write(directory)
    else:
        kind = "directory that holds no jaxtag checkpoint" if directory.is_dir() else "file"
        raise FileExistsError(
            f"{directory} is a {kind}; --overwrite replaces only a jaxtag checkpoint, "
            "so it was left untouched (choose another output path)"
        )
    return directory


def is_model_dir(path: Path) -> bool:
    return (path / VARIABLES).is_dir() and (path / META).is_dir()


def _steps(manager_dir: Path) -> list[int]:
    """Finished steps of a step directory (unfinished temp dirs are ignored)."""
    with ocp.CheckpointManager(manager_dir) as manager:
        return sorted(manager.all_steps())


def read_meta(directory: Path) -> dict[str, Any]:
    """The meta item of a model checkpoint or training step directory."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            directory, ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        )
    return dict(restored[META])


def resolve(path: str | Path, prefer: str = BEST) -> Path:
    """Finds the model checkpoint directory that `path` points at.

    `prefer='best'` takes the step with the highest validation ROC-AUC when a `best/` store
    exists, else the latest step; `prefer='latest'` takes the newest step.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if is_model_dir(path):
        return path
    if (path / CHECKPOINTS_SUBDIR).is_dir():
        path = path / CHECKPOINTS_SUBDIR
    candidates = [BEST, LATEST] if prefer == BEST else [LATEST, BEST]
    managers = [path / name for name in candidates if (path / name).is_dir()] or [path]
    for manager in managers:
        steps = _steps(manager)
        if not steps:
            continue
        if manager.name == BEST:
            scores = {
                s: read_meta(manager / str(s)).get("metrics", {}).get(BEST_METRIC) for s in steps
            }
            ranked = [s for s in steps if scores[s] is not None]
            if ranked:
                return manager / str(max(ranked, key=lambda s: (scores[s], s)))
        return manager / str(steps[-1])
    raise CheckpointError(
        f"{path}: not a jaxtag checkpoint (expected '{VARIABLES}/' and '{META}/' subdirectories, "
        f"or a training workdir with '{CHECKPOINTS_SUBDIR}/{LATEST}' or "
        f"'{CHECKPOINTS_SUBDIR}/{BEST}')"
    )


def first_line(err: BaseException) -> str:
    """The gist of an error's message: tensorstore/orbax errors append pages of specs."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = text.split(" [", 1)[0]  # tensorstore appends "[source locations=...]" and its spec
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(err).__name__}: {text}"


def load_model(path: str | Path, prefer: str = BEST) -> LoadedModel:
    """Loads config, tag names and variables from any checkpoint `resolve` understands."""
    directory = resolve(path, prefer)
    args = ocp.args.Composite(
        **{VARIABLES: ocp.args.StandardRestore(), META: ocp.args.JsonRestore()}
    )
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory, args)
    except Exception as err:  # orbax raises many types; name the directory in one clear error
        raise CheckpointError(
            f"{directory}: cannot read checkpoint: {first_line(err)} (damaged or incomplete?)"
        ) from err
    meta = dict(restored[META])
    try:
        config = ModelConfig.from_saved(meta["model"])
        tags = list(meta["tags"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{directory}: bad checkpoint metadata: {err}") from err
    variables = jax.tree_util.tree_map(np.asarray, dict(restored[VARIABLES]))
    variables.setdefault("batch_stats", {})
    verify(directory, {VARIABLES: variables}, meta)
    return LoadedModel(config=config, tags=tags, variables=variables, meta=meta, path=directory)


def _sync_keys(name: str) -> ocp.options.MultiprocessingOptions:
    # Multi-host saves meet at barriers named by step: the two stores save the same step, so
    # each needs barrier names of its own.
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class CheckpointStore:
    """A training workdir's checkpoints: `latest/` (the newest steps, to resume from) and `best/`
    (the `keep_best` steps with the highest validation ROC-AUC).

    Each step holds the model checkpoint items plus `train_state`; saves are asynchronous
    (`wait` blocks until they are on disk) and written by process 0 only on multi-host runs.
    """

    def __init__(self, workdir: str | Path, keep_best: int = 3, keep_latest: int = 2):
        self.root = Path(workdir).absolute() / CHECKPOINTS_SUBDIR
        items = (VARIABLES, META, TRAIN_STATE)
        self._latest = ocp.CheckpointManager(
            self.root / LATEST,
            item_names=items,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_latest, create=True, multiprocessing_options=_sync_keys(LATEST)
            ),
        )
        self._best = ocp.CheckpointManager(
            self.root / BEST,
            item_names=items,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_best,
                best_fn=lambda metrics: metrics[BEST_METRIC],
                best_mode="max",
                create=True,
                multiprocessing_options=_sync_keys(BEST),
            ),
        )

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def latest_meta(self) -> dict[str, Any]:
        """The meta item of the latest step (to check a resume before restoring arrays)."""
        return read_meta(self.root / LATEST / str(self.latest_step()))

    def save(
        self,
        step: int,
        variables: Mapping[str, Any],
        train_state: Mapping[str, Any],
        meta: Mapping[str, Any],
        score: float | None = None,
    ) -> None:
        """Saves `step` to `latest/`, and to `best/` as well when it has a validation `score`."""
        items = {VARIABLES: model_variables(variables), TRAIN_STATE: dict(train_state)}
        args = _save_args(items, meta)
        self._latest.save(step, args=args)
        if score is not None:
            self._best.save(step, args=args, metrics={BEST_METRIC: score})

    def restore(
        self, variables: Mapping[str, Any], train_state: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The latest step in the structure of the given templates: (variables, train_state,
        meta), verified against its digests (CheckpointError if corrupt or unreadable)."""
        step = self.latest_step()
        directory = self.root / LATEST / str(step)
        args = ocp.args.Composite(
            **{
                VARIABLES: ocp.args.StandardRestore(model_variables(variables)),
                TRAIN_STATE: ocp.args.StandardRestore(dict(train_state)),
                META: ocp.args.JsonRestore(),
            }
        )
        try:
            restored = self._latest.restore(step, args=args)
        except Exception as err:  # orbax raises many types; one clear error naming the step
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise CheckpointError(f"{directory}: cannot restore: {first_line}") from err
        variables, train_state = dict(restored[VARIABLES]), dict(restored[TRAIN_STATE])
        meta = dict(restored[META])
        verify(directory, {VARIABLES: variables, TRAIN_STATE: train_state}, meta)
        return variables, train_state, meta

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()
