"""DNA's own attention kernel, in JAX Pallas: causal and not, memory linear in
the lengths, gradients in the same block structure.

The algorithm is `docs/algorithms.md`, "A kernel of our own". Per head, with
scores `s = scale * q k^T` and validity `m` (mask, causal rule, padding):

- non-causal: `c[j]`, each key's log-sum-exp over its valid queries, comes
  from a pass over key blocks (`_key_normalizer_kernel`); the output is
  flash attention with the bias `-c[j]` (`_forward_kernel`).
- causal: the same pass writes `C[I, j]`, key `j`'s log-sum-exp over the
  queries of the blocks before query block `I`; each tile of the forward
  pass then takes `c[i, j]` as a cumulative log-sum-exp down its rows,
  started from `C[I, j]` (`_causal_normalizer`).
- softmax (`normalize=False`) is the same kernels with `c = 0`; hybrid mixing
  is done by the caller on the two outputs.

The null query's log-mass joins `c` outside the kernels (`logaddexp` of a
per-head constant commutes with the prefix). Nothing score-sized is stored:
the causal carries hold `query_length / block_q` numbers per key and head.

Every tile computation is a plain function of arrays (the `_tile_*` and
`_*_normalizer` functions), so the kernels only load, loop and store. The
kernels run compiled on GPUs and TPUs and in Pallas's interpreter on CPUs
(`interpret=True`), where the tests hold them to the float64 oracle.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# A finite stand-in for minus infinity: `NEG - NEG` is 0, never NaN.
NEG = -1e30
# Fast tile forms are exact while exponents stay within this of their
# reference (float32's exp underflows near -87)...
_SPREAD = 60.0
# ... and below this above it (float32's exp overflows near 88; a tile's
# row sums stay finite).
_OVERFLOW = 80.0
_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b, contract):
    """`a @ b` contracting axis `contract` of each, in float32 at full
    precision (TPUs otherwise multiply float32 in bfloat16 passes)."""
    return jax.lax.dot_general(
        a, b, ((contract[0], contract[1]), ((), ())), precision=_HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _none(flags):
    """Whether no entry of the boolean `flags` is set (as a maximum: Triton
    lowers no boolean reduction)."""
    return jnp.max(flags.astype(jnp.float32)) == 0.0


def _logaddexp(a, b):
    top = jnp.maximum(a, b)
    return top + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


def _lse(logits, axis):
    """Log-sum-exp of `logits` (masked entries at `NEG`, which give about
    `NEG` where all are), keeping `axis`."""
    top = jnp.max(logits, axis=axis, keepdims=True)
    return top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=axis, keepdims=True))


def _shift_rows(x, shift, fill):
    """`x` moved `shift` rows down (up if negative), `fill` entering: a
    permutation matmul, which every Pallas target lowers."""
    rows = x.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
    moved = _dot((row - col == shift).astype(jnp.float32), x, (1, 0))
    source = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) - shift
    return jnp.where((source >= 0) & (source < rows), moved, fill)


def _causal_normalizer(scores, valid, carry):
    """`c[i, j]`: log-sum-exp of `carry[j]` and column `j`'s valid scores in
    rows `<= i`. Nondecreasing down every column, valid rows or not.

    Row `i`'s values depend on rows `<= i` alone, to the bit, as causality
    asks. Fast form: one lower-triangular matmul of exponentials against a
    reference per column, the larger of the carry and the column's first
    valid score (both before any row that uses them). An entry is exact
    unless a score at or above it in its column exceeds the reference by
    more than `_OVERFLOW` or its sum underflows
    (below `exp(-_SPREAD)`); only then does the tile also take the exact
    log-space scan by doubling, for those entries.
    """
    rows = scores.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    first_row = jnp.min(jnp.where(valid, row, rows), axis=0, keepdims=True)
    first_score = jnp.sum(jnp.where(valid & (row == first_row), scores, 0.0), axis=0, keepdims=True)
    reference = jnp.where(first_row < rows, jnp.maximum(carry, first_score), carry)
    shifted = jnp.where(valid, scores - reference, NEG)
    lower = (
        jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
        >= jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
    ).astype(jnp.float32)
    terms = jnp.where(valid, jnp.exp(jnp.minimum(shifted, _OVERFLOW)), 0.0)
    total = _dot(lower, terms, (1, 0)) + jnp.exp(carry - reference)
    fast = reference + jnp.log(jnp.maximum(total, 1e-38))
    # Row i is past an overflow where its column's first one is at or
    # before it: whatever later rows hold.
    first_overflow = jnp.min(jnp.where(valid & (shifted > _OVERFLOW), row, rows), axis=0, keepdims=True)
    exact = (row < first_overflow) & (total >= math.exp(-_SPREAD))

    def scan():
        prefix, shift = jnp.where(valid, scores, NEG), 1
        while shift < rows:
            prefix = _logaddexp(prefix, _shift_rows(prefix, shift, NEG))
            shift *= 2
        return jnp.where(exact, fast, _logaddexp(prefix, carry))

    return jax.lax.cond(_none(valid & ~exact), lambda: fast, scan)


def smallest_valid(normalizer, valid, default):
    """Each column's smallest valid `c` (its first valid row's: `c` is
    nondecreasing down the rows), `default` where the column has none."""
    smallest = jnp.min(jnp.where(valid, normalizer, -NEG), axis=0, keepdims=True)
    return jnp.where(jnp.max(valid.astype(jnp.float32), axis=0, keepdims=True) > 0, smallest, default)


def _causal_suffix(scores, valid, normalizer, weights_grad):
    """`sum over valid rows i >= i' of D[i, j] exp(s[i', j] - c[i, j])` for
    each row `i'` of the tile: the causal normalizer's share of the score
    gradient, from this tile's rows. `D` is the gradient in `s - c`.

    Fast form: an upper-triangular matmul against each column's smallest
    valid `c`, exact while `c` spreads by less than `_SPREAD` down the
    column; otherwise a scan by doubling in which each row's sum is kept
    relative to its own `c` (every factor then at most 1).
    """
    base = smallest_valid(normalizer, valid, 0.0)
    fast_ok = _none(valid & (normalizer - base > _SPREAD))

    def fast():
        rows = scores.shape[0]
        upper = (
            jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
            <= jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
        ).astype(jnp.float32)
        terms = jnp.where(valid, weights_grad * jnp.exp(base - normalizer), 0.0)
        return jnp.where(valid, jnp.exp(scores - base) * _dot(upper, terms, (1, 0)), 0.0)

    def exact():
        # normalizer is nondecreasing down each column, so every factor
        # exp(c[i'] - c[i]) with i >= i' is at most 1.
        total, shift = jnp.where(valid, weights_grad, 0.0), 1
        while shift < scores.shape[0]:
            later = _shift_rows(normalizer, -shift, -NEG)
            total = total + jnp.exp(normalizer - later) * _shift_rows(total, -shift, 0.0)
            shift *= 2
        return jnp.where(valid, jnp.exp(scores - normalizer) * total, 0.0)

    return jax.lax.cond(fast_ok, fast, exact)


class _Plan:
    """The static facts of one kernel call: lengths, blocks, grouping, the
    mask's layout and the options; hashable, a static argument of
    `jax.custom_vjp`.

    Layouts, chosen so that every block's last two dimensions are whole or
    (8, 128)-aligned, as TPUs require: queries, keys, values and outputs
    `(B, heads, length, dim)`; a value per query `(B, N, T, 1)`; values per
    key `(B, N, rows, 1, S)`, with a row per query block for the causal
    carries and one row otherwise; the mask `(B or 1, N or 1, T or 1, S)`.
    """

    def __init__(self, *, shapes, mask_dims, causal, causal_mask, normalize, scale, block_q, block_k, platform):
        (self.batch, self.heads, self.q_len, self.head_dim), (self.kv_heads, self.k_len, self.value_dim) = shapes
        self.groups = self.heads // self.kv_heads
        # Powers of two (Triton's loads take no other), at least 8 (a TPU's
        # sublanes), at most what was asked.
        self.block_q = min(block_q, _power_of_two(self.q_len))
        self.block_k = min(block_k, _power_of_two(self.k_len))
        self.q_pad = _round_up(self.q_len, self.block_q)
        self.k_pad = _round_up(self.k_len, self.block_k)
        self.q_blocks, self.k_blocks = self.q_pad // self.block_q, self.k_pad // self.block_k
        self.causal, self.causal_mask, self.normalize, self.scale = causal, causal_mask, normalize, scale
        # The causal normalizer and its gradient carry a row per query block.
        self.carries = causal and normalize
        self.normalizer_rows = self.q_blocks if self.carries else 1
        # `mask_dims`: the mask's batch and heads axes, and whether it
        # varies along the queries; padded to the blocks.
        self.mask_shape = None
        if mask_dims is not None:
            batch, heads, by_query = mask_dims
            self.mask_shape = (batch, heads, self.q_pad if by_query else 1, self.k_pad)
        self.platform = platform
        self._key = (shapes, mask_dims, causal, causal_mask, normalize, scale, block_q, block_k, platform)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Plan) and self._key == other._key

    def valid(self, q_start, k_start, mask_ref, head=None, by_keys=False):
        """The tile's validity: padding, the causal rule and the mask (the
        program's block of it, `mask_spec`'s: by query block, or `by_keys`;
        `head` indexes a block of several heads)."""
        shape = (self.block_q, self.block_k)
        rows = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        cols = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        valid = (rows < _i32(self.q_len)) & (cols < _i32(self.k_len))
        if self.causal_mask:
            valid &= cols <= rows
        if mask_ref is not None:
            # The program's block holds its query rows (all keys) or its
            # key columns (all queries); a broadcast query axis, one row.
            if by_keys:
                index = (self._mask_rows(q_start), pl.ds(0, self.block_k))
            else:
                index = (self._mask_rows(0), pl.ds(k_start, self.block_k))
            valid &= mask_ref[index if head is None else (head,) + index] != 0
        return valid

    def _mask_rows(self, start):
        return pl.ds(0, 1) if self.mask_shape[2] == 1 else pl.ds(start, self.block_q)

    def first_query_block(self, k_block):
        """The first query block that sees key block `k_block`."""
        return (k_block * _i32(self.block_k)) // _i32(self.block_q) if self.causal_mask else _i32(0)

    def key_blocks_seen(self, q_block):
        """How many key blocks query block `q_block` sees."""
        if not self.causal_mask:
            return _i32(self.k_blocks)
        last = ((q_block + _i32(1)) * _i32(self.block_q) - _i32(1)) // _i32(self.block_k)
        return jnp.minimum(last + _i32(1), _i32(self.k_blocks))

    def q_start(self, q_block):
        return q_block * _i32(self.block_q)

    def k_start(self, k_block):
        return k_block * _i32(self.block_k)

    def mask_spec(self, by_keys=False, grouped=False):
        """The mask's BlockSpec for a program `(b, head, block)`: the rows of
        its query block (or, `by_keys`, the columns of its key block) for
        its example and head (all the group's query heads where
        `grouped`); broadcast axes are read at index 0."""
        b_size, h_size, rows, cols = self.mask_shape
        q_block = 1 if rows == 1 else self.block_q
        block = (rows if by_keys else q_block, self.block_k if by_keys else cols)
        heads = self.groups if grouped and h_size > 1 else None

        def index(b, h, i):
            row, col = (0, i) if by_keys else (i * (rows > 1), 0)
            return (b * (b_size > 1), h * (h_size > 1), row, col)

        return pl.BlockSpec((None, heads) + block, index)

    def per_key_shape(self, rows, heads=None):
        return (self.batch, self.heads if heads is None else heads, rows, 1, self.k_pad)

    def call(self, kernel, grid, in_specs, out_shapes, out_specs):
        """`pallas_call` of `kernel` for the platform: interpreted on CPUs,
        Triton on GPUs (Mosaic GPU, JAX's default there, lowers no
        `dot_general` of these shapes), Mosaic on TPUs, every program
        independent (each loops over its blocks itself)."""
        options = {}
        if self.platform == "cpu":
            options["interpret"] = True
        elif self.platform == "gpu":
            from jax.experimental.pallas import triton as pltriton

            options["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=2)
        else:
            from jax.experimental.pallas import tpu as pltpu

            options["compiler_params"] = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid))
        return pl.pallas_call(
            functools.partial(kernel, self), grid=grid, in_specs=in_specs,
            out_shape=out_shapes, out_specs=out_specs, **options,
        )


def _i32(n):
    """An int32 scalar: index arithmetic stays int32 under JAX's x64 mode,
    which Mosaic requires."""
    return jnp.int32(n)


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _power_of_two(n):
    """The smallest power of two at least `n` and 8."""
    return max(8, 1 << (max(n, 1) - 1).bit_length())


def _scores(plan, q, k):
    return plan.scale * _dot(q.astype(jnp.float32), k.astype(jnp.float32), (1, 1))


def _tile_normalizer(plan, scores, valid, carry):
    """`c` for a tile from its keys' `(1, block_k)` `carry` (`c[j]`, or
    causal `C[I, j]`); 0 for softmax."""
    if not plan.normalize:
        return jnp.zeros_like(scores)
    if plan.causal:
        return _causal_normalizer(scores, valid, carry)
    return jnp.broadcast_to(carry, scores.shape)


def _tile(plan, q, k, v, grad_out, lse, delta, valid, carry):
    """A tile of the backward pass: scores, `c`, weights `A`, and `D`, the
    gradient in `s - c`."""
    scores = _scores(plan, q, k)
    normalizer = _tile_normalizer(plan, scores, valid, carry)
    weights = jnp.where(valid, jnp.exp(scores - normalizer - lse), 0.0)
    weights_grad = weights * (_dot(grad_out, v.astype(jnp.float32), (1, 1)) - delta)
    return scores, normalizer, weights, weights_grad


def _as_column(row):
    """A `(1, n)` row as an `(n, 1)` column, by a matmul (no relayout)."""
    return _dot(row, jnp.ones((1, 1), jnp.float32), (0, 0))


def _inputs(plan, rest, count):
    """The `count` optional inputs, the mask ref (or `None`) and the
    outputs among a kernel's trailing refs."""
    extra, rest = rest[:count], rest[count:]
    if plan.mask_shape:
        return extra, rest[0], rest[1:]
    return extra, None, rest


