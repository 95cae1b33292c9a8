"""Non-causal double normalization on fused softmax-attention kernels.

Built from `keras.ops.dot_product_attention` calls (PyTorch's
`scaled_dot_product_attention`, cuDNN, flash and splash kernels) and work
linear in the lengths: no score-sized tensor is written, forward or backward,
beyond the caller's own mask. One head, scores `s[i, j]`, validity `m[i, j]`:

- forward, step 1 (`read_out_key_logsumexp`): each key's log-sum-exp over the queries,
  `c0[j]`, read out of an attention with keys and queries swapped, plus one
  reference key whose score `b[j]` is known (the mean valid query's):
  `c0[j] = b[j] + log(out_real[j] / out_ref[j])`. With a null query,
  `c = logaddexp(c0, beta)`.
- forward, step 2: softmax attention with the per-key bias `-c[j]`, its
  values given one more channel of zeros.
- backward: step 2's own kernel backward, `c` held constant, whose gradient
  in that channel completes the gradient in `c` (`_with_normalizer_channel`);
  then step 1's in two fused calls (`_key_normalizer`).

The reference keys of the gradient calls are exact by construction (their
weight is `1 / (1 + x)` with `x` at most the length, at any score offset).
The forward read-out is not: far apart scores can underflow a channel
(float32: a key's best query above the mean query by about 87; float16,
the read-out's dtype on accelerators, about 7). The call returns whether
its read-out can be trusted, and the caller then takes the exact path, as
the fast causal path does. The algebra is written out in
`docs/algorithms.md`, "Fused path".
"""

import keras
from keras import ops

from keras_dna.ops.backend import half_precision_kernels_only
from keras_dna.ops.backend import kernel_flash_attention
from keras_dna.ops.backend import pad_last_axis
from keras_dna.ops.backend import records_gradients
from keras_dna.ops.backend import scaled
from keras_dna.ops.checks import check_broadcastable
from keras_dna.ops.checks import check_per_head
from keras_dna.ops.normalization import hybrid_mix
from keras_dna.ops.numerics import logaddexp
from keras_dna.ops.numerics import smallest_normal
from keras_dna.ops.numerics import working_dtype


def fused_attention(
    query, key, value, mask, *, normalization, scale, mixing_logits=None,
    null_query_logits=None, flash_attention=None,
):
    """Non-causal attention of any normalization on fused kernels.

    Args:
        query: `(batch, query_length, num_heads, head_dim)`.
        key: `(batch, key_length, num_heads, head_dim)`.
        value: `(batch, key_length, num_heads, value_dim)`.
        mask: `None` or a rank-4 boolean tensor broadcastable to
            `(batch, num_heads, query_length, key_length)`.
        normalization: `"double"`, `"single"` or `"hybrid"`.
        scale: Multiplies the dot products.
        mixing_logits: For `"hybrid"`, `(num_heads,)` or `None` (equal mix).
        null_query_logits: `(num_heads,)` or `None`.
        flash_attention: Passed to every `keras.ops.dot_product_attention`.

    Returns:
        `(output, trusted)`: the output in the query's dtype, and a boolean
        scalar, `False` where a read-out underflowed and the exact path
        must replace the output.
    """
    heads = query.shape[2]
    if mask is not None:
        check_broadcastable(
            "mask", mask.shape, (query.shape[0], heads, query.shape[1], key.shape[1]), min_rank=4
        )
    for name, logits in (("mixing_logits", mixing_logits), ("null_query_logits", null_query_logits)):
        if logits is not None:
            check_per_head(name, logits, heads)
    attend = _Attend(
        scaled(query, scale), ops.cast(key, query.dtype),
        None if mask is None else ops.cast(mask, "bool"), flash_attention,
    )
    if normalization == "single":
        return attend.softmax(value), ops.convert_to_tensor(True)
    double, trusted = _double(attend, value, null_query_logits)
    if normalization == "hybrid":
        double = hybrid_mix(attend.softmax(value), double, mixing_logits, heads_axis=-2)
    return ops.cast(double, query.dtype), trusted


