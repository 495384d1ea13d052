"""Generated stand-ins for the real datasets: audio files, a fake MTAT dir, MSD pickles, a CSV.

Everything is tiny (1-3 s clips) and deterministic, so the data tests run in seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import struct

import numpy as np
import soundfile as sf

from data_prep import magnatagatune
from jaxtag.tags import MTAT_TOP50


def reference_log_mel(y: np.ndarray) -> np.ndarray:
    """The released weights' recipe spelled out with every librosa parameter, independently of
    ``jaxtag.audio``'s constants (float32)."""
    import librosa

    s = librosa.feature.melspectrogram(
        y=y, sr=16000, n_fft=512, hop_length=256, n_mels=96, window="hann", center=True,
        pad_mode="reflect", power=2.0, htk=False, norm="slaney",
    )  # fmt: skip
    return librosa.amplitude_to_db(s, ref=1.0, amin=1e-5, top_db=80.0)


def reference_log_mel_of_file(path: str) -> np.ndarray:
    """``reference_log_mel`` of ``librosa.load(path, sr=16000)`` (mono, soxr_hq)."""
    import librosa

    return reference_log_mel(librosa.load(path, sr=16000, mono=True)[0])


def tone(seconds: float, freq: float, sr: int = 22_050, channels: int = 1, seed: int = 0):
    """A decaying harmonic tone plus a little noise: float32 ``(samples, channels)``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = sum(np.sin(2 * np.pi * freq * k * t) / k for k in (1, 2, 3)) * np.exp(-t)
    y = 0.3 * y + 0.01 * rng.standard_normal(t.size)
    return np.stack([y * (1 - 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)


def write_audio(
    path: str, seconds: float = 2.0, freq: float = 440.0, sr: int = 22_050, channels: int = 1,
    seed: int = 0,
) -> str:  # fmt: skip
    """Writes :func:`tone` in the format of ``path``'s extension (wav, flac, ogg, mp3)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sf.write(path, tone(seconds, freq, sr, channels, seed), sr)
    return path


def write_corrupt(path: str) -> str:
    """A file with an audio extension and garbage content (like MTAT's broken mp3s)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"ID3\x03\x00\x00\x00" + bytes(range(256)) * 8)
    return path


# ----------------------------------------------------------------------------------------------
# MagnaTagATune


@dataclasses.dataclass
class FakeClip:
    clip_id: str
    mp3_path: str
    tags: tuple[str, ...]
    split: str | None  # expected split, None when dropped
    status: str = "ok"  # ok | corrupt | missing | dropped


@dataclasses.dataclass
class FakeMtat:
    root: str
    header_tags: list[str]
    clips: list[FakeClip]

    def written(self, split: str) -> list[FakeClip]:
        return [c for c in self.clips if c.status == "ok" and c.split == split]


EXTRA_TAGS = ("zz rare", "aa rare")

# folder -> number of good clips; the original split: 0-b train, c validation, d-f test.
_FOLDERS = {"0": 2, "5": 2, "b": 1, "c": 3, "d": 2, "f": 1}


def make_fake_mtat(root: str, seconds: float = 2.0) -> FakeMtat:
    """A manual dir like MTAT's: ``annotations_final.csv`` (tab separated, every field quoted,
    clip_id / tag columns / mp3_path) and mp3s in folders named by hex digit.

    Besides good clips it has one clip with only non-top-50 tags (dropped), one corrupt mp3 and
    one listed mp3 that does not exist (both skipped and reported). Tags are the 50 reference
    tags plus two rare extras, in a shuffled column order.
    """
    rng = np.random.default_rng(7)
    header_tags = list(MTAT_TOP50) + list(EXTRA_TAGS)
    header_tags = [header_tags[i] for i in rng.permutation(len(header_tags))]
    top = list(MTAT_TOP50)
    clips: list[FakeClip] = []
    clip_id = 2

    def add(folder: str, tags: tuple[str, ...], split: str | None, status: str = "ok") -> None:
        nonlocal clip_id
        path = f"{folder}/artist_{clip_id}-album-01-song-{clip_id}-0-29.mp3"
        clips.append(FakeClip(str(clip_id), path, tags, split, status))
        clip_id += 3

    for folder, count in _FOLDERS.items():
        split = magnatagatune.SPLIT_OF_FOLDER[folder]
        for _ in range(count):
            k = int(rng.integers(1, 4))
            add(folder, tuple(top[i] for i in rng.choice(50, k, replace=False)), split)
    add("3", EXTRA_TAGS[:1], None, "dropped")
    add("1", ("guitar", "loud"), "train", "corrupt")
    add("e", ("piano",), "test", "missing")

    for i, clip in enumerate(clips):
        path = os.path.join(root, clip.mp3_path)
        if clip.status == "corrupt":
            write_corrupt(path)
        elif clip.status != "missing":
            write_audio(path, seconds, freq=110.0 * (1 + i % 7), sr=16_000, seed=i)
    with open(os.path.join(root, magnatagatune.ANNOTATIONS), "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(["clip_id", *header_tags, "mp3_path"])
        for clip in clips:
            values = [int(t in clip.tags) for t in header_tags]
            writer.writerow([clip.clip_id, *values, clip.mp3_path])
    return FakeMtat(root, header_tags, clips)


# ----------------------------------------------------------------------------------------------
# Python 2 pickles (as the original MSD split files are)


def py2_pickle(obj: object) -> bytes:
    """Pickles ``obj`` the way Python 2 with numpy 1 did (protocol 2): ``str`` as byte strings
    (SHORT_BINSTRING/BINSTRING), arrays via ``numpy.core.multiarray._reconstruct`` with their raw
    bytes as a byte string. Supports str, int, list, dict and numpy arrays, enough for the
    MSD files; loading needs ``encoding='latin1'`` as the real files do."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(
            b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b
        )

    def dump(x: object) -> None:
        if isinstance(x, str):
            string(x.encode("latin1"))
        elif isinstance(x, bool | np.bool_):
            out.extend(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            out.extend(b"J" + struct.pack("<i", x))
        elif isinstance(x, list):
            out.extend(b"](")
            for item in x:
                dump(item)
            out.extend(b"e")
        elif isinstance(x, dict):
            out.extend(b"}(")
            for key, value in x.items():
                dump(key)
                dump(value)
            out.extend(b"u")
        elif isinstance(x, np.ndarray):
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            string(b"b")
            out.extend(b"\x87R(K\x01")
            out.extend(b"(" + b"".join(b"J" + struct.pack("<i", d) for d in x.shape) + b"t")
            out.extend(b"cnumpy\ndtype\n")
            string(x.dtype.str[1:].encode())
            out.extend(b"K\x00K\x01\x87R(K\x03")
            string(b"<" if x.dtype.itemsize > 1 else b"|")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(x))

    dump(obj)
    out.extend(b".")
    return bytes(out)


