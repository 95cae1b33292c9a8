"""Attention over blocks of queries (`chunk_size`): memory linear in length.

The `(query_length, key_length)` score matrix is never held whole. The
queries are split into blocks of `chunk_size`; each block's scores are
computed, used and dropped:

- non-causal double normalization: a first pass accumulates each key's
  log-sum-exp over the queries, `c[j]`, block by block; a second pass takes
  each block's weights `softmax(s - c)` against the values;
- causal double normalization: one pass carrying each key's prefix
  log-sum-exp from block to block (`c[i, j]` over `i' <= i`);
- single normalization: one pass of softmax blocks.

The gradient is written out (`keras.ops.custom_gradient`) and recomputes each
block's scores instead of keeping them: two passes without causal
normalization (the sums over queries that the per-key step needs come from
the first), one reverse pass with it (carrying each key's gradient from the
later blocks).
"""

import keras
from keras import ops

from keras_dna.ops.backend import einsum
from keras_dna.ops.backend import result_dtype
from keras_dna.ops.backend import scaled
from keras_dna.ops.causal import prefix_logsumexp
from keras_dna.ops.causal import prefix_logsumexp_transpose
from keras_dna.ops.normalization import hybrid_mix
from keras_dna.ops.normalization import key_logsumexp
from keras_dna.ops.normalization import null_logits_gradient
from keras_dna.ops.normalization import row_softmax
from keras_dna.ops.normalization import softmax_part_of_gradient
from keras_dna.ops.numerics import logaddexp
from keras_dna.ops.numerics import masked_value
from keras_dna.ops.numerics import sum_like
from keras_dna.ops.numerics import working_dtype

# What `chunk_size="auto"` picks (`auto_chunk_size`): blocks of 512 queries
# once all heads' scores would take 4 GiB in float32. Below that the whole
# matrix was as fast or faster under XLA on a CPU, as blocks read the scores
# twice forward (`benchmarks/results/speed/layer_step_auto.md`).
AUTO_CHUNK_SIZE = 512
AUTO_CHUNK_SCORES = 2**30


def auto_chunk_size(query_shape, key_shape, min_scores=None):
    """The `chunk_size` that `"auto"` picks, or `None` for the whole matrix.

    `query_shape` is `(batch, query_length, num_heads, ...)` and `key_shape`
    `(batch, key_length, ...)`. Blocks where the scores of all heads would
    hold at least `min_scores` entries (default `AUTO_CHUNK_SCORES`; an
    unknown batch counts as 1); unknown lengths, or queries that fit in one
    block, give `None`.
    """
    batch, query_length, num_heads = query_shape[:3]
    key_length = key_shape[1]
    if query_length is None or key_length is None or query_length <= AUTO_CHUNK_SIZE:
        return None
    scores = (batch or 1) * (num_heads or 1) * query_length * key_length
    if min_scores is None:
        min_scores = AUTO_CHUNK_SCORES
    return AUTO_CHUNK_SIZE if scores >= min_scores else None


def chunked_attention(
    query, key, value, mask, *, normalization, is_causal, causal_normalization, scale,
    mixing_logits, null_query_logits, chunk_size,
):
    """`doubly_normalized_attention` over blocks of `chunk_size` queries.

    Same arguments, checked by the caller (with `scale` given, and `mask`
    `None` or a rank-4 boolean tensor); the output has the dtype of the
    query and key.
    """
    out_dtype = result_dtype(query.dtype, key.dtype)
    dtype = working_dtype(out_dtype)
    # Head-major, as the blocks are taken along the queries of each head.
    query, key, value = (
        ops.transpose(ops.cast(x, dtype), (0, 2, 1, 3)) for x in (query, key, value)
    )
    query = scaled(query, scale)
    causal = bool(causal_normalization or is_causal)
    null_logits = None
    if null_query_logits is not None:
        null_logits = ops.reshape(ops.cast(null_query_logits, dtype), (1, -1, 1, 1))

    def attend(double):
        return blockwise_attention(
            query, key, value, mask, double=double, causal=causal, is_causal=is_causal,
            chunk_size=chunk_size, null_logits=null_logits if double else None,
        )

    if normalization == "single":
        output = attend(False)
    elif normalization == "double":
        output = attend(True)
    else:
        output = hybrid_mix(attend(False), attend(True), mixing_logits, heads_axis=-3)
    return ops.cast(ops.transpose(output, (0, 2, 1, 3)), out_dtype)


