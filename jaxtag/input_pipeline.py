"""tf.data input pipeline over the TFDS spectrogram shards written by ``data_prep/``.

Yields numpy batches already split over the local devices (``[num_local_devices, per_device,
...]``) for ``jax.pmap``. Training: an infinite, seed-deterministic stream of one random
``crop_frames`` crop per clip. Evaluation: every clip of a split exactly once as its
``audio.EVAL_CHUNKS`` chunks, with the last batch padded and masked. On multi-host runs each
process reads only its contiguous share of the split (``split[a:b]``).

The chunking math is :mod:`jaxtag.audio`'s as TF ops, tested equal to the numpy versions.

A shard damaged on disk (TF's ``DataLossError``, whose message names no file) ends the iterators
in a :class:`DamagedShardError` naming the shard (found by reading each shard of the split).

TensorFlow stays off accelerators (``set_visible_devices([], 'GPU')`` at import): JAX owns them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxtag import audio
from jaxtag.errors import JaxtagError


def _hide_accelerators_from_tf() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # TF already initialised its devices, or no GPU support.
        pass


_hide_accelerators_from_tf()

_TFDS_NOISE = (
    "Variant folder ",  # "... has no dataset_info.json": TFDS looking for a build, on every build
    "`FeatureConnector.dtype` is deprecated",  # TFDS's own decoder reads that field
)


class _DropTfdsNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in str(record.msg) for noise in _TFDS_NOISE)


def quiet_tfds() -> None:
    """Keeps TFDS's own progress bars and its warnings about itself off the user's screen."""
    tfds.disable_progress_bar()
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropTfdsNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_DropTfdsNoise())


quiet_tfds()

CACHE_MAX_BYTES = 1 << 30
"""Training caches a process's share of a split in memory when its shards are at most this big."""


# ----------------------------------------------------------------------------------------------
# Datasets


BUILD_COMMAND = "python -m jaxtag.data_prep.build"
"""How a dataset is built (``data_prep/build.py``); named in the error for an unbuilt dataset."""


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The built dataset ``name`` in ``data_dir``, read from its files (no builder code needed).

    ``name`` is ``NAME``, ``NAME/CONFIG`` or either with ``:VERSION`` (e.g. 'magnatagatune',
    'synthetic_tags/small', 'msd:1.0.0'): the files under ``DATA_DIR/NAME[/CONFIG]/VERSION``,
    the newest version by default; without ``/CONFIG`` the one config built there (several: an
    error listing them). ``name`` may also be a version directory itself (the one holding
    ``dataset_info.json``). Raises ``FileNotFoundError`` naming the build command when the
    dataset has not been built.
    """
    if os.path.isfile(os.path.join(name, "dataset_info.json")):
        return tfds.builder_from_directory(name)
    return tfds.builder_from_directory(dataset_dir(name, data_dir))


def _versions(directory: str) -> list[str]:
    """Completely built versions in ``directory`` (TFDS writes ``dataset_info.json`` last)."""
    if not os.path.isdir(directory):
        return []
    found = [
        v
        for v in os.listdir(directory)
        if re.fullmatch(r"\d+\.\d+\.\d+", v)
        and os.path.isfile(os.path.join(directory, v, "dataset_info.json"))
    ]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def built_datasets(data_dir: str) -> list[str]:
    """``NAME`` or ``NAME/CONFIG`` of every dataset built in ``data_dir``."""
    if not os.path.isdir(data_dir):
        return []
    names = []
    for dataset in sorted(os.listdir(data_dir)):
        root = os.path.join(data_dir, dataset)
        if _versions(root):
            names.append(dataset)
        elif os.path.isdir(root):
            names += [
                f"{dataset}/{c}" for c in sorted(os.listdir(root)) if _versions(f"{root}/{c}")
            ]
    return names


def dataset_dir(name: str, data_dir: str | None) -> str:
    """The version directory that :func:`get_builder` reads for ``name`` (see there)."""
    data_dir = os.path.expanduser(data_dir or "~/tensorflow_datasets")
    path, _, version = name.partition(":")
    dataset, _, config = path.partition("/")
    root = os.path.join(data_dir, dataset)
    if config:
        root = os.path.join(root, config)
    elif not _versions(root):
        configs = [c for c in built_datasets(data_dir) if c.startswith(dataset + "/")]
        if len(configs) > 1:
            raise FileNotFoundError(
                f"dataset {dataset} has several configs built in {data_dir}: "
                f"{', '.join(configs)}; name one of them"
            )
        if configs:
            root = os.path.join(data_dir, configs[0])
    versions = _versions(root)
    if version in versions or (versions and not version):
        return os.path.join(root, version or versions[-1])
    command = f"{BUILD_COMMAND} {dataset} --data_dir {data_dir}" + (
        f" --config {config}" if config else ""
    )
    built = ", ".join(built_datasets(data_dir)) or "none"
    raise FileNotFoundError(
        f"dataset {name} is not built in {data_dir} (built there: {built}); build it with: "
        f"{command}"
    )


def tag_names(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The tag order of the ``tags`` vectors, read from the built dataset's metadata."""
    metadata = builder.info.metadata
    if not metadata or "tag_names" not in metadata:
        raise KeyError(f"{builder.data_dir}: dataset metadata has no 'tag_names'")
    return list(metadata["tag_names"])


