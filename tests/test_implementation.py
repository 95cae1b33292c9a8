"""Which implementation runs a call (`keras_dna.ops.implementation`).

The table holds every rule of the selector, platforms included; the other
tests check that the layer and the public function run what it chose and
nothing else (no second decision), on this backend, and that a TPU
(simulated, with Keras's splash kernel replaced by what it computes) never
gets DNA's bias or per-example masks.
"""

import keras
import numpy as np
import pytest

from keras_dna import DoublyNormalizedAttention
from keras_dna import DoublyNormalizedGroupQueryAttention
from keras_dna import ops as dna_ops
from keras_dna.ops.implementation import choose_implementation
from tests import oracle

BACKEND = keras.backend.backend()
SHAPE = (2, 16, 4, 8)  # (batch, length, heads, head_dim)
LONG = (8, 4096, 8, 64)  # scores of 2**30 entries: "auto" takes blocks of 512

DEFAULTS = dict(
    backend="torch", platform="cpu", dtype="float32", normalization="double", causal=False,
    flash_attention=None, flash_enabled=None, chunk_size="auto", query_shape=SHAPE,
    key_shape=SHAPE, num_attention_axes=1, dropout=0.0, return_weights=False,
)

# (changes to DEFAULTS, expected (name, chunk_size)), one row per rule.
TABLE = [
    # 1. Weights returned, dropout, several axes: the whole matrix, whatever else.
    (dict(return_weights=True), ("whole", None)),
    (dict(dropout=0.1), ("whole", None)),
    (dict(num_attention_axes=2, chunk_size=4), ("whole", None)),
    (dict(return_weights=True, flash_attention=True), ("whole", None)),
    # 4. Default: fused where a kernel takes the bias and pays.
    ({}, ("fused", None)),
    (dict(platform="cuda"), ("fused", None)),
    (dict(dtype="bfloat16"), ("fused", None)),
    (dict(normalization="single", causal=True), ("fused", None)),
    (dict(query_shape=LONG, key_shape=LONG), ("fused", 512)),  # its fallback in blocks
    (dict(dtype="float64"), ("whole", None)),
    (dict(causal=True), ("whole", None)),
    (dict(causal=True, normalization="hybrid", chunk_size=4), ("blockwise", 4)),
    (dict(backend="jax", platform="gpu", dtype="bfloat16", normalization="single"), ("fused", None)),
    (dict(backend="jax", platform="gpu", dtype="float16", normalization="single"), ("fused", None)),
    (dict(backend="jax", platform="gpu", normalization="single"), ("whole", None)),
    (dict(backend="jax", platform="cpu", dtype="bfloat16"), ("whole", None)),
    # 3. DNA's own kernels: JAX on GPUs and TPUs, causal or not.
    (dict(backend="jax", platform="gpu", dtype="bfloat16"), ("kernel", None)),
    (dict(backend="jax", platform="gpu"), ("kernel", None)),
    (dict(backend="jax", platform="gpu", causal=True, normalization="hybrid"), ("kernel", None)),
    (dict(backend="jax", platform="gpu", chunk_size=64), ("kernel", None)),
    (dict(backend="jax", platform="gpu", dtype="float64"), ("whole", None)),
    (dict(backend="jax", platform="gpu", flash_attention=False), ("whole", None)),
    # PyTorch on CUDA: causal DNA on DNA's Triton kernels, the rest fused.
    (dict(platform="cuda", causal=True), ("kernel", None)),
    (dict(platform="cuda", causal=True, normalization="hybrid", dtype="bfloat16"), ("kernel", None)),
    (dict(platform="cuda", causal=True, normalization="single"), ("fused", None)),
    (dict(platform="cuda", causal=True, dtype="float64"), ("whole", None)),
    (dict(platform="cuda", causal=True, flash_attention=False, chunk_size=64), ("blockwise", 64)),
    (dict(causal=True, chunk_size=64), ("blockwise", 64)),  # PyTorch's CPU
    # 5. PyTorch: causal DNA under the causal mask by blocks of 64 queries.
    (dict(causal=True, causal_mask=True, query_shape=(2, 65, 4, 8)), ("blockwise", 64)),
    (dict(causal=True, causal_mask=True, normalization="hybrid", query_shape=(2, 512, 4, 8)),
     ("blockwise", 64)),
    (dict(causal=True, causal_mask=True), ("whole", None)),  # one block of 16
    (dict(causal=True, query_shape=(2, 512, 4, 8)), ("whole", None)),  # no causal mask
    (dict(causal=True, causal_mask=True, chunk_size=None, query_shape=(2, 512, 4, 8)), ("whole", None)),
    (dict(causal=True, causal_mask=True, query_shape=(None, None, 4, 8)), ("whole", None)),
    (dict(backend="jax", causal=True, causal_mask=True, query_shape=(2, 512, 4, 8)), ("whole", None)),
    # Keras's splash kernel drops the bias and all masks but example 0's:
    # softmax takes DNA's kernels on TPUs too.
    (dict(backend="jax", platform="tpu", dtype="bfloat16"), ("kernel", None)),
    (dict(backend="jax", platform="tpu", dtype="bfloat16", normalization="single"), ("kernel", None)),
    (dict(backend="jax", platform="tpu", causal=True, query_shape=LONG, key_shape=LONG), ("kernel", None)),
    (dict(backend="jax", platform="tpu", flash_attention=True), ("kernel", None)),
    (dict(backend="jax", platform="tpu", flash_enabled=False), ("whole", None)),
    (dict(backend="jax", platform="tpu", flash_attention=False, query_shape=LONG, key_shape=LONG),
     ("blockwise", 512)),
    (dict(backend="tensorflow"), ("whole", None)),
    (dict(backend="tensorflow", query_shape=LONG, key_shape=LONG), ("blockwise", 512)),
    # 3. flash_attention=False, or the global setting off: never fused.
    (dict(flash_attention=False), ("whole", None)),
    (dict(flash_attention=False, chunk_size=128), ("blockwise", 128)),
    (dict(flash_enabled=False), ("whole", None)),
    (dict(flash_enabled=False, chunk_size=128), ("blockwise", 128)),
    (dict(backend="jax", platform="gpu", dtype="bfloat16", flash_enabled=False), ("whole", None)),
    # 2. flash_attention=True (or the global setting on): fused or an error.
    (dict(flash_attention=True, chunk_size=None), ("fused", None)),
    (dict(flash_enabled=True), ("fused", None)),
    (dict(flash_attention=True, backend="jax", platform="gpu", normalization="single"), ("fused", None)),
    (dict(flash_attention=True, backend="jax", platform="gpu", causal=True), ("kernel", None)),
    (dict(flash_attention=False, flash_enabled=True), ("whole", None)),
    # 5. chunk_size.
    (dict(flash_attention=False, chunk_size=None, query_shape=LONG, key_shape=LONG), ("whole", None)),
    (dict(flash_attention=False, query_shape=LONG, key_shape=LONG), ("blockwise", 512)),
    (dict(flash_attention=False, query_shape=(None, None, 8, 64), key_shape=(None, None, 8, 64)),
     ("whole", None)),
    (dict(flash_attention=False, chunk_size=3), ("blockwise", 3)),
]

