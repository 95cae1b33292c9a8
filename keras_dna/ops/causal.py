"""Causal double normalization: prefix log-sum-exps along the queries.

With causal normalization, each key's normalizer only sums over the current
and earlier queries, `c[i, j] = logsumexp over valid i' <= i of s[i', j]`,
and `A[i, j] = softmax over valid j of (s[i, j] - c[i, j])`, so no weight
depends on a later query. This module owns that prefix log-sum-exp:

- a fast path in exponential space, against each key's score at its first
  valid query (a causal shift: every valid prefix sum is at least 1, and
  no later query changes an earlier output, to the bit), with prefix sums
  in short blocks (`prefix_sum`, causal too: a block adds only the totals
  of the blocks before it);
- an exact prefix log-sum-exp in log space (`exact_prefix_logsumexp`), a
  loop over blocks of queries, taken only for blocks of keys whose valid
  scores rise by more than `overflow_log_margin` (60 in float32) above
  their first one;
- its transpose (`prefix_logsumexp_transpose`), the analytic gradient, so
  neither path is differentiated through;
- `causal_double_normalization`, which combines them with one exponential
  per score, a null query (`c[i, j] = logaddexp(c[i, j], beta)`) included.

`causal_weights` and `causal_weights_gradient` are the two halves of
`causal_double_normalization`'s custom gradient, for the blocks of
`keras_dna.ops.blockwise`, which pass each key's prefix over the blocks
before as its null logit.
"""

import collections
import math

import keras
from keras import ops

from keras_dna.ops.backend import cond
from keras_dna.ops.backend import cumsum
from keras_dna.ops.backend import cumulative_logsumexp
from keras_dna.ops.backend import maximum
from keras_dna.ops.normalization import row_softmax
from keras_dna.ops.normalization import softmax_part_of_gradient
from keras_dna.ops.numerics import at_least
from keras_dna.ops.numerics import logaddexp
from keras_dna.ops.numerics import mask_scores
from keras_dna.ops.numerics import masked_value
from keras_dna.ops.numerics import max_along
from keras_dna.ops.numerics import reduce_or_fill
from keras_dna.ops.numerics import sum_like
from keras_dna.ops.numerics import underflow_log_threshold

# Block length of the blocked prefix sum along the query axis. XLA lowers a
# cumulative sum to a windowed reduction whose cost grows with the square of
# the axis length, so the prefix sum is taken within short blocks and again
# over the block totals.
_PREFIX_BLOCK = 16

# Blocks of keys the exact branches loop over (`_over_key_blocks`).
_KEY_BLOCKS = 8


def _static_length(x, axis):
    length = x.shape[axis]
    return length if isinstance(length, int) else None


def _pad_to_blocks(x, axis, value):
    """`x` padded with `value` at the end of `axis` to whole blocks of
    `_PREFIX_BLOCK`, and the number of blocks. Entries neutral for the
    prefix (0 for sums, the masked value for log-sum-exps) at the end change
    neither prefixes nor suffixes of the rest."""
    length = x.shape[axis]
    padding = (-length) % _PREFIX_BLOCK
    if padding:
        pad_width = [(0, 0)] * len(x.shape)
        pad_width[axis] = (0, padding)
        x = ops.pad(x, pad_width, constant_values=value)
    return x, (length + padding) // _PREFIX_BLOCK


def _blocked_prefix_sum(x, axis, reverse):
    """Inclusive prefix (with `reverse`, suffix) sum of a static `axis`
    (negative) longer than `_PREFIX_BLOCK`.

    Sequential additions within blocks of `_PREFIX_BLOCK`, then the same
    over the block totals: XLA needs neither a loop nor a windowed
    reduction.
    """
    length = x.shape[axis]
    rank = len(x.shape)
    axis = axis % rank
    x, num_blocks = _pad_to_blocks(x, axis, 0.0)
    shape = ops.shape(x)
    blocks = ops.reshape(
        x, tuple(shape[:axis]) + (num_blocks, _PREFIX_BLOCK) + tuple(shape[axis + 1 :])
    )
    # Basic indexing (one strided slice each; `take` adds index arithmetic).
    before = (slice(None),) * axis
    within = [None] * _PREFIX_BLOCK
    total = None
    for k in reversed(range(_PREFIX_BLOCK)) if reverse else range(_PREFIX_BLOCK):
        row = blocks[before + (slice(None), k)]
        total = row if total is None else total + row
        within[k] = total
    # The blocks before (after) each block, by shifting the inclusive
    # sums of the totals (not by subtracting, which would cancel).
    inclusive = prefix_sum(total, axis - rank, reverse)
    none = ops.zeros_like(inclusive[before + (slice(0, 1),)])
    if reverse:
        parts = [inclusive[before + (slice(1, None),)], none]
    else:
        parts = [none, inclusive[before + (slice(0, num_blocks - 1),)]]
    others = ops.concatenate(parts, axis=axis)
    out = ops.stack(within, axis=axis + 1) + ops.expand_dims(others, axis + 1)
    out = ops.reshape(out, shape)
    return out[before + (slice(0, length),)]


