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

from keras_dna.ops.attention import normalize_weights
from keras_dna.ops.attention import per_head
from keras_dna.ops.attention import with_softmax_share
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
        mixing_logits, null_query_logits: `None` or shaped `(num_heads,)`,
            as in `normalize_attention_scores`.

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
