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
    assert analysis.attention_matrix(reports["double"][0]).heads == "head 0 (the only head)"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def _cross_attention_report():
    """Example 0: 3 of 5 queries and 4 of 7 keys are valid; example 1: all."""
    keras.utils.set_random_seed(2)
    queries = keras.Input((5,), dtype="int32")
    keys = keras.Input((7,), dtype="int32")
    q = keras.layers.Embedding(10, 8, mask_zero=True)(queries)
    k = keras.layers.Embedding(10, 8, mask_zero=True)(keys)
    out = keras_dna.DoublyNormalizedAttention(2, 4, name="cross")(q, k)
    model = keras.Model([queries, keys], out)
    query_ids = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], "int32")
    key_ids = np.array([[1, 2, 3, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]], "int32")
    return analysis.collect_attention(model, [query_ids, key_ids])


def test_attention_matrix_leaves_padding_out():
    (layer,) = _cross_attention_report()
    matrix = analysis.attention_matrix(layer, example=0)
    assert matrix.weights.shape == (3, 4)
    assert matrix.queries.tolist() == [0, 1, 2] and matrix.keys.tolist() == [0, 1, 2, 3]
    assert matrix.query_labels == ["0", "1", "2"]
    np.testing.assert_allclose(matrix.weights, layer.weights[0].mean(axis=0)[:3, :4])
    assert matrix.heads == "mean of 2 heads"
    one_head = analysis.attention_matrix(layer, example=0, head=1)
    np.testing.assert_allclose(one_head.weights, layer.weights[0, 1, :3, :4])
    assert one_head.heads == "head 1"
    assert analysis.attention_matrix(layer, example=1).weights.shape == (5, 7)


def test_attention_matrix_labels_per_position_or_per_valid_position():
    (layer,) = _cross_attention_report()
    every = analysis.attention_matrix(
        layer, query_labels=list("abcde"), key_labels=[b"k0", "k1", "k2", "k3", "x", "y", "z"]
    )
    valid_only = analysis.attention_matrix(
        layer, query_labels=list("abc"), key_labels=["k0", "k1", "k2", "k3"]
    )
    for matrix in (every, valid_only):
        assert matrix.query_labels == ["a", "b", "c"]
        assert matrix.key_labels == ["k0", "k1", "k2", "k3"]


def test_attention_matrix_rejects_bad_arguments():
    (layer,) = _cross_attention_report()
    with pytest.raises(ValueError, match="`query_labels`.*5.*3.*Received 4"):
        analysis.attention_matrix(layer, query_labels=list("abcd"))
    with pytest.raises(ValueError, match="`key_labels`"):
        analysis.attention_matrix(layer, key_labels=list("abcde"))
    with pytest.raises(ValueError, match="`key_labels`"):
        # Example 1 has no padding: 4 labels fit neither its 7 positions nor 7 valid keys.
        analysis.attention_matrix(layer, example=1, key_labels=list("abcd"))
    with pytest.raises(TypeError, match="`query_labels`"):
        analysis.attention_matrix(layer, query_labels="abc")
    with pytest.raises(ValueError, match="`head`"):
        analysis.attention_matrix(layer, head=2)
    with pytest.raises(ValueError, match="`example`"):
        analysis.attention_matrix(layer, example=2)
    with pytest.raises(TypeError, match="`layer`"):
        analysis.attention_matrix([layer])


def _plotted_figure(monkeypatch, *args, **kwargs):
    """Calls plot_attention and returns the figure it saved."""
    import matplotlib.figure

    saved = []
    original = matplotlib.figure.Figure.savefig

    def savefig(figure, *a, **k):
        saved.append(figure)
        return original(figure, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    analysis.plot_attention(*args, **kwargs)
    (figure,) = saved
    return figure


def test_plot_draws_the_trimmed_labelled_matrix(tmp_path, monkeypatch):
    report = _cross_attention_report()
    figure = _plotted_figure(
        monkeypatch, {"tiny_model": report}, tmp_path / "a.png", layers=("cross",), head=1,
        query_labels={"cross": ["<s>", "AH", "B", "", ""]}, key_labels=list("abcdefg"),
    )
    heatmap = figure.axes[0]
    assert heatmap.images[0].get_array().shape == (3, 4)
    np.testing.assert_allclose(heatmap.images[0].get_array(), report[0].weights[0, 1, :3, :4])
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["<s>", "AH", "B"]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == list("abcd")
    assert all(word in heatmap.get_title() for word in ("tiny_model", "cross", "double", "head 1"))
    assert any(axis.get_ylabel() == "attention weight" for axis in figure.axes)  # colour bar
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    # Long axes keep at most max_ticks labels.
    figure = _plotted_figure(monkeypatch, {"m": report}, tmp_path / "b.png", max_ticks=2)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["0", "2"]


def test_plot_rejects_bad_layers_and_labels(tmp_path):
    report = _cross_attention_report()
    with pytest.raises(ValueError, match="`layers`.*'decoder'"):
        analysis.plot_attention({"m": report}, tmp_path / "a.png", layers=("decoder",))
    with pytest.raises(ValueError, match="`query_labels`.*'crosss'"):
        analysis.plot_attention({"m": report}, tmp_path / "a.png", query_labels={"crosss": ["a"]})
    with pytest.raises(ValueError, match="`key_labels`"):
        analysis.plot_attention({"m": report}, tmp_path / "a.png", key_labels=["a", "b"])
    with pytest.raises(TypeError, match="`reports`"):
        analysis.plot_attention(report, tmp_path / "a.png")
    with pytest.raises(ValueError, match="`max_ticks`"):
        analysis.plot_attention({"m": report}, tmp_path / "a.png", max_ticks=0)
    assert not (tmp_path / "a.png").exists()


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


def test_convert_warns_nothing_and_compiles_the_copy_as_the_model_was(recwarn, rng):
    assert not keras_dna.convert.to_doubly_normalized(_mha_model()).compiled
    model = _mha_model()
    optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["null_query_logits"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss)
    converted = keras_dna.convert.to_doubly_normalized(model, null_query=True)
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)]
    assert converted.optimizer is not optimizer
    assert converted.optimizer.get_config() == optimizer.get_config()
    assert converted.loss.get_config() == loss.get_config()
    null_query_logits = converted.get_layer("encoder").null_query_logits
    assert not converted.optimizer._use_weight_decay(null_query_logits)
    # The optimizer knows the new logits.
    tokens = rng.integers(1, 20, size=(2, 9)).astype("int32")
    converted.fit(tokens, np.zeros((2, 9), "int32"), verbose=0)