def prefix_sum(x, axis, reverse=False):
    """Inclusive prefix (or with `reverse`, suffix) sum along `axis` (negative).

    Blocked for XLA, which lowers a cumulative sum to a windowed reduction
    whose cost grows with the square of the axis length. A reverse sum
    needs no flipped copies. PyTorch runs each op of the blocked form on its
    own, and its cumulative sum is one linear pass.
    """
    length = _static_length(x, axis)
    blocked = keras.backend.backend() != "torch"
    if blocked and length is not None and length > _PREFIX_BLOCK:
        return _blocked_prefix_sum(x, axis, reverse)
    if reverse:
        return ops.flip(cumsum(ops.flip(x, axis=axis), axis), axis=axis)
    return cumsum(x, axis)


def _triangular_logsumexp(x, reverse):
    """Prefix (suffix) log-sum-exps along the queries of a short `x`, every
    row at once: row `i` takes rows `i' <= i` (`i' >= i`) of a copy per row.

    Quadratic in the length, but a handful of operations: short axes
    compile about twice as fast as with a chain of `logaddexp`s.
    """
    rows = ops.arange(x.shape[-2])
    if reverse:
        included = rows[None, :] >= rows[:, None]
    else:
        included = rows[None, :] <= rows[:, None]
    # (..., row, row summed over, keys)
    spread = ops.where(included[:, :, None], ops.expand_dims(x, -3), masked_value(x))
    high = max_along(spread, -2)
    return ops.squeeze(high, -2) + ops.log(ops.sum(ops.exp(spread - high), axis=-2))


def _running_logsumexp(block, running, reverse):
    """Prefix (suffix) log-sum-exps along the queries of a short `block`,
    continuing from the log-sum-exp `running` of the rows before (after) it;
    also the new running value."""
    rows = [None] * block.shape[-2]
    for k in reversed(range(len(rows))) if reverse else range(len(rows)):
        running = logaddexp(running, block[..., k : k + 1, :])
        rows[k] = running
    return ops.concatenate(rows, axis=-2), running


def exact_prefix_logsumexp(scores, reverse=False):
    """Prefix (with `reverse`, suffix) log-sum-exp along the query axis,
    exact for any spread.

    In log space, a block of `_PREFIX_BLOCK` queries at a time (a loop
    carrying the running log-sum-exp): the graph stays small (unrolled
    over the whole axis, the first compiled call took twice as long,
    `benchmarks/results/compile/compile_time.md`) and the temporaries a
    block's size.
    Unknown lengths take the backend's cumulative log-sum-exp. Only taken
    when the fast path would lose precision, and never differentiated (the
    gradient is analytic).
    """
    length = _static_length(scores, -2)
    if length is None:
        return cumulative_logsumexp(scores, -2, reverse)
    if length <= _PREFIX_BLOCK:
        return _triangular_logsumexp(scores, reverse) if length else scores
    rank = len(scores.shape)
    padded, num_blocks = _pad_to_blocks(scores, rank - 2, masked_value(scores))
    block_shape = tuple(ops.shape(padded)[:-2]) + (_PREFIX_BLOCK, ops.shape(padded)[-1])

    def body(step, carry):
        out, running = carry
        start = (num_blocks - 1 - step if reverse else step) * _PREFIX_BLOCK
        corner = (0,) * (rank - 2) + (start, 0)
        block, running = _running_logsumexp(
            ops.slice(padded, corner, block_shape), running, reverse
        )
        return ops.slice_update(out, corner, block), running

    running = ops.full_like(padded[..., :1, :], masked_value(scores))
    out, _ = ops.fori_loop(0, num_blocks, body, (ops.zeros_like(padded), running))
    return out[..., :length, :]


