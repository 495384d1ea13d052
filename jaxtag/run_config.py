"""What a training run checks before it writes anything, what its config resolves to, and how
it claims its workdir.

`validate(config, source)` looks at every config value the loop, the optimizer and the data
source read, and raises one `ConfigError` whose one-line message lists every bad field: a wrong
value costs no epoch and leaves no workdir behind. `resolve_run` turns the config into the
model, tags and step counts (the config itself is never changed). `claim_workdir` then checks
the workdir (a writable folder that holds no foreign file where a run writes), creates it and
holds `jaxtag.fileio.exclusive_lock` on it for the whole run, so a second run on the same
workdir stops at once naming the first's PID. On multi-host runs only process 0 writes (as in
`jaxtag.checkpoint.CheckpointStore`), so only process 0 checks and locks; the other processes,
which may see the same folder on a shared file system, learn from it whether the run may go on.
`write_error` turns a failed write (disk full, ...) into one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxtag.errors import JaxtagError
from jaxtag.fileio import exclusive_lock, unwritable_reason
from jaxtag.finetune import initial_variables
from jaxtag.model import ModelConfig
from jaxtag.model.network import FRONT_ENDS

if TYPE_CHECKING:
    from jaxtag.sources import DataSource

OPTIMIZERS = ("original", "adamw_cosine")  # jaxtag/optim.py create_optimizer
# What a run writes in its workdir that would replace or cut an existing file of that name.
RUN_FILES = ("config.json", "metrics.jsonl", "train_summary.json", "tensorboard", "checkpoints")


class ConfigError(JaxtagError):
    """Config values a run cannot start with; the message lists every bad field in one line."""


class WorkdirError(JaxtagError):
    """A workdir that cannot be written, or that holds files of something else."""


class WriteError(JaxtagError):
    """A write failed during the run (disk full, ...); the message names the file and why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _get(config: Any, name: str) -> Any:
    return getattr(config, name, None)


def config_problems(config: Any, devices: int | None = None) -> list[str]:
    """One "FIELD VALUE (must be ...)" per bad value of `config` (configs/common.py fields)."""
    devices = jax.device_count() if devices is None else devices
    problems = []

    def check(name: str, ok: bool, rule: str) -> None:
        if not ok:
            problems.append(f"{name} {_get(config, name)!r} (must be {rule})")

    for name in ("global_batch_size", "eval_batch_size"):
        value = _get(config, name)
        check(
            name,
            _is_int(value) and value > 0 and value % devices == 0,
            f"a positive multiple of the {devices} devices",
        )
    counts = ("num_epochs", "log_every_steps", "checkpoint_every_steps", "eval_every_epochs")
    for name in (*counts, "keep_best"):
        check(name, _is_int(_get(config, name)) and _get(config, name) >= 1, "an integer >= 1")
    steps = _get(config, "steps_per_epoch")
    check("steps_per_epoch", _is_int(steps), "an integer; <= 0: from the data")
    check("seed", _is_int(_get(config, "seed")), "an integer")
    frames = _get(config, "crop_frames")
    check("crop_frames", _is_int(frames) and frames >= 1, "an integer >= 1")
    rate = _get(config, "learning_rate")
    check("learning_rate", _is_number(rate) and math.isfinite(rate) and rate > 0, "finite, > 0")
    decay = _get(config, "weight_decay")
    check("weight_decay", _is_number(decay) and math.isfinite(decay) and decay >= 0, "finite, >= 0")
    optimizer = _get(config, "optimizer")
    check("optimizer", optimizer in OPTIMIZERS, " or ".join(OPTIMIZERS))
    if optimizer == "original":
        rates = _get(config, "sgd_learning_rates")
        check(
            "sgd_learning_rates",
            isinstance(rates, list | tuple)
            and len(rates) > 0
            and all(_is_number(r) and math.isfinite(r) and r > 0 for r in rates),
            "a non-empty list of finite rates > 0",
        )
        switch, per_rate = _get(config, "switch_epoch"), _get(config, "sgd_epochs_per_rate")
        check("switch_epoch", _is_int(switch) and switch >= 0, "an integer >= 0")
        check("sgd_epochs_per_rate", _is_int(per_rate) and per_rate >= 1, "an integer >= 1")
        momentum = _get(config, "momentum")
        check("momentum", _is_number(momentum) and 0 <= momentum < 1, "in [0, 1)")
    elif optimizer == "adamw_cosine":
        warmup = _get(config, "warmup_epochs")
        check(
            "warmup_epochs",
            _is_number(warmup) and math.isfinite(warmup) and warmup >= 0,
            "finite, >= 0",
        )
    front_end = getattr(config, "front_end", "auto")
    check("front_end", front_end in ("auto", *FRONT_ENDS), " or ".join(("auto", *FRONT_ENDS)))
    return problems


def source_problems(config: Any, source: Any) -> list[str]:
    """The splits the config names that the data source lacks or that hold no examples."""
    problems = []
    splits = getattr(source, "splits", None)  # TfdsSource: the dataset's split names
    for name in ("train_split", "eval_split"):
        split = _get(config, name)
        if splits is not None and str(split).split("[")[0] not in splits:
            problems.append(f"{name} {split!r} (the dataset has {', '.join(sorted(splits))})")
    if not problems and source.num_train_examples < 1:
        problems.append(f"train_split {_get(config, 'train_split')!r} (it holds no examples)")
    if not problems and getattr(source, "num_eval_examples", 1) < 1:
        problems.append(f"eval_split {_get(config, 'eval_split')!r} (it holds no examples)")
    return problems


