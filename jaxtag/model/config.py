"""What the network computes: `ModelConfig` and the architecture's fixed tables and constants.

Nothing here depends on the backend or imports JAX: a config read from a checkpoint means the
same function everywhere. Which implementation of the front end runs (the readable convolutions
or the fused CPU kernels, same function) is chosen where a model is built for a backend
(`jaxtag.model.build_model`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

# Vertical branches: (filter height as a fraction of the mel bins, width, channel multiplier).
# The list order is the original `front_end.layers.0..5` order, which fixes the concat order.
VERTICAL_BRANCHES = ((0.9, 7, 1), (0.9, 3, 2), (0.9, 1, 4), (0.4, 7, 1), (0.4, 3, 2), (0.4, 1, 4))
# Horizontal branches `front_end.layers.6..9`: (filter length, channel multiplier).
HORIZONTAL_BRANCHES = ((165, 1), (129, 2), (65, 4), (33, 8))
# The channel multipliers above sum to 29: conv1x1 sees 29 * conv_channels channels.

BN_EPS = 1e-5  # PyTorch BatchNorm default
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch
LN_EPS = 1e-12  # BERT LayerNorm
# `precision` names -> jax.lax.Precision member names ("default": the backend's own, TF32 on
# NVIDIA GPUs, bf16 passes on TPU).
PRECISIONS = {"highest": "HIGHEST", "high": "HIGH", "default": None}
DTYPES = ("float32", "bfloat16", "float16")

# ModelConfig fields that a run may change freely (speed, regularisation): they change neither
# the parameter tree nor what converted weights compute in float32.
RUNTIME_FIELDS = frozenset(
    {"attention_dropout", "hidden_dropout", "classifier_dropout", "dtype", "precision"}
)
# Fields that older checkpoints hold and that no longer belong to the config: `front_end` (the
# kernel choice, now made by `build_model` for the backend). Read and dropped.
RETIRED_FIELDS = frozenset({"front_end"})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; shared by converter, training and checkpoints.

    The defaults are the released `ponswon.pth` architecture.
    """

    conv_channels: int = 8
    n_mels: int = 96
    width: int = 512
    num_layers: int = 2
    num_heads: int = 8
    ffn_size: int = 2048
    positions: str = "learned"  # "learned" (table + LayerNorm + dropout) or "sinusoidal"
    positions_length: int = 271  # table rows; must cover the sequence (frames + CLS)
    num_tags: int = 50
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    classifier_dropout: float = 0.5
    dtype: str = "float32"  # compute dtype; parameters always stay float32
    # Matrix-product / convolution precision for float32 compute: "highest" is true float32 on
    # every backend (GPUs would otherwise use TF32); "high" (bf16x3) and "default" (TF32 on
    # NVIDIA GPUs, bf16 passes on TPU) are opt-in faster modes.
    precision: str = "highest"

    def __post_init__(self) -> None:
        if self.positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', got {self.positions!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be highest, high or default, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        """The fields that shape the parameters and the function; RUNTIME_FIELDS left out."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a dict (or ml_collections ConfigDict), rejecting unknown fields."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> ModelConfig:
        """`from_dict` for a config a checkpoint stored: `RETIRED_FIELDS` are dropped."""
        return cls.from_dict({k: v for k, v in dict(values).items() if k not in RETIRED_FIELDS})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def lax_precision(self) -> Any:
        """The `jax.lax.Precision` of every matrix product and convolution (None: default)."""
        name = PRECISIONS[self.precision]
        if name is None:
            return None
        import jax

        return jax.lax.Precision[name]


def vertical_branches(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(filter height, width, channels) of `front_end.layers.0..5`, in concat order."""
    c, n_mels = config.conv_channels, config.n_mels
    return [(int(frac * n_mels), w, m * c) for frac, w, m in VERTICAL_BRANCHES]


def horizontal_branches(config: ModelConfig) -> list[tuple[int, int]]:
    """(filter length, channels) of `front_end.layers.6..9`, in concat order."""
    return [(k, m * config.conv_channels) for k, m in HORIZONTAL_BRANCHES]
