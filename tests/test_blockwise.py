"""`chunk_size`: blockwise attention equals the whole computation."""

import numpy as np
import pytest
import tensorflow as tf

from keras_dna import DoublyNormalizedAttention
from keras_dna import ops as dna_ops
from keras_dna.ops import dispatch
from keras_dna.ops import blockwise
from tests import oracle

NORMALIZATIONS = ["double", "single", "hybrid"]
# (name, query length, key length, is_causal, causal_normalization)
CASES = [
    ("no_mask", 11, 7, False, False),
    ("mask", 11, 7, False, False),
    ("key_padding", 11, 7, False, False),
    ("is_causal", 11, 11, True, False),
    ("causal_normalization", 11, 7, False, True),
]


def _case(rng, name, q_len, k_len, dtype="float64"):
    q = rng.normal(size=(2, q_len, 3, 4)) * 1.5
    k = rng.normal(size=(2, k_len, 3, 4)) * 1.5
    v = rng.normal(size=(2, k_len, 3, 2))
    mask = None
    if name == "mask":
        mask = rng.random((2, 1, q_len, k_len)) < 0.7
    elif name in ("key_padding", "causal_normalization"):
        mask = np.arange(k_len)[None, None, None, :] < np.array([k_len, 4])[:, None, None, None]
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask


def _expected(q, k, v, mask, normalization, is_causal, causal, mixing):
    scores = np.einsum("btnh,bsnh->bnts", q, k) / 2.0
    valid = np.ones(scores.shape, bool) if mask is None else np.broadcast_to(mask, scores.shape)
    if is_causal:
        valid = valid & oracle.validity(1, q.shape[1], k.shape[1], causal=True)[:, None]
    weights = oracle.attention_weights(scores, valid, normalization, causal or is_causal, mixing)
    return np.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("name, q_len, k_len, is_causal, causal", CASES)
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunked_matches_oracle(rng, normalization, name, q_len, k_len, is_causal, causal, chunk_size):
    # 4 leaves a partial last block; 16 is one block longer than the queries.
    q, k, v, mask = _case(rng, name, q_len, k_len)
    mixing = rng.normal(size=3) if normalization == "hybrid" else None
    kwargs = dict(normalization=normalization, is_causal=is_causal,
                  causal_normalization=causal, mixing_logits=mixing)
    expected = _expected(q, k, v, mask, normalization, is_causal, causal, mixing)
    got = dna_ops.doubly_normalized_attention(q, k, v, mask, chunk_size=chunk_size, **kwargs)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-12, rtol=0)
    got32 = dna_ops.doubly_normalized_attention(
        *(x.astype("float32") for x in (q, k, v)), mask, chunk_size=chunk_size, **kwargs
    )
    assert got32.dtype == "float32"
    np.testing.assert_allclose(np.asarray(got32), expected, atol=1e-5, rtol=0)


def _gradients(q, k, v, mask, probe, **kwargs):
    q, k, v = (tf.constant(x) for x in (q, k, v))
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = dna_ops.doubly_normalized_attention(q, k, v, mask, **kwargs)
        loss = tf.reduce_sum(tf.sin(out) * probe)
    return tape.gradient(loss, [q, k, v])


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("name, q_len, k_len, is_causal, causal", CASES)
def test_chunked_gradients_equal_unchunked(rng, normalization, name, q_len, k_len, is_causal, causal):
    # The unchunked gradients are checked against finite differences in
    # test_ops; the chunked ones must equal them.
    q, k, v, mask = _case(rng, name, q_len, k_len)
    probe = rng.normal(size=(2, q_len, 3, 2))
    kwargs = dict(normalization=normalization, is_causal=is_causal, causal_normalization=causal,
                  mixing_logits=rng.normal(size=3) if normalization == "hybrid" else None)
    expected = _gradients(q, k, v, mask, probe, **kwargs)
    got = _gradients(q, k, v, mask, probe, chunk_size=4, **kwargs)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_chunked_extreme_logit_spread(rng, is_causal):
    # Scores rising along the queries by far more than exp() spans, across
    # block boundaries: the blocks' prefix sums must take the exact path.
    q, k, v, _ = _case(rng, "no_mask", 12, 12)
    q = q * np.linspace(1, 200, 12)[None, :, None, None]
    kwargs = dict(is_causal=is_causal, causal_normalization=True)
    expected = _expected(q, k, v, None, "double", is_causal, True, None)
    got = dna_ops.doubly_normalized_attention(q, k, v, chunk_size=5, **kwargs)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-10, rtol=0)
    probe = rng.normal(size=(2, 12, 3, 2))
    for g, e in zip(
        _gradients(q, k, v, None, probe, chunk_size=5, **kwargs),
        _gradients(q, k, v, None, probe, **kwargs),
    ):
        assert np.isfinite(g.numpy()).all()
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-8, rtol=1e-8)


