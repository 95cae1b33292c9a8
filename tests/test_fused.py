"""Double normalization on fused attention kernels (`keras_dna.ops.fused`).

The fused path reads normalizers out of softmax-attention calls; these tests
hold its output and gradients to the float64 oracle over drawn shapes, masks
and spreads (wherever it says its read-outs hold), check that it says so
wherever the spread is moderate, that the public function falls back to the
exact path where it does not, and what `flash_attention` means for the layer.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_dna import DoublyNormalizedAttention
from keras_dna import ops as dna_ops
from keras_dna.ops.fused import fused_attention
from tests import oracle
from tests.common import largest_allocation
from tests.common import value_and_gradients

BACKEND = keras.backend.backend()
# Keras's kernels compute float64 in float32 outside TensorFlow.
DTYPE = "float64" if BACKEND == "tensorflow" else "float32"
OUTPUT_TOLERANCE = {"float64": 1e-11, "float32": 2e-5}
GRADIENT_TOLERANCE = {"float64": 1e-8, "float32": 2e-3}
MASKS = ["none", "keys", "queries", "pairs", "pairs_per_head"]


def _mask(rng, layout, batch, heads, q_len, k_len):
    shape = {
        "none": None,
        "keys": (batch, 1, 1, k_len),
        "queries": (batch, 1, q_len, 1),
        "pairs": (batch, 1, q_len, k_len),
        "pairs_per_head": (batch, heads, q_len, k_len),
    }[layout]
    return None if shape is None else rng.random(shape) < 0.7


def _oracle_output(q, k, v, mask, normalization, mixing, beta, scale):
    scores = np.einsum("btnh,bsnh->bnts", q, k) * scale
    weights = oracle.attention_weights(
        scores, mask, normalization, mixing_logits=mixing, null_query_logits=beta
    )
    return np.einsum("bnts,bsnh->btnh", weights, v)


@st.composite
def cases(draw):
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    q_len, k_len = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    head_dim, value_dim = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    normalization = draw(st.sampled_from(["double", "hybrid", "single"]))
    null = normalization != "single" and draw(st.booleans())
    return dict(
        shapes=(batch, heads, q_len, k_len, head_dim, value_dim),
        layout=draw(st.sampled_from(MASKS)),
        normalization=normalization,
        null=null,
        spread=draw(st.sampled_from([0.3, 1.0, 3.0, 30.0, 1000.0])),
        seed=draw(st.integers(0, 2**16)),
    )


# JAX differentiates op by op outside `jax.jit`, 6 s a case here: fewer cases.
@settings(max_examples=6) if BACKEND == "jax" else (lambda test: test)
@given(cases())
def test_fused_attention_and_its_gradients_match_the_oracle(case):
    batch, heads, q_len, k_len, head_dim, value_dim = case["shapes"]
    rng = np.random.default_rng(case["seed"])
    q = rng.normal(size=(batch, q_len, heads, head_dim)) * case["spread"]
    k = rng.normal(size=(batch, k_len, heads, head_dim))
    v = rng.normal(size=(batch, k_len, heads, value_dim))
    mixing = rng.normal(size=heads)
    beta = rng.normal(size=heads) * 2 if case["null"] else None
    mask = _mask(rng, case["layout"], batch, heads, q_len, k_len)
    probe = rng.normal(size=(batch, q_len, heads, value_dim))
    scale = 0.7
    normalization = case["normalization"]

    hybrid = normalization == "hybrid"

    def loss(q, k, v, *logits):
        logits = list(logits)
        output, trusted = fused_attention(
            q, k, v, None if mask is None else ops.convert_to_tensor(mask),
            normalization=normalization, scale=scale,
            mixing_logits=logits.pop(0) if hybrid else None,
            null_query_logits=logits.pop(0) if logits else None,
        )
        loss.trusted = bool(ops.convert_to_numpy(trusted))
        loss.output = ops.convert_to_numpy(ops.stop_gradient(output))
        return ops.sum(ops.cast(output, DTYPE) * ops.convert_to_tensor(probe.astype(DTYPE)))

    inputs = [q, k, v] + ([mixing] if hybrid else []) + ([] if beta is None else [beta])
    arrays = [x.astype(DTYPE) for x in inputs]
    _, grads = value_and_gradients(loss, *arrays)
    if case["spread"] <= 3.0:
        # The read-outs hold wherever scores are of moderate size.
        assert loss.trusted
    if not loss.trusted:
        return
    expected = _oracle_output(q, k, v, mask, normalization, mixing, beta, scale)
    np.testing.assert_allclose(loss.output, expected, atol=OUTPUT_TOLERANCE[DTYPE] * max(1.0, np.abs(v).max()))
    # The gradients against central differences of the oracle, along a
    # random direction of every input.
    directions = [rng.normal(size=x.shape) for x in inputs]
    step = 1e-6

    def oracle_loss(sign):
        moved = [x + sign * step * d for x, d in zip(inputs, directions)]
        moved_mixing = moved.pop(3) if hybrid else mixing
        moved_beta = moved[3] if beta is not None else None
        output = _oracle_output(*moved[:3], mask, normalization, moved_mixing, moved_beta, scale)
        return np.sum(output * probe)

    numeric = (oracle_loss(1) - oracle_loss(-1)) / (2 * step)
    analytic = sum(np.sum(np.asarray(g, np.float64) * d) for g, d in zip(grads, directions))
    size = 1.0 + sum(np.abs(np.asarray(g, np.float64)).sum() * np.abs(d).max() for g, d in zip(grads, directions))
    assert abs(analytic - numeric) <= GRADIENT_TOLERANCE[DTYPE] * size, (analytic, numeric)


@pytest.mark.parametrize("spread", [100.0, 1000.0])
@pytest.mark.parametrize("normalization", ["double", "hybrid"])
def test_scores_far_apart_take_the_exact_path(rng, spread, normalization):
    q = (rng.normal(size=(2, 6, 2, 4)) * spread).astype("float32")
    k, v = (rng.normal(size=(2, 7, 2, 4)).astype("float32") for _ in range(2))
    mask = rng.random((2, 1, 6, 7)) < 0.8
    _, trusted = fused_attention(q, k, v, ops.convert_to_tensor(mask), normalization=normalization, scale=0.5)
    # Scores hundreds apart underflow a read-out: the fused path says so...
    assert not bool(ops.convert_to_numpy(trusted))
    # ... and the public function (fused on PyTorch) gives the exact answer.
    output = dna_ops.doubly_normalized_attention(q, k, v, mask, normalization=normalization, scale=0.5)
    expected = _oracle_output(q, k, v, mask, normalization, None, None, 0.5)
    np.testing.assert_allclose(ops.convert_to_numpy(output), expected, atol=2e-5)


def test_bfloat16_error_is_no_worse_than_softmax_kernels(rng):
    """In bfloat16, the fused path's error against the float64 oracle stays
    within that of Keras's own softmax kernel against the softmax oracle."""
    q, k, v = (rng.normal(size=(2, 64, 2, 16)) for _ in range(3))
    as_bf16 = [ops.cast(x, "bfloat16") for x in (q, k, v)]
    # The same rounded inputs for the oracles: only the kernels' error counts.
    rounded = [ops.convert_to_numpy(ops.cast(x, "float32")).astype(np.float64) for x in as_bf16]
    scale = 0.25
    softmax = ops.dot_product_attention(*as_bf16, scale=scale)
    softmax_error = np.abs(
        ops.convert_to_numpy(ops.cast(softmax, "float32"))
        - _oracle_output(*rounded, None, "single", None, None, scale)
    ).max()
    for normalization in ("double", "hybrid"):
        output, trusted = fused_attention(*as_bf16, None, normalization=normalization, scale=scale)
        assert bool(ops.convert_to_numpy(trusted))
        error = np.abs(
            ops.convert_to_numpy(ops.cast(output, "float32"))
            - _oracle_output(*rounded, None, normalization, None, None, scale)
        ).max()
        assert error <= 1.5 * softmax_error, (normalization, error, softmax_error)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA and unknown lengths: tf.function")
