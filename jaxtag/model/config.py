"""What the network computes: `ModelConfig` and the architecture's fixed tables and constants.

Nothing here depends on the backend or imports JAX: a config read from a checkpoint means the
same function everywhere. Every field is checked when a config is made (`field_problems`: types,
ranges, choices), and a checkpoint's config and tag names together (`saved_model`), each bad
field named in one line. Which implementation of the front end runs (the readable convolutions
or the fused CPU kernels, same function) is chosen where a model is built for a backend
(`jaxtag.model.build_model`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import numbers
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

# (lowest, highest) of the integer fields: far beyond any MTSA trained so far, and low enough
# that a bad value read from a checkpoint is refused before it allocates anything.
INT_BOUNDS = {
    "conv_channels": (1, 1024),
    "n_mels": (3, 1024),  # the 0.4-height vertical branches need int(0.4 * n_mels) >= 1
    "width": (1, 16384),
    "num_layers": (1, 64),
    "num_heads": (1, 16384),  # and it divides width
    "ffn_size": (1, 65536),
    "positions_length": (2, 65536),  # at least one frame + the CLS token
    "num_tags": (1, 65536),
}
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "classifier_dropout")  # in [0, 1)
CHOICES = {
    "positions": ("learned", "sinusoidal"),
    "dtype": DTYPES,
    "precision": tuple(PRECISIONS),
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_problem(value: Any, lo: int, hi: int) -> str | None:
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if integer and lo <= value <= hi:
        return None
    kind = "" if integer else "an integer "
    if not _is_number(value) or value != value:  # a list, a string, None, NaN
        return f"must be an integer from {lo} to {hi}"
    if value < lo:
        return f"must be {kind}>= {lo}"
    if value > hi:
        return f"must be {kind}<= {hi}"
    return "must be an integer"


def field_problems(values: Mapping[str, Any]) -> list[str]:
    """One "field: value (what it must be)" per bad field of a complete field dict."""
    problems = []
    for name, (lo, hi) in INT_BOUNDS.items():
        need = _int_problem(values[name], lo, hi)
        if need:
            problems.append(f"{name}: {_shown(values[name])} ({need})")
    width, heads = values["width"], values["num_heads"]
    if not any(p.startswith(("width:", "num_heads:")) for p in problems) and width % heads:
        problems.append(f"num_heads: {heads} (width {width} is not divisible by num_heads {heads})")
    for name in DROPOUT_FIELDS:
        value = values[name]
        if not (_is_number(value) and 0 <= value < 1):
            problems.append(f"{name}: {_shown(value)} (must be a number in [0, 1))")
    for name, choices in CHOICES.items():
        value = values[name]
        if not (isinstance(value, str) and value in choices):
            allowed = ", ".join(repr(c) for c in choices)
            problems.append(f"{name}: {_shown(value)} (must be one of {allowed})")
    return problems


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
        problems = field_problems(self.__dict__)
        if problems:
            raise ValueError("; ".join(problems))
        # Built-in types (a numpy int from a config, 0 for a dropout): to_dict stays JSON.
        for name in INT_BOUNDS:
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in DROPOUT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        """The fields that shape the parameters and the function; RUNTIME_FIELDS left out."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a dict (or ml_collections ConfigDict); missing fields take their
        defaults. ValueError (one line) lists every unknown or bad field."""
        if not isinstance(values, Mapping) and not hasattr(values, "keys"):
            raise ValueError(
                f"the model config is a {type(values).__name__}, not a mapping of field values"
            )
        values = {key: values[key] for key in values.keys()}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in values if k not in defaults)
        problems = [f"{name}: unknown field" for name in unknown]
        problems += field_problems(
            {**defaults, **{k: v for k, v in values.items() if k in defaults}}
        )
        if problems:
            known = f" (known fields: {', '.join(defaults)})" if unknown else ""
            raise ValueError("; ".join(problems) + known)
        return cls(**values)

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> ModelConfig:
        """`from_dict` for a config a checkpoint stored: `RETIRED_FIELDS` are dropped."""
        if not isinstance(values, Mapping):
            return cls.from_dict(values)  # refused there, in its words
        return cls.from_dict({k: v for k, v in values.items() if k not in RETIRED_FIELDS})

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


def tag_problems(tags: Any, num_tags: int | None) -> list[str]:
    """What is wrong with a tag list (empty if nothing): distinct non-empty printable strings,
    `num_tags` of them (when known)."""
    if not isinstance(tags, list | tuple):
        return [f"tags: a {type(tags).__name__} (must be a list of tag names)"]
    problems = []
    if num_tags is not None and len(tags) != num_tags:
        problems.append(f"tags: {len(tags)} tag names for a model with {num_tags} outputs")
    bad = [i for i, t in enumerate(tags) if not (isinstance(t, str) and t and t.isprintable())]
    if bad:
        shown = ", ".join(f"{i}: {tags[i]!r}"[:40] for i in bad[:3])
        problems.append(f"tags: entries {shown} (must be non-empty printable strings)")
    counts = collections.Counter(t for t in tags if isinstance(t, str))
    twice = sorted(t for t, n in counts.items() if n > 1)
    if twice:
        problems.append(f"tags: {', '.join(map(repr, twice[:3]))} given more than once")
    return problems


def saved_model(model: Any, tags: Any) -> tuple[ModelConfig, list[str]]:
    """The config and tag names a checkpoint stored; ValueError (one line) lists every bad field
    of both."""
    problems, config = [], None
    try:
        config = ModelConfig.from_saved(model) if model is not None else None
    except ValueError as err:
        problems.append(f"model config: {err}")
    if model is None:
        problems.append("no model config")
    if tags is None:
        problems.append("no tags")
    else:
        problems += tag_problems(tags, None if config is None else config.num_tags)
    if problems:
        raise ValueError("; ".join(problems))
    return config, list(tags)
