"""Training: a pmapped train step, validation every epoch, orbax checkpoints that resume.

Layout follows the Flax ImageNet example: `create_train_state`, `train_step` and
`train_and_evaluate(config, workdir)`. Data parallelism is `jax.pmap` over all local devices
with axis name `batch`: gradients are averaged with `lax.pmean`, BatchNorm statistics are
computed over the global batch inside the model (its `axis_name`), and every device gets its
own dropout key folded from (state.rng, step, device index). Because the data order and the
dropout keys are pure functions of (seed, step), a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import flax.jax_utils
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from tqdm import tqdm

from jaxtag import checkpoint, evaluate, input_pipeline, optim
from jaxtag.model import MTSA, ModelConfig, init_variables

AXIS = "batch"


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array  # base key: dropout keys are folded from it, never split, so resume is exact


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict())


def create_train_state(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    seed: int,
    frames: int,
    variables: dict[str, Any] | None = None,
) -> TrainState:
    """A fresh state: random init, or the given `variables` (e.g. converted ponswon.pth)."""
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    if variables is None:
        variables = init_variables(model_config, init_rng, frames)
    model = MTSA(model_config, axis_name=AXIS)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
        rng=dropout_rng,
    )


def initial_variables(path: str, model_config: ModelConfig, tags: list[str]) -> dict[str, Any]:
    """Weights to fine-tune from; the architecture must match, dropouts may differ."""
    loaded = checkpoint.load_model(os.path.expanduser(path))
    ignore = ("attention_dropout", "hidden_dropout", "classifier_dropout", "dtype")
    mine = {k: v for k, v in model_config.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in loaded.config.to_dict().items() if k not in ignore}
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        raise ValueError(f"init_checkpoint {loaded.path} has another architecture: {diff}")
    if loaded.tags != tags:
        raise ValueError(f"init_checkpoint {loaded.path} predicts other tags than the dataset")
    return loaded.variables


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The original's BCE on sigmoid outputs, computed stably from logits; mean over all."""
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def train_step(
    state: TrainState, batch: dict[str, jax.Array], schedule: optax.Schedule
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's share of the global batch (run under pmap)."""
    dropout_rng = jax.random.fold_in(
        jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS)
    )

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["mel"],
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )
        return bce_loss(logits, batch["tags"]), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return new_state, {"loss": loss, "learning_rate": schedule(state.step)}


def make_p_train_step(schedule: optax.Schedule) -> Any:
    # Donating the state lets XLA update parameters and optimizer state in place.
    return jax.pmap(
        functools.partial(train_step, schedule=schedule), axis_name=AXIS, donate_argnums=(0,)
    )


def host_state(state: TrainState) -> TrainState:
    """The replicated state of device 0, fetched to host memory."""
    return jax.device_get(flax.jax_utils.unreplicate(state))


def save_args(state: TrainState, meta: dict[str, Any]) -> ocp.args.Composite:
    """A training checkpoint: the model items of `checkpoint` plus the train state item."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train_item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    return ocp.args.Composite(
        **checkpoint.model_save_args(variables, meta),
        **{checkpoint.TRAIN_STATE: ocp.args.StandardSave(train_item)},
    )


def restore(
    manager: ocp.CheckpointManager, step: int, template: TrainState
) -> tuple[TrainState, dict]:
    """Restores step `step` into the structure of `template` (a fresh host-side state)."""
    variables = {"params": template.params, "batch_stats": template.batch_stats}
    train_item = {"step": template.step, "opt_state": template.opt_state, "rng": template.rng}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                checkpoint.VARIABLES: ocp.args.StandardRestore(variables),
                checkpoint.TRAIN_STATE: ocp.args.StandardRestore(train_item),
                checkpoint.META: ocp.args.JsonRestore(),
            }
        ),
    )
    v, t = restored[checkpoint.VARIABLES], restored[checkpoint.TRAIN_STATE]
    state = template.replace(
        step=t["step"],
        params=v["params"],
        batch_stats=v["batch_stats"],
        opt_state=t["opt_state"],
        rng=t["rng"],
    )
    return state, dict(restored[checkpoint.META])


class Logger:
    """Writes scalars to TensorBoard and to `metrics.jsonl`; silent on processes other than 0."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from flax.metrics import tensorboard

        self.writer = tensorboard.SummaryWriter(str(workdir / "tensorboard"))
        self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())

    def write(self, step: int, scalars: dict[str, Any], **fields: Any) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            if isinstance(value, int | float) and np.isfinite(value):
                self.writer.scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **fields, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.jsonl.close()


