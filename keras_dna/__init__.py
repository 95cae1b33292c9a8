"""Doubly-normalized attention for Keras.

`DoublyNormalizedAttention` is a drop-in replacement for
`keras.layers.MultiHeadAttention` whose attention does not "explain away" its
inputs, `DoublyNormalizedGroupQueryAttention` one for
`keras.layers.GroupQueryAttention`; `keras_dna.ops` holds the same math as
pure functions.
"""

import importlib

from keras_dna import ops
from keras_dna.layers import CausalNormalizationMask
from keras_dna.layers import DoublyNormalizedAttention
from keras_dna.layers import DoublyNormalizedGroupQueryAttention

__version__ = "0.1.0"

# Imported when first used: `distribute` needs TensorFlow and `analysis`
# draws with matplotlib, which a JAX or PyTorch user of the layer never loads.
_LAZY_MODULES = ("analysis", "convert", "distribute")


def __getattr__(name):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"keras_dna.{name}")
    raise AttributeError(f"module 'keras_dna' has no attribute {name!r}")

__all__ = [
    "CausalNormalizationMask",
    "DoublyNormalizedAttention",
    "DoublyNormalizedGroupQueryAttention",
    "analysis",
    "convert",
    "distribute",
    "ops",
    "__version__",
]
