"""DNA's own kernels (`keras_dna.ops.pallas`) against the float64 oracle.

The kernels run in Pallas's interpreter on this CPU (exact, slow: the cases
are small, with blocks of 8 so that every case spans several blocks), and in
its TPU interpreter. Their lowering for TPUs (Mosaic) and GPUs (Triton) is
checked without the hardware: lowering runs on any host, compiling and
running do not. Outputs and gradients are held to `tests/oracle.py` and to
the reference implementation's autodiff gradients in float64.
"""

import contextlib

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND != "jax", reason="JAX Pallas kernels: scripts/test.sh runs this module in the JAX step"
)

if BACKEND == "jax":
    import jax
    import jax.numpy as jnp

    from keras_dna import ops as dna_ops
    from keras_dna.ops.pallas import kernel_attention
    from keras_dna.ops.reference import reference_attention
from tests import oracle

BLOCK = 8


def _arrays(rng, batch, q_len, k_len, heads, kv_heads, head_dim, spread=1.0):
    q = rng.normal(size=(batch, q_len, heads, head_dim)) * spread
    k = rng.normal(size=(batch, k_len, kv_heads, head_dim))
    v = rng.normal(size=(batch, k_len, kv_heads, head_dim + 1))  # value_dim differs
    return q, k, v


def _validity(mask, causal_mask, q_len, k_len):
    valid = np.ones((1, 1, q_len, k_len), bool) if mask is None else mask
    if causal_mask:
        valid = valid & np.tril(np.ones((q_len, k_len), bool))
    return valid


def _oracle(q, k, v, mask, *, normalize, causal, causal_mask, null=None):
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    valid = _validity(mask, causal_mask, q.shape[1], k.shape[1])
    weights = oracle.attention_weights(
        scores, valid, "double" if normalize else "single", causal, null_query_logits=null
    )
    return np.einsum("bnts,bsnh->btnh", weights, v)


def _kernel(q, k, v, mask, null, platform="cpu", **options):
    return kernel_attention(
        q, k, v, mask, null, scale=1 / np.sqrt(q.shape[-1]), platform=platform,
        block_q=BLOCK, block_k=BLOCK, **options,
    )


def _reference_gradients(q, k, v, mask, null, weights, *, normalize, causal, causal_mask):
    """Autodiff of the reference implementation, in float64."""
    groups = q.shape[2] // k.shape[2]
    valid = _validity(mask, causal_mask, q.shape[1], k.shape[1])

    def loss(q, k, v, *null):
        out = reference_attention(
            q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2), valid,
            normalization="double" if normalize else "single", causal=causal,
            scale=1 / np.sqrt(q.shape[-1]), null_query_logits=null[0] if null else None,
        )
        return jnp.sum(out * weights)

    with jax.enable_x64(True):
        arrays = [jnp.asarray(x, jnp.float64) for x in (q, k, v) + (() if null is None else (null,))]
        return [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(len(arrays))))(*arrays)]


def _kernel_gradients(q, k, v, mask, null, weights, **options):
    def loss(q, k, v, *null):
        return jnp.sum(_kernel(q, k, v, mask, null[0] if null else None, **options) * weights)

    arrays = [jnp.asarray(x, jnp.float32) for x in (q, k, v) + (() if null is None else (null,))]
    return [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(len(arrays))))(*arrays)]


# (name, shapes (B, T, S, N, K, H), options, mask kind, null query, score spread)
CASES = [
    ("cross, masked", (2, 13, 11, 2, 2, 4), dict(normalize=True, causal=False, causal_mask=False), "full", True, 1),
    ("causal, left padding, grouped heads", (2, 21, 21, 4, 2, 4),
     dict(normalize=True, causal=True, causal_mask=True), "keys", True, 1),
    ("causal normalization, the future hidden by the mask alone", (1, 17, 17, 2, 1, 4),
     dict(normalize=True, causal=True, causal_mask=False), "causal", False, 1),
    ("per-head mask, one key head", (2, 12, 10, 2, 1, 4), dict(normalize=True, causal=False, causal_mask=False),
     "heads", True, 1),
    ("softmax, causal", (2, 19, 19, 2, 2, 4), dict(normalize=False, causal=False, causal_mask=True), "keys", False, 1),
    ("causal, scores hundreds apart", (1, 24, 24, 2, 2, 4), dict(normalize=True, causal=True, causal_mask=True),
     None, True, 100),
    ("cross, scores hundreds apart", (1, 16, 19, 2, 2, 4), dict(normalize=True, causal=False, causal_mask=False),
     "full", True, 100),
    ("length 1", (2, 1, 1, 2, 2, 4), dict(normalize=True, causal=True, causal_mask=True), None, True, 1),
]


