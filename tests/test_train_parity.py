"""One optimizer step of jaxtag's pmapped train step equals one step of the PyTorch reference."""

import dataclasses

import flax.jax_utils
import jax
import numpy as np
import optax
import pytest
import torch

from jaxtag import train
from jaxtag.checkpoint import load_model
from jaxtag.convert import convert_state_dict, unwrap
from tests import torch_reference as ref
from tests.conftest import log_mel_like
from tests.test_explain import FRAMES, small_case  # noqa: F401 (fixture)

pytestmark = pytest.mark.torch  # the PyTorch reference (tests/conftest.py TORCH_MODULES)

LR = 1e-3


def test_one_adam_step_matches_reference(small_case):  # noqa: F811
    reference, checkpoint = small_case
    loaded = load_model(checkpoint)
    # Same converted initial weights, dropout off in both (the reference's is set below).
    config = dataclasses.replace(
        loaded.config, attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.0
    )
    mel = log_mel_like(8, seed=11, frames=FRAMES)
    tags = (np.random.RandomState(5).uniform(size=(8, 50)) > 0.7).astype(np.float32)

    torch_model = ref.wrap(_copy_without_dropout(reference))  # stays on the CPU
    torch_model.train()
    optimizer = torch.optim.Adam(torch_model.parameters(), lr=LR)
    probs, _ = torch_model(torch.from_numpy(mel))
    torch_loss = torch.nn.BCELoss()(probs, torch.from_numpy(tags))
    torch_loss.backward()
    optimizer.step()
    state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    expected = convert_state_dict(unwrap(state_dict, "reference"), config)

    state = train.create_train_state(config, optax.adam(LR), 0, FRAMES, loaded.variables)
    state = flax.jax_utils.replicate(state, jax.devices()[:1])
    step = jax.pmap(
        lambda s, b: train.train_step(s, b, optax.constant_schedule(LR)),
        axis_name=train.AXIS,
        devices=jax.devices()[:1],
    )
    state, metrics = step(state, {"mel": mel[None], "tags": tags[None]})
    host = train.host_state(state)

    assert float(metrics["loss"][0]) == pytest.approx(torch_loss.item(), rel=1e-6, abs=1e-6)
    # BatchNorm running statistics after one training-mode step (PyTorch's unbiased variance).
    for got, want in zip(
        jax.tree_util.tree_leaves(host.batch_stats),
        jax.tree_util.tree_leaves(expected["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # Gradients first, then the Adam step. Adam's first step is lr * g / (|g| + eps): about
    # lr * sign(g), and ill-conditioned only where |g| is near float32 noise. So parameters
    # whose reference gradient is clearly non-zero must match tightly; the rest stay within lr.
    grads = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}
    grads_torch = convert_state_dict(unwrap(state_dict | grads, "grads"), config)["params"]
    grads_jax = _jax_grads(config, loaded.variables, mel, tags)
    initial = jax.tree_util.tree_leaves(loaded.variables["params"])
    # Float32 noise is relative to the largest gradients; some tensors (a conv bias followed by
    # BatchNorm) have an exactly-zero true gradient and only noise to compare.
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(grads_torch))
    moved = 0.0
    for g_jax, g_torch, got, want, start in zip(
        jax.tree_util.tree_leaves(grads_jax),
        jax.tree_util.tree_leaves(grads_torch),
        jax.tree_util.tree_leaves(host.params),
        jax.tree_util.tree_leaves(expected["params"]),
        initial,
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(g_jax), g_torch, atol=1e-5 * scale, rtol=1e-3)
        clear = np.abs(g_torch) > 1e-6
        np.testing.assert_allclose(np.asarray(got)[clear], want[clear], atol=1e-6, rtol=0)
        assert np.all(np.abs(np.asarray(got) - start) <= LR * 1.0001)
        moved = max(moved, float(np.max(np.abs(want - start))))
    assert moved > 0.9 * LR  # the step really changed the weights


def _jax_grads(config, variables, mel, tags):
    from jaxtag.model import MTSA

    def loss(params):
        logits, _ = MTSA(config).apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            mel,
            train=True,
            mutable=["batch_stats"],
        )
        return train.bce_loss(logits, tags)

    return jax.jit(jax.grad(loss))(variables["params"])  # one compile, not op by op


def _copy_without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return clone
