"""The masks of a layer call: how they combine and where the heads axis goes.

Also `CausalNormalizationMask`, the mask of a call that normalizes causally
without `use_causal_mask=True`.
"""

from keras import ops

from keras_dna._compat import get_keras_mask


class CausalNormalizationMask:
    """An `attention_mask` for one call that also normalizes causally.

    For a caller that builds its own causal mask per call (keras-hub's
    `TransformerDecoder` with `use_causal_mask=True`) and so cannot pass
    `use_causal_mask=True`: the first step of that call then sums over the
    current and earlier queries only. The decision travels with the call's
    own argument, so concurrent calls of one layer never see each other's.

    Args:
        mask: The boolean attention mask, as the layer's `attention_mask`.
    """

    __slots__ = ("mask",)

    def __init__(self, mask):
        self.mask = mask


def unwrap_attention_mask(attention_mask):
    """`(mask, causal)`: the mask of a `CausalNormalizationMask` and `True`,
    or `attention_mask` as it is and `False`."""
    if isinstance(attention_mask, CausalNormalizationMask):
        return attention_mask.mask, True
    return attention_mask, False


def logical_and(first, second):
    """`first AND second` as booleans, either of them possibly `None`."""
    if first is None or second is None:
        return second if first is None else first
    return ops.logical_and(ops.cast(first, "bool"), ops.cast(second, "bool"))


def is_per_head(attention_mask, query, num_attention_axes):
    """Whether `attention_mask` has a heads axis: the scores' rank,
    `(B, num_heads, T, S)` for a `(B, T, dim)` query."""
    return len(attention_mask.shape) == len(query.shape) + num_attention_axes


def with_heads_axis(mask, rank, num_attention_axes):
    """`mask` with the heads axis (and any missing batch axes) inserted in
    front of the query and key axes, up to `rank`."""
    while len(mask.shape) < rank:
        mask = ops.expand_dims(mask, -2 * num_attention_axes - 1)
    return mask


def without_keras_mask(tensor):
    """`tensor`, or a new tensor of the same values without its Keras mask.

    The projections do not take masks and would warn that they drop one.
    `MultiHeadAttention` deletes the mask of the caller's tensor instead,
    which a concurrent call with the same tensor would then miss.
    """
    if get_keras_mask(tensor) is None:
        return tensor
    # A reshape to the same shape gives JAX's own array back, mask and all.
    return ops.multiply(tensor, 1)
