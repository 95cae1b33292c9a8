"""The reference implementation: `docs/math.md`'s formulas, one line each.

Written to be read, not to be fast: it holds the whole score matrix and
leaves the gradient to the backend's autodiff. Every other implementation
(`"whole"`, `"blockwise"`, `"fused"`) is an optimization of this one, and
`tests/test_reference.py` holds each of them to it, outputs and gradients;
the reference itself is held to the float64 oracle (`tests/oracle.py`).
Run it with `doubly_normalized_attention(..., implementation="reference")`.
"""

from keras import ops

from keras_dna.ops.backend import cumulative_logsumexp
from keras_dna.ops.backend import einsum
from keras_dna.ops.backend import scaled
from keras_dna.ops.normalization import hybrid_mix
from keras_dna.ops.numerics import logaddexp
from keras_dna.ops.numerics import masked_value
from keras_dna.ops.numerics import working_dtype


def reference_attention(
    query, key, value, mask=None, *, normalization, causal, scale, mixing_logits=None,
    null_query_logits=None,
):
    """Attention of `(B, T, N, H)` queries on `(B, S, N, H)` keys and values.

    `mask` is `None` or a boolean tensor broadcastable to `(B, N, T, S)`
    holding every rule of validity (the causal mask included); `causal`
    only says whether step 1 sums over the earlier queries alone. Returns
    `(B, T, N, value_dim)` in the working dtype.
    """
    dtype = working_dtype(query.dtype)
    query, key, value = (ops.cast(x, dtype) for x in (query, key, value))
    scores = scaled(einsum("btnh,bsnh->bnts", query, key), scale)  # s[i, j]
    valid = ops.ones_like(scores, "bool") if mask is None else ops.broadcast_to(mask, ops.shape(scores))
    weights = _over_valid_keys(scores, valid)  # softmax: P[i, j]
    if normalization != "single":
        # Step 1: c[j], each key's log-sum-exp over its valid queries (the
        # earlier ones alone, with causal normalization); the null query's
        # log-mass beta joins it.
        valid_scores = ops.where(valid, scores, masked_value(scores))
        if causal:
            key_lse = cumulative_logsumexp(valid_scores, axis=-2)
        else:
            key_lse = ops.logsumexp(valid_scores, axis=-2, keepdims=True)
        if null_query_logits is not None:
            key_lse = logaddexp(key_lse, ops.reshape(ops.cast(null_query_logits, dtype), (-1, 1, 1)))
        # Step 2: A[i, j], a softmax over valid keys of s[i, j] - c[j].
        double = _over_valid_keys(scores - key_lse, valid)
        weights = double if normalization == "double" else hybrid_mix(
            weights, double, mixing_logits, heads_axis=-3
        )
    return einsum("bnts,bsnh->btnh", weights, value)


def _over_valid_keys(logits, valid):
    """A softmax over each row's valid keys; zeros for a row without any."""
    logits = ops.where(valid, logits, masked_value(logits))
    terms = ops.where(valid, ops.exp(logits - ops.max(logits, axis=-1, keepdims=True)), 0.0)
    sums = ops.sum(terms, axis=-1, keepdims=True)
    return terms / ops.where(sums > 0, sums, 1.0)
