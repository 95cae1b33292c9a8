"""keras-hub's `TransformerEncoder` and `TransformerDecoder`, doubly normalized.

Each builds keras-hub's layer and then turns its attention layers into DNA
in place (`keras_dna.convert.make_doubly_normalized`): same weights, same
names, so checkpoints of keras-hub's layers load into these.
"""

import keras
import keras_hub
from keras import ops

from keras_dna._compat import get_keras_mask
from keras_dna.layers import CausalNormalizationMask
from keras_dna.convert import attention_options_of
from keras_dna.convert import checked_attention_options
from keras_dna.convert import make_doubly_normalized
from keras_dna.convert import site_options


@keras.saving.register_keras_serializable(package="keras_dna")
class TransformerEncoder(keras_hub.layers.TransformerEncoder):
    """`keras_hub.layers.TransformerEncoder` with doubly-normalized attention.

    Args:
        attention_options: Keyword arguments of `DoublyNormalizedAttention`
            for the self-attention (`normalization`, `null_query`,
            `causal_normalization`, `chunk_size`, `jit_compile`,
            `null_query_initializer`); defaults to double normalization.
        *args: Those of `keras_hub.layers.TransformerEncoder`.
        **kwargs: Those of `keras_hub.layers.TransformerEncoder`.
    """

    def __init__(self, *args, attention_options=None, **kwargs):
        self._attention_options = checked_attention_options(
            "attention_options", attention_options
        )
        super().__init__(*args, **kwargs)

    def build(self, inputs_shape):
        super().build(inputs_shape)
        self._convert_attention()

    def _convert_attention(self):
        make_doubly_normalized(self._self_attention_layer, **self._attention_options)
        # Recorded as they are live: what `get_config` saves loads as it runs.
        self._attention_options = attention_options_of(self._self_attention_layer)

    def call(
        self, inputs, padding_mask=None, attention_mask=None, training=None,
        return_attention_scores=False,
    ):
        attention_mask = _without_padded_queries(
            self._self_attention_layer, inputs, padding_mask, attention_mask
        )
        return super().call(
            inputs, padding_mask=padding_mask, attention_mask=attention_mask,
            training=training, return_attention_scores=return_attention_scores,
        )

    def convert_attention(self, options):
        """Takes the options of `keras_dna.convert.to_doubly_normalized` and
        converts the attention built so far (a layer `keras_dna.convert`
        turns into this class)."""
        _update_options(
            self, "_attention_options", site_options(options, options["causal_normalization"] is True)
        )
        if self.built:
            self._convert_attention()

    def get_config(self):
        return {**super().get_config(), "attention_options": dict(self._attention_options)}


