"""`CachedDoublyNormalizedAttention`: keras-hub's cached call, doubly normalized."""

import contextlib
import contextvars
import functools

import keras
from keras import ops

from keras_dna.layers import DoublyNormalizedAttention
from keras_dna.layers.masks import unwrap_attention_mask
from keras_dna.layers.masks import with_heads_axis
from keras_dna.layers.masks import without_keras_mask
from keras_dna.ops.backend import compiled
from keras_dna.ops.backend import known_int
from keras_dna.ops.backend import scaled
from keras_dna.ops.checks import check_match
from keras_dna.ops.incremental import cached_attention

# Where a prefill's committed queries end: a causal LM's `generate` runs the
# whole padded prompt through the cache once, then processes the tokens from
# the shortest prompt's last one on again, one per step. Those must not join
# the key state twice.
_PREFILL_END = contextvars.ContextVar("prefill_end", default=None)


@contextlib.contextmanager
def prefill_until(position):
    """Within the block, cached calls commit only queries before `position`
    (a scalar, int or tensor) to the key state."""
    token = _PREFILL_END.set(position)
    try:
        yield
    finally:
        _PREFILL_END.reset(token)


def committed_queries(query_length, update_index):
    """Which of a cached call's queries, written from `update_index`, join
    the key state: `None` for all, or a boolean `(1, 1, query_length, 1)`
    within a `prefill_until` block."""
    end = _PREFILL_END.get()
    if end is None or update_index is None:
        return None
    positions = update_index + ops.arange(query_length)
    return ops.reshape(positions < end, (1, 1, -1, 1))


