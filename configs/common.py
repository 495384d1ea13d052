"""Fields every training config shares; the dataset configs override what differs.

Every value is checked when a run starts, before anything is written (jaxtag/run_config.py):
batch sizes positive multiples of the device count, intervals and epochs >= 1, learning rates
finite and positive, the splits present in the dataset; one line lists every bad field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jaxtag.model import ModelConfig

if TYPE_CHECKING:
    import ml_collections


def base_fields() -> dict[str, Any]:
    """The shared fields as a plain dict (for scripts that run without ml_collections)."""
    return {
        # Data: a dataset built by `python -m data_prep.build NAME --data_dir DATA_DIR`.
        "dataset": "magnatagatune",
        "data_dir": "~/tensorflow_datasets",
        "train_split": "train",
        "eval_split": "validation",
        "crop_frames": 256,  # one random 256-frame crop (~4.1 s) per clip per step
        "shuffle_buffer": 10_000,
        # The network (jaxtag.model.ModelConfig); defaults: the released ponswon.pth architecture.
        "model": ModelConfig().to_dict(),
        # The front end's kernels: auto (on a CPU the fastest measured for the machine, batch and
        # crop, kept in the autotune cache: jaxtag/model/tuning.py; the plain convolutions
        # elsewhere), reference or banded. Same function and parameters either way.
        "front_end": "auto",
        # Start from these weights instead of a random init (e.g. a converted ponswon.pth); the
        # classifier is rebuilt when the dataset's tags differ (see configs/finetune.py).
        "init_checkpoint": "",
        # Train the classifier alone on a frozen backbone (eval-mode BatchNorm): a linear probe.
        "freeze_backbone": False,
        # Optimisation: the original recipe (jaxtag/optim.py) by default.
        "optimizer": "original",  # or "adamw_cosine"
        "global_batch_size": 16,
        "num_epochs": 120,  # 60 Adam epochs + 3 x 20 SGD epochs
        "steps_per_epoch": -1,  # -1: number of training clips // global_batch_size
        "learning_rate": 1e-4,  # Adam (original) or peak AdamW rate
        "switch_epoch": 60,
        "sgd_learning_rates": (1e-3, 1e-4, 1e-5),
        "sgd_epochs_per_rate": 20,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_epochs": 1.0,  # adamw_cosine only
        # Evaluation, checkpoints, logs.
        "eval_batch_size": 8,  # clips (x 16 chunks each) per evaluation batch
        "eval_every_epochs": 1,
        "checkpoint_every_steps": 1000,
        "keep_best": 3,
        "log_every_steps": 50,
        "seed": 0,
    }


def get_base_config() -> ml_collections.ConfigDict:
    import ml_collections

    return ml_collections.ConfigDict(base_fields())
