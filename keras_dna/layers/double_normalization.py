"""`DoubleNormalizationMixin`: what DNA adds to an attention layer.

Its options (`normalization`, `causal_normalization`, `jit_compile`,
`chunk_size`, `null_query`), their per-head logits, and the attention step
that runs them: `_compute_attention` chooses the implementation once
(`keras_dna.ops.implementation`) and calls one function. Mixed into
`DoublyNormalizedAttention` (`MultiHeadAttention`'s drop-in) and
`DoublyNormalizedGroupQueryAttention` (`GroupQueryAttention`'s); each host
says how its heads are laid out (`_attention_layout`).
"""

from typing import NamedTuple

import keras
from keras import ops

from keras_dna._compat import weights_addable
from keras_dna.layers.argument_checks import check_chunked_call
from keras_dna.layers.argument_checks import check_flash_call
from keras_dna.layers.argument_checks import check_options
from keras_dna.layers.argument_checks import takes_argument
from keras_dna.layers.masks import with_heads_axis
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


def null_query_initializer_of(initializer):
    """The null query logits' initializer: `initializer` (anything
    `keras.initializers.get` takes), or by default the constant
    `NULL_QUERY_INIT`."""
    return keras.initializers.get(initializer or keras.initializers.Constant(NULL_QUERY_INIT))




def add_logits(layer, num_heads, normalization, null_query, null_query_initializer):
    """Adds to `layer` the per-head logits its options need; returns
    `(mixing_logits, null_query_logits)`, each `None` where not needed."""
    mixing_logits = null_query_logits = None
    if normalization == "hybrid":
        mixing_logits = layer.add_weight(
            name="mixing_logits", shape=(num_heads,), initializer="zeros", trainable=True
        )
    if null_query:
        null_query_logits = layer.add_weight(
            name="null_query_logits", shape=(num_heads,), initializer=null_query_initializer,
            trainable=True,
        )
    return mixing_logits, null_query_logits


class AttentionLayout(NamedTuple):
    """How a host layer's projections meet: what `_compute_attention` reads.

    `scale` multiplies the queries; `score_equation` takes the projected
    query and key to the scores `(batch, heads, T, S)` (or with several
    attention axes), `combine_equation` the weights and value to the output;
    `attention_axes` are the query's attention axes; `num_heads` the number
    of query heads, one per-head logit each.
    """

    scale: float
    score_equation: str
    combine_equation: str
    attention_axes: tuple
    num_heads: int


class DoubleNormalizationMixin:
    """DNA's options and attention step, for a Keras attention layer.

    The host calls `_init_double_normalization` in its constructor and
    `_add_logits` once built, and implements `_attention_layout`. Its call
    passes `return_attention_scores` and `_causal_argument`'s keywords to
    `_compute_attention`; the layer keeps no state of a call.
    """

    def _init_double_normalization(
        self, flash_attention, flash_setting, dropout, normalization, causal_normalization,
        jit_compile, chunk_size, null_query, null_query_initializer,
    ):
        """Stores the layer's own dropout and `flash_attention` and sets DNA's options."""
        self._dropout = dropout
        self._flash_attention = flash_setting
        self._flash_attention_argument = flash_attention
        self.set_attention_options(
            normalization, causal_normalization, jit_compile, chunk_size, null_query,
            null_query_initializer,
        )

    def _attention_layout(self):
        """The host's `AttentionLayout`."""
        raise NotImplementedError

    def adopt_attributes(self):
        """Called on a layer of the host's Keras class whose class has just
        become this one (`keras_dna.convert`): sets what this class's
        constructor sets and Keras's does not, from Keras's attributes."""

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
            null_query, getattr(self, "_attention_axes", None),
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
        self._null_query_initializer = null_query_initializer_of(null_query_initializer)
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

    def _add_logits(self):
        """Adds the per-head logits of `"hybrid"` and of the null query."""
        with weights_addable(self):
            self._mixing_logits, self._null_query_logits = add_logits(
                self, self._attention_layout().num_heads, self._normalization,
                self._null_query, self._null_query_initializer,
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
        layout = self._attention_layout()
        num_axes = len(layout.attention_axes)
        if attention_mask is not None:
            # Rank batch + heads + 2 * attention axes, as the scores.
            attention_mask = with_heads_axis(
                ops.cast(attention_mask, "bool"), len(query.shape) - 1 + num_axes, num_axes
            )
        options = {
            "normalization": self._normalization, "scale": layout.scale,
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
        flat = _OneBatchAxis(query, key, value, attention_mask, layout.attention_axes)
        implementation, chunk_size = implementation_for(
            flat.query, flat.key, normalization=self._normalization,
            causal=causal_normalization, flash_attention=self._flash_attention,
            chunk_size=self._chunk_size, num_attention_axes=num_axes, dropout=self._dropout,
            return_weights=return_attention_scores, causal_mask=use_causal_mask,
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
                # The mask holds the causal rule already; told of it too,
                # kernels skip the tiles and blocks the keys past it.
                is_causal=use_causal_mask and implementation in ("kernel", "blockwise"),
                implementation=implementation, chunk_size=chunk_size, **options,
            )
            return ops.cast(flat.restore(output), value.dtype), None
        # The host's own path, with DNA's normalization for its softmax.
        query = scaled(query, options.pop("scale"))
        scores = einsum(layout.score_equation, query, key)
        weights = compiled(normalize_attention_scores, self._jit_compile)(
            scores, attention_mask, causal_normalization=causal_normalization,
            num_attention_axes=num_axes, **options,
        )
        dropped = self._dropout_layer(weights, training=training) if self._dropout > 0.0 else weights
        return einsum(layout.combine_equation, dropped, value), weights

    def _check_call_options(self, return_attention_scores, use_causal_mask):
        check_flash_call(self._flash_attention, return_attention_scores)
        check_chunked_call(self._chunk_size, return_attention_scores)
        super()._check_call_options(return_attention_scores, use_causal_mask)

    def _causal_argument(self, causal, causal_mask=False):
        """`_compute_attention`'s keywords for a call that normalizes causally
        (and, with `causal_mask`, whose mask is `use_causal_mask`'s).

        Passed only where they change the weights, so that a subclass whose
        `_compute_attention` has `MultiHeadAttention`'s signature still runs
        wherever it can; where it cannot, it raises instead of letting the
        future leak into the past. The causal mask is passed as
        `use_causal_mask` only to this class's own `_compute_attention`,
        which tells DNA's kernels that the causal rule holds (they then skip
        the tiles above the diagonal); the host leaves it out of the
        attention mask then.
        """
        if not causal or self._normalization == "single":
            return {}
        overridden = type(self)._compute_attention is not DoubleNormalizationMixin._compute_attention
        if overridden and not takes_argument(self._compute_attention, "causal_normalization"):
            raise TypeError(
                f"{type(self).__name__}._compute_attention must take the "
                "argument `causal_normalization` (and pass it on) for a call "
                "that normalizes causally; without it, the first step would "
                "sum over later queries."
            )
        if causal_mask and not overridden:
            return {"causal_normalization": True, "use_causal_mask": True}
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