@keras.saving.register_keras_serializable(package="keras_dna")
class CachedDoublyNormalizedAttention(DoublyNormalizedAttention):
    """`DoublyNormalizedAttention` with keras-hub's key/value cache.

    Takes the call of `keras_hub.layers.CachedMultiHeadAttention` (the
    `cache` and `cache_update_index` arguments, the same return values), so
    keras-hub's decoders and causal LMs can decode with it; without a
    cache it is `DoublyNormalizedAttention`, all of whose options it takes.

    Decoding needs causal normalization: a key's normalizer may only sum
    over the queries decoded so far. Each call then adds its queries to a
    running log-sum-exp per cached key, the key state, so a prompt processed
    at once and then one token per step gets the weights of one call over
    the whole sequence.

    Cache layout: `(B, 2, S, num_heads, width)` (`key_dim` must equal
    `value_dim`). Slot 0 holds the projected keys and slot 1 the values in
    their first `head_dim` columns, as keras-hub's. With
    `normalization="single"` that is all (`width == head_dim`): the cache
    is keras-hub's. Otherwise the cache is one column wider
    (`width == head_dim + 1`), and that column of slot 0 holds the key
    state: each key's log-sum-exp of its scores over the queries so far
    (per head), `-inf` for a key no query has seen yet (the column of slot
    1 is unused, zeros). A cache of keras-hub's width, such as the zeros
    keras-hub's causal LMs start from, counts as one without queries: the
    first call returns the wider cache. The state so costs `1 / head_dim`
    of the cache's memory. With `cache_update_index=None` (the static cache
    of cross-attention) the keys and values stay and the key state still
    grows, so the returned cache must be passed to the next step.

    Call arguments:
        query: Query tensor of shape `(B, T, dim)`.
        value: Value tensor of shape `(B, S*, dim)`: with a cache and a
            `cache_update_index`, the new tokens to write into the cache
            from that index; with a cache and no index, ignored.
        key: Optional key tensor, shaped as `value`.
        attention_mask: Optional boolean mask of shape `(B, T, S)`, `S` the
            cache length when there is a cache, or a
            `keras_dna.CausalNormalizationMask` of one for a call that
            normalizes causally.
        cache: Optional cache, laid out as above.
        cache_update_index: Optional int or int tensor: where `value` and
            `key` go in the cache.
        return_attention_scores: Whether to also return the weights.
        training: Whether dropout is active.
        **kwargs: Without a cache, the other call arguments of
            `DoublyNormalizedAttention` (`query_mask`, `use_causal_mask`,
            ...).

    Returns:
        `attention_output`, then the weights if `return_attention_scores`,
        then the updated cache if a cache was given.
    """

    def call(
        self,
        query,
        value,
        key=None,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        return_attention_scores=False,
        training=None,
        **kwargs,
    ):
        if cache is None:
            if cache_update_index is not None:
                raise ValueError(
                    "`cache_update_index` needs a `cache`. Received: "
                    f"cache=None, cache_update_index={cache_update_index}"
                )
            return super().call(
                query, value, key=key, attention_mask=attention_mask,
                return_attention_scores=return_attention_scores, training=training, **kwargs,
            )
        if kwargs:
            raise ValueError(
                "With a `cache`, masks other than `attention_mask` are not "
                f"taken. Received: {sorted(kwargs)}"
            )
        attention_mask, causal_from_mask = unwrap_attention_mask(attention_mask)
        self._check_cache(
            query, value, cache, cache_update_index,
            causal_from_mask or self._causal_normalization,
        )
        key = value if key is None else key
        query, key, value = (without_keras_mask(x) for x in (query, key, value))
        gate = self._gate_dense(query) if self._use_gate else None
        query = scaled(self._query_dense(query), self._inverse_sqrt_key_dim)
        rows = (None, None)
        if cache_update_index is not None:
            rows = (self._key_dense(key), self._value_dense(value))
            # A tensor: a compiled function would be traced again per int.
            cache_update_index = ops.cast(cache_update_index, "int32")
        valid = None
        if attention_mask is not None:
            valid = with_heads_axis(ops.cast(attention_mask, "bool"), 4, len(self._attention_axes))
        committed = None
        if self._normalization != "single":
            committed = committed_queries(ops.shape(query)[1], cache_update_index)
        output, weights, cache = self._cached_attention(training)(
            query, *rows, cache, cache_update_index, valid, committed,
            normalization=self._normalization,
            mixing_logits=_value_of(self._mixing_logits),
            null_query_logits=_value_of(self._null_query_logits),
        )
        if gate is not None:
            output = ops.multiply(output, gate)
        output = self._output_dense(output)
        if return_attention_scores:
            return output, weights, cache
        return output, cache

    def _check_cache(self, query, value, cache, cache_update_index, causal_normalization):
        """Raises unless `cache` is laid out for this layer, holds floats for
        the query's batch, and the call normalizes causally; and unless the
        rows written from `cache_update_index` fit in it (where known)."""
        widths = (self._key_dim,)
        if self._normalization != "single":
            widths += (self._key_dim + 1,)
        shape = tuple(cache.shape)
        heads_and_widths = [(self._num_heads, width) for width in widths]
        if len(shape) != 5 or shape[1] != 2 or shape[3:] not in heads_and_widths:
            raise ValueError(
                "Argument `cache` must have shape (batch, 2, length, num_heads, "
                f"width) = (B, 2, S, {self._num_heads}, "
                f"{' or '.join(map(str, widths))}) (see the class docstring). "
                f"Received: cache.shape={shape}"
            )
        if self._value_dim != self._key_dim:
            raise ValueError(
                "A cache holds keys and values in one tensor, so `value_dim` "
                f"must equal `key_dim`. Received: key_dim={self._key_dim}, "
                f"value_dim={self._value_dim}"
            )
        if self._normalization != "single" and not causal_normalization:
            raise ValueError(
                "Decoding with a cache needs causal normalization: "
                f"normalization={self._normalization!r} otherwise sums each "
                "key's scores over all queries, later ones included. Build "
                "the layer with causal_normalization=True."
            )
        dtype = keras.backend.standardize_dtype(cache.dtype)
        if "float" not in dtype:
            raise TypeError(
                f"Argument `cache` must hold floats (the layer computes in "
                f"{self.compute_dtype}). Received: cache.dtype={dtype}"
            )
        check_match("batch size", "query", query.shape[0], "cache", cache.shape[0])
        if cache_update_index is not None:
            _check_update_index(cache_update_index, value.shape[1], cache.shape[2])

    def _cached_attention(self, training):
        """`cached_attention`, compiled as a whole where the layer compiles.

        Keras runs keras-hub's `generate` uncompiled on CPUs; compiled
        whole, a converted GPT-2 decodes at about keras-hub's own time per
        token, and markedly slower with only the normalization compiled
        (`benchmarks/results/decoding/generate.md`). With dropout active it
        runs as it is, the layer's dropout between weights and values.
        """
        if self._dropout and training:
            return functools.partial(
                cached_attention, dropout=functools.partial(self._dropout_layer, training=training)
            )
        return compiled(cached_attention, self._jit_compile)


def _value_of(weight):
    """The backend variable: a compiled TensorFlow function cannot take the
    Keras wrapper."""
    return None if weight is None else weight.value


def _check_update_index(cache_update_index, rows, length):
    """Raises unless `rows` rows written from `cache_update_index` fit in a
    cache of `length` (where both are known before the call runs)."""
    index = known_int(cache_update_index)
    if index is None or rows is None or length is None:
        return
    if index < 0 or index + rows > length:
        raise ValueError(
            f"Argument `cache_update_index` must leave room for the {rows} "
            f"new row(s) in the cache of length {length}: from 0 to "
            f"{length - rows}. Received: cache_update_index={index}"
        )