def _mask(rng, kind, batch, q_len, k_len, heads):
    if kind is None:
        return None
    if kind == "keys":  # left padding: each example's first keys absent
        lengths = np.array([k_len, max(1, k_len - 5)])[:batch]
        return (np.arange(k_len)[None, :] >= (k_len - lengths)[:, None])[:, None, None, :]
    if kind == "heads":
        return rng.random((batch, heads, q_len, k_len)) < 0.7
    valid = rng.random((batch, 1, q_len, k_len)) < 0.7
    if kind == "causal":
        valid &= np.tril(np.ones((q_len, k_len), bool))
    return valid


@pytest.mark.parametrize("name, shapes, options, mask_kind, with_null, spread", CASES, ids=[c[0] for c in CASES])
def test_the_kernels_equal_the_oracle_outputs_and_gradients(rng, name, shapes, options, mask_kind, with_null, spread):
    batch, q_len, k_len, heads, kv_heads, head_dim = shapes
    q, k, v = _arrays(rng, batch, q_len, k_len, heads, kv_heads, head_dim, spread)
    mask = _mask(rng, mask_kind, batch, q_len, k_len, heads)
    null = rng.normal(size=heads) if with_null else None
    expected = _oracle(q, k, v, mask, null=null, **options)
    f32 = [np.float32(x) if x is None else np.asarray(x, np.float32) for x in (q, k, v)]
    got = np.asarray(_kernel(*f32, mask, None if null is None else np.float32(null), **options))
    # float32 rounding of scores that large is their size times 6e-8.
    tolerance = 2e-6 * max(1.0, spread**2)
    np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)
    weights = rng.normal(size=expected.shape)
    want = _reference_gradients(q, k, v, mask, null, weights, **options)
    have = _kernel_gradients(q, k, v, mask, null, weights, **options)
    for name, w, h in zip(("query", "key", "value", "null_query_logits"), want, have):
        scale = max(1.0, np.max(np.abs(w)))
        np.testing.assert_allclose(h, w, atol=2e-5 * scale * max(1.0, spread), rtol=0, err_msg=name)


def test_both_causal_tile_forms_are_exact(rng, monkeypatch):
    # The fast forms hold while exponents stay within a spread; the exact
    # scans take over beyond it. Each alone must give the oracle.
    import keras_dna.ops.pallas as pallas

    q, k, v = _arrays(rng, 1, 16, 16, 2, 2, 4)
    options = dict(normalize=True, causal=True, causal_mask=True)
    expected = _oracle(q, k, v, None, **options)
    weights = rng.normal(size=expected.shape)
    want = _reference_gradients(q, k, v, None, None, weights, **options)
    for spread in (-1.0, 1e30):  # always exact, always fast
        monkeypatch.setattr(pallas, "_SPREAD", spread)
        got = np.asarray(_kernel(*(np.float32(x) for x in (q, k, v)), None, None, **options))
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
        have = _kernel_gradients(q, k, v, None, None, weights, **options)
        for w, h in zip(want, have):
            np.testing.assert_allclose(h, w, atol=2e-5 * max(1.0, np.max(np.abs(w))), rtol=0)


def test_a_later_token_changes_no_earlier_output_to_the_bit(rng):
    # As for softmax: no reference, branch or sum of a tile may read a row
    # after the one it computes.
    q, k, v = (np.float32(x) for x in _arrays(rng, 2, 40, 40, 2, 2, 8))
    options = dict(normalize=True, causal=True, causal_mask=True)
    before = np.asarray(_kernel(q, k, v, None, np.float32([0.5, 2.0]), **options))
    for factor in (4.0, 30.0):  # 30: scores far past the fast form's range
        changed = [x.copy() for x in (q, k, v)]
        for x in changed:
            x[:, 30:] *= factor
        after = np.asarray(_kernel(*changed, None, np.float32([0.5, 2.0]), **options))
        assert np.array_equal(after[:, :30], before[:, :30])


