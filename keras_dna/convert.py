"""Turn a model's MultiHeadAttention layers into DoublyNormalizedAttention.

    dna_model = keras_dna.convert.to_doubly_normalized(trained_mha_model)
    dna_model.compile(...); dna_model.fit(...)  # fine-tune with DNA

The weights are copied, so with `normalization="single"` the converted model
computes exactly what the original did.
"""

import keras

from keras_dna.attention import DoublyNormalizedAttention

__all__ = ["to_doubly_normalized"]


def to_doubly_normalized(
    model, normalization="double", causal_normalization=(), null_query=None
):
    """Returns a copy of `model` with every MultiHeadAttention replaced.

    Args:
        model: A built functional or `Sequential` Keras model (subclassed
            models cannot be cloned: build them with DoublyNormalizedAttention
            directly and load the weights with `set_weights`).
        normalization: `normalization` of the new layers.
        causal_normalization: Names of the layers that need
            `causal_normalization=True`: those in decoders that receive a
            causal `attention_mask` instead of `use_causal_mask=True`, and
            decoder cross-attention. `True` selects all attention layers.
        null_query: `True` or `False` sets `null_query` of every new layer
            (see `DoublyNormalizedAttention`); `None` (default) keeps each
            layer's own (`False` for a `MultiHeadAttention`).

    Returns:
        A new model sharing no variables with `model`; all weights equal.
        Mixing and null query logits a layer already had are kept; new
        ones start at their initial values.
    """
    if not isinstance(model, (keras.Sequential, keras.Model)) or not model.built:
        raise TypeError(
            "Argument `model` must be a built Keras model. "
            f"Received: {type(model).__name__}"
        )
    if null_query not in (None, True, False):
        raise TypeError(
            f"Argument `null_query` must be None, True or False. Received: {null_query!r}"
        )
    if causal_normalization is True:
        causal_names = None  # all
    elif isinstance(causal_normalization, (list, tuple, set, frozenset)):
        causal_names = set(causal_normalization)
    else:
        raise TypeError(
            "Argument `causal_normalization` must be True or a collection of "
            f"layer names. Received: {causal_normalization!r}"
        )
    seen = set()

    def replace(layer):
        if not isinstance(layer, keras.layers.MultiHeadAttention):
            return layer.__class__.from_config(layer.get_config())
        seen.add(layer.name)
        config = {
            **layer.get_config(),
            "normalization": normalization,
            "causal_normalization": causal_names is None or layer.name in causal_names,
        }
        if null_query is not None:
            config["null_query"] = null_query
        return DoublyNormalizedAttention.from_config(config)

    try:
        converted = keras.models.clone_model(model, clone_function=replace)
    except ValueError as error:
        raise TypeError(
            "Argument `model` could not be cloned (subclassed models cannot "
            f"be): {error}"
        ) from error
    if causal_names is not None and not causal_names <= seen:
        raise ValueError(
            "Argument `causal_normalization` names layers that are not "
            f"attention layers of the model: {sorted(causal_names - seen)}"
        )
    for old, new in zip(model.layers, converted.layers):
        if isinstance(new, DoublyNormalizedAttention):
            _copy_attention_weights(old, new)
        else:
            new.set_weights(old.get_weights())
    return converted


def _copy_attention_weights(old, new):
    """Copies sublayer by sublayer, and the per-head logits both layers have."""
    for name in ("_query_dense", "_key_dense", "_value_dense", "_output_dense", "_gate_dense"):
        if hasattr(old, name):
            getattr(new, name).set_weights(getattr(old, name).get_weights())
    for name in ("mixing_logits", "null_query_logits"):
        source = getattr(old, name, None)
        target = getattr(new, name, None)
        if source is not None and target is not None:
            target.assign(source)
