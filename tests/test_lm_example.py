"""The decoder example (examples/tweet_lm.py) in a tiny configuration: it
trains keras-hub's Llama converted to DNA, generates through the cache, and
saves a `.keras` file that reloads with the same perplexity."""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

pytest.importorskip("keras_hub")
import tweet_lm  # noqa: E402

import keras_dna  # noqa: E402


def test_encode_and_decode_are_inverse_up_to_the_end_id():
    vocabulary = tweet_lm.vocabulary_of(["ab" * 20, "abc" * 20, "x"])  # x: too rare
    assert vocabulary == ["a", "b", "c"]
    ids = tweet_lm.encode(["cab", "x"], vocabulary, 6)
    assert ids.tolist() == [[2, 6, 4, 5, 3, 0], [2, 1, 3, 0, 0, 0]]
    assert [tweet_lm.decode(row, vocabulary) for row in ids] == ["cab", "?"]


def test_the_example_trains_generates_and_reloads(tmp_path):
    metrics = tweet_lm.main([
        "--attention", "double+null", "--epochs", "1", "--limit", "200", "--width", "16",
        "--depth", "1", "--output-dir", str(tmp_path),
    ])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["attention"] == "double+null" and saved["replicas"] == 1
    # Above 1 (a model is never sure) and, barely trained, not far from uniform.
    assert 1.0 < metrics["test_perplexity"] < 200.0
    np.testing.assert_allclose(metrics["reloaded_test_perplexity"], metrics["test_perplexity"],
                               rtol=1e-5)
    stats = saved["explaining_away"]
    assert stats["keys"] > 0 and stats["causal_ceiling"]["rows"] > 0
    assert (tmp_path / "column_sums.npz").exists() and (tmp_path / "attention.png").exists()
    assert list(metrics["generated"]) == list(tweet_lm.PROMPTS)
    for prompt, text in metrics["generated"].items():
        assert text.startswith(prompt.rstrip()) and len(text) <= tweet_lm.GENERATED_LENGTH
    import keras

    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    attention = [layer for layer in reloaded.backbone._flatten_layers()
                 if isinstance(layer, keras_dna.hub.decoders.DecoderAttentionMixin)]
    assert attention and all(layer.normalization == "double" for layer in attention)
