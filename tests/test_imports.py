"""`import keras_dna` loads what the layer needs, and no more, on every backend.

One subprocess per backend does every check. Under JAX and PyTorch,
TensorFlow is hidden from the import system first, as if it were not
installed (`setup.py` makes it an extra): the layer and the ops must work
without it, and keras_dna must not even try to import it.
"""

import json
import os
import subprocess
import sys

import pytest

_CHECK = """
import json, sys, time

hide_tensorflow = sys.argv[1] == "hide-tensorflow"
tensorflow_imports = []


class _WithoutTensorFlow:
    # Wraps each finder of sys.meta_path: none finds `tensorflow` or its
    # submodules, so `import tensorflow` raises ModuleNotFoundError and
    # importlib.util.find_spec("tensorflow") is None, as when it is not
    # installed. Every attempt is recorded.

    def __init__(self, finder):
        self._finder = finder

    def __getattr__(self, name):
        return getattr(self._finder, name)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            tensorflow_imports.append(name)
            return None
        return self._finder.find_spec(name, path, target)


if hide_tensorflow:
    sys.meta_path[:] = [_WithoutTensorFlow(finder) for finder in sys.meta_path]
    try:
        import tensorflow
    except ImportError:
        pass
    else:
        raise AssertionError("tensorflow was not hidden")

import numpy as np
import keras

# Keras and the backend may look for TensorFlow themselves (PyTorch's dynamo
# does); what counts is what keras_dna does from here on.
tensorflow_imports.clear()
before = set(sys.modules)
start = time.perf_counter()
import keras_dna
seconds = time.perf_counter() - start
added = set(sys.modules) - before

# The layer and the ops run.
rng = np.random.default_rng(0)
x = rng.normal(size=(2, 5, 8)).astype("float32")
output = keras.ops.convert_to_numpy(keras_dna.DoublyNormalizedAttention(2, 4)(x, x))
assert output.shape == (2, 5, 8) and np.isfinite(output).all(), output
q = rng.normal(size=(2, 5, 2, 4)).astype("float32")
attended = keras.ops.convert_to_numpy(keras_dna.ops.doubly_normalized_attention(q, q, q))
assert attended.shape == (2, 5, 2, 4) and np.isfinite(attended).all(), attended
weights = keras.ops.convert_to_numpy(keras_dna.ops.doubly_normalized_attention_weights(q, q))
np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
# The lazy submodules still come when asked for.
assert keras_dna.convert.to_doubly_normalized and keras_dna.analysis.explaining_away_statistics

print(json.dumps({
    "heavy": sorted(m for m in ("tensorflow", "keras_hub", "matplotlib") if m in added),
    "seconds": seconds,
    "tensorflow_imports": tensorflow_imports,
    "tensorflow_loaded": sys.modules.get("tensorflow") is not None,
}))
"""


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_import_loads_no_other_backend_and_no_keras_hub(backend):
    hide = "keep-tensorflow" if backend == "tensorflow" else "hide-tensorflow"
    result = subprocess.run(
        [sys.executable, "-c", _CHECK, hide], capture_output=True, text=True,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # TensorFlow is the TensorFlow backend's own; no backend loads keras-hub,
    # and matplotlib only comes with `keras_dna.analysis`'s plots.
    assert report["heavy"] == [], report
    # After Keras (which takes seconds), the package itself costs little.
    assert report["seconds"] < 1.0, report
    if backend != "tensorflow":
        # Without TensorFlow installed, keras_dna neither needs it nor looks.
        assert report["tensorflow_imports"] == [], report
        assert not report["tensorflow_loaded"], report