ERRORS = [
    (dict(flash_attention=True, causal=True), "Causal normalization has no fused-kernel path"),
    (dict(flash_enabled=True, causal=True, normalization="hybrid"), "no fused-kernel path"),
    (dict(flash_attention=True, backend="tensorflow"), "TensorFlow backend has no fused"),
    (dict(flash_attention=True, backend="jax", platform="tpu", dtype="float64"), "splash attention"),
    (dict(flash_attention=True, backend="jax", platform="cpu"), "cuDNN's"),
    (dict(flash_attention=True, dtype="float64"), "float64 in float32"),
]


@pytest.mark.parametrize("changes, expected", TABLE)
def test_the_selectors_table(changes, expected):
    assert tuple(choose_implementation(**{**DEFAULTS, **changes})) == expected


@pytest.mark.parametrize("changes, message", ERRORS)
def test_flash_attention_true_is_refused_where_no_fused_kernel_can_run_dna(changes, message):
    with pytest.raises(ValueError, match=message):
        choose_implementation(**{**DEFAULTS, **changes})


def _inputs(rng, length=9, dtype="float32"):
    return tuple(rng.normal(size=(2, length, 2, 4)).astype(dtype) for _ in range(3))


def _oracle(query, key, value):
    scores = np.einsum("btnh,bsnh->bnts", query, key) / np.sqrt(query.shape[-1])
    weights = oracle.attention_weights(scores)
    return np.einsum("bnts,bsnh->btnh", weights, value)


