"""minibloom: the BLOOM language-model family in NumPy, exact enough to be the reference.

    import minibloom
    model = minibloom.load("path/to/bloom-560m")          # or a hub id, a .gguf file, or None for the default model
    logits = model([[59414, 8876]])                        # NumPy [batch, seq, vocab]
    loss, grads = model.value_and_grad([[59414, 8876, 17]])  # the gradient oracle; minibloom.train() trains
"""

from .bloom import Bloom, load
from .config import BloomConfig
from .errors import MinibloomError
from .model import BloomOutput, KVCache
from .training import TrainConfig, train

__version__ = "0.1.0"
__all__ = ["Bloom", "BloomConfig", "BloomOutput", "KVCache", "MinibloomError", "TrainConfig", "load", "train",
           "__version__"]
