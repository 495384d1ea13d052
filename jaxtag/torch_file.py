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

Tensors come back as native-endian numpy arrays with memory of their own (storage offset, size and
stride respected, so several views of one storage each get their own array); one tensor that the
pickle references twice is one array under both names, as in torch.

Limits, checked before the memory they guard is taken (whatever the file claims), each refused in
one line (`TorchFileError`): pickles over MAX_PICKLE_BYTES or MAX_OPCODES opcodes, with memo
indexes that skip ahead (the C unpickler allocates a slot per index below) or containers nested
over MAX_DEPTH (hashing a deep tuple overflows the C stack), OrderedDict(items) copying more
entries than the pickle has opcodes, or BUILD on the reader's objects; objects nested over
MAX_DEPTH (or cyclic) or of over MAX_ENTRIES entries when each shared reference is counted where
used ("billion laughs"; the sharing itself is kept); tensors whose offset, sizes and strides are
not non-negative ints (rank <= MAX_RANK), that leave their storage or have more elements than it
(stride-0 views are not expanded); zip records neither stored (as torch writes them) nor deflated
(bzip2 and lzma inflate without bound), of another size than their storage (numel x element
size), or over 1 MiB and inflating over MAX_INFLATE:1. Records are read in chunks up to that size,
storages one at a time (their tensors copied out before the next; a tensor that is all of its
storage keeps its buffer): peak memory is the result plus about twice the largest storage.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import sys
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from reprlib import repr as _describe  # short and one line, however big or deep the value
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from jaxtag.errors import JaxtagError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a legacy file
PROTOCOL_VERSION = 1001  # second pickle of a legacy file
ZIP_MAGIC = b"PK\x03\x04"
MAX_PICKLE_BYTES = 1 << 23  # a state dict pickles to ~150 bytes and ~25 opcodes per tensor
MAX_OPCODES = 1 << 16  # ~0.5 us each to check; the released state dict has ~3,000
MAX_DEPTH = 64  # as _scan counts: a tensor of a nested training checkpoint is ~10 deep
MAX_ENTRIES = 1 << 22
MAX_RANK = 32
MAX_INFLATE = 100  # float weights deflate to ~90 %
_CHUNK = 1 << 20

# torch dtype name -> numpy dtype. bfloat16 comes from ml_dtypes (a jax dependency).
_NAMES = "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 uint16 uint32 uint64 bool"
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name) for name in _NAMES.split()
}
# Typed storage classes named in the pickle (`torch.FloatStorage`) -> torch dtype name.
STORAGE_TYPES = dict(
    DoubleStorage="float64", FloatStorage="float32", HalfStorage="float16",
    BFloat16Storage="bfloat16", LongStorage="int64", IntStorage="int32", ShortStorage="int16",
    CharStorage="int8", ByteStorage="uint8", BoolStorage="bool",
)  # fmt: skip


class TorchFileError(JaxtagError):
    """A file that is not a readable PyTorch checkpoint of tensors."""


# Stand-ins for `torch.FloatStorage` & co. (`UntypedStorage`: uint8), `torch.uint16` & co., a (view
# of a) storage: bytes [byte_offset, byte_offset + nbytes) of root record `key`, and a tensor whose
# bytes are read later (offset in elements). Namedtuples: with no __dict__, BUILD cannot alter them.
_StorageType = collections.namedtuple("_StorageType", "dtype")
_TorchDtype = collections.namedtuple("_TorchDtype", "name")
_Storage = collections.namedtuple("_Storage", "key dtype byte_offset nbytes")
_Tensor = collections.namedtuple("_Tensor", "storage dtype offset size stride")