def test_fused_gradients_under_xla_with_unknown_lengths_equal_eager_ones(rng):
    import tensorflow as tf

    q, k, v = (tf.constant(rng.normal(size=(2, 5, 2, 8))) for _ in range(3))
    mask = tf.constant(rng.random((2, 1, 5, 5)) < 0.7)
    beta = tf.constant(rng.normal(size=2))

    def gradients(q, k, v, beta):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v, beta])
            output, _ = fused_attention(
                q, k, v, mask, normalization="hybrid", scale=0.3, null_query_logits=beta
            )
            loss = tf.reduce_sum(output**2)
        return tape.gradient(loss, [q, k, v, beta])

    spec = tf.TensorSpec([None, None, 2, 8], "float64")
    compiled = tf.function(
        gradients, jit_compile=True, input_signature=[spec] * 3 + [tf.TensorSpec([2], "float64")]
    )
    for eager, xla in zip(gradients(q, k, v, beta), compiled(q, k, v, beta)):
        np.testing.assert_allclose(xla.numpy(), eager.numpy(), atol=1e-12)


def _layer_pair(flash_attention, **options):
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    layer = DoublyNormalizedAttention(2, 4, flash_attention=flash_attention, **options)
    exact = DoublyNormalizedAttention(2, 4, flash_attention=False, **options)
    layer(x, x)
    exact(x, x)
    exact.set_weights(layer.get_weights())
    return layer, exact, x


