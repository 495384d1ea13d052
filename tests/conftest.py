"""Shared fixtures: PyTorch reference models with random weights, their saved files, conversions.

Everything expensive is built once per session and cached by name, so any test module (parity,
converter, train-step parity, attention explanations) can ask for the same reference model:

    def test_x(reference_factory, converted_factory, reference_mel):
        case = reference_factory("released")      # ReferenceCase: torch model, files, config
        probs, attentions = case.forward(reference_mel)  # numpy, eval mode, (40, 96, 256) input
        ckpt = converted_factory("released", "legacy")   # a converted jaxtag checkpoint dir
        model = case.copy_model()                 # train this one, never the shared case.model
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from jaxtag.convert import convert_file

try:
    import torch
    from torch import nn

    from tests import torch_reference as ref
except ModuleNotFoundError:  # the torch-free job (.ci/run): see pytest_collection_modifyitems
    torch = nn = ref = None

# Tests never write the user's compilation cache (jaxtag/runtime.py); one cache for the session
# lets the subprocess tests that compile the same small models load them instead.
os.environ.setdefault("JAXTAG_CACHE_DIR", tempfile.mkdtemp(prefix="jaxtag-test-jax-cache-"))
# Nor its autotune file: measuring is off (each rule's default runs), and the tests of what is
# measured (test_autotune, test_front_end_tuning, test_openvino, test_multiprocess) name a file.
os.environ.setdefault("JAXTAG_AUTOTUNE", "off")

# A shell without job control starts background jobs with SIGINT ignored (.ci/run's two jobs):
# the Ctrl-C tests stand for a terminal, so the session (and the commands it starts) gets
# Python's own handler back. tests/test_writer_failures.py tests the ignored case explicitly.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The released-weights server fixtures (released_pth, released_server, released_cache).
pytest_plugins = ["tests.released_fixtures"]

DATA_DIR = Path(__file__).parent / "data"
CONFIGS = {"released": ref.RELEASED, "conv16": ref.CONV16} if ref else {}
LAYOUTS = {
    "released": DATA_DIR / "ponswon_state_dict_layout.json",
    "conv16": DATA_DIR / "pons_won_conv16_state_dict_layout.json",
}
SEEDS = {"released": 1, "conv16": 2}
FORMATS = ("legacy", "zip")
BATCH = 40  # more than the original's 32-item limit
QK_GAIN = 1.5  # query/key weights over the default init scale: attention peaked, not uniform


# Test modules that import torch (the PyTorch reference) at the top; each marks itself
# `pytestmark = pytest.mark.torch`. Without torch they cannot be imported, so the torch-free
# job (`-m "not torch"`) does not collect them. Other tests that need torch are marked one by one.
TORCH_MODULES = (
    "test_convert.py",
    "test_explain.py",
    "test_parity.py",
    "test_run_eval.py",
    "test_torch_file.py",
    "test_train_parity.py",
)
REFERENCE_FIXTURES = {"reference_factory", "converted_factory"}
collect_ignore = [] if torch is not None else list(TORCH_MODULES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without torch only a run that deselects the torch tests (-m "not torch") may go on: any
    other run fails rather than passing without them. A torch test must say so: an unmarked
    test in a TORCH_MODULES file, or one asking for the reference models, is a usage error."""
    if torch is None and "not torch" not in (config.option.markexpr or ""):
        raise pytest.UsageError(
            'torch is not installed: run the torch-free tests with -m "not torch"'
        )
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("torch") is None
        and (
            Path(item.fspath).name in TORCH_MODULES
            or REFERENCE_FIXTURES & set(getattr(item, "fixturenames", ()))
        )
    ]
    if unmarked:
        raise pytest.UsageError(f"tests that need torch but are not marked torch: {unmarked}")
    # `make test` runs `pytest -n N --dist loadgroup`: a module stays on one worker, so its
    # module-scoped fixtures are built once, and the modules that use the trained model share
    # one worker, so it is trained once.
    trained = {i.fspath for i in items if "trained_synthetic" in getattr(i, "fixturenames", ())}
    for item in items:
        group = "trained_synthetic" if item.fspath in trained else Path(item.fspath).name
        item.add_marker(pytest.mark.xdist_group(group))


