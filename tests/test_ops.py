"""keras_dna.ops against the float64 oracle, and the properties of docs/math.md."""

import numpy as np
import pytest
import tensorflow as tf

from keras_dna import ops as dna_ops
from tests import oracle
from tests.common import normalize
from tests.common import random_valid

NORMALIZATIONS = ["double", "single", "hybrid"]


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_oracle(rng, normalization, causal, masked):
    scores = rng.normal(size=(2, 3, 6, 5)) * 3
    valid = random_valid(rng, (2, 1, 6, 5)) if masked else None
    mixing = rng.normal(size=3) if normalization == "hybrid" else None
    expected = oracle.attention_weights(scores, valid, normalization, causal, mixing)
    for dtype, tol in (("float32", 2e-6), ("float64", 1e-12)):
        got = normalize(
            scores.astype(dtype),
            valid,
            normalization=normalization,
            causal_normalization=causal,
            mixing_logits=mixing,
        )
        assert got.dtype == dtype
        np.testing.assert_allclose(got, expected, atol=tol, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_extreme_logit_spread_is_exact(rng, causal):
    # Spread over +-1e3, with scores rising along the queries by far more
    # than exp() can span: the causal fast path must hand over to the exact
    # scan.
    scores = rng.uniform(-1e3, 1e3, size=(2, 2, 40, 6))
    scores[:, :, 0, :] = -1e3
    scores[:, :, 1, :] = 1e3
    valid = random_valid(rng, (2, 1, 40, 6), keep=0.8)
    expected = oracle.attention_weights(scores, valid, "double", causal)
    got = normalize(scores, valid, causal_normalization=causal)
    np.testing.assert_allclose(got, expected, atol=1e-10, rtol=0)
    # float32 resolves a logit of 1e3 to 6e-5, so differences of such logits
    # (and the weights) carry errors of that order however exact the scan.
    rounded = scores.astype("float32")
    expected = oracle.attention_weights(rounded, valid, "double", causal)
    got = normalize(rounded, valid, causal_normalization=causal)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=2 * 1e3 * np.finfo("float32").eps, rtol=0)


def test_logits_of_magnitude_1e4_stay_finite(rng):
    scores = rng.choice([-1e4, 1e4], size=(2, 2, 8, 8)) + rng.normal(size=(2, 2, 8, 8))
    scores = scores.astype("float32")
    for causal in (False, True):
        got = normalize(scores, causal_normalization=causal)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
        assert (got.sum(-2) >= 1.0 / 8 - 1e-5).all()
        # float32 resolves 1e4 to 1e-3: the weights carry errors of that order.
        expected = oracle.attention_weights(scores, None, "double", causal)
        np.testing.assert_allclose(got, expected, atol=2 * 1e4 * np.finfo("float32").eps)


