"""DoublyNormalizedGroupQueryAttention: GroupQueryAttention's drop-in.

With `normalization="single"` it is Keras's `GroupQueryAttention` (same
weights, masks and options); with DNA it equals the float64 oracle of
grouped-query attention (`tests/oracle.group_query_forward`), where each
query head normalizes each key over its own queries, on every route the
selector takes (whole; blockwise with `chunk_size`; fused where the
backend's kernels take DNA). Backend-neutral: runs on every backend.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_dna import CausalNormalizationMask
from keras_dna import DoublyNormalizedGroupQueryAttention
from tests import oracle

DIM, HEAD_DIM, QUERY_HEADS, KV_HEADS = 12, 4, 4, 2


def _layers(seed=0, **options):
    """A built `GroupQueryAttention` and a DNA layer with its weights (and
    random per-head logits, where the options add them)."""
    shared = dict(head_dim=HEAD_DIM, num_query_heads=QUERY_HEADS, num_key_value_heads=KV_HEADS)
    shared.update({k: options.pop(k) for k in ("use_gate", "sliding_window", "use_bias") if k in options})
    keras.utils.set_random_seed(seed)
    gqa = keras.layers.GroupQueryAttention(**shared)
    dna = DoublyNormalizedGroupQueryAttention(**shared, **options)
    x = np.zeros((1, 3, DIM), "float32")
    gqa(x, x)
    dna(x, x)
    rng = np.random.default_rng(seed)
    # Biases of the projections nonzero, so that a missing one shows.
    gqa.set_weights([w + rng.normal(scale=0.3, size=w.shape).astype("float32") for w in gqa.get_weights()])
    for weight in dna.weights:
        if weight.path.endswith(("mixing_logits", "null_query_logits")):
            weight.assign(rng.normal(size=weight.shape).astype("float32"))
    by_name = {w.path.split("/", 1)[1]: w for w in dna.weights}
    for w in gqa.weights:
        by_name[w.path.split("/", 1)[1]].assign(w.value)
    return gqa, dna


def _oracle(dna, query, value, **kwargs):
    return oracle.group_query_layer_forward(dna, query, value, **kwargs)


def _inputs(rng, batch=2, length=6, key_length=None):
    query = rng.normal(size=(batch, length, DIM)).astype("float32")
    value = rng.normal(size=(batch, key_length or length, DIM)).astype("float32")
    return query, value


MASKS = {
    "none": {},
    "padding": {"query_mask": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]],
                "value_mask": [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]},
    "causal": {"use_causal_mask": True},
    "causal_padding": {"use_causal_mask": True, "query_mask": [[1, 1, 1, 1, 1, 0], [1] * 6]},
    "attention_mask": {"attention_mask": np.tril(np.ones((6, 6)), 1)[None].repeat(2, 0) > 0},
}


def _validity(masks, batch=2, length=6, sliding_window=None):
    attention_mask = masks.get("attention_mask")
    return oracle.validity(
        batch, length, length, masks.get("query_mask"), masks.get("value_mask"),
        attention_mask, causal=masks.get("use_causal_mask", False),
        sliding_window=sliding_window,
    )


@pytest.mark.parametrize("masks", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("layer_options", [{}, {"use_gate": True, "sliding_window": 3}], ids=["plain", "gate_window"])
def test_single_normalization_is_group_query_attention(rng, masks, layer_options):
    gqa, dna = _layers(normalization="single", **layer_options)
    query, value = _inputs(rng)
    call = {k: np.asarray(v, bool) if k != "use_causal_mask" else v for k, v in MASKS[masks].items()}
    expected = ops.convert_to_numpy(gqa(query, value, **call))
    got = ops.convert_to_numpy(dna(query, value, **call))
    # Rows of padded queries: Keras leaves them to a uniform softmax, DNA
    # to zero weights (docs/math.md, "Masks"); both are excluded from
    # every other row.
    rows = _validity(MASKS[masks], sliding_window=layer_options.get("sliding_window")).any(-1)
    np.testing.assert_allclose(got[rows], expected[rows], rtol=1e-5, atol=1e-5)


# The default route is the selector's: fused kernels with DNA's per-key
# bias on PyTorch for non-causal calls, the whole matrix elsewhere here.
ROUTES = {"whole": {"chunk_size": None, "flash_attention": False},
          "blockwise": {"chunk_size": 2, "flash_attention": False}, "default": {}}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("masks", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize(
    "options", [{"normalization": "double"}, {"normalization": "hybrid", "null_query": True}],
    ids=["double", "hybrid_null"],
)
def test_double_normalization_equals_the_oracle_on_every_route(
    rng, kernel_calls, route, masks, options
):
    _, dna = _layers(**options, **ROUTES[route])
    kernel_calls.clear()  # Keras's layer calls them
    query, value = _inputs(rng)
    call = {k: np.asarray(v, bool) if k != "use_causal_mask" else v for k, v in MASKS[masks].items()}
    got = ops.convert_to_numpy(dna(query, value, **call))
    fused = route == "default" and keras.backend.backend() == "torch" and "use_causal_mask" not in call
    assert bool(kernel_calls) == fused, kernel_calls
    valid = _validity(MASKS[masks])
    expected, _ = _oracle(dna, query, value, valid=valid, causal=MASKS[masks].get("use_causal_mask", False))
    rows = valid.any(-1)
    np.testing.assert_allclose(got[rows], expected[rows], rtol=2e-5, atol=2e-5)


def test_each_query_head_normalizes_each_key_over_its_own_queries(rng):
    """Query heads 0 and 1 share key and value head 0: their per-key steps
    still differ, and each column sum is that query head's own."""
    _, dna = _layers()
    query, value = _inputs(rng)
    _, weights = dna(query, value, return_attention_scores=True)
    weights = ops.convert_to_numpy(weights)
    _, expected = _oracle(dna, query, value)
    np.testing.assert_allclose(weights, expected, rtol=2e-5, atol=2e-6)
    assert np.abs(weights[:, 0] - weights[:, 1]).max() > 1e-2
    # Property 3 of docs/math.md per query head: each key gets at least
    # 1 / (number of keys) of attention in total.
    assert weights.sum(axis=-2).min() >= 1.0 / weights.shape[-1] - 1e-6


