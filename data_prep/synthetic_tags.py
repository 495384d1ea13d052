"""``synthetic_tags``: generated music-like clips with audible tags and where each is audible.

No download: the clips are rendered by :mod:`data_prep.synth` (see there for the ten tags and how
each sounds). Each example also has ``evidence``, float32 ``(num_tags, 2)``: start/end seconds of
the part of the clip where the tag is audible (an instrument's 2-4 s span; the whole clip for tempo
and loudness), -1/-1 where the tag is absent. The split is by index: of every 10 clips, 8 train,
1 validation, 1 test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from . import base, common, synth


@dataclasses.dataclass
class SyntheticTagsConfig(tfds.core.BuilderConfig):
    """How many clips, how long, and the seed that determines them all."""

    num_clips: int = 400
    seconds: float = 8.0
    seed: int = 0


def split_of(index: int) -> str:
    """Deterministic 80/10/10 split by clip index."""
    return {8: "validation", 9: "test"}.get(index % 10, "train")


class SyntheticTags(base.MelDatasetBuilder):
    """Generated clips with six instrument timbres placed in spans, tempo and loudness tags."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticTagsConfig(
            name="default", description="400 clips of 8 s (53 min), seed 0: the CPU demo."
        ),
        SyntheticTagsConfig(
            name="small",
            description="60 clips of 6 s, seed 0: quick checks.",
            num_clips=60,
            seconds=6.0,
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self._mel_info(
            description=__doc__,
            num_tags=len(synth.TAG_NAMES),
            evidence=tfds.features.Tensor(shape=(len(synth.TAG_NAMES), 2), dtype=np.float32),
        )

    def _collect(self, dl_manager: tfds.download.DownloadManager) -> base.Collection:
        cfg = self.builder_config
        clips = []
        for spec in synth.make_specs(cfg.num_clips, cfg.seconds, cfg.seed):
            clip_id = f"seed{spec.seed}-{spec.index:05d}"
            job = common.MelJob(
                name=clip_id,
                key=common.hash_key(spec, synth.VERSION, common.FRONT_END_ID),
                fn=synth.clip_mel,
                arg=spec,
            )
            clips.append(
                base.Clip(
                    split=split_of(spec.index),
                    clip_id=clip_id,
                    job=job,
                    tags=spec.tags(),
                    extra={"evidence": spec.evidence()},
                )
            )
        return base.Collection(clips=clips, tag_names=list(synth.TAG_NAMES))
