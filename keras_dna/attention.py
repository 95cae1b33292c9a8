"""The `DoublyNormalizedAttention` layer."""

import inspect

import keras
from keras import ops

# Keras's own mask accessors (not exported); `MultiHeadAttention` uses them.
from keras.src.backend import get_keras_mask
from keras.src.backend import set_keras_mask

from keras_dna.ops import auto_chunk_size
from keras_dna.ops import causal_mask
from keras_dna.ops import doubly_normalized_attention
from keras_dna.ops import normalize_attention_scores
from keras_dna.ops.backend import compiled
from keras_dna.ops.backend import einsum
from keras_dna.ops.backend import uses_fused_kernels
from keras_dna.ops.checks import check_broadcastable
from keras_dna.ops.checks import check_chunk_size
from keras_dna.ops.checks import check_flash_attention
from keras_dna.ops.checks import check_mask_values
from keras_dna.ops.checks import check_match
from keras_dna.ops.checks import check_normalization
from keras_dna.ops.checks import check_null_query_normalization
from keras_dna.ops.checks import same_static_shape


# The null query's initial log-mass: the best of -2, 0, 2 and 4 on the
# grapheme-to-phoneme example (benchmarks/null_query_init.py). With scores of
# order 1 over tens of queries, it starts each key about halfway between
# double normalization and softmax.
NULL_QUERY_INIT = 4.0


class CausalNormalizationMask:
    """An `attention_mask` for one call that also normalizes causally.

    For a caller that builds its own causal mask per call (keras-hub's
    `TransformerDecoder` with `use_causal_mask=True`) and so cannot pass
    `use_causal_mask=True`: the first step of that call then sums over the
    current and earlier queries only. The decision travels with the call's
    own argument, so concurrent calls of one layer never see each other's.

    Args:
        mask: The boolean attention mask, as the layer's `attention_mask`.
    """

    __slots__ = ("mask",)

    def __init__(self, mask):
        self.mask = mask


def unwrap_attention_mask(attention_mask):
    """`(mask, causal)`: the mask of a `CausalNormalizationMask` and `True`,
    or `attention_mask` as it is and `False`."""
    if isinstance(attention_mask, CausalNormalizationMask):
        return attention_mask.mask, True
    return attention_mask, False


def _logical_and(first, second):
    """`first AND second` as booleans, either of them possibly `None`."""
    if first is None or second is None:
        return second if first is None else first
    return ops.logical_and(ops.cast(first, "bool"), ops.cast(second, "bool"))


def without_keras_mask(tensor):
    """`tensor`, or a new tensor of the same values without its Keras mask.

    The projections do not take masks and would warn that they drop one.
    `MultiHeadAttention` deletes the mask of the caller's tensor instead,
    which a concurrent call with the same tensor would then miss.
    """
    if get_keras_mask(tensor) is None:
        return tensor
    # A reshape to the same shape gives JAX's own array back, mask and all.
    return ops.multiply(tensor, 1)


def _projected(dense, x, leading_axes=None):
    """`dense(x)`, with the leading axes of `x` (all but the last, or the
    first `leading_axes`) kept where one of them is empty.

    Keras's TensorFlow einsum reshapes the batch axis with -1 for these
    equations: with an empty sequence of known length, `(0, 0, dim)` became
    `(1, 0, dim)` (in `MultiHeadAttention` too).
    """
    projected = dense(x)
    leading_axes = len(x.shape) - 1 if leading_axes is None else leading_axes
    if 0 not in x.shape[1:leading_axes]:
        return projected
    shape = tuple(ops.shape(x)[:leading_axes]) + tuple(projected.shape[leading_axes:])
    return ops.reshape(projected, shape)


def _takes_argument(method, name):
    """Whether `method` takes the keyword argument `name`."""
    parameters = inspect.signature(method).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def _flash_attention_setting(flash_attention, dropout):
    """The layer's `flash_attention`: the argument, or the global setting
    (`keras.config.disable_flash_attention()`) where it is `None`."""
    if flash_attention is not None and not isinstance(flash_attention, bool):
        raise TypeError(
            "Argument `flash_attention` must be None, True or False. "
            f"Received: flash_attention={flash_attention!r}"
        )
    if flash_attention is None:
        flash_attention = keras.config.is_flash_attention_enabled()
    if flash_attention and dropout > 0.0:
        # MultiHeadAttention's message.
        raise ValueError(
            "Dropout is not supported when flash attention is enabled. "
            "Please set dropout to 0.0 to use flash attention."
        )
    return flash_attention


