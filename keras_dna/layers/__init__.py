"""The layers: `DoublyNormalizedAttention`, `DoublyNormalizedGroupQueryAttention`
and what their calls take.

- `doubly_normalized_attention`: the layer, where DNA's attention step
  replaces `MultiHeadAttention`'s softmax;
- `doubly_normalized_group_query_attention`: the same for
  `GroupQueryAttention`;
- `double_normalization`: what both add, their options and attention step;
- `mha_base`, `gqa_base`: Keras's calls, exact about masks and inputs;
- `masks`: how a call's masks combine, and `CausalNormalizationMask`;
- `argument_checks`: the layer's errors for bad arguments.
"""

from keras_dna.layers.double_normalization import NULL_QUERY_INIT
from keras_dna.layers.doubly_normalized_attention import DoublyNormalizedAttention
from keras_dna.layers.doubly_normalized_group_query_attention import (
    DoublyNormalizedGroupQueryAttention,
)
from keras_dna.layers.masks import CausalNormalizationMask

__all__ = [
    "CausalNormalizationMask",
    "DoublyNormalizedAttention",
    "DoublyNormalizedGroupQueryAttention",
    "NULL_QUERY_INIT",
]
