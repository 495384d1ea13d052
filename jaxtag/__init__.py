"""jaxtag: the self-attention music tagger of Won, Chun & Serra (2019) in JAX/Flax."""

import os

# TensorFlow only feeds data here; its C++ start-up chatter (oneDNN notices) is noise to users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