def _check_options(
    normalization, jit_compile, chunk_size, dropout, causal_normalization, null_query
):
    """Raises on the arguments `MultiHeadAttention` does not have."""
    check_normalization(normalization)
    if jit_compile not in ("auto", True, False):
        raise ValueError(
            "Argument `jit_compile` must be 'auto', True or False. "
            f"Received: jit_compile={jit_compile!r}"
        )
    check_chunk_size(chunk_size)
    if isinstance(chunk_size, int) and dropout:
        raise ValueError(
            "Dropout on the attention weights needs the whole weight "
            "matrix, which `chunk_size` never holds. Pass dropout=0 or "
            f"chunk_size=None. Received: dropout={dropout!r}, "
            f"chunk_size={chunk_size!r}"
        )
    for name, flag in (("causal_normalization", causal_normalization), ("null_query", null_query)):
        if not isinstance(flag, bool):
            raise TypeError(f"Argument `{name}` must be a bool. Received: {name}={flag!r}")
    if null_query:
        check_null_query_normalization(normalization)


def _check_ranks(query_shape, value_shape):
    """Raises unless query and value are `(batch, ..., features)` of one rank.

    (`MultiHeadAttention` checks that key and value agree.)"""
    rank = len(query_shape)
    if rank < 3:
        raise ValueError(
            "Argument `query` must have rank 3 or more: (batch, sequence, "
            f"features), or several sequence axes. Received: query.shape={tuple(query_shape)}"
        )
    if len(value_shape) != rank:
        raise ValueError(
            f"Argument `value` must have the rank of `query` ({rank}). "
            f"Received: value.shape={tuple(value_shape)}, query.shape={tuple(query_shape)}"
        )


def _check_attention_axes(attention_axes, rank):
    """Raises unless `attention_axes` are distinct axes of a rank-`rank`
    query other than its batch (first) and feature (last) axes."""
    if attention_axes is None:
        return
    allowed = tuple(range(1, rank - 1))
    # MultiHeadAttention counts a negative axis from the last but one.
    resolved = [axis + rank if isinstance(axis, int) and axis < 0 else axis for axis in attention_axes]
    if any(a not in allowed or isinstance(a, bool) for a in resolved) or len(set(resolved)) != len(
        resolved
    ):
        raise ValueError(
            "Argument `attention_axes` must hold distinct axes of `query` other "
            f"than the batch and feature axes: for rank {rank}, from 1 to "
            f"{rank - 2} (or -{rank - 1} to -2). Received: attention_axes={attention_axes}"
        )


