"""Turn a model's attention layers into doubly-normalized attention.

    dna_model = keras_dna.convert.to_doubly_normalized(trained_mha_model)
    dna_model.compile(...); dna_model.fit(...)  # fine-tune with DNA

The conversion reaches every attention layer: graph nodes of functional
models (nested ones too), attention held by custom layers and subclassed
models, keras-hub's Transformer layers, backbones and task models. Each
`MultiHeadAttention` becomes a `DoublyNormalizedAttention` in place (its
class is swapped: same weights, names and sublayers), each
`GroupQueryAttention` a `DoublyNormalizedGroupQueryAttention`, keras-hub's
`CachedMultiHeadAttention` a `keras_dna.hub.CachedDoublyNormalizedAttention`.
A layer or model that builds attention itself (so would build softmax again
when loaded) becomes an instance of a registered subclass of its own class,
`DoublyNormalized<Class>`, that converts what it builds: the converted model
saves to `.keras` and loads as DNA. With `normalization="single"` it
computes exactly what the original did.
"""

import functools
import importlib
import sys

import keras

from keras_dna._compat import child_layers
from keras_dna._compat import flatten_layers
from keras_dna._compat import swap_class
from keras_dna._compat import weight_decay_exclusions
from keras_dna.layers import DoublyNormalizedAttention
from keras_dna.layers import DoublyNormalizedGroupQueryAttention
from keras_dna.layers.double_normalization import DoubleNormalizationMixin
from keras_dna.ops.checks import check_normalization

__all__ = [
    "attention_options_of", "converted_class", "make_doubly_normalized",
    "register_attention_class", "register_attention_holder", "register_class_mixins",
    "to_doubly_normalized",
]

# The keyword arguments of `DoublyNormalizedAttention` a conversion may set.
ATTENTION_OPTIONS = (
    "normalization", "causal_normalization", "jit_compile", "chunk_size", "null_query",
    "null_query_initializer",
)


def to_doubly_normalized(
    model, normalization="double", causal_normalization=(), null_query=None
):
    """Returns a copy of `model` with every attention layer doubly normalized.

    Args:
        model: A built Keras model: functional, `Sequential`, subclassed (if
            it can be rebuilt from its config), or a keras-hub backbone or
            task model. An attention layer that keras_dna cannot convert
            (another class of attention) is a `ValueError` naming it.
        normalization: `normalization` of the new layers.
        causal_normalization: Names of the attention layers that need
            `causal_normalization=True`: those in decoders that receive a
            causal `attention_mask` instead of `use_causal_mask=True`, and
            decoder cross-attention. `True` selects all attention layers.
            keras-hub's decoders need no names: their self-attention
            normalizes causally with the causal mask they build, their
            cross-attention always.
        null_query: `True` or `False` sets `null_query` of every new layer
            (see `DoublyNormalizedAttention`); `None` (default) keeps each
            layer's own (`False` for a `MultiHeadAttention`).

    Returns:
        A new model of the same class (or of its `DoublyNormalized<Class>`
        subclass, see `converted_class`; a converted keras-hub causal LM
        generates through the DNA cache) sharing no variables with `model`;
        all weights equal. Mixing and null query logits a layer already had
        are kept; new ones start at their initial values. A compiled `model`
        gives a copy compiled the same way, with a new optimizer (same
        config and weight-decay exclusions, no state).
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise TypeError(
            f"Argument `model` must be a built Keras model. Received: {type(model).__name__}"
        )
    check_normalization(normalization)
    _load_integrations()
    options = _checked_tree_options(
        {"normalization": normalization, "causal_normalization": causal_normalization,
         "null_query": null_query}
    )
    copy = _copy(model)
    converted = _convert_tree(copy, options)
    if not converted:
        raise ValueError(
            f"Argument `model` ({type(model).__name__}) holds no MultiHeadAttention "
            "or GroupQueryAttention layer (nor keras-hub's CachedMultiHeadAttention, "
            "nor a layer that builds one) to convert."
        )
    causal = options["causal_normalization"]
    if causal is not True and not set(causal) <= set(converted):
        raise ValueError(
            "Argument `causal_normalization` names layers that are not "
            f"attention layers of the model: {sorted(set(causal) - set(converted))}"
        )
    if converted and not _is_plain_container(copy):
        _become_converted(copy, options)
    if model.compiled:
        _compile_like(copy, model)
    return copy


def _copy(model):
    """A copy of `model` with equal weights and no shared variables."""
    classes = {type(layer).__name__: type(layer) for layer in flatten_layers(model)}
    try:
        if _is_plain_container(model):
            copy = keras.models.clone_model(model, recursive=True)
        else:
            config = keras.saving.serialize_keras_object(model)
            # Compiled after the conversion (`_compile_like`): Keras's own
            # compiling from this config would skip a class with its own
            # `compile` (keras-hub's tasks) with a warning.
            config.pop("compile_config", None)
            copy = keras.saving.deserialize_keras_object(config, custom_objects=classes)
        copy.set_weights(model.get_weights())
        if getattr(model, "preprocessor", None) is not None:
            # keras-hub's preprocessors keep their vocabularies out of the
            # config (as assets); they hold no weights, so the copy shares it.
            copy.preprocessor = model.preprocessor
    except (TypeError, ValueError, NotImplementedError) as error:
        raise TypeError(
            f"Argument `model` ({type(model).__name__}) could not be copied from "
            "its config, so it cannot be converted: give its class a "
            "`get_config` that rebuilds it, or build it with "
            f"DoublyNormalizedAttention directly. ({error})"
        ) from error
    return copy


def _compile_like(copy, model):
    """Compiles the converted `copy` with what `model` was compiled with: a
    new optimizer of the same config, excluding the same variables from
    weight decay, the same loss and metrics, and a keras-hub language
    model's sampler (an argument of its `compile` that Keras's compile
    config lacks).

    Compiling after the conversion builds the optimizer for the copy's
    variables, its new per-head logits included: an optimizer built before
    knows only the variables it was built with, and `fit` fails.
    """
    arguments = keras.saving.deserialize_keras_object(model.get_compile_config())
    optimizer = keras.optimizers.get(arguments["optimizer"])
    excluded_variables, excluded_name_pattern = weight_decay_exclusions(
        model.optimizer, model.variables
    )
    if excluded_variables or excluded_name_pattern:
        # The copy's layers keep their names, so its variables have the
        # paths of the ones they copy.
        excluded_paths = {variable.path for variable in excluded_variables}
        optimizer.exclude_from_weight_decay(
            var_list=[variable for variable in copy.variables if variable.path in excluded_paths],
            var_names=[excluded_name_pattern] if excluded_name_pattern else None,
        )
    arguments["optimizer"] = optimizer
    sampler = getattr(model, "sampler", None)
    if sampler is not None:
        arguments["sampler"] = type(sampler).from_config(sampler.get_config())
    copy.compile(**arguments)


def checked_attention_options(name, options):
    """`options` as a dict, checked to hold only `ATTENTION_OPTIONS`."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(ATTENTION_OPTIONS))
    if unknown:
        raise ValueError(
            f"Argument `{name}` takes the keyword arguments {ATTENTION_OPTIONS} "
            f"of DoublyNormalizedAttention. Received unknown keys: {unknown}"
        )
    return options