def test_causal_call_is_exactly_causal(rng):
    _, dna = _layers(null_query=True)
    query, _ = _inputs(rng, length=7)
    changed = query.copy()
    changed[:, 5:] = rng.normal(size=changed[:, 5:].shape)
    first = ops.convert_to_numpy(dna(query, query, use_causal_mask=True))
    second = ops.convert_to_numpy(dna(changed, changed, use_causal_mask=True))
    np.testing.assert_array_equal(first[:, :5], second[:, :5])


def test_a_causal_mask_of_its_own_normalizes_causally_when_said(rng):
    _, dna = _layers()
    query, _ = _inputs(rng)
    causal = np.tril(np.ones((6, 6), bool))[None]
    by_flag = ops.convert_to_numpy(dna(query, query, use_causal_mask=True))
    by_mask = ops.convert_to_numpy(dna(query, query, attention_mask=CausalNormalizationMask(causal)))
    np.testing.assert_allclose(by_mask, by_flag, rtol=1e-6, atol=1e-6)


def test_padded_positions_change_no_valid_output(rng):
    """Keras masks from an embedding: the padding's values reach nothing."""
    _, dna = _layers()
    tokens = np.array([[3, 5, 2, 7, 0, 0]])
    other = np.array([[3, 5, 2, 7, 9, 4]])
    embedding = keras.layers.Embedding(10, DIM, mask_zero=True)
    padded = embedding(tokens)
    # The same valid tokens, other values where the padding was.
    unpadded = embedding(other)[:, :4]
    got = ops.convert_to_numpy(dna(padded, padded, use_causal_mask=True))[:, :4]
    expected = ops.convert_to_numpy(dna(unpadded, unpadded, use_causal_mask=True))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_config_round_trips_and_keras_file_reloads(rng, tmp_path):
    _, dna = _layers(normalization="hybrid", null_query=True, chunk_size=None, sliding_window=4)
    config = dna.get_config()
    again = DoublyNormalizedGroupQueryAttention.from_config(config)
    assert again.get_config() == config
    query, value = _inputs(rng)
    inputs = keras.Input((6, DIM))
    model = keras.Model(inputs, dna(inputs, inputs, use_causal_mask=True))
    path = tmp_path / "gqa.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(query)), ops.convert_to_numpy(model(query)), rtol=1e-6, atol=1e-6
    )


