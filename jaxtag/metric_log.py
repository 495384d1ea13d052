"""Training metrics: `metrics.jsonl` (one JSON object a line) and TensorBoard scalars.

TensorBoard summaries are written by clu's metric writers, as in the Flax examples (they need
TensorFlow; without it only metrics.jsonl is written). A resumed run replays the steps after its
checkpoint, so `MetricLog(workdir, resume_step)` first cuts both logs back to `resume_step`:
after any number of interruptions each step appears once in each.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import jax

from jaxtag.fileio import atomic_write

JSONL = "metrics.jsonl"
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
        self.summaries = _summary_writer(workdir / TENSORBOARD)

    def write(self, step: int, scalars: dict[str, float], **fields: Any) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **fields, **scalars}) + "\n")
        self.jsonl.flush()
        if self.summaries is not None:
            finite = {k: v for k, v in scalars.items() if math.isfinite(v)}
            self.summaries.write_scalars(step, finite)

    def flush(self) -> None:
        """Puts everything written so far on disk (before a checkpoint that a resume trusts)."""
        if self.enabled and self.summaries is not None:
            self.summaries.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self.summaries is not None:
                self.summaries.close()
            self.jsonl.close()
