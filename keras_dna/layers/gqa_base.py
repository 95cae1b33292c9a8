"""`GroupQueryAttentionBase`: `GroupQueryAttention`'s call, made exact for DNA.

As `MultiHeadAttentionBase` does for `MultiHeadAttention`: the computation
is Keras's (projections, key and value heads repeated for their groups of
query heads, the output projection), while the call checks its inputs,
gathers every mask (the query's Keras mask and per-head masks included)
and passes the call's options to the attention step as arguments, where
Keras's layer keeps `return_attention_scores` on the layer between calls.
"""

import keras
from keras import ops

from keras_dna._compat import get_keras_mask
from keras_dna._compat import set_keras_mask
from keras_dna.layers.argument_checks import check_call_inputs
from keras_dna.layers.argument_checks import check_ranks
from keras_dna.layers.argument_checks import takes_argument
from keras_dna.layers.masks import causal_mask_of
from keras_dna.layers.masks import logical_and
from keras_dna.layers.masks import unwrap_attention_mask
from keras_dna.layers.masks import with_derived_masks
from keras_dna.layers.masks import without_keras_mask
from keras_dna.layers.mha_base import projected
from keras_dna.ops.checks import check_mask_values


class GroupQueryAttentionBase(keras.layers.GroupQueryAttention):
    """`keras.layers.GroupQueryAttention` whose call checks its inputs and
    masks, and hands every mask and option to the attention step.

    Subclasses change the attention step, `_compute_attention(query, key,
    value, attention_mask=None, training=None, **extra)`, with the key and
    value heads already repeated to the query heads and `extra` what
    `_attention_arguments` returns.
    """

    def build(self, query_shape, value_shape, key_shape=None):
        check_ranks(query_shape, value_shape)
        if len(query_shape) != 3:
            raise ValueError(
                "Argument `query` must have rank 3, (batch, sequence, features), "
                f"as GroupQueryAttention takes it. Received: query.shape={tuple(query_shape)}"
            )
        super().build(query_shape, value_shape, key_shape)

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
        self._check_call(
            (query, value, key), (query_mask, value_mask, key_mask, attention_mask),
            return_attention_scores, use_causal_mask,
        )
        key = value if key is None else key
        # Keras fills `query_mask` from the query's Keras mask only when the
        # argument is None; a padded query must leave the mask either way.
        keras_query_mask = get_keras_mask(query)
        query_mask = logical_and(query_mask, keras_query_mask)
        arguments = self._attention_arguments(use_causal_mask or causal_from_mask, use_causal_mask,
                                              return_attention_scores)
        attention_mask = self._compute_attention_mask(
            query, value, query_mask, value_mask, key_mask, attention_mask,
            use_causal_mask and "use_causal_mask" not in arguments,
        )
        query, key, value = (without_keras_mask(x) for x in (query, key, value))
        gate = projected(self._gate_dense, query) if self.use_gate else None
        key, value = (
            ops.repeat(projected(dense, x), self.num_repeats, axis=2)
            for dense, x in ((self._key_dense, key), (self._value_dense, value))
        )
        output, weights = self._compute_attention(
            projected(self._query_dense, query), key, value, attention_mask=attention_mask,
            training=training,
            **arguments,
        )
        if gate is not None:
            output = ops.multiply(output, gate)
        output = projected(self._output_dense, output, 2)
        if keras_query_mask is not None:
            set_keras_mask(output, keras_query_mask)
        if return_attention_scores:
            return output, weights
        return output

    def _check_call(self, inputs, masks, return_attention_scores, use_causal_mask):
        """Raises on a call this layer cannot compute as asked."""
        built_dims = tuple(
            dense.kernel.shape[0] for dense in (self._query_dense, self._value_dense, self._key_dense)
        )
        check_call_inputs(inputs, masks, built_dims, 3, (1,), self.num_query_heads)
        for name, mask in zip(("query_mask", "value_mask", "key_mask", "attention_mask"), masks):
            check_mask_values(name, mask)
        self._check_call_options(return_attention_scores, use_causal_mask)

    def _check_call_options(self, return_attention_scores, use_causal_mask):
        """Raises on call options the layer cannot honour (none here)."""
        del return_attention_scores, use_causal_mask

    def _attention_arguments(self, causal, causal_mask, return_attention_scores):
        """`_compute_attention`'s keyword arguments beyond Keras's
        `(query, key, value, attention_mask, training)`, its documented
        override point: `_causal_argument`'s, and `return_attention_scores`
        where asked (Keras's layer keeps that on the layer between calls
        instead). A subclass whose override cannot take it is told so."""
        arguments = self._causal_argument(causal, causal_mask)
        if return_attention_scores:
            if not takes_argument(self._compute_attention, "return_attention_scores"):
                raise TypeError(
                    f"{type(self).__name__}._compute_attention must take the "
                    "argument `return_attention_scores` (and pass it on) for a "
                    "call that returns the attention scores."
                )
            arguments["return_attention_scores"] = True
        return arguments

    def _causal_argument(self, causal, causal_mask=False):
        """Extra keyword arguments of `_compute_attention` for a causal call
        (`causal_mask`: `use_causal_mask=True`); softmax needs none, the
        causal mask being in the attention mask."""
        del causal, causal_mask
        return {}

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
        def derive(attention_mask):
            return super(GroupQueryAttentionBase, self)._compute_attention_mask(
                query, value, query_mask, value_mask, key_mask, attention_mask, use_causal_mask
            )

        return with_derived_masks(derive, attention_mask, query, 1)

    def _compute_causal_mask(self, query, value=None):
        return causal_mask_of(query, value)
