"""One checkpoint format for converted weights and trained models, read by one loader.

A *model checkpoint* is an orbax composite directory with two items:

    <dir>/variables/   {'params': ..., 'batch_stats': ...}   (orbax StandardSave)
    <dir>/meta/        {'model': ModelConfig dict, 'tags': [...], 'format': 2, 'sha256': {...},
                        ...}   (JSON)

`jaxtag convert` writes one such directory (`save_model`). Training writes the same two items
into every step it keeps, plus a `train_state` item (optimizer state, step, RNG), under
`<workdir>/checkpoints/latest/<step>/` and `<workdir>/checkpoints/best/<step>/`
(`CheckpointStore`). So `load_model` accepts a model checkpoint, a step directory, a store
directory or a workdir.

Integrity (format 2): `meta['sha256']` holds a digest per array item (`array_digest`) and, under
'meta', one over the model config, tags, format number and array digests (`meta_digest`), all
checked at every load and resume: flipped bytes, edited tags or config, a digest missing or
malformed are a one-line `CheckpointError` (digests have no key: they catch damage and edits, not
a forger who recomputes them). Metas without a 'format' key are older: format 1 (array digests
only) loads with a warning that its metadata is not verified, format 0 (none) that nothing is.
Steps that are not complete checkpoints (a `best/N` an eval report re-created) are skipped with a
warning wherever steps are listed.

This module is the only one that speaks orbax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtag.errors import JaxtagError
from jaxtag.integrity import (  # re-exported: the checkpoint format's names live here too
    DIGESTS,
    FORMAT,
    FORMAT_KEY,
    META,
    CheckpointError,
    _warn_once,
    array_digest,
    checked_metadata,
    meta_digest,
    verify,
)
from jaxtag.model import ModelConfig
from jaxtag.model.config import tag_problems

SETTLE_SECONDS = 3.0  # at most this long for orbax's threads to stop after a failed write
VARIABLES = "variables"
TRAIN_STATE = "train_state"
STEP_ITEMS = (VARIABLES, META, TRAIN_STATE)  # what a training step holds
CHECKPOINTS_SUBDIR = "checkpoints"
LATEST, BEST = "latest", "best"  # the two step directories of a training workdir
BEST_METRIC = "roc_auc"  # meta['metrics'][BEST_METRIC] ranks the best checkpoints


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    tags: list[str]
    variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...} of numpy arrays
    meta: dict[str, Any]
    path: Path


def model_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def make_meta(config: ModelConfig, tags: list[str], **extra: Any) -> dict[str, Any]:
    """The meta item of `config` and its `tags` (ValueError if they do not fit), plus `extra`."""
    problems = tag_problems(list(tags), config.num_tags)
    if problems:
        raise ValueError("; ".join(problems))
    return {"model": config.to_dict(), "tags": list(tags), **extra}


def _save_args(items: Mapping[str, Any], meta: Mapping[str, Any]) -> ocp.args.Composite:
    """Array items plus the meta item, which records the format and the digests."""
    digests = {name: array_digest(tree) for name, tree in items.items()}
    meta = {**meta, FORMAT_KEY: FORMAT, DIGESTS: digests}
    meta[DIGESTS] = {**digests, META: meta_digest(meta)}
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    return ocp.args.Composite(**args, **{META: ocp.args.JsonSave(meta)})


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


def _orbax_temporaries(out: Path) -> set[Path]:
    return set(map(Path, glob.glob(glob.escape(str(out)) + ".orbax-checkpoint-tmp*")))


def _write_failure(err: BaseException) -> str:
    """What went wrong in a failed write, in a few words (tensorstore's errors run for pages
    and carry the OS error code at the end)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    code = re.search(r"os_error_code='?(\d+)", str(err))
    return os.strerror(int(code.group(1))) if code else first_line(err)


class _OrphanedWrites(logging.Filter):
    """Drops asyncio's reports of the failed background writes into one orbax temporary."""

    def __init__(self, temporary: str):
        super().__init__()
        self.temporary = temporary

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("exception was never retrieved" in message and self.temporary in message)


