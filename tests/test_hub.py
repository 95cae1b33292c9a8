"""keras_dna.hub: the DNA cache, keras-hub's Transformer layers with DNA,
conversion of keras-hub and custom models, generation through the cache."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_dna
from keras_dna import convert
from keras_dna.hub import CachedDoublyNormalizedAttention
from keras_dna.hub import TransformerDecoder
from keras_dna.hub import TransformerEncoder
from keras_dna.hub.cached_attention import prefill_until
from tests import oracle

B, T, DIM, HEADS, HEAD_DIM = 2, 7, 8, 2, 4


def _numpy(x, dtype=None):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype)
CAUSAL = np.tril(np.ones((T, T), bool))
OPTIONS = [
    {"normalization": "double"},
    {"normalization": "hybrid", "null_query": True},
    {"normalization": "single"},
]


def _cached_layer(options, rng, **kwargs):
    layer = CachedDoublyNormalizedAttention(
        HEADS, HEAD_DIM, causal_normalization=True, **options, **kwargs
    )
    x = rng.normal(size=(B, T, DIM)).astype("float32") * 2.0
    layer(x, x)  # build
    for weight in (layer.mixing_logits, layer.null_query_logits):
        if weight is not None:
            weight.assign(rng.normal(size=weight.shape))
    return layer, x


def _decode(layer, x, blocks, cache=None, value=None):
    """Outputs of `layer` over blocks of positions `[(start, stop), ...]`,
    self-attention (cache indexed) or, with `value`, cross-attention."""
    outputs = []
    for start, stop in blocks:
        if value is None:
            out, cache = layer(
                x[:, start:stop], x[:, start:stop], attention_mask=CAUSAL[None, start:stop],
                cache=cache, cache_update_index=start,
            )
        else:
            out, cache = layer(x[:, start:stop], value, cache=cache)
        outputs.append(_numpy(out))
    return np.concatenate(outputs, axis=1), cache


def _expected(layer, query, value, causal):
    valid = oracle.validity(B, query.shape[1], value.shape[1], causal=causal)
    out = oracle.layer_forward(layer, query, value, valid=valid, causal=True)[0]
    return out


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_prefill_then_steps_equal_the_whole_sequence(rng, options):
    layer, x = _cached_layer(options, rng)
    expected = _expected(layer, x, x, causal=True)
    whole = _numpy(layer(x, x, use_causal_mask=True))
    np.testing.assert_allclose(whole, expected, atol=1e-5)
    empty = np.zeros((B, 2, T, HEADS, HEAD_DIM), "float32")
    blocks = [(0, 4)] + [(t, t + 1) for t in range(4, T)]
    decoded, cache = _decode(layer, x, blocks, cache=empty)
    np.testing.assert_allclose(decoded, whole, atol=1e-5)
    state_columns = 0 if options["normalization"] == "single" else 1
    assert cache.shape == (B, 2, T, HEADS, HEAD_DIM + state_columns)
    # Token by token from the first position, and two uneven prefills.
    for blocks in ([(t, t + 1) for t in range(T)], [(0, 2), (2, 5), (5, 7)]):
        np.testing.assert_allclose(_decode(layer, x, blocks, cache=empty)[0], whole, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS[:2], ids=["double", "hybrid-null"])
def test_a_prefill_that_is_decoded_again_counts_once(rng, options):
    """keras-hub's `generate` prefills the whole padded sequence, then
    decodes again from the shortest prompt's last token."""
    layer, x = _cached_layer(options, rng)
    whole = _numpy(layer(x, x, use_causal_mask=True))
    empty = np.zeros((B, 2, T, HEADS, HEAD_DIM), "float32")
    with prefill_until(3):
        prefill, cache = _decode(layer, x, [(0, T)], cache=empty)
    np.testing.assert_allclose(prefill, whole, atol=1e-5)
    steps, _ = _decode(layer, x, [(t, t + 1) for t in range(3, T)], cache=cache)
    np.testing.assert_allclose(steps, whole[:, 3:], atol=1e-5)
    # Without it, the second pass counts those queries twice.
    _, doubled = _decode(layer, x, [(0, T)], cache=empty)
    again, _ = _decode(layer, x, [(t, t + 1) for t in range(3, T)], cache=doubled)
    assert np.abs(again - whole[:, 3:]).max() > 1e-3


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_cross_attention_steps_equal_causal_normalization(rng, options):
    layer, x = _cached_layer(options, rng)
    encoder = rng.normal(size=(B, 5, DIM)).astype("float32")
    expected = _expected(layer, x, encoder, causal=False)
    # The static cache: keys and values of the encoder, computed once.
    keys = _numpy(layer.key_dense(encoder))
    values = _numpy(layer.value_dense(encoder))
    cache = np.stack([keys, values], axis=1)
    decoded, cache = _decode(layer, x, [(0, 2)] + [(t, t + 1) for t in range(2, T)], cache, encoder)
    np.testing.assert_allclose(decoded, expected, atol=1e-5)
    np.testing.assert_array_equal(_numpy(cache)[..., :HEAD_DIM], np.stack([keys, values], 1))


