"""Training: a pmapped train step, validation every epoch, checkpoints that resume.

Layout follows the Flax ImageNet example: `create_train_state`, `train_step` and
`train_and_evaluate(config, workdir)`. Data parallelism is `jax.pmap` over all local devices
with axis name `batch`: gradients are averaged with `lax.pmean`, BatchNorm statistics are
computed over the global batch inside the model (its `axis_name`), and every device gets its
own dropout key folded from (state.rng, step, device index). Because the data order and the
dropout keys are pure functions of (seed, step), a resumed run repeats the uninterrupted one.

The loop keeps the devices busy: batches are put on the devices two steps ahead of use and the
host waits for the devices only at log, validation and checkpoint points. It reads any
`jaxtag.sources.DataSource`; TensorFlow is imported only for the default (TFDS) source.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.jax_utils
import jax
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

from jaxtag import checkpoint, evaluate, optim
from jaxtag.errors import JaxtagError
from jaxtag.fileio import atomic_write
from jaxtag.finetune import initial_variables
from jaxtag.metric_log import MetricLog
from jaxtag.model import MTSA, ModelConfig, build_model, init_variables
from jaxtag.sources import DataSource, TfdsSource

AXIS = "batch"
PREFETCH = 2  # batches on the devices ahead of use: one in use, one arriving


class ResumeError(JaxtagError):
    """A workdir's checkpoint that this run cannot continue (another model, tags or optimizer);
    the message is one line and the workdir is left as it was."""


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array  # base key: dropout keys are folded from it, never split, so resume is exact


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
    if config.global_batch_size % jax.device_count():
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the "
            f"{jax.device_count()} devices"
        )
    requested = as_dict(config.model)
    num_tags = requested.get("num_tags", -1)  # -1: as many outputs as the dataset has tags
    if num_tags > 0 and num_tags != len(source.tags):
        raise ValueError(
            f"the dataset has {len(source.tags)} tags but config.model.num_tags is {num_tags}"
        )
    requested["num_tags"] = len(source.tags)
    missing = sorted(set(ModelConfig().architecture()) - set(requested))
    if missing and not config.init_checkpoint:
        raise ValueError(
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


def create_train_state(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    seed: int,
    frames: int,
    variables: dict[str, Any] | None = None,
    front_end: str = "auto",
) -> TrainState:
    """A fresh state: random init, or the given `variables` (e.g. converted ponswon.pth).
    `front_end` picks the front end's kernels (`jaxtag.model.build_model`)."""
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    if variables is None:
        variables = init_variables(model_config, init_rng, frames)
    model = build_model(model_config, front_end=front_end, axis_name=AXIS)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
        rng=dropout_rng,
    )


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The original's BCE on sigmoid outputs, computed stably from logits; mean over all."""
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    schedule: optax.Schedule,
    freeze_backbone: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's share of the global batch (run under pmap).

    `freeze_backbone`: a linear probe. The backbone runs in eval mode (BatchNorm statistics
    frozen) under stop_gradient, and only the head (dropout + classifier) trains.
    """
    dropout_rng = jax.random.fold_in(
        jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS)
    )
    rngs = {"dropout": dropout_rng}

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        variables = {"params": params, "batch_stats": state.batch_stats}
        if freeze_backbone:
            pooled = state.apply_fn(variables, batch["mel"], method="features")
            logits = state.apply_fn(
                variables, jax.lax.stop_gradient(pooled), train=True, rngs=rngs, method="head"
            )
            return bce_loss(logits, batch["tags"]), state.batch_stats
        logits, updates = state.apply_fn(
            variables, batch["mel"], train=True, rngs=rngs, mutable=["batch_stats"]
        )
        return bce_loss(logits, batch["tags"]), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return new_state, {"loss": loss, "learning_rate": schedule(state.step)}


def make_p_train_step(schedule: optax.Schedule, freeze_backbone: bool = False) -> Any:
    # Donating the state lets XLA update parameters and optimizer state in place.
    step = functools.partial(train_step, schedule=schedule, freeze_backbone=freeze_backbone)
    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))


def host_state(state: TrainState) -> TrainState:
    """The replicated state of device 0, fetched to host memory."""
    return jax.device_get(flax.jax_utils.unreplicate(state))


def checkpoint_items(state: TrainState) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model variables, train-state item) of a host-side state, as the checkpoint stores them."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    # int32 as the pmapped step counts: a fresh state's Python 0 would restore as int64.
    step = np.asarray(state.step, np.int32)
    return variables, {"step": step, "opt_state": state.opt_state, "rng": state.rng}


def check_resumable(workdir: Path, meta: Mapping[str, Any], run: Run) -> None:
    """Raises ResumeError naming every architecture field or tag list that differs."""
    theirs = ModelConfig.from_saved(meta["model"]).architecture()
    mine = run.model.architecture()
    differ = [
        f"{k} {theirs.get(k)!r} (checkpoint) vs {mine[k]!r} (requested)"
        for k in sorted(mine)
        if theirs.get(k) != mine[k]
    ]
    if list(meta["tags"]) != run.tags:
        differ.append(
            f"tags {len(meta['tags'])} of the checkpoint's vs {len(run.tags)} of the data"
        )
    if differ:
        raise ResumeError(
            f"{workdir} holds a run of another model: {'; '.join(differ)}. Rerun with the "
            "workdir's settings (its config.json) or choose a new --workdir"
        )


def resume(
    store: checkpoint.CheckpointStore, state: TrainState, run: Run, workdir: Path
) -> tuple[TrainState, dict[str, Any]]:
    """The latest checkpoint of `store` restored into `state` (host side), and its meta."""
    if store.latest_step() is None:
        return state, {}
    try:
        check_resumable(workdir, store.latest_meta(), run)
        variables, train_item = checkpoint_items(state)
        variables, train_item, meta = store.restore(variables, train_item)
    except checkpoint.CheckpointError as err:
        raise ResumeError(f"cannot resume: {err}") from err
    state = state.replace(**variables, **train_item)
    if jax.process_index() == 0:
        step = int(state.step)
        print(f"Resuming from {workdir} at step {step} (epoch {step // run.steps_per_epoch}).")
    return state, meta


@dataclasses.dataclass
class Validator:
    """Scores the validation split and keeps the best step (the `best/` checkpoints)."""

    source: DataSource
    model: MTSA
    batch_size: int
    split: str
    best_metric: float = -float("inf")
    best_step: int | None = None
    last: dict[str, Any] | None = None  # the latest summary

    def __post_init__(self) -> None:
        self.predict = evaluate.make_predict_fn(self.model)  # built once: compiled once per run

    def __call__(self, state: TrainState, step: int) -> dict[str, Any]:
        """Scores the replicated `state`; returns the metrics summary."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        probs, labels = evaluate.predict_dataset(
            self.predict, variables, self.source.eval_batches(self.batch_size), progress=False
        )
        summary = evaluate.summary(evaluate.compute_metrics(probs, labels, self.source.tags))
        if summary[checkpoint.BEST_METRIC] > self.best_metric:
            self.best_metric, self.best_step = summary[checkpoint.BEST_METRIC], step
        self.last = summary
        return summary