def blockwise_attention(
    query, key, value, mask, *, double, causal, is_causal, chunk_size, null_logits=None
):
    """Attention over blocks of `chunk_size` queries, with its gradient.

    `query` (already scaled), `key`, `value`: `(B, N, T or S, head_dim)` in
    the working dtype; `mask`: `None` or a rank-4 boolean tensor
    broadcastable to `(B, N, T, S)`. With `double=False` this is softmax
    attention; `causal` normalizes causally, `is_causal` also masks keys
    after each query. `null_logits` (`(1, N, 1, 1)`, double only): the null
    query's log-mass, the value every key's log-sum-exp over the queries
    starts from.
    """

    @ops.custom_gradient
    def attend(query, key, value, *null):
        blocks = _QueryBlocks(
            query, key, value, mask, is_causal=is_causal, chunk_size=chunk_size,
            null_logits=null[0] if null else None,
        )
        befores = total = None
        if causal and double:
            output_blocks, befores = _forward_causal(blocks)
        else:
            total = _key_logsumexp_over_blocks(blocks) if double else None
            output_blocks = _forward(blocks, total)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream_blocks = blocks.split(upstream)
            if causal and double:
                query_grads, key_grad, value_grad, start_share = _backward_causal(
                    blocks, upstream_blocks, befores
                )
            else:
                query_grads, key_grad, value_grad, key_sums = _backward(
                    blocks, upstream_blocks, total
                )
            grads = (blocks.join(query_grads), key_grad, value_grad)
            if not null:
                return grads
            if causal:
                return grads + (sum_like(-start_share, null[0]),)
            return grads + (null_logits_gradient(key_sums, null[0], total),)

        return blocks.join(output_blocks), grad

    if null_logits is None:
        return attend(query, key, value)
    return attend(query, key, value, null_logits)


class _QueryBlocks:
    """One call's queries in blocks, and what every block's scores read.

    A block, as the scans hand it out, is a tuple `(index, query_block,
    mask_block, *extra)`; `mask_block` is `None` when the mask has a single
    query row, which every block then shares.
    """

    def __init__(self, query, key, value, mask, *, is_causal, chunk_size, null_logits):
        self.key, self.value, self.mask = key, value, mask
        self.is_causal, self.chunk_size = is_causal, chunk_size
        self.masked = masked_value(query)
        self.length, self.key_length = ops.shape(query)[2], ops.shape(key)[2]
        self.num_blocks = (self.length + chunk_size - 1) // chunk_size
        self.queries = self.split(query)
        self.mask_blocks = None
        if mask is not None and mask.shape[2] != 1:
            # Also when the axis is unknown in a relaxed trace: it may be 1.
            rows = ops.broadcast_to(mask, tuple(ops.shape(mask)[:2]) + (self.length, self.key_length))
            self.mask_blocks = self.split(rows)
        # The log-sum-exp over no query (but the null query), one row per
        # key: where each key's sums over the queries start.
        prefix_shape = ops.shape(key)[:2] + (1, self.key_length)
        if null_logits is None:
            self.empty_prefix = ops.full(prefix_shape, self.masked, dtype=key.dtype)
        else:
            self.empty_prefix = ops.broadcast_to(null_logits, prefix_shape)

    def split(self, x):
        """`(B, N, T, ...)` -> `(num_blocks, B, N, chunk_size, ...)`, zero-padded."""
        shape = ops.shape(x)
        padding = self.num_blocks * self.chunk_size - shape[2]
        pad = ops.zeros(tuple(shape[:2]) + (padding,) + tuple(shape[3:]), dtype=x.dtype)
        x = ops.concatenate([x, pad], axis=2)
        x = ops.reshape(
            x, tuple(shape[:2]) + (self.num_blocks, self.chunk_size) + tuple(shape[3:])
        )
        return ops.moveaxis(x, 2, 0)

    def join(self, blocks):
        """Inverse of `split`."""
        shape = ops.shape(blocks)
        x = ops.moveaxis(blocks, 0, 2)
        x = ops.reshape(x, tuple(shape[1:3]) + (shape[0] * shape[3],) + tuple(shape[4:]))
        return x[:, :, : self.length]

    def xs(self, *extra):
        """What a scan over the blocks hands out, block by block."""
        return (ops.arange(self.num_blocks), self.queries, self.mask_blocks) + extra

    def like_queries(self, last_dim):
        """Zeros shaped like the query blocks, with last axis `last_dim`."""
        return ops.zeros(tuple(ops.shape(self.queries)[:4]) + (last_dim,), dtype=self.value.dtype)

    def scores(self, index, query_block, mask_block):
        """The block's masked scores and their validity."""
        rows = index * self.chunk_size + ops.arange(self.chunk_size)
        valid = ops.reshape(rows < self.length, (1, 1, self.chunk_size, 1))
        if self.is_causal:
            valid = ops.logical_and(valid, rows[:, None] >= ops.arange(self.key_length)[None, :])
        if self.mask is not None:
            valid = ops.logical_and(valid, self.mask if mask_block is None else mask_block)
        scores = einsum("bnch,bnsh->bncs", query_block, self.key)
        return ops.where(valid, scores, self.masked), valid

    def causal_key_logsumexp(self, scores, valid, before):
        """The block's prefix log-sum-exp, continuing the prefix `before`."""
        extended = ops.concatenate([before, scores], axis=-2)
        valid = ops.broadcast_to(valid, ops.shape(scores))
        extended_valid = ops.concatenate([before > self.masked / 2, valid], axis=-2)
        return prefix_logsumexp(extended, extended_valid)[:, :, 1:]


