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
from keras_dna._validation import check_chunk_size
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


def _cumsum(x, axis, reverse=False):
    """Inclusive prefix (or with `reverse`, suffix) sum along `axis` (negative).

    Blocked for XLA: sequential adds within blocks of `_PREFIX_BLOCK`, then
    the same over the block totals. A reverse sum needs no flipped copies.
    """
    length = _static_length(x, axis)
    if length is None or length <= _PREFIX_BLOCK:
        if reverse:
            return ops.flip(ops.cumsum(ops.flip(x, axis=axis), axis=axis), axis=axis)
        return ops.cumsum(x, axis=axis)
    rank = len(x.shape)
    axis = axis % rank
    # Zeros at the end change neither prefix nor suffix sums of the rest.
    padding = (-length) % _PREFIX_BLOCK
    if padding:
        pad_width = [(0, 0)] * rank
        pad_width[axis] = (0, padding)
        x = ops.pad(x, pad_width)
    num_blocks = (length + padding) // _PREFIX_BLOCK
    shape = ops.shape(x)
    blocks = ops.reshape(
        x, tuple(shape[:axis]) + (num_blocks, _PREFIX_BLOCK) + tuple(shape[axis + 1 :])
    )
    rows = [ops.take(blocks, k, axis=axis + 1) for k in range(_PREFIX_BLOCK)]
    sums = [None] * _PREFIX_BLOCK
    total = None
    for k in reversed(range(_PREFIX_BLOCK)) if reverse else range(_PREFIX_BLOCK):
        total = rows[k] if total is None else total + rows[k]
        sums[k] = total
    within = ops.stack(sums, axis=axis + 1)
    # The blocks before (after) each block, by shifting the inclusive sums
    # of the totals (not by subtracting, which would cancel).
    inclusive = _cumsum(total, axis, reverse=reverse)
    zero = ops.zeros_like(ops.take(inclusive, ops.arange(1), axis=axis))
    if reverse:
        parts = [ops.take(inclusive, ops.arange(1, num_blocks), axis=axis), zero]
    else:
        parts = [zero, ops.take(inclusive, ops.arange(num_blocks - 1), axis=axis)]
    others = ops.concatenate(parts, axis=axis)
    out = ops.reshape(within + ops.expand_dims(others, axis + 1), shape)
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
        return ops.exp(scores - shift) * _cumsum(upstream * scale, axis=-2, reverse=True)

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


def _row_softmax(logits, valid):
    """Softmax over keys, and each row's sum of `exp(logits)`.

    `logits` are masked where `valid` is False; a row without a valid key
    gets zeros. The sums serve the gradient of double normalization.
    """
    if valid is not None:
        logits = ops.where(valid, logits, _masked_value(logits))
    row_max = ops.max(logits, axis=-1, keepdims=True)
    terms = ops.exp(logits - row_max)
    if valid is not None:
        terms = ops.where(valid, terms, 0.0)
    # At least 1 in a row with a valid key: its maximum is among them.
    row_sums = ops.maximum(ops.sum(terms, axis=-1, keepdims=True), 1.0)
    return terms / row_sums, ops.exp(row_max + ops.log(row_sums))


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
        weights, query_sums = _row_softmax(scores - _key_logsumexp(scores), valid)

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

    def exact_weights(scores):
        return _row_softmax(scores - _prefix_logsumexp(scores, valid), valid)[0]

    def smallest(sums, where_valid):
        if where_valid is not None:
            sums = ops.where(where_valid, sums, float("inf"))
        return ops.min(sums)

    # `scores` come unmasked: masking where they are read lets XLA fuse it
    # instead of writing a masked copy for the branches.
    @ops.custom_gradient
    def normalize(scores):
        # Shared by E and P, the shift cancels in B.
        shift = ops.max(_mask_scores(scores, valid), axis=-2, keepdims=True)
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
            lambda: exact_weights(_mask_scores(scores, valid)),
        )

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            softmax_part = _softmax_part_of_gradient(weights, upstream)
            # Computed outside the branch, where XLA fuses it with its
            # neighbours (measured faster); the branch replaces it if needed.
            fast_grad = softmax_part - weights * query_sums * key_sums * _cumsum(
                softmax_part / key_sums, axis=-2, reverse=True
            )

            def exact():
                masked = _mask_scores(scores, valid)
                key_lse = _prefix_logsumexp(masked, valid)
                return softmax_part - _prefix_logsumexp_transpose(masked, key_lse, softmax_part)

            return ops.cond(trusted, lambda: fast_grad, exact)

        return weights, grad

    return normalize(scores)


