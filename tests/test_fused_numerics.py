"""The fused path (`keras_dna.ops.fused`) at the edges of its numerics: a
large common score offset, NaN in masked keys, half-precision read-outs,
JAX's compiled gradients, memory with Keras's masks, and argument shapes."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_dna.ops.fused as fused
from keras_dna import ops as dna_ops
from keras_dna.ops.fused import fused_attention
from tests.test_fused import _oracle_output
from tests.common import largest_allocation
from tests.common import value_and_gradients

BACKEND = keras.backend.backend()
# Keras's kernels compute float64 in float32 outside TensorFlow.
DTYPE = "float64" if BACKEND == "tensorflow" else "float32"
GRADIENT_TOLERANCE = {"float64": 1e-8, "float32": 2e-3}


def _with_common_offset(rng, offset, shape, scale):
    """Queries and keys whose scores all share `offset`, through one more
    channel (as when a layer's query and key biases share a direction)."""
    q, k = (rng.normal(size=shape) for _ in range(2))
    size = np.sqrt(abs(offset) / scale)
    q = np.concatenate([q, np.full(shape[:-1] + (1,), size)], -1)
    k = np.concatenate([k, np.full(shape[:-1] + (1,), np.sign(offset) * size)], -1)
    return q, k


@pytest.mark.parametrize("offset", [-300.0, -95.0, 95.0, 300.0])
def test_gradients_hold_at_any_common_score_offset(rng, offset):
    scale = 0.5
    q, k = _with_common_offset(rng, offset, (2, 4, 2, 3), scale)
    v = rng.normal(size=(2, 4, 2, 3))
    beta = rng.normal(size=2) + offset
    mask = rng.random((2, 1, 4, 4)) < 0.7
    probe = rng.normal(size=v.shape)

    def loss(q, k, v, beta):
        output, trusted = fused_attention(
            q, k, v, ops.convert_to_tensor(mask), normalization="hybrid", scale=scale,
            null_query_logits=beta,
        )
        loss.trusted = bool(ops.convert_to_numpy(trusted))
        return ops.sum(ops.cast(output, DTYPE) * ops.convert_to_tensor(probe.astype(DTYPE)))

    inputs = [q, k, v, beta]
    _, grads = value_and_gradients(loss, *(x.astype(DTYPE) for x in inputs))
    assert loss.trusted
    # Central differences of the float64 oracle along a random direction.
    directions = [rng.normal(size=x.shape) for x in inputs]
    step = 1e-6

    def oracle_loss(sign):
        q, k, v, beta = (x + sign * step * d for x, d in zip(inputs, directions))
        return np.sum(_oracle_output(q, k, v, mask, "hybrid", None, beta, scale) * probe)

    numeric = (oracle_loss(1) - oracle_loss(-1)) / (2 * step)
    analytic = sum(np.sum(np.asarray(g, np.float64) * d) for g, d in zip(grads, directions))
    size = 1.0 + sum(np.abs(np.asarray(g, np.float64)).sum() * np.abs(d).max() for g, d in zip(grads, directions))
    assert abs(analytic - numeric) <= GRADIENT_TOLERANCE[DTYPE] * size, (analytic, numeric)


@pytest.mark.parametrize("layout", ["keys", "pairs"])
def test_nan_in_masked_keys_and_queries_reaches_no_output(rng, layout):
    q, k, v = (rng.normal(size=(2, 5, 2, 4)) for _ in range(3))
    mask = np.ones((2, 1, 1 if layout == "keys" else 5, 5), bool)
    # The last key is masked for every query, the last query (pairs) sees no key.
    mask[..., -1] = False
    if layout == "pairs":
        mask[:, :, -1] = False
        q[:, -1] = np.nan
    k[:, -1] = np.nan
    v[:, -1] = np.nan

    def loss(q, k, v):
        output, trusted = fused_attention(
            q, k, v, ops.convert_to_tensor(mask), normalization="double", scale=0.5,
            null_query_logits=ops.zeros((2,), DTYPE),
        )
        loss.output = ops.convert_to_numpy(ops.stop_gradient(output))
        loss.trusted = bool(ops.convert_to_numpy(trusted))
        return ops.sum(ops.cast(output, DTYPE))

    _, grads = value_and_gradients(loss, *(x.astype(DTYPE) for x in (q, k, v)))
    assert loss.trusted
    clean = [np.nan_to_num(x) for x in (q, k, v)]
    expected = _oracle_output(*clean, mask, "double", None, np.zeros(2), 0.5)
    np.testing.assert_allclose(loss.output, expected, atol=2e-5)
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit")
@pytest.mark.parametrize("with_mask", [False, True])
def test_jax_gradients_of_compiled_calls_equal_eager_ones(rng, with_mask):
    import jax

    q, k, v = (jax.numpy.asarray(rng.normal(size=(2, 4, 2, 4)), "float32") for _ in range(3))
    beta = jax.numpy.zeros(2)
    mask = jax.numpy.asarray(rng.random((2, 1, 4, 4)) < 0.7) if with_mask else None

    def loss(q, k, v, beta, mask):
        output, _ = fused_attention(
            q, k, v, mask, normalization="hybrid", scale=0.5, null_query_logits=beta
        )
        return jax.numpy.sum(output**2)

    eager = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, beta, mask)
    for compiled in (
        jax.grad(jax.jit(loss), argnums=(0, 1, 2, 3)),
        jax.jit(jax.grad(jax.jit(loss), argnums=(0, 1, 2, 3))),
    ):
        for a, b in zip(compiled(q, k, v, beta, mask), eager):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="float16 kernels on a CPU: PyTorch")
