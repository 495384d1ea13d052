"""Where training batches come from: any object with the `DataSource` methods feeds the loop.

Two sources ship: `TfdsSource` (the tf.data pipeline over built TFDS shards, jaxtag/
input_pipeline.py) and `ArraySource` (numpy arrays in memory: benchmarks, tests, machines without
TensorFlow). Both yield batches already split over this process's devices,
`[num_local_devices, per_device, ...]`, and on multi-host runs each process reads its own share.
This module imports no TensorFlow; `TfdsSource` does, when it is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import numpy as np


class DataSource(Protocol):
    """What `train.train_and_evaluate` reads.

    `train_batches` is an infinite stream that is a pure function of (batch size, seed), started
    at `start_step` (a resumed run sees the batches the uninterrupted run would); batches are
    `{'mel': float32 [devices, per_device, n_mels, frames], 'tags': float32 [..., num_tags]}`.
    `eval_batches` is one pass over the validation clips: `{'mel': [devices, per_device, chunks,
    n_mels, frames], 'tags': ..., 'mask': bool [devices, per_device]}`, padding masked out, the
    same number of batches on every process.

    Optional, read by the checks before a run (`jaxtag.run_config.validate`): `splits` (the
    dataset's split names: the config's train and eval splits must be among them) and
    `num_eval_examples` (the validation clips; a run needs at least one).
    """

    tags: list[str]
    num_train_examples: int  # all processes together

    def train_batches(
        self, global_batch_size: int, seed: int, start_step: int
    ) -> Iterator[dict[str, np.ndarray]]: ...

    def eval_batches(self, global_batch_size: int) -> Iterator[dict[str, np.ndarray]]: ...


def _per_device(batch_size: int) -> int:
    if batch_size <= 0 or batch_size % jax.device_count():
        raise ValueError(
            f"batch size {batch_size} is not a positive multiple of the {jax.device_count()} "
            "devices"
        )
    return batch_size // jax.device_count()


class TfdsSource:
    """A dataset built by `python -m data_prep.build` (see jaxtag/input_pipeline.py)."""

    def __init__(self, config: Any):
        from jaxtag import input_pipeline

        self._pipeline = input_pipeline
        self.builder = input_pipeline.get_builder(
            config.dataset, os.path.expanduser(config.data_dir)
        )
        self.tags = input_pipeline.tag_names(self.builder)
        # A missing split is counted as empty here and named by the checks before the run
        # (jaxtag/run_config.py), with every other bad field, instead of one at a time.
        self.splits = sorted(self.builder.info.splits.keys())

        def count(split: str) -> int:
            if split.split("[")[0] not in self.splits:
                return 0
            return input_pipeline.num_examples(self.builder, split)

        self.num_train_examples = count(config.train_split)
        self.num_eval_examples = count(config.eval_split)
        self.train_split, self.eval_split = config.train_split, config.eval_split
        self.crop_frames, self.shuffle_buffer = config.crop_frames, config.shuffle_buffer

    def train_batches(
        self, global_batch_size: int, seed: int, start_step: int
    ) -> Iterator[dict[str, np.ndarray]]:
        batches = self._pipeline.train_iterator(
            self.builder,
            self.train_split,
            global_batch_size=global_batch_size,
            seed=seed,
            num_local_devices=jax.local_device_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            crop_frames=self.crop_frames,
            shuffle_buffer=self.shuffle_buffer,
        )
        # The stream is a pure function of the seed: skipping the steps already taken puts a
        # resumed run on exactly the batches the uninterrupted run would see.
        for _ in range(start_step):
            next(batches)
        return batches

    def eval_batches(self, global_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        batches = self._pipeline.eval_iterator(
            self.builder,
            self.eval_split,
            batch_size=global_batch_size,
            num_local_devices=jax.local_device_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return ({k: b[k] for k in ("mel", "tags", "mask")} for b in batches)


class ArraySource:
    """Training and validation examples held in memory as numpy arrays.

    `train_mel` (N, n_mels, frames) is used whole (no cropping); `eval_mel` (M, chunks, n_mels,
    frames) holds each validation clip's chunks. Each epoch visits the training examples in a
    permutation drawn from (seed, epoch); a global batch is cut into one contiguous share per
    process, then per device, so a run's numbers do not depend on how its devices are spread
    over processes.
    """

    def __init__(
        self,
        train_mel: np.ndarray,
        train_tags: np.ndarray,
        eval_mel: np.ndarray,
        eval_tags: np.ndarray,
        tags: list[str],
    ):
        if len(train_mel) != len(train_tags) or len(eval_mel) != len(eval_tags):
            raise ValueError("mel and tag arrays differ in length")
        self.train_mel, self.train_tags = train_mel, np.asarray(train_tags, np.float32)
        self.eval_mel, self.eval_tags = eval_mel, np.asarray(eval_tags, np.float32)
        self.tags = list(tags)
        self.num_train_examples, self.num_eval_examples = len(train_mel), len(eval_mel)

    def train_batches(
        self, global_batch_size: int, seed: int, start_step: int
    ) -> Iterator[dict[str, np.ndarray]]:
        per_device, n = _per_device(global_batch_size), self.num_train_examples
        if global_batch_size > n:
            raise ValueError(f"global batch {global_batch_size} exceeds the {n} examples")
        per_epoch = n // global_batch_size  # the rest of a permutation is dropped
        share = per_device * jax.local_device_count()
        first = jax.process_index() * share
        step = start_step
        while True:
            epoch, index = divmod(step, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(n)
            rows = order[index * global_batch_size :][:global_batch_size][first : first + share]
            yield {
                "mel": self.train_mel[rows]
                .astype(np.float32)
                .reshape(-1, per_device, *self.train_mel.shape[1:]),
                "tags": self.train_tags[rows].reshape(-1, per_device, self.train_tags.shape[-1]),
            }
            step += 1

    def eval_batches(self, global_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        per_device, n = _per_device(global_batch_size), len(self.eval_mel)
        share = per_device * jax.local_device_count()
        processes = jax.process_count()
        start = n * jax.process_index() // processes
        end = n * (jax.process_index() + 1) // processes
        largest_share = -(-n // processes)
        num_batches = -(-largest_share // share)
        for b in range(num_batches):
            rows = np.arange(start + b * share, start + (b + 1) * share)
            mask = rows < end
            rows = np.where(mask, rows, n - 1)  # padding repeats a real clip, masked out
            yield {
                "mel": self.eval_mel[rows]
                .astype(np.float32)
                .reshape(-1, per_device, *self.eval_mel.shape[1:]),
                "tags": self.eval_tags[rows].reshape(-1, per_device, self.eval_tags.shape[-1]),
                "mask": mask.reshape(-1, per_device),
            }
