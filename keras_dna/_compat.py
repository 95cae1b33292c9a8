"""Every use of Keras's and keras-hub's internals, in one place.

Each entry says which public API is missing and why keras_dna needs it;
`tests/test_compat.py` checks each one against the installed Keras and
keras-hub and names the entry when a release moves it. `setup.py` pins
Keras and keras-hub to the minor versions CI tests.

Besides the functions below, keras_dna's classes override private hooks of
the classes they extend, and read their private attributes:
`PRIVATE_HOOKS` lists them, for the same test.
"""

import contextlib
import contextvars
import inspect
import sys

# Keras has no public accessor for the mask a tensor carries (a tensor's
# `_keras_mask`); `MultiHeadAttention` and keras-hub's layers read it with
# these two, so DNA must read and write masks the same way.
from keras.src.backend import get_keras_mask  # noqa: F401
from keras.src.backend import set_keras_mask  # noqa: F401

# The private methods and attributes keras_dna's subclasses override or read,
# by the class that defines them. Keras's `MultiHeadAttention` has no public
# extension point for its attention step; `_compute_attention` is the one
# keras-hub's `CachedMultiHeadAttention` overrides too.
PRIVATE_HOOKS = {
    "keras.layers.MultiHeadAttention": (
        "_build_attention", "_compute_attention", "_compute_attention_mask",
        "_compute_causal_mask", "_dot_product_equation", "_combine_equation",
        "_attention_axes", "_inverse_sqrt_key_dim", "_query_dense", "_key_dense",
        "_value_dense", "_output_dense", "_dropout_layer", "_num_heads", "_key_dim",
        "_value_dim", "_use_gate", "_gate_dense",
    ),
    # keras-hub's Transformer layers: where they hold their attention and
    # build the decoder's causal mask (keras_dna.hub.transformer).
    "keras_hub.layers.TransformerEncoder": ("_self_attention_layer",),
    "keras_hub.layers.TransformerDecoder": (
        "_self_attention_layer", "_cross_attention_layer", "_compute_self_attention_mask",
    ),
    # Keras's `GroupQueryAttention`: its attention step and masks, and what
    # its build makes (keras_dna.layers.gqa_base).
    "keras.layers.GroupQueryAttention": (
        "_compute_attention", "_compute_attention_mask", "_compute_causal_mask",
        "_dot_product_equation", "_combine_equation", "_inverse_sqrt_head_dim",
        "_query_dense", "_key_dense", "_value_dense", "_output_dense", "_dropout_layer",
        "_flash_attention", "num_repeats",
    ),
    # keras-hub's decoder attention (keras_dna.hub.decoders): the attention
    # step that takes the softmax path, and the vLLM route it refuses.
    "keras_hub.src.models.llama.llama_attention.LlamaAttention": (
        "_compute_attention", "_compute_vllm_attention",
    ),
    # keras-hub's generation: the cache a language model fills with the
    # prompt before sampling (keras_dna.hub.generation), by model.
    "keras_hub.models.GPT2CausalLM": ("_build_cache",),
    "keras_hub.models.BartSeq2SeqLM": ("_build_cache",),
}


def child_layers(layer):
    """The layers `layer` tracks directly, models and plain layers alike.

    Keras exposes `Model.layers` only; a `Layer` that holds layers (a
    custom block, keras-hub's Transformer layers) lists them in `_layers`.
    """
    return list(getattr(layer, "_layers", []))


def flatten_layers(model):
    """`model` and every layer under it, each once.

    Keras's `Model.layers` lists the top level only; `_flatten_layers` is
    what Keras itself walks to find nested layers.
    """
    return list(model._flatten_layers())


def attention_axes(layer):
    """The attention axes of a built `MultiHeadAttention`, as a tuple.

    The constructor argument is in the config, but `None` there; the axes
    the layer resolved when built are not exposed.
    """
    return tuple(layer._attention_axes)


@contextlib.contextmanager
def weights_addable(layer):
    """Lets `layer` add weights after it is built.

    Keras locks a layer's tracker once `build` returns, and has no public
    way to add a weight (or a sublayer) later; DNA adds its per-head logits
    when a built layer (one `keras_dna.convert` swaps in) takes new options,
    and its softmax to keras-hub's decoder attention
    (`keras_dna.hub.decoders`).
    """
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if locked:
            layer._tracker.lock()


def swap_class(layer, cls):
    """Makes the built `layer` an instance of its subclass `cls` in place.

    Keras has no public way to change a layer's class while keeping its
    weights, name and place in a model's graph; recreating it from its
    config would not keep the graph of a functional model that holds it.
    Keras reads the call signature once, at construction, so it is read
    again from the new class.
    """
    layer.__class__ = cls
    layer._call_signature = inspect.signature(layer.call)
    layer.call_signature_parameters = list(layer._call_signature.parameters)


@contextlib.contextmanager
def intercepted(layer, method, replacement):
    """Replaces one method of one layer instance within the block.

    `replacement(original, *args, **kwargs)` is called with the layer's own
    bound method. Keras has no public hook to observe the attention weights
    of a layer inside a model's call; the analysis shadows
    `MultiHeadAttention._compute_attention`, and the `call` of the softmax
    of keras-hub's decoder attention. An instance attribute shadows the
    method for this layer only, and is removed on exit.
    """
    original = getattr(layer, method)

    def call(*args, **kwargs):
        return replacement(original, *args, **kwargs)

    object.__setattr__(layer, method, call)
    try:
        yield
    finally:
        object.__delattr__(layer, method)


