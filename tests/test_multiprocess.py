"""Two processes under jax.distributed (CPU collectives) train as one process with two devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtag import checkpoint

pytestmark = pytest.mark.slow  # two processes training together

REPO = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(REPO / "tests" / "arrays_run.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir: Path, env: dict, *args: str) -> list[str]:
    """Runs arrays_run.py as processes 0 and 1 of one job; returns their stdouts."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [*SCRIPT, str(workdir), *args, "--process", str(i), "--processes", "2", "--port", port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAXTAG_CACHE_DIR=str(tmp_path / "jax_cache"))
    # The front end measured (jaxtag/model/tuning.py): by the first run, then every process of
    # the two-process run takes process 0's choice.
    env["JAXTAG_AUTOTUNE"] = str(tmp_path / "autotune.json")
    one = subprocess.run(
        [*SCRIPT, str(tmp_path / "one"), "--epochs", "2"],
        env=env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    two = tmp_path / "two"
    two_processes(two, env, "--epochs", "2", "--stop-after", "12")
    outputs = two_processes(two, env, "--epochs", "2")  # resumes at step 12
    assert "Resuming from" in outputs[0] and "Resuming from" not in outputs[1]

    a = checkpoint.load_model(tmp_path / "one", prefer="latest")
    b = checkpoint.load_model(two, prefer="latest")
    assert a.meta["step"] == b.meta["step"] == 20
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a.variables)[0],
        jax.tree_util.tree_leaves(b.variables),
        strict=True,
    ):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))

    tuned = json.loads((tmp_path / "autotune.json").read_text())
    assert [json.loads(k)["task"] for k in tuned] == ["front_end_train"]

    # Checkpoints written once: one writer's data per item, steps logged once by process 0.
    for step_dir in (two / "checkpoints").glob("*/*"):
        for item in ("variables", "train_state"):
            writers = sorted(p.name for p in (step_dir / item).glob("ocdbt.process_*"))
            assert writers == ["ocdbt.process_0"], (step_dir, writers)
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "train/loss" in line]
    assert steps == list(range(1, 21))