class SplitNotFoundError(KeyError, ValueError):
    """The dataset has no such split; the message lists the splits it has."""

    def __str__(self) -> str:
        return str(self.args[0])


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Examples in ``split`` (all processes together); ``SplitNotFoundError`` (a KeyError and a
    ValueError) naming the splits that exist."""
    splits = builder.info.splits
    if split.split("[")[0] not in splits:
        raise SplitNotFoundError(
            f"{builder.name} has no split {split!r}; it has {', '.join(sorted(splits.keys()))}"
        )
    return int(splits[split].num_examples)


def process_split(
    builder: tfds.core.DatasetBuilder, split: str, process_index: int, process_count: int
) -> tuple[str, int]:
    """This process's contiguous share of ``split`` as a TFDS split string, and its size.

    Shares are ``[n*i//P, n*(i+1)//P)``: disjoint, covering every example, sizes differing by <= 1.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    n = num_examples(builder, split)
    if process_count == 1:
        return split, n
    start, end = n * process_index // process_count, n * (process_index + 1) // process_count
    return f"{split}[{start}:{end}]", end - start


def _per_device(batch_size: int, process_count: int, num_local_devices: int) -> int:
    devices = process_count * num_local_devices
    if batch_size <= 0 or batch_size % devices:
        raise ValueError(
            f"batch size {batch_size} is not a positive multiple of the number of devices "
            f"({process_count} processes x {num_local_devices} local devices = {devices})"
        )
    return batch_size // devices


def _read(builder, split: str, *, shuffle: bool, seed: int, features=()) -> tf.data.Dataset:
    """The split's examples; with ``features`` (names), only those are parsed and decoded."""
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    decoders = features and tfds.decode.PartialDecoding(dict.fromkeys(features, True))
    return builder.as_dataset(
        split=split, shuffle_files=shuffle, read_config=read_config, decoders=decoders or None
    )


class DamagedShardError(JaxtagError):
    """A TFRecord shard of a built dataset cannot be read; the message names it."""


def _damaged(shard: str) -> bool:
    """Whether a record of ``shard`` fails TF's length or CRC checks (each read, none parsed)."""
    try:
        tf.data.TFRecordDataset(shard).reduce(np.int64(0), lambda n, _: n + 1)
    except (tf.errors.DataLossError, tf.errors.NotFoundError):
        return True
    return False


def _named_damage(
    batches: Iterator[Any], builder: tfds.core.DatasetBuilder, split: str
) -> Iterator[Any]:
    """``batches``; TF's ``DataLossError`` (naming no file) as a DamagedShardError naming it."""
    try:
        yield from batches
    except tf.errors.DataLossError as err:
        # TF says e.g. "{{function_node ...}} corrupted record at 122135 [Op:IteratorGetNext]".
        detail = re.sub(r"\{\{.*?\}\}", "", err.message or "").split("[Op:")[0].strip()
        shards = sorted(map(os.fspath, builder.info.splits[split.split("[")[0]].filepaths))
        bad = ", ".join(filter(_damaged, shards))  # every record of every shard checked
        where = bad or f"{builder.data_dir} (one of {', '.join(map(os.path.basename, shards))})"
        raise DamagedShardError(
            f"{where}: damaged TFRecord shard of split {split} ({detail or 'unreadable'}); delete "
            f"{builder.data_dir} and build the dataset again"
        ) from err


def _tags(example: dict[str, tf.Tensor], num_tags: int) -> tf.Tensor:
    # ensure_shape: audio_folder stores a dynamic-length vector (its vocabulary is data-defined).
    return tf.ensure_shape(tf.cast(example["tags"], tf.float32), [num_tags])


# ----------------------------------------------------------------------------------------------
# Chunking as TF ops (numpy originals in jaxtag.audio)


def tf_pad_to(mel: tf.Tensor, frames: int = audio.CHUNK_FRAMES) -> tf.Tensor:
    """``audio.pad_to``: pads the time axis at the end with the clip's minimum to ``frames``."""
    pad = tf.maximum(frames - tf.shape(mel)[-1], 0)
    return tf.pad(mel, [[0, 0], [0, pad]], constant_values=tf.reduce_min(mel))


def tf_crop(mel: tf.Tensor, start: tf.Tensor, frames: int = audio.CHUNK_FRAMES) -> tf.Tensor:
    """``audio.crop``: ``frames`` frames of the padded mel from ``start``."""
    crop = tf_pad_to(mel, frames)[:, start : start + frames]
    return tf.ensure_shape(crop, [audio.N_MELS, frames])


def tf_random_crop_start(n_frames: tf.Tensor, seed: tf.Tensor, frames: int) -> tf.Tensor:
    """Uniform start in ``[0, max(n_frames, frames) - frames]`` from a stateless ``seed`` (2,)."""
    high = tf.maximum(n_frames, frames) - frames + 1
    return tf.random.stateless_uniform([], seed=seed, minval=0, maxval=high, dtype=tf.int32)


def tf_eval_chunks(
    mel: tf.Tensor, n_chunks: int = audio.EVAL_CHUNKS, frames: int = audio.CHUNK_FRAMES
) -> tf.Tensor:
    """``audio.eval_chunks``: ``(n_chunks, N_MELS, frames)`` at ``i * ((n - frames) // n_chunks)``
    (``n``: padded length)."""
    mel = tf_pad_to(mel, frames)
    hop = (tf.shape(mel)[-1] - frames) // n_chunks
    index = tf.range(n_chunks)[:, None] * hop + tf.range(frames)[None, :]
    chunks = tf.transpose(tf.gather(mel, index, axis=1), [1, 0, 2])
    return tf.ensure_shape(chunks, [n_chunks, audio.N_MELS, frames])


def _split_devices(batch: dict[str, tf.Tensor], num_local_devices: int) -> dict[str, tf.Tensor]:
    """``[B, ...] -> [num_local_devices, B // num_local_devices, ...]`` for every entry."""
    out = {}
    for key, value in batch.items():
        shape = tf.concat([[num_local_devices, -1], tf.shape(value)[1:]], axis=0)
        out[key] = tf.reshape(value, shape)
    return out


# ----------------------------------------------------------------------------------------------
# Iterators


def train_dataset(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    num_local_devices: int,
    process_index: int = 0,
    process_count: int = 1,
    crop_frames: int = audio.CHUNK_FRAMES,
    shuffle_buffer: int = 10_000,
    cache: bool | None = None,
) -> tf.data.Dataset:
    """The ``tf.data.Dataset`` behind :func:`train_iterator` (same arguments)."""
    per_device = _per_device(global_batch_size, process_count, num_local_devices)
    sub, size = process_split(builder, split, process_index, process_count)
    if size == 0:
        raise ValueError(f"{builder.name}: split {sub} of process {process_index} is empty")
    num_tags = len(tag_names(builder))
    if cache is None:
        num_bytes = builder.info.splits[split].num_bytes
        cache = num_bytes * size <= CACHE_MAX_BYTES * max(num_examples(builder, split), 1)

    # Only mel and tags parsed: the clip id, path and evidence cost ~8 % of the rate (bench_input).
    ds = _read(builder, sub, shuffle=True, seed=seed, features=("mel", "tags"))
    ds = ds.map(lambda ex: {"mel": ex["mel"], "tags": _tags(ex, num_tags)})
    if cache:
        ds = ds.cache()
    ds = ds.repeat().enumerate()

    def crop(index: tf.Tensor, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        # One stateless seed per element of the repeated stream: deterministic with parallel map.
        element_seed = tf.stack([tf.constant(seed, tf.int64), index])
        start = tf_random_crop_start(tf.shape(ex["mel"])[-1], element_seed, crop_frames)
        return {"mel": tf_crop(ex["mel"], start, crop_frames), "tags": ex["tags"]}

    # Crop before shuffling: the buffer then holds 256-frame crops, not whole clips (~7x less
    # memory for 29 s clips); each clip still gets a fresh crop on every pass.
    ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # A buffer larger than the share would only delay the first batch (it fills before emitting).
    ds = ds.shuffle(min(shuffle_buffer, size), seed=seed)
    ds = ds.batch(per_device * num_local_devices, drop_remainder=True)
    ds = ds.map(
        lambda b: _split_devices(
            {"mel": tf.cast(b["mel"], tf.float32), "tags": b["tags"]}, num_local_devices
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def train_iterator(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    num_local_devices: int,
    process_index: int = 0,
    process_count: int = 1,
    crop_frames: int = audio.CHUNK_FRAMES,
    shuffle_buffer: int = 10_000,
    cache: bool | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches, identical for identical arguments.

    Yields ``{'mel': float32 [num_local_devices, per_device, N_MELS, crop_frames], 'tags': float32
    [num_local_devices, per_device, num_tags]}`` with ``per_device = global_batch_size //
    (process_count * num_local_devices)`` (ValueError if not divisible). Each pass over the clips
    gives one uniformly random crop per clip (clips shorter than ``crop_frames`` are padded as
    ``audio.pad_to`` does); passes repeat forever; the shard files and then a buffer of
    ``min(shuffle_buffer, share size)`` crops are shuffled (the buffer spans pass boundaries).
    This process reads only its share of ``split`` (see :func:`process_split`). ``cache``: keep the
    decoded share in memory (default: if its shards total at most ``CACHE_MAX_BYTES``). A damaged
    shard raises :class:`DamagedShardError` naming it.
    """
    ds = train_dataset(
        builder,
        split,
        global_batch_size=global_batch_size,
        seed=seed,
        num_local_devices=num_local_devices,
        process_index=process_index,
        process_count=process_count,
        crop_frames=crop_frames,
        shuffle_buffer=shuffle_buffer,
        cache=cache,
    )
    yield from _named_damage(ds.as_numpy_iterator(), builder, split)


def eval_num_batches(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    batch_size: int,
    num_local_devices: int,
    process_count: int = 1,
) -> int:
    """Batches :func:`eval_iterator` yields; the same on every process (they may pmap together)."""
    per_process = _per_device(batch_size, process_count, num_local_devices) * num_local_devices
    largest_share = -(-num_examples(builder, split) // process_count)
    return -(-largest_share // per_process)


def eval_iterator(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    batch_size: int,
    num_local_devices: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, Any]]:
    """Every clip of this process's share of ``split`` exactly once, in a fixed order.

    ``batch_size`` is global, like ``train_iterator``'s (``per_device = batch_size //
    (process_count * num_local_devices)``). Yields ``{'mel': float32 [num_local_devices,
    per_device, EVAL_CHUNKS, N_MELS, CHUNK_FRAMES], 'tags': float32 [..., num_tags], 'mask': bool
    [num_local_devices, per_device], 'clip_id': bytes object array [num_local_devices,
    per_device]}``. Padding entries (zeros, ``mask`` False, ``clip_id`` b'') fill the last batches
    so that every process yields :func:`eval_num_batches` batches. A damaged shard raises
    :class:`DamagedShardError` naming it.
    """
    per_process = _per_device(batch_size, process_count, num_local_devices) * num_local_devices
    steps = eval_num_batches(
        builder,
        split,
        batch_size=batch_size,
        num_local_devices=num_local_devices,
        process_count=process_count,
    )
    sub, _ = process_split(builder, split, process_index, process_count)
    num_tags = len(tag_names(builder))

    def chunk(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {
            "mel": tf_eval_chunks(ex["mel"]),
            "tags": _tags(ex, num_tags),
            "mask": tf.constant(True),
            "clip_id": ex["clip_id"],
        }

    ds = _read(builder, sub, shuffle=False, seed=0).map(chunk, num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors(
        {
            "mel": tf.zeros([audio.EVAL_CHUNKS, audio.N_MELS, audio.CHUNK_FRAMES], tf.float16),
            "tags": tf.zeros([num_tags], tf.float32),
            "mask": tf.constant(False),
            "clip_id": tf.constant(b""),
        }
    ).repeat()
    ds = ds.concatenate(padding).take(steps * per_process)
    ds = ds.batch(per_process, drop_remainder=True)
    ds = ds.map(
        lambda b: _split_devices(b | {"mel": tf.cast(b["mel"], tf.float32)}, num_local_devices)
    )
    yield from _named_damage(ds.prefetch(2).as_numpy_iterator(), builder, split)
