"""keras-hub's decoder families converted to DNA (keras_dna.hub.decoders).

Tiny configurations of each family (no presets, nothing downloaded): with
`normalization="single"` the converted backbone computes keras-hub's own
outputs; with DNA it is exactly causal (a later token changes no earlier
output, to the bit), right padding changes no real token's output, the
fused kernels are never called, the weights it computes equal the
float64 oracle, and a prompt through keras-hub's cache then one token per
step gives the whole sequence's logits. Backend-neutral: PyTorch runs every
family; TensorFlow and JAX, whose eager calls take several times as long,
run Llama and Gemma 2 (the two head layouts) and generate with Llama.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_dna.hub  # noqa: F401 - registers the conversions
from keras_dna import analysis
from keras_dna import convert
from keras_dna.hub import DoublyNormalizedSoftmax
from keras_dna.hub.cached_attention import prefill_until
from tests import oracle

keras_hub = pytest.importorskip("keras_hub")

TINY = dict(vocabulary_size=24, num_layers=2, num_query_heads=4, num_key_value_heads=2,
            hidden_dim=16, intermediate_dim=32)
FAMILIES = {
    "llama": lambda: keras_hub.models.LlamaBackbone(**TINY),
    "llama3": lambda: keras_hub.models.Llama3Backbone(**TINY),
    "mistral": lambda: keras_hub.models.MistralBackbone(**TINY, sliding_window=3),
    # Gemma 2's configuration: soft caps, sliding windows, post norms.
    "gemma2": lambda: keras_hub.models.GemmaBackbone(
        **TINY, head_dim=4, attention_logit_soft_cap=5.0, final_logit_soft_cap=30.0,
        use_sliding_window_attention=True, sliding_window_size=3, use_post_ffw_norm=True,
        use_post_attention_norm=True, query_head_dim_normalize=False,
    ),
    "gemma3": lambda: keras_hub.models.Gemma3Backbone(
        **TINY, head_dim=4, image_size=16, sliding_window_size=3,
        use_query_key_norm=True,
    ),
    "qwen": lambda: keras_hub.models.QwenBackbone(**TINY),
    "qwen3": lambda: keras_hub.models.Qwen3Backbone(**TINY, head_dim=4),
    "phi3": lambda: keras_hub.models.Phi3Backbone(**TINY),
    "mixtral": lambda: keras_hub.models.MixtralBackbone(**TINY, num_experts=2, top_k=1),
    "qwen_moe": lambda: keras_hub.models.QwenMoeBackbone(
        **TINY, moe_intermediate_dim=8, shared_expert_intermediate_dim=16, num_experts=2,
        top_k=1,
    ),
    "qwen3_moe": lambda: keras_hub.models.Qwen3MoeBackbone(
        **TINY, moe_intermediate_dim=8, num_experts=2, top_k=1, head_dim=4,
    ),
}
TASKS = {
    "llama": "LlamaCausalLM", "llama3": "Llama3CausalLM", "mistral": "MistralCausalLM",
    "gemma2": "GemmaCausalLM", "gemma3": "Gemma3CausalLM", "qwen": "QwenCausalLM",
    "qwen3": "Qwen3CausalLM", "phi3": "Phi3CausalLM", "mixtral": "MixtralCausalLM",
    "qwen_moe": "QwenMoeCausalLM", "qwen3_moe": "Qwen3MoeCausalLM",
}
ON_EVERY_FAMILY = keras.backend.backend() == "torch"
FAMILY_NAMES = list(FAMILIES) if ON_EVERY_FAMILY else ["llama", "gemma2"]
GENERATING = ["llama", "gemma2"] if ON_EVERY_FAMILY else ["llama"]
TOKENS = np.array([[3, 5, 7, 2, 9, 4, 6], [1, 2, 3, 4, 5, 0, 0]])
PADDING = np.array([[1] * 7, [1] * 5 + [0] * 2])


def _inputs(tokens=TOKENS, padding=PADDING):
    return {"token_ids": tokens, "padding_mask": padding}


def _run(model, inputs):
    return ops.convert_to_numpy(ops.cast(model(inputs), "float32"))


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    keras.utils.set_random_seed(0)
    backbone = FAMILIES[request.param]()
    backbone(_inputs())
    return request.param, backbone, convert.to_doubly_normalized(backbone, null_query=True)


def test_single_normalization_computes_keras_hubs_outputs(family):
    _, backbone, _ = family
    single = convert.to_doubly_normalized(backbone, normalization="single")
    real = PADDING > 0
    np.testing.assert_allclose(
        _run(single, _inputs())[real], _run(backbone, _inputs())[real], rtol=1e-4, atol=1e-5
    )


def test_double_normalization_is_exactly_causal_and_takes_no_fused_kernel(family, kernel_calls):
    name, backbone, dna = family
    first = _run(dna, _inputs())
    assert not kernel_calls, name
    later = TOKENS.copy()
    later[:, 4:] = [[11, 12, 13], [14, 15, 16]]
    second = _run(dna, _inputs(later, np.ones_like(PADDING)))
    np.testing.assert_array_equal(first[:, :4], second[:, :4])
    assert np.abs(first - _run(backbone, _inputs()))[PADDING > 0].max() > 1e-3


def test_right_padding_changes_no_real_token(family):
    _, _, dna = family
    padded = _run(dna, _inputs())[1, :5]
    alone = _run(dna, _inputs(TOKENS[1:, :5], PADDING[1:, :5]))[0]
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-5)


def test_what_padding_holds_changes_no_real_token_left_or_right(family):
    """Other token ids in the padded positions, at the start (left padding)
    or the end: the real tokens' outputs stay, to the bit."""
    _, _, dna = family
    padding = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    other = TOKENS.copy()
    other[padding == 0] = 17
    first, second = (_run(dna, _inputs(tokens, padding)) for tokens in (TOKENS, other))
    np.testing.assert_array_equal(first[padding > 0], second[padding > 0])