class _Attend:
    """One call's scaled queries, keys and mask, and the fused calls made of
    them.

    The kernels run with scale 1 and take one additive bias, no separate
    mask. Reference keys and marker channels ride along in extra rows and
    channels, all three head dimensions kept equal and a multiple of 8:
    kernels leave their fast path otherwise (on a CPU, a value width unequal
    to the key width left PyTorch's fast kernel, `docs/algorithms.md`).
    """

    def __init__(self, query, key, valid, flash_attention):
        self.dtype = query.dtype
        self.work_dtype = working_dtype(query.dtype)
        # The per-key read-out in float32 (its two channels rounded to
        # bfloat16 put 0.007 on c, above the softmax kernel's own error),
        # where a float32 call stays on a fused kernel.
        fused_in_float32 = not flash_attention and not half_precision_kernels_only()
        self.read_out_dtype = self.work_dtype if fused_in_float32 else self.dtype
        self.heads = query.shape[2]
        self.flash_attention = flash_attention
        self.valid = valid
        self.negative = _large_negative(query.dtype)
        if valid is None:
            self.row_valid = self.key_valid = self.valid_keys = None
            self.query, self.key = query, key
            return
        # (b, n, T) and (b, n, S), the batch and heads possibly 1.
        self.row_valid = ops.any(valid, axis=-1)
        self.key_valid = ops.any(valid, axis=-2)
        # (b, S, n): laid out as the per-key normalizers.
        self.valid_keys = _per_position(self.key_valid)[..., 0]
        # A NaN in a query or key that nothing sees would still reach every
        # output: the kernels add the masked scores' bias to it, and the
        # mean query sums every query.
        self.query = self.zero_invalid_rows(query)
        self.key = self.zero_invalid_keys(key)

    def call(self, query, key, value, key_bias=None, transposed=False, reference=False):
        """`softmax(query key^T + bias) value`, all in `(B, L, N, W)`.

        The bias is `key_bias` (`(B, columns, N)`, or `None` for 0) where
        the mask (`transposed`: keys as rows) lets a row see a column,
        large negative elsewhere. With `reference`, `key` has one last row
        more, seen by every row.
        """
        valid = self.valid
        if valid is not None and transposed:
            valid = ops.transpose(valid, (0, 1, 3, 2))
        if valid is not None and valid.shape[-1] == 1:
            # A mask of whole rows: their outputs are replaced, and keeping
            # it would write a bias of every row and column.
            valid = None
        if valid is not None and reference:
            valid = ops.concatenate([valid, ops.ones_like(valid[..., :1])], axis=-1)
        if key_bias is not None and _shared_by_heads(valid, self.heads):
            # Combined with a mask of rows and columns shared by the heads,
            # a per-head bias would write a float of every head, row and
            # column (a padded batch's masks, (B, 1, T, S)); folded into one
            # more channel, `q' = [q, 1]`, `k' = [k, bias]`, it writes
            # nothing score-sized.
            query = ops.concatenate([query, ops.ones_like(query[..., :1])], axis=-1)
            key = ops.concatenate([key, ops.expand_dims(ops.cast(key_bias, key.dtype), -1)], axis=-1)
            key_bias = None
        bias = None if key_bias is None else _as_key_bias(key_bias, query.dtype)
        if valid is not None:
            bias = ops.cast(ops.where(valid, 0.0 if bias is None else bias, self.negative), query.dtype)
        value_width = value.shape[-1]
        width = _width(query.shape[-1], key.shape[-1], value_width)
        query, key, value = (_padded(x, width) for x in (query, key, value))
        output = ops.dot_product_attention(
            query, key, value, bias=bias, scale=1.0,
            flash_attention=kernel_flash_attention(self.flash_attention),
        )
        return output[..., :value_width]

    def softmax(self, value):
        """Softmax attention (what `MultiHeadAttention` computes)."""
        return self.zero_invalid_rows(self.call(self.query, self.key, self.values(value)))

    def values(self, value):
        """`value` in the kernels' dtype, zero where no query sees its key."""
        return self.zero_invalid_keys(ops.cast(value, self.dtype))

    def zero_invalid_rows(self, output):
        """`output` with zeros for the queries that see no key."""
        if self.row_valid is None:
            return output
        return ops.where(_per_position(self.row_valid), output, 0.0)

    def zero_invalid_keys(self, per_key):
        """`(B, S, N, W)` with zeros for the keys no query sees."""
        if self.key_valid is None:
            return per_key
        return ops.where(_per_position(self.key_valid), per_key, 0.0)


