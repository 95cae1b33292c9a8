"""Every path of the layer in every mode a user meets, against the oracle.

Paths: double, single, hybrid, null query, causal (fast and exact
normalization), chunked, chunked causal, cross-attention with causal
normalization, grouped-query attention (causal, with the null query), and
cached decoding. Modes: eager (uncompiled), XLA,
`tf.function` with unknown batch and lengths, SavedModel export and reload
(unknown batch and lengths), `.keras` save and load, and LiteRT. Each case is
compared with the float64 NumPy transcription of docs/math.md (`tests/oracle.py`)
on inputs of two different shapes where one traced function must take both
(unknown shapes, SavedModel, `.keras`, uncompiled eager), of one elsewhere.

TensorFlow only: these modes are TensorFlow's. One test class per mode, so
that `pytest-xdist --dist loadscope` spreads the modes over the workers.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from keras_dna import DoublyNormalizedAttention
from keras_dna import DoublyNormalizedGroupQueryAttention
from keras_dna.hub import CachedDoublyNormalizedAttention
from tests import oracle

HEADS, KEY_DIM, DIM = 2, 4, 8
# Grouped-query attention: two groups of two query heads.
QUERY_HEADS, KEY_VALUE_HEADS = 4, 2
# (batch, query length, key length): two shapes through one traced function.
SHAPES = [(2, 6, 6), (3, 9, 9)]
CROSS_SHAPES = [(2, 6, 5), (3, 4, 8)]
TOLERANCE = {"atol": 3e-5, "rtol": 1e-4}
# LiteRT's kernels are not TensorFlow's (its own exp and reductions).
LITERT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


@dataclasses.dataclass(frozen=True)
class Path:
    options: dict = dataclasses.field(default_factory=dict)
    causal_mask: bool = False  # `use_causal_mask=True`
    cross: bool = False  # cross-attention with causal normalization
    rising_scores: bool = False  # scores far apart: the exact causal branch
    group_query: bool = False  # DoublyNormalizedGroupQueryAttention


PATHS = {
    "double": Path(),
    "single": Path({"normalization": "single"}),
    "hybrid": Path({"normalization": "hybrid"}),
    "null_query": Path({"null_query": True}),
    "causal_fast": Path(causal_mask=True),
    "causal_exact": Path(causal_mask=True, rising_scores=True),
    "chunked": Path({"chunk_size": 2}),
    "chunked_causal": Path({"chunk_size": 2}, causal_mask=True),
    "cross_causal": Path({"causal_normalization": True}, cross=True),
    "group_query_causal_null": Path({"null_query": True}, causal_mask=True, group_query=True),
}


def _make_scores_rise(layer):
    """Query `i`'s scores become about `8 * i` (feature 0 holds the
    position, feature 1 is 1): far beyond what the fast prefix sums of
    causal normalization hold in float32, so the exact branch runs."""
    rng = np.random.default_rng(7)
    query_kernel = 0.01 * rng.normal(size=(DIM, HEADS, KEY_DIM))
    key_kernel = 0.01 * rng.normal(size=(DIM, HEADS, KEY_DIM))
    query_kernel[0, :, 0] = 8.0 * np.sqrt(KEY_DIM)
    key_kernel[1, :, 0] = 1.0
    layer.query_dense.kernel.assign(query_kernel)
    layer.key_dense.kernel.assign(key_kernel)
    layer.query_dense.bias.assign(np.zeros((HEADS, KEY_DIM)))
    layer.key_dense.bias.assign(np.zeros((HEADS, KEY_DIM)))


def _model(path, jit_compile="auto"):
    """A functional model of one attention layer, with unknown batch and
    lengths; inputs `[x, x_mask]` (and `[context, context_mask]` for
    cross-attention)."""
    keras.utils.set_random_seed(0)
    x = keras.Input((None, DIM), name="x")
    x_mask = keras.Input((None,), dtype="bool", name="x_mask")
    if path.group_query:
        layer = DoublyNormalizedGroupQueryAttention(
            KEY_DIM, QUERY_HEADS, KEY_VALUE_HEADS, bias_initializer="random_normal",
            jit_compile=jit_compile, **path.options,
        )
    else:
        layer = DoublyNormalizedAttention(
            HEADS, KEY_DIM, bias_initializer="random_normal", jit_compile=jit_compile,
            **path.options,
        )
    if path.cross:
        context = keras.Input((None, DIM), name="context")
        context_mask = keras.Input((None,), dtype="bool", name="context_mask")
        inputs = [x, x_mask, context, context_mask]
        output = layer(x, context, query_mask=x_mask, value_mask=context_mask)
    else:
        inputs = [x, x_mask]
        output = layer(
            x, x, query_mask=x_mask, value_mask=x_mask, use_causal_mask=path.causal_mask
        )
    rng = np.random.default_rng(3)
    for logits in (layer.mixing_logits, layer.null_query_logits):
        if logits is not None:
            logits.assign(rng.normal(size=logits.shape))
    if path.rising_scores:
        _make_scores_rise(layer)
    return keras.Model(inputs, output), layer


def _inputs(path, shape, seed):
    batch, length, key_length = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, DIM)).astype("float32")
    if path.rising_scores:
        x[:, :, 0] = np.arange(length)
        x[:, :, 1] = 1.0
    x_mask = rng.random((batch, length)) < 0.8
    x_mask[:, 0] = True
    if not path.cross:
        return [x, x_mask]
    context = rng.normal(size=(batch, key_length, DIM)).astype("float32")
    context_mask = rng.random((batch, key_length)) < 0.8
    context_mask[:, 0] = True
    return [x, x_mask, context, context_mask]


def _expected(path, layer, inputs):
    if path.cross:
        x, x_mask, context, context_mask = inputs
        batch, length, key_length = x.shape[0], x.shape[1], context.shape[1]
        valid = oracle.validity(batch, length, key_length, x_mask, context_mask)
        return oracle.layer_forward(layer, x, context, valid=valid, causal=True)[0]
    x, x_mask = inputs
    batch, length = x.shape[:2]
    valid = oracle.validity(
        batch, length, length, x_mask, x_mask, causal=path.causal_mask
    )
    forward = oracle.group_query_layer_forward if path.group_query else oracle.layer_forward
    return forward(layer, x, x, valid=valid, causal=path.causal_mask)[0]


def _cases(path):
    shapes = CROSS_SHAPES if path.cross else SHAPES
    return [_inputs(path, shape, seed) for seed, shape in enumerate(shapes)]


def _signature(model):
    return [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in model.inputs]


@pytest.fixture(scope="module")
def models():
    return {name: _model(path) for name, path in PATHS.items()}


def _check(name, models, run, tolerance=TOLERANCE, cases=None):
    """`run(model, inputs)` against the oracle on each case of path `name`."""
    path = PATHS[name]
    model, layer = models[name]
    for inputs in cases or _cases(path):
        np.testing.assert_allclose(
            np.asarray(run(model, inputs)), _expected(path, layer, inputs), **tolerance,
            err_msg=name,
        )


@pytest.mark.parametrize("name", PATHS)
class TestEager:
    def test_uncompiled(self, name):
        model, layer = _model(PATHS[name], jit_compile=False)
        _check(name, {name: (model, layer)}, lambda m, inputs: m(inputs))

    def test_normalization_compiled(self, name, models):
        _check(name, models, lambda m, inputs: m(inputs), cases=_cases(PATHS[name])[:1])


@pytest.mark.parametrize("name", PATHS)
class TestXLA:
    def test_model_compiled_with_xla(self, name, models):
        compiled = tf.function(models[name][0], jit_compile=True)
        # One shape: XLA compiles each shape on its own.
        _check(name, models, lambda m, inputs: compiled(inputs), cases=_cases(PATHS[name])[:1])


@pytest.mark.parametrize("name", PATHS)
class TestUnknownShapes:
    def test_tf_function_with_unknown_batch_and_lengths(self, name, models):
        model = models[name][0]
        traced = tf.function(lambda inputs: model(inputs), input_signature=[_signature(model)])
        _check(name, models, lambda m, inputs: traced(inputs))
        assert len(traced._list_all_concrete_functions()) == 1


@pytest.mark.parametrize("name", PATHS)
class TestSavedModel:
    def test_export_and_reload_with_unknown_lengths(self, name, models, tmp_path):
        models[name][0].export(str(tmp_path / name), verbose=False)
        served = tf.saved_model.load(str(tmp_path / name))
        _check(name, models, lambda m, inputs: served.serve(inputs))


@pytest.mark.parametrize("name", PATHS)
class TestKerasFile:
    def test_save_and_load(self, name, models, tmp_path):
        models[name][0].save(tmp_path / "model.keras")
        loaded = keras.models.load_model(tmp_path / "model.keras")
        _check(name, models, lambda m, inputs: loaded(inputs))


def _litert_runner(converter):
    """The default signature of what `converter` makes, builtin ops only."""
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return Interpreter(model_content=converter.convert()).get_signature_runner()


@pytest.mark.parametrize("name", PATHS)
class TestLiteRT:
    def test_converts_with_builtin_ops(self, name, models):
        model = models[name][0]
        case = _cases(PATHS[name])[0]
        # LiteRT fixes the shapes: the same layers on static inputs.
        inputs = [
            keras.Input(batch_shape=t.shape, dtype=str(t.dtype), name=f"input_{i}")
            for i, t in enumerate(case)
        ]
        runner = _litert_runner(
            tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, model(inputs)))
        )

        def run(_, inputs):
            (output,) = runner(**{f"input_{i}": t for i, t in enumerate(inputs)}).values()
            return output

        _check(name, models, run, LITERT_TOLERANCE, cases=[case])


# Cached decoding: a prompt of `PROMPT` tokens through the cache at once,
# then one token per step; the outputs equal one causal call over the whole
# sequence.
PROMPT = 3


def _cached_layer():
    keras.utils.set_random_seed(1)
    layer = CachedDoublyNormalizedAttention(
        HEADS, KEY_DIM, bias_initializer="random_normal", causal_normalization=True,
        null_query=True,
    )
    layer.build((None, None, DIM), (None, None, DIM))
    layer.null_query_logits.assign(np.random.default_rng(5).normal(size=HEADS))
    return layer


def _empty_cache(batch, length):
    """The wide cache, no key seen yet (see the layer's docstring)."""
    cache = np.zeros((batch, 2, length, HEADS, KEY_DIM + 1), "float32")
    cache[:, 0, :, :, -1] = -np.inf
    return cache


def _decode(step, x):
    """Outputs of `step(block, cache, index, mask)` over `x` as a decoder."""
    batch, length = x.shape[:2]
    cache = _empty_cache(batch, length)
    outputs = []
    for start, end in [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, length)]:
        mask = np.arange(length)[None, None, :] <= np.arange(start, end)[None, :, None]
        mask = np.broadcast_to(mask, (batch, end - start, length))
        output, cache = step(x[:, start:end], cache, np.int32(start), mask)
        outputs.append(np.asarray(output))
        cache = np.asarray(cache)
    return np.concatenate(outputs, axis=1)