# Conversions of other libraries' classes, registered by keras_dna's
# integration with each (`keras_dna.hub` for keras-hub): attention classes by
# the DNA class they become, layers that build attention by the class that
# converts what they build, and the mixins a converted class takes.
_ATTENTION_CLASSES = {}
_ATTENTION_HOLDERS = {}
_CLASS_MIXINS = {}

# The integrations, by the package they integrate: a model can only hold
# that package's classes once the package is imported.
_INTEGRATIONS = {"keras_hub": "keras_dna.hub"}


def _load_integrations():
    """Imports the integrations of the packages imported so far, so that
    their conversions are registered."""
    for package, integration in _INTEGRATIONS.items():
        if package in sys.modules:
            importlib.import_module(integration)


def register_attention_class(source, target):
    """Registers that attention layers of class `source` become `target`.

    Args:
        source: An attention layer class of another library whose call is
            `MultiHeadAttention`'s with extra arguments (keras-hub's
            `CachedMultiHeadAttention`).
        target: A DNA class that takes the call of `source` and holds the
            same weights: a subclass of `DoublyNormalizedAttention`, or of
            `source` with `keras_dna.hub.decoders.DecoderAttentionMixin`.
    """
    if not all(callable(getattr(target, name, None)) for name in ("set_attention_options", "adopt_attributes")):
        raise TypeError(
            "Argument `target` must be a DNA attention class: one with the "
            "methods `set_attention_options` and `adopt_attributes`, as "
            "DoublyNormalizedAttention has. "
            f"Received: source={source.__name__}, target={target.__name__}"
        )
    _ATTENTION_CLASSES[source] = target


def register_attention_holder(source, target):
    """Registers that layers of class `source`, which build their attention
    themselves, become `target`.

    Args:
        source: A layer class that builds attention layers.
        target: A subclass of `source` with a method
            `convert_attention(options)`: it takes the options of
            `to_doubly_normalized` and converts the attention it builds
            (and has built).
    """
    if not (issubclass(target, source) and callable(getattr(target, "convert_attention", None))):
        raise TypeError(
            "Argument `target` must subclass `source` and have a method "
            f"`convert_attention`. Received: source={source.__name__}, target={target.__name__}"
        )
    _ATTENTION_HOLDERS[source] = target