def test_chunked_with_unknown_lengths(rng):
    q, k, v, _ = _case(rng, "no_mask", 11, 7)
    fn = tf.function(
        lambda q, k, v: dna_ops.doubly_normalized_attention(
            q, k, v, chunk_size=4, causal_normalization=True
        ),
        input_signature=[tf.TensorSpec((None, None, 3, 4), tf.float64)] * 2
        + [tf.TensorSpec((None, None, 3, 2), tf.float64)],
    )
    expected = _expected(q, k, v, None, "double", False, True, None)
    np.testing.assert_allclose(fn(q, k, v).numpy(), expected, atol=1e-12)
    # A mask whose query axis is unknown in the trace and 1 when run.
    _, _, _, mask = _case(rng, "key_padding", 11, 7)
    masked = tf.function(
        lambda q, k, v, m: dna_ops.doubly_normalized_attention(q, k, v, m, chunk_size=4),
        input_signature=[tf.TensorSpec((None, None, 3, 4), tf.float64)] * 2
        + [tf.TensorSpec((None, None, 3, 2), tf.float64), tf.TensorSpec((None,) * 4, tf.bool)],
    )
    expected = _expected(q, k, v, mask, "double", False, False, None)
    np.testing.assert_allclose(masked(q, k, v, mask).numpy(), expected, atol=1e-12)


