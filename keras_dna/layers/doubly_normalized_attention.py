"""`DoublyNormalizedAttention`: `MultiHeadAttention` with DNA's attention step.

What DNA changes is `_compute_attention`, where `MultiHeadAttention` takes
a softmax of the scores: here the scores are normalized over the queries,
then over the keys (`keras_dna.ops`). The rest of the class is the options
DNA adds and their weights; the call and its masks are
`MultiHeadAttentionBase`'s.
"""

import inspect

import keras
from keras import ops

from keras_dna._compat import weights_addable
from keras_dna.layers.argument_checks import check_chunked_call
from keras_dna.layers.argument_checks import check_flash_call
from keras_dna.layers.argument_checks import check_options
from keras_dna.layers.argument_checks import flash_attention_setting
from keras_dna.layers.masks import with_heads_axis
from keras_dna.layers.mha_base import MultiHeadAttentionBase
from keras_dna.ops import doubly_normalized_attention
from keras_dna.ops import normalize_attention_scores
from keras_dna.ops.backend import compiled
from keras_dna.ops.backend import einsum
from keras_dna.ops.backend import scaled
from keras_dna.ops.implementation import implementation_for

# The null query's initial log-mass: the best of -2, 0, 2 and 4 on the
# grapheme-to-phoneme example (`python -m benchmarks.studies.null_query_init`). With scores of
# order 1 over tens of queries, it starts each key about halfway between
# double normalization and softmax.
NULL_QUERY_INIT = 4.0


def _takes_argument(method, name):
    """Whether `method` takes the keyword argument `name`."""
    parameters = inspect.signature(method).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


