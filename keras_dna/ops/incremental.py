"""Causal double normalization over queries that arrive in blocks (decoding).

Under causal normalization, key `j`'s normalizer for query `i` is a running
log-sum-exp over the queries up to `i`. Decoding keeps it per key, the "key
state": `lse[j]`, the log-sum-exp of key `j`'s valid scores over the queries
already processed, and `seen[j]`, whether there was any. A block of new
queries (a whole prompt, or one token per step) then normalizes with
`c[i, j] = logaddexp(lse[j], logsumexp over valid block queries i' <= i of
s[i', j])` (the null query's `beta` joining as one more term), which equals
what one call over the whole sequence gives; the state after the block
includes the block's queries. A softmax cache costs the same: the state is
one number per key, and each step adds one score to it.
"""

from keras import ops

from keras_dna.ops.dispatch import normalize_attention_scores
from keras_dna.ops.dispatch import normalize_weights
from keras_dna.ops.dispatch import per_head
from keras_dna.ops.dispatch import with_softmax_share
from keras_dna.ops.backend import einsum
from keras_dna.ops.checks import check_normalization
from keras_dna.ops.normalization import key_logsumexp
from keras_dna.ops.normalization import row_softmax
from keras_dna.ops.numerics import logaddexp
from keras_dna.ops.numerics import masked_value
from keras_dna.ops.numerics import working_dtype


def causal_block_weights(
    scores, valid, key_lse, key_seen, committed=None, *, normalization="double",
    mixing_logits=None, null_query_logits=None,
):
    """Weights of a block of queries, and the key state after it.

    Args:
        scores: `(batch, num_heads, T, S)` scaled scores of the block's `T`
            queries against all `S` keys.
        valid: `None` or a boolean tensor broadcastable to `scores`.
        key_lse: `(batch, num_heads, 1, S)`: each key's log-sum-exp over the
            queries before the block (any value where `key_seen` is False).
        key_seen: Boolean, shaped as `key_lse`.
        committed: `None`, or a boolean tensor broadcastable to `(batch, 1,
            T, 1)`: the block queries that join the state (a prompt that will
            be processed again token by token must not count twice). All
            queries get their weights either way.
        normalization: `"double"` or `"hybrid"` (softmax needs no state).
        mixing_logits: `None` or shaped `(num_heads,)`, as in
            `normalize_attention_scores`.
        null_query_logits: `None` or shaped `(num_heads,)`, as in
            `normalize_attention_scores`.

    Returns:
        `(weights, key_lse, key_seen)`: weights in the dtype of `scores`,
        the state in the working dtype (float32, float64 for float64).
    """
    check_normalization(normalization)
    if normalization == "single":
        raise ValueError(
            "Softmax (normalization='single') has no per-key step, so no key "
            "state: use `normalize_attention_scores`."
        )
    out_dtype = scores.dtype
    working = working_dtype(out_dtype)
    scores = ops.cast(scores, working)
    heads = scores.shape[-3]
    if mixing_logits is not None:
        mixing_logits = per_head("mixing_logits", mixing_logits, heads, working)
    earlier = ops.where(key_seen, ops.cast(key_lse, working), masked_value(scores))
    prior = earlier
    if null_query_logits is not None:
        prior = logaddexp(earlier, per_head("null_query_logits", null_query_logits, heads, working))
    joining = ops.ones_like(scores, dtype="bool") if valid is None else valid
    if committed is not None:
        joining = ops.logical_and(joining, committed)
    joining = ops.broadcast_to(joining, ops.shape(scores))
    step = _one_query_step if scores.shape[-2] == 1 else _block_step
    weights, key_lse, block_seen = step(
        scores, valid, joining, earlier, prior, normalization, mixing_logits
    )
    return ops.cast(weights, out_dtype), key_lse, ops.logical_or(key_seen, block_seen)


def _block_step(scores, valid, joining, earlier, prior, normalization, mixing_logits):
    """Weights, key log-sum-exps and which keys the block's queries saw."""
    weights = normalize_weights(scores, valid, normalization, True, mixing_logits, prior)
    block_lse = key_logsumexp(ops.where(joining, scores, masked_value(scores)))
    block_seen = ops.any(joining, axis=-2, keepdims=True)
    return weights, ops.where(block_seen, logaddexp(earlier, block_lse), earlier), block_seen


def _one_query_step(scores, valid, joining, earlier, prior, normalization, mixing_logits):
    """`_block_step` for a block of one query, through the sigmoid."""
    log_key_weights = ops.log_sigmoid(scores - prior)  # s - c, c = logaddexp(prior, s)
    double = row_softmax(log_key_weights, valid)[0]
    weights = with_softmax_share(double, scores, valid, normalization, mixing_logits)
    # The new state is c itself unless the null query is in `prior`.
    joined = scores - log_key_weights if prior is earlier else logaddexp(earlier, scores)
    return weights, ops.where(joining, joined, earlier), joining