# The kernels. Each program handles one block and loops over the other axis.


def _key_normalizer_kernel(plan, q_ref, k_ref, *rest):
    """Program `(b, head, key block)`: each key's log-sum-exp over its valid
    queries; causal, `C[I]`, the log-sum-exp before query block `I`."""
    _, mask_ref, (out_ref,) = _inputs(plan, rest, 0)
    k_start = plan.k_start(pl.program_id(2))
    k = k_ref[...]

    def step(q_block, carry):
        q_start = plan.q_start(q_block)
        if plan.causal:
            out_ref[q_block] = carry
        scores = _scores(plan, q_ref[pl.ds(q_start, plan.block_q), :], k)
        valid = plan.valid(q_start, k_start, mask_ref, by_keys=True)
        return _logaddexp(carry, _lse(jnp.where(valid, scores, NEG), 0))

    start = plan.first_query_block(pl.program_id(2))
    empty = jnp.full((1, plan.block_k), NEG, jnp.float32)
    if plan.causal:
        def before(q_block, unused):
            out_ref[q_block] = empty
            return unused

        jax.lax.fori_loop(_i32(0), start, before, 0)
    total = jax.lax.fori_loop(start, _i32(plan.q_blocks), step, empty)
    if not plan.causal:
        out_ref[0] = total