def _double(attend, value, null_query_logits):
    """Doubly-normalized attention and whether its read-out holds."""
    key_lse, trusted = read_out_key_logsumexp(attend)
    # Keys no query sees have c0 = -inf, and a read-out that underflowed
    # gives +-inf: any finite c keeps the former out, and keeps the latter's
    # output finite, and so its gradient, which reaches the inputs (as zeros)
    # even where the caller's fallback replaces the output.
    usable = ops.isfinite(key_lse)
    if attend.valid_keys is not None:
        usable = ops.logical_and(usable, attend.valid_keys)
    key_lse = ops.where(usable, key_lse, 0.0)
    beta = None
    if null_query_logits is not None:
        beta = ops.reshape(ops.cast(null_query_logits, attend.work_dtype), (1, 1, -1))
    key_normalizer = _key_normalizer(attend, key_lse, beta)
    # Shifted by their mean over the keys, which no softmax over keys sees,
    # the biases are small: in bfloat16, c itself rounded 4x worse than the
    # softmax kernel's own error.
    constant = ops.stop_gradient(key_normalizer)
    shifted = constant - _mean_over_valid_keys(attend, constant)
    value = attend.values(value)
    if not records_gradients(attend.query, attend.key, value):
        # Without a gradient, the values need no channel more (which widens
        # every operand of the kernel to the next multiple of 8).
        output = attend.call(attend.query, attend.key, value, -shifted)
        return attend.zero_invalid_rows(output), trusted
    values = _with_normalizer_channel(value, key_normalizer)
    output = attend.call(attend.query, attend.key, values, -shifted)
    return attend.zero_invalid_rows(_without_last_channel(output)), trusted


def _with_normalizer_channel(value, key_normalizer):
    """`value` and a channel of zeros, through which step 2's gradient in
    `c` reaches `c`.

    Step 2's kernel, its bias `-c` held constant, returns the gradient of its
    values: `dv[j] = sum_i A[i, j] dO[i]` and, in the extra channel, whose
    upstream `_without_last_channel` sets to `D[i] = <dO[i], O[i]>`,
    `sum_i A[i, j] D[i]`. Step 2's gradient in `c` is
    `dc[j] = -sum_i A[i, j] (<dO[i], v[j]> - D[i]) = -<v[j], dv[j]> +
    sum_i A[i, j] D[i]`: the kernel's own backward, no call more.
    """

    @ops.custom_gradient
    def attach(value, key_normalizer):
        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            value_grad = upstream[..., :-1]
            dot = ops.sum(ops.cast(value * value_grad, key_normalizer.dtype), axis=-1)
            normalizer_grad = ops.cast(upstream[..., -1], key_normalizer.dtype) - dot
            return value_grad, normalizer_grad

        return ops.concatenate([value, ops.zeros_like(value[..., :1])], axis=-1), grad

    return attach(value, key_normalizer)


