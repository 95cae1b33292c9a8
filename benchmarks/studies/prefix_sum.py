"""The prefix sum over the queries that causal normalization needs, under XLA.

On a `(batch, heads, T, T)` tensor: keras_dna's blocked prefix sum
(`keras_dna.ops.causal.prefix_sum`), the same blocks summed by a product
with a lower-triangular matrix of ones, `tf.cumsum` (XLA's windowed
reduction), and a copy (`2 * x`), the least any of them must do. Same
process, interleaved, median over repeats; errors against a float64 NumPy
cumulative sum.

    python -m benchmarks.studies.prefix_sum --lengths 512
"""

import os

from benchmarks import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "studies/prefix_sum")
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
    rows = []
    for length in args.lengths:
        shape = (args.batch, args.heads, length, length)
        x = tf.constant(np.random.default_rng(0).random(shape), "float32")
        expected = np.cumsum(x.numpy().astype(np.float64), axis=-2)
        functions = {name: tf.function(f, jit_compile=True) for name, f in variants.items()}
        errors = {
            name: np.abs(f(x).numpy() - expected).max() / expected.max()
            for name, f in functions.items() if not name.startswith("copy")
        }
        steps = {name: harness.blocking(lambda f=f: f(x)) for name, f in functions.items()}
        ratios = {name: (name, "copy (2 * x)") for name in functions}
        timing = harness.time_interleaved(steps, args.repeats, ratios)
        rows += [[str(length), name, f"{1e3 * timing['steps'][name]['median_s']:.1f}",
                  f"{timing['ratios'][name]['median']:.2f}",
                  f"{errors[name]:.1e}" if name in errors else "-"] for name in functions]
    table = harness.markdown_table(
        "", ["T", "variant", "ms", "/ copy", "max relative error"], rows)
    harness.write_results(args, {"rows": rows}, table, argv)


if __name__ == "__main__":
    main()