def _forward_kernel(plan, q_ref, k_ref, v_ref, *rest):
    """Program `(b, head, query block)`: the output rows and each row's
    log-sum-exp of `s - c`, by an online softmax over the key blocks."""
    extra, mask_ref, (out_ref, lse_ref) = _inputs(plan, rest, int(plan.normalize))
    c_ref = extra[0] if extra else None
    q_block = pl.program_id(2)
    q_start = plan.q_start(q_block)
    q = q_ref[...]

    def step(k_block, state):
        top, total, acc = state
        k_start = plan.k_start(k_block)
        keys = pl.ds(k_start, plan.block_k)
        scores = _scores(plan, q, k_ref[keys, :])
        valid = plan.valid(q_start, k_start, mask_ref)
        carry = None if c_ref is None else c_ref[:, keys]
        logits = jnp.where(valid, scores - _tile_normalizer(plan, scores, valid, carry), NEG)
        new_top = jnp.maximum(top, jnp.max(logits, axis=1, keepdims=True))
        terms = jnp.where(valid, jnp.exp(logits - new_top), 0.0)
        decay = jnp.exp(top - new_top)
        values = v_ref[keys, :].astype(jnp.float32)
        total = decay * total + jnp.sum(terms, axis=1, keepdims=True)
        return new_top, total, decay * acc + _dot(terms, values, (1, 0))

    column = (plan.block_q, 1)
    state = (jnp.full(column, NEG, jnp.float32), jnp.zeros(column, jnp.float32),
             jnp.zeros((plan.block_q, plan.value_dim), jnp.float32))
    top, total, acc = jax.lax.fori_loop(_i32(0), plan.key_blocks_seen(q_block), step, state)
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    out_ref[...] = jnp.where(seen, acc / safe, 0.0).astype(out_ref.dtype)
    # A row without a valid key: a log-sum-exp that sends every weight to 0.
    lse_ref[...] = jnp.where(seen, top + jnp.log(safe), -NEG)


