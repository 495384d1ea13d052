"""Convert the released PyTorch weights (ponswon.pth) or any MTSA state dict to jaxtag's tree.

The architecture is read off the tensor shapes (conv channels, position table, width, layers,
feed-forward size, tag count); only the head count, which no shape tells, is an argument. Every
key of the file must be used and every parameter of the Flax model filled, or nothing comes out.
Reading the `.pth` file does not need torch (see `jaxtag.torch_file`). `load_weights` converts in
memory (`jaxtag.load("ponswon.pth")`), `convert_file` writes a checkpoint (`jaxtag convert`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxtag.errors import JaxtagError
from jaxtag.tags import MTAT_TOP50
from jaxtag.torch_file import TorchFileError, as_state_dict, load

DATA_PARALLEL_PREFIX = "module."
WRAPPER_KEYS = ("model", "state_dict")  # {'model': state_dict} / {'state_dict': ...} checkpoints
NUM_BATCHES_TRACKED = "num_batches_tracked"  # BatchNorm step counters: accepted, not needed
if TYPE_CHECKING:
    from jaxtag.checkpoint import LoadedModel
    from jaxtag.model import ModelConfig

SPACE_MARGIN = 1 << 20  # bytes beyond the source's size: orbax's metadata and the meta item
SINUSOIDAL_LENGTH = 257  # the sinusoidal table has no stored rows; it must cover 256 frames + CLS

# Flax module names -> torch module names where they differ (`layers_3` -> `layers.3` is generic).
MODULE_NAMES = {"embedding": "back_end.embedding", "encoder": "back_end.encoder"}
LEAF_NAMES = {"scale": "weight", "kernel": "weight", "mean": "running_mean", "var": "running_var"}


class ConversionError(JaxtagError):
    """A file that cannot be converted; the message lists every problem found."""


def torch_key(path: tuple[str, ...]) -> str:
    """The torch state_dict key of a Flax variable path (collection excluded)."""
    *modules, leaf = path
    if modules == ["pooler"]:
        modules = ["back_end", "pooler", "dense"]
    names = [MODULE_NAMES.get(m, re.sub(r"_(\d+)$", r".\1", m)) for m in modules]
    if leaf == "position_embeddings":
        return ".".join([*names, leaf, "weight"])
    return ".".join([*names, LEAF_NAMES.get(leaf, leaf)])


def kernel_permutation(ndim: int) -> tuple[int, ...]:
    """torch (out, in, *spatial) -> Flax (*spatial, in, out): Linear, Conv1d and Conv2d alike."""
    return (*range(2, ndim), 1, 0)


def to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """One torch tensor in the layout of the Flax variable at `path`, as float32."""
    if path[-1] == "kernel":
        value = value.transpose(kernel_permutation(value.ndim))
    return np.ascontiguousarray(value, dtype=np.float32)


def torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape that `to_flax` turns into `flax_shape` (to name it in error messages)."""
    if path[-1] != "kernel":
        return tuple(flax_shape)
    perm = kernel_permutation(len(flax_shape))
    return tuple(flax_shape[perm.index(i)] for i in range(len(flax_shape)))


