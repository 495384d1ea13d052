"""Fine-tuning's starting point: a checkpoint's weights, the classifier rebuilt for new tags.

`configs/finetune.py` sets `init_checkpoint`; `jaxtag.train.resolve_run` calls
`initial_variables` to get the model config and the variables the run starts from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxtag import checkpoint
from jaxtag.model import RUNTIME_FIELDS, ModelConfig, init_variables


def initial_variables(
    path: str, requested: Mapping[str, Any], tags: list[str], config: Any
) -> tuple[ModelConfig, dict[str, Any]]:
    """The model and weights to fine-tune from checkpoint `path`, for the dataset's `tags`.

    Architecture fields come from the checkpoint (the requested ones must agree); runtime fields
    (dropouts, dtype, ...) from the config. Every backbone weight is loaded; the classifier is
    rebuilt for `tags`: rows of tags the checkpoint also predicts are copied, the rest keep a
    fresh initialisation.
    """
    loaded = checkpoint.load_model(os.path.expanduser(path))
    theirs = loaded.config.architecture()
    differ = [
        f"{k}: {theirs[k]!r} in the checkpoint, {requested[k]!r} requested"
        for k in sorted(theirs)
        if k != "num_tags" and k in requested and requested[k] != theirs[k]
    ]
    if differ:
        raise ValueError(
            f"init_checkpoint {loaded.path} has another architecture: {'; '.join(differ)}"
        )
    runtime = {k: v for k, v in requested.items() if k in RUNTIME_FIELDS}
    model = ModelConfig.from_dict({**theirs, **runtime, "num_tags": len(tags)})
    variables = jax.tree_util.tree_map(np.asarray, loaded.variables)
    if loaded.tags != list(tags):
        fresh = init_variables(model, jax.random.PRNGKey(config.seed), config.crop_frames)
        head = {k: np.array(v) for k, v in fresh["params"]["classifier"].items()}
        source_head = variables["params"]["classifier"]
        kept = [t for t in tags if t in loaded.tags]
        for tag in kept:
            i, j = tags.index(tag), loaded.tags.index(tag)
            head["kernel"][:, i] = source_head["kernel"][:, j]
            head["bias"][i] = source_head["bias"][j]
        variables["params"] = {**variables["params"], "classifier": head}
        new = [t for t in tags if t not in loaded.tags]
        if jax.process_index() == 0:
            print(
                f"init_checkpoint {loaded.path}: classifier rebuilt for {len(tags)} tags; "
                f"{len(kept)} rows kept ({', '.join(kept) or 'none'}), "
                f"{len(new)} initialised ({', '.join(new) or 'none'})"
            )
    return model, variables
