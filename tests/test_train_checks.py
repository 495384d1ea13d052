"""Training's checks before work and its one-line ends (issue 17, items 1, 2, 7, 8): every config
value validated before anything is written, the workdir checked and locked (one writer), a
finished run left alone, summaries that add up the calls of a run, and disk full, a failed write
or Ctrl-C each ending in one line with the documented exit code."""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from jaxtag import checkpoint, run_config, train
from jaxtag.cli import train as cli_train
from jaxtag.fileio import LockedError
from jaxtag.metric_log import MetricLog
from jaxtag.sources import ArraySource
from tests.arrays_run import TAGS, Paused, tiny_config, tiny_source

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from jaxtag.fileio import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""
CLI = [sys.executable, str(REPO / "tests" / "train_cli_run.py"), "--config"]


def short_config():
    """One epoch of 4 steps: checkpoints at steps 2 and 4, validation at 4."""
    config = tiny_config(epochs=1)
    config.steps_per_epoch = 4
    config.checkpoint_every_steps = 2
    return config


def snapshot(root: Path) -> dict[str, tuple[int, bytes | bool]]:
    """Every path under `root` with its modification time and (for files) its bytes."""
    files = sorted(root.rglob("*"))
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.is_file() and p.read_bytes())
        for p in files
    }


def error_lines(stderr: str) -> list[str]:
    """stderr without tqdm's bar (its redraws end in \\r) and the deprecation notices orbax logs
    for `all_steps(read=True)` (jaxtag/checkpoint.py, CheckpointStore.latest_step)."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [
        line
        for line in lines
        if line.strip() and not line.startswith("train:") and "option is deprecated" not in line
    ]


def holder(target: Path) -> subprocess.Popen:
    """Another process holding target's lock, as a running jaxtag-train does."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout.readline().strip() == "locked"
    return process


# --- every config value, before anything is written ------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("global_batch_size", 0),
        ("global_batch_size", -4),
        ("eval_batch_size", 0),
        ("log_every_steps", 0),
        ("checkpoint_every_steps", 0),
        ("eval_every_epochs", 0),
        ("keep_best", 0),
        ("learning_rate", -1.0),
        ("learning_rate", math.nan),
        ("learning_rate", math.inf),
        ("num_epochs", 0),
        ("num_epochs", -1),
    ],
)
def test_a_bad_value_is_refused_before_the_workdir_exists(tmp_path, field, value):
    config = tiny_config()
    setattr(config, field, value)
    workdir = tmp_path / "run"
    with pytest.raises(run_config.ConfigError) as refused:
        train.train_and_evaluate(config, workdir, source=tiny_source())
    message = str(refused.value)
    assert "\n" not in message and f"{field} {value!r} (must be" in message, message
    assert not workdir.exists() and list(tmp_path.iterdir()) == []


def test_every_bad_field_is_listed_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 2)  # as on a machine with two devices
    config = tiny_config()
    config.update(global_batch_size=8, eval_batch_size=3, log_every_steps=0, learning_rate=-1.0)
    config.update(optimizer="sgd", num_epochs=0)
    with pytest.raises(run_config.ConfigError) as refused:
        train.train_and_evaluate(config, tmp_path / "run", source=tiny_source())
    assert str(refused.value) == (
        "bad training config: eval_batch_size 3 (must be a positive multiple of the 2 devices); "
        "num_epochs 0 (must be an integer >= 1); log_every_steps 0 (must be an integer >= 1); "
        "learning_rate -1.0 (must be finite, > 0); optimizer 'sgd' (must be original or "
        "adamw_cosine)"
    )
    assert not (tmp_path / "run").exists()


def test_a_source_without_validation_clips_is_refused(tmp_path):
    full = tiny_source()
    empty = ArraySource(
        full.train_mel, full.train_tags, full.eval_mel[:0], full.eval_tags[:0], TAGS
    )
    with pytest.raises(run_config.ConfigError, match=r"eval_split 'validation' \(it holds no"):
        train.train_and_evaluate(tiny_config(), tmp_path / "run", source=empty)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # builds the synthetic dataset (session fixture)
def test_a_dataset_without_the_eval_split_is_refused_at_once(synthetic_data, tmp_path):
    from tests.conftest import small_train_config

    config = small_train_config(synthetic_data)
    config.eval_split, config.eval_batch_size = "valid", 0
    start = time.perf_counter()
    with pytest.raises(run_config.ConfigError) as refused:
        train.train_and_evaluate(config, tmp_path / "run")
    assert time.perf_counter() - start < 30  # not after an epoch of training
    message = str(refused.value)
    assert "eval_batch_size 0 (must be a positive multiple" in message
    assert "eval_split 'valid' (the dataset has test, train, validation)" in message
    assert not (tmp_path / "run").exists()