def _check_decoding(layer, step, shapes=((2, 6), (3, 8)), tolerance=TOLERANCE):
    for seed, (batch, length) in enumerate(shapes):
        x = np.random.default_rng(seed).normal(size=(batch, length, DIM)).astype("float32")
        valid = oracle.validity(batch, length, length, causal=True)
        expected = oracle.layer_forward(layer, x, x, valid=valid, causal=True)[0]
        np.testing.assert_allclose(_decode(step, x), expected, **tolerance)


def _step_of(layer):
    def step(block, cache, index, mask):
        return layer(block, block, attention_mask=mask, cache=cache, cache_update_index=index)

    return step


STEP_SIGNATURE = [
    tf.TensorSpec((None, None, DIM), tf.float32),
    tf.TensorSpec((None, 2, None, HEADS, KEY_DIM + 1), tf.float32),
    tf.TensorSpec((), tf.int32),
    tf.TensorSpec((None, None, None), tf.bool),
]


class TestCachedDecoding:
    @pytest.fixture(scope="class")
    @classmethod
    def layer(cls):
        return _cached_layer()

    def test_eager(self, layer):
        uncompiled = CachedDoublyNormalizedAttention.from_config(
            {**layer.get_config(), "jit_compile": False}
        )
        uncompiled.build((None, None, DIM), (None, None, DIM))
        uncompiled.set_weights(layer.get_weights())
        _check_decoding(layer, _step_of(uncompiled))
        _check_decoding(layer, _step_of(layer))

    def test_xla(self, layer):
        _check_decoding(layer, tf.function(_step_of(layer), jit_compile=True))

    def test_tf_function_with_unknown_batch_and_lengths(self, layer):
        traced = tf.function(_step_of(layer), input_signature=STEP_SIGNATURE)
        _check_decoding(layer, traced)
        assert len(traced._list_all_concrete_functions()) == 1

    def test_saved_model_with_unknown_lengths(self, layer, tmp_path):
        module = tf.Module()
        module.layer = layer
        module.step = tf.function(_step_of(layer), input_signature=STEP_SIGNATURE)
        tf.saved_model.save(module, str(tmp_path / "decoder"))
        served = tf.saved_model.load(str(tmp_path / "decoder"))
        _check_decoding(layer, served.step)

    def test_keras_file(self, layer, tmp_path):
        x = keras.Input((None, DIM))
        keras.Model(x, layer(x, x, use_causal_mask=True)).save(tmp_path / "model.keras")
        loaded = keras.models.load_model(tmp_path / "model.keras").layers[-1]
        assert isinstance(loaded, CachedDoublyNormalizedAttention)
        _check_decoding(layer, _step_of(loaded))

    def test_litert(self, layer):
        batch, length = 2, 6
        runners = {}
        for block in (PROMPT, 1):
            inputs = [
                keras.Input(batch_shape=(batch, block, DIM), name="block"),
                keras.Input(batch_shape=(batch, 2, length, HEADS, KEY_DIM + 1), name="cache"),
                keras.Input(batch_shape=(), dtype="int32", name="index"),
                keras.Input(batch_shape=(batch, block, length), dtype="bool", name="mask"),
            ]
            model = keras.Model(inputs, list(_DecodingStep(layer)(*inputs)))
            runners[block] = _litert_runner(tf.lite.TFLiteConverter.from_keras_model(model))

        def step(block, cache, index, mask):
            outputs = runners[block.shape[1]](block=block, cache=cache, index=index, mask=mask)
            return outputs["output_0"], outputs["output_1"]

        _check_decoding(layer, step, shapes=((batch, length),), tolerance=LITERT_TOLERANCE)


class _DecodingStep(keras.layers.Layer):
    """One cached call as a layer of a functional model, for the LiteRT
    converter (which takes the variables of Keras models, not of a
    `tf.Module`'s functions). The attention layer's own output spec has no
    cache: keras-hub's `CachedMultiHeadAttention` has none either."""

    def __init__(self, attention, **kwargs):
        super().__init__(**kwargs)
        self.attention = attention

    def call(self, block, cache, index, mask):
        return _step_of(self.attention)(block, cache, index, mask)

    def compute_output_spec(self, block, cache, index, mask):
        return keras.KerasTensor(block.shape), keras.KerasTensor(cache.shape)