@dataclasses.dataclass(eq=False)  # hashable by identity: one case per name per session
class ReferenceCase:
    name: str
    config: ref.ReferenceConfig
    model: nn.DataParallel  # eval mode, random weights, `module.` keys
    files: dict[str, Path]  # format ("legacy" / "zip") -> saved state dict
    layout: Path  # the state_dict layout JSON of the original code for this config

    def forward(self, mel: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Sigmoid outputs and every layer's attention probabilities, in eval mode."""
        with torch.no_grad():
            probs, attentions = self.model(torch.tensor(np.asarray(mel, np.float32)))
        return probs.numpy(), [a.numpy() for a in attentions]

    def copy_model(self) -> nn.DataParallel:
        """An independent copy (same weights and statistics) for tests that train or mutate."""
        return copy.deepcopy(self.model)


def log_mel_like(batch: int, seed: int = 0, n_mels: int = 96, frames: int = 256) -> np.ndarray:
    """Random spectrograms in the range of log-mel dB values (-80 .. +40), with per-band colour."""
    rng = np.random.RandomState(seed)
    level = rng.uniform(-50, 0, (batch, 1, 1))
    spectrum = np.cumsum(rng.normal(0, 3, (batch, n_mels, 1)), axis=1)  # per-band colour
    frames_noise = rng.normal(0, 12, (batch, n_mels, frames))
    return np.clip(level + spectrum + frames_noise, -80, 40).astype(np.float32)


def _scaled_normal(gen: torch.Generator, shape: torch.Size, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def randomize_(model: nn.Module, seed: int) -> None:
    """Random weights and non-trivial BatchNorm running statistics, at sensible scales.

    Affine BN/LN parameters and running means/variances all move away from their 1/0 defaults so
    a converter that drops or swaps any of them fails the parity tests. Query/key weights are
    larger than the default init so the attention maps are peaked, not near-uniform. The input
    BatchNorm gets statistics of dB values, so the front end sees unit-scale inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + _scaled_normal(gen, (n,), 0.3))
                module.bias.copy_(_scaled_normal(gen, (n,), 0.2))
                module.running_mean.copy_(_scaled_normal(gen, (n,), 0.3))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                module.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (1,), generator=gen)))
            elif isinstance(module, nn.LayerNorm):
                n = module.normalized_shape[0]
                module.weight.copy_(1 + _scaled_normal(gen, (n,), 0.2))
                module.bias.copy_(_scaled_normal(gen, (n,), 0.1))
            elif isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
                fan_in = math.prod(module.weight.shape[1:])
                gain = QK_GAIN if name.endswith(("query", "key")) else 1.0
                module.weight.copy_(_scaled_normal(gen, module.weight.shape, gain / fan_in**0.5))
                module.bias.copy_(_scaled_normal(gen, module.bias.shape, 0.1))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(_scaled_normal(gen, module.weight.shape, 0.5))
        input_bn = getattr(model, "module", model).front_end.input_bn
        input_bn.running_mean.fill_(-25.0 + 5 * float(torch.randn(1, generator=gen)))
        input_bn.running_var.fill_((18.0 + 4 * float(torch.rand(1, generator=gen))) ** 2)


def build_reference(name: str, directory: Path) -> ReferenceCase:
    """A wrapped reference model of config `name`, randomised and saved in both formats."""
    torch.manual_seed(SEEDS[name])
    model = ref.wrap(ref.MTSA(CONFIGS[name]))
    randomize_(model, SEEDS[name])
    model.eval()
    files = {}
    for fmt in FORMATS:
        files[fmt] = directory / f"{name}_{fmt}.pth"
        torch.save(model.state_dict(), files[fmt], _use_new_zipfile_serialization=fmt == "zip")
    return ReferenceCase(name, CONFIGS[name], model, files, LAYOUTS[name])


@pytest.fixture(scope="session")
def reference_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ReferenceCase]:
    """name ("released" / "conv16") -> its ReferenceCase, built once per session."""
    directory = tmp_path_factory.mktemp("reference")
    return functools.cache(lambda name: build_reference(name, directory))


@pytest.fixture(scope="session")
def converted_factory(
    reference_factory: Callable[[str], ReferenceCase], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], Path]:
    """(name, format) -> a jaxtag checkpoint converted from that reference file, once each."""
    directory = tmp_path_factory.mktemp("converted")

    @functools.cache
    def convert(name: str, fmt: str) -> Path:
        path, _ = convert_file(reference_factory(name).files[fmt], directory / f"{name}_{fmt}")
        return path

    return convert


@pytest.fixture(scope="session")
def reference_mel() -> np.ndarray:
    """The shared parity input: (BATCH, 96, 256) float32 in the dB range."""
    return log_mel_like(BATCH)


# ----------------------------------------------------------------------------------------------
# Synthetic data and a model trained on it (training-loop and interpretability tests)

SYNTHETIC_CLIPS, SYNTHETIC_SECONDS = 120, 10.0


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 120-clip synthetic set (10 s clips, 96/12/12 split), built once; returns the built
    version directory, which `input_pipeline.get_builder` takes as a dataset name."""
    from data_prep import synthetic_tags

    data_dir = tmp_path_factory.mktemp("synthetic_tfds")
    config = synthetic_tags.SyntheticTagsConfig(
        name="tests", num_clips=SYNTHETIC_CLIPS, seconds=SYNTHETIC_SECONDS, seed=0
    )
    builder = synthetic_tags.SyntheticTags(data_dir=str(data_dir), config=config, num_workers=2)
    builder.download_and_prepare()
    return str(builder.data_dir)


def small_train_config(dataset_dir: str):
    """The demo recipe on the test set, slim enough for a CPU test."""
    from configs.demo import get_config

    config = get_config()
    config.dataset = dataset_dir
    config.global_batch_size = 16
    config.eval_batch_size = 12
    config.log_every_steps = 10
    return config


@pytest.fixture(scope="session")
def trained_synthetic(synthetic_data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-sized model trained on `synthetic_data` for a couple of minutes; its workdir."""
    from jaxtag import train

    config = small_train_config(synthetic_data)
    config.num_epochs = 40
    config.eval_every_epochs = 10
    workdir = tmp_path_factory.mktemp("trained_synthetic")
    train.train_and_evaluate(config, workdir)
    return workdir
