"""Attention over blocks of queries (`chunk_size`): memory linear in length.

The `(query_length, key_length)` score matrix is never held whole. The
queries are split into blocks of `chunk_size`; each block's scores are
computed, used and dropped:

- non-causal double normalization: a first pass accumulates each key's
  log-sum-exp over the queries, `c[j]`, block by block; a second pass takes
  each block's weights `softmax(s - c)` against the values;
- causal double normalization: one pass carrying each key's prefix
  log-sum-exp from block to block (`c[i, j]` over `i' <= i`), which enters
  each block's causal normalization (`keras_dna.ops.causal`) as that key's
  null logit;
- single normalization: one pass of softmax blocks.

On PyTorch, whose loops are Python's, blocks under the causal mask score
only the keys up to their last query (half the work), and causal double
normalization takes its prefixes first, a block of keys at a time
(`_prefixes_by_key_blocks`), then the outputs last block first.

The gradient is written out (`keras.ops.custom_gradient`) and recomputes each
block's scores instead of keeping them: two passes without causal
normalization (the sums over queries that the per-key step needs come from
the first), one reverse pass with it (carrying each key's gradient from the
later blocks).
"""

import keras
from keras import ops

from keras_dna.ops.backend import cumulative_logsumexp
from keras_dna.ops.backend import einsum
from keras_dna.ops.backend import result_dtype
from keras_dna.ops.backend import scaled
from keras_dna.ops.causal import causal_weights
from keras_dna.ops.causal import causal_weights_gradient
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
                query_grads, key_grad, value_grad, prefix_grad = _backward_causal(
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
                return grads + (sum_like(prefix_grad, null[0]),)
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
        # PyTorch loops in Python (`_scan`), where each block's scores may
        # have their own width: with `is_causal`, a block's queries see no
        # key after its last one, so its scores stop there (half the work
        # and, at the last block only, the memory of a whole block).
        self.truncated = is_causal and keras.backend.backend() == "torch"

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
        """What a scan over the blocks hands out, block by block (after
        the block's index)."""
        return (self.queries, self.mask_blocks) + extra

    def key_count(self, index):
        """How many keys block `index` scores: `None` for all, or for
        truncated blocks (a Python `index`) those up to its last query."""
        if not self.truncated:
            return None
        return min(self.key_length, (index + 1) * self.chunk_size)

    def like_queries(self, last_dim):
        """Zeros shaped like the query blocks, with last axis `last_dim`."""
        return ops.zeros(tuple(ops.shape(self.queries)[:4]) + (last_dim,), dtype=self.value.dtype)

    def scores(self, index, query_block, mask_block):
        """The block's masked scores and their validity, over its
        `key_count(index)` keys."""
        count = self.key_count(index)
        rows = index * self.chunk_size + ops.arange(self.chunk_size)
        valid = ops.reshape(rows < self.length, (1, 1, self.chunk_size, 1))
        if self.is_causal:
            keys = ops.arange(self.key_length if count is None else count)
            valid = ops.logical_and(valid, rows[:, None] >= keys[None, :])
        if self.mask is not None:
            mask = self.mask if mask_block is None else mask_block
            valid = ops.logical_and(valid, _leading(mask, count, -1))
        scores = einsum("bnch,bnsh->bncs", query_block, _leading(self.key, count, -2))
        return ops.where(valid, scores, self.masked), valid


def _leading(x, count, axis):
    """The first `count` entries of `x` along `axis` (all if `count` is
    `None`, or if the axis broadcasts)."""
    return x if count is None else _key_range(x, 0, count, axis)


def _key_range(x, start, count, axis=-1):
    """Entries `start` to `start + count` of `x` along `axis` (all if
    the axis broadcasts)."""
    if x.shape[axis] == 1:
        return x
    axis = axis % len(x.shape)
    return x[(slice(None),) * axis + (slice(start, start + count),)]


def _add_to_leading(total, part, axis):
    """`total` with `part` added to its leading entries along `axis`.

    In place where `part` is shorter (truncated blocks, PyTorch only): the
    accumulators belong to their loop, and a functional update would copy
    them whole at every block.
    """
    if part.shape[axis] == total.shape[axis]:
        return total + part
    _leading(total, part.shape[axis], axis).add_(part)
    return total


def _with_leading(total, part, axis):
    """`total` with its leading entries along `axis` replaced by `part`."""
    if part.shape[axis] == total.shape[axis]:
        return part
    axis = axis % len(total.shape)
    rest = total[(slice(None),) * axis + (slice(part.shape[axis], None),)]
    return ops.concatenate([part, rest], axis=axis)


def _scan(step, init, xs, stacked_like, reverse=False):
    """`keras.ops.scan` whose outputs need not be shaped like the carry.

    (Keras' TensorFlow scan requires that.) `step(carry, (index,) + x)`
    returns the new carry and outputs that are stacked along the leading
    axis, shaped like `stacked_like`. `xs` may contain `None`. PyTorch
    runs a Python loop with integer indices (`_python_scan`).
    """
    length = ops.shape(keras.tree.flatten(xs)[0])[0]
    if isinstance(length, int) and length == 0:
        # No block (no query): XLA rejects the loop body's writes into
        # empty buffers even though it would never run. (XLA knows every
        # length; an unknown one, in a graph, runs the loop zero times.)
        return init, stacked_like
    if keras.backend.backend() == "torch":
        return _python_scan(step, init, xs, length, reverse)

    def body(i, state):
        carry, stacked = state
        index = length - 1 - i if reverse else i
        x = tuple(None if t is None else ops.take(t, index, axis=0) for t in xs)
        carry, outputs = step(carry, (index,) + x)
        stacked = keras.tree.map_structure(
            lambda buffer, output: ops.slice_update(
                buffer, (index,) + (0,) * (len(buffer.shape) - 1), ops.expand_dims(output, 0)
            ),
            stacked,
            outputs,
        )
        return carry, stacked

    return ops.fori_loop(0, length, body, (init, stacked_like))


def _python_scan(step, init, xs, length, reverse):
    """`_scan` as a Python loop: Keras's PyTorch `fori_loop` is one too,
    and there `slice_update` copies the whole stacked buffer at every
    block; the outputs are stacked once, at the end, instead."""
    carry, outputs = init, [None] * length
    for index in reversed(range(length)) if reverse else range(length):
        x = tuple(None if t is None else t[index] for t in xs)
        carry, outputs[index] = step(carry, (index,) + x)
    stacked = keras.tree.map_structure(lambda *blocks: ops.stack(blocks), *outputs)
    return carry, stacked


def _key_logsumexp_over_blocks(blocks):
    """`c` of every key over all queries (non-causal double normalization,
    whose blocks score every key)."""

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
        values = _leading(blocks.value, blocks.key_count(block[0]), -2)
        return carry, einsum("bncs,bnsh->bnch", weights, values)

    _, output_blocks = _scan(step, 0, blocks.xs(), blocks.like_queries(ops.shape(blocks.value)[-1]))
    return output_blocks


def _forward_causal(blocks):
    """Output blocks of causal double attention, and each block's prefix before it.

    Each key's prefix log-sum-exp over the blocks before enters a block's
    causal normalization as that key's null logit (`causal_weights`); the
    prefixes (one row of keys per block) are kept for the backward pass.
    Scans carry them from block to block. Truncated blocks take them
    first (`_prefixes_by_key_blocks`) and the outputs last block first, so
    that each block's temporaries are smaller than the last's: growing,
    the heap (glibc's) kept the freed ones and the process's resident
    memory grew with them.
    """
    outputs_like = blocks.like_queries(ops.shape(blocks.value)[-1])
    if blocks.truncated:
        befores = _prefixes_by_key_blocks(blocks)

        def output_step(carry, block):
            return carry, _causal_output_block(blocks, block[:3], block[3])[0]

        _, output_blocks = _scan(output_step, (), blocks.xs(befores), outputs_like, reverse=True)
        return output_blocks, befores

    def step(before, block):
        output_block, after = _causal_output_block(blocks, block, before)
        return _with_leading(before, after, -1), (before, output_block)

    prefix = blocks.empty_prefix
    befores_like = ops.zeros((blocks.num_blocks,) + tuple(ops.shape(prefix)), dtype=prefix.dtype)
    _, (befores, output_blocks) = _scan(step, prefix, blocks.xs(), (befores_like, outputs_like))
    return output_blocks, befores


def _causal_output_block(blocks, block, before):
    """A block's output, for its prefix `before`, and its keys' prefix after it."""
    count = blocks.key_count(block[0])
    carried = _leading(before, count, -1)
    scores, valid = blocks.scores(*block)
    weights, _ = causal_weights(scores, valid, carried)
    output_block = einsum("bncs,bnsh->bnch", weights, _leading(blocks.value, count, -2))
    return output_block, logaddexp(carried, key_logsumexp(scores))


def _prefixes_by_key_blocks(blocks):
    """Each truncated block's prefix before it, `(num_blocks, B, N, 1, S)`,
    taken a block of `chunk_size` keys at a time: its scores against the
    query blocks that see it (from the one holding its first key on), each
    key's log-sum-exp per query block, and their exclusive cumulative
    log-sum-exp over the query blocks. Each block of keys has fewer query
    blocks than the last."""
    size, prefix = blocks.chunk_size, blocks.empty_prefix
    columns = []
    for first in range(min(blocks.num_blocks, -(-blocks.key_length // size))):
        start = first * size
        count = min(size, blocks.key_length - start)
        key_block = blocks.key[:, :, start:start + count]
        scores = einsum("ibnch,bnsh->ibncs", blocks.queries[first:], key_block)
        rows = ops.reshape(ops.arange(first * size, blocks.num_blocks * size), (-1, 1, 1, size, 1))
        valid = ops.logical_and(rows < blocks.length, rows >= start + ops.arange(count))
        if blocks.mask is not None:
            mask = blocks.mask if blocks.mask_blocks is None else blocks.mask_blocks[first:]
            valid = ops.logical_and(valid, _key_range(mask, start, count))
        masked = ops.where(valid, scores, blocks.masked)
        carried = _key_range(prefix, start, count)
        per_block = ops.concatenate([ops.expand_dims(carried, 0), key_logsumexp(masked)], axis=0)
        after = cumulative_logsumexp(per_block, 0)[:-1]
        earlier = ops.broadcast_to(carried, (first,) + tuple(ops.shape(carried)))
        columns.append(ops.concatenate([earlier, after], axis=0))
    covered = sum(column.shape[-1] for column in columns)
    if covered < blocks.key_length:
        rest = _key_range(prefix, covered, blocks.key_length - covered)
        columns.append(ops.broadcast_to(rest, (blocks.num_blocks,) + tuple(ops.shape(rest))))
    return ops.concatenate(columns, axis=-1)


def _softmax_backward(values, weights, upstream_block):
    """The softmax part `D` of a block's score gradient, and the values' gradient."""
    weights_grad = einsum("bnch,bnsh->bncs", upstream_block, values)
    softmax_part = softmax_part_of_gradient(weights, weights_grad)
    value_grad = einsum("bncs,bnch->bnsh", weights, upstream_block)
    return softmax_part, value_grad


def _backward(blocks, upstream_blocks, total):
    """Gradients of softmax (`total=None`) or non-causal double attention.

    A first pass gives the softmax part, the values' gradient and (double)
    each key's sum over the queries of `D`; with those, the per-key step's
    share follows: `ds = D - B * (sum over queries of D)`, `B = exp(s - c)`.
    (Double normalization's blocks score every key.)
    """

    def step(carry, block):
        key_sums, key_grad, key_weighted_queries, value_grad = carry
        count = blocks.key_count(block[0])
        _, weights, query_sums = _block_weights(blocks, block, total)
        softmax_part, block_value_grad = _softmax_backward(
            _leading(blocks.value, count, -2), weights, block[3]
        )
        query_block = block[1]
        key_grad = _add_to_leading(key_grad, einsum("bncs,bnch->bnsh", softmax_part, query_block), -2)
        query_grad = einsum("bncs,bnsh->bnch", softmax_part, _leading(blocks.key, count, -2))
        if total is not None:
            key_sums = key_sums + ops.sum(softmax_part, axis=-2, keepdims=True)
            key_weighted_queries = key_weighted_queries + einsum(
                "bncs,bnch->bnsh", weights * query_sums, query_block
            )
        value_grad = _add_to_leading(value_grad, block_value_grad, -2)
        return (key_sums, key_grad, key_weighted_queries, value_grad), query_grad

    # Each its own zeros: truncated blocks add into them in place.
    start = (
        ops.zeros_like(blocks.empty_prefix), ops.zeros_like(blocks.key), ops.zeros_like(blocks.key),
        ops.zeros_like(blocks.value),
    )
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

    `later` carries, per key, the gradient in the prefix `C'` after the
    block (`C' = logaddexp(C, logsumexp of the block's scores)`, `C` the
    prefix before it), from the blocks after. Besides what reaches them
    through the block's weights (`causal_weights_gradient`), the block's
    scores get `later * exp(s - C')` and `C` gets `later * exp(C - C')`,
    factors at most 1. Keys a truncated block does not score pass `later`
    on unchanged. Returns the gradients of the query blocks, keys and
    values, and the gradient in the prefix before the first block (the
    null query's logits).
    """

    def step(carry, block):
        later, key_grad, value_grad = carry
        index, query_block, mask_block, upstream_block, before = block
        count = blocks.key_count(index)
        carried, later_here = _leading(before, count, -1), _leading(later, count, -1)
        scores, valid = blocks.scores(index, query_block, mask_block)
        weights, residuals = causal_weights(scores, valid, carried)
        values = _leading(blocks.value, count, -2)
        weights_grad = einsum("bnch,bnsh->bncs", upstream_block, values)
        value_grad = _add_to_leading(value_grad, einsum("bncs,bnch->bnsh", weights, upstream_block), -2)
        scores_grad, carried_grad = causal_weights_gradient(weights, residuals, weights_grad)
        after = logaddexp(carried, key_logsumexp(scores))
        scores_grad = scores_grad + later_here * ops.exp(scores - after)
        carried_grad = carried_grad + later_here * ops.exp(carried - after)
        key_grad = _add_to_leading(key_grad, einsum("bncs,bnch->bnsh", scores_grad, query_block), -2)
        query_grad = einsum("bncs,bnsh->bnch", scores_grad, _leading(blocks.key, count, -2))
        return (_with_leading(later, carried_grad, -1), key_grad, value_grad), query_grad

    start = (
        ops.zeros_like(blocks.empty_prefix), ops.zeros_like(blocks.key), ops.zeros_like(blocks.value)
    )
    (prefix_grad, key_grad, value_grad), query_grads = _scan(
        step, start, blocks.xs(upstream_blocks, befores), ops.zeros_like(blocks.queries),
        reverse=True,
    )
    return query_grads, key_grad, value_grad, prefix_grad
