"""`MultiHeadAttentionBase`: `MultiHeadAttention`'s call, made exact for DNA.

Softmax forgives what DNA does not: its first step sums over the queries,
so a padded query, a mask broadcast over the wrong axis or a dropped Keras
mask changes every output. This class keeps `MultiHeadAttention`'s
computation and fixes how its call gathers the masks and checks its
inputs; `DoublyNormalizedAttention` then changes only the attention step.
"""

import keras
from keras import ops

from keras_dna._compat import get_keras_mask
from keras_dna._compat import set_keras_mask
from keras_dna.layers.argument_checks import check_attention_axes
from keras_dna.layers.argument_checks import check_call_inputs
from keras_dna.layers.argument_checks import check_causal_mask_call
from keras_dna.layers.argument_checks import check_ranks
from keras_dna.layers.masks import causal_mask_of
from keras_dna.layers.masks import is_per_head
from keras_dna.layers.masks import logical_and
from keras_dna.layers.masks import unwrap_attention_mask
from keras_dna.layers.masks import with_derived_masks
from keras_dna.layers.masks import with_heads_axis
from keras_dna.layers.masks import without_keras_mask
from keras_dna.ops.checks import check_mask_values


def projected(dense, x, leading_axes=None):
    """`dense(x)`, with the leading axes of `x` (all but the last, or the
    first `leading_axes`) kept where one of them is empty.

    Keras's TensorFlow einsum reshapes the batch axis with -1 for these
    equations: with an empty sequence of known length, `(0, 0, dim)` became
    `(1, 0, dim)` (in `MultiHeadAttention` too).
    """
    output = dense(x)
    leading_axes = len(x.shape) - 1 if leading_axes is None else leading_axes
    if 0 not in x.shape[1:leading_axes]:
        return output
    shape = tuple(ops.shape(x)[:leading_axes]) + tuple(output.shape[leading_axes:])
    return ops.reshape(output, shape)


class MultiHeadAttentionBase(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose call checks its inputs and
    masks, and hands every mask to the attention step.

    Differences in the call, all where `MultiHeadAttention` would crash deep
    in a backend or mask differently than asked:

    - the query's Keras mask and `query_mask` both mask the queries, over
      every attention axis;
    - a per-head `attention_mask`, `(B, num_heads, T, S)`, combines with
      the derived masks without broadcasting the batch against the heads;
    - the callers' tensors keep their Keras masks (concurrent calls with
      one tensor see the same mask);
    - empty sequences keep their shape;
    - shapes, ranks, axes and mask values are checked with errors naming
      the argument.

    Subclasses change the attention step (`_compute_attention`); they
    receive the extra keyword arguments `_causal_argument` returns.
    """

    def build(self, query_shape, value_shape, key_shape=None):
        check_ranks(query_shape, value_shape)
        check_attention_axes(self._attention_axes, len(query_shape))
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
        # argument is None; `MultiHeadAttention` reads that mask always.
        keras_query_mask = get_keras_mask(query)
        query_mask = logical_and(query_mask, keras_query_mask)
        if query_mask is not None:
            attention_mask = self._with_query_mask(attention_mask, query_mask, query)
        causal_arguments = self._causal_argument(use_causal_mask or causal_from_mask, use_causal_mask)
        attention_mask = self._compute_attention_mask(
            query, value, None, value_mask, key_mask, attention_mask,
            use_causal_mask and "use_causal_mask" not in causal_arguments,
        )
        query, key, value = (without_keras_mask(x) for x in (query, key, value))
        gate = projected(self._gate_dense, query) if self._use_gate else None
        output, weights = self._compute_attention(
            projected(self._query_dense, query), projected(self._key_dense, key),
            projected(self._value_dense, value),
            attention_mask, training, return_attention_scores,
            **causal_arguments,
        )
        if gate is not None:
            output = ops.multiply(output, gate)
        output = projected(self._output_dense, output, len(query.shape) - 1)
        if keras_query_mask is not None:
            set_keras_mask(output, keras_query_mask)
        if return_attention_scores:
            return output, weights
        return output

    def _check_call(self, inputs, masks, return_attention_scores, use_causal_mask):
        """Raises on a call this layer cannot compute as asked."""
        built_dims = tuple(
            dense.kernel.shape[0]
            for dense in (self._query_dense, self._value_dense, self._key_dense)
        )
        built_rank = len(self._query_dense.equation.split(",")[0])
        check_call_inputs(
            inputs, masks, built_dims, built_rank, self._attention_axes, self._num_heads
        )
        for name, mask in zip(("query_mask", "value_mask", "key_mask", "attention_mask"), masks):
            check_mask_values(name, mask)
        self._check_call_options(return_attention_scores, use_causal_mask)

    def _check_call_options(self, return_attention_scores, use_causal_mask):
        """Raises on call options the layer cannot honour."""
        del return_attention_scores
        check_causal_mask_call(use_causal_mask, self._attention_axes)

    def _causal_argument(self, causal, causal_mask=False):
        """Extra keyword arguments of `_compute_attention` for a call that
        is causal (`use_causal_mask=True`, or a `CausalNormalizationMask`;
        `causal_mask`: the former). Softmax needs none: the causal mask is
        in the attention mask, unless the arguments hold `use_causal_mask`."""
        del causal, causal_mask
        return {}

    def _with_query_mask(self, attention_mask, query_mask, query):
        """`attention_mask` AND `query_mask` over the query axes.

        (`MultiHeadAttention` expands a query mask for one attention axis.)
        A padded query changes every output through DNA's per-key step, so
        it must leave the attention mask."""
        expanded = ops.cast(query_mask, "bool")
        for _ in self._attention_axes:
            expanded = ops.expand_dims(expanded, -1)
        if attention_mask is None:
            return expanded
        num_axes = len(self._attention_axes)
        if is_per_head(attention_mask, query, num_axes):
            expanded = with_heads_axis(expanded, len(attention_mask.shape), num_axes)
        return ops.logical_and(ops.cast(attention_mask, "bool"), expanded)

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
            return super(MultiHeadAttentionBase, self)._compute_attention_mask(
                query, value, query_mask, value_mask, key_mask, attention_mask, use_causal_mask
            )

        return with_derived_masks(derive, attention_mask, query, len(self._attention_axes))

    def _compute_causal_mask(self, query, value=None):
        return causal_mask_of(query, value)

    def _query_first_equation(self):
        """`MultiHeadAttention`'s score equation with the query first.

        Its equation takes the key first; under XLA on a CPU that product
        was slower than with the query first, as
        `keras.ops.dot_product_attention` (and so `MultiHeadAttention`
        itself) computes it (`benchmarks/results/speed/layer_step_query_first.md`,
        `layer_step_query_first_batch1.md`).
        """
        operands, scores = self._dot_product_equation.split("->")
        key, query = operands.split(",")
        return f"{query},{key}->{scores}"

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
