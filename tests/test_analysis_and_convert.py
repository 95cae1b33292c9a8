"""keras_dna.analysis on known inputs, and keras_dna.convert."""

import numpy as np
import pytest
import keras

import keras_dna
from keras_dna import analysis

WIDTH = 4


def _single_layer_model(layer_class, **kwargs):
    x = keras.Input((6, WIDTH))
    out = layer_class(num_heads=1, key_dim=WIDTH, use_bias=False, name="attention", **kwargs)(x, x)
    model = keras.Model(x, out)
    layer = model.get_layer("attention")
    identity = np.eye(WIDTH, dtype="float32")[:, None, :]
    layer.set_weights([identity, identity, identity, identity.reshape(1, WIDTH, WIDTH)])
    return model


def _dominant_key_inputs():
    """Every token points the same way; token 0 is twenty times longer, so
    every query's softmax favours key 0 by a wide margin."""
    x = np.ones((2, 6, WIDTH), "float32") * 0.5
    x[:, 0] *= 20.0
    return x


def test_softmax_explains_keys_away_and_dna_does_not():
    x = _dominant_key_inputs()
    softmax = analysis.collect_attention(_single_layer_model(keras.layers.MultiHeadAttention), x)
    double = analysis.collect_attention(_single_layer_model(keras_dna.DoublyNormalizedAttention), x)
    softmax_stats = analysis.explaining_away_statistics(softmax)
    double_stats = analysis.explaining_away_statistics(double)
    assert softmax_stats["min_column_sum"] < 0.01
    assert softmax_stats["share_below_bound"] == pytest.approx(5 / 6)
    assert double_stats["share_below_bound"] == 0.0
    assert double_stats["min_column_sum"] >= 1 / 6 - 1e-6
    for stats in (softmax_stats, double_stats):
        assert stats["keys"] == 2 * 6
        assert stats["mean_column_sum"] == pytest.approx(1.0, abs=1e-5)  # T queries over S = T keys


def test_recorded_weights_are_the_layers_weights(rng):
    tokens = keras.Input((7,), dtype="int32")
    x = keras.layers.Embedding(10, 8, mask_zero=True)(tokens)
    encoder = keras_dna.DoublyNormalizedAttention(2, 4, normalization="hybrid", name="encoder")
    decoder = keras.layers.MultiHeadAttention(2, 4, name="decoder")
    y = encoder(x, x)
    y = decoder(y, y, use_causal_mask=True)
    inner = keras.Model(tokens, y, name="inner")
    outer_input = keras.Input((7,), dtype="int32")
    model = keras.Model(outer_input, inner(outer_input))
    assert [layer.name for layer in analysis.attention_layers(model)] == ["encoder", "decoder"]
    data = rng.integers(1, 10, size=(3, 7)).astype("int32")
    data[0, 4:] = 0
    report = analysis.collect_attention(model, data)
    assert [(r.name, r.normalization) for r in report] == [("encoder", "hybrid"), ("decoder", "single")]
    embedded = model.layers[1].layers[1](data)
    _, expected = encoder(embedded, embedded, return_attention_scores=True)
    np.testing.assert_allclose(report[0].weights, np.asarray(expected), atol=1e-6)
    assert (report[0].valid_keys[0] == (np.arange(7) < 4)).all()
    causal = np.tril(np.ones((7, 7), bool))
    assert (report[1].valid[1:] == causal).all()
    # The padding mask travels with the encoder's output into the decoder.
    padded = np.arange(7) < 4
    assert (report[1].valid[0] == causal & padded[:, None] & padded[None, :]).all()
    summary = analysis.summarize(report)
    assert set(summary) == {"encoder", "decoder", "all"}
    assert summary["encoder"]["share_below_bound"] == 0.0
    # The layers behave as before once recording ends.
    assert "_compute_attention" not in vars(encoder)


def test_plot_writes_a_png(tmp_path):
    x = _dominant_key_inputs()
    reports = {
        "softmax": analysis.collect_attention(_single_layer_model(keras.layers.MultiHeadAttention), x),
        "double": analysis.collect_attention(_single_layer_model(keras_dna.DoublyNormalizedAttention), x),
    }
    path = analysis.plot_attention(reports, tmp_path / "attention.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_analysis_needs_attention_layers():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="MultiHeadAttention"):
        analysis.collect_attention(model, np.zeros((1, 3)))


def _mha_model():
    keras.utils.set_random_seed(4)
    tokens = keras.Input((9,), dtype="int32")
    # Large embeddings give peaked attention, where the normalizations differ.
    x = keras.layers.Embedding(20, 16, mask_zero=True, embeddings_initializer=keras.initializers.RandomNormal(stddev=3.0))(tokens)
    x = keras.layers.MultiHeadAttention(2, 8, name="encoder")(x, x)
    x = keras.layers.MultiHeadAttention(2, 8, name="decoder")(x, x, use_causal_mask=True)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(x))


@pytest.mark.parametrize("normalization", ["single", "double", "hybrid"])
def test_convert_copies_weights(rng, normalization):
    model = _mha_model()
    data = rng.integers(1, 20, size=(4, 9)).astype("int32")
    data[0, 5:] = 0
    converted = keras_dna.convert.to_doubly_normalized(
        model, normalization=normalization, causal_normalization=["decoder"]
    )
    layers = analysis.attention_layers(converted)
    assert all(isinstance(layer, keras_dna.DoublyNormalizedAttention) for layer in layers)
    assert [layer.causal_normalization for layer in layers] == [False, True]
    assert all(layer.normalization == normalization for layer in layers)
    for name in ("encoder", "decoder"):
        old, new = model.get_layer(name), converted.get_layer(name)
        np.testing.assert_array_equal(old.query_dense.kernel.numpy(), new.query_dense.kernel.numpy())
        assert new.query_dense.kernel is not old.query_dense.kernel
    valid_rows = data != 0  # padded queries differ: MHA's fused path is not zero there
    original = np.asarray(model(data))[valid_rows]
    got = np.asarray(converted(data))[valid_rows]
    original_weights = analysis.collect_attention(model, data)[0].weights
    converted_weights = analysis.collect_attention(converted, data)[0].weights
    if normalization == "single":
        # Outputs reach ~10: float32 rounding of MultiHeadAttention's fused
        # kernel against the explicit path is relative.
        np.testing.assert_allclose(got, original, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(converted_weights, original_weights, atol=1e-6)
    else:
        assert np.abs(converted_weights - original_weights).max() > 1e-2


def test_convert_rejects_what_it_cannot_convert():
    model = _mha_model()
    with pytest.raises(ValueError, match="not attention layers"):
        keras_dna.convert.to_doubly_normalized(model, causal_normalization=["head"])
    with pytest.raises(TypeError, match="causal_normalization"):
        keras_dna.convert.to_doubly_normalized(model, causal_normalization="decoder")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.attention = keras.layers.MultiHeadAttention(2, 4)

        def call(self, x):
            return self.attention(x, x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3, 4), "float32"))
    with pytest.raises(TypeError, match="cloned"):
        keras_dna.convert.to_doubly_normalized(subclassed)