@pytest.mark.parametrize("disable", ["argument", "global"])
def test_flash_attention_off_means_no_kernel_call_on_any_path(rng, kernel_calls, disable):
    # PyTorch took two fused calls per layer call with chunk_size=128 and
    # flash_attention=False: the blockwise call decided again.
    x = rng.normal(size=(1, 600, 8)).astype("float32")
    try:
        if disable == "global":
            keras.config.disable_flash_attention()
            layer = DoublyNormalizedAttention(2, 4, chunk_size=128)
        else:
            layer = DoublyNormalizedAttention(2, 4, chunk_size=128, flash_attention=False)
        output = layer(x, x)
        if disable == "global":
            # The global setting read when the function decides, too.
            q, k, v = _inputs(rng)
            dna_ops.doubly_normalized_attention(q, k, v, chunk_size=4)
    finally:
        keras.config.enable_flash_attention()
        keras.config.disable_flash_attention()
        # Back to "never set", as every other test expects.
        from keras.src.backend.common import global_state

        global_state.set_global_attribute("flash_attention", None)
    assert kernel_calls == []
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(output)))


def test_the_function_runs_the_implementation_it_is_given(rng, kernel_calls):
    q, k, v = _inputs(rng, dtype="float32")
    expected = _oracle(q, k, v)
    for implementation, chunk_size in (("whole", None), ("blockwise", 4), ("blockwise", 100)):
        got = dna_ops.doubly_normalized_attention(
            q, k, v, implementation=implementation, chunk_size=chunk_size
        )
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, atol=2e-5)
    assert kernel_calls == []
    if BACKEND != "tensorflow":
        got = dna_ops.doubly_normalized_attention(q, k, v, implementation="fused")
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, atol=2e-5)
        assert len(kernel_calls) >= 2


@pytest.mark.parametrize("arguments, message", [
    (dict(implementation="flash"), "`implementation` must be None or one of"),
    (dict(implementation="blockwise"), "chunk_size"),
    (dict(implementation="blockwise", chunk_size="auto"), "chunk_size"),
    (dict(implementation="fused", flash_attention=False), "flash_attention=False"),
    (dict(implementation="fused", is_causal=True), "no fused-kernel path"),
])
def test_the_function_refuses_an_implementation_that_cannot_run_the_call(rng, arguments, message):
    q, k, v = _inputs(rng)
    with pytest.raises(ValueError, match=message):
        dna_ops.doubly_normalized_attention(q, k, v, **arguments)


@pytest.mark.parametrize("axis", [1, 2])
def test_chunk_size_with_one_attention_axis_of_4d_inputs(rng, axis):
    # MultiHeadAttention takes (B, X, Y, dim) with attention_axes=(2,); the
    # blocks run over that axis, the other joins the batch.
    x = rng.normal(size=(2, 3, 7, 5)).astype("float32")
    # (batch, the other axis, T, S), as MultiHeadAttention lays out the scores.
    length, other = x.shape[axis], x.shape[3 - axis]
    attention_mask = rng.random((2, other, length, length)) < 0.8
    whole = DoublyNormalizedAttention(2, 4, attention_axes=(axis,), chunk_size=None)
    chunked = DoublyNormalizedAttention(2, 4, attention_axes=(axis,), chunk_size=3)
    expected = whole(x, x, attention_mask=attention_mask)
    chunked(x, x)
    chunked.set_weights(whole.get_weights())
    got = chunked(x, x, attention_mask=attention_mask)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(expected), atol=2e-5
    )


def test_chunk_size_with_several_attention_axes_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"chunk_size=3, attention_axes=\(1, 2\)"):
        DoublyNormalizedAttention(2, 4, chunk_size=3, attention_axes=(1, 2))