@keras.saving.register_keras_serializable(package="keras_dna")
class TransformerDecoder(keras_hub.layers.TransformerDecoder):
    """`keras_hub.layers.TransformerDecoder` with doubly-normalized attention.

    Its attention layers are `keras_dna.hub.CachedDoublyNormalizedAttention`,
    so it decodes with a cache as keras-hub's does (see that class for the
    cache layout). The self-attention normalizes causally whenever the
    layer builds its causal mask (`use_causal_mask=True`, the default);
    the cross-attention always does, as decoding produces the queries one at
    a time (docs/math.md, "Causal normalization").

    Args:
        self_attention_options: Keyword arguments of
            `DoublyNormalizedAttention` for the self-attention
            (`normalization`, `null_query`, `causal_normalization`,
            `chunk_size`, `jit_compile`, `null_query_initializer`); defaults
            to double normalization.
        cross_attention_options: The same for the cross-attention;
            `causal_normalization` defaults to `True`.
        *args: Those of `keras_hub.layers.TransformerDecoder`.
        **kwargs: Those of `keras_hub.layers.TransformerDecoder`.
    """

    def __init__(self, *args, self_attention_options=None, cross_attention_options=None, **kwargs):
        self._self_attention_options = checked_attention_options(
            "self_attention_options", self_attention_options
        )
        self._cross_attention_options = checked_attention_options(
            "cross_attention_options", {"causal_normalization": True, **(cross_attention_options or {})}
        )
        super().__init__(*args, **kwargs)

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        super().build(decoder_sequence_shape, encoder_sequence_shape)
        self._convert_attention()

    def _convert_attention(self):
        make_doubly_normalized(self._self_attention_layer, **self._self_attention_options)
        self._self_attention_options = attention_options_of(self._self_attention_layer)
        if self._cross_attention_layer is not None:
            make_doubly_normalized(self._cross_attention_layer, **self._cross_attention_options)
            self._cross_attention_options = attention_options_of(self._cross_attention_layer)

    def convert_attention(self, options):
        """Takes the options of `keras_dna.convert.to_doubly_normalized` and
        converts the attention built so far (a layer `keras_dna.convert`
        turns into this class)."""
        _update_options(
            self, "_self_attention_options",
            site_options(options, options["causal_normalization"] is True),
        )
        _update_options(self, "_cross_attention_options", site_options(options, causal=True))
        if self.built:
            self._convert_attention()

    def call(
        self,
        decoder_sequence,
        encoder_sequence=None,
        decoder_padding_mask=None,
        decoder_attention_mask=None,
        encoder_padding_mask=None,
        encoder_attention_mask=None,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        cross_attention_cache_update_index=None,
        use_causal_mask=True,
        training=None,
    ):
        if self._cross_attention_layer is not None and encoder_sequence is not None:
            encoder_attention_mask = _without_padded_queries(
                self._cross_attention_layer, decoder_sequence, decoder_padding_mask,
                encoder_attention_mask,
            )
        return super().call(
            decoder_sequence, encoder_sequence=encoder_sequence,
            decoder_padding_mask=decoder_padding_mask,
            decoder_attention_mask=decoder_attention_mask,
            encoder_padding_mask=encoder_padding_mask,
            encoder_attention_mask=encoder_attention_mask,
            self_attention_cache=self_attention_cache,
            self_attention_cache_update_index=self_attention_cache_update_index,
            cross_attention_cache=cross_attention_cache,
            cross_attention_cache_update_index=cross_attention_cache_update_index,
            use_causal_mask=use_causal_mask, training=training,
        )

    def _compute_self_attention_mask(
        self, decoder_sequence, decoder_padding_mask, *args, use_causal_mask, **kwargs
    ):
        mask = super()._compute_self_attention_mask(
            decoder_sequence, decoder_padding_mask, *args, use_causal_mask=use_causal_mask,
            **kwargs,
        )
        mask = _without_padded_queries(
            self._self_attention_layer, decoder_sequence, decoder_padding_mask, mask
        )
        # keras-hub calls the self-attention with this mask alone: the mask
        # carries the call's causal normalization to it.
        return CausalNormalizationMask(mask) if use_causal_mask else mask

    def get_config(self):
        return {
            **super().get_config(),
            "self_attention_options": dict(self._self_attention_options),
            "cross_attention_options": dict(self._cross_attention_options),
        }



def _without_padded_queries(attention, sequence, padding_mask, attention_mask):
    """`attention_mask` that also leaves out the padded queries of `sequence`.

    keras-hub turns a padding mask (`padding_mask`, or the Keras mask of
    `sequence`) into a mask over the keys only, `(B, 1, S)`: softmax never
    sees a padded query's row. DNA's first step sums over the queries, so a
    padded query would change every valid output (docs/math.md, property 4).
    Softmax (`"single"`) keeps keras-hub's mask, and so its outputs at padded
    positions too.
    """
    padding = get_keras_mask(sequence) if padding_mask is None else padding_mask
    if padding is None or attention.normalization == "single":
        return attention_mask
    queries = ops.expand_dims(ops.cast(padding, "int32"), -1)
    if attention_mask is None:
        return queries
    return ops.minimum(ops.cast(attention_mask, "int32"), queries)


def _update_options(layer, attribute, options):
    """Sets `options` in the attention options `layer` keeps under
    `attribute`; the others stay (a layer swapped in from keras-hub's class
    has none yet)."""
    setattr(layer, attribute, {**getattr(layer, attribute, {}), **options})