def _managers(workdir: Path, config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    item_names = (checkpoint.VARIABLES, checkpoint.META, checkpoint.TRAIN_STATE)
    root = workdir / checkpoint.CHECKPOINTS_SUBDIR
    latest = ocp.CheckpointManager(
        root / "latest",
        item_names=item_names,
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    best = ocp.CheckpointManager(
        root / "best",
        item_names=item_names,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_best,
            best_fn=lambda metrics: metrics[checkpoint.BEST_METRIC],
            best_mode="max",
            create=True,
        ),
    )
    return latest, best


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, stop_after_step: int | None = None
) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the run summary.

    `stop_after_step` ends this call early, as a time-boxed or preempted job would, after
    writing a checkpoint; the schedule still spans the whole run, and a later call resumes.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    n_local = jax.local_device_count()
    if config.global_batch_size % jax.device_count():
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the "
            f"{jax.device_count()} devices"
        )

    builder = input_pipeline.get_builder(config.dataset, os.path.expanduser(config.data_dir))
    tags = input_pipeline.tag_names(builder)
    if config.model.num_tags <= 0:  # -1: as many outputs as the dataset has tags
        config.model.num_tags = len(tags)
    model_config = model_config_from(config)
    if len(tags) != model_config.num_tags:
        raise ValueError(
            f"dataset {config.dataset} has {len(tags)} tags but config.model.num_tags is "
            f"{model_config.num_tags}"
        )
    n_train = input_pipeline.num_examples(builder, config.train_split)
    steps_per_epoch = config.steps_per_epoch
    if steps_per_epoch <= 0:
        steps_per_epoch = max(n_train // config.global_batch_size, 1)
    total_steps = config.num_epochs * steps_per_epoch
    tx, schedule = optim.create_optimizer(config, steps_per_epoch, total_steps)

    initial = None
    if config.init_checkpoint:
        initial = initial_variables(config.init_checkpoint, model_config, tags)
    template = create_train_state(model_config, tx, config.seed, config.crop_frames, initial)
    latest, best = _managers(workdir, config)
    best_metric, best_step = -float("inf"), None
    start_step = 0
    if latest.latest_step() is not None:
        template, meta = restore(latest, latest.latest_step(), template)
        start_step = int(template.step)
        best_step = meta.get("best_step")
        if best_step is not None:
            best_metric = meta["best_metric"]
        if is_main:
            print(
                f"Resuming from {workdir} at step {start_step} "
                f"(epoch {start_step // steps_per_epoch})."
            )
    if is_main:
        with open(workdir / "config.json", "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    state = flax.jax_utils.replicate(template)
    p_train_step = make_p_train_step(schedule)
    eval_model = MTSA(model_config)
    eval_predict = evaluate.make_predict_fn(eval_model)  # built once: compiled once per run
    train_batches = input_pipeline.train_iterator(
        builder,
        config.train_split,
        global_batch_size=config.global_batch_size,
        seed=config.seed,
        num_local_devices=n_local,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        crop_frames=config.crop_frames,
        shuffle_buffer=config.shuffle_buffer,
    )
    # The stream is a pure function of the seed, so skipping the steps already taken puts a
    # resumed run on exactly the batches the uninterrupted run would see.
    train_batches = itertools.islice(train_batches, start_step, None)
    logger = Logger(workdir)

    def meta_for(step: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
        return checkpoint.make_meta(
            model_config,
            tags,
            step=step,
            epoch=step // steps_per_epoch,
            metrics=metrics or {},
            best_metric=best_metric if best_step is not None else None,
            best_step=best_step,
            dataset=config.dataset,
        )

    last_metrics: dict[str, Any] = {}
    t_start = time.time()
    window_start, window_steps = time.time(), 0
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not is_main,
        dynamic_ncols=True,
    )
    end_step = total_steps if stop_after_step is None else min(stop_after_step, total_steps)
    for step in range(start_step, end_step):
        batch = next(train_batches)
        state, metrics = p_train_step(state, batch)
        window_steps += 1
        done = step + 1
        bar.update(1)
        if done % config.log_every_steps == 0 or done == total_steps:
            scalars = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
            elapsed = time.time() - window_start
            scalars["examples_per_second"] = (
                window_steps * config.global_batch_size / max(elapsed, 1e-9)
            )
            window_start, window_steps = time.time(), 0
            bar.set_postfix(
                loss=f"{scalars['loss']:.4f}", ex_s=f"{scalars['examples_per_second']:.1f}"
            )
            logger.write(
                done, {f"train/{k}": v for k, v in scalars.items()}, epoch=done / steps_per_epoch
            )

        epoch_end = done % steps_per_epoch == 0
        epoch = done // steps_per_epoch
        metrics_summary = None
        if epoch_end and (epoch % config.eval_every_epochs == 0 or done == total_steps):
            variables = jax.device_get(
                {
                    "params": flax.jax_utils.unreplicate(state.params),
                    "batch_stats": flax.jax_utils.unreplicate(state.batch_stats),
                }
            )
            last_metrics = evaluate.evaluate_split(
                eval_model,
                variables,
                builder,
                config.eval_split,
                tags,
                config.eval_batch_size,
                progress=False,
                predict_fn=eval_predict,
            )
            metrics_summary = evaluate.summary(last_metrics)
            if metrics_summary[checkpoint.BEST_METRIC] > best_metric:
                best_metric, best_step = metrics_summary[checkpoint.BEST_METRIC], done
            logger.write(
                done,
                {
                    f"{config.eval_split}/roc_auc": metrics_summary["roc_auc"],
                    f"{config.eval_split}/pr_auc": metrics_summary["pr_auc"],
                },
                epoch=epoch,
            )
            if is_main:
                bar.write(
                    f"epoch {epoch}: {config.eval_split} ROC-AUC {metrics_summary['roc_auc']:.4f} "
                    f"PR-AUC {metrics_summary['pr_auc']:.4f} "
                    f"(best {best_metric:.4f} at step {best_step})"
                )
            host = host_state(state)
            best.save(
                done,
                args=save_args(host, meta_for(done, metrics_summary)),
                metrics={checkpoint.BEST_METRIC: metrics_summary[checkpoint.BEST_METRIC]},
            )
        if (
            done % config.checkpoint_every_steps == 0
            or done in (total_steps, end_step)
            or epoch_end
        ):
            latest.save(done, args=save_args(host_state(state), meta_for(done, metrics_summary)))
    bar.close()
    latest.wait_until_finished()
    best.wait_until_finished()
    logger.close()

    result = {
        "step": end_step,
        "total_steps": total_steps,
        "epochs": config.num_epochs,
        "wall_seconds": round(time.time() - t_start, 1),
        "best_step": best_step,
        f"best_{config.eval_split}_{checkpoint.BEST_METRIC}": best_metric,
        "last_eval": evaluate.summary(last_metrics) if last_metrics else None,
        "workdir": str(workdir),
    }
    if is_main:
        status = "finished" if end_step == total_steps else "stopped early (rerun to resume)"
        print(f"Training {status}:", json.dumps(result, indent=2))
        evaluate.write_report(result, os.path.join(workdir, "train_summary.json"))
    return result