@keras.saving.register_keras_serializable(package="keras_dna")
class DoublyNormalizedAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention that does not explain away its inputs.

    A drop-in replacement for `keras.layers.MultiHeadAttention`: the same
    constructor and call arguments, the same weights (so
    `dna.set_weights(mha.get_weights())` works) and the same masks. Only the
    normalization of the attention scores differs. Softmax normalizes each
    query's scores over the keys, so a key that no query favours can receive
    almost no attention at all ("explaining away"). Doubly-normalized
    attention (Ding et al., 2020, "Attention that does not Explain Away")
    first normalizes each key's scores over the queries, then each query's
    over the keys; every valid key then receives a total attention of at
    least `1 / (number of keys a query can see)`.

    Masks (Keras masks of the inputs, `query_mask`, `value_mask`, `key_mask`,
    `attention_mask`, `use_causal_mask`, `sliding_window`) exclude pairs from
    both normalization steps, and padded queries do not influence other
    queries.

    Causality: the first step sums over queries, so with only a causal mask
    a query's weights would depend on later queries. `use_causal_mask=True`
    therefore always normalizes causally (over the current and earlier
    queries). A decoder that instead passes its own causal
    `attention_mask` (as keras-hub's `TransformerDecoder` does), and decoder
    cross-attention, whose keys come from the encoder but whose queries are
    generated one at a time, must set `causal_normalization=True` (or pass
    the mask of a causal call as `CausalNormalizationMask(mask)`), or the
    future leaks into the past through the first step.

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each attention head for query and key.
        value_dim: Size of each attention head for value; defaults to
            `key_dim`.
        dropout: Dropout rate on the attention weights.
        use_bias: Whether the projections have biases.
        output_shape: Shape of the output besides the batch and sequence
            axes; defaults to the query's last dimension.
        attention_axes: Axes over which attention is applied; defaults to all
            axes but batch, heads and features. With several axes, the
            queries are normalized over all query axes jointly, then the keys
            over all key axes.
        sliding_window: Optional positive integer: query `i` only attends to
            keys within `sliding_window - 1` positions of it.
        flash_attention: As in `MultiHeadAttention`: `None` runs
            non-causal calls on the backend's fused attention kernels where
            they are faster (PyTorch; JAX on GPUs and TPUs in half
            precision), in memory linear in the lengths
            (`keras_dna.ops.fused`); `True` requires flash kernels (an error
            for causal normalization, dropout or returned scores, and where
            the backend has none); `False` never uses fused kernels. `None`
            follows `keras.config.disable_flash_attention()`.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint,
        bias_constraint: As in `keras.layers.MultiHeadAttention`.
        use_gate: Whether to gate the attention output with a sigmoid
            projection of the query.
        seed: Optional integer seed for dropout.
        normalization: `"double"` (default), `"single"` (softmax, exactly
            `MultiHeadAttention`) or `"hybrid"` (per head,
            `sigmoid(alpha) * softmax + (1 - sigmoid(alpha)) * double`, with
            a trainable `alpha` per head starting at 0).
        causal_normalization: Normalize the first step over the current and
            earlier queries only. Always on when called with
            `use_causal_mask=True`.
        jit_compile: Whether the normalization runs as an XLA-compiled
            function on the TensorFlow and JAX backends, also when the model
            around it is not compiled (Keras does not compile `fit` on CPUs
            or under most distribution strategies). `"auto"` (default)
            compiles on those backends; inside an XLA-compiled model it
            makes no difference. PyTorch runs it uncompiled.
        chunk_size: `"auto"` (default), `None` or a positive integer:
            compute the attention over blocks of this many queries, so that
            memory grows linearly with the sequence length instead of
            holding the whole score matrix (see
            `keras_dna.ops.doubly_normalized_attention`). An integer needs a
            single attention axis, no dropout, and cannot return the
            attention weights. `"auto"` takes blocks of 512
            (`keras_dna.ops.auto_chunk_size`) where the scores would take 4
            GiB, when those conditions hold and the lengths are known, and
            the whole matrix otherwise; `None` always the whole matrix.
        null_query: Whether a null query joins every key's first
            (per-key) normalization step: a trainable log-mass `beta` per
            head (the weight `null_query_logits`), a background component
            that takes the share of keys no query explains. Very negative
            `beta` is double normalization, very large `beta` softmax. It
            lifts the causal ceiling: without it, causal normalization
            gives each query at least as much weight on itself as on any
            earlier key, and the first query of causal cross-attention
            attends uniformly. For `"double"` and `"hybrid"` only.
        null_query_initializer: Initializer of `null_query_logits`;
            defaults to the constant `NULL_QUERY_INIT` (4.0), chosen on the
            grapheme-to-phoneme example from -2, 0, 2 and 4 (see the README,
            "When does DNA pay?").
        **kwargs: Base layer arguments, such as `name` and `dtype`.

    Call arguments:
        query: Query tensor of shape `(B, T, dim)`.
        value: Value tensor of shape `(B, S, dim)`.
        key: Optional key tensor of shape `(B, S, dim)`; defaults to `value`.
        query_mask: Optional boolean tensor of shape `(B, T)`; `False` marks
            padded queries. Combined with the Keras mask of `query`.
        value_mask: Optional boolean tensor of shape `(B, S)`.
        key_mask: Optional boolean tensor of shape `(B, S)`.
        attention_mask: Optional boolean tensor of shape `(B, T, S)` (or
            broadcastable to it, e.g. `(B, 1, S)` or `(T, S)`), or per head
            `(B, num_heads, T, S)` (or broadcastable to it); `True`
            attends. Masks are boolean: a float mask may hold only 0 and
            1 (checked when its values are known, in eager calls), as an
            additive mask (0 keeps, -1e9 drops) would be cast the wrong
            way round; pass `additive_mask == 0` instead. A
            `CausalNormalizationMask` holds such a mask and also normalizes
            this call causally.
        return_attention_scores: If `True`, also return the normalized
            attention weights, shaped `(B, num_heads, T, S)`.
        training: Whether dropout is active.
        use_causal_mask: Whether query `i` only attends to keys `j <= i`;
            implies causal normalization.

    Returns:
        attention_output: Shape `(B, T, E)`, where `E` is the query's last
            dimension unless `output_shape` is given.
        attention_scores: (Optional) the attention weights.
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        sliding_window=None,
        flash_attention=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        use_gate=False,
        seed=None,
        normalization="double",
        causal_normalization=False,
        jit_compile="auto",
        chunk_size="auto",
        null_query=False,
        null_query_initializer=None,
        **kwargs,
    ):
        flash_setting = _flash_attention_setting(flash_attention, dropout)
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            value_dim=value_dim,
            # Dropout and flash attention are this layer's: checked above,
            # set below.
            dropout=0.0,
            use_bias=use_bias,
            output_shape=output_shape,
            attention_axes=attention_axes,
            sliding_window=sliding_window,
            flash_attention=False,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            use_gate=use_gate,
            seed=seed,
            **kwargs,
        )
        self._dropout = dropout
        self._flash_attention = flash_setting
        self._flash_attention_argument = flash_attention
        self._set_options(
            normalization, causal_normalization, jit_compile, chunk_size, null_query,
            null_query_initializer,
        )

    def _set_options(
        self, normalization="double", causal_normalization=False, jit_compile="auto",
        chunk_size="auto", null_query=False, null_query_initializer=None,
    ):
        """Sets what this layer adds to `MultiHeadAttention` (also on a
        `MultiHeadAttention` whose class `keras_dna.convert` swaps)."""
        _check_options(
            normalization, jit_compile, chunk_size, self._dropout, causal_normalization,
            null_query,
        )
        # Logits of earlier options (a layer converted again) leave with them.
        for logits in (getattr(self, "_mixing_logits", None), getattr(self, "_null_query_logits", None)):
            if logits is not None:
                self._untrack_variable(logits)
        self._normalization = normalization
        self._causal_normalization = causal_normalization
        self._jit_compile = jit_compile
        self._chunk_size = chunk_size
        self._null_query = null_query
        self._null_query_initializer = keras.initializers.get(
            null_query_initializer or keras.initializers.Constant(NULL_QUERY_INIT)
        )
        self._mixing_logits = None
        self._null_query_logits = None
        if self.built:
            self._add_logits()

    @property
    def normalization(self):
        return self._normalization

    @property
    def causal_normalization(self):
        return self._causal_normalization

    @property
    def mixing_logits(self):
        """Per-head softmax share logits of `"hybrid"`, else `None`."""
        return self._mixing_logits

    @property
    def null_query_logits(self):
        """Per-head log-masses of the null query (`null_query=True`), else `None`."""
        return self._null_query_logits

    def get_config(self):
        return {
            **super().get_config(),
            "flash_attention": getattr(self, "_flash_attention_argument", None),
            "normalization": self._normalization,
            "causal_normalization": self._causal_normalization,
            "jit_compile": self._jit_compile,
            "chunk_size": self._chunk_size,
            "null_query": self._null_query,
            "null_query_initializer": keras.initializers.serialize(
                self._null_query_initializer
            ),
        }

    def build(self, query_shape, value_shape, key_shape=None):
        _check_ranks(query_shape, value_shape)
        _check_attention_axes(self._attention_axes, len(query_shape))
        super().build(query_shape, value_shape, key_shape)

    def _build_attention(self, rank):
        super()._build_attention(rank)
        self._add_logits()

    def _add_logits(self):
        """Adds the per-head logits of `"hybrid"` and of the null query."""
        locked = self._tracker.locked
        self._tracker.unlock()
        if self._normalization == "hybrid":
            self._mixing_logits = self.add_weight(
                name="mixing_logits",
                shape=(self._num_heads,),
                initializer="zeros",
                trainable=True,
            )
        if self._null_query:
            self._null_query_logits = self.add_weight(
                name="null_query_logits",
                shape=(self._num_heads,),
                initializer=self._null_query_initializer,
                trainable=True,
            )
        if locked:
            self._tracker.lock()

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        attention_mask, causal_from_mask = unwrap_attention_mask(attention_mask)
        self._check_call_inputs(
            query, value, key, query_mask, value_mask, key_mask, attention_mask
        )
        for name, mask in (
            ("query_mask", query_mask), ("value_mask", value_mask),
            ("key_mask", key_mask), ("attention_mask", attention_mask),
        ):
            check_mask_values(name, mask)
        self._check_call_options(return_attention_scores, use_causal_mask)
        key = value if key is None else key
        # Keras fills `query_mask` from the query's Keras mask only when the
        # argument is None; `MultiHeadAttention` reads that mask always.
        keras_query_mask = get_keras_mask(query)
        query_mask = _logical_and(query_mask, keras_query_mask)
        if query_mask is not None:
            attention_mask = self._with_query_mask(attention_mask, query_mask, query)
        attention_mask = self._compute_attention_mask(
            query, value, None, value_mask, key_mask, attention_mask, use_causal_mask
        )
        query, key, value = (without_keras_mask(x) for x in (query, key, value))
        gate = _projected(self._gate_dense, query) if self._use_gate else None
        output, weights = self._compute_attention(
            _projected(self._query_dense, query), _projected(self._key_dense, key),
            _projected(self._value_dense, value),
            attention_mask, training, return_attention_scores,
            **self._causal_argument(use_causal_mask or causal_from_mask),
        )
        if gate is not None:
            output = ops.multiply(output, gate)
        output = _projected(self._output_dense, output, len(query.shape) - 1)
        if keras_query_mask is not None:
            set_keras_mask(output, keras_query_mask)
        if return_attention_scores:
            return output, weights
        return output

    def _causal_argument(self, causal):
        """`_compute_attention`'s keyword for a call that normalizes causally.

        Passed only where it changes the weights, so that a subclass whose
        `_compute_attention` has `MultiHeadAttention`'s signature still runs
        wherever it can; where it cannot, it raises instead of letting the
        future leak into the past.
        """
        if not causal or self._normalization == "single":
            return {}
        overridden = type(self)._compute_attention is not DoublyNormalizedAttention._compute_attention
        if overridden and not _takes_argument(self._compute_attention, "causal_normalization"):
            raise TypeError(
                f"{type(self).__name__}._compute_attention must take the "
                "argument `causal_normalization` (and pass it on) for a call "
                "that normalizes causally; without it, the first step would "
                "sum over later queries."
            )
        return {"causal_normalization": True}

    def _with_query_mask(self, attention_mask, query_mask, query):
        """`attention_mask` AND `query_mask` over the query axes.

        (`MultiHeadAttention` expands a query mask for one attention axis.)
        A padded query changes every output through the per-key step, so it
        must leave the attention mask."""
        expanded = ops.cast(query_mask, "bool")
        for _ in self._attention_axes:
            expanded = ops.expand_dims(expanded, -1)
        if attention_mask is None:
            return expanded
        if self._is_per_head(attention_mask, query):
            expanded = self._with_heads_axis(expanded, len(attention_mask.shape))
        return ops.logical_and(ops.cast(attention_mask, "bool"), expanded)

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
        causal_normalization=False,
    ):
        num_axes = len(self._attention_axes)
        # `MultiHeadAttention.call` folds `use_causal_mask` into the mask for
        # a subclass; honour the argument too, should it arrive on its own.
        if use_causal_mask:
            causal = self._compute_causal_mask(query, value)
            attention_mask = (
                causal
                if attention_mask is None
                else ops.logical_and(ops.cast(attention_mask, "bool"), causal)
            )
        causal_normalization = (
            causal_normalization or use_causal_mask or self._causal_normalization
        )
        # The backend variable: a compiled TensorFlow function cannot take
        # the Keras wrapper.
        mixing_logits, null_query_logits = (
            None if weight is None else weight.value
            for weight in (self._mixing_logits, self._null_query_logits)
        )
        if attention_mask is not None:
            # Rank batch + heads + 2 * attention axes, as the scores.
            attention_mask = self._with_heads_axis(
                ops.cast(attention_mask, "bool"), len(query.shape) - 1 + num_axes
            )
        if self._runs_fused(query, causal_normalization, return_attention_scores):
            output = doubly_normalized_attention(
                query, key, value, attention_mask, normalization=self._normalization,
                scale=self._inverse_sqrt_key_dim, mixing_logits=mixing_logits,
                null_query_logits=null_query_logits, flash_attention=self._flash_attention,
            )
            return ops.cast(output, value.dtype), None
        chunk_size = self._chunk_size_for(query, key, return_attention_scores)
        if chunk_size is not None:
            output = compiled(doubly_normalized_attention, self._jit_compile)(
                query, key, value, attention_mask, normalization=self._normalization,
                causal_normalization=causal_normalization, scale=self._inverse_sqrt_key_dim,
                mixing_logits=mixing_logits, null_query_logits=null_query_logits,
                chunk_size=chunk_size,
            )
            return ops.cast(output, value.dtype), None
        # A Python float keeps the query's dtype; `ops.cast` of one would
        # round it through float32 first.
        query = ops.multiply(query, self._inverse_sqrt_key_dim)
        scores = einsum(self._query_first_equation(), query, key)
        weights = compiled(normalize_attention_scores, self._jit_compile)(
            scores, attention_mask, normalization=self._normalization,
            causal_normalization=causal_normalization, mixing_logits=mixing_logits,
            null_query_logits=null_query_logits, num_attention_axes=num_axes,
        )
        if self._dropout > 0.0:
            dropped = self._dropout_layer(weights, training=training)
        else:
            dropped = weights
        attention_output = einsum(self._combine_equation, dropped, value)
        return attention_output, weights

    def _runs_fused(self, query, causal_normalization, return_attention_scores):
        """Whether this call runs on fused kernels (`keras_dna.ops.fused`),
        where `MultiHeadAttention` would: no dropout, no weights returned,
        one attention axis."""
        if self._flash_attention and causal_normalization and self._normalization != "single":
            check_flash_attention(True, causal=True)
        if self._dropout > 0.0 or return_attention_scores or len(query.shape) != 4:
            return False
        causal = causal_normalization and self._normalization != "single"
        return uses_fused_kernels(self._flash_attention, query.dtype, causal)

    def _query_first_equation(self):
        """`MultiHeadAttention`'s score equation with the query first.

        Its equation takes the key first; under XLA on a CPU that product
        was 1.3x (batch 16, T=512) to 3x (batch 1, T=4096) slower than with
        the query first, as `keras.ops.dot_product_attention` (and so
        `MultiHeadAttention` itself) computes it.
        """
        operands, scores = self._dot_product_equation.split("->")
        key, query = operands.split(",")
        return f"{query},{key}->{scores}"

    def _chunk_size_for(self, query, key, return_attention_scores):
        """This call's blocks of queries, or `None` to hold the whole weights."""
        # Asked for the weights (as `keras_dna.analysis` asks), a chunked layer
        # computes them whole: `call` refuses to return them, not this.
        if self._chunk_size is None or return_attention_scores:
            return None
        if self._chunk_size != "auto":
            return self._chunk_size
        # Dropout and several attention axes need the whole weight matrix.
        if self._dropout or len(self._attention_axes) != 1:
            return None
        return auto_chunk_size(query.shape, key.shape)

    def _with_heads_axis(self, mask, rank):
        """`mask` with the heads axis (and any missing batch axes) inserted
        in front of the query and key axes, up to `rank`."""
        while len(mask.shape) < rank:
            mask = ops.expand_dims(mask, -2 * len(self._attention_axes) - 1)
        return mask

    def _is_per_head(self, attention_mask, query):
        """Whether `attention_mask` has a heads axis: the scores' rank,
        `(B, num_heads, T, S)` for a `(B, T, dim)` query."""
        return len(attention_mask.shape) == len(query.shape) + len(self._attention_axes)

    def _compute_attention_mask(
        self,
        query,
        value,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        use_causal_mask=False,
    ):
        # The masks `MultiHeadAttention` derives are `(B, T, S)`; ANDed as
        # they are with a per-head `(B, N, T, S)` mask, the batch would
        # broadcast against the heads.
        if attention_mask is None or not self._is_per_head(attention_mask, query):
            return super()._compute_attention_mask(
                query, value, query_mask, value_mask, key_mask, attention_mask, use_causal_mask
            )
        attention_mask = ops.cast(attention_mask, "bool")
        derived = super()._compute_attention_mask(
            query, value, query_mask, value_mask, key_mask, None, use_causal_mask
        )
        if derived is None:
            return attention_mask
        rank = len(attention_mask.shape)
        return ops.logical_and(attention_mask, self._with_heads_axis(derived, rank))

    def _compute_causal_mask(self, query, value=None):
        # MultiHeadAttention's mask, `(1, T, S)`, built without the cumulative
        # sums that XLA constant-folds slowly (see `causal_mask`).
        key_length = ops.shape(query if value is None else value)[1]
        return ops.expand_dims(causal_mask(ops.shape(query)[1], key_length), 0)

    def _check_call_options(self, return_attention_scores, use_causal_mask):
        if self._flash_attention and return_attention_scores:
            # MultiHeadAttention's message.
            raise ValueError(
                "Returning attention scores is not supported when flash "
                "attention is enabled. Please disable flash attention to access"
                " attention scores."
            )
        if isinstance(self._chunk_size, int):
            if return_attention_scores:
                raise ValueError(
                    "A layer with `chunk_size` never holds the whole attention "
                    "weight matrix, so it cannot return it. Pass "
                    "return_attention_scores=False or build the layer with "
                    "chunk_size=None."
                )
            if len(self._attention_axes) != 1:
                raise ValueError(
                    "`chunk_size` needs a single attention axis. Received: "
                    f"attention_axes={self._attention_axes}"
                )
        if use_causal_mask and len(self._attention_axes) > 1:
            raise ValueError(
                "`use_causal_mask=True` needs a single attention axis. "
                f"Received: attention_axes={self._attention_axes}"
            )

    def _check_call_inputs(
        self, query, value, key, query_mask, value_mask, key_mask, attention_mask
    ):
        key = value if key is None else key
        if not same_static_shape(key.shape[:-1], value.shape[:-1]):
            raise ValueError(
                "Arguments `key` and `value` must have the same shape except "
                f"in the last axis. Received: key.shape={key.shape}, "
                f"value.shape={value.shape}"
            )
        for name, tensor, dense in (
            ("query", query, self._query_dense),
            ("value", value, self._value_dense),
            ("key", key, self._key_dense),
        ):
            expected = dense.kernel.shape[0]
            if tensor.shape[-1] is not None and tensor.shape[-1] != expected:
                raise ValueError(
                    f"Argument `{name}` must have last dimension {expected}, "
                    "the size the layer was built with. Received: "
                    f"{name}.shape={tensor.shape}"
                )
        built_rank = len(self._query_dense.equation.split(",")[0])
        _check_ranks(query.shape, value.shape)
        if len(query.shape) != built_rank:
            raise ValueError(
                f"Argument `query` must have rank {built_rank}, the rank the "
                f"layer was built with. Received: query.shape={query.shape}"
            )
        axes = self._attention_axes
        batch_axes = tuple(axis for axis in range(built_rank - 1) if axis not in axes)
        for name, tensor in (("value", value), ("key", key)):
            for axis in batch_axes:
                check_match(
                    "batch size" if axis == 0 else f"size in axis {axis} (not an attention axis)",
                    "query", query.shape[axis], name, tensor.shape[axis],
                )
        # The scores' layout: batch axes, heads (per-head masks only),
        # query axes, key axes.
        batch = tuple(query.shape[axis] for axis in batch_axes)
        heads = ()
        if attention_mask is not None and self._is_per_head(attention_mask, query):
            heads = (self._num_heads,)
        pairs = tuple(query.shape[axis] for axis in axes) + tuple(key.shape[axis] for axis in axes)
        for name, mask, target_shape, min_rank in (
            ("query_mask", query_mask, query.shape[:-1], len(query.shape) - 1),
            ("value_mask", value_mask, value.shape[:-1], len(value.shape) - 1),
            ("key_mask", key_mask, key.shape[:-1], len(key.shape) - 1),
            ("attention_mask", attention_mask, batch + heads + pairs, 2 * len(axes)),
        ):
            if mask is not None:
                check_broadcastable(name, mask.shape, target_shape, min_rank)

    def compute_output_spec(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        output_spec = super().compute_output_spec(query, value, key=key)
        if not return_attention_scores:
            return output_spec
        key = value if key is None else key
        rank = len(query.shape)
        axes = self._attention_axes or tuple(range(1, rank - 1))
        axes = tuple(axis % rank for axis in axes)
        batch_axes = tuple(axis for axis in range(rank - 1) if axis not in axes)
        scores_shape = (
            tuple(query.shape[axis] for axis in batch_axes)
            + (self._num_heads,)
            + tuple(query.shape[axis] for axis in axes)
            + tuple(key.shape[axis] for axis in axes)
        )
        return output_spec, keras.KerasTensor(scores_shape, dtype=self.compute_dtype)
