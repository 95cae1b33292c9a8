"""The reference implementation and the implementations tested against it.

`implementation="reference"` (`keras_dna.ops.reference`) transcribes
docs/math.md into `keras.ops`; it must equal the float64 oracle (property
7). Every other implementation is an optimization of it and must give its
outputs and gradients, over drawn shapes, masks, normalizations, causal
normalization and null queries (properties 1-5 then hold for each by way of
the reference and the oracle's own tests).
"""

import keras
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_dna import ops as dna_ops
from tests import oracle
from tests.common import value_and_gradients

BACKEND = keras.backend.backend()
# Fused kernels compute in float32 (and JAX's x64 mode is on in the suite).
ROUTES = [("whole", None, "float64"), ("blockwise", 2, "float64")]
if BACKEND != "tensorflow":
    ROUTES.append(("fused", None, "float32"))
TOLERANCE = {"float64": 1e-10, "float32": 2e-4}
# Eager JAX traces every differentiated call anew (seconds each): fewer
# cases there, the same checks.
GRADIENT_CASES = 3 if BACKEND == "jax" else 8


@st.composite
def cases(draw):
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    q_len, k_len = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    normalization = draw(st.sampled_from(["double", "single", "hybrid"]))
    causal = draw(st.booleans())
    return dict(
        shapes=(batch, heads, q_len, q_len if causal else k_len, draw(st.integers(1, 4))),
        normalization=normalization,
        causal=causal,
        null=normalization != "single" and draw(st.booleans()),
        masked=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _arrays(case):
    batch, heads, q_len, k_len, head_dim = case["shapes"]
    rng = np.random.default_rng(case["seed"])
    q, k, v = (rng.normal(size=(batch, length, heads, head_dim)) for length in (q_len, k_len, k_len))
    mask = rng.random((batch, 1, q_len, k_len)) < 0.7 if case["masked"] else None
    mixing = rng.normal(size=heads) if case["normalization"] == "hybrid" else None
    null = rng.normal(size=heads) if case["null"] else None
    return q, k, v, mask, mixing, null


def _attention(implementation, chunk_size, case, mask):
    def attend(q, k, v, *logits):
        mixing = logits[0] if case["normalization"] == "hybrid" else None
        null = logits[-1] if case["null"] else None
        return dna_ops.doubly_normalized_attention(
            q, k, v, None if mask is None else ops.convert_to_tensor(mask),
            normalization=case["normalization"], is_causal=case["causal"],
            mixing_logits=mixing, null_query_logits=null, implementation=implementation,
            chunk_size=chunk_size,
        )

    return attend


@settings(max_examples=12)
@given(cases())
def test_the_reference_equals_the_oracle(case):
    q, k, v, mask, mixing, null = _arrays(case)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    valid = np.ones(scores.shape, bool) if mask is None else np.broadcast_to(mask, scores.shape)
    if case["causal"]:
        valid = valid & np.tril(np.ones(scores.shape[-2:], bool))
    weights = oracle.attention_weights(
        scores, valid, case["normalization"], case["causal"], mixing, null
    )
    expected = np.einsum("bnts,bsnh->btnh", weights, v)
    logits = [x for x in (mixing, null) if x is not None]
    got = _attention("reference", None, case, mask)(q, k, v, *logits)
    np.testing.assert_allclose(ops.convert_to_numpy(got), expected, atol=1e-12, rtol=0)


@settings(max_examples=GRADIENT_CASES)
@given(cases())
def test_every_implementation_equals_the_reference_with_gradients(case):
    q, k, v, mask, mixing, null = _arrays(case)
    logits = [x for x in (mixing, null) if x is not None]
    probe = np.random.default_rng(case["seed"] + 1).normal(size=q.shape[:3] + (v.shape[3],))
    for implementation, chunk_size, dtype in ROUTES:
        if implementation == "fused" and case["causal"] and case["normalization"] != "single":
            continue  # no fused path: the selector's table refuses it
        arrays = [x.astype(dtype) for x in (q, k, v, *logits)]

        def loss(name, size):
            attend = _attention(name, size, case, mask)
            return lambda *x: ops.sum(ops.cast(attend(*x), dtype) * ops.convert_to_tensor(probe.astype(dtype)))

        expected, expected_grads = value_and_gradients(loss("reference", None), *arrays)
        got, grads = value_and_gradients(loss(implementation, chunk_size), *arrays)
        tolerance = TOLERANCE[dtype]
        np.testing.assert_allclose(got, expected, atol=tolerance, rtol=tolerance, err_msg=implementation)
        for g, e in zip(grads, expected_grads):
            np.testing.assert_allclose(g, e, atol=tolerance, rtol=tolerance, err_msg=implementation)
