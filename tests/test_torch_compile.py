"""The fused path under `torch.compile`: compiled once, as eager.

Identical calls of a compiled fused layer once recompiled on calls 2 to 4,
and its first call took 40-80 s against 9 s for `MultiHeadAttention`
(`benchmarks/speed/torch_compile.py` measures both): Keras's `ops.pad` and
`ops.cond` build `keras.Operation`s whose name counters Dynamo guarded on,
and `ops.cond` and Keras's flash check split the graph.
"""

import keras
import numpy as np
import pytest

from keras_dna import DoublyNormalizedAttention
from keras_dna import ops as dna_ops

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="torch.compile is PyTorch's; the other backends compile through XLA (tests/test_fused.py)",
)


@pytest.fixture
def dynamo():
    import torch

    torch._dynamo.reset()
    yield torch
    torch._dynamo.reset()


def test_identical_calls_compile_once_and_match_eager(dynamo):
    torch = dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    keras.utils.set_random_seed(0)
    layer = DoublyNormalizedAttention(2, 8)
    x = torch.tensor(np.random.default_rng(0).normal(size=(2, 16, 16)).astype("float32"))
    layer(x, x)  # builds the layer
    eager = layer(x, x).detach()
    counter = CompileCounterWithBackend("inductor")
    counters.clear()
    compiled = torch.compile(lambda x: layer(x, x), backend=counter)
    outputs = [compiled(x).detach()]
    frames = counter.frame_count
    outputs += [compiled(x).detach() for _ in range(2)]
    assert counter.frame_count == frames, "identical calls recompiled"
    breaks = [reason for reason in counters["graph_break"] if "keras_dna" in reason]
    assert not breaks, breaks
    for output in outputs:
        np.testing.assert_allclose(output.numpy(), eager.numpy(), atol=1e-5)


@pytest.mark.parametrize("spread", [1.0, 1000.0])
def test_compiled_fallback_matches_eager_with_gradients(dynamo, spread):
    """Far apart scores underflow the fused read-out (`spread=1000`): the
    compiled call takes the exact path, forward and backward, in one graph."""
    torch = dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    rng = np.random.default_rng(1)
    q = (rng.normal(size=(2, 6, 2, 4)) * spread).astype("float32")
    k, v = (rng.normal(size=(2, 5, 2, 4)).astype("float32") for _ in range(2))
    mask = torch.tensor(rng.random((2, 1, 6, 5)) < 0.7)
    weights = torch.tensor(np.sin(np.arange(2 * 6 * 2 * 4)).reshape(2, 6, 2, 4).astype("float32"))

    def loss(q, k, v, mixing_logits):
        output = dna_ops.doubly_normalized_attention(
            q, k, v, mask, normalization="hybrid", mixing_logits=mixing_logits, implementation="fused"
        )
        return output, (output * weights).sum()

    def value_and_gradients(function):
        args = [torch.tensor(x, requires_grad=True) for x in (q, k, v, np.float32([0.3, -0.2]))]
        output, value = function(*args)
        return [output.detach()] + list(torch.autograd.grad(value, args))

    counter = CompileCounterWithBackend("aot_eager")
    compiled = value_and_gradients(torch.compile(loss, backend=counter))
    assert counter.frame_count == 1, "the graph split"
    for eager, got in zip(value_and_gradients(loss), compiled):
        np.testing.assert_allclose(got.numpy(), eager.numpy(), rtol=1e-5, atol=1e-5)
