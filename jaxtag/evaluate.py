"""Evaluation: the 16-chunk protocol over a split, macro and per-tag ROC-AUC / PR-AUC.

The model scores every chunk of a clip, the sigmoid outputs are averaged over the chunks, then
scikit-learn scores each tag. A tag with no positive (or no negative) clip in the split has no
defined ROC-AUC; it is reported and left out of the macro averages instead of crashing.

Reports go beside checkpoints, never inside (orbax's rotation deletes a step folder with all it
holds): `default_report_path` names the file, `check_report_path` refuses before any work a path
that cannot be written, lies inside a checkpoint, or is a file other than a jaxtag report.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.jax_utils
import jax
import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score
from tqdm import tqdm

from jaxtag.errors import JaxtagError
from jaxtag.fileio import atomic_write, unwritable_reason
from jaxtag.model import MTSA, build_model

PredictFn = Callable[[Any, jax.Array], jax.Array]


def make_predict_fn(model: MTSA, axis_name: str = "batch") -> PredictFn:
    """Pmapped (replicated variables, mel [dev, clips, chunks, F, T]) -> probs [dev, clips, tags].

    Chunks of a clip are scored as one batch and their sigmoid outputs averaged.
    """

    def predict(variables: Any, mel: jax.Array) -> jax.Array:
        clips, chunks = mel.shape[:2]
        logits = model.apply(variables, mel.reshape(clips * chunks, *mel.shape[2:]), train=False)
        return jax.nn.sigmoid(logits).reshape(clips, chunks, -1).mean(axis=1)

    return jax.pmap(predict, axis_name=axis_name)


def predict_dataset(
    predict_fn: PredictFn,
    replicated_variables: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    total: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs `predict_fn` over evaluation batches; returns (probs, labels) of the unmasked clips.

    The spectrograms go to the devices two batches ahead of use and the predictions come back
    once, at the end, so the devices never wait for the host between batches.
    """
    host_parts: collections.deque = collections.deque()

    def spectrograms() -> Iterator[dict[str, np.ndarray]]:
        for batch in batches:
            host_parts.append((np.asarray(batch["mask"]), np.asarray(batch["tags"])))
            yield {"mel": batch["mel"]}

    predictions, masks, labels = [], [], []
    on_device = flax.jax_utils.prefetch_to_device(spectrograms(), 2)
    for batch in tqdm(on_device, total=total, desc="evaluate", unit="batch", disable=not progress):
        predictions.append(predict_fn(replicated_variables, batch["mel"]))
        mask, tags = host_parts.popleft()
        masks.append(mask.reshape(-1).astype(bool))
        labels.append(tags.reshape(len(masks[-1]), -1))
    if not predictions:
        raise ValueError("the evaluation split yielded no clips")
    probs = [p.reshape(-1, p.shape[-1]) for p in jax.device_get(predictions)]
    probs = np.concatenate([p[m] for p, m in zip(probs, masks, strict=True)])
    labels = np.concatenate([t[m] for t, m in zip(labels, masks, strict=True)])
    return gather_processes(probs), gather_processes(labels)


def gather_processes(x: np.ndarray) -> np.ndarray:
    """Concatenates each process's rows (multi-host evaluation); identity on one process."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.array([len(x)]))).reshape(-1)
    padded = np.zeros((counts.max(), *x.shape[1:]), x.dtype)
    padded[: len(x)] = x
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([gathered[i, :n] for i, n in enumerate(counts)])


def compute_metrics(probs: np.ndarray, labels: np.ndarray, tag_names: list[str]) -> dict[str, Any]:
    """Macro ROC-AUC / PR-AUC over the tags that have both classes, plus per-tag scores."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels) > 0.5
    if probs.shape != labels.shape or probs.shape[1] != len(tag_names):
        raise ValueError(f"probs {probs.shape}, labels {labels.shape}, {len(tag_names)} tags")
    per_tag: dict[str, dict[str, float | int | None]] = {}
    excluded = []
    for i, tag in enumerate(tag_names):
        positives = int(labels[:, i].sum())
        entry: dict[str, float | int | None] = {
            "positives": positives,
            "roc_auc": None,
            "pr_auc": None,
        }
        if 0 < positives < len(labels):
            entry["roc_auc"] = float(roc_auc_score(labels[:, i], probs[:, i]))
            entry["pr_auc"] = float(average_precision_score(labels[:, i], probs[:, i]))
        else:
            excluded.append(tag)
        per_tag[tag] = entry
    scored = [e for e in per_tag.values() if e["roc_auc"] is not None]
    return {
        "roc_auc": float(np.mean([e["roc_auc"] for e in scored])) if scored else float("nan"),
        "pr_auc": float(np.mean([e["pr_auc"] for e in scored])) if scored else float("nan"),
        "num_clips": int(len(labels)),
        "num_tags_scored": len(scored),
        "excluded_tags": excluded,
        "per_tag": per_tag,
    }


def format_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text report: one row per tag, then the macro averages."""
    lines = [f"{'tag':<20} {'positives':>9} {'ROC-AUC':>8} {'PR-AUC':>8}"]
    for tag, entry in metrics["per_tag"].items():
        roc = "-" if entry["roc_auc"] is None else f"{entry['roc_auc']:.4f}"
        pr = "-" if entry["pr_auc"] is None else f"{entry['pr_auc']:.4f}"
        lines.append(f"{tag:<20} {entry['positives']:>9} {roc:>8} {pr:>8}")
    lines.append("-" * 48)
    lines.append(
        f"{'macro':<20} {metrics['num_clips']:>9} "
        f"{metrics['roc_auc']:>8.4f} {metrics['pr_auc']:>8.4f}"
    )
    if metrics["excluded_tags"]:
        lines.append(
            "left out of the macro average (no positive or no negative clip): "
            + ", ".join(metrics["excluded_tags"])
        )
    return "\n".join(lines)


def summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar part of a metrics dict (for logs and checkpoint metadata)."""
    return {k: v for k, v in metrics.items() if k != "per_tag"}


