"""The layer's argument checks: a clear error before any computation.

Checks of what `MultiHeadAttention` also takes are stricter than its own
where it crashes deep in a backend or silently misbehaves; the shared
checks of shapes and masks live in `keras_dna.ops.checks`.
"""

import inspect

import keras

from keras_dna.layers.masks import is_per_head
from keras_dna.ops.checks import check_broadcastable
from keras_dna.ops.checks import check_chunk_size
from keras_dna.ops.checks import check_flash_attention
from keras_dna.ops.checks import check_match
from keras_dna.ops.checks import check_normalization
from keras_dna.ops.checks import check_null_query_normalization
from keras_dna.ops.checks import same_static_shape


def takes_argument(method, name):
    """Whether `method` takes the keyword argument `name`."""
    parameters = inspect.signature(method).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def flash_attention_setting(flash_attention, dropout):
    """The layer's `flash_attention`: the argument, or the global setting
    (`keras.config.disable_flash_attention()`) where it is `None`."""
    check_flash_attention(flash_attention)
    if flash_attention is None:
        flash_attention = keras.config.is_flash_attention_enabled()
    if flash_attention and dropout > 0.0:
        # MultiHeadAttention's message.
        raise ValueError(
            "Dropout is not supported when flash attention is enabled. "
            "Please set dropout to 0.0 to use flash attention."
        )
    return flash_attention


def check_options(
    normalization, jit_compile, chunk_size, dropout, causal_normalization, null_query,
    attention_axes,
):
    """Raises on the arguments `MultiHeadAttention` does not have, and on
    `attention_axes` that an integer `chunk_size` cannot take."""
    check_normalization(normalization)
    if jit_compile not in ("auto", True, False):
        raise ValueError(
            "Argument `jit_compile` must be 'auto', True or False. "
            f"Received: jit_compile={jit_compile!r}"
        )
    check_chunk_size(chunk_size)
    if isinstance(chunk_size, int) and dropout:
        raise ValueError(
            "Dropout on the attention weights needs the whole weight "
            "matrix, which `chunk_size` never holds. Pass dropout=0 or "
            f"chunk_size=None. Received: dropout={dropout!r}, "
            f"chunk_size={chunk_size!r}"
        )
    if isinstance(chunk_size, int) and isinstance(attention_axes, (list, tuple)) and (
        len(attention_axes) > 1
    ):
        raise ValueError(
            "`chunk_size` takes blocks of queries along one attention axis; "
            "several axes are normalized jointly over their product, which "
            "needs the whole weight matrix. Pass one attention axis or "
            f"chunk_size=None. Received: chunk_size={chunk_size!r}, "
            f"attention_axes={tuple(attention_axes)}"
        )
    for name, flag in (("causal_normalization", causal_normalization), ("null_query", null_query)):
        if not isinstance(flag, bool):
            raise TypeError(f"Argument `{name}` must be a bool. Received: {name}={flag!r}")
    if null_query:
        check_null_query_normalization(normalization)


def check_ranks(query_shape, value_shape):
    """Raises unless query and value are `(batch, ..., features)` of one rank.

    (`MultiHeadAttention` checks that key and value agree.)"""
    rank = len(query_shape)
    if rank < 3:
        raise ValueError(
            "Argument `query` must have rank 3 or more: (batch, sequence, "
            f"features), or several sequence axes. Received: query.shape={tuple(query_shape)}"
        )
    if len(value_shape) != rank:
        raise ValueError(
            f"Argument `value` must have the rank of `query` ({rank}). "
            f"Received: value.shape={tuple(value_shape)}, query.shape={tuple(query_shape)}"
        )


def check_attention_axes(attention_axes, rank):
    """Raises unless `attention_axes` are distinct axes of a rank-`rank`
    query other than its batch (first) and feature (last) axes."""
    if attention_axes is None:
        return
    allowed = tuple(range(1, rank - 1))
    # MultiHeadAttention counts a negative axis from the last but one.
    resolved = [axis + rank if isinstance(axis, int) and axis < 0 else axis for axis in attention_axes]
    if any(a not in allowed or isinstance(a, bool) for a in resolved) or len(set(resolved)) != len(
        resolved
    ):
        raise ValueError(
            "Argument `attention_axes` must hold distinct axes of `query` other "
            f"than the batch and feature axes: for rank {rank}, from 1 to "
            f"{rank - 2} (or -{rank - 1} to -2). Received: attention_axes={attention_axes}"
        )


