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
`keras.ops.dot_product_attention`.
"""

import functools
import math

import keras
from keras import backend
from keras import ops

from keras_dna._validation import NORMALIZATIONS
from keras_dna._validation import check_broadcastable
from keras_dna._validation import check_normalization

__all__ = [
    "NORMALIZATIONS",
    "doubly_normalized_attention",
    "doubly_normalized_attention_weights",
    "normalize_attention_scores",
]

# Block length of the blocked prefix sum along the query axis. XLA lowers a
# cumulative sum to a windowed reduction whose cost grows with the square of
# the axis length, so the prefix sum is taken within short blocks and again
# over the block totals.
_PREFIX_BLOCK = 16


def _working_dtype(dtype):
    """The dtype normalization runs in: float32, or float64 for float64."""
    return "float64" if backend.standardize_dtype(dtype) == "float64" else "float32"


def _is_float64(x):
    return backend.standardize_dtype(x.dtype) == "float64"


def _masked_value(x):
    """Stands in for the scores of masked pairs, in the dtype of `x`.

    Finite, so that differences of two masked entries stay 0 and no
    inf - inf can reach a gradient.
    """
    return -1e300 if _is_float64(x) else -1e30


def _underflow_log_threshold(x):
    """Log of the smallest sum of exponentials the fast paths trust.

    exp() flushes to zero below about -87 (float32) or -708 (float64); a sum
    of at least exp(threshold) makes the lost terms negligible (relative
    error below `length * exp(threshold - flush)`). Half the range, because
    XLA may multiply two such sums (it rewrites `a / b / c` to
    `a / (b * c)`), and their product must not underflow either.
    """
    return -300.0 if _is_float64(x) else -40.0


@keras.saving.register_keras_serializable(package="keras_dna")
class _SymbolicFunction(keras.Operation):
    """Places a keras_dna function in a functional model's graph.

    Serialized by the function's name; the model keeps the call's arguments.
    """

    def __init__(self, function, name=None):
        super().__init__(name=name)
        self.function = function

    def call(self, *args, **kwargs):
        return globals()[self.function](*args, **kwargs)

    def get_config(self):
        return {"function": self.function, "name": self.name}


def _symbolic_inputs_allowed(fn):
    """Lets `fn` take `keras.Input`s: its output shape is found by tracing.

    The functions use a data-dependent branch and a custom gradient, which
    only run on concrete (or backend-traced) tensors.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if any(keras.utils.is_keras_tensor(x) for x in keras.tree.flatten((args, kwargs))):
            return _SymbolicFunction(fn.__name__)(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _einsum(equation, *operands):
    """`keras.ops.einsum`, but `tf.einsum` on the TensorFlow backend.

    Keras' TensorFlow einsum rewrites attention-shaped equations into
    transposes and batched matmuls (for its quantized kernels); under XLA
    on a CPU that made a layer's forward+backward step about 1.3x slower
    than `tf.einsum`, which `keras.ops.dot_product_attention` (and so
    `MultiHeadAttention`) uses.
    """
    operands = [ops.convert_to_tensor(x) for x in operands]
    dtype = backend.result_type(*(x.dtype for x in operands))
    operands = [ops.cast(x, dtype) for x in operands]
    if backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.einsum(equation, *operands)
    return ops.einsum(equation, *operands)


def _static_length(x, axis):
    length = x.shape[axis]
    return length if isinstance(length, int) else None


def _masked_softmax(logits, valid):
    """Softmax over the last axis; rows with no valid entry give zeros."""
    if valid is None:
        return ops.softmax(logits, axis=-1)
    logits = ops.where(valid, logits, _masked_value(logits))
    return ops.where(valid, ops.softmax(logits, axis=-1), 0.0)


def _key_logsumexp(scores):
    """`c[j]`: log-sum-exp of each key's valid scores over all queries.

    Masked entries of `scores` hold `_masked_value`, so they add exp(-huge)
    = 0 whenever the key has a valid score. A key without one only has
    masked entries, for which any finite `c` will do.
    """
    # c does not depend on the shift mathematically; stopping its gradient
    # saves the backward pass through the max.
    shift = ops.stop_gradient(ops.max(scores, axis=-2, keepdims=True))
    total = ops.sum(ops.exp(scores - shift), axis=-2, keepdims=True)
    return shift + ops.log(total)


def _cumsum(x, axis):
    """Inclusive prefix sum along `axis` (negative), blocked for XLA."""
    length = _static_length(x, axis)
    if length is None or length <= _PREFIX_BLOCK:
        return ops.cumsum(x, axis=axis)
    padding = (-length) % _PREFIX_BLOCK
    if padding:
        pad_width = [(0, 0)] * len(x.shape)
        pad_width[axis] = (0, padding)
        x = ops.pad(x, pad_width)
    rank = len(x.shape)
    axis = axis % rank
    num_blocks = (length + padding) // _PREFIX_BLOCK
    shape = ops.shape(x)
    blocks = ops.reshape(
        x,
        tuple(shape[:axis]) + (num_blocks, _PREFIX_BLOCK) + tuple(shape[axis + 1 :]),
    )
    within = ops.cumsum(blocks, axis=axis + 1)
    totals = ops.take(within, _PREFIX_BLOCK - 1, axis=axis + 1)
    # Exclusive prefix by shifting (not by subtracting, which would cancel).
    before = _cumsum(totals, axis)
    before = ops.concatenate(
        [
            ops.zeros_like(ops.take(before, ops.arange(1), axis=axis)),
            ops.take(before, ops.arange(num_blocks - 1), axis=axis),
        ],
        axis=axis,
    )
    out = within + ops.expand_dims(before, axis + 1)
    out = ops.reshape(out, shape)
    if padding:
        out = ops.take(out, ops.arange(length), axis=axis)
    return out


def _logaddexp(a, b):
    high = ops.maximum(a, b)
    return high + ops.log1p(ops.exp(-ops.abs(a - b)))


def _exact_prefix_logsumexp(scores):
    """Prefix log-sum-exp along the query axis, exact for any spread.

    A sequential scan over the queries carrying each key's running
    log-sum-exp: one pass, memory of a few copies of `scores`, and the same
    code for static and unknown lengths. Only taken when the fast path would
    lose precision, and never differentiated (the gradient is analytic).
    """

    def step(running, row):
        running = _logaddexp(running, row)
        return running, running

    by_query = ops.moveaxis(scores, -2, 0)
    start = ops.full_like(by_query[0], _masked_value(scores))
    _, prefix = ops.scan(step, start, by_query)
    return ops.moveaxis(prefix, 0, -2)


def _reverse_cumsum(x, axis):
    return ops.flip(_cumsum(ops.flip(x, axis=axis), axis=axis), axis=axis)


def _positive_part_log(x):
    """log(max(x, 0)), with the masked value standing in for log(0)."""
    positive = x > 0
    return ops.where(positive, ops.log(ops.where(positive, x, 1.0)), _masked_value(x))


def _prefix_logsumexp(scores, valid):
    """`c[i, j]`: log-sum-exp of key j's valid scores over queries i' <= i.

    Fast path: exponentials against each key's maximum over all queries and
    a blocked prefix sum. A valid prefix whose sum underflows against that
    maximum (scores rising by more than about 40 along the queries) switches
    the call to the exact log-space scan. Not differentiable: callers write
    the gradient out with `_prefix_logsumexp_transpose`.
    """
    # As in `_key_logsumexp`, masked entries add nothing to a valid prefix.
    shift = ops.max(scores, axis=-2, keepdims=True)
    partial = _cumsum(ops.exp(scores - shift), axis=-2)
    trusted = partial >= math.exp(_underflow_log_threshold(scores))
    if valid is not None:
        trusted = ops.logical_or(trusted, ops.logical_not(valid))
    return ops.cond(
        ops.all(trusted),
        lambda: shift + ops.log(ops.maximum(partial, _smallest_normal(scores))),
        lambda: _exact_prefix_logsumexp(scores),
    )


def _prefix_logsumexp_transpose(scores, key_lse, upstream):
    """`sum over i >= i' of upstream[i, j] exp(s[i', j] - c[i, j])`.

    The gradient of `_prefix_logsumexp` (`c`, given as `key_lse`) with
    respect to `scores`, for the upstream gradient `upstream`. A reverse
    prefix sum against each key's maximum where that cannot overflow, else
    in log space, the positive and negative parts of `upstream` apart.
    """
    shift = ops.max(scores, axis=-2, keepdims=True)
    bounded = ops.logical_or(
        key_lse - shift >= _underflow_log_threshold(scores), upstream == 0
    )

    def fast():
        # exp(shift - c) <= exp(40) wherever upstream is nonzero.
        scale = ops.where(upstream == 0, 0.0, ops.exp(shift - key_lse))
        return ops.exp(scores - shift) * _reverse_cumsum(upstream * scale, axis=-2)

    def exact():
        # exp(s[i'] + log sum) is at most sum |upstream|.
        total = 0.0
        for sign in (1.0, -1.0):
            log_terms = _positive_part_log(sign * upstream) - key_lse
            reverse_lse = ops.flip(
                _exact_prefix_logsumexp(ops.flip(log_terms, axis=-2)), axis=-2
            )
            total = total + sign * ops.exp(scores + reverse_lse)
        return total

    return ops.cond(ops.all(bounded), fast, exact)


def _smallest_normal(x):
    return 1e-307 if _is_float64(x) else 1e-37


def _softmax_part_of_gradient(weights, upstream):
    """The gradient of a softmax over keys: `A * (g - sum over keys of A * g)`."""
    return weights * (upstream - ops.sum(weights * upstream, axis=-1, keepdims=True))


def _double_normalization(scores, valid):
    """`softmax over keys of (s - c)`, `c` per key; gradient written out.

    The gradient is `D - B * (sum over queries of D)`, with `D` the softmax
    part and `B = exp(s - c) = A * R`, where `R`, each query's sum of
    `exp(s - c)`, comes from the softmax's own maximum and sum: the
    backward pass needs no exponential of the scores. (`R <= key_length`
    since `s <= c`; where `R` underflows, `B` is below the resolution of
    `D`.) There is deliberately no data-dependent branch: XLA turns a
    conditional with cheap branches into a select that computes both.
    """

    @ops.custom_gradient
    def normalize(scores):
        logits = scores - _key_logsumexp(scores)
        if valid is not None:
            logits = ops.where(valid, logits, _masked_value(logits))
        row_max = ops.max(logits, axis=-1, keepdims=True)
        terms = ops.exp(logits - row_max)
        if valid is not None:
            terms = ops.where(valid, terms, 0.0)
        # At least 1 in a row with a valid key: its maximum is among them.
        row_sums = ops.maximum(ops.sum(terms, axis=-1, keepdims=True), 1.0)
        weights = terms / row_sums
        query_sums = ops.exp(row_max + ops.log(row_sums))

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            softmax_part = _softmax_part_of_gradient(weights, upstream)
            key_part = weights * query_sums
            return softmax_part - key_part * ops.sum(softmax_part, axis=-2, keepdims=True)

        return weights, grad

    return normalize(scores)


def _causal_double_normalization(scores, valid):
    """Double normalization with prefix sums over the queries.

    With `E = exp(s - max over queries)` per key and `P` its prefix sum over
    the queries, the first step is `B = E / P` and the second `A = B / R`
    with `R` the sums of `B` over the keys: one exponential per score.
    Should a valid `R` or `P` underflow (scores rising by more than about
    40), the call computes `softmax(s - c)` in log space with the exact
    prefix log-sum-exp instead (a loop, so XLA keeps the branch).

    The gradient is `D - E * (reverse prefix sum of D / P)` with `D` the
    softmax part; `E = A * R * P` comes from the saved weights, so the
    backward pass needs no exponential and no autodiff through the branch.
    """
    threshold = math.exp(_underflow_log_threshold(scores))
    row_valid = None if valid is None else ops.any(valid, axis=-1, keepdims=True)

    def smallest(sums, where_valid):
        if where_valid is not None:
            sums = ops.where(where_valid, sums, float("inf"))
        return ops.min(sums)

    @ops.custom_gradient
    def normalize(scores):
        # Shared by E and P, the shift cancels in B.
        shift = ops.max(scores, axis=-2, keepdims=True)
        terms = ops.exp(scores - shift)
        if valid is not None:
            terms = ops.where(valid, terms, 0.0)
        key_sums = _cumsum(terms, axis=-2)
        trusted = smallest(key_sums, valid) >= threshold
        # Below the threshold, the terms are masked (zero) or the exact branch
        # is taken, so the floor changes no value used.
        key_sums = ops.maximum(key_sums, threshold)
        key_weights = terms / key_sums
        query_sums = ops.sum(key_weights, axis=-1, keepdims=True)
        trusted = ops.logical_and(trusted, smallest(query_sums, row_valid) >= threshold)
        weights = ops.cond(
            trusted,
            lambda: key_weights / ops.maximum(query_sums, threshold),
            lambda: _masked_softmax(scores - _prefix_logsumexp(scores, valid), valid),
        )

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            softmax_part = _softmax_part_of_gradient(weights, upstream)

            def fast():
                return softmax_part - weights * query_sums * key_sums * _reverse_cumsum(
                    softmax_part / key_sums, axis=-2
                )

            def exact():
                key_lse = _prefix_logsumexp(scores, valid)
                return softmax_part - _prefix_logsumexp_transpose(scores, key_lse, softmax_part)

            return ops.cond(trusted, fast, exact)

        return weights, grad

    return normalize(scores)


def _doubly_normalize(scores, valid, causal):
    if causal:
        return _causal_double_normalization(scores, valid)
    return _double_normalization(scores, valid)


@_symbolic_inputs_allowed
def normalize_attention_scores(
    scores,
    mask=None,
    *,
    normalization="double",
    causal_normalization=False,
    mixing_logits=None,
    num_attention_axes=1,
):
    """Turns raw attention scores into attention weights.

    Args:
        scores: Scaled dot products, shaped
            `(<batch dims>, num_heads, <query axes>, <key axes>)` with
            `num_attention_axes` query axes and as many key axes.
        mask: Optional boolean tensor broadcastable to `scores`; `True` marks
            the (query, key) pairs that may attend. Masked pairs are left out
            of both normalization steps and get weight 0.
        normalization: `"double"` (doubly-normalized attention), `"single"`
            (softmax over keys, as `keras.layers.MultiHeadAttention`) or
            `"hybrid"` (a per-head mix of the two).
        causal_normalization: If `True`, the first (per-key) step only sums
            over the current and earlier queries, so no query's weights
            depend on later queries. With several query axes, "earlier" is
            row-major order over them.
        mixing_logits: For `"hybrid"`: shape `(num_heads,)`; head `h` takes
            `sigmoid(mixing_logits[h])` of softmax and the rest of double
            normalization. `None` mixes them equally.
        num_attention_axes: How many query (and key) axes `scores` has.

    Returns:
        Weights with the shape and dtype of `scores`. Each query's weights
        over its valid keys sum to 1; a query with no valid key gets zeros.
        The normalization runs in float32 (float64 for float64 scores).
    """
    check_normalization(normalization)
    if not isinstance(num_attention_axes, int) or num_attention_axes < 1:
        raise ValueError(
            "Argument `num_attention_axes` must be a positive integer. "
            f"Received: num_attention_axes={num_attention_axes!r}"
        )
    scores = ops.convert_to_tensor(scores)
    rank = len(scores.shape)
    if rank < 2 * num_attention_axes + 1:
        raise ValueError(
            "Argument `scores` must have a heads axis and "
            f"{num_attention_axes} query and key axes each, so rank at least "
            f"{2 * num_attention_axes + 1}. Received: shape={scores.shape}"
        )
    out_dtype = scores.dtype
    dtype = _working_dtype(out_dtype)
    scores = ops.cast(scores, dtype)
    valid = None
    if mask is not None:
        valid = ops.cast(mask, "bool")
        check_broadcastable("mask", valid.shape, scores.shape)
    if mixing_logits is not None:
        mixing_logits = ops.convert_to_tensor(mixing_logits)
        heads = scores.shape[rank - 2 * num_attention_axes - 1]
        # Traced with relaxed shapes, the number of heads can be unknown.
        if len(mixing_logits.shape) != 1 or None not in (heads, mixing_logits.shape[0]) and (
            mixing_logits.shape[0] != heads
        ):
            raise ValueError(
                f"Argument `mixing_logits` must have shape ({heads},), one "
                "logit per head. Received: "
                f"mixing_logits.shape={mixing_logits.shape}"
            )
    full_shape = ops.shape(scores)
    if num_attention_axes > 1:
        # Joint normalization over several axes is normalization over their
        # flattened product.
        if valid is not None:
            valid = ops.broadcast_to(valid, full_shape)
        query_axes = full_shape[rank - 2 * num_attention_axes : rank - num_attention_axes]
        key_axes = full_shape[rank - num_attention_axes :]
        flat_shape = tuple(full_shape[: rank - 2 * num_attention_axes]) + (
            math.prod(query_axes),
            math.prod(key_axes),
        )
        scores = ops.reshape(scores, flat_shape)
        if valid is not None:
            valid = ops.reshape(valid, flat_shape)
    if valid is not None:
        scores = ops.where(valid, scores, _masked_value(scores))

    if normalization == "single":
        weights = _masked_softmax(scores, valid)
    elif normalization == "double":
        weights = _doubly_normalize(scores, valid, causal_normalization)
    else:
        if mixing_logits is None:
            softmax_share = 0.5
        else:
            softmax_share = ops.sigmoid(ops.cast(mixing_logits, dtype))
            softmax_share = ops.reshape(softmax_share, (-1, 1, 1))
        weights = softmax_share * _masked_softmax(scores, valid) + (
            1.0 - softmax_share
        ) * _doubly_normalize(scores, valid, causal_normalization)

    if num_attention_axes > 1:
        weights = ops.reshape(weights, full_shape)
    return ops.cast(weights, out_dtype)


def _check_rank4(name, x):
    if len(x.shape) != 4:
        raise ValueError(
            f"Argument `{name}` must have shape (batch, length, num_heads, "
            f"head_dim). Received: {name}.shape={x.shape}"
        )


def _check_match(what, a_name, a, b_name, b):
    if a is not None and b is not None and a != b:
        raise ValueError(
            f"Arguments `{a_name}` and `{b_name}` must have the same {what}. "
            f"Received: {a} and {b}"
        )


@_symbolic_inputs_allowed
def doubly_normalized_attention_weights(
    query,
    key,
    mask=None,
    *,
    normalization="double",
    is_causal=False,
    causal_normalization=False,
    scale=None,
    mixing_logits=None,
):
    """Attention weights of doubly-normalized attention.

    Args:
        query: Shape `(batch, query_length, num_heads, head_dim)`.
        key: Shape `(batch, key_length, num_heads, head_dim)`.
        mask: Optional boolean tensor broadcastable to
            `(batch, num_heads, query_length, key_length)`; `True` attends.
        normalization: `"double"`, `"single"` or `"hybrid"`; see
            `normalize_attention_scores`.
        is_causal: If `True`, query `i` only attends to keys `j <= i`, and
            the normalization is causal too.
        causal_normalization: If `True`, the per-key step only sums over the
            current and earlier queries (needed whenever the mask hides the
            future, e.g. in decoder cross-attention).
        scale: Multiplies the dot products; defaults to
            `1 / sqrt(head_dim)`.
        mixing_logits: For `"hybrid"`, shape `(num_heads,)`.

    Returns:
        Weights of shape `(batch, num_heads, query_length, key_length)`.
    """
    query = ops.convert_to_tensor(query)
    key = ops.convert_to_tensor(key)
    _check_rank4("query", query)
    _check_rank4("key", key)
    for axis, what in ((0, "batch size"), (2, "number of heads"), (3, "head size")):
        _check_match(what, "query", query.shape[axis], "key", key.shape[axis])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    # A Python scale stays a weak type: no float32 rounding of float64 work.
    scores = ops.multiply(_einsum("btnh,bsnh->bnts", query, key), scale)
    if is_causal:
        query_index = ops.expand_dims(ops.arange(ops.shape(query)[1]), -1)
        key_index = ops.expand_dims(ops.arange(ops.shape(key)[1]), 0)
        causal_mask = query_index >= key_index
        mask = causal_mask if mask is None else ops.logical_and(ops.cast(mask, "bool"), causal_mask)
    return normalize_attention_scores(
        scores,
        mask,
        normalization=normalization,
        causal_normalization=causal_normalization or is_causal,
        mixing_logits=mixing_logits,
    )


@_symbolic_inputs_allowed
def doubly_normalized_attention(
    query,
    key,
    value,
    mask=None,
    *,
    normalization="double",
    is_causal=False,
    causal_normalization=False,
    scale=None,
    mixing_logits=None,
):
    """Doubly-normalized attention, a counterpart of `keras.ops.dot_product_attention`.

    Args:
        query: Shape `(batch, query_length, num_heads, head_dim)`.
        key: Shape `(batch, key_length, num_heads, head_dim)`.
        value: Shape `(batch, key_length, num_heads, value_dim)`.
        mask, normalization, is_causal, causal_normalization, scale,
        mixing_logits: As in `doubly_normalized_attention_weights`.

    Returns:
        Shape `(batch, query_length, num_heads, value_dim)`.
    """
    value = ops.convert_to_tensor(value)
    _check_rank4("value", value)
    key = ops.convert_to_tensor(key)
    for axis, what in ((0, "batch size"), (1, "length"), (2, "number of heads")):
        _check_match(what, "key", key.shape[axis], "value", value.shape[axis])
    weights = doubly_normalized_attention_weights(
        query,
        key,
        mask,
        normalization=normalization,
        is_causal=is_causal,
        causal_normalization=causal_normalization,
        scale=scale,
        mixing_logits=mixing_logits,
    )
    return _einsum("bnts,bsnh->btnh", weights, ops.cast(value, weights.dtype))
