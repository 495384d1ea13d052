"""The training front end's autotune (jaxtag/model/tuning.py): measured once per machine and
shape, the measured winner is what training runs, the stored one is reused without building
anything, and a new jaxtag version measures again. (That every candidate computes the same
function is tests/test_front_end.py's job.)"""

import json
import math
import time

import pytest

from jaxtag import autotune, train, version
from jaxtag.model import ModelConfig, tuning
from jaxtag.model.tuning import FrontEndKernels, tune_front_end
from tests.arrays_run import FRAMES, tiny_config, tiny_source

SMALL = ModelConfig(conv_channels=1, width=16, num_layers=1, num_heads=2, ffn_size=32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, str(path))
    return path


def fake_steps(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Candidates that take `seconds[name]` per call instead of running; returns the log of
    the candidates built."""
    built = []

    def step(config, choice, batch, frames):
        built.append(choice.name)
        return lambda: time.sleep(seconds[choice.name])

    monkeypatch.setattr(tuning, "front_end_step", step)
    return built


def test_the_fastest_candidate_wins_and_is_reused_until_a_new_version(cache, monkeypatch):
    built = fake_steps(monkeypatch, {"reference": 0.03, "banded-12": 0.06, "banded-64": 0.001})
    assert tune_front_end(SMALL, 4, FRAMES) == FrontEndKernels("banded", 64)
    assert sorted(built) == sorted(c.name for c in tuning.candidates())
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["winner"] == "banded-64" and set(entry["seconds"]) == set(built)

    built.clear()
    assert tune_front_end(SMALL, 4, FRAMES) == FrontEndKernels("banded", 64)
    assert built == []  # stored: nothing built, nothing timed

    assert tune_front_end(SMALL, 8, FRAMES) == FrontEndKernels("banded", 64)
    assert len(built) == 3  # another batch size is another measurement

    built.clear()
    monkeypatch.setattr(version, "__version__", version.__version__ + ".post1")
    fake_steps(monkeypatch, {"reference": 0.001, "banded-12": 0.06, "banded-64": 0.03})
    assert tune_front_end(SMALL, 4, FRAMES) == FrontEndKernels("reference")


def test_given_names_other_backends_and_measuring_off_keep_the_rule(cache, monkeypatch):
    def refuse(*args):
        raise AssertionError("nothing may be measured here")

    monkeypatch.setattr(tuning, "front_end_step", refuse)
    assert tune_front_end(SMALL, 4, FRAMES, "reference") == FrontEndKernels("reference")
    assert tune_front_end(SMALL, 4, FRAMES, "banded") == FrontEndKernels("banded")
    assert tune_front_end(SMALL, 4, FRAMES, backend="gpu") == FrontEndKernels("reference")
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "off")
    assert tune_front_end(SMALL, 4, FRAMES) == FrontEndKernels("banded", 12)
    assert not cache.exists()


def test_a_real_measurement_times_every_candidate(cache):
    choice = tune_front_end(SMALL, 2, 32)
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["failed"] == {}
    assert set(entry["seconds"]) == {c.name for c in tuning.candidates()}
    assert all(0 < s < math.inf for s in entry["seconds"].values())
    assert choice.name == min(entry["seconds"], key=entry["seconds"].get)


@pytest.mark.slow
def test_training_runs_the_measured_front_end(cache, monkeypatch, tmp_path):
    fake_steps(monkeypatch, {"reference": 0.001, "banded-12": 0.03, "banded-64": 0.03})
    used = []
    model = FrontEndKernels.model
    monkeypatch.setattr(
        FrontEndKernels, "model", lambda self, *a: used.append(self.name) or model(self, *a)
    )
    config = tiny_config(epochs=1)
    config.steps_per_epoch = 2
    summary = train.train_and_evaluate(config, tmp_path / "run", source=tiny_source())
    assert summary["step"] == 2
    assert used and set(used) == {"reference"}  # the train step's model and the validator's
