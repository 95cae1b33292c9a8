"""DNA's Triton kernels for PyTorch (`keras_dna.ops.triton_kernels`) against
the float64 oracle.

They run in Triton's interpreter on this CPU (`TRITON_INTERPRET=1`, set by
scripts/test.sh before Triton is imported): exact and slow, so the cases are
small, with blocks of 16 (`tl.dot`'s least) so that most span several
blocks. Outputs and gradients (queries, keys, values, null logits) are held
to `tests/oracle.py`, the gradients by central differences of it.
"""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
pytestmark = pytest.mark.skipif(
    BACKEND != "torch", reason="Triton kernels: scripts/test.sh runs this module in the PyTorch step"
)

if BACKEND == "torch":
    import torch

    from keras_dna import ops as dna_ops
    from keras_dna.ops.triton_kernels import kernel_attention
from tests import oracle

BLOCK = 16


@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    # Without it Triton compiles for a GPU this machine lacks: the step
    # must set it, as Triton reads it when imported.
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"


def _oracle(q, k, v, valid, normalize, causal, null):
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    weights = oracle.attention_weights(
        scores, valid, "double" if normalize else "single", causal, null_query_logits=null
    )
    return np.einsum("bnts,bsnh->btnh", weights, v)


def _validity(mask, causal_mask, q_len, k_len):
    valid = np.ones((1, 1, q_len, k_len), bool) if mask is None else mask
    if causal_mask:
        valid = valid & np.tril(np.ones((q_len, k_len), bool))
    return valid


# (batch, query length, key length, causal, causal mask, normalize, null,
# mask layout, score spread)
CASES = [
    (1, 20, 20, True, True, True, False, None, 1.0),
    (2, 37, 37, True, True, True, True, "keys", 1.0),
    (1, 20, 27, False, False, True, True, "keys", 1.0),
    (1, 33, 20, True, False, True, False, "rows", 1.0),  # causal normalization, cross
    (1, 20, 33, True, True, True, True, "rows", 1.0),
    (1, 20, 20, False, True, False, False, "keys", 1.0),  # softmax, causal
    (1, 40, 40, True, True, True, True, None, 30.0),  # scores hundreds apart
    (1, 1, 1, True, True, True, True, None, 1.0),
    (1, 1, 19, False, False, True, False, None, 1.0),
]


def _mask(rng, layout, batch, q_len, k_len):
    if layout == "keys":  # padding: (B, 1, 1, S)
        mask = rng.random((batch, 1, 1, k_len)) < 0.8
        mask[:, :, :, 0] = True
        return mask
    if layout == "rows":  # per query and head: (B, N, T, S), some rows empty
        mask = rng.random((batch, 2, q_len, k_len)) < 0.7
        mask[:, :, 0] = False
        return mask
    return None


@pytest.mark.parametrize("batch, q_len, k_len, causal, causal_mask, normalize, null, layout, spread", CASES)
def test_outputs_and_gradients_match_the_oracle(
    rng, batch, q_len, k_len, causal, causal_mask, normalize, null, layout, spread
):
    q = rng.normal(size=(batch, q_len, 2, 8)) * spread
    k = rng.normal(size=(batch, k_len, 2, 8))
    v = rng.normal(size=(batch, k_len, 2, 5))  # value_dim differs
    beta = rng.normal(size=2) if null else None
    mask = _mask(rng, layout, batch, q_len, k_len)
    valid = _validity(mask, causal_mask, q_len, k_len)
    projection = rng.normal(size=(batch, q_len, 2, 5))
    arrays = [q, k, v] + ([beta] if null else [])
    tensors = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in arrays]
    out = kernel_attention(
        *tensors[:3], None if mask is None else torch.tensor(mask), tensors[3] if null else None,
        normalize=normalize, causal=causal, causal_mask=causal_mask, scale=1 / np.sqrt(8),
        block_q=BLOCK, block_k=BLOCK,
    )
    assert out.dtype == torch.float32
    expected = _oracle(q, k, v, valid, normalize, causal, beta)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=2e-5 * spread, rtol=0)

    def loss(*arrays):
        return float(np.sum(_oracle(*arrays[:3], valid, normalize, causal, arrays[3] if null else None)
                            * projection))

    (out * torch.tensor(projection, dtype=torch.float32)).sum().backward()
    for which, tensor in enumerate(tensors):
        for index in [tuple(rng.integers(0, n) for n in arrays[which].shape) for _ in range(5)]:
            shifted = [a.copy() for a in arrays]
            shifted[which][index] += 1e-6
            up = loss(*shifted)
            shifted[which][index] -= 2e-6
            numeric = (up - loss(*shifted)) / 2e-6
            assert abs(float(tensor.grad[index]) - numeric) <= 1e-4 * max(1.0, abs(numeric)), (which, index)


