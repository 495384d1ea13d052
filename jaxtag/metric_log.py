"""Training metrics: `metrics.jsonl` (one JSON object a line), TensorBoard scalars, and the
time each call of the run spent (`SessionClock`, `run_totals`: train_summary.json's figures).

TensorBoard summaries are written by clu's metric writers, as in the Flax examples (they need
TensorFlow; without it only metrics.jsonl is written). A resumed run replays the steps after its
checkpoint, so `MetricLog(workdir, resume_step)` first cuts both logs back to `resume_step`:
after any number of interruptions each step appears once in each.

A run that is stopped and resumed is several *sessions* (calls of `train_and_evaluate`). Each
checkpoint's meta holds the sessions up to it, and train_summary.json the sessions of the run
with their totals, so a resumed run's summary adds this call's time to the earlier calls'.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax

from jaxtag.fileio import atomic_write
from jaxtag.run_config import write_error

JSONL = "metrics.jsonl"
SUMMARY = "train_summary.json"
TENSORBOARD = "tensorboard"
EVENT_FILES = "events.out.tfevents.*"

log = logging.getLogger(__name__)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the lines of steps <= last_step (and drops a line a kill cut in half)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in kept))


def truncate_events(logdir: Path, last_step: int) -> None:
    """Rewrites TensorBoard's event files of `logdir` without the events after `last_step`.

    TensorBoard would show a replayed step twice; this keeps the first run's events up to the
    checkpoint and lets the resumed run write the rest. A rewrite is built in `<logdir>/.rewrite`
    and marked done before the old files go, so a kill at any point leaves either the old files or
    the finished rewrite (completed by the next call).
    """
    staging, done = logdir / ".rewrite", logdir / ".rewrite" / "DONE"
    if staging.exists() and not done.exists():
        shutil.rmtree(staging)
    files = sorted(logdir.glob(EVENT_FILES))
    if not staging.exists():
        if not files:
            return
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        events = [
            event_pb2.Event.FromString(record)
            for path in files
            for record in RawEventFileLoader(str(path)).Load()
        ]
        if all(event.step <= last_step for event in events):
            return
        writer = EventFileWriter(str(staging))
        for event in events:
            if event.step <= last_step and not event.HasField("file_version"):
                writer.add_event(event)
        writer.close()
        done.touch()
    for path in files:
        path.unlink()
    for path in staging.glob(EVENT_FILES):
        path.rename(logdir / path.name)
    shutil.rmtree(staging)


def _summary_writer(logdir: Path) -> Any:
    try:
        from clu import metric_writers
    except ImportError:  # clu's TensorBoard writer imports TensorFlow
        log.warning("TensorBoard summaries need tensorflow and clu: writing %s only", JSONL)
        return None
    return metric_writers.SummaryWriter(str(logdir))


class MetricLog:
    """Writes scalars to metrics.jsonl and TensorBoard; silent on processes other than 0."""

    def __init__(self, workdir: str | Path, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = Path(workdir)
        truncate_jsonl(workdir / JSONL, resume_step)
        (workdir / TENSORBOARD).mkdir(parents=True, exist_ok=True)
        truncate_events(workdir / TENSORBOARD, resume_step)
        self.jsonl = open(workdir / JSONL, "a")  # noqa: SIM115 (closed in close())
        self.logdir = workdir / TENSORBOARD
        self.summaries = _summary_writer(self.logdir)

    def write(self, step: int, scalars: dict[str, float], **fields: Any) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **fields, **scalars}) + "\n")
        self.jsonl.flush()
        if self.summaries is not None:
            finite = {k: v for k, v in scalars.items() if math.isfinite(v)}
            with self._tensorboard():
                self.summaries.write_scalars(step, finite)

    @contextmanager
    def _tensorboard(self) -> Iterator[None]:
        # TensorFlow's writer fails with its own error types and pages of text: one line.
        try:
            yield
        except (OSError, KeyboardInterrupt):
            raise
        except Exception as err:
            raise write_error(f"TensorBoard summaries in {self.logdir}", err) from err

    def flush(self) -> None:
        """Puts everything written so far on disk (before a checkpoint that a resume trusts)."""
        if self.enabled and self.summaries is not None:
            with self._tensorboard():
                self.summaries.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self.summaries is not None:
                with self._tensorboard():
                    self.summaries.close()
            self.jsonl.close()


PHASES = ("first_step", "validation", "checkpoint")  # the rest of a session's time is training


class SessionClock:
    """The seconds of one call of a run by phase, from `from_step` on; `earlier`: the sessions
    before it (dicts as `session` returns them)."""

    def __init__(self, from_step: int, global_batch_size: int, earlier: list[dict] | None = None):
        self.from_step, self.batch = from_step, global_batch_size
        self.earlier = list(earlier or [])
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def session(self, to_step: int) -> dict[str, Any]:
        """This session's figures from its start until now, having reached `to_step`."""
        wall = time.perf_counter() - self.start
        train = wall - sum(self.seconds.values())
        timed = max(to_step - self.from_step - 1, 0) * self.batch  # the first step is compiling
        return {
            "from_step": self.from_step,
            "to_step": to_step,
            "wall_seconds": round(wall, 1),
            "train_seconds": round(train, 3),
            **{f"{k}_seconds": round(v, 3) for k, v in self.seconds.items()},
            "examples_per_second": timed / max(train, 1e-9),
        }

    def sessions(self, to_step: int) -> list[dict[str, Any]]:
        return [*self.earlier, self.session(to_step)]


def run_totals(sessions: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's seconds by phase summed over its sessions, its overall examples per second,
    and the sessions themselves."""
    keys = ("wall", "train", *PHASES)
    sums = {k: sum(float(s.get(f"{k}_seconds", 0.0)) for s in sessions) for k in keys}
    timed = sum(float(s.get("examples_per_second", 0.0)) * s.get("train_seconds", 0.0)
                for s in sessions)  # fmt: skip
    return {
        "wall_seconds": round(sums["wall"], 1),
        **{f"{k}_seconds": round(sums[k], 3) for k in keys[1:]},
        "examples_per_second": timed / max(sums["train"], 1e-9),
        "sessions": [dict(s) for s in sessions],
    }


def earlier_sessions(workdir: Path, step: int, meta: Mapping[str, Any]) -> list[dict]:
    """The sessions of a run resumed at `step`: train_summary.json's when it ends there (the
    previous call ended cleanly), else those of the checkpoint's meta (a killed call: its time
    after the checkpoint is replayed), else none (a checkpoint older than sessions)."""
    try:
        summary = json.loads((Path(workdir) / SUMMARY).read_text())
        if summary.get("step") == step and isinstance(summary.get("sessions"), list):
            return list(summary["sessions"])
    except (OSError, ValueError, AttributeError):
        pass
    sessions = meta.get("sessions")
    return list(sessions) if isinstance(sessions, list) else []


def run_summary(
    step: int,
    total_steps: int,
    sessions: list[Mapping[str, Any]],
    config: Any,
    workdir: Path,
    **best: Any,
) -> dict[str, Any]:
    """train_summary.json's content: steps, the totals of `sessions`, then `best` (last_eval,
    best_step, best: the best validation ROC-AUC, named after the eval split)."""
    return {
        "step": step,
        "total_steps": total_steps,
        **run_totals(sessions),
        "last_eval": best["last_eval"],
        "epochs": config.num_epochs,
        "best_step": best["best_step"],
        f"best_{config.eval_split}_roc_auc": None if best["best_step"] is None else best["best"],
        "workdir": str(workdir),
    }