def _mask_scores(scores, valid):
    return scores if valid is None else ops.where(valid, scores, _masked_value(scores))


def _doubly_normalize(scores, valid, causal):
    """Double normalization of unmasked `scores`."""
    if causal:
        return _causal_double_normalization(scores, valid)
    return _double_normalization(_mask_scores(scores, valid), valid)


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

    if normalization == "single":
        weights = _row_softmax(scores, valid)[0]
    elif normalization == "double":
        weights = _doubly_normalize(scores, valid, causal_normalization)
    else:
        if mixing_logits is None:
            softmax_share = 0.5
        else:
            softmax_share = ops.sigmoid(ops.cast(mixing_logits, dtype))
            softmax_share = ops.reshape(softmax_share, (-1, 1, 1))
        weights = softmax_share * _row_softmax(scores, valid)[0] + (
            1.0 - softmax_share
        ) * _doubly_normalize(scores, valid, causal_normalization)

    if num_attention_axes > 1:
        weights = ops.reshape(weights, full_shape)
    return ops.cast(weights, out_dtype)


def _query_blocks(x, num_blocks, chunk_size):
    """`(B, N, T, ...)` -> `(num_blocks, B, N, chunk_size, ...)`, zero-padded."""
    shape = ops.shape(x)
    padding = num_blocks * chunk_size - shape[2]
    pad = ops.zeros(tuple(shape[:2]) + (padding,) + tuple(shape[3:]), dtype=x.dtype)
    x = ops.concatenate([x, pad], axis=2)
    x = ops.reshape(x, tuple(shape[:2]) + (num_blocks, chunk_size) + tuple(shape[3:]))
    return ops.moveaxis(x, 2, 0)


def _from_query_blocks(blocks, length):
    """Inverse of `_query_blocks`."""
    shape = ops.shape(blocks)
    x = ops.moveaxis(blocks, 0, 2)
    x = ops.reshape(x, tuple(shape[1:3]) + (shape[0] * shape[3],) + tuple(shape[4:]))
    return x[:, :, :length]


def _scan(step, init, xs, stacked_like, reverse=False):
    """`keras.ops.scan` whose outputs need not be shaped like the carry.

    (Keras' TensorFlow scan requires that.) `step(carry, x)` returns the new
    carry and outputs that are written, along the leading axis, into zeros
    shaped like `stacked_like`. `xs` may contain `None`.
    """
    length = ops.shape(keras.tree.flatten(xs)[0])[0]

    def body(i, state):
        carry, stacked = state
        index = length - 1 - i if reverse else i
        x = tuple(None if t is None else ops.take(t, index, axis=0) for t in xs)
        carry, outputs = step(carry, x)
        stacked = keras.tree.map_structure(
            lambda buffer, output: ops.slice_update(
                buffer, (index,) + (0,) * (len(buffer.shape) - 1), ops.expand_dims(output, 0)
            ),
            stacked,
            outputs,
        )
        return carry, stacked

    return ops.fori_loop(0, length, body, (init, stacked_like))


