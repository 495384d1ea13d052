"""run_train.py / run_eval.py / the build command as a user runs them: only jaxtag's own output
on a normal run, one-line errors (no traceback) for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOISE = (
    "oneDNN",  # TensorFlow's start-up notice
    "DT_HALF",  # oneDNN's "E0000 ... supports DT_HALF only on platforms with AVX-512"
    "E0000",
    "FeatureConnector.dtype",  # TFDS's deprecation warning about its own code
    "Event loop is closed",  # orbax's async threads after an error
    "Traceback",
    "Downloading and preparing",  # TFDS: "... dataset Unknown size"
    "dataset_info.json",  # absl: "Variant folder ... has no dataset_info.json"
    "Subsequent calls will reuse",
)
TINY_MODEL = [
    "--config.model.conv_channels=1",
    "--config.model.width=16",
    "--config.model.num_heads=2",
    "--config.model.ffn_size=32",
    "--config.model.num_layers=1",
]


def run(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAXTAG_CACHE_DIR=str(cache))
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    found = [noise for noise in NOISE if noise in output]
    assert not found, (found, output[-4000:])


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert all(e in lines[0] for e in expected), lines[0]
    assert_quiet(result)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """A demo in miniature: build the small synthetic set, train two steps, evaluate."""
    root = tmp_path_factory.mktemp("demo")
    data, workdir, cache = root / "data", root / "run", root / "cache"
    results = {
        "build": run(
            [
                "-m",
                "data_prep.build",
                "synthetic_tags",
                "--config",
                "small",
                "--data_dir",
                str(data),
                "--num_workers",
                "2",
            ],
            cache,
        ),  # fmt: skip
    }
    train = ["run_train.py", "--config", "configs/demo.py", "--workdir", str(workdir),
             f"--config.data_dir={data}", "--config.num_epochs=1", "--config.steps_per_epoch=2",
             "--config.eval_batch_size=6", *TINY_MODEL]  # fmt: skip
    results["train"] = run(train, cache)
    if (workdir / "train_summary.json").exists():
        (root / "summary_before_rerun.json").write_bytes(
            (workdir / "train_summary.json").read_bytes()
        )
    results["rerun"] = run(train, cache)  # `make demo` twice
    results["eval"] = run(
        ["run_eval.py", "--checkpoint", str(workdir), "--dataset", "synthetic_tags",
         "--data_dir", str(data), "--split", "test", "--batch_size", "6"],
        cache,
    )  # fmt: skip
    return root, results


@pytest.mark.slow  # the demo run / training subprocesses
@pytest.mark.parametrize("stage", ["build", "train", "eval"])
def test_normal_runs_print_only_jaxtags_own_output(demo_run, stage):
    _, results = demo_run
    result = results[stage]
    assert result.returncode == 0, result.stderr[-4000:]
    assert_quiet(result)
    expected = {"build": "clips written: 60", "train": "Training finished", "eval": "macro"}
    assert expected[stage] in result.stdout


@pytest.mark.slow  # the demo run / training subprocesses
def test_a_finished_run_rerun_says_so_and_keeps_its_summary(demo_run):
    root, results = demo_run
    rerun = results["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_quiet(rerun)
    assert "Training already finished at step 2" in rerun.stdout
    summary = (root / "run" / "train_summary.json").read_bytes()
    assert summary == (root / "summary_before_rerun.json").read_bytes()  # not rewritten
    summary = json.loads(summary)
    assert summary["wall_seconds"] > 0 and summary["last_eval"]["roc_auc"] > 0


@pytest.mark.slow  # the demo run / training subprocesses
def test_run_eval_writes_its_report_beside_the_step_folders(demo_run):
    root, results = demo_run
    report = root / "run" / "eval" / "eval_synthetic_tags_test_step2.json"
    assert f"report written to {report}" in results["eval"].stdout
    assert json.loads(report.read_text())["checkpoint"] == str(
        root / "run" / "checkpoints" / "best" / "2"
    )
    assert not list((root / "run" / "checkpoints").rglob("eval_*"))  # none inside a step


@pytest.mark.slow  # the demo run / training subprocesses
def test_run_train_refuses_every_bad_value_in_one_line_before_writing(demo_run, tmp_path):
    root, _ = demo_run
    workdir = tmp_path / "w"
    result = run(
        ["run_train.py", "--config", "configs/demo.py", "--workdir", str(workdir),
         f"--config.data_dir={root / 'data'}", "--config.eval_batch_size=0",
         "--config.log_every_steps=0", "--config.learning_rate=-1", "--config.eval_split=valid"],
        root / "cache",
    )  # fmt: skip
    assert_one_line_error(
        result, "run_train: bad training config: eval_batch_size 0", "log_every_steps 0",
        "learning_rate -1.0", "eval_split 'valid' (the dataset has test, train, validation)",
    )  # fmt: skip
    assert not workdir.exists()


@pytest.mark.slow  # the demo run / training subprocesses
def test_run_eval_unknown_split_and_dataset(demo_run):
    root, _ = demo_run
    args = ["run_eval.py", "--checkpoint", str(root / "run"), "--data_dir", str(root / "data")]
    result = run([*args, "--dataset", "synthetic_tags", "--split", "tset"], root / "cache")
    assert_one_line_error(result, "no split 'tset'", "test, train, validation")
    result = run([*args, "--dataset", "synthetic_tag"], root / "cache")
    assert_one_line_error(result, "synthetic_tag is not built", "built there: synthetic_tags/small")


@pytest.mark.slow  # the demo run / training subprocesses
def test_run_train_user_mistakes_in_one_line(tmp_path):
    base = ["run_train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w")]
    result = run([*base, f"--config.data_dir={tmp_path / 'nothing'}"], tmp_path / "cache")
    assert_one_line_error(
        result, "synthetic_tags is not built", "python -m jaxtag.data_prep.build synthetic_tags"
    )
    result = run([*base, "--config.model.widht=8"], tmp_path / "cache")
    assert_one_line_error(result, "--config.model.widht", "did you mean model.width?")
    result = run([*base, "--config.model.width=wide"], tmp_path / "cache")
    assert_one_line_error(result, "--config.model.width=wide")
    result = run(["run_train.py", "--config", "dmeo", "--workdir", str(tmp_path)], tmp_path)
    assert_one_line_error(result, "unknown config 'dmeo'", "demo")


def test_distributed_start_without_a_launcher(monkeypatch):
    import jax

    from jaxtag.cli.train import initialize_distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert initialize_distributed(None) is False and calls == []
    assert initialize_distributed(True) is True and calls == [{}]  # a launcher JAX detects
    assert initialize_distributed(None, "10.0.0.1:1234", 2, 1) is True
    assert calls[-1] == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    with pytest.raises(ValueError, match="--num_processes and --process_id must be given"):
        initialize_distributed(None, "10.0.0.1:1234")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert initialize_distributed(None) is True and calls[-1] == {}
