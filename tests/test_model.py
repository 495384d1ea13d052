"""The model's public halves and hooks: `features` / `head`, `representations`, and the attention
maps sown into `intermediates` (`attention_maps`), on a tiny random model."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxtag.model import MTSA, ModelConfig, attention_maps, init_variables
from tests.conftest import log_mel_like

TINY = ModelConfig(conv_channels=2, width=32, num_layers=2, num_heads=4, ffn_size=64)
FRAMES = 24


@pytest.fixture(scope="module")
def tiny():
    variables = init_variables(TINY, jax.random.PRNGKey(0), FRAMES)
    return MTSA(TINY), variables, log_mel_like(3, seed=1, frames=FRAMES)


def test_head_of_features_is_the_model(tiny):
    model, variables, mel = tiny
    features = model.apply(variables, mel, method=MTSA.features)
    assert features.shape == (3, TINY.width)
    np.testing.assert_allclose(
        model.apply(variables, features, method=MTSA.head), model.apply(variables, mel), atol=1e-6
    )


def test_representations_run_the_front_end_once(tiny):
    model, variables, mel = tiny
    calls = []

    def count_front_end(next_fun, args, kwargs, context):
        if context.module.name == "front_end" and context.method_name == "__call__":
            calls.append(1)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(count_front_end):
        out = model.apply(variables, mel, method=MTSA.representations)
    assert len(calls) == 1
    assert sorted(out) == ["front_end", "layer_0", "layer_1", "pooled"]
    assert all(v.shape == (3, TINY.width) for v in out.values())
    np.testing.assert_allclose(
        out["pooled"], model.apply(variables, mel, method=MTSA.features), atol=1e-6
    )


def test_attention_maps_are_sown_and_change_nothing(tiny):
    model, variables, mel = tiny
    logits, state = model.apply(variables, mel, mutable=["intermediates"])
    maps = attention_maps(state["intermediates"])
    seq = FRAMES + 1
    assert [m.shape for m in maps] == [(3, TINY.num_heads, seq, seq)] * TINY.num_layers
    for m in maps:
        np.testing.assert_allclose(np.asarray(m).sum(-1), 1.0, atol=1e-5)  # softmax rows
    # Without collecting, the last layer computes only the CLS query: the same logits.
    np.testing.assert_allclose(logits, model.apply(variables, mel), atol=1e-6)
    assert "intermediates" not in model.apply(variables, mel, mutable=["batch_stats"])[1]


def test_attention_override_is_what_the_layer_uses(tiny):
    model, variables, mel = tiny
    seq = FRAMES + 1
    one_hot = jax.nn.one_hot(5, seq)[None, None, None, :]
    logits, state = model.apply(
        variables, mel, attention_override=(1, one_hot), mutable=["intermediates"]
    )
    first, last = attention_maps(state["intermediates"])
    np.testing.assert_array_equal(last, np.broadcast_to(one_hot, last.shape))
    assert not np.allclose(first, np.broadcast_to(one_hot, first.shape))
    assert not np.allclose(logits, model.apply(variables, mel), atol=1e-4)
    # The same through the explain entry points: hidden states before layer 1, then the rest.
    hidden = model.apply(variables, mel, 1, method=MTSA.hidden_before)
    again = model.apply(variables, hidden, 1, one_hot, method=MTSA.logits_with_attention)
    np.testing.assert_allclose(again, logits, atol=1e-5)


def test_front_end_choice_keeps_the_outputs(tiny):
    """Both front ends named explicitly: the same outputs on any backend (on a CPU the default
    build is banded, on an accelerator reference, so neither side may come from the default)."""
    _, variables, mel = tiny
    reference = MTSA(TINY, kernels="reference").apply(variables, mel)
    banded = MTSA(TINY, kernels="banded").apply(variables, mel)
    assert np.std(np.asarray(reference)) > 1e-3  # something to compare
    np.testing.assert_allclose(banded, reference, atol=2e-6)


def test_init_variables_equal_a_plain_jitted_init():
    """init_variables compiles with a lighter CPU optimisation level: the same values."""
    variables = init_variables(TINY, jax.random.PRNGKey(4), FRAMES)
    mel = np.zeros((1, TINY.n_mels, FRAMES), np.float32)
    plain = jax.jit(lambda r: MTSA(TINY).init(r, mel, train=False))(jax.random.PRNGKey(4))
    flat = jax.tree_util.tree_leaves_with_path(variables)
    assert [p for p, _ in flat] == [p for p, _ in jax.tree_util.tree_leaves_with_path(plain)]
    for (path, a), b in zip(flat, jax.tree_util.tree_leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
