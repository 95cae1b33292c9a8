"""The public functions: from scores or projections to attention.

They check their arguments, combine the masks, move the working dtype and
the attention axes into place, and hand the math to `normalization`
(softmax, double), `causal` (causal double) and `blockwise` (`chunk_size`).
Hybrid attention mixes softmax and double normalization per head:
`sigmoid(mixing_logits[h]) * softmax + (1 - sigmoid(mixing_logits[h])) * double`.
"""

import math

import keras
from keras import ops

from keras_dna.ops.backend import differentiable_in_branch
from keras_dna.ops.backend import einsum
from keras_dna.ops.backend import result_dtype
from keras_dna.ops.backend import scaled
from keras_dna.ops.backend import torch_compiling
from keras_dna.ops.backend import unless_trusted
from keras_dna.ops.blockwise import chunked_attention
from keras_dna.ops.causal import causal_double_normalization
from keras_dna.ops.checks import check_broadcastable
from keras_dna.ops.checks import check_chunk_size
from keras_dna.ops.checks import check_flash_attention
from keras_dna.ops.checks import check_mask_values
from keras_dna.ops.checks import check_match
from keras_dna.ops.checks import check_normalization
from keras_dna.ops.checks import check_null_query_normalization
from keras_dna.ops.checks import check_per_head
from keras_dna.ops.checks import check_rank4
from keras_dna.ops.checks import checked_query_and_key
from keras_dna.ops.fused import fused_attention
from keras_dna.ops.implementation import check_implementation
from keras_dna.ops.implementation import implementation_for
from keras_dna.ops.implementation import platform
from keras_dna.ops.normalization import double_normalization
from keras_dna.ops.normalization import hybrid_mix
from keras_dna.ops.normalization import row_softmax
from keras_dna.ops.reference import reference_attention
from keras_dna.ops.numerics import working_dtype
from keras_dna.ops.symbolic import symbolic_inputs_allowed


def causal_mask(query_length, key_length):
    """`(query_length, key_length)` bool: query `i` sees keys `j <= i`.

    From two index ranges, not from cumulative sums of ones as
    `MultiHeadAttention` builds it: XLA constant-folds a mask whose shape is
    static, and folding those cumulative sums made the first call of a
    compiled causal layer at T=2048 many times slower
    (`benchmarks/results/compile/compile_time.md`).
    """
    query_index = ops.expand_dims(ops.arange(query_length), -1)
    key_index = ops.expand_dims(ops.arange(key_length), 0)
    return query_index >= key_index