def unwrap(obj: Any, source: str) -> dict[str, np.ndarray]:
    """The state dict inside a `{'model': ...}`/`{'state_dict': ...}` wrapper, `module.` removed."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    try:
        state = as_state_dict(obj, source)
    except TorchFileError as err:
        raise ConversionError(str(err)) from err
    if state and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state):
        state = {key[len(DATA_PARALLEL_PREFIX) :]: value for key, value in state.items()}
    return state


def _rows(state: Mapping[str, np.ndarray], key: str, default: int) -> int:
    """Size of the first axis of `state[key]`, or `default` when absent (reported later)."""
    value = state.get(key)
    return int(value.shape[0]) if value is not None and value.ndim else default


def infer_config(state: Mapping[str, np.ndarray], num_heads: int = 8) -> ModelConfig:
    """The ModelConfig that the tensor shapes describe (defaults where a key is missing).

    Missing or inconsistent tensors are not judged here: `convert_state_dict` lists them all.
    """
    from jaxtag.model import ModelConfig  # JAX is imported on use: `jaxtag --help` stays light

    defaults = ModelConfig()
    layer_ids = {
        int(m.group(1))
        for key in state
        if (m := re.match(r"back_end\.encoder\.layer\.(\d+)\.", key))
    }
    table = "back_end.embedding.position_embeddings.weight"
    learned = table in state
    try:
        return ModelConfig(
            conv_channels=_rows(state, "front_end.layers.0.conv.weight", defaults.conv_channels),
            width=_rows(state, "front_end.conv1x1.weight", defaults.width),
            num_layers=max(layer_ids) + 1 if layer_ids else defaults.num_layers,
            num_heads=num_heads,
            ffn_size=_rows(
                state, "back_end.encoder.layer.0.intermediate.dense.weight", defaults.ffn_size
            ),
            positions="learned" if learned else "sinusoidal",
            positions_length=_rows(state, table, 0) if learned else SINUSOIDAL_LENGTH,
            num_tags=_rows(state, "classifier.weight", defaults.num_tags),
        )
    except ValueError as err:
        raise ConversionError(f"the weights describe an impossible model: {err}") from err


@functools.cache
def _variable_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """(collection, *path) -> shape of every variable `init_variables` creates (no compute)."""
    import jax

    from jaxtag.model import init_variables

    try:
        tree = jax.eval_shape(functools.partial(init_variables, config), jax.random.key(0))
    except ValueError as err:  # e.g. a position table too short for 256 frames + CLS
        raise ConversionError(f"the weights describe an unusable model: {err}") from err
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _nest(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _is_batch_counter(key: str, expected: set[str]) -> bool:
    module, _, leaf = key.rpartition(".")
    return leaf == NUM_BATCHES_TRACKED and f"{module}.running_mean" in expected


def convert_state_dict(
    state: Mapping[str, np.ndarray], config: ModelConfig
) -> dict[str, dict[str, Any]]:
    """Maps a torch state dict onto {'params', 'batch_stats'} of `config`, or raises listing
    every unexpected key, missing key, wrong shape and non-float tensor."""
    shapes = _variable_shapes(config)
    keys = {variable: torch_key(variable[1:]) for variable in shapes}
    expected = set(keys.values())
    unexpected = sorted(
        k for k in state if k not in expected and not _is_batch_counter(k, expected)
    )
    missing = sorted(k for k in expected if k not in state)
    wrong_shape, wrong_dtype, flat = [], [], {}
    for variable, shape in shapes.items():
        value = state.get(keys[variable])
        if value is None:
            continue
        want = torch_shape(variable, shape)
        if value.shape != want:
            wrong_shape.append(f"{keys[variable]}: {list(value.shape)}, expected {list(want)}")
        elif not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            wrong_dtype.append(f"{keys[variable]}: {value.dtype}")
        else:
            flat[variable] = to_flax(variable, value)
    problems = [
        (f"{len(unexpected)} unexpected keys", unexpected),
        (f"{len(missing)} missing keys", missing),
        (f"{len(wrong_shape)} wrong shapes", wrong_shape),
        (f"{len(wrong_dtype)} non-float tensors", wrong_dtype),
    ]
    report = [f"{title}:\n  " + "\n  ".join(items) for title, items in problems if items]
    if report:
        raise ConversionError(
            f"the weights do not fit the inferred model ({describe(config)}):\n" + "\n".join(report)
        )
    return {"params": {}, "batch_stats": {}, **_nest(flat)}


def describe(config: ModelConfig) -> str:
    return (
        f"conv_channels={config.conv_channels}, positions={config.positions}"
        f"[{config.positions_length}], width={config.width}, layers={config.num_layers}, "
        f"heads={config.num_heads}, ffn={config.ffn_size}, tags={config.num_tags}"
    )


def read_tags(path: str | Path) -> list[str]:
    """One tag per line; blank lines ignored."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def default_tags(num_tags: int) -> list[str]:
    if num_tags != len(MTAT_TOP50):
        raise ConversionError(
            f"the model has {num_tags} outputs; name them with --tags FILE (one tag per line)"
        )
    return list(MTAT_TOP50)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_destination(out: Path, source: str | Path, overwrite: bool) -> None:
    """Refuses, before the source is read, an `out` checkpoint directory that must not be
    written: an existing one without `overwrite`, or one that is not a jaxtag checkpoint (or
    empty), or holds the source; a folder that cannot be written or lacks room for about the
    source's size.

    Raises:
      OutputError: one line naming `out` and what is wrong.
    """
    from jaxtag.checkpoint import is_model_dir
    from jaxtag.fileio import OutputError, unwritable_reason

    if os.path.lexists(out):
        if not overwrite:
            raise OutputError(f"{out} already exists (pass --overwrite to replace it)")
        if not out.is_dir() or (any(out.iterdir()) and not is_model_dir(out)):
            kind = "directory that holds no jaxtag checkpoint" if out.is_dir() else "file"
            raise OutputError(
                f"{out} is a {kind}; --overwrite replaces only a jaxtag checkpoint, so it was "
                "left untouched (choose another output path)"
            )
        if os.path.exists(source) and Path(source).resolve().is_relative_to(out.resolve()):
            raise OutputError(f"{out} holds the source {source}: write the checkpoint elsewhere")
    problem = unwritable_reason(out.parent / f"{out.name}.new")  # its folder, written beside
    if problem:
        raise OutputError(problem.replace(f"{out.name}.new", out.name))
    if os.path.isfile(source):
        folder = next(p for p in [out, *out.parents] if p.is_dir())
        need, free = os.path.getsize(source) + SPACE_MARGIN, shutil.disk_usage(folder).free
        if free < need:
            raise OutputError(
                f"{out}: not enough free space ({free / 1e6:.1f} MB free in {folder}, the "
                f"checkpoint needs about {need / 1e6:.1f} MB)"
            )


