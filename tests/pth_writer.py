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

`random_state_dict()` makes a small random MTSA state dict in the released file's key layout;
`write_raw_pth` writes any object pickle and storages, and the `write_*` helpers after it write
hostile files of a few KB (tests/test_torch_file_limits.py).
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping, Sequence
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
    strides = [s // value.itemsize for s in value.strides]  # C-contiguous, in elements
    return tensor_opcodes(
        key, STORAGES[value.dtype.name], value.size, 0, value.shape, strides, legacy
    )


def tensor_opcodes(
    key: str,
    storage: str,
    numel: int,
    offset: int,
    size: Sequence[int],
    stride: Sequence[int],
    legacy: bool = False,
    view: tuple[int, int] | None = None,
) -> bytes:
    """A tensor of any geometry (hostile ones too) over storage `key` of `numel` elements; in a
    legacy file, optionally over a storage view of (offset, size) elements of it."""
    pid = [_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel)]
    if legacy:  # the storage view, or None
        pid.append(_tuple([_str(key + ".view"), *map(_int, view)]) if view else b"N")
    args = [
        _tuple(pid) + b"Q",  # BINPERSID: the unpickler's persistent_load makes the storage
        _int(offset),
        _tuple([_int(n) for n in size]),
        _tuple([_int(s) for s in stride]),
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


def write_pth(
    path: str | Path,
    state: Mapping[str, np.ndarray],
    fmt: str = "legacy",
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Writes `state` (name -> array) as torch's `fmt` ("legacy" or "zip") state dict file.

    Each tensor gets its own storage (keys "0", "1", ...), as `torch.save` of a state dict does;
    zip storage records are stored, as torch writes them, or compressed with `compression`.
    """
    if fmt not in ("legacy", "zip"):
        raise ValueError(f"fmt must be 'legacy' or 'zip', got {fmt!r}")
    arrays = {name: np.asarray(value, order="C") for name, value in state.items()}  # 0-d stays 0-d
    unsupported = sorted(n for n, v in arrays.items() if v.dtype.name not in STORAGES)
    if unsupported:
        raise ValueError(f"dtypes without a torch storage class: {unsupported}")
    keys = {name: str(i) for i, name in enumerate(arrays)}
    data = _object_pickle(arrays, keys, legacy=fmt == "legacy")
    storages = {keys[name]: (value.size, _raw(value)) for name, value in arrays.items()}
    return write_raw_pth(path, data, storages, fmt, compression)


def write_raw_pth(
    path: str | Path,
    data: bytes,
    storages: Mapping[str, tuple[int, bytes]],
    fmt: str = "legacy",
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Writes object pickle `data` and the storages (key -> (element count, raw bytes)) as a
    `fmt` file; the counts and bytes are written as given, so they may disagree with the pickle."""
    path = Path(path)
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(f"{ARCHIVE}/data.pkl", data)
            archive.writestr(f"{ARCHIVE}/byteorder", "little")
            for key, (_numel, raw) in storages.items():
                archive.writestr(f"{ARCHIVE}/data/{key}", raw, compression, compresslevel=1)
            archive.writestr(f"{ARCHIVE}/version", "3\n")
        return path
    out = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):  # plain values: stdlib pickle
        out.write(pickle.dumps(header, protocol=2))
    out.write(data)
    ordered = sorted(storages)  # torch writes the storages in sorted key order
    out.write(pickle.dumps(ordered, protocol=2))
    for key in ordered:
        numel, raw = storages[key]
        out.write(struct.pack("<q", numel))
        out.write(raw)
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


# ----------------------------------------------------------------------------------------------
# Hostile files (tests/test_torch_file_limits.py): a few KB each, claiming far more


def _put(index: int) -> bytes:
    return b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)


