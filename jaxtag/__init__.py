"""jaxtag: the self-attention music tagger of Won, Chun & Serra (2019) in JAX/Flax."""

import os

# TensorFlow only feeds data here (training, evaluation, dataset builds), so its C++ start-up
# chatter is noise to users: the oneDNN notice and oneDNN's "DT_HALF only on AVX-512" error line
# (oneDNN's custom ops do not help a pipeline of casts, crops and batching: they are turned off),
# and other INFO/WARNING lines. Set here, before anything in jaxtag can import TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