def test_analysis_records_each_layers_weights_converted_or_not(family):
    """keras_dna.analysis reads keras-hub's attention (through its softmax,
    off the fused kernel) and the converted one: per layer, weights over
    the causal and padding mask, softmax's equal to the "single"
    conversion's, DNA's never below its column-sum bound."""
    name, backbone, _ = family
    reports = {
        kind: analysis.collect_attention(model, _inputs())
        for kind, model in (
            ("keras-hub", backbone),
            ("single", convert.to_doubly_normalized(backbone, normalization="single")),
            ("double", convert.to_doubly_normalized(backbone)),
        )
    }
    causal = np.tril(np.ones((7, 7), bool)) & (PADDING[:, None, :] > 0)
    real_diagonal = np.eye(7, dtype=bool) & (PADDING[:, :, None] > 0)
    for kind, report in reports.items():
        assert [layer.normalization for layer in report] == [kind.replace("keras-hub", "single")] * 2
        for layer in report:
            assert layer.weights.shape == (2, 4, 7, 7), name
            # Causal and padded; sliding windows (Mistral, Gemma) drop more.
            assert not (layer.valid & ~causal).any() and layer.valid[real_diagonal].all()
            np.testing.assert_allclose(layer.weights.sum(-1), 1.0, atol=1e-5)
            assert not layer.weights[np.broadcast_to(~layer.valid[:, None], (2, 4, 7, 7))].any()
    for hub, single, double in zip(*reports.values()):
        np.testing.assert_array_equal(single.valid, hub.valid)
        np.testing.assert_array_equal(double.valid, hub.valid)
        np.testing.assert_allclose(single.weights, hub.weights, atol=1e-5)
    assert analysis.explaining_away_statistics(reports["double"])["share_below_bound"] == 0.0