def split_batches(builder: Any, split: str, batch_size: int) -> tuple[Iterator[dict], int]:
    """This process's evaluation batches of `split` (16 chunks per clip) and their count."""
    from jaxtag import input_pipeline

    kwargs = {
        "batch_size": batch_size,
        "num_local_devices": jax.local_device_count(),
        "process_count": jax.process_count(),
    }
    batches = input_pipeline.eval_iterator(
        builder, split, process_index=jax.process_index(), **kwargs
    )
    return batches, input_pipeline.eval_num_batches(builder, split, **kwargs)


def evaluate_split(
    model: MTSA,
    variables: Mapping[str, Any],
    builder: Any,
    split: str,
    tag_names: list[str],
    batch_size: int,
    output_order: np.ndarray | None = None,
    progress: bool = True,
    predict_fn: PredictFn | None = None,
) -> dict[str, Any]:
    """Host-side variables in, metrics out: predicts every clip of the split and scores it.

    `output_order[i]` is the model output that scores `tag_names[i]` (default: the same order).
    `predict_fn` (from `make_predict_fn(model)`) lets repeated calls reuse one compilation.
    """
    batches, total = split_batches(builder, split, batch_size)
    replicated = flax.jax_utils.replicate(dict(variables))
    predict_fn = predict_fn or make_predict_fn(model)
    probs, labels = predict_dataset(predict_fn, replicated, batches, total, progress)
    if output_order is not None:
        probs = probs[:, output_order]
    return compute_metrics(probs, labels, tag_names)


REPORT_KEYS = ("checkpoint", "dataset", "split", "roc_auc")  # what evaluate_checkpoint reports
STORES = ("latest", "best")  # a training workdir's step folders (jaxtag/checkpoint.py)


class ReportPathError(JaxtagError):
    """A report path that cannot or must not be written (the message says why)."""


def default_report_path(checkpoint_dir: str | os.PathLike, dataset: str, split: str) -> Path:
    """Where `jaxtag-eval` writes the report of a resolved checkpoint folder by default.

    A training workdir's step (`WORKDIR/checkpoints/{best,latest}/N`):
    `WORKDIR/eval/eval_DATASET_SPLIT_stepN.json`; any other checkpoint folder `DIR`:
    `DIR_eval_DATASET_SPLIT.json` beside it.
    """
    directory = Path(checkpoint_dir)
    name = "eval_" + re.sub(r"[^\w.-]+", "_", f"{dataset}_{split}").strip("_")
    store = directory.parent
    if directory.name.isdigit() and store.name in STORES and store.parent.name == "checkpoints":
        return store.parent.parent / "eval" / f"{name}_step{directory.name}.json"
    return directory.with_name(f"{directory.name}_{name}.json")


def _is_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and set(REPORT_KEYS) <= set(report)


def check_report_path(path: str | os.PathLike) -> None:
    """Raises ReportPathError unless `path` can take a report: writable, not inside a checkpoint
    folder, and either new or a jaxtag report already (then it is replaced)."""
    path = Path(path).absolute()
    reason = unwritable_reason(path)
    if reason:
        raise ReportPathError(f"cannot write the report: {reason}")
    for parent in path.parents:
        step = (parent / "variables").is_dir() and (parent / "meta").is_dir()
        if step or (parent.name in STORES and parent.parent.name == "checkpoints"):
            raise ReportPathError(
                f"{path} is inside the checkpoint folder {parent}: reports go beside "
                "checkpoints (rotation deletes what is inside); choose another --out"
            )
    if path.exists() and not _is_report(path):
        raise ReportPathError(
            f"{path} exists and is not a jaxtag eval report; it was left untouched (choose "
            "another --out)"
        )


def write_report(metrics: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes the metrics as JSON, whole or not at all."""
    with atomic_write(path) as f:
        json.dump(metrics, f, indent=2)


def evaluate_checkpoint(
    checkpoint_path: str,
    dataset: str,
    data_dir: str,
    split: str = "test",
    batch_size: int = 8,
    prefer: str = "best",
    progress: bool = True,
) -> dict[str, Any]:
    """Loads any jaxtag checkpoint and scores it on a built dataset split.

    The model's outputs are matched to the dataset's tags by name, so a model whose tag order
    differs from the dataset's (the released weights vs a by-count build) is scored correctly.
    """
    from jaxtag import checkpoint, input_pipeline

    loaded = checkpoint.load_model(checkpoint_path, prefer)
    builder = input_pipeline.get_builder(dataset, data_dir)
    dataset_tags = input_pipeline.tag_names(builder)
    missing = [t for t in dataset_tags if t not in loaded.tags]
    if missing:
        raise ValueError(f"{loaded.path}: the model has no output for dataset tags {missing}")
    order = np.array([loaded.tags.index(t) for t in dataset_tags])
    metrics = evaluate_split(
        build_model(loaded.config),
        loaded.variables,
        builder,
        split,
        dataset_tags,
        batch_size,
        order,
        progress,
    )
    return {"checkpoint": str(loaded.path), "dataset": dataset, "split": split, **metrics}