def _key_gradient_kernel(plan, q_ref, k_ref, v_ref, grad_ref, lse_ref, delta_ref, *rest):
    """Program `(b, key/value head, key block)`: the keys' and values'
    gradients, summed over the group's query heads and the query blocks.
    Also, per query head, what the queries' gradients and the null query's
    need: non-causal, each key's column sum of `D`; causal, the suffix
    carries before each query block (`H`, relative to `R`) and after the
    first (`H0`, `R0`)."""
    extra, mask_ref, outs = _inputs(plan, rest, int(plan.normalize))
    c_ref = extra[0] if extra else None
    per_head_mask = mask_ref is not None and len(mask_ref.shape) == 3
    k_start = plan.k_start(pl.program_id(2))
    k, v = k_ref[...], v_ref[...]
    key_grad = jnp.zeros((plan.block_k, plan.head_dim), jnp.float32)
    value_grad = jnp.zeros((plan.block_k, plan.value_dim), jnp.float32)
    for group in range(plan.groups):
        def tile(q_block, group=group):
            q_start = plan.q_start(q_block)
            rows = pl.ds(q_start, plan.block_q)
            q, grad_out = q_ref[group, rows, :], grad_ref[group, rows, :].astype(jnp.float32)
            valid = plan.valid(q_start, k_start, mask_ref, group if per_head_mask else None, by_keys=True)
            carry = None if c_ref is None else c_ref[group, q_block if plan.carries else 0]
            parts = _tile(plan, q, k, v, grad_out, lse_ref[group, rows, :], delta_ref[group, rows, :], valid, carry)
            return q.astype(jnp.float32), grad_out, valid, parts

        if plan.carries:
            grads = _causal_key_gradients(plan, tile, group, outs[2:])
        else:
            grads = _key_gradients(plan, tile, group, outs[2] if plan.normalize else None)
        key_grad, value_grad = key_grad + grads[0], value_grad + grads[1]
    outs[0][...] = (plan.scale * key_grad).astype(outs[0].dtype)
    outs[1][...] = value_grad.astype(outs[1].dtype)


