"""Interpretability, checked for real: on a model trained on the synthetic set, a tag's largest
tag-wise contribution falls where the generator put that tag's evidence."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxtag import audio, explain, input_pipeline
from jaxtag.checkpoint import load_model

pytestmark = pytest.mark.slow  # trains a model first

HALF = audio.CHUNK_FRAMES // 2
MARGIN_SECONDS = 0.25  # a span's edges are faded in and out


def test_largest_contribution_lies_in_the_evidence_span(trained_synthetic, synthetic_data):
    loaded = load_model(trained_synthetic)
    builder = input_pipeline.get_builder(synthetic_data, None)
    tags = input_pipeline.tag_names(builder)
    instruments = [t for t in tags if t not in ("fast", "slow", "loud", "quiet")]
    hits, chance, checked = 0, [], 0
    held_out = builder.as_dataset(split="validation").concatenate(builder.as_dataset(split="test"))
    for example in tfds.as_numpy(held_out):
        mel = example["mel"].astype(np.float32)
        for tag in instruments:
            i = tags.index(tag)
            start_s, end_s = (float(v) for v in example["evidence"][i])
            if start_s < 0:
                continue
            # Two chunks per span: one whose middle is the span's start, one whose middle is its
            # end. About half of each holds the evidence, so a map that ignored the evidence
            # would hit it about half of the time (`chance` below measures exactly how often).
            for edge in (start_s, end_s):
                first = audio.seconds_to_frames(edge) - HALF
                first = int(np.clip(first, 0, mel.shape[1] - audio.CHUNK_FRAMES))
                maps = explain.explain_chunk(loaded, audio.crop(mel, first), layer=-1)
                if maps["probs"][i] < 0.5:
                    continue  # explain what the model predicts
                times = audio.frames_to_seconds(first + np.arange(audio.CHUNK_FRAMES))
                inside = (times >= start_s - MARGIN_SECONDS) & (times <= end_s + MARGIN_SECONDS)
                peak = int(np.argmax(maps["contributions"][:, i]))
                hits += bool(inside[peak])
                chance.append(inside.mean())
                checked += 1
    assert checked >= 16, f"only {checked} predicted instrument chunks to check"
    hit_rate = hits / checked
    print(f"peak in span: {hit_rate:.2f} of {checked} chunks; chance {np.mean(chance):.2f}")
    assert hit_rate >= 0.7 and hit_rate >= np.mean(chance) + 0.1, (hit_rate, np.mean(chance))
