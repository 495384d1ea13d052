"""A small random-weight checkpoint and varied audio files for the `tag` and `embed` tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from jaxtag.checkpoint import save_model
from jaxtag.model import ModelConfig, init_variables
from tests.data_fixtures import write_audio

SMALL = ModelConfig(conv_channels=2, width=64, num_layers=2, num_heads=4, ffn_size=128, num_tags=6)
TAGS = ["guitar", "drums", "slow", "piano", "loud", "vocal"]


def small_variables(seed: int = 0, config: ModelConfig = SMALL) -> dict:
    """Random weights; the input BatchNorm normalises dB values so the outputs are not saturated."""
    variables = init_variables(config, jax.random.PRNGKey(seed))
    variables = jax.tree_util.tree_map(np.array, variables)
    variables["batch_stats"]["front_end"]["input_bn"]["mean"][:] = -30.0
    variables["batch_stats"]["front_end"]["input_bn"]["var"][:] = 20.0**2
    return variables


def make_checkpoint(
    directory: Path, variables: dict | None = None, tags: list[str] | None = None
) -> Path:
    """A checkpoint of the SMALL model; other `tags` than TAGS resize its output layer."""
    tags = TAGS if tags is None else tags
    config = dataclasses.replace(SMALL, num_tags=len(tags))
    return save_model(directory, variables or small_variables(config=config), config, tags)


def write_library(root: Path, seconds: list[float]) -> list[str]:
    """Tones of the given lengths in several formats and rates, in nested folders; the paths."""
    formats = [(".wav", 16_000), (".flac", 44_100), (".ogg", 22_050), (".wav", 22_050)]
    paths = []
    for i, length in enumerate(seconds):
        ext, rate = formats[i % len(formats)]
        path = root / f"set{i % 2}" / f"track{i:02d}{ext}"
        paths.append(write_audio(str(path), length, 220.0 * (1 + i), rate, seed=i))
    return paths