def _without_last_channel(output):
    """`output` less its last channel, whose upstream gradient becomes
    `<dO[i], O[i]>` (see `_with_normalizer_channel`)."""

    @ops.custom_gradient
    def drop(output):
        kept = output[..., :-1]

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            dtype = working_dtype(upstream.dtype)
            dot = ops.sum(ops.cast(upstream, dtype) * ops.cast(kept, dtype), axis=-1, keepdims=True)
            return ops.concatenate([upstream, ops.cast(dot, upstream.dtype)], axis=-1)

        return kept, grad

    return drop(output)


def _mean_over_valid_keys(attend, per_key):
    """`(B, 1, N)`: the mean of `(B, S, N)` over each head's valid keys."""
    weights = ops.ones_like(per_key)
    if attend.valid_keys is not None:
        weights = weights * ops.cast(attend.valid_keys, per_key.dtype)
    count = ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1.0)
    return ops.sum(weights * per_key, axis=1, keepdims=True) / count


def read_out_key_logsumexp(attend):
    """`c0[j]`, `(B, S, N)` float32: key `j`'s log-sum-exp over its queries.

    Read out of one fused call with the keys as queries, the queries as
    keys and the mean valid query as a reference key; see the module
    docstring. Also returns whether every read-out is exact enough.
    """
    query, key = (ops.cast(ops.stop_gradient(x), attend.read_out_dtype) for x in (attend.query, attend.key))
    weights = ops.ones_like(query[..., :1])
    if attend.row_valid is not None:
        weights = weights * ops.cast(_per_position(attend.row_valid), query.dtype)
    count = ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1.0)
    mean_query = ops.sum(weights * query, axis=1, keepdims=True) / count
    keys = ops.concatenate([query, mean_query], axis=1)
    output = attend.call(key, keys, _with_reference(ops.ones_like(weights)), transposed=True, reference=True)
    real, reference = output[..., 0], output[..., 1]
    trusted = _above_floor((real, reference), attend.key_valid, smallest_normal(output))
    # The kernel's score of the reference key, as it sums it: from the
    # rounded operands, in float32. Summed in float16, it put 0.04 on c.
    reference_score = ops.sum(
        ops.cast(key, attend.work_dtype) * ops.cast(mean_query, attend.work_dtype), axis=-1
    )
    real, reference = (ops.cast(x, attend.work_dtype) for x in (real, reference))
    return reference_score + ops.log(real) - ops.log(reference), trusted


def _key_normalizer(attend, key_lse, beta):
    """`c = logaddexp(c0, beta)` (or `c0` where `beta` is `None`) as a
    function of the scaled queries, the keys and beta, with the gradient
    through step 1 in two fused calls: `dk[j] = dc[j] exp(c0[j] - c[j])
    sum_i softmax over i of s[i, j] q[i]` and `dq[i] = sum_j B[i, j] dc[j]
    k[j]`.

    The mask and `c0` enter as arguments, not from the enclosing scope:
    JAX cannot differentiate a `jax.jit`-compiled call whose custom gradient
    closes over values traced by the compilation ("No constant handler").
    """
    masked = attend.valid is not None

    @ops.custom_gradient
    def normalizer(query, key, key_lse, *optional):
        inner = _Attend(query, key, optional[0] if masked else None, attend.flash_attention)
        null = optional[-1] if beta is not None else None
        normalizer = key_lse if null is None else logaddexp(key_lse, null)

        def where_valid(x):
            return x if inner.valid_keys is None else ops.where(inner.valid_keys, x, 0.0)

        def grad(*args, upstream=None):
            upstream = where_valid(args[0] if upstream is None else upstream)
            share = 1.0 if null is None else where_valid(ops.exp(key_lse - normalizer))
            mean_query = inner.call(key, query, query, transposed=True)
            key_grad = ops.expand_dims(upstream * share, -1) * ops.cast(mean_query, inner.work_dtype)
            query_grad = _weighted_keys(inner, query, key, normalizer, upstream)
            grads = (ops.cast(query_grad, query.dtype), ops.cast(key_grad, key.dtype), None)
            grads += (None,) if masked else ()
            if null is None:
                return grads
            null_share = where_valid(ops.exp(null - normalizer))
            return grads + (ops.sum(upstream * null_share, axis=(0, 1), keepdims=True),)

        return normalizer, grad

    optional = ([attend.valid] if masked else []) + ([] if beta is None else [beta])
    return normalizer(attend.query, attend.key, key_lse, *optional)


