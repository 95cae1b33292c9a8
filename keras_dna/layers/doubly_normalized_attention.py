"""`DoublyNormalizedAttention`: `MultiHeadAttention` with DNA's attention step.

What DNA changes is `_compute_attention`, where `MultiHeadAttention` takes
a softmax of the scores: here the scores are normalized over the queries,
then over the keys (`keras_dna.ops`). DNA's options and that step are
`DoubleNormalizationMixin`'s; the call and its masks are
`MultiHeadAttentionBase`'s.
"""

import keras

from keras_dna.layers.argument_checks import flash_attention_setting
from keras_dna.layers.double_normalization import AttentionLayout
from keras_dna.layers.double_normalization import DoubleNormalizationMixin
from keras_dna.layers.mha_base import MultiHeadAttentionBase


@keras.saving.register_keras_serializable(package="keras_dna")
class DoublyNormalizedAttention(DoubleNormalizationMixin, MultiHeadAttentionBase):
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
            GiB, and on PyTorch blocks of 64 for calls with
            `use_causal_mask=True` (faster there than the whole matrix),
            when those conditions hold and the lengths are known, and the
            whole matrix otherwise; `None` always the whole matrix.
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
        self._init_double_normalization(
            flash_attention, flash_setting, dropout, normalization, causal_normalization,
            jit_compile, chunk_size, null_query, null_query_initializer,
        )

    def _build_attention(self, rank):
        super()._build_attention(rank)
        self._add_logits()

    def _attention_layout(self):
        return AttentionLayout(
            scale=self._inverse_sqrt_key_dim, score_equation=self._query_first_equation(),
            combine_equation=self._combine_equation, attention_axes=self._attention_axes,
            num_heads=self._num_heads,
        )