@dataclasses.dataclass
class FakeMsd:
    root: str
    vectors: dict[str, np.ndarray]
    train_ids: list[str]
    test_ids: list[str]
    missing_ids: list[str]
    paths: dict[str, str]  # id -> audio path relative to root (where it was written)


def make_fake_msd(root: str, seconds: float = 1.5) -> FakeMsd:
    """A manual dir like the original MSD preprocessing: the five pickles (Python 2 style) and
    audio at 7digital paths or in the MSD-id layout under ``audio/``; one id without audio."""
    rng = np.random.default_rng(3)
    ids = [f"TR{chr(65 + i)}{chr(66 + i)}{chr(67 + i)}12903CB{i:04d}" for i in range(9)]
    train_ids, test_ids = ids[:6], ids[6:]
    vectors = {i: (rng.random(50) < 0.2).astype(np.int64) for i in ids}
    vectors[ids[0]][[0, 49]] = 1
    to_7d, to_path, paths, missing = {}, {}, {}, [ids[4]]
    for n, msd_id in enumerate(ids):
        if msd_id in missing:
            continue
        if n % 2 == 0:  # by its 7digital path
            seven_d = 8_000_000 + n
            rel = f"{n % 10}/{n % 7}/{seven_d}.clip.mp3"
            to_7d[msd_id], to_path[seven_d] = seven_d, rel
        else:  # by the MSD-id layout under audio/
            rel = os.path.join("audio", msd_id[2], msd_id[3], msd_id[4], msd_id + ".mp3")
        write_audio(os.path.join(root, rel), seconds, freq=200.0 + 50 * n, seed=n)
        paths[msd_id] = rel
    files = {
        "filtered_list_train.cP": train_ids,
        "filtered_list_test.cP": test_ids,
        "msd_id_to_tag_vector.cP": vectors,
        "MSD_id_to_7D_id.pkl": to_7d,
        "7D_id_to_path.pkl": to_path,
    }
    for name, obj in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(py2_pickle(obj))
    return FakeMsd(root, vectors, train_ids, test_ids, missing, paths)
