"""Each use of Keras's and keras-hub's internals (`keras_dna._compat`) still
works on the installed releases; a failure names the entry that moved."""

import importlib
import inspect

import keras
import numpy as np
import pytest

from keras_dna import _compat

MOVED = "keras_dna._compat.{}: Keras or keras-hub moved what it relies on ({})"


def _resolve(path):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _built_instances():
    """A built instance of each class in `PRIVATE_HOOKS`, for the attributes
    that exist only on instances."""
    import keras_hub

    mha = keras.layers.MultiHeadAttention(2, 4, use_gate=True)
    x = np.zeros((1, 3, 8), "float32")
    mha(x, x)
    encoder = keras_hub.layers.TransformerEncoder(16, 2)
    encoder.build((1, 3, 8))
    decoder = keras_hub.layers.TransformerDecoder(16, 2)
    decoder.build((1, 3, 8), (1, 3, 8))
    gqa = keras.layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2)
    gqa(x, x)
    return {
        "keras.layers.GroupQueryAttention": gqa,
        "keras.layers.MultiHeadAttention": mha,
        "keras_hub.layers.TransformerEncoder": encoder,
        "keras_hub.layers.TransformerDecoder": decoder,
    }


def test_private_hooks_exist():
    instances = _built_instances()
    for path, names in _compat.PRIVATE_HOOKS.items():
        target = instances.get(path) or _resolve(path)
        missing = [name for name in names if not hasattr(target, name)]
        assert not missing, MOVED.format("PRIVATE_HOOKS", f"{path} has no {missing}")


def test_private_hooks_we_override_keep_their_arguments():
    """The overridden methods take what keras_dna's overrides pass on."""
    mha = keras.layers.MultiHeadAttention
    expected = {
        mha._compute_attention: [
            "self", "query", "key", "value", "attention_mask", "training",
            "return_attention_scores",
        ],
        mha._compute_attention_mask: [
            "self", "query", "value", "query_mask", "value_mask", "key_mask",
            "attention_mask", "use_causal_mask",
        ],
        mha._compute_causal_mask: ["self", "query", "value"],
        mha._build_attention: ["self", "rank"],
    }
    for method, names in expected.items():
        parameters = list(inspect.signature(method).parameters)
        assert parameters[: len(names)] == names, MOVED.format(
            "PRIVATE_HOOKS", f"MultiHeadAttention.{method.__name__}{tuple(parameters)}"
        )


def test_keras_mask_accessors_are_the_ones_keras_layers_use():
    x = keras.ops.convert_to_tensor(np.array([[1.0, 0.0, 2.0]], "float32"))
    masked = keras.layers.Masking(0.0)(x[..., None])
    mask = _compat.get_keras_mask(masked)
    assert mask is not None, MOVED.format("get_keras_mask", "Masking's output mask")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), [[True, False, True]])
    y = keras.ops.multiply(x, 1)
    _compat.set_keras_mask(y, keras.ops.convert_to_tensor([[True, True, False]]))
    # A mask set with the accessor reaches a layer's `compute_mask` input.
    seen = {}

    class Probe(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.supports_masking = True

        def call(self, inputs, mask=None):
            seen["mask"] = mask
            return inputs

    Probe()(y)
    assert seen["mask"] is not None, MOVED.format("set_keras_mask", "a layer's `mask` argument")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(seen["mask"]), [[True, True, False]])


def test_child_layers_and_flatten_layers():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.inner = keras.layers.Dense(2)

        def call(self, x):
            return self.inner(x)

    block = Block()
    model = keras.Sequential([keras.Input((3,)), block])
    assert _compat.child_layers(block) == [block.inner], MOVED.format("child_layers", "Layer._layers")
    assert block.inner in _compat.flatten_layers(model), MOVED.format(
        "flatten_layers", "Layer._flatten_layers"
    )


def test_attention_axes_of_a_built_layer():
    layer = keras.layers.MultiHeadAttention(2, 4)
    x = np.zeros((1, 3, 5, 8), "float32")
    layer(x, x)
    assert _compat.attention_axes(layer) == (1, 2), MOVED.format(
        "attention_axes", "MultiHeadAttention._attention_axes"
    )


def test_weights_addable_after_build():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    with pytest.raises(ValueError, match="already built"):
        dense.add_weight(shape=(1,), name="before")
    with _compat.weights_addable(dense):
        added = dense.add_weight(shape=(1,), name="added")
    assert any(w is added for w in dense.weights), MOVED.format("weights_addable", "Layer._tracker")
    # Locked again afterwards.
    with pytest.raises(ValueError, match="already built"):
        dense.add_weight(shape=(1,), name="after")