class _Callable(collections.namedtuple("_Callable", "fn")):
    """An allow-listed function as the pickle sees it (a function object would take BUILD)."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _OrderedDict(collections.OrderedDict):
    """The pickle's OrderedDict(): BUILD (torch's `_metadata`) copies nothing into it."""

    def __setstate__(self, state: Any) -> None:
        pass  # the result holds plain dicts: the state would be dropped anyway


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 62:
        raise pickle.UnpicklingError(f"{what} {_describe(value)} is not a count")
    return value


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any = None) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if dtype is not None and not isinstance(dtype, _TorchDtype):
        raise pickle.UnpicklingError(f"tensor dtype {_describe(dtype)} is not a torch dtype")
    if not all(type(v) in (tuple, list) and len(v) <= MAX_RANK for v in (size, stride)):
        raise pickle.UnpicklingError(f"tensor size {_describe(size)} or stride {_describe(stride)}")
    size, stride = (tuple(_count(n, "tensor size or stride") for n in v) for v in (size, stride))
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    dtype = dtype.name if dtype is not None else storage.dtype
    return _Tensor(storage, dtype, _count(offset, "tensor offset"), size, stride)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _Callable(lambda *args: _tensor(*args[:4])),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(lambda *args: _tensor(*args[:4])),
    ("torch._utils", "_rebuild_tensor_v3"): _Callable(lambda *args: _tensor(*args[:4], args[6])),
    ("torch._utils", "_rebuild_parameter"): _Callable(lambda data, *_grad_hooks: data),
    ("torch", "UntypedStorage"): _StorageType("uint8"),
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_TYPES.items()},
    **{("torch", name): _TorchDtype(name) for name in DTYPES},
}  # and collections.OrderedDict, which each _Unpickler makes with its own budget


class _Unpickler(pickle.Unpickler):
    """Resolves only ALLOWED_GLOBALS and turns storage persistent ids into `_Storage`s."""

    def __init__(self, file: BinaryIO, source: str, budget: int) -> None:
        super().__init__(file, encoding="utf-8")  # torch.load's default for Python-2 strings
        self.source, self.budget = source, budget  # entries OrderedDict(items) may still copy
        self.roots: dict[str, tuple[str, int]] = {}  # root key -> (dtype, numel)
        self.ordered_dict = _Callable(self._ordered_dict)

    def _ordered_dict(self, *args: Any) -> _OrderedDict:
        """torch's pickles call OrderedDict() and fill it; Python 2's pass a list of pairs."""
        self.budget -= len(args[0]) if args else 0  # (more arguments: OrderedDict refuses)
        if self.budget < 0:
            why = "copy more entries than the pickle has opcodes (one shared list, many times?)"
            raise TorchFileError(f"{self.source}: OrderedDict(...) calls {why}")
        return _OrderedDict(*args)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return self.ordered_dict
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        name = f"{module}.{name}" if len(module + name) < 200 else _describe(module + name)
        why = "only state dicts of tensors can be read (was a whole model or another object saved?)"
        raise TorchFileError(f"{self.source}: refusing to load {name!r}: {why}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) in (5, 6) and _ascii(pid[0]) == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {_describe(pid)}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {_describe(storage_type)}")
        key, dtype, numel = _ascii(key), storage_type.dtype, _count(numel, "storage size")
        if not (isinstance(key, str) and len(key) <= 100):
            raise pickle.UnpicklingError(f"storage key {_describe(key)} is not a short string")
        if self.roots.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise pickle.UnpicklingError(f"storage {key} is declared with two dtypes or sizes")
        view = pid[5] if len(pid) == 6 and pid[5] is not None else (key, 0, numel)
        _view_key, offset, size = view  # legacy storage views: offset and size in elements
        offset, size = _count(offset, "view offset"), _count(size, "view size")
        if offset + size > numel:
            raise pickle.UnpicklingError(f"a view of storage {key} reaches past its {numel}")
        return _Storage(key, dtype, offset * DTYPES[dtype].itemsize, size * DTYPES[dtype].itemsize)


def _ascii(value: Any) -> Any:
    """Python-2 pickles may hold internal strings as bytes."""
    return value.decode("ascii") if isinstance(value, bytes) else value


_PUT, _GET = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}, {"GET", "BINGET", "LONG_BINGET", "DUP"}
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_EMPTY = {"EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET"}


def _scan(data: bytes, source: str) -> tuple[int, int]:
    """Checks the pickle `data` starts with: (its length, opcodes). Its stack is simulated with
    nesting depths, exact for tuples (which hashing recurses into); lists deepened later: _walk."""
    stack: list[int] = []
    marks: list[list[int]] = []
    memo: dict[int, int] = {}  # index -> depth
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(io.BytesIO(data)), 1):
            name = op.name
            if count > MAX_OPCODES:
                raise TorchFileError(f"{source}: a pickle of more than {MAX_OPCODES} opcodes")
            if name == "STOP":
                return pos + 1, count
            if name == "MARK":
                marks.append(stack)
                stack = []
            elif name in _PUT:
                index = len(memo) if name == "MEMOIZE" else arg
                if index > len(memo):  # Python's pickler numbers them in order
                    raise TorchFileError(f"{source}: pickle memo index {index} skips ahead")
                memo[index] = stack[-1] if stack else 0
            elif name in _GET:
                stack.append(stack[-1] if name == "DUP" and stack else memo.get(arg, 0))
            elif not op.stack_before:  # atoms and empty containers (PROTO, FRAME: nothing)
                stack.extend([int(name in _EMPTY)] * len(op.stack_after))
            else:
                before, popped = op.stack_before, []
                if pickletools.markobject in before:
                    popped, stack = stack, marks.pop() if marks else []
                    before = before[: before.index(pickletools.markobject)]
                items = [stack.pop() if stack else 0 for _ in before][::-1] + popped
                if name in _IN_PLACE:  # the container is below what it takes in
                    depth = max(items[0], max(items[1:], default=-1) + 1)
                else:
                    depth = max(items, default=0) + 1
                if op.stack_after and depth > MAX_DEPTH:
                    raise TorchFileError(f"{source}: objects nested more than {MAX_DEPTH} deep")
                stack.extend([depth] * len(op.stack_after))
    except ValueError as err:  # genops: unknown opcode, argument cut short, no STOP (it returns)
        mine = isinstance(err, TorchFileError)
        raise err if mine else pickle.UnpicklingError(f"pickle: {err}") from None


def _load_pickle(file: BinaryIO, source: str) -> tuple[Any, dict[str, tuple[str, int]]]:
    """Checks then loads the pickle at the file's position, leaving the file just after it."""
    start, data = file.tell(), file.read(MAX_PICKLE_BYTES)
    stop, opcodes = _scan(data, source)
    file.seek(start + stop)
    unpickler = _Unpickler(io.BytesIO(data[:stop]), source, budget=opcodes)
    return unpickler.load(), unpickler.roots


