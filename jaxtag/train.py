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

Before anything is written, every config value is checked and the workdir claimed (checked,
created and locked for the whole run: jaxtag/run_config.py). A run whose workdir already holds
its last step changes nothing; a resumed run's summary adds its time to the earlier calls'.
"""

from __future__ import annotations

import contextlib
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

from jaxtag import checkpoint, evaluate, optim, run_config
from jaxtag.errors import JaxtagError
from jaxtag.fileio import atomic_write
from jaxtag.finetune import initial_variables  # noqa: F401 (train.initial_variables: API)
from jaxtag.metric_log import SUMMARY, MetricLog, SessionClock, earlier_sessions, run_summary
from jaxtag.model import MTSA, ModelConfig, init_variables
from jaxtag.model.tuning import FrontEndKernels, tune_front_end
from jaxtag.run_config import Run, as_dict, resolve_run  # noqa: F401 (train.resolve_run: API)
from jaxtag.sources import DataSource, TfdsSource

AXIS = "batch"
PREFETCH = 2  # batches on the devices ahead of use: one in use, one arriving


class ResumeError(JaxtagError):
    """A workdir's checkpoint that this run cannot continue (another model, tags or optimizer);
    the message is one line and the workdir is left as it was."""


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array  # base key: dropout keys are folded from it, never split, so resume is exact


def create_train_state(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    seed: int,
    frames: int,
    variables: dict[str, Any] | None = None,
    front_end: str | FrontEndKernels = "auto",
) -> TrainState:
    """A fresh state: random init, or the given `variables` (e.g. converted ponswon.pth).
    `front_end`: the front end's kernels, by name or measured (jaxtag/model/tuning.py)."""
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    if variables is None:
        variables = init_variables(model_config, init_rng, frames)
    model = FrontEndKernels.of(front_end).model(model_config, AXIS)
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
    clock: SessionClock,
) -> str | None:
    """Validation (when `validate`) and a checkpoint of `step`; a validated step also goes to
    `best/`. Returns a line for the progress bar. Times each part into `clock`."""
    jax.block_until_ready(state)  # the queued train steps count as training time
    summary, line = None, None
    with clock.timing("validation"):
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
    with clock.timing("checkpoint"):
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
            sessions=clock.sessions(step),  # a resume from here keeps the time spent so far
            last_eval=validator.last,
        )
        score = None if summary is None else summary[checkpoint.BEST_METRIC]
        try:
            store.save(step, *checkpoint_items(host_state(state)), meta, score=score)
        except (OSError, ValueError, RuntimeError) as err:  # orbax: often the previous save's
            if isinstance(err, JaxtagError):
                raise
            raise run_config.write_error(f"a checkpoint in {store.root}", err) from err
    return line


