"""DNA in keras-hub's decoder families: Llama, Mistral, Gemma, Qwen, Phi3, ...

Their attention layers are plain `keras.layers.Layer`s of their own (grouped
query heads, rotary embeddings, query/key norms, soft caps, sliding windows,
each its own cache layout), not `MultiHeadAttention`. What they share is
where the weights come from: a `keras.layers.Softmax` sublayer over the keys
of the scores `(batch, heads..., T, S)` and the mask, on the path keras-hub
takes wherever its module-level `fused_attention_op_available()` says no
fused kernel runs. A converted layer takes that path always, with
`DoublyNormalizedSoftmax` in the softmax's place: everything before the
weights (projections, rotary embeddings, norms, soft caps, sliding windows,
grouped heads, LoRA, dtype policies) stays keras-hub's.

These are decoders: their masks are causal, so the first step is always
causal (docs/math.md, "Causal normalization"). A call with keras-hub's cache
(a prompt, or one token per step) normalizes with each key's log-sum-exp
over the queries before it, the key state (`keras_dna.ops.incremental`),
kept in the cache beside the keys: the cached keys of each key/value head
get one more column per query head that reads them (see
`DecoderAttentionMixin`).
"""

import contextlib
import contextvars
import inspect
import math

import keras
from keras import ops

from keras_dna._compat import cached_head_dim
from keras_dna._compat import on_softmax_path
from keras_dna._compat import query_heads
from keras_dna._compat import softmax_path_available
from keras_dna._compat import weights_addable
from keras_dna.hub.cached_attention import committed_queries
from keras_dna.layers.argument_checks import check_options
from keras_dna.layers.double_normalization import add_logits
from keras_dna.layers.double_normalization import null_query_initializer_of
from keras_dna.ops import normalize_attention_scores
from keras_dna.ops.backend import compiled
from keras_dna.ops.incremental import causal_block_weights
from keras_dna.ops.incremental import key_state_columns
from keras_dna.ops.incremental import key_state_of

# The cached call in progress: keras-hub's attention calls its softmax with
# the scores and the mask only, so the key state goes in and out through
# this, set and reset around that one call (`DecoderAttentionMixin.call`).
_CACHED_CALL = contextvars.ContextVar("cached_decoder_call", default=None)


class _CachedCall:
    """A cached call's key state, which its softmax reads and replaces."""

    def __init__(self, softmax, key_lse, key_seen, update_index):
        self.softmax = softmax
        self.key_lse, self.key_seen = key_lse, key_seen
        self.update_index = update_index


@keras.saving.register_keras_serializable(package="keras_dna")
class DoublyNormalizedSoftmax(keras.layers.Layer):
    """Doubly-normalized attention weights of a decoder's scores, causally.

    Takes the place of a `keras.layers.Softmax(axis=-1)` over scores shaped
    `(batch, heads..., T, S)`, the heads on one axis or two (key/value heads
    and their groups of query heads, as Gemma lays them out); per-head
    logits are per query head, in that order.

    Args:
        num_heads: The number of query heads.
        normalization: `"double"`, `"single"` or `"hybrid"`.
        null_query: Whether a null query joins every key's first step.
        null_query_initializer: Initializer of the null query's logits.
        jit_compile: `"auto"` or `True` compile the normalization with XLA
            where the backend can (TensorFlow, JAX), `False` never.
        **kwargs: Base layer arguments.

    Call arguments:
        inputs: The scores.
        mask: Optional boolean mask broadcastable to the scores; `True`
            attends.
    """

    def __init__(
        self, num_heads, normalization="double", null_query=False, null_query_initializer=None,
        jit_compile="auto", **kwargs,
    ):
        super().__init__(**kwargs)
        # As `keras.layers.Softmax`: the mask is the call's argument.
        self.supports_masking = True
        check_options(normalization, jit_compile, None, 0.0, True, null_query, None)
        self.num_heads = num_heads
        self.jit_compile = jit_compile
        self.normalization = normalization
        self.null_query = null_query
        self.null_query_initializer = null_query_initializer_of(null_query_initializer)
        self.mixing_logits, self.null_query_logits = add_logits(
            self, num_heads, normalization, null_query, self.null_query_initializer
        )
        self.built = True

    def call(self, inputs, mask=None):
        scores = ops.convert_to_tensor(inputs)
        shape = ops.shape(scores)
        heads = math.prod(scores.shape[1:-2])
        if heads != self.num_heads:
            raise ValueError(
                f"Argument `inputs` must hold the scores of {self.num_heads} query "
                f"heads between the batch and the last two axes. Received: "
                f"inputs.shape={scores.shape}"
            )
        flat_shape = (shape[0], heads, shape[-2], shape[-1])
        if mask is not None:
            mask = ops.reshape(ops.broadcast_to(ops.cast(mask, "bool"), shape), flat_shape)
        scores = ops.reshape(scores, flat_shape)
        options = {
            "normalization": self.normalization,
            "mixing_logits": None if self.mixing_logits is None else self.mixing_logits.value,
            "null_query_logits": (
                None if self.null_query_logits is None else self.null_query_logits.value
            ),
        }
        # XLA-compiled as a whole where the backend compiles: keras-hub's
        # `generate` runs in a TensorFlow graph without XLA on CPUs.
        cached = _CACHED_CALL.get()
        if cached is not None and cached.softmax is self:
            committed = committed_queries(flat_shape[2], cached.update_index)
            step = compiled(causal_block_weights, self.jit_compile)
            weights, cached.key_lse, cached.key_seen = step(
                scores, mask, cached.key_lse, cached.key_seen, committed, **options
            )
        else:
            weights = compiled(normalize_attention_scores, self.jit_compile)(
                scores, mask, causal_normalization=True, **options
            )
        return ops.reshape(weights, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "normalization": self.normalization,
            "null_query": self.null_query,
            "null_query_initializer": keras.initializers.serialize(self.null_query_initializer),
            "jit_compile": self.jit_compile,
        }


