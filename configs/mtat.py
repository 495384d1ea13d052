"""MagnaTagATune top-50, the paper's recipe.

Variants (`--config configs/mtat.py:VARIANT`):
  released (default): the released ponswon.pth architecture (conv 8, learned positions 271);
  readme: the original README training command (conv 16, sinusoidal positions over 257 tokens,
          attention dropout 0.4 as main.py's default).
"""

import ml_collections

from .common import get_base_config


def get_config(variant: str = "released") -> ml_collections.ConfigDict:
    config = get_base_config()
    config.dataset = "magnatagatune"
    if variant == "readme":
        config.model.conv_channels = 16
        config.model.positions = "sinusoidal"
        config.model.positions_length = 257
        config.model.attention_dropout = 0.4
        config.model.hidden_dropout = 0.4
    elif variant != "released":
        raise ValueError(f"unknown mtat variant {variant!r}: use 'released' or 'readme'")
    return config
