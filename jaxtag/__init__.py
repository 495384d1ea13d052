"""jaxtag: the self-attention music tagger of Won, Chun & Serra (2019) in JAX/Flax.

    import jaxtag

    tagger = jaxtag.load("ponswon")      # or a checkpoint, a training workdir, a .pth file
    tagger.tag("song.mp3")               # [{"label": "guitar", "score": 0.91}, ...]

`import jaxtag` loads no JAX: `load`, `Tagger` and `convert_weights` (jaxtag/api.py) are
imported on first use. Bad input raises `JaxtagError`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# TensorFlow only feeds data here (training, evaluation, dataset builds), so its C++ start-up
# chatter is noise to users: the oneDNN notice and oneDNN's "DT_HALF only on AVX-512" error line
# (oneDNN's custom ops do not help a pipeline of casts, crops and batching: they are turned off),
# and other INFO/WARNING lines. Set here, before anything in jaxtag can import TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from jaxtag.errors import JaxtagError  # noqa: E402  (after the environment settings)
from jaxtag.version import __version__  # noqa: E402

if TYPE_CHECKING:
    from jaxtag.api import AudioInput, Tagger, convert_weights, load

__all__ = ["AudioInput", "JaxtagError", "Tagger", "__version__", "convert_weights", "load"]
_API = {"AudioInput", "Tagger", "convert_weights", "load"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from jaxtag import api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxtag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