def _blockwise_attention(query, key, value, mask, *, double, causal, is_causal, chunk_size):
    """Attention over blocks of `chunk_size` queries: memory linear in length.

    `query` (already scaled), `key`, `value`: `(B, N, T or S, head_dim)` in
    the working dtype; `mask`: `None` or a rank-4 boolean tensor
    broadcastable to `(B, N, T, S)`. With `double=False` this is softmax
    attention. The score matrix is never held whole: the per-key
    log-sum-exp `c` is accumulated over the blocks first (causal: carried
    along with them, one prefix per block), then each block's weights
    `softmax(s - c)` meet the values. The backward pass recomputes each
    block's scores instead of keeping them.
    """
    @ops.custom_gradient
    def attend(query, key, value):
        masked = _masked_value(query)
        length, key_length = ops.shape(query)[2], ops.shape(key)[2]
        num_blocks = (length + chunk_size - 1) // chunk_size
        indices = ops.arange(num_blocks)
        mask_blocks = None
        if mask is not None and mask.shape[2] != 1:
            # Also when the axis is unknown in a relaxed trace: it may be 1.
            rows = ops.broadcast_to(mask, tuple(ops.shape(mask)[:2]) + (length, key_length))
            mask_blocks = _query_blocks(rows, num_blocks, chunk_size)

        def block_scores(index, query_block, mask_block):
            rows = index * chunk_size + ops.arange(chunk_size)
            valid = ops.reshape(rows < length, (1, 1, chunk_size, 1))
            if is_causal:
                valid = ops.logical_and(valid, rows[:, None] >= ops.arange(key_length)[None, :])
            if mask is not None:
                valid = ops.logical_and(valid, mask if mask_block is None else mask_block)
            scores = _einsum("bnch,bnsh->bncs", query_block, key)
            return ops.where(valid, scores, masked), valid

        def causal_key_lse(scores, valid, before):
            """Prefix log-sum-exp of the block, continuing the prefix `before`."""
            extended = ops.concatenate([before, scores], axis=-2)
            valid = ops.broadcast_to(valid, ops.shape(scores))
            extended_valid = ops.concatenate([before > masked / 2, valid], axis=-2)
            return _prefix_logsumexp(extended, extended_valid)[:, :, 1:]

        def xs(*extra):
            return (indices, query_blocks, mask_blocks) + extra

        query_blocks = _query_blocks(query, num_blocks, chunk_size)
        nothing = ops.full(ops.shape(key)[:2] + (1, key_length), masked, dtype=key.dtype)

        def key_lse_total():
            """`c` of every key (non-causal double normalization)."""

            def step(total, block):
                scores, _ = block_scores(*block)
                return _logaddexp(total, _key_logsumexp(scores)), ()

            total, _ = _scan(step, nothing, xs(), ())
            return total

        def block_weights(block, total, before):
            index, query_block, mask_block = block[:3]
            scores, valid = block_scores(index, query_block, mask_block)
            if causal and double:
                key_lse = causal_key_lse(scores, valid, before)
            elif double:
                key_lse = total
            else:
                key_lse = 0.0
            weights, query_sums = _row_softmax(scores - key_lse, valid)
            return scores, key_lse, valid, weights, query_sums

        total = befores = None
        outputs_like = ops.zeros(
            tuple(ops.shape(query_blocks)[:4]) + (ops.shape(value)[-1],), dtype=value.dtype
        )
        if causal and double:
            # One pass; each block's prefix before it is kept for the
            # backward pass (one row of keys per block).
            def step(before, block):
                scores, valid = block_scores(*block)
                key_lse = causal_key_lse(scores, valid, before)
                weights, _ = _row_softmax(scores - key_lse, valid)
                output_block = _einsum("bncs,bnsh->bnch", weights, value)
                return key_lse[:, :, -1:], (before, output_block)

            _, (befores, output_blocks) = _scan(
                step, nothing, xs(),
                (ops.zeros((num_blocks,) + tuple(ops.shape(nothing)), dtype=nothing.dtype), outputs_like),
            )
        else:
            if double:
                total = key_lse_total()

            def step(carry, block):
                weights = block_weights(block, total, None)[3]
                return carry, _einsum("bncs,bnsh->bnch", weights, value)

            _, output_blocks = _scan(step, 0, xs(), outputs_like)
        output = _from_query_blocks(output_blocks, length)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream_blocks = _query_blocks(upstream, num_blocks, chunk_size)

            def softmax_backward(block, before):
                scores, key_lse, _, weights, query_sums = block_weights(block, total, before)
                upstream_block = block[3]
                weights_grad = _einsum("bnch,bnsh->bncs", upstream_block, value)
                softmax_part = _softmax_part_of_gradient(weights, weights_grad)
                value_grad = _einsum("bncs,bnch->bnsh", weights, upstream_block)
                return scores, key_lse, weights, query_sums, softmax_part, value_grad

            zeros_key = ops.zeros_like(key)
            zeros_value = ops.zeros_like(value)
            if causal and double:
                # Reverse pass. `later` carries, per key, the gradient that
                # reaches the block's last prefix from the blocks after it,
                # as `sum D[i] exp(c_last - c[i])`; appended as an extra row
                # (score and prefix `c_last`), and the prefix before the
                # block prepended, the block's share of the prefix
                # log-sum-exp gradient and the carry for the block before
                # come out of one `_prefix_logsumexp_transpose`.
                def step(carry, block):
                    later, key_grad, value_grad = carry
                    index, query_block, mask_block, upstream_block, before = block
                    scores, key_lse, _, _, softmax_part, block_value_grad = softmax_backward(
                        (index, query_block, mask_block, upstream_block), before
                    )
                    last = key_lse[:, :, -1:]
                    transposed = _prefix_logsumexp_transpose(
                        ops.concatenate([before, scores, last], axis=-2),
                        ops.concatenate([before, key_lse, last], axis=-2),
                        ops.concatenate([ops.zeros_like(before), softmax_part, later], axis=-2),
                    )
                    scores_grad = softmax_part - transposed[:, :, 1:-1]
                    key_grad = key_grad + _einsum("bncs,bnch->bnsh", scores_grad, query_block)
                    query_grad = _einsum("bncs,bnsh->bnch", scores_grad, key)
                    return (transposed[:, :, :1], key_grad, value_grad + block_value_grad), query_grad

                start = (ops.zeros_like(nothing), zeros_key, zeros_value)
                (_, key_grad, value_grad), query_grads = _scan(
                    step, start, xs(upstream_blocks, befores), ops.zeros_like(query_blocks),
                    reverse=True,
                )
                return _from_query_blocks(query_grads, length), key_grad, value_grad

            # The softmax part, the values' gradient and (double) the sums
            # over queries that the per-key normalization needs.
            def step(carry, block):
                key_sums, key_grad, key_weighted_queries, value_grad = carry
                _, _, weights, query_sums, softmax_part, block_value_grad = softmax_backward(
                    block, None
                )
                query_block = block[1]
                key_grad = key_grad + _einsum("bncs,bnch->bnsh", softmax_part, query_block)
                query_grad = _einsum("bncs,bnsh->bnch", softmax_part, key)
                if double:
                    key_sums = key_sums + ops.sum(softmax_part, axis=-2, keepdims=True)
                    key_weighted_queries = key_weighted_queries + _einsum(
                        "bncs,bnch->bnsh", weights * query_sums, query_block
                    )
                carry = (key_sums, key_grad, key_weighted_queries, value_grad + block_value_grad)
                return carry, query_grad

            start = (ops.zeros_like(nothing), zeros_key, zeros_key, zeros_value)
            carry, query_grads = _scan(step, start, xs(upstream_blocks), ops.zeros_like(query_blocks))
            key_sums, key_grad, key_weighted_queries, value_grad = carry
            if not double:
                return _from_query_blocks(query_grads, length), key_grad, value_grad

            # ds = D - B * (sum over queries of D), with B = exp(s - c).
            key_sums = ops.moveaxis(key_sums, -2, -1)
            key_grad = key_grad - key_sums * key_weighted_queries

            def step(carry, block):
                query_grad = block[3]
                _, _, _, weights, query_sums = block_weights(block, total, None)
                key_part = weights * query_sums
                return carry, query_grad - _einsum("bncs,bnsh->bnch", key_part, key_sums * key)

            _, query_grads = _scan(step, 0, xs(query_grads), ops.zeros_like(query_blocks))
            return _from_query_blocks(query_grads, length), key_grad, value_grad

        return output, grad

    return attend(query, key, value)


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