@pytest.mark.parametrize("normalization", ["double", "hybrid", "single"])
def test_layer_runs_on_fused_kernels_where_the_backend_has_them(kernel_calls, normalization):
    options = dict(normalization=normalization, null_query=normalization != "single")
    layer, exact, x = _layer_pair(None, **options)
    padding = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    rng = np.random.default_rng(2)
    for masks in (
        dict(query_mask=padding, value_mask=padding),
        dict(attention_mask=rng.random((2, 5, 5)) < 0.6),
        dict(attention_mask=rng.random((2, 2, 5, 5)) < 0.6, key_mask=padding),
    ):
        del kernel_calls[:]
        fused = layer(x, x, **masks)
        assert bool(kernel_calls) == (BACKEND == "torch")
        del kernel_calls[:]
        expected = exact(x, x, **masks)
        assert not kernel_calls
        np.testing.assert_allclose(
            ops.convert_to_numpy(fused), ops.convert_to_numpy(expected), atol=1e-5
        )
    # Causal normalization has no fused path; softmax's causal mask does.
    del kernel_calls[:]
    causal = layer(x, x, use_causal_mask=True)
    assert bool(kernel_calls) == (BACKEND == "torch" and normalization == "single")
    np.testing.assert_allclose(
        ops.convert_to_numpy(causal),
        ops.convert_to_numpy(exact(x, x, use_causal_mask=True)),
        atol=1e-5,
    )


def test_sliding_window_on_fused_kernels_equals_the_exact_path():
    layer, exact, x = _layer_pair(None, sliding_window=2, normalization="hybrid")
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(x, x)), ops.convert_to_numpy(exact(x, x)), atol=1e-5
    )


def test_disabled_flash_attention_keeps_the_layer_off_fused_kernels(kernel_calls):
    keras.config.disable_flash_attention()
    try:
        layer = DoublyNormalizedAttention(2, 4)
    finally:
        keras.config.enable_flash_attention()
    x = np.ones((1, 3, 8), "float32")
    layer(x, x)
    assert not kernel_calls
    assert DoublyNormalizedAttention.from_config(layer.get_config())._flash_attention is None


def test_flash_attention_true_fails_where_multi_head_attention_fails():
    """`True` asks for flash kernels: where `MultiHeadAttention` gets them,
    so does the layer (and agrees with its exact path); where it raises,
    the layer raises too: the same error, or a `ValueError` naming
    `flash_attention` where the selector knows that no kernel can run
    (TensorFlow, JAX on a CPU, where `MultiHeadAttention` fails deep in
    JAX's cuDNN module)."""
    x = np.random.default_rng(1).normal(size=(2, 8, 16)).astype("float16")
    reference = keras.layers.MultiHeadAttention(2, 8, flash_attention=True, dtype="float16")
    layer = DoublyNormalizedAttention(2, 8, flash_attention=True, dtype="float16")
    try:
        reference(x, x)
    except Exception as error:  # noqa: BLE001 - whatever the backend raises
        refused = keras.backend.backend() in ("tensorflow", "jax")
        with pytest.raises(ValueError if refused else type(error), match="flash_attention" if refused else None):
            layer(x, x)
        return
    exact = DoublyNormalizedAttention(2, 8, flash_attention=False, dtype="float16")
    exact(x, x)
    layer(x, x)
    exact.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(layer(x, x), "float32")),
        ops.convert_to_numpy(ops.cast(exact(x, x), "float32")),
        atol=2e-2,
    )