def evaluate_and_save(
    state: TrainState,
    step: int,
    validate: bool,
    run: Run,
    config: Any,
    validator: Validator,
    store: checkpoint.CheckpointStore,
    metrics: MetricLog,
    clock: dict[str, float],
) -> str | None:
    """Validation (when `validate`) and a checkpoint of `step`; a validated step also goes to
    `best/`. Returns a line for the progress bar. Times each part into `clock`."""
    jax.block_until_ready(state)  # the queued train steps count as training time
    summary, line, start = None, None, time.perf_counter()
    if validate:
        summary = validator(state, step)
        epoch = step // run.steps_per_epoch
        metrics.write(
            step,
            {f"{config.eval_split}/{k}": summary[k] for k in ("roc_auc", "pr_auc")},
            epoch=epoch,
        )
        line = (
            f"epoch {epoch}: {config.eval_split} ROC-AUC {summary['roc_auc']:.4f} PR-AUC "
            f"{summary['pr_auc']:.4f} (best {validator.best_metric:.4f} at step "
            f"{validator.best_step})"
        )
    clock["validation"] += time.perf_counter() - start
    start = time.perf_counter()
    metrics.flush()  # everything logged up to this checkpoint is on disk before it
    meta = checkpoint.make_meta(
        run.model,
        run.tags,
        step=step,
        epoch=step // run.steps_per_epoch,
        metrics=summary or {},
        best_metric=validator.best_metric if validator.best_step is not None else None,
        best_step=validator.best_step,
        dataset=config.dataset,
    )
    score = None if summary is None else summary[checkpoint.BEST_METRIC]
    store.save(step, *checkpoint_items(host_state(state)), meta, score=score)
    clock["checkpoint"] += time.perf_counter() - start
    return line