def _scan(step, init, xs, stacked_like, reverse=False):
    """`keras.ops.scan` whose outputs need not be shaped like the carry.

    (Keras' TensorFlow scan requires that.) `step(carry, x)` returns the new
    carry and outputs that are written, along the leading axis, into zeros
    shaped like `stacked_like`. `xs` may contain `None`.
    """
    length = ops.shape(keras.tree.flatten(xs)[0])[0]
    if isinstance(length, int) and length == 0:
        # No block (no query): XLA rejects the loop body's writes into
        # empty buffers even though it would never run. (XLA knows every
        # length; an unknown one, in a graph, runs the loop zero times.)
        return init, stacked_like

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


def _key_logsumexp_over_blocks(blocks):
    """`c` of every key over all queries (non-causal double normalization)."""

    def step(total, block):
        scores, _ = blocks.scores(*block)
        return logaddexp(total, key_logsumexp(scores)), ()

    total, _ = _scan(step, blocks.empty_prefix, blocks.xs(), ())
    return total


def _block_weights(blocks, block, total):
    """A block's scores, weights and each query's sum of `exp(s - c)`.

    Non-causal: `total` is `c` (double normalization) or `None` (softmax).
    """
    scores, valid = blocks.scores(*block[:3])
    weights, query_sums = row_softmax(scores if total is None else scores - total, valid)
    return scores, weights, query_sums


def _forward(blocks, total):
    """Output blocks of softmax (`total=None`) or non-causal double attention."""

    def step(carry, block):
        weights = _block_weights(blocks, block, total)[1]
        return carry, einsum("bncs,bnsh->bnch", weights, blocks.value)

    _, output_blocks = _scan(step, 0, blocks.xs(), blocks.like_queries(ops.shape(blocks.value)[-1]))
    return output_blocks


def _forward_causal(blocks):
    """Output blocks of causal double attention, and each block's prefix before it.

    One pass; the prefixes (one row of keys per block) are kept for the
    backward pass.
    """

    def step(before, block):
        scores, valid = blocks.scores(*block)
        key_lse = blocks.causal_key_logsumexp(scores, valid, before)
        weights, _ = row_softmax(scores - key_lse, valid)
        output_block = einsum("bncs,bnsh->bnch", weights, blocks.value)
        return key_lse[:, :, -1:], (before, output_block)

    prefix = blocks.empty_prefix
    befores_like = ops.zeros((blocks.num_blocks,) + tuple(ops.shape(prefix)), dtype=prefix.dtype)
    outputs_like = blocks.like_queries(ops.shape(blocks.value)[-1])
    _, (befores, output_blocks) = _scan(step, prefix, blocks.xs(), (befores_like, outputs_like))
    return output_blocks, befores


def _softmax_backward(blocks, weights, upstream_block):
    """The softmax part `D` of a block's score gradient, and the values' gradient."""
    weights_grad = einsum("bnch,bnsh->bncs", upstream_block, blocks.value)
    softmax_part = softmax_part_of_gradient(weights, weights_grad)
    value_grad = einsum("bncs,bnch->bnsh", weights, upstream_block)
    return softmax_part, value_grad