@contextlib.contextmanager
def _quiet_orbax_write(out: Path) -> Iterator[None]:
    """Runs a checkpoint write with orbax's own reports held back: on success they are printed
    after it; on a failure its background threads are given a moment to stop (they report the
    same error again and again, some after the write has failed), their output is dropped and
    the temporary folder orbax left beside `out` removed."""
    before = _orbax_temporaries(out)
    absl, stderr, held = logging.getLogger("absl"), sys.stderr, io.StringIO()
    level = absl.level
    absl.setLevel(logging.CRITICAL + 1)
    sys.stderr = held
    try:
        yield
    except BaseException as err:

        def activity() -> tuple[int, int]:  # what orbax's threads are still printing or writing
            files = [f for t in _orbax_temporaries(out) - before for f in t.rglob("*")]
            return len(held.getvalue()), sum(f.stat().st_size for f in files if f.is_file())

        deadline, last, quiet = time.monotonic() + SETTLE_SECONDS, None, 0
        while not isinstance(err, JaxtagError) and quiet < 3 and time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # a file removed while it was looked at
                now = activity()
                quiet, last = (quiet + 1 if now == last else 0), now
            time.sleep(0.1)
        for temporary in _orbax_temporaries(out) - before:
            shutil.rmtree(temporary, ignore_errors=True)
        # orbax's failed array writes live on as asyncio futures that log "exception was never
        # retrieved" whenever they are collected, even after this: dropped for this `out` only.
        logging.getLogger("asyncio").addFilter(_OrphanedWrites(f"{out.name}.orbax-checkpoint-tmp"))
        raise
    else:
        stderr.write(held.getvalue())
    finally:
        sys.stderr = stderr
        absl.setLevel(level)


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
        try:
            with (
                _quiet_orbax_write(path),
                ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer,
            ):
                checkpointer.save(path, args)
        except (OSError, ValueError, RuntimeError) as err:  # orbax's and tensorstore's
            raise CheckpointError(
                f"{directory}: cannot write the checkpoint ({_write_failure(err)}); nothing "
                "was written"
            ) from err

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


def _complete(manager_dir: Path, steps: Any, items: tuple[str, ...]) -> list[int]:
    """The `steps` whose folders hold every item (non-empty), sorted; the others (a folder an
    eval report re-created, a half-deleted one) are skipped with a warning."""
    good = []
    for step in sorted(steps):
        folder = manager_dir / str(step)
        if all((folder / item).is_dir() and any((folder / item).iterdir()) for item in items):
            good.append(step)
        else:
            _warn_once("hollow", folder, "not a complete checkpoint; ignored")
    return good


def _steps(manager_dir: Path) -> list[int]:
    """Complete finished steps of a step directory (unfinished temp dirs are ignored)."""
    with ocp.CheckpointManager(manager_dir) as manager:
        return _complete(manager_dir, manager.all_steps(), (VARIABLES, META))


def _as_meta(directory: Path, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise CheckpointError(
            f"{directory}: bad checkpoint metadata: a {type(value).__name__}, not a JSON object"
        )
    return dict(value)


def read_meta(directory: Path) -> dict[str, Any]:
    """The meta item of a model checkpoint or training step directory (not verified)."""
    args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory, args)
    except Exception as err:  # orbax raises many types; one clear error naming the directory
        raise CheckpointError(f"{directory}: cannot read its meta: {first_line(err)}") from err
    return _as_meta(directory, restored[META])


def _score(directory: Path) -> float | None:
    """A best step's validation ROC-AUC; None when its meta has none or cannot be read."""
    try:
        metrics = read_meta(directory).get("metrics")
    except CheckpointError:  # a step without a score is not ranked
        _warn_once("meta", directory, "its meta cannot be read; not ranked")
        return None
    score = metrics.get(BEST_METRIC) if isinstance(metrics, dict) else None
    return float(score) if type(score) in (int, float) and score == score else None


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
            scores = {s: _score(manager / str(s)) for s in steps}
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
    meta = _as_meta(directory, restored[META])
    config, tags = checked_metadata(directory, meta)
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
        self._latest = ocp.CheckpointManager(
            self.root / LATEST,
            item_names=STEP_ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_latest, create=True, multiprocessing_options=_sync_keys(LATEST)
            ),
        )
        self._best = ocp.CheckpointManager(
            self.root / BEST,
            item_names=STEP_ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_best,
                best_fn=lambda metrics: metrics[BEST_METRIC],
                best_mode="max",
                create=True,
                multiprocessing_options=_sync_keys(BEST),
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete step on disk in `latest/` (incomplete ones warned about)."""
        self._latest.reload()  # what is on disk now (another writer, a hollow folder)
        steps = _complete(self.root / LATEST, self._latest.all_steps(), STEP_ITEMS)
        return steps[-1] if steps else None

    def _latest_dir(self) -> Path:
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"{self.root / LATEST}: no complete checkpoint to resume from")
        return self.root / LATEST / str(step)

    def latest_meta(self) -> dict[str, Any]:
        """The meta item of the latest step, its digest verified and its model config and tags
        validated (to check a resume before restoring arrays)."""
        directory = self._latest_dir()
        meta = read_meta(directory)
        checked_metadata(directory, meta)
        verify(directory, {}, meta)
        return meta

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
        directory = self._latest_dir()
        step = int(directory.name)
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
            raise CheckpointError(f"{directory}: cannot restore: {first_line(err)}") from err
        variables, train_state = dict(restored[VARIABLES]), dict(restored[TRAIN_STATE])
        meta = _as_meta(directory, restored[META])
        checked_metadata(directory, meta)
        verify(directory, {VARIABLES: variables, TRAIN_STATE: train_state}, meta)
        return variables, train_state, meta

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()