@pytest.mark.skipif(BACKEND != "jax", reason="Keras's splash path is JAX's")
def test_a_simulated_tpu_never_hands_dna_to_the_splash_kernel(rng, monkeypatch):
    """`jax.devices()` reports a TPU, Keras's splash kernel is replaced by
    what it computes (softmax with the first example's mask and no bias),
    and Pallas runs TPU kernels in its TPU interpreter. Before the
    selector, bfloat16 DNA ran on splash there and became softmax; now
    every normalization runs on DNA's own kernels."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas import tpu as pltpu
    from keras.src.backend.jax import nn as keras_jax_nn

    class FakeTpu:
        platform = "tpu"

    splash_calls = []

    def splash(query, key, value, decoder_segment_ids, custom_mask, **kwargs):
        # (B, N, T, H); the query carries scale * sqrt(head_dim).
        splash_calls.append(1)
        scores = jnp.einsum("bnth,bnsh->bnts", query, key) / np.sqrt(query.shape[-1])
        if custom_mask is not None:
            scores = jnp.where(custom_mask, scores, -1e30)
        return jnp.einsum("bnts,bnsh->bnth", jax.nn.softmax(scores, axis=-1), value)

    monkeypatch.setattr(jax, "devices", lambda *args: [FakeTpu()])
    monkeypatch.setattr(keras_jax_nn, "wrap_flash_attention", splash)
    # The fake splash is what Keras runs on a TPU for softmax attention.
    q, k, v = (jnp.asarray(x, "bfloat16") for x in _inputs(rng))
    keras.ops.dot_product_attention(q, k, v)
    assert splash_calls == [1]

    import keras_dna.ops.pallas as pallas

    kernel_calls = []
    kernel = pallas.kernel_attention

    def counted(*args, **kwargs):
        kernel_calls.append((kwargs["platform"], kwargs["causal_mask"]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(pallas, "kernel_attention", counted)
    x = rng.normal(size=(2, 9, 8)).astype("float32")
    lengths = np.array([9, 5])
    padding = np.arange(9)[None, :] < lengths[:, None]
    cases = [("bfloat16", "double", None), ("float32", "double", None), ("float32", "double", True),
             ("float32", "single", None)]
    with pltpu.force_tpu_interpret_mode():
        for dtype, normalization, flash_attention in cases:
            layer = DoublyNormalizedAttention(2, 4, dtype=dtype, normalization=normalization,
                                              flash_attention=flash_attention)
            reference = DoublyNormalizedAttention(
                2, 4, dtype="float64", normalization=normalization, flash_attention=False
            )
            layer(x, x)
            reference(x, x)
            reference.set_weights([w.astype("float64") for w in layer.get_weights()])
            got = layer(x, x, query_mask=padding, value_mask=padding)
            expected = reference(x, x, query_mask=padding, value_mask=padding)
            got, expected = (np.asarray(keras.ops.convert_to_numpy(t), "float64") for t in (got, expected))
            # bfloat16's own rounding; DNA turned into softmax was 0.85-1.7 off.
            atol = 0.1 if dtype == "bfloat16" else 2e-5
            np.testing.assert_allclose(got[padding], expected[padding], atol=atol)
        # Two calls per layer (its build and its masked call) per case.
        assert kernel_calls == [("tpu", False)] * 2 * len(cases)
        # A causal layer tells the kernels that the causal rule holds (they
        # skip the tiles above the diagonal), for both layer classes.
        kernel_calls.clear()
        for layer_class in (DoublyNormalizedAttention, DoublyNormalizedGroupQueryAttention):
            options = dict(num_query_heads=4, num_key_value_heads=2, head_dim=4) if layer_class is \
                DoublyNormalizedGroupQueryAttention else dict(num_heads=2, key_dim=4)
            layer, reference = layer_class(**options, null_query=True), layer_class(
                **options, null_query=True, dtype="float64", flash_attention=False
            )
            layer(x, x)
            reference(x, x)
            reference.set_weights([w.astype("float64") for w in layer.get_weights()])
            got = layer(x, x, use_causal_mask=True, value_mask=padding)
            expected = reference(x, x, use_causal_mask=True, value_mask=padding)
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(expected), atol=2e-5
            )
    assert splash_calls == [1]
    assert kernel_calls == [("tpu", False), ("tpu", True)] * 2


@pytest.mark.parametrize("implementation, chunk_size", [("whole", None), ("blockwise", 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_float64_stays_float64_on_every_route_whatever_floatx(rng, implementation, chunk_size, causal):
    # PyTorch rounded the Python scale through float32: 1e-8 off the oracle.
    # (Fused kernels compute in float32: float64 never runs on them.)
    q, k, v = (rng.normal(size=(2, 6, 2, 8)) for _ in range(3))
    mask = rng.random((2, 1, 6, 6)) < 0.8
    valid = mask & np.tril(np.ones((6, 6), bool)) if causal else mask
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
    weights = oracle.attention_weights(scores, valid, "hybrid", causal, np.array([0.3, -0.2]), np.array([1.0, 2.0]))
    expected = np.einsum("bnts,bsnh->btnh", weights, v)
    for floatx in ("float32", "float16"):
        keras.config.set_floatx(floatx)
        try:
            got = dna_ops.doubly_normalized_attention(
                q, k, v, mask, normalization="hybrid", is_causal=causal,
                mixing_logits=np.array([0.3, -0.2]), null_query_logits=np.array([1.0, 2.0]),
                implementation=implementation, chunk_size=chunk_size,
            )
        finally:
            keras.config.set_floatx("float32")
        got = keras.ops.convert_to_numpy(got)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_a_float64_layer_equals_the_oracle(rng, causal):
    x = rng.normal(size=(2, 6, 8))
    layer = DoublyNormalizedAttention(2, 4, dtype="float64", null_query=True)
    got = keras.ops.convert_to_numpy(layer(x, x, use_causal_mask=causal))
    valid = np.broadcast_to(np.tril(np.ones((6, 6), bool)) if causal else np.ones((6, 6), bool), (2, 6, 6))
    expected, _ = oracle.layer_forward(layer, x, x, valid=valid, causal=causal)
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("implementation, chunk_size", [("whole", None), ("blockwise", 8)])
def test_a_later_token_changes_no_earlier_output_to_the_bit(rng, implementation, chunk_size):
    # As for softmax. The blocks' prefix log-sum-exp shifted each key by its
    # maximum over the block, so later rows of a block moved earlier ones.
    q, k, v = (rng.normal(size=(2, 40, 2, 8)).astype("float32") for _ in range(3))

    def attend(q, k, v):
        return keras.ops.convert_to_numpy(dna_ops.doubly_normalized_attention(
            q, k, v, is_causal=True, null_query_logits=np.array([0.5, 2.0], "float32"),
            implementation=implementation, chunk_size=chunk_size,
        ))

    before = attend(q, k, v)
    for factor in (4.0, 30.0):  # 30: scores rise past the fast path's margin
        changed = [x.copy() for x in (q, k, v)]
        for x in changed:
            x[:, 30:] *= factor
        assert np.array_equal(attend(*changed)[:, :30], before[:, :30])


def test_softmax_with_is_causal_on_every_route_masks_the_future(rng):
    # Fused kernels run causal softmax: the causal mask must reach them.
    q, k, v = _inputs(rng)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    weights = oracle.attention_weights(scores, np.tril(np.ones((9, 9), bool)), "single")
    expected = np.einsum("bnts,bsnh->btnh", weights, v)
    routes = [("whole", None), ("blockwise", 4)] + ([("fused", None)] if BACKEND != "tensorflow" else [])
    for implementation, chunk_size in routes:
        got = dna_ops.doubly_normalized_attention(
            q, k, v, normalization="single", is_causal=True, implementation=implementation,
            chunk_size=chunk_size,
        )
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, atol=2e-5, err_msg=implementation)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's kernels are Triton's")
def test_kernels_are_refused_on_a_pytorch_cpu_without_tritons_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = np.zeros((1, 4, 2, 8), "float32")
    with pytest.raises(ValueError, match="Triton, which compiles for CUDA devices only"):
        dna_ops.doubly_normalized_attention(q, q, q, is_causal=True, implementation="kernel")


def test_a_causal_layer_takes_blocks_of_64_on_pytorch_and_matches_the_oracle(rng, monkeypatch):
    from keras_dna.ops import dispatch

    chunk_sizes = []
    original = dispatch.chunked_attention
    monkeypatch.setattr(dispatch, "chunked_attention",
                        lambda *a, **k: chunk_sizes.append(k["chunk_size"]) or original(*a, **k))
    x = rng.normal(size=(1, 70, 8))
    layer = DoublyNormalizedAttention(2, 4, dtype="float64", null_query=True, jit_compile=False)
    got = keras.ops.convert_to_numpy(layer(x, x, use_causal_mask=True))
    assert chunk_sizes == ([64] if BACKEND == "torch" else [])
    valid = np.broadcast_to(np.tril(np.ones((70, 70), bool)), (1, 70, 70))
    expected, _ = oracle.layer_forward(layer, x, x, valid=valid, causal=True)
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)
