"""keras-hub models with DNA that stay correct: padding, conversion of
converted models, seq2seq generation, and what conversion takes.

TensorFlow only, like the conversion tests of `tests/test_hub.py`.
"""

import keras
import keras_hub
import numpy as np
import pytest

import keras_dna
from keras_dna import convert
from keras_dna.hub import TransformerDecoder
from keras_dna.hub import TransformerEncoder
from keras_dna.hub.cached_attention import prefill_until
from tests import oracle

DIM, HEADS = 8, 2
VALID = 5  # valid tokens of every sequence below


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _padded(x, length, rng):
    """`x[:, :VALID]` padded with noise to `length`, and its padding mask."""
    batch = x.shape[0]
    padded = rng.normal(size=(batch, length) + x.shape[2:]).astype(x.dtype)
    padded[:, :VALID] = x[:, :VALID]
    return padded, np.arange(length)[None, :].repeat(batch, 0) < VALID


def _peaked(attention_layers, factor=30.0):
    """Scales query and key kernels: keras-hub's small initial kernels make
    every attention row nearly uniform, where padding barely shows."""
    for layer in attention_layers:
        for dense in (layer.query_dense, layer.key_dense):
            dense.kernel.assign(dense.kernel * factor)


# Padding invariance (docs/math.md, property 4): the valid outputs do not change
# with the length or the content of the padding.

@pytest.mark.parametrize("normalization", ["double", "hybrid"])
def test_encoder_outputs_ignore_padding(rng, normalization):
    keras.utils.set_random_seed(0)
    encoder = TransformerEncoder(16, HEADS, attention_options={"normalization": normalization})
    x = rng.normal(size=(2, 16, DIM)).astype("float32")
    encoder(x)
    _peaked([encoder._self_attention_layer])
    outputs = {}
    for length in (8, 16):
        padded, padding = _padded(x, length, rng)
        outputs[length], weights = encoder(padded, padding_mask=padding, return_attention_scores=True)
        # The weights against the oracle (the attention reads the input as
        # it is: keras-hub normalizes after the attention by default).
        attention = encoder._self_attention_layer
        valid = oracle.validity(2, length, length, padding, padding)
        expected = oracle.layer_forward(attention, padded, padded, valid=valid)[1]
        np.testing.assert_allclose(_numpy(weights), expected, atol=2e-5)
    np.testing.assert_allclose(
        _numpy(outputs[8])[:, :VALID], _numpy(outputs[16])[:, :VALID], atol=1e-5
    )


def test_decoder_outputs_ignore_padding_in_self_and_cross_attention(rng):
    keras.utils.set_random_seed(0)
    decoder = TransformerDecoder(16, HEADS)
    x = rng.normal(size=(2, 16, DIM)).astype("float32")
    memory = rng.normal(size=(2, 16, DIM)).astype("float32")
    decoder(x, memory)
    _peaked([decoder._self_attention_layer, decoder._cross_attention_layer])
    outputs = {}
    for length in (8, 16):
        for use_causal_mask in (True, False):
            padded, padding = _padded(x, length, rng)
            padded_memory, memory_padding = _padded(memory, length + 1, rng)
            outputs[length, use_causal_mask] = _numpy(decoder(
                padded, padded_memory, decoder_padding_mask=padding,
                encoder_padding_mask=memory_padding, use_causal_mask=use_causal_mask,
            ))[:, :VALID]
    for use_causal_mask in (True, False):
        np.testing.assert_allclose(
            outputs[8, use_causal_mask], outputs[16, use_causal_mask], atol=1e-5
        )


WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


@pytest.fixture(scope="module")
def bert_classifier():
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    keras.utils.set_random_seed(2)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=HEADS, hidden_dim=DIM,
        intermediate_dim=16, max_sequence_length=16,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)
    _peaked(layer._self_attention_layer for layer in backbone.transformer_layers)
    return model


def _bert_inputs(length, rng):
    ids = rng.integers(5, 13, size=(2, length)).astype("int32")
    ids[:, 0] = 2
    padding = np.arange(length)[None, :].repeat(2, 0) < VALID
    return {
        "token_ids": np.where(padding, ids, 0).astype("int32"),
        "segment_ids": np.zeros((2, length), "int32"),
        "padding_mask": padding,
    }


@pytest.mark.parametrize("normalization", ["double", "hybrid"])
def test_converted_bert_ignores_padding(bert_classifier, rng, normalization):
    converted = convert.to_doubly_normalized(bert_classifier, normalization=normalization)
    short = _bert_inputs(8, np.random.default_rng(0))
    long = _bert_inputs(16, np.random.default_rng(1))
    long["token_ids"][:, :VALID] = short["token_ids"][:, :VALID]
    np.testing.assert_allclose(_numpy(converted(short)), _numpy(converted(long)), atol=1e-5)
    sequences = [_numpy(converted.backbone(x)["sequence_output"])[:, :VALID] for x in (short, long)]
    np.testing.assert_allclose(*sequences, atol=1e-5)
    # DNA changes the outputs: the test is not comparing softmax with itself.
    original = _numpy(bert_classifier.backbone(short)["sequence_output"])[:, :VALID]
    assert np.abs(original - sequences[0]).max() > 1e-3