def test_the_cache_state_is_documented_layout(rng):
    layer, x = _cached_layer({"normalization": "double"}, rng)
    empty = np.zeros((B, 2, T, HEADS, HEAD_DIM), "float32")
    _, cache = layer(x[:, :3], x[:, :3], attention_mask=CAUSAL[None, :3], cache=empty,
                     cache_update_index=0)
    cache = _numpy(cache)
    q = _numpy(layer.query_dense(x[:, :3]), np.float64)
    k = _numpy(layer.key_dense(x[:, :3]), np.float64)
    v = _numpy(layer.value_dense(x[:, :3]), np.float64)
    # Keys and values as keras-hub's, in the first head_dim columns.
    np.testing.assert_allclose(cache[:, 0, :3, :, :HEAD_DIM], k, atol=1e-6)
    np.testing.assert_allclose(cache[:, 1, :3, :, :HEAD_DIM], v, atol=1e-6)
    np.testing.assert_array_equal(cache[:, :, 3:, :, :HEAD_DIM], 0.0)
    # Keys 0..2 were seen by queries 0..2 (causally); the rest by none.
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(HEAD_DIM)
    scores = np.where(CAUSAL[:3, :3], scores, -np.inf)
    lse = np.log(np.exp(scores).sum(axis=2))  # over queries: (B, N, S)
    np.testing.assert_allclose(cache[:, 0, :3, :, HEAD_DIM], lse.transpose(0, 2, 1), atol=1e-5)
    np.testing.assert_array_equal(cache[:, 0, 3:, :, HEAD_DIM], -np.inf)
    np.testing.assert_array_equal(cache[:, 1, ..., HEAD_DIM], 0.0)


def test_cached_calls_drop_weights_only_in_training(rng):
    layer, x = _cached_layer({"normalization": "double"}, rng, dropout=0.5)
    plain, _ = _cached_layer({"normalization": "double"}, rng)
    plain.set_weights(layer.get_weights())
    empty = np.zeros((B, 2, T, HEADS, HEAD_DIM), "float32")
    call = dict(attention_mask=CAUSAL[None], cache=empty, cache_update_index=0,
                return_attention_scores=True)
    expected, expected_weights, _ = plain(x, x, **call)
    inference, weights, _ = layer(x, x, training=False, **call)
    np.testing.assert_allclose(_numpy(inference), _numpy(expected), atol=1e-6)
    dropped, dropped_weights, _ = layer(x, x, training=True, **call)
    # The weights are returned before dropout; the output saw them dropped.
    np.testing.assert_allclose(_numpy(dropped_weights), _numpy(expected_weights), atol=1e-6)
    assert np.abs(_numpy(dropped) - _numpy(expected)).max() > 1e-3


def test_cache_errors_name_what_is_wrong(rng):
    layer, x = _cached_layer({"normalization": "double"}, rng)
    cache = np.zeros((B, 2, T, HEADS, HEAD_DIM), "float32")
    with pytest.raises(ValueError, match="`cache` must have shape"):
        layer(x, x, cache=cache[..., :3], cache_update_index=0)
    with pytest.raises(ValueError, match="`cache_update_index` needs a `cache`"):
        layer(x, x, cache_update_index=0)
    with pytest.raises(ValueError, match="masks other than `attention_mask`"):
        layer(x, x, cache=cache, cache_update_index=0, query_mask=np.ones((B, T), bool))
    plain = CachedDoublyNormalizedAttention(HEADS, HEAD_DIM)
    plain(x, x)
    with pytest.raises(ValueError, match="causal normalization"):
        plain(x, x, cache=cache, cache_update_index=0)
    single = CachedDoublyNormalizedAttention(HEADS, HEAD_DIM, normalization="single")
    for shape in ((B, 3, T, HEADS, HEAD_DIM), (B, 2, T, HEADS, HEAD_DIM + 1)):
        with pytest.raises(ValueError, match=f"B, 2, S, {HEADS}, {HEAD_DIM}\\)"):
            single(x, x, cache=np.zeros(shape, "float32"), cache_update_index=0)
    with pytest.raises(ValueError, match=f"{HEAD_DIM} or {HEAD_DIM + 1}"):
        layer(x, x, cache=np.zeros((B, 2, T, HEADS, HEAD_DIM + 2), "float32"), cache_update_index=0)


