"""DoublyNormalizedAttention against the oracle, MultiHeadAttention and docs/math.md."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from keras_dna import DoublyNormalizedAttention
from tests import oracle

NORMALIZATIONS = ["double", "single", "hybrid"]
B, T, S, DIM, HEADS, HEAD_DIM = 2, 5, 7, 8, 2, 4


def _layer(normalization="double", **kwargs):
    layer = DoublyNormalizedAttention(
        num_heads=HEADS, key_dim=HEAD_DIM, normalization=normalization,
        bias_initializer="random_normal", **kwargs,
    )
    return layer


def _set_mixing(layer, rng):
    if layer.mixing_logits is not None:
        layer.mixing_logits.assign(rng.normal(size=HEADS))


def _inputs(rng, q_len=T, k_len=S):
    query = rng.normal(size=(B, q_len, DIM)).astype("float32")
    value = rng.normal(size=(B, k_len, DIM)).astype("float32")
    return query, value


def _padding(rng, length, min_valid=2):
    lengths = rng.integers(min_valid, length + 1, size=B)
    lengths[0] = length - 1
    return np.arange(length)[None, :] < lengths[:, None]


MASK_CASES = [
    "no_mask", "key_padding", "query_padding", "attention_mask_BTS",
    "attention_mask_B1S", "causal", "sliding_window", "cross_causal_normalization",
]


def _case(name, rng):
    """Returns (layer kwargs, call kwargs, (q_len, k_len), validity, causal)."""
    q_len, k_len = (T, S)
    layer_kwargs, call_kwargs, causal = {}, {}, False
    valid_kwargs = {}
    if name == "key_padding":
        valid_kwargs["key_mask"] = call_kwargs["value_mask"] = _padding(rng, S)
    elif name == "query_padding":
        valid_kwargs["query_mask"] = call_kwargs["query_mask"] = _padding(rng, T)
    elif name == "attention_mask_BTS":
        mask = rng.random((B, T, S)) < 0.7
        valid_kwargs["attention_mask"] = call_kwargs["attention_mask"] = mask
    elif name == "attention_mask_B1S":
        mask = rng.random((B, 1, S)) < 0.7
        mask[:, :, 0] = True
        valid_kwargs["attention_mask"] = call_kwargs["attention_mask"] = mask
    elif name == "causal":
        q_len = k_len = 6
        call_kwargs["use_causal_mask"] = valid_kwargs["causal"] = causal = True
    elif name == "sliding_window":
        q_len = k_len = 6
        layer_kwargs["sliding_window"] = valid_kwargs["sliding_window"] = 2
    elif name == "cross_causal_normalization":
        # Decoder cross-attention: padded encoder keys, causal queries.
        layer_kwargs["causal_normalization"] = causal = True
        valid_kwargs["key_mask"] = call_kwargs["value_mask"] = _padding(rng, S)
    valid = oracle.validity(B, q_len, k_len, **valid_kwargs)
    return layer_kwargs, call_kwargs, (q_len, k_len), valid, causal


@pytest.mark.parametrize("dtype, weight_tol, output_tol", [
    ("float32", 2e-6, 2e-5), ("float64", 1e-13, 1e-12),
])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("case", MASK_CASES)
def test_layer_matches_oracle(rng, normalization, case, dtype, weight_tol, output_tol):
    layer_kwargs, call_kwargs, (q_len, k_len), valid, causal = _case(case, rng)
    query, value = (x.astype(dtype) for x in _inputs(rng, q_len, k_len))
    layer = _layer(normalization, dtype=dtype, **layer_kwargs)
    layer(query, value)
    _set_mixing(layer, rng)
    output, weights = layer(query, value, return_attention_scores=True, **call_kwargs)
    assert output.dtype == dtype and weights.dtype == dtype
    expected_output, expected_weights = oracle.layer_forward(
        layer, query, value, valid=valid, causal=causal
    )
    np.testing.assert_allclose(np.asarray(weights), expected_weights, atol=weight_tol, rtol=0)
    rows = valid.any(-1)  # queries with at least one key
    np.testing.assert_allclose(
        np.asarray(output)[rows], expected_output[rows], atol=output_tol, rtol=0
    )


@pytest.mark.parametrize("normalization, null_query", [
    ("double", False), ("single", False), ("hybrid", False), ("double", True), ("hybrid", True),
])
def test_multi_axis_attention_normalizes_axes_jointly(rng, normalization, null_query):
    layer = _layer(normalization, attention_axes=(1, 2), null_query=null_query)
    x = rng.normal(size=(B, 3, 4, DIM)).astype("float32")
    mask = rng.random((B, 1, 1, 3, 4)) < 0.7
    layer(x, x)
    _set_mixing(layer, rng)
    null = None
    if null_query:
        null = rng.normal(size=HEADS)
        layer.null_query_logits.assign(null)
    _, weights = layer(x, x, attention_mask=mask, return_attention_scores=True)
    assert weights.shape == (B, HEADS, 3, 4, 3, 4)
    q = np.einsum("bxyd,dnh->bxynh", x, layer.query_dense.kernel.numpy()) + layer.query_dense.bias.numpy()
    k = np.einsum("bxyd,dnh->bxynh", x, layer.key_dense.kernel.numpy()) + layer.key_dense.bias.numpy()
    scores = np.einsum("bxynh,bzwnh->bnxyzw", q, k) / np.sqrt(HEAD_DIM)
    mixing = None if layer.mixing_logits is None else layer.mixing_logits.numpy()
    expected = oracle.attention_weights(
        scores.reshape(B, HEADS, 12, 12), mask.reshape(B, 1, 1, 12), normalization, False, mixing,
        null,
    )
    np.testing.assert_allclose(
        np.asarray(weights).reshape(B, HEADS, 12, 12), expected, atol=2e-6
    )


@pytest.mark.parametrize("case", MASK_CASES)
def test_single_equals_multi_head_attention(rng, case):
    layer_kwargs, call_kwargs, (q_len, k_len), valid, _ = _case(case, rng)
    layer_kwargs.pop("causal_normalization", None)
    query, value = _inputs(rng, q_len, k_len)
    mha = keras.layers.MultiHeadAttention(HEADS, HEAD_DIM, bias_initializer="random_normal", **layer_kwargs)
    dna = _layer("single", **layer_kwargs)
    mha(query, value)
    dna(query, value)
    dna.set_weights(mha.get_weights())
    if "query_mask" in call_kwargs:
        # MultiHeadAttention ignores an explicit query mask; give it as a
        # Keras mask, which it reads.
        query_mask = call_kwargs.pop("query_mask")
        query = keras.layers.Masking()(query * query_mask[..., None])
    got = np.asarray(dna(query, value, **call_kwargs))
    want = np.asarray(mha(query, value, **call_kwargs))
    rows = valid.any(-1)
    np.testing.assert_allclose(got[rows], want[rows], atol=1e-5)


def test_weights_are_those_of_multi_head_attention(rng):
    query, value = _inputs(rng)
    mha = keras.layers.MultiHeadAttention(HEADS, HEAD_DIM, use_gate=True, output_shape=(3,))
    dna = DoublyNormalizedAttention(HEADS, HEAD_DIM, use_gate=True, output_shape=(3,))
    mha(query, value)
    dna(query, value)
    assert [w.path.split("/", 1)[1] for w in dna.weights] == [
        w.path.split("/", 1)[1] for w in mha.weights
    ]
    dna.set_weights(mha.get_weights())
    assert dna(query, value).shape == (B, T, 3)


def test_hybrid_has_one_trainable_mixing_logit_per_head(rng):
    query, value = _inputs(rng)
    layer = _layer("hybrid")
    layer(query, value)
    assert layer.mixing_logits.shape == (HEADS,)
    assert layer.mixing_logits.trainable
    np.testing.assert_array_equal(layer.mixing_logits.numpy(), 0.0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(query, value) ** 2)
    grad = tape.gradient(loss, layer.mixing_logits)
    assert grad is not None and np.abs(grad.numpy()).max() > 0


def test_explicit_query_mask_matches_keras_mask(rng):
    query, value = _inputs(rng)
    query_mask = _padding(rng, T)
    layer = _layer()
    explicit = layer(query, value, query_mask=query_mask)
    masked_query = keras.layers.Masking()(query * query_mask[..., None])
    implicit = layer(masked_query, value)
    rows = query_mask
    np.testing.assert_allclose(np.asarray(explicit)[rows], np.asarray(implicit)[rows], atol=1e-6)
    unmasked = layer(query, value)
    assert np.abs(np.asarray(unmasked)[rows] - np.asarray(explicit)[rows]).max() > 1e-4


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_padding_invariance(rng, normalization):
    query, value = _inputs(rng)
    layer = _layer(normalization)
    layer(query, value)
    _set_mixing(layer, rng)
    base = np.asarray(layer(query, value))
    padded_query = np.concatenate([query, rng.normal(size=(B, 3, DIM)).astype("float32")], 1)
    padded_value = np.concatenate([value, rng.normal(size=(B, 4, DIM)).astype("float32")], 1)
    query_mask = np.arange(T + 3)[None] < T
    value_mask = np.arange(S + 4)[None] < S
    padded = np.asarray(layer(
        padded_query, padded_value,
        query_mask=np.repeat(query_mask, B, 0), value_mask=np.repeat(value_mask, B, 0),
    ))
    np.testing.assert_allclose(padded[:, :T], base, atol=1e-5)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_causal_outputs_ignore_the_future(rng, normalization):
    x = rng.normal(size=(B, 6, DIM)).astype("float32")
    layer = _layer(normalization)
    layer(x, x)
    _set_mixing(layer, rng)
    base = np.asarray(layer(x, x, use_causal_mask=True))
    for position in range(5):
        changed = x.copy()
        changed[:, position + 1:] += rng.normal(size=changed[:, position + 1:].shape).astype("float32")
        out = np.asarray(layer(changed, changed, use_causal_mask=True))
        np.testing.assert_allclose(out[:, : position + 1], base[:, : position + 1], atol=1e-5)
        assert np.abs(out[:, position + 1:] - base[:, position + 1:]).max() > 1e-4


def test_cross_attention_causal_normalization_ignores_later_queries(rng):
    query, value = _inputs(rng)
    layer = _layer(causal_normalization=True)
    base = np.asarray(layer(query, value))
    changed = query.copy()
    changed[:, 3:] += 5.0
    out = np.asarray(layer(changed, value))
    np.testing.assert_allclose(out[:, :3], base[:, :3], atol=1e-5)
    # Without causal normalization, later queries do leak into earlier ones.
    leaky = _layer()
    leaky(query, value)
    leaky.set_weights(layer.get_weights())
    assert np.abs(np.asarray(leaky(changed, value))[:, :3] - np.asarray(leaky(query, value))[:, :3]).max() > 1e-4


def test_rows_without_keys_give_zeros_and_finite_gradients(rng):
    query, value = _inputs(rng)
    mask = rng.random((B, T, S)) < 0.6
    mask[0, 1] = False
    layer = _layer("hybrid", dropout=0.3)
    layer(query, value)
    q = tf.constant(query)
    with tf.GradientTape() as tape:
        tape.watch(q)
        out, weights = layer(q, value, attention_mask=mask, return_attention_scores=True, training=True)
        loss = tf.reduce_sum(out ** 2)
    grads = tape.gradient(loss, [q] + layer.trainable_weights)
    assert np.isfinite(out.numpy()).all()
    assert (weights.numpy()[0, :, 1] == 0).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_dropout_applies_only_in_training(rng):
    query, value = _inputs(rng)
    layer = _layer(dropout=0.5, seed=3)
    inference = layer(query, value)
    np.testing.assert_array_equal(np.asarray(layer(query, value)), np.asarray(inference))
    assert np.abs(np.asarray(layer(query, value, training=True)) - np.asarray(inference)).max() > 1e-3


def test_symbolic_shapes_in_a_functional_model():
    query = keras.Input((5, DIM))
    value = keras.Input((9, DIM))
    layer = DoublyNormalizedAttention(HEADS, HEAD_DIM, output_shape=3)
    out, scores = layer(query, value, return_attention_scores=True)
    assert out.shape == (None, 5, 3)
    assert scores.shape == (None, HEADS, 5, 9)  # key length, not query length
    model = keras.Model([query, value], [out, scores])
    o, s = model([np.zeros((1, 5, DIM)), np.zeros((1, 9, DIM))])
    assert s.shape == (1, HEADS, 5, 9)


def test_bad_arguments_raise_clear_errors(rng):
    query, value = _inputs(rng)
    with pytest.raises(ValueError, match="normalization"):
        DoublyNormalizedAttention(2, 4, normalization="softmax")
    with pytest.raises(ValueError, match="flash attention"):
        DoublyNormalizedAttention(2, 4, flash_attention=True, dropout=0.5)
    with pytest.raises(TypeError, match="flash_attention"):
        DoublyNormalizedAttention(2, 4, flash_attention=1)
    with pytest.raises(ValueError, match="num_heads"):
        DoublyNormalizedAttention(2.5, 4)
    with pytest.raises(TypeError, match="causal_normalization"):
        DoublyNormalizedAttention(2, 4, causal_normalization="yes")
    layer = _layer()
    layer(query, value)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(query, value, attention_mask=np.ones((B, T, S + 1), bool))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(query, value, attention_mask=np.ones((B, 1, T, S, 1), bool))
    with pytest.raises(ValueError, match="query_mask"):
        layer(query, value, query_mask=np.ones((B, T + 1), bool))
    with pytest.raises(ValueError, match="value_mask"):
        layer(query, value, value_mask=np.ones((B, T, S), bool))
    with pytest.raises(ValueError, match="`query`"):
        layer(query[..., :6], value)
    with pytest.raises(ValueError, match="`value`"):
        layer(query, value[..., :6])
    with pytest.raises(ValueError, match="key"):
        layer(query, value, key=value[:, :3])


def test_compute_attention_honours_use_causal_mask_given_directly(rng):
    # What MultiHeadAttention.call would pass on its fused path: no mask,
    # use_causal_mask=True.
    layer = _layer()
    x = rng.normal(size=(B, 6, DIM)).astype("float32")
    expected = np.asarray(layer(x, x, use_causal_mask=True))
    q, k, v = layer.query_dense(x), layer.key_dense(x), layer.value_dense(x)
    context, weights = layer._compute_attention(q, k, v, None, use_causal_mask=True)
    np.testing.assert_allclose(np.asarray(layer.output_dense(context)), expected, atol=1e-6)
    assert (np.triu(np.asarray(weights)[0, 0], 1) == 0).all()



def test_causal_mask_has_no_cumulative_sums_for_xla_to_fold():
    # MultiHeadAttention's cumulative sums of ones took XLA 28 s each to
    # constant-fold at 2048 x 2048 (batch 1, static shapes).
    x = tf.zeros((1, 64, DIM))
    graph = tf.function(_layer()._compute_causal_mask).get_concrete_function(x, x).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "Range" in op_types and "Cumsum" not in op_types

@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_compiled_normalization_equals_plain(rng, normalization):
    query, value = _inputs(rng)
    mask = rng.random((B, T, S)) < 0.7
    compiled = _layer(normalization, jit_compile=True)
    plain = _layer(normalization, jit_compile=False)
    compiled(query, value)
    plain(query, value)
    _set_mixing(compiled, rng)
    plain.set_weights(compiled.get_weights())

    @tf.function  # a graph that is not compiled, as in Keras' fit on CPUs
    def loss_and_gradients(layer, q, v):
        with tf.GradientTape() as tape:
            tape.watch(q)
            out = layer(q, v, attention_mask=mask) + layer(q, q, use_causal_mask=True)
            loss = tf.reduce_sum(out**2)
        return out, tape.gradient(loss, [q] + layer.trainable_weights)

    out_c, grads_c = loss_and_gradients(compiled, tf.constant(query), tf.constant(value))
    out_p, grads_p = loss_and_gradients(plain, tf.constant(query), tf.constant(value))
    np.testing.assert_allclose(out_c.numpy(), out_p.numpy(), atol=1e-5)
    for g_c, g_p in zip(grads_c, grads_p):
        # Gradients reach ~10; some are zero up to rounding of that scale.
        np.testing.assert_allclose(np.asarray(g_c), np.asarray(g_p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_inside_an_xla_compiled_step_the_normalization_is_not_compiled_again(rng, chunk_size):
    # A compiled call nested in the step made XLA take the step's inputs and
    # weights as compile-time constants: with chunk_size, every training step
    # of fit(jit_compile=True) compiled anew.
    query, value = _inputs(rng)
    layer = _layer("hybrid", chunk_size=chunk_size)
    layer(query, value)

    @tf.function(jit_compile=True)
    def gradients(q, v):
        with tf.GradientTape() as tape:
            tape.watch(q)
            loss = tf.reduce_sum(layer(q, v, use_causal_mask=True) ** 2)
        return tape.gradient(loss, [q] + layer.trainable_weights)

    graph = gradients.get_concrete_function(tf.constant(query), tf.constant(value)).graph
    nested = [
        op.name for op in graph.get_operations()
        if op.type.endswith("PartitionedCall") and op.node_def.attr["_XlaMustCompile"].b
    ]
    assert nested == []
    for g in gradients(tf.constant(query), tf.constant(value)):
        assert np.isfinite(g.numpy()).all()


def test_jit_compile_argument():
    assert DoublyNormalizedAttention(2, 4).get_config()["jit_compile"] == "auto"
    assert DoublyNormalizedAttention.from_config(
        DoublyNormalizedAttention(2, 4, jit_compile=False).get_config()
    ).get_config()["jit_compile"] is False
    with pytest.raises(ValueError, match="jit_compile"):
        DoublyNormalizedAttention(2, 4, jit_compile="yes")


def test_hybrid_layers_of_different_sizes_share_the_compiled_function(rng):
    # The compiled normalization is shared and retraced with relaxed shapes;
    # each layer's gradient must still use its own mixing logits.
    for heads, length in [(4, 5), (4, 6), (4, 7), (3, 5), (2, 8)]:
        x = rng.normal(size=(2, length, DIM)).astype("float32")
        compiled = DoublyNormalizedAttention(heads, HEAD_DIM, normalization="hybrid")
        plain = DoublyNormalizedAttention(heads, HEAD_DIM, normalization="hybrid", jit_compile=False)
        compiled(x, x)
        plain(x, x)
        compiled.mixing_logits.assign(rng.normal(size=heads))
        plain.set_weights(compiled.get_weights())
        grads = []
        for layer in (compiled, plain):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, x) ** 2)
            grads.append(tape.gradient(loss, layer.mixing_logits).numpy())
        np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)
