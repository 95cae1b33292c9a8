"""Causal normalization: the blocked prefix sums, the exact scan, and their gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dna import ops as dna_ops
from keras_dna.ops.causal import causal_path_trusted
from keras_dna.ops.causal import exact_prefix_logsumexp
from keras_dna.ops.causal import prefix_sum
from tests import oracle
from tests.common import normalize
from tests.common import numeric_gradient
from tests.common import random_valid
from tests.common import value_and_gradients

# Tests that trace `tf.function`s or take TensorFlow's gradients.
tf_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.function and tf.GradientTape"
)


@tf_only
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 16, 17, 300])
def test_prefix_sum_equals_cumulative_sum(rng, length, reverse):
    # Within one block, one block exactly, a partial second block, and a
    # second level of blocks; with the length known and unknown in a trace.
    x = rng.normal(size=(2, length, 3))
    expected = np.cumsum(x[:, ::-1], axis=1)[:, ::-1] if reverse else np.cumsum(x, axis=1)
    np.testing.assert_allclose(prefix_sum(x, axis=-2, reverse=reverse), expected, atol=1e-12)
    unknown = tf.function(
        lambda t: prefix_sum(t, axis=-2, reverse=reverse),
        input_signature=[tf.TensorSpec((2, None, 3), tf.float64)],
    )
    np.testing.assert_allclose(unknown(tf.constant(x)).numpy(), expected, atol=1e-12)


@tf_only
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 16, 17, 300])
def test_exact_prefix_logsumexp_equals_numpys_at_any_spread(rng, length, reverse):
    # Spreads of thousands, where exponentials of the raw scores overflow,
    # and masked entries; one block, a padded second block, many blocks;
    # with the length known and unknown in a trace.
    x = rng.normal(size=(2, length, 3)) * 2000.0
    x[0, length // 2, 1] = -1e300
    flip = (lambda a: np.flip(a, 1)) if reverse else (lambda a: a)
    expected = flip(np.logaddexp.accumulate(flip(x), axis=1))
    got = exact_prefix_logsumexp(x, reverse=reverse)
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)
    unknown = tf.function(
        lambda t: exact_prefix_logsumexp(t, reverse=reverse),
        input_signature=[tf.TensorSpec((2, None, 3), tf.float64)],
    )
    np.testing.assert_allclose(unknown(tf.constant(x)).numpy(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("length", [17, 37, 300])
def test_causal_blocked_prefix_lengths(rng, length):
    # Lengths around and beyond the prefix block, with padding and a second
    # level of blocks at 300.
    scores = rng.normal(size=(1, 1, length, 4)) * 4
    valid = random_valid(rng, (1, 1, length, 4), keep=0.8)
    got = normalize(scores.astype("float32"), valid, causal_normalization=True)
    expected = oracle.attention_weights(scores, valid, "double", True)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


def _loss_and_numeric_gradient(scores, valid, probe, eps=1e-6):
    def loss(s):
        w = dna_ops.normalize_attention_scores(s, valid, causal_normalization=True)
        return tf.reduce_sum(w * probe)

    s_t = tf.constant(scores)
    with tf.GradientTape() as tape:
        tape.watch(s_t)
        value = loss(s_t)
    numeric = np.zeros_like(scores)
    for index in np.ndindex(*scores.shape):
        step = np.zeros_like(scores)
        step[index] = eps
        numeric[index] = (loss(scores + step) - loss(scores - step)) / (2 * eps)
    return tape.gradient(value, s_t).numpy(), numeric


@tf_only
@pytest.mark.parametrize("num_keys, rising", [(3, "all"), (9, "all"), (9, "one")])
def test_gradient_of_exact_causal_path(rng, num_keys, rising):
    # Scores rising by 800 along the queries: past what the fast path spans
    # in float64 (600), so forward and backward take the exact scan, which
    # runs over blocks of keys (9 keys: the last block overlaps the one
    # before). With one key rising, its block alone is exact.
    scores = rng.normal(size=(1, 1, 5, num_keys)) * 2
    keys = slice(None) if rising == "all" else slice(4, 5)
    scores[..., 0, keys] -= 400.0
    scores[..., 2, keys] += 400.0
    valid = np.ones((1, 1, 5, num_keys), bool)
    valid[..., 3, 1] = False
    probe = rng.normal(size=scores.shape)
    analytic, numeric = _loss_and_numeric_gradient(scores, valid, probe)
    np.testing.assert_allclose(analytic, numeric, atol=1e-8)
    assert np.abs(numeric).max() > 1e-3
    weights = dna_ops.normalize_attention_scores(scores, valid, causal_normalization=True)
    expected = oracle.attention_weights(scores, valid, "double", True)
    np.testing.assert_allclose(np.asarray(weights), expected, atol=1e-12, rtol=0)


@tf_only
def test_gradient_with_unknown_lengths(rng):
    scores = rng.normal(size=(1, 2, 20, 4)) * 3
    probe = rng.normal(size=scores.shape)

    def grad(s):
        with tf.GradientTape() as tape:
            tape.watch(s)
            w = dna_ops.normalize_attention_scores(s, causal_normalization=True)
            loss = tf.reduce_sum(w * probe)
        return tape.gradient(loss, s)

    dynamic = tf.function(grad, input_signature=[tf.TensorSpec((1, 2, None, None), tf.float64)])
    for spread in (0.0, 700.0):
        s = scores.copy()
        s[..., 5, :] += spread
        np.testing.assert_allclose(
            dynamic(tf.constant(s)).numpy(), grad(tf.constant(s)).numpy(), atol=1e-10
        )


@pytest.mark.parametrize("spread", [3.0, 1000.0])
@pytest.mark.parametrize(
    "normalization, null", [("double", False), ("double", True), ("hybrid", True)]
)
def test_causal_block_weights_over_blocks_equal_one_causal_call(rng, normalization, null, spread):
    # Blocks of one query (a decoding step's own path) and of several, at
    # moderate scores and at spreads of thousands.
    heads, length = 2, 9
    scores = rng.normal(size=(1, heads, length, length)) * spread
    causal = np.tril(np.ones((length, length), bool))
    valid = causal & random_valid(rng, (1, heads, length, length), keep=0.8)
    mixing = rng.normal(size=heads) if normalization == "hybrid" else None
    beta = rng.normal(size=heads) if null else None
    expected = oracle.attention_weights(scores, valid, normalization, True, mixing, beta)
    key_lse = np.zeros((1, heads, 1, length))
    key_seen = np.zeros(key_lse.shape, bool)
    options = dict(normalization=normalization, mixing_logits=mixing, null_query_logits=beta)
    for start, stop in [(0, 3), (3, 4), (4, 5), (5, 7), (7, 8), (8, 9)]:
        block = slice(start, stop)
        before = (key_lse, key_seen)
        weights, key_lse, key_seen = dna_ops.causal_block_weights(
            scores[..., block, :], valid[..., block, :], key_lse, key_seen, **options
        )
        np.testing.assert_allclose(weights, expected[..., block, :], atol=1e-12, rtol=0)
        # A block that does not commit its queries leaves the state as it was.
        _, lse_uncommitted, seen_uncommitted = dna_ops.causal_block_weights(
            scores[..., block, :], valid[..., block, :], *before,
            np.zeros((1, 1, stop - start, 1), bool), **options
        )
        np.testing.assert_array_equal(seen_uncommitted, before[1])
        np.testing.assert_array_equal(
            np.where(before[1], lse_uncommitted, 0), np.where(before[1], before[0], 0)
        )
    # The state: each key's log-sum-exp over its valid queries, the null
    # query not among them.
    seen = valid.any(axis=-2, keepdims=True)
    np.testing.assert_array_equal(key_seen, seen)
    lse = np.logaddexp.reduce(np.where(valid, scores, -np.inf), axis=-2, keepdims=True)
    np.testing.assert_allclose(
        np.where(seen, key_lse, 0), np.where(seen, lse, 0), rtol=1e-14, atol=1e-12
    )


def _causal_outputs(query, key, value, beta):
    return np.asarray(
        dna_ops.doubly_normalized_attention(
            query, key, value, is_causal=True, chunk_size=None, flash_attention=False,
            null_query_logits=beta,
        )
    )


@pytest.mark.parametrize("null, dtype", [(False, "float64"), (True, "float32")])
def test_causal_outputs_ignore_the_future_to_the_bit(rng, null, dtype):
    # Property 5 (docs/math.md) to the bit, as softmax holds it: later
    # queries, keys and values (larger than the rest, so that they would
    # move any shift taken over all queries; at 30, enough to send the call
    # to the exact branch; or smaller) change no earlier output. Lengths
    # past two prefix blocks and past 16 blocks (a second level of blocks).
    heads = 2
    beta = rng.normal(size=heads) if null else None
    for length, changed, scales in ((40, 3, (4.0, 0.1, 30.0)), (300, 5, (4.0,))):
        q, k, v = (rng.normal(size=(2, length, heads, 8)).astype(dtype) for _ in range(3))
        base = _causal_outputs(q, k, v, beta)
        for scale in scales:
            q2, k2, v2 = q.copy(), k.copy(), v.copy()
            for x in (q2, k2, v2):
                x[:, -changed:] = rng.normal(size=x[:, -changed:].shape) * scale
            got = _causal_outputs(q2, k2, v2, beta)
            assert np.array_equal(got[:, :-changed], base[:, :-changed])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_masked_scores_change_neither_result_nor_path(rng, dtype):
    # A masked score far above the valid ones (a future key's, a padded
    # query's): the same weights to the bit, on the fast path.
    length = 20
    scores = (rng.normal(size=(2, 2, length, length)) * 3).astype(dtype)
    valid = np.tril(np.ones((length, length), bool)) & random_valid(rng, (2, 1, length, length))
    base = normalize(scores, valid, causal_normalization=True)
    high = scores.copy()
    high[0, 1, 3, 10] = 60.0  # a future key
    high[1, 0, np.argwhere(~valid[1, 0])[-1][0], 2] = 1e4  # any masked pair
    assert bool(causal_path_trusted(high, valid))
    assert np.array_equal(normalize(high, valid, causal_normalization=True), base)


def _oracle_loss_gradient(scores, valid, probe, beta, eps=1e-6):
    """Central differences of the oracle's `sum(weights * probe)`."""
    def loss(s):
        return np.sum(oracle.attention_weights(s, valid, "double", True, None, beta) * probe)

    return numeric_gradient(loss, scores, eps)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spread", ["normal", "rising", "falling_row"])
