"""Working dtypes and the numeric limits every normalization path shares.

The normalization runs in float32, or float64 for float64 inputs, under any
dtype policy. Masked pairs hold a finite stand-in score (so that no
`inf - inf` reaches a value or a gradient), and the fast paths trust a sum
of exponentials only above a floor far from where `exp` flushes to zero.
"""

import math

import keras
from keras import ops

from keras_dna.ops.backend import maximum


def working_dtype(dtype):
    """The dtype normalization runs in: float32, or float64 for float64."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def _is_float64(x):
    return keras.backend.standardize_dtype(x.dtype) == "float64"


def masked_value(x):
    """Stands in for the scores of masked pairs, in the dtype of `x`.

    Finite, so that differences of two masked entries stay 0 and no
    inf - inf can reach a gradient.
    """
    return -1e300 if _is_float64(x) else -1e30


def underflow_log_threshold(x):
    """Log of the smallest sum of exponentials the fast paths trust.

    exp() flushes to zero below about -87 (float32) or -708 (float64); a sum
    of at least exp(threshold) makes the lost terms negligible (relative
    error below `length * exp(threshold - flush)`). Half the range, because
    XLA may multiply two such sums (it rewrites `a / b / c` to
    `a / (b * c)`), and their product must not underflow either.
    """
    return -300.0 if _is_float64(x) else -40.0


def reduce_or_fill(reduction, x, axis=None, keepdims=False, *, empty):
    """`reduction(x, axis, keepdims)` (`ops.amax` or `ops.amin`), `empty`
    wherever it reduces over no entry.

    Keras raises on an empty tensor (TensorFlow when eager, JAX, PyTorch),
    and an empty query, key or batch must give an empty result, as softmax
    attention does. (`ops.max` with `initial` does this too, but its
    PyTorch version breaks `torch.compile`'s graph at every call.)
    TensorFlow graphs reduce axes empty only at run time to -inf (maximum)
    or the dtype's largest value (minimum).
    """
    if 0 in tuple(x.shape):
        return ops.full_like(ops.sum(x, axis=axis, keepdims=keepdims), empty)
    return reduction(x, axis=axis, keepdims=keepdims)


def max_along(x, axis):
    """The maximum along `axis` (kept), `masked_value` over an empty axis.

    Every score is at least `masked_value`, so the floor changes nothing
    but a TensorFlow graph's -inf over an axis empty at run time.
    """
    floor = masked_value(x)
    return at_least(reduce_or_fill(ops.amax, x, axis, keepdims=True, empty=floor), floor)


def smallest_normal(x):
    """A floor about 8x above the smallest normal number of `x`'s dtype:
    values above it keep the dtype's full relative precision, where
    subnormals lose it digit by digit. bfloat16 shares float32's range;
    float16's normals end near 6.1e-5."""
    if _is_float64(x):
        return 1e-307
    if keras.backend.standardize_dtype(x.dtype) == "float16":
        return 5e-4
    return 1e-37


def at_least(x, floor):
    """`maximum(x, floor)` for a Python number `floor`, in the dtype of `x`.

    A Python float would be float32 outside TensorFlow (Keras maps float64
    to float32 there), rounding float64 work.
    """
    return maximum(x, ops.convert_to_tensor(floor, dtype=x.dtype))


def _smallest_valid(sums, where_valid):
    """The smallest of `sums` where `where_valid` (broadcastable) is True.

    Infinite over no entries at all, so an empty input is trusted.
    """
    if where_valid is not None:
        sums = ops.where(where_valid, sums, float("inf"))
    return reduce_or_fill(ops.amin, sums, empty=float("inf"))


def fast_path_trusted(key_sums, key_valid, query_sums, query_valid):
    """Whether weights `E / (K * R)` from flushed exponentials are exact.

    `E = exp(s - shift)` flushes to zero below `exp(flush)`; a valid term
    lost that way has a true weight below `exp(flush) / (K * R)`, with `K`
    its key's sum and `R` its query's. So the fast path is trusted when the
    smallest valid `K` times the smallest valid `R` is at least
    `exp(underflow_log_threshold)`; the lost weights are then below
    `exp(flush - threshold)`, beyond float resolution.
    """
    smallest = _smallest_valid(key_sums, key_valid) * _smallest_valid(query_sums, query_valid)
    return smallest >= math.exp(underflow_log_threshold(key_sums))


def positive_where_valid(sums, where_valid):
    """`sums` floored at the smallest normal number where `where_valid`,
    1 elsewhere.

    Keeps the fast paths' divisions finite: invalid entries have zero
    terms, so any positive value will do; a valid sum near the floor fails
    `fast_path_trusted`, and its result is not used.
    """
    sums = at_least(sums, smallest_normal(sums))
    return sums if where_valid is None else ops.where(where_valid, sums, 1.0)


def mask_scores(scores, valid):
    """`scores` with `masked_value` wherever `valid` is False."""
    return scores if valid is None else ops.where(valid, scores, masked_value(scores))


def logaddexp(a, b):
    high = maximum(a, b)
    return high + ops.log1p(ops.exp(-ops.abs(a - b)))


def sum_like(x, like):
    """`x` summed over the axes along which `like` was broadcast to it.

    The gradient of `like` where it entered `x`'s computation by
    broadcasting (such as one logit per head against every score).
    """
    extra = len(x.shape) - len(like.shape)
    axes = tuple(range(extra)) + tuple(
        extra + axis for axis, size in enumerate(like.shape) if size == 1
    )
    return ops.reshape(ops.sum(x, axis=axes), ops.shape(like))