@symbolic_inputs_allowed
def normalize_attention_scores(
    scores,
    mask=None,
    *,
    normalization="double",
    causal_normalization=False,
    mixing_logits=None,
    null_query_logits=None,
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
        null_query_logits: Optional, shape `(num_heads,)`: the log-mass
            `beta[h]` of a null query that joins every key's per-key sum,
            `c = logaddexp(c, beta[h])`, taking the share of keys that no
            query explains. Very negative values give double
            normalization, very large ones softmax; it lifts the causal
            ceiling (see the guide on decoders). Not for `"single"`.
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
    scores = ops.cast(scores, working_dtype(out_dtype))
    valid = None
    if mask is not None:
        check_mask_values("mask", mask)
        valid = ops.cast(mask, "bool")
        check_broadcastable("mask", valid.shape, scores.shape)
    heads = scores.shape[rank - 2 * num_attention_axes - 1]
    if mixing_logits is not None:
        mixing_logits = per_head("mixing_logits", mixing_logits, heads, scores.dtype)
    if null_query_logits is not None:
        check_null_query_normalization(normalization)
        null_query_logits = per_head("null_query_logits", null_query_logits, heads, scores.dtype)
    full_shape = ops.shape(scores)
    if num_attention_axes > 1:
        scores, valid = _flatten_attention_axes(scores, valid, num_attention_axes)
    weights = normalize_weights(
        scores, valid, normalization, causal_normalization, mixing_logits, null_query_logits
    )
    if num_attention_axes > 1:
        weights = ops.reshape(weights, full_shape)
    return ops.cast(weights, out_dtype)


def per_head(name, logits, heads, dtype):
    """`logits` checked to hold one value per head, shaped `(heads, 1, 1)`."""
    logits = ops.convert_to_tensor(logits)
    check_per_head(name, logits, heads)
    return ops.reshape(ops.cast(logits, dtype), (-1, 1, 1))


def _flatten_attention_axes(scores, valid, num_attention_axes):
    """Scores (and validity) with one query and one key axis.

    Joint normalization over several axes is normalization over their
    flattened product.
    """
    full_shape = ops.shape(scores)
    rank = len(full_shape)
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
    return scores, valid


def normalize_weights(scores, valid, normalization, causal, mixing_logits, null_logits):
    """Weights of `(..., num_heads, T, S)` unmasked scores.

    `mixing_logits` is `None` or shaped `(num_heads, 1, 1)`; `null_logits`
    `None` or broadcastable against the per-key normalizers, `(..., num_heads,
    1, S)`: one per head, or (causal only) one per key, as decoding's key
    state.
    """
    if normalization == "single":
        return row_softmax(scores, valid)[0]
    if causal:
        double = causal_double_normalization(scores, valid, null_logits)
    else:
        double = double_normalization(scores, valid, null_logits)
    return with_softmax_share(double, scores, valid, normalization, mixing_logits)


def with_softmax_share(double, scores, valid, normalization, mixing_logits):
    """The weights from the doubly-normalized ones: themselves for
    `"double"`, mixed with the softmax of `scores` per head for `"hybrid"`."""
    if normalization == "double":
        return double
    return hybrid_mix(row_softmax(scores, valid)[0], double, mixing_logits, heads_axis=-3)


def default_scale(query):
    """`1 / sqrt(head_dim)` of `(..., head_dim)` queries, as a Python float."""
    return 1.0 / math.sqrt(query.shape[-1])


@symbolic_inputs_allowed
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
    null_query_logits=None,
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
        null_query_logits: Optional, shape `(num_heads,)`; see
            `normalize_attention_scores`.

    Returns:
        Weights of shape `(batch, num_heads, query_length, key_length)`.
    """
    query, key = checked_query_and_key(query, key)
    if mask is not None:
        # Checked before the causal mask joins it as a bool.
        check_mask_values("mask", mask)
        mask = ops.cast(mask, "bool")
    if scale is None:
        scale = default_scale(query)
    scores = scaled(einsum("btnh,bsnh->bnts", query, key), scale)
    if is_causal:
        causal = causal_mask(ops.shape(query)[1], ops.shape(key)[1])
        mask = causal if mask is None else ops.logical_and(mask, causal)
    return normalize_attention_scores(
        scores,
        mask,
        normalization=normalization,
        causal_normalization=causal_normalization or is_causal,
        mixing_logits=mixing_logits,
        null_query_logits=null_query_logits,
    )


@symbolic_inputs_allowed
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
    null_query_logits=None,
    chunk_size=None,
    flash_attention=None,
    implementation=None,
):
    """Doubly-normalized attention, a counterpart of `keras.ops.dot_product_attention`.

    Args:
        query: Shape `(batch, query_length, num_heads, head_dim)`.
        key: Shape `(batch, key_length, num_heads, head_dim)`.
        value: Shape `(batch, key_length, num_heads, value_dim)`.
        mask: As in `doubly_normalized_attention_weights`.
        normalization: As in `doubly_normalized_attention_weights`.
        is_causal: As in `doubly_normalized_attention_weights`.
        causal_normalization: As in `doubly_normalized_attention_weights`.
        scale: As in `doubly_normalized_attention_weights`.
        mixing_logits: As in `doubly_normalized_attention_weights`.
        null_query_logits: As in `doubly_normalized_attention_weights`.
        chunk_size: Optional positive integer: compute the attention over
            blocks of this many queries, never holding the whole
            `(query_length, key_length)` score matrix. Memory then grows
            linearly with the sequence length; the gradient recomputes the
            scores block by block (about twice the work of the forward
            pass). Equal to the unchunked result up to float rounding.
            `"auto"`: blocks where the whole matrix would be large
            (`auto_chunk_size`), and on PyTorch blocks of 64 with
            `is_causal` (`keras_dna.ops.implementation`, rule 5).
        flash_attention: Whether to run on the backend's fused attention
            kernels (`keras.ops.dot_product_attention`), in memory linear in
            the lengths (`keras_dna.ops.fused`); non-causal only. `None`:
            where the backend has a fused kernel that takes DNA's per-key
            bias and is faster, unless `keras.config.disable_flash_attention()`
            was called; `True`: always, passing `flash_attention=True` on to
            the kernels, which then must be flash kernels (an error where
            they cannot be); `False`: never. Where the fused path's
            read-outs underflow (scores about a hundred apart in float32),
            the call takes the exact path instead, by blocks of queries
            where the lengths are large.
        implementation: `None` (chosen from the other arguments, the
            backend and the platform by
            `keras_dna.ops.implementation.implementation_for`), or one of
            `"whole"` (the whole weight matrix), `"blockwise"` (blocks of
            `chunk_size` queries, an integer), `"fused"` (fused kernels;
            `chunk_size` then gives the blocks of its exact fallback),
            `"kernel"` (DNA's own kernels, JAX only: compiled on GPUs and
            TPUs, interpreted on CPUs) and
            `"reference"` (the formulas of the math guide as they read,
            `keras_dna.ops.reference`, which the others are tested
            against), as `jax.nn.dot_product_attention` takes one.

    Returns:
        Shape `(batch, query_length, num_heads, value_dim)`.
    """
    check_chunk_size(chunk_size)
    check_flash_attention(flash_attention)
    check_normalization(normalization)
    if null_query_logits is not None:
        check_null_query_normalization(normalization)
    query, key = checked_query_and_key(query, key)
    value = ops.convert_to_tensor(value)
    check_rank4("value", value)
    for axis, what in ((0, "batch size"), (1, "length"), (2, "number of heads")):
        check_match(what, "key", key.shape[axis], "value", value.shape[axis])
    if mask is not None:
        check_mask_values("mask", mask)
        mask = ops.cast(mask, "bool")
        check_broadcastable("mask", mask.shape, _scores_shape(query, key))
    for name, logits in (("mixing_logits", mixing_logits), ("null_query_logits", null_query_logits)):
        if logits is not None:
            check_per_head(name, ops.convert_to_tensor(logits), query.shape[2])
    causal = bool(is_causal or causal_normalization)
    if scale is None:
        scale = default_scale(query)
    if implementation is None:
        implementation, chunk_size = implementation_for(
            query, key, normalization=normalization, causal=causal,
            flash_attention=flash_attention, chunk_size=chunk_size, causal_mask=bool(is_causal),
        )
    else:
        check_implementation(
            implementation, query, chunk_size=chunk_size, normalization=normalization,
            causal=causal, flash_attention=flash_attention,
        )
    options = dict(
        normalization=normalization, is_causal=is_causal,
        causal_normalization=causal_normalization, scale=scale,
        mixing_logits=mixing_logits, null_query_logits=null_query_logits,
    )
    if implementation == "reference":
        if is_causal:
            mask = _with_causal_mask(mask, query, key)
        output = reference_attention(
            query, key, value, mask, normalization=normalization, causal=causal, scale=scale,
            mixing_logits=mixing_logits, null_query_logits=null_query_logits,
        )
        return ops.cast(output, result_dtype(query.dtype, key.dtype))
    if implementation == "whole":
        return _whole_attention(query, key, value, mask, **options)
    if implementation == "blockwise":
        return _blockwise_attention(query, key, value, mask, chunk_size, **options)
    if implementation == "kernel":
        return _kernel_attention(query, key, value, mask, platform(query), **options)
    return _fused_attention(query, key, value, mask, chunk_size, flash_attention, **options)


def _scores_shape(query, key):
    """`(batch, num_heads, query_length, key_length)` of rank-4 projections."""
    return (query.shape[0], query.shape[2], query.shape[1], key.shape[1])


def _whole_attention(query, key, value, mask, **options):
    """Attention through the whole weight matrix."""
    weights = doubly_normalized_attention_weights(query, key, mask, **options)
    return einsum("bnts,bsnh->btnh", weights, ops.cast(value, weights.dtype))


def _blockwise_attention(query, key, value, mask, chunk_size, **options):
    """Attention over blocks of `chunk_size` queries."""
    dtype = working_dtype(query.dtype)
    heads = query.shape[2]
    mixing_logits, null_query_logits = options["mixing_logits"], options["null_query_logits"]
    if mixing_logits is not None:
        mixing_logits = per_head("mixing_logits", mixing_logits, heads, dtype)
    if null_query_logits is not None:
        null_query_logits = per_head("null_query_logits", null_query_logits, heads, dtype)
    return chunked_attention(
        query, key, value, _rank4(mask), normalization=options["normalization"],
        is_causal=options["is_causal"], causal_normalization=options["causal_normalization"],
        scale=options["scale"], mixing_logits=mixing_logits, null_query_logits=null_query_logits,
        chunk_size=chunk_size,
    )


def _kernel_attention(query, key, value, mask, target, *, normalization, is_causal, causal_normalization,
                      scale, mixing_logits, null_query_logits):
    """Attention on DNA's own kernels (`keras_dna.ops.pallas` on JAX,
    compiled for the `target` platform; `keras_dna.ops.triton_kernels` on
    PyTorch): the double normalization with the null query, softmax, or
    their mix."""
    options = dict(
        mask=_rank4(mask), causal=bool(is_causal or causal_normalization), causal_mask=bool(is_causal),
        scale=scale,
    )
    if keras.backend.backend() == "torch":
        from keras_dna.ops.triton_kernels import kernel_attention
    else:
        from keras_dna.ops.pallas import kernel_attention

        options["platform"] = target
    if null_query_logits is not None:
        null_query_logits = ops.reshape(ops.convert_to_tensor(null_query_logits), (-1,))
    output = None
    if normalization != "single":
        output = kernel_attention(query, key, value, null_logits=null_query_logits, normalize=True, **options)
    if normalization != "double":
        softmax = kernel_attention(query, key, value, normalize=False, **options)
        output = softmax if output is None else hybrid_mix(softmax, output, mixing_logits, heads_axis=-2)
    return ops.cast(output, result_dtype(query.dtype, key.dtype))


def _fused_attention(query, key, value, mask, chunk_size, flash_attention, **options):
    """Attention on fused kernels; where their read-outs underflow, the
    exact path: by blocks of `chunk_size` queries, or whole."""
    scale = options.pop("scale")
    mixing_logits, null_query_logits = options.pop("mixing_logits"), options.pop("null_query_logits")
    if options["is_causal"]:
        # Softmax with `is_causal` (the one causal call fused kernels run):
        # the kernels see the causal mask in the call's mask.
        mask = _with_causal_mask(mask, query, key)
    output, trusted = fused_attention(
        query, key, value, _rank4(mask), normalization=options["normalization"], scale=scale,
        mixing_logits=mixing_logits, null_query_logits=null_query_logits,
        flash_attention=flash_attention,
    )
    arrays = (query, key, value, mask, mixing_logits, null_query_logits)
    if torch_compiling() and isinstance(scale, (int, float)):
        # One operation of the compiled graph, which runs the exact path
        # eagerly only where the read-out underflowed: no graph break (at
        # each of the call's nested frames, Dynamo traced the whole fused
        # path again up to one: 66 s for a layer's first call, against 27 s
        # for `MultiHeadAttention`), and the costly exact path is never
        # traced nor compiled.
        arrays = tuple(None if x is None else ops.convert_to_tensor(x) for x in arrays)
        return _torch_exact_unless_trusted(
            trusted, output, *arrays, chunk_size, float(scale), options["normalization"],
            bool(options["is_causal"]), bool(options["causal_normalization"]),
        )
    exact = differentiable_in_branch(_exact_attention, chunk_size=chunk_size, scale=scale, **options)
    return unless_trusted(trusted, output, exact, *arrays)


def _exact_attention(query, key, value, mask, mixing_logits, null_query_logits, *, chunk_size, **options):
    """The fused path's fallback: blocks of `chunk_size` queries, or whole."""
    options.update(mixing_logits=mixing_logits, null_query_logits=null_query_logits)
    if chunk_size is None:
        return _whole_attention(query, key, value, mask, **options)
    return _blockwise_attention(query, key, value, mask, chunk_size, **options)


