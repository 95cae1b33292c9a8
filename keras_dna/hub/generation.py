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

from keras_dna.hub.attention import prefill_until

# Where the prompt part that `generate` decodes again begins.
_PROMPT_END = contextvars.ContextVar("prompt_end", default=None)


def is_causal_lm(cls):
    return issubclass(cls, keras_hub.models.CausalLM)


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
