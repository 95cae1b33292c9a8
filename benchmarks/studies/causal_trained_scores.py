"""Times causal double normalization (forward+backward, XLA) on normal,
masked-outlier, valid-outlier and trained-like scores, before and after the
causal shift (each key's score at its first valid query).

"Before" is `keras_dna/ops/causal.py` as committed (`git show
HEAD:keras_dna/ops/causal.py`, loaded as a temporary module; `--before-rev`
picks another revision), "after" the working tree's. Both run on the same
scores in the same process, interleaved: each repeat times every (case,
version) pair once (the mean of `--calls` calls), and the table gives the
median over `--repeats` repeats. One process per backend (JAX jit,
TensorFlow XLA).

Scores, float32, `(batch, heads, T, T)` under a causal mask:

- `normal`: `3 * N(0, 1)`;
- `masked +60`: `normal`, one masked score (query 10, key 100: a future
  key) set to +60, the weights unchanged;
- `valid +60`: `normal`, one valid score (query 100, key 10) set to +60;
- `trained-like`: `o[j] + 0.35 * i + N(0, 2^2)` for query i and key j:
  a large per-key offset `o[j] ~ N(0, 8^2)` (key 0, an attention sink,
  +20), and a trend rising by about 45 along the queries. Synthetic (no
  trained model was run): per-key offsets cancel in double normalization,
  and a rise along the queries is what a shift taken over all queries
  (before) turns into underflow of the early prefix sums.

    python -m benchmarks.studies.causal_trained_scores
    python -m benchmarks.studies.causal_trained_scores --backends jax --repeats 9
"""

import argparse
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile

from benchmarks import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = harness.ROOT
CASES = ("normal", "masked +60", "valid +60", "trained-like")


def _scores(case, shape, rng):
    import numpy as np

    batch, heads, length, _ = shape
    scores = rng.normal(size=shape) * 3.0
    if case == "masked +60":
        scores[0, 0, 10, 100] = 60.0
    elif case == "valid +60":
        scores[0, 0, 100, 10] = 60.0
    elif case == "trained-like":
        offsets = rng.normal(size=(batch, heads, 1, length)) * 8.0
        offsets[..., 0] += 20.0
        trend = 0.35 * np.arange(length)[:, None]
        scores = offsets + trend + rng.normal(size=shape) * 2.0
    return scores.astype("float32")


def _before_module(rev):
    source = subprocess.run(
        ["git", "show", f"{rev}:keras_dna/ops/causal.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "causal_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("causal_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _steps(normalize, valid):
    """A compiled `scores -> (loss, gradient)` of `sum(weights ** 2)`."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss(s):
            return jnp.sum(jnp.square(normalize(s, valid)))

        return jax.jit(jax.value_and_grad(loss))
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def step(s):
        with tf.GradientTape() as tape:
            tape.watch(s)
            loss = tf.reduce_sum(tf.square(normalize(s, valid)))
        return loss, tape.gradient(loss, s)

    return step


def _block(result):
    import numpy as np

    return [np.asarray(r) for r in result]


def child(settings):
    """Both versions on every case; run in its own process per backend."""
    import keras
    import numpy as np
    from keras import ops

    from keras_dna.ops import causal as after

    args = argparse.Namespace(**settings)
    before = _before_module(args.before_rev)
    shape = (args.batch, args.heads, args.length, args.length)
    rng = np.random.default_rng(0)
    valid = ops.convert_to_tensor(np.tril(np.ones((args.length, args.length), bool)))
    scores = {case: ops.convert_to_tensor(_scores(case, shape, rng)) for case in CASES}
    versions = {
        "before": before.causal_double_normalization,
        "after": after.causal_double_normalization,
    }
    steps = {name: _steps(fn, valid) for name, fn in versions.items()}
    fast = {case: bool(after.causal_path_trusted(scores[case], valid)) for case in CASES}
    for case in CASES:  # compile, and check the two agree
        results = {name: _block(step(scores[case])) for name, step in steps.items()}
        gap = float(np.max(np.abs(results["before"][1] - results["after"][1])))
        assert gap < 1e-4, (case, gap)
    calls = {(case, name): lambda s=step, c=case: _block(s(scores[c]))
             for case in CASES for name, step in steps.items()}
    timing = harness.time_interleaved(calls, args.repeats, warmup=0, calls=args.calls)["steps"]
    return [
        {
            "backend": keras.backend.backend(),
            "case": case,
            "after_takes_fast_path": fast[case],
            "before_ms": 1e3 * timing[case, "before"]["median_s"],
            "after_ms": 1e3 * timing[case, "after"]["median_s"],
        }
        for case in CASES
    ]


def main(argv=None):
    parser = harness.parser(__doc__.splitlines()[0], "studies/causal_trained_scores")
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--before-rev", default="HEAD")
    args = parser.parse_args(argv)
    rows = []
    for backend in args.backends:
        done = harness.in_subprocess(child, vars(args), backend=backend)
        if "error" in done:
            sys.exit(f"{backend} failed: {done['error']}")
        rows += done

    title = (
        f"Causal double normalization, forward+backward of sum(weights^2), "
        f"({args.batch}, {args.heads}, {args.length}, {args.length}) float32 under a "
        f"causal mask, median of {args.repeats} interleaved repeats of {args.calls} calls "
        f"(CPU, shared). Before: `{args.before_rev}`; after: the working tree."
    )
    cells = [
        [
            row["backend"], row["case"], "fast" if row["after_takes_fast_path"] else "exact",
            f"{row['before_ms']:.1f}", f"{row['after_ms']:.1f}",
            f"{row['before_ms'] / row['after_ms']:.2f}",
        ]
        for row in rows
    ]
    table = harness.markdown_table(
        title, ["backend", "scores", "path after", "before ms", "after ms", "before / after"], cells
    )
    harness.write_results(args, {"rows": rows}, table, argv)


if __name__ == "__main__":
    main()
