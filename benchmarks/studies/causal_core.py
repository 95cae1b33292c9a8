"""Times the attention-weight computation (XLA, forward and forward+backward).

Compares, on the same scores in the same process: softmax, doubly-normalized
attention, causal doubly-normalized attention (keras_dna's blocked prefix
sum), and a causal version built on `tf.math.cumulative_logsumexp` (the
straightforward transcription). Interleaved; medians and ratios to
non-causal DNA within each repeat.

    python -m benchmarks.studies.causal_core --lengths 512 2048
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import harness  # noqa: E402
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
STEPS = ("forward", "forward_backward")


def parse_args(argv=None):
    parser = harness.parser(__doc__.splitlines()[0], "studies/causal_core")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-cumulative", action="store_true",
                        help="skip the slow tf.math.cumulative_logsumexp variant")
    return parser.parse_args(argv)


def _steps(weights_fn):
    def loss_and_grad(s):
        with tf.GradientTape() as tape:
            tape.watch(s)
            loss = tf.reduce_sum(tf.square(weights_fn(s)))
        return tape.gradient(loss, s)

    return {"forward": tf.function(weights_fn, jit_compile=True),
            "forward_backward": tf.function(loss_and_grad, jit_compile=True)}


def measure(args, length):
    scores = tf.constant(np.random.default_rng(0).normal(
        size=(args.batch, args.heads, length, length)).astype("float32") * 3)
    names = [n for n in VARIANTS if not (args.skip_cumulative and "cumulative" in n)]
    steps = {(name, step): harness.blocking(lambda f=f: f(scores))
             for name in names for step, f in _steps(VARIANTS[name]).items()}
    ratios = {(name, step): ((name, step), ("double", step)) for name in names for step in STEPS}
    timing = harness.time_interleaved(steps, args.repeats, ratios, warmup=1)
    return [{"length": length, "variant": name,
             **{f"{step}_s": timing["steps"][name, step]["median_s"] for step in STEPS},
             **{f"{step}_ratio_to_double": timing["ratios"][name, step]["median"] for step in STEPS}}
            for name in names]


def main(argv=None):
    args = parse_args(argv)
    rows = [row for length in args.lengths for row in measure(args, length)]
    table = harness.markdown_table("", ["T", "variant", "forward ms", "ratio", "fwd+bwd ms", "ratio"], [
        [str(r["length"]), r["variant"], f"{r['forward_s'] * 1e3:.1f}",
         f"{r['forward_ratio_to_double']:.2f}", f"{r['forward_backward_s'] * 1e3:.1f}",
         f"{r['forward_backward_ratio_to_double']:.2f}"]
        for r in rows
    ])
    harness.write_results(args, {"rows": rows}, table, argv)


if __name__ == "__main__":
    main()
