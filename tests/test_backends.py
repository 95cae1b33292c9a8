"""DNA on whichever Keras backend runs the tests: TensorFlow, JAX or PyTorch.

Written in `keras.ops` and NumPy only, so that `.ci/run` runs this module
under each backend (`KERAS_BACKEND=jax JAX_ENABLE_X64=1`, `KERAS_BACKEND=torch`):
the oracle, the properties of docs/math.md, float64 finite-difference gradients,
the chunked path, serialization, `fit` compiled, and `.keras` files saved
under another backend.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_dna
from keras_dna import DoublyNormalizedAttention
from tests import oracle
from tests.common import numeric_gradient
from tests.common import value_and_gradients

BACKEND = keras.backend.backend()
NORMALIZATIONS = ["double", "single", "hybrid"]
HEADS = 2


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def _case(rng, normalization, causal, masked, null):
    scores = rng.normal(size=(2, HEADS, 6, 5)) * 3
    valid = rng.random((2, 1, 6, 5)) < 0.7 if masked else None
    mixing = rng.normal(size=HEADS) if normalization == "hybrid" else None
    null_logits = rng.normal(size=HEADS) if null else None
    return scores, valid, mixing, null_logits


CASES = [
    (normalization, causal, masked, null)
    for normalization in NORMALIZATIONS
    for causal in (False, True)
    for masked in (False, True)
    for null in ((False, True) if normalization != "single" else (False,))
]


@pytest.mark.parametrize("normalization, causal, masked, null", CASES)
def test_weights_match_the_oracle_in_float32_and_float64(rng, normalization, causal, masked, null):
    scores, valid, mixing, null_logits = _case(rng, normalization, causal, masked, null)
    expected = oracle.attention_weights(scores, valid, normalization, causal, mixing, null_logits)
    for dtype, tolerance in (("float32", 2e-6), ("float64", 1e-12)):
        got = keras_dna.ops.normalize_attention_scores(
            scores.astype(dtype), valid, normalization=normalization,
            causal_normalization=causal, mixing_logits=mixing, null_query_logits=null_logits,
        )
        assert keras.backend.standardize_dtype(got.dtype) == dtype
        np.testing.assert_allclose(_numpy(got), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_sum_to_one_and_no_key_is_explained_away(rng, causal):
    scores = rng.normal(size=(2, HEADS, 7, 7)) * 6
    valid = rng.random((2, 1, 7, 7)) < 0.6
    valid[..., np.arange(7), np.arange(7)] = True
    weights = _numpy(keras_dna.ops.normalize_attention_scores(
        scores, valid, causal_normalization=causal
    ))
    full = np.broadcast_to(valid, weights.shape)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-12)
    assert np.all(weights[~full] == 0)
    widest = full.sum(-1).max(-1, keepdims=True)
    column_sums = weights.sum(-2)
    keys_seen = full.any(-2)
    assert np.all(column_sums[keys_seen] >= (1.0 / widest.repeat(7, -1))[keys_seen] - 1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_extreme_spread_takes_the_exact_path(rng, causal):
    # Causal: scores rising by 195 along the queries underflow the prefix
    # sums. Not causal: falling by as much, the later queries' sums of
    # exp(s - c) underflow.
    slope = 5.0 if causal else -5.0
    scores = rng.normal(size=(1, HEADS, 40, 6)) + slope * np.arange(40)[:, None]
    for dtype, tolerance in (("float64", 1e-10), ("float32", 1e-4)):
        got = keras_dna.ops.normalize_attention_scores(
            scores.astype(dtype), causal_normalization=causal
        )
        expected = oracle.attention_weights(scores.astype(dtype), causal=causal)
        np.testing.assert_allclose(_numpy(got), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_masked_scores_far_above_the_valid_ones_change_nothing(rng, causal):
    # The fast paths shift each key by its maximum over all queries, masked
    # ones included; masked scores 200 above the valid ones underflow every
    # valid term of their keys, which must send the call to the exact path.
    scores = rng.normal(size=(2, HEADS, 12, 7))
    valid = rng.uniform(size=(2, 1, 12, 7)) < 0.7
    far = np.where(valid, scores, scores + 200.0)
    for null in (None, np.full(HEADS, -1.0)):
        expected = oracle.attention_weights(
            scores, valid, causal=causal, null_query_logits=null
        )
        for dtype, tolerance in (("float64", 1e-10), ("float32", 1e-5)):
            got = _numpy(keras_dna.ops.normalize_attention_scores(
                far.astype(dtype), valid, causal_normalization=causal,
                null_query_logits=None if null is None else null.astype(dtype),
            ))
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("normalization, causal, masked, null", [
    ("double", False, True, False), ("double", True, True, False),
    ("double", False, True, True), ("double", True, False, True), ("hybrid", True, True, True),
])
def test_float64_gradients_match_finite_differences(rng, normalization, causal, masked, null):
    scores, valid, mixing, null_logits = _case(rng, normalization, causal, masked, null)
    projection = rng.normal(size=scores.shape)
    arrays = [scores] + ([null_logits] if null else [])

    def loss(scores, null_logits=None):
        weights = keras_dna.ops.normalize_attention_scores(
            scores, valid, normalization=normalization, causal_normalization=causal,
            mixing_logits=mixing, null_query_logits=null_logits,
        )
        return ops.sum(weights * ops.convert_to_tensor(projection))

    _, grads = value_and_gradients(loss, *arrays)

    def numeric(*arrays):
        return float(np.sum(oracle.attention_weights(
            arrays[0], valid, normalization, causal, mixing, arrays[1] if null else None
        ) * projection))

    step = 1e-6
    for which, (array, grad) in enumerate(zip(arrays, grads)):
        for index in [tuple(rng.integers(0, n) for n in array.shape) for _ in range(6)]:
            shifted = [a.copy() for a in arrays]
            shifted[which][index] += step
            up = numeric(*shifted)
            shifted[which][index] -= 2 * step
            down = numeric(*shifted)
            np.testing.assert_allclose(grad[index], (up - down) / (2 * step), atol=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_eager_gradients_of_the_compiled_layer_equal_the_uncompiled_ones(rng, chunk_size):
    # Called eagerly, the layer compiles its normalization (on JAX also
    # under `jax.grad`, where the backward pass is compiled apart); the
    # gradients in every weight and input must be those of the same layer
    # run op by op.
    query, value = rng.normal(size=(2, 7, 6)), rng.normal(size=(2, 5, 6))
    mask = rng.uniform(size=(2, 7, 5)) < 0.8
    projection = rng.normal(size=(2, 7, 6))
    grads, weights = {}, None
    for jit_compile in (True, False):
        layer = DoublyNormalizedAttention(
            HEADS, 3, normalization="hybrid", causal_normalization=True, null_query=True,
            jit_compile=jit_compile, chunk_size=chunk_size, dtype="float64",
        )
        layer(query, value)
        if weights is None:  # nonzero mixing and null logits, the same for both layers
            weights = [w + 0.5 * rng.normal(size=w.shape) for w in layer.get_weights()]
        layer.set_weights(weights)

        def loss(query, value, *weights):
            output, _ = layer.stateless_call(list(weights), [], query, value, attention_mask=mask)
            return ops.sum(output * ops.convert_to_tensor(projection))

        grads[jit_compile] = value_and_gradients(loss, query, value, *weights)
    assert len(grads[True][1]) == 2 + len(layer.trainable_variables)
    np.testing.assert_allclose(grads[True][0], grads[False][0], rtol=1e-12)
    for got, expected in zip(grads[True][1], grads[False][1]):
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("null", [False, True])
def test_chunked_equals_whole_forward_and_backward(rng, is_causal, null):
    query, key, value = (rng.normal(size=(2, 9, HEADS, 4)) for _ in range(3))
    null_logits = rng.normal(size=HEADS) if null else None
    projection = ops.convert_to_tensor(rng.normal(size=(2, 9, HEADS, 4)))

    def loss(query, key, value, chunk_size):
        output = keras_dna.ops.doubly_normalized_attention(
            query, key, value, is_causal=is_causal, null_query_logits=null_logits,
            chunk_size=chunk_size,
        )
        return ops.sum(output * projection)

    whole, whole_grads = value_and_gradients(lambda *x: loss(*x, None), query, key, value)
    chunked, chunked_grads = value_and_gradients(lambda *x: loss(*x, 4), query, key, value)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)
    for got, expected in zip(chunked_grads, whole_grads):
        np.testing.assert_allclose(got, expected, atol=1e-12)


def _oracle_output(query, key, value, valid, normalization, null_logits):
    scores = np.einsum("btnh,bsnh->bnts", query, key) / np.sqrt(query.shape[-1])
    weights = oracle.attention_weights(
        scores, valid, normalization, True, null_query_logits=null_logits
    )
    return np.einsum("bnts,bsnh->btnh", weights, value)


# PyTorch runs these blocks op by op; JAX and TensorFlow compile a loop for
# every new shape (and hold their scans to the oracle in test_blockwise.py).
@settings(deadline=None, max_examples=25 if BACKEND == "torch" else 6)
@given(
    lengths=st.tuples(st.integers(1, 9), st.integers(1, 11)),
    chunk_size=st.integers(1, 5),
    normalization=st.sampled_from(["double", "single"]),
    null=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_blocks_match_the_oracle_forward_and_backward(
    lengths, chunk_size, normalization, null, padded, seed
):
    # On PyTorch, causal blocks score only the keys up to their last query
    # (`keras_dna.ops.blockwise`), here with key lengths shorter and longer
    # than the queries, partial last blocks and padded keys.
    null = null and normalization == "double"
    rng = np.random.default_rng(seed)
    query_length, key_length = lengths
    query = rng.normal(size=(2, query_length, HEADS, 3)) * 2
    key, value = (rng.normal(size=(2, key_length, HEADS, 3)) for _ in range(2))
    arrays = [query, key, value] + ([rng.normal(size=HEADS)] if null else [])
    mask = rng.random((2, 1, 1, key_length)) < 0.8 if padded else None
    valid = oracle.validity(2, query_length, key_length, causal=True)[:, None]
    if mask is not None:
        valid = valid & mask
    projection = rng.normal(size=(2, query_length, HEADS, 3))

    def loss(query, key, value, null_logits=None):
        output = keras_dna.ops.doubly_normalized_attention(
            query, key, value, mask, normalization=normalization, is_causal=True,
            null_query_logits=null_logits, chunk_size=chunk_size,
        )
        return ops.sum(output * ops.convert_to_tensor(projection))

    def oracle_loss(*arrays):
        return float(np.sum(_oracle_output(
            *arrays[:3], valid, normalization, arrays[3] if null else None
        ) * projection))

    value_, grads = value_and_gradients(loss, *arrays)
    np.testing.assert_allclose(value_, oracle_loss(*arrays), rtol=1e-10, atol=1e-10)
    for which, grad in enumerate(grads):
        expected = numeric_gradient(
            lambda x: oracle_loss(*arrays[:which], x, *arrays[which + 1:]), arrays[which]
        )
        np.testing.assert_allclose(grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_auto_chunk_size_takes_blocks_where_the_scores_are_large(rng, monkeypatch, is_causal):
    from keras_dna.ops import dispatch
    from keras_dna.ops import blockwise

    # Large scores in miniature: two batches of HEADS heads of 9 x 9.
    monkeypatch.setattr(blockwise, "AUTO_CHUNK_SIZE", 4)
    monkeypatch.setattr(blockwise, "AUTO_CHUNK_SCORES", 2 * HEADS * 9 * 9)
    chunk_sizes = []
    chunked_attention = dispatch.chunked_attention

    def spy(*args, **kwargs):
        chunk_sizes.append(kwargs["chunk_size"])
        return chunked_attention(*args, **kwargs)

    monkeypatch.setattr(dispatch, "chunked_attention", spy)
    query, key, value = (rng.normal(size=(2, 9, HEADS, 4)) for _ in range(3))

    def attend(length, chunk_size):
        return _numpy(keras_dna.ops.doubly_normalized_attention(
            query[:, :length], key[:, :length], value[:, :length], is_causal=is_causal,
            chunk_size=chunk_size,
        ))

    np.testing.assert_allclose(attend(9, "auto"), attend(9, None), atol=1e-12)
    assert chunk_sizes == [4]
    np.testing.assert_allclose(attend(8, "auto"), attend(8, None), atol=1e-12)
    assert chunk_sizes == [4]  # 8 x 8 scores per head: the whole matrix


@pytest.mark.parametrize("options", [
    {}, {"normalization": "hybrid", "null_query": True}, {"chunk_size": 3},
])
def test_layer_matches_the_oracle_with_masks(rng, options):
    layer = DoublyNormalizedAttention(HEADS, 4, bias_initializer="random_normal", **options)
    query = rng.normal(size=(2, 6, 8)).astype("float32")
    query_valid = np.arange(6)[None, :] < np.array([[6], [4]])
    output = layer(query, query, query_mask=query_valid, use_causal_mask=True)
    valid = oracle.validity(2, 6, 6, query_mask=query_valid, causal=True)
    expected, _ = oracle.layer_forward(layer, query, query, valid=valid, causal=True)
    rows = valid.any(-1)
    np.testing.assert_allclose(_numpy(output)[rows], expected[rows], atol=2e-5, rtol=0)


@pytest.mark.skipif(BACKEND != "torch", reason="the meta device is PyTorch's")
def test_choices_on_the_meta_device_take_the_first_branch_as_keras_cond_does():
    # Keras infers shapes on PyTorch's meta device, where no value can be
    # read; its `cond` takes the first branch there.
    import torch

    from keras_dna.ops.backend import cond

    meta = torch.zeros((), dtype=torch.bool, device="meta")
    assert cond(meta, lambda: "true", lambda: "false") == "true"
    assert cond(torch.tensor(False), lambda: "true", lambda: "false") == "false"
    assert cond(torch.tensor(True), lambda: "true", lambda: "false") == "true"


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is PyTorch's")
def test_torch_compile_breaks_the_graph_only_at_the_normalizations_choices(rng):
    # `keras_dna.ops.backend.cond` is a Python `if` on PyTorch (as Keras's
    # `ops.cond` is there): the fast or exact path is chosen between graphs. Nothing else in a call may break the graph (a
    # context variable made torch.compile run the whole call uncompiled).
    # Dynamo takes about 20 s to trace one call.
    import torch

    layer = DoublyNormalizedAttention(HEADS, 4, normalization="hybrid", null_query=True)
    x = ops.convert_to_tensor(rng.normal(size=(2, 7, 8)).astype("float32"))
    mask = ops.convert_to_tensor(rng.random((2, 7, 7)) < 0.8)
    layer(x, x)
    explanation = torch._dynamo.explain(
        lambda q, m: layer(q, q, attention_mask=m, use_causal_mask=True)
    )(x, mask)
    where = {(r.user_stack[-1].filename, r.user_stack[-1].name) for r in explanation.break_reasons}
    assert {name for _, name in where} == {"cond"}, explanation.break_reasons
    assert all(path.endswith("keras_dna/ops/backend.py") for path, _ in where)


def test_per_head_masks_and_empty_sequences(rng):
    layer = DoublyNormalizedAttention(HEADS, 4, causal_normalization=True)
    query = rng.normal(size=(3, 5, 8)).astype("float32")
    mask = rng.random((3, HEADS, 5, 5)) < 0.6
    mask[..., 0] = True
    output = layer(query, query, attention_mask=mask)
    expected, _ = oracle.layer_forward(layer, query, query, valid=mask, causal=True)
    np.testing.assert_allclose(_numpy(output), expected, atol=2e-5, rtol=0)
    for shape in ((3, 0, 8), (0, 5, 8)):
        empty = np.zeros(shape, "float32")
        assert tuple(layer(empty, empty, use_causal_mask=True).shape) == shape



@pytest.mark.parametrize("query_length, key_length", [(5, 5), (3, 7), (7, 3), (0, 4)])
def test_causal_mask_is_multi_head_attentions(query_length, key_length):
    query = np.zeros((2, query_length, 8), "float32")
    value = np.zeros((2, key_length, 8), "float32")
    ours = DoublyNormalizedAttention(HEADS, 4)._compute_causal_mask(query, value)
    theirs = keras.layers.MultiHeadAttention(HEADS, 4)._compute_causal_mask(query, value)
    assert ours.shape == theirs.shape == (1, query_length, key_length)
    np.testing.assert_array_equal(_numpy(ours), _numpy(theirs))
    expected = np.tril(np.ones((query_length, key_length), bool))
    np.testing.assert_array_equal(_numpy(keras_dna.ops.causal_mask(query_length, key_length)), expected)

def _tiny_model(*options):
    """A causal token model with one attention layer per dict of `options`."""
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    for index, layer_options in enumerate(options):
        attention = DoublyNormalizedAttention(HEADS, 4, name=f"attention{index}", **layer_options)
        x = attention(x, x, use_causal_mask=True)
    return keras.Model(tokens, keras.layers.Dense(20)(x))


def _tokens(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 20, size=(16, 6)).astype("int32")
    tokens[::3, 4:] = 0
    return tokens


class TestFitCompiled:
    """`fit(jit_compile=True)` with every path of the layer in one model.

    A class, so that `pytest --dist loadscope` gives it a worker of its own:
    under PyTorch its compiled step (inductor) takes longer to compile than
    the rest of the module takes to run.
    """

    def test_trains_and_the_model_round_trips(self, tmp_path):
        keras.utils.set_random_seed(0)
        model = _tiny_model({}, {"null_query": True}, {"chunk_size": 4})
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2), jit_compile=True,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        tokens = _tokens(0)
        history = model.fit(tokens, np.roll(tokens, 1, axis=1), epochs=4, batch_size=8, verbose=0)
        losses = history.history["loss"]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
        path = tmp_path / "model.keras"
        model.save(path)
        restored = keras.saving.load_model(path)
        for index in range(3):
            assert isinstance(restored.get_layer(f"attention{index}"), DoublyNormalizedAttention)
        np.testing.assert_allclose(_numpy(restored(tokens)), _numpy(model(tokens)), atol=1e-6)


SAVE_UNDER_ANOTHER_BACKEND = """
import json, sys
import numpy as np
import keras
from tests.test_backends import _tiny_model, _tokens
keras.utils.set_random_seed(1)
model = _tiny_model(json.loads(sys.argv[2]))
model.save(sys.argv[1] + "/model.keras")
np.save(sys.argv[1] + "/outputs.npy", keras.ops.convert_to_numpy(model(_tokens(1))))
"""
OTHER_BACKEND = {"tensorflow": "jax", "jax": "torch", "torch": "tensorflow"}


@pytest.mark.parametrize("options", [{"normalization": "hybrid", "null_query": True}])
def test_a_keras_file_saved_under_another_backend_loads_with_the_same_outputs(tmp_path, options):
    other = OTHER_BACKEND[BACKEND]
    environment = {**os.environ, "KERAS_BACKEND": other, "JAX_ENABLE_X64": "1"}
    subprocess.run(
        [sys.executable, "-c", SAVE_UNDER_ANOTHER_BACKEND, str(tmp_path), json.dumps(options)],
        check=True, env=environment, cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    restored = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(
        _numpy(restored(_tokens(1))), np.load(tmp_path / "outputs.npy"), atol=1e-5
    )