def test_empty_sequences_and_queries_without_keys(rng):
    options = dict(normalize=True, causal=False, causal_mask=False)
    q, k, v = (np.float32(x) for x in _arrays(rng, 2, 5, 7, 2, 2, 4))
    assert _kernel(q[:, :0], k, v, None, None, **options).shape == (2, 0, 2, 5)
    assert _kernel(q, k[:, :0], v[:, :0], None, None, **options).shape == (2, 5, 2, 5)
    # Query 1 sees no key, key 2 no query: zeros there, finite gradients.
    mask = np.ones((2, 1, 5, 7), bool)
    mask[:, :, 1, :] = False
    mask[:, :, :, 2] = False
    got = np.asarray(_kernel(q, k, v, mask, np.float32([0.5, -1.0]), **options))
    np.testing.assert_allclose(got, _oracle(q, k, v, mask, null=np.array([0.5, -1.0]), **options), atol=2e-6)
    assert np.all(got[:, 1] == 0)
    grads = _kernel_gradients(q, k, v, mask, np.float32([0.5, -1.0]), np.ones_like(got), **options)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_a_nan_in_a_masked_key_stays_out(rng):
    q, k, v = (np.float32(x) for x in _arrays(rng, 1, 9, 9, 2, 2, 4))
    mask = np.ones((1, 1, 1, 9), bool)
    mask[..., 4] = False
    k[:, 4] = np.nan
    for options in (dict(causal=False, causal_mask=False), dict(causal=True, causal_mask=True)):
        got = np.asarray(_kernel(q, k, v, mask, None, normalize=True, **options))
        assert np.all(np.isfinite(got))


def test_bfloat16_errs_no_more_than_keras_softmax_kernel(rng):
    # Each against its own float64 oracle, on the same inputs, both
    # returned in bfloat16.
    ratios = []
    for causal in (False, True):
        q, k, v = _arrays(rng, 2, 40, 40, 2, 2, 16)
        k, v = k, v[..., :16]
        half = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
        softmax = _oracle(q, k, v, None, normalize=False, causal=False, causal_mask=causal)
        double = _oracle(q, k, v, None, normalize=True, causal=causal, causal_mask=causal)
        keras_error = np.max(np.abs(np.asarray(keras.ops.dot_product_attention(*half, is_causal=causal), np.float64) - softmax))
        ours = _kernel(*half, None, None, normalize=True, causal=causal, causal_mask=causal)
        our_error = np.max(np.abs(np.asarray(ours.astype(jnp.bfloat16), np.float64) - double))
        ratios.append(our_error / keras_error)
    assert max(ratios) <= 1.25 and np.mean(ratios) <= 1.0, ratios


def test_the_tpu_interpreter_gives_the_same_bits(rng):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = (np.float32(x) for x in _arrays(rng, 2, 11, 11, 2, 1, 4))
    mask = _mask(rng, "keys", 2, 11, 11, 2)
    options = dict(normalize=True, causal=True, causal_mask=True)
    weights = rng.normal(size=(2, 11, 2, 5))
    cpu = _kernel(q, k, v, mask, np.float32([0.3, 1.0]), **options)
    cpu_grads = _kernel_gradients(q, k, v, mask, np.float32([0.3, 1.0]), weights, **options)
    with pltpu.force_tpu_interpret_mode():
        tpu = _kernel(q, k, v, mask, np.float32([0.3, 1.0]), platform="tpu", **options)
        tpu_grads = _kernel_gradients(q, k, v, mask, np.float32([0.3, 1.0]), weights, platform="tpu", **options)
    assert np.array_equal(np.asarray(cpu), np.asarray(tpu))
    for c, t in zip(cpu_grads, tpu_grads):
        assert np.array_equal(c, t)


def _tpu_device():
    """An abstract mesh naming a TPU v5e: the Mosaic lowering reads the
    chip's generation from the current mesh's device (private JAX API,
    `jax._src.mesh.AbstractDevice`: no public way to name a device that
    is absent)."""
    from jax._src import mesh as mesh_lib

    device = mesh_lib.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    return jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_the_kernels_lower_for_tpus_and_gpus(platform):
    # Lowering builds each kernel's Mosaic or Triton program, which is where
    # block shapes and unsupported operations are refused; compiling and
    # running need the hardware.
    cases = [
        ((2, 256, 4, 64), (2, 256, 2, 64), (2, 1, 1, 256), dict(causal=True, causal_mask=True), jnp.bfloat16),
        ((2, 200, 2, 80), (2, 300, 2, 80), (2, 2, 200, 300), dict(causal=False, causal_mask=False), jnp.float32),
    ]
    for q_shape, k_shape, mask_shape, options, dtype in cases:
        arrays = [jax.ShapeDtypeStruct(shape, dtype) for shape in (q_shape, k_shape, k_shape)]
        mask = jax.ShapeDtypeStruct(mask_shape, jnp.bool_)
        null = jax.ShapeDtypeStruct((q_shape[2],), jnp.float32)

        def gradients(q, k, v, mask, null):
            def loss(q, k, v, null):
                return jnp.sum(kernel_attention(
                    q, k, v, mask, null, normalize=True, scale=0.125, platform=platform, **options
                ).astype(jnp.float32))

            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, null)

        with _tpu_device() if platform == "tpu" else contextlib.nullcontext():
            lowered = jax.jit(gradients).trace(*arrays, mask, null).lower(
                lowering_platforms=("tpu" if platform == "tpu" else "cuda",)
            )
        text = lowered.as_text()
        assert ("tpu_custom_call" if platform == "tpu" else "triton") in text