def test_dynamic_length_graph_path(rng):
    # A TensorFlow graph traced with unknown lengths takes the unblocked
    # prefix sum and, for extreme spreads, the exact scan with a length known
    # only at run time.
    scores = rng.normal(size=(1, 2, 21, 5)) * 3
    scores[..., 3, :] = 120.0  # rises by more than the fast path spans
    spec = tf.TensorSpec((None, 2, None, None), tf.float32)
    fn = tf.function(
        lambda s: dna_ops.normalize_attention_scores(s, causal_normalization=True),
        input_signature=[spec],
    )
    for s in (scores, scores[:, :, :9, :3]):
        expected = oracle.attention_weights(s, None, "double", True)
        np.testing.assert_allclose(fn(s.astype("float32")).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_sum_to_one_and_empty_rows_are_zero(rng, causal):
    scores = tf.constant(rng.normal(size=(2, 2, 6, 5)), tf.float64)
    valid = random_valid(rng, (2, 1, 6, 5))
    valid[0, 0, 2, :] = False  # a query with no valid key
    valid[1, 0, :, 1] = False  # a key no query may see
    with tf.GradientTape() as tape:
        tape.watch(scores)
        weights = dna_ops.normalize_attention_scores(
            scores, valid, causal_normalization=causal
        )
        loss = tf.reduce_sum(weights * rng.normal(size=weights.shape))
    grad = tape.gradient(loss, scores).numpy()
    w = weights.numpy()
    has_key = np.broadcast_to(valid, w.shape).any(-1)
    np.testing.assert_allclose(w.sum(-1)[has_key], 1.0, atol=1e-12)
    assert (w[~has_key] == 0).all()
    assert (w[~np.broadcast_to(valid, w.shape)] == 0).all()
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("causal", [False, True])
def test_no_explaining_away_lower_bound(rng, causal):
    scores = rng.normal(size=(3, 2, 7, 9)) * 6
    valid = random_valid(rng, (3, 1, 7, 9), keep=0.6)
    m = np.broadcast_to(valid, scores.shape)
    w = normalize(scores, valid, causal_normalization=causal)
    bound = 1.0 / m.sum(-1).max(-1, keepdims=True)  # (..., 1)
    column = w.sum(-2)
    seen = m.any(-2)
    assert (column[seen] >= np.broadcast_to(bound, column.shape)[seen] - 1e-12).all()


def test_softmax_explains_away_where_double_does_not():
    # Every query prefers key 0 by a wide margin: softmax gives key 1 almost
    # nothing, double normalization at least 1/2.
    scores = np.array([[[[8.0, 0.0], [8.0, 0.0], [8.0, 0.0]]]])
    single = normalize(scores, normalization="single").sum(-2)[0, 0]
    double = normalize(scores).sum(-2)[0, 0]
    assert single[1] < 0.01
    assert double[1] >= 0.5 - 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_per_key_constants_leave_double_unchanged(rng, causal):
    scores = rng.normal(size=(2, 2, 5, 6))
    valid = random_valid(rng, (2, 1, 5, 6))
    shift = rng.normal(size=(2, 2, 1, 6)) * 10
    base = normalize(scores, valid, causal_normalization=causal)
    shifted = normalize(scores + shift, valid, causal_normalization=causal)
    np.testing.assert_allclose(shifted, base, atol=1e-12)
    # Per-query constants leave softmax unchanged but not double.
    query_shift = rng.normal(size=(2, 2, 5, 1)) * 3
    single = normalize(scores, valid, normalization="single")
    np.testing.assert_allclose(
        normalize(scores + query_shift, valid, normalization="single"), single, atol=1e-12
    )
    assert np.abs(normalize(scores + query_shift, valid) - normalize(scores, valid)).max() > 1e-3


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradient_matches_finite_differences(rng, normalization, causal):
    scores = rng.normal(size=(1, 2, 4, 5))
    valid = random_valid(rng, (1, 1, 4, 5), keep=0.8)
    mixing = rng.normal(size=2)
    probe = rng.normal(size=scores.shape)

    def loss(s, a):
        w = dna_ops.normalize_attention_scores(
            s, valid, normalization=normalization,
            causal_normalization=causal, mixing_logits=a,
        )
        return tf.reduce_sum(w * probe)

    s_t = tf.constant(scores)
    a_t = tf.constant(mixing)
    with tf.GradientTape() as tape:
        tape.watch([s_t, a_t])
        value = loss(s_t, a_t)
    grad_s, grad_a = tape.gradient(value, [s_t, a_t])
    eps = 1e-6
    numeric = np.zeros_like(scores)
    for index in np.ndindex(*scores.shape):
        step = np.zeros_like(scores)
        step[index] = eps
        numeric[index] = (loss(scores + step, mixing) - loss(scores - step, mixing)) / (2 * eps)
    np.testing.assert_allclose(grad_s.numpy(), numeric, atol=1e-8)
    if normalization == "hybrid":
        numeric_a = [
            (loss(scores, mixing + eps * e) - loss(scores, mixing - eps * e)) / (2 * eps)
            for e in np.eye(2)
        ]
        np.testing.assert_allclose(grad_a.numpy(), numeric_a, atol=1e-8)
    else:
        assert grad_a is None


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_attention_functions_match_oracle(rng, normalization):
    q = rng.normal(size=(2, 5, 3, 4))
    k = rng.normal(size=(2, 7, 3, 4))
    v = rng.normal(size=(2, 7, 3, 2))
    mask = random_valid(rng, (2, 1, 5, 7))
    mixing = rng.normal(size=3)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / 2.0
    expected = oracle.attention_weights(scores, mask, normalization, False, mixing)
    got = dna_ops.doubly_normalized_attention(
        q, k, v, mask, normalization=normalization, mixing_logits=mixing
    )
    np.testing.assert_allclose(
        np.asarray(got), np.einsum("bnts,bsnh->btnh", expected, v), atol=1e-12
    )
    causal_scores = np.einsum("btnh,bsnh->bnts", q, q) * 0.3
    causal_valid = oracle.validity(2, 5, 5, causal=True)[:, None]
    expected = oracle.attention_weights(causal_scores, causal_valid, normalization, True, mixing)
    got = dna_ops.doubly_normalized_attention_weights(
        q, q, normalization=normalization, is_causal=True, scale=0.3, mixing_logits=mixing
    )
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-12)


