r"""Fine-tuning a checkpoint (converted ponswon.pth or a trained run) on your own dataset and tags.

    python run_train.py --config configs/finetune.py --workdir runs/mine \
        --config.init_checkpoint checkpoints/ponswon \
        --config.dataset audio_folder/mine --config.data_dir ~/tensorflow_datasets
    python run_train.py --config configs/finetune.py:probe ...   # a linear probe

The architecture is read from `init_checkpoint` (config.model holds only the runtime fields:
dropouts, dtype, precision). Every backbone weight is loaded; the classifier is rebuilt
for the dataset's tags, keeping the rows of tags the checkpoint also predicts (the log lists kept
and new tags). Variants:
  full (default): every weight trains, AdamW at 1e-4 with a short warm-up;
  probe: `freeze_backbone=True`, the classifier alone on frozen features (BatchNorm statistics
         frozen too), AdamW at 1e-3.
"""

import ml_collections

from jaxtag.model import RUNTIME_FIELDS, ModelConfig

from .common import get_base_config


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    config = get_base_config()
    config.init_checkpoint = ""  # required: --config.init_checkpoint=DIR
    defaults = ModelConfig().to_dict()
    config.model = ml_collections.ConfigDict(
        {**{k: defaults[k] for k in sorted(RUNTIME_FIELDS)}, "num_tags": -1}
    )
    config.dataset = "audio_folder"
    config.optimizer = "adamw_cosine"
    config.learning_rate = 1e-4
    config.warmup_epochs = 1.0
    config.weight_decay = 1e-4
    config.num_epochs = 20
    config.keep_best = 1
    config.checkpoint_every_steps = 500
    if variant == "probe":
        config.freeze_backbone = True
        config.learning_rate = 1e-3
    elif variant != "full":
        raise ValueError(f"unknown finetune variant {variant!r}: use 'full' or 'probe'")
    return config
