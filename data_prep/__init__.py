"""TFDS builders for jaxtag: magnatagatune, msd, audio_folder, synthetic_tags.

Importing a builder module registers it with TFDS (``tfds.builder('magnatagatune', ...)``);
:func:`register` imports them all. This package's ``__init__`` itself stays light on purpose: the
mel computation's worker processes import ``data_prep.common`` and should not pay for TensorFlow.
Build any of them with ``python -m data_prep.build NAME --data_dir DIR``.
"""

BUILDERS = ("magnatagatune", "msd", "audio_folder", "synthetic_tags")


def register() -> None:
    """Imports every builder module so that TFDS knows the names in ``BUILDERS``."""
    import importlib

    for name in BUILDERS:
        importlib.import_module(f"data_prep.{name}")