def check_causal_mask_call(use_causal_mask, attention_axes):
    """Raises if a call asks for a causal mask over several attention axes."""
    if use_causal_mask and len(attention_axes) > 1:
        raise ValueError(
            "`use_causal_mask=True` needs a single attention axis. "
            f"Received: attention_axes={attention_axes}"
        )


def check_chunked_call(chunk_size, return_attention_scores):
    """Raises if a call asks a layer with an integer `chunk_size` for the
    weights, which blocks of queries never hold."""
    if isinstance(chunk_size, int) and return_attention_scores:
        raise ValueError(
            "A layer with `chunk_size` never holds the whole attention "
            "weight matrix, so it cannot return it. Pass "
            "return_attention_scores=False or build the layer with "
            "chunk_size=None."
        )


def check_flash_call(flash_attention, return_attention_scores):
    """Raises `MultiHeadAttention`'s error for weights asked of flash attention."""
    if flash_attention and return_attention_scores:
        # MultiHeadAttention's message.
        raise ValueError(
            "Returning attention scores is not supported when flash "
            "attention is enabled. Please disable flash attention to access"
            " attention scores."
        )


def check_call_inputs(inputs, masks, built_dims, built_rank, attention_axes, num_heads):
    """Raises unless a call's tensors and masks fit the built layer.

    Args:
        inputs: `(query, value, key)`, `key` possibly `None`.
        masks: `(query_mask, value_mask, key_mask, attention_mask)`.
        built_dims: The last dimensions of query, value and key the layer
            was built with.
        built_rank: The query's rank the layer was built with.
        attention_axes: The layer's attention axes.
        num_heads: The layer's number of heads.
    """
    query, value, key = inputs
    key = value if key is None else key
    if not same_static_shape(key.shape[:-1], value.shape[:-1]):
        raise ValueError(
            "Arguments `key` and `value` must have the same shape except "
            f"in the last axis. Received: key.shape={key.shape}, "
            f"value.shape={value.shape}"
        )
    for name, tensor, expected in zip(("query", "value", "key"), (query, value, key), built_dims):
        if tensor.shape[-1] is not None and tensor.shape[-1] != expected:
            raise ValueError(
                f"Argument `{name}` must have last dimension {expected}, "
                "the size the layer was built with. Received: "
                f"{name}.shape={tensor.shape}"
            )
    check_ranks(query.shape, value.shape)
    if len(query.shape) != built_rank:
        raise ValueError(
            f"Argument `query` must have rank {built_rank}, the rank the "
            f"layer was built with. Received: query.shape={query.shape}"
        )
    batch_axes = tuple(axis for axis in range(built_rank - 1) if axis not in attention_axes)
    for name, tensor in (("value", value), ("key", key)):
        for axis in batch_axes:
            check_match(
                "batch size" if axis == 0 else f"size in axis {axis} (not an attention axis)",
                "query", query.shape[axis], name, tensor.shape[axis],
            )
    _check_mask_shapes(query, value, key, masks, batch_axes, attention_axes, num_heads)


def _check_mask_shapes(query, value, key, masks, batch_axes, attention_axes, num_heads):
    """Raises unless each mask broadcasts to what it masks."""
    query_mask, value_mask, key_mask, attention_mask = masks
    # The scores' layout: batch axes, heads (per-head masks only), query
    # axes, key axes.
    batch = tuple(query.shape[axis] for axis in batch_axes)
    heads = ()
    if attention_mask is not None and is_per_head(attention_mask, query, len(attention_axes)):
        heads = (num_heads,)
    pairs = tuple(query.shape[axis] for axis in attention_axes)
    pairs += tuple(key.shape[axis] for axis in attention_axes)
    for name, mask, target_shape, min_rank in (
        ("query_mask", query_mask, query.shape[:-1], len(query.shape) - 1),
        ("value_mask", value_mask, value.shape[:-1], len(value.shape) - 1),
        ("key_mask", key_mask, key.shape[:-1], len(key.shape) - 1),
        ("attention_mask", attention_mask, batch + heads + pairs, 2 * len(attention_axes)),
    ):
        if mask is not None:
            check_broadcastable(name, mask.shape, target_shape, min_rank)
