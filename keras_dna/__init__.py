"""Doubly-normalized attention for Keras.

`DoublyNormalizedAttention` is a drop-in replacement for
`keras.layers.MultiHeadAttention` whose attention does not "explain away" its
inputs; `keras_dna.ops` holds the same math as pure functions.
"""

from keras_dna import analysis
from keras_dna import convert
from keras_dna import distribute
from keras_dna import ops
from keras_dna.attention import CausalNormalizationMask
from keras_dna.attention import DoublyNormalizedAttention

__version__ = "0.1.0"

__all__ = [
    "CausalNormalizationMask",
    "DoublyNormalizedAttention",
    "analysis",
    "convert",
    "distribute",
    "ops",
    "__version__",
]
