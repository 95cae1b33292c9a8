"""The prefix sum over the queries that causal normalization needs, under XLA.

On a `(batch, heads, T, T)` tensor: keras_dna's blocked prefix sum
(`keras_dna.ops.causal.prefix_sum`), the same blocks summed by a product
with a lower-triangular matrix of ones, `tf.cumsum` (XLA's windowed
reduction), and a copy (`2 * x`), the least any of them must do. Same
process, interleaved, median over repeats; errors against a float64 NumPy
cumulative sum.

    python benchmarks/prefix_sum.py --lengths 512
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--block", type=int, default=16, help="rows per block of the triangular product")
    p.add_argument("--repeats", type=int, default=10)
    return p.parse_args(argv)


def _triangular_prefix_sum(x, block):
    """Within blocks of `block` rows, a product with a lower-triangular
    matrix of ones; then each block's total carried over."""
    import tensorflow as tf

    batch, heads, length, keys = x.shape
    blocks = tf.reshape(x, (batch, heads, length // block, block, keys))
    rows = tf.range(block)
    lower = tf.cast(rows[None, :] <= rows[:, None], x.dtype)
    within = tf.einsum("kj,bnmjs->bnmks", lower, blocks)
    before = tf.cumsum(within[:, :, :, -1, :], axis=2, exclusive=True)
    return tf.reshape(within + before[:, :, :, None, :], x.shape)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf

    from keras_dna.ops.causal import prefix_sum

    variants = {
        "keras_dna blocked": lambda x: prefix_sum(x, -2),
        f"triangular product, blocks of {args.block}": (
            lambda x: _triangular_prefix_sum(x, args.block)
        ),
        "tf.cumsum": lambda x: tf.cumsum(x, axis=-2),
        "copy (2 * x)": lambda x: 2.0 * x,
    }
    print("| T | variant | ms | / copy | max relative error |")
    print("|---|---|---|---|---|")
    for length in args.lengths:
        shape = (args.batch, args.heads, length, length)
        x = tf.constant(np.random.default_rng(0).random(shape), "float32")
        expected = np.cumsum(x.numpy().astype(np.float64), axis=-2)
        functions = {name: tf.function(f, jit_compile=True) for name, f in variants.items()}
        errors = {
            name: np.abs(f(x).numpy() - expected).max() / expected.max()
            for name, f in functions.items() if not name.startswith("copy")
        }
        times = {name: [] for name in functions}
        for _ in range(args.repeats):
            for name, f in functions.items():
                start = time.perf_counter()
                f(x).numpy()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(values) for name, values in times.items()}
        for name, seconds in median.items():
            error = f"{errors[name]:.1e}" if name in errors else "-"
            print(f"| {length} | {name} | {1e3 * seconds:.1f} | "
                  f"{seconds / median['copy (2 * x)']:.2f} | {error} |", flush=True)


if __name__ == "__main__":
    main()
