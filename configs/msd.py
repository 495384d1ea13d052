"""Million Song Dataset, Last.fm top-50 tags, the paper's recipe and architecture."""

import ml_collections

from .common import get_base_config


def get_config() -> ml_collections.ConfigDict:
    config = get_base_config()
    config.dataset = "msd"
    config.checkpoint_every_steps = 2000
    config.eval_batch_size = 16
    return config
