"""Doubly-normalized attention as pure functions in `keras.ops`.

The math follows "Attention that does not Explain Away" (Ding et al., 2020):

1. over queries, per key: `B[i, j] = m exp(s[i, j]) / sum_i' m exp(s[i', j])`
2. over keys, per query: `A[i, j] = B[i, j] / sum_j' B[i, j']`

computed in log space as a softmax over keys of `s[i, j] - c[j]`, where `c[j]`
is the log-sum-exp of key `j`'s valid scores over the queries. With causal
normalization `c[i, j]` only sums over queries `i' <= i`, so no output depends
on a later query.

The functions here are what `keras_dna.DoublyNormalizedAttention` runs; they
can also be used on their own, in the style of
`keras.ops.dot_product_attention`. One module per concern:

- `dispatch`: the public functions (checks, masks, and the call of the
  implementation chosen);
- `implementation`: which implementation runs a call, decided once
  (`choose_implementation`, `implementation_for`);
- `normalization`: softmax and double normalization, with gradients;
- `causal`: prefix log-sum-exps for causal normalization;
- `blockwise`: the `chunk_size` path, blocks of queries;
- `fused`: non-causal DNA on fused attention kernels
  (`keras.ops.dot_product_attention`), scores never written;
- `pallas`: DNA's own kernels (JAX Pallas), causal and not, scores never
  written; loaded by the calls that run them;
- `incremental`: causal normalization over queries that arrive in blocks,
  and attention against a key/value cache (decoding);
- `numerics`: working dtypes, masked values, underflow floors;
- `checks`: argument checks shared with the layer;
- `backend`: what a Keras backend does differently (einsum, compilation);
- `symbolic`: `keras.Input`s for the public functions.
"""

from keras_dna.ops.dispatch import causal_mask
from keras_dna.ops.dispatch import doubly_normalized_attention
from keras_dna.ops.dispatch import doubly_normalized_attention_weights
from keras_dna.ops.dispatch import normalize_attention_scores
from keras_dna.ops.blockwise import auto_chunk_size
from keras_dna.ops.checks import NORMALIZATIONS
from keras_dna.ops.implementation import IMPLEMENTATIONS
from keras_dna.ops.implementation import choose_implementation
from keras_dna.ops.implementation import implementation_for
from keras_dna.ops.incremental import causal_block_weights

__all__ = [
    "IMPLEMENTATIONS",
    "NORMALIZATIONS",
    "auto_chunk_size",
    "causal_block_weights",
    "causal_mask",
    "choose_implementation",
    "doubly_normalized_attention",
    "doubly_normalized_attention_weights",
    "implementation_for",
    "normalize_attention_scores",
]