def _positive_part_log(x):
    """log(max(x, 0)), with the masked value standing in for log(0)."""
    positive = x > 0
    return ops.where(positive, ops.log(ops.where(positive, x, 1.0)), masked_value(x))


def prefix_logsumexp_transpose(scores, key_lse, upstream):
    """`sum over i >= i' of upstream[i, j] exp(s[i', j] - c[i, j])`.

    The gradient of the prefix log-sum-exp `c` (given as `key_lse`) with
    respect to `scores`, for the upstream gradient `upstream`. A reverse
    prefix sum against each key's maximum where that cannot overflow, else
    in log space, the positive and negative parts of `upstream` apart.
    """
    shift = max_along(scores, -2)
    bounded = ops.logical_or(
        key_lse - shift >= underflow_log_threshold(scores), upstream == 0
    )

    def fast():
        # exp(shift - c) <= exp(40) wherever upstream is nonzero.
        scale = ops.where(upstream == 0, 0.0, ops.exp(shift - key_lse))
        return ops.exp(scores - shift) * prefix_sum(upstream * scale, axis=-2, reverse=True)

    def exact():
        # exp(s[i'] + log sum) is at most sum |upstream|.
        total = 0.0
        for sign in (1.0, -1.0):
            log_terms = _positive_part_log(sign * upstream) - key_lse
            reverse_lse = exact_prefix_logsumexp(log_terms, reverse=True)
            total = total + sign * ops.exp(scores + reverse_lse)
        return total

    return cond(ops.all(bounded), fast, exact)


def _first_valid_terms(terms, valid):
    """Each key's term at its first valid query, `(..., 1, key_length)`, and
    whether the key has a valid query (`None`: all have).

    Prefix sums only grow along the queries, so a key's smallest valid
    prefix sum is the one at its first valid query, which holds that term
    alone (masked terms are zero): the trust check reads one row per key,
    not the whole matrix of prefix sums.
    """
    length = _static_length(terms, -2)
    if valid is None or length == 0:
        return terms[..., :1, :], None
    valid_length = ops.shape(valid)[-2]
    rows = ops.expand_dims(ops.arange(valid_length), -1)
    first = reduce_or_fill(
        ops.amin, ops.where(valid, rows, valid_length), axis=-2, keepdims=True, empty=valid_length
    )
    key_seen = first < valid_length
    index = ops.broadcast_to(
        ops.minimum(first, valid_length - 1),
        tuple(ops.shape(terms)[:-2]) + (1, ops.shape(terms)[-1]),
    )

    def gather():
        return ops.take_along_axis(terms, index, axis=-2)

    if length is None:
        # An unknown length may be 0 at run time, with no row to gather.
        return cond(
            ops.shape(terms)[-2] > 0, gather, lambda: ops.zeros_like(index, terms.dtype)
        ), key_seen
    return gather(), key_seen


def _key_slice(x, start, size):
    """Keys `start` to `start + size` of `x` (all of them if `x` has one)."""
    if x is None or x.shape[-1] == 1:
        return x
    return ops.slice(x, (0,) * (len(x.shape) - 1) + (start,), tuple(ops.shape(x)[:-1]) + (size,))


