"""The torch-free `.pth` reader against files written by torch itself (both formats)."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxtag import torch_file
from jaxtag.torch_file import TorchFileError

pytestmark = pytest.mark.torch  # the PyTorch reference (tests/conftest.py TORCH_MODULES)

FORMATS = {"legacy": False, "zip": True}  # -> _use_new_zipfile_serialization


def _save(obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _as_numpy(value: torch.Tensor) -> np.ndarray:
    value = value.detach()
    if value.dtype == torch.bfloat16:
        return value.float().numpy()
    if value.dtype == torch.uint16:
        return value.to(torch.int32).numpy().astype(np.uint16)
    return value.numpy()


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=gen)
    return {
        "base": base,
        "rows": base[1:4],  # same storage, offset 6
        "strided": base[1:, ::2],  # offset + stride
        "transposed": base.T,  # non-contiguous
        "conv": torch.randn(4, 1, 3, 2, generator=gen),
        "double": torch.randn(3, generator=gen, dtype=torch.float64),
        "half": torch.randn(3, generator=gen).half(),
        "bfloat16": torch.randn(3, generator=gen).bfloat16(),
        "long_scalar": torch.tensor(123456789012),
        "int": torch.tensor([-3, 7], dtype=torch.int32),
        "short": torch.tensor([-3, 7], dtype=torch.int16),
        "char": torch.tensor([-3, 7], dtype=torch.int8),
        "byte": torch.tensor([3, 250], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "uint16": torch.tensor([1, 65535]).to(torch.uint16),  # _rebuild_tensor_v3 + UntypedStorage
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.full((2,), 0.5)),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_every_dtype_and_view_exactly(fmt, tmp_path):
    tensors = _tensors()
    loaded = torch_file.load_state_dict(
        _save(collections.OrderedDict(tensors), tmp_path / "t", fmt)
    )
    assert list(loaded) == list(tensors)
    for key, value in tensors.items():
        got, want = loaded[key], _as_numpy(value)
        assert got.shape == want.shape, key
        assert got.dtype.name == str(value.dtype).removeprefix("torch."), key
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=key)
    loaded["rows"][0, 0] = 1e9  # views of one storage come back as independent arrays
    assert loaded["base"][1, 0] != 1e9


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_nested_checkpoints(fmt, tmp_path):
    obj = {"model": {"w": torch.ones(2, 2)}, "epoch": 3, "history": [0.5, (1, "a")]}
    loaded = torch_file.load(_save(obj, tmp_path / "t", fmt))
    assert loaded["epoch"] == 3 and loaded["history"] == [0.5, (1, "a")]
    np.testing.assert_array_equal(loaded["model"]["w"], np.ones((2, 2), np.float32))
    with pytest.raises(TorchFileError, match="not a mapping of name -> tensor.*'epoch' \\(int\\)"):
        torch_file.as_state_dict(loaded, "t")


def _legacy_file_with_storage_view(path: Path) -> None:
    """A torch-1.0-style legacy file whose tensor lives in a *view* of a storage.

    torch >= 1.6 never writes storage views, but the persistent id format that torch 1.x used
    has them: ('storage', type, root_key, location, root_numel, (view_key, offset, size)).
    """

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):
            args = (storage, 1, (2,), (2,), False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "root", "cpu", 6, ("view", 2, 4))
            return None

    storage, out = Storage(), io.BytesIO()
    for header in (torch_file.MAGIC_NUMBER, torch_file.PROTOCOL_VERSION, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    Pickler(out, protocol=2).dump({"t": Tensor()})
    pickle.dump(["root"], out, protocol=2)
    out.write(struct.pack("<q", 6) + np.arange(6, dtype="<f4").tobytes())
    path.write_bytes(out.getvalue())


def test_legacy_storage_views(tmp_path):
    _legacy_file_with_storage_view(tmp_path / "view.pth")
    # root [0 .. 5] -> view [2, 3, 4, 5] -> offset 1, size 2, stride 2 -> [3, 5]
    got = torch_file.load_state_dict(tmp_path / "view.pth")["t"]
    np.testing.assert_array_equal(got, np.array([3.0, 5.0], np.float32))
    assert torch.load(tmp_path / "view.pth", weights_only=False)["t"].tolist() == [3.0, 5.0]


@pytest.fixture()
def saved(tmp_path) -> dict[str, Path]:
    state = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.BatchNorm1d(20)).state_dict()
    return {fmt: _save(state, tmp_path / f"{fmt}.pth", fmt) for fmt in FORMATS}


def _expect_error(path: Path, pattern: str) -> None:
    with pytest.raises(TorchFileError, match=pattern) as info:
        torch_file.load(path)
    assert str(path) in str(info.value)  # every message names the file


def test_not_a_torch_file(tmp_path):
    for name, content in {
        "text.pth": b"hello, this is not a checkpoint\n",
        "empty.pth": b"",
        "pickle.pth": pickle.dumps({"a": 1}),
        "npy.pth": b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'",
    }.items():
        (tmp_path / name).write_bytes(content)
        _expect_error(tmp_path / name, "not a PyTorch checkpoint")


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    _expect_error(tmp_path / "other.zip", "without '<archive>/data.pkl'")


def test_truncated_legacy_file(tmp_path):
    data = _save({"w": torch.zeros(20)}, tmp_path / "one.pth", "legacy").read_bytes()
    (tmp_path / "short_data.pth").write_bytes(data[:-10])  # the only storage, 10 bytes short
    _expect_error(tmp_path / "short_data.pth", r"truncated file: storage \d+ has 70 of 80 bytes")
    (tmp_path / "no_data.pth").write_bytes(data[:-84])  # inside its element count
    _expect_error(tmp_path / "no_data.pth", r"truncated file: storage \d+ is missing")
    (tmp_path / "short_pickle.pth").write_bytes(data[:200])  # inside the object pickle
    _expect_error(tmp_path / "short_pickle.pth", "truncated or corrupt PyTorch checkpoint")


def test_truncated_zip_file(saved, tmp_path):
    data = saved["zip"].read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "half.pth", "truncated or corrupt zip archive")


def test_zip_missing_storage_records(saved, tmp_path):
    with zipfile.ZipFile(saved["zip"]) as src, zipfile.ZipFile(tmp_path / "m.pth", "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith(("/data/1", "/data/3")):
                dst.writestr(info, src.read(info))
    _expect_error(tmp_path / "m.pth", r"missing records \['zip/data/1', 'zip/data/3'\]")


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_whole_modules(fmt, tmp_path):
    path = _save(torch.nn.Linear(2, 2), tmp_path / "module.pth", fmt)
    _expect_error(path, "refusing to load 'torch.nn.modules.linear.Linear'")


def test_refuses_arbitrary_callables(tmp_path):
    """A pickle naming os.system is refused before anything runs."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    out = io.BytesIO()
    for header in (torch_file.MAGIC_NUMBER, torch_file.PROTOCOL_VERSION, {}, {"x": Evil()}, []):
        pickle.dump(header, out, protocol=2)
    (tmp_path / "evil.pth").write_bytes(out.getvalue())
    _expect_error(tmp_path / "evil.pth", r"refusing to load '(posix|nt)\.system'")
    assert not marker.exists()


def test_big_endian_zip(tmp_path):
    """Zip files carry their byte order; a big-endian writer's bytes are swapped on reading."""
    tensors = {
        "f": torch.tensor([1.5, -2.25]),
        "h": torch.tensor([0.5, 3.0]).half(),
        "l": torch.tensor([1, -(2**40)]),
        "b": torch.tensor([True, False]),
    }
    little = _save(tensors, tmp_path / "little.pth", "zip")
    itemsizes = {str(i): t.element_size() for i, t in enumerate(tensors.values())}
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(tmp_path / "big.pth", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            prefix, _, key = info.filename.rpartition("/")
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif prefix.endswith("/data"):
                data = np.frombuffer(data, f"u{itemsizes[key]}").byteswap().tobytes()
            dst.writestr(info, data)
    loaded = torch_file.load_state_dict(tmp_path / "big.pth")
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=key)
