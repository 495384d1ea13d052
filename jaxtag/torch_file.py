"""Reads PyTorch checkpoint files (`.pth`) into numpy arrays without importing torch.

The converter must work on machines without torch, and a `.pth` file is a pickle: loading it with
plain `pickle` would run whatever callable the file names. So this module unpickles with an
allow-list that covers what state dicts are made of (ordered dicts, tensor rebuild functions,
storage classes and dtypes) and refuses everything else with a clear error.

Both serialization formats that torch writes are understood:

* **legacy** (torch < 1.6, e.g. the released `ponswon.pth`, or `_use_new_zipfile_serialization=
  False`): pickled magic number, protocol version and sys_info; the object pickle, whose
  persistent ids are `('storage', storage_type, root_key, location, numel[, view_metadata])`;
  the pickled list of storage keys; then for each key an int64 little-endian element count
  followed by the raw little-endian bytes.
* **zip** (torch >= 1.6): `<archive>/data.pkl` with persistent ids `('storage', storage_type, key,
  location, numel)` and one raw record `<archive>/data/<key>` per storage, in the byte order of
  `<archive>/byteorder` (little endian when that record is absent).

Tensors come back as native-endian numpy arrays that own their data (storage offset, size and
stride respected, so several views of one storage each get their own correct array).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from jaxtag.errors import JaxtagError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a legacy file
PROTOCOL_VERSION = 1001  # second pickle of a legacy file
ZIP_MAGIC = b"PK\x03\x04"

# torch dtype name -> numpy dtype. bfloat16 comes from ml_dtypes (a jax dependency).
DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}

# Typed storage classes named in the pickle (`torch.FloatStorage`) -> torch dtype name.
STORAGE_TYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class TorchFileError(JaxtagError):
    """A file that is not a readable PyTorch checkpoint of tensors."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for `torch.FloatStorage` & co. (and `UntypedStorage`, whose dtype is uint8)."""

    dtype: str


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
    """Stands in for `torch.uint16` & co., which `_rebuild_tensor_v3` receives as an argument."""

    name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A (view of a) storage: bytes [byte_offset, byte_offset + nbytes) of root record `key`."""

    key: str
    dtype: str
    byte_offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A tensor whose bytes are read later: legacy files store the data after the pickle."""

    storage: _Storage
    dtype: str
    offset: int  # in elements of `dtype`
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _check_storage(storage: Any) -> _Storage:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return storage


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None) -> _Tensor:
    storage = _check_storage(storage)
    try:
        size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
        offset = int(offset)
    except (TypeError, ValueError) as err:
        raise pickle.UnpicklingError(f"bad tensor geometry: {err}") from err
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    return _Tensor(storage, dtype or storage.dtype, offset, size, stride)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _Tensor:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_grad_hooks_metadata: Any
) -> _Tensor:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    *_metadata: Any,
) -> _Tensor:
    if not isinstance(dtype, _TorchDtype):
        raise pickle.UnpicklingError(f"tensor dtype {dtype!r} is not a torch dtype")
    return _tensor(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data: Any, *_grad_hooks: Any) -> Any:
    return data  # an nn.Parameter is just its tensor here


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "UntypedStorage"): _StorageType("uint8"),
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_TYPES.items()},
    **{("torch", name): _TorchDtype(name) for name in DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only ALLOWED_GLOBALS and turns storage persistent ids into `_Storage`s."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file, encoding="utf-8")  # torch.load's default for Python-2 strings
        self.source = source
        self.roots: dict[str, tuple[str, int]] = {}  # root key -> (dtype, numel)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TorchFileError(
                f"{self.source}: refusing to load '{module}.{name}': only state dicts of "
                "tensors can be read (was a whole model or another object saved?)"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and _ascii(pid[0]) == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        key, dtype, numel = _ascii(key), storage_type.dtype, int(numel)
        if self.roots.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise pickle.UnpicklingError(f"storage {key} is declared with two dtypes or sizes")
        itemsize = DTYPES[dtype].itemsize
        if view is None:
            return _Storage(key, dtype, 0, numel * itemsize)
        _view_key, offset, view_numel = view  # legacy storage views: offset/size in elements
        return _Storage(key, dtype, int(offset) * itemsize, int(view_numel) * itemsize)


def _ascii(value: Any) -> Any:
    """Python-2 pickles may hold internal strings as bytes."""
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_array(data: bytes, storage: _Storage, dtype: str, byteorder: str) -> np.ndarray:
    """The storage (view) bytes as a 1-D native-endian array of `dtype`."""
    target = DTYPES[dtype]
    raw = data[storage.byte_offset : storage.byte_offset + storage.nbytes]
    usable = len(raw) - len(raw) % target.itemsize
    words = np.frombuffer(raw[:usable], dtype=f"u{target.itemsize}")
    if byteorder != sys.byteorder and target.itemsize > 1:
        words = words.byteswap()
    return words.view(target)


def _materialize(tensor: _Tensor, data: bytes, byteorder: str) -> np.ndarray:
    """Copies a tensor out of its storage bytes, checking that it fits."""
    flat = _storage_array(data, tensor.storage, tensor.dtype, byteorder)
    dtype = DTYPES[tensor.dtype]
    if 0 in tensor.size:
        return np.zeros(tensor.size, dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride, strict=True))
    if tensor.offset < 0 or min(tensor.stride, default=0) < 0 or last >= flat.size:
        raise pickle.UnpicklingError(
            f"a tensor of size {list(tensor.size)} (offset {tensor.offset}, stride "
            f"{list(tensor.stride)}) does not fit its storage of {flat.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :],
        shape=tensor.size,
        strides=tuple(s * dtype.itemsize for s in tensor.stride),
        writeable=False,
    )
    return np.array(view, dtype=dtype, copy=True)


