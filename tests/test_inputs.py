"""Every input MultiHeadAttention takes, and clearer errors where it crashes.

Per-head masks, empty sequences and batches, bad shapes and float masks.
"""

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_dna
from keras_dna import DoublyNormalizedAttention
from tests import oracle

# Three examples, two heads: a per-head mask ANDed the way MultiHeadAttention
# does it would broadcast the batch against the heads, and fail or mix them.
B, T, S, DIM, HEADS, HEAD_DIM = 3, 5, 6, 8, 2, 4


def _inputs(rng, batch=B, q_len=T, k_len=S):
    query = rng.normal(size=(batch, q_len, DIM)).astype("float32")
    value = rng.normal(size=(batch, k_len, DIM)).astype("float32")
    return query, value


def _built(normalization="double", **kwargs):
    layer = DoublyNormalizedAttention(
        HEADS, HEAD_DIM, normalization=normalization, bias_initializer="random_normal", **kwargs
    )
    layer.build((None, None, DIM), (None, None, DIM))
    return layer


def _per_head_mask(rng, q_len=T, k_len=S):
    mask = rng.random((B, HEADS, q_len, k_len)) < 0.6
    mask[..., 0] = True  # every query keeps a key in every head
    return mask


@pytest.mark.parametrize("normalization", ["double", "single", "hybrid"])
def test_per_head_mask_matches_the_oracle_head_by_head(rng, normalization):
    layer = _built(normalization)
    query, value = _inputs(rng)
    mask = _per_head_mask(rng)
    output, weights = layer(query, value, attention_mask=mask, return_attention_scores=True)
    expected_output, expected_weights = oracle.layer_forward(layer, query, value, valid=mask)
    np.testing.assert_allclose(np.asarray(weights), expected_weights, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(output), expected_output, atol=2e-5, rtol=0)


@pytest.mark.parametrize("use_causal_mask", [False, True])
def test_per_head_mask_combines_with_keras_masks_and_causality(rng, use_causal_mask):
    layer = _built()
    query, value = _inputs(rng, q_len=S)
    mask = _per_head_mask(rng, q_len=S)
    query_valid = np.arange(S)[None, :] < np.array([[S], [S - 2], [3]])
    key_valid = np.arange(S)[None, :] < np.array([[S - 1], [S], [2]])
    output, weights = layer(
        query, value, attention_mask=mask, query_mask=query_valid, value_mask=key_valid,
        use_causal_mask=use_causal_mask, return_attention_scores=True,
    )
    valid = mask & oracle.validity(
        B, S, S, query_mask=query_valid, key_mask=key_valid, causal=use_causal_mask
    )[:, None]
    expected_output, expected_weights = oracle.layer_forward(
        layer, query, value, valid=valid, causal=use_causal_mask
    )
    np.testing.assert_allclose(np.asarray(weights), expected_weights, atol=2e-6, rtol=0)
    rows = valid.any(-1).all(1)  # queries that see a key in every head
    np.testing.assert_allclose(np.asarray(output)[rows], expected_output[rows], atol=2e-5, rtol=0)


def test_every_mask_shape_broadcasts_as_in_multi_head_attention(rng):
    """(T, S), (B, T, S), (B, 1, S), (B, N, T, S), (1, N, T, S), (B, 1, T, S):
    the same mask in each shape gives the same output."""
    layer = _built()
    query, value = _inputs(rng)
    shared = rng.random((T, S)) < 0.6
    shared[:, 0] = True
    reference = np.asarray(layer(query, value, attention_mask=shared))
    for shaped in (
        np.broadcast_to(shared, (B, T, S)),
        np.broadcast_to(shared, (B, HEADS, T, S)),
        shared[None, None],
        np.broadcast_to(shared, (B, 1, T, S)),
        np.broadcast_to(shared, (1, HEADS, T, S)),
        shared.astype("float32"),  # a float mask of 0 and 1, as Keras' tests pass
    ):
        np.testing.assert_allclose(
            np.asarray(layer(query, value, attention_mask=shaped)), reference, atol=1e-6
        )
    key_only = np.broadcast_to(shared[:1], (B, 1, S))
    np.testing.assert_allclose(
        np.asarray(layer(query, value, attention_mask=key_only)),
        np.asarray(layer(query, value, attention_mask=np.broadcast_to(key_only[:, None], (B, HEADS, T, S)))),
        atol=1e-6,
    )