def test_convert_rejects_what_it_cannot_convert():
    model = _mha_model()
    with pytest.raises(ValueError, match="not attention layers"):
        keras_dna.convert.to_doubly_normalized(model, causal_normalization=["head"])
    with pytest.raises(TypeError, match="causal_normalization"):
        keras_dna.convert.to_doubly_normalized(model, causal_normalization="decoder")

    class Subclassed(keras.Model):
        def __init__(self, heads=2, **kwargs):
            super().__init__(**kwargs)
            self.attention = keras.layers.MultiHeadAttention(heads, 4)

        def call(self, x):
            return self.attention(x, x)

    x = np.random.default_rng(0).normal(size=(1, 3, 4)).astype("float32")
    subclassed = Subclassed()
    subclassed(x)
    # Rebuilt from its config (its constructor's defaults), it converts.
    converted = keras_dna.convert.to_doubly_normalized(subclassed, normalization="single")
    assert isinstance(converted, Subclassed)
    assert isinstance(converted.attention, keras_dna.DoublyNormalizedAttention)
    np.testing.assert_allclose(np.asarray(converted(x)), np.asarray(subclassed(x)), atol=1e-6)

    class NeedsArgument(Subclassed):
        def __init__(self, width, **kwargs):
            super().__init__(**kwargs)

    needs = NeedsArgument(3)
    needs(x)
    with pytest.raises(TypeError, match="could not be copied"):
        keras_dna.convert.to_doubly_normalized(needs)


def test_set_attention_options_on_a_built_layer_equals_a_new_layer(rng):
    x = rng.normal(size=(2, 5, WIDTH)).astype("float32")
    layer = keras_dna.DoublyNormalizedAttention(2, 3, seed=0)
    layer(x, x)
    layer.set_attention_options(normalization="hybrid", null_query=True)
    assert layer.mixing_logits is not None and layer.null_query_logits is not None
    fresh = keras_dna.DoublyNormalizedAttention(2, 3, normalization="hybrid", null_query=True)
    fresh(x, x)
    fresh.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(layer(x, x)), np.asarray(fresh(x, x)), rtol=1e-6, atol=1e-6)
    # Options that need no logits drop them, from the weights too.
    layer.set_attention_options(normalization="double")
    assert layer.mixing_logits is None and layer.null_query_logits is None
    assert all("logits" not in w.path for w in layer.weights)
    with pytest.raises(ValueError, match="normalization"):
        layer.set_attention_options(normalization="triple")


class _BuildsAttention(keras.layers.Layer):
    """A layer of another library that builds its attention in `build`."""

    def build(self, input_shape):
        self.attention = keras.layers.MultiHeadAttention(1, WIDTH, name="inner")
        self.attention.build(input_shape, input_shape)

    def call(self, x):
        return self.attention(x, x)


class _ConvertsWhatItBuilds(_BuildsAttention):
    def convert_attention(self, options):
        self.received = options
        keras_dna.convert.make_doubly_normalized(
            self.attention, normalization=options["normalization"]
        )


def test_a_registered_attention_holder_converts_what_it_built(rng):
    keras_dna.convert.register_attention_holder(_BuildsAttention, _ConvertsWhatItBuilds)
    x = keras.Input((6, WIDTH))
    model = keras.Model(x, _BuildsAttention(name="holder")(x))
    converted = keras_dna.convert.to_doubly_normalized(model, normalization="hybrid")
    holder = converted.get_layer("holder")
    assert type(holder) is _ConvertsWhatItBuilds
    assert holder.received["normalization"] == "hybrid"
    assert isinstance(holder.attention, keras_dna.DoublyNormalizedAttention)
    assert holder.attention.normalization == "hybrid"


def test_registrations_check_their_classes():
    with pytest.raises(TypeError, match="target"):
        keras_dna.convert.register_attention_class(
            keras.layers.MultiHeadAttention, keras.layers.Dense
        )
    with pytest.raises(TypeError, match="convert_attention"):
        keras_dna.convert.register_attention_holder(_BuildsAttention, _BuildsAttention)


def test_class_mixins_registered_twice_are_mixed_in_once():
    class Mixin:
        pass

    class Model(keras.Model):
        pass

    def mixins_of(cls):
        return (Mixin,) if issubclass(cls, Model) else ()

    # As a module imported again registers its function anew.
    keras_dna.convert.register_class_mixins(mixins_of)
    keras_dna.convert.register_class_mixins(mixins_of)
    converted = keras_dna.convert.converted_class(Model)
    assert [base for base in converted.__mro__ if base is Mixin] == [Mixin]