def test_converting_keras_hub_models_warns_nothing_and_keeps_their_compile(
    bert_classifier, recwarn
):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50, num_layers=1, num_heads=HEADS, hidden_dim=DIM, intermediate_dim=16,
        max_sequence_length=16,
    )
    causal_lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["mixing_logits"])
    causal_lm.compile(optimizer=optimizer, sampler="greedy")
    converted = [
        convert.to_doubly_normalized(model, normalization="hybrid")
        for model in (backbone, causal_lm, bert_classifier)
    ]
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)]
    converted_lm = converted[1]
    assert converted_lm.optimizer.get_config() == optimizer.get_config()
    assert isinstance(converted_lm.sampler, keras_hub.samplers.GreedySampler)
    mixing_logits = converted_lm.backbone.transformer_layers[0]._self_attention_layer.mixing_logits
    assert not converted_lm.optimizer._use_weight_decay(mixing_logits)


@pytest.fixture(scope="module")
def gpt2_backbone():
    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=20, num_layers=2, num_heads=HEADS, hidden_dim=DIM, intermediate_dim=16,
        max_sequence_length=16,
    )
    _peaked(layer._self_attention_layer for layer in backbone.transformer_layers)
    return convert.to_doubly_normalized(backbone)


def test_converted_gpt2_ignores_right_padding(gpt2_backbone, rng):
    ids = rng.integers(1, 20, size=(2, 16)).astype("int32")
    outputs = []
    for length in (8, 16):
        padding = np.arange(length)[None, :].repeat(2, 0) < VALID
        noise = rng.integers(1, 20, size=(2, length)).astype("int32")
        inputs = {"token_ids": np.where(padding, ids[:, :length], noise), "padding_mask": padding}
        outputs.append(_numpy(gpt2_backbone(inputs))[:, :VALID])
    np.testing.assert_allclose(*outputs, atol=1e-5)


def test_converted_gpt2_ignores_left_padding_content(gpt2_backbone, rng):
    """Left padding moves the positions, so only its content may change."""
    ids = rng.integers(1, 20, size=(2, 12)).astype("int32")
    padding = np.arange(12)[None, :].repeat(2, 0) >= 12 - VALID
    outputs = []
    for seed in (0, 1):
        noise = np.random.default_rng(seed).integers(1, 20, size=(2, 12)).astype("int32")
        inputs = {"token_ids": np.where(padding, ids, noise), "padding_mask": padding}
        outputs.append(_numpy(gpt2_backbone(inputs))[:, -VALID:])
    np.testing.assert_allclose(*outputs, atol=1e-5)


# Converting converted models.

