"""`DoublyNormalizedGroupQueryAttention`: `GroupQueryAttention` with DNA's step.

The drop-in for `keras.layers.GroupQueryAttention` (Keras's class
`GroupedQueryAttention`), as `DoublyNormalizedAttention` is for
`MultiHeadAttention`: DNA's options and attention step are
`DoubleNormalizationMixin`'s, the call and its masks
`GroupQueryAttentionBase`'s.
"""

import keras

from keras_dna.layers.argument_checks import flash_attention_setting
from keras_dna.layers.double_normalization import AttentionLayout
from keras_dna.layers.double_normalization import DoubleNormalizationMixin
from keras_dna.layers.gqa_base import GroupQueryAttentionBase


@keras.saving.register_keras_serializable(package="keras_dna")
class DoublyNormalizedGroupQueryAttention(DoubleNormalizationMixin, GroupQueryAttentionBase):
    """Grouped-query attention that does not explain away its inputs.

    A drop-in replacement for `keras.layers.GroupQueryAttention`: the same
    constructor and call arguments, the same weights (so
    `dna.set_weights(gqa.get_weights())` works) and the same masks. Groups
    of query heads share a key and value head, as there; only the
    normalization of the attention scores differs (see
    `DoublyNormalizedAttention`). DNA's first step is per query head: each
    query head normalizes each key over its own queries, also where
    several query heads share that key's projection.

    Masks (Keras masks of the inputs, `query_mask`, `value_mask`, `key_mask`,
    `attention_mask`, `use_causal_mask`, `sliding_window`) exclude pairs
    from both normalization steps; `use_causal_mask=True` normalizes
    causally, and a causal call that passes its own mask must say so with
    `causal_normalization=True` or `keras_dna.CausalNormalizationMask`.

    Args:
        head_dim: Size of each attention head.
        num_query_heads: Number of query heads.
        num_key_value_heads: Number of key and value heads; it must divide
            `num_query_heads`.
        dropout: Dropout rate on the attention weights.
        use_bias: Whether the projections have biases.
        sliding_window: Optional positive integer: query `i` only attends to
            keys within `sliding_window - 1` positions of it.
        flash_attention: As in `DoublyNormalizedAttention`.
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
            `GroupQueryAttention`) or `"hybrid"`, as in
            `DoublyNormalizedAttention`; its logits are per query head.
        causal_normalization: As in `DoublyNormalizedAttention`.
        jit_compile: As in `DoublyNormalizedAttention`.
        chunk_size: As in `DoublyNormalizedAttention`.
        null_query: As in `DoublyNormalizedAttention`, one log-mass per
            query head.
        null_query_initializer: As in `DoublyNormalizedAttention`.
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
            broadcastable to it), or per query head `(B, num_query_heads, T,
            S)`; `True` attends. A `CausalNormalizationMask` holds such a
            mask and also normalizes this call causally.
        return_attention_scores: If `True`, also return the normalized
            attention weights, shaped `(B, num_query_heads, T, S)`.
        training: Whether dropout is active.
        use_causal_mask: Whether query `i` only attends to keys `j <= i`;
            implies causal normalization.

    Returns:
        attention_output: Shape `(B, T, dim)`.
        attention_scores: (Optional) the attention weights.
    """

    def __init__(
        self,
        head_dim,
        num_query_heads,
        num_key_value_heads,
        dropout=0.0,
        use_bias=True,
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
            head_dim=head_dim,
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            # Dropout and flash attention are this layer's: checked above,
            # set below (Keras's check reads the global flash setting even
            # where `flash_attention=False` was passed).
            dropout=0.0,
            use_bias=use_bias,
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
        # Read by `build` (the dropout layer's rate) and `get_config`.
        self.dropout = dropout
        self._init_double_normalization(
            flash_attention, flash_setting, dropout, normalization, causal_normalization,
            jit_compile, chunk_size, null_query, null_query_initializer,
        )

    def adopt_attributes(self):
        # Keras's layer keeps its dropout rate as `dropout`.
        self._dropout = self.dropout

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        self._add_logits()

    def _attention_layout(self):
        return AttentionLayout(
            scale=self._inverse_sqrt_head_dim, score_equation=self._dot_product_equation,
            combine_equation=self._combine_equation, attention_axes=(1,),
            num_heads=self.num_query_heads,
        )
