"""Property-based fuzzing against the oracle and the properties of docs/math.md.

Hypothesis draws shapes (empty and length 1 included), masks of every shape
the functions and the layer take, paths (normalization, causal, null query,
chunk size), dtypes and score spreads. Backend-neutral: `.ci/run` runs it on
TensorFlow, JAX (float64 on) and PyTorch.

Profiles (`tests/conftest.py`): `ci`, seeded and bounded (25 cases a test), runs
in the suite; `long` runs by hand, unseeded and a hundred times longer:

    HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py

A failure found here stays below as an `@example` of the test that found it.
"""

import keras
import numpy as np
from hypothesis import example
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

from keras_dna import DoublyNormalizedAttention
from keras_dna import ops as dna_ops
from tests import oracle

# float64 everywhere but JAX without x64 (where Keras maps it to float32).
DTYPES = ["float32"] + (
    ["float64"] if ops.convert_to_tensor(np.float64(1)).dtype == "float64" else []
)
# Weights are at most 1; float32 holds them to a few units of 1e-7, and
# double normalization divides twice.
WEIGHT_TOLERANCE = {"float32": 3e-5, "float64": 1e-12}
OUTPUT_TOLERANCE = {"float32": 1e-4, "float64": 1e-12}


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


@st.composite
def paths(draw):
    normalization = draw(st.sampled_from(["double", "single", "hybrid"]))
    return {
        "normalization": normalization,
        "causal": draw(st.booleans()),
        "null": normalization != "single" and draw(st.booleans()),
    }


# Mask shapes as `(which axes are kept)` of (B, N, T, S); the rest are 1.
MASK_LAYOUTS = [None, "BNTS", "B_TS", "B__S", "__TS", "___S", "B_T_"]


