"""One layer, one model, one SavedModel, called from several threads at once.

A model served from a thread pool shares its layers between requests: what
one call decides (causal normalization, the mask, chunking, returning the
weights) must not reach a concurrent call. Each threaded output must equal
the same call made alone. TensorFlow only (its eager calls release the GIL
inside kernels, so calls interleave).
"""

import concurrent.futures
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_dna import CausalNormalizationMask
from keras_dna import DoublyNormalizedAttention
from keras_dna.hub import TransformerDecoder

THREADS = 4
ROUNDS = 4
DIM = 8


def _inputs(seed, batch=2, length=7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, length, DIM)).astype("float32")


def _run_together(calls):
    """Runs `calls` (name -> zero-argument function) `ROUNDS` times each,
    on `THREADS` threads started together; returns every result by name."""
    barrier = threading.Barrier(THREADS)
    names = list(calls)

    def worker(index):
        barrier.wait()
        results = []
        for round_ in range(ROUNDS):
            name = names[(index + round_) % len(names)]
            results.append((name, np.asarray(calls[name]())))
        return results

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(worker, index) for index in range(THREADS)]
        return [result for future in futures for result in future.result()]


def _assert_each_equals_alone(calls):
    alone = {name: np.asarray(call()) for name, call in calls.items()}
    together = _run_together(calls)
    assert len(together) == THREADS * ROUNDS
    for name, output in together:
        np.testing.assert_allclose(output, alone[name], rtol=1e-5, atol=1e-6, err_msg=name)


def _layer_calls(layer):
    x, y = _inputs(0), _inputs(1, length=5)
    causal_mask = np.tril(np.ones((7, 7), bool))
    return {
        "causal": lambda: layer(x, x, use_causal_mask=True),
        "not causal": lambda: layer(x, x),
        "causal mask object": lambda: layer(
            x, x, attention_mask=CausalNormalizationMask(causal_mask)
        ),
        "cross, other shape": lambda: layer(y, x),
        "weights": lambda: layer(x, x, use_causal_mask=True, return_attention_scores=True)[1],
    }


@pytest.mark.parametrize("options", [
    {"jit_compile": False},
    {},
    {"normalization": "hybrid", "null_query": True},
    {"chunk_size": 3},
], ids=["eager", "compiled normalization", "hybrid null query", "chunked"])
def test_threads_share_one_layer(options):
    keras.utils.set_random_seed(0)
    layer = DoublyNormalizedAttention(2, 4, **options)
    calls = _layer_calls(layer)
    if "chunk_size" in options:
        del calls["weights"]  # a chunked layer never holds the weights
    _assert_each_equals_alone(calls)


def test_threads_share_one_compiled_function():
    keras.utils.set_random_seed(0)
    layer = DoublyNormalizedAttention(2, 4)
    compiled = tf.function(
        lambda x, causal: layer(x, x, use_causal_mask=causal), jit_compile=True
    )
    x = _inputs(0)
    _assert_each_equals_alone({
        "causal": lambda: compiled(x, True),
        "not causal": lambda: compiled(x, False),
    })


def test_threads_share_one_keras_hub_decoder():
    keras.utils.set_random_seed(0)
    decoder = TransformerDecoder(intermediate_dim=16, num_heads=2)
    x, padding = _inputs(0), np.arange(7)[None, :] < np.array([[7], [4]])
    decoder(x)
    _assert_each_equals_alone({
        "causal": lambda: decoder(x, decoder_padding_mask=padding),
        "not causal": lambda: decoder(x, decoder_padding_mask=padding, use_causal_mask=False),
    })


def test_threads_share_one_saved_model(tmp_path):
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None, DIM))
    encoded = DoublyNormalizedAttention(2, 4)(tokens, tokens)
    decoded = DoublyNormalizedAttention(2, 4)(encoded, encoded, use_causal_mask=True)
    keras.Model(tokens, decoded).export(str(tmp_path / "model"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "model"))
    _assert_each_equals_alone({
        f"shape {index}": (lambda x=_inputs(index, *shape): served.serve(x))
        for index, shape in enumerate([(2, 7), (3, 5), (1, 11), (4, 2)])
    })


def test_the_layer_keeps_no_call_state():
    """What a call decides stays in the call: after calls of every kind, the
    layer's attributes are those it had before (no flag left set)."""
    keras.utils.set_random_seed(0)
    layer = DoublyNormalizedAttention(2, 4)
    x = _inputs(0)
    layer(x, x)
    before = {name: value for name, value in vars(layer).items() if _is_plain(value)}
    for call in _layer_calls(layer).values():
        call()
    after = {name: value for name, value in vars(layer).items() if _is_plain(value)}
    assert after == before


def _is_plain(value):
    return value is None or isinstance(value, (bool, int, float, str, tuple))
