"""The MTSA network as a small package, imports pointing one way:

config (what it computes; no JAX) -> layers (PyTorch-semantics Dense/Conv/BatchNorm/LayerNorm)
  -> kernels (pure array functions) -> front_end (readable `FrontEnd`, fast `BandedFrontEnd`)
  -> encoder (CLS, positions, BERT layers) -> network (`MTSA`, `build_model`)
"""

from jaxtag.model.config import (
    BN_EPS,
    LN_EPS,
    RUNTIME_FIELDS,
    ModelConfig,
    horizontal_branches,
    vertical_branches,
)
from jaxtag.model.encoder import cls_vector, sinusoidal_table
from jaxtag.model.layers import batch_moments
from jaxtag.model.network import (
    FRONT_ENDS,
    MTSA,
    attention_maps,
    build_model,
    choose_front_end,
    count_params,
    init_variables,
)

__all__ = [
    "BN_EPS",
    "FRONT_ENDS",
    "LN_EPS",
    "MTSA",
    "RUNTIME_FIELDS",
    "ModelConfig",
    "attention_maps",
    "batch_moments",
    "build_model",
    "choose_front_end",
    "cls_vector",
    "count_params",
    "horizontal_branches",
    "init_variables",
    "sinusoidal_table",
    "vertical_branches",
]
