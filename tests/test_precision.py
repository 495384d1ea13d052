"""float32 means float32 on every backend: every matrix product and convolution of the model
asks XLA for HIGHEST precision (on NVIDIA GPUs the default is TF32, on TPUs bf16 passes).

A CPU computes float32 whatever the request, so these tests read the request itself: the
lowered StableHLO of the forward pass and of a train-step gradient (BCE loss, training-mode
BatchNorm with mutable batch_stats, dropout), for both front ends. `precision="default"` must
lower without it, so that the check can fail.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxtag.model import MTSA, ModelConfig

SMALL = ModelConfig(conv_channels=2, width=32, num_layers=2, num_heads=4, ffn_size=64)
MEL = jax.ShapeDtypeStruct((2, 96, 32), jnp.float32)
PRODUCT = re.compile(r"stablehlo\.(dot_general|convolution)\b")


def _lowered_texts(config: ModelConfig, front_end: str = "reference") -> dict[str, str]:
    """StableHLO text of the eval forward pass and of a train-step value_and_grad."""
    model = MTSA(config, kernels=front_end)
    variables = jax.eval_shape(
        lambda rng: model.init(rng, jnp.zeros((1, 96, 32)), train=False), jax.random.PRNGKey(0)
    )
    tags = jax.ShapeDtypeStruct((2, config.num_tags), jnp.float32)

    def loss(params, batch_stats, mel, labels, rng):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            mel,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), updates

    forward = jax.jit(lambda v, mel: jax.nn.sigmoid(model.apply(v, mel)))
    train = jax.jit(jax.value_and_grad(loss, has_aux=True))
    key = jax.random.PRNGKey(0)
    return {
        "forward": forward.lower(variables, MEL).as_text(),
        "train": train.lower(
            variables["params"], variables["batch_stats"], MEL, tags, key
        ).as_text(),
    }


def _products(text: str) -> list[str]:
    return [line for line in text.splitlines() if PRODUCT.search(line)]


@pytest.mark.parametrize("front_end", ["reference", "banded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_product_asks_for_highest_precision(front_end, dtype):
    config = dataclasses.replace(SMALL, dtype=dtype)
    for name, text in _lowered_texts(config, front_end).items():
        products = _products(text)
        # forward: the front end's convolutions, conv1x1, q/k/v, scores, context, dense layers.
        assert len(products) >= 15, (name, len(products))
        missing = [p for p in products if p.count("HIGHEST") < 2]  # both operands
        assert not missing, f"{front_end}/{name}: {len(missing)} products without HIGHEST"


@pytest.mark.parametrize("precision", ["default", "high"])
def test_faster_precisions_are_opt_in(precision):
    config = dataclasses.replace(SMALL, precision=precision)
    for text in _lowered_texts(config).values():
        products = _products(text)
        assert products and not any("HIGHEST" in p for p in products)
        if precision == "high":
            assert all("HIGH" in p for p in products)