# The attribute that holds the softmax of the scores, by class.
_SOFTMAX_NAMES = ("_softmax", "softmax")


def _softmax_name(layer):
    """The attribute of `layer` that holds its `keras.layers.Softmax` (or
    the `DoublyNormalizedSoftmax` in its place)."""
    for name in _SOFTMAX_NAMES:
        if isinstance(getattr(layer, name, None), (keras.layers.Softmax, DoublyNormalizedSoftmax)):
            return name
    raise ValueError(
        f"Layer '{layer.name}' ({type(layer).__name__}) holds no keras.layers.Softmax "
        f"in {' or '.join(_SOFTMAX_NAMES)}, where keras_dna replaces the softmax "
        "of keras-hub's decoder attention."
    )


def softmax_of(layer):
    """The `keras.layers.Softmax` of keras-hub's decoder attention `layer`,
    or the `DoublyNormalizedSoftmax` in its place."""
    return getattr(layer, _softmax_name(layer))


class DecoderAttentionMixin:
    """Mixed into `DoublyNormalized<Class>` for a keras-hub decoder attention
    class: its softmax becomes `DoublyNormalizedSoftmax`, and its attention
    step takes the softmax path.

    With a cache, DNA keeps its key state in it. keras-hub's caches hold
    `head_dim` columns per key/value head and position, as one tensor
    `(B, 2, S, K, head_dim)` (keys, then values) or a pair of `(B, S, K,
    head_dim)` (Gemma 3). A converted layer's cached keys are `groups =
    query heads // K` columns wider: column `head_dim + g` of key head `k`
    holds, for query head `k * groups + g`, the log-sum-exp of the key's
    scores over the queries so far (`-inf` before any); the values of a
    single tensor get as many columns, unused. A cache of keras-hub's
    width, such as the zeros keras-hub's causal LMs start from, counts as
    one no query has seen: the first call returns the wider cache, which the
    next must get. With `normalization="single"` the cache is keras-hub's.
    """

    def __init__(
        self, *args, normalization="double", causal_normalization=True, jit_compile="auto",
        chunk_size=None, null_query=False, null_query_initializer=None, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.set_attention_options(
            normalization, causal_normalization, jit_compile, chunk_size, null_query,
            null_query_initializer,
        )

    def set_attention_options(
        self, normalization="double", causal_normalization=True, jit_compile="auto",
        chunk_size=None, null_query=False, null_query_initializer=None,
    ):
        """Sets DNA's options (as `DoublyNormalizedAttention` takes them;
        decoders always normalize causally and hold the whole weight
        matrix, so `causal_normalization` and `chunk_size` are fixed)."""
        check_options(normalization, jit_compile, None, 0.0, True, null_query, None)
        if chunk_size not in (None, "auto"):
            raise ValueError(
                "keras-hub's decoder attention computes the whole weight matrix; "
                f"`chunk_size` must be None. Received: chunk_size={chunk_size!r}"
            )
        self._attention_config = {
            "normalization": normalization, "null_query": null_query,
            "null_query_initializer": null_query_initializer, "jit_compile": jit_compile,
        }
        if self.built:
            self._replace_softmax()

    def adopt_attributes(self):
        """Nothing to adopt: the options arrive by `set_attention_options`."""

    def _replace_softmax(self):
        name = _softmax_name(self)
        original = getattr(self, name)
        # Under the layer's own path, so that the logits' paths name their
        # layer (`.../self_attention/attention_softmax/null_query_logits`), as
        # layout maps and weight-decay patterns read them.
        with contextlib.ExitStack() as scopes:
            for part in _variable_path(self):
                scopes.enter_context(keras.name_scope(part))
            replacement = DoublyNormalizedSoftmax(
                query_heads(self), **self._attention_config, dtype=original.dtype_policy,
                name=original.name,
            )
        with weights_addable(self):
            setattr(self, name, replacement)

    def build(self, *args, **kwargs):
        super().build(*args, **kwargs)
        self._replace_softmax()

    @property
    def normalization(self):
        return self._attention_config["normalization"]

    @property
    def mixing_logits(self):
        return getattr(softmax_of(self), "mixing_logits", None)

    @property
    def null_query_logits(self):
        return getattr(softmax_of(self), "null_query_logits", None)

    def attention_options(self):
        """DNA's options, as `set_attention_options` takes them."""
        return {
            "normalization": self.normalization,
            "causal_normalization": True,
            "jit_compile": self._attention_config["jit_compile"],
            "chunk_size": None,
            "null_query": self._attention_config["null_query"],
            "null_query_initializer": keras.initializers.serialize(
                null_query_initializer_of(self._attention_config["null_query_initializer"])
            ),
        }

    def get_config(self):
        return {**super().get_config(), **self.attention_options()}

    def call(self, *args, cache=None, **kwargs):
        if cache is None or self.normalization == "single":
            return super().call(*args, cache=cache, **kwargs)
        head_dim = cached_head_dim(self)
        keys = _keys_and_values(cache)[0]
        groups = self._check_cache(keys, head_dim)
        if keys.shape[-1] == head_dim:
            cache = _widened(cache, groups)
            keys = _keys_and_values(cache)[0]
        key_lse, key_seen = key_state_of(keys[..., head_dim:])
        cached = _CachedCall(
            softmax_of(self), key_lse, key_seen,
            kwargs.get("cache_update_index"),
        )
        # keras-hub's call writes the new keys and values into the first
        # `head_dim` columns and passes the wider rows on to
        # `_compute_attention`, which leaves the state columns out.
        token = _CACHED_CALL.set(cached)
        try:
            output, cache = super().call(*args, cache=cache, **kwargs)
        finally:
            _CACHED_CALL.reset(token)
        state = key_state_columns(cached.key_lse, cached.key_seen, keys.dtype, groups)
        return output, _with_state(cache, state, head_dim)

    def _check_cache(self, keys, head_dim):
        """The number of query heads per cached key head; raises unless
        `keys` (`(B, S, K, width)`) is laid out for this layer."""
        heads, cached_heads = query_heads(self), keys.shape[2]
        groups = heads // cached_heads if cached_heads else 0
        if groups * cached_heads != heads or keys.shape[3] not in (head_dim, head_dim + groups):
            raise ValueError(
                f"Argument `cache` of {type(self).__name__} must hold keys shaped "
                f"(batch, length, K, {head_dim}) as keras-hub lays them out, or "
                f"(batch, length, K, {head_dim} + {heads} // K) with DNA's key state "
                f"({heads} query heads, K key/value heads; see DecoderAttentionMixin). "
                f"Received keys shaped {tuple(keys.shape)}"
            )
        return groups

    def _compute_attention(self, query, key, value, *args, **kwargs):
        head_dim = query.shape[-1]
        if key.shape[-1] != head_dim:  # cached rows with the key state
            key, value = key[..., :head_dim], value[..., :head_dim]
        with on_softmax_path():
            return super()._compute_attention(query, key, value, *args, **kwargs)

    def _compute_vllm_attention(self, *args, **kwargs):
        raise ValueError(
            f"{type(self).__name__} cannot run keras-hub's vLLM paged attention, "
            "whose kernel computes softmax attention; serve the converted model "
            "without vLLM."
        )


def _keys_and_values(cache):
    """The keys and values `(B, S, K, width)` of a cache in either layout."""
    if isinstance(cache, (tuple, list)):
        return tuple(cache)
    return cache[:, 0, ...], cache[:, 1, ...]


def _widened(cache, groups):
    """A cache of keras-hub's width with `groups` state columns, every key
    unseen (`-inf`); in a single tensor the values get unused columns too."""
    if isinstance(cache, (tuple, list)):
        keys, values = cache
        return type(cache)((_padded(keys, groups), values))
    return _padded(cache, groups)


def _padded(tensor, columns):
    widths = [[0, 0]] * (len(tensor.shape) - 1) + [[0, columns]]
    return ops.pad(tensor, widths, constant_values=float("-inf"))


def _with_state(cache, state, head_dim):
    """`cache` with `state` (`(B, S, K, groups)`) in its keys' state columns."""
    if isinstance(cache, (tuple, list)):
        keys, values = cache
        return type(cache)((ops.slice_update(keys, [0, 0, 0, head_dim], state), values))
    return ops.slice_update(cache, [0, 0, 0, 0, head_dim], ops.expand_dims(state, 1))


def _variable_path(layer):
    """The path under which `layer`'s variables were created (its name
    behind those of the layers that built it), as a list of names."""
    for variable in layer.weights:
        parts = variable.path.split("/")
        if layer.name in parts:
            return parts[: parts.index(layer.name) + 1]
    return [layer.name]


def decoder_attention_classes():
    """keras-hub's decoder attention classes whose softmax keras_dna replaces."""
    from keras_hub.src.models.gemma.gemma_attention import CachedGemmaAttention
    from keras_hub.src.models.gemma3.gemma3_attention import CachedGemma3Attention
    from keras_hub.src.models.llama.llama_attention import LlamaAttention
    from keras_hub.src.models.mistral.mistral_attention import CachedMistralAttention
    from keras_hub.src.models.mixtral.mixtral_attention import CachedMixtralAttention
    from keras_hub.src.models.phi3.phi3_attention import Phi3Attention
    from keras_hub.src.models.qwen.qwen_attention import QwenAttention
    from keras_hub.src.models.qwen3.qwen3_attention import Qwen3Attention
    from keras_hub.src.models.qwen3_moe.qwen3_moe_attention import Qwen3MoeAttention
    from keras_hub.src.models.qwen_moe.qwen_moe_attention import QwenMoeAttention

    classes = (
        LlamaAttention, CachedMistralAttention, CachedGemmaAttention, CachedGemma3Attention,
        QwenAttention, Qwen3Attention, Phi3Attention, CachedMixtralAttention, QwenMoeAttention,
        Qwen3MoeAttention,
    )
    return tuple(cls for cls in classes if softmax_path_available(cls))


_CONVERTED = {}


def _call_signed_as(cls):
    """`DecoderAttentionMixin.call` with the signature of `cls.call`, which
    Keras reads to tell a call's tensors from its options; arguments after
    the first arrive by name, as the mixin reads `cache`."""
    signature = inspect.signature(cls.call)
    names = list(signature.parameters)[2:]  # after `self` and the inputs

    def call(self, *args, **kwargs):
        return DecoderAttentionMixin.call(self, *args[:1], **dict(zip(names, args[1:])), **kwargs)

    call.__signature__ = signature
    return call


def converted_decoder_attention(cls):
    """`DoublyNormalized<cls>`, registered, for a keras-hub decoder attention class."""
    if cls not in _CONVERTED:
        converted = type(
            f"DoublyNormalized{cls.__name__}", (DecoderAttentionMixin, cls),
            {"__module__": __name__, "__doc__": cls.__doc__, "call": _call_signed_as(cls)},
        )
        _CONVERTED[cls] = keras.saving.register_keras_serializable(package="keras_dna")(converted)
    return _CONVERTED[cls]