def test_a_later_token_changes_no_earlier_output_to_the_bit(rng):
    q, k, v = (torch.tensor(rng.normal(size=(1, 40, 2, 8)), dtype=torch.float32) for _ in range(3))

    def attend(q, k, v):
        return kernel_attention(
            q, k, v, null_logits=torch.tensor([0.5, 2.0]), normalize=True, causal=True,
            causal_mask=True, scale=0.35, block_q=BLOCK, block_k=BLOCK,
        )

    before = attend(q, k, v)
    changed = [x.clone() for x in (q, k, v)]
    for x in changed:
        x[:, 30:] *= 30.0
    assert torch.equal(attend(*changed)[:, :30], before[:, :30])


def test_empty_sequences_give_empty_or_zero_outputs():
    q = torch.zeros((1, 3, 2, 8), requires_grad=True)
    k, v = torch.zeros((1, 0, 2, 8)), torch.zeros((1, 0, 2, 4))
    out = kernel_attention(q, k, v, normalize=True, causal=True, causal_mask=True, scale=1.0)
    assert out.shape == (1, 3, 2, 4) and not out.any()
    empty = kernel_attention(q[:, :0], q, q, normalize=True, causal=False, causal_mask=False, scale=1.0)
    assert empty.shape == (1, 0, 2, 8)


def test_the_public_function_runs_them_as_implementation_kernel(rng):
    q, k, v = (rng.normal(size=(2, 18, 2, 8)).astype("float32") for _ in range(3))
    null = np.array([0.3, -1.0], "float32")
    got = dna_ops.doubly_normalized_attention(
        q, k, v, is_causal=True, normalization="hybrid", mixing_logits=np.array([0.5, -0.5]),
        null_query_logits=null, implementation="kernel",
    )
    whole = dna_ops.doubly_normalized_attention(
        q, k, v, is_causal=True, normalization="hybrid", mixing_logits=np.array([0.5, -0.5]),
        null_query_logits=null, implementation="whole",
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(whole), atol=2e-6)


def test_bfloat16_inputs_get_bfloat16_gradients_near_the_oracle(rng):
    q, k, v = (rng.normal(size=(1, 24, 2, 8)) for _ in range(3))
    tensors = [torch.tensor(x, dtype=torch.bfloat16, requires_grad=True) for x in (q, k, v)]
    out = kernel_attention(*tensors, normalize=True, causal=True, causal_mask=True, scale=0.35,
                           block_q=BLOCK, block_k=BLOCK)
    rounded = [x.detach().double().numpy() for x in tensors]
    scores = np.einsum("btnh,bsnh->bnts", rounded[0], rounded[1]) * 0.35
    weights = oracle.attention_weights(scores, np.tril(np.ones((24, 24), bool)), "double", True)
    expected = np.einsum("bnts,bsnh->btnh", weights, rounded[2])
    # Computed in float32 from the bfloat16 inputs: float32's error, not bfloat16's.
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-5, rtol=0)
    out.sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all() for x in tensors)


def test_a_causal_layer_on_a_simulated_cuda_device_runs_the_kernels(rng, monkeypatch):
    # `platform` says "cuda" for tensors that stay on this CPU: the selector
    # picks the kernels, which Triton's interpreter then runs.
    from keras_dna import DoublyNormalizedAttention
    from keras_dna.ops import dispatch
    from keras_dna.ops import implementation
    from keras_dna.ops import triton_kernels

    x = rng.normal(size=(2, 21, 16)).astype("float32")
    padding = np.ones((2, 21), bool)
    padding[1, 15:] = False
    layer = DoublyNormalizedAttention(2, 8, null_query=True, normalization="hybrid")
    layer(x, x)
    layer.null_query_logits.assign(np.array([0.5, -1.0]))

    def step():
        query = torch.tensor(x, requires_grad=True)
        out = layer(query, query, use_causal_mask=True, query_mask=padding, value_mask=padding)
        grads = torch.autograd.grad((out * out).sum(), [query, layer.null_query_logits.value])
        return [t.detach().numpy() for t in (out, *grads)]

    expected = step()
    calls = []
    original = triton_kernels.kernel_attention
    monkeypatch.setattr(triton_kernels, "kernel_attention",
                        lambda *a, **k: calls.append(k) or original(*a, **k))
    for module in (implementation, dispatch):
        monkeypatch.setattr(module, "platform", lambda tensor: "cuda")
    got = step()
    assert [call["normalize"] for call in calls] == [True, False]
    assert all(call["causal_mask"] for call in calls)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_the_kernels_compile_for_a_cuda_gpu():
    # In a fresh process without TRITON_INTERPRET: Triton's compiler, down
    # to the GPU's binary, refuses what its interpreter accepts (a global
    # that is not a constexpr did).
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.scripts.triton_cuda_compile"], capture_output=True, text=True,
        env={**environment, "KERAS_BACKEND": "torch"}, cwd=pathlib.Path(__file__).parent.parent,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    assert len(lines) == 8 and all(int(size) > 0 for *_, size in lines)