@pytest.mark.parametrize("normalization", ["double", "hybrid", "single"])
@pytest.mark.parametrize("causal", ["is_causal", "causal_normalization", None])
def test_the_public_function_runs_the_kernels(rng, normalization, causal):
    q, k, v = (np.float32(x) for x in _arrays(rng, 2, 11, 11, 2, 2, 4))
    v = v[..., :4]
    mask = rng.random((2, 1, 11, 11)) < 0.8
    if causal == "causal_normalization":
        mask &= np.tril(np.ones((11, 11), bool))
    mixing = np.float32([0.4, -1.0])
    null = None if normalization == "single" else np.float32([1.0, -0.5])
    got = dna_ops.doubly_normalized_attention(
        q, k, v, mask, normalization=normalization, is_causal=causal == "is_causal",
        causal_normalization=causal == "causal_normalization",
        mixing_logits=mixing if normalization == "hybrid" else None, null_query_logits=null,
        implementation="kernel",
    )
    valid = mask & np.tril(np.ones((11, 11), bool)) if causal == "is_causal" else mask
    scores = np.einsum("btnh,bsnh->bnts", q, k) / 2.0
    weights = oracle.attention_weights(
        scores, valid, normalization, causal is not None, mixing if normalization == "hybrid" else None, null
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(got), np.einsum("bnts,bsnh->btnh", weights, v), atol=2e-6, rtol=0
    )


def test_fit_on_the_kernel_route_with_keras_masks_in_bfloat16(rng, monkeypatch):
    # The route JAX accelerators take by default: the selector is told the
    # platform is a TPU, and Pallas runs the kernels in its TPU interpreter.
    from jax.experimental.pallas import tpu as pltpu

    import keras_dna.ops.implementation as implementation
    from keras_dna import DoublyNormalizedAttention

    import keras_dna.ops.pallas as pallas

    calls = []
    kernel = pallas.kernel_attention
    monkeypatch.setattr(pallas, "kernel_attention", lambda *a, **k: calls.append(k["causal_mask"]) or kernel(*a, **k))
    monkeypatch.setattr(implementation, "platform", lambda tensor: "tpu")
    assert implementation.implementation_for(
        keras.ops.zeros((1, 4, 2, 4), "bfloat16"), keras.ops.zeros((1, 4, 2, 4), "bfloat16"),
        normalization="double", causal=True, flash_attention=None, chunk_size="auto",
    ).name == "kernel"
    tokens = keras.Input((None,), dtype="int32")
    # Mixed precision, as users train: bfloat16 calls, float32 weights.
    x = keras.layers.Embedding(20, 8, mask_zero=True, dtype="mixed_bfloat16")(tokens)
    attention = DoublyNormalizedAttention(2, 4, null_query=True, dtype="mixed_bfloat16")
    x = attention(x, x, use_causal_mask=True)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(tokens, outputs)
    model.compile("adam", "mse")
    data = rng.integers(1, 20, size=(8, 6))
    data[:4, 4:] = 0  # padding
    before = [keras.ops.convert_to_numpy(w) for w in (attention.key_dense.kernel, attention.null_query_logits)]
    with pltpu.force_tpu_interpret_mode():
        history = model.fit(data, rng.normal(size=(8, 1)), epochs=2, batch_size=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert calls and all(calls)  # traced on the kernels, told the causal rule holds
    for weight, old in zip((attention.key_dense.kernel, attention.null_query_logits), before):
        new = keras.ops.convert_to_numpy(weight)
        # Step 1's gradient reaches the keys and the null query.
        assert np.all(np.isfinite(new)) and not np.allclose(new, old), weight.path
