"""keras-hub integration: DNA inside keras-hub's Transformer layers and models.

- `CachedDoublyNormalizedAttention`: keras-hub's cached attention call
  (`cache`, `cache_update_index`) with every DNA option;
- `TransformerEncoder`, `TransformerDecoder`: keras-hub's layers with
  doubly-normalized self- and cross-attention;
- `keras_dna.convert.to_doubly_normalized` turns keras-hub backbones and task
  models (`GPT2CausalLM`, `BertTextClassifier`, ...) into DNA; converted
  causal LMs generate through the DNA cache with keras-hub's samplers.

Needs keras-hub (`pip install keras-dna[hub]`).
"""

try:
    import keras_hub  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "keras_dna.hub needs keras-hub: pip install 'keras-dna[hub]'"
    ) from error

from keras_dna import convert
from keras_dna.hub.cached_attention import CachedDoublyNormalizedAttention
from keras_dna.hub.decoders import DoublyNormalizedSoftmax
from keras_dna.hub.decoders import converted_decoder_attention
from keras_dna.hub.decoders import decoder_attention_classes
from keras_dna.hub.generation import generation_mixins
from keras_dna.hub.transformer import TransformerDecoder
from keras_dna.hub.transformer import TransformerEncoder


def _register_conversions():
    """Registers with `keras_dna.convert` what keras-hub's classes become,
    and `DoublyNormalized<Class>` for keras-hub's backbones and task models,
    so converted ones load in a new process."""
    convert.register_attention_class(
        keras_hub.layers.CachedMultiHeadAttention, CachedDoublyNormalizedAttention
    )
    for cls in decoder_attention_classes():
        convert.register_attention_class(cls, converted_decoder_attention(cls))
    convert.register_attention_holder(keras_hub.layers.TransformerEncoder, TransformerEncoder)
    convert.register_attention_holder(keras_hub.layers.TransformerDecoder, TransformerDecoder)
    convert.register_class_mixins(generation_mixins)
    for value in vars(keras_hub.models).values():
        if isinstance(value, type) and issubclass(
            value, (keras_hub.models.Backbone, keras_hub.models.Task)
        ):
            convert.converted_class(value)


_register_conversions()

__all__ = [
    "CachedDoublyNormalizedAttention",
    "DoublyNormalizedSoftmax",
    "TransformerDecoder",
    "TransformerEncoder",
]