EMPTY_PATHS = {
    "double": {},
    "causal": {"causal_normalization": True},
    "chunked": {"chunk_size": 2},
    "chunked_causal": {"chunk_size": 2, "causal_normalization": True},
    "hybrid_null": {"normalization": "hybrid", "null_query": True},
    "single": {"normalization": "single"},
}
EMPTY_SHAPES = {
    "no_queries": (B, 0, S),
    "no_keys": (B, T, 0),
    "no_examples": (0, T, S),
    "nothing": (0, 0, 0),
}


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("path", sorted(EMPTY_PATHS))
def test_empty_sequences_and_batches_give_empty_outputs_and_finite_gradients(
    rng, path, jit_compile
):
    layer = _built(jit_compile=jit_compile, **EMPTY_PATHS[path])
    for name, (batch, q_len, k_len) in EMPTY_SHAPES.items():
        for causal_mask in (False, True) if q_len == k_len else (False,):
            query, value = _inputs(rng, batch, q_len, k_len)
            query, value = tf.constant(query), tf.constant(value)
            with tf.GradientTape() as tape:
                tape.watch([query, value])
                output = layer(query, value, use_causal_mask=causal_mask)
                loss = tf.reduce_sum(output**2)
            # (MultiHeadAttention returns (1, 0, dim) for an empty batch of
            # empty sequences: Keras's TensorFlow einsum.)
            assert output.shape == (batch, q_len, query.shape[-1]), (name, causal_mask)
            assert np.all(np.isfinite(np.asarray(output))), (name, causal_mask)
            gradients = tape.gradient(loss, [query, value, *layer.trainable_weights])
            for variable, gradient in zip(["query", "value", *layer.trainable_weights], gradients):
                assert gradient is not None, (name, causal_mask, variable)
                assert np.all(np.isfinite(np.asarray(gradient))), (name, causal_mask, variable)


def test_empty_sequences_in_the_ops(rng):
    for q_len, k_len in ((0, S), (T, 0), (0, 0)):
        query = rng.normal(size=(B, q_len, HEADS, HEAD_DIM))
        key = rng.normal(size=(B, k_len, HEADS, HEAD_DIM))
        for kwargs in ({}, {"is_causal": True}, {"chunk_size": 2}, {"causal_normalization": True}):
            output = keras_dna.ops.doubly_normalized_attention(query, key, key, **kwargs)
            assert output.shape == (B, q_len, HEADS, HEAD_DIM)


def test_mismatched_batches_raise_naming_the_arguments(rng):
    query, value = _inputs(rng)
    for layer in (DoublyNormalizedAttention(HEADS, HEAD_DIM), _built()):
        with pytest.raises(ValueError, match=r"`query` and `value` must have the same batch size"):
            layer(query, value[:2])
        with pytest.raises(ValueError, match=r"`query` and `value` must have the same batch size"):
            layer(query, value[:1], key=value[:1])
        with pytest.raises(ValueError, match=r"`key` and `value` must have the same shape"):
            layer(query, value, key=value[:1])


@pytest.mark.parametrize("attention_axes", [(0,), (2,), (3,), (-1,), (1, 1), (-4,)])
def test_attention_axes_out_of_range_raise(rng, attention_axes):
    query, value = _inputs(rng)
    layer = DoublyNormalizedAttention(HEADS, HEAD_DIM, attention_axes=attention_axes)
    with pytest.raises(ValueError, match="attention_axes"):
        layer(query, value)


def test_negative_attention_axes_count_as_in_multi_head_attention(rng):
    x = rng.normal(size=(2, 3, 4, DIM)).astype("float32")
    by_negative = DoublyNormalizedAttention(HEADS, HEAD_DIM, attention_axes=(-3, -2))
    by_positive = DoublyNormalizedAttention(HEADS, HEAD_DIM, attention_axes=(1, 2))
    by_negative(x, x)
    by_positive(x, x)
    by_positive.set_weights(by_negative.get_weights())
    np.testing.assert_allclose(np.asarray(by_negative(x, x)), np.asarray(by_positive(x, x)), atol=1e-6)


def test_wrong_ranks_raise_naming_the_argument(rng):
    query, value = _inputs(rng)
    with pytest.raises(ValueError, match="`query` must have rank 3 or more"):
        DoublyNormalizedAttention(HEADS, HEAD_DIM)(query[0], value[0])
    with pytest.raises(ValueError, match="`value` must have the rank of `query`"):
        DoublyNormalizedAttention(HEADS, HEAD_DIM)(query, value[:, :, None])


def test_per_head_mask_with_the_wrong_number_of_heads_raises(rng):
    query, value = _inputs(rng)
    with pytest.raises(ValueError, match="attention_mask"):
        _built()(query, value, attention_mask=np.ones((B, HEADS + 1, T, S), bool))


@pytest.mark.parametrize("argument", ["attention_mask", "query_mask", "value_mask", "key_mask"])
def test_additive_float_masks_are_rejected_not_inverted(rng, argument):
    query, value = _inputs(rng)
    layer = _built()
    shape = {"attention_mask": (B, T, S), "query_mask": (B, T)}.get(argument, (B, S))
    additive = np.where(rng.random(shape) < 0.5, -1e9, 0.0).astype("float32")
    with pytest.raises(ValueError, match=f"`{argument}` must be a boolean mask.*{argument} == 0"):
        layer(query, value, **{argument: additive})
    with pytest.raises(ValueError, match=f"`{argument}` must be a boolean mask"):
        layer(query, value, **{argument: tf.constant(additive)})
    # Its boolean form, as the message says, runs.
    layer(query, value, **{argument: additive == 0})