@keras.saving.register_keras_serializable(package="keras_dna")
class DoublyNormalizedAttention(MultiHeadAttentionBase):
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
    the mask of a causal call as `keras_dna.CausalNormalizationMask(mask)`), or the
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
            they take DNA's per-key bias and are faster (PyTorch; JAX on
            GPUs in half precision), in memory linear in the lengths
            (`keras_dna.ops.fused`); `True` requires fused kernels (an error
            for causal normalization, dropout or returned scores, on
            TensorFlow, for float64, and on TPUs, whose flash kernel drops
            the bias); `False` never uses fused kernels. `None` follows
            `keras.config.disable_flash_attention()`. Which implementation
            runs a call is decided once, by
            `keras_dna.ops.implementation.choose_implementation`.
        kernel_initializer: Initializer of the projections' kernels.
        bias_initializer: Initializer of the projections' biases.
        kernel_regularizer: Regularizer of the projections' kernels.
        bias_regularizer: Regularizer of the projections' biases.
        activity_regularizer: Regularizer of the layer's output.
        kernel_constraint: Constraint on the projections' kernels.
        bias_constraint: Constraint on the projections' biases.
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
            grapheme-to-phoneme example from -2, 0, 2 and 4 (see the guide
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
        flash_setting = flash_attention_setting(flash_attention, dropout)
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
        self.set_attention_options(
            normalization, causal_normalization, jit_compile, chunk_size, null_query,
            null_query_initializer,
        )

    def set_attention_options(
        self, normalization="double", causal_normalization=False, jit_compile="auto",
        chunk_size="auto", null_query=False, null_query_initializer=None,
    ):
        """Sets the options DNA adds to `MultiHeadAttention`, as the
        constructor takes them; a built layer adds or drops the per-head
        logits they need (`keras_dna.convert` uses it on layers it turns
        into DNA)."""
        check_options(
            normalization, jit_compile, chunk_size, self._dropout, causal_normalization,
            null_query, self._attention_axes,
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
        """`"double"`, `"single"` or `"hybrid"`."""
        return self._normalization

    @property
    def causal_normalization(self):
        """Whether every call normalizes causally."""
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

    def _build_attention(self, rank):
        super()._build_attention(rank)
        self._add_logits()

    def _add_logits(self):
        """Adds the per-head logits of `"hybrid"` and of the null query."""
        with weights_addable(self):
            if self._normalization == "hybrid":
                self._mixing_logits = self.add_weight(
                    name="mixing_logits", shape=(self._num_heads,), initializer="zeros",
                    trainable=True,
                )
            if self._null_query:
                self._null_query_logits = self.add_weight(
                    name="null_query_logits", shape=(self._num_heads,),
                    initializer=self._null_query_initializer, trainable=True,
                )

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
        num_axes = len(self._attention_axes)
        if attention_mask is not None:
            # Rank batch + heads + 2 * attention axes, as the scores.
            attention_mask = with_heads_axis(
                ops.cast(attention_mask, "bool"), len(query.shape) - 1 + num_axes, num_axes
            )
        options = {
            "normalization": self._normalization, "scale": self._inverse_sqrt_key_dim,
            # The backend variables: a compiled TensorFlow function cannot
            # take the Keras wrappers.
            **{
                name: None if weight is None else weight.value
                for name, weight in (
                    ("mixing_logits", self._mixing_logits),
                    ("null_query_logits", self._null_query_logits),
                )
            },
        }
        flat = _OneBatchAxis(query, key, value, attention_mask, self._attention_axes)
        implementation, chunk_size = implementation_for(
            flat.query, flat.key, normalization=self._normalization,
            causal=causal_normalization, flash_attention=self._flash_attention,
            chunk_size=self._chunk_size, num_attention_axes=num_axes, dropout=self._dropout,
            return_weights=return_attention_scores,
        )
        if implementation != "whole":
            # Fused kernels run as they are; `compiled` would trace their
            # calls into an XLA function of its own.
            attention = doubly_normalized_attention
            if implementation == "blockwise":
                attention = compiled(doubly_normalized_attention, self._jit_compile)
            output = attention(
                flat.query, flat.key, flat.value, flat.mask,
                causal_normalization=causal_normalization, flash_attention=self._flash_attention,
                implementation=implementation, chunk_size=chunk_size, **options,
            )
            return ops.cast(flat.restore(output), value.dtype), None
        # MultiHeadAttention's path, with DNA's normalization for its softmax.
        query = scaled(query, options.pop("scale"))
        scores = einsum(self._query_first_equation(), query, key)
        weights = compiled(normalize_attention_scores, self._jit_compile)(
            scores, attention_mask, causal_normalization=causal_normalization,
            num_attention_axes=num_axes, **options,
        )
        dropped = self._dropout_layer(weights, training=training) if self._dropout > 0.0 else weights
        return einsum(self._combine_equation, dropped, value), weights

    def _check_call_options(self, return_attention_scores, use_causal_mask):
        check_flash_call(self._flash_attention, return_attention_scores)
        check_chunked_call(self._chunk_size, return_attention_scores)
        super()._check_call_options(return_attention_scores, use_causal_mask)

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


class _OneBatchAxis:
    """A call's projections with one batch axis, `(B, T, num_heads, dim)`,
    as `keras_dna.ops.doubly_normalized_attention` takes them.

    With one attention axis but more than one batch axis (4-D inputs and
    `attention_axes=(1,)` or `(2,)`, as `MultiHeadAttention` takes them), the
    other axes join the batch; `restore` puts them back. Several attention
    axes stay as they are (only `"whole"` runs them).
    """

    def __init__(self, query, key, value, mask, attention_axes):
        self.query, self.key, self.value, self.mask = query, key, value, mask
        self._shape = None
        rank = len(query.shape)
        if len(attention_axes) != 1 or rank == 4:
            return
        (axis,) = attention_axes
        # The batch axes, then the attention axis, heads and features.
        self._order = [a for a in range(rank - 2) if a != axis] + [axis, rank - 2, rank - 1]
        self._shape = ops.shape(query)
        self.query, self.key, self.value = (self._flattened(x) for x in (query, key, value))
        if mask is not None:
            # (batch axes, heads, T, S), as the scores; the batch axes
            # broadcast to the query's.
            batch = tuple(ops.shape(query)[a] for a in self._order[:-3])
            mask = ops.broadcast_to(mask, batch + tuple(ops.shape(mask)[-3:]))
            self.mask = ops.reshape(mask, (-1,) + tuple(ops.shape(mask)[-3:]))

    def _flattened(self, x):
        x = ops.transpose(x, self._order)
        return ops.reshape(x, (-1,) + tuple(ops.shape(x)[-3:]))

    def restore(self, output):
        """`output`, `(B, T, num_heads, dim)`, in the layout of the query."""
        if self._shape is None:
            return output
        batch = tuple(self._shape[a] for a in self._order[:-3])
        output = ops.reshape(output, batch + tuple(ops.shape(output)[-3:]))
        inverse = [self._order.index(a) for a in range(len(self._order))]
        return ops.transpose(output, inverse)
