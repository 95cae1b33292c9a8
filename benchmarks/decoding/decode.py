"""Per-token cost of a cached decoding step: the DNA cache against keras-hub's.

One self-attention step (one new token against a cache of length S, causal
mask) of `keras_dna.hub.CachedDoublyNormalizedAttention` (causal double
normalization: the key state, one column of the cache, is read, one score
added per key, written back)
and of `keras_hub.layers.CachedMultiHeadAttention`, each compiled with XLA as
keras-hub's `generate` compiles it where Keras turns XLA on (not on CPUs:
`generate.py` measures that case). Same process, the two
layers' calls interleaved, median over repeats; reported as the ratio
DNA / MHA per cache length, with the ratio of the returned caches' sizes.

    python -m benchmarks.decoding.decode --lengths 128 512 1024 2048 4096
"""

import json
import os

from benchmarks import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "decoding/decode")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=100)
    return p.parse_args(argv)


def _step_function(layer, state_columns, args, length):
    import numpy as np
    import tensorflow as tf

    width = args.heads * args.head_dim
    rng = np.random.default_rng(0)
    cache_width = args.head_dim + state_columns
    cache = rng.normal(size=(args.batch, 2, length, args.heads, cache_width))
    if state_columns:
        cache[:, 1, ..., args.head_dim] = 1.0  # every key seen by earlier queries
    cache = tf.constant(cache, "float32")
    token = tf.constant(rng.normal(size=(args.batch, 1, width)), "float32")
    layer(token, token)  # build
    index = length - 1
    mask = tf.constant(np.arange(length)[None, None, :] <= index)

    @tf.function(jit_compile=True)
    def step(token, cache):
        return layer(token, token, attention_mask=mask, cache=cache, cache_update_index=index)

    return lambda: step(token, cache)


def measure(args, length):
    import keras_hub

    from keras_dna.hub import CachedDoublyNormalizedAttention

    calls = {
        "mha": _step_function(
            keras_hub.layers.CachedMultiHeadAttention(args.heads, args.head_dim), 0, args, length
        ),
        "dna": _step_function(
            CachedDoublyNormalizedAttention(args.heads, args.head_dim, causal_normalization=True),
            1, args, length,
        ),
    }
    cache_bytes = {name: _size(call()[1]) for name, call in calls.items()}
    # Only the output is read back: copying the caches would dominate.
    steps = {name: harness.blocking(lambda call=call: call()[0]) for name, call in calls.items()}
    timing = harness.time_interleaved(steps, args.repeats, {"DNA/MHA": ("dna", "mha")}, warmup=5)
    median = {name: t["median_s"] for name, t in timing["steps"].items()}
    return {
        "cache_length": length,
        "mha_ms": 1e3 * median["mha"],
        "dna_ms": 1e3 * median["dna"],
        "ratio": timing["ratios"]["DNA/MHA"]["median"],
        "cache_bytes_ratio": cache_bytes["dna"] / cache_bytes["mha"],
    }


def _size(cache):
    return cache.shape.num_elements() * cache.dtype.size


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for length in args.lengths:
        rows.append(measure(args, length))
        print(json.dumps(rows[-1]), flush=True)
    table = harness.markdown_table(
        f"Cached decoding step, batch {args.batch}, {args.heads} heads of {args.head_dim}, "
        f"XLA, float32, median of {args.repeats}",
        ["cache length", "MHA (ms)", "DNA (ms)", "DNA / MHA", "cache memory DNA / MHA"],
        [
            [str(r["cache_length"]), f"{r['mha_ms']:.3f}", f"{r['dna_ms']:.3f}",
             f"{r['ratio']:.2f}x", f"{r['cache_bytes_ratio']:.3f}x"]
            for r in rows
        ],
    )
    harness.write_results(args, {"rows": rows}, table, argv)


if __name__ == "__main__":
    main()