def _resolve(obj: Any, data: Mapping[str, bytes], byteorder: str) -> Any:
    """Replaces every `_Tensor` in nested dicts, lists and tuples by its numpy array."""
    if isinstance(obj, _Tensor):
        return _materialize(obj, data[obj.storage.key], byteorder)
    if isinstance(obj, _Storage):
        whole = _Tensor(obj, obj.dtype, 0, (obj.nbytes // DTYPES[obj.dtype].itemsize,), (1,))
        return _materialize(whole, data[obj.key], byteorder)
    if isinstance(obj, dict):
        return {key: _resolve(value, data, byteorder) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(value, data, byteorder) for value in obj)
    return obj


def _unpickle_object(file: BinaryIO, source: str) -> tuple[Any, dict[str, tuple[str, int]]]:
    unpickler = _Unpickler(file, source)
    return unpickler.load(), unpickler.roots


def _read_legacy(file: BinaryIO, source: str) -> tuple[Any, dict[str, bytes]]:
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    try:
        magic = _Unpickler(file, source).load()
    except Exception:  # arbitrary bytes fail in arbitrary ways: all mean "not ours"
        magic = None
    if magic != MAGIC_NUMBER:
        raise TorchFileError(f"{source}: not a PyTorch checkpoint (neither zip nor legacy format)")
    version = _Unpickler(file, source).load()
    if version != PROTOCOL_VERSION:
        raise TorchFileError(f"{source}: unsupported legacy protocol version {version!r}")
    _Unpickler(file, source).load()  # sys_info; legacy storage bytes are always little endian
    obj, roots = _unpickle_object(file, source)
    keys = [_ascii(key) for key in _Unpickler(file, source).load()]
    unknown = sorted(set(keys) - set(roots))
    if unknown:
        raise TorchFileError(f"{source}: storage records {unknown} are not used by any tensor")
    data = {}
    for key in keys:
        dtype, numel = roots[key]
        head = file.read(8)
        if len(head) < 8:
            raise TorchFileError(f"{source}: truncated file: storage {key} is missing")
        count = int.from_bytes(head, "little", signed=True)
        if count != numel:
            raise TorchFileError(f"{source}: storage {key} has {count} elements, expected {numel}")
        nbytes = count * DTYPES[dtype].itemsize
        available = size - file.tell()
        if available < nbytes:
            raise TorchFileError(
                f"{source}: truncated file: storage {key} has {max(available, 0)} of {nbytes} bytes"
            )
        data[key] = file.read(nbytes)
    missing = sorted(set(roots) - set(keys))
    if missing:
        raise TorchFileError(f"{source}: no data for storages {missing}")
    return obj, data


def _read_zip(path: Path, source: str) -> tuple[Any, dict[str, bytes], str]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise TorchFileError(f"{source}: truncated or corrupt zip archive ({err})") from err
    with archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
        if not pickles:
            raise TorchFileError(f"{source}: zip archive without '<archive>/data.pkl' record")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            obj, roots = _unpickle_object(io.BytesIO(archive.read(pickles[0])), source)
            byteorder = "little"
            if prefix + "byteorder" in names:
                byteorder = archive.read(prefix + "byteorder").decode("ascii")
            if byteorder not in ("little", "big"):
                raise TorchFileError(f"{source}: unknown byte order {byteorder!r}")
            missing = sorted(k for k in roots if f"{prefix}data/{k}" not in names)
            if missing:
                records = [f"{prefix}data/{k}" for k in missing]
                raise TorchFileError(f"{source}: truncated archive: missing records {records}")
            data = {key: archive.read(f"{prefix}data/{key}") for key in roots}
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise TorchFileError(f"{source}: truncated or corrupt zip archive ({err})") from err
    short = [
        key
        for key, (dtype, numel) in roots.items()
        if len(data[key]) < numel * DTYPES[dtype].itemsize
    ]
    if short:
        raise TorchFileError(f"{source}: truncated archive: storages {sorted(short)} are short")
    return obj, data, byteorder


def load(path: str | Path) -> Any:
    """Loads a `torch.save`d object made of dicts, lists, scalars and tensors (-> numpy)."""
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as file:
            head = file.read(len(ZIP_MAGIC))
            file.seek(0)
            if head == ZIP_MAGIC:
                obj, data, byteorder = _read_zip(path, source)
            elif tarfile.is_tarfile(path):
                raise TorchFileError(f"{source}: torch < 0.4 tar checkpoints are not supported")
            else:
                obj, data = _read_legacy(file, source)
                byteorder = "little"
        return _resolve(obj, data, byteorder)
    except EOFError as err:
        raise TorchFileError(f"{source}: truncated file (the pickle ends early)") from err
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError) as err:
        if isinstance(err, TorchFileError):
            raise
        raise TorchFileError(f"{source}: truncated or corrupt PyTorch checkpoint ({err})") from err
    except OSError as err:
        raise TorchFileError(f"{source}: cannot read: {err}") from err


def as_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    """Checks that `obj` maps names to arrays (listing every entry that does not)."""
    if not isinstance(obj, Mapping):
        raise TorchFileError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    bad = [
        f"{key!r} ({type(value).__name__})"
        for key, value in obj.items()
        if not (isinstance(key, str) and isinstance(value, np.ndarray))
    ]
    if bad:
        raise TorchFileError(f"{source}: not a mapping of name -> tensor; bad entries: {bad}")
    return dict(obj)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Loads a file that holds a plain state dict (name -> tensor)."""
    return as_state_dict(load(path), str(path))
