"""One checkpoint format for converted weights and trained models, read by one loader.

A *model checkpoint* is an orbax composite directory with two items:

    <dir>/variables/   {'params': ..., 'batch_stats': ...}   (orbax StandardSave)
    <dir>/meta/        {'model': ModelConfig dict, 'tags': [...], ...}   (orbax JsonSave)

`jaxtag convert` writes one such directory. Training writes the same two items into every step of
its orbax CheckpointManagers (plus a `train_state` item with the optimizer state, step and RNG),
under `<workdir>/checkpoints/latest/<step>/` and `<workdir>/checkpoints/best/<step>/`. So
`load_model` accepts a model checkpoint, a step directory, a manager directory or a workdir.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtag.model import ModelConfig

VARIABLES = "variables"
META = "meta"
TRAIN_STATE = "train_state"
CHECKPOINTS_SUBDIR = "checkpoints"
BEST_METRIC = "roc_auc"  # meta['metrics'][BEST_METRIC] ranks the best checkpoints


class CheckpointError(ValueError):
    """A path that is not a readable jaxtag checkpoint."""


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    tags: list[str]
    variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...} of numpy arrays
    meta: dict[str, Any]
    path: Path


def make_meta(config: ModelConfig, tags: list[str], **extra: Any) -> dict[str, Any]:
    if len(tags) != config.num_tags:
        raise ValueError(f"{len(tags)} tag names for a model with {config.num_tags} outputs")
    return {"model": config.to_dict(), "tags": list(tags), **extra}


def model_save_args(variables: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The orbax items of a model checkpoint, for `ocp.args.Composite(**...)`."""
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return {VARIABLES: ocp.args.StandardSave(variables), META: ocp.args.JsonSave(meta)}


def save_model(
    directory: str | Path,
    variables: dict[str, Any],
    config: ModelConfig,
    tags: list[str],
    overwrite: bool = False,
    **extra_meta: Any,
) -> Path:
    """Writes a standalone model checkpoint (atomically: orbax renames a finished temp dir)."""
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists (pass overwrite=True / --overwrite)")
    meta = make_meta(config, tags, **extra_meta)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            directory, ocp.args.Composite(**model_save_args(variables, meta)), force=overwrite
        )
    return directory


def is_model_dir(path: Path) -> bool:
    return (path / VARIABLES).is_dir() and (path / META).is_dir()


def _steps(manager_dir: Path) -> list[int]:
    """Finished steps of an orbax manager directory (unfinished temp dirs are ignored)."""
    with ocp.CheckpointManager(manager_dir) as manager:
        return sorted(manager.all_steps())


def _read_meta(step_dir: Path) -> dict[str, Any]:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            step_dir, ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        )
    return dict(restored[META])


def resolve(path: str | Path, prefer: str = "best") -> Path:
    """Finds the model checkpoint directory that `path` points at.

    `prefer='best'` takes the step with the highest validation ROC-AUC when a `best/` manager
    exists, else the latest step; `prefer='latest'` takes the newest step.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if is_model_dir(path):
        return path
    if (path / CHECKPOINTS_SUBDIR).is_dir():
        path = path / CHECKPOINTS_SUBDIR
    candidates = ["best", "latest"] if prefer == "best" else ["latest", "best"]
    managers = [path / name for name in candidates if (path / name).is_dir()] or [path]
    for manager in managers:
        steps = _steps(manager)
        if not steps:
            continue
        if manager.name == "best":
            scores = {
                s: _read_meta(manager / str(s)).get("metrics", {}).get(BEST_METRIC) for s in steps
            }
            ranked = [s for s in steps if scores[s] is not None]
            if ranked:
                return manager / str(max(ranked, key=lambda s: (scores[s], s)))
        return manager / str(steps[-1])
    raise CheckpointError(
        f"{path}: not a jaxtag checkpoint (expected '{VARIABLES}/' and '{META}/' subdirectories, "
        f"or a training workdir with '{CHECKPOINTS_SUBDIR}/latest' or '{CHECKPOINTS_SUBDIR}/best')"
    )


def load_model(path: str | Path, prefer: str = "best") -> LoadedModel:
    """Loads config, tag names and variables from any checkpoint `resolve` understands."""
    directory = resolve(path, prefer)
    args = ocp.args.Composite(
        **{VARIABLES: ocp.args.StandardRestore(), META: ocp.args.JsonRestore()}
    )
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory, args)
    except Exception as err:  # orbax raises many types; name the directory in one clear error
        raise CheckpointError(f"{directory}: cannot read checkpoint: {err}") from err
    meta = dict(restored[META])
    try:
        config = ModelConfig.from_dict(meta["model"])
        tags = list(meta["tags"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{directory}: bad checkpoint metadata: {err}") from err
    variables = jax.tree_util.tree_map(np.asarray, dict(restored[VARIABLES]))
    variables.setdefault("batch_stats", {})
    return LoadedModel(config=config, tags=tags, variables=variables, meta=meta, path=directory)
