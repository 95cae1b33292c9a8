"""Row softmax and (non-causal) double normalization, with their gradients.

On masked scores `s` (validity `m`), one head:

- single normalization (softmax): `P[i, j] = softmax over valid j of s[i, j]`;
- double normalization: `c[j] = logsumexp over valid i of s[i, j]` (each
  key's normalizer over the queries), then
  `A[i, j] = softmax over valid j of (s[i, j] - c[j])`;
- with a null query of log-mass `beta` per head (DNA.md, "Null query"):
  `c[j] = logaddexp(c[j], beta)`.

The double normalization's gradient is written out, so the backward pass
costs one reduction more than softmax's and no exponential.
"""

from keras import ops

from keras_dna.ops.numerics import at_least
from keras_dna.ops.numerics import logaddexp
from keras_dna.ops.numerics import masked_value
from keras_dna.ops.numerics import max_along
from keras_dna.ops.numerics import sum_like


def row_softmax(logits, valid):
    """Softmax over keys, and each row's sum of `exp(logits)`.

    `logits` are masked where `valid` is False; a row without a valid key
    gets zeros. The sums serve the gradient of double normalization.
    """
    if valid is not None:
        logits = ops.where(valid, logits, masked_value(logits))
    row_max = max_along(logits, -1)
    terms = ops.exp(logits - row_max)
    if valid is not None:
        terms = ops.where(valid, terms, 0.0)
    # At least 1 in a row with a valid key: its maximum is among them.
    row_sums = at_least(ops.sum(terms, axis=-1, keepdims=True), 1.0)
    return terms / row_sums, ops.exp(row_max + ops.log(row_sums))


def softmax_part_of_gradient(weights, upstream):
    """The gradient of a softmax over keys: `A * (g - sum over keys of A * g)`."""
    return weights * (upstream - ops.sum(weights * upstream, axis=-1, keepdims=True))


def key_logsumexp(scores):
    """`c[j]`: log-sum-exp of each key's valid scores over all queries.

    Masked entries of `scores` hold `masked_value`, so they add exp(-huge)
    = 0 whenever the key has a valid score. A key without one only has
    masked entries, for which any finite `c` will do.
    """
    # c does not depend on the shift mathematically; stopping its gradient
    # saves the backward pass through the max.
    shift = ops.stop_gradient(max_along(scores, -2))
    total = ops.sum(ops.exp(scores - shift), axis=-2, keepdims=True)
    return shift + ops.log(total)


def double_normalization(scores, valid, null_logits=None):
    """`softmax over keys of (s - c)`, `c` per key; gradient written out.

    `scores` are masked (`masked_value` where `valid` is False). With
    `null_logits` (one per head, broadcastable against the heads axis, e.g.
    shaped `(num_heads, 1, 1)`), the null query joins every key's
    normalizer: `c = logaddexp(c, null_logits)`.

    The gradient is `D - B * (sum over queries of D)`, with `D` the softmax
    part and `B = exp(s - c) = A * R`, where `R`, each query's sum of
    `exp(s - c)`, comes from the softmax's own maximum and sum: the
    backward pass needs no exponential of the scores. (`R <= key_length`
    since `s <= c`; where `R` underflows, `B` is below the resolution of
    `D`.) The null query does not change it; its logits get
    `-sum of (sum over queries of D) * exp(null_logits - c)`. There is
    deliberately no data-dependent branch: XLA turns a conditional with
    cheap branches into a select that computes both.
    """

    @ops.custom_gradient
    def normalize(scores, *null):
        key_lse = key_logsumexp(scores)
        if null:
            key_lse = logaddexp(key_lse, null[0])
        weights, query_sums = row_softmax(scores - key_lse, valid)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            softmax_part = softmax_part_of_gradient(weights, upstream)
            key_sums = ops.sum(softmax_part, axis=-2, keepdims=True)
            scores_grad = softmax_part - weights * query_sums * key_sums
            if not null:
                return scores_grad
            return scores_grad, null_logits_gradient(key_sums, null[0], key_lse)

        return weights, grad

    if null_logits is None:
        return normalize(scores)
    return normalize(scores, null_logits)


def null_logits_gradient(key_sums, null_logits, key_lse):
    """The null query logits' gradient, from each key's `sum over queries of D`.

    The weights see the logits only through `c = logaddexp(..., null)`,
    whose derivative is `exp(null - c)`; the weights' derivative in `c` is
    `-D`.
    """
    return sum_like(-key_sums * ops.exp(null_logits - key_lse), null_logits)
