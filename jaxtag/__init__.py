"""jaxtag: the self-attention music tagger of Won, Chun & Serra (2019) in JAX/Flax."""

import os

# TensorFlow only feeds data here (training, evaluation, dataset builds), so its C++ start-up
# chatter is noise to users: the oneDNN notice and oneDNN's "DT_HALF only on AVX-512" error line
# (oneDNN's custom ops do not help a pipeline of casts, crops and batching: they are turned off),
# and other INFO/WARNING lines. Set here, before anything in jaxtag can import TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"

TRAIN_EXTRA = ("tensorflow", "tensorflow_datasets", "ml_collections", "absl", "sklearn", "clu")
"""Modules of `pip install 'jaxtag[train]'` (pyproject.toml) that training, evaluation and dataset
building import; the core install (the `jaxtag` commands) has none of TensorFlow's."""


def require_train_extra(command: str) -> None:
    """Exits with one line naming the install command when the train extra is missing."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: imported before and blocked (None)
            return False

    missing = [m for m in TRAIN_EXTRA if not installed(m)]
    if missing:
        raise SystemExit(
            f"{command}: {', '.join(missing)} not installed; training, evaluation and dataset "
            "building need the train extra: pip install 'jaxtag[train]'"
        )