# --- the workdir: checked, locked, only by process 0 -----------------------------------------


def test_a_workdir_that_cannot_be_one_is_refused_untouched(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "ro").mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"lr": 3}')
    (foreign / "metrics.jsonl").write_text("not ours")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: "ro" not in Path(p).parts and real_access(p, mode, **kw)
    )  # a read-only folder, also for root
    before = snapshot(tmp_path)
    cases = {
        "file": "is a file, not a folder",
        "file/run": "file is not a directory",
        "ro": "is not writable",
        "ro/run": "ro is not writable",
        "foreign": "holds config.json, metrics.jsonl of something else than a jaxtag training",
    }
    for name, expected in cases.items():
        with pytest.raises(run_config.WorkdirError) as refused:
            train.train_and_evaluate(tiny_config(), tmp_path / name, source=tiny_source())
        assert expected in str(refused.value) and "\n" not in str(refused.value), name
    assert snapshot(tmp_path) == before
    assert run_config.workdir_problem(tmp_path / "notes") is None  # a folder of other files:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")  # a run writes none of them
    assert run_config.workdir_problem(tmp_path / "notes") is None


def test_a_second_run_on_a_locked_workdir_stops_at_once_naming_the_holder(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(train, "TfdsSource", lambda config: tiny_source())
    workdir = tmp_path / "run"
    workdir.mkdir()
    first = holder(workdir)
    try:
        before = snapshot(workdir)
        start = time.perf_counter()
        with pytest.raises(LockedError) as refused:
            train.train_and_evaluate(short_config(), workdir, source=tiny_source())
        assert f"PID {first.pid}" in str(refused.value) and str(workdir) in str(refused.value)
        assert time.perf_counter() - start < 10
        assert snapshot(workdir) == before  # nothing written beside the holder's lock

        assert cli_train.train_command(short_config(), str(workdir)) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith("run_train: training workdir")
        assert f"(PID {first.pid})" in lines[0]
    finally:
        first.kill()
        first.wait()


def test_only_process_0_checks_creates_and_locks_the_workdir(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    first = holder(locked)
    try:
        monkeypatch.setattr(jax, "process_index", lambda: 1)
        with run_config.claim_workdir(tmp_path / "new"):  # process 0 creates it, not process 1
            assert not (tmp_path / "new").exists()
        with run_config.claim_workdir(locked):  # process 0 holds the lock, not process 1
            assert (locked / ".lock").read_text().strip() == str(first.pid)
    finally:
        first.kill()
        first.wait()


# --- summaries that add up; a finished run left alone ------------------------------------------


@pytest.mark.slow  # four tiny training calls
def test_summaries_add_up_the_calls_and_a_finished_rerun_changes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(short_config(), workdir, 2, source=tiny_source())
    second = train.train_and_evaluate(short_config(), workdir, source=tiny_source())
    assert [s["to_step"] for s in second["sessions"]] == [2, 4]
    assert second["sessions"][0] == first["sessions"][0]  # the first call's figures are kept
    assert second["sessions"][1]["from_step"] == 2
    for key in ("wall", "train", "first_step", "validation", "checkpoint"):
        total = sum(s[f"{key}_seconds"] for s in second["sessions"])
        assert second[f"{key}_seconds"] == pytest.approx(total, abs=0.051), key
    assert second["wall_seconds"] > first["wall_seconds"] > 0
    assert second["last_eval"]["roc_auc"] == second["best_validation_roc_auc"] > 0
    saved = json.loads((workdir / "train_summary.json").read_text())
    assert saved == json.loads(json.dumps(second))
    capsys.readouterr()

    before = snapshot(workdir)
    again = train.train_and_evaluate(short_config(), workdir, source=tiny_source())
    assert "Training already finished at step 4" in capsys.readouterr().out
    assert again == saved and snapshot(workdir) == before  # nothing rewritten

    # A run killed after its last checkpoint, before the summary: rebuilt from the checkpoint.
    (workdir / "train_summary.json").unlink()
    rebuilt = train.train_and_evaluate(short_config(), workdir, source=tiny_source())
    assert rebuilt["step"] == 4 and rebuilt["best_step"] == 4
    assert rebuilt["last_eval"] == second["last_eval"]
    assert rebuilt["sessions"][0] == first["sessions"][0]
    assert [s["to_step"] for s in rebuilt["sessions"]] == [2, 4]
    assert json.loads((workdir / "train_summary.json").read_text()) == rebuilt


# --- disk full, a failed write, Ctrl-C: one line each --------------------------------------


@pytest.mark.slow  # four tiny training calls
def test_disk_full_and_ctrl_c_end_in_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "TfdsSource", lambda config: tiny_source())
    workdir = tmp_path / "run"
    save = checkpoint.CheckpointStore.save

    def full_at_step_4(self, step, *args, **kwargs):
        if step == 4:  # what orbax raises when tensorstore's write fails
            raise ValueError(
                f'OUT_OF_RANGE: Error writing "x" in OCDBT database at local file "{workdir}": '
                "Failed to write 2374 bytes to file 19: No space left on device "
                "[os_error_code='28'] [source locations='...']\nand more"
            )
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.CheckpointStore, "save", full_at_step_4)
    assert cli_train.train_command(short_config(), str(workdir)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"run_train: cannot write a checkpoint in {workdir}/checkpoints: No space left on device "
        "(free some space); rerun the same command to resume from the last complete checkpoint"
    ]
    assert checkpoint.load_model(workdir, prefer="latest").meta["step"] == 2
    monkeypatch.setattr(checkpoint.CheckpointStore, "save", save)

    def jsonl_full(self, step, scalars, **fields):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(workdir / "metrics.jsonl"))

    monkeypatch.setattr(MetricLog, "write", jsonl_full)
    assert cli_train.train_command(short_config(), str(workdir)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"run_train: {workdir}/metrics.jsonl: No space left on device; free some space, then "
        "rerun the same command to resume"
    ]
    monkeypatch.undo()

    class Interrupted(Paused):
        """Ctrl-C while the second batch is read: KeyboardInterrupt in the main thread."""

        def train_batches(self, global_batch_size, seed, start_step):
            for i, batch in enumerate(super().train_batches(global_batch_size, seed, start_step)):
                if i == 1:
                    raise KeyboardInterrupt
                yield batch

    monkeypatch.setattr(train, "TfdsSource", lambda config: Interrupted(tiny_source(), 0))
    assert cli_train.train_command(short_config(), str(workdir)) == 130
    assert error_lines(capsys.readouterr().err) == [
        "run_train: interrupted; rerun the same command to resume from the last checkpoint"
    ]
    monkeypatch.setattr(train, "TfdsSource", lambda config: tiny_source())
    assert cli_train.train_command(short_config(), str(workdir)) == 0
    assert f"Resuming from {workdir} at step 2" in capsys.readouterr().out
    assert checkpoint.load_model(workdir, prefer="latest").meta["step"] == 4