def weight_decay_exclusions(optimizer, variables):
    """What `optimizer.exclude_from_weight_decay` was given: the ones of
    `variables` it excludes by identity (`var_list`), and the regular
    expression its `var_names` became (`None` without names).

    Keras keeps both in private attributes, out of the optimizer's config;
    `keras_dna.convert` compiles a converted model with a new optimizer of
    that config, and must exclude the same variables from weight decay.
    """
    excluded_keys = getattr(optimizer, "_exclude_from_weight_decay", set())
    excluded_variables = [v for v in variables if optimizer._var_key(v) in excluded_keys]
    pattern = getattr(optimizer, "_exclude_from_weight_decay_pattern", None)
    return excluded_variables, None if pattern is None else pattern.pattern


def in_multi_worker_mode(strategy):
    """Whether a `tf.distribute.MultiWorkerMirroredStrategy` runs on several
    workers (TensorFlow has no public accessor for it)."""
    return strategy.extended._in_multi_worker_mode()


def tensorflow_trainer_steps_replaced():
    """Whether `replace_tensorflow_trainer_steps` has run in this process."""
    from keras.src.backend.tensorflow import trainer

    return getattr(trainer, "_keras_dna_steps_replaced", False)


def creation_strategy(model):
    """The `tf.distribute` strategy `model` was created under, or `None`.

    `Model.distribute_strategy` falls back to the current strategy; Keras's
    trainer reads the one the model was created under, and so must a
    replacement of its steps.
    """
    return model._distribute_strategy


def replace_tensorflow_trainer_steps(reduce_per_replica, maybe_symbolic_build):
    """Replaces two steps of Keras's TensorFlow trainer, once per process.

    Each argument takes Keras's own function and returns its replacement:
    `reduce_per_replica` (the trainer module's) and `maybe_symbolic_build`
    (`TensorFlowTrainer._maybe_symbolic_build`). Keras's `fit` fails under
    `MultiWorkerMirroredStrategy` in those two steps (keras-team/keras#20585)
    and offers no public hook into either. Returns whether it replaced them
    now (`False`: an earlier call did).
    """
    from keras.src.backend.tensorflow import trainer

    if tensorflow_trainer_steps_replaced():
        return False
    trainer.reduce_per_replica = reduce_per_replica(trainer.reduce_per_replica)
    trainer_class = trainer.TensorFlowTrainer
    trainer_class._maybe_symbolic_build = maybe_symbolic_build(trainer_class._maybe_symbolic_build)
    trainer._keras_dna_steps_replaced = True
    return True


# keras-hub's decoder attention layers (Llama, Mistral, Gemma, Qwen, Phi3,
# ...) choose a fused softmax kernel by a module-level predicate,
# `fused_attention_op_available()`, with no argument to turn it off; the
# kernel takes no per-key causal normalizer, so DNA must take their other
# path, where a `keras.layers.Softmax` computes the weights. The predicate
# of each such module is wrapped once: within `on_softmax_path()` (a
# context variable: per call and thread, never the layer's state) it says
# no, elsewhere it answers as before.
_SOFTMAX_PATH = contextvars.ContextVar("softmax_path", default=False)
_PREDICATE = "fused_attention_op_available"


def softmax_path_available(cls):
    """Whether the module of keras-hub's attention class `cls` chooses its
    kernel by `fused_attention_op_available`; wraps it (once) if so."""
    module = sys.modules[cls.__module__]
    predicate = getattr(module, _PREDICATE, None)
    if predicate is None:
        return False
    if not getattr(predicate, "keras_dna_softmax_path", False):

        def fused_attention_op_available():
            return False if _SOFTMAX_PATH.get() else predicate()

        fused_attention_op_available.keras_dna_softmax_path = True
        setattr(module, _PREDICATE, fused_attention_op_available)
    return True


@contextlib.contextmanager
def on_softmax_path():
    """Within the block, keras-hub's wrapped predicates say no fused kernel runs."""
    token = _SOFTMAX_PATH.set(True)
    try:
        yield
    finally:
        _SOFTMAX_PATH.reset(token)


def query_heads(layer):
    """The number of query heads of keras-hub's decoder attention `layer`.

    Public as `num_query_heads` on every family's attention but Mistral's,
    which keeps it as `_num_query_heads` (tested with each family in
    `tests/test_hub_decoders.py`)."""
    heads = getattr(layer, "num_query_heads", None)
    return layer._num_query_heads if heads is None else heads


def cached_head_dim(layer):
    """The width of one key or value head in keras-hub's decoder attention
    `layer`'s cache.

    The families name it differently (`head_dim`, `_head_dim`, or not at
    all, computing it in `build`), but each projects values with an
    `EinsumDense` named `_value_dense` or `value_dense` whose kernel ends
    with the head width (tested with each family in
    `tests/test_hub_decoders.py`)."""
    projection = getattr(layer, "_value_dense", None) or layer.value_dense
    return projection.kernel.shape[-1]
