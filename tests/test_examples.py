"""Each example runs end to end in a tiny configuration and exports."""

import json
import pathlib
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import digits  # noqa: E402


def test_digits_trains_exports_and_serves(tmp_path):
    metrics = digits.main(
        ["--epochs", "1", "--limit", "300", "--attention", "hybrid",
         "--output-dir", str(tmp_path)]
    )
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["attention"] == "hybrid"
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    logits = served.serve(tf.zeros((3, 28, 28)))
    assert logits.shape == (3, 10)
    assert np.isfinite(logits.numpy()).all()