def _backward(blocks, upstream_blocks, total):
    """Gradients of softmax (`total=None`) or non-causal double attention.

    A first pass gives the softmax part, the values' gradient and (double)
    each key's sum over the queries of `D`; with those, the per-key step's
    share follows: `ds = D - B * (sum over queries of D)`, `B = exp(s - c)`.
    """

    def step(carry, block):
        key_sums, key_grad, key_weighted_queries, value_grad = carry
        _, weights, query_sums = _block_weights(blocks, block, total)
        softmax_part, block_value_grad = _softmax_backward(blocks, weights, block[3])
        query_block = block[1]
        key_grad = key_grad + einsum("bncs,bnch->bnsh", softmax_part, query_block)
        query_grad = einsum("bncs,bnsh->bnch", softmax_part, blocks.key)
        if total is not None:
            key_sums = key_sums + ops.sum(softmax_part, axis=-2, keepdims=True)
            key_weighted_queries = key_weighted_queries + einsum(
                "bncs,bnch->bnsh", weights * query_sums, query_block
            )
        carry = (key_sums, key_grad, key_weighted_queries, value_grad + block_value_grad)
        return carry, query_grad

    zeros_key = ops.zeros_like(blocks.key)
    start = (ops.zeros_like(blocks.empty_prefix), zeros_key, zeros_key, ops.zeros_like(blocks.value))
    carry, query_grads = _scan(
        step, start, blocks.xs(upstream_blocks), ops.zeros_like(blocks.queries)
    )
    key_sums, key_grad, key_weighted_queries, value_grad = carry
    if total is None:
        return query_grads, key_grad, value_grad, None
    by_key = ops.moveaxis(key_sums, -2, -1)
    key_grad = key_grad - by_key * key_weighted_queries
    query_grads = _subtract_key_part(blocks, query_grads, by_key, total)
    return query_grads, key_grad, value_grad, key_sums


def _subtract_key_part(blocks, query_grads, key_sums, total):
    """The queries' share of `- B * (sum over queries of D)`, block by block."""

    def step(carry, block):
        query_grad = block[3]
        _, weights, query_sums = _block_weights(blocks, block, total)
        key_part = weights * query_sums
        return carry, query_grad - einsum("bncs,bnsh->bnch", key_part, key_sums * blocks.key)

    _, query_grads = _scan(step, 0, blocks.xs(query_grads), ops.zeros_like(blocks.queries))
    return query_grads


def _backward_causal(blocks, upstream_blocks, befores):
    """Gradients of causal double attention, in one reverse pass.

    `later` carries, per key, the gradient that reaches the block's last
    prefix from the blocks after it, as `sum D[i] exp(c_last - c[i])`.
    Appended as an extra row (score and prefix `c_last`), with the prefix
    before the block prepended, the block's share of the prefix
    log-sum-exp gradient and the carry for the block before come out of one
    `prefix_logsumexp_transpose`. Returns the gradients of the query
    blocks, keys and values, and what reaches the start of every key's
    prefix: `sum over queries of D * exp(start - c)`.
    """

    def step(carry, block):
        later, key_grad, value_grad = carry
        index, query_block, mask_block, upstream_block, before = block
        scores, valid = blocks.scores(index, query_block, mask_block)
        key_lse = blocks.causal_key_logsumexp(scores, valid, before)
        weights, _ = row_softmax(scores - key_lse, valid)
        softmax_part, block_value_grad = _softmax_backward(blocks, weights, upstream_block)
        last = key_lse[:, :, -1:]
        transposed = prefix_logsumexp_transpose(
            ops.concatenate([before, scores, last], axis=-2),
            ops.concatenate([before, key_lse, last], axis=-2),
            ops.concatenate([ops.zeros_like(before), softmax_part, later], axis=-2),
        )
        scores_grad = softmax_part - transposed[:, :, 1:-1]
        key_grad = key_grad + einsum("bncs,bnch->bnsh", scores_grad, query_block)
        query_grad = einsum("bncs,bnsh->bnch", scores_grad, blocks.key)
        return (transposed[:, :, :1], key_grad, value_grad + block_value_grad), query_grad

    start = (
        ops.zeros_like(blocks.empty_prefix), ops.zeros_like(blocks.key), ops.zeros_like(blocks.value)
    )
    (start_share, key_grad, value_grad), query_grads = _scan(
        step, start, blocks.xs(upstream_blocks, befores), ops.zeros_like(blocks.queries),
        reverse=True,
    )
    return query_grads, key_grad, value_grad, start_share
