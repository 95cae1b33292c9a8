"""The floor of DNA's cost: one extra pass over the scores, as a share of MHA's step.

Double normalization is softmax attention plus each key's log-sum-exp over
the queries (forward) and each key's sum over the queries of the softmax
gradient (backward): at least one more read of the `(batch, heads, T, S)`
scores in each direction, whatever the implementation. This script times,
in one process and under XLA, `MultiHeadAttention`'s forward and
forward+backward steps and, alone on a score-shaped tensor, a sum over the
query axis (one read) and a log-sum-exp over it (as `tf.reduce_logsumexp`
writes it), and reports the floor:

    forward floor = (MHA forward + sum pass) / MHA forward
    fwd+bwd floor = (MHA fwd+bwd + 2 sum passes) / MHA fwd+bwd

    python benchmarks/floor.py --output benchmarks/results/floor
"""

import argparse
import os
import time

from _results import write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--output", default="benchmarks/results/floor")
    return p.parse_args(argv)


def _median_seconds(fn, inputs, repeats):
    import numpy as np
    import tensorflow as tf

    def run():
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), fn(*inputs))
        return time.perf_counter() - start

    run()
    run()
    return float(np.median([run() for _ in range(repeats)]))


def measure(args, length):
    import keras
    import numpy as np
    import tensorflow as tf

    batch = max(1, args.tokens // length)
    rng = np.random.default_rng(0)
    query = tf.constant(rng.normal(size=(batch, length, args.width)), "float32")
    scores = tf.constant(rng.normal(size=(batch, args.heads, length, length)), "float32")
    mha = keras.layers.MultiHeadAttention(args.heads, args.width // args.heads)
    mha(query, query)

    @tf.function(jit_compile=True)
    def forward(x):
        return mha(x, x)

    @tf.function(jit_compile=True)
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(mha(x, x)))
        return tape.gradient(loss, [x] + mha.trainable_weights)

    @tf.function(jit_compile=True)
    def logsumexp_pass(s):
        return tf.reduce_logsumexp(s, axis=-2)

    @tf.function(jit_compile=True)
    def sum_pass(s):
        return tf.reduce_sum(s, axis=-2)

    times = {
        "mha_forward_s": _median_seconds(forward, [query], args.repeats),
        "mha_forward_backward_s": _median_seconds(forward_backward, [query], args.repeats),
        "logsumexp_pass_s": _median_seconds(logsumexp_pass, [scores], args.repeats),
        "sum_pass_s": _median_seconds(sum_pass, [scores], args.repeats),
    }
    times["forward_floor"] = 1 + times["sum_pass_s"] / times["mha_forward_s"]
    times["forward_backward_floor"] = 1 + 2 * times["sum_pass_s"] / times["mha_forward_backward_s"]
    return {"length": length, "batch": batch, **times}


def markdown(rows):
    lines = [
        "| T | batch | MHA fwd ms | MHA fwd+bwd ms | sum pass ms | log-sum-exp pass ms "
        "| forward floor | fwd+bwd floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['mha_forward_s'] * 1e3:.0f} | "
            f"{r['mha_forward_backward_s'] * 1e3:.0f} | {r['sum_pass_s'] * 1e3:.1f} | "
            f"{r['logsumexp_pass_s'] * 1e3:.1f} | {r['forward_floor']:.3f} | "
            f"{r['forward_backward_floor']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for length in args.lengths:
        rows.append(measure(args, length))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    write_results(args.output, "floor.py", argv, {"settings": vars(args), "rows": rows},
                  markdown(rows))


if __name__ == "__main__":
    main()