def _mask(draw, layout, batch, heads, length, key_length):
    if layout is None:
        return None
    full = (batch, heads, length, key_length)
    shape = tuple(size if axis != "_" else 1 for size, axis in zip(full, layout))
    keep = draw(st.sampled_from([0.5, 0.8, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).random(shape) < keep


@st.composite
def score_cases(draw):
    batch = draw(st.integers(0, 2))
    heads = draw(st.integers(1, 3))
    length = draw(st.integers(0, 6))
    key_length = draw(st.integers(0, 6))
    spread = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0, 1000.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    scores = spread * rng.normal(size=(batch, heads, length, key_length))
    layout = draw(st.sampled_from(MASK_LAYOUTS))
    return {
        "scores": scores,
        "mask": _mask(draw, layout, batch, heads, length, key_length),
        "mixing": rng.normal(size=heads) * 2,
        "null_logits": rng.normal(size=heads) * 3,
        "dtype": draw(st.sampled_from(DTYPES)),
        **draw(paths()),
    }


def _weights(case, scores=None):
    scores = case["scores"] if scores is None else scores
    return _numpy(dna_ops.normalize_attention_scores(
        ops.convert_to_tensor(scores, case["dtype"]),
        None if case["mask"] is None else ops.convert_to_tensor(case["mask"]),
        normalization=case["normalization"],
        causal_normalization=case["causal"],
        mixing_logits=ops.convert_to_tensor(case["mixing"], case["dtype"]),
        null_query_logits=(
            ops.convert_to_tensor(case["null_logits"], case["dtype"]) if case["null"] else None
        ),
    ))


def _scores_in_dtype(case):
    """The scores as the backend sees them (float32 rounds them first)."""
    return case["scores"].astype(case["dtype"]).astype(np.float64)


@given(score_cases())
def test_weights_match_the_oracle_and_the_properties(case):
    weights = _weights(case)
    scores = _scores_in_dtype(case)
    valid = np.ones(scores.shape, bool) if case["mask"] is None else np.broadcast_to(
        case["mask"], scores.shape
    )
    expected = oracle.attention_weights(
        scores, valid, case["normalization"], case["causal"], case["mixing"],
        case["null_logits"] if case["null"] else None,
    )
    assert np.all(np.isfinite(weights))
    np.testing.assert_allclose(weights, expected, rtol=0, atol=WEIGHT_TOLERANCE[case["dtype"]])
    # 1. Rows with a valid key sum to 1, the others are all zeros.
    row_sums = weights.sum(-1)
    has_key = valid.any(-1)
    np.testing.assert_allclose(row_sums[has_key], 1.0, atol=WEIGHT_TOLERANCE[case["dtype"]] * 10)
    assert np.all(weights[~has_key] == 0)
    assert np.all(weights[~valid] == 0)
    if case["normalization"] == "double" and not case["null"]:
        _assert_no_explaining_away(weights, valid, case["dtype"])
        _assert_per_key_shift_invariance(case, weights, valid)


def _assert_no_explaining_away(weights, valid, dtype):
    """2. Every key valid for some query receives at least
    `1 / max_i (valid keys of row i)` in total."""
    widest = valid.sum(-1).max(-1, keepdims=True, initial=0)
    column_sums = weights.sum(-2)
    seen = valid.any(-2)
    bound = np.broadcast_to(1.0 / np.maximum(widest, 1), column_sums.shape)
    assert np.all(column_sums[seen] >= bound[seen] - WEIGHT_TOLERANCE[dtype] * 10)


def _assert_per_key_shift_invariance(case, weights, valid):
    """3. A constant per key (here up to the scores' own spread) leaves
    the weights as they are."""
    if case["dtype"] != "float64":
        return  # shifts of 1000 cost float32 its last digits of the scores
    scores = case["scores"]
    shift = np.random.default_rng(0).normal(size=scores.shape[-1]) * np.abs(scores).max(initial=1)
    shifted = _weights(case, scores + shift)
    np.testing.assert_allclose(shifted, weights, rtol=0, atol=1e-9)


@st.composite
def layer_cases(draw):
    batch = draw(st.integers(0, 2))
    length = draw(st.integers(0, 5))
    cross = draw(st.booleans())
    key_length = draw(st.integers(0, 5)) if cross else length
    path = draw(paths())
    use_causal_mask = not cross and path["causal"] and draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    masks = {}
    for name, shape in (("query_mask", (batch, length)), ("value_mask", (batch, key_length)),
                        ("key_mask", (batch, key_length))):
        if draw(st.booleans()):
            masks[name] = rng.random(shape) < 0.75
    layout = draw(st.sampled_from([None, "B_TS", "B__S", "__TS", "BNTS"]))
    attention_mask = _mask(draw, layout, batch, 2, length, key_length)
    if attention_mask is not None:
        # Without a heads axis unless per head: (B, T, S), (B, 1, S), (T, S).
        masks["attention_mask"] = (
            attention_mask if layout == "BNTS"
            else attention_mask[:, 0] if layout[0] == "B" else attention_mask[0, 0]
        )
    return {
        "query": rng.normal(size=(batch, length, 6)) * draw(st.sampled_from([0.3, 1.0, 4.0])),
        "value": rng.normal(size=(batch, key_length, 6)),
        "masks": masks,
        "use_causal_mask": use_causal_mask,
        "chunk_size": draw(st.sampled_from([None, 1, 2, 3])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": seed,
        **path,
    }


def _layer_validity(case):
    batch, length = case["query"].shape[:2]
    key_length = case["value"].shape[1]
    masks = case["masks"]
    key_valid = None
    for name in ("value_mask", "key_mask"):
        if name in masks:
            key_valid = masks[name] if key_valid is None else key_valid & masks[name]
    valid = oracle.validity(
        batch, length, key_length, masks.get("query_mask"), key_valid,
        causal=case["use_causal_mask"],
    )[:, None]
    if "attention_mask" in masks:
        attention_mask = masks["attention_mask"]
        if attention_mask.ndim == 3 or attention_mask.ndim == 2:
            attention_mask = np.expand_dims(attention_mask, -3)
        valid = valid & attention_mask
    return np.broadcast_to(valid, (batch, 2, length, key_length))


def _regression_case(query_shape, value_shape, **overrides):
    rng = np.random.default_rng(0)
    return {
        "query": rng.normal(size=query_shape), "value": rng.normal(size=value_shape),
        "masks": {}, "use_causal_mask": False, "chunk_size": None, "dtype": "float32",
        "seed": 0, "normalization": "double", "causal": False, "null": False, **overrides,
    }


@given(layer_cases())
# Found by the fuzzing: an empty batch and sequence came out as (1, 0, dim)
# from Keras's TensorFlow einsum (MultiHeadAttention's too).
@example(_regression_case((0, 0, 6), (0, 0, 6)))
@example(_regression_case((0, 0, 6), (0, 3, 6), chunk_size=2))
def test_layer_matches_the_oracle(case):
    keras.utils.set_random_seed(case["seed"])
    layer = DoublyNormalizedAttention(
        2, 3, normalization=case["normalization"], null_query=case["null"],
        causal_normalization=case["causal"] and not case["use_causal_mask"],
        chunk_size=case["chunk_size"], bias_initializer="random_normal",
        jit_compile=False, dtype=case["dtype"],
    )
    key = case["value"][..., ::-1].copy()
    output = layer(
        case["query"], case["value"], key, use_causal_mask=case["use_causal_mask"],
        **case["masks"],
    )
    for logits in (layer.mixing_logits, layer.null_query_logits):
        if logits is not None:
            logits.assign(np.random.default_rng(case["seed"]).normal(size=2))
            output = layer(
                case["query"], case["value"], key,
                use_causal_mask=case["use_causal_mask"], **case["masks"],
            )
    expected, _ = oracle.layer_forward(
        layer, case["query"].astype(case["dtype"]), case["value"].astype(case["dtype"]),
        key.astype(case["dtype"]), valid=_layer_validity(case), causal=case["causal"],
    )
    output = _numpy(output)
    assert np.all(np.isfinite(output))
    np.testing.assert_allclose(output, expected, rtol=0, atol=OUTPUT_TOLERANCE[case["dtype"]])
