"""Writes PyTorch `.pth` state dicts without torch, by emitting the pickle opcodes by hand.

The torch-free test job needs real `.pth` files (for the download and conversion tests), so this
writes what `torch.save(state_dict, path, _use_new_zipfile_serialization=...)` writes:

* the object pickle (protocol 2): an `OrderedDict` of `torch._utils._rebuild_tensor_v2(storage,
  offset, size, stride, False, OrderedDict())`, each storage a persistent id
  `('storage', torch.FloatStorage, key, 'cpu', numel)` (legacy: plus a `None` view);
* **zip**: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>` (raw little-endian bytes),
  `archive/version`;
* **legacy** (torch < 1.6, like the released ponswon.pth): pickles of the magic number, the
  protocol version and sys_info, the object pickle, the pickled sorted list of storage keys, then
  per storage an int64 element count and its raw little-endian bytes.

    write_pth("model.pth", {"module.classifier.weight": np.zeros((50, 512), np.float32)})

`random_state_dict()` makes a small random MTSA state dict in the released file's key layout.
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
SYS_INFO = {
    "protocol_version": PROTOCOL_VERSION,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}
STORAGES = {  # numpy dtype name -> torch storage class name
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}
ARCHIVE = "archive"
SMALL_MODEL = dict(
    conv_channels=2, width=32, num_layers=1, num_heads=4, ffn_size=64, positions_length=257,
    num_tags=50,
)  # fmt: skip


def _int(value: int) -> bytes:
    """The shortest int opcode, as pickle protocol 2 writes it."""
    if 0 <= value < 1 << 8:
        return b"K" + bytes([value])  # BININT1
    if 0 <= value < 1 << 16:
        return b"M" + struct.pack("<H", value)  # BININT2
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)  # BININT
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _tuple(items: list[bytes]) -> bytes:
    if not items:
        return b")"  # EMPTY_TUPLE
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def _ordered_dict() -> bytes:
    return _global("collections", "OrderedDict") + b")R"  # OrderedDict() via REDUCE


def _tensor(key: str, value: np.ndarray, legacy: bool) -> bytes:
    """`_rebuild_tensor_v2(<storage pid>, 0, size, stride, False, OrderedDict())`."""
    pid = [
        _str("storage"),
        _global("torch", STORAGES[value.dtype.name]),
        _str(key),
        _str("cpu"),
        _int(value.size),
    ]
    if legacy:
        pid.append(b"N")  # no storage view
    strides = [s // value.itemsize for s in value.strides]  # C-contiguous, in elements
    args = [
        _tuple(pid) + b"Q",  # BINPERSID: the unpickler's persistent_load makes the storage
        _int(0),
        _tuple([_int(n) for n in value.shape]),
        _tuple([_int(s) for s in strides]),
        b"\x89",  # requires_grad=False
        _ordered_dict(),  # backward hooks
    ]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"


def _object_pickle(
    arrays: Mapping[str, np.ndarray], keys: Mapping[str, str], legacy: bool
) -> bytes:
    """The pickled OrderedDict of tensors (protocol 2, no memo: nothing is shared)."""
    items = b"".join(
        _str(name) + _tensor(keys[name], value, legacy) for name, value in arrays.items()
    )
    return b"\x80\x02" + _ordered_dict() + b"(" + items + b"u."  # MARK ... SETITEMS STOP


def _raw(value: np.ndarray) -> bytes:
    return value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()


def write_pth(path: str | Path, state: Mapping[str, np.ndarray], fmt: str = "legacy") -> Path:
    """Writes `state` (name -> array) as torch's `fmt` ("legacy" or "zip") state dict file.

    Each tensor gets its own storage (keys "0", "1", ...), as `torch.save` of a state dict does.
    """
    if fmt not in ("legacy", "zip"):
        raise ValueError(f"fmt must be 'legacy' or 'zip', got {fmt!r}")
    arrays = {name: np.asarray(value, order="C") for name, value in state.items()}  # 0-d stays 0-d
    unsupported = sorted(n for n, v in arrays.items() if v.dtype.name not in STORAGES)
    if unsupported:
        raise ValueError(f"dtypes without a torch storage class: {unsupported}")
    keys = {name: str(i) for i, name in enumerate(arrays)}
    data = _object_pickle(arrays, keys, legacy=fmt == "legacy")
    path = Path(path)
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(f"{ARCHIVE}/data.pkl", data)
            archive.writestr(f"{ARCHIVE}/byteorder", "little")
            for name, value in arrays.items():
                archive.writestr(f"{ARCHIVE}/data/{keys[name]}", _raw(value))
            archive.writestr(f"{ARCHIVE}/version", "3\n")
        return path
    out = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):  # plain values: stdlib pickle
        out.write(pickle.dumps(header, protocol=2))
    out.write(data)
    by_key = {keys[name]: value for name, value in arrays.items()}
    ordered = sorted(by_key)  # torch writes the storages in sorted key order
    out.write(pickle.dumps(ordered, protocol=2))
    for key in ordered:
        out.write(struct.pack("<q", by_key[key].size))
        out.write(_raw(by_key[key]))
    path.write_bytes(out.getvalue())
    return path


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A small random MTSA (SMALL_MODEL) state dict, keyed and shaped like the released file."""
    import jax

    from jaxtag import convert  # the inverse of its mapping: torch keys and kernel layouts
    from jaxtag.model import ModelConfig, init_variables

    # eval_shape: only the tree and the shapes are needed; the values are drawn below
    shapes = jax.eval_shape(
        functools.partial(init_variables, ModelConfig(**SMALL_MODEL)), jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(seed)
    state = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(k.key for k in path)[1:]  # the collection is not part of the torch key
        key = "module." + convert.torch_key(names)
        low_high = (0.5, 2.0) if key.endswith("running_var") else (-1.0, 1.0)
        shape = convert.torch_shape(names, leaf.shape)
        state[key] = rng.uniform(*low_high, shape).astype(np.float32)
        if key.endswith("running_mean"):  # the real file has BatchNorm step counters too
            counter = key.removesuffix("running_mean") + "num_batches_tracked"
            state[counter] = np.array(rng.integers(1, 10**6), np.int64)
    return state