def _over_key_blocks(keywise, num_results, scores, *others):
    """`keywise(scores, *others)`, one block of keys at a time.

    For functions of `num_results` results, each shaped as `scores` and in
    its dtype, whose key `j` depends only on key `j` of the arguments
    (prefixes along the queries). The exact branches run this way because
    XLA reserves memory for a conditional's branch whether it runs or not:
    over all keys at once, the never-taken exact gradient held six
    score-sized temporaries at the step's peak; a loop over `_KEY_BLOCKS`
    blocks holds a fraction of that. The last block overlaps the one
    before rather than pad (the shared keys are recomputed alike).
    """
    key_length = _static_length(scores, -1)
    if key_length is None or key_length < 2:
        return keywise(scores, *others)
    block = -(-key_length // _KEY_BLOCKS)
    num_blocks = -(-key_length // block)

    def body(index, results):
        start = ops.minimum(index * block, key_length - block)
        parts = keywise(*(_key_slice(x, start, block) for x in (scores,) + others))
        return tuple(
            ops.slice_update(result, (0,) * (len(result.shape) - 1) + (start,), part)
            for result, part in zip(results, parts)
        )

    results = (ops.zeros_like(scores),) * num_results
    return ops.fori_loop(0, num_blocks, body, results)


def overflow_log_margin(x):
    """How far a key's valid scores may rise above its first valid score
    (in log space) for the fast causal path: 60 (float32), 600 (float64).

    The fast path's prefix sums are then at most `exp(margin)` (float32:
    1e26), so neither they nor their products with the row sums (at most
    the number of keys; XLA may multiply the two, as it rewrites
    `a / b / c` to `a / (b * c)`) can overflow.
    """
    float64 = keras.backend.standardize_dtype(x.dtype) == "float64"
    return 600.0 if float64 else 60.0


def _shifted_prefix_sums(masked, shift, null):
    """`E = exp(masked - shift)`, its prefix sums over the queries plus the
    null query's term (`P`, before 1 replaces its invalid entries), and
    that term (`None` without a null query)."""
    terms = ops.exp(masked - shift)
    raw = prefix_sum(terms, axis=-2)
    null_terms = None
    if null:
        null_terms = ops.exp(null[0] - shift)
        raw = raw + null_terms
    return terms, raw, null_terms


def _where_valid(sums, valid):
    """`sums` where `valid`, 1 elsewhere (invalid entries have zero terms)."""
    return sums if valid is None else ops.where(valid, sums, ops.ones_like(sums))


def _causal_shift(scores, valid, null):
    """Each key's score at its first valid query (0 for a key without
    one), and the null logits where those are larger.

    A causal quantity: nothing after the first valid query enters it, so
    no later query can change the rounding of an earlier output. Every
    valid prefix sum against it is at least 1 (it holds `exp(0)`, or the
    null query's `exp(0)`): no valid sum can underflow.
    """
    first, key_seen = _first_valid_terms(scores, valid)
    shift = first if key_seen is None else ops.where(key_seen, first, ops.zeros_like(first))
    return maximum(shift, null[0]) if null else shift


def _fast_causal_parts(scores, valid, null):
    """The fast path: `(shift, P, totals, R, weights, null_terms)`.

    `E = exp(s - shift)` with the causal shift, `P` its prefix sums over
    the queries (1 at invalid entries), `totals` the last row of the raw
    prefix sums (each key's largest), `R` the row sums of `B = E / P`, and
    the weights `B / R`. Row `i` of every score-sized result depends on
    rows `i' <= i` of `scores` only.
    """
    shift = _causal_shift(scores, valid, null)
    # Masked in the exponent (exp(masked_value - shift) = 0), so that XLA
    # writes one tensor of terms, not the exponentials and a masked copy.
    terms, raw, null_terms = _shifted_prefix_sums(mask_scores(scores, valid), shift, null)
    totals = raw[..., -1:, :]
    key_sums = _where_valid(raw, valid)
    key_weights = terms / key_sums
    query_sums = ops.sum(key_weights, axis=-1, keepdims=True)
    weights = key_weights / at_least(query_sums, math.exp(underflow_log_threshold(scores)))
    return shift, key_sums, totals, query_sums, weights, null_terms


def _rows_trusted(query_sums, row_valid):
    """Rows whose sum `R` of `B` is large enough that the terms `exp()`
    flushed to zero (below about `exp(-87)` in float32, each at most that
    in `B` since `P >= 1`) are beyond float resolution of the weights;
    rows without a valid key too."""
    rows = query_sums >= math.exp(underflow_log_threshold(query_sums))
    return rows if row_valid is None else ops.logical_or(rows, ops.logical_not(row_valid))


def _keys_bounded(sums):
    """`sums <= exp(overflow_log_margin)` (False where a sum overflowed)."""
    return sums <= math.exp(overflow_log_margin(sums))


def causal_fast_path_trusted(totals, query_sums, row_valid):
    """Whether the fast causal path is exact for the whole call.

    With the causal shift (`_causal_shift`) every valid prefix sum is at
    least 1, so only two things can go wrong: a key's valid scores rising
    by more than `overflow_log_margin` above its first valid score (its
    largest prefix sum, the last, `totals`, above `exp(margin)`), or a
    row whose sum `R` of `B` is so small that flushed terms would matter
    (`_rows_trusted`). Masked scores enter neither (their terms are 0).
    """
    rows = _rows_trusted(query_sums, row_valid)
    return ops.logical_and(ops.all(_keys_bounded(totals)), ops.all(rows))


def causal_path_trusted(scores, valid=None, null_logits=None):
    """`causal_fast_path_trusted` for `scores` (masked entries any value)
    and `null_logits` of shape `(num_heads,)`: whether
    `causal_double_normalization` takes its fast path (tests, benchmarks)."""
    scores = ops.convert_to_tensor(scores)
    if valid is not None:
        valid = ops.cast(valid, "bool")
    null = ()
    if null_logits is not None:
        null = (ops.reshape(ops.cast(null_logits, scores.dtype), (-1, 1, 1)),)
    _, _, totals, query_sums, _, _ = _fast_causal_parts(scores, valid, null)
    row_valid = None if valid is None else ops.any(valid, axis=-1, keepdims=True)
    return causal_fast_path_trusted(totals, query_sums, row_valid)


def _exact_key_logsumexp(masked, null):
    """`c[i, j]` in log space, the null query joining it (`null` a tuple of 0 or 1)."""
    key_lse = exact_prefix_logsumexp(masked)
    return logaddexp(key_lse, null[0]) if null else key_lse


def _exact_causal_weights(masked, valid, null, shift, key_sums, key_exact):
    """Causal double normalization in log space, for masked scores.

    `c = shift + log(P)` from the fast path's prefix sums, but for blocks
    of keys with a key in `key_exact` (its sums overflow the margin),
    which take the exact prefix log-sum-exp. Without such a key (only a
    row sum `R` underflowed), no loop over the keys at all.
    """

    def keywise(masked, shift, key_sums, key_exact, *null):
        return cond(
            ops.any(key_exact),
            lambda: (_exact_key_logsumexp(masked, null),),
            lambda: (shift + ops.log(key_sums),),
        )

    def by_key_blocks():
        return _over_key_blocks(keywise, 1, masked, shift, key_sums, key_exact, *null)[0]

    key_lse = cond(ops.any(key_exact), by_key_blocks, lambda: shift + ops.log(key_sums))
    return row_softmax(masked - key_lse, valid)[0]


def _bounded_gradient(masked, valid, softmax_part, shift, null):
    """The gradient's prefix-sum form, `D - E * (reverse prefix sum of
    D / P)`, with `E` and `P` recomputed from the masked scores (keys whose
    sums stay within the margin)."""
    terms, raw, null_terms = _shifted_prefix_sums(masked, shift, null)
    key_sums = _where_valid(raw, valid)
    grad = softmax_part - terms * prefix_sum(softmax_part / key_sums, -2, reverse=True)
    return (grad,) if not null else (grad, -softmax_part * null_terms / key_sums)


def _exact_causal_gradient(masked, valid, null, softmax_part, shift, key_exact):
    """Gradients of masked scores (and null logits) where the fast path
    was not trusted: blocks of keys with a key in `key_exact` in log
    space, the others (all of them at once, if none is) from the shifted
    prefix sums."""

    def keywise(masked, valid, softmax_part, shift, key_exact, *null):
        def exact():
            key_lse = _exact_key_logsumexp(masked, null)
            grad = softmax_part - prefix_logsumexp_transpose(masked, key_lse, softmax_part)
            return (grad,) if not null else (grad, -softmax_part * ops.exp(null[0] - key_lse))

        return cond(
            ops.any(key_exact),
            exact,
            lambda: _bounded_gradient(masked, valid, softmax_part, shift, null),
        )

    grads = cond(
        ops.any(key_exact),
        lambda: _over_key_blocks(
            keywise, 1 + len(null), masked, valid, softmax_part, shift, key_exact, *null
        ),
        lambda: _bounded_gradient(masked, valid, softmax_part, shift, null),
    )
    if not null:
        return grads[0]
    return grads[0], sum_like(grads[1], null[0])


def causal_double_normalization(scores, valid, null_logits=None):
    """Double normalization with prefix sums over the queries.

    With `E = exp(s - shift)` per key, the shift each key's score at its
    first valid query (`_causal_shift`), and `P` its prefix sum over the
    queries, the first step is `B = E / P` and the second `A = B / R` with
    `R` the sums of `B` over the keys: one exponential per score. The
    shift is causal and `P >= 1` wherever valid, so no later query,
    key or value changes an earlier output, to the bit; masked scores
    enter neither the result nor the choice of path.

    Should a key's valid scores rise by more than `overflow_log_margin`
    above its first one, or a valid `R` underflow
    (`causal_fast_path_trusted`), the call computes `softmax(s - c)` in
    log space instead: with the exact prefix log-sum-exp for the blocks of
    keys that rise that far, `c = shift + log(P)` for the others, and the
    fast weights kept for the rows that the fast path got right (so those
    rows stay the same to the bit). The null query (`null_logits`, one
    per head, or per key, broadcastable against `(..., 1, S)`) adds
    `exp(null_logits - shift)` to every `P`; the shift then includes
    `null_logits`, so that term cannot overflow.

    The gradient is `D - E * (reverse prefix sum of D / P)` with `D` the
    softmax part; `E = A * R * P` comes from the saved weights, so the
    backward pass needs no exponential and no autodiff through the branch.
    The null logits get `-sum of D * exp(null_logits - c)`, with
    `exp(null_logits - c) = exp(null_logits - shift) / P`.
    """

    @ops.custom_gradient
    def normalize(scores, *null):
        weights, residuals = causal_weights(scores, valid, *null)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return causal_weights_gradient(weights, residuals, upstream)

        return weights, grad

    if null_logits is None:
        return normalize(scores)
    return normalize(scores, null_logits)


CausalResiduals = collections.namedtuple(
    "CausalResiduals", ["valid", "null", "trusted", "saved", "query_sums", "null_terms", "shift", "key_exact"]
)
CausalResiduals.__doc__ = """What `causal_weights_gradient` reads besides the weights."""


def causal_weights(scores, valid, null_logits=None):
    """`causal_double_normalization`'s weights, not differentiable, and
    what `causal_weights_gradient` needs: the two halves of its custom
    gradient, for callers that recompute the weights in their own
    backward pass (`keras_dna.ops.blockwise`, whose carried prefix enters
    as per-key `null_logits`)."""
    null = () if null_logits is None else (null_logits,)
    row_valid = None if valid is None else ops.any(valid, axis=-1, keepdims=True)
    shift, key_sums, totals, query_sums, fast_weights, null_terms = _fast_causal_parts(
        scores, valid, null
    )
    trusted = causal_fast_path_trusted(totals, query_sums, row_valid)
    key_exact = ops.logical_not(_keys_bounded(totals))

    # `scores` come unmasked: masking where they are read lets XLA fuse it
    # instead of writing a masked copy for the branches.
    def exact():
        masked = mask_scores(scores, valid)
        weights = _exact_causal_weights(masked, valid, null, shift, key_sums, key_exact)
        # Rows whose fast weights are right keep them, to the bit: a
        # later row that sends the call here changes no earlier one.
        rows = ops.logical_and(
            _rows_trusted(query_sums, row_valid),
            ops.all(_keys_bounded(key_sums), axis=-1, keepdims=True),
        )
        return ops.where(rows, fast_weights, weights), masked

    # What the gradient reads besides the weights: the key sums, or
    # the masked scores where the exact path ran. One score-sized
    # tensor kept for the backward pass, not both. (The fast weights
    # are computed outside the branch: a branch that computes a
    # score-sized result runs as one unfused, single-threaded task in
    # XLA on CPU, while passing a tensor through costs nothing.)
    weights, saved = cond(trusted, lambda: (fast_weights, key_sums), exact)
    return weights, CausalResiduals(valid, null, trusted, saved, query_sums, null_terms, shift, key_exact)


def causal_weights_gradient(weights, residuals, upstream):
    """The gradients of `causal_weights` in the scores (and, with null
    logits, in those, summed to their shape) for the weights' gradient
    `upstream`."""
    valid, null, trusted, saved, query_sums, null_terms, shift, key_exact = residuals
    softmax_part = softmax_part_of_gradient(weights, upstream)
    # Computed outside the branch, where XLA fuses it with its
    # neighbours (measured faster); the branch replaces it if needed.
    # (Untrusted, `saved` holds scores: this is then discarded.)
    fast_grad = softmax_part - weights * query_sums * saved * prefix_sum(
        softmax_part / saved, axis=-2, reverse=True
    )
    if null:
        fast_grad = (fast_grad, sum_like(-softmax_part * null_terms / saved, null[0]))
    return cond(
        trusted,
        lambda: fast_grad,
        lambda: _exact_causal_gradient(saved, valid, null, softmax_part, shift, key_exact),
    )