def test_fit_trains_the_projections_and_the_logits(rng):
    _, dna = _layers(null_query=True)
    inputs = keras.Input((6, DIM))
    model = keras.Model(inputs, dna(inputs, inputs, use_causal_mask=True))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    query, target = _inputs(rng)
    before = {w.path: ops.convert_to_numpy(w.value).copy() for w in dna.trainable_weights}
    history = model.fit(query, target, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for weight in dna.trainable_weights:
        assert np.abs(ops.convert_to_numpy(weight.value) - before[weight.path]).max() > 0, weight.path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DoublyNormalizedGroupQueryAttention(4, 4, 3), "divisible"),
        (lambda: DoublyNormalizedGroupQueryAttention(4, 4, 2, normalization="triple"), "normalization"),
        (lambda: DoublyNormalizedGroupQueryAttention(4, 4, 2, normalization="single", null_query=True),
         "null"),
        (lambda: DoublyNormalizedGroupQueryAttention(4, 4, 2, flash_attention=True, dropout=0.1),
         "Dropout"),
        (lambda: DoublyNormalizedGroupQueryAttention(4, 4, 2, chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments_raise_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_calls_raise_naming_the_argument(rng):
    _, dna = _layers(chunk_size=2)
    query, value = _inputs(rng)
    with pytest.raises(ValueError, match="chunk_size"):
        dna(query, value, return_attention_scores=True)
    with pytest.raises(ValueError, match="`query`"):
        dna(query[..., :5], value)
    with pytest.raises(ValueError, match="attention_mask"):
        dna(query, value, attention_mask=np.ones((2, 5, 6), bool))
    fresh = DoublyNormalizedGroupQueryAttention(HEAD_DIM, QUERY_HEADS, KV_HEADS)
    with pytest.raises(ValueError, match="rank 3"):
        fresh(query[:, None], value[:, None])


def _group_query_model():
    keras.utils.set_random_seed(3)
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, DIM, mask_zero=True)(tokens)
    attention = keras.layers.GroupQueryAttention(
        head_dim=HEAD_DIM, num_query_heads=QUERY_HEADS, num_key_value_heads=KV_HEADS,
        bias_initializer="random_normal", name="attention",
    )
    return keras.Model(tokens, attention(x, x, use_causal_mask=True))


def test_conversion_turns_group_query_attention_into_dna(rng, tmp_path):
    from keras_dna import convert

    model = _group_query_model()
    tokens = rng.integers(1, 20, size=(2, 6))
    tokens[0, 4:] = 0
    single = convert.to_doubly_normalized(model, normalization="single")
    np.testing.assert_allclose(
        ops.convert_to_numpy(single(tokens))[tokens > 0], ops.convert_to_numpy(model(tokens))[tokens > 0],
        rtol=1e-5, atol=1e-5,
    )
    double = convert.to_doubly_normalized(model, null_query=True)
    layer = double.get_layer("attention")
    assert isinstance(layer, DoublyNormalizedGroupQueryAttention)
    assert layer.null_query_logits is not None
    embedded = ops.convert_to_numpy(double.layers[1](tokens))
    valid = oracle.validity(2, 6, 6, tokens > 0, tokens > 0, causal=True)
    expected, _ = oracle.group_query_layer_forward(layer, embedded, embedded, valid=valid, causal=True)
    got = ops.convert_to_numpy(double(tokens))
    np.testing.assert_allclose(got[tokens > 0], expected[tokens > 0], rtol=2e-5, atol=2e-5)
    double.save(tmp_path / "converted.keras")
    loaded = keras.saving.load_model(tmp_path / "converted.keras")
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(tokens)), got, rtol=1e-6, atol=1e-6)
    # The original is untouched.
    assert type(model.get_layer("attention")) is keras.layers.GroupQueryAttention