def _walk(obj: Any, source: str, sizes: dict, groups: dict, depth: int = 0) -> int:
    """Checks the object's depth, tensors and size (entries, each shared reference counted where
    it is used; memoized in `sizes`); collects its unique tensors in `groups` by storage key."""
    ident = id(obj)  # of the object in the pickle's result: _rebuild looks tensors up by it
    if ident in sizes:
        return sizes[ident]
    if depth > MAX_DEPTH:
        raise TorchFileError(f"{source}: objects nested over {MAX_DEPTH} deep (or a cycle)")
    entries = 1
    if isinstance(obj, _Storage):  # a bare storage: a 1-D tensor of all of it
        obj = _Tensor(obj, obj.dtype, 0, (obj.nbytes // DTYPES[obj.dtype].itemsize,), (1,))
    if isinstance(obj, _Tensor):
        elements, numel = obj.storage.nbytes // DTYPES[obj.dtype].itemsize, math.prod(obj.size)
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride, strict=True))
        view = f"a tensor of size {list(obj.size)} (offset {obj.offset}, stride {list(obj.stride)})"
        if numel and last >= elements or numel > elements:  # stride 0: never expanded
            what = "exceeds" if last >= elements else "has more elements than"
            raise TorchFileError(f"{source}: {view} {what} its storage of {elements} elements")
        groups.setdefault(obj.storage.key, {})[ident] = obj
    elif isinstance(obj, dict) or type(obj) in (list, tuple):
        for value in obj.values() if isinstance(obj, dict) else obj:
            entries += _walk(value, source, sizes, groups, depth + 1)
    if entries > MAX_ENTRIES:
        why = "when shared references are counted where used (a 'billion laughs' file?)"
        raise TorchFileError(f"{source}: objects of over {MAX_ENTRIES} entries {why}")
    sizes[ident] = entries
    return entries


