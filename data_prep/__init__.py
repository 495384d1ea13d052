"""TFDS builders for jaxtag: magnatagatune, msd, mtg_jamendo, audio_folder, synthetic_tags.

Installed as ``jaxtag.data_prep`` (see pyproject.toml); from a clone this folder also imports as
``data_prep``, so both ``python -m jaxtag.data_prep.build`` and ``python -m data_prep.build`` work.
The modules import each other relatively for that reason. The library (``jaxtag/``) never imports
them: it reads built datasets from their directories (``jaxtag.input_pipeline.get_builder``).

Importing a builder module registers it with TFDS; :func:`register` imports them all. This
package's ``__init__`` itself stays light on purpose: the mel computation's worker processes
import ``common`` and should not pay for TensorFlow.
"""

import importlib

BUILDERS = ("magnatagatune", "msd", "mtg_jamendo", "audio_folder", "synthetic_tags")


def register() -> None:
    """Imports every builder module so that TFDS knows the names in ``BUILDERS``."""
    for name in BUILDERS:
        importlib.import_module(f".{name}", __name__)