def load_weights(
    source: str | Path, num_heads: int = 8, tags: list[str] | None = None
) -> LoadedModel:
    """Reads a `.pth` file and converts it in memory (nothing written): a model ready to use.

    Raises:
      ConversionError: the file is not a readable state dict of an MTSA model, or `tags` do not
        match its outputs.
    """
    from jaxtag.checkpoint import LoadedModel, make_meta

    source = Path(source)
    try:
        obj = load(source)
    except TorchFileError as err:
        raise ConversionError(str(err)) from err
    state = unwrap(obj, str(source))
    try:
        config = infer_config(state, num_heads)
        variables = convert_state_dict(state, config)
        tags = default_tags(config.num_tags) if tags is None else list(tags)
        if len(tags) != config.num_tags:
            raise ConversionError(
                f"{len(tags)} tag names for a model with {config.num_tags} outputs"
            )
    except ConversionError as err:
        raise ConversionError(f"{source}: {err}") from err
    meta = make_meta(
        config, tags, source=f"converted from {source.name}", source_sha256=_sha256(source)
    )
    return LoadedModel(config, tags, variables, meta, source.absolute())


def convert_file(
    source: str | Path,
    out_dir: str | Path,
    num_heads: int = 8,
    tags: list[str] | None = None,
    overwrite: bool = False,
) -> tuple[Path, ModelConfig]:
    """Reads a `.pth` file and writes a jaxtag model checkpoint; returns its path and config.
    `out_dir` is checked first (`check_destination`); a failed write leaves nothing behind."""
    from jaxtag.checkpoint import save_model

    check_destination(Path(out_dir).absolute(), source, overwrite)
    model = load_weights(source, num_heads, tags)
    extra = {k: v for k, v in model.meta.items() if k not in ("model", "tags")}
    path = save_model(out_dir, model.variables, model.config, model.tags, overwrite, **extra)
    return path, model.config