def test_bad_arguments_raise_clear_errors(rng):
    q = rng.normal(size=(2, 5, 3, 4)).astype("float32")
    with pytest.raises(ValueError, match="normalization"):
        dna_ops.doubly_normalized_attention(q, q, q, normalization="triple")
    with pytest.raises(ValueError, match="`query`"):
        dna_ops.doubly_normalized_attention(q[0], q, q)
    with pytest.raises(ValueError, match="head size"):
        dna_ops.doubly_normalized_attention(q, q[..., :2], q)
    with pytest.raises(ValueError, match="length"):
        dna_ops.doubly_normalized_attention(q, q, q[:, :4])
    with pytest.raises(ValueError, match="mask"):
        dna_ops.doubly_normalized_attention(q, q, q, np.ones((1, 2, 2, 5, 5), bool))
    with pytest.raises(ValueError, match="num_attention_axes"):
        dna_ops.normalize_attention_scores(q, num_attention_axes=0)


def test_functions_accept_keras_inputs(rng, tmp_path):
    import keras

    query = keras.Input((5, 2, 4))
    mask = keras.Input((1, 5, 5), dtype="bool")
    out = dna_ops.doubly_normalized_attention(
        query, query, query, mask, is_causal=True, normalization="hybrid"
    )
    assert out.shape == (None, 5, 2, 4)
    model = keras.Model([query, mask], out)
    x = rng.normal(size=(2, 5, 2, 4)).astype("float32")
    m = rng.random((2, 1, 5, 5)) < 0.8
    expected = dna_ops.doubly_normalized_attention(x, x, x, m, is_causal=True, normalization="hybrid")
    np.testing.assert_allclose(np.asarray(model([x, m])), np.asarray(expected), atol=1e-6)
    # The model saves and loads with the call's arguments.
    path = str(tmp_path / "functions.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded([x, m])), np.asarray(expected), atol=1e-6)
    plain = dna_ops.doubly_normalized_attention(x, x, x, m)
    assert np.abs(np.asarray(plain) - np.asarray(expected)).max() > 1e-3


def test_bad_mask_and_mixing_logits_shapes_raise(rng):
    scores = rng.normal(size=(2, 3, 4, 5))
    with pytest.raises(ValueError, match="`mask`"):
        dna_ops.normalize_attention_scores(scores, np.ones((2, 3, 4, 4), bool))
    with pytest.raises(ValueError, match="mixing_logits"):
        dna_ops.normalize_attention_scores(scores, normalization="hybrid", mixing_logits=np.zeros(2))


def test_hybrid_with_unknown_number_of_heads(rng):
    # Shared compiled functions retrace with relaxed (unknown) shapes.
    fn = tf.function(
        lambda s, a: dna_ops.normalize_attention_scores(s, normalization="hybrid", mixing_logits=a),
        input_signature=[tf.TensorSpec((None,) * 4, tf.float64), tf.TensorSpec((3,), tf.float64)],
    )
    scores = rng.normal(size=(2, 3, 4, 5))
    mixing = rng.normal(size=3)
    expected = oracle.attention_weights(scores, None, "hybrid", False, mixing)
    np.testing.assert_allclose(fn(scores, mixing).numpy(), expected, atol=1e-12)