def register_class_mixins(mixins_of):
    """Registers `mixins_of(cls)`, the mixin classes that `converted_class(cls)`
    takes besides the conversion (keras-hub's causal LMs: generation through
    the DNA cache)."""
    # By name: a module imported again registers the same function anew.
    _CLASS_MIXINS[f"{mixins_of.__module__}.{mixins_of.__qualname__}"] = mixins_of


# Keras's attention layers and the DNA classes they become.
_KERAS_ATTENTION_CLASSES = {
    keras.layers.MultiHeadAttention: DoublyNormalizedAttention,
    keras.layers.GroupQueryAttention: DoublyNormalizedGroupQueryAttention,
}
# Keras's attention layers whose computation is not one DNA replaces.
_OTHER_ATTENTION = (keras.layers.Attention, keras.layers.AdditiveAttention)


def _attention_class(layer):
    """The DNA class `layer` becomes, `None` if it is no attention layer.

    Decided by what the layer is, never by its name: a layer that only holds
    attention layers is a container the conversion walks through."""
    cls = type(layer)
    if _is_dna(layer):
        return cls
    if cls in _KERAS_ATTENTION_CLASSES:
        return _KERAS_ATTENTION_CLASSES[cls]
    if cls in _ATTENTION_CLASSES:
        return _ATTENTION_CLASSES[cls]
    if isinstance(layer, tuple(_KERAS_ATTENTION_CLASSES) + _OTHER_ATTENTION):
        raise ValueError(
            f"Layer '{layer.name}' ({cls.__module__}.{cls.__name__}) is an attention "
            "layer keras_dna cannot convert: it is not MultiHeadAttention, "
            "GroupQueryAttention or keras-hub's CachedMultiHeadAttention, whose "
            "computation keras_dna's layers replace."
        )
    return None


def _is_dna(layer):
    """Whether `layer` is a DNA attention layer (keras_dna's, or a
    registered conversion's)."""
    return isinstance(layer, DoubleNormalizationMixin) or type(layer) in _ATTENTION_CLASSES.values()


def attention_options_of(layer):
    """The `ATTENTION_OPTIONS` of a DNA layer as its config holds them; `{}`
    for any other layer."""
    if not _is_dna(layer):
        return {}
    if hasattr(layer, "attention_options"):
        # keras-hub's decoder attention (`keras_dna.hub.decoders`): some of
        # their `get_config`s fail (Llama's reads an attribute it never set).
        return layer.attention_options()
    config = layer.get_config()
    return {name: config[name] for name in ATTENTION_OPTIONS}


def make_doubly_normalized(layer, **options):
    """Turns an attention layer into DNA in place; returns it.

    A `keras.layers.MultiHeadAttention` becomes a `DoublyNormalizedAttention`,
    a `keras.layers.GroupQueryAttention` a `DoublyNormalizedGroupQueryAttention`,
    keras-hub's `CachedMultiHeadAttention` a `CachedDoublyNormalizedAttention`,
    a DNA layer takes the new options. Weights, names and sublayers stay;
    per-head logits the layer already has are kept where the new options
    have them too.

    Args:
        layer: The attention layer.
        **options: Keyword arguments of `DoublyNormalizedAttention` (see
            `ATTENTION_OPTIONS`); unset ones keep the layer's own.
    """
    options = checked_attention_options("options", options)
    _load_integrations()
    cls = _attention_class(layer)
    if cls is None:
        raise TypeError(
            f"Argument `layer` must be an attention layer. Received: {type(layer).__name__}"
        )
    current = attention_options_of(layer)
    options = {**current, **options}
    if current == options and type(layer) is cls:
        return layer
    kept = {
        name: getattr(layer, name).numpy()
        for name in ("mixing_logits", "null_query_logits")
        if getattr(layer, name, None) is not None
    }
    swap_class(layer, cls)
    layer.adopt_attributes()
    layer.set_attention_options(**options)
    for name, value in kept.items():
        if getattr(layer, name) is not None:
            getattr(layer, name).assign(value)
    return layer


_CONVERTED_CLASSES = {}


# What `to_doubly_normalized` converts to by default.
DEFAULT_TREE_OPTIONS = {"normalization": "double", "causal_normalization": (), "null_query": None}


class _ConvertsAttention:
    """Mixed into `DoublyNormalized<Class>`: converts the attention the base
    class builds, in `__init__` and in `build` (see `_converting_build`),
    with the stored options."""

    def __init__(self, *args, attention_options=None, **kwargs):
        self._attention_options = _checked_tree_options(
            {**DEFAULT_TREE_OPTIONS, **(attention_options or {})}
        )
        super().__init__(*args, **kwargs)
        _convert_tree(self, self._attention_options)

    def get_config(self):
        return {**super().get_config(), "attention_options": dict(self._attention_options)}