class _Holder(keras.layers.Layer):
    """Holds a MultiHeadAttention; a name that ends in "Attention" too."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(HEADS, 4)

    def call(self, x):
        return self.attention(x, x)


class SelfAttention(_Holder):
    pass


def _models():
    x = keras.Input((None, DIM))
    mha = keras.layers.MultiHeadAttention(HEADS, 4)
    yield "functional", keras.Model(x, mha(x, x))
    yield "custom layer", keras.Model(x, SelfAttention()(x))
    yield "keras-hub layer", keras.Model(x, keras_hub.layers.TransformerEncoder(16, HEADS)(x))


# Weights each options need: 8 of MultiHeadAttention, one per-head vector
# each for the hybrid mix and the null query.
OPTIONS = [
    ({"normalization": "hybrid", "null_query": True}, 10),
    ({"normalization": "double", "null_query": False}, 8),
    ({"normalization": "hybrid", "null_query": False}, 9),
    ({"normalization": "double", "null_query": True}, 9),
    ({"normalization": "single", "null_query": False}, 8),
]


@pytest.mark.parametrize("name, model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_converting_converted_models(name, model, rng, tmp_path):
    x = rng.normal(size=(2, 5, DIM)).astype("float32")
    extra = len(model.weights) - 8  # the keras-hub layer's own weights
    for options, count in OPTIONS:
        converted = convert.to_doubly_normalized(model, **options)
        assert len(converted.weights) == count + extra, options
        attention = [
            layer for layer in converted._flatten_layers()
            if isinstance(layer, keras_dna.DoublyNormalizedAttention)
        ]
        assert [(a.normalization, a.null_query_logits is not None) for a in attention] == [
            (options["normalization"], options["null_query"])
        ]
        converted.save(tmp_path / "model.keras")
        loaded = keras.models.load_model(tmp_path / "model.keras")
        np.testing.assert_allclose(_numpy(loaded(x)), _numpy(converted(x)), atol=1e-6)
        clone = keras.models.clone_model(converted)
        clone.set_weights(converted.get_weights())
        np.testing.assert_allclose(_numpy(clone(x)), _numpy(converted(x)), atol=1e-6)
        model = converted  # the next options convert this converted model


def test_converting_keeps_what_it_is_not_told_to_change(tmp_path):
    x = keras.Input((None, DIM))
    encoder = TransformerEncoder(16, HEADS, attention_options={"null_query": True})
    converted = convert.to_doubly_normalized(keras.Model(x, encoder(x)), normalization="hybrid")
    layer = [l for l in converted.layers if isinstance(l, TransformerEncoder)][0]
    live = convert.attention_options_of(layer._self_attention_layer)
    assert live["null_query"] and live["normalization"] == "hybrid"
    assert layer.get_config()["attention_options"] == live
    converted.save(tmp_path / "model.keras")
    keras.models.load_model(tmp_path / "model.keras")


def test_conversion_decides_by_structure_not_by_name():
    assert convert.converted_class(_Holder)(name="holder").attention.normalization == "double"
    x = keras.Input((None, DIM))
    model = keras.Model(x, SelfAttention(name="self_attention")(x))
    converted = convert.to_doubly_normalized(model)
    assert isinstance(converted.layers[-1].attention, keras_dna.DoublyNormalizedAttention)
    for layer in (keras.layers.Attention(), keras.layers.AdditiveAttention()):
        with pytest.raises(ValueError, match="cannot convert"):
            convert.to_doubly_normalized(keras.Model(x, layer([x, x])))


# Seq2seq generation.

@pytest.fixture(scope="module")
def bart():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=20, num_layers=2, num_heads=HEADS, hidden_dim=DIM, intermediate_dim=16,
        max_sequence_length=12, dropout=0.0,
    )
    model = keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None)
    _peaked(
        attention
        for layer in backbone.encoder_transformer_layers + backbone.decoder_transformer_layers
        for attention in (layer._self_attention_layer, getattr(layer, "_cross_attention_layer", None))
        if attention is not None
    )
    rng = np.random.default_rng(0)
    encoder_padding = np.arange(7)[None, :] < np.array([[7], [4]])
    decoder_padding = np.arange(9)[None, :] < np.array([[3], [2]])
    inputs = {
        "encoder_token_ids": rng.integers(3, 20, size=(2, 7)).astype("int32"),
        "encoder_padding_mask": encoder_padding,
        "decoder_token_ids": np.where(decoder_padding, rng.integers(3, 20, size=(2, 9)), 1).astype("int32"),
        "decoder_padding_mask": decoder_padding,
    }
    return convert.to_doubly_normalized(model), inputs


def _greedy_without_cache(model, inputs):
    ids, mask = inputs["decoder_token_ids"].copy(), inputs["decoder_padding_mask"].copy()
    for t in range(mask.sum(-1).min(), ids.shape[1]):
        logits = _numpy(model({**inputs, "decoder_token_ids": ids, "decoder_padding_mask": mask}))
        ids[:, t] = np.where(mask[:, t], ids[:, t], logits[:, t - 1].argmax(-1))
        mask[:, t] = True
    return ids


def test_converted_bart_decodes_through_both_caches(bart):
    """A prompt through the caches, then one token per step, gives the
    logits of one call over the whole sequence: the cross-attention's key
    state grows step by step."""
    model, inputs = bart
    ids, encoder_padding = inputs["decoder_token_ids"], inputs["encoder_padding_mask"]
    whole = _numpy(model({**inputs, "decoder_padding_mask": np.ones_like(ids, bool)}))
    encoded = model.call_encoder(inputs["encoder_token_ids"], encoder_padding)
    self_cache, cross_cache = model._initialize_cache(inputs["encoder_token_ids"], ids)
    with prefill_until(3):
        logits, _, self_cache, cross_cache = model.call_decoder_with_cache(
            encoded, encoder_padding, ids[:, :3], self_cache, 0, cross_cache, 0
        )
    steps = [_numpy(logits)]
    for t in range(3, ids.shape[1]):
        logits, _, self_cache, cross_cache = model.call_decoder_with_cache(
            encoded, encoder_padding, ids[:, t:t + 1], self_cache, t, cross_cache, None
        )
        steps.append(_numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole, atol=1e-5)


def test_converted_bart_generates_with_keras_hub_samplers(bart):
    model, inputs = bart
    model.compile(sampler="greedy")
    greedy = _numpy(model.generate(inputs, stop_token_ids=None)["decoder_token_ids"])
    np.testing.assert_array_equal(greedy, _greedy_without_cache(model, inputs))
    prompt = inputs["decoder_padding_mask"]
    # Beam search reorders the caches between steps, both of them.
    for sampler in (keras_hub.samplers.BeamSampler(num_beams=2),):
        model.compile(sampler=sampler)
        out = model.generate(inputs, stop_token_ids=[2])
        ids = _numpy(out["decoder_token_ids"])
        np.testing.assert_array_equal(ids[prompt], inputs["decoder_token_ids"][prompt])
        mask = _numpy(out["decoder_padding_mask"])
        # Everything up to the first generated stop token is kept.
        for row, row_mask, row_prompt in zip(ids, mask, prompt):
            stops = np.flatnonzero((row == 2) & ~row_prompt)
            end = stops[0] + 1 if stops.size else len(row)
            assert row_mask[:end].all() and not row_mask[end:].any()