def test_caches_are_checked_like_keras_hub_checks_them(rng):
    layer, x = _cached_layer({"normalization": "double"}, rng)
    step = x[:, :1]
    cache = np.zeros((B, 2, T, HEADS, HEAD_DIM), "float32")
    with pytest.raises(TypeError, match="`cache` must hold floats.*int32"):
        layer(step, step, cache=cache.astype("int32"), cache_update_index=0)
    with pytest.raises(ValueError, match="batch size"):
        layer(step, step, cache=cache[:1], cache_update_index=0)
    for index in (T, keras.ops.convert_to_tensor(T, "int32"), -1):
        with pytest.raises(ValueError, match=f"`cache_update_index`.*from 0 to {T - 1}"):
            layer(step, step, cache=cache, cache_update_index=index)
    with pytest.raises(ValueError, match=f"from 0 to {T - 3}"):
        layer(x[:, :3], x[:, :3], cache=cache, cache_update_index=T - 2)
    output, _ = layer(step, step, cache=cache, cache_update_index=T - 1)
    assert np.all(np.isfinite(_numpy(output)))


def _hub_pair(cls, ours, rng, **kwargs):
    keras.utils.set_random_seed(3)
    theirs = cls(intermediate_dim=16, num_heads=HEADS)
    mine = ours(intermediate_dim=16, num_heads=HEADS, **kwargs)
    return theirs, mine


def test_encoder_single_is_keras_hub_and_double_differs(rng):
    x = rng.normal(size=(B, T, DIM)).astype("float32") * 3
    padding = np.ones((B, T), bool)
    padding[1, 5:] = False
    theirs = keras_hub.layers.TransformerEncoder(16, HEADS)
    expected = _numpy(theirs(x, padding_mask=padding))
    for normalization, same in (("single", True), ("double", False)):
        mine = TransformerEncoder(16, HEADS, attention_options={"normalization": normalization})
        mine(x)
        mine.set_weights(theirs.get_weights())
        got = _numpy(mine(x, padding_mask=padding))
        assert isinstance(mine._self_attention_layer, keras_dna.DoublyNormalizedAttention)
        assert np.allclose(got, expected, atol=1e-5) == same
        clone = TransformerEncoder.from_config(mine.get_config())
        clone(x)
        clone.set_weights(mine.get_weights())
        np.testing.assert_allclose(_numpy(clone(x, padding_mask=padding)), got, atol=1e-6)


def test_decoder_normalizes_causally_where_it_builds_the_causal_mask(rng):
    x = rng.normal(size=(B, T, DIM)).astype("float32") * 3
    encoder = rng.normal(size=(B, 5, DIM)).astype("float32")
    decoder = TransformerDecoder(16, HEADS)
    decoder(x, encoder)
    assert decoder._cross_attention_layer.causal_normalization
    assert not decoder._self_attention_layer.causal_normalization
    out = _numpy(decoder(x, encoder))
    changed = x.copy()
    changed[:, 4:] = rng.normal(size=changed[:, 4:].shape)
    # With the causal mask keras-hub builds, no output sees a later token.
    np.testing.assert_allclose(_numpy(decoder(changed, encoder))[:, :4], out[:, :4], atol=1e-5)
    # Without it the layer is bidirectional, and normalizes so.
    both_ways = _numpy(decoder(x, encoder, use_causal_mask=False))
    assert np.abs(both_ways - out).max() > 1e-3
    theirs = keras_hub.layers.TransformerDecoder(16, HEADS)
    theirs(x, encoder)
    single = TransformerDecoder(
        16, HEADS, self_attention_options={"normalization": "single"},
        cross_attention_options={"normalization": "single"},
    )
    single(x, encoder)
    single.set_weights(theirs.get_weights())
    np.testing.assert_allclose(
        _numpy(single(x, encoder)), _numpy(theirs(x, encoder)), atol=1e-5
    )


