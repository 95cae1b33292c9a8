"""keras-hub's `TransformerEncoder` and `TransformerDecoder`, doubly normalized.

Each builds keras-hub's layer and then turns its attention layers into DNA
in place (`keras_dna.convert.make_doubly_normalized`): same weights, same
names, so checkpoints of keras-hub's layers load into these.
"""

import keras
import keras_hub

from keras_dna.attention import CausalNormalizationMask
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
        *args, **kwargs: Those of `keras_hub.layers.TransformerEncoder`.
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

    def _use_model_options(self, options):
        """Takes the options of `keras_dna.convert.to_doubly_normalized`."""
        self._attention_options = site_options(options, options["causal_normalization"] is True)

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
    a time (DNA.md, "Causal normalization").

    Args:
        self_attention_options: Keyword arguments of
            `DoublyNormalizedAttention` for the self-attention
            (`normalization`, `null_query`, `causal_normalization`,
            `chunk_size`, `jit_compile`, `null_query_initializer`); defaults
            to double normalization.
        cross_attention_options: The same for the cross-attention;
            `causal_normalization` defaults to `True`.
        *args, **kwargs: Those of `keras_hub.layers.TransformerDecoder`.
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
        if self._cross_attention_layer is not None:
            make_doubly_normalized(self._cross_attention_layer, **self._cross_attention_options)

    def _use_model_options(self, options):
        """Takes the options of `keras_dna.convert.to_doubly_normalized`."""
        self._self_attention_options = site_options(options, options["causal_normalization"] is True)
        self._cross_attention_options = site_options(options, causal=True)

    def _compute_self_attention_mask(self, *args, use_causal_mask, **kwargs):
        # keras-hub calls the self-attention with this mask alone: the mask
        # carries the call's causal normalization to it.
        mask = super()._compute_self_attention_mask(
            *args, use_causal_mask=use_causal_mask, **kwargs
        )
        return CausalNormalizationMask(mask) if use_causal_mask else mask

    def get_config(self):
        return {
            **super().get_config(),
            "self_attention_options": dict(self._self_attention_options),
            "cross_attention_options": dict(self._cross_attention_options),
        }