@pytest.mark.parametrize("jit_compile", ["auto", False])
@pytest.mark.parametrize("layout", [(2, 4), (2, 2, 2)], ids=["heads", "groups"])
def test_the_softmax_equals_the_oracle_in_both_head_layouts(rng, layout, jit_compile):
    batch, *heads = layout
    length = 6
    scores = rng.normal(size=(batch, *heads, length, length)).astype("float32")
    padding = np.ones((batch, length), bool)
    padding[1, :2] = False  # left padding: keys masked
    mask = np.tril(np.ones((length, length), bool)) & padding[:, None, :]
    softmax = DoublyNormalizedSoftmax(
        4, normalization="hybrid", null_query=True, jit_compile=jit_compile
    )
    assert DoublyNormalizedSoftmax.from_config(softmax.get_config()).jit_compile == jit_compile
    for logits in (softmax.mixing_logits, softmax.null_query_logits):
        logits.assign(rng.normal(size=4))
    mask_shape = (batch,) + (1,) * len(heads) + (length, length)
    got = ops.convert_to_numpy(softmax(scores, mask.reshape(mask_shape)))
    flat = scores.reshape(batch, 4, length, length)
    expected = oracle.attention_weights(
        flat, mask[:, None], "hybrid", causal=True,
        mixing_logits=ops.convert_to_numpy(softmax.mixing_logits.value),
        null_query_logits=ops.convert_to_numpy(softmax.null_query_logits.value),
    ).reshape(scores.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cached_prefill_and_steps_give_the_whole_sequences_logits(family):
    """keras-hub's own cached calls on the converted backbone: a prompt of 3
    committed tokens, then one token per step, each step's logits equal to
    the whole sequence's; each cached key head carries one state column per
    query head that reads it (2 here)."""
    name, _, dna = family
    task = getattr(keras_hub.models, TASKS[name])
    causal_lm = task(backbone=dna, preprocessor=None)
    tokens = np.concatenate([TOKENS, [[8], [9]]], axis=1)
    whole = _run(causal_lm, _inputs(tokens, np.ones_like(tokens)))
    # Gemma 3's cache also takes images, their mask and positions.
    images = (None, None, np.ones_like(tokens, bool), None) if name == "gemma3" else ()
    with prefill_until(3):
        _, cache = task._build_cache(causal_lm, tokens, *images)
    steps = []
    for index in range(3, tokens.shape[1]):
        logits, _, cache = causal_lm.call_with_cache(tokens[:, index:index + 1], cache, index)
        steps.append(ops.convert_to_numpy(ops.cast(logits[:, 0], "float32")))
    np.testing.assert_allclose(np.stack(steps, 1), whole[:, 3:], rtol=1e-5, atol=1e-6)
    keys = cache[0][0] if isinstance(cache, tuple) else cache[:, 0, 0]
    assert tuple(keys.shape) == (2, tokens.shape[1], 2, 4 + 2), name


def test_a_cache_passed_by_position_is_the_same_cache():
    backbone = FAMILIES["llama"]()
    backbone(_inputs())
    attention = convert.to_doubly_normalized(backbone).transformer_layers[0]._self_attention_layer
    hidden = np.random.default_rng(0).normal(size=(2, 1, 16)).astype("float32")
    mask, cache = np.ones((2, 1, 7), bool), np.zeros((2, 2, 7, 2, 4), "float32")
    by_name = attention(hidden, mask, cache=cache, cache_update_index=0)
    by_position = attention(hidden, mask, cache, cache_update_index=0)
    for named, positional in zip(by_name, by_position):
        np.testing.assert_array_equal(ops.convert_to_numpy(named), ops.convert_to_numpy(positional))
    assert tuple(by_position[1].shape) == (2, 2, 7, 2, 6)


def test_caches_it_cannot_use_and_vllm_raise_saying_why():
    backbone = FAMILIES["llama"]()
    backbone(_inputs())
    dna = convert.to_doubly_normalized(backbone)
    attention = dna.transformer_layers[0]._self_attention_layer
    hidden = np.zeros((2, 1, 16), "float32")
    mask = np.ones((2, 1, 7), bool)
    with pytest.raises(ValueError, match=r"Argument `cache`.*\(2, 7, 2, 5\)"):
        attention(hidden, mask, cache=np.zeros((2, 2, 7, 2, 5), "float32"), cache_update_index=3)
    with pytest.raises(ValueError, match="vLLM"):
        attention._compute_vllm_attention(hidden, None, None)


def test_converted_causal_lm_saves_loads_and_trains(tmp_path):
    keras.utils.set_random_seed(1)
    backbone = FAMILIES["llama"]()
    causal_lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    causal_lm(_inputs())
    dna = convert.to_doubly_normalized(causal_lm, null_query=True)
    expected = _run(dna, _inputs())
    dna.save(tmp_path / "causal_lm.keras")
    loaded = keras.saving.load_model(tmp_path / "causal_lm.keras")
    np.testing.assert_allclose(_run(loaded, _inputs()), expected, rtol=1e-6, atol=1e-6)
    loaded.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    logits = [w for w in loaded.trainable_weights if w.path.endswith("null_query_logits")]
    # One per layer, each named by its layer (as layout maps read them).
    assert len({w.path for w in logits}) == 2
    assert all("/self_attention/" in w.path for w in logits), [w.path for w in logits]
    before = [ops.convert_to_numpy(w.value).copy() for w in logits]
    history = loaded.fit(_inputs(), TOKENS, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert all(np.abs(ops.convert_to_numpy(w.value) - b).max() > 0 for w, b in zip(logits, before))


def _greedy_without_cache(model, tokens, lengths, max_length):
    """Greedy decoding by rerunning the whole sequence: the reference."""
    tokens = tokens.copy()
    for index in range(min(lengths), max_length):
        logits = _run(model, _inputs(tokens, np.ones_like(tokens)))
        for row, length in enumerate(lengths):
            if index >= length:
                tokens[row, index] = int(np.argmax(logits[row, index - 1]))
    return tokens


@pytest.mark.parametrize("name", GENERATING)
def test_cached_generate_equals_a_greedy_loop_without_cache_and_samplers_run(name):
    keras.utils.set_random_seed(2)
    backbone = FAMILIES[name]()
    task = {"llama": keras_hub.models.LlamaCausalLM, "gemma2": keras_hub.models.GemmaCausalLM}[name]
    causal_lm = convert.to_doubly_normalized(task(backbone=backbone, preprocessor=None), null_query=True)
    lengths = [3, 5]
    tokens = np.zeros((2, 8), "int32")
    tokens[0, :3] = [3, 5, 7]
    tokens[1, :5] = [1, 2, 3, 4, 5]
    padding = np.arange(8)[None] < np.array(lengths)[:, None]
    causal_lm.compile(sampler="greedy")
    generated = causal_lm.generate(
        {"token_ids": tokens, "padding_mask": padding}, max_length=8, stop_token_ids=None
    )
    expected = _greedy_without_cache(causal_lm, tokens, lengths, 8)
    np.testing.assert_array_equal(ops.convert_to_numpy(generated["token_ids"]), expected)
    # Beam search repeats the cache per beam; contrastive search reads the
    # hidden states the cached steps return.
    samplers = (
        keras_hub.samplers.TopKSampler(k=3, seed=0), keras_hub.samplers.BeamSampler(num_beams=2),
        keras_hub.samplers.ContrastiveSampler(k=2, alpha=0.5),
    )
    for sampler in samplers:
        causal_lm.compile(sampler=sampler)
        sampled = causal_lm.generate(
            {"token_ids": tokens, "padding_mask": padding}, max_length=8, stop_token_ids=None
        )
        sampled = ops.convert_to_numpy(sampled["token_ids"])
        assert sampled.shape == (2, 8) and np.array_equal(sampled[padding], tokens[padding])


def test_lora_on_a_converted_backbone(family):
    name, _, dna = family
    dna = convert.to_doubly_normalized(dna)  # a copy: LoRA changes the model
    before = _run(dna, _inputs())
    dna.enable_lora(rank=2)
    lora = [w for w in dna.trainable_weights if "lora" in w.path]
    assert lora, name
    # LoRA starts as a zero update: the outputs stay.
    np.testing.assert_allclose(_run(dna, _inputs()), before, rtol=1e-6, atol=1e-6)