def _rebuild(obj: Any, done: dict[int, Any]) -> Any:
    """`obj` with arrays for its tensors (`done`: arrays by id); what the pickle shares, shared."""
    if id(obj) not in done:
        if isinstance(obj, dict):
            done[id(obj)] = {key: _rebuild(value, done) for key, value in obj.items()}
        elif type(obj) in (list, tuple):
            done[id(obj)] = type(obj)(_rebuild(value, done) for value in obj)
        else:
            done[id(obj)] = obj
    return done[id(obj)]


def _assemble(obj: Any, source: str, keys: Any, read: Callable, byteorder: str) -> Any:
    """`obj` with arrays for its tensors, once checked: storages are read (`read(key)`) one by
    one and their tensors copied out; a storage's only tensor, if all of it, keeps its buffer."""
    groups, arrays = {}, {}  # storage key -> {id: tensor}; id -> array
    _walk(obj, source, {}, groups)
    for key in keys:
        buffer, tensors = read(key), groups.get(key, {})
        for ident, tensor in tensors.items():
            dtype = DTYPES[tensor.dtype]
            start = tensor.storage.byte_offset
            stop = start + tensor.storage.nbytes - tensor.storage.nbytes % dtype.itemsize
            flat = buffer[start:stop].view(dtype)
            strides = tuple(s * dtype.itemsize for s in tensor.stride)
            view = np.lib.stride_tricks.as_strided(flat[tensor.offset :], tensor.size, strides)
            whole = len(tensors) == 1 and stop - start == buffer.size == view.size * dtype.itemsize
            out = flat.reshape(tensor.size) if whole and view.flags.c_contiguous else view.copy()
            if byteorder != sys.byteorder and dtype.itemsize > 1:
                out.view(f"u{dtype.itemsize}").byteswap(inplace=True)
            arrays[ident] = out
    return _rebuild(obj, arrays)


def _read_legacy(file: BinaryIO, source: str) -> Any:
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    try:
        magic = _load_pickle(file, source)[0]
    except Exception:  # arbitrary bytes fail in arbitrary ways: all mean "not ours"
        magic = None
    if magic != MAGIC_NUMBER:
        raise TorchFileError(f"{source}: not a PyTorch checkpoint (neither zip nor legacy format)")
    version = _load_pickle(file, source)[0]
    if version != PROTOCOL_VERSION:
        raise TorchFileError(f"{source}: unsupported legacy protocol version {_describe(version)}")
    _load_pickle(file, source)  # sys_info; legacy storage bytes are always little endian
    obj, roots = _load_pickle(file, source)
    keys = _load_pickle(file, source)[0]
    keys = [_ascii(key) for key in keys] if type(keys) is list else [None]
    if not all(isinstance(key, str) for key in keys) or len(set(keys)) < len(keys):
        raise TorchFileError(f"{source}: the storage keys are not a list of distinct strings")
    if set(keys) != set(roots):
        odd = f"unused: {sorted(set(keys) - set(roots))}, missing: {sorted(set(roots) - set(keys))}"
        raise TorchFileError(f"{source}: storage records do not match the tensors' ({odd})")

    def read(key: str) -> np.ndarray:
        dtype, numel = roots[key]
        head = file.read(8)
        if len(head) < 8:
            raise TorchFileError(f"{source}: truncated file: storage {key} is missing")
        count = int.from_bytes(head, "little", signed=True)
        if count != numel:
            raise TorchFileError(f"{source}: storage {key} has {count} elements, expected {numel}")
        nbytes, available = count * DTYPES[dtype].itemsize, max(size - file.tell(), 0)
        buffer = np.empty(min(nbytes, available), np.uint8)  # no more than the file holds
        if file.readinto(buffer) < nbytes:
            held = f"{available} of {nbytes} bytes"
            raise TorchFileError(f"{source}: truncated file: storage {key} has {held}")
        return buffer

    return _assemble(obj, source, keys, read, "little")