def test_flash_attention_true_refuses_what_fused_kernels_cannot_do():
    with pytest.raises(ValueError, match="Dropout is not supported when flash attention"):
        DoublyNormalizedAttention(2, 4, flash_attention=True, dropout=0.1)
    layer = DoublyNormalizedAttention(2, 4, flash_attention=True)
    x = np.ones((1, 3, 8), "float32")
    with pytest.raises(ValueError, match="Returning attention scores is not supported"):
        layer(x, x, return_attention_scores=True)
    with pytest.raises(ValueError, match="Causal normalization has no fused-kernel path"):
        layer(x, x, use_causal_mask=True)
    with pytest.raises(TypeError, match="flash_attention"):
        DoublyNormalizedAttention(2, 4, flash_attention="yes")
    with pytest.raises(ValueError, match="Causal normalization has no fused-kernel path"):
        dna_ops.doubly_normalized_attention(
            np.ones((1, 3, 2, 4)), np.ones((1, 3, 2, 4)), np.ones((1, 3, 2, 4)),
            is_causal=True, flash_attention=True,
        )


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch runs fused kernels on a CPU")
def test_fused_layer_saves_and_trains(tmp_path):
    layer, exact, x = _layer_pair(None, normalization="hybrid", null_query=True)
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, layer(inputs, inputs))
    path = tmp_path / "fused.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(restored(x)), ops.convert_to_numpy(model(x)), atol=1e-6
    )
    model.compile(optimizer="sgd", loss="mse")
    before = [np.array(w) for w in model.get_weights()]
    model.fit(x, np.zeros((2, 5, 8), "float32"), epochs=1, verbose=0)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's profiler counts a CPU's memory")
def test_fused_path_writes_nothing_larger_than_the_softmax_kernel_does():
    """Forward and backward, no allocation beyond the kernel's own
    workspace, a sixteenth of one float32 score matrix here."""
    import torch

    batch, heads, length, head_dim = 1, 2, 2048, 8
    q, k, v = (torch.randn(batch, length, heads, head_dim, requires_grad=True) for _ in range(3))
    mask = torch.rand(batch, 1, 1, length) < 0.9

    softmax = largest_allocation(lambda: keras.ops.dot_product_attention(q, k, v, mask=mask))
    double = largest_allocation(
        lambda: dna_ops.doubly_normalized_attention(
            q, k, v, mask, null_query_logits=torch.zeros(heads, requires_grad=True)
        )
    )
    assert double <= softmax <= batch * heads * length * length * 4 / 16, (double, softmax)
    assert torch.isfinite(q.grad).all() and float(q.grad.abs().sum()) > 0


def test_accelerator_benchmark_runs_and_catches_a_kernel_that_falls_back(tmp_path):
    """`benchmarks/speed/accelerators.py`, small, on this machine's backend; on
    PyTorch, a `MultiHeadAttention` whose value width differs from its key
    width leaves the fused kernels, and the script must fail."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    command = [sys.executable, "-m", "benchmarks.speed.accelerators", "--backends", BACKEND, "--lengths", "32",
               "--batch", "1", "--heads", "2", "--key-dim", "8", "--repeats", "1",
               "--output", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "run.md").read_text()
    assert "DNA materialized" in table and "Failures" not in table
    cell = __import__("json").loads((tmp_path / "run.json").read_text())["cells"][0]
    assert cell["DNA fused vs DNA materialized"] < 1e-4
    if BACKEND == "torch":
        assert "| fused |" in table
        # One cell is enough to fail on: MHA leaves the kernels in every cell.
        result = subprocess.run(command + ["--value-dim", "12", "--causal", "no"], capture_output=True,
                                text=True, cwd=root)
        assert result.returncode == 1
        assert "MHA: a fused kernel fell back" in (tmp_path / "run.md").read_text()
