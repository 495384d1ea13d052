"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2 (see test_train.py).

Trains 3 steps of a small model on one global batch split over 2 devices and over 1 device and
prints the largest parameter / BatchNorm-statistic difference as JSON. The first argument picks
`ModelConfig.front_end` (default "auto"), so the GPU/TPU path ("reference") is held to it too.
"""

import json
import sys

import flax.jax_utils
import jax
import numpy as np
import optax

from jaxtag import train
from jaxtag.model import ModelConfig

assert jax.local_device_count() == 2, jax.devices()
config = ModelConfig(
    conv_channels=2,
    width=32,
    num_layers=1,
    num_heads=2,
    ffn_size=64,
    positions_length=65,
    num_tags=5,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    classifier_dropout=0.0,
)
front_end = sys.argv[1] if len(sys.argv) > 1 else "auto"
rng = np.random.RandomState(0)
mel = rng.uniform(-80, 40, (8, 96, 64)).astype(np.float32)
tags = (rng.uniform(size=(8, 5)) > 0.5).astype(np.float32)
# Plain SGD: Adam would amplify float-rounding noise in near-zero gradients into +-lr steps.
tx = optax.sgd(0.05)


def run(devices: list) -> dict:
    n = len(devices)
    state = flax.jax_utils.replicate(
        train.create_train_state(config, tx, 0, 64, front_end=front_end), devices
    )
    step = jax.pmap(
        lambda s, b: train.train_step(s, b, optax.constant_schedule(1e-3)),
        axis_name=train.AXIS,
        devices=devices,
    )
    batch = {"mel": mel.reshape(n, -1, 96, 64), "tags": tags.reshape(n, -1, 5)}
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"][0]))
    host = train.host_state(state)
    return {"params": host.params, "batch_stats": host.batch_stats, "losses": losses}


one, two = run(jax.devices()[:1]), run(jax.devices()[:2])
diff = jax.tree_util.tree_map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
    {"params": one["params"], "batch_stats": one["batch_stats"]},
    {"params": two["params"], "batch_stats": two["batch_stats"]},
)
stats_moved = float(np.max(np.abs(np.asarray(one["batch_stats"]["front_end"]["input_bn"]["mean"]))))
print(
    json.dumps(
        {
            "max_param_diff": max(jax.tree_util.tree_leaves(diff["params"])),
            "max_batch_stats_diff": max(jax.tree_util.tree_leaves(diff["batch_stats"])),
            "loss_diff": max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)),
            "input_bn_mean": stats_moved,
        }
    )
)