def _get(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def one_entry(key: str, value: bytes) -> bytes:
    """A protocol-2 pickle of `{key: <the object that opcodes `value` push>}`."""
    return b"\x80\x02}" + _str(key) + value + b"s."


FLOAT = "FloatStorage"


def write_strided(
    path: str | Path, size: Sequence[int], stride: Sequence[int], numel: int = 1, fmt: str = "zip"
) -> Path:
    """`{"w": tensor}` of geometry (size, stride), offset 0, over a float storage of `numel`."""
    data = one_entry("w", tensor_opcodes("0", FLOAT, numel, 0, size, stride, fmt == "legacy"))
    return write_raw_pth(path, data, {"0": (numel, bytes(4 * numel))}, fmt)


def write_zip_bomb(path: str | Path, inflated: int, numel: int) -> Path:
    """`{"w": tensor}` over a storage of `numel` floats whose record is `inflated` zero bytes,
    deflated (about 1000:1; written in blocks, so a GB-sized record needs no GB of memory)."""
    data = one_entry("w", tensor_opcodes("0", FLOAT, numel, 0, (numel,), (1,)))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(f"{ARCHIVE}/data.pkl", data, zipfile.ZIP_STORED)
        archive.writestr(f"{ARCHIVE}/byteorder", "little", zipfile.ZIP_STORED)
        with archive.open(f"{ARCHIVE}/data/0", "w", force_zip64=inflated >= 1 << 31) as record:
            block = bytes(1 << 20)
            for start in range(0, inflated, len(block)):
                record.write(block[: inflated - start])
    return Path(path)


def write_billion_laughs(
    path: str | Path, levels: int = 9, width: int = 10, fmt: str = "zip"
) -> Path:
    """`{"w": L[levels]}`, L[0] one tensor and L[i+1] a list of `width` memo references to
    L[i]: width**levels references to one tensor in a pickle of a few hundred bytes."""
    body = tensor_opcodes("0", FLOAT, 1, 0, (1,), (1,), fmt == "legacy") + _put(0) + b"0"
    for level in range(1, levels + 1):  # EMPTY_LIST MARK BINGET... APPENDS BINPUT POP
        body += b"](" + _get(level - 1) * width + b"e" + _put(level) + b"0"
    data = one_entry("w", body + _get(levels))
    return write_raw_pth(path, data, {"0": (1, bytes(4))}, fmt)


def write_deep(path: str | Path, depth: int, fmt: str = "zip") -> Path:
    """`{"w": [[[...]]]}` nested `depth` deep: EMPTY_LIST x depth, then APPEND x (depth - 1)."""
    return write_raw_pth(path, one_entry("w", b"]" * depth + b"a" * (depth - 1)), {}, fmt)


def write_deep_by_mutation(path: str | Path, depth: int, fmt: str = "zip") -> Path:
    """The same nesting, made by appending list i + 1 to list i once both exist (memo refs):
    no list is deep when it is appended, so only the object itself shows the depth."""
    body = b"".join(b"]" + _put(i) + b"0" for i in range(depth))
    body += b"".join(_get(i) + _get(i + 1) + b"a0" for i in range(depth - 1))
    return write_raw_pth(path, one_entry("w", body + _get(0)), {}, fmt)


def write_deep_tuple_key(path: str | Path, depth: int, fmt: str = "zip") -> Path:
    """`{((((),),),): 1}` with the key nested `depth` deep: hashing it recurses in C."""
    return write_raw_pth(path, b"\x80\x02})" + b"\x85" * depth + b"K\x01s.", {}, fmt)


def write_memo_index(path: str | Path, index: int, fmt: str = "zip") -> Path:
    """`{}` memoized at `index`: the C unpickler makes room for 2 x index memo slots."""
    return write_raw_pth(path, b"\x80\x02}" + _put(index) + b".", {}, fmt)


def write_cycle(path: str | Path, fmt: str = "zip") -> Path:
    """`{"w": L}` with L a list that holds itself."""
    return write_raw_pth(path, one_entry("w", b"]" + _put(0) + _get(0) + b"a"), {}, fmt)


def write_build_on_global(
    path: str | Path, module: str = "torch", name: str = FLOAT, fmt: str = "zip"
) -> Path:
    """A one-tensor state dict whose pickle first BUILDs {"dtype": "int8"} into the object the
    reader gives for global `module.name` (a reader that let it alter its allow-listed objects
    would, for `torch.FloatStorage`, read every later file's float storages as int8)."""
    build = _global(module, name) + b"}" + _str("dtype") + _str("int8") + b"sb0"
    tensor = tensor_opcodes("0", FLOAT, 2, 0, (2,), (1,), fmt == "legacy")
    data = b"\x80\x02" + build + one_entry("w", tensor)[2:]
    return write_raw_pth(path, data, {"0": (2, np.array([1.5, -2], "<f4").tobytes())}, fmt)


def write_build_copies(
    path: str | Path, entries: int = 1000, copies: int = 2000, fmt: str = "zip"
) -> Path:
    """`{"w": [OrderedDict(), ...]}`, each BUILT with one shared dict of `entries` entries (as
    torch BUILDs `_metadata` into a state dict): a few bytes per copy of `entries` entries."""
    state = b"}(" + b"".join(_int(i) + _int(i) for i in range(entries)) + b"u" + _put(0) + b"0"
    body = state + _global("collections", "OrderedDict") + _put(1) + b"0"
    body += b"](" + (_get(1) + b")R" + _get(0) + b"b") * copies + b"e"  # REDUCE, then BUILD
    return write_raw_pth(path, one_entry("w", body), {}, fmt)


def write_many_opcodes(path: str | Path, count: int, fmt: str = "zip") -> Path:
    """`{"w": [None] * count}`, one opcode per None."""
    return write_raw_pth(path, one_entry("w", b"](" + b"N" * count + b"e"), {}, fmt)


def write_ordered_dict_copies(
    path: str | Path, pairs: int = 1000, copies: int = 2000, fmt: str = "zip"
) -> Path:
    """`{"w": [OrderedDict(items), ...]}`, `copies` calls on one shared list of `pairs` pairs
    (as Python 2 pickled OrderedDicts): a few bytes per call, `pairs` entries per copy."""
    items = b"](" + b"".join(b"(" + _int(i) + _int(i) + b"l" for i in range(pairs)) + b"e"
    body = items + _put(0) + b"0" + _global("collections", "OrderedDict") + _put(1) + b"0"
    body += b"](" + (_get(1) + _get(0) + b"\x85R") * copies + b"e"  # TUPLE1 REDUCE
    return write_raw_pth(path, one_entry("w", body), {}, fmt)
