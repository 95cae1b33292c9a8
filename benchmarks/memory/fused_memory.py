"""What `jax.jit` reserves for the fused path and its exact fallback.

Compiles (nothing runs, so the machine's load does not matter) one
forward+backward step of `keras_dna.ops.doubly_normalized_attention` with
`implementation="fused"` and reads XLA's `memory_analysis()` temporaries:

- `fused, no fallback`: `keras_dna.ops.fused.fused_attention` alone;
- `fused, whole fallback`: the exact fallback through the whole matrix
  (`chunk_size=None`), as before the selector;
- `fused, blockwise fallback`: the fallback by blocks of 512 queries, what
  the selector now passes for long sequences;
- `softmax kernel`: `keras.ops.dot_product_attention` itself.

XLA reserves memory for both branches of a conditional, so a fallback
through the whole matrix costs score-sized memory even where it never runs.
On a CPU, Keras's JAX kernel is `jax.nn.dot_product_attention`'s XLA form,
which writes the scores itself; on GPUs the kernel is cuDNN's, and the
fused rows less the kernel's row are what DNA adds.

    python -m benchmarks.memory.fused_memory --lengths 4096 8192
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402

from benchmarks import harness  # noqa: E402
from keras_dna.ops import doubly_normalized_attention  # noqa: E402
from keras_dna.ops.fused import fused_attention  # noqa: E402

VARIANTS = ("softmax kernel", "fused, no fallback", "fused, whole fallback", "fused, blockwise fallback")


def _attention(variant, query, key, value):
    if variant == "softmax kernel":
        return keras.ops.dot_product_attention(query, key, value)
    if variant == "fused, no fallback":
        output, _ = fused_attention(
            query, key, value, None, normalization="double", scale=query.shape[-1] ** -0.5
        )
        return output
    chunk_size = 512 if variant == "fused, blockwise fallback" else None
    return doubly_normalized_attention(
        query, key, value, implementation="fused", chunk_size=chunk_size
    )


def temp_bytes(variant, batch, length, heads, head_dim, dtype):
    shape = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)

    def loss(query, key, value):
        return jnp.sum(_attention(variant, query, key, value).astype("float32"))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return step.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes


def main(argv=None):
    parser = harness.parser(__doc__.splitlines()[0], "memory/fused_memory")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    rows, data = [], []
    for length in args.lengths:
        scores = 4 * args.batch * args.heads * length * length
        sizes = {v: temp_bytes(v, args.batch, length, args.heads, args.head_dim, args.dtype) for v in VARIANTS}
        data.append({"length": length, "score_bytes": scores, **sizes})
        for variant in VARIANTS:
            rows.append([
                str(length), variant, f"{sizes[variant] / 2**20:.0f}",
                f"{sizes[variant] / scores:.2f}",
                f"{(sizes[variant] - sizes['softmax kernel']) / scores:+.2f}",
            ])
    table = harness.markdown_table(
        f"JAX {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}, "
        f"{args.heads} heads of {args.head_dim}, {args.dtype}, forward+backward under jax.jit; "
        "temporaries from XLA's memory_analysis(), in MiB and in float32 score matrices "
        "(batch x heads x T x T).",
        ["T", "variant", "temp MiB", "in score matrices", "beyond the softmax kernel"],
        rows,
    )
    harness.write_results(args, {"rows": data}, table, argv)


if __name__ == "__main__":
    main()
