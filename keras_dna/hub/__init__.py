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

from keras_dna.convert import converted_class
from keras_dna.hub.attention import CachedDoublyNormalizedAttention
from keras_dna.hub.layers import TransformerDecoder
from keras_dna.hub.layers import TransformerEncoder


def _register_converted_models():
    """Registers `DoublyNormalized<Class>` for keras-hub's backbones and task
    models, so converted ones load in a new process."""
    for value in vars(keras_hub.models).values():
        if isinstance(value, type) and issubclass(
            value, (keras_hub.models.Backbone, keras_hub.models.Task)
        ):
            converted_class(value)


_register_converted_models()

__all__ = [
    "CachedDoublyNormalizedAttention",
    "TransformerDecoder",
    "TransformerEncoder",
]