def converted_class(cls):
    """`DoublyNormalized<cls>`: a registered subclass of the layer or model
    class `cls` that converts the attention it builds.

    `to_doubly_normalized` uses it for layers that build their own attention.
    To load a converted model in a new process, call it first for each such
    class of your own (keras-hub's are registered by `import keras_dna.hub`).
    """
    if issubclass(cls, _ConvertsAttention):
        return cls
    _load_integrations()
    if cls not in _CONVERTED_CLASSES:
        mixins = (_ConvertsAttention,)
        for mixins_of in _CLASS_MIXINS.values():
            mixins = tuple(mixins_of(cls)) + mixins
        name = f"DoublyNormalized{cls.__name__}"
        namespace = {
            "__module__": __name__, "__doc__": cls.__doc__, "build": _converting_build(cls.build),
        }
        converted = type(name, mixins + (cls,), namespace)
        _CONVERTED_CLASSES[cls] = keras.saving.register_keras_serializable(
            package="keras_dna"
        )(converted)
    return _CONVERTED_CLASSES[cls]


def _converting_build(base_build):
    """`base_build`, then the conversion of what it built.

    With `base_build`'s signature (and its mark when it is `Layer.build`,
    which Keras then never calls): Keras passes the input shapes by the
    names of `build`'s arguments."""

    @functools.wraps(base_build)
    def build(self, *args, **kwargs):
        base_build(self, *args, **kwargs)
        _convert_tree(self, self._attention_options)

    return build


def _is_plain_container(layer):
    """Functional and Sequential models serialize their layers' configs, so
    converted layers load as converted; any other class builds its own."""
    return type(layer) in (keras.Model, keras.Sequential) or (
        type(layer).__name__ == "Functional" and type(layer).__module__.startswith("keras.")
    )


def _convert_tree(root, options):
    """Converts every attention layer under `root`; returns their names."""
    # A converted class may build layers of a package imported since.
    _load_integrations()
    converted = []
    holders = tuple(_ATTENTION_HOLDERS.values())

    def visit(layer, ancestors):
        holder = _ATTENTION_HOLDERS.get(type(layer), type(layer))
        target = _attention_class(layer)
        if target is not None:
            make_doubly_normalized(layer, **_layer_options(layer, options))
        elif issubclass(holder, holders):
            # A registered holder (keras-hub's Transformer layers): its DNA
            # class converts what it builds.
            swap_class(layer, holder)
            layer.convert_attention(options)
        else:
            for child in child_layers(layer):
                visit(child, ancestors + [layer])
            return
        converted.append(layer.name)
        for ancestor in ancestors[1:]:
            if not _is_plain_container(ancestor) and not isinstance(ancestor, holders):
                _become_converted(ancestor, options)

    for child in child_layers(root):
        visit(child, [root])
    return converted


def _become_converted(layer, options):
    """Makes `layer` a `DoublyNormalized<Class>` that converts with `options`
    (and with what an earlier conversion set that `options` keeps)."""
    earlier = getattr(layer, "_attention_options", DEFAULT_TREE_OPTIONS)
    swap_class(layer, converted_class(type(layer)))
    layer._attention_options = _kept_tree_options(earlier, options)


def _kept_tree_options(earlier, options):
    """The options a layer converted with `earlier`, then with `options`,
    is left with: unset ones (`null_query=None`) keep their earlier value,
    and layers named causal stay causal, as `make_doubly_normalized` does."""
    causal = options["causal_normalization"]
    if causal is not True:
        before = earlier["causal_normalization"]
        causal = True if before is True else sorted(set(before) | set(causal))
    null_query = options["null_query"]
    return {
        "normalization": options["normalization"],
        "causal_normalization": causal,
        "null_query": earlier["null_query"] if null_query is None else null_query,
    }


def _layer_options(layer, options):
    causal = options.get("causal_normalization", ())
    return site_options(options, causal=causal is True or layer.name in causal)


def site_options(options, causal=False):
    """One attention layer's options from those of `to_doubly_normalized`."""
    site = {"normalization": options["normalization"]}
    if options.get("null_query") is not None:
        site["null_query"] = options["null_query"]
    if causal:
        site["causal_normalization"] = True
    return site


def _checked_tree_options(options):
    causal = options.get("causal_normalization", ())
    if not (causal is True or isinstance(causal, (list, tuple, set, frozenset))):
        raise TypeError(
            "Argument `causal_normalization` must be True or a collection of "
            f"layer names. Received: {causal!r}"
        )
    if options.get("null_query") not in (None, True, False):
        raise TypeError(
            "Argument `null_query` must be None, True or False. Received: "
            f"{options.get('null_query')!r}"
        )
    causal = causal if causal is True else sorted(causal)
    return {**options, "causal_normalization": causal}
