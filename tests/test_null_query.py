"""The null query (docs/math.md, "The null query") and the causal ceiling it lifts.

Properties 8 and 9 of docs/math.md.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dna
from keras_dna import DoublyNormalizedAttention
from keras_dna import ops as dna_ops
from tests import oracle
from tests.common import normalize
from tests.common import numeric_gradient
from tests.common import random_valid

HEADS = 3


@pytest.mark.parametrize("normalization", ["double", "hybrid"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_oracle(rng, normalization, causal, masked):
    scores = rng.normal(size=(2, HEADS, 6, 5)) * 3
    valid = random_valid(rng, (2, 1, 6, 5)) if masked else None
    mixing = rng.normal(size=HEADS)
    beta = np.array([-2.0, 0.5, 3.0])
    expected = oracle.attention_weights(scores, valid, normalization, causal, mixing, beta)
    for dtype, tol in (("float32", 2e-6), ("float64", 1e-12)):
        got = normalize(
            scores.astype(dtype), valid, normalization=normalization,
            causal_normalization=causal, mixing_logits=mixing, null_query_logits=beta,
        )
        assert got.dtype == dtype
        np.testing.assert_allclose(got, expected, atol=tol, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_extreme_spread_matches_oracle(rng, causal):
    # Scores rising by far more than exp() spans along the queries: the
    # causal fast path hands over to the exact scan, null query included.
    scores = rng.uniform(-1e3, 1e3, size=(1, HEADS, 30, 6))
    scores[:, :, 0] = -1e3
    scores[:, :, 1] = 1e3
    beta = np.array([-500.0, 0.0, 800.0])
    expected = oracle.attention_weights(scores, None, "double", causal, None, beta)
    got = normalize(scores, causal_normalization=causal, null_query_logits=beta)
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype, beta, tol", [("float64", 1e4, 1e-10), ("float32", 200.0, 2e-5)])
def test_limits_are_double_and_softmax(rng, causal, dtype, beta, tol):
    # Property 9 (docs/math.md): beta -> -inf is DNA, beta -> +inf is softmax.
    scores = (rng.normal(size=(2, HEADS, 7, 6)) * 3).astype(dtype)
    valid = random_valid(rng, (2, 1, 7, 6), keep=0.8)
    betas = np.full(HEADS, beta)
    low = normalize(scores, valid, causal_normalization=causal, null_query_logits=-betas)
    high = normalize(scores, valid, causal_normalization=causal, null_query_logits=betas)
    double = normalize(scores, valid, causal_normalization=causal)
    softmax = normalize(scores, valid, normalization="single")
    np.testing.assert_allclose(low, double, atol=tol, rtol=0)
    np.testing.assert_allclose(high, softmax, atol=tol, rtol=0)
    # The two limits differ, so each comparison means something.
    assert np.abs(double - softmax).max() > 0.05


def _causal_weights(scores, valid=None, beta=None):
    return normalize(scores, valid, causal_normalization=True, null_query_logits=beta)


def test_causal_ceiling_without_null_query(rng):
    # Property 8 (docs/math.md): the diagonal is the largest weight of its
    # row in causal self-attention, whatever the scores; at most half of a
    # row's weight goes to any one earlier key.
    scores = rng.normal(size=(4, HEADS, 9, 9)) * 4
    valid = np.tril(np.ones((9, 9), bool))
    weights = _causal_weights(scores, valid)
    diagonal = np.diagonal(weights, axis1=-2, axis2=-1)
    assert (diagonal >= weights.max(axis=-1) - 1e-12).all()
    earlier = np.where(np.tril(np.ones((9, 9), bool), -1), weights, 0.0)
    assert earlier.max() <= 0.5 + 1e-12


def test_causal_ceiling_lifted_by_null_query(rng):
    scores = rng.normal(size=(4, HEADS, 9, 9)) * 4
    valid = np.tril(np.ones((9, 9), bool))
    weights = _causal_weights(scores, valid, beta=np.full(HEADS, 2.0))
    diagonal = np.diagonal(weights, axis1=-2, axis2=-1)
    below_max = diagonal < weights.max(axis=-1) - 1e-3
    # Row 0 has only its diagonal; elsewhere, earlier keys now win.
    assert below_max[..., 1:].mean() > 0.2
    earlier = np.where(np.tril(np.ones((9, 9), bool), -1), weights, 0.0)
    assert earlier.max() > 0.5


@pytest.mark.parametrize("beta, uniform", [(None, True), (1.0, False)])
def test_first_cross_attention_query(rng, beta, uniform):
    # Causal cross-attention: the first query alone is in every key's sum,
    # so without a null query it attends uniformly to its valid keys.
    scores = rng.normal(size=(3, HEADS, 5, 7)) * 4
    valid = random_valid(rng, (3, 1, 1, 7), keep=0.7)
    valid[..., 0] = True
    weights = _causal_weights(scores, valid, None if beta is None else np.full(HEADS, beta))
    first = weights[..., 0, :]
    counts = np.broadcast_to(valid[..., 0, :], first.shape).sum(-1, keepdims=True)
    spread = np.abs(np.where(np.broadcast_to(valid[..., 0, :], first.shape), first - 1 / counts, 0))
    assert (spread.max() < 1e-12) == uniform


def test_lower_bound_weakens_gracefully(rng):
    # With the null query, the column sums of B are 1 - exp(beta - c[j]),
    # so A's column sums are at least that over the widest row (docs/math.md,
    # "The null query").
    scores = rng.normal(size=(2, HEADS, 6, 5)) * 2
    # Key 0 scores far below the null query for every query: the null query
    # takes almost all of its mass, where DNA alone would give it 1.
    scores[..., 0] -= 10.0
    valid = random_valid(rng, (2, 1, 6, 5), keep=0.8)
    valid[..., 0, :] = True
    beta = np.array([-1.0, 0.0, 1.0])
    weights = normalize(scores, valid, null_query_logits=beta)
    m = np.broadcast_to(valid, scores.shape)
    column_lse = np.log(np.where(m, np.exp(scores), 0.0).sum(-2))
    c = np.logaddexp(column_lse, beta[:, None])
    widest = m.sum(-1).max(-1)[..., None]
    bound = (1 - np.exp(beta[:, None] - c)) / widest
    column_sums = weights.sum(-2)
    assert (column_sums >= bound - 1e-12).all()
    assert (column_sums < 1.0 / widest).any()  # below DNA's bound: it did weaken


@pytest.mark.parametrize("normalization", ["double", "hybrid"])
@pytest.mark.parametrize("causal, spread", [(False, 0.0), (True, 0.0), (True, 400.0)])
def test_gradients_match_finite_differences(rng, normalization, causal, spread):
    # spread=400: scores rise by 800 along the queries, so the causal path
    # takes the exact scan forward and backward.
    scores = rng.normal(size=(1, HEADS, 5, 4))
    scores[..., 0, :] -= spread
    scores[..., 2, :] += spread
    valid = random_valid(rng, (1, 1, 5, 4), keep=0.8)
    valid[..., 0, 0] = True
    beta = rng.normal(size=HEADS)
    probe = rng.normal(size=scores.shape)
    mixing = rng.normal(size=HEADS)

    def loss(s, b):
        w = dna_ops.normalize_attention_scores(
            s, valid, normalization=normalization, causal_normalization=causal,
            mixing_logits=mixing, null_query_logits=b,
        )
        return tf.reduce_sum(w * probe)

    s_t, b_t = tf.constant(scores), tf.constant(beta)
    with tf.GradientTape() as tape:
        tape.watch([s_t, b_t])
        value = loss(s_t, b_t)
    grad_s, grad_b = tape.gradient(value, [s_t, b_t])
    numeric_s = numeric_gradient(lambda s: float(loss(s, beta)), scores)
    numeric_b = numeric_gradient(lambda b: float(loss(scores, b)), beta)
    np.testing.assert_allclose(grad_s.numpy(), numeric_s, atol=1e-8)
    np.testing.assert_allclose(grad_b.numpy(), numeric_b, atol=1e-8)
    assert np.abs(numeric_b).max() > 1e-4


def test_bad_null_query_arguments(rng):
    scores = rng.normal(size=(1, HEADS, 4, 4))
    with pytest.raises(ValueError, match="null_query_logits"):
        dna_ops.normalize_attention_scores(scores, null_query_logits=np.zeros(HEADS + 1))
    with pytest.raises(ValueError, match="single"):
        dna_ops.normalize_attention_scores(
            scores, normalization="single", null_query_logits=np.zeros(HEADS)
        )
    q = rng.normal(size=(1, 4, HEADS, 2))
    with pytest.raises(ValueError, match="null_query_logits"):
        dna_ops.doubly_normalized_attention(q, q, q, null_query_logits=np.zeros(2), chunk_size=2)
    with pytest.raises(ValueError, match="single"):
        DoublyNormalizedAttention(2, 4, normalization="single", null_query=True)
    with pytest.raises(TypeError, match="null_query"):
        DoublyNormalizedAttention(2, 4, null_query="yes")


def _null_layer(rng, **kwargs):
    layer = DoublyNormalizedAttention(
        num_heads=HEADS, key_dim=4, null_query=True, bias_initializer="random_normal", **kwargs
    )
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    layer(x, x)
    layer.null_query_logits.assign(rng.normal(size=HEADS))
    if layer.mixing_logits is not None:
        layer.mixing_logits.assign(rng.normal(size=HEADS))
    return layer, x


@pytest.mark.parametrize("normalization", ["double", "hybrid"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_matches_oracle(rng, normalization, causal):
    layer, x = _null_layer(rng, normalization=normalization)
    assert [w.name for w in layer.trainable_weights].count("null_query_logits") == 1
    assert tuple(layer.null_query_logits.shape) == (HEADS,)
    valid = oracle.validity(2, 6, 6, causal=causal)
    out, weights = layer(x, x, use_causal_mask=causal, return_attention_scores=True)
    expected_out, expected_weights = oracle.layer_forward(layer, x, x, valid=valid, causal=causal)
    np.testing.assert_allclose(np.asarray(weights), expected_weights, atol=2e-6)
    np.testing.assert_allclose(np.asarray(out), expected_out, atol=2e-5)


def test_layer_initializer_and_causal_ceiling(rng):
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    plain = DoublyNormalizedAttention(num_heads=HEADS, key_dim=4)
    lifted = DoublyNormalizedAttention(
        num_heads=HEADS, key_dim=4, null_query=True,
        null_query_initializer=keras.initializers.Constant(1.5),
    )
    plain(x, x)
    lifted(x, x)
    np.testing.assert_array_equal(np.asarray(lifted.null_query_logits), np.full(HEADS, 1.5))
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        getattr(lifted, name).set_weights(getattr(plain, name).get_weights())
    for layer in (plain, lifted):
        # Larger scores, so that some query prefers an earlier key.
        layer.query_dense.kernel.assign(layer.query_dense.kernel * 6.0)
    _, ceiling = plain(x, x, use_causal_mask=True, return_attention_scores=True)
    _, free = lifted(x, x, use_causal_mask=True, return_attention_scores=True)

    def earlier_over_diagonal(weights):
        weights = np.asarray(weights)
        earlier = np.where(np.tril(np.ones((6, 6), bool), -1), weights, 0.0).max(-1)
        return earlier - np.diagonal(weights, axis1=-2, axis2=-1)

    assert earlier_over_diagonal(ceiling).max() <= 1e-6
    assert earlier_over_diagonal(free).max() > 0.05


def test_layer_config_and_save_load(rng, tmp_path):
    layer, x = _null_layer(rng, normalization="hybrid", causal_normalization=True)
    config = layer.get_config()
    assert config["null_query"] is True
    assert DoublyNormalizedAttention.from_config(config).get_config() == config
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, layer(inputs, inputs))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.layers[-1]
    np.testing.assert_array_equal(
        np.asarray(restored.null_query_logits), np.asarray(layer.null_query_logits)
    )
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_layer_chunked_equals_whole(rng, causal):
    layer, x = _null_layer(rng)
    chunked = DoublyNormalizedAttention(num_heads=HEADS, key_dim=4, null_query=True, chunk_size=4)
    chunked(x, x)
    chunked.set_weights(layer.get_weights())

    def output_and_gradient(attention):
        with tf.GradientTape() as tape:
            y = attention(x, x, use_causal_mask=causal)
            loss = tf.reduce_sum(y * np.cos(np.arange(8)))
        return y.numpy(), tape.gradient(loss, attention.null_query_logits).numpy()

    whole_out, whole_grad = output_and_gradient(layer)
    chunk_out, chunk_grad = output_and_gradient(chunked)
    np.testing.assert_allclose(chunk_out, whole_out, atol=1e-5)
    np.testing.assert_allclose(chunk_grad, whole_grad, atol=1e-5)
    assert np.abs(whole_grad).max() > 1e-4


def test_conversion_adds_or_keeps_the_null_query(rng):
    inputs = keras.Input((6, 8))
    mha_model = keras.Model(inputs, keras.layers.MultiHeadAttention(HEADS, 4)(inputs, inputs))
    added = keras_dna.convert.to_doubly_normalized(mha_model, null_query=True)
    layer = added.layers[-1]
    np.testing.assert_array_equal(np.asarray(layer.null_query_logits), np.full(HEADS, 4.0))

    layer.null_query_logits.assign(rng.normal(size=HEADS))
    kept = keras_dna.convert.to_doubly_normalized(added, normalization="hybrid")
    np.testing.assert_array_equal(
        np.asarray(kept.layers[-1].null_query_logits), np.asarray(layer.null_query_logits)
    )
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    again = keras_dna.convert.to_doubly_normalized(added)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(added(x)), atol=1e-6)
    dropped = keras_dna.convert.to_doubly_normalized(added, null_query=False)
    assert dropped.layers[-1].null_query_logits is None
    with pytest.raises(TypeError, match="null_query"):
        keras_dna.convert.to_doubly_normalized(mha_model, null_query="on")


def _causal_model(rng, **kwargs):
    inputs = keras.Input((7, 8))
    layer = DoublyNormalizedAttention(num_heads=HEADS, key_dim=4, **kwargs)
    outputs = layer(inputs, inputs, use_causal_mask=True)
    model = keras.Model(inputs, outputs)
    # Larger scores, so that some query prefers an earlier key.
    layer.query_dense.kernel.assign(layer.query_dense.kernel * 6.0)
    if layer.null_query_logits is not None:
        layer.null_query_logits.assign(np.full(HEADS, 2.0))
    return model


@pytest.mark.parametrize("kwargs, at_ceiling", [
    ({}, True), ({"normalization": "single"}, False), ({"null_query": True}, False),
])
def test_analysis_measures_the_causal_ceiling(rng, kwargs, at_ceiling):
    model = _causal_model(rng, **kwargs)
    x = rng.normal(size=(4, 7, 8)).astype("float32")
    stats = keras_dna.analysis.causal_ceiling_statistics(
        keras_dna.analysis.collect_attention(model, x)
    )
    assert stats["rows"] == 4 * HEADS * 6  # every row but the first, per head
    assert (stats["diagonal_max_share"] == 1.0) == at_ceiling
    assert (stats["max_earlier_weight"] <= 0.5 + 1e-6) == at_ceiling


def test_analysis_ceiling_ignores_cross_attention(rng):
    inputs, memory = keras.Input((5, 8)), keras.Input((7, 8))
    layer = DoublyNormalizedAttention(num_heads=HEADS, key_dim=4, causal_normalization=True)
    model = keras.Model([inputs, memory], layer(inputs, memory))
    x = [rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 7, 8))]
    stats = keras_dna.analysis.causal_ceiling_statistics(
        keras_dna.analysis.collect_attention(model, x)
    )
    assert stats == {"rows": 0, "diagonal_max_share": None, "max_earlier_weight": None}
