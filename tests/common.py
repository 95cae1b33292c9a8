"""Small helpers shared by the test modules of keras_dna.ops."""

import keras
import numpy as np
from keras import ops

from keras_dna import ops as dna_ops


def random_valid(rng, shape, keep=0.7):
    """A random boolean mask keeping about `keep` of the entries."""
    return rng.random(shape) < keep


def normalize(scores, valid=None, **kwargs):
    """`normalize_attention_scores` as a NumPy array."""
    return np.asarray(dna_ops.normalize_attention_scores(scores, valid, **kwargs))


def value_and_gradients(function, *arrays):
    """`function(*tensors)` (a scalar) and its gradients, by the backend's autodiff."""
    if keras.backend.backend() == "jax":
        import jax

        value, grads = jax.value_and_grad(function, argnums=tuple(range(len(arrays))))(
            *(ops.convert_to_tensor(a) for a in arrays)
        )
    elif keras.backend.backend() == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        value = function(*tensors)
        grads = torch.autograd.grad(value, tensors)
    else:
        import tensorflow as tf

        tensors = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            value = function(*tensors)
        grads = tape.gradient(value, tensors)
    return float(_as_numpy(value)), [_as_numpy(g) for g in grads]


def _as_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def largest_allocation(function):
    """PyTorch: the largest single CPU allocation while `function()` runs
    forward and backward (of the sum of its squares)."""
    import torch

    with torch.profiler.profile(profile_memory=True) as profile:
        function().square().sum().backward()
    return max(event.cpu_memory_usage for event in profile.events())


def numeric_gradient(function, x, eps=1e-6):
    """Central differences of the scalar `function` at the array `x`, entry
    by entry (the float64 check of a written-out gradient)."""
    gradient = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        gradient[index] = (function(x + step) - function(x - step)) / (2 * eps)
    return gradient