def _key_gradients(plan, tile, group, column_ref):
    """Non-causal (or softmax): `dK = sum_i (D - B colD) q`, accumulated as
    `sum D q - colD sum B q`; `colD` goes to `column_ref`."""

    def step(q_block, state):
        key_grad, value_grad, column, first_q = state
        q, grad_out, valid, (scores, normalizer, weights, weights_grad) = tile(q_block)
        key_grad = key_grad + _dot(weights_grad, q, (0, 0))
        value_grad = value_grad + _dot(weights, grad_out, (0, 0))
        if column_ref is not None:
            column = column + jnp.sum(weights_grad, axis=0, keepdims=True)
            first_q = first_q + _dot(jnp.where(valid, jnp.exp(scores - normalizer), 0.0), q, (0, 0))
        return key_grad, value_grad, column, first_q

    keys = jnp.zeros((plan.block_k, plan.head_dim), jnp.float32)
    state = (keys, jnp.zeros((plan.block_k, plan.value_dim), jnp.float32),
             jnp.zeros((1, plan.block_k), jnp.float32), keys)
    key_grad, value_grad, column, first_q = jax.lax.fori_loop(
        plan.first_query_block(pl.program_id(2)), _i32(plan.q_blocks), step, state
    )
    if column_ref is None:
        return key_grad, value_grad
    column_ref[group, 0] = column
    return key_grad - _as_column(column) * first_q, value_grad


def _causal_key_gradients(plan, tile, group, outs):
    """Causal: the query blocks in reverse, carrying each key's
    `sum over later valid rows i of D[i, j] exp(R[j] - c[i, j])`, with `R[j]`
    the smallest `c` among those rows (every factor at most 1)."""
    carries_ref, references_ref, first_carry_ref, first_reference_ref = outs
    start = plan.first_query_block(pl.program_id(2))

    def step(index, state):
        key_grad, value_grad, carry, reference = state
        q_block = _i32(plan.q_blocks - 1) - index
        q, grad_out, valid, (scores, normalizer, weights, weights_grad) = tile(q_block)
        carries_ref[group, q_block] = carry
        references_ref[group, q_block] = reference
        from_later = jnp.where(valid, jnp.exp(scores - reference) * carry, 0.0)
        scores_grad = weights_grad - from_later - _causal_suffix(scores, valid, normalizer, weights_grad)
        key_grad = key_grad + _dot(scores_grad, q, (0, 0))
        value_grad = value_grad + _dot(weights, grad_out, (0, 0))
        base = smallest_valid(normalizer, valid, reference)
        own = jnp.sum(jnp.where(valid, weights_grad * jnp.exp(base - normalizer), 0.0), axis=0, keepdims=True)
        return key_grad, value_grad, carry * jnp.exp(base - reference) + own, base

    row = (1, plan.block_k)
    state = (jnp.zeros((plan.block_k, plan.head_dim), jnp.float32),
             jnp.zeros((plan.block_k, plan.value_dim), jnp.float32),
             jnp.zeros(row, jnp.float32), jnp.full(row, -NEG, jnp.float32))
    key_grad, value_grad, carry, reference = jax.lax.fori_loop(_i32(0), _i32(plan.q_blocks) - start, step, state)
    first_carry_ref[group, 0] = carry
    first_reference_ref[group, 0] = reference
    return key_grad, value_grad