def close_store(store: checkpoint.CheckpointStore, failing: bool) -> None:
    """Waits for the pending saves and closes `store`. A failed save is a WriteError, unless the
    run already fails: then that first error is the one to report."""
    try:
        store.wait()
        store.close()
    except Exception as err:
        with contextlib.suppress(Exception):
            store.close()
        if not failing:
            raise run_config.write_error(f"a checkpoint in {store.root}", err) from err


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
    A workdir already at its last step (or at `stop_after_step`) is left as it is and its summary
    returned. Raises, before anything is written: `run_config.ConfigError` (every bad config
    field), `run_config.WorkdirError` or `fileio.LockedError` (another run holds the workdir),
    ResumeError (the workdir holds a run this config cannot continue); during the run:
    `run_config.WriteError` (a checkpoint or log that cannot be written) or OSError.
    """
    workdir = Path(workdir).absolute()
    source = source if source is not None else TfdsSource(config)
    run_config.validate(config, source)
    run = resolve_run(config, source, stop_after_step)
    with run_config.claim_workdir(workdir):
        return _train_in_workdir(config, workdir, run, source)


def _train_in_workdir(config: Any, workdir: Path, run: Run, source: DataSource) -> dict[str, Any]:
    tx, schedule = optim.create_optimizer(config, run.steps_per_epoch, run.total_steps)
    if config.freeze_backbone:
        tx = optim.freeze_backbone(tx)
    kernels, per_device = getattr(config, "front_end", "auto"), config.global_batch_size
    per_device //= jax.device_count()  # measured for this machine when "auto":
    front_end = tune_front_end(run.model, per_device, config.crop_frames, kernels)
    state = create_train_state(
        run.model, tx, config.seed, config.crop_frames, run.initial, front_end
    )
    is_main = jax.process_index() == 0
    store = checkpoint.CheckpointStore(workdir, config.keep_best)
    done = False
    try:
        at = store.latest_step()
        if at is not None and at >= run.end_step:
            summary = nothing_to_do(store, run, config, workdir, at)
            done = True
            return summary
        state, meta = resume(store, state, run, workdir)
        if is_main:
            with atomic_write(workdir / "config.json") as f:
                json.dump(
                    {**as_dict(config), "model": run.model.to_dict()}, f, indent=2, default=str
                )
        model = front_end.model(run.model)
        validator = Validator(source, model, config.eval_batch_size, config.eval_split)
        validator.best_step, validator.last = meta.get("best_step"), meta.get("last_eval")
        if validator.best_step is not None:
            validator.best_metric = meta["best_metric"]
        start = int(state.step)
        earlier = earlier_sessions(workdir, start, meta) if meta else []
        clock = SessionClock(start, config.global_batch_size, earlier)
        train_loop(config, run, state, schedule, source, validator, store, workdir, clock)
        with clock.timing("checkpoint"):
            store.wait()  # the last save is on disk before the summary says so
        done = True
    finally:
        close_store(store, failing=not done)
    summary = run_summary(
        run.end_step, run.total_steps, clock.sessions(run.end_step), config, workdir,
        last_eval=validator.last, best_step=validator.best_step, best=validator.best_metric,
    )  # fmt: skip
    if is_main:
        status = (
            "finished" if run.end_step == run.total_steps else "stopped early (rerun to resume)"
        )
        print(f"Training {status}:", json.dumps(summary, indent=2))
        evaluate.write_report(summary, workdir / SUMMARY)
    return summary


def nothing_to_do(
    store: checkpoint.CheckpointStore, run: Run, config: Any, workdir: Path, step: int
) -> dict[str, Any]:
    """The summary of a workdir already at `step` >= this call's end: train_summary.json when it
    is of that step, else one rebuilt from the checkpoint's meta (and then written)."""
    try:
        meta = store.latest_meta()
    except checkpoint.CheckpointError as err:
        raise ResumeError(f"cannot resume: {err}") from err
    check_resumable(workdir, meta, run)
    try:
        summary = json.loads((workdir / SUMMARY).read_text())
        stale = not isinstance(summary, dict) or summary.get("step") != step
    except (OSError, ValueError):
        stale = True
    if stale:  # killed after its last checkpoint, before the summary
        sessions = meta.get("sessions") if isinstance(meta.get("sessions"), list) else []
        summary = run_summary(
            step, run.total_steps, sessions, config, workdir, last_eval=meta.get("last_eval"),
            best_step=meta.get("best_step"), best=meta.get("best_metric"),
        )  # fmt: skip
    if jax.process_index() == 0:
        if stale:
            evaluate.write_report(summary, workdir / SUMMARY)
        if run.end_step == run.total_steps:
            print(
                f"Training already finished at step {step} in {workdir}: nothing to do (its "
                f"summary: {workdir / SUMMARY}; raise num_epochs to train longer)."
            )
        else:
            print(f"Nothing to train: {workdir} is at step {step}, this call stops at step "
                  f"{run.end_step}.")  # fmt: skip
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
    clock: SessionClock,
) -> None:
    """Steps from `state.step` to `run.end_step`; the host waits for the devices only at log,
    validation and checkpoint points. Times each part into `clock`."""
    start_step = int(state.step)
    # Inputs laid out on a mesh named like pmap's outputs: the second step reuses the first
    # step's compiled program instead of compiling again for a differently named layout.
    state = flax.jax_utils.replicate(state, axis_name=AXIS)
    p_train_step = make_p_train_step(schedule, config.freeze_backbone)
    batches = source.train_batches(config.global_batch_size, config.seed, start_step)
    batches = flax.jax_utils.prefetch_to_device(batches, PREFETCH, axis_name=AXIS)
    metrics = MetricLog(workdir, start_step)
    bar = tqdm(total=run.total_steps, initial=start_step, desc="train", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)  # fmt: skip
    try:  # the bar ends its line before an interruption or error is reported
        for step in range(start_step, run.end_step):
            state, step_metrics = p_train_step(state, next(batches))
            done, epoch_end = step + 1, (step + 1) % run.steps_per_epoch == 0
            if step == start_step:  # set-up, compile and first step, kept out of the throughput
                jax.block_until_ready(state)
                clock.seconds["first_step"] = time.perf_counter() - clock.start
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
                (done // run.steps_per_epoch) % config.eval_every_epochs == 0
                or done == run.total_steps
            )
            if epoch_end or done % config.checkpoint_every_steps == 0 or done == run.end_step:
                line = evaluate_and_save(
                    state, done, validate, run, config, validator, store, metrics, clock
                )
                if line:
                    bar.write(line)
    finally:
        bar.close()
    jax.block_until_ready(state)
    metrics.close()
