"""Row softmax and (non-causal) double normalization, with their gradients.

On masked scores `s` (validity `m`), one head:

- single normalization (softmax): `P[i, j] = softmax over valid j of s[i, j]`;
- double normalization: `c[j] = logsumexp over valid i of s[i, j]` (each
  key's normalizer over the queries), then
  `A[i, j] = softmax over valid j of (s[i, j] - c[j])`;
- with a null query of log-mass `beta` per head (docs/math.md, "The null query"):
  `c[j] = logaddexp(c[j], beta)`.

Double normalization takes one exponential per score, as softmax does, and
its gradient is written out, so the backward pass costs one reduction more
than softmax's and no exponential.
"""

import math

from keras import ops

from keras_dna.ops.backend import cond
from keras_dna.ops.backend import einsum
from keras_dna.ops.backend import maximum
from keras_dna.ops.numerics import at_least
from keras_dna.ops.numerics import fast_path_trusted
from keras_dna.ops.numerics import logaddexp
from keras_dna.ops.numerics import mask_scores
from keras_dna.ops.numerics import masked_value
from keras_dna.ops.numerics import max_along
from keras_dna.ops.numerics import positive_where_valid
from keras_dna.ops.numerics import sum_like
from keras_dna.ops.numerics import underflow_log_threshold


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


def hybrid_mix(softmax, double, mixing_logits, heads_axis):
    """`"hybrid"` normalization (docs/math.md, "Hybrid"): per head `h`,
    `sigmoid(mixing_logits[h]) * softmax + (1 - sigmoid(...)) * double`.

    `softmax` and `double` are weights or outputs with the heads on the
    negative axis `heads_axis`; `mixing_logits` holds one logit per head
    (any shape with that many entries), or is `None` for an equal mix.
    Every implementation mixes here, whatever it mixes.
    """
    if mixing_logits is None:
        share = 0.5
    else:
        shape = (-1,) + (1,) * (-heads_axis - 1)
        share = ops.reshape(ops.sigmoid(ops.cast(mixing_logits, double.dtype)), shape)
    return share * ops.cast(softmax, double.dtype) + (1.0 - share) * double


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

    `scores` come unmasked; entries where `valid` is False are left out.
    With `null_logits` (one per head, broadcastable against the heads axis,
    e.g. shaped `(num_heads, 1, 1)`), the null query joins every key's
    normalizer: `c = logaddexp(c, null_logits)`.

    One exponential per score: with `E = exp(s - max over queries)` per key
    (the maximum taken over masked queries too, and `null_logits`) and `K`
    its sum over the valid queries, the first step is `B = E / K`, and the
    second `A = B / R` with `R` each query's sum of `B`. Should a valid `K`
    times a valid `R` underflow (`fast_path_trusted`: scores below a key's
    maximum by more than about 40), the call takes a row-shifted softmax of
    `s - c` in log space instead.

    The gradient is `D - B * (sum over queries of D)`, with `D` the softmax
    part and `B = A * R` from the saved weights: no exponential. The null
    query does not change it; its logits get
    `-sum of (sum over queries of D) * exp(null_logits - c)`.
    """
    threshold = math.exp(underflow_log_threshold(scores))
    row_valid = key_valid = None
    if valid is not None:
        row_valid = ops.any(valid, axis=-1, keepdims=True)
        key_valid = ops.any(valid, axis=-2, keepdims=True)

    @ops.custom_gradient
    def normalize(scores, *null):
        # Over all queries, masked ones too: reading the scores as they are
        # saves writing a masked copy. Masked scores far above the valid
        # ones underflow the valid terms, which sends the call to the
        # exact branch.
        shift = max_along(scores, -2)
        if null:
            shift = maximum(shift, null[0])
        # Masked in the exponent (exp(masked_value - shift) = 0), so that XLA
        # writes one tensor of terms, not the exponentials and a masked copy.
        terms = ops.exp(mask_scores(scores, valid) - shift)
        key_sums = ops.sum(terms, axis=-2, keepdims=True)
        if null:
            null_terms = ops.exp(null[0] - shift)
            key_sums = key_sums + null_terms
        key_sums = positive_where_valid(key_sums, key_valid)
        query_sums = einsum("...ts,...us->...tu", terms, 1.0 / key_sums)
        trusted = fast_path_trusted(key_sums, key_valid, query_sums, row_valid)
        # Computed outside the branch: a branch computing a score-sized
        # result runs unfused and single-threaded in XLA on CPU, while
        # passing a tensor through costs nothing.
        fast_weights = terms / (key_sums * at_least(query_sums, threshold))
        key_lse = shift + ops.log(key_sums)
        if valid is not None:
            # Masked scores far above the valid ones flush the valid terms.
            # A branch of its own: inside the weights' branch, XLA hoisted
            # the whole exact branch out of the conditional (measured).
            key_lse = cond(trusted, lambda: key_lse, lambda: _key_lse(scores, valid, null))
        weights, query_sums = cond(
            trusted,
            lambda: (fast_weights, query_sums),
            lambda: row_softmax(mask_scores(scores, valid) - key_lse, valid),
        )

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # The column sums of the softmax part `A * (g - rows)`, as the
            # column sums of `A * g` less `rows` through `A`: the softmax
            # part is never written out.
            weighted = weights * upstream
            rows = ops.sum(weighted, axis=-1, keepdims=True)
            column_sums = ops.sum(weighted, axis=-2, keepdims=True) - einsum(
                "...tu,...ts->...us", rows, weights
            )
            scores_grad = weights * (upstream - rows - query_sums * column_sums)
            if not null:
                return scores_grad
            return scores_grad, null_logits_gradient(column_sums, null[0], key_lse)

        return weights, grad

    if null_logits is None:
        return normalize(scores)
    return normalize(scores, null_logits)


def _key_lse(scores, valid, null):
    """Each key's log-sum-exp over the valid queries and the null query."""
    key_lse = key_logsumexp(mask_scores(scores, valid))
    return logaddexp(key_lse, null[0]) if null else key_lse


def null_logits_gradient(key_sums, null_logits, key_lse):
    """The null query logits' gradient, from each key's `sum over queries of D`.

    The weights see the logits only through `c = logaddexp(..., null)`,
    whose derivative is `exp(null - c)`; the weights' derivative in `c` is
    `-D`.
    """
    return sum_like(-key_sums * ops.exp(null_logits - key_lse), null_logits)