def _record(archive: zipfile.ZipFile, name: str, source: str, nbytes: int | None = None) -> Any:
    """Record `name` (a storage's `nbytes`, or a small record), read in chunks once its header
    shows that reading it takes no more memory than that."""
    info = archive.getinfo(name)
    size, packed, method = info.file_size, info.compress_size, info.compress_type
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        why = f"compressed with zip method {method}: only stored and deflated records are read"
        raise TorchFileError(f"{source}: record {name} is {why}")
    if size > MAX_PICKLE_BYTES if nbytes is None else size != nbytes:
        what = "over the limit" if nbytes is None else f"not its storage's {nbytes} (numel x size)"
        raise TorchFileError(f"{source}: record {name} holds {size} bytes, {what}: not read")
    stored = method == zipfile.ZIP_STORED
    if packed > Path(str(archive.filename)).stat().st_size or stored and packed != size:
        raise TorchFileError(f"{source}: truncated or corrupt zip archive (record {name})")
    if size > max(_CHUNK, MAX_INFLATE * packed):
        ratio = f"{size // max(packed, 1)}:1 to {size} bytes (over {MAX_INFLATE}:1: a zip bomb?)"
        raise TorchFileError(f"{source}: record {name} inflates {ratio}")
    buffer = np.empty(size, np.uint8)
    with archive.open(info) as record:
        for start in range(0, size, _CHUNK):  # readinto reads len(chunk) bytes at a time
            if record.readinto(buffer[start : start + _CHUNK]) < min(_CHUNK, size - start):
                raise EOFError(f"record {name} ends early")
    return buffer


def _read_zip(path: Path, source: str) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pickles:
                raise TorchFileError(f"{source}: zip archive without '<archive>/data.pkl' record")
            prefix, names = pickles[0][: -len("data.pkl")], set(names)
            obj, roots = _load_pickle(io.BytesIO(_record(archive, pickles[0], source)), source)
            byteorder = "little"
            if prefix + "byteorder" in names:
                raw = _record(archive, prefix + "byteorder", source)[:16]
                byteorder = raw.tobytes().decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise TorchFileError(f"{source}: unknown byte order {_describe(byteorder)}")
            records = {key: f"{prefix}data/{key}" for key in roots}
            missing = sorted(name for name in records.values() if name not in names)
            if missing:
                raise TorchFileError(f"{source}: truncated archive: missing records {missing}")
            nbytes = {key: numel * DTYPES[dtype].itemsize for key, (dtype, numel) in roots.items()}

            def read(key: str) -> np.ndarray:
                return _record(archive, records[key], source, nbytes[key])

            return _assemble(obj, source, roots, read, byteorder)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise TorchFileError(f"{source}: truncated or corrupt zip archive ({err})") from err


def load(path: str | Path) -> Any:
    """Loads a `torch.save`d object made of dicts, lists, scalars and tensors (-> numpy)."""
    path, source = Path(path), str(path)
    try:
        with path.open("rb") as file:
            if file.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
                return _read_zip(path, source)
            if tarfile.is_tarfile(path):
                raise TorchFileError(f"{source}: torch < 0.4 tar checkpoints are not supported")
            return _read_legacy(file, source)
    except TorchFileError:
        raise
    except EOFError as err:
        raise TorchFileError(f"{source}: truncated file (the pickle ends early)") from err
    except (pickle.UnpicklingError, ValueError, TypeError, LookupError, AttributeError) as err:
        why = " ".join(str(err).split())[:300]  # one line, whatever the file put in it
        raise TorchFileError(f"{source}: truncated or corrupt PyTorch checkpoint ({why})") from err
    except (MemoryError, RecursionError) as err:  # not expected past the checks: still one line
        raise TorchFileError(f"{source}: too large to read ({type(err).__name__})") from err
    except OSError as err:
        raise TorchFileError(f"{source}: cannot read: {err}") from err


def as_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    """Checks that `obj` maps names to arrays (listing every entry that does not)."""
    if not isinstance(obj, Mapping):
        raise TorchFileError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    bad = [
        f"{_describe(key)} ({type(value).__name__})"
        for key, value in obj.items()
        if not (isinstance(key, str) and isinstance(value, np.ndarray))
    ]
    if bad:
        raise TorchFileError(f"{source}: not a mapping of name -> tensor; bad entries: {bad}")
    return dict(obj)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Loads a file that holds a plain state dict (name -> tensor)."""
    return as_state_dict(load(path), str(path))