def _weighted_keys(attend, query, key, key_normalizer, upstream):
    """`sum_j B[i, j] dc[j] k[j]`, `B = m exp(s - c)`, read out against a
    reference key whose score is the mean `c`, rounded to the kernels'
    dtype so that it cancels exactly: each key's bias is `c`'s distance
    from it, small, and every score is below the reference's (`s <= c`),
    so its weight is at least `1 / (1 + S)` at any score offset."""
    shift = _mean_over_valid_keys(attend, key_normalizer)
    shift = ops.cast(ops.cast(shift, attend.dtype), shift.dtype)
    width = key.shape[-1]
    output = attend.call(
        query,
        _with_zero_row(key),
        _with_reference(ops.expand_dims(ops.cast(upstream, key.dtype), -1) * key),
        ops.concatenate([shift - key_normalizer, shift], axis=1),
        reference=True,
    )
    output = ops.cast(output, attend.work_dtype)
    # The reference's weight is positive wherever `c` is exact; where a
    # read-out underflowed (the caller's fallback then replaces the output),
    # 0 / 0 would send NaN into the inputs' gradients.
    reference = output[..., width : width + 1]
    positive = reference > 0
    weighted = ops.where(positive, output[..., :width] / ops.where(positive, reference, 1.0), 0.0)
    return attend.zero_invalid_rows(weighted)


def _with_reference(rows):
    """`(B, L, N, W)` -> `(B, L + 1, N, W + 1)`: a channel of zeros, and a
    reference row of zeros but for a 1 in that channel."""
    width = rows.shape[-1] + 1
    rows = pad_last_axis(rows, 1)
    marker = ops.cast(ops.arange(width) == width - 1, rows.dtype)
    return ops.concatenate([rows, ops.zeros_like(rows[:, :1]) + marker], axis=1)


def _with_zero_row(keys):
    """`keys` and a reference key of zeros: its score is 0."""
    return ops.concatenate([keys, ops.zeros_like(keys[:, :1])], axis=1)


def _as_key_bias(per_key, dtype):
    """`(B, S, N)` -> `(B, N, 1, S)` in the kernels' dtype."""
    return ops.cast(ops.expand_dims(ops.transpose(per_key, (0, 2, 1)), 2), dtype)


def _per_position(per_head_positions):
    """`(b, n, L)` -> `(b, L, n, 1)`, to broadcast against `(B, L, N, W)`."""
    return ops.expand_dims(ops.transpose(per_head_positions, (0, 2, 1)), -1)


def _above_floor(read_outs, position_valid, floor):
    """Whether every read-out is at least `floor` wherever its position is
    valid."""
    trusted = ops.convert_to_tensor(True)
    for read_out in read_outs:
        if position_valid is not None:
            read_out = ops.where(_per_position(position_valid)[..., 0], read_out, 1.0)
        trusted = ops.logical_and(trusted, ops.all(read_out >= floor))
    return trusted


def _shared_by_heads(valid, heads):
    """Whether `valid` masks rows and columns alike for several heads."""
    return valid is not None and valid.shape[1] == 1 and valid.shape[2] != 1 and heads != 1


def _width(*widths):
    """The common head dimension: the widest, rounded up to a multiple of 8."""
    return -(-max(widths) // 8) * 8


def _padded(x, width):
    extra = width - x.shape[-1]
    if extra == 0:
        return x
    return pad_last_axis(x, extra)


def _large_negative(dtype):
    """The masked entries' bias: finite, so that no `inf - inf` appears."""
    largest = 65504.0 if keras.backend.standardize_dtype(dtype) == "float16" else 3.4e38
    return -0.7 * largest
