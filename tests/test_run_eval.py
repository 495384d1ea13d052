"""run_eval.py on a converted ponswon.pth-layout checkpoint and a (fake) MagnaTagATune build."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import magnatagatune
from jaxtag import audio, evaluate, scoring
from jaxtag.checkpoint import load_model
from tests.data_fixtures import make_fake_mtat
from tests.test_explain import small_case  # noqa: F401 (fixture)

# The PyTorch reference; run_eval.py in a subprocess on a built dataset.
pytestmark = [pytest.mark.torch, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_run_eval_scores_a_converted_checkpoint(small_case, tmp_path):  # noqa: F811
    _, converted = small_case
    fake = make_fake_mtat(str(tmp_path / "manual"))
    data_dir = str(tmp_path / "tfds")
    builder = magnatagatune.Magnatagatune(data_dir=data_dir, num_workers=1)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=fake.root))
    out = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_eval.py"),
            f"--checkpoint={converted}",
            f"--data_dir={data_dir}",
            "--dataset=magnatagatune",
            "--split=test",
            f"--out={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "macro" in result.stdout and report["split"] == "test"

    # The same numbers by hand: every test clip, 16 chunks, mean sigmoid, scikit-learn.
    scorer = scoring.WindowScorer(load_model(converted), batch_size=16)
    probs, labels = [], []
    for example in tfds.as_numpy(builder.as_dataset(split="test")):
        chunks = audio.eval_chunks(example["mel"].astype(np.float32))
        probs.append(scorer.predict_windows(chunks).mean(axis=0))
        labels.append(example["tags"])
    expected = evaluate.compute_metrics(np.stack(probs), np.stack(labels), scorer.tags)
    assert report["num_clips"] == len(labels)
    assert report["excluded_tags"] == expected["excluded_tags"]
    assert report["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-5)
    assert report["pr_auc"] == pytest.approx(expected["pr_auc"], abs=1e-5)
