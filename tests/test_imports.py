"""`import keras_dna` loads what the layer needs, and no more, on every backend."""

import subprocess
import sys

import pytest

_CHECK = """
import sys, time
import keras
before = set(sys.modules)
start = time.perf_counter()
import keras_dna
seconds = time.perf_counter() - start
added = set(sys.modules) - before
heavy = sorted(m for m in ("tensorflow", "keras_hub", "matplotlib") if m in added)
print(heavy, seconds)
assert keras_dna.DoublyNormalizedAttention and keras_dna.ops.doubly_normalized_attention
# The lazy submodules still come when asked for.
assert keras_dna.convert.to_doubly_normalized and keras_dna.analysis.explaining_away_statistics
"""


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_import_loads_no_other_backend_and_no_keras_hub(backend):
    result = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True,
        env={**__import__("os").environ, "KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    heavy, seconds = result.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    # TensorFlow is the TensorFlow backend's own; no backend loads keras-hub,
    # and matplotlib only comes with `keras_dna.analysis`'s plots.
    assert heavy == "[]", heavy
    # After Keras (which takes seconds), the package itself costs little.
    assert float(seconds) < 1.0, seconds
