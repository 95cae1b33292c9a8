"""Times the attention-weight computation (XLA, forward and forward+backward).

Compares, on the same scores in the same process: softmax, doubly-normalized
attention, causal doubly-normalized attention (keras_dna's blocked prefix
sum), and a causal version built on `tf.math.cumulative_logsumexp` (the
straightforward transcription). Prints medians and ratios to non-causal DNA.

    python benchmarks/causal_core.py --lengths 512 2048
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_dna import ops as dna_ops  # noqa: E402


def _cumulative_logsumexp_causal(scores):
    key_lse = tf.math.cumulative_logsumexp(scores, axis=-2)
    return tf.nn.softmax(scores - key_lse, axis=-1)


VARIANTS = {
    "softmax": lambda s: dna_ops.normalize_attention_scores(s, normalization="single"),
    "double": lambda s: dna_ops.normalize_attention_scores(s),
    "double_causal": lambda s: dna_ops.normalize_attention_scores(s, causal_normalization=True),
    "double_causal_cumulative_logsumexp": _cumulative_logsumexp_causal,
}


def _timed(fn, scores, repeats):
    fn(scores)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(scores)
        tf.nest.map_structure(lambda t: t.numpy(), result)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-cumulative", action="store_true",
                        help="skip the slow tf.math.cumulative_logsumexp variant")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for length in args.lengths:
        scores = tf.constant(
            rng.normal(size=(args.batch, args.heads, length, length)).astype("float32") * 3
        )
        row = {"length": length}
        for name, weights_fn in VARIANTS.items():
            if args.skip_cumulative and "cumulative" in name:
                continue
            forward = tf.function(weights_fn, jit_compile=True)

            def loss_and_grad(s, weights_fn=weights_fn):
                with tf.GradientTape() as tape:
                    tape.watch(s)
                    loss = tf.reduce_sum(tf.square(weights_fn(s)))
                return tape.gradient(loss, s)

            backward = tf.function(loss_and_grad, jit_compile=True)
            row[name] = {
                "forward_s": _timed(forward, scores, args.repeats),
                "forward_backward_s": _timed(backward, scores, args.repeats),
            }
        for name in list(row):
            if name != "length":
                for key in ("forward", "forward_backward"):
                    row[name][f"{key}_ratio_to_double"] = (
                        row[name][f"{key}_s"] / row["double"][f"{key}_s"]
                    )
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    print("\n| T | variant | forward ms | ratio | fwd+bwd ms | ratio |")
    print("|---|---|---|---|---|---|")
    for row in results:
        for name, cell in row.items():
            if name == "length":
                continue
            print(
                f"| {row['length']} | {name} | {cell['forward_s'] * 1e3:.1f} | "
                f"{cell['forward_ratio_to_double']:.2f} | "
                f"{cell['forward_backward_s'] * 1e3:.1f} | "
                f"{cell['forward_backward_ratio_to_double']:.2f} |"
            )


if __name__ == "__main__":
    main()