def test_chunk_size_must_be_auto_none_or_a_positive_integer(rng):
    q, k, v, _ = _case(rng, "no_mask", 5, 5, "float32")
    for bad in (0, -3, 2.5, "8", True):
        with pytest.raises(ValueError, match="chunk_size"):
            dna_ops.doubly_normalized_attention(q, k, v, chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size"):
            DoublyNormalizedAttention(2, 4, chunk_size=bad)


# The layer: every mask the layer takes, through the blockwise path.
LAYER_CASES = [
    ({}, {}),
    ({}, {"use_causal_mask": True}),
    ({"causal_normalization": True}, {"value_mask": "padding"}),
    ({}, {"query_mask": "padding", "attention_mask": "random"}),
    ({"sliding_window": 3}, {}),
]


# "hybrid" runs both the softmax and the double blocks (the code that
# "single" and "double" run alone), and the gradient of its mixing logits is
# their difference: it checks both, at a third of the compilations.
@pytest.mark.parametrize("normalization", ["hybrid"])
@pytest.mark.parametrize("layer_kwargs, call_kwargs", LAYER_CASES)
def test_layer_with_chunk_size_equals_layer_without(rng, normalization, layer_kwargs, call_kwargs):
    x = rng.normal(size=(2, 9, 8)).astype("float32")
    padding = np.arange(9)[None, :] < np.array([9, 5])[:, None]
    call_kwargs = {
        name: {"padding": padding, "random": rng.random((2, 9, 9)) < 0.7}.get(value, value)
        for name, value in call_kwargs.items()
    }
    full = DoublyNormalizedAttention(2, 4, normalization=normalization, **layer_kwargs)
    chunked = DoublyNormalizedAttention(2, 4, normalization=normalization, chunk_size=4, **layer_kwargs)
    full(x, x)
    chunked(x, x)
    if full.mixing_logits is not None:
        full.mixing_logits.assign(rng.normal(size=2))
    chunked.set_weights(full.get_weights())

    @tf.function(jit_compile=True)
    def output_and_gradients(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, x, **call_kwargs)
            loss = tf.reduce_sum(tf.sin(out))
        return out, tape.gradient(loss, [x] + layer.trainable_weights)

    out_full, grads_full = output_and_gradients(full, tf.constant(x))
    out_chunked, grads_chunked = output_and_gradients(chunked, tf.constant(x))
    np.testing.assert_allclose(out_chunked.numpy(), out_full.numpy(), atol=1e-5, rtol=0)
    for g_c, g_f in zip(grads_chunked, grads_full):
        np.testing.assert_allclose(np.asarray(g_c), np.asarray(g_f), atol=1e-5, rtol=1e-5)


def test_layer_chunk_size_config_and_limits(rng):
    layer = DoublyNormalizedAttention(2, 4, chunk_size=4)
    assert DoublyNormalizedAttention.from_config(layer.get_config()).get_config()["chunk_size"] == 4
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    with pytest.raises(ValueError, match="return_attention_scores"):
        layer(x, x, return_attention_scores=True)
    with pytest.raises(ValueError, match="dropout"):
        DoublyNormalizedAttention(2, 4, chunk_size=4, dropout=0.1)
    with pytest.raises(ValueError, match="attention axis"):
        DoublyNormalizedAttention(2, 4, chunk_size=4, attention_axes=(1, 2))(
            rng.normal(size=(1, 3, 4, 8)), rng.normal(size=(1, 3, 4, 8))
        )


def test_auto_chunk_size_takes_blocks_where_the_scores_are_large():
    def auto(batch, query_length, key_length, heads=8):
        return dna_ops.auto_chunk_size(
            (batch, query_length, heads, 64), (batch, key_length, heads, 64)
        )

    assert auto(64, 128, 128) is None
    assert auto(1, 4096, 4096) is None  # 2**27 scores: 512 MiB
    assert auto(1, 512, 2**20) is None  # a single block of queries
    # 2**30 scores and more: 4 GiB in float32.
    assert auto(1, 16384, 16384) == blockwise.AUTO_CHUNK_SIZE
    assert auto(8, 4096, 4096) == blockwise.AUTO_CHUNK_SIZE
    assert auto(64, 2048, 2048) == blockwise.AUTO_CHUNK_SIZE
    assert auto(4, 2048, 2048) is None
    # An unknown batch counts as 1.
    assert auto(None, 4096, 4096) is None
    assert auto(None, 16384, 16384) == blockwise.AUTO_CHUNK_SIZE
    assert auto(1, None, 16384) is None and auto(1, 16384, None) is None


def test_auto_layer_takes_blocks_where_auto_chunk_size_says(rng, monkeypatch):
    # Long sequences in miniature: 2 x 2 heads of 9 x 9 scores count as large.
    monkeypatch.setattr(blockwise, "AUTO_CHUNK_SIZE", 4)
    monkeypatch.setattr(blockwise, "AUTO_CHUNK_SCORES", 2 * 2 * 81)
    chunk_sizes = []
    chunked_attention = dispatch.chunked_attention

    def spy(*args, **kwargs):
        chunk_sizes.append(kwargs["chunk_size"])
        return chunked_attention(*args, **kwargs)

    x = rng.normal(size=(2, 9, 8)).astype("float32")
    auto = DoublyNormalizedAttention(2, 4, jit_compile=False)
    whole = DoublyNormalizedAttention(2, 4, jit_compile=False, chunk_size=None)
    whole(x, x)
    auto(x, x)
    auto.set_weights(whole.get_weights())
    monkeypatch.setattr(dispatch, "chunked_attention", spy)
    assert auto.get_config()["chunk_size"] == "auto"
    assert DoublyNormalizedAttention.from_config(whole.get_config()).get_config()["chunk_size"] is None
    for kwargs in ({}, {"use_causal_mask": True}):
        np.testing.assert_allclose(
            np.asarray(auto(x, x, **kwargs)), np.asarray(whole(x, x, **kwargs)), atol=1e-5
        )
    assert chunk_sizes == [4, 4]
    # Where blocks cannot serve, the whole matrix, without an error.
    _, weights = auto(x, x, return_attention_scores=True)
    assert weights.shape == (2, 2, 9, 9)
    dropout = DoublyNormalizedAttention(2, 4, jit_compile=False, dropout=0.5)
    dropout(x, x, training=True)
    auto(x[:, :8], x[:, :8])  # 64 scores per head: short
    assert chunk_sizes == [4, 4]
