"""Parity of the Flax model (loaded from converted files) with the independent PyTorch reference.

Random weights and BatchNorm statistics, saved by torch in both formats under `module.` keys,
converted by `jaxtag.convert`, then compared in eval mode on 40 dB-scaled spectrograms: sigmoid
outputs and every attention map must agree to 1e-5.

Both front ends (`front_end="reference"`, plain convolutions, and "banded", the CPU kernels of
jaxtag/kernels.py) are compared. Measured on the 2-core CPU box: outputs <= 5.4e-7, attention
<= 2.9e-6 for either. Both frameworks are equally far from a float64 run of the reference (~2e-6
on the attention maps). The model asks for HIGHEST matmul precision (tests/test_precision.py),
which makes the same numbers reachable on a GPU, whose float32 default is TF32. The query/key
scale (conftest.QK_GAIN) sets how peaked the attention is, and the float32 noise grows with it
(~7e-6 at 2x the default init scale, ~1e-5 at 2.5x).
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from jaxtag.checkpoint import load_model
from jaxtag.model import MTSA, ModelConfig, attention_maps, cls_vector
from tests import torch_reference as ref
from tests.conftest import BATCH, CONFIGS, FORMATS

pytestmark = pytest.mark.torch  # the PyTorch reference (tests/conftest.py TORCH_MODULES)

TOLERANCE = 1e-5
SEQ = 257  # 256 frames + CLS


@functools.cache
def _apply(config: ModelConfig, front_end: str):  # one compiled forward per architecture
    model = MTSA(config, kernels=front_end)

    def forward(variables, mel):
        logits, state = model.apply(variables, mel, train=False, mutable=["intermediates"])
        return logits, attention_maps(state["intermediates"])

    return jax.jit(forward)


@functools.cache
def _reference_outputs(case, mel_bytes: bytes) -> tuple[np.ndarray, list[np.ndarray]]:
    mel = np.frombuffer(mel_bytes, np.float32).reshape(BATCH, 96, 256)
    return case.forward(mel)


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_state_dict_is_the_original_layout(name, reference_factory):
    """Keys (in order), shapes and dtypes of the saved reference equal the original's layout."""
    case = reference_factory(name)
    layout = json.loads(case.layout.read_text())
    saved = [
        {"key": key, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        for key, value in case.model.state_dict().items()
    ]
    assert saved == layout
    assert len(saved) == {"released": 121, "conv16": 118}[name]


def test_reference_fixed_inputs_follow_the_notes():
    """The CLS token and sinusoidal table of the reference are the documented values."""
    state = np.random.get_state()
    back_end = ref.BackEnd(ref.CONV16)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG untouched
    cls = back_end.cls.numpy()[0]
    np.testing.assert_allclose(cls[:4], [0.5488135, 0.71518937, 0.60276338, 0.54488318], rtol=1e-7)
    expected_sum = np.random.RandomState(0).random((1, 512)).sum()
    assert expected_sum == pytest.approx(253.5793588773368, abs=1e-12)
    assert cls.dtype == np.float32 and abs(cls.astype(np.float64).sum() - expected_sum) < 1e-4
    np.testing.assert_array_equal(cls, cls_vector(512))
    table = back_end.sinusoidal.numpy()
    assert table.shape == (257, 512) and not table[0].any()
    np.testing.assert_allclose(table[1, :2], [np.sin(1.0), np.cos(1.0)], rtol=1e-7)
    np.testing.assert_allclose(
        table[256, 510:],
        [np.sin(256 / 1e4 ** (510 / 512)), np.cos(256 / 1e4 ** (510 / 512))],
        rtol=1e-6,
    )


@pytest.mark.parametrize("front_end", ["reference", "banded"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", CONFIGS)
def test_converted_model_matches_reference(
    name, fmt, front_end, reference_factory, converted_factory, reference_mel
):
    case = reference_factory(name)
    want_probs, want_attention = _reference_outputs(case, reference_mel.tobytes())
    # The comparison means something only if outputs are spread and attention is peaked.
    assert want_probs.shape == (BATCH, 50) and 0.1 < want_probs.std()
    assert 0.02 < want_probs.min() and want_probs.max() < 0.98
    for probs in want_attention:
        assert probs.max(-1).mean() > 4 / SEQ  # rows peak well above the uniform 1/257

    loaded = load_model(converted_factory(name, fmt))
    logits, attention = _apply(loaded.config, front_end)(loaded.variables, reference_mel)
    got_probs = np.asarray(jax.nn.sigmoid(logits))

    assert len(attention) == len(want_attention) == 2
    errors = [float(np.abs(got_probs - want_probs).max())]
    for got, want in zip(attention, want_attention, strict=True):
        assert got.shape == want.shape == (BATCH, 8, SEQ, SEQ)
        errors.append(float(np.abs(np.asarray(got) - want).max()))
    print(
        f"{name}/{fmt}/{front_end} max abs diff: outputs, attention per layer:",
        [f"{e:.2e}" for e in errors],
    )
    assert max(errors) < TOLERANCE, errors


@pytest.mark.parametrize("name", CONFIGS)
def test_both_formats_convert_to_identical_variables(name, converted_factory):
    legacy, zipped = (load_model(converted_factory(name, fmt)).variables for fmt in FORMATS)
    flat_legacy = jax.tree_util.tree_leaves_with_path(legacy)
    flat_zip = jax.tree_util.tree_leaves_with_path(zipped)
    assert [p for p, _ in flat_legacy] == [p for p, _ in flat_zip]
    for (path, a), (_, b) in zip(flat_legacy, flat_zip, strict=True):
        assert a.dtype == b.dtype == np.float32, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))
