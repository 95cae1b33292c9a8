"""The floor of DNA's cost: one extra pass over the scores, as a share of MHA's step.

Double normalization is softmax attention plus each key's log-sum-exp over
the queries (forward) and each key's sum over the queries of the softmax
gradient (backward): at least one more read of the `(batch, heads, T, S)`
scores in each direction, whatever the implementation. This script times,
in one process, interleaved and under XLA, `MultiHeadAttention`'s forward and
forward+backward steps and, alone on a score-shaped tensor, a sum over the
query axis (one read) and a log-sum-exp over it (as `tf.reduce_logsumexp`
writes it), and reports the floor:

    forward floor = (MHA forward + sum pass) / MHA forward
    fwd+bwd floor = (MHA fwd+bwd + 2 sum passes) / MHA fwd+bwd

    python -m benchmarks.speed.floor
"""

import os

from benchmarks import harness
from benchmarks.speed import layer_step

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "speed/floor")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    return p.parse_args(argv)


def measure(args, length):
    import keras
    import numpy as np
    import tensorflow as tf

    query = tf.constant(np.random.default_rng(0).normal(
        size=(max(1, args.tokens // length), length, args.width)), "float32")
    scores = tf.constant(np.random.default_rng(1).normal(
        size=(query.shape[0], args.heads, length, length)), "float32")
    mha = keras.layers.MultiHeadAttention(args.heads, args.width // args.heads)
    harness.build_with_same_weights({"mha": mha}, query.shape)
    mha_steps = layer_step.layer_steps(mha, "xla", {})
    passes = {"logsumexp_pass": lambda s: tf.reduce_logsumexp(s, axis=-2),
              "sum_pass": lambda s: tf.reduce_sum(s, axis=-2)}
    steps = {f"mha_{name}": harness.blocking(lambda step=step: step(query, query))
             for name, step in mha_steps.items()}
    steps.update({name: harness.blocking(lambda f=tf.function(f, jit_compile=True): f(scores))
                  for name, f in passes.items()})
    times = {f"{name}_s": t["median_s"]
             for name, t in harness.time_interleaved(steps, args.repeats)["steps"].items()}
    times["forward_floor"] = 1 + times["sum_pass_s"] / times["mha_forward_s"]
    times["forward_backward_floor"] = 1 + 2 * times["sum_pass_s"] / times["mha_forward_backward_s"]
    return {"length": length, "batch": query.shape[0], **times}


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
    harness.write_results(args, {"rows": rows}, markdown(rows), argv)


if __name__ == "__main__":
    main()