def validate(config: Any, source: Any) -> None:
    """Raises ConfigError listing every bad field of `config` for `source`, in one line."""
    problems = config_problems(config) + source_problems(config, source)
    if problems:
        raise ConfigError(f"bad training config: {'; '.join(problems)}")


def as_dict(config: Any) -> dict[str, Any]:
    """A config (ml_collections ConfigDict, dict or plain object) as a plain dict."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    return {k: as_dict(v) if hasattr(v, "__dict__") else v for k, v in vars(config).items()}


@dataclasses.dataclass(frozen=True)
class Run:
    """What a config and a data source resolve to (the config itself is never changed)."""

    model: ModelConfig
    tags: list[str]
    steps_per_epoch: int
    total_steps: int
    end_step: int  # where this call stops (`stop_after_step`, else total_steps)
    initial: dict[str, Any] | None  # variables to start from (init_checkpoint), else random


def resolve_run(config: Any, source: DataSource, stop_after_step: int | None = None) -> Run:
    """The model, tags and step counts of `config` on `source` (a config that passed
    `run_config.validate`); ConfigError for a model config that does not fit the data."""
    requested = as_dict(config.model)
    num_tags = requested.get("num_tags", -1)  # -1: as many outputs as the dataset has tags
    if num_tags > 0 and num_tags != len(source.tags):
        raise ConfigError(
            f"the dataset has {len(source.tags)} tags but config.model.num_tags is {num_tags}"
        )
    requested["num_tags"] = len(source.tags)
    missing = sorted(set(ModelConfig().architecture()) - set(requested))
    if missing and not config.init_checkpoint:
        raise ConfigError(
            f"config.model has no {', '.join(missing)}: set config.init_checkpoint (this config "
            "takes the architecture from the checkpoint it fine-tunes)"
        )
    initial = None
    if config.init_checkpoint:
        model, initial = initial_variables(config.init_checkpoint, requested, source.tags, config)
    else:
        model = ModelConfig.from_dict(requested)
    steps_per_epoch = config.steps_per_epoch
    if steps_per_epoch <= 0:
        steps_per_epoch = max(source.num_train_examples // config.global_batch_size, 1)
    total_steps = config.num_epochs * steps_per_epoch
    end_step = total_steps if stop_after_step is None else min(stop_after_step, total_steps)
    return Run(model, list(source.tags), steps_per_epoch, total_steps, end_step, initial)


def _own_config(path: Path) -> bool:
    """Whether `path` is a config.json that a jaxtag run wrote (jaxtag/train.py)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"global_batch_size", "model", "num_epochs"} <= set(saved)


def workdir_problem(workdir: Path) -> str | None:
    """Why training cannot write `workdir`, or None: not a folder, not writable, or holding a
    file by the name of one a run writes while being no jaxtag run (it would be replaced)."""
    if not workdir.exists():
        return unwritable_reason(workdir)  # a file or a read-only folder on the way
    if not workdir.is_dir():
        return f"workdir {workdir} is a file, not a folder"
    if not os.access(workdir, os.W_OK | os.X_OK):
        return f"workdir {workdir} is not writable"
    ours = _own_config(workdir / "config.json") or (workdir / "checkpoints" / "latest").is_dir()
    clashing = [name for name in RUN_FILES if (workdir / name).exists()]
    if clashing and not ours:
        return (
            f"workdir {workdir} holds {', '.join(clashing)} of something else than a jaxtag "
            "training run (no jaxtag config.json or checkpoints/latest); choose another --workdir"
        )
    return None


@contextlib.contextmanager
def claim_workdir(workdir: Path) -> Iterator[None]:
    """Checks, creates and locks `workdir` (process 0) for as long as the block runs.

    Raises:
      WorkdirError: the workdir cannot be written (see `workdir_problem`).
      jaxtag.fileio.LockedError: another run holds it (its PID is in the message).
    """
    failure: JaxtagError | None = None
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            try:
                problem = workdir_problem(workdir)
                if problem:
                    raise WorkdirError(problem)
                workdir.mkdir(parents=True, exist_ok=True)
                stack.enter_context(exclusive_lock(workdir, f"training workdir {workdir}"))
            except JaxtagError as err:
                failure = err
            except OSError as err:
                failure = WorkdirError(f"workdir {workdir}: {err.strerror or err}")
        if jax.process_count() > 1:  # all processes stop together, not at the first barrier
            from jax.experimental import multihost_utils

            failed = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
            if int(failed) and failure is None:
                failure = WorkdirError(f"workdir {workdir}: process 0 could not claim it")
        if failure is not None:
            raise failure
        yield


def _os_error_code(err: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the os_error_code that tensorstore (orbax's
    writer) puts in its ValueError's long message."""
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
    code = re.search(r"os_error_code='?(\d+)", str(err))
    return int(code.group(1)) if code else None


def write_error(what: str, err: BaseException) -> WriteError:
    """A WriteError for a failed write of `what`: one line, the OS's reason, what to do."""
    code = _os_error_code(err)
    if code is not None:
        reason = os.strerror(code) + (" (free some space)" if code == errno.ENOSPC else "")
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(" [")[0]
        reason = reason if len(reason) <= 200 else reason[:200] + "..."
    return WriteError(
        f"cannot write {what}: {reason}; rerun the same command to resume from the last "
        "complete checkpoint"
    )
