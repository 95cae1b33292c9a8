"""Argument checks shared by the functions of `keras_dna.ops` and the layer.

Each raises a `ValueError` that names the argument, what was expected and
what was received, before any backend sees a bad shape.
"""

import keras
import numpy as np
from keras import ops

NORMALIZATIONS = ("double", "single", "hybrid")


def check_normalization(normalization):
    """Raises unless `normalization` is one of `NORMALIZATIONS`."""
    if not isinstance(normalization, str) or normalization not in NORMALIZATIONS:
        raise ValueError(
            "Argument `normalization` must be one of "
            f"{', '.join(repr(n) for n in NORMALIZATIONS)}. "
            f"Received: normalization={normalization!r}"
        )


def check_null_query_normalization(normalization):
    """Raises if a null query is asked of softmax, which has no per-key step."""
    if normalization == "single":
        raise ValueError(
            "A null query joins the per-key step of double normalization; "
            "softmax (normalization='single') has none. Use 'double' or "
            "'hybrid', or no null query."
        )


def same_static_shape(a, b):
    """Whether two shapes can be equal, unknown (None) dims matching anything."""
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def check_broadcastable(name, shape, target_shape, min_rank=0):
    """Raises unless `shape` broadcasts to `target_shape` (static dims only)."""
    shape = tuple(shape)
    target_shape = tuple(target_shape)
    compatible = min_rank <= len(shape) <= len(target_shape) and all(
        m is None or t is None or m in (1, t)
        for m, t in zip(reversed(shape), reversed(target_shape))
    )
    if not compatible:
        raise ValueError(
            f"Argument `{name}` must be broadcastable to shape {target_shape} "
            f"(rank {min_rank} to {len(target_shape)}). "
            f"Received: {name}.shape={shape}"
        )


def check_chunk_size(chunk_size):
    """Raises unless `chunk_size` is `None`, `"auto"` or a positive integer."""
    if chunk_size is None or (isinstance(chunk_size, str) and chunk_size == "auto"):
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(
            "Argument `chunk_size` must be None, 'auto' or a positive integer. "
            f"Received: chunk_size={chunk_size!r}"
        )


def check_rank4(name, x):
    """Raises unless `x` is shaped `(batch, length, num_heads, head_dim)`."""
    if len(x.shape) != 4:
        raise ValueError(
            f"Argument `{name}` must have shape (batch, length, num_heads, "
            f"head_dim). Received: {name}.shape={x.shape}"
        )


def check_match(what, a_name, a, b_name, b):
    """Raises if two static sizes `a` and `b` (None: unknown) differ."""
    if a is not None and b is not None and a != b:
        raise ValueError(
            f"Arguments `{a_name}` and `{b_name}` must have the same {what}. "
            f"Received: {a} and {b}"
        )


def checked_query_and_key(query, key):
    """`query` and `key` as tensors, checked to fit each other."""
    query = ops.convert_to_tensor(query)
    key = ops.convert_to_tensor(key)
    check_rank4("query", query)
    check_rank4("key", key)
    for axis, what in ((0, "batch size"), (2, "number of heads"), (3, "head size")):
        check_match(what, "query", query.shape[axis], "key", key.shape[axis])
    return query, key


def _known_values(x):
    """The values of `x` as a NumPy array if known now (eager), else `None`."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, keras.KerasTensor):
        return None
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    elif backend == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    elif backend == "torch":
        import torch

        if torch.compiler.is_compiling():
            return None
    return ops.convert_to_numpy(x)


def check_mask_values(name, mask):
    """Raises if `mask` is a float tensor whose known values are not all 0 or 1.

    Masks are boolean (True attends). A float mask is cast to bool, so an
    additive mask (0 keeps, a large negative number drops), a habit from
    other libraries, would silently attend where it meant not to. Its
    values are only known eagerly; traced, the cast stands.
    """
    if mask is None or not hasattr(mask, "dtype"):
        return
    if "float" not in keras.backend.standardize_dtype(mask.dtype):
        return
    values = _known_values(mask)
    if values is None:
        return
    stray = np.unique(values[(values != 0) & (values != 1)])
    if stray.size:
        raise ValueError(
            f"Argument `{name}` must be a boolean mask (True, or 1, attends). "
            f"A float mask may only hold 0 and 1; received values such as "
            f"{stray[:3].tolist()}. An additive mask (0 keeps, a large negative "
            f"number drops) becomes a boolean one as `{name} == 0`."
        )


def check_flash_attention(flash_attention):
    """Raises unless `flash_attention` is `None` or a bool."""
    if flash_attention is not None and not isinstance(flash_attention, bool):
        raise TypeError(
            "Argument `flash_attention` must be None, True or False. "
            f"Received: flash_attention={flash_attention!r}"
        )


def check_per_head(name, logits, heads):
    """Raises unless `logits` holds one value per head, shape `(heads,)`
    (a `None` count of heads, unknown while tracing, matches any length)."""
    shape = tuple(np.shape(logits) if not hasattr(logits, "shape") else logits.shape)
    if len(shape) != 1 or None not in (heads, shape[0]) and shape[0] != heads:
        raise ValueError(
            f"Argument `{name}` must have shape ({heads},), one value per "
            f"head. Received: {name}.shape={shape}"
        )
