"""Mobile export: models with DNA convert to LiteRT (TFLite) with builtin ops only.

TensorFlow only: the converter reads TensorFlow graphs.
"""

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_dna
from keras_dna import DoublyNormalizedAttention
from tests import oracle

T, DIM = 12, 8


def _converted(model):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    # Builtin ops only: no TensorFlow ops carried along (Flex delegate).
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    (inputs,), (outputs,) = interpreter.get_input_details(), interpreter.get_output_details()

    def run(x):
        interpreter.set_tensor(inputs["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(outputs["index"])

    return run


@pytest.mark.parametrize("options", [
    {}, {"chunk_size": 4}, {"normalization": "hybrid", "null_query": True},
])
def test_causal_dna_converts_with_builtin_ops_and_matches_keras(rng, options):
    x = keras.Input((T, DIM), batch_size=2)
    layer = DoublyNormalizedAttention(2, 4, bias_initializer="random_normal", **options)
    model = keras.Model(x, layer(x, x, use_causal_mask=True))
    run = _converted(model)
    data = rng.normal(size=(2, T, DIM)).astype("float32")
    np.testing.assert_allclose(run(data), np.asarray(model(data)), atol=1e-4, rtol=0)


def test_exact_causal_path_converts_and_matches_the_oracle():
    """Scores rising by 6 per query (66 over the sequence) underflow the fast
    prefix sums, so the weights come from the exact log-space branch."""
    scores_input = keras.Input((2, T, T), batch_size=1)
    weights = keras_dna.ops.normalize_attention_scores(scores_input, causal_normalization=True)
    model = keras.Model(scores_input, weights)
    run = _converted(model)
    scores = np.broadcast_to(6.0 * np.arange(T)[:, None], (1, 2, T, T)).astype("float32")
    scores = scores + np.random.default_rng(0).normal(size=scores.shape).astype("float32")
    expected = oracle.attention_weights(scores, causal=True)
    np.testing.assert_allclose(np.asarray(model(scores)), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(run(scores), expected, atol=1e-4, rtol=0)


def test_conversion_after_an_export_with_unknown_lengths(rng, tmp_path):
    """A layer first exported with unknown lengths (a SavedModel's signature)
    still converts once its inputs are static: the shared compiled function
    does not hand the static call the export's general trace."""
    layer = DoublyNormalizedAttention(2, 4)
    general_input = keras.Input((None, DIM))
    general = keras.Model(general_input, layer(general_input, general_input, use_causal_mask=True))
    general.export(str(tmp_path / "general"), verbose=False)
    x = keras.Input((T, DIM), batch_size=2)
    model = keras.Model(x, layer(x, x, use_causal_mask=True))
    data = rng.normal(size=(2, T, DIM)).astype("float32")
    np.testing.assert_allclose(_converted(model)(data), np.asarray(model(data)), atol=1e-4, rtol=0)
