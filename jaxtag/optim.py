"""Optimizers: the original recipe (Adam, then SGD-Nesterov with step drops) and AdamW + cosine.

The original switches *optimizer* at an epoch boundary, which optax has no ready-made piece for,
so `switch_at` keeps both states and picks one per step (the unused one is left untouched).
`config` is a training config (configs/common.py) or any object with its fields.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SwitchState(NamedTuple):
    count: jax.Array
    first: optax.OptState
    second: optax.OptState


def switch_at(
    first: optax.GradientTransformation, second: optax.GradientTransformation, boundary: int
) -> optax.GradientTransformation:
    """Uses `first` for steps [0, boundary) and `second` from then on."""

    def init(params: optax.Params) -> SwitchState:
        return SwitchState(jnp.zeros([], jnp.int32), first.init(params), second.init(params))

    def update(
        updates: optax.Updates, state: SwitchState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, SwitchState]:
        def run_first(_: None) -> tuple[optax.Updates, SwitchState]:
            new_updates, new_first = first.update(updates, state.first, params)
            return new_updates, SwitchState(state.count + 1, new_first, state.second)

        def run_second(_: None) -> tuple[optax.Updates, SwitchState]:
            new_updates, new_second = second.update(updates, state.second, params)
            return new_updates, SwitchState(state.count + 1, state.first, new_second)

        return jax.lax.cond(state.count < boundary, run_first, run_second, None)

    return optax.GradientTransformation(init, update)


def original_schedule(config: Any, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per step of the original recipe (for logging and for the SGD phase)."""
    switch = config.switch_epoch * steps_per_epoch
    rates = list(config.sgd_learning_rates)
    # join_schedules hands each later schedule the step minus its boundary: these are relative.
    per_rate = config.sgd_epochs_per_rate * steps_per_epoch
    boundaries = [(i + 1) * per_rate for i in range(len(rates) - 1)]
    sgd = optax.join_schedules([optax.constant_schedule(r) for r in rates], boundaries)
    return optax.join_schedules([optax.constant_schedule(config.learning_rate), sgd], [switch])


def create_optimizer(
    config: Any, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, learning-rate schedule) for `config.optimizer`.

    - `original`: Adam(lr) until `switch_epoch`, then SGD Nesterov (momentum, coupled weight decay
      as torch.optim.SGD applies it) at `sgd_learning_rates`, each for `sgd_epochs_per_rate`.
    - `adamw_cosine`: AdamW with linear warm-up and cosine decay over the whole run.
    """
    if config.optimizer == "original":
        schedule = original_schedule(config, steps_per_epoch)
        switch = config.switch_epoch * steps_per_epoch
        adam = optax.adam(config.learning_rate)
        # SGD sees the global step through the schedule, offset by nothing: its schedule already
        # starts at `switch`, and optax's count in the second state starts at 0, so shift it.
        sgd = optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(
                lambda count: schedule(count + switch), momentum=config.momentum, nesterov=True
            ),
        )
        return switch_at(adam, sgd, switch), schedule
    if config.optimizer == "adamw_cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, max(warmup, 1), max(total_steps, warmup + 1)
        )
        return optax.adamw(schedule, weight_decay=config.weight_decay), schedule
    raise ValueError(f"unknown optimizer {config.optimizer!r}: use 'original' or 'adamw_cosine'")


TRAINABLE_WITH_FROZEN_BACKBONE = ("classifier",)  # top-level parameter modules of MTSA's head


def freeze_backbone(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the classifier only; every other parameter gets a zero update (and no state), so
    weight decay cannot move a frozen backbone either."""

    def labels(params: optax.Params) -> optax.Params:
        return {
            name: jax.tree_util.tree_map(
                lambda _, n=name: "train" if n in TRAINABLE_WITH_FROZEN_BACKBONE else "frozen",
                subtree,
            )
            for name, subtree in params.items()
        }

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