def train_and_evaluate(
    config: Any,
    workdir: str | Path,
    stop_after_step: int | None = None,
    source: DataSource | None = None,
) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the run summary.

    `config`: an ml_collections ConfigDict as in configs/common.py (or any object with those
    attributes). `source`: where batches come from (default: the TFDS dataset the config names).
    `stop_after_step` ends this call early, as a time-boxed or preempted job would, after
    writing a checkpoint; the schedule still spans the whole run, and a later call resumes.
    Raises ResumeError when the workdir holds a run this config cannot continue.
    """
    workdir = Path(workdir).absolute()
    source = source if source is not None else TfdsSource(config)
    run = resolve_run(config, source, stop_after_step)
    tx, schedule = optim.create_optimizer(config, run.steps_per_epoch, run.total_steps)
    if config.freeze_backbone:
        tx = optim.freeze_backbone(tx)
    front_end = getattr(config, "front_end", "auto")
    state = create_train_state(
        run.model, tx, config.seed, config.crop_frames, run.initial, front_end
    )
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    store = checkpoint.CheckpointStore(workdir, config.keep_best)
    try:
        state, meta = resume(store, state, run, workdir)
        if is_main:
            with atomic_write(workdir / "config.json") as f:
                json.dump(
                    {**as_dict(config), "model": run.model.to_dict()}, f, indent=2, default=str
                )
        model = build_model(run.model, front_end=front_end)
        validator = Validator(source, model, config.eval_batch_size, config.eval_split)
        validator.best_step = meta.get("best_step")
        if validator.best_step is not None:
            validator.best_metric = meta["best_metric"]
        summary = train_loop(config, run, state, schedule, source, validator, store, workdir)
    finally:
        store.wait()
        store.close()
    summary.update(
        epochs=config.num_epochs,
        best_step=validator.best_step,
        **{f"best_{config.eval_split}_{checkpoint.BEST_METRIC}": validator.best_metric},
        workdir=str(workdir),
    )
    if is_main:
        status = (
            "finished" if run.end_step == run.total_steps else "stopped early (rerun to resume)"
        )
        print(f"Training {status}:", json.dumps(summary, indent=2))
        evaluate.write_report(summary, workdir / "train_summary.json")
    return summary


def train_loop(
    config: Any,
    run: Run,
    state: TrainState,
    schedule: optax.Schedule,
    source: DataSource,
    validator: Validator,
    store: checkpoint.CheckpointStore,
    workdir: Path,
) -> dict[str, Any]:
    """Steps from `state.step` to `run.end_step`; the host waits for the devices only at log,
    validation and checkpoint points."""
    start_step = int(state.step)
    # Inputs laid out on a mesh named like pmap's outputs: the second step reuses the first
    # step's compiled program instead of compiling again for a differently named layout.
    state = flax.jax_utils.replicate(state, axis_name=AXIS)
    p_train_step = make_p_train_step(schedule, config.freeze_backbone)
    batches = source.train_batches(config.global_batch_size, config.seed, start_step)
    batches = flax.jax_utils.prefetch_to_device(batches, PREFETCH, axis_name=AXIS)
    metrics = MetricLog(workdir, start_step)
    clock = {"first_step": 0.0, "validation": 0.0, "checkpoint": 0.0}
    bar = tqdm(total=run.total_steps, initial=start_step, desc="train", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)  # fmt: skip
    t_start = window_start = time.perf_counter()
    for step in range(start_step, run.end_step):
        state, step_metrics = p_train_step(state, next(batches))
        done, epoch_end = step + 1, (step + 1) % run.steps_per_epoch == 0
        if step == start_step:  # compile + first step, kept out of the throughput
            jax.block_until_ready(state)
            clock["first_step"] = time.perf_counter() - t_start
            window_start, window_first = time.perf_counter(), done
        bar.update(1)
        if done % config.log_every_steps == 0 or done == run.total_steps:
            scalars = {k: float(v[0]) for k, v in jax.device_get(step_metrics).items()}
            now = time.perf_counter()
            scalars["examples_per_second"] = (
                (done - window_first) * config.global_batch_size / max(now - window_start, 1e-9)
            )
            window_start, window_first = now, done
            bar.set_postfix(
                loss=f"{scalars['loss']:.4f}", ex_s=f"{scalars['examples_per_second']:.1f}"
            )
            metrics.write(
                done,
                {f"train/{k}": v for k, v in scalars.items()},
                epoch=done / run.steps_per_epoch,
            )
        validate = epoch_end and (
            (done // run.steps_per_epoch) % config.eval_every_epochs == 0 or done == run.total_steps
        )
        if epoch_end or done % config.checkpoint_every_steps == 0 or done == run.end_step:
            line = evaluate_and_save(
                state, done, validate, run, config, validator, store, metrics, clock
            )
            if line:
                bar.write(line)
    jax.block_until_ready(state)
    bar.close()
    metrics.close()
    wall = time.perf_counter() - t_start
    train_seconds = wall - sum(clock.values())
    steps = run.end_step - start_step
    return {
        "step": run.end_step,
        "total_steps": run.total_steps,
        "wall_seconds": round(wall, 1),
        "train_seconds": round(train_seconds, 3),
        "first_step_seconds": round(clock["first_step"], 3),
        "validation_seconds": round(clock["validation"], 3),
        "checkpoint_seconds": round(clock["checkpoint"], 3),
        "examples_per_second": max(steps - 1, 0)
        * config.global_batch_size
        / max(train_seconds, 1e-9),
        "last_eval": validator.last,
    }
