"""Serialization, XLA and mixed precision of DoublyNormalizedAttention."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_dna
from keras_dna import DoublyNormalizedAttention

NORMALIZATIONS = ["double", "single", "hybrid"]


def _tiny_model(normalization="double", dtype=None):
    """Encoder self-attention plus causal decoder and cross-attention."""
    source = keras.Input((6,), dtype="int32")
    target = keras.Input((5,), dtype="int32")
    embed = keras.layers.Embedding(20, 8, mask_zero=True, dtype=dtype)
    x = embed(source)
    x = DoublyNormalizedAttention(
        2, 4, normalization=normalization, dtype=dtype, name="encoder_attention"
    )(x, x)
    y = keras.layers.Embedding(20, 8, dtype=dtype)(target)
    y = DoublyNormalizedAttention(2, 4, normalization=normalization, dtype=dtype)(
        y, y, use_causal_mask=True
    )
    y = DoublyNormalizedAttention(
        2, 4, normalization=normalization, causal_normalization=True, dtype=dtype
    )(y, x)
    logits = keras.layers.Dense(3, dtype=dtype)(keras.layers.GlobalAveragePooling1D()(y))
    return keras.Model([source, target], logits)


def _data(seed=0, n=16):
    rng = np.random.default_rng(seed)
    source = rng.integers(1, 20, size=(n, 6)).astype("int32")
    source[: n // 2, 4:] = 0  # padding
    target = rng.integers(1, 20, size=(n, 5)).astype("int32")
    labels = rng.integers(0, 3, size=(n,)).astype("int32")
    return [source, target], labels


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_config_round_trip(normalization):
    layer = DoublyNormalizedAttention(
        3, 5, value_dim=6, dropout=0.1, output_shape=(4,), attention_axes=(1,),
        sliding_window=3, use_gate=True, seed=7, normalization=normalization,
        causal_normalization=True, kernel_regularizer="l2", name="dna",
    )
    config = layer.get_config()
    assert config["normalization"] == normalization
    assert config["causal_normalization"] is True
    clone = DoublyNormalizedAttention.from_config(config)
    assert clone.get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is DoublyNormalizedAttention
    assert restored.get_config() == config


def test_saved_model_loads_in_a_fresh_process_and_trains_on(tmp_path):
    keras.utils.set_random_seed(0)
    model = _tiny_model("hybrid")
    # Without XLA, here and in the fresh process (the compile config is
    # saved): test_fit_with_jit_compile trains under XLA, and two XLA
    # compilations took most of this test's minute.
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    inputs, labels = _data()
    model.fit(inputs, labels, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    np.savez(tmp_path / "data.npz", source=inputs[0], target=inputs[1], labels=labels,
             expected=model.predict(inputs, verbose=0))
    script = textwrap.dedent(f"""
        import numpy as np, keras
        import keras_dna  # registers the layer
        data = np.load({str(tmp_path / "data.npz")!r})
        model = keras.models.load_model({path!r})
        inputs = [data["source"], data["target"]]
        got = model.predict(inputs, verbose=0)
        print("max_error", float(np.abs(got - data["expected"]).max()))
        layer = model.get_layer("encoder_attention")
        assert type(layer).__name__ == "DoublyNormalizedAttention", type(layer)
        assert layer.normalization == "hybrid"
        before = layer.mixing_logits.numpy().copy()
        history = model.fit(inputs, data["labels"], epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert np.abs(layer.mixing_logits.numpy() - before).max() > 0
        print("trained")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
        cwd=os.path.dirname(os.path.dirname(keras_dna.__file__)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    error = float(result.stdout.split("max_error")[1].split()[0])
    assert error < 1e-6
    assert "trained" in result.stdout


@pytest.fixture(scope="module")
def xla_case():
    rng = np.random.default_rng(5)
    query = rng.normal(size=(2, 40, 8)).astype("float32")
    value = rng.normal(size=(2, 40, 8)).astype("float32")
    mask = rng.random((2, 40, 40)) < 0.8
    return query, value, mask


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_xla_equals_eager(xla_case, normalization):
    query, value, mask = xla_case
    layer = DoublyNormalizedAttention(2, 4, normalization=normalization)
    layer(query, value)

    def run(q, v, m):
        return (
            layer(q, v, attention_mask=m),
            layer(q, v, use_causal_mask=True),
            layer(q, v, attention_mask=m, use_causal_mask=True),
        )

    compiled = tf.function(run, jit_compile=True)
    for eager, xla in zip(run(query, value, mask), compiled(query, value, mask)):
        np.testing.assert_allclose(xla.numpy(), eager.numpy(), atol=1e-5)


def test_fit_with_jit_compile():
    keras.utils.set_random_seed(1)
    model = _tiny_model()
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    inputs, labels = _data(n=32)
    history = model.fit(inputs, labels, epochs=8, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    eager = model(inputs, training=False).numpy()
    compiled = model.predict(inputs, verbose=0)
    np.testing.assert_allclose(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 2e-2), ("mixed_bfloat16", 1e-1)])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mixed_precision_is_close_to_float32(policy, tolerance, normalization):
    rng = np.random.default_rng(2)
    query = rng.normal(size=(2, 6, 8)).astype("float32")
    mask = rng.random((2, 6, 6)) < 0.8
    reference = DoublyNormalizedAttention(2, 4, normalization=normalization)
    mixed = DoublyNormalizedAttention(2, 4, normalization=normalization, dtype=policy)
    reference(query, query)
    mixed(query, query)
    mixed.set_weights(reference.get_weights())
    for kwargs in ({"attention_mask": mask}, {"use_causal_mask": True}):
        want, want_w = reference(query, query, return_attention_scores=True, **kwargs)
        got, got_w = mixed(query, query, return_attention_scores=True, **kwargs)
        assert got.dtype == mixed.compute_dtype
        assert np.isfinite(got.numpy().astype("float32")).all()
        np.testing.assert_allclose(got.numpy().astype("float32"), want.numpy(), atol=tolerance)
        np.testing.assert_allclose(got_w.numpy().astype("float32"), want_w.numpy(), atol=tolerance)


def test_mixed_precision_training_has_finite_gradients():
    keras.utils.set_random_seed(3)
    model = _tiny_model("hybrid", dtype="mixed_bfloat16")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    inputs, labels = _data()
    history = model.fit(inputs, labels, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(np.isfinite(w).all() for w in model.get_weights())