def test_decoder_decodes_with_the_cache(rng):
    x = rng.normal(size=(B, T, DIM)).astype("float32")
    decoder = TransformerDecoder(16, HEADS, self_attention_options={"null_query": True})
    whole = _numpy(decoder(x))
    cache = np.zeros((B, 2, T, HEADS, DIM // HEADS), "float32")
    outputs = []
    for start, stop in [(0, 3)] + [(t, t + 1) for t in range(3, T)]:
        out, cache = decoder(
            x[:, start:stop], self_attention_cache=cache,
            self_attention_cache_update_index=start,
        )
        outputs.append(_numpy(out))
    np.testing.assert_allclose(np.concatenate(outputs, 1), whole, atol=1e-5)


class _Block(keras.layers.Layer):
    """A custom layer that builds its own MultiHeadAttention."""

    def __init__(self, heads=2, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads

    def build(self, shape):
        self.attention = keras.layers.MultiHeadAttention(self.heads, 4, name="inside")
        self.attention.build(shape, shape)

    def call(self, x):
        return x + self.attention(x, x)

    def get_config(self):
        return {**super().get_config(), "heads": self.heads}


keras.saving.register_keras_serializable("tests")(_Block)


def _nested_model():
    keras.utils.set_random_seed(5)
    inner_input = keras.Input((T, DIM))
    attended = keras.layers.MultiHeadAttention(2, 4, name="nested")(inner_input, inner_input)
    inner = keras.Model(inner_input, attended, name="inner")
    inputs = keras.Input((T, DIM))
    return keras.Model(inputs, inner(_Block(name="block")(inputs)))


def test_convert_reaches_nested_models_and_custom_layers(rng, tmp_path):
    model = _nested_model()
    x = rng.normal(size=(B, T, DIM)).astype("float32") * 3
    expected = _numpy(model(x))
    for normalization in ("single", "double"):
        converted = convert.to_doubly_normalized(model, normalization=normalization)
        block = converted.get_layer("block")
        layers = [block.attention, converted.get_layer("inner").get_layer("nested")]
        assert all(type(layer) is keras_dna.DoublyNormalizedAttention for layer in layers)
        assert all(layer.normalization == normalization for layer in layers)
        assert isinstance(block, _Block) and type(block).__name__ == "DoublyNormalized_Block"
        assert block.attention.query_dense.kernel is not model.get_layer("block").attention.query_dense.kernel
        got = _numpy(converted(x))
        assert np.allclose(got, expected, atol=1e-5) == (normalization == "single")
        path = str(tmp_path / f"{normalization}.keras")
        converted.save(path)
        loaded = keras.saving.load_model(path)
        assert loaded.get_layer("block").attention.normalization == normalization
        np.testing.assert_allclose(_numpy(loaded(x)), got, atol=1e-6)
    # The original is untouched.
    assert type(model.get_layer("block").attention) is keras.layers.MultiHeadAttention


def test_convert_refuses_attention_it_cannot_convert():
    class LocalAttention(keras.layers.MultiHeadAttention):
        def _compute_attention(self, query, key, value, *args, **kwargs):
            return value, None

    inputs = keras.Input((T, DIM))
    model = keras.Model(inputs, LocalAttention(2, 4, name="mine")(inputs, inputs))
    with pytest.raises(ValueError, match="'mine'.*cannot convert"):
        convert.to_doubly_normalized(model)
    without_attention = keras.Model(inputs, keras.layers.Dense(DIM)(inputs))
    with pytest.raises(ValueError, match="holds no MultiHeadAttention"):
        convert.to_doubly_normalized(without_attention)


# keras-hub models from small configs, as keras-hub's own tests make them.
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


@pytest.fixture(scope="module")
def gpt2():
    vocabulary, merges = {"<|endoftext|>": 0, "Ġ": 1}, []
    for word in WORDS:
        pieces = ["Ġ"] + list(word)
        merged = pieces[0]
        for piece in pieces:
            vocabulary.setdefault(piece, len(vocabulary))
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocabulary.setdefault(merged, len(vocabulary))
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=12)
    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=2,
        hidden_dim=8, intermediate_dim=16, max_sequence_length=12,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    prompts = {
        key: _numpy(value)
        for key, value in preprocessor.generate_preprocess([" the cat", " a dog ran on"]).items()
    }
    return model, prompts


def _greedy_without_cache(model, prompts):
    """Greedy decoding that runs the whole sequence again for every token."""
    ids, mask = prompts["token_ids"].copy(), prompts["padding_mask"].copy()
    for t in range(mask.sum(-1).min(), ids.shape[1]):
        logits = _numpy(model({"token_ids": ids, "padding_mask": mask}))
        ids[:, t] = np.where(mask[:, t], ids[:, t], logits[:, t - 1].argmax(-1))
        mask[:, t] = True
    return ids


@pytest.fixture(scope="module")
def gpt2_dna(gpt2):
    model, _ = gpt2
    return convert.to_doubly_normalized(model)


def test_converted_gpt2_keeps_its_class_and_weights(gpt2, gpt2_dna, tmp_path):
    model, prompts = gpt2
    assert isinstance(gpt2_dna, keras_hub.models.GPT2CausalLM)
    assert isinstance(gpt2_dna.backbone, keras_hub.models.GPT2Backbone)
    attention = [layer._self_attention_layer for layer in gpt2_dna.backbone.transformer_layers]
    assert all(isinstance(layer, CachedDoublyNormalizedAttention) for layer in attention)
    for old, new in zip(model.get_weights(), gpt2_dna.get_weights()):
        np.testing.assert_array_equal(old, new)
    single = convert.to_doubly_normalized(model, normalization="single")
    np.testing.assert_allclose(
        _numpy(single.backbone(prompts)), _numpy(model.backbone(prompts)), atol=1e-5
    )
    assert np.abs(_numpy(gpt2_dna.backbone(prompts)) - _numpy(model.backbone(prompts))).max() > 1e-3
    path = str(tmp_path / "gpt2.keras")
    gpt2_dna.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(gpt2_dna)
    np.testing.assert_allclose(_numpy(loaded(prompts)), _numpy(gpt2_dna(prompts)), atol=1e-6)


def test_converted_gpt2_generates_through_the_cache(gpt2, gpt2_dna):
    _, prompts = gpt2
    gpt2_dna.preprocessor, preprocessor = None, gpt2_dna.preprocessor
    try:
        gpt2_dna.compile(sampler="greedy")
        greedy = _numpy(gpt2_dna.generate(prompts, stop_token_ids=None)["token_ids"])
        np.testing.assert_array_equal(greedy, _greedy_without_cache(gpt2_dna, prompts))
        for sampler in (keras_hub.samplers.TopKSampler(k=3, seed=0), keras_hub.samplers.BeamSampler(num_beams=2)):
            gpt2_dna.compile(sampler=sampler)
            out = gpt2_dna.generate(prompts, stop_token_ids=None)
            ids = _numpy(out["token_ids"])
            assert ids.shape == prompts["token_ids"].shape
            np.testing.assert_array_equal(ids[prompts["padding_mask"]], prompts["token_ids"][prompts["padding_mask"]])
            assert _numpy(out["padding_mask"]).all()
    finally:
        gpt2_dna.preprocessor = preprocessor
    gpt2_dna.compile(sampler="greedy")
    assert isinstance(gpt2_dna.generate(" the cat"), str)


def test_converted_bert_classifier(rng):
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    keras.utils.set_random_seed(2)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=preprocessor)
    # BERT's initial kernels (stddev 0.02) make every attention row uniform,
    # where the normalizations agree; peaked scores tell them apart.
    for layer in backbone.transformer_layers:
        for dense in (layer._self_attention_layer.query_dense, layer._self_attention_layer.key_dense):
            dense.kernel.assign(dense.kernel * 100.0)
    data = preprocessor(["the cat sat on the mat", "a dog ran"])
    expected = _numpy(model(data))
    single = convert.to_doubly_normalized(model, normalization="single")
    double = convert.to_doubly_normalized(model)
    assert isinstance(double, keras_hub.models.BertTextClassifier)
    assert all(
        isinstance(layer._self_attention_layer, keras_dna.DoublyNormalizedAttention)
        for layer in double.backbone.transformer_layers
    )
    np.testing.assert_allclose(_numpy(single(data)), expected, atol=1e-6)
    sequence = {
        name: _numpy(classifier.backbone(data)["sequence_output"])
        for name, classifier in (("mha", model), ("single", single), ("double", double))
    }
    np.testing.assert_allclose(sequence["single"], sequence["mha"], atol=1e-5)
    assert np.abs(sequence["double"] - sequence["mha"]).max() > 1e-3
