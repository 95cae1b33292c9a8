"""The layers: `DoublyNormalizedAttention` and what its call takes.

- `doubly_normalized_attention`: the layer, where DNA's attention step
  replaces `MultiHeadAttention`'s softmax;
- `mha_base`: `MultiHeadAttention`'s call, exact about masks and inputs;
- `masks`: how a call's masks combine, and `CausalNormalizationMask`;
- `argument_checks`: the layer's errors for bad arguments.
"""

from keras_dna.layers.doubly_normalized_attention import NULL_QUERY_INIT
from keras_dna.layers.doubly_normalized_attention import DoublyNormalizedAttention
from keras_dna.layers.masks import CausalNormalizationMask

__all__ = ["CausalNormalizationMask", "DoublyNormalizedAttention", "NULL_QUERY_INIT"]