def _cli(workdir: Path, tmp_path: Path, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAXTAG_CACHE_DIR=str(tmp_path / "cache"))
    env.update(popen.pop("env", {}))
    args = [*CLI, str(REPO / "tests" / "train_cli_run.py"), "--workdir", str(workdir)]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def _limit_file_size() -> None:
    # Writes past 20 kB fail with EFBIG (SIGXFSZ ignored): a real failure inside orbax's
    # background save, as a full disk gives, without filling one.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.slow  # jaxtag-train subprocesses
def test_jaxtag_train_sigint_and_a_failed_save_each_end_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    victim = _cli(workdir, tmp_path, env={"JAXTAG_TEST_PAUSE": "0.5"})
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and victim.poll() is None
        and not ((workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text())
    ):
        time.sleep(0.05)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 130, err[-3000:]
    assert error_lines(err) == [
        "run_train: interrupted; rerun the same command to resume from the last checkpoint"
    ]
    resumed = _cli(workdir, tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "Training finished" in out

    failing = _cli(
        tmp_path / "small_disk", tmp_path, env={"JAXTAG_CACHE_DIR": "off"},
        preexec_fn=_limit_file_size,
    )  # fmt: skip
    _, err = failing.communicate(timeout=300)
    assert failing.returncode == 2, err[-3000:]
    assert error_lines(err) == [
        f"run_train: cannot write a checkpoint in {tmp_path}/small_disk/checkpoints: File too "
        "large; rerun the same command to resume from the last complete checkpoint"
    ]
    assert "Traceback" not in err and "Event loop is closed" not in err
