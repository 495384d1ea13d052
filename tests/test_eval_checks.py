"""jaxtag-eval's report (issue 17, items 1, 2, 8): written beside the checkpoint, never inside a
step folder that rotation deletes; its path checked before the evaluation; a failed write or
Ctrl-C one line with the documented exit code."""

from __future__ import annotations

import errno
import json
import os

import jax
import pytest

from jaxtag import checkpoint, evaluate
from jaxtag.cli import evaluate as cli_evaluate
from jaxtag.model import ModelConfig, init_variables

TAGS = ["low", "mid", "high"]
TINY = ModelConfig(
    conv_channels=1, width=16, num_layers=1, num_heads=2, ffn_size=32,
    positions_length=65, num_tags=len(TAGS),
)  # fmt: skip


def save_tiny(directory):
    variables = init_variables(TINY, jax.random.PRNGKey(0), frames=64)
    return checkpoint.save_model(directory, variables, TINY, TAGS, source="test")


def fake_report(path, **kwargs):
    """What evaluate_checkpoint returns, without a dataset."""
    per_tag = {t: {"positives": 1, "roc_auc": 0.5, "pr_auc": 0.5} for t in TAGS}
    return {"checkpoint": str(path), "dataset": kwargs["dataset"], "split": kwargs["split"],
            "roc_auc": 0.5, "pr_auc": 0.5, "num_clips": 2, "num_tags_scored": 3,
            "excluded_tags": [], "per_tag": per_tag}  # fmt: skip


def run_eval(checkpoint_path, out=None, prefer="best"):
    return cli_evaluate.evaluate_command(
        str(checkpoint_path), "synthetic_tags/small", "/nowhere", "test", 8, prefer, out
    )


def test_the_default_report_goes_beside_the_checkpoint(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "best" / "120"
    assert evaluate.default_report_path(step, "synthetic_tags/small", "test") == (
        tmp_path / "run" / "eval" / "eval_synthetic_tags_small_test_step120.json"
    )
    assert evaluate.default_report_path(tmp_path / "ponswon", "magnatagatune", "test") == (
        tmp_path / "ponswon_eval_magnatagatune_test.json"
    )


def test_a_workdir_step_is_reported_in_the_workdirs_eval_folder(tmp_path, monkeypatch, capsys):
    step = save_tiny(tmp_path / "run" / "checkpoints" / "latest" / "7")
    scored = []

    def evaluate_checkpoint(path, **kwargs):
        scored.append(path)
        return fake_report(path, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", evaluate_checkpoint)
    inside = sorted(p.name for p in step.iterdir())
    assert run_eval(tmp_path / "run", prefer="latest") == 0
    report = tmp_path / "run" / "eval" / "eval_synthetic_tags_small_test_step7.json"
    assert scored == [str(step)]  # the step named in the report is the one scored
    assert json.loads(report.read_text())["checkpoint"] == str(step)
    assert f"report written to {report}" in capsys.readouterr().out
    assert sorted(p.name for p in step.iterdir()) == inside  # nothing added to the step

    standalone = save_tiny(tmp_path / "model")
    assert run_eval(standalone) == 0
    assert (tmp_path / "model_eval_synthetic_tags_small_test.json").is_file()
    assert run_eval(standalone) == 0  # its own report is replaced on a rerun


def test_a_bad_report_path_is_refused_before_the_evaluation(tmp_path, monkeypatch, capsys):
    model = save_tiny(tmp_path / "model")
    monkeypatch.setattr(
        evaluate, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated before checking")
    )
    (tmp_path / "song.wav").write_bytes(b"RIFF audio")
    (tmp_path / "folder").mkdir()
    inside = sorted(p.name for p in model.iterdir())
    cases = {
        tmp_path / "folder": "folder is a directory",
        tmp_path / "song.wav" / "r.json": "song.wav is not a directory",
        model / "report.json": f"is inside the checkpoint folder {model}",
        tmp_path / "song.wav": "exists and is not a jaxtag eval report; it was left untouched",
    }
    for out, expected in cases.items():
        assert run_eval(model, out=str(out)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("run_eval: ") and expected in lines[0]
    assert (tmp_path / "song.wav").read_bytes() == b"RIFF audio"
    assert sorted(p.name for p in model.iterdir()) == inside


def test_disk_full_and_ctrl_c_end_in_one_line(tmp_path, monkeypatch, capsys):
    model = save_tiny(tmp_path / "model")
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fake_report)

    def full(report, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(evaluate, "write_report", full)
    assert run_eval(model) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"run_eval: {tmp_path}/model_eval_synthetic_tags_small_test.json: No space left on device"
    ]

    def interrupted(path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", interrupted)
    assert run_eval(model) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "run_eval: interrupted; no report written"
    ]