def _checked_query_and_key(query, key):
    query = ops.convert_to_tensor(query)
    key = ops.convert_to_tensor(key)
    _check_rank4("query", query)
    _check_rank4("key", key)
    for axis, what in ((0, "batch size"), (2, "number of heads"), (3, "head size")):
        _check_match(what, "query", query.shape[axis], "key", key.shape[axis])
    return query, key


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
    query, key = _checked_query_and_key(query, key)
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


def _chunked_attention(
    query, key, value, mask, *, normalization, is_causal, causal_normalization, scale,
    mixing_logits, chunk_size,
):
    """`doubly_normalized_attention` over blocks of `chunk_size` queries.

    Same arguments (with `scale` given); the output has the dtype of the
    query and key.
    """
    out_dtype = backend.result_type(query.dtype, key.dtype)
    dtype = _working_dtype(out_dtype)
    # Head-major, as the blocks are taken along the queries of each head.
    query, key, value = (
        ops.transpose(ops.cast(x, dtype), (0, 2, 1, 3)) for x in (query, key, value)
    )
    query = ops.multiply(query, scale)
    if mask is not None:
        mask = ops.cast(mask, "bool")
        check_broadcastable("mask", mask.shape, tuple(query.shape[:3]) + (key.shape[2],))
        while len(mask.shape) < 4:
            mask = ops.expand_dims(mask, 0)
    causal = bool(causal_normalization or is_causal)

    def attend(double):
        return _blockwise_attention(
            query, key, value, mask, double=double, causal=causal, is_causal=is_causal,
            chunk_size=chunk_size,
        )

    if normalization == "single":
        output = attend(False)
    elif normalization == "double":
        output = attend(True)
    else:
        if mixing_logits is None:
            softmax_share = 0.5
        else:
            softmax_share = ops.reshape(ops.sigmoid(ops.cast(mixing_logits, dtype)), (1, -1, 1, 1))
        output = softmax_share * attend(False) + (1.0 - softmax_share) * attend(True)
    return ops.cast(ops.transpose(output, (0, 2, 1, 3)), out_dtype)


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
    chunk_size=None,
):
    """Doubly-normalized attention, a counterpart of `keras.ops.dot_product_attention`.

    Args:
        query: Shape `(batch, query_length, num_heads, head_dim)`.
        key: Shape `(batch, key_length, num_heads, head_dim)`.
        value: Shape `(batch, key_length, num_heads, value_dim)`.
        mask, normalization, is_causal, causal_normalization, scale,
        mixing_logits: As in `doubly_normalized_attention_weights`.
        chunk_size: Optional positive integer: compute the attention over
            blocks of this many queries, never holding the whole
            `(query_length, key_length)` score matrix. Memory then grows
            linearly with the sequence length; the gradient recomputes the
            scores block by block (about twice the work of the forward
            pass). Equal to the unchunked result up to float rounding.

    Returns:
        Shape `(batch, query_length, num_heads, value_dim)`.
    """
    check_chunk_size(chunk_size)
    value = ops.convert_to_tensor(value)
    _check_rank4("value", value)
    key = ops.convert_to_tensor(key)
    for axis, what in ((0, "batch size"), (1, "length"), (2, "number of heads")):
        _check_match(what, "key", key.shape[axis], "value", value.shape[axis])
    if chunk_size is not None:
        query, key = _checked_query_and_key(query, key)
        check_normalization(normalization)
        return _chunked_attention(
            query, key, value, mask, normalization=normalization, is_causal=is_causal,
            causal_normalization=causal_normalization,
            scale=1.0 / math.sqrt(query.shape[-1]) if scale is None else scale,
            mixing_logits=mixing_logits, chunk_size=chunk_size,
        )
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
