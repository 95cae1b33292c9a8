"""Chooses the null query's initial log-mass: g2p trained from several values.

Each (value, seed) trains examples/grapheme_to_phoneme.py in a fresh process
with `--attention double+null --null-init VALUE`, its run kept in
--output-dir (a run already there is read, not repeated); the table gives
the mean over seeds of the final validation loss and accuracy and of the
test word and phoneme error rates.

    python -m benchmarks.studies.null_query_init --values -4 -2 0 2 4 --seeds 0 1 --limit 10000 --epochs 4
"""

import json
import pathlib
import sys

import numpy as np

from benchmarks import harness

COLUMNS = [("val_loss", "final val loss"), ("val_accuracy", "final val accuracy"),
           ("test_word_error_rate", "test WER"), ("test_phoneme_error_rate", "test PER")]


def parse_args(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "studies/null_query_init")
    p.add_argument("--values", type=float, nargs="+", default=[-4.0, -2.0, 0.0, 2.0, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--output-dir", default="runs/null_query_init", help="the training runs")
    return p.parse_args(argv)


def train(argv):
    """The example's training; run in its own process."""
    # The examples are scripts, not a package.
    sys.path.insert(0, str(harness.ROOT / "examples"))
    import grapheme_to_phoneme

    grapheme_to_phoneme.main(argv)


def run(value, seed, args, output_dir):
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.exists():
        argv = ["--attention", "double+null", "--null-init", str(value), "--seed", str(seed),
                "--limit", str(args.limit), "--epochs", str(args.epochs),
                "--output-dir", str(output_dir.resolve())]
        print("+ grapheme_to_phoneme.py", " ".join(argv), flush=True)
        done = harness.in_subprocess(train, argv, environment={"TF_CPP_MIN_LOG_LEVEL": "2"})
        if done is not None:
            raise RuntimeError(f"beta {value:g}, seed {seed}: {done['error']}")
    metrics = json.loads(metrics_file.read_text())
    return {key: metrics["history"][key][-1] if key in metrics["history"] else metrics[key]
            for key, _ in COLUMNS}


def main(argv=None):
    args = parse_args(argv)
    root = pathlib.Path(args.output_dir)
    rows = []
    for value in args.values:
        results = []
        for seed in args.seeds:
            output_dir = root / f"beta{value:g}" / f"seed{seed}"
            output_dir.mkdir(parents=True, exist_ok=True)
            results.append(run(value, seed, args, output_dir))
        rows.append([f"{value:g}"] + [
            f"{np.mean([r[key] for r in results]):.4f} ± {np.std([r[key] for r in results]):.4f}"
            for key, _ in COLUMNS])
    table = harness.markdown_table("", ["initial beta"] + [label for _, label in COLUMNS], rows)
    harness.write_results(args, {"rows": rows}, table, argv)


if __name__ == "__main__":
    main()
