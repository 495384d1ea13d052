"""The front end's kernels measured on this machine: which implementation trains fastest.

The readable convolutions and the banded kernels (at several block sizes) compute the same
function with the same parameters (tests/test_front_end.py); which is fastest depends on the CPU
(vector width, cache sizes, core count), the batch and the crop length. `tune_front_end` times
one training-mode forward and backward pass of the front end alone (the rest of the network is
the same code whichever runs) for each candidate, through `jaxtag.autotune.fastest`: measured
once per machine, jaxtag version, model shape, batch and crop, and kept in the autotune cache
(`$JAXTAG_AUTOTUNE`; `off` keeps `choose_front_end`'s rule, banded with `kernels.BLOCK_ROWS`).
Only the CPU backend is measured: on GPUs and TPUs the plain convolutions (cuDNN, the TPU's
own) are the rule.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtag import autotune
from jaxtag.model.config import ModelConfig
from jaxtag.model.front_end import BandedFrontEnd, FrontEnd
from jaxtag.model.kernels import BLOCK_ROWS
from jaxtag.model.network import MTSA, choose_front_end

# The banded kernels' block sizes tried: 12 rows read fewer zero-filled rows, 64 (one block for
# the released 96-mel filters) makes fewer, bigger matrix products. Each candidate costs a
# compilation at the first measurement (~5 s; the reference convolutions ~12 s, 2-core CPU).
BLOCK_CANDIDATES = (12, 64)
TASK = "front_end_train"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FrontEndKernels:
    """Which front end runs: `kernels` ("reference" or "banded") and the banded block size."""

    kernels: str = "banded"
    block_rows: int = BLOCK_ROWS

    @property
    def name(self) -> str:
        return self.kernels if self.kernels == "reference" else f"banded-{self.block_rows}"

    @classmethod
    def from_name(cls, name: str) -> FrontEndKernels:
        if name == "reference":
            return cls("reference")
        return cls("banded", int(name.removeprefix("banded-")))

    @classmethod
    def of(cls, front_end: str | FrontEndKernels) -> FrontEndKernels:
        """A choice as it is, or a front end's name by `rule`."""
        return front_end if isinstance(front_end, FrontEndKernels) else cls.rule(front_end)

    @classmethod
    def rule(cls, front_end: str, backend: str | None = None) -> FrontEndKernels:
        """What `front_end` ("auto", "reference", "banded") means without measuring."""
        backend = jax.default_backend() if backend is None else backend
        return cls(choose_front_end(front_end, backend))

    def model(self, config: ModelConfig, axis_name: str | None = None) -> MTSA:
        return MTSA(config, axis_name, self.kernels, self.block_rows)


def candidates() -> list[FrontEndKernels]:
    return [FrontEndKernels("reference")] + [FrontEndKernels("banded", b) for b in BLOCK_CANDIDATES]


def front_end_step(
    config: ModelConfig, choice: FrontEndKernels, batch: int, frames: int
) -> Callable[[], None]:
    """One jitted training-mode forward + backward pass of `choice`'s front end on random input
    of the run's shape (what differs between candidates); each call runs it to completion."""
    module = (
        FrontEnd(config)
        if choice.kernels == "reference"
        else BandedFrontEnd(config, None, choice.block_rows)
    )
    mel = jnp.asarray(
        np.random.default_rng(0).standard_normal((batch, config.n_mels, frames)), jnp.float32
    )
    # Shapes from an abstract init (nothing compiled); the values only need to be finite.
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), mel[:1], False))
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    rng = np.random.default_rng(1)
    variables = tree.unflatten(
        [jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype) for s in leaves]
    )

    def loss(params: dict, stats: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        y, updates = module.apply(
            {"params": params, "batch_stats": stats}, x, True, mutable=["batch_stats"]
        )
        return jnp.mean(y * y), updates

    grad = jax.jit(jax.grad(loss, has_aux=True))

    def run() -> None:
        jax.block_until_ready(grad(variables["params"], variables["batch_stats"], mel))

    return run


def tune_front_end(
    config: ModelConfig,
    batch: int,
    frames: int,
    front_end: str = "auto",
    backend: str | None = None,
) -> FrontEndKernels:
    """The front end a training run of `batch` examples per device and `frames`-frame crops
    should use: `front_end` as given when it is "reference" or "banded"; for "auto", the
    fastest measured on a CPU backend (see the module doc), the rule elsewhere. Every process
    of a multi-host run takes process 0's choice, so that all run the same program."""
    backend = jax.default_backend() if backend is None else backend
    rule = FrontEndKernels.rule(front_end, backend)
    if front_end != "auto" or backend != "cpu":
        return rule
    options = candidates()
    key = {
        "model": {**config.architecture(), "dtype": config.dtype, "precision": config.precision},
        "batch": batch,
        "frames": frames,
    }
    names = [c.name for c in options]
    if autotune.cache_file() is not None and autotune.lookup(TASK, names, key) is None:
        log.warning(
            "Measuring the front end's kernels for this CPU (once; kept in %s)",
            autotune.cache_file(),
        )
    steps = {c.name: _lazy(config, c, batch, frames) for c in options}
    winner = autotune.fastest(TASK, steps, key, default=rule.name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        picked = multihost_utils.broadcast_one_to_all(np.int32(names.index(winner)))
        winner = names[int(picked)]
    return FrontEndKernels.from_name(winner)


def _lazy(
    config: ModelConfig, choice: FrontEndKernels, batch: int, frames: int
) -> Callable[[], None]:
    """`front_end_step`, built at its first call (its warm-up), so that a stored winner builds
    nothing."""
    built: list[Callable[[], None]] = []

    def run() -> None:
        if not built:
            built.append(front_end_step(config, choice, batch, frames))
        built[0]()

    return run
