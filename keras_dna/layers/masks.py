"""The masks of a layer call: how they combine and where the heads axis goes.

Also `CausalNormalizationMask`, the mask of a call that normalizes causally
without `use_causal_mask=True`.
"""

from keras import ops

from keras_dna._compat import get_keras_mask
from keras_dna.ops import causal_mask


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


def causal_mask_of(query, value=None):
    """The causal mask of a call, `(1, T, S)`, as Keras's attention layers
    build it but from index ranges, not the cumulative sums that XLA
    constant-folds slowly (see `keras_dna.ops.causal_mask`)."""
    key_length = ops.shape(query if value is None else value)[1]
    return ops.expand_dims(causal_mask(ops.shape(query)[1], key_length), 0)


def with_derived_masks(derive, attention_mask, query, num_attention_axes):
    """`attention_mask` AND the masks a call derives from its other
    arguments, `derive(attention_mask)` (Keras's `_compute_attention_mask`).

    Keras derives `(B, T, S)` masks and ANDs them with the attention mask as
    they are: with a per-head `(B, num_heads, T, S)` mask, the batch would
    broadcast against the heads. A per-head mask joins them with a heads
    axis inserted instead.
    """
    if attention_mask is None or not is_per_head(attention_mask, query, num_attention_axes):
        return derive(attention_mask)
    attention_mask = ops.cast(attention_mask, "bool")
    derived = derive(None)
    if derived is None:
        return attention_mask
    rank = len(attention_mask.shape)
    return ops.logical_and(attention_mask, with_heads_axis(derived, rank, num_attention_axes))