def cached_attention(
    query, key_rows, value_rows, cache, update_index=None, valid=None, committed=None, *,
    normalization="double", mixing_logits=None, null_query_logits=None, dropout=None,
):
    """A block of queries against a key/value cache, new rows written first.

    Args:
        query: `(B, T, N, head_dim)` projected queries, already scaled.
        key_rows, value_rows: `(B, T', N, head_dim)` projected keys and
            values to write into the cache from `update_index`; ignored
            when `update_index` is `None` (a static cache).
        cache: `(B, 2, S, N, width)`: keys, then values, in the first
            `head_dim` columns; `width` is `head_dim + 1` with the key
            state, `head_dim` for softmax or a cache no query has seen.
        update_index: `None` or an int scalar (tensor).
        valid: `None` or a boolean tensor broadcastable to `(B, N, T, S)`.
        committed: As in `causal_block_weights`.
        normalization: `"single"`, or `"double"` and `"hybrid"` normalized
            causally with the key state.
        mixing_logits, null_query_logits: As in `causal_block_weights`.
        dropout: `None` or a function of the weights, applied before they
            combine the values.

    Returns:
        `(output, weights, cache)`: output `(B, T, N, head_dim)`, weights
        `(B, N, T, S)`, and the cache after the call (the one given when
        softmax keeps a static cache).
    """
    head_dim = query.shape[-1]
    keys, values = cache[:, 0, ..., :head_dim], cache[:, 1, ..., :head_dim]
    if update_index is not None:
        start = [0, update_index, 0, 0]
        keys = ops.slice_update(keys, start, ops.cast(key_rows, keys.dtype))
        values = ops.slice_update(values, start, ops.cast(value_rows, values.dtype))
    # A decoding step's scores are a product of the keys with a vector:
    # under XLA on a CPU the key-first equation was faster for it, the
    # query-first one for longer blocks (`benchmarks/results/decoding/decode.md`).
    if query.shape[1] == 1:
        scores = einsum("bsnh,btnh->bnts", keys, query)
    else:
        scores = einsum("btnh,bsnh->bnts", query, keys)
    state = None
    if normalization == "single":
        weights = normalize_attention_scores(scores, valid, normalization="single")
    else:
        key_lse, key_seen = key_state_of(cache[:, 0, ..., head_dim:])
        weights, key_lse, key_seen = causal_block_weights(
            scores, valid, key_lse, key_seen, committed, normalization=normalization,
            mixing_logits=mixing_logits, null_query_logits=null_query_logits,
        )
        state = key_state_columns(key_lse, key_seen, cache.dtype, groups=1)
    combined = weights if dropout is None else dropout(weights)
    output = einsum("bnts,bsnh->btnh", combined, values)
    if state is not None:
        keys = ops.concatenate([keys, state], axis=-1)
        values = ops.concatenate([values, ops.zeros_like(state)], axis=-1)
    if state is not None or update_index is not None:
        cache = ops.stack([keys, values], axis=1)
    return output, weights, cache


def key_state_columns(key_lse, key_seen, dtype, groups):
    """The key state as columns beside cached keys.

    Args:
        key_lse, key_seen: `(B, N, 1, S)`, as `causal_block_weights` returns
            them, for `N` query heads.
        dtype: The cache's dtype.
        groups: How many query heads share one cached key head (1 without
            grouped queries).

    Returns:
        `(B, S, N // groups, groups)`: for cached key head `k`, the states
        of query heads `k * groups` to `(k + 1) * groups - 1`, `-inf` for a
        key no query has seen.
    """
    state = ops.cast(ops.where(key_seen, key_lse, float("-inf")), dtype)
    state = ops.transpose(ops.squeeze(state, -2), (0, 2, 1))  # (B, S, N)
    shape = ops.shape(state)
    return ops.reshape(state, (shape[0], shape[1], -1, groups))


def key_state_of(columns):
    """`(key_lse, key_seen)` shaped `(B, N, 1, S)` from columns laid out as
    `key_state_columns` returns them, `(B, S, K, groups)`; with no columns
    (`groups == 0`: a cache no query has seen yet), every key unseen (one
    head, which broadcasts to all)."""
    shape = ops.shape(columns)
    if columns.shape[-1] == 0:
        empty = ops.zeros((shape[0], 1, 1, shape[1]), columns.dtype)
        return empty, ops.cast(empty, "bool")
    state = ops.reshape(columns, (shape[0], shape[1], -1))  # (B, S, N)
    key_lse = ops.expand_dims(ops.transpose(state, (0, 2, 1)), -2)
    return key_lse, ops.greater(key_lse, float("-inf"))
