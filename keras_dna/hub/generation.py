"""Generation of converted keras-hub causal LMs through the DNA cache.

keras-hub's `generate` runs the whole padded prompt through the cache once
(`_build_cache`), then decodes from the shortest prompt's last token on, one
token per step, so the tokens from there are processed twice. Softmax does
not mind: the second pass overwrites the same keys and values. The key
state of causal DNA sums over the queries, so the prefill commits only the
queries before that token; the steps commit theirs.
"""

import contextvars

import keras_hub
from keras import ops

from keras_dna.hub.cached_attention import prefill_until

# Where the prompt part that `generate` decodes again begins.
_PROMPT_END = contextvars.ContextVar("prompt_end", default=None)


def generation_mixins(cls):
    """What a converted `cls` mixes in to generate through the DNA cache."""
    if issubclass(cls, keras_hub.models.Seq2SeqLM):
        return (GeneratesSeq2SeqWithCache,)
    if issubclass(cls, keras_hub.models.CausalLM):
        return (GeneratesWithCache,)
    return ()


class GeneratesWithCache:
    """Mixed into converted causal LMs (`keras_dna.convert.converted_class`)."""

    def generate_step(self, inputs, stop_token_ids=None):
        lengths = ops.sum(ops.cast(inputs["padding_mask"], "int32"), axis=-1)
        token = _PROMPT_END.set(ops.min(lengths) - 1)
        try:
            return super().generate_step(inputs, stop_token_ids=stop_token_ids)
        finally:
            _PROMPT_END.reset(token)

    def _build_cache(self, *args, **kwargs):
        with prefill_until(_PROMPT_END.get()):
            return super()._build_cache(*args, **kwargs)


class GeneratesSeq2SeqWithCache:
    """Mixed into converted encoder-decoder LMs (keras-hub's BART).

    keras-hub's seq2seq generation writes the cross-attention cache once and
    passes that same cache to every step. Causal DNA's cross-attention adds
    each step's query to the key state in that cache, so here each step's
    cross-attention cache goes on to the next step, and the prefill commits
    only the prompt part the steps do not decode again (as for causal LMs).
    """

    def generate_step(self, inputs, stop_token_ids=None):
        _check_decodes_like_bart(self)
        decoder_ids, decoder_mask = inputs["decoder_token_ids"], inputs["decoder_padding_mask"]
        start = ops.min(ops.sum(ops.cast(decoder_mask, "int32"), axis=-1))
        with prefill_until(start - 1):
            hidden_states, encoder_states, self_cache, cross_cache = self._build_cache(
                inputs["encoder_token_ids"], inputs["encoder_padding_mask"], decoder_ids
            )

        def next(prompt, cache, index):
            self_cache, encoder_states, encoder_mask, cross_cache = cache
            token = ops.slice(prompt, [0, index - 1], [ops.shape(prompt)[0], 1])
            logits, hidden_states, self_cache, cross_cache = self.call_decoder_with_cache(
                encoder_states, encoder_mask, token, self_cache, index - 1, cross_cache, None,
            )
            cache = (self_cache, encoder_states, encoder_mask, cross_cache)
            return ops.squeeze(logits, 1), ops.squeeze(hidden_states, 1), cache

        decoder_ids = self.sampler(
            next=next, prompt=decoder_ids,
            cache=(self_cache, encoder_states, inputs["encoder_padding_mask"], cross_cache),
            index=start, mask=decoder_mask, stop_token_ids=stop_token_ids,
            hidden_states=hidden_states, model=self,
        )
        return {
            "decoder_token_ids": decoder_ids,
            "decoder_padding_mask": _until_stop(decoder_ids, decoder_mask, stop_token_ids),
        }

    def call_decoder_with_cache(
        self,
        encoder_hidden_states,
        encoder_padding_mask,
        decoder_token_ids,
        self_attention_cache=None,
        self_attention_cache_update_index=None,
        cross_attention_cache=None,
        cross_attention_cache_update_index=None,
    ):
        """keras-hub's decoder pass with caches, returning every layer's
        caches whichever it wrote (see the class docstring)."""
        backbone = self.backbone
        tokens = backbone.token_embedding(decoder_token_ids)
        positions = backbone.decoder_position_embedding(
            tokens, start_index=self_attention_cache_update_index
        )
        x = backbone.decoder_embeddings_add((tokens, positions))
        x = backbone.decoder_embeddings_dropout(backbone.decoder_embeddings_layer_norm(x))
        self_caches, cross_caches = [], []
        for i, layer in enumerate(backbone.decoder_transformer_layers):
            x, self_cache, cross_cache = layer(
                decoder_sequence=x,
                encoder_sequence=encoder_hidden_states,
                encoder_padding_mask=encoder_padding_mask,
                self_attention_cache=self_attention_cache[:, i, ...],
                self_attention_cache_update_index=self_attention_cache_update_index,
                cross_attention_cache=cross_attention_cache[:, i, ...],
                cross_attention_cache_update_index=cross_attention_cache_update_index,
            )
            self_caches.append(self_cache)
            cross_caches.append(cross_cache)
        logits = backbone.token_embedding(x, reverse=True)
        return logits, x, ops.stack(self_caches, axis=1), ops.stack(cross_caches, axis=1)


# The parts of keras-hub's BART backbone the decoder pass above runs.
_BART_DECODER = (
    "token_embedding", "decoder_position_embedding", "decoder_embeddings_add",
    "decoder_embeddings_layer_norm", "decoder_embeddings_dropout", "decoder_transformer_layers",
)


def _check_decodes_like_bart(model):
    missing = [name for name in _BART_DECODER if not hasattr(model.backbone, name)]
    if missing:
        raise ValueError(
            f"A converted {type(model).__name__} cannot generate through the DNA "
            "cache: keras_dna decodes encoder-decoder models laid out as keras-hub's "
            f"BART, and its backbone has no {missing}. Convert it with "
            "normalization='single', or generate without a cache."
        )


def _until_stop(token_ids, prompt_mask, stop_token_ids):
    """The padding mask of generated `token_ids`: everything up to and
    including the first generated stop token of each row."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    stops = ops.zeros_like(token_ids, dtype="bool")
    for stop in stop_token_ids:
        stops = ops.logical_or(stops, ops.equal(token_ids, stop))
    stops = ops.cast(ops.logical_and(stops, ops.logical_not(prompt_mask)), "int32")
    after_stop = ops.cumsum(stops, axis=-1) - stops
    return ops.logical_not(ops.cast(after_stop, "bool"))