def test_float16_read_outs_are_trusted_only_where_exact(rng, monkeypatch):
    """As on an accelerator, where the read-out runs in float16: a trusted
    output's error stays within that of the softmax kernel, and read-outs
    that are float16 subnormals are not trusted."""
    monkeypatch.setattr(fused, "half_precision_kernels_only", lambda: True)
    scale = 0.25
    untrusted = 0
    for spread in (1.0, 2.0, 3.0, 3.5):
        q = rng.normal(size=(2, 64, 2, 16)) * spread
        k, v = (rng.normal(size=(2, 64, 2, 16)) for _ in range(2))
        as_f16 = [ops.cast(x, "float16") for x in (q, k, v)]
        rounded = [ops.convert_to_numpy(ops.cast(x, "float32")).astype(np.float64) for x in as_f16]
        softmax = ops.convert_to_numpy(ops.cast(ops.dot_product_attention(*as_f16, scale=scale), "float32"))
        softmax_error = np.abs(softmax - _oracle_output(*rounded, None, "single", None, None, scale)).max()
        output, trusted = fused_attention(*as_f16, None, normalization="double", scale=scale)
        if not bool(ops.convert_to_numpy(trusted)):
            untrusted += 1
            continue
        error = np.abs(
            ops.convert_to_numpy(ops.cast(output, "float32"))
            - _oracle_output(*rounded, None, "double", None, None, scale)
        ).max()
        assert error <= 1.5 * softmax_error, (spread, error, softmax_error)
    # Moderate scores stay on the fused path; the widest spread leaves it.
    assert 0 < untrusted < 4


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's profiler counts a CPU's memory")
@pytest.mark.parametrize("mask_shape", ["keys", "pairs"])
def test_keras_masks_allocate_no_more_than_the_softmax_kernel(mask_shape):
    """A padded batch's masks, `(B, 1, 1, S)` or `(B, 1, T, S)` for every
    head: forward and backward allocate no more than softmax attention with
    the same mask (up to the read-outs' reference key, one column more),
    however many heads there are. A per-head bias combined with the mask
    wrote 4x that here."""
    import torch

    batch, heads, length, head_dim = 2, 4, 1024, 8
    q, k, v = (torch.randn(batch, length, heads, head_dim, requires_grad=True) for _ in range(3))
    valid = torch.arange(length) < torch.tensor([length, length // 2])[:, None]
    if mask_shape == "keys":
        mask = valid[:, None, None, :]
    else:
        mask = valid[:, None, :, None] & valid[:, None, None, :]

    softmax = largest_allocation(lambda: keras.ops.dot_product_attention(q, k, v, mask=mask))
    double = largest_allocation(
        lambda: fused_attention(
            q, k, v, mask, normalization="hybrid", scale=0.3,
            null_query_logits=torch.zeros(heads, requires_grad=True),
        )[0]
    )
    assert double <= softmax * (length + 1) / length, (double, softmax)


def test_fused_attention_names_arguments_of_the_wrong_shape():
    x = np.ones((2, 3, 2, 4), "float32")
    key = np.ones((2, 5, 2, 4), "float32")
    options = dict(normalization="hybrid", scale=0.5)
    with pytest.raises(ValueError, match=r"`mask`.*\(2, 2, 3, 5\)"):
        fused_attention(x, key, key, ops.ones((2, 1, 5, 3), "bool"), **options)
    with pytest.raises(ValueError, match=r"`mask`"):
        fused_attention(x, key, key, ops.ones((3, 5), "bool"), **options)
    for name in ("mixing_logits", "null_query_logits"):
        with pytest.raises(ValueError, match=rf"`{name}` must have shape \(2,\)"):
            fused_attention(x, key, key, None, **options, **{name: np.zeros(3, "float32")})


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow has no fused kernel")
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradients_where_a_fused_call_falls_back_equal_the_exact_paths(rng, with_mask, chunk_size):
    # A query about 200 above the others underflows the read-out: the call
    # computes the exact result, and its gradient must be that result's.
    # The fused output's own backward (zero upstream) sent NaN, and on JAX
    # a masked fallback failed to differentiate.
    q, k, v = (rng.normal(size=(2, 5, 2, 4)).astype("float32") for _ in range(3))
    q[:, 0] *= 60.0
    mask = ops.convert_to_tensor(rng.random((2, 1, 5, 5)) < 0.8) if with_mask else None
    logits = rng.normal(size=(2, 2)).astype("float32")

    def loss(implementation, q, k, v, mixing, null):
        output = dna_ops.doubly_normalized_attention(
            q, k, v, mask, normalization="hybrid", mixing_logits=mixing,
            null_query_logits=null, implementation=implementation, chunk_size=chunk_size,
        )
        return ops.sum(output * output)

    arrays = (q, k, v, logits[0], logits[1])
    read_out = fused.read_out_key_logsumexp(
        fused._Attend(ops.convert_to_tensor(q) * 0.5, ops.convert_to_tensor(k), None, None)
    )
    assert not bool(ops.convert_to_numpy(read_out[1])), "the case must fall back"
    expected, expected_grads = value_and_gradients(
        lambda *x: loss("whole" if chunk_size is None else "blockwise", *x), *arrays
    )
    got, grads = value_and_gradients(lambda *x: loss("fused", *x), *arrays)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    if BACKEND == "jax":
        import jax

        compiled = jax.jit(jax.grad(lambda *x: loss("fused", *x), argnums=(0, 1, 2, 3, 4)))
        for g, e in zip(compiled(*arrays), expected_grads):
            np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-5)