@pytest.mark.parametrize("null", [False, True])
def test_causal_weights_and_gradients_match_the_oracle(rng, dtype, spread, null):
    # Normal scores take the fast path; scores rising far above a key's
    # first valid score, or a row far below every key's first, the exact
    # branch (blocks of keys in log space, the rest from the prefix sums).
    heads, length = 2, 20
    scores = rng.normal(size=(1, heads, length, length)) * 2
    margin = 600.0 if dtype == "float64" else 60.0
    if spread == "rising":
        scores[..., 12:, 2:4] += 1.5 * margin
    elif spread == "falling_row":
        scores[..., 9, :] -= 1.5 * margin + 200.0
    valid = np.tril(np.ones((length, length), bool)) & random_valid(rng, (1, heads, length, length), 0.8)
    beta = np.array([-1.0, 2.0]) if null else None
    assert bool(causal_path_trusted(scores.astype(dtype), valid, beta)) == (spread == "normal")
    probe = rng.normal(size=scores.shape)

    def loss(s):
        w = dna_ops.normalize_attention_scores(
            s, valid, causal_normalization=True, null_query_logits=beta
        )
        return keras.ops.sum(w * keras.ops.convert_to_tensor(probe.astype(dtype)))

    weights = normalize(scores.astype(dtype), valid, causal_normalization=True, null_query_logits=beta)
    assert weights.dtype == dtype
    tol = 1e-12 if dtype == "float64" else 2e-6
    expected = oracle.attention_weights(scores, valid, "double", True, None, beta)
    np.testing.assert_allclose(weights, expected, atol=tol, rtol=0)
    # The gradient on a corner of 6 queries and keys (the oracle's by
    # central differences), the big changes inside it.
    corner = (slice(None), slice(None), slice(8, 14), slice(0, 6))
    small = np.ascontiguousarray(scores[corner])
    small_valid, small_probe = valid[corner], probe[corner]
    if spread == "rising":
        small[..., 3:, 2:4] += 1.5 * margin
    numeric = _oracle_loss_gradient(small, small_valid, small_probe, beta)

    def small_loss(s):
        w = dna_ops.normalize_attention_scores(
            s, small_valid, causal_normalization=True, null_query_logits=beta
        )
        return keras.ops.sum(w * keras.ops.convert_to_tensor(small_probe.astype(dtype)))

    assert bool(causal_path_trusted(small.astype(dtype), small_valid, beta)) == (spread == "normal")
    _, (analytic,) = value_and_gradients(small_loss, small.astype(dtype))
    assert analytic.dtype == dtype
    np.testing.assert_allclose(analytic, numeric, atol=1e-7 if dtype == "float64" else 2e-5)
    assert np.abs(numeric).max() > 1e-3