def _with_causal_mask(mask, query, key):
    """`mask` (or `None`) AND the causal mask of `query` and `key`."""
    causal = causal_mask(ops.shape(query)[1], ops.shape(key)[1])
    return causal if mask is None else ops.logical_and(mask, causal)


def _rank4(mask):
    """`mask` as booleans of rank 4, or `None`."""
    if mask is None:
        return None
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < 4:
        mask = ops.expand_dims(mask, 0)
    return mask


def _exact_gradients(upstream, trusted, *arrays_and_options):
    """The gradients of `_torch_exact_unless_trusted` in its output and in
    the differentiable arrays (query, key, value and the logits given):
    `upstream` and zeros where the read-out held, else zeros and the exact
    path's, recomputed."""
    import torch

    arrays, options = arrays_and_options[:6], arrays_and_options[6:]
    if bool(trusted):
        return [_contiguous_copy(upstream)] + [_contiguous_zeros(x) for x in _differentiable(arrays)]
    arrays = [None if x is None else x.detach() for x in arrays]
    inputs = _differentiable(arrays)
    with _recording_autograd(), torch.enable_grad():
        for x in inputs:
            x.requires_grad_(True)
        exact = _exact_call(arrays, options)
        grads = torch.autograd.grad(exact, inputs, upstream.to(exact.dtype), allow_unused=True)
    grads = [_contiguous_zeros(x) if g is None else g.to(x.dtype).contiguous() for x, g in zip(inputs, grads)]
    return [_contiguous_zeros(upstream)] + grads