def _query_gradient_kernel(plan, q_ref, k_ref, v_ref, grad_ref, lse_ref, delta_ref, *rest):
    """Program `(b, head, query block)`: the queries' gradient over the key
    blocks, with `_key_gradient_kernel`'s column sums or carries."""
    count = 3 if plan.carries else 2 if plan.normalize else 0
    extra, mask_ref, (out_ref,) = _inputs(plan, rest, count)
    q_block = pl.program_id(2)
    q_start = plan.q_start(q_block)
    q, grad_out = q_ref[...], grad_ref[...].astype(jnp.float32)
    lse, delta = lse_ref[...], delta_ref[...]

    def step(k_block, query_grad):
        k_start = plan.k_start(k_block)
        keys = pl.ds(k_start, plan.block_k)
        k = k_ref[keys, :]
        valid = plan.valid(q_start, k_start, mask_ref)
        carry = extra[0][:, keys] if plan.normalize else None
        scores, normalizer, weights, weights_grad = _tile(plan, q, k, v_ref[keys, :], grad_out, lse, delta, valid, carry)
        scores_grad = weights_grad
        if plan.carries:
            from_later = jnp.exp(scores - extra[2][:, keys]) * extra[1][:, keys]
            scores_grad = scores_grad - jnp.where(valid, from_later, 0.0)
            scores_grad = scores_grad - _causal_suffix(scores, valid, normalizer, weights_grad)
        elif plan.normalize:
            first_step = jnp.where(valid, jnp.exp(scores - normalizer), 0.0)
            scores_grad = scores_grad - first_step * extra[1][:, keys]
        return query_grad + _dot(scores_grad, k.astype(jnp.float32), (1, 0))

    zeros = jnp.zeros((plan.block_q, plan.head_dim), jnp.float32)
    query_grad = jax.lax.fori_loop(_i32(0), plan.key_blocks_seen(q_block), step, zeros)
    out_ref[...] = (plan.scale * query_grad).astype(out_ref.dtype)


# The calls of the kernels.


def _row_spec(plan, dim):
    """A program `(b, head, query block)`'s rows of a `(B, N, T, dim)` array."""
    return pl.BlockSpec((None, None, plan.block_q, dim), lambda b, h, i: (b, h, i, 0))