def test_additive_float_masks_are_rejected_by_the_ops(rng):
    scores = rng.normal(size=(B, HEADS, T, S))
    additive = np.where(rng.random((B, 1, T, S)) < 0.5, -np.inf, 0.0)
    with pytest.raises(ValueError, match="`mask` must be a boolean mask"):
        keras_dna.ops.normalize_attention_scores(scores, additive)
    query = rng.normal(size=(B, T, HEADS, HEAD_DIM))
    with pytest.raises(ValueError, match="`mask` must be a boolean mask"):
        keras_dna.ops.doubly_normalized_attention(query, query, query, additive[..., :T], chunk_size=2)
    # Also where the causal mask joins it first.
    with pytest.raises(ValueError, match="`mask` must be a boolean mask"):
        keras_dna.ops.doubly_normalized_attention_weights(query, query, additive[..., :T], is_causal=True)


def test_collect_attention_recomputes_the_weights_of_chunked_layers(rng):
    inputs = keras.Input((T, DIM))
    chunked = DoublyNormalizedAttention(HEADS, HEAD_DIM, chunk_size=2, name="chunked")
    model = keras.Model(inputs, chunked(inputs, inputs, use_causal_mask=True))
    whole = _built()
    whole.set_weights(chunked.get_weights())
    x = rng.normal(size=(2, T, DIM)).astype("float32")
    (report,) = keras_dna.analysis.collect_attention(model, x)
    _, expected = whole(x, x, use_causal_mask=True, return_attention_scores=True)
    np.testing.assert_allclose(report.weights, np.asarray(expected), atol=1e-6)
    # The chunked model's own output is unchanged by the analysis.
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(whole(x, x, use_causal_mask=True)), atol=1e-5)


def test_collect_attention_refuses_per_head_masks_clearly(rng):
    inputs = keras.Input((T, DIM))
    mask = keras.Input((HEADS, T, T), dtype="bool")
    layer = DoublyNormalizedAttention(HEADS, HEAD_DIM, name="per_head")
    model = keras.Model([inputs, mask], layer(inputs, inputs, attention_mask=mask))
    x = rng.normal(size=(2, T, DIM)).astype("float32")
    with pytest.raises(ValueError, match="`per_head` was called with a per-head attention mask"):
        keras_dna.analysis.collect_attention(model, [x, rng.random((2, HEADS, T, T)) < 0.5])


def test_a_masked_tensor_keeps_its_mask_for_the_next_layer(rng):
    """`MultiHeadAttention` deletes the Keras masks of its inputs, so a second
    layer attending to the same tensor (every decoder block to the encoder
    output) attends to its padding; DNA keeps them."""
    tokens = rng.integers(1, 10, size=(2, 6)).astype("int32")
    tokens[0, 3:] = 0
    x = rng.normal(size=(2, 4, 8)).astype("float32")
    outputs = {}
    for cls, kwargs in (
        (keras_dna.DoublyNormalizedAttention, {"normalization": "single"}),
        (keras.layers.MultiHeadAttention, {}),
    ):
        keras.utils.set_random_seed(7)
        ids, queries = keras.Input((6,), dtype="int32"), keras.Input((4, 8))
        memory = keras.layers.Embedding(10, 8, mask_zero=True, name="embedding")(ids)
        first, second = cls(2, 4, name="first", **kwargs), cls(2, 4, name="second", **kwargs)
        model = keras.Model([ids, queries], second(first(queries, memory), memory))
        outputs[cls.__name__] = np.asarray(model([tokens, x]))
        # The masks given explicitly, to eager tensors (which carry none).
        embedded = np.asarray(model.get_layer("embedding")(tokens))
        hidden = np.asarray(first(x, embedded, value_mask=tokens > 0))
        outputs[cls.__name__ + " masked"] = np.asarray(second(hidden, embedded, value_mask=tokens > 0))
    np.testing.assert_allclose(
        outputs["DoublyNormalizedAttention"], outputs["DoublyNormalizedAttention masked"], atol=1e-5
    )
    # MultiHeadAttention's second layer attends to the padding of row 0.
    mha, mha_masked = outputs["MultiHeadAttention"], outputs["MultiHeadAttention masked"]
    assert np.abs(mha[0] - mha_masked[0]).max() > 1e-3
    np.testing.assert_allclose(mha[1], mha_masked[1], atol=1e-5)
    np.testing.assert_allclose(outputs["DoublyNormalizedAttention masked"], mha_masked, atol=1e-5)
