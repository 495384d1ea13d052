"""Resume: a SIGKILLed run, resumed, logs every step once; another model is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxtag import train
from tests.arrays_run import tiny_config, tiny_source

pytestmark = pytest.mark.slow  # training subprocesses, one killed and resumed

REPO = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(REPO / "tests" / "arrays_run.py")]


def env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), JAXTAG_CACHE_DIR=str(tmp_path / "jax_cache"))


def jsonl(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def steps_of(workdir: Path, key: str) -> list[int]:
    return [line["step"] for line in jsonl(workdir) if key in line]


def tensorboard_steps(workdir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    steps = []
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        for record in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(record)
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_sigkill_then_resume_logs_each_step_once(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    quiet = {"env": env(tmp_path), "stdout": subprocess.DEVNULL}
    reference = subprocess.Popen([*SCRIPT, str(straight)], stderr=subprocess.PIPE, **quiet)
    victim = subprocess.Popen([*SCRIPT, str(killed), "--pause", "0.5"], **quiet)
    try:
        # Kill after the step-12 checkpoint and the step-10 validation, mid-epoch 2.
        deadline = time.time() + 900
        while time.time() < deadline and victim.poll() is None:
            if (killed / "metrics.jsonl").exists() and max(
                steps_of(killed, "train/loss") or [0]
            ) >= 15:
                break
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
    finally:
        victim.kill()
    assert max(steps_of(killed, "train/loss")) < 30  # really killed mid-run
    _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err[-3000:].decode()
    resumed = subprocess.run(
        [*SCRIPT, str(killed)], env=env(tmp_path), capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:].decode()
    assert "Resuming from" in resumed.stdout

    for key, tag in (("train/loss", "train/loss"), ("validation/roc_auc", "validation/roc_auc")):
        expected = steps_of(straight, key)
        assert expected == sorted(set(expected)) and len(expected) > 2
        assert steps_of(killed, key) == expected
        assert tensorboard_steps(straight, tag) == expected
        assert tensorboard_steps(killed, tag) == expected
    losses = {line["step"]: line["train/loss"] for line in jsonl(straight) if "train/loss" in line}
    for line in jsonl(killed):
        if "train/loss" in line:
            assert line["train/loss"] == pytest.approx(losses[line["step"]], rel=1e-5, abs=1e-6)


def test_resume_with_another_model_is_refused_and_leaves_the_workdir(tmp_path):
    config = tiny_config(epochs=1)
    train.train_and_evaluate(config, tmp_path, stop_after_step=2, source=tiny_source())
    assert config.model.num_tags == -1  # the caller's config is not written into
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")}

    other = tiny_config(epochs=1)
    other.model.num_heads = 4
    other.model.ffn_size = 64
    with pytest.raises(train.ResumeError) as refused:
        train.train_and_evaluate(other, tmp_path, source=tiny_source())
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "ffn_size 32 (checkpoint) vs 64 (requested)" in message
    assert "num_heads 2 (checkpoint) vs 4 (requested)" in message
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*")} == before
