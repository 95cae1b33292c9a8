"""Mobile export: models with DNA convert to LiteRT (TFLite) with builtin ops only.

Every path converts and matches the oracle in `tests/test_modes.py`
(`TestLiteRT`); this module keeps what the matrix does not show. TensorFlow
only: the converter reads TensorFlow graphs.
"""

import numpy as np
import keras
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from keras_dna import DoublyNormalizedAttention

T, DIM = 12, 8


def _converted(model):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    # Builtin ops only: no TensorFlow ops carried along (Flex delegate).
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    (inputs,), (outputs,) = interpreter.get_input_details(), interpreter.get_output_details()

    def run(x):
        interpreter.set_tensor(inputs["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(outputs["index"])

    return run


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