def _differentiable(arrays):
    """The arrays of `_torch_exact_unless_trusted` that take a gradient:
    the floating ones but the mask."""
    return [x for i, x in enumerate(arrays) if i != 3 and x is not None and x.is_floating_point()]


# The custom operations return contiguous tensors, as their fake versions
# say (Inductor checks the strides).
def _contiguous_copy(x):
    import torch

    return x.clone(memory_format=torch.contiguous_format)


def _contiguous_zeros(x):
    import torch

    return torch.zeros(x.shape, dtype=x.dtype, device=x.device)


def _recording_autograd():
    """A context in which PyTorch records autograd again: a custom
    operation runs below autograd (its keys excluded from dispatch), and
    the exact path's gradient needs it. Private API (`torch._C`), checked by
    `tests/test_torch_compile.py`."""
    import torch

    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _exact_call(arrays, options):
    """`_exact_attention` of the custom operations' arguments."""
    chunk_size, scale, normalization, is_causal, causal_normalization = options
    return _exact_attention(
        *arrays, chunk_size=chunk_size, scale=scale, normalization=normalization,
        is_causal=is_causal, causal_normalization=causal_normalization,
    )


if keras.backend.backend() == "torch":
    import torch

    # Under `torch.compile`, the fused path's choice between its output and
    # the exact path, as one custom operation (Dynamo neither traces nor
    # splits the graph at it) with a custom operation as its gradient.
    # Eager calls keep `ops.cond`. Registered once per process.
    @torch.library.custom_op("keras_dna::exact_unless_trusted", mutates_args=())
    def _torch_exact_unless_trusted(
        trusted: torch.Tensor, output: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, mask: torch.Tensor | None, mixing_logits: torch.Tensor | None,
        null_query_logits: torch.Tensor | None, chunk_size: int | None, scale: float,
        normalization: str, is_causal: bool, causal_normalization: bool,
    ) -> torch.Tensor:
        if bool(trusted):
            return _contiguous_copy(output)
        arrays = (query, key, value, mask, mixing_logits, null_query_logits)
        options = (chunk_size, scale, normalization, is_causal, causal_normalization)
        with torch.no_grad():
            return _exact_call(arrays, options).to(output.dtype).contiguous()

    @_torch_exact_unless_trusted.register_fake
    def _(trusted, output, *arrays_and_options):
        return _contiguous_zeros(output)

    @torch.library.custom_op("keras_dna::exact_unless_trusted_backward", mutates_args=())
    def _torch_exact_gradients(
        upstream: torch.Tensor, trusted: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, mask: torch.Tensor | None, mixing_logits: torch.Tensor | None,
        null_query_logits: torch.Tensor | None, chunk_size: int | None, scale: float,
        normalization: str, is_causal: bool, causal_normalization: bool,
    ) -> list[torch.Tensor]:
        return _exact_gradients(
            upstream, trusted, query, key, value, mask, mixing_logits, null_query_logits,
            chunk_size, scale, normalization, is_causal, causal_normalization,
        )

    @_torch_exact_gradients.register_fake
    def _(upstream, trusted, *arrays_and_options):
        arrays = arrays_and_options[:6]
        return [_contiguous_zeros(upstream)] + [_contiguous_zeros(x) for x in _differentiable(arrays)]

    def _setup_context(ctx, inputs, output):
        # Not the fused output (index 1): the gradient needs none of it.
        tensors = [None if i == 1 else x for i, x in enumerate(inputs[:8])]
        ctx.save_for_backward(*(x for x in tensors if x is not None))
        ctx.given = [x is not None for x in tensors]
        ctx.differentiable = [x is not None and x.is_floating_point() and i != 3
                              for i, x in enumerate(inputs[2:8])]
        ctx.options = inputs[8:]

    def _backward(ctx, upstream):
        saved = iter(ctx.saved_tensors)
        tensors = [next(saved) if given else None for given in ctx.given]
        trusted, _, *arrays = tensors
        grads = iter(_torch_exact_gradients(upstream, trusted, *arrays, *ctx.options))
        output_grad = next(grads)
        array_grads = [next(grads) if d else None for d in ctx.differentiable]
        return (None, output_grad, *array_grads) + (None,) * len(ctx.options)

    _torch_exact_unless_trusted.register_autograd(_backward, setup_context=_setup_context)
