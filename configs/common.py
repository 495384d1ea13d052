"""Fields every training config shares; the dataset configs override what differs."""

import ml_collections

from jaxtag.model import ModelConfig


def get_base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Data: a dataset built by `python -m data_prep.build NAME --data_dir DATA_DIR`.
    config.dataset = "magnatagatune"
    config.data_dir = "~/tensorflow_datasets"
    config.train_split = "train"
    config.eval_split = "validation"
    config.crop_frames = 256  # one random 256-frame crop (~4.1 s) per clip per step
    config.shuffle_buffer = 10_000

    # The network (jaxtag.model.ModelConfig); defaults are the released ponswon.pth architecture.
    config.model = ml_collections.ConfigDict(ModelConfig().to_dict())
    # Start from these weights instead of a random init (e.g. a converted ponswon.pth); the
    # classifier is rebuilt when the dataset's tags differ (see configs/finetune.py).
    config.init_checkpoint = ""
    # Train the classifier alone on a frozen backbone (eval-mode BatchNorm): a linear probe.
    config.freeze_backbone = False

    # Optimisation: the original recipe (jaxtag/optim.py) by default.
    config.optimizer = "original"  # or "adamw_cosine"
    config.global_batch_size = 16
    config.num_epochs = 120  # 60 Adam epochs + 3 x 20 SGD epochs
    config.steps_per_epoch = -1  # -1: number of training clips // global_batch_size
    config.learning_rate = 1e-4  # Adam (original) or peak AdamW rate
    config.switch_epoch = 60
    config.sgd_learning_rates = (1e-3, 1e-4, 1e-5)
    config.sgd_epochs_per_rate = 20
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.warmup_epochs = 1.0  # adamw_cosine only

    # Evaluation, checkpoints, logs.
    config.eval_batch_size = 8  # clips (x 16 chunks each) per evaluation batch
    config.eval_every_epochs = 1
    config.checkpoint_every_steps = 1000
    config.keep_best = 3
    config.log_every_steps = 50
    config.seed = 0
    return config