def _keys_spec(plan, dim):
    """All of a `(B, K, S, dim)` array's keys for the program's query head."""
    groups = plan.groups
    return pl.BlockSpec((None, None, plan.k_pad, dim), lambda b, h, i: (b, h // groups, 0, 0))


def _per_key_row_spec(plan, rows):
    """What a program `(b, head, query block)` reads of a per-key array:
    the row of its query block, or the only row."""
    if rows > 1:
        return pl.BlockSpec((None, None, None, 1, plan.k_pad), lambda b, h, i: (b, h, i, 0, 0))
    return pl.BlockSpec((None, None, None, 1, plan.k_pad), lambda b, h, i: (b, h, 0, 0, 0))


def _normalizers(plan, q, k, mask, null_logits):
    """`c` or the causal carries `C`, `(B, N, rows, 1, S)`, the null query
    joined."""
    groups = plan.groups
    in_specs = [
        pl.BlockSpec((None, None, plan.q_pad, plan.head_dim), lambda b, h, j: (b, h, 0, 0)),
        pl.BlockSpec((None, None, plan.block_k, plan.head_dim), lambda b, h, j: (b, h // groups, j, 0)),
    ]
    arrays = [q, k]
    if mask is not None:
        in_specs.append(plan.mask_spec(by_keys=True))
        arrays.append(mask)
    rows = plan.normalizer_rows
    normalizers = plan.call(
        _key_normalizer_kernel, (plan.batch, plan.heads, plan.k_blocks), in_specs,
        jax.ShapeDtypeStruct(plan.per_key_shape(rows), jnp.float32),
        pl.BlockSpec((None, None, rows, 1, plan.block_k), lambda b, h, j: (b, h, 0, 0, j)),
    )(*arrays)
    if null_logits is None:
        return normalizers
    return _logaddexp(normalizers, _per_head(null_logits))


def _per_head(null_logits):
    return jnp.reshape(null_logits.astype(jnp.float32), (1, -1, 1, 1, 1))


def _forward(plan, q, k, v, mask, null_logits):
    """The output `(B, N, T, value_dim)`, each row's log-sum-exp `(B, N, T,
    1)`, and `c` (or `None` for softmax)."""
    normalizers = _normalizers(plan, q, k, mask, null_logits) if plan.normalize else None
    in_specs = [_row_spec(plan, plan.head_dim), _keys_spec(plan, plan.head_dim), _keys_spec(plan, plan.value_dim)]
    arrays = [q, k, v]
    if plan.normalize:
        in_specs.append(_per_key_row_spec(plan, plan.normalizer_rows))
        arrays.append(normalizers)
    if mask is not None:
        in_specs.append(plan.mask_spec())
        arrays.append(mask)
    out, lse = plan.call(
        _forward_kernel, (plan.batch, plan.heads, plan.q_blocks), in_specs,
        (jax.ShapeDtypeStruct((plan.batch, plan.heads, plan.q_pad, plan.value_dim), jnp.float32),
         jax.ShapeDtypeStruct((plan.batch, plan.heads, plan.q_pad, 1), jnp.float32)),
        (_row_spec(plan, plan.value_dim), _row_spec(plan, 1)),
    )(*arrays)
    return out, lse, normalizers


def _key_gradients_call(plan, q, k, v, grad_out, lse, delta, normalizers, mask):
    """`_key_gradient_kernel` over `(B, K, key blocks)`, query heads grouped:
    the keys' and values' gradients and the per-key statistics, `(B, N,
    rows, 1, S)` each."""
    kv, groups = plan.kv_heads, plan.groups

    def grouped(x):
        return jnp.reshape(x, (plan.batch, kv, groups) + x.shape[2:])

    def whole(x):
        return pl.BlockSpec((None, None) + x.shape[2:], lambda b, h, j: (b, h) + (0,) * (x.ndim - 2))

    def keys(dim):
        return pl.BlockSpec((None, None, plan.block_k, dim), lambda b, h, j: (b, h, j, 0))

    def per_key(rows):
        return pl.BlockSpec((None, None, groups, rows, 1, plan.block_k), lambda b, h, j: (b, h, 0, 0, 0, j))

    arrays = [grouped(q), k, v] + [grouped(x) for x in (grad_out, lse, delta)]
    in_specs = [whole(arrays[0]), keys(plan.head_dim), keys(plan.value_dim)] + [whole(x) for x in arrays[3:]]
    if plan.normalize:
        arrays.append(grouped(normalizers))
        in_specs.append(per_key(plan.normalizer_rows))
    if mask is not None:
        arrays.append(mask)
        in_specs.append(plan.mask_spec(by_keys=True, grouped=True))
    shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [keys(plan.head_dim), keys(plan.value_dim)]
    stat_rows = [plan.q_blocks] * 2 + [1] * 2 if plan.carries else [1] if plan.normalize else []
    for rows in stat_rows:
        shapes.append(jax.ShapeDtypeStruct(plan.per_key_shape(rows, heads=kv)[:2] + (groups,) + plan.per_key_shape(rows)[2:], jnp.float32))
        out_specs.append(per_key(rows))
    outs = plan.call(
        _key_gradient_kernel, (plan.batch, kv, plan.k_blocks), in_specs, tuple(shapes), tuple(out_specs)
    )(*arrays)
    stats = [jnp.reshape(x, plan.per_key_shape(rows)) for x, rows in zip(outs[2:], stat_rows)]
    return outs[0], outs[1], stats


def _query_gradients_call(plan, q, k, v, grad_out, lse, delta, normalizers, stats, mask):
    in_specs = [_row_spec(plan, plan.head_dim), _keys_spec(plan, plan.head_dim), _keys_spec(plan, plan.value_dim),
                _row_spec(plan, plan.value_dim), _row_spec(plan, 1), _row_spec(plan, 1)]
    arrays = [q, k, v, grad_out, lse, delta]
    if plan.normalize:
        for x in [normalizers] + stats[:2]:
            arrays.append(x)
            in_specs.append(_per_key_row_spec(plan, x.shape[2]))
    if mask is not None:
        arrays.append(mask)
        in_specs.append(plan.mask_spec())
    return plan.call(
        _query_gradient_kernel, (plan.batch, plan.heads, plan.q_blocks), in_specs,
        jax.ShapeDtypeStruct(q.shape, q.dtype), _row_spec(plan, plan.head_dim),
    )(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, mask, null_logits):
    return _forward(plan, q, k, v, mask, null_logits)[0]


def _attention_forward(plan, q, k, v, mask, null_logits):
    out, lse, normalizers = _forward(plan, q, k, v, mask, null_logits)
    return out, (q, k, v, mask, null_logits, out, lse, normalizers)


def _attention_backward(plan, residuals, grad_out):
    q, k, v, mask, null_logits, out, lse, normalizers = residuals
    delta = jnp.sum(grad_out * out, axis=-1, keepdims=True)
    key_grad, value_grad, stats = _key_gradients_call(plan, q, k, v, grad_out, lse, delta, normalizers, mask)
    query_grad = _query_gradients_call(plan, q, k, v, grad_out, lse, delta, normalizers, stats, mask)
    null_grad = None
    if null_logits is not None:
        null_grad = _null_logits_gradient(plan, null_logits, normalizers, stats)
    return query_grad, key_grad, value_grad, None, null_grad


def _null_logits_gradient(plan, null_logits, normalizers, stats):
    """`-sum over valid (i, j) of D[i, j] exp(beta - c[i, j])` per head: the
    null query is a query before all others, of score `beta` on every key."""
    null = _per_head(null_logits)
    if plan.carries:
        # c >= beta wherever a carry is not 0, and R is the smallest c.
        terms = stats[2] * jnp.exp(jnp.minimum(null - stats[3], 0.0))
    else:
        terms = stats[0] * jnp.exp(null - normalizers)
    return -jnp.sum(terms, axis=(0, 2, 3, 4)).astype(null_logits.dtype)


_attention.defvjp(_attention_forward, _attention_backward)


PLATFORMS = ("cpu", "gpu", "tpu")


def kernel_attention(
    query, key, value, mask=None, null_logits=None, *, normalize, causal, causal_mask, scale,
    platform, block_q=128, block_k=128,
):
    """Attention of `(B, T, N, H)` queries on `(B, S, K, H)` keys and
    `(B, S, K, Hv)` values (`N` a multiple of `K`: query head `n` reads
    key/value head `n // (N // K)`), on DNA's kernels.

    `normalize`: double normalization, causal where `causal`; else softmax.
    `mask` is `None` or boolean, broadcastable to `(B, N, T, S)`;
    `causal_mask` adds the causal rule (query `i` sees keys `j <= i`), and
    the kernels then skip the tiles above the diagonal. `null_logits`: one
    per query head, or `None`. `platform`, one of `PLATFORMS`, is where the
    kernels compile (`"cpu"`: Pallas's interpreter, exact and slow). Returns
    `(B, T, N, Hv)` in float32.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"Argument `platform` must be one of {PLATFORMS}. Received: platform={platform!r}")
    batch, q_len, heads, head_dim = query.shape
    k_len, kv_heads, value_dim = key.shape[1], key.shape[2], value.shape[3]
    if batch == 0 or q_len == 0 or k_len == 0:
        return jnp.zeros((batch, q_len, heads, value_dim), jnp.float32)
    # Triton loads power-of-two dimensions only: zeros added to the head
    # dimensions change no score, and the output's extra columns are dropped.
    def width(dim):
        return _power_of_two(dim) if platform == "gpu" else dim

    options = dict(
        shapes=((batch, heads, q_len, width(head_dim)), (kv_heads, k_len, width(value_dim))), causal=causal,
        causal_mask=causal_mask,
        normalize=normalize, scale=float(scale), block_q=block_q, block_k=block_k, platform=platform,
    )
    mask_dims = None
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
        mask_dims = (mask.shape[0], mask.shape[1], mask.shape[2] > 1)
    plan = _Plan(mask_dims=mask_dims, **options)
    if mask is not None:
        # The keys' axis always whole; the queries' only where the mask
        # varies along it.
        mask = jnp.broadcast_to(mask, mask.shape[:3] + (k_len,)).astype(jnp.int8)
        rows, keys = plan.mask_shape[2:]
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, rows - mask.shape[2]), (0, keys - k_len)))

    def heads_first(x, length):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, width(x.shape[3]) - x.shape[3])))

    out = _attention(
        plan, heads_first(query, plan.q_pad), heads_first(key, plan.k_pad), heads_first(value, plan.k_pad),
        mask, null_logits,
    )
    return jnp.swapaxes(out[:, :, :q_len, :value_dim], 1, 2)