def test_swap_class_keeps_weights_and_reads_the_new_call():
    class WithScale(keras.layers.Dense):
        def call(self, inputs, scale=1.0):
            return super().call(inputs) * scale

    dense = keras.layers.Dense(2)
    x = np.ones((1, 3), "float32")
    plain = keras.ops.convert_to_numpy(dense(x))
    weights = [keras.ops.convert_to_numpy(w) for w in dense.weights]
    _compat.swap_class(dense, WithScale)
    assert isinstance(dense, WithScale)
    # Keras routes `scale` to `call` only if it read the new signature.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dense(x, scale=2.0)), 2 * plain, rtol=1e-6)
    for before, after in zip(weights, dense.weights):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(after))


def test_intercepted_sees_each_call_and_restores_the_method():
    layer = keras.layers.MultiHeadAttention(2, 4)
    x = np.random.default_rng(0).normal(size=(1, 3, 8)).astype("float32")
    expected = keras.ops.convert_to_numpy(layer(x, x))
    calls = []

    def compute_attention(original, *args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    with _compat.intercepted(layer, "_compute_attention", compute_attention):
        output = layer(x, x)
    assert len(calls) == 1, MOVED.format("intercepted", "MultiHeadAttention._compute_attention")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(output), expected, rtol=1e-6)
    assert "_compute_attention" not in vars(layer)


def test_weight_decay_exclusions():
    dense = keras.layers.Dense(2)
    dense.build((1, 3))
    optimizer = keras.optimizers.AdamW(weight_decay=0.1)
    assert _compat.weight_decay_exclusions(optimizer, dense.variables) == ([], None)
    optimizer.exclude_from_weight_decay(var_list=[dense.bias], var_names=["logits"])
    excluded, pattern = _compat.weight_decay_exclusions(optimizer, dense.variables)
    moved = MOVED.format("weight_decay_exclusions", "BaseOptimizer._exclude_from_weight_decay*")
    assert [v.path for v in excluded] == [dense.bias.path] and pattern == "logits", moved


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's trainer")
def test_in_multi_worker_mode():
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # No TF_CONFIG: one worker.
    assert _compat.in_multi_worker_mode(strategy) is False


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's trainer")
def test_creation_strategy():
    import tensorflow as tf

    outside = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        inside = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        # The current strategy is not the one a model was created under.
        assert _compat.creation_strategy(outside) is None, MOVED.format(
            "creation_strategy", "Model._distribute_strategy"
        )
    assert _compat.creation_strategy(inside) is strategy


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's trainer")
def test_replace_tensorflow_trainer_steps(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    # Restored after the test: the replacement is for the whole process.
    monkeypatch.setattr(trainer, "reduce_per_replica", trainer.reduce_per_replica)
    build = trainer.TensorFlowTrainer._maybe_symbolic_build
    monkeypatch.setattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build", build)
    monkeypatch.setattr(trainer, "_keras_dna_steps_replaced", False, raising=False)
    originals = {}

    def replacing(name):
        def replace(original):
            originals[name] = original

            def replacement(*args, **kwargs):
                return original(*args, **kwargs)

            return replacement

        return replace

    assert not _compat.tensorflow_trainer_steps_replaced()
    assert _compat.replace_tensorflow_trainer_steps(replacing("reduce"), replacing("build"))
    assert _compat.tensorflow_trainer_steps_replaced()
    assert originals["build"] is build, MOVED.format(
        "replace_tensorflow_trainer_steps", "TensorFlowTrainer._maybe_symbolic_build"
    )
    assert trainer.reduce_per_replica.__name__ == "replacement"
    assert trainer.TensorFlowTrainer._maybe_symbolic_build.__name__ == "replacement"
    assert not _compat.replace_tensorflow_trainer_steps(replacing("reduce"), replacing("build"))


def test_softmax_path_wraps_keras_hubs_predicate_for_the_block_only():
    import sys

    from keras_hub.src.models.llama.llama_attention import LlamaAttention
    from keras_hub.src.utils.keras_utils import fused_attention_op_available

    module = sys.modules[LlamaAttention.__module__]
    assert _compat.softmax_path_available(LlamaAttention)
    assert _compat.softmax_path_available(LlamaAttention)  # wrapped once
    wrapped = module.fused_attention_op_available
    assert wrapped.keras_dna_softmax_path
    assert wrapped() == fused_attention_op_available()
    with _compat.on_softmax_path():
        assert wrapped() is False
    assert wrapped() == fused_attention_op_available()
    assert not _compat.softmax_path_available(keras.layers.Dense)


def test_query_heads_of_keras_hubs_decoder_attention():
    from keras_hub.src.models.llama.llama_attention import LlamaAttention
    from keras_hub.src.models.mistral.mistral_attention import CachedMistralAttention

    assert _compat.query_heads(LlamaAttention(num_query_heads=4, num_key_value_heads=2)) == 4
    assert _compat.query_heads(CachedMistralAttention(num_query_heads=6, num_key_value_heads=2)) == 6
