"""`CachedDoublyNormalizedAttention`: keras-hub's cached call, doubly normalized."""

import contextlib
import contextvars

import keras
from keras import ops

from keras_dna.attention import DoublyNormalizedAttention
from keras_dna.ops import causal_block_weights
from keras_dna.ops import normalize_attention_scores
from keras_dna.ops.backend import compiled
from keras_dna.ops.backend import einsum

# Where a prefill's committed queries end: a causal LM's `generate` runs the
# whole padded prompt through the cache once, then processes the tokens from
# the shortest prompt's last one on again, one per step. Those must not join
# the key state twice.
_PREFILL_END = contextvars.ContextVar("prefill_end", default=None)

# The cache's slots: keys (with the key state in one more column under
# causal double normalization) and values.
_KEY, _VALUE = 0, 1


@contextlib.contextmanager
def prefill_until(position):
    """Within the block, cached calls commit only queries before `position`
    (a scalar, int or tensor) to the key state."""
    token = _PREFILL_END.set(position)
    try:
        yield
    finally:
        _PREFILL_END.reset(token)


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
            cache length when there is a cache.
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
        self._check_cache(cache)
        gate = self._gate_dense(query) if self._use_gate else None
        query = self._query_dense(query)
        key = value if key is None else key
        keys, values = cache[:, _KEY, ..., : self._key_dim], cache[:, _VALUE, ..., : self._key_dim]
        if cache_update_index is not None:
            start = [0, cache_update_index, 0, 0]
            keys = ops.slice_update(keys, start, ops.cast(self._key_dense(key), keys.dtype))
            values = ops.slice_update(
                values, start, ops.cast(self._value_dense(value), values.dtype)
            )
        output, weights, state = self._attend_cached(
            query, keys, values, attention_mask, cache, cache_update_index, training
        )
        if state is not None:
            keys = ops.concatenate([keys, state], axis=-1)
            values = ops.concatenate([values, ops.zeros_like(state)], axis=-1)
            cache = ops.stack([keys, values], axis=1)
        elif cache_update_index is not None:
            cache = ops.stack([keys, values], axis=1)
        if gate is not None:
            output = ops.multiply(output, gate)
        output = self._output_dense(output)
        if return_attention_scores:
            return output, weights, cache
        return output, cache

    def _check_cache(self, cache):
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
        if self._normalization != "single" and not self._normalizes_causally():
            raise ValueError(
                "Decoding with a cache needs causal normalization: "
                f"normalization={self._normalization!r} otherwise sums each "
                "key's scores over all queries, later ones included. Build "
                "the layer with causal_normalization=True."
            )

    def _attend_cached(self, query, keys, values, attention_mask, cache, update_index, training):
        """Output, weights and the new key state (`None` for softmax) as the
        cache's columns."""
        query = ops.multiply(query, self._inverse_sqrt_key_dim)
        scores = einsum(self._dot_product_equation, keys, query)
        valid = None
        if attention_mask is not None:
            valid = self._with_heads_axis(ops.cast(attention_mask, "bool"), 4)
        state = None
        if self._normalization == "single":
            weights = normalize_attention_scores(scores, valid, normalization="single")
        else:
            weights, state = self._causal_block(scores, valid, cache, update_index)
        dropped = self._dropout_layer(weights, training=training) if self._dropout else weights
        return einsum(self._combine_equation, dropped, values), weights, state

    def _causal_block(self, scores, valid, cache, update_index):
        key_lse, key_seen = _unpack_state(cache, self._key_dim)
        committed = None
        end = _PREFILL_END.get()
        if end is not None and update_index is not None:
            positions = update_index + ops.arange(ops.shape(scores)[-2])
            committed = ops.reshape(positions < end, (1, 1, -1, 1))
        # The backend variables: a compiled TensorFlow function cannot take
        # the Keras wrappers.
        mixing, null = (
            None if weight is None else weight.value
            for weight in (self._mixing_logits, self._null_query_logits)
        )
        weights, key_lse, key_seen = compiled(causal_block_weights, self._jit_compile)(
            scores, valid, key_lse, key_seen, committed, normalization=self._normalization,
            mixing_logits=mixing, null_query_logits=null,
        )
        return weights, _state_column(ops.where(key_seen, key_lse, float("-inf")), cache.dtype)


def _unpack_state(cache, head_dim):
    """`(key_lse, key_seen)` shaped `(B, N, 1, S)` from the cache's state
    column; a cache without it has no queries yet."""
    if cache.shape[-1] == head_dim:
        shape = ops.shape(cache)
        empty = ops.zeros((shape[0], shape[3], 1, shape[2]), cache.dtype)
        return empty, ops.cast(empty, "bool")
    key_lse = ops.expand_dims(ops.transpose(cache[:, _KEY, ..., head_dim], (0, 2, 1)), -2)
    return key_lse, ops.greater(key_lse, float("-inf"))


def _state_column(key_lse, dtype):
    """A `(B, N, 1, S)` key state as a cache column, `(B, S, N, 1)`."""
    return ops.transpose(ops.cast(key_lse, dtype), (0, 3, 1, 2))
